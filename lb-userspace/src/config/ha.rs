//! The sections that make one node part of a highly available group:
//! `bgp:` (announce the VIP addresses through BIRD) and `flow_sync:` (share
//! flows with the other nodes).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    fields::{Fields, parse_duration, scalar, unicast},
    yaml::Node,
};

/// `bgp:` — every VIP address with a healthy backend is announced as a host
/// route (/32, /128) through the BIRD routing daemon: xdplb writes BIRD's
/// static protocols `xdplb_vips4` and `xdplb_vips6` into `routes_file`
/// (which bird.conf includes) and asks BIRD to reconfigure over its control
/// socket. Routes are withdrawn when a VIP address loses its last healthy
/// backend, when the node is drained (`xdplb drain`), and at stop before the
/// controller exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpSettings {
    /// The file xdplb writes; None: `STATE_DIR/IFACE.bird.conf`.
    pub routes_file: Option<PathBuf>,
    /// BIRD's control socket (`bird -s`).
    pub bird_socket: PathBuf,
    /// After start, announce only once attached, health-checked and this
    /// long up (0: at once).
    pub warmup: Duration,
    /// At stop: after withdrawing, wait this long (the routers converge)
    /// before the controller exits or detaches.
    pub withdraw_wait: Duration,
}

pub const DEFAULT_BIRD_SOCKET: &str = "/run/bird/bird.ctl";

impl Default for BgpSettings {
    fn default() -> Self {
        Self {
            routes_file: None,
            bird_socket: PathBuf::from(DEFAULT_BIRD_SOCKET),
            warmup: Duration::ZERO,
            withdraw_wait: Duration::from_secs(2),
        }
    }
}

/// `flow_sync:` — each node sends its peers the tracked flows whose backend
/// is not the one Maglev would choose now (the backend set changed since the
/// flow began, or its backend drains), over UDP authenticated with a shared
/// key; peers install them, so a connection the routers move to another
/// node keeps its backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowSyncSettings {
    /// Where this node receives its peers' flows (and sends from).
    pub listen: SocketAddr,
    /// The other nodes' `listen` addresses.
    pub peers: Vec<SocketAddr>,
    /// The shared secret (HMAC-SHA256), identical on every node.
    pub key: SyncKey,
    /// Every flow that deviates is sent again this often, so a node that
    /// restarted or lost entries learns them back.
    pub refresh: Duration,
    /// At most this many flow records sent per second (bounds the channel).
    pub max_rate: u32,
}

/// A key file as read when the configuration was loaded.
#[derive(Clone, PartialEq, Eq)]
pub struct SyncKey {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for SyncKey {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SyncKey({}, {} bytes)", self.path.display(), self.bytes.len())
    }
}

pub const DEFAULT_SYNC_REFRESH: Duration = Duration::from_secs(10);
pub const DEFAULT_SYNC_MAX_RATE: u32 = 100_000;

/// Reads a shared key: an absolute path to a regular file that only its
/// owner can read, 16 bytes to 4 KiB (trailing whitespace ignored).
pub fn read_key_file(s: &str) -> Result<SyncKey, String> {
    use std::os::unix::fs::PermissionsExt as _;
    const LIMIT: u64 = 4096;
    let path = PathBuf::from(s);
    if !path.is_absolute() {
        return Err(format!("`{s}` must be an absolute path"));
    }
    let meta = std::fs::metadata(&path).map_err(|e| format!("cannot read {s}: {e}"))?;
    if !meta.is_file() || meta.len() > LIMIT {
        return Err(format!("{s} must be a regular file of at most 4 KiB"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{s} can be read by others: `chmod 600 {s}`"));
    }
    let mut bytes = std::fs::read(&path).map_err(|e| format!("cannot read {s}: {e}"))?;
    while bytes.last().is_some_and(u8::is_ascii_whitespace) {
        bytes.pop();
    }
    if bytes.len() < 16 {
        return Err(format!(
            "{s} holds {} bytes; a key needs at least 16 (e.g. `head -c 32 /dev/urandom | base64 > {s}`)",
            bytes.len()
        ));
    }
    Ok(SyncKey { path, bytes })
}

fn absolute_path(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    if p.is_absolute() { Ok(p.to_path_buf()) } else { Err(format!("`{s}` must be an absolute path")) }
}

fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr =
        s.parse().map_err(|_| format!("`{s}` is not an address:port (e.g. 198.18.0.11:7946, [2001:db8::11]:7946)"))?;
    unicast(a.ip(), "a flow sync address")?;
    if a.port() == 0 {
        return Err(format!("`{s}` needs a port other than 0"));
    }
    Ok(a)
}

impl Fields<'_> {
    pub(super) fn bgp(&mut self, node: &Node, path: &str) -> Option<BgpSettings> {
        let m = self.map(node, path, &["routes_file", "bird_socket", "warmup", "withdraw_wait"])?;
        let d = BgpSettings::default();
        let zero_or =
            |s: &str| if s.trim() == "0" || s.trim() == "0s" { Ok(Duration::ZERO) } else { parse_duration(s) };
        Some(BgpSettings {
            routes_file: self.value(&m, "routes_file", absolute_path),
            bird_socket: self.value(&m, "bird_socket", absolute_path).unwrap_or(d.bird_socket),
            warmup: self.value(&m, "warmup", zero_or).unwrap_or(d.warmup),
            withdraw_wait: self.value(&m, "withdraw_wait", zero_or).unwrap_or(d.withdraw_wait),
        })
    }

    pub(super) fn flow_sync(&mut self, node: &Node, path: &str) -> Option<FlowSyncSettings> {
        let m = self.map(node, path, &["listen", "peers", "key_file", "refresh", "max_rate"])?;
        let listen = self.required(&m, node.pos, "listen", socket_addr);
        let key = self.required(&m, node.pos, "key_file", read_key_file);
        let mut peers = Vec::new();
        if m.get("peers").is_none() {
            self.error(node.pos, &m.path("peers"), "is required (the other nodes' listen addresses)");
        }
        if let (Some(items), Some(at)) = (self.list(&m, "peers"), m.get("peers").map(|n| n.pos)) {
            for item in items {
                let parsed =
                    scalar(item).ok_or_else(|| "must be a list of address:port".to_string()).and_then(socket_addr);
                match parsed {
                    Ok(a) if Some(a) == listen => {
                        self.error(item.pos, &m.path("peers"), format!("{a} is this node's own listen address"))
                    }
                    Ok(a) if peers.contains(&a) => {
                        self.error(item.pos, &m.path("peers"), format!("{a} is listed twice"))
                    }
                    Ok(a) => peers.push(a),
                    Err(msg) => self.error(item.pos, &m.path("peers"), msg),
                }
            }
            if items.is_empty() {
                self.error(at, &m.path("peers"), "needs at least one peer");
            }
        }
        let refresh = self.value(&m, "refresh", parse_duration).unwrap_or(DEFAULT_SYNC_REFRESH);
        let max_rate = self
            .value(&m, "max_rate", |s| match s.parse::<u32>() {
                Ok(n) if (100..=10_000_000).contains(&n) => Ok(n),
                _ => Err(format!("`{s}` is not a number of flows per second from 100 to 10000000")),
            })
            .unwrap_or(DEFAULT_SYNC_MAX_RATE);
        Some(FlowSyncSettings { listen: listen?, peers, key: key?, refresh, max_rate })
    }
}
