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
use lb_common::maps::LbConfig;
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
    neighbours::{Misses, Neighbours, Resolution},
    reconcile::Reconciler,
    status::Status,
    walks::{Walked, Walker},
};

mod control;
mod events;
mod ha;
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
    /// The netlink resolver of next hops, None while a round runs off the
    /// loop; its answer comes back on `resolved`.
    neighbours: Option<Neighbours>,
    resolved_tx: mpsc::UnboundedSender<Resolved>,
    resolved: mpsc::UnboundedReceiver<Resolved>,
    /// Failed resolution rounds per backend: which MAC the dataplane keeps.
    misses: Misses,
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
    /// The CONFIG map entry as last written; its flow hash seed stays while
    /// the configuration names none (see `hash_seed`).
    config_written: LbConfig,
    /// Drain of the node, BGP announcements, keepalived's track file, flow sync.
    ha: ha::Ha,
}

/// A round of next-hop resolution, back from its task: the resolver (to
/// run the next round) and what it found.
struct Resolved {
    resolver: Neighbours,
    result: Result<HashMap<IpAddr, Resolution>>,
}

/// Resolves `addrs` on a task of its own: a stalled netlink dump (up to
/// two `NETLINK_TIMEOUT`s) does not hold the event loop meanwhile.
fn spawn_resolution(mut resolver: Neighbours, addrs: Vec<IpAddr>, tx: mpsc::UnboundedSender<Resolved>) {
    tokio::spawn(async move {
        let result = resolver.resolve(&addrs).await;
        // The receiver only goes with the daemon, at exit.
        let _ = tx.send(Resolved { resolver, result });
    });
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
            Some(r) = d.resolved.recv() => d.on_resolved(r),
            why = stopped(&mut signals.stop) => break why,
            _ = tick.tick() => d.on_tick(),
        }
    };
    info!("{why}: stopping");
    let stopped = d.shutdown().await;
    drop(api);
    stopped
}

/// The health table's view of every backend, for `Observed`.
fn health_view(checker: &Checker) -> HashMap<health::Key, bool> {
    checker.table.lock().unwrap().iter().map(|(k, h)| (*k, h.up)).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::spawn_resolution;
    use crate::neighbours::Neighbours;

    /// A netlink dump that stalls does not hold the caller (the event loop):
    /// the round runs on its own task and comes back, resolver included, as
    /// a message.
    #[tokio::test]
    async fn a_stalled_next_hop_round_runs_off_the_loop_and_reports_back() {
        let (resolver, _stall) = Neighbours::stalled(Duration::from_millis(300));
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_resolution(resolver, vec!["198.18.0.9".parse().unwrap()], tx);
        // The caller goes on at once: nothing has come back yet.
        assert!(rx.try_recv().is_err(), "the round ran in the caller");
        let round = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the stalled round never reported back")
            .expect("the round's task dropped its sender");
        let err = round.result.expect_err("a stalled dump cannot succeed");
        assert!(format!("{err:#}").contains("did not answer"), "{err:#}");
        // The resolver comes back for the next round, on a new connection.
        let mut resolver = round.resolver;
        let next =
            tokio::time::timeout(Duration::from_secs(10), resolver.resolve(&["198.18.0.9".parse().unwrap()])).await;
        assert!(next.expect("the next round never returned").is_ok());
    }
}
