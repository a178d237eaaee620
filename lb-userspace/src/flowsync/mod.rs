//! Flow state that survives losing a node.
//!
//! Nodes behind a router's ECMP build identical Maglev tables from the same
//! configuration, so a connection the router moves to another node reaches
//! the same backend: unless that backend is no longer Maglev's choice for
//! it (the backend set changed since the connection began, or its backend
//! drains). Each node sends its peers those *deviating* flows, and peers
//! install them in their own flow table (FLOWS), where the dataplane keeps a
//! tracked flow on its backend while that backend is active (or draining,
//! for packets other than a SYN).
//!
//! - A walk of FLOWS (batched, on a blocking thread) finds the deviating
//!   flows ([`view::SyncView::deviation`]) and sends them to every peer:
//!   ~100 ms after the tables change ([`FlowSync::tables_changed`];
//!   deviations only arise then: a new flow is Maglev's choice by
//!   construction), every `refresh`, and to a peer that asks for the full
//!   set. Every node asks all its peers when it starts, and asks again
//!   (after 1 s, 2 s, 4 s... up to `refresh`) those that have not answered;
//!   a peer with nothing to send answers with an empty datagram.
//! - Records carry the backend's address and port, never its id: ids and
//!   generations are each node's own. The receiver maps them to its own
//!   ([`view::SyncView::resolve`]) and computes the flow hash itself. A
//!   record never replaces a live entry of this node's own (a client that
//!   reused a connection's addresses and ports here, or a peer that holds
//!   an entry longer than the connection lasted): only where this node has
//!   no entry, or one the dataplane would not keep anyway (stale), or one
//!   it installed from a peer itself and has not changed since.
//! - Flows installed from a peer are not sent back, unless this node's
//!   entry for them changed since.
//! - Datagrams are authenticated, name their sender and their destination,
//!   and are numbered in a session that each process draws at random when
//!   it starts ([`wire`]); records sent are paced to `max_rate` per second
//!   in all (each copy to each peer counts), and records installed to
//!   `max_rate` per second times the number of peers. A peer's request for
//!   the full set is answered at most once a second.
//! - Only DSR and IP-in-IP VIPs are synced. NAT connections are not: their
//!   state is in NAT_FLOWS, and their replies must come back through the
//!   node that translated them, which another node cannot stand in for.

pub mod view;
pub mod wire;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Map, MapData, MapError};
use lb_common::maps::{FlowKey, FlowValue};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    addr,
    config::FlowSyncSettings,
    status::{PeerStatus, SyncStatus},
    walks,
};
pub use view::SyncView;
use view::{Reject, vip_key_of};
use wire::{FlowRecord, Message, Opener, Sealer, Session};

/// After a table change, wait until changes stop for this long...
const DEBOUNCE: Duration = Duration::from_millis(100);
/// ...but no longer than this.
const DEBOUNCE_MAX: Duration = Duration::from_secs(1);
/// A walk of the flow table stops after this long (a million flows take
/// well under a second).
const WALK_BUDGET: Duration = Duration::from_secs(30);
/// The same warning at most once per this long.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// The sender's bursts, in records: at least a full IPv4 datagram, at most 30.
const PACER_MIN_BURST: f64 = wire::MAX_V4_RECORDS as f64;
const PACER_MAX_BURST: f64 = 30.0 * PACER_MIN_BURST;
/// The socket's receive buffer: a few thousand datagrams, so a peer's burst
/// (or a round from several peers at once) is not lost while the receiver
/// installs the previous ones.
const RECEIVE_BUFFER: libc::c_int = 8 << 20;
/// Deviating flows are checked against the installed ones this many at a
/// time, so the receiver never waits long for the lock.
const FILTER_CHUNK: usize = 4096;
/// A peer's request for the full set is answered at most this often: each
/// answer is a walk of the flow table and up to all its deviating flows.
const ANSWER_EVERY: Duration = Duration::from_secs(1);
/// `BPF_NOEXIST` (include/uapi/linux/bpf.h): an update that only creates.
const BPF_NOEXIST: u64 = 1;
/// `BPF_ANY`: create or replace.
const BPF_ANY: u64 = 0;

/// FLOWS, as the receiver writes it.
type FlowTable = aya::maps::HashMap<MapData, FlowKey, FlowValue>;

/// This process's session (see [`wire::Session`]): drawn once, and shared
/// by the channels reloads start, so peers see one session per run.
fn process_session() -> Result<Arc<Session>> {
    static SESSION: OnceLock<Arc<Session>> = OnceLock::new();
    if let Some(s) = SESSION.get() {
        return Ok(s.clone());
    }
    let drawn = Session::random().map_err(|_| anyhow!("flow_sync: the system's random source failed"))?;
    Ok(SESSION.get_or_init(|| Arc::new(drawn)).clone())
}

/// The flow sync channel of this node; dropping it stops it (see `stop`
/// and `restart` for when its socket closes).
pub struct FlowSync {
    shared: Arc<Shared>,
    view: watch::Sender<Arc<SyncView>>,
    tasks: Vec<JoinHandle<()>>,
    /// Another descriptor of the tasks' socket, handed to the next channel
    /// by `restart`.
    socket: std::net::UdpSocket,
    /// What was accepted from each peer, handed to the next channel by
    /// `restart`: a reload does not make old datagrams acceptable again.
    opener: Arc<Mutex<Opener>>,
}

impl FlowSync {
    /// Binds `settings.listen` (UDP), asks every peer for its deviating
    /// flows, and starts sending and receiving. Must run inside a tokio
    /// runtime. `flows`: a handle of its own to the FLOWS map
    /// (`Dataplane::flows_map`); `view`: this node's tables
    /// (`Reconciler::sync_view`); `status`: filled as it goes.
    pub fn start(
        settings: &FlowSyncSettings,
        flows: MapData,
        view: SyncView,
        status: Arc<Mutex<SyncStatus>>,
    ) -> Result<FlowSync> {
        Self::start_on(None, None, settings, flows, view, status)
    }

    /// Replaces this channel with one for `settings` (a reload), at once.
    /// On the same listen address the new channel takes over the socket:
    /// the old one's tasks end a moment after this returns, and only then
    /// would the address be free to bind again.
    pub fn restart(
        self,
        settings: &FlowSyncSettings,
        flows: MapData,
        view: SyncView,
        status: Arc<Mutex<SyncStatus>>,
    ) -> Result<FlowSync> {
        let socket = if settings.listen == self.shared.listen {
            Some(self.socket.try_clone().context("flow_sync: duplicating the socket's descriptor failed")?)
        } else {
            None
        };
        let opener = self.opener.clone();
        // Stopped before the opener changes: the old receiver, if it is
        // still running, checks `stop` under the opener's lock.
        drop(self);
        lock(&opener).reconfigure(&settings.key.bytes, settings.listen, &settings.peers);
        Self::start_on(socket, Some(opener), settings, flows, view, status)
    }

    fn start_on(
        socket: Option<std::net::UdpSocket>,
        opener: Option<Arc<Mutex<Opener>>>,
        settings: &FlowSyncSettings,
        flows: MapData,
        view: SyncView,
        status: Arc<Mutex<SyncStatus>>,
    ) -> Result<FlowSync> {
        tokio::runtime::Handle::try_current()
            .context("flow_sync: must be started inside the controller's tokio runtime")?;
        let capacity = flows.info().context("flow_sync: reading the FLOWS map's capacity failed")?.max_entries();
        let table = flow_table(&flows)?;
        let session = process_session()?;
        let socket = match socket {
            Some(s) => s,
            None => {
                let s = bind(settings.listen)?;
                s.set_nonblocking(true).context("flow_sync: making the socket non-blocking failed")?;
                enlarge_receive_buffer(&s);
                s
            }
        };
        let handoff = socket.try_clone().context("flow_sync: duplicating the socket's descriptor failed")?;
        let socket = UdpSocket::from_std(socket).context("flow_sync: registering the socket failed")?;
        {
            let mut st = lock(&status);
            st.listen = settings.listen.to_string();
            let before = std::mem::take(&mut st.peers);
            st.peers = settings
                .peers
                .iter()
                .map(|p| {
                    let address = p.to_string();
                    before
                        .iter()
                        .find(|o| o.address == address)
                        .cloned()
                        .unwrap_or(PeerStatus { address, ..PeerStatus::default() })
                })
                .collect();
        }
        let shared = Arc::new(Shared {
            listen: settings.listen,
            peers: settings.peers.clone(),
            max_rate: settings.max_rate.max(1),
            refresh: settings.refresh.max(Duration::from_secs(1)),
            capacity: capacity as usize,
            flows,
            installed: Mutex::new(Installed::new(capacity as usize)),
            status,
            warnings: Mutex::new(Warnings::default()),
            stop: AtomicBool::new(false),
            rounds: AtomicU64::new(0),
            answered: settings.peers.iter().map(|_| AtomicBool::new(false)).collect(),
        });
        let (view_tx, view_rx) = watch::channel(Arc::new(view));
        let (request_tx, request_rx) = mpsc::channel(settings.peers.len() * 2 + 2);
        let opener = opener.unwrap_or_else(|| {
            Arc::new(Mutex::new(Opener::new(&settings.key.bytes, settings.listen, &settings.peers)))
        });
        let sealer = Sealer::new(&settings.key.bytes, settings.listen, session);
        // Only the two tasks hold the socket: once they end, it is closed.
        let net = Arc::new(Net { shared: shared.clone(), socket });
        let receiver = Receiver { opener: opener.clone(), table, view: view_rx.clone(), requests: request_tx };
        let tasks = vec![
            tokio::spawn(receive_loop(net.clone(), receiver)),
            tokio::spawn(send_loop(net, sealer, view_rx, request_rx)),
        ];
        let peers: Vec<String> = settings.peers.iter().map(|p| p.to_string()).collect();
        tracing::info!(
            "flow sync: listening on {}, peers {}; deviating flows sent every {:?} and on table changes, at most {}/s",
            settings.listen,
            peers.join(", "),
            shared.refresh,
            shared.max_rate
        );
        Ok(FlowSync { shared, view: view_tx, tasks, socket: handoff, opener })
    }

    /// The tables changed (after an apply): flows may deviate now. Sends
    /// the deviating flows ~100 ms later (changes in between are one send),
    /// and resolves peers' records against `view` from now on.
    pub fn tables_changed(&self, view: SyncView) {
        self.view.send_replace(Arc::new(view));
    }

    /// Stops it and waits until its socket is closed. Dropping stops it
    /// too, but the socket closes a moment later (when the runtime drops
    /// the tasks): to listen on the same address again at once, `restart`.
    pub async fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }

    /// Rounds (a walk of the flow table and the sends after it) finished
    /// since start.
    pub fn rounds(&self) -> u64 {
        self.shared.rounds.load(Ordering::Acquire)
    }
}

impl Drop for FlowSync {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What the tasks (and the walks on blocking threads) share.
struct Shared {
    listen: SocketAddr,
    peers: Vec<SocketAddr>,
    max_rate: u32,
    refresh: Duration,
    /// FLOWS's capacity.
    capacity: usize,
    flows: MapData,
    installed: Mutex<Installed>,
    status: Arc<Mutex<SyncStatus>>,
    warnings: Mutex<Warnings>,
    /// Set on drop: a walk in progress stops.
    stop: AtomicBool,
    rounds: AtomicU64,
    /// Per peer: it sent flows (maybe none) since this node started, so
    /// it has heard this node's request for them.
    answered: Vec<AtomicBool>,
}

/// The tasks' socket, with what they share.
struct Net {
    shared: Arc<Shared>,
    socket: UdpSocket,
}

impl std::ops::Deref for Net {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn status(&self) -> MutexGuard<'_, SyncStatus> {
        lock(&self.status)
    }

    fn installed(&self) -> MutexGuard<'_, Installed> {
        lock(&self.installed)
    }

    fn warn(&self, topic: &str, message: impl FnOnce() -> String) {
        lock(&self.warnings).warn(topic, Instant::now(), message);
    }

    /// At most this many records go out in one round: what `max_rate` lets
    /// this node send each peer within one refresh.
    fn record_limit(&self) -> usize {
        let per_refresh = f64::from(self.max_rate) * self.refresh.as_secs_f64() / self.peers.len().max(1) as f64;
        (per_refresh as usize).clamp(1000, self.capacity.max(1000))
    }
}

fn unix_time() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn unix_ms() -> u64 {
    unix_time().as_millis() as u64
}

/// An io::Error's text without the "(os error N)" suffix.
fn os_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn bind(listen: SocketAddr) -> Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(listen).map_err(|e| {
        use std::io::ErrorKind;
        let hint = match e.kind() {
            ErrorKind::AddrNotAvailable => format!(" (is {} an address of this node?)", listen.ip()),
            ErrorKind::AddrInUse => format!(" (another program, or another xdplb, uses UDP port {})", listen.port()),
            ErrorKind::PermissionDenied => " (ports below 1024 need CAP_NET_BIND_SERVICE)".to_string(),
            _ => String::new(),
        };
        anyhow!("flow_sync: cannot listen on {listen}: {}{hint}", os_message(&e))
    })
}

/// Another handle to FLOWS, for writing single entries with flags.
fn flow_table(flows: &MapData) -> Result<FlowTable> {
    let map = Map::from_map_data(walks::dup_map_data(flows)?).context("flow_sync: opening the FLOWS map failed")?;
    FlowTable::try_from(map).context("flow_sync: the FLOWS map is not a map of flows")
}

/// Raises the socket's receive buffer to `RECEIVE_BUFFER`: beyond
/// net.core.rmem_max if allowed (CAP_NET_ADMIN), else as far as it goes.
fn enlarge_receive_buffer(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let fd = socket.as_raw_fd();
    let set = |option: libc::c_int| {
        let size = RECEIVE_BUFFER;
        // SAFETY: setsockopt(2) reads one c_int from `size`, which we own, of the length we pass.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        r == 0
    };
    if !set(libc::SO_RCVBUFFORCE) && !set(libc::SO_RCVBUF) {
        tracing::warn!("flow sync: could not enlarge the receive buffer: {}", std::io::Error::last_os_error());
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self { rate, burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes up to `n` tokens; returns how many it took.
    fn take_up_to(&mut self, n: usize, now: Instant) -> usize {
        self.refill(now);
        let k = (self.tokens.max(0.0).floor() as usize).min(n);
        self.tokens -= k as f64;
        k
    }

    /// Takes `n` tokens, borrowing if need be; returns how long to wait
    /// before the next use so that the rate holds.
    fn reserve(&mut self, n: usize, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.rate) }
    }
}

/// The same warning once per `WARN_EVERY`, with a count of those held back.
#[derive(Default)]
struct Warnings {
    last: HashMap<String, (Instant, u64)>,
}

impl Warnings {
    fn warn(&mut self, topic: &str, now: Instant, message: impl FnOnce() -> String) {
        if self.last.len() > 256 {
            self.last.clear();
        }
        match self.last.get_mut(topic) {
            Some((at, held)) if now.saturating_duration_since(*at) < WARN_EVERY => *held += 1,
            Some((at, held)) => {
                let n = std::mem::take(held);
                *at = now;
                let m = message();
                tracing::warn!("{m} ({n} more like it since the last report)");
            }
            None => {
                self.last.insert(topic.to_string(), (now, 0));
                let m = message();
                tracing::warn!("{m}");
            }
        }
    }
}

/// The flows this node installed from its peers, and what it installed,
/// so it does not send them back; at most `cap` of them (the oldest go).
struct Installed {
    entries: HashMap<FlowKey, Installation>,
    /// Insertion order, for the bound; stale pairs are skipped and compacted.
    order: VecDeque<(FlowKey, u64)>,
    next_stamp: u64,
    pass: u64,
    cap: usize,
}

struct Installation {
    value: FlowValue,
    stamp: u64,
    /// The last walk that found the flow unchanged.
    seen: u64,
}

impl Installed {
    fn new(cap: usize) -> Self {
        Self { entries: HashMap::new(), order: VecDeque::new(), next_stamp: 1, pass: 0, cap: cap.max(1) }
    }

    fn remember(&mut self, key: FlowKey, value: FlowValue) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.entries.insert(key, Installation { value, stamp, seen: 0 });
        self.order.push_back((key, stamp));
        while self.entries.len() > self.cap {
            let Some((k, s)) = self.order.pop_front() else { break };
            if self.entries.get(&k).is_some_and(|e| e.stamp == s) {
                self.entries.remove(&k);
            }
        }
        if self.order.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            self.order.retain(|(k, s)| entries.get(k).is_some_and(|e| e.stamp == *s));
        }
    }

    /// Whether this node installed `value` for `key` from a peer (and the
    /// walks have not found it changed since).
    fn holds(&self, key: &FlowKey, value: &FlowValue) -> bool {
        self.entries.get(key).is_some_and(|e| e.value == *value)
    }

    /// Whether the flow is as a peer gave it (then it is not sent back, and
    /// counts as seen by walk `pass`). One whose entry changed since is this
    /// node's own again, and forgotten.
    fn as_installed(&mut self, key: &FlowKey, value: &FlowValue, pass: u64) -> bool {
        match self.entries.get_mut(key) {
            Some(e) if e.value == *value => {
                e.seen = pass;
                true
            }
            Some(_) => {
                self.entries.remove(key);
                false
            }
            None => false,
        }
    }

    /// Starts a walk: its number, and the first stamp installed after it began.
    fn begin_walk(&mut self) -> (u64, u64) {
        self.pass += 1;
        (self.pass, self.next_stamp)
    }

    /// After a complete walk: forgets the flows it did not find deviating
    /// and unchanged (expired, chosen again, no longer deviating), except
    /// those installed while it ran.
    fn end_walk(&mut self, pass: u64, first_new_stamp: u64) {
        self.entries.retain(|_, e| e.seen == pass || e.stamp >= first_new_stamp);
    }
}

/// What one walk of the flow table found.
#[derive(Default)]
struct Walked {
    /// Deviating flows of this node's own, to send.
    records: Vec<FlowRecord>,
    /// Every deviating flow, also those installed from peers.
    deviating: u64,
    /// Deviating flows not sent: over the round's limit.
    left_out: u64,
    /// Whether the walk reached the end of the table.
    complete: bool,
}

impl Walked {
    fn select(
        &mut self,
        installed: &mut Installed,
        pass: u64,
        pending: &mut Vec<(FlowKey, FlowValue, FlowRecord)>,
        limit: usize,
    ) {
        for (key, value, record) in pending.drain(..) {
            if installed.as_installed(&key, &value, pass) {
                continue;
            }
            if self.records.len() < limit {
                self.records.push(record);
            } else {
                self.left_out += 1;
            }
        }
    }
}

/// Walks FLOWS (a blocking thread's job) for the deviating flows to send.
fn walk(sh: &Shared, view: &SyncView, limit: usize) -> Result<Walked> {
    let mut out = Walked::default();
    let (pass, first_new_stamp) = sh.installed().begin_walk();
    let mut pending = Vec::with_capacity(FILTER_CHUNK);
    let deadline = Instant::now() + WALK_BUDGET;
    let complete = walks::for_each_batched::<FlowKey, FlowValue>(&sh.flows, deadline, |key, value| {
        if sh.stop.load(Ordering::Relaxed) {
            return false;
        }
        if let Some(b) = view.deviation(key, value) {
            out.deviating += 1;
            pending.push((*key, *value, SyncView::record(key, b)));
            if pending.len() >= FILTER_CHUNK {
                out.select(&mut sh.installed(), pass, &mut pending, limit);
            }
        }
        true
    })
    .context("walking the FLOWS map failed")?;
    let mut installed = sh.installed();
    out.select(&mut installed, pass, &mut pending, limit);
    if complete {
        installed.end_walk(pass, first_new_stamp);
    }
    out.complete = complete;
    Ok(out)
}

async fn send_to(sh: &Net, peer: usize, datagram: &[u8], records: usize) {
    let to = sh.peers[peer];
    match sh.socket.send_to(datagram, to).await {
        Ok(_) => {
            let mut st = sh.status();
            st.datagrams_sent += 1;
            st.bytes_sent += datagram.len() as u64;
            st.records_sent += records as u64;
            if let Some(p) = st.peers.get_mut(peer) {
                p.send_error.clear();
            }
        }
        Err(e) => {
            let why = os_message(&e);
            if let Some(p) = sh.status().peers.get_mut(peer) {
                p.send_error = why.clone();
            }
            sh.warn(&format!("send {to}"), || {
                format!("flow sync: sending to {to} failed: {why} (is the peer's address right, and is it reachable from {}?)", sh.listen)
            });
        }
    }
}

/// One round: walk, then send the deviating flows to `targets`, paced.
/// `answer`: the targets asked for them; with nothing to send they get an
/// empty datagram, so they know they were heard.
async fn round(sh: &Net, sealer: &Sealer, pacer: &mut Bucket, view: Arc<SyncView>, targets: &[usize], answer: bool) {
    let limit = sh.record_limit();
    let walker = sh.shared.clone();
    let walked = match tokio::task::spawn_blocking(move || walk(&walker, &view, limit)).await {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => {
            sh.warn("walk", || format!("flow sync: {e:#}; deviating flows not sent this round"));
            return;
        }
        Err(e) => {
            sh.warn("walk", || format!("flow sync: the walk of the flow table ended abnormally: {e}"));
            return;
        }
    };
    sh.status().deviating_flows = walked.deviating;
    if walked.left_out > 0 {
        sh.warn("limit", || {
            format!(
                "flow sync: {} flows deviate, but at most {limit} are sent per round ({}/s over {:?} and {} peers): \
                 {} left out (raise flow_sync.max_rate or refresh)",
                walked.deviating,
                sh.max_rate,
                sh.refresh,
                sh.peers.len(),
                walked.left_out
            )
        });
    }
    if !walked.complete && !sh.stop.load(Ordering::Relaxed) {
        sh.warn("budget", || {
            format!("flow sync: the walk of the flow table stopped after {WALK_BUDGET:?}; flows past that point were not sent")
        });
    }
    if walked.records.is_empty() && answer {
        for &p in targets {
            let (empty, _) = sealer.flows(&[], sh.peers[p], unix_ms());
            send_to(sh, p, &empty, 0).await;
        }
    }
    let mut rest = &walked.records[..];
    while !rest.is_empty() {
        let n = Sealer::fit(rest);
        if n == 0 {
            break;
        }
        // Each copy is sealed for its peer: the destination is in the tag.
        let now = unix_ms();
        for &p in targets {
            let (datagram, _) = sealer.flows(&rest[..n], sh.peers[p], now);
            send_to(sh, p, &datagram, n).await;
        }
        rest = &rest[n..];
        let wait = pacer.reserve(n * targets.len(), Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
    let to: Vec<String> = targets.iter().map(|&p| sh.peers[p].to_string()).collect();
    tracing::debug!(
        "flow sync: {} deviating flows, {} sent to {}",
        walked.deviating,
        walked.records.len(),
        to.join(", ")
    );
}

/// Waits until the tables stop changing (`DEBOUNCE` without a change, at
/// most `DEBOUNCE_MAX`).
async fn settle(view: &mut watch::Receiver<Arc<SyncView>>) {
    let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(DEBOUNCE) => return,
            _ = tokio::time::sleep_until(deadline) => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}

async fn send_loop(
    sh: Arc<Net>,
    sealer: Sealer,
    mut view: watch::Receiver<Arc<SyncView>>,
    mut requests: mpsc::Receiver<usize>,
) {
    // Bursts of at most 10 ms (and 30 full datagrams): a peer's receive
    // buffer takes them without loss, and sleeps stay above the timer's 1 ms.
    let rate = f64::from(sh.max_rate);
    let mut pacer = Bucket::new(rate, (rate / 100.0).clamp(PACER_MIN_BURST, PACER_MAX_BURST), Instant::now());
    let all: Vec<usize> = (0..sh.peers.len()).collect();
    // This node may have restarted: every peer sends it what deviates. A
    // peer that does not answer (down, or starting too) is asked again,
    // after 1 s, 2 s, 4 s... up to the refresh period.
    ask(&sh, &sealer, &all).await;
    let mut backoff = Duration::from_secs(1);
    let mut ask_again = tokio::time::Instant::now() + backoff;
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + sh.refresh, sh.refresh);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let unanswered: Vec<usize> = all.iter().copied().filter(|&p| !sh.answered[p].load(Ordering::Acquire)).collect();
        let (targets, answer) = tokio::select! {
            changed = view.changed() => {
                if changed.is_err() {
                    return;
                }
                settle(&mut view).await;
                (all.clone(), false)
            }
            _ = refresh.tick() => (all.clone(), false),
            Some(peer) = requests.recv() => {
                let mut t = vec![peer];
                while let Ok(p) = requests.try_recv() {
                    if !t.contains(&p) {
                        t.push(p);
                    }
                }
                (t, true)
            }
            _ = tokio::time::sleep_until(ask_again), if !unanswered.is_empty() => {
                // Those that answered while this waited are not asked again.
                let still: Vec<usize> = unanswered.into_iter().filter(|&p| !sh.answered[p].load(Ordering::Acquire)).collect();
                ask(&sh, &sealer, &still).await;
                backoff = (backoff * 2).min(sh.refresh);
                ask_again = tokio::time::Instant::now() + backoff;
                continue;
            }
        };
        let current = view.borrow_and_update().clone();
        round(&sh, &sealer, &mut pacer, current, &targets, answer).await;
        sh.rounds.fetch_add(1, Ordering::AcqRel);
    }
}

/// Asks `peers` for every flow of theirs that deviates.
async fn ask(sh: &Net, sealer: &Sealer, peers: &[usize]) {
    for &p in peers {
        let request = sealer.request_full_set(sh.peers[p], unix_ms());
        send_to(sh, p, &request, 0).await;
    }
}

/// What to do with a peer's record for a flow this node has `current` for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// Write it: no entry (any more), or one the dataplane would not keep
    /// (stale here), or one installed from a peer and unchanged since.
    Write,
    /// The entry says the same already.
    Same,
    /// This node's own entry, on a backend up here: a connection of its own
    /// (or one the peer holds on to longer than it lasted). Keep it.
    KeepLocal,
}

fn placement(
    view: &SyncView,
    installed: &Installed,
    flow: &FlowKey,
    current: Option<&FlowValue>,
    incoming: &FlowValue,
) -> Placement {
    match current {
        None => Placement::Write,
        Some(c) if c == incoming => Placement::Same,
        Some(c) if installed.holds(flow, c) || !view.keeps(flow, c) => Placement::Write,
        Some(_) => Placement::KeepLocal,
    }
}

fn already_exists(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EEXIST))
}

/// Puts a peer's flow into FLOWS, unless this node keeps its own entry
/// (`placement`). The common case, no entry, is one update that only
/// creates; otherwise the entry is read and maybe replaced. (The dataplane
/// may change the entry between the two: only a stale entry, chosen again
/// for a packet in that moment, is lost that way.)
fn place(
    table: &mut FlowTable,
    installed: &mut Installed,
    view: &SyncView,
    flow: &FlowKey,
    value: FlowValue,
) -> Result<Result<(), Reject>> {
    match table.insert(flow, value, BPF_NOEXIST) {
        Ok(()) => {
            installed.remember(*flow, value);
            return Ok(Ok(()));
        }
        Err(e) if already_exists(&e) => {}
        Err(e) => return Err(e).context("creating an entry in FLOWS failed"),
    }
    let current = match table.get(flow, 0) {
        Ok(v) => Some(v),
        Err(MapError::KeyNotFound) => None,
        Err(e) => return Err(e).context("reading an entry of FLOWS failed"),
    };
    match placement(view, installed, flow, current.as_ref(), &value) {
        Placement::KeepLocal => return Ok(Err(Reject::LocalEntryKept)),
        Placement::Same => {}
        Placement::Write => table.insert(flow, value, BPF_ANY).context("writing an entry of FLOWS failed")?,
    }
    installed.remember(*flow, value);
    Ok(Ok(()))
}

/// Installs a peer's records that resolve on this node, within the rate.
fn install(
    sh: &Shared,
    table: &mut FlowTable,
    view: &SyncView,
    peer: usize,
    records: &[FlowRecord],
    bucket: &mut Bucket,
) {
    let allowed = bucket.take_up_to(records.len(), Instant::now());
    let mut rejected: BTreeMap<Reject, (u64, &FlowRecord)> = BTreeMap::new();
    let mut written = 0u64;
    let mut failed = None;
    {
        let mut installed = sh.installed();
        for (i, r) in records.iter().enumerate() {
            let resolved = if i < allowed { view.resolve(r) } else { Err(Reject::RateLimit) };
            let placed = match resolved {
                Ok(value) => place(table, &mut installed, view, &r.flow, value),
                Err(why) => Ok(Err(why)),
            };
            match placed {
                Ok(Ok(())) => written += 1,
                Ok(Err(why)) => rejected.entry(why).or_insert((0, r)).0 += 1,
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
    }
    if let Some(e) = failed {
        sh.warn("install", || format!("flow sync: installing flows from {} failed: {e:#}", sh.peers[peer]));
    }
    {
        let mut st = sh.status();
        st.records_received += records.len() as u64;
        st.flows_installed += written;
        if let Some(p) = st.peers.get_mut(peer) {
            p.records_received += records.len() as u64;
        }
        for (why, (n, _)) in &rejected {
            *st.records_rejected.entry(why.name().to_string()).or_default() += n;
        }
    }
    for (why, (n, example)) in rejected {
        let from = sh.peers[peer];
        sh.warn(&format!("reject {from} {}", why.name()), || {
            let f = &example.flow;
            let vip = addr::from_words(&f.dst, f.family);
            let backend = addr::from_words(&example.backend_addr, f.family);
            format!(
                "flow sync: {n} flows from {from} not installed: {} (e.g. VIP {} port {}, backend {backend} port {})",
                why.explain(),
                vip,
                u16::from_be(vip_key_of(f).port),
                u16::from_be(example.backend_port)
            )
        });
    }
}

/// Answers each peer's request for the full set at most once per
/// `ANSWER_EVERY`.
struct RequestGate {
    last: Vec<Option<Instant>>,
}

impl RequestGate {
    fn new(peers: usize) -> Self {
        Self { last: vec![None; peers] }
    }

    /// Whether to answer `peer`'s request that arrived at `now`.
    fn admit(&mut self, peer: usize, now: Instant) -> bool {
        let Some(last) = self.last.get_mut(peer) else { return false };
        if last.is_some_and(|t| now.saturating_duration_since(t) < ANSWER_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// What the receive task holds.
struct Receiver {
    opener: Arc<Mutex<Opener>>,
    table: FlowTable,
    view: watch::Receiver<Arc<SyncView>>,
    requests: mpsc::Sender<usize>,
}

async fn receive_loop(sh: Arc<Net>, mut rx: Receiver) {
    let mut buf = vec![0u8; 2048];
    let rate = f64::from(sh.max_rate) * sh.peers.len().max(1) as f64;
    let mut bucket = Bucket::new(rate, rate, Instant::now());
    let mut heard = vec![false; sh.peers.len()];
    let mut gate = RequestGate::new(sh.peers.len());
    loop {
        let (len, from) = match sh.socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                sh.warn("receive", || format!("flow sync: receiving on {} failed: {}", sh.listen, os_message(&e)));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let opened = {
            let mut opener = lock(&rx.opener);
            // A newer channel may have taken the opener over (`restart`): its
            // peers are not this channel's.
            if sh.stop.load(Ordering::Acquire) {
                return;
            }
            opener.open(from, &buf[..len], unix_ms()).map_err(|refusal| (refusal, opener.peer_of(from)))
        };
        let accepted = match opened {
            Ok(a) => a,
            Err((refusal, known)) => {
                *sh.status().datagrams_refused.entry(refusal.name().to_string()).or_default() += 1;
                let (who, topic) = match known {
                    Some(p) => (from.ip().to_string(), format!("refused {} {}", refusal.name(), sh.peers[p])),
                    None => (from.to_string(), format!("refused {}", refusal.name())),
                };
                sh.warn(&topic, || format!("flow sync: datagram from {who} refused: {}", refusal.explain()));
                continue;
            }
        };
        let peer = sh.peers[accepted.peer];
        if let Some(p) = sh.status().peers.get_mut(accepted.peer) {
            p.last_heard_unix_ms = unix_ms();
        }
        if !std::mem::replace(&mut heard[accepted.peer], true) {
            tracing::info!("flow sync: heard from peer {peer}");
        }
        match accepted.message {
            Message::RequestFullSet if gate.admit(accepted.peer, Instant::now()) => {
                tracing::info!("flow sync: {peer} asks for every deviating flow (it started); sending them");
                // Full: a round for it is already queued.
                let _ = rx.requests.try_send(accepted.peer);
            }
            Message::RequestFullSet => {
                tracing::debug!("flow sync: {peer} asks again within {ANSWER_EVERY:?}; answered already");
            }
            Message::Flows(records) => {
                sh.answered[accepted.peer].store(true, Ordering::Release);
                let current = rx.view.borrow().clone();
                install(&sh, &mut rx.table, &current, accepted.peer, &records, &mut bucket);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::PROTO_TCP;

    fn key(i: u32) -> FlowKey {
        FlowKey {
            src: [i, 0, 0, 0],
            dst: [1, 0, 0, 0],
            sport: 1,
            dport: 80,
            protocol: PROTO_TCP,
            family: 4,
            _pad: [0; 2],
        }
    }

    fn value(id: u32) -> FlowValue {
        FlowValue { backend_id: id, generation: 1, hash: 7, last_seen_s: 0 }
    }

    fn record(i: u32) -> FlowRecord {
        FlowRecord { flow: key(i), backend_addr: [9, 0, 0, 0], backend_port: 0 }
    }

    #[test]
    fn installed_flows_are_not_sent_back_unless_they_changed() {
        let mut inst = Installed::new(100);
        inst.remember(key(1), value(3));
        inst.remember(key(2), value(3));
        let (pass, first_new) = inst.begin_walk();
        let mut walked = Walked::default();
        // Flow 1 as installed, flow 2 re-chosen by the dataplane since, flow 3 our own.
        let mut pending =
            vec![(key(1), value(3), record(1)), (key(2), value(4), record(2)), (key(3), value(3), record(3))];
        walked.select(&mut inst, pass, &mut pending, 10);
        assert_eq!(walked.records, vec![record(2), record(3)]);
        // Installed while the walk ran: kept although the walk did not see it.
        inst.remember(key(5), value(3));
        inst.remember(key(6), value(3));
        inst.end_walk(pass, first_new);
        assert!(inst.entries.contains_key(&key(1)));
        assert!(!inst.entries.contains_key(&key(2)), "changed: this node's own now");
        assert!(inst.entries.contains_key(&key(5)) && inst.entries.contains_key(&key(6)));
        // The next walk does not find 5: gone from the table, forgotten.
        let (pass, first_new) = inst.begin_walk();
        let mut pending = vec![(key(1), value(3), record(1)), (key(6), value(3), record(6))];
        Walked::default().select(&mut inst, pass, &mut pending, 10);
        inst.end_walk(pass, first_new);
        assert_eq!(inst.entries.len(), 2);
        assert!(!inst.entries.contains_key(&key(5)));
    }

    #[test]
    fn the_installed_memory_is_bounded_oldest_first() {
        let mut inst = Installed::new(3);
        for i in 0..10 {
            inst.remember(key(i), value(1));
        }
        // Re-installing refreshes a flow's age.
        inst.remember(key(7), value(2));
        inst.remember(key(10), value(1));
        assert_eq!(inst.entries.len(), 3);
        let mut kept: Vec<u32> = inst.entries.keys().map(|k| k.src[0]).collect();
        kept.sort();
        assert_eq!(kept, [7, 9, 10]);
        for i in 0..100_000 {
            inst.remember(key(i % 5), value(i));
        }
        assert!(inst.order.len() <= 2 * inst.entries.len() + 1024 + 1, "stale order entries compacted");
    }

    /// The VIP of `key(_)`, with backends 3 and 4 (active) and 5 (down).
    fn sync_view() -> SyncView {
        use lb_common::maps::{BACKEND_ACTIVE, BACKEND_DOWN, FWD_DSR, VipKey};
        let backend = |id: u32, state| view::BackendView { id, addr: [id, 0, 0, 0], port: 0, generation: 1, state };
        let backends = [backend(3, BACKEND_ACTIVE), backend(4, BACKEND_ACTIVE), backend(5, BACKEND_DOWN)];
        let mut v = SyncView::default();
        let vip = VipKey { addr: [1, 0, 0, 0], port: 80, protocol: PROTO_TCP, family: 4 };
        v.insert(vip, view::VipView::new(FWD_DSR, 0, (0, 7, 1), vec![3; 7].into(), backends));
        v
    }

    #[test]
    fn a_peers_record_never_replaces_a_live_entry_of_this_nodes_own() {
        let v = sync_view();
        let mut inst = Installed::new(100);
        let place =
            |inst: &Installed, current: Option<FlowValue>| placement(&v, inst, &key(1), current.as_ref(), &value(3));
        assert_eq!(place(&inst, None), Placement::Write, "no entry");
        assert_eq!(place(&inst, Some(value(3))), Placement::Same);
        // This node's own connection, on a backend up here.
        assert_eq!(place(&inst, Some(value(4))), Placement::KeepLocal);
        // Stale here: the dataplane would choose again anyway.
        assert_eq!(place(&inst, Some(FlowValue { generation: 2, ..value(4) })), Placement::Write, "another generation");
        assert_eq!(place(&inst, Some(value(5))), Placement::Write, "a backend down here");
        assert_eq!(place(&inst, Some(value(42))), Placement::Write, "a backend the VIP does not have");
        // Installed from a peer earlier: the peer's newer record replaces it...
        inst.remember(key(1), value(4));
        assert_eq!(place(&inst, Some(value(4))), Placement::Write);
        // ...but not once this node's dataplane chose again for it.
        assert_eq!(place(&inst, Some(FlowValue { hash: 9, ..value(4) })), Placement::KeepLocal);
    }

    #[test]
    fn a_request_for_the_full_set_is_answered_once_a_second_per_peer() {
        let t0 = Instant::now();
        let mut gate = RequestGate::new(2);
        assert!(gate.admit(0, t0));
        assert!(!gate.admit(0, t0 + Duration::from_millis(999)));
        assert!(gate.admit(1, t0 + Duration::from_millis(500)), "another peer");
        assert!(gate.admit(0, t0 + ANSWER_EVERY));
        assert!(!gate.admit(0, t0 + ANSWER_EVERY));
        assert!(!gate.admit(2, t0), "not a peer");
    }

    #[test]
    fn a_round_sends_at_most_its_limit() {
        let mut inst = Installed::new(10);
        let (pass, _) = inst.begin_walk();
        let mut walked = Walked::default();
        let mut pending: Vec<_> = (0..10).map(|i| (key(i), value(1), record(i))).collect();
        walked.select(&mut inst, pass, &mut pending, 4);
        assert_eq!(walked.records.len(), 4);
        assert_eq!(walked.left_out, 6);
    }

    #[test]
    fn the_pacer_holds_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000.0, 100.0, t0);
        assert_eq!(b.reserve(100, t0), Duration::ZERO, "the burst");
        // 67 more at once: wait until they are earned.
        assert_eq!(b.reserve(67, t0), Duration::from_secs_f64(0.067));
        // A second later the bucket is full again, no more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.take_up_to(1000, t1), 100);
        assert_eq!(b.take_up_to(10, t1), 0);
        assert_eq!(b.take_up_to(10, t1 + Duration::from_millis(5)), 5);
    }

    #[test]
    fn warnings_are_held_back_and_counted() {
        let mut w = Warnings::default();
        let t0 = Instant::now();
        let mut said = 0;
        for i in 0..10 {
            w.warn("bad key 198.18.1.12", t0 + Duration::from_secs(i), || {
                said += 1;
                String::new()
            });
        }
        assert_eq!(said, 1);
        assert_eq!(w.last["bad key 198.18.1.12"].1, 9);
        w.warn("bad key 198.18.1.12", t0 + WARN_EVERY, || {
            said += 1;
            String::new()
        });
        assert_eq!(said, 2);
        assert_eq!(w.last["bad key 198.18.1.12"].1, 0);
    }

    #[test]
    fn bind_errors_say_what_to_check() {
        let e = bind("198.18.255.254:7946".parse().unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "flow_sync: cannot listen on 198.18.255.254:7946: Cannot assign requested address \
             (is 198.18.255.254 an address of this node?)"
        );
    }
}
