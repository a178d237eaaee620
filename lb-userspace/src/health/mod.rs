//! Health checks: one tokio task per backend, each checking at its own
//! phase (a random start within the first interval, and ±5% per round, so
//! checks of many backends do not align), with hard timeouts so a hung
//! backend never piles checks up. Transitions follow HAProxy: `fall`
//! consecutive failures take a backend down, `rise` consecutive passes
//! bring it up (`step`, a pure function). What one check does, per type, is
//! in `probe`.
//!
//! A check that could not be run for a local reason (no file descriptor
//! left, a `source:` address this host does not have, no free check slot)
//! is neither a pass nor a failure: the backend keeps its state and its
//! status says "check not run: …".

mod probe;
mod tls;

pub use probe::{Failure, Probe, check_once};

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};
use tracing::warn;

use crate::config::{CheckKind, HealthCheck};

/// A backend as health knows it: by its VIP's address, port and protocol,
/// not the VIP's name, so that renaming a VIP keeps its backends' health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub vip: IpAddr,
    pub vip_port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    pub addr: IpAddr,
    /// 0 when the backend has no port of its own.
    pub port: u16,
}

/// What one backend's checker checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub key: Key,
    pub addr: IpAddr,
    pub port: u16,
    pub vip: IpAddr,
    pub check: HealthCheck,
}

/// A backend went up or down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub key: Key,
    pub up: bool,
    /// The last check's outcome, e.g. "connection refused".
    pub reason: String,
}

/// The latest known state of a backend, for `status` and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub up: bool,
    pub last_result: String,
    pub since: SystemTime,
    pub checks: u64,
    pub failures: u64,
    /// Up/down changes since the checker started.
    pub transitions: u64,
    /// Whether the checker has made its first rise/fall decision (start-up
    /// waits for it before attaching).
    pub decided: bool,
}

pub type HealthTable = Arc<Mutex<HashMap<Key, BackendHealth>>>;

/// What one check came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed(String),
    /// A local reason kept the check from running: it counts for nothing.
    NotRun(String),
}

/// Where a backend's rise/fall count stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RiseFall {
    pub up: bool,
    pub passes: u32,
    pub fails: u32,
    /// `rise` passes or `fall` failures in a row were seen once.
    pub decided: bool,
}

impl RiseFall {
    pub fn new(up: bool) -> Self {
        Self { up, passes: 0, fails: 0, decided: false }
    }
}

/// The next state after `outcome`, and the new up/down state if it changed.
/// `rise` consecutive passes bring a backend up, `fall` consecutive
/// failures take it down; a check not run changes nothing.
pub fn step(s: RiseFall, outcome: &Outcome, rise: u32, fall: u32) -> (RiseFall, Option<bool>) {
    let mut n = s;
    match outcome {
        Outcome::NotRun(_) => return (s, None),
        Outcome::Passed => {
            n.passes = s.passes.saturating_add(1);
            n.fails = 0;
        }
        Outcome::Failed(_) => {
            n.fails = s.fails.saturating_add(1);
            n.passes = 0;
        }
    }
    n.decided = s.decided || n.passes >= rise || n.fails >= fall;
    let changed = if !s.up && n.passes >= rise {
        Some(true)
    } else if s.up && n.fails >= fall {
        Some(false)
    } else {
        None
    };
    if let Some(up) = changed {
        n.up = up;
    }
    (n, changed)
}

/// Checks running at once, at most: a quarter of the file descriptors, so
/// that thousands of backends never exhaust them.
fn concurrent_checks() -> usize {
    let (soft, _) = open_files_limit().unwrap_or((1024, 1024));
    (soft / 4).clamp(16, 4096) as usize
}

fn open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes into the rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((l.rlim_cur, l.rlim_max))
}

/// Raises the soft limit of open files to the hard one (checks of many
/// backends each hold a socket); the limit in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let (soft, hard) = open_files_limit()?;
    if soft < hard {
        let l = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: setrlimit(2) reads the rlimit we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(hard.max(soft))
}

/// Runs one checker per target; `sync` starts, keeps or stops them.
pub struct Checker {
    /// Each target's checker task (none for `type: none`: nothing to run).
    tasks: HashMap<Key, (Target, Option<JoinHandle<()>>)>,
    events: mpsc::UnboundedSender<Transition>,
    permits: Arc<Semaphore>,
    pub table: HealthTable,
}

impl Checker {
    pub fn new(events: mpsc::UnboundedSender<Transition>) -> Self {
        Self::with_limit(events, concurrent_checks())
    }

    /// A checker running at most `concurrent` checks at once.
    pub fn with_limit(events: mpsc::UnboundedSender<Transition>, concurrent: usize) -> Self {
        Self {
            tasks: HashMap::new(),
            events,
            permits: Arc::new(Semaphore::new(concurrent)),
            table: HealthTable::default(),
        }
    }

    /// Makes the running checkers match `targets`. A checker whose target is
    /// unchanged keeps running (and its state); `initial_up` gives the
    /// starting state of new ones.
    pub fn sync(&mut self, targets: Vec<Target>, initial_up: impl Fn(&Target) -> bool) {
        let wanted: HashMap<Key, Target> = targets.into_iter().map(|t| (t.key, t)).collect();
        self.tasks.retain(|key, (target, handle)| {
            let keep = wanted.get(key) == Some(target);
            if !keep && let Some(handle) = handle {
                handle.abort();
            }
            keep
        });
        let mut table = self.table.lock().unwrap();
        table.retain(|k, _| wanted.contains_key(k));
        for (key, target) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let up = initial_up(&target);
            let prior = table.get(&key).map(|h| h.up);
            let up = prior.unwrap_or(up);
            let none = target.check.kind == CheckKind::None;
            table.insert(
                key,
                BackendHealth {
                    // `none` is always healthy: no task, no timer.
                    up: up || none,
                    last_result: "not checked yet".into(),
                    since: SystemTime::now(),
                    checks: 0,
                    failures: 0,
                    transitions: 0,
                    decided: none,
                },
            );
            let handle = (!none).then(|| {
                let task = run(target.clone(), up, self.events.clone(), self.table.clone(), self.permits.clone());
                tokio::spawn(task)
            });
            self.tasks.insert(key, (target, handle));
        }
    }

    pub fn is_up(&self, key: &Key) -> bool {
        self.table.lock().unwrap().get(key).is_some_and(|h| h.up)
    }

    /// Backends whose checker has not made its first decision yet.
    pub fn undecided(&self) -> usize {
        self.table.lock().unwrap().values().filter(|h| !h.decided).count()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, handle) in self.tasks.values() {
            if let Some(handle) = handle {
                handle.abort();
            }
        }
    }
}

/// A small deterministic jitter source per backend (no rand dependency).
fn jitter(seed: &mut u64, span: Duration) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    span.mul_f64((*seed % 10_000) as f64 / 10_000.0)
}

/// One check, once a check slot is free: waiting longer than the check's
/// timeout for one means the check was not run, not that it failed.
pub async fn check_with_permit(probe: &Probe, permits: &Semaphore, timeout: Duration) -> Outcome {
    let Ok(Ok(_permit)) = tokio::time::timeout(timeout, permits.acquire()).await else {
        return Outcome::NotRun(format!("no check slot free within {timeout:?} (too many checks at once)"));
    };
    match tokio::time::timeout(timeout, probe.check()).await {
        Ok(Ok(())) => Outcome::Passed,
        Ok(Err(Failure { not_run: true, text })) => Outcome::NotRun(text),
        Ok(Err(Failure { text, .. })) => Outcome::Failed(text),
        Err(_) => Outcome::Failed(format!("timed out after {timeout:?}")),
    }
}

async fn run(
    target: Target,
    up: bool,
    events: mpsc::UnboundedSender<Transition>,
    table: HealthTable,
    permits: Arc<Semaphore>,
) {
    let c = &target.check;
    let mut seed = {
        use std::hash::{BuildHasher as _, RandomState};
        RandomState::new().hash_one(target.key) | 1
    };
    tokio::time::sleep(jitter(&mut seed, c.interval)).await;
    // Prepared once: TLS settings and CA certificates are not re-read per check.
    let probe = Probe::new(&target);
    let mut state = RiseFall::new(up);
    // The last reason a check was not run, logged once until a check runs again.
    let mut not_run: Option<String> = None;
    loop {
        let started = Instant::now();
        let outcome = check_with_permit(&probe, &permits, c.timeout).await;
        let (next, changed) = step(state, &outcome, c.rise, c.fall);
        state = next;
        let text = match &outcome {
            Outcome::Passed => "passed".to_string(),
            Outcome::Failed(e) => e.clone(),
            Outcome::NotRun(e) => format!("check not run: {e}"),
        };
        match &outcome {
            Outcome::NotRun(e) if not_run.as_ref() != Some(e) => {
                warn!(backend = %target.addr, port = target.port, "health {text}; the backend keeps its state");
                not_run = Some(e.clone());
            }
            Outcome::NotRun(_) => {}
            _ => not_run = None,
        }
        {
            let mut t = table.lock().unwrap();
            if let Some(h) = t.get_mut(&target.key) {
                h.checks += u64::from(!matches!(outcome, Outcome::NotRun(_)));
                h.failures += u64::from(matches!(outcome, Outcome::Failed(_)));
                h.last_result = text.clone();
                h.decided = state.decided;
                if changed.is_some() {
                    h.up = state.up;
                    h.since = SystemTime::now();
                    h.transitions += 1;
                }
            }
        }
        if let Some(up) = changed {
            let reason = if up {
                format!("{} consecutive checks passed", state.passes)
            } else {
                format!("{} consecutive checks failed, last: {text}", state.fails)
            };
            if events.send(Transition { key: target.key, up, reason }).is_err() {
                return;
            }
        }
        // ±5% around the interval, measured from the start of this check.
        let next = c.interval.mul_f64(0.95) + jitter(&mut seed, c.interval.mul_f64(0.1));
        tokio::time::sleep(next.saturating_sub(started.elapsed())).await;
    }
}

#[cfg(test)]
mod tests;
