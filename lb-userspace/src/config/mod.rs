//! The YAML configuration: file → validated model, with every error located.
//!
//! `load` reads and validates the whole file and either returns a `Config`
//! or every problem found, each as `FILE:LINE:COL: field: what is wrong`.
//! Nothing here touches the kernel.

mod fields;
mod ha;

pub use ha::{BgpSettings, FlowSyncSettings, SyncKey};
pub mod watch;
pub mod yaml;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use fields::Fields;
pub use yaml::Pos;

use crate::reconcile::{Forwarding, HashMode};

/// One problem in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub pos: Pos,
    /// Path of the field, e.g. `vips[0].backends[1].address`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}: {}", self.file, self.pos.line, self.pos.col, self.field, self.message)
    }
}

/// Every error of one file; displays one per line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpModeSetting {
    /// Native (driver) mode, falling back to generic (skb) mode with a log line.
    #[default]
    Auto,
    Driver,
    Skb,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::maps::PROTO_TCP,
            Protocol::Udp => lb_common::maps::PROTO_UDP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Which HTTP status codes an `http` check accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusMatch(pub Vec<(u16, u16)>);

impl StatusMatch {
    pub fn matches(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

/// How an `https` check speaks TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCheck {
    /// Server name sent in the TLS handshake (SNI) and verified against the
    /// certificate; none: no SNI, and a verified certificate must name the IP.
    pub sni: Option<String>,
    /// Verify the server's certificate chain against these CAs (PEM file);
    /// none: the connection is encrypted but the certificate is not checked,
    /// as HAProxy's `check-ssl verify none`.
    pub ca_file: Option<CaFile>,
}

/// A CA file as read when the configuration was loaded: a reload that finds
/// it changed restarts the checks that use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaFile {
    pub path: std::path::PathBuf,
    pub pem: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// Connect to the port; optionally send bytes and expect bytes in the
    /// answer (a banner, a PONG), as HAProxy's tcp-check send/expect.
    Tcp { send: Option<Vec<u8>>, expect: Option<Vec<u8>> },
    /// HTTP/1.1 GET, over TLS when `tls` is set (type `https`).
    Http {
        path: String,
        host: Option<String>,
        expect_status: StatusMatch,
        expect_body: Option<String>,
        tls: Option<TlsCheck>,
    },
    /// Run a command; exit 0 is healthy.
    Exec { command: Vec<String> },
    /// Always healthy.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InitialState {
    /// Down until `rise` checks pass: a restart never sends traffic to a dead server.
    #[default]
    Down,
    Up,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Port to check; default the backend's port.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes to go up.
    pub rise: u32,
    /// Consecutive failures to go down.
    pub fall: u32,
    /// Source address to check from.
    pub source: Option<IpAddr>,
    pub initial_state: InitialState,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp { send: None, expect: None },
            port: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            source: None,
            initial_state: InitialState::Down,
        }
    }
}

/// What a VIP does when none of its backends is up.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum OnAllDown {
    /// Drop the VIP's new flows (counted as drop_no_backend).
    #[default]
    Drop,
    /// Pass them to the load balancer's own stack.
    Pass,
    /// Send them to a fallback server, as keepalived's sorry_server.
    SorryServer { address: IpAddr, port: Option<u16> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: IpAddr,
    pub port: Option<u16>,
    pub weight: u32,
    pub pos: Pos,
}

/// A backend given by DNS name, as HAProxy's `resolvers`: every address
/// the name resolves to (of the VIP's family) is a backend of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedBackend {
    pub name: String,
    pub port: Option<u16>,
    pub weight: u32,
    pub pos: Pos,
}

/// How backend names are resolved (`resolvers:`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolvers {
    /// DNS servers to ask; empty: the system's (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// Every name is resolved again this often.
    pub interval: Duration,
    /// One query's time limit.
    pub timeout: Duration,
    /// An address that left the answer stays, draining (weight 0: its
    /// established flows go on, it gets no new ones), this long before it is
    /// removed; HAProxy's `hold obsolete`.
    pub hold_obsolete: Duration,
}

impl Default for Resolvers {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            hold_obsolete: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub hash: HashMode,
    pub table_size: u32,
    pub backends: Vec<BackendConfig>,
    /// Backends by DNS name; the daemon turns their addresses into `backends`.
    pub named_backends: Vec<NamedBackend>,
    pub health_check: HealthCheck,
    pub on_all_down: OnAllDown,
    /// Answer ICMP echo requests to the VIP's address (`icmp_echo`, default
    /// true); an address is answered if any of its VIPs allows it.
    pub icmp_echo: bool,
    pub pos: Pos,
}

/// An address prefix, for the IP-in-IP outer sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

/// NAT's connection table (see `NAT_FLOWS` in the dataplane).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSettings {
    /// Connections tracked at most; when full, new ones are refused and
    /// established ones keep their entries.
    pub table_size: u32,
    /// An open TCP connection without packets for this long is forgotten.
    pub tcp_timeout: Duration,
    /// A UDP flow without packets for this long is forgotten.
    pub udp_timeout: Duration,
    /// A TCP connection that saw FIN or RST is forgotten this long after its last packet.
    pub closed_timeout: Duration,
    /// A connection whose backend never answered (a SYN, or UDP datagrams,
    /// with no reply yet) is forgotten this long after its last packet:
    /// spoofed packets hold the table only this long.
    pub embryonic_timeout: Duration,
}

impl Default for NatSettings {
    fn default() -> Self {
        // IPVS's defaults for tcp and udp; a short linger after FIN/RST.
        Self {
            table_size: lb_common::maps::DEFAULT_NAT_TABLE_SIZE,
            tcp_timeout: Duration::from_secs(900),
            udp_timeout: Duration::from_secs(300),
            closed_timeout: Duration::from_secs(10),
            // Several SYN retransmissions' worth (1 s, then 2 s, RFC 6298).
            embryonic_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub interface: Option<String>,
    /// NAT: the interface toward the backends (two-armed); absent = one-armed.
    pub backend_interface: Option<String>,
    pub nat: NatSettings,
    pub xdp_mode: XdpModeSetting,
    pub metrics_listen: Option<SocketAddr>,
    /// Outer sources of IPv4-in-IPv4 packets: the flow hash fills the host bits.
    pub ipip_source_v4: Prefix,
    pub ipip_source_v6: Prefix,
    pub conntrack_size: u32,
    /// A tracked UDP flow idle this long is chosen again.
    pub conntrack_udp_idle: Duration,
    /// New flows one CPU enters into the connection table per second at
    /// most (flood mode past it); 0: no limit.
    pub conntrack_flood_rate: u32,
    /// The flow hash's secret seed, identical on every node of a site
    /// (`hash_seed_file`); without it, derived from the flow sync key.
    pub hash_seed_file: Option<SyncKey>,
    pub resolvers: Resolvers,
    /// Announce the VIP addresses over BGP through BIRD (`bgp:`).
    pub bgp: Option<BgpSettings>,
    /// Share flows that Maglev alone would move with the other nodes (`flow_sync:`).
    pub flow_sync: Option<FlowSyncSettings>,
    pub vips: Vec<VipConfig>,
}

/// UDP flows idle this long are chosen again (Katran, Cilium: 30 s too).
pub const DEFAULT_CONNTRACK_UDP_IDLE: Duration = Duration::from_secs(30);
/// New flows tracked per CPU per second before flood mode (Katran's
/// `max_conn_rate` default).
pub const DEFAULT_CONNTRACK_FLOOD_RATE: u32 = 125_000;

pub const DEFAULT_IPIP_SOURCE_V4: Prefix = Prefix { addr: IpAddr::V4(Ipv4Addr::new(172, 16, 0, 0)), len: 16 };
/// 100::/64 is the discard-only prefix (RFC 6666): never a real source.
pub const DEFAULT_IPIP_SOURCE_V6: Prefix =
    Prefix { addr: IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0)), len: 64 };

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = read_file(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            pos: Pos { line: 0, col: 0 },
            field: "file".into(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(&file, &text)
}

/// Reads a configuration file once, bounded: a path to a device or a runaway
/// file is an error (too large for `parse`), not a hang.
pub fn read_file(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::fs::File::open(path)?, yaml::MAX_BYTES as u64 + 1),
        &mut text,
    )?;
    Ok(text)
}

/// Validates configuration text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    let root = yaml::parse(text).map_err(|(pos, message)| {
        ConfigErrors(vec![ConfigError { file: file.into(), pos, field: "yaml".into(), message }])
    })?;
    let mut f = Fields::new(file);
    let config = f.config(&root);
    match config {
        Some(c) if f.errors.is_empty() => Ok(c),
        _ => Err(ConfigErrors(f.errors)),
    }
}

#[cfg(test)]
mod tests;
