//! Configuration + what the controller observes (health, next-hop MACs) →
//! the VIPs the dataplane should have. A pure function: the daemon calls it
//! after every change and hands the result to the reconciler.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use lb_common::maps::{CFG_NAT, DEFAULT_MAGLEV_POOL, LbConfig};

use crate::{
    addr,
    config::{BackendConfig, Config, OnAllDown, VipConfig},
    dataplane::MapSizes,
    dns::NameState,
    health,
    neighbours::Via,
    reconcile::{BackendSpec, Forwarding, VipSpec},
};

/// A backend as the health checker and status know it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendRef {
    pub vip: String,
    pub addr: IpAddr,
    /// 0 when the backend has no port of its own.
    pub port: u16,
}

impl BackendRef {
    pub fn of(vip: &VipConfig, addr: IpAddr, port: Option<u16>) -> Self {
        Self { vip: vip.name.clone(), addr, port: port.unwrap_or(0) }
    }
}

/// A backend's runtime override, set with `xdplb set weight|drain|maint`
/// and kept (across reloads and restarts) until `xdplb ready|clear`. One per
/// backend: the last command replaces the one before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Override {
    /// This weight instead of the file's (0 drains).
    Weight(u32),
    /// Weight 0: established flows continue, new ones go elsewhere.
    Drain,
    /// No traffic at all, as if down (its flows are re-steered), while its
    /// health checks go on.
    Maint,
}

impl Override {
    /// The weight the backend gets instead of `file`'s. A backend in
    /// maintenance keeps its weight: it is out by its state, not its weight.
    pub fn weight(self, file: u32) -> u32 {
        match self {
            Override::Weight(w) => w,
            Override::Drain => 0,
            Override::Maint => file,
        }
    }

    /// As `status` and `show` name it: `weight 5 (file: 1)`, `drain`, `maint`.
    pub fn describe(self, file_weight: u32) -> String {
        match self {
            Override::Weight(w) => format!("weight {w} (file: {file_weight})"),
            Override::Drain => "drain".into(),
            Override::Maint => "maint".into(),
        }
    }
}

/// Every override in force, by VIP name and backend address and port.
pub type Overrides = BTreeMap<BackendRef, Override>;

/// A backend as operators write it: the address, or `address:port`
/// (`[v6]:port`) for a backend with a port of its own.
pub fn fmt_backend(addr: IpAddr, port: u16) -> String {
    match (port, addr) {
        (0, a) => a.to_string(),
        (p, IpAddr::V6(a)) => format!("[{a}]:{p}"),
        (p, a) => format!("{a}:{p}"),
    }
}

/// The backend of VIP `vip` that `backend` names (an address, or
/// `address:port`), or an error that says what was not found and what exists.
pub fn find_backend(config: &Config, vip: &str, backend: &str) -> Result<BackendRef, String> {
    let Some(v) = config.vips.iter().find(|v| v.name == vip) else {
        let names: Vec<&str> = config.vips.iter().map(|v| v.name.as_str()).collect();
        return Err(format!("no VIP named {vip:?}; the VIPs are: {}", names.join(", ")));
    };
    let (addr, port) = match (backend.parse::<IpAddr>(), backend.parse::<std::net::SocketAddr>()) {
        (Ok(a), _) => (a, None),
        (_, Ok(s)) => (s.ip(), Some(s.port())),
        _ => match backend.strip_prefix('[').and_then(|b| b.strip_suffix(']')).map(str::parse::<IpAddr>) {
            Some(Ok(a)) => (a, None),
            _ => return Err(format!("{backend:?} is not a backend address (ADDRESS, or ADDRESS:PORT for nat)")),
        },
    };
    // A backend without a port of its own also answers to the VIP's port.
    let matches: Vec<&BackendConfig> =
        v.backends.iter().filter(|b| b.address == addr && port.is_none_or(|p| b.port.unwrap_or(v.port) == p)).collect();
    match matches[..] {
        [b] => Ok(BackendRef::of(v, b.address, b.port)),
        [] => {
            let all: Vec<String> = v.backends.iter().map(|b| fmt_backend(b.address, b.port.unwrap_or(0))).collect();
            Err(format!("VIP {} has no backend {backend}; its backends are: {}", v.name, all.join(", ")))
        }
        _ => {
            let all: Vec<String> = matches.iter().map(|b| fmt_backend(b.address, b.port.unwrap_or(0))).collect();
            Err(format!(
                "VIP {} has several backends at {addr}: {}; name one with ADDRESS:PORT",
                v.name,
                all.join(", ")
            ))
        }
    }
}

/// The file's weight of a backend (0 when it is not in `config`).
fn file_weight(config: &Config, b: &BackendRef) -> u32 {
    config
        .vips
        .iter()
        .filter(|v| v.name == b.vip)
        .flat_map(|v| &v.backends)
        .find(|c| c.address == b.addr && c.port.unwrap_or(0) == b.port)
        .map_or(0, |c| c.weight)
}

/// `VIP BACKEND`, as the runtime commands print it.
fn fmt_ref(b: &BackendRef) -> String {
    format!("{} {}", b.vip, fmt_backend(b.addr, b.port))
}

/// Sets `set` on the backend `backend` of VIP `vip`; what is in force now,
/// one line, or what was not found.
pub fn set_override(
    config: &Config,
    overrides: &mut Overrides,
    vip: &str,
    backend: &str,
    set: Override,
) -> Result<String, String> {
    let b = find_backend(config, vip, backend)?;
    let file = file_weight(config, &b);
    let line = match set {
        Override::Weight(_) => format!("{}: {}", fmt_ref(&b), set.describe(file)),
        _ => format!("{}: {} (file: weight {file})", fmt_ref(&b), set.describe(file)),
    };
    overrides.insert(b, set);
    Ok(line)
}

/// `ready`: the backend goes back to what the file says.
pub fn clear_override(config: &Config, overrides: &mut Overrides, vip: &str, backend: &str) -> Result<String, String> {
    let b = find_backend(config, vip, backend)?;
    let file = file_weight(config, &b);
    let was = match overrides.remove(&b) {
        Some(o) => format!("override {} cleared", o.describe(file)),
        None => "it had no override".into(),
    };
    Ok(format!("{}: ready, weight {file} as in the file ({was})", fmt_ref(&b)))
}

/// `clear --all` (`vip` None) or `clear VIP`: removes those overrides; one
/// line each, or one saying there were none.
pub fn clear_overrides(config: &Config, overrides: &mut Overrides, vip: Option<&str>) -> Result<Vec<String>, String> {
    if let Some(name) = vip
        && !config.vips.iter().any(|v| v.name == name)
    {
        let names: Vec<&str> = config.vips.iter().map(|v| v.name.as_str()).collect();
        return Err(format!("no VIP named {name:?}; the VIPs are: {}", names.join(", ")));
    }
    let (gone, kept): (Overrides, Overrides) =
        std::mem::take(overrides).into_iter().partition(|(b, _)| vip.is_none_or(|n| b.vip == n));
    *overrides = kept;
    if gone.is_empty() {
        return Ok(vec!["no override was set".into()]);
    }
    Ok(list_overrides(config, &gone).into_iter().map(|l| l + " cleared").collect())
}

/// Every override, a line each: `web 198.18.0.11: drain`.
pub fn list_overrides(config: &Config, overrides: &Overrides) -> Vec<String> {
    overrides.iter().map(|(b, o)| format!("{}: {}", fmt_ref(b), o.describe(file_weight(config, b)))).collect()
}

/// Drops the overrides whose backend is no longer in `config` (it left the
/// file, or its name's answer); returns them, with a line each for the log.
pub fn prune_overrides(overrides: &mut Overrides, config: &Config) -> Vec<String> {
    let present = |b: &BackendRef| {
        config
            .vips
            .iter()
            .any(|v| v.name == b.vip && v.backends.iter().any(|c| c.address == b.addr && c.port.unwrap_or(0) == b.port))
    };
    let mut dropped = Vec::new();
    overrides.retain(|b, o| {
        let keep = present(b);
        if !keep {
            let what = match o {
                Override::Weight(w) => format!("weight {w}"),
                other => other.describe(0),
            };
            dropped.push(format!("{}: override {what} dropped: the backend is no longer configured", fmt_ref(b)));
        }
        keep
    });
    dropped
}

/// What the controller knows beyond the file.
#[derive(Default, Clone, Debug)]
pub struct Observed {
    /// Health by backend; absent means down.
    pub healthy: HashMap<health::Key, bool>,
    /// MAC of the next hop toward each backend address; absent = unresolved.
    pub next_hop_mac: HashMap<IpAddr, [u8; 6]>,
    /// The interface each backend address is reached through, when known.
    pub next_hop_ifindex: HashMap<IpAddr, u32>,
    /// The next hop each backend address is reached through, when known: the
    /// address itself, or a gateway (then DSR cannot reach it).
    pub next_hop: HashMap<IpAddr, IpAddr>,
    /// The routing table as last read: a reload checks new DSR backends against it.
    pub routes: Option<std::sync::Arc<crate::neighbours::Routes>>,
    /// (client-facing, backend-facing) interface indexes: a NAT backend must
    /// be behind the backend-facing one, any other behind the client-facing one.
    pub interfaces: Option<(u32, u32)>,
}

impl Observed {
    /// The MAC to send a backend's packets to, if it is reachable the way its VIP's mode needs.
    fn mac_for(&self, addr: &IpAddr, forwarding: Forwarding) -> Option<[u8; 6]> {
        let mac = self.next_hop_mac.get(addr).copied()?;
        // DSR leaves the VIP as the IP destination: a gateway would route it
        // by the VIP (see `routed_dsr_backends`). A route that changed at run time.
        if forwarding == Forwarding::Dsr && self.next_hop.get(addr).is_some_and(|nh| nh != addr) {
            return None;
        }
        match (self.interfaces, self.next_hop_ifindex.get(addr)) {
            (Some((client, backend)), Some(&via)) => {
                let want = if forwarding == Forwarding::Nat { backend } else { client };
                (via == want).then_some(mac)
            }
            _ => Some(mac),
        }
    }
}

/// The configuration with every backend name replaced by the addresses it
/// resolves to (of the VIP's family): current ones with the configured
/// weight, ones that left the answer at weight 0 (draining) until their hold
/// ends. An address also listed by itself keeps its own entry.
pub fn expand_names(config: &Config, names: &BTreeMap<String, NameState>) -> Config {
    let mut out = config.clone();
    for v in &mut out.vips {
        for nb in &v.named_backends {
            let Some(state) = names.get(&nb.name) else { continue };
            let draining = state.obsolete.keys().map(|a| (*a, 0));
            for (address, weight) in state.current.iter().map(|a| (*a, nb.weight)).chain(draining) {
                if address.is_ipv4() != v.address.is_ipv4()
                    || v.backends.iter().any(|b| b.address == address && b.port == nb.port)
                {
                    continue;
                }
                v.backends.push(BackendConfig { address, port: nb.port, weight, pos: nb.pos });
            }
        }
    }
    out
}

/// What a reload changes, one line each, for the log and `xdplb reload`:
/// VIPs added and removed, and per VIP the backends (by address or name)
/// added, removed and reweighted, and a changed health check.
pub fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    fn members(v: &VipConfig) -> BTreeMap<String, u32> {
        let port = |p: Option<u16>| p.map(|p| format!(":{p}")).unwrap_or_default();
        let by_addr = v.backends.iter().map(|b| (format!("{}{}", b.address, port(b.port)), b.weight));
        by_addr.chain(v.named_backends.iter().map(|b| (format!("{}{}", b.name, port(b.port)), b.weight))).collect()
    }
    let mut out = Vec::new();
    // By name, looked up: thousands of VIPs are not compared pairwise.
    let old_by_name: HashMap<&str, &VipConfig> = old.vips.iter().map(|o| (o.name.as_str(), o)).collect();
    let new_names: HashSet<&str> = new.vips.iter().map(|v| v.name.as_str()).collect();
    for v in &new.vips {
        let Some(o) = old_by_name.get(v.name.as_str()) else {
            out.push(format!("VIP {} added ({}:{}, {} backends)", v.name, v.address, v.port, members(v).len()));
            continue;
        };
        let same_backends = o.backends == v.backends && o.named_backends == v.named_backends;
        let (before, after) = if same_backends { Default::default() } else { (members(o), members(v)) };
        for (b, w) in &after {
            match before.get(b) {
                None => out.push(format!("VIP {}: backend {b} added (weight {w})", v.name)),
                Some(was) if was != w => out.push(format!("VIP {}: backend {b} weight {was} -> {w}", v.name)),
                _ => {}
            }
        }
        for b in before.keys().filter(|b| !after.contains_key(*b)) {
            out.push(format!("VIP {}: backend {b} removed", v.name));
        }
        if (o.address, o.port, o.protocol, o.forwarding, o.hash)
            != (v.address, v.port, v.protocol, v.forwarding, v.hash)
        {
            out.push(format!("VIP {}: address, port, protocol, forwarding or hash changed", v.name));
        }
        if o.health_check != v.health_check {
            out.push(format!("VIP {}: health check changed (its backends are checked anew)", v.name));
        }
        if o.on_all_down != v.on_all_down {
            out.push(format!("VIP {}: on_all_down changed", v.name));
        }
        if o.icmp_echo != v.icmp_echo {
            out.push(format!("VIP {}: icmp_echo changed", v.name));
        }
    }
    for o in old.vips.iter().filter(|o| !new_names.contains(o.name.as_str())) {
        out.push(format!("VIP {} removed", o.name));
    }
    if old.resolvers != new.resolvers {
        out.push("resolvers changed".into());
    }
    out
}

/// VIPs and servers that are this host's own addresses: a VIP there takes
/// the host's own traffic on that port, a backend there loops. One message
/// per problem, naming the VIP and the address.
///
/// A VIP may be an address this host holds as a single host (/32, /128):
/// that is how keepalived moves a VIP to the active node of a pair (and how
/// some sites put it on `lo`). An address numbering an interface on its
/// network (a shorter prefix) is the host's own and never a VIP.
pub fn own_address_conflicts(config: &Config, own: &[crate::addr::LocalAddr]) -> Vec<String> {
    let mut out = Vec::new();
    let network_own: Vec<IpAddr> = own.iter().filter(|a| !a.host_only).map(|a| a.addr).collect();
    let own: Vec<IpAddr> = own.iter().map(|a| a.addr).collect();
    for v in &config.vips {
        if network_own.contains(&v.address) {
            out.push(format!(
                "vips `{}`: address {} is this load balancer's own address; a VIP must be an address routed to it \
                 (or held as a /32 or /128, as keepalived adds it)",
                v.name, v.address
            ));
        }
        let sorry = match v.on_all_down {
            OnAllDown::SorryServer { address, .. } => Some(address),
            _ => None,
        };
        for a in v.backends.iter().map(|b| b.address).chain(sorry) {
            if own.contains(&a) {
                out.push(format!("vips `{}`: backend {a} is this load balancer's own address", v.name));
            }
        }
    }
    out
}

/// DSR backends (and sorry servers) reached through a gateway: one message
/// each, naming the VIP, the backend as configured (its name too, for one
/// that DNS resolved), how it is reached and the fix. DSR changes only the
/// MAC and keeps the VIP as the IP destination, so a router that received
/// the frame would route it by the VIP: back to this balancer, or nowhere.
/// IP-in-IP and NAT rewrite the destination and may be routed.
///
/// `config` is the file; a backend name counts at the addresses `names`
/// holds for it now (one not resolved yet is checked by the resolution
/// rounds when it is: left out, warned). With `running` (a reload: the
/// configuration in force, names expanded), only backends the reload brings
/// to DSR count: ones their VIP did not have, or had with other forwarding.
/// A backend already serving whose route moved behind a gateway is left out
/// at run time (see `Observed::mac_for`), and must not hold back every
/// later reload. `gateway` answers from the routing table; `iface` is the
/// balanced interface.
pub fn routed_dsr_backends(
    config: &Config,
    names: &BTreeMap<String, NameState>,
    running: Option<&Config>,
    gateway: impl Fn(IpAddr) -> Option<Via>,
    iface: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for v in config.vips.iter().filter(|v| v.forwarding == Forwarding::Dsr) {
        let mut members: Vec<(IpAddr, String)> =
            v.backends.iter().map(|b| (b.address, format!("backend {}", b.address))).collect();
        for nb in &v.named_backends {
            let Some(state) = names.get(&nb.name) else { continue };
            let addrs =
                state.current.iter().chain(state.obsolete.keys()).filter(|a| a.is_ipv4() == v.address.is_ipv4());
            members.extend(addrs.map(|a| (*a, format!("backend {} ({a})", nb.name))));
        }
        if let OnAllDown::SorryServer { address, .. } = v.on_all_down {
            members.push((address, format!("sorry server {address}")));
        }
        // What the running configuration already sends this VIP's DSR traffic to.
        let serving: HashSet<IpAddr> = running
            .and_then(|r| r.vips.iter().find(|o| o.name == v.name && o.forwarding == Forwarding::Dsr))
            .map(|o| {
                let sorry = match o.on_all_down {
                    OnAllDown::SorryServer { address, .. } => Some(address),
                    _ => None,
                };
                o.backends.iter().map(|b| b.address).chain(sorry).collect()
            })
            .unwrap_or_default();
        let mut seen = HashSet::new();
        for (a, label) in members {
            if serving.contains(&a) || !seen.insert(a) {
                continue;
            }
            if let Some(via) = gateway(a) {
                out.push(format!(
                    "vips `{}`: {label} of DSR VIP {} is reached through {via}, not on a network of {iface}: DSR \
                     changes only the MAC and keeps the VIP as the IP destination, so the gateway would route the \
                     packet by the VIP (back to this balancer, or nowhere); use forwarding: ipip, or put the backend \
                     on a network of {iface}",
                    v.name,
                    fmt_backend(v.address, v.port),
                ));
            }
        }
    }
    out
}

/// Every address the controller must resolve a next hop for.
pub fn addresses_to_resolve(config: &Config) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = config
        .vips
        .iter()
        .flat_map(|v| {
            let sorry = match v.on_all_down {
                OnAllDown::SorryServer { address, .. } => Some(address),
                _ => None,
            };
            v.backends.iter().map(|b| b.address).chain(sorry)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The dataplane key of a configured VIP.
pub fn vip_key(v: &VipConfig) -> lb_common::maps::VipKey {
    lb_common::maps::VipKey {
        addr: crate::addr::words(v.address),
        port: v.port.to_be(),
        protocol: v.protocol.number(),
        family: crate::addr::family(v.address),
    }
}

/// The VIPs the dataplane should hold: the configuration, with the runtime
/// overrides on top (weights; `maint` counts as down), and what is observed.
pub fn vip_specs(config: &Config, overrides: &Overrides, observed: &Observed) -> Vec<VipSpec> {
    config.vips.iter().map(|v| vip_spec(v, overrides, observed)).collect()
}

fn vip_spec(v: &VipConfig, overrides: &Overrides, observed: &Observed) -> VipSpec {
    let mut backends: Vec<BackendSpec> = v
        .backends
        .iter()
        .map(|b| {
            let mac = observed.mac_for(&b.address, v.forwarding);
            let healthy = observed.healthy.get(&health_key(v, b.address, b.port)).copied().unwrap_or(false);
            // Usually none: no key (a copy of the VIP's name) built per backend then.
            let set =
                if overrides.is_empty() { None } else { overrides.get(&BackendRef::of(v, b.address, b.port)).copied() };
            BackendSpec {
                addr: b.address,
                port: b.port.unwrap_or(0),
                weight: set.map_or(b.weight, |o| o.weight(b.weight)),
                mac: mac.unwrap_or_default(),
                // A backend we cannot reach at layer 2 gets no traffic; one
                // in maintenance none either, whatever its checks say.
                healthy: healthy && mac.is_some() && set != Some(Override::Maint),
            }
        })
        .collect();
    let any_up = backends.iter().any(|b| b.healthy && b.weight > 0);
    if let (false, OnAllDown::SorryServer { address, port }) = (any_up, &v.on_all_down) {
        let mac = observed.mac_for(address, v.forwarding);
        backends.push(BackendSpec {
            addr: *address,
            port: port.unwrap_or(0),
            weight: 1,
            mac: mac.unwrap_or_default(),
            healthy: mac.is_some(),
        });
    }
    VipSpec {
        name: v.name.clone(),
        addr: v.address,
        port: v.port,
        protocol: v.protocol.number(),
        forwarding: v.forwarding,
        hash: v.hash,
        table_size: v.table_size,
        backends,
        pass_when_empty: v.on_all_down == OnAllDown::Pass,
        icmp_echo: v.icmp_echo,
    }
}

/// Interface facts the dataplane needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// The CONFIG map entry for the interfaces and configuration, with the flow
/// hash seed `seed` (see `hash_seed`).
pub fn lb_config(link: &Link, backend_link: Option<&Link>, config: &Config, seed: [u32; 2]) -> LbConfig {
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
        hash_seed: seed,
        udp_idle_s: config.conntrack_udp_idle.as_secs().min(u32::MAX as u64) as u32,
        flood_rate: config.conntrack_flood_rate,
    }
}

/// Pool slots for a configuration: every table twice (the live one and its
/// replacement during a swap), and never less than the default.
pub fn pool_size(config: &Config) -> u32 {
    let tables: u64 = config.vips.iter().map(|v| v.table_size as u64).sum();
    (2 * tables + 2 * 65_537).clamp(DEFAULT_MAGLEV_POOL as u64, u32::MAX as u64 / 2) as u32
}

/// Map capacities for a configuration, with room to grow by reloads.
pub fn map_sizes(config: &Config) -> MapSizes {
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

/// How health knows backend `addr`(`:port`) of VIP `v`: by the VIP's
/// address, port and protocol, so a renamed VIP keeps its backends' health.
pub fn health_key(v: &VipConfig, addr: IpAddr, port: Option<u16>) -> health::Key {
    health::Key { vip: v.address, vip_port: v.port, protocol: v.protocol.number(), addr, port: port.unwrap_or(0) }
}

/// What the health checker checks: every configured backend of every VIP.
pub fn health_targets(config: &Config) -> Vec<health::Target> {
    config
        .vips
        .iter()
        .flat_map(|v| {
            v.backends.iter().map(move |b| health::Target {
                key: health_key(v, b.address, b.port),
                addr: b.address,
                port: v.health_check.port.or(b.port).unwrap_or(v.port),
                vip: v.address,
                check: v.health_check.clone(),
            })
        })
        .collect()
}

/// Whether `a` and `b` give the same `health_targets`, in the same order
/// (then syncing the checker to `b` changes nothing), compared without
/// building them.
pub fn same_health_targets(a: &Config, b: &Config) -> bool {
    a.vips.len() == b.vips.len()
        && a.vips.iter().zip(&b.vips).all(|(x, y)| {
            (x.address, x.port, x.protocol) == (y.address, y.port, y.protocol)
                && x.health_check == y.health_check
                && x.backends.len() == y.backends.len()
                && x.backends.iter().zip(&y.backends).all(|(p, q)| (p.address, p.port) == (q.address, q.port))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    const CONFIG: &str = "vips:\n  - name: web\n    address: 198.18.0.100\n    port: 80\n    on_all_down: sorry_server\n    sorry_server: {address: 198.18.0.99}\n    backends:\n      - address: 198.18.0.11\n      - address: 198.18.0.12\n        weight: 0\n";

    fn observed(up: &[&str], resolved: &[&str]) -> Observed {
        let mut o = Observed::default();
        for a in up {
            let key = health::Key {
                vip: "198.18.0.100".parse().unwrap(),
                vip_port: 80,
                protocol: 6,
                addr: a.parse().unwrap(),
                port: 0,
            };
            o.healthy.insert(key, true);
        }
        for a in resolved {
            o.next_hop_mac.insert(a.parse().unwrap(), [2, 0, 0, 0, 0, 1]);
        }
        o
    }

    /// A reload that changes only weights keeps every checker; one that
    /// changes what is checked, or how, does not.
    #[test]
    fn same_health_targets_is_health_targets_equality() {
        let c = config::parse("c.yaml", CONFIG).unwrap();
        let edit = |from: &str, to: &str| config::parse("c.yaml", &CONFIG.replace(from, to)).unwrap();
        let weight = edit("      - address: 198.18.0.12\n        weight: 0\n", "      - address: 198.18.0.12\n");
        let moved = edit("198.18.0.12", "198.18.0.13");
        let checked = edit("    on_all_down:", "    health_check: {type: none}\n    on_all_down:");
        for (other, same) in [(&c, true), (&weight, true), (&moved, false), (&checked, false)] {
            assert_eq!(same_health_targets(&c, other), same);
            assert_eq!(health_targets(&c) == health_targets(other), same);
        }
    }

    #[test]
    fn health_and_resolution_decide_who_is_up() {
        let c = config::parse("c.yaml", CONFIG).unwrap();
        let all = ["198.18.0.11", "198.18.0.12", "198.18.0.99"];
        let specs = vip_specs(&c, &Overrides::new(), &observed(&["198.18.0.11", "198.18.0.12"], &all));
        let b = &specs[0].backends;
        assert_eq!(b.len(), 2, "no sorry server while a backend is up");
        assert!(b[0].healthy && b[0].weight == 1 && b[1].healthy && b[1].weight == 0);
        // Healthy but unresolved: not used.
        let specs = vip_specs(&c, &Overrides::new(), &observed(&["198.18.0.11"], &["198.18.0.99"]));
        assert!(!specs[0].backends[0].healthy);
        assert_eq!(specs[0].backends.len(), 3, "no backend up: the sorry server joins");
        assert!(specs[0].backends[2].healthy && specs[0].backends[2].addr.to_string() == "198.18.0.99");
        // A draining backend being up does not keep the sorry server away.
        let specs = vip_specs(&c, &Overrides::new(), &observed(&["198.18.0.12"], &all));
        assert_eq!(specs[0].backends.len(), 3);
        assert_eq!(addresses_to_resolve(&c).len(), 3);
    }

    #[test]
    fn icmp_echo_is_on_unless_a_vip_says_false() {
        let all = ["198.18.0.11", "198.18.0.12", "198.18.0.99"];
        let c = config::parse("c.yaml", CONFIG).unwrap();
        let specs = vip_specs(&c, &Overrides::new(), &observed(&all, &all));
        assert!(specs[0].icmp_echo, "default: answered");
        let off = CONFIG.replace("    port: 80\n", "    port: 80\n    icmp_echo: false\n");
        let c2 = config::parse("c.yaml", &off).unwrap();
        assert!(!vip_specs(&c2, &Overrides::new(), &observed(&all, &all))[0].icmp_echo);
        assert!(describe_changes(&c, &c2).contains(&"VIP web: icmp_echo changed".to_string()));
        let bad = CONFIG.replace("    port: 80\n", "    port: 80\n    icmp_echo: maybe\n");
        let err = format!("{:#}", config::parse("c.yaml", &bad).unwrap_err());
        assert!(err.contains("icmp_echo: `maybe` is not one of true, false"), "{err}");
    }

    #[test]
    fn dsr_backends_behind_a_gateway_are_named_with_the_fix() {
        let a = |s: &str| -> IpAddr { s.parse().unwrap() };
        let routes = crate::neighbours::Routes::from_routes(&[
            (a("198.18.0.0"), 24, None, 2),
            (a("198.19.5.0"), 24, Some(a("198.18.0.254")), 2),
        ]);
        let text = "vips:\n  - name: web\n    address: 198.18.100.1\n    port: 80\n    backends:\n      - address: 198.18.0.11\n      - address: 198.19.5.5\n  - name: tunnel\n    address: 198.18.100.2\n    port: 80\n    forwarding: ipip\n    backends:\n      - address: 198.19.5.6\n";
        let c = config::parse("c.yaml", text).unwrap();
        let found = routed_dsr_backends(&c, &BTreeMap::new(), None, |x| routes.gateway(x), "lb0");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(
                "vips `web`: backend 198.19.5.5 of DSR VIP 198.18.100.1:80 is reached through gateway 198.18.0.254, \
                 not on a network of lb0"
            ),
            "{}",
            found[0]
        );
        assert!(found[0].ends_with("use forwarding: ipip, or put the backend on a network of lb0"), "{}", found[0]);
        // Once the route changes at run time, the backend gets no DSR traffic.
        let mut o = all_up(&c);
        o.next_hop_mac.insert(a("198.19.5.5"), [2, 0, 0, 0, 0, 9]);
        o.next_hop_mac.insert(a("198.19.5.6"), [2, 0, 0, 0, 0, 9]);
        o.next_hop.insert(a("198.19.5.5"), a("198.18.0.254"));
        o.next_hop.insert(a("198.19.5.6"), a("198.18.0.254"));
        o.next_hop.insert(a("198.18.0.11"), a("198.18.0.11"));
        let specs = vip_specs(&c, &Overrides::new(), &o);
        let up: Vec<bool> = specs[0].backends.iter().map(|b| b.healthy).collect();
        assert_eq!(up, [true, false], "DSR: the routed backend is out");
        assert!(specs[1].backends[0].healthy, "IP-in-IP may be routed");
    }

    /// The file's DSR backends and sorry server, a name's addresses (named as
    /// configured), a multipath route; `routes` routes 198.19.5.0/24 via
    /// 198.18.0.254 and 198.19.7.0/24 over two gateways.
    fn routed(text: &str, names: &[(&str, &[&str])], running: Option<&Config>) -> Vec<String> {
        let a = |s: &str| -> IpAddr { s.parse().unwrap() };
        let mut routes = crate::neighbours::Routes::from_routes(&[
            (a("198.18.0.0"), 24, None, 2),
            (a("198.19.5.0"), 24, Some(a("198.18.0.254")), 2),
        ]);
        routes.add_multipath(a("198.19.7.0"), 24, &[(a("198.18.0.253"), 2), (a("198.18.0.254"), 2)]);
        let c = config::parse("c.yaml", text).unwrap();
        let mut states = BTreeMap::new();
        for (name, addrs) in names {
            let mut state = NameState::default();
            state.current.extend(addrs.iter().map(|s| a(s)));
            states.insert(name.to_string(), state);
        }
        routed_dsr_backends(&c, &states, running, |x| routes.gateway(x), "lb0")
    }

    const DSR_VIP: &str = "vips:\n  - name: web\n    address: 198.18.100.1\n    port: 80\n    on_all_down: sorry_server\n    sorry_server: {address: 198.19.5.99}\n    backends:\n      - address: 198.18.0.11\n      - address: web.pool.test\n      - address: 198.19.7.7\n";

    #[test]
    fn named_backends_sorry_servers_and_multipath_routes_are_checked_too() {
        let found = routed(DSR_VIP, &[("web.pool.test", &["198.18.0.12", "198.19.5.5", "2001:db8::5"])], None);
        let starts: Vec<&str> = found.iter().map(|l| l.split(", not on a network").next().unwrap()).collect();
        assert_eq!(
            starts,
            [
                "vips `web`: backend 198.19.7.7 of DSR VIP 198.18.100.1:80 is reached through a multipath route via \
                 gateways 198.18.0.253, 198.18.0.254",
                "vips `web`: backend web.pool.test (198.19.5.5) of DSR VIP 198.18.100.1:80 is reached through gateway \
                 198.18.0.254",
                "vips `web`: sorry server 198.19.5.99 of DSR VIP 198.18.100.1:80 is reached through gateway \
                 198.18.0.254",
            ]
        );
        // A name not resolved yet has no address to check.
        assert_eq!(routed(DSR_VIP, &[], None).len(), 2);
    }

    /// A reload is refused only for what it brings to DSR: a backend that
    /// already serves and whose route changed at run time is left out by
    /// the resolution rounds, and must not block unrelated edits.
    #[test]
    fn a_reload_is_checked_only_for_backends_it_brings_to_dsr() {
        let names: &[(&str, &[&str])] = &[("web.pool.test", &["198.19.5.5"])];
        let running = config::parse("c.yaml", DSR_VIP).unwrap();
        let mut states = BTreeMap::new();
        let mut state = NameState::default();
        state.current.insert("198.19.5.5".parse().unwrap());
        states.insert("web.pool.test".to_string(), state);
        let running = expand_names(&running, &states);
        // The same file, or an unrelated edit: nothing new to refuse.
        assert_eq!(routed(DSR_VIP, names, Some(&running)), Vec::<String>::new());
        let edited =
            DSR_VIP.replace("      - address: 198.18.0.11\n", "      - address: 198.18.0.11\n        weight: 3\n");
        assert_eq!(routed(&edited, names, Some(&running)), Vec::<String>::new());
        // A routed backend the reload adds is refused.
        let added = format!("{DSR_VIP}      - address: 198.19.5.6\n");
        let found = routed(&added, names, Some(&running));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("vips `web`: backend 198.19.5.6 of DSR VIP"), "{}", found[0]);
        // A VIP switched to DSR from IP-in-IP: all its routed backends are new to DSR.
        let ipip = DSR_VIP.replace("    port: 80\n", "    port: 80\n    forwarding: ipip\n");
        let running_ipip = expand_names(&config::parse("c.yaml", &ipip).unwrap(), &states);
        assert_eq!(routed(DSR_VIP, names, Some(&running_ipip)).len(), 3);
        // A VIP of another name is another VIP.
        let renamed = DSR_VIP.replace("name: web\n", "name: www\n");
        assert_eq!(routed(&renamed, names, Some(&running)).len(), 3);
    }

    #[test]
    fn names_expand_to_their_addresses_of_the_vip_family() {
        let text = "vips:\n  - name: web\n    address: 198.18.100.1\n    port: 80\n    backends:\n      - address: 198.18.0.11\n      - address: web.pool.test\n        weight: 3\n  - name: web6\n    address: 2001:db8:100::1\n    port: 80\n    backends:\n      - address: web.pool.test\n";
        let c = config::parse("c.yaml", text).unwrap();
        let mut names = BTreeMap::new();
        let mut state = NameState::default();
        for a in ["198.18.0.11", "198.18.0.12", "2001:db8::12"] {
            state.current.insert(a.parse().unwrap());
        }
        state.obsolete.insert("198.18.0.13".parse().unwrap(), std::time::Instant::now());
        names.insert("web.pool.test".to_string(), state);
        let e = expand_names(&c, &names);
        let got: Vec<(String, u32)> = e.vips[0].backends.iter().map(|b| (b.address.to_string(), b.weight)).collect();
        // The static entry keeps its weight; the name adds .12 at 3 and drains .13.
        assert_eq!(got, [("198.18.0.11".into(), 1), ("198.18.0.12".into(), 3), ("198.18.0.13".into(), 0)]);
        let got6: Vec<String> = e.vips[1].backends.iter().map(|b| b.address.to_string()).collect();
        assert_eq!(got6, ["2001:db8::12"]);
        // Unresolved names add nothing.
        assert_eq!(expand_names(&c, &BTreeMap::new()).vips[0].backends.len(), 1);
    }

    #[test]
    fn a_reload_says_what_it_changed() {
        let old = config::parse("c.yaml", CONFIG).unwrap();
        let new_text = CONFIG
            .replace(
                "      - address: 198.18.0.12\n        weight: 0\n",
                "      - address: 198.18.0.12\n        weight: 5\n      - address: web.pool.test\n",
            )
            .replace("      - address: 198.18.0.11\n", "")
            + "  - name: api\n    address: 198.18.100.2\n    port: 443\n    backends: [{address: 198.18.0.21}]\n";
        let new = config::parse("c.yaml", &new_text).unwrap();
        assert_eq!(
            describe_changes(&old, &new),
            [
                "VIP web: backend 198.18.0.12 weight 0 -> 5",
                "VIP web: backend web.pool.test added (weight 1)",
                "VIP web: backend 198.18.0.11 removed",
                "VIP api added (198.18.100.2:443, 1 backends)",
            ]
        );
        assert_eq!(describe_changes(&new, &old).last().map(String::as_str), Some("VIP api removed"));
        assert!(describe_changes(&old, &old).is_empty());
    }

    const TWO_VIPS: &str = "vips:\n  - name: web\n    address: 198.18.100.1\n    port: 80\n    backends:\n      - address: 198.18.0.11\n      - address: 198.18.0.12\n        weight: 2\n  - name: api6\n    address: 2001:db8:100::1\n    port: 443\n    forwarding: nat\n    backends:\n      - {address: 2001:db8:2::11, port: 8443}\n      - {address: 2001:db8:2::11, port: 8444}\n      - {address: 2001:db8:2::12}\n";

    fn all_up(c: &Config) -> Observed {
        let mut o = Observed::default();
        for v in &c.vips {
            for b in &v.backends {
                o.healthy.insert(health_key(v, b.address, b.port), true);
                o.next_hop_mac.insert(b.address, [2, 0, 0, 0, 0, 1]);
            }
        }
        o
    }

    /// (address, weight, healthy) of VIP `i`'s backends.
    fn weights(specs: &[VipSpec], i: usize) -> Vec<(String, u32, bool)> {
        specs[i].backends.iter().map(|b| (fmt_backend(b.addr, b.port), b.weight, b.healthy)).collect()
    }

    #[test]
    fn overrides_set_weights_drain_and_maint_on_top_of_the_file() {
        let c = config::parse("c.yaml", TWO_VIPS).unwrap();
        let o = all_up(&c);
        let mut set = Overrides::new();
        assert_eq!(
            set_override(&c, &mut set, "web", "198.18.0.11", Override::Weight(5)).unwrap(),
            "web 198.18.0.11: weight 5 (file: 1)"
        );
        assert_eq!(
            set_override(&c, &mut set, "web", "198.18.0.12", Override::Drain).unwrap(),
            "web 198.18.0.12: drain (file: weight 2)"
        );
        assert_eq!(
            set_override(&c, &mut set, "api6", "[2001:db8:2::11]:8444", Override::Maint).unwrap(),
            "api6 [2001:db8:2::11]:8444: maint (file: weight 1)"
        );
        let specs = vip_specs(&c, &set, &o);
        assert_eq!(weights(&specs, 0), [("198.18.0.11".into(), 5, true), ("198.18.0.12".into(), 0, true)]);
        // Maintenance: out like a down backend, weight kept, whatever its checks say.
        assert_eq!(
            weights(&specs, 1),
            [
                ("[2001:db8:2::11]:8443".into(), 1, true),
                ("[2001:db8:2::11]:8444".into(), 1, false),
                ("2001:db8:2::12".into(), 1, true)
            ]
        );
        // The last command replaces the one before; `ready` goes back to the file.
        set_override(&c, &mut set, "web", "198.18.0.12", Override::Maint).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(
            clear_override(&c, &mut set, "web", "198.18.0.12").unwrap(),
            "web 198.18.0.12: ready, weight 2 as in the file (override maint cleared)"
        );
        assert_eq!(
            clear_override(&c, &mut set, "web", "198.18.0.12").unwrap(),
            "web 198.18.0.12: ready, weight 2 as in the file (it had no override)"
        );
        assert_eq!(weights(&vip_specs(&c, &set, &o), 0)[1], ("198.18.0.12".into(), 2, true));
        assert_eq!(clear_overrides(&c, &mut set, Some("api6")).unwrap(), ["api6 [2001:db8:2::11]:8444: maint cleared"]);
        assert_eq!(clear_overrides(&c, &mut set, None).unwrap(), ["web 198.18.0.11: weight 5 (file: 1) cleared"]);
        assert_eq!(clear_overrides(&c, &mut set, None).unwrap(), ["no override was set"]);
        assert_eq!(vip_specs(&c, &set, &o), vip_specs(&c, &Overrides::new(), &o));
    }

    #[test]
    fn draining_every_backend_brings_the_sorry_server() {
        let c = config::parse("c.yaml", CONFIG).unwrap();
        let o = observed(&["198.18.0.11", "198.18.0.12"], &["198.18.0.11", "198.18.0.12", "198.18.0.99"]);
        let mut set = Overrides::new();
        set_override(&c, &mut set, "web", "198.18.0.11", Override::Maint).unwrap();
        let specs = vip_specs(&c, &set, &o);
        assert_eq!(specs[0].backends.len(), 3, "no backend takes new flows: the sorry server joins");
    }

    #[test]
    fn unknown_vips_and_backends_are_named_with_what_exists() {
        let c = config::parse("c.yaml", TWO_VIPS).unwrap();
        let mut set = Overrides::new();
        let err = |vip, backend| set_override(&c, &mut Overrides::new(), vip, backend, Override::Drain).unwrap_err();
        assert_eq!(err("www", "198.18.0.11"), "no VIP named \"www\"; the VIPs are: web, api6");
        assert_eq!(
            err("web", "198.18.0.99"),
            "VIP web has no backend 198.18.0.99; its backends are: 198.18.0.11, 198.18.0.12"
        );
        assert_eq!(
            err("api6", "2001:db8:2::11"),
            "VIP api6 has several backends at 2001:db8:2::11: [2001:db8:2::11]:8443, [2001:db8:2::11]:8444; name one with ADDRESS:PORT"
        );
        assert_eq!(
            err("web", "web1.example"),
            "\"web1.example\" is not a backend address (ADDRESS, or ADDRESS:PORT for nat)"
        );
        // A backend without a port of its own answers to the VIP's, and to brackets.
        assert!(set_override(&c, &mut set, "web", "198.18.0.11:80", Override::Drain).is_ok());
        assert!(set_override(&c, &mut set, "api6", "[2001:db8:2::12]", Override::Drain).is_ok());
        assert!(set_override(&c, &mut set, "api6", "[2001:db8:2::12]:443", Override::Drain).is_ok());
        assert_eq!(set.len(), 2);
        assert!(clear_overrides(&c, &mut set, Some("www")).unwrap_err().starts_with("no VIP named \"www\""));
    }

    #[test]
    fn overrides_of_backends_that_left_the_file_are_dropped() {
        let c = config::parse("c.yaml", TWO_VIPS).unwrap();
        let mut set = Overrides::new();
        set_override(&c, &mut set, "web", "198.18.0.11", Override::Weight(7)).unwrap();
        set_override(&c, &mut set, "web", "198.18.0.12", Override::Drain).unwrap();
        set_override(&c, &mut set, "api6", "[2001:db8:2::11]:8443", Override::Maint).unwrap();
        assert!(prune_overrides(&mut set, &c).is_empty(), "a reload of the same file keeps them all");
        let text = TWO_VIPS.replace("      - address: 198.18.0.11\n", "").replace("port: 8443", "port: 9443");
        let reloaded = config::parse("c.yaml", &text).unwrap();
        assert_eq!(
            prune_overrides(&mut set, &reloaded),
            [
                "api6 [2001:db8:2::11]:8443: override maint dropped: the backend is no longer configured",
                "web 198.18.0.11: override weight 7 dropped: the backend is no longer configured",
            ]
        );
        assert_eq!(
            set.into_iter().collect::<Vec<_>>(),
            [(BackendRef { vip: "web".into(), addr: "198.18.0.12".parse().unwrap(), port: 0 }, Override::Drain)]
        );
    }

    #[test]
    fn overrides_are_stored_as_plain_json() {
        let all = [Override::Weight(5), Override::Drain, Override::Maint];
        let text = serde_json::to_string(&all).unwrap();
        assert_eq!(text, r#"[{"weight":5},"drain","maint"]"#);
        assert_eq!(serde_json::from_str::<Vec<Override>>(&text).unwrap(), all);
    }

    fn link(name: &str, index: u32, last: u8) -> Link {
        Link { name: name.into(), index, mac: [2, 0, 0, 0, 0, last], mtu: 1500 }
    }

    #[test]
    fn lb_config_masks_the_ipip_sources_and_flags_nat() {
        let text = "ipip_source_v4: 198.19.255.7/24\nipip_source_v6: 2001:db8:ffff::1234:5678/96\nvips:\n  - {name: web, address: 198.18.100.1, port: 80, backends: [{address: 198.18.0.11}]}\n";
        let c = config::parse("c.yaml", text).unwrap();
        let cfg = lb_config(&link("lb0", 3, 1), None, &c, [7, 9]);
        assert_eq!((cfg.client_ifindex, cfg.backend_ifindex, cfg.mtu, cfg.flags), (3, 3, 1500, 0));
        assert_eq!(cfg.hash_seed, [7, 9]);
        assert_eq!((cfg.udp_idle_s, cfg.flood_rate), (30, 125_000), "the defaults");
        assert_eq!(cfg.if_mac, cfg.backend_if_mac, "one arm: replies leave where requests came in");
        assert_eq!(cfg.ipip_src_v4, u32::from_be_bytes([198, 19, 255, 0]).to_be(), "host bits cleared");
        assert_eq!(cfg.ipip_src_v4_host_mask, 0xffu32.to_be());
        assert_eq!(cfg.ipip_src_v6[3], 0, "the last 32 bits are the host's");
        assert_eq!(cfg.ipip_src_v6_host_mask, u32::MAX.to_be());
        let nat = config::parse("c.yaml", TWO_VIPS).unwrap();
        let cfg = lb_config(&link("lb0", 3, 1), Some(&link("lb1", 4, 2)), &nat, [0, 0]);
        assert_eq!((cfg.flags, cfg.backend_ifindex, cfg.backend_if_mac[5]), (CFG_NAT, 4, 2));
    }

    #[test]
    fn map_sizes_leave_room_for_reloads_and_every_table_twice() {
        let c = config::parse("c.yaml", TWO_VIPS).unwrap();
        let d = MapSizes::default();
        let sizes = map_sizes(&c);
        assert_eq!((sizes.max_vips, sizes.max_backends), (d.max_vips, d.max_backends), "small: the defaults");
        assert_eq!(pool_size(&c), DEFAULT_MAGLEV_POOL, "never below the default");
        let mut big = c.clone();
        for v in &mut big.vips {
            v.table_size = 4_194_301;
        }
        assert_eq!(pool_size(&big), 2 * 2 * 4_194_301 + 2 * 65_537, "each table twice, plus one spare");
        let mut many = c.clone();
        many.vips = (0..3000).map(|_| c.vips[0].clone()).collect();
        assert_eq!(map_sizes(&many).max_vips, 8192, "twice the VIPs, a power of two");
    }

    #[test]
    fn health_targets_follow_the_vip_not_its_name() {
        let c = config::parse("c.yaml", TWO_VIPS).unwrap();
        let targets = health_targets(&c);
        assert_eq!(targets.len(), 5);
        let api = &targets[2];
        assert_eq!((api.addr, api.port, api.key.port), ("2001:db8:2::11".parse().unwrap(), 8443, 8443));
        assert_eq!(targets[0].port, 80, "no port of its own: the VIP's");
        // A renamed VIP is the same VIP to health: its checkers and their state stay.
        let renamed = config::parse("c.yaml", &TWO_VIPS.replace("name: web", "name: www")).unwrap();
        assert_eq!(health_targets(&renamed), targets);
        // Another port is another VIP.
        let moved = config::parse("c.yaml", &TWO_VIPS.replace("port: 80", "port: 8080")).unwrap();
        assert_ne!(health_targets(&moved)[0].key, targets[0].key);
    }

    #[test]
    fn the_balancers_own_addresses_are_no_vip_and_no_server() {
        use crate::addr::LocalAddr;
        let c = config::parse("c.yaml", CONFIG).unwrap();
        let net = |a: &str| LocalAddr { addr: a.parse().unwrap(), host_only: false };
        let host = |a: &str| LocalAddr { addr: a.parse().unwrap(), host_only: true };
        let own = vec![net("198.18.0.12"), host("198.18.0.99")];
        assert_eq!(
            own_address_conflicts(&c, &own),
            [
                "vips `web`: backend 198.18.0.12 is this load balancer's own address",
                "vips `web`: backend 198.18.0.99 is this load balancer's own address",
            ]
        );
        assert!(
            own_address_conflicts(&c, &[net("198.18.0.100")])[0]
                .contains("address 198.18.0.100 is this load balancer's own address")
        );
        // A VIP held as a single host (keepalived's virtual_ipaddress on the active node) is fine.
        assert!(own_address_conflicts(&c, &[host("198.18.0.100")]).is_empty());
        assert!(own_address_conflicts(&c, &[net("198.18.0.2")]).is_empty());
    }
}
