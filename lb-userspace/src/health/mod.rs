//! Health checks: one tokio task per backend, each checking at its own
//! phase (a random start within the first interval, and ±5% per round, so
//! checks of many backends do not align), with hard timeouts so a hung
//! backend never piles checks up. Transitions follow HAProxy: `fall`
//! consecutive failures take a backend down, `rise` consecutive passes
//! bring it up. What one check does, per type, is in `probe`.

mod probe;
mod tls;

pub use probe::{Probe, check_once};

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    config::{CheckKind, HealthCheck},
    desired::BackendRef,
};

/// What one backend's checker checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub backend: BackendRef,
    pub addr: IpAddr,
    pub port: u16,
    pub vip: IpAddr,
    pub check: HealthCheck,
}

/// A backend went up or down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub backend: BackendRef,
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
}

pub type HealthTable = Arc<Mutex<HashMap<BackendRef, BackendHealth>>>;

/// Runs one checker per target; `sync` starts, keeps or stops them.
pub struct Checker {
    tasks: HashMap<BackendRef, (Target, JoinHandle<()>)>,
    events: mpsc::UnboundedSender<Transition>,
    pub table: HealthTable,
}

impl Checker {
    pub fn new(events: mpsc::UnboundedSender<Transition>) -> Self {
        Self { tasks: HashMap::new(), events, table: HealthTable::default() }
    }

    /// Makes the running checkers match `targets`. A checker whose target is
    /// unchanged keeps running (and its state); `initial_up` gives the
    /// starting state of new ones.
    pub fn sync(&mut self, targets: Vec<Target>, initial_up: impl Fn(&Target) -> bool) {
        let wanted: HashMap<BackendRef, Target> = targets.into_iter().map(|t| (t.backend.clone(), t)).collect();
        self.tasks.retain(|backend, (target, handle)| {
            let keep = wanted.get(backend) == Some(target);
            if !keep {
                handle.abort();
            }
            keep
        });
        let mut table = self.table.lock().unwrap();
        table.retain(|b, _| wanted.contains_key(b));
        for (backend, target) in wanted {
            if self.tasks.contains_key(&backend) {
                continue;
            }
            let up = initial_up(&target);
            let prior = table.get(&backend).map(|h| h.up);
            let up = prior.unwrap_or(up);
            table.insert(
                backend.clone(),
                BackendHealth {
                    up,
                    last_result: "not checked yet".into(),
                    since: SystemTime::now(),
                    checks: 0,
                    failures: 0,
                    transitions: 0,
                },
            );
            // `none` is always healthy: no task, no timer.
            let handle = if target.check.kind == CheckKind::None {
                table.get_mut(&backend).expect("inserted above").up = true;
                tokio::spawn(async {})
            } else {
                tokio::spawn(run(target.clone(), up, self.events.clone(), self.table.clone()))
            };
            self.tasks.insert(backend, (target, handle));
        }
    }

    pub fn is_up(&self, backend: &BackendRef) -> bool {
        self.table.lock().unwrap().get(backend).is_some_and(|h| h.up)
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, handle) in self.tasks.values() {
            handle.abort();
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

async fn run(target: Target, mut up: bool, events: mpsc::UnboundedSender<Transition>, table: HealthTable) {
    let c = &target.check;
    let mut seed = {
        use std::hash::{BuildHasher as _, RandomState};
        RandomState::new().hash_one(&target.backend) | 1
    };
    tokio::time::sleep(jitter(&mut seed, c.interval)).await;
    // Prepared once: TLS settings and CA certificates are not re-read per check.
    let probe = Probe::new(&target);
    let (mut passes, mut fails) = (0u32, 0u32);
    loop {
        let started = Instant::now();
        let result = match tokio::time::timeout(c.timeout, probe.check()).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", c.timeout)),
        };
        let (ok, text) = match &result {
            Ok(()) => (true, "passed".to_string()),
            Err(e) => (false, e.clone()),
        };
        if ok {
            passes += 1;
            fails = 0;
        } else {
            fails += 1;
            passes = 0;
        }
        let changed = if !up && ok && passes >= c.rise {
            up = true;
            true
        } else if up && !ok && fails >= c.fall {
            up = false;
            true
        } else {
            false
        };
        {
            let mut t = table.lock().unwrap();
            if let Some(h) = t.get_mut(&target.backend) {
                h.checks += 1;
                h.failures += u64::from(!ok);
                h.last_result = text.clone();
                if changed {
                    h.up = up;
                    h.since = SystemTime::now();
                    h.transitions += 1;
                }
            }
        }
        let reason = if ok {
            format!("{passes} consecutive checks passed")
        } else {
            format!("{fails} consecutive checks failed, last: {text}")
        };
        if changed && events.send(Transition { backend: target.backend.clone(), up, reason }).is_err() {
            return;
        }
        // ±5% around the interval, measured from the start of this check.
        let next = c.interval.mul_f64(0.95) + jitter(&mut seed, c.interval.mul_f64(0.1));
        tokio::time::sleep(next.saturating_sub(started.elapsed())).await;
    }
}

#[cfg(test)]
mod tests;
