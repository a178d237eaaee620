//! `xdplb run`: load (or adopt) the dataplane, attach it, and keep it equal
//! to configuration + health + neighbours until stopped.
//!
//! Every change — a health transition, a next-hop MAC, a reload — goes
//! through the same path: `desired::vip_specs` computes what the maps should
//! hold and `Reconciler::apply` writes the difference.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::{
    maps::{BACKEND_ACTIVE, BACKEND_DRAINING, CFG_NAT, DEFAULT_MAGLEV_POOL, LbConfig, NAT_OPEN, PROTO_TCP, programs},
    reasons,
};
use tokio::{
    signal::unix::SignalKind,
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    addr,
    attach::{self, Attached},
    config::{self, CheckKind, Config, InitialState, XdpModeSetting},
    dataplane::{self, Dataplane, MapSizes},
    desired::{self, BackendRef, Observed, Override, Overrides},
    dns,
    health::{self, Checker, Target},
    neighbours::{Neighbours, Resolution},
    notify,
    reconcile::{AdoptedBackend, Forwarding, HashMode, Reconciler},
    runtime,
    status::{self, BackendStatus, Status, VipStatus},
    web,
};

mod control;

pub struct RunOptions {
    pub config: PathBuf,
    pub iface: Option<String>,
    pub xdp_mode: Option<XdpModeSetting>,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    pub detach_on_exit: bool,
}

/// Interface facts the dataplane needs.
pub struct Link {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

pub fn link(name: &str) -> Result<Link> {
    let c = std::ffi::CString::new(name).context("interface names have no NUL byte")?;
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

/// The CONFIG map entry for the interfaces and configuration.
pub fn lb_config(link: &Link, backend_link: Option<&Link>, config: &Config) -> LbConfig {
    let v4 = config.ipip_source_v4;
    let v4_mask: u32 = if v4.len == 0 { 0 } else { u32::MAX << (32 - v4.len) };
    let v4_base = addr::words(v4.addr)[0] & v4_mask.to_be();
    let v6 = config.ipip_source_v6;
    let host_bits = 128 - v6.len as u32;
    let v6_last_mask: u32 = if host_bits >= 32 { u32::MAX } else { (1u32 << host_bits) - 1 };
    let mut v6_base = addr::words(v6.addr);
    v6_base[3] &= (!v6_last_mask).to_be();
    let uses_nat = config.vips.iter().any(|v| v.forwarding == Forwarding::Nat);
    let back = backend_link.unwrap_or(link);
    LbConfig {
        if_mac: link.mac,
        flags: if uses_nat { CFG_NAT } else { 0 },
        backend_if_mac: back.mac,
        _pad: [0; 2],
        client_ifindex: link.index,
        backend_ifindex: back.index,
        mtu: link.mtu,
        ipip_src_v4: v4_base,
        ipip_src_v4_host_mask: (!v4_mask).to_be(),
        ipip_src_v6: v6_base,
        ipip_src_v6_host_mask: v6_last_mask.to_be(),
    }
}

/// Pool slots for a configuration: every table twice (the live one and its
/// replacement during a swap), and never less than the default.
fn pool_size(config: &Config) -> u32 {
    let tables: u64 = config.vips.iter().map(|v| v.table_size as u64).sum();
    (2 * tables + 2 * 65_537).clamp(DEFAULT_MAGLEV_POOL as u64, u32::MAX as u64 / 2) as u32
}

/// Map capacities for a configuration, with room to grow by reloads.
fn map_sizes(config: &Config) -> MapSizes {
    let d = MapSizes::default();
    // A name may stand for several servers: room for 16 each before a restart.
    let backends: usize = config.vips.iter().map(|v| v.backends.len() + 16 * v.named_backends.len() + 1).sum();
    MapSizes {
        max_vips: d.max_vips.max((config.vips.len() * 2).next_power_of_two() as u32),
        max_backends: d.max_backends.max((backends * 2).next_power_of_two() as u32),
        conntrack: config.conntrack_size,
        maglev_pool: pool_size(config),
        nat_table: config.nat.table_size,
    }
}

fn health_targets(config: &Config) -> Vec<Target> {
    config
        .vips
        .iter()
        .flat_map(|v| {
            v.backends.iter().map(move |b| Target {
                backend: BackendRef::of(v, b.address, b.port),
                addr: b.address,
                port: v.health_check.port.or(b.port).unwrap_or(v.port),
                vip: v.address,
                check: v.health_check.clone(),
            })
        })
        .collect()
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct Daemon {
    opts: RunOptions,
    link: Link,
    backend_link: Option<Link>,
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
    /// The last file content seen, applied or not, so a rejected file is reported once.
    seen_text: String,
    dp: Dataplane,
    reconciler: Reconciler,
    checker: Checker,
    neighbours: Neighbours,
    observed: Observed,
    resolution: HashMap<IpAddr, Resolution>,
    status: Arc<Mutex<Status>>,
    previous: HashMap<(String, String, u16), (u64, u64)>,
    previous_at: Instant,
    flows_by_backend: HashMap<u32, u64>,
    ticks: u64,
    publish_cost: Duration,
    /// Runtime overrides (`xdplb set weight|drain|maint`), on top of the file.
    overrides: Overrides,
    /// Each backend's state as last published, since when (unix ms), and
    /// the tick it was last published at (backends gone are forgotten).
    state_since: HashMap<BackendRef, (String, u64, u64)>,
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

pub async fn run(opts: RunOptions) -> Result<()> {
    let started = Instant::now();
    let file_config = config::load(&opts.config)
        .map_err(|e| anyhow!("{e}\n{}: {} error(s); nothing was started", opts.config.display(), e.0.len()))?;
    // Backend names are resolved before anything is loaded, so the first
    // apply already has their servers (bounded: a DNS outage delays start-up
    // by at most the resolver's time limit, and then they come when DNS answers).
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
    let config = desired::expand_names(&file_config, &names.states);
    let config_text = std::fs::read_to_string(&opts.config)?;
    let iface = opts
        .iface
        .clone()
        .or_else(|| config.interface.clone())
        .context("no interface: set `interface:` in the configuration or pass --iface")?;
    let link = link(&iface)?;
    // Before anything is loaded: a second controller for this interface stops here.
    let (api, mut requests) = runtime::Server::start(&opts.state_dir, &iface)?;
    let backend_link = match &config.backend_interface {
        Some(b) if *b != iface => Some(self::link(b).with_context(|| format!("backend_interface {b}"))?),
        _ => None,
    };
    let mode = opts.xdp_mode.unwrap_or(config.xdp_mode);
    // What `xdplb doctor` would say about this host, before anything is attached.
    crate::doctor::warn_at_start(&config, &opts.config, &iface, mode, &opts.pin_root).await;
    attach::ensure_bpffs(&opts.pin_root)?;
    let pin_dir = opts.pin_root.join(&iface);
    std::fs::create_dir_all(&pin_dir).with_context(|| format!("creating {} failed", pin_dir.display()))?;
    let adopting = dataplane::has_pinned_state(&pin_dir);
    let sizes = map_sizes(&config);
    let mut dp = Dataplane::open(sizes, Some(&pin_dir))?;
    if adopting && dp.sizes() != sizes {
        warn!(
            interface = iface,
            "keeping the map sizes of the running dataplane {:?} (restart with `xdplb detach` first to resize)",
            dp.sizes()
        );
    }
    dp.set_config(&lb_config(&link, backend_link.as_ref(), &config))?;
    dp.set_tx_ports(link.index, backend_link.as_ref().map_or(link.index, |b| b.index))?;
    let (reconciler, adopted) = if adopting {
        let (r, a) = Reconciler::adopt(&dp)?;
        info!(
            interface = iface,
            "adopting the running dataplane: {} VIPs, {} backends, flows kept",
            r.vip_count(),
            a.len()
        );
        (r, a)
    } else {
        (Reconciler::new(&dp), Vec::new())
    };

    let (tx, mut transitions) = mpsc::unbounded_channel();
    let mut ifaces = vec![(link.index, iface.clone())];
    if let Some(b) = &backend_link {
        ifaces.push((b.index, b.name.clone()));
    }
    let neighbours = Neighbours::new(ifaces)?;
    let interfaces = Some((link.index, backend_link.as_ref().map_or(link.index, |b| b.index)));
    let mut d = Daemon {
        link,
        seen_text: config_text.clone(),
        config_text,
        dp,
        reconciler,
        checker: Checker::new(tx),
        neighbours,
        observed: Observed { interfaces, ..Observed::default() },
        backend_link,
        nat_evicted: (0, 0),
        resolution: HashMap::new(),
        status: Arc::new(Mutex::new(Status::default())),
        previous: HashMap::new(),
        previous_at: Instant::now(),
        flows_by_backend: HashMap::new(),
        ticks: 0,
        publish_cost: Duration::ZERO,
        overrides: Overrides::new(),
        state_since: HashMap::new(),
        file_config,
        config,
        names,
        dns: dns_task,
        opts,
    };
    d.seed_from_adopted(&adopted);
    d.start_checks(&adopted);
    d.refresh_neighbours().await;
    d.load_overrides();
    d.apply().context("filling the maps failed")?;

    // Maps are full before the program sees a packet.
    let attached = attach::attach(&mut d.dp, programs::BALANCER, &iface, mode, &pin_dir.join("link"))?;
    if let Some(b) = &d.backend_link {
        let pin = pin_dir.join("backend_link");
        match attach::attach(&mut d.dp, programs::BALANCER, &b.name, mode, &pin)? {
            Attached::New(m) => {
                info!(interface = b.name, "XDP program attached in {m} mode (backend side, for NAT replies)")
            }
            Attached::Replaced => info!(interface = b.name, "XDP program replaced atomically (backend side)"),
        }
    }
    let mode_text = match attached {
        Attached::New(m) => {
            info!(interface = iface, "XDP program attached in {m} mode");
            m.to_string()
        }
        Attached::Replaced => {
            info!(interface = iface, "XDP program replaced atomically in the running link");
            "adopted".to_string()
        }
    };
    {
        let mut s = d.status.lock().unwrap();
        s.pid = std::process::id();
        s.interface = iface.clone();
        s.config_file = d.opts.config.display().to_string();
        s.xdp_mode = mode_text;
        s.config_generation = 1;
    }
    if let Some(listen) = d.config.metrics_listen {
        web::serve(listen, d.status.clone()).await?;
        info!("serving the status page on http://{listen}/ and Prometheus metrics on http://{listen}/metrics");
    }
    d.publish_status();
    let backends: usize = d.config.vips.iter().map(|v| v.backends.len()).sum();
    info!(
        interface = iface,
        "serving {} VIPs, {backends} backends from {} (ready in {} ms)",
        d.config.vips.len(),
        d.opts.config.display(),
        started.elapsed().as_millis()
    );

    let mut hup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    // Only now: a SIGHUP (`systemctl reload`) before the handler exists would kill us.
    notify::ready(&format!("serving {} VIPs, {backends} backends on {iface}", d.config.vips.len()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(t) = transitions.recv() => {
                // One apply for every transition already queued.
                let mut batch = vec![t];
                while let Ok(more) = transitions.try_recv() {
                    batch.push(more);
                }
                d.on_transitions(batch);
            }
            Some(answers) = next_answers(&mut d.dns) => d.on_dns(answers),
            _ = hup.recv() => d.reload("SIGHUP"),
            Some(call) = requests.recv() => d.on_request(call),
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => d.on_tick().await,
        }
    }
    let stopped = d.shutdown(&pin_dir);
    drop(api);
    stopped
}

impl Daemon {
    fn vip_name(&self, key: &lb_common::maps::VipKey) -> Option<String> {
        let a = addr::from_words(&key.addr, key.family);
        self.config
            .vips
            .iter()
            .find(|v| v.address == a && v.port == u16::from_be(key.port) && v.protocol.number() == key.protocol)
            .map(|v| v.name.clone())
    }

    /// A restarted controller starts from what the dataplane was doing:
    /// known MACs and health, so nothing changes until checks say so.
    fn seed_from_adopted(&mut self, adopted: &[AdoptedBackend]) {
        for a in adopted {
            self.observed.next_hop_mac.insert(a.addr, a.value.mac);
        }
    }

    fn start_checks(&mut self, adopted: &[AdoptedBackend]) {
        let mut known: HashMap<BackendRef, bool> = HashMap::new();
        for a in adopted {
            if let Some(vip) = self.vip_name(&a.vip) {
                let up = a.value.state == BACKEND_ACTIVE || a.value.state == BACKEND_DRAINING;
                known.insert(BackendRef { vip, addr: a.addr, port: a.port }, up);
            }
        }
        self.checker.sync(health_targets(&self.config), |t| {
            known
                .get(&t.backend)
                .copied()
                .unwrap_or(t.check.initial_state == InitialState::Up || t.check.kind == CheckKind::None)
        });
        self.sync_health();
    }

    fn sync_health(&mut self) {
        let table = self.checker.table.lock().unwrap();
        self.observed.healthy = table.iter().map(|(b, h)| (b.clone(), h.up)).collect();
    }

    fn apply(&mut self) -> Result<()> {
        let specs = desired::vip_specs(&self.config, &self.overrides, &self.observed);
        self.reconciler.apply(&mut self.dp, &specs)?;
        Ok(())
    }

    fn apply_logged(&mut self, why: &str) {
        if let Err(e) = self.apply() {
            error!("updating the dataplane after {why} failed: {e:#}");
        }
    }

    fn on_transitions(&mut self, batch: Vec<health::Transition>) {
        for t in batch {
            let b = &t.backend;
            if t.up {
                info!(vip = b.vip, backend = %b.addr, "backend UP: {}", t.reason);
            } else {
                warn!(vip = b.vip, backend = %b.addr, "backend DOWN: {}", t.reason);
            }
            self.observed.healthy.insert(t.backend.clone(), t.up);
        }
        self.apply_logged("a health change");
    }

    async fn refresh_neighbours(&mut self) -> bool {
        let addrs = desired::addresses_to_resolve(&self.config);
        let resolved = match self.neighbours.resolve(&addrs).await {
            Ok(r) => r,
            Err(e) => {
                // Keep what we knew: a netlink hiccup must not take backends down.
                warn!("reading routes and neighbours failed, keeping the last known next hops: {e:#}");
                return false;
            }
        };
        let mut changed = false;
        for (addr, r) in &resolved {
            let before = self.observed.next_hop_mac.get(addr).copied();
            if let Resolution::Resolved { ifindex, .. } = r {
                self.observed.next_hop_ifindex.insert(*addr, *ifindex);
            }
            let now = match r {
                Resolution::Resolved { mac, .. } => Some(*mac),
                // Waiting on a solicitation: keep a MAC we already had.
                Resolution::Unresolved(why) if why.starts_with("waiting") => before,
                Resolution::Unresolved(_) => None,
            };
            if before != now {
                changed = true;
                match (before, now, r) {
                    (_, Some(mac), Resolution::Resolved { next_hop, .. }) => {
                        info!(backend = %addr, "next hop {next_hop} is at {}", fmt_mac(&mac))
                    }
                    (Some(_), None, Resolution::Unresolved(why)) => warn!(backend = %addr, "backend not used: {why}"),
                    _ => {}
                }
                match now {
                    Some(m) => self.observed.next_hop_mac.insert(*addr, m),
                    None => self.observed.next_hop_mac.remove(addr),
                };
            }
        }
        self.observed.next_hop_mac.retain(|a, _| addrs.contains(a));
        self.resolution = resolved;
        changed
    }

    async fn on_tick(&mut self) {
        self.ticks += 1;
        match std::fs::read_to_string(&self.opts.config) {
            Ok(text) if text != self.seen_text => {
                self.seen_text = text;
                self.reload("the file changed");
            }
            _ => {}
        }
        if self.refresh_neighbours().await {
            self.apply_logged("a next-hop change");
        }
        if self.ticks.is_multiple_of(2) && self.config.vips.iter().any(|v| v.forwarding == Forwarding::Nat) {
            self.collect_nat();
        }
        // A killed `xdplb trace` leaves the traced program in the link.
        crate::trace::switch_off_abandoned(&mut self.dp, &self.opts.pin_root.join(&self.link.name));
        // With very many backends a status costs real time: keep it under 10%.
        if self.previous_at.elapsed() >= self.publish_cost * 10 {
            let started = Instant::now();
            self.publish_status();
            self.publish_cost = started.elapsed();
        }
    }

    /// Forgets NAT connections that closed (FIN/RST) or went idle, both
    /// directions' entries; also reply entries left behind by a re-steered flow.
    fn collect_nat(&mut self) {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let nat = self.config.nat.clone();
        let replies: HashMap<lb_common::maps::FlowKey, lb_common::maps::NatReply> =
            self.dp.nat_replies().into_iter().collect();
        let mut live_replies = std::collections::HashSet::new();
        for (key, flow) in self.dp.nat_flows() {
            let Ok(b) = self.dp.backend(flow.backend_id) else { continue };
            if b.generation != flow.generation {
                // Its backend slot went to another server: the connection is dead.
                self.dp.remove_nat_flow(&key);
                self.nat_evicted.0 += 1;
                continue;
            }
            let reply_key = lb_common::maps::FlowKey {
                src: b.addr,
                dst: key.src,
                sport: if b.port != 0 { b.port } else { key.dport },
                dport: key.sport,
                protocol: key.protocol,
                family: key.family,
                _pad: [0; 2],
            };
            let reply = replies.get(&reply_key);
            let last = flow.last_seen_ns.max(reply.map_or(0, |r| r.last_seen_ns));
            let closed = flow.state != NAT_OPEN || reply.is_some_and(|r| r.state != NAT_OPEN);
            let timeout = if closed {
                nat.closed_timeout
            } else if key.protocol == PROTO_TCP {
                nat.tcp_timeout
            } else {
                nat.udp_timeout
            };
            if now.saturating_sub(last) > timeout.as_nanos() as u64 {
                self.dp.remove_nat_flow(&key);
                self.dp.remove_nat_reply(&reply_key);
                if closed {
                    self.nat_evicted.1 += 1;
                } else {
                    self.nat_evicted.0 += 1;
                }
            } else {
                live_replies.insert(reply_key);
            }
        }
        let longest = nat.tcp_timeout.max(nat.udp_timeout).as_nanos() as u64;
        for (key, r) in replies {
            if !live_replies.contains(&key)
                && now.saturating_sub(r.last_seen_ns) > longest.min(nat.closed_timeout.as_nanos() as u64 * 6)
            {
                self.dp.remove_nat_reply(&key);
            }
        }
    }

    /// A reload as systemd sees it: RELOADING=1, then READY=1 once the file
    /// is applied or rejected (`systemctl reload` waits for that).
    fn reload(&mut self, why: &str) {
        notify::reloading();
        self.reload_config(why);
        let s = self.status.lock().unwrap();
        // At once, not at the next tick: `xdplb reload` waits for this verdict.
        if let Err(e) = status::write(&self.opts.state_dir, &s) {
            warn!("cannot write the status file: {e:#}");
        }
        let rejected = if s.last_reload_errors.is_empty() { "" } else { "; the last reload was rejected" };
        notify::ready(&format!(
            "serving {} VIPs, configuration generation {}{rejected}",
            self.config.vips.len(),
            s.config_generation
        ));
    }

    fn reload_config(&mut self, why: &str) {
        let started = Instant::now();
        // A SIGHUP reload must not be followed by a second one for the same file change.
        if let Ok(text) = std::fs::read_to_string(&self.opts.config) {
            self.seen_text = text;
        }
        let path = self.opts.config.display().to_string();
        let generation = self.status.lock().unwrap().config_generation;
        let parsed = match config::load(&self.opts.config) {
            Ok(c) => c,
            Err(errs) => {
                for e in &errs.0 {
                    error!("{e}");
                }
                error!(
                    "reload ({why}) rejected: {} error(s) in {path}; still running generation {generation}",
                    errs.0.len()
                );
                self.reject(errs.0.iter().map(ToString::to_string).collect());
                return;
            }
        };
        if parsed.interface.as_deref().is_some_and(|i| i != self.link.name) && self.opts.iface.is_none() {
            let msg = format!("{path}: interface: changing the interface needs a restart of xdplb");
            error!("reload ({why}) rejected: {msg}; still running generation {generation}");
            self.reject(vec![msg]);
            return;
        }
        if parsed.backend_interface != self.config.backend_interface {
            let msg = format!("{path}: backend_interface: changing the backend interface needs a restart of xdplb");
            error!("reload ({why}) rejected: {msg}; still running generation {generation}");
            self.reject(vec![msg]);
            return;
        }
        if let Err(e) = self.follow_names(&parsed) {
            let msg = format!("{path}: resolvers: {e:#}");
            error!("reload ({why}) rejected: {msg}; still running generation {generation}");
            self.reject(vec![msg]);
            return;
        }
        let new = desired::expand_names(&parsed, &self.names.states);
        // The health of every backend now, to restore if the new file cannot be applied.
        let health_before: HashMap<BackendRef, bool> =
            self.checker.table.lock().unwrap().iter().map(|(b, h)| (b.clone(), h.up)).collect();
        let old = std::mem::replace(&mut self.config, new);
        self.checker.sync(health_targets(&self.config), |t| {
            t.check.initial_state == InitialState::Up || t.check.kind == CheckKind::None
        });
        self.sync_health();
        if let Err(e) = self.apply() {
            error!("reload ({why}) could not be applied: {e:#}; going back to generation {generation}");
            self.config = old;
            let file_config = self.file_config.clone();
            if let Err(e) = self.follow_names(&file_config) {
                error!("restoring the previous backend names failed: {e:#}");
            }
            self.checker
                .sync(health_targets(&self.config), |t| health_before.get(&t.backend).copied().unwrap_or(false));
            self.sync_health();
            self.apply_logged("restoring the previous configuration");
            self.reject(vec![format!("{path}: {e:#}")]);
            return;
        }
        // NAT on or off, IP-in-IP sources: the CONFIG map follows the file.
        if let Err(e) = self.dp.set_config(&lb_config(&self.link, self.backend_link.as_ref(), &self.config)) {
            error!("reload ({why}): updating the CONFIG map failed: {e:#}");
        }
        self.config_text = self.seen_text.clone();
        let mut changes = desired::describe_changes(&self.file_config, &parsed);
        for c in &changes {
            info!("reload ({why}): {c}");
        }
        self.file_config = parsed;
        // Overrides of backends that left the file go with them.
        changes.extend(self.prune_overrides());
        let mut s = self.status.lock().unwrap();
        s.config_generation += 1;
        s.reloads_ok += 1;
        s.last_reload_errors.clear();
        s.last_reload_changes = if changes.is_empty() { vec!["nothing changed".into()] } else { changes };
        info!(
            "reload ({why}) applied: generation {}, {} VIPs, in {} ms",
            s.config_generation,
            self.config.vips.len(),
            started.elapsed().as_millis()
        );
    }

    /// Resolves the backend names of `config` from now on: starts, restarts
    /// (other resolver settings) or stops the resolving task, and forgets
    /// names that are gone.
    fn follow_names(&mut self, config: &Config) -> Result<()> {
        let wanted = dns::names_of(config);
        self.names.retain(&wanted);
        if wanted.is_empty() {
            self.dns = None;
            return Ok(());
        }
        match &self.dns {
            Some(t) if t.settings == config.resolvers => {
                t.names.send_if_modified(|names| {
                    let changed = *names != wanted;
                    *names = wanted;
                    changed
                });
            }
            _ => self.dns = Some(DnsTask::start(&config.resolvers, wanted)?),
        }
        Ok(())
    }

    /// A round of DNS answers: log what failed or recovered, and apply the
    /// backends the names stand for now.
    fn on_dns(&mut self, answers: Vec<dns::Answer>) {
        let changes = self.names.update(answers, Instant::now(), self.file_config.resolvers.hold_obsolete);
        for (name, e) in &changes.failed {
            let kept = self.names.states.get(name).map_or(0, |s| s.current.len());
            warn!(name, "cannot resolve backend name: {e}; keeping its last known {kept} addresses");
        }
        for name in &changes.recovered {
            info!(name, "backend name resolves again");
        }
        if !changes.backends {
            return;
        }
        let new = desired::expand_names(&self.file_config, &self.names.states);
        if new == self.config {
            return;
        }
        for (name, s) in &self.names.states {
            let list =
                |set: &mut dyn Iterator<Item = &IpAddr>| set.map(ToString::to_string).collect::<Vec<_>>().join(", ");
            info!(
                name,
                "backend name resolves to [{}]; draining [{}]",
                list(&mut s.current.iter()),
                list(&mut s.obsolete.keys())
            );
        }
        self.config = new;
        // New addresses start as the check's initial state says (down: not
        // before `rise` checks pass), so a server that just appeared in DNS
        // gets no traffic before it is known to work.
        self.checker.sync(health_targets(&self.config), |t| {
            t.check.initial_state == InitialState::Up || t.check.kind == CheckKind::None
        });
        self.sync_health();
        self.prune_overrides();
        self.apply_logged("a change of backend names in DNS");
    }

    fn reject(&mut self, errors: Vec<String>) {
        let mut s = self.status.lock().unwrap();
        s.reloads_failed += 1;
        s.last_reload_errors = errors;
    }

    fn publish_status(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.previous_at).as_secs_f64().max(0.001);
        self.previous_at = now;
        // Walking the connection table costs a syscall per flow: every 5 s.
        if self.ticks % 5 == 1 {
            self.flows_by_backend.clear();
            for (_, v) in self.dp.flows().into_iter().take(4_000_000) {
                *self.flows_by_backend.entry(v.backend_id).or_default() += 1;
            }
        }
        let mut vips = Vec::new();
        for v in &self.config.vips {
            let spec_key = desired::vip_key(v);
            let Some(meta) = self.reconciler.vip_meta(&spec_key) else { continue };
            let vc = self.dp.vip_counter(meta.vip_id).unwrap_or_default();
            let mut rate = |k: (String, String, u16), packets: u64, bytes: u64| -> (f64, f64) {
                let (pp, pb) = self.previous.insert(k, (packets, bytes)).unwrap_or((packets, bytes));
                (packets.saturating_sub(pp) as f64 / dt, bytes.saturating_sub(pb) as f64 * 8.0 / dt)
            };
            let (pps, bps) = rate((v.name.clone(), String::new(), 0), vc.packets, vc.bytes);
            let mut backends = Vec::new();
            let mut listed: Vec<(IpAddr, u16, u32, bool)> =
                v.backends.iter().map(|b| (b.address, b.port.unwrap_or(0), b.weight, false)).collect();
            if let config::OnAllDown::SorryServer { address, port } = v.on_all_down {
                listed.push((address, port.unwrap_or(0), 1, true));
            }
            for (address, port, weight, sorry) in listed {
                let id = self.reconciler.backend_id(&spec_key, address, port);
                if sorry && id.is_none() {
                    continue;
                }
                let bref = BackendRef { vip: v.name.clone(), addr: address, port };
                let set = if sorry { None } else { self.overrides.get(&bref).copied() };
                let health = self.checker.table.lock().unwrap().get(&bref).cloned();
                let value = id.and_then(|i| self.dp.backend(i).ok());
                let c = id.and_then(|i| self.dp.backend_counter(i).ok()).unwrap_or_default();
                let (bpps, bbps) = rate((v.name.clone(), address.to_string(), port), c.packets, c.bytes);
                let mac = self.observed.next_hop_mac.get(&address);
                let state = match (sorry, value.map(|b| b.state), mac) {
                    (true, _, _) => "sorry",
                    _ if set == Some(Override::Maint) => "maint",
                    (_, _, None) => "unresolved",
                    (_, Some(BACKEND_ACTIVE), _) => "active",
                    (_, Some(BACKEND_DRAINING), _) => "draining",
                    _ => "down",
                };
                let last_check = match (&health, self.resolution.get(&address)) {
                    (_, Some(Resolution::Unresolved(why))) if mac.is_none() => why.clone(),
                    (Some(h), _) => h.last_result.clone(),
                    (None, _) => String::new(),
                };
                backends.push(BackendStatus {
                    address: address.to_string(),
                    port,
                    weight: set.map_or(weight, |o| o.weight(weight)),
                    health: if sorry || health.as_ref().is_some_and(|h| h.up) { "up".into() } else { "down".into() },
                    state: state.into(),
                    last_check,
                    transitions: health.as_ref().map_or(0, |h| h.transitions),
                    next_hop_mac: mac.map(fmt_mac).unwrap_or_default(),
                    packets: c.packets,
                    bytes: c.bytes,
                    packets_per_second: bpps,
                    bits_per_second: bbps,
                    flows: id.and_then(|i| self.flows_by_backend.get(&i)).copied().unwrap_or(0),
                    configured_weight: weight,
                    r#override: set.map(|o| o.describe(weight)).unwrap_or_default(),
                    state_since_unix_ms: state_since(&mut self.state_since, bref, state, self.ticks),
                });
            }
            vips.push(VipStatus {
                name: v.name.clone(),
                address: v.address.to_string(),
                port: v.port,
                protocol: v.protocol.name().into(),
                forwarding: v.forwarding.name().into(),
                packets: vc.packets,
                bytes: vc.bytes,
                packets_per_second: pps,
                bits_per_second: bps,
                backends,
                scheduler: match v.hash {
                    HashMode::FiveTuple => "maglev five-tuple",
                    HashMode::SourceIp => "maglev source-ip",
                }
                .into(),
            });
        }
        let tick = self.ticks;
        self.state_since.retain(|_, (_, _, seen)| *seen == tick);
        let reason_counts = self.dp.reasons().unwrap_or([0; reasons::COUNT as usize]);
        let nat_connections = if self.config.vips.iter().any(|v| v.forwarding == Forwarding::Nat) {
            self.dp.nat_flows().len() as u64
        } else {
            0
        };
        let snapshot = {
            let mut s = self.status.lock().unwrap();
            s.updated_unix_ms = unix_ms();
            s.vips = vips;
            s.flows_tracked = self.flows_by_backend.values().sum();
            s.reasons = reasons::NAMES.iter().zip(reason_counts).map(|(n, c)| (n.to_string(), c)).collect();
            s.nat_connections = nat_connections;
            s.nat_evicted_idle = self.nat_evicted.0;
            s.nat_evicted_closed = self.nat_evicted.1;
            s.dns = self
                .names
                .states
                .iter()
                .map(|(name, n)| status::DnsStatus {
                    name: name.clone(),
                    addresses: n.current.iter().map(ToString::to_string).collect(),
                    draining: n.obsolete.keys().map(ToString::to_string).collect(),
                    last_error: n.last_error.clone().unwrap_or_default(),
                    resolved_unix_ms: n
                        .resolved_at
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as u64),
                    failures: n.failures,
                })
                .collect();
            s.clone()
        };
        if let Err(e) = status::write(&self.opts.state_dir, &snapshot) {
            warn!("cannot write the status file: {e:#}");
        }
    }

    fn shutdown(self, pin_dir: &std::path::Path) -> Result<()> {
        notify::stopping();
        let iface = self.link.name.clone();
        std::fs::remove_file(status::path(&self.opts.state_dir, &iface)).ok();
        if self.opts.detach_on_exit {
            drop(self.dp);
            attach::detach(&pin_dir.join("link"))?;
            attach::detach(&pin_dir.join("backend_link"))?;
            remove_pins(pin_dir);
            info!(interface = iface, "stopped; XDP program detached and pinned maps removed");
        } else {
            info!(
                interface = iface,
                "stopped; the dataplane keeps forwarding with the last state (`xdplb run` adopts it, `xdplb detach --iface {iface}` removes it)"
            );
        }
        Ok(())
    }
}

/// Removes the pinned maps of a dataplane (not its links).
pub fn remove_pins(pin_dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(pin_dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            if !name.to_string_lossy().ends_with("link") {
                std::fs::remove_file(e.path()).ok();
            }
        }
    }
    std::fs::remove_dir(pin_dir).ok();
}

/// When `backend` entered `state`: now if its state changed since the last
/// status (or it is new), else when it did. Marks it seen at `tick`.
fn state_since(seen: &mut HashMap<BackendRef, (String, u64, u64)>, backend: BackendRef, state: &str, tick: u64) -> u64 {
    let entry = seen.entry(backend).or_insert_with(|| (state.to_string(), unix_ms(), tick));
    if entry.0 != state {
        *entry = (state.to_string(), unix_ms(), tick);
    }
    entry.2 = tick;
    entry.1
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
