//! Start-up, as a list of named steps: what `xdplb run` does before its
//! event loop. The signal handlers exist before the first step (see
//! `Signals`); a stop signal between or during steps ends start-up cleanly.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::maps::{BACKEND_ACTIVE, BACKEND_DRAINING, programs};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Daemon, DnsTask, Link, RunOptions, Signals, health_view};
use crate::{
    addr,
    attach::{self, Attached},
    config::{self, CheckKind, Config, InitialState, XdpModeSetting},
    dataplane::Dataplane,
    desired::{self, Observed, Overrides},
    dns,
    health::{self, Checker},
    neighbours::{Misses, Neighbours, Routes},
    notify,
    reconcile::{AdoptedBackend, Reconciler},
    runtime,
    status::Status,
    walks::Walker,
    web,
};

/// The longest start-up waits for the first round of health checks.
const FIRST_CHECKS_LIMIT: Duration = Duration::from_secs(10);

/// A started controller: the daemon, and what its event loop listens to.
pub(super) struct Started {
    pub d: Daemon,
    pub transitions: mpsc::UnboundedReceiver<health::Transition>,
    pub requests: mpsc::Receiver<runtime::Call>,
    pub api: runtime::Server,
}

/// The status page's socket, bound before anything is attached.
type MetricsListener = Option<(std::net::SocketAddr, tokio::net::TcpListener)>;

/// The configuration as loaded at start: the file, its text, and what its
/// backend names resolved to.
struct Loaded {
    file_config: Config,
    config_text: String,
    names: dns::Names,
    dns: Option<DnsTask>,
}

/// Runs the start-up steps; None when a stop signal ended start-up.
pub(super) async fn start(opts: RunOptions, signals: &mut Signals) -> Result<Option<Started>> {
    raise_open_files_limit();
    let Some(loaded) = signals.unless_stopped(load_config(&opts.config)).await else { return Ok(None) };
    let loaded = loaded?;
    let config = desired::expand_names(&loaded.file_config, &loaded.names.states);
    let iface = opts
        .iface
        .clone()
        .or_else(|| config.interface.clone())
        .context("no interface: set `interface:` in the configuration or pass --iface")?;
    let link = link(&iface)?;
    // Before anything is loaded: a second controller for this interface stops here.
    let (api, requests) = runtime::Server::start(&opts.state_dir, &iface)?;
    // Before anything is attached: a busy address must not leave a fresh
    // dataplane forwarding with no controller.
    let metrics = bind_metrics(config.metrics_listen).await?;
    let backend_link = match &config.backend_interface {
        Some(b) if *b != iface => Some(self::link(b).with_context(|| format!("backend_interface {b}"))?),
        _ => None,
    };
    let mut ifaces = vec![(link.index, iface.clone())];
    if let Some(b) = &backend_link {
        ifaces.push((b.index, b.name.clone()));
    }
    let mut neighbours = Neighbours::new(ifaces)?;
    let check = refuse_routed_dsr(&mut neighbours, &loaded, &opts.config, &iface);
    let Some(routes) = signals.unless_stopped(check).await else {
        return Ok(None);
    };
    let routes = routes?;
    let mode = opts.xdp_mode.unwrap_or(config.xdp_mode);
    // What `xdplb doctor` would say about this host, before anything is attached.
    let doctor = crate::doctor::warn_at_start(&config, &opts.config, &iface, mode, &opts.pin_root, opts.ephemeral);
    let Some(()) = signals.unless_stopped(doctor).await else { return Ok(None) };
    let (pin_dir, adopting) = pin_directory(&opts.pin_root, &iface, opts.ephemeral)?;
    let attached = pin_dir.join("link").exists();
    let (dp, reconciler, adopted, config_written) =
        open_dataplane(&config, &pin_dir, adopting, &link, backend_link.as_ref())?;

    let (tx, transitions) = mpsc::unbounded_channel();
    let (walker, walked) = Walker::new(dp.walk_maps()?);
    let (resolved_tx, resolved) = mpsc::unbounded_channel();
    let interfaces = Some((link.index, backend_link.as_ref().map_or(link.index, |b| b.index)));
    let mut d = Daemon {
        link,
        watch: config::watch::FileWatch::new(loaded.config_text.clone(), Duration::from_millis(200)),
        config_text: loaded.config_text,
        pin_dir,
        dp,
        reconciler,
        checker: Checker::new(tx),
        neighbours: Some(neighbours),
        resolved_tx,
        resolved,
        misses: Misses::default(),
        observed: Observed { interfaces, routes, ..Observed::default() },
        backend_link,
        nat_evicted: (0, 0),
        resolution: HashMap::new(),
        status: Arc::new(Mutex::new(Status::default())),
        previous: HashMap::new(),
        previous_at: Instant::now(),
        flows_by_backend: HashMap::new(),
        flows_tracked: 0,
        nat_connections: 0,
        walker,
        walked,
        ticks: 0,
        publish_cost: Duration::ZERO,
        overrides: Overrides::new(),
        state_since: HashMap::new(),
        unapplied: None,
        config_written,
        ha: Default::default(),
        file_config: loaded.file_config,
        config,
        names: loaded.names,
        dns: loaded.dns,
        opts,
    };
    d.seed_from_adopted(&adopted);
    d.start_checks(&adopted);
    // Bounded by the netlink timeouts, and by a stop signal.
    let Some(()) = signals.unless_stopped(d.first_resolution()).await else {
        d.abandon(adopting);
        return Ok(None);
    };
    d.load_overrides();
    d.apply_logged("start-up");
    // A cold start attaches once health has spoken, not with every backend
    // down; an attached dataplane keeps forwarding meanwhile, so no wait.
    if !attached {
        let Some(()) = signals.unless_stopped(d.first_health_round()).await else {
            d.abandon(adopting);
            return Ok(None);
        };
    }
    // Maps are full before the program sees a packet.
    let mode_text = d.attach(mode)?;
    // Attached and filled: now the routers (or keepalived) may send traffic here.
    d.ha_attached();
    d.announce(mode_text, metrics);
    Ok(Some(Started { d, transitions, requests, api }))
}

/// Refuses a file with a DSR backend behind a gateway (see
/// `desired::routed_dsr_backends`), before anything is loaded: the file's
/// addresses, and those its backend names resolved to (`load_config`
/// resolves them first; a name that did not answer in time is checked by
/// the resolution rounds when it does). The routing table it read, or None
/// when it could not be read (then the resolution rounds keep such
/// backends out, and reloads check once a table is read).
async fn refuse_routed_dsr(
    neighbours: &mut Neighbours,
    loaded: &Loaded,
    path: &Path,
    iface: &str,
) -> Result<Option<Arc<Routes>>> {
    let routes = match neighbours.read_routes().await {
        Ok(r) => r,
        Err(e) => {
            warn!("cannot read the routing table ({e:#}): DSR backends behind a gateway are not checked at start");
            return Ok(None);
        }
    };
    let routed =
        desired::routed_dsr_backends(&loaded.file_config, &loaded.names.states, None, |a| routes.gateway(a), iface);
    if !routed.is_empty() {
        bail!("{}: {}; nothing was started", path.display(), routed.join("; "));
    }
    Ok(Some(routes))
}

/// Binds the status page's address, if one is configured. A busy address
/// fails the start, naming who to ask.
async fn bind_metrics(listen: Option<std::net::SocketAddr>) -> Result<MetricsListener> {
    let Some(listen) = listen else { return Ok(None) };
    match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => Ok(Some((listen, l))),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "cannot listen for metrics on {listen} (metrics_listen): another process holds it \
             (see `ss -ltnp 'sport = :{}'`); stop it or choose another metrics_listen; nothing was attached",
            listen.port()
        ),
        Err(e) => Err(e).with_context(|| {
            format!("cannot listen for metrics on {listen} (metrics_listen); fix or remove metrics_listen; nothing was attached")
        }),
    }
}

/// Checks of many backends each hold a socket: the soft limit of open files
/// goes to the hard one.
fn raise_open_files_limit() {
    match health::raise_open_files_limit() {
        Ok(n) => info!("open files limit: {n}"),
        Err(e) => warn!("cannot raise the open files limit: {e}; health checks of many backends may not run"),
    }
}

/// The file, and the servers its backend names stand for. Names are
/// resolved before anything is loaded, so the first apply already has their
/// servers (bounded: a DNS outage delays start-up by at most the resolver's
/// time limit, and then they come when DNS answers).
async fn load_config(path: &Path) -> Result<Loaded> {
    // Read once: what is validated is what later reloads compare with.
    let config_text =
        config::read_file(path).with_context(|| format!("cannot read the configuration {}", path.display()))?;
    let file_config = config::parse(&path.display().to_string(), &config_text)
        .map_err(|e| anyhow!("{e}\n{}: {} error(s); nothing was started", path.display(), e.0.len()))?;
    let conflicts = desired::own_address_conflicts(&file_config, &crate::addr::local_addresses());
    if !conflicts.is_empty() {
        bail!("{}: {}; nothing was started", path.display(), conflicts.join("; "));
    }
    let mut names = dns::Names::default();
    let mut dns_task = None;
    let backend_names = dns::names_of(&file_config);
    if !backend_names.is_empty() {
        let mut task = DnsTask::start(&file_config.resolvers, backend_names.clone())?;
        let wait = file_config.resolvers.timeout * 2 + Duration::from_secs(1);
        match tokio::time::timeout(wait, task.answers.recv()).await {
            Ok(Some(answers)) => {
                for (name, e) in names.update(answers, Instant::now(), file_config.resolvers.hold_obsolete).failed {
                    warn!(name, "cannot resolve backend name: {e}; its servers join when it resolves");
                }
            }
            _ => {
                warn!("no DNS answer for {} within {wait:?}; starting without their servers", backend_names.join(", "))
            }
        }
        dns_task = Some(task);
    }
    Ok(Loaded { file_config, config_text, names, dns: dns_task })
}

/// Interface facts the dataplane needs, read from the kernel.
pub fn link(name: &str) -> Result<Link> {
    let c = std::ffi::CString::new(name).context("interface names have no NUL byte")?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        bail!("interface {name} not found in this network namespace (see `ip link show`)");
    }
    let sys = PathBuf::from("/sys/class/net").join(name);
    let read = |f: &str| std::fs::read_to_string(sys.join(f)).map(|s| s.trim().to_string());
    let mac_text = read("address").with_context(|| format!("cannot read the MAC address of {name}"))?;
    let mut mac = [0u8; 6];
    for (i, part) in mac_text.split(':').take(6).enumerate() {
        mac[i] =
            u8::from_str_radix(part, 16).with_context(|| format!("{name} has no Ethernet address ({mac_text})"))?;
    }
    let mtu = read("mtu").ok().and_then(|m| m.parse().ok()).unwrap_or(1500);
    Ok(Link { name: name.to_string(), index, mac, mtu })
}

/// The pin directory of `iface`, locked for this controller, and whether it
/// holds a dataplane to adopt (see `pins::prepare`).
fn pin_directory(pin_root: &Path, iface: &str, ephemeral: bool) -> Result<(PathBuf, bool)> {
    Ok(crate::pins::prepare(pin_root, iface, ephemeral)?.locked_for_life())
}

/// Opens (or adopts) the pinned maps and loads the programs; the CONFIG and
/// TX-port maps follow the interfaces; what a previous controller wrote is
/// read back. Also returns the CONFIG entry it wrote, whose flow hash seed
/// is the configured one, else the running dataplane's (random for a new
/// one; see `hash_seed`).
fn open_dataplane(
    config: &Config,
    pin_dir: &Path,
    adopting: bool,
    link: &Link,
    backend_link: Option<&Link>,
) -> Result<(Dataplane, Reconciler, Vec<AdoptedBackend>, lb_common::maps::LbConfig)> {
    let sizes = desired::map_sizes(config);
    let mut dp = Dataplane::open(sizes, Some(pin_dir))?;
    if adopting && dp.sizes() != sizes {
        warn!(
            interface = link.name,
            "keeping the map sizes of the running dataplane {:?} (restart with `xdplb detach` first to resize)",
            dp.sizes()
        );
    }
    let running_seed = if adopting { dp.config()?.hash_seed } else { crate::hash_seed::random()? };
    let (seed, source) = crate::hash_seed::choose(config, running_seed);
    log_seed(&link.name, seed, source, adopting.then_some(running_seed));
    let written = desired::lb_config(link, backend_link, config, seed);
    dp.set_config(&written)?;
    dp.set_tx_ports(link.index, backend_link.map_or(link.index, |b| b.index))?;
    if !adopting {
        let r = Reconciler::new(&dp);
        return Ok((dp, r, Vec::new(), written));
    }
    let (r, a) = Reconciler::adopt(&dp)?;
    info!(
        interface = link.name,
        "adopting the running dataplane: {} VIPs, {} backends, flows kept",
        r.vip_count(),
        a.len()
    );
    Ok((dp, r, a, written))
}

/// Says where the flow hash seed came from, and warns when there is none.
fn log_seed(iface: &str, seed: [u32; 2], source: crate::hash_seed::Source, adopted: Option<[u32; 2]>) {
    use crate::hash_seed::Source;
    match source {
        Source::HashSeedFile => info!(interface = iface, "flow hash seed from hash_seed_file"),
        Source::FlowSyncKey => info!(interface = iface, "flow hash seed derived from the flow_sync key"),
        Source::Dataplane if seed == [0, 0] => warn!(
            interface = iface,
            "the flow hash has no secret seed (kept from a dataplane of an older xdplb, so that no flow moves): \
             anyone can compute which flows share a server; set `hash_seed_file:` (the same file on every node) \
             and reload, or `flow_sync:`"
        ),
        Source::Dataplane => {
            info!(interface = iface, "flow hash seed: this dataplane's own (random, kept across restarts)")
        }
    }
    if adopted.is_some_and(|running| running != seed) {
        info!(
            interface = iface,
            "the flow hash seed changed from the running dataplane's: flows not in the connection table may change \
             backend"
        );
    }
}

impl Daemon {
    /// A restarted controller starts from what the dataplane was doing:
    /// known MACs and health, so nothing changes until checks say so.
    fn seed_from_adopted(&mut self, adopted: &[AdoptedBackend]) {
        for a in adopted {
            self.observed.next_hop_mac.insert(a.addr, a.value.mac);
        }
    }

    fn start_checks(&mut self, adopted: &[AdoptedBackend]) {
        let known: HashMap<health::Key, bool> = adopted
            .iter()
            .map(|a| {
                let key = health::Key {
                    vip: addr::from_words(&a.vip.addr, a.vip.family),
                    vip_port: u16::from_be(a.vip.port),
                    protocol: a.vip.protocol,
                    addr: a.addr,
                    port: a.port,
                };
                (key, a.value.state == BACKEND_ACTIVE || a.value.state == BACKEND_DRAINING)
            })
            .collect();
        self.checker.sync(desired::health_targets(&self.config), |t| {
            known
                .get(&t.key)
                .copied()
                .unwrap_or(t.check.initial_state == InitialState::Up || t.check.kind == CheckKind::None)
        });
        self.observed.healthy = health_view(&self.checker);
    }

    /// Waits until every checker has made its first rise/fall decision, at
    /// most about `interval × (max(rise, fall) + 1)` of the slowest check
    /// (capped), reads the next hops again, then applies what they decided.
    /// Logs what it waited for.
    async fn first_health_round(&mut self) {
        let limit = self
            .config
            .vips
            .iter()
            .filter(|v| v.health_check.kind != CheckKind::None && !v.backends.is_empty())
            .map(|v| {
                let c = &v.health_check;
                c.interval * (c.rise.max(c.fall) + 1) + c.timeout
            })
            .max()
            .unwrap_or_default()
            .min(FIRST_CHECKS_LIMIT);
        let started = Instant::now();
        let total = self.checker.table.lock().unwrap().len();
        info!("waiting up to {limit:?} for the first health checks of {total} backends before attaching");
        while self.checker.undecided() > 0 && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.observed.healthy = health_view(&self.checker);
        let up = self.observed.healthy.values().filter(|u| **u).count();
        let undecided = self.checker.undecided();
        let waited = started.elapsed().as_millis();
        if undecided == 0 {
            info!("first health checks decided in {waited} ms: {up} of {total} backends up");
        } else {
            warn!(
                "first health checks: {undecided} of {total} backends undecided after {waited} ms (limit {limit:?}); \
                 attaching with {up} up"
            );
        }
        // The next hops the first round solicited have answered meanwhile
        // (none was, when every backend has a MAC: no second round then).
        let unresolved =
            desired::addresses_to_resolve(&self.config).iter().any(|a| !self.observed.next_hop_mac.contains_key(a));
        if unresolved {
            self.first_resolution().await;
        }
        self.apply_logged("the first health checks");
    }

    /// A cold start stopped before attaching leaves nothing behind: the
    /// maps it pinned go (an adopted dataplane stays as it was).
    fn abandon(self, adopting: bool) {
        if !adopting {
            let pin_dir = self.pin_dir.clone();
            drop(self);
            crate::pins::remove_maps(&pin_dir);
        }
    }

    /// Attaches the balancer to the interface (and the backend side of
    /// two-armed NAT); how, for the status.
    fn attach(&mut self, mode: XdpModeSetting) -> Result<String> {
        let iface = self.link.name.clone();
        let attached = attach::attach(&mut self.dp, programs::BALANCER, &iface, mode, &self.pin_dir.join("link"))?;
        if let Some(b) = &self.backend_link {
            let pin = self.pin_dir.join("backend_link");
            match attach::attach(&mut self.dp, programs::BALANCER, &b.name, mode, &pin)? {
                Attached::New(m) => {
                    info!(interface = b.name, "XDP program attached in {m} mode (backend side, for NAT replies)")
                }
                Attached::Replaced => info!(interface = b.name, "XDP program replaced atomically (backend side)"),
            }
        }
        Ok(match attached {
            Attached::New(m) => {
                info!(interface = iface, "XDP program attached in {m} mode");
                m.to_string()
            }
            Attached::Replaced => {
                info!(interface = iface, "XDP program replaced atomically in the running link");
                "adopted".to_string()
            }
        })
    }

    /// The first status, the status page, and READY=1.
    fn announce(&mut self, mode_text: String, metrics: MetricsListener) {
        let iface = self.link.name.clone();
        {
            let mut s = self.status.lock().unwrap();
            s.pid = std::process::id();
            s.interface = iface.clone();
            s.config_file = self.opts.config.display().to_string();
            s.xdp_mode = mode_text;
            s.config_generation = 1;
        }
        if let Some((listen, listener)) = metrics {
            web::spawn(listener, self.status.clone());
            info!("serving the status page on http://{listen}/ and Prometheus metrics on http://{listen}/metrics");
        }
        self.publish_status();
        let backends: usize = self.config.vips.iter().map(|v| v.backends.len()).sum();
        info!(
            interface = iface,
            "serving {} VIPs, {backends} backends from {}",
            self.config.vips.len(),
            self.opts.config.display()
        );
        notify::ready(&format!("serving {} VIPs, {backends} backends on {iface}", self.config.vips.len()));
    }
}
