//! Telling the network whether this node serves: each VIP address is
//! announced over BGP (through BIRD) while it has a healthy backend, and
//! keepalived's track file says whether the node can serve at all.
//!
//! `decide` is the policy, a pure function of the VIPs the dataplane should
//! hold, whether it holds them, and the node's state. The `Announcer`
//! applies it: it writes BIRD's routes file and asks BIRD to reconfigure,
//! retrying every second until BIRD takes it.
//!
//! The rule, per VIP address (several VIPs may share one, e.g. :80 and
//! :443): announced when the node is not stopping, not drained, not warming
//! up, and at least one VIP on the address is served by the dataplane and
//! has a backend that is healthy and weighted above 0 in
//! `desired::vip_specs`. Served by the dataplane (`Reconciler::serving`):
//! the VIP is in the maps and its Maglev table has a member. A VIP whose
//! apply failed (no room left in the maps) counts as having no healthy
//! backend: announced, its address would draw traffic that the dataplane
//! passes to the kernel. In `desired::vip_specs` a backend counts as
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
    track::{TrackFile, track_path, write_track_file},
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
/// The routes file is checked this often, whatever the wishes do (someone
/// may have removed it, or `/run/xdplb` with it).
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

/// One decision per distinct VIP address (see the module's rule); `served`
/// says whether the dataplane serves a VIP (`Reconciler::serving`): one it
/// does not counts as having no healthy backend. The node's state comes
/// first: stopping, then drained, then warming up.
pub fn decide(specs: &[VipSpec], node: NodeState, served: impl Fn(&VipSpec) -> bool) -> BTreeMap<IpAddr, Decision> {
    decide_for(&serving(specs, served), node)
}

/// Each VIP address, and whether some VIP on it serves: one the dataplane
/// holds (`served`) with a healthy backend of weight > 0. Changes only with
/// an apply; `decide_for` turns it into decisions for the node's state.
pub fn serving(specs: &[VipSpec], served: impl Fn(&VipSpec) -> bool) -> BTreeMap<IpAddr, bool> {
    let mut serving: BTreeMap<IpAddr, bool> = BTreeMap::new();
    for v in specs {
        let entry = serving.entry(v.addr).or_default();
        *entry = *entry || (v.backends.iter().any(|b| b.healthy && b.weight > 0) && served(v));
    }
    serving
}

/// The decision for each address of `serving` (see `serving`) in `node`'s state.
pub fn decide_for(serving: &BTreeMap<IpAddr, bool>, node: NodeState) -> BTreeMap<IpAddr, Decision> {
    let decision = |serves: bool| match (node, serves) {
        (NodeState { stopping: true, .. }, _) => Decision { announce: false, why: WHY_STOPPING },
        (NodeState { drained: true, .. }, _) => Decision { announce: false, why: WHY_DRAINED },
        (NodeState { warming: true, .. }, _) => Decision { announce: false, why: WHY_WARMING },
        (_, true) => Decision { announce: true, why: WHY_HEALTHY },
        (_, false) => Decision { announce: false, why: WHY_NO_BACKEND },
    };
    serving.iter().map(|(addr, serves)| (*addr, decision(*serves))).collect()
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

/// What the daemon wants announced.
#[derive(Clone, Debug, Default)]
struct Wish {
    generation: u64,
    routes: BTreeMap<IpAddr, Decision>,
}

/// An announcer being retired (`Announcer::retire`): done once its routes
/// are withdrawn (or it gave up) and, if asked, its routes file is gone.
#[derive(Clone, Debug)]
pub struct Retiring(watch::Receiver<bool>);

impl Retiring {
    pub async fn done(mut self) {
        // An error: the retirement's task is gone, which is done too.
        let _ = self.0.wait_for(|done| *done).await;
    }
}

/// The routes file of one announcer: written by its task and, at a
/// withdrawal, at once by the caller (BIRD may not answer for a while, and
/// whatever it reads next must withdraw).
struct RoutesFile {
    path: PathBuf,
    /// Makes the temporary file's name this announcer's own: a retiring
    /// announcer and its successor may write into the same directory at once.
    nonce: u64,
    state: Mutex<FileState>,
}

#[derive(Default)]
struct FileState {
    /// False while the announcer waits for the one it replaces to retire:
    /// BIRD must not find two files defining the same protocols.
    ready: bool,
    /// The generation of the wish last written: an older one is not written over it.
    generation: u64,
}

impl RoutesFile {
    fn new(path: PathBuf) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self { path, nonce: NEXT.fetch_add(1, Ordering::Relaxed), state: Mutex::new(FileState::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The generation written last (0: none).
    fn written(&self) -> u64 {
        self.state().generation
    }

    /// `.NAME.PID.NONCE.tmp` beside the file: a name BIRD's `*.bird.conf`
    /// include never matches (it starts with a dot).
    fn temp_path(&self) -> std::result::Result<PathBuf, String> {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return Err(format!("{} is not a file's path", self.path.display()));
        };
        Ok(dir.join(format!(".{}.{}.{}.tmp", name.to_string_lossy(), std::process::id(), self.nonce)))
    }

    /// Writes `text`, made from wish `generation`; Ok(false) when it was not
    /// written: not ready yet, or a newer wish is written already.
    fn write(&self, text: &str, generation: u64) -> std::result::Result<bool, String> {
        use std::os::unix::fs::DirBuilderExt as _;
        let mut state = self.state();
        if !state.ready || generation < state.generation {
            return Ok(false);
        }
        let tmp = self.temp_path()?;
        let dir = tmp.parent().expect("beside the routes file");
        // The state directory may have been removed behind our back; BIRD
        // (another user) must be able to look into it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| format!("cannot create {} for the routes file: {e}", dir.display()))?;
        crate::status::replace_file(&self.path, &tmp, text.as_bytes()).map_err(|e| format!("{e:#}"))?;
        state.generation = generation;
        Ok(true)
    }
}

/// Announces VIP addresses through BIRD: a task that follows `want`. Ended
/// with `retire` (or `withdraw_all`); merely dropped, the task ends and the
/// routes file stays as it was last written, announcing what it says.
pub struct Announcer {
    wishes: watch::Sender<Wish>,
    /// The generation of the last wish BIRD took.
    taken: watch::Receiver<u64>,
    file: Arc<RoutesFile>,
    status: Arc<Mutex<BgpStatus>>,
    /// After `withdraw_all`, nothing is announced again.
    stopping: AtomicBool,
    task: tokio::task::JoinHandle<()>,
}

impl Announcer {
    /// Starts the task (inside a tokio runtime), which has BIRD take `first`
    /// at once: a restart with nothing to announce withdraws what a killed
    /// predecessor left in the file.
    pub fn start(settings: &BgpSettings, routes_file: PathBuf, first: BTreeMap<IpAddr, Decision>) -> Announcer {
        Self::spawn(settings, routes_file, first, None)
    }

    /// As `start`, but writes nothing before `previous` is retired: BIRD
    /// reads one routes file at a time.
    pub fn start_after(
        previous: Retiring,
        settings: &BgpSettings,
        routes_file: PathBuf,
        first: BTreeMap<IpAddr, Decision>,
    ) -> Announcer {
        Self::spawn(settings, routes_file, first, Some(previous))
    }

    fn spawn(
        settings: &BgpSettings,
        routes_file: PathBuf,
        first: BTreeMap<IpAddr, Decision>,
        previous: Option<Retiring>,
    ) -> Announcer {
        let status = Arc::new(Mutex::new(BgpStatus {
            routes_file: routes_file.display().to_string(),
            bird_socket: settings.bird_socket.display().to_string(),
            ..Default::default()
        }));
        let (wishes, wish_rx) = watch::channel(Wish { generation: 1, routes: first });
        let (taken_tx, taken) = watch::channel(0);
        let file = Arc::new(RoutesFile::new(routes_file));
        let task = Task {
            socket: settings.bird_socket.clone(),
            file: file.clone(),
            status: status.clone(),
            taken: taken_tx,
            bird_holds: None,
            routes: BTreeMap::new(),
            took_once: false,
            logged_error: None,
        };
        let task = tokio::spawn(task.run(wish_rx, previous));
        Announcer { wishes, taken, file, status, stopping: AtomicBool::new(false), task }
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
    /// or with what went wrong once `timeout` passed. The routes file is
    /// written at once, before BIRD is asked: whatever BIRD reads next
    /// withdraws. Later `want`s are ignored.
    pub async fn withdraw_all(&self, timeout: Duration) -> Result<()> {
        let (generation, written) = self.begin_withdrawal();
        self.withdrawn(generation, written, timeout).await
    }

    /// Ends this announcer without leaving its routes announced: every route
    /// is withdrawn (the file written at once, BIRD told in the background
    /// for at most `timeout`), then, with `remove_file`, the file removed
    /// (whether BIRD took it or not): a successor writing another file must
    /// not leave an include by pattern (`*.bird.conf`) with two files
    /// defining the same protocols.
    pub fn retire(mut self, remove_file: bool, timeout: Duration) -> Retiring {
        let (generation, written) = self.begin_withdrawal();
        let (done, retiring) = watch::channel(false);
        tokio::spawn(async move {
            let path = self.file.path.clone();
            match self.withdrawn(generation, written, timeout).await {
                Ok(()) => info!("bgp: every route of {} withdrawn", path.display()),
                Err(e) => warn!("bgp: withdrawing the routes of {}: {e:#}", path.display()),
            }
            // The task ends before the file goes, so it cannot write it again.
            self.task.abort();
            let _ = (&mut self.task).await;
            if remove_file {
                match std::fs::remove_file(&path) {
                    Ok(()) => info!("bgp: removed the routes file {} (no longer configured)", path.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => warn!("bgp: cannot remove the old routes file {}: {e}", path.display()),
                }
            }
            done.send_replace(true);
        });
        Retiring(retiring)
    }

    /// The wish that withdraws every route, written to the routes file at
    /// once (unless the task waits for its predecessor: then it writes it
    /// first thing): its generation, and the error of that write.
    fn begin_withdrawal(&self) -> (u64, std::result::Result<bool, String>) {
        self.stopping.store(true, Ordering::Relaxed);
        let mut generation = 0;
        let mut text = String::new();
        self.wishes.send_modify(|w| {
            w.generation += 1;
            generation = w.generation;
            for d in w.routes.values_mut() {
                *d = Decision { announce: false, why: WHY_STOPPING };
            }
            text = bird::routes_file_text(&w.routes);
        });
        (generation, self.file.write(&text, generation))
    }

    /// Waits for BIRD to take wish `generation` (see `withdraw_all`).
    async fn withdrawn(
        &self,
        generation: u64,
        written: std::result::Result<bool, String>,
        timeout: Duration,
    ) -> Result<()> {
        let mut taken = self.taken.clone();
        match tokio::time::timeout(timeout, taken.wait_for(|g| *g >= generation)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => bail!("the BGP announcer ended before BIRD took the withdrawal"),
            Err(_) => {
                let s = self.status();
                let what = if s.bird_error.is_empty() { "no answer yet".to_string() } else { s.bird_error };
                if self.file.written() >= generation {
                    bail!(
                        "BIRD has not taken the withdrawal after {timeout:?}: {what}; {} announces nothing now, \
                         so BIRD withdraws the routes when it next reads its configuration",
                        s.routes_file
                    )
                }
                match written {
                    Err(e) => bail!("BIRD has not taken the withdrawal after {timeout:?}: {what}; and {e}"),
                    Ok(_) => bail!("BIRD has not taken the withdrawal after {timeout:?}: {what}"),
                }
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

/// What became of one attempt to have BIRD take a wish.
enum Attempt {
    Taken,
    Failed(String),
    /// A wish with other routes came meanwhile: it goes next.
    Superseded,
}

struct Task {
    socket: PathBuf,
    file: Arc<RoutesFile>,
    status: Arc<Mutex<BgpStatus>>,
    taken: watch::Sender<u64>,
    /// The routes file BIRD last took; None: not known (at start, after a failure).
    bird_holds: Option<String>,
    routes: BTreeMap<IpAddr, Route>,
    /// BIRD took a file from this task once.
    took_once: bool,
    /// The error last logged, so a failure that repeats every second is logged once.
    logged_error: Option<String>,
}

impl Task {
    async fn run(mut self, mut wishes: watch::Receiver<Wish>, previous: Option<Retiring>) {
        if let Some(previous) = previous {
            previous.done().await;
        }
        self.file.state().ready = true;
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK, RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wish = wishes.borrow_and_update().clone();
            let text = bird::routes_file_text(&wish.routes);
            self.note_whys(&wish);
            if self.bird_holds.as_deref() == Some(text.as_str()) {
                // Nothing for BIRD to do (a why changed, say).
                self.took(&wish, text, false);
            } else {
                self.bird_holds = None;
                // A newer wish with other routes abandons this attempt (BIRD
                // may be stuck, and `configure` take 4 × STEP_TIMEOUT): the
                // newest routes go to BIRD without waiting for it.
                let attempt = {
                    let attempt = apply(&self.file, &self.socket, &text, wish.generation);
                    tokio::pin!(attempt);
                    loop {
                        tokio::select! {
                            done = &mut attempt => break done,
                            changed = wishes.changed() => {
                                if changed.is_err() {
                                    return;
                                }
                                if bird::routes_file_text(&wishes.borrow().routes) != text {
                                    break Attempt::Superseded;
                                }
                            }
                        }
                    }
                };
                match attempt {
                    Attempt::Taken => self.took(&wish, text, true),
                    Attempt::Failed(e) => self.failed(e),
                    Attempt::Superseded => {}
                }
            }
            self.publish();
            if wishes.borrow().generation != wish.generation {
                continue;
            }
            let retry = self.bird_holds.is_none();
            tokio::select! {
                changed = wishes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(RETRY), if retry => {}
                _ = recheck.tick(), if !retry => {
                    if !wishes.has_changed().unwrap_or(true) {
                        self.recheck();
                    }
                }
            }
        }
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
        let on_disk = std::fs::read(&self.file.path);
        if on_disk.as_deref().ok() != Some(held.as_bytes()) {
            let what = match on_disk {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was removed",
                Err(_) => "cannot be read",
                Ok(_) => "was changed",
            };
            warn!("bgp: the routes file {} {what} behind xdplb's back: writing it again", self.file.path.display());
            self.bird_holds = None;
        }
    }
}

/// Writes the routes file of wish `generation` and has BIRD read it.
async fn apply(file: &RoutesFile, socket: &Path, text: &str, generation: u64) -> Attempt {
    match file.write(text, generation) {
        Ok(true) => {}
        // Only a withdrawal writes ahead of the task: its wish is newer.
        Ok(false) => return Attempt::Superseded,
        Err(e) => return Attempt::Failed(e),
    }
    match bird::configure(socket).await {
        Ok(()) => Attempt::Taken,
        Err(bird::ConfigureError::Unreachable(e)) => Attempt::Failed(e),
        Err(bird::ConfigureError::Refused(e)) => Attempt::Failed(bird::refusal_text(&e, &file.path)),
    }
}

#[cfg(test)]
mod tests;
