//! Health checks: one tokio task per backend, each checking at its own
//! phase (a random start within the first interval, and ±5% per round, so
//! checks of many backends do not align), with hard timeouts so a hung
//! backend never piles checks up. Transitions follow HAProxy: `fall`
//! consecutive failures take a backend down, `rise` consecutive passes
//! bring it up.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};

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
    let (mut passes, mut fails) = (0u32, 0u32);
    loop {
        let started = Instant::now();
        let result = match tokio::time::timeout(c.timeout, check_once(&target)).await {
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

async fn connect(target: &Target) -> Result<TcpStream, String> {
    let addr = SocketAddr::new(target.addr, target.port);
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(|e| e.to_string())?;
    if let Some(src) = target.check.source {
        socket.bind(SocketAddr::new(src, 0)).map_err(|e| format!("cannot use source address {src}: {e}"))?;
    }
    socket.connect(addr).await.map_err(|e| format!("connect to {addr}: {e}"))
}

/// One check, without the timeout (the caller applies it).
pub async fn check_once(target: &Target) -> Result<(), String> {
    match &target.check.kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => connect(target).await.map(drop),
        CheckKind::Http { path, host, expect_status, expect_body } => {
            let mut stream = connect(target).await?;
            let host = host.clone().unwrap_or_else(|| match target.addr {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            });
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xdplb-health\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.map_err(|e| format!("sending the request: {e}"))?;
            // Bounded: the status line and, if asked for, 64 KiB of body.
            let limit = if expect_body.is_some() { 65_536 } else { 1024 };
            let mut buf = Vec::with_capacity(1024);
            // On the heap: a future per backend stays small with thousands of backends.
            let mut chunk = vec![0u8; 4096];
            while buf.len() < limit {
                let n = stream.read(&mut chunk).await.map_err(|e| format!("reading the response: {e}"))?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if expect_body.is_none() && buf.windows(2).any(|w| w == b"\r\n") {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&buf);
            let status: u16 = text
                .strip_prefix("HTTP/1.")
                .and_then(|rest| rest.get(2..5))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| "the response is not HTTP".to_string())?;
            if !expect_status.matches(status) {
                return Err(format!("HTTP status {status}"));
            }
            if let Some(want) = expect_body {
                let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                if !body.contains(want.as_str()) {
                    return Err(format!("the body does not contain {want:?}"));
                }
            }
            Ok(())
        }
        CheckKind::Exec { command } => {
            let mut child = tokio::process::Command::new(&command[0])
                .args(&command[1..])
                .env("XDPLB_BACKEND_ADDRESS", target.addr.to_string())
                .env("XDPLB_BACKEND_PORT", target.port.to_string())
                .env("XDPLB_VIP", target.vip.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", command[0]))?;
            let status = child.wait().await.map_err(|e| e.to_string())?;
            if status.success() { Ok(()) } else { Err(format!("{} exited with {status}", command[0])) }
        }
    }
}
