//! `xdplb run`: load (or adopt) the dataplane, attach it, and keep it equal
//! to configuration + health + neighbours until stopped.
//!
//! Every change — a health transition, a next-hop MAC, a reload — goes
//! through the same path: `desired::vip_specs` computes what the maps should
//! hold and `Reconciler::apply` writes the difference.
//!
//! `run` is start-up (`startup`: a list of named steps), then one event loop
//! whose arms each call one handler (`events`, `control`); the status
//! (`status_view`) and NAT collection (`nat_gc`) are what the tick does.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::{
    signal::unix::{Signal, SignalKind},
    sync::{mpsc, watch},
};
use tracing::info;

pub use crate::desired::Link;
use crate::{
    config::{self, Config, XdpModeSetting},
    dataplane::Dataplane,
    desired::{BackendRef, Observed, Overrides},
    dns,
    health::{self, Checker},
    neighbours::{Neighbours, Resolution},
    reconcile::Reconciler,
    status::Status,
    walks::{Walked, Walker},
};

mod control;
mod events;
mod nat_gc;
mod startup;
mod status_view;

pub use startup::link;

pub struct RunOptions {
    pub config: PathBuf,
    pub iface: Option<String>,
    pub xdp_mode: Option<XdpModeSetting>,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    pub detach_on_exit: bool,
    /// Accept pins that die with the process (see `pins::ensure_bpffs`).
    pub ephemeral: bool,
}

/// How often the maps are compared with the controller's own view.
const DRIFT_CHECK_EVERY_TICKS: u64 = 30;

struct Daemon {
    opts: RunOptions,
    link: Link,
    backend_link: Option<Link>,
    pin_dir: PathBuf,
    /// NAT connections forgotten by the collector: (idle, closed).
    nat_evicted: (u64, u64),
    /// The configuration as the file says it, backend names unresolved.
    file_config: Config,
    /// `file_config` with every backend name replaced by its addresses: what
    /// health checks, the dataplane and status follow.
    config: Config,
    /// Backend names: what they resolve to, and the task that resolves them.
    names: dns::Names,
    dns: Option<DnsTask>,
    config_text: String,
    /// The file as last seen (applied or rejected, so a rejected file is reported
    /// once), and a change waiting to read the same twice before it is reloaded.
    watch: config::watch::FileWatch,
    dp: Dataplane,
    reconciler: Reconciler,
    checker: Checker,
    neighbours: Neighbours,
    observed: Observed,
    resolution: HashMap<IpAddr, Resolution>,
    status: Arc<Mutex<Status>>,
    previous: HashMap<(String, String, u16), (u64, u64)>,
    previous_at: Instant,
    /// The last count of flows per backend, and of all (see `walks`).
    flows_by_backend: HashMap<u32, u64>,
    flows_tracked: u64,
    /// NAT connections after the last collection.
    nat_connections: u64,
    /// Whole-map walks run off the loop; their results come back on `walked`.
    walker: Walker,
    walked: mpsc::UnboundedReceiver<Walked>,
    ticks: u64,
    publish_cost: Duration,
    /// Runtime overrides (`xdplb set weight|drain|maint`), on top of the file.
    overrides: Overrides,
    /// Each backend's state as last published, since when (unix ms), and
    /// the tick it was last published at (backends gone are forgotten).
    state_since: HashMap<BackendRef, (String, u64, u64)>,
    /// The maps do not hold the desired state yet: the last apply failed
    /// (its error, logged once), and every tick tries again.
    unapplied: Option<String>,
}

/// The resolving task of backend names, and how to tell it the names.
struct DnsTask {
    settings: config::Resolvers,
    names: watch::Sender<Vec<String>>,
    answers: mpsc::Receiver<Vec<dns::Answer>>,
}

impl DnsTask {
    fn start(settings: &config::Resolvers, names: Vec<String>) -> Result<Self> {
        let (tx, rx) = watch::channel(names);
        Ok(Self { settings: settings.clone(), answers: dns::spawn(settings, rx)?, names: tx })
    }
}

/// The next round of DNS answers; never, when no name is configured.
async fn next_answers(task: &mut Option<DnsTask>) -> Option<Vec<dns::Answer>> {
    match task {
        Some(t) => t.answers.recv().await,
        None => std::future::pending().await,
    }
}

/// The signals `run` handles, installed before anything else: a SIGHUP
/// during start-up waits for the event loop (which then reloads), a SIGTERM
/// or SIGINT stops start-up cleanly.
struct Signals {
    hup: Signal,
    /// Set, once, to the name of the signal that asked to stop.
    stop: watch::Receiver<Option<&'static str>>,
}

impl Signals {
    fn install() -> Result<Self> {
        let hup = tokio::signal::unix::signal(SignalKind::hangup())?;
        let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let (tx, stop) = watch::channel(None);
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let _ = tx.send(Some(why));
            // Kept alive: the receiver keeps seeing the value.
            std::future::pending::<()>().await;
        });
        Ok(Self { hup, stop })
    }

    /// Runs `step` unless (or until) a stop signal comes first: None then.
    async fn unless_stopped<F: Future>(&mut self, step: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            why = stopped(&mut self.stop) => {
                info!("{why} during start-up: stopping before serving");
                None
            }
            out = step => Some(out),
        }
    }
}

/// Which stop signal came, once one has.
async fn stopped(stop: &mut watch::Receiver<Option<&'static str>>) -> &'static str {
    match stop.wait_for(Option::is_some).await {
        Ok(why) => why.unwrap_or("a signal"),
        Err(_) => std::future::pending().await,
    }
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let started = Instant::now();
    let mut signals = Signals::install()?;
    let Some(start) = startup::start(opts, &mut signals).await? else { return Ok(()) };
    let startup::Started { mut d, mut transitions, mut requests, api } = start;
    info!("ready in {} ms", started.elapsed().as_millis());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let why = loop {
        tokio::select! {
            Some(t) = transitions.recv() => d.on_transitions(t, &mut transitions),
            Some(answers) = next_answers(&mut d.dns) => d.on_dns(answers),
            _ = signals.hup.recv() => d.reload("SIGHUP"),
            Some(call) = requests.recv() => d.on_request(call),
            Some(w) = d.walked.recv() => d.on_walked(w),
            why = stopped(&mut signals.stop) => break why,
            _ = tick.tick() => d.on_tick().await,
        }
    };
    info!("{why}: stopping");
    let stopped = d.shutdown();
    drop(api);
    stopped
}

/// The health table's view of every backend, for `Observed`.
fn health_view(checker: &Checker) -> HashMap<health::Key, bool> {
    checker.table.lock().unwrap().iter().map(|(k, h)| (*k, h.up)).collect()
}
