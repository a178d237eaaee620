//! Walks the positioned YAML tree into the model, collecting every error
//! with the position and path of the field it concerns.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_common::maglev;

use super::{
    BackendConfig, CaFile, CheckKind, Config, ConfigError, DEFAULT_CONNTRACK_FLOOD_RATE, DEFAULT_CONNTRACK_UDP_IDLE,
    DEFAULT_IPIP_SOURCE_V4, DEFAULT_IPIP_SOURCE_V6, HealthCheck, InitialState, NamedBackend, NatSettings, OnAllDown,
    Pos, Prefix, Protocol, Resolvers, StatusMatch, TlsCheck, VipConfig, XdpModeSetting,
    yaml::{Node, Value},
};
use crate::reconcile::{Forwarding, HashMode};

/// A backend as written: an address, or a name to resolve.
enum Backend {
    Address(BackendConfig),
    Name(NamedBackend),
}

pub struct Fields<'f> {
    file: &'f str,
    pub errors: Vec<ConfigError>,
}

/// A mapping's entries, after unknown keys were reported.
pub(super) struct Map<'a> {
    entries: &'a [(String, Pos, Node)],
    path: String,
}

impl<'a> Map<'a> {
    pub(super) fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries.iter().find(|(k, _, _)| k == key).map(|(_, _, n)| n)
    }

    pub(super) fn path(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_string() } else { format!("{}.{key}", self.path) }
    }
}

pub(super) fn scalar(node: &Node) -> Option<&str> {
    match &node.value {
        Value::Scalar(s) => Some(s),
        _ => None,
    }
}

/// Parses `500ms`, `2s`, `1.5s`, `1m`: a number and a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration (write e.g. 500ms, 2s, 1m)"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "" => return Err(format!("`{s}` needs a unit: ms, s or m (e.g. {s}s)")),
        other => return Err(format!("unknown unit `{other}` in `{s}` (use ms, s or m)")),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(format!("`{s}` is out of range (more than 0, at most a day)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_prefix(s: &str) -> Result<Prefix, String> {
    let (a, l) = s.split_once('/').ok_or_else(|| format!("`{s}` is not a prefix (write e.g. 198.18.255.0/24)"))?;
    let addr: IpAddr = a.parse().map_err(|_| format!("`{a}` is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 =
        l.parse().ok().filter(|&n| n <= max).ok_or_else(|| format!("prefix length `{l}` is not 0..={max}"))?;
    Ok(Prefix { addr, len })
}

fn parse_status(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v = s.trim().parse().ok()?;
            (v, v)
        }
    };
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some((lo, hi))
}

impl<'f> Fields<'f> {
    pub fn new(file: &'f str) -> Self {
        Self { file, errors: Vec::new() }
    }

    pub(super) fn error(&mut self, pos: Pos, field: &str, message: impl Into<String>) {
        self.errors.push(ConfigError { file: self.file.into(), pos, field: field.into(), message: message.into() });
    }

    pub(super) fn map<'a>(&mut self, node: &'a Node, path: &str, known: &[&str]) -> Option<Map<'a>> {
        let Value::Map(entries) = &node.value else {
            let what = if path.is_empty() { "the document" } else { path };
            self.error(node.pos, what, format!("must be a mapping, not {}", node.kind()));
            return None;
        };
        for (key, pos, _) in entries {
            if !known.contains(&key.as_str()) {
                let field = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                self.error(*pos, &field, format!("unknown key (known here: {})", known.join(", ")));
            }
        }
        Some(Map { entries, path: path.to_string() })
    }

    /// A scalar field parsed by `parse`; errors name the field.
    pub(super) fn value<T>(&mut self, m: &Map, key: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let node = m.get(key)?;
        let path = m.path(key);
        let Some(s) = scalar(node) else {
            self.error(node.pos, &path, format!("must be a single value, not {}", node.kind()));
            return None;
        };
        match parse(s) {
            Ok(v) => Some(v),
            Err(msg) => {
                self.error(node.pos, &path, msg);
                None
            }
        }
    }

    pub(super) fn required<T>(
        &mut self,
        m: &Map,
        at: Pos,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        if m.get(key).is_none() {
            self.error(at, &m.path(key), "is required");
            return None;
        }
        self.value(m, key, parse)
    }

    pub(super) fn list<'a>(&mut self, m: &Map<'a>, key: &str) -> Option<&'a [Node]> {
        let node = m.get(key)?;
        match &node.value {
            Value::Seq(items) => Some(items),
            _ => {
                self.error(node.pos, &m.path(key), format!("must be a list, not {}", node.kind()));
                None
            }
        }
    }

    pub fn config(&mut self, root: &Node) -> Option<Config> {
        const KEYS: &[&str] = &[
            "interface",
            "backend_interface",
            "xdp_mode",
            "metrics_listen",
            "ipip_source_v4",
            "ipip_source_v6",
            "conntrack_size",
            "conntrack_udp_idle",
            "conntrack_flood_rate",
            "hash_seed_file",
            "nat",
            "resolvers",
            "bgp",
            "flow_sync",
            "vips",
        ];
        let m = self.map(root, "", KEYS)?;
        let iface_name = |s: &str| {
            if s.is_empty() || s.len() > 15 || s.contains(['/', ' ']) {
                Err(format!("`{s}` is not an interface name"))
            } else {
                Ok(s.to_string())
            }
        };
        let interface = self.value(&m, "interface", iface_name);
        let backend_interface = self.value(&m, "backend_interface", iface_name);
        let nat = match m.get("nat") {
            Some(n) => self.nat(n, "nat").unwrap_or_default(),
            None => NatSettings::default(),
        };
        let xdp_mode = self
            .value(&m, "xdp_mode", |s| match s {
                "auto" => Ok(XdpModeSetting::Auto),
                "driver" => Ok(XdpModeSetting::Driver),
                "skb" => Ok(XdpModeSetting::Skb),
                _ => Err(format!("`{s}` is not one of auto, driver, skb")),
            })
            .unwrap_or_default();
        let metrics_listen = self.value(&m, "metrics_listen", |s| {
            s.parse().map_err(|_| format!("`{s}` is not an address:port (e.g. 127.0.0.1:9464)"))
        });
        let ipip_source_v4 = self
            .value(&m, "ipip_source_v4", |s| {
                parse_prefix(s)
                    .and_then(|p| if p.addr.is_ipv4() { Ok(p) } else { Err("must be an IPv4 prefix".into()) })
            })
            .unwrap_or(DEFAULT_IPIP_SOURCE_V4);
        let ipip_source_v6 = self
            .value(&m, "ipip_source_v6", |s| {
                parse_prefix(s).and_then(|p| {
                    if p.addr.is_ipv6() && p.len >= 96 - 32 {
                        Ok(p)
                    } else {
                        Err("must be an IPv6 prefix of /64 or longer".into())
                    }
                })
            })
            .unwrap_or(DEFAULT_IPIP_SOURCE_V6);
        let conntrack_size = self
            .value(&m, "conntrack_size", |s| match s.parse::<u32>() {
                Ok(n) if (1024..=1 << 27).contains(&n) => Ok(n),
                _ => Err(format!("`{s}` is not a number of flows from 1024 to 134217728")),
            })
            .unwrap_or(lb_common::maps::DEFAULT_CONNTRACK_SIZE);
        let conntrack_udp_idle = self
            .value(&m, "conntrack_udp_idle", |s| match parse_duration(s)? {
                d if d >= Duration::from_secs(1) => Ok(d),
                _ => Err(format!("`{s}` is shorter than 1s (the dataplane counts whole seconds)")),
            })
            .unwrap_or(DEFAULT_CONNTRACK_UDP_IDLE);
        let conntrack_flood_rate = self
            .value(&m, "conntrack_flood_rate", |s| match s.parse::<u32>() {
                Ok(n) if n == 0 || n >= 1000 => Ok(n),
                _ => Err(format!(
                    "`{s}` is not 0 (no limit) or a number of new flows per second per CPU of 1000 or more"
                )),
            })
            .unwrap_or(DEFAULT_CONNTRACK_FLOOD_RATE);
        let hash_seed_file = self.value(&m, "hash_seed_file", super::ha::read_key_file);

        let resolvers = match m.get("resolvers") {
            Some(n) => self.resolvers(n, "resolvers").unwrap_or_default(),
            None => Resolvers::default(),
        };
        let bgp = m.get("bgp").and_then(|n| self.bgp(n, "bgp"));
        let flow_sync = m.get("flow_sync").and_then(|n| self.flow_sync(n, "flow_sync"));
        let mut vips = Vec::new();
        if m.get("vips").is_none() {
            // An empty or cut-short file must never read as "no VIPs": every VIP
            // would be removed. A configuration without VIPs says `vips: []`.
            self.error(root.pos, "vips", "is required (write `vips: []` for a configuration without VIPs)");
        }
        if let Some(items) = self.list(&m, "vips") {
            for (i, item) in items.iter().enumerate() {
                if let Some(v) = self.vip(item, &format!("vips[{i}]")) {
                    vips.push(v);
                }
            }
        }
        self.cross_check(&vips);
        Some(Config {
            interface,
            backend_interface,
            nat,
            xdp_mode,
            metrics_listen,
            ipip_source_v4,
            ipip_source_v6,
            conntrack_size,
            conntrack_udp_idle,
            conntrack_flood_rate,
            hash_seed_file,
            resolvers,
            bgp,
            flow_sync,
            vips,
        })
    }

    fn resolvers(&mut self, node: &Node, path: &str) -> Option<Resolvers> {
        let m = self.map(node, path, &["nameservers", "interval", "timeout", "hold_obsolete"])?;
        let d = Resolvers::default();
        let mut nameservers = Vec::new();
        if let Some(items) = self.list(&m, "nameservers") {
            for item in items {
                let Some(s) = scalar(item) else {
                    self.error(item.pos, &m.path("nameservers"), "must be a list of addresses");
                    continue;
                };
                let parsed =
                    s.parse::<SocketAddr>().or_else(|_| s.parse::<IpAddr>().map(|a| SocketAddr::new(a, 53))).map_err(
                        |_| format!("`{s}` is not an address or address:port (e.g. 198.18.0.53, [2001:db8::53]:53)"),
                    );
                match parsed {
                    Ok(a) => nameservers.push(a),
                    Err(msg) => self.error(item.pos, &m.path("nameservers"), msg),
                }
            }
        }
        let interval = self.value(&m, "interval", parse_duration).unwrap_or(d.interval);
        let timeout = self.value(&m, "timeout", parse_duration).unwrap_or(d.timeout);
        if timeout > interval
            && let Some(n) = m.get("timeout")
        {
            self.error(n.pos, &m.path("timeout"), "must not be longer than interval");
        }
        let hold_obsolete = self.value(&m, "hold_obsolete", parse_duration).unwrap_or(d.hold_obsolete);
        Some(Resolvers { nameservers, interval, timeout, hold_obsolete })
    }

    fn nat(&mut self, node: &Node, path: &str) -> Option<NatSettings> {
        let m =
            self.map(node, path, &["table_size", "tcp_timeout", "udp_timeout", "closed_timeout", "embryonic_timeout"])?;
        let d = NatSettings::default();
        let tcp_timeout = self.value(&m, "tcp_timeout", parse_duration).unwrap_or(d.tcp_timeout);
        let udp_timeout = self.value(&m, "udp_timeout", parse_duration).unwrap_or(d.udp_timeout);
        // At least the first SYN retransmission (1 s), and no longer than an
        // answered connection would stay.
        let shortest_open = tcp_timeout.min(udp_timeout);
        let embryonic_timeout = self
            .value(&m, "embryonic_timeout", |s| match parse_duration(s)? {
                t if t < Duration::from_secs(1) => Err(format!("`{s}` is shorter than 1s")),
                t if t > shortest_open => {
                    Err(format!("`{s}` is longer than tcp_timeout or udp_timeout ({}s)", shortest_open.as_secs_f64()))
                }
                t => Ok(t),
            })
            .unwrap_or(d.embryonic_timeout.min(shortest_open));
        Some(NatSettings {
            table_size: self
                .value(&m, "table_size", |s| match s.parse::<u32>() {
                    Ok(n) if (1024..=1 << 26).contains(&n) => Ok(n),
                    _ => Err(format!("`{s}` is not a number of connections from 1024 to 67108864")),
                })
                .unwrap_or(d.table_size),
            tcp_timeout,
            udp_timeout,
            closed_timeout: self.value(&m, "closed_timeout", parse_duration).unwrap_or(d.closed_timeout),
            embryonic_timeout,
        })
    }

    /// Errors that involve more than one VIP.
    fn cross_check(&mut self, vips: &[VipConfig]) {
        let mut names: HashMap<&str, Pos> = HashMap::new();
        let mut keys: HashMap<(IpAddr, u16, Protocol), &str> = HashMap::new();
        for (i, v) in vips.iter().enumerate() {
            if let Some(first) = names.insert(&v.name, v.pos) {
                self.error(
                    v.pos,
                    &format!("vips[{i}].name"),
                    format!("`{}` is already the name of the VIP at line {}", v.name, first.line),
                );
            }
            if let Some(other) = keys.insert((v.address, v.port, v.protocol), &v.name) {
                self.error(
                    v.pos,
                    &format!("vips[{i}].address"),
                    format!("{}:{}/{} is already used by VIP `{other}`", v.address, v.port, v.protocol.name()),
                );
            }
        }
    }

    fn vip(&mut self, node: &Node, path: &str) -> Option<VipConfig> {
        const KEYS: &[&str] = &[
            "name",
            "address",
            "port",
            "protocol",
            "forwarding",
            "hash",
            "table_size",
            "backends",
            "health_check",
            "on_all_down",
            "sorry_server",
            "icmp_echo",
        ];
        let m = self.map(node, path, KEYS)?;
        let at = node.pos;
        let name = self.required(&m, at, "name", |s| {
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                Err(format!("`{s}` must be letters, digits, '-', '_' or '.'"))
            } else {
                Ok(s.to_string())
            }
        });
        let address = self.required(&m, at, "address", |s| {
            let a = s.parse::<IpAddr>().map_err(|_| format!("`{s}` is not an IPv4 or IPv6 address"))?;
            unicast(a, "a VIP")
        });
        let port = self.required(&m, at, "port", parse_port);
        let protocol = self
            .value(&m, "protocol", |s| match s {
                "tcp" => Ok(Protocol::Tcp),
                "udp" => Ok(Protocol::Udp),
                _ => Err(format!("`{s}` is not one of tcp, udp")),
            })
            .unwrap_or(Protocol::Tcp);
        let forwarding = self
            .value(&m, "forwarding", |s| match s {
                "dsr" => Ok(Forwarding::Dsr),
                "ipip" => Ok(Forwarding::Ipip),
                "nat" => Ok(Forwarding::Nat),
                _ => Err(format!("`{s}` is not one of dsr, ipip, nat")),
            })
            .unwrap_or(Forwarding::Dsr);
        let hash = self
            .value(&m, "hash", |s| match s {
                "five-tuple" => Ok(HashMode::FiveTuple),
                "source-ip" => Ok(HashMode::SourceIp),
                _ => Err(format!("`{s}` is not one of five-tuple, source-ip")),
            })
            .unwrap_or(HashMode::FiveTuple);
        let table_size = self
            .value(&m, "table_size", |s| match s.parse::<u32>() {
                Ok(n) if maglev::is_prime(n) && (251..=4_194_301).contains(&n) => Ok(n),
                Ok(n) if (251..=4_194_301).contains(&n) => {
                    let mut p = n;
                    while !maglev::is_prime(p) {
                        p += 1;
                    }
                    Err(format!("{n} is not prime (Maglev needs a prime; the next one is {p})"))
                }
                _ => Err(format!("`{s}` is not a prime from 251 to 4194301")),
            })
            .unwrap_or(maglev::DEFAULT_TABLE_SIZE);

        let mut backends = Vec::new();
        let mut named_backends: Vec<NamedBackend> = Vec::new();
        // Sets, not pairwise comparisons: a file may list a great many backends.
        let mut names_seen: std::collections::HashSet<(String, Option<u16>)> = std::collections::HashSet::new();
        match self.list(&m, "backends") {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    let bpath = format!("{path}.backends[{i}]");
                    match self.backend(item, &bpath, forwarding) {
                        Some(Backend::Address(b)) => backends.push(b),
                        Some(Backend::Name(b)) => {
                            if !names_seen.insert((b.name.clone(), b.port)) {
                                self.error(b.pos, &format!("{bpath}.address"), format!("{} is listed twice", b.name));
                            }
                            named_backends.push(b);
                        }
                        None => {}
                    }
                }
            }
            None if m.get("backends").is_none() => self.error(at, &format!("{path}.backends"), "is required"),
            None => {}
        }
        if let Some(address) = address {
            let mut seen = std::collections::HashSet::new();
            for (i, b) in backends.iter().enumerate() {
                if b.address.is_ipv4() != address.is_ipv4() {
                    self.error(
                        b.pos,
                        &format!("{path}.backends[{i}].address"),
                        format!("{} is not of the VIP's address family ({address})", b.address),
                    );
                }
                if !seen.insert((b.address, b.port)) {
                    self.error(
                        b.pos,
                        &format!("{path}.backends[{i}].address"),
                        format!("{} is listed twice", b.address),
                    );
                }
            }
        }
        let health_check = match m.get("health_check") {
            Some(n) => self.health_check(n, &m.path("health_check")).unwrap_or_default(),
            None => HealthCheck::default(),
        };
        let on_all_down = self.on_all_down(&m, address);
        let icmp_echo = self
            .value(&m, "icmp_echo", |s| match s {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(format!("`{s}` is not one of true, false")),
            })
            .unwrap_or(true);
        if let OnAllDown::SorryServer { address: sorry, port } = &on_all_down
            && backends.iter().any(|b| b.address == *sorry && b.port == *port)
            && let Some(n) = m.get("sorry_server")
        {
            self.error(n.pos, &m.path("sorry_server"), format!("{sorry} is already a backend of this VIP"));
        }
        Some(VipConfig {
            name: name?,
            address: address?,
            port: port?,
            protocol,
            forwarding,
            hash,
            table_size,
            backends,
            named_backends,
            health_check,
            on_all_down,
            icmp_echo,
            pos: at,
        })
    }

    fn on_all_down(&mut self, m: &Map, vip: Option<IpAddr>) -> OnAllDown {
        let mode = self.value(m, "on_all_down", |s| match s {
            "drop" | "pass" | "sorry_server" => Ok(s.to_string()),
            _ => Err(format!("`{s}` is not one of drop, pass, sorry_server")),
        });
        let server = m.get("sorry_server").and_then(|n| {
            let path = m.path("sorry_server");
            let sm = self.map(n, &path, &["address", "port"])?;
            let address = self.required(&sm, n.pos, "address", |s| {
                let a = s.parse::<IpAddr>().map_err(|_| format!("`{s}` is not an IP address"))?;
                let a = unicast(a, "a sorry server")?;
                match vip {
                    Some(v) if v.is_ipv4() != a.is_ipv4() => Err(format!("{a} is not of the VIP's address family")),
                    _ => Ok(a),
                }
            })?;
            Some((address, self.value(&sm, "port", parse_port), n.pos))
        });
        match (mode.as_deref(), server) {
            (Some("sorry_server"), Some((address, port, _))) => OnAllDown::SorryServer { address, port },
            (Some("sorry_server"), None) => {
                if m.get("sorry_server").is_none() {
                    let pos = m.get("on_all_down").map(|n| n.pos).unwrap_or_default();
                    self.error(pos, &m.path("sorry_server"), "is required when on_all_down is sorry_server");
                }
                OnAllDown::Drop
            }
            (Some("pass"), _) => OnAllDown::Pass,
            (_, Some((_, _, pos))) if mode.as_deref() != Some("sorry_server") => {
                self.error(pos, &m.path("sorry_server"), "is only used with `on_all_down: sorry_server`");
                OnAllDown::Drop
            }
            _ => OnAllDown::Drop,
        }
    }

    fn backend(&mut self, node: &Node, path: &str, forwarding: Forwarding) -> Option<Backend> {
        let m = self.map(node, path, &["address", "port", "weight"])?;
        let address = self.required(&m, node.pos, "address", |s| match s.parse::<IpAddr>() {
            Ok(a) => unicast(a, "a backend").map(Ok),
            Err(_) => match parse_dns_name(s) {
                Ok(()) => Ok(Err(s.trim_end_matches('.').to_ascii_lowercase())),
                Err(_) => Err(format!("`{s}` is not an IPv4 or IPv6 address or a DNS name")),
            },
        });
        let port = self.value(&m, "port", parse_port);
        if let (Some(_), Some(n), false) = (port, m.get("port"), forwarding == Forwarding::Nat) {
            // dsr and ipip deliver the packet as the client sent it.
            self.error(
                n.pos,
                &m.path("port"),
                format!(
                    "a backend port only applies to nat forwarding ({forwarding:?} keeps the VIP's port); \
                     use health_check.port to check another port"
                ),
            );
        }
        let weight = self
            .value(&m, "weight", |s| match s.parse::<u32>() {
                Ok(w) if w <= 65_535 => Ok(w),
                _ => Err(format!("`{s}` is not a weight from 0 (drain) to 65535")),
            })
            .unwrap_or(1);
        Some(match address? {
            Ok(address) => Backend::Address(BackendConfig { address, port, weight, pos: node.pos }),
            Err(name) => Backend::Name(NamedBackend { name, port, weight, pos: node.pos }),
        })
    }

    fn health_check(&mut self, node: &Node, path: &str) -> Option<HealthCheck> {
        const KEYS: &[&str] = &[
            "type",
            "port",
            "path",
            "host",
            "expect_status",
            "expect_body",
            "sni",
            "ca_file",
            "send",
            "expect",
            "send_hex",
            "expect_hex",
            "command",
            "interval",
            "timeout",
            "rise",
            "fall",
            "source",
            "initial_state",
        ];
        /// Which keys belong to which check types, for "only applies to" errors.
        const ONLY: &[(&str, &[&str])] = &[
            ("path", &["http", "https"]),
            ("host", &["http", "https"]),
            ("expect_status", &["http", "https"]),
            ("expect_body", &["http", "https"]),
            ("sni", &["https"]),
            ("ca_file", &["https"]),
            ("send", &["tcp"]),
            ("expect", &["tcp"]),
            ("send_hex", &["tcp"]),
            ("expect_hex", &["tcp"]),
            ("command", &["exec"]),
        ];
        let m = self.map(node, path, KEYS)?;
        let d = HealthCheck::default();
        let kind = self
            .value(&m, "type", |s| match s {
                "tcp" | "http" | "https" | "exec" | "none" => Ok(s.to_string()),
                _ => Err(format!("`{s}` is not one of tcp, http, https, exec, none")),
            })
            .unwrap_or_else(|| "tcp".into());
        for (key, kinds) in ONLY {
            if !kinds.contains(&kind.as_str())
                && let Some(n) = m.get(key)
            {
                self.error(n.pos, &m.path(key), format!("only applies to checks of type {}", kinds.join(" or ")));
            }
        }
        let kind = match kind.as_str() {
            "http" | "https" => {
                let path_value = self
                    .value(&m, "path", |s| {
                        if s.starts_with('/') && !s.contains([' ', '\r', '\n']) {
                            Ok(s.to_string())
                        } else {
                            Err(format!("`{s}` must start with / and contain no spaces"))
                        }
                    })
                    .unwrap_or_else(|| "/".into());
                let host = self.value(&m, "host", |s| {
                    if s.is_empty() || s.contains([' ', '\r', '\n']) {
                        Err(format!("`{s}` is not a host name"))
                    } else {
                        Ok(s.to_string())
                    }
                });
                let expect_status = self.expect_status(&m).unwrap_or(StatusMatch(vec![(200, 399)]));
                let expect_body = self.value(&m, "expect_body", |s| Ok(s.to_string()));
                let tls = (kind == "https").then(|| self.tls_check(&m, host.as_deref()));
                CheckKind::Http { path: path_value, host, expect_status, expect_body, tls }
            }
            "exec" => {
                let command = match m.get("command") {
                    None => {
                        self.error(
                            node.pos,
                            &m.path("command"),
                            "is required for exec checks (a list: [program, args...])",
                        );
                        Vec::new()
                    }
                    Some(n) => match &n.value {
                        Value::Seq(items) if !items.is_empty() => {
                            let argv: Vec<String> = items.iter().filter_map(scalar).map(str::to_string).collect();
                            // Checks run with a cleared environment: no PATH lookup decides what runs.
                            if argv.len() != items.len() || !argv[0].starts_with('/') {
                                self.error(
                                    items[0].pos,
                                    &m.path("command"),
                                    format!(
                                        "must be a list of words starting with an absolute path (e.g. [/bin/sh, -c, \"...\"]), not `{}`",
                                        argv.first().map_or("", String::as_str)
                                    ),
                                );
                            }
                            argv
                        }
                        _ => {
                            self.error(n.pos, &m.path("command"), "must be a non-empty list: [program, args...]");
                            Vec::new()
                        }
                    },
                };
                CheckKind::Exec { command }
            }
            "tcp" => {
                let send = self.bytes(&m, "send", "send_hex");
                let expect = self.bytes(&m, "expect", "expect_hex");
                CheckKind::Tcp { send, expect }
            }
            _ => CheckKind::None,
        };
        let interval = self.value(&m, "interval", parse_duration).unwrap_or(d.interval);
        let timeout = self.value(&m, "timeout", parse_duration).unwrap_or(d.timeout);
        if timeout > interval
            && let Some(n) = m.get("timeout")
        {
            self.error(n.pos, &m.path("timeout"), "must not be longer than interval");
        }
        let count = |s: &str| match s.parse::<u32>() {
            Ok(n) if (1..=100).contains(&n) => Ok(n),
            _ => Err(format!("`{s}` is not a count from 1 to 100")),
        };
        let rise = self.value(&m, "rise", count).unwrap_or(d.rise);
        let fall = self.value(&m, "fall", count).unwrap_or(d.fall);
        let port = self.value(&m, "port", parse_port);
        let source =
            self.value(&m, "source", |s| s.parse::<IpAddr>().map_err(|_| format!("`{s}` is not an IP address")));
        let initial_state = self
            .value(&m, "initial_state", |s| match s {
                "down" => Ok(InitialState::Down),
                "up" => Ok(InitialState::Up),
                _ => Err(format!("`{s}` is not one of down, up")),
            })
            .unwrap_or_default();
        Some(HealthCheck { kind, port, interval, timeout, rise, fall, source, initial_state })
    }

    /// `https` settings: SNI (default: `host`, when it is a name) and the CA file.
    fn tls_check(&mut self, m: &Map, host: Option<&str>) -> TlsCheck {
        let sni = self.value(m, "sni", |s| parse_dns_name(s).map(|()| s.to_string())).or_else(|| {
            host.map(|h| h.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map_or(h, |(n, _)| n))
                .filter(|h| parse_dns_name(h).is_ok())
                .map(str::to_string)
        });
        let ca_file = self.value(m, "ca_file", read_ca_file);
        TlsCheck { sni, ca_file }
    }

    /// Bytes given as text (`key`, YAML escapes such as \r\n allowed) or as
    /// hex (`hex_key`, for binary protocols); not both.
    fn bytes(&mut self, m: &Map, key: &str, hex_key: &str) -> Option<Vec<u8>> {
        let text = self.value(m, key, |s| {
            if s.is_empty() { Err("must not be empty".to_string()) } else { Ok(s.as_bytes().to_vec()) }
        });
        let hex = self.value(m, hex_key, parse_hex);
        if let (Some(_), Some(_), Some(n)) = (&text, &hex, m.get(hex_key)) {
            self.error(n.pos, &m.path(hex_key), format!("give either {key} or {hex_key}, not both"));
        }
        text.or(hex)
    }

    fn expect_status(&mut self, m: &Map) -> Option<StatusMatch> {
        let node = m.get("expect_status")?;
        let path = m.path("expect_status");
        let items: Vec<&Node> = match &node.value {
            Value::Seq(items) => items.iter().collect(),
            _ => vec![node],
        };
        let mut ranges = Vec::new();
        for item in items {
            match scalar(item).and_then(parse_status) {
                Some(r) => ranges.push(r),
                None => {
                    self.error(item.pos, &path, "must be a status code, a list of them, or a range such as 200-399")
                }
            }
        }
        (!ranges.is_empty()).then_some(StatusMatch(ranges))
    }
}

/// A CA file: an absolute path (a service's working directory is `/`) to a
/// regular file of PEM certificates, read whole now so a check never waits on it.
fn read_ca_file(s: &str) -> Result<CaFile, String> {
    const LIMIT: u64 = 1 << 20;
    let path = std::path::PathBuf::from(s);
    if !path.is_absolute() {
        return Err(format!("`{s}` must be an absolute path"));
    }
    let meta = std::fs::metadata(&path).map_err(|e| format!("cannot read {s}: {e}"))?;
    if !meta.is_file() || meta.len() > LIMIT {
        return Err(format!("{s} must be a regular file of PEM certificates, at most 1 MiB"));
    }
    let mut pem = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::fs::File::open(&path).map_err(|e| format!("cannot read {s}: {e}"))?, LIMIT),
        &mut pem,
    )
    .map_err(|e| format!("cannot read {s}: {e}"))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{s} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(CaFile { path, pem })
}

/// An address that can be a VIP or a server: one host, reachable on a
/// network. 0.0.0.0, broadcast, multicast and loopback addresses cannot.
pub(super) fn unicast(a: IpAddr, what: &str) -> Result<IpAddr, String> {
    let why = match a {
        IpAddr::V4(v) if v.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v) if v.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(v) if v.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v) if v.is_loopback() => Some("a loopback address (this host only)"),
        IpAddr::V6(v) if v.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v) if v.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v) if v.is_loopback() => Some("a loopback address (this host only)"),
        IpAddr::V6(v) if v.to_ipv4_mapped().is_some() => Some("an IPv4-mapped address (write the IPv4 address)"),
        _ => None,
    };
    match why {
        Some(why) => Err(format!("{a} cannot be {what}: it is {why}")),
        None => Ok(a),
    }
}

/// `0a0d ff`: pairs of hex digits, spaces allowed between them.
fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return Err(format!("`{s}` is not an even number of hex digits (e.g. 0d0a)"));
    }
    digits
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("`{s}` is not hex (0-9, a-f)"))
        })
        .collect()
}

/// A DNS name as RFC 1123 allows it: labels of letters, digits and '-' (and
/// '_', found in service names), up to 253 characters.
pub fn parse_dns_name(s: &str) -> Result<(), String> {
    let s = s.strip_suffix('.').unwrap_or(s);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.is_empty() || s.len() > 253 || !s.split('.').all(label_ok) || s.parse::<IpAddr>().is_ok() {
        return Err(format!("`{s}` is not a DNS name"));
    }
    // No top-level domain is a number (RFC 3696): 198.18.0.999 is a mistyped address.
    if s.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(format!("`{s}` is not a DNS name (it ends in a number)"));
    }
    Ok(())
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("`{s}` is not a port from 1 to 65535")),
    }
}
