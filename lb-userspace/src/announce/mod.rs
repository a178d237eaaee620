//! Telling the network whether this node serves: each VIP address is
//! announced over BGP (through BIRD) while it has a healthy backend, and
//! keepalived's track file says whether the node can serve at all.
//!
//! `decide` is the policy, a pure function of the VIPs the dataplane should
//! hold and the node's state. The `Announcer` applies it: it writes BIRD's
//! routes file and asks BIRD to reconfigure, retrying every second until
//! BIRD takes it.
//!
//! The rule, per VIP address (several VIPs may share one, e.g. :80 and
//! :443): announced when the node is not stopping, not drained, not warming
//! up, and at least one VIP on the address has a backend that is healthy
//! and weighted above 0 in `desired::vip_specs`. There a backend counts as
//! healthy only when its checks pass, its next-hop MAC is resolved (an
//! unresolved backend stays in the list, marked unhealthy) and it is not in
//! `maint`; a drained one (`drain`, weight 0) does not count. A reachable
//! sorry server (`on_all_down: sorry_server`) is a backend too, so a VIP
//! whose real backends are all down stays announced to serve the sorry
//! page; `on_all_down: pass` (to the local stack) does not count.

mod bird;
mod track;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Result, bail};
use tokio::sync::watch;
use tracing::{info, warn};

pub use self::{
    bird::{PROTOCOL_V4, PROTOCOL_V6},
    track::{track_path, write_track_file},
};
use crate::{
    config::BgpSettings,
    reconcile::VipSpec,
    status::{BgpStatus, RouteStatus},
};

pub const WHY_HEALTHY: &str = "healthy backends";
pub const WHY_NO_BACKEND: &str = "no healthy backend";
pub const WHY_DRAINED: &str = "node drained";
pub const WHY_WARMING: &str = "warming up";
pub const WHY_STOPPING: &str = "stopping";
/// A route BIRD still holds whose address left the configuration, until
/// BIRD takes the file without it.
pub const WHY_GONE: &str = "no longer configured";

/// While the last attempt failed, the next comes this much later.
const RETRY: Duration = Duration::from_secs(1);
/// While all is well, the routes file is checked this often (someone may
/// have removed it, or `/run/xdplb` with it).
const RECHECK: Duration = Duration::from_secs(10);

/// What the node as a whole is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// `xdplb drain` of the node.
    pub drained: bool,
    /// Started less than `bgp.warmup` ago (or not attached yet).
    pub warming: bool,
    /// SIGTERM came.
    pub stopping: bool,
}

/// Whether one VIP address is announced, and why (one of the `WHY_`s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decision {
    pub announce: bool,
    pub why: &'static str,
}

/// One decision per distinct VIP address (see the module's rule). The
/// node's state comes first: stopping, then drained, then warming up.
pub fn decide(specs: &[VipSpec], node: NodeState) -> BTreeMap<IpAddr, Decision> {
    let mut serving: BTreeMap<IpAddr, bool> = BTreeMap::new();
    for v in specs {
        *serving.entry(v.addr).or_default() |= v.backends.iter().any(|b| b.healthy && b.weight > 0);
    }
    let decision = |serves: bool| match (node, serves) {
        (NodeState { stopping: true, .. }, _) => Decision { announce: false, why: WHY_STOPPING },
        (NodeState { drained: true, .. }, _) => Decision { announce: false, why: WHY_DRAINED },
        (NodeState { warming: true, .. }, _) => Decision { announce: false, why: WHY_WARMING },
        (_, true) => Decision { announce: true, why: WHY_HEALTHY },
        (_, false) => Decision { announce: false, why: WHY_NO_BACKEND },
    };
    serving.into_iter().map(|(addr, serves)| (addr, decision(serves))).collect()
}

/// What keepalived's track file says: the node can serve unless it is
/// drained or stopping, or it has VIPs and none of their addresses would be
/// announced (no healthy backend anywhere, or still warming up).
pub fn can_serve(decisions: &BTreeMap<IpAddr, Decision>, drained: bool, stopping: bool) -> bool {
    !drained && !stopping && (decisions.is_empty() || decisions.values().any(|d| d.announce))
}

/// `STATE_DIR/IFACE.bird.conf`, where the routes go unless `bgp.routes_file` says.
pub fn default_routes_file(state_dir: &Path, iface: &str) -> PathBuf {
    state_dir.join(format!("{iface}.bird.conf"))
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Waits for BIRD to take a wish (see `Announcer::taken_later`).
pub struct Taken {
    taken: watch::Receiver<u64>,
    generation: u64,
    status: Arc<Mutex<BgpStatus>>,
}

impl Taken {
    /// The status once BIRD took the wish; else, after `timeout`, why not
    /// yet (the announcer goes on retrying).
    pub async fn wait(mut self, timeout: Duration) -> Result<BgpStatus, String> {
        let generation = self.generation;
        match tokio::time::timeout(timeout, self.taken.wait_for(|g| *g >= generation)).await {
            Ok(Ok(_)) => Ok(self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            Ok(Err(_)) => Err("the BGP announcer stopped".into()),
            Err(_) => {
                let error = self.status.lock().unwrap_or_else(|e| e.into_inner()).bird_error.clone();
                Err(if error.is_empty() { format!("BIRD has not answered within {timeout:?}") } else { error })
            }
        }
    }
}

/// What the daemon wants announced; generation 0: nothing said yet.
#[derive(Clone, Debug, Default)]
struct Wish {
    generation: u64,
    routes: BTreeMap<IpAddr, Decision>,
}

/// Announces VIP addresses through BIRD: a task that follows `want`. Dropped,
/// the task ends and the routes file stays as it was last written.
pub struct Announcer {
    wishes: watch::Sender<Wish>,
    /// The generation of the last wish BIRD took.
    taken: watch::Receiver<u64>,
    /// The generation of the last wish written to the routes file.
    written: Arc<AtomicU64>,
    status: Arc<Mutex<BgpStatus>>,
    /// After `withdraw_all`, nothing is announced again.
    stopping: AtomicBool,
    task: tokio::task::JoinHandle<()>,
}

impl Announcer {
    /// Starts the task (inside a tokio runtime). It does nothing until the
    /// first `want`: BIRD keeps what it holds meanwhile.
    pub fn start(settings: &BgpSettings, routes_file: PathBuf) -> Announcer {
        let status = Arc::new(Mutex::new(BgpStatus {
            routes_file: routes_file.display().to_string(),
            bird_socket: settings.bird_socket.display().to_string(),
            ..Default::default()
        }));
        let (wishes, wish_rx) = watch::channel(Wish::default());
        let (taken_tx, taken) = watch::channel(0);
        let written = Arc::new(AtomicU64::new(0));
        let task = Task {
            written: written.clone(),
            socket: settings.bird_socket.clone(),
            file: routes_file,
            status: status.clone(),
            taken: taken_tx,
            bird_holds: None,
            routes: BTreeMap::new(),
            took_once: false,
            logged_error: None,
        };
        let task = tokio::spawn(task.run(wish_rx));
        Announcer { wishes, taken, written, status, stopping: AtomicBool::new(false), task }
    }

    /// Announces what `decisions` say (returns at once; the task follows).
    /// Ignored after `withdraw_all`.
    pub fn want(&self, decisions: BTreeMap<IpAddr, Decision>) {
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        self.wishes.send_modify(|w| {
            w.generation += 1;
            w.routes = decisions;
        });
    }

    /// A wait for BIRD to take what was wanted last (for a command that
    /// answers once it is in effect, as `xdplb drain`).
    pub fn taken_later(&self) -> Taken {
        Taken { taken: self.taken.clone(), generation: self.wishes.borrow().generation, status: self.status.clone() }
    }

    pub fn status(&self) -> BgpStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Withdraws every route (why: stopping) and returns once BIRD took it,
    /// or with what went wrong once `timeout` passed. Later `want`s are ignored.
    pub async fn withdraw_all(&self, timeout: Duration) -> Result<()> {
        self.stopping.store(true, Ordering::Relaxed);
        let mut generation = 0;
        self.wishes.send_modify(|w| {
            w.generation += 1;
            generation = w.generation;
            for d in w.routes.values_mut() {
                *d = Decision { announce: false, why: WHY_STOPPING };
            }
        });
        let mut taken = self.taken.clone();
        match tokio::time::timeout(timeout, taken.wait_for(|g| *g >= generation)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => bail!("the BGP announcer ended before BIRD took the withdrawal"),
            Err(_) => {
                let s = self.status();
                let what = if s.bird_error.is_empty() { "no answer yet".to_string() } else { s.bird_error };
                if self.written.load(Ordering::Relaxed) >= generation {
                    bail!(
                        "BIRD has not taken the withdrawal after {timeout:?}: {what}; {} announces nothing now, \
                         so BIRD withdraws the routes when it next reads its configuration",
                        s.routes_file
                    )
                }
                bail!("BIRD has not taken the withdrawal after {timeout:?}: {what}")
            }
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One address's route as the task knows it.
struct Route {
    /// In the file BIRD last took.
    announced: bool,
    why: &'static str,
    since_unix_ms: u64,
}

struct Task {
    socket: PathBuf,
    file: PathBuf,
    status: Arc<Mutex<BgpStatus>>,
    taken: watch::Sender<u64>,
    written: Arc<AtomicU64>,
    /// The routes file BIRD last took; None: not known (at start, after a failure).
    bird_holds: Option<String>,
    routes: BTreeMap<IpAddr, Route>,
    /// BIRD took a file from this task once.
    took_once: bool,
    /// The error last logged, so a failure that repeats every second is logged once.
    logged_error: Option<String>,
}

impl Task {
    async fn run(mut self, mut wishes: watch::Receiver<Wish>) {
        if wishes.wait_for(|w| w.generation > 0).await.is_err() {
            return;
        }
        loop {
            let wish = wishes.borrow_and_update().clone();
            let text = bird::routes_file_text(&wish.routes);
            self.note_whys(&wish);
            if self.bird_holds.as_deref() == Some(text.as_str()) {
                // Nothing for BIRD to do (a why changed, say).
                self.took(&wish, text, false);
            } else {
                match self.apply(&text, wish.generation).await {
                    Ok(()) => self.took(&wish, text, true),
                    Err(e) => self.failed(e),
                }
            }
            self.publish();
            let wait = if self.bird_holds.is_some() { RECHECK } else { RETRY };
            tokio::select! {
                changed = wishes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(wait) => self.recheck(),
            }
        }
    }

    /// Writes the routes file and has BIRD read it.
    async fn apply(&mut self, text: &str, generation: u64) -> std::result::Result<(), String> {
        self.bird_holds = None;
        self.write(text)?;
        self.written.store(generation, Ordering::Relaxed);
        match bird::configure(&self.socket).await {
            Ok(()) => Ok(()),
            Err(bird::ConfigureError::Unreachable(e)) => Err(e),
            Err(bird::ConfigureError::Refused(e)) => Err(bird::refusal_text(&e, &self.file)),
        }
    }

    fn write(&self, text: &str) -> std::result::Result<(), String> {
        use std::os::unix::fs::DirBuilderExt as _;
        let (Some(dir), Some(name)) = (self.file.parent(), self.file.file_name()) else {
            return Err(format!("{} is not a file's path", self.file.display()));
        };
        // The state directory may have been removed behind our back; BIRD
        // (another user) must be able to look into it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| format!("cannot create {} for the routes file: {e}", dir.display()))?;
        // A name BIRD's `*.bird.conf` include never matches (it starts with a dot).
        let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
        crate::status::replace_file(&self.file, &tmp, text.as_bytes()).map_err(|e| format!("{e:#}"))
    }

    /// Routes the daemon wants get their why now, whatever BIRD holds.
    fn note_whys(&mut self, wish: &Wish) {
        let now = unix_ms();
        for (addr, d) in &wish.routes {
            let r = self.routes.entry(*addr).or_insert(Route { announced: false, why: d.why, since_unix_ms: now });
            r.why = d.why;
        }
        for (addr, r) in self.routes.iter_mut() {
            if !wish.routes.contains_key(addr) {
                r.why = WHY_GONE;
            }
        }
    }

    /// BIRD holds `text`, made from `wish`; `configured`: it read it just now.
    fn took(&mut self, wish: &Wish, text: String, configured: bool) {
        let now = unix_ms();
        if configured {
            if self.logged_error.take().is_some() {
                info!("bgp: BIRD took the routes again");
            }
            let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            s.bird_error.clear();
            s.configured_unix_ms = now;
        }
        // The first file BIRD takes from this process makes every route
        // news: BIRD may have held anything before.
        let news = !self.took_once;
        for (addr, d) in &wish.routes {
            let r = self.routes.entry(*addr).or_insert(Route { announced: false, why: d.why, since_unix_ms: now });
            if news || r.announced != d.announce {
                let prefix = bird::prefix(*addr);
                let done = if d.announce { "announced" } else { "withdrawn" };
                info!("bgp: {prefix} {done} ({})", d.why);
            }
            if r.announced != d.announce {
                r.since_unix_ms = now;
                r.announced = d.announce;
            }
        }
        self.routes.retain(|addr, r| {
            let keep = wish.routes.contains_key(addr);
            if !keep && r.announced {
                info!("bgp: {} withdrawn ({WHY_GONE})", bird::prefix(*addr));
            }
            keep
        });
        self.took_once = true;
        self.bird_holds = Some(text);
        self.taken.send_replace(wish.generation);
    }

    fn failed(&mut self, error: String) {
        if self.logged_error.as_ref() != Some(&error) {
            warn!("bgp: {error}");
            self.logged_error = Some(error.clone());
        }
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.configure_failures += 1;
        s.bird_error = error;
    }

    /// The routes as `status` shows them.
    fn publish(&self) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.routes = self
            .routes
            .iter()
            .map(|(addr, r)| RouteStatus {
                prefix: bird::prefix(*addr),
                announced: r.announced,
                why: r.why.to_string(),
                since_unix_ms: r.since_unix_ms,
            })
            .collect();
    }

    /// While all is well: is the routes file still what BIRD took? If not
    /// (removed, edited), it is written again at the next turn.
    fn recheck(&mut self) {
        let Some(held) = &self.bird_holds else { return };
        let on_disk = std::fs::read(&self.file);
        if on_disk.as_deref().ok() != Some(held.as_bytes()) {
            let what = match on_disk {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was removed",
                Err(_) => "cannot be read",
                Ok(_) => "was changed",
            };
            warn!("bgp: the routes file {} {what} behind xdplb's back: writing it again", self.file.display());
            self.bird_holds = None;
        }
    }
}

#[cfg(test)]
mod tests;
