//! What `xdplb status` shows and `/metrics` exports: a snapshot the running
//! controller refreshes every second and writes, atomically, to
//! `STATE_DIR/IFACE.json`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub pid: u32,
    pub interface: String,
    pub config_file: String,
    /// How the program is attached: driver, skb, or adopted from a previous run.
    pub xdp_mode: String,
    pub updated_unix_ms: u64,
    /// Incremented by every configuration that was applied.
    pub config_generation: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// The errors of the last rejected configuration, if the last reload failed.
    pub last_reload_errors: Vec<String>,
    /// What the last applied reload changed (VIPs and backends added, removed, reweighted).
    #[serde(default)]
    pub last_reload_changes: Vec<String>,
    pub flows_tracked: u64,
    /// NAT connections tracked, and those forgotten after going idle or closing.
    pub nat_connections: u64,
    pub nat_evicted_idle: u64,
    pub nat_evicted_closed: u64,
    /// Packets by reason (see lb_common::reasons), since the dataplane was loaded.
    pub reasons: BTreeMap<String, u64>,
    pub vips: Vec<VipStatus>,
    /// Backend names and what they resolve to.
    #[serde(default)]
    pub dns: Vec<DnsStatus>,
    /// Applies of the desired state that failed (each VIP that failed once
    /// per attempt counts one attempt); the controller retries every second.
    #[serde(default)]
    pub apply_failures: u64,
    /// Why the maps do not hold the desired state yet; empty when they do.
    #[serde(default)]
    pub apply_pending: String,
    /// Map entries found changed behind the controller's back, and rewritten.
    #[serde(default)]
    pub drift_repairs: u64,
    /// Drained by `xdplb drain` (no VIP announced, keepalived's track file
    /// says fault) until `xdplb undrain`.
    #[serde(default)]
    pub node_drained: bool,
    /// BGP announcements through BIRD, when `bgp:` is configured.
    #[serde(default)]
    pub bgp: Option<BgpStatus>,
    /// The flow sync channel, when `flow_sync:` is configured.
    #[serde(default)]
    pub flow_sync: Option<SyncStatus>,
}

/// BGP through BIRD: what is announced, what is not and why.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BgpStatus {
    /// The routes file xdplb writes and bird.conf includes.
    pub routes_file: String,
    pub bird_socket: String,
    /// Empty when BIRD took the last routes; else why not (retried every second).
    pub bird_error: String,
    /// When BIRD last took a change of routes (unix ms; 0: never).
    pub configured_unix_ms: u64,
    /// Reconfigurations BIRD refused or could not be asked for.
    pub configure_failures: u64,
    pub routes: Vec<RouteStatus>,
}

/// One VIP address's host route.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteStatus {
    /// e.g. 198.18.0.10/32
    pub prefix: String,
    /// In the routes file BIRD has read: announced to its BGP peers.
    pub announced: bool,
    /// Why it is (or is not) announced: "healthy backends", "no healthy
    /// backend", "node drained", "warming up", "stopping".
    pub why: String,
    /// Since when it has been announced or withdrawn (unix ms).
    pub since_unix_ms: u64,
}

/// The flow sync channel's counters, since the controller started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncStatus {
    pub listen: String,
    pub peers: Vec<PeerStatus>,
    /// Flows that deviate from the current Maglev choice at the last walk.
    pub deviating_flows: u64,
    pub records_sent: u64,
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub records_received: u64,
    /// Flows installed in this node's flow table from peers' records.
    pub flows_installed: u64,
    /// Records not installed, by why (unknown VIP, unknown backend, backend
    /// down, rate limit).
    pub records_rejected: BTreeMap<String, u64>,
    /// Datagrams refused: bad key, replayed, too old, from an unknown peer, malformed.
    pub datagrams_refused: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub address: String,
    /// When a valid datagram last came from this peer (unix ms; 0: never).
    pub last_heard_unix_ms: u64,
    pub records_received: u64,
    /// Why sending to it last failed, empty if it did not.
    pub send_error: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsStatus {
    pub name: String,
    /// The addresses of the last good answer: each a backend.
    pub addresses: Vec<String>,
    /// Addresses that left the answer, draining until `hold_obsolete` ends.
    pub draining: Vec<String>,
    /// Why the last resolution failed; empty when it succeeded.
    pub last_error: String,
    /// When the last good answer came (0: never).
    pub resolved_unix_ms: u64,
    pub failures: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VipStatus {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub forwarding: String,
    pub packets: u64,
    pub bytes: u64,
    pub packets_per_second: f64,
    pub bits_per_second: f64,
    pub backends: Vec<BackendStatus>,
    /// How new flows are placed: `maglev five-tuple` or `maglev source-ip`.
    #[serde(default)]
    pub scheduler: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub address: String,
    pub port: u16,
    /// The weight in effect: the file's, or a runtime override's.
    pub weight: u32,
    /// up or down, from the health checker.
    pub health: String,
    /// active (new and existing flows), draining (existing only), down, or
    /// unresolved (no next-hop MAC), sorry (the fallback server), maint (no
    /// traffic by a runtime override, checks go on).
    pub state: String,
    pub last_check: String,
    /// Health changes seen by the checker.
    pub transitions: u64,
    pub next_hop_mac: String,
    pub packets: u64,
    pub bytes: u64,
    pub packets_per_second: f64,
    #[serde(default)]
    pub bits_per_second: f64,
    /// Flows in the connection table that point to this backend.
    pub flows: u64,
    /// The weight the file gives it.
    #[serde(default)]
    pub configured_weight: u32,
    /// The runtime override in force (`weight 5 (file: 1)`, `drain`,
    /// `maint`), empty when none: set by `xdplb set weight|drain|maint`.
    #[serde(default)]
    pub r#override: String,
    /// When this controller saw the backend enter its current `state` (for a
    /// state it found at start: when it started); 0 when not known.
    #[serde(default)]
    pub state_since_unix_ms: u64,
}

/// A status read straight from a pinned dataplane, for when no controller
/// runs (after `kill -9`, say): counters, VIPs and backends as the maps hold
/// them; names and health checks are the controller's and are not there.
pub fn from_pinned(dp: &crate::dataplane::Dataplane, iface: &str) -> Status {
    use lb_common::maps::{BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UNUSED, FWD_DSR, FWD_IPIP};
    let mut vips: Vec<(lb_common::maps::VipKey, lb_common::maps::VipMeta)> = dp.vips();
    vips.sort_by_key(|(_, m)| m.vip_id);
    let mut backends_by_vip: std::collections::HashMap<u32, Vec<BackendStatus>> = Default::default();
    for id in 0..dp.sizes().max_backends {
        let Ok(b) = dp.backend(id) else { continue };
        if b.state == BACKEND_UNUSED {
            continue;
        }
        let c = dp.backend_counter(id).unwrap_or_default();
        let state = match b.state {
            BACKEND_ACTIVE => "active",
            BACKEND_DRAINING => "draining",
            BACKEND_DOWN => "down",
            _ => "unknown",
        };
        backends_by_vip.entry(b.vip_id).or_default().push(BackendStatus {
            address: crate::addr::from_words(&b.addr, b.family).to_string(),
            port: u16::from_be(b.port),
            health: if b.state == BACKEND_DOWN { "down".into() } else { "up".into() },
            state: state.into(),
            last_check: "(no controller running)".into(),
            next_hop_mac: crate::addr::fmt_mac(&b.mac),
            packets: c.packets,
            bytes: c.bytes,
            ..Default::default()
        });
    }
    let reasons = dp.reasons().unwrap_or([0; lb_common::reasons::COUNT as usize]);
    Status {
        interface: iface.to_string(),
        xdp_mode: "pinned (no controller running)".into(),
        reasons: lb_common::reasons::NAMES.iter().zip(reasons).map(|(n, c)| (n.to_string(), c)).collect(),
        vips: vips
            .into_iter()
            .map(|(key, meta)| {
                let c = dp.vip_counter(meta.vip_id).unwrap_or_default();
                VipStatus {
                    name: format!("vip{}", meta.vip_id),
                    address: crate::addr::from_words(&key.addr, key.family).to_string(),
                    port: u16::from_be(key.port),
                    protocol: if key.protocol == lb_common::maps::PROTO_UDP { "udp".into() } else { "tcp".into() },
                    forwarding: match meta.forwarding {
                        FWD_DSR => "dsr".into(),
                        FWD_IPIP => "ipip".into(),
                        _ => "nat".into(),
                    },
                    packets: c.packets,
                    bytes: c.bytes,
                    backends: backends_by_vip.remove(&meta.vip_id).unwrap_or_default(),
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

pub fn path(state_dir: &Path, iface: &str) -> PathBuf {
    state_dir.join(format!("{iface}.json"))
}

/// Writes `status` to STATE_DIR/IFACE.json: into a new file of its own
/// (O_EXCL, O_NOFOLLOW: never through a symlink someone left there), renamed
/// over the old one. Refuses a state directory that other users can write.
pub fn write(state_dir: &Path, status: &Status) -> Result<()> {
    crate::runtime::check_state_dir(state_dir)?;
    let dest = path(state_dir, &status.interface);
    let tmp = state_dir.join(format!(".{}.json.{}.tmp", status.interface, std::process::id()));
    // Streamed to the file: with 100,000 backends the text is tens of MiB,
    // never held in memory at once.
    replace_file_with(&dest, &tmp, |f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 16, f);
        serde_json::to_writer_pretty(&mut w, status)?;
        std::io::Write::flush(&mut w)
    })
}

/// Replaces `dest` with `bytes`: written into `tmp`, a new file of its own
/// (O_EXCL, O_NOFOLLOW: never through a symlink someone left there), then
/// renamed over `dest`, so a reader sees the old file or the new one. Mode
/// 0644 whatever the umask: other users' programs read these files (`xdplb
/// status`, BIRD, keepalived).
pub(crate) fn replace_file(dest: &Path, tmp: &Path, bytes: &[u8]) -> Result<()> {
    replace_file_with(dest, tmp, |f| std::io::Write::write_all(f, bytes))
}

/// `replace_file`, with what `write` writes to the new file.
fn replace_file_with(
    dest: &Path,
    tmp: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    std::fs::remove_file(tmp).ok();
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)
        .and_then(|mut f| {
            f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            write(&mut f)
        })
        .and_then(|()| std::fs::rename(tmp, dest));
    if let Err(e) = written {
        std::fs::remove_file(tmp).ok();
        return Err(e).with_context(|| format!("writing {} failed", dest.display()));
    }
    Ok(())
}

/// Whether process `pid` exists. EPERM means it does, run by another user
/// (a non-root `xdplb status` asking about a root controller).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for the process; no memory is involved.
    pid != 0
        && (unsafe { libc::kill(pid as i32, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// The interface of the only controller with a status in `state_dir`.
pub fn only_running(state_dir: &Path) -> Result<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(state_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            // IFACE.overrides.json holds the runtime overrides (see `runtime`), not a status.
            if let Some(iface) = name.strip_suffix(".json").filter(|_| !name.ends_with(".overrides.json")) {
                found.push(iface.to_string());
            }
        }
    }
    match found.len() {
        0 => anyhow::bail!("no xdplb controller is running (no status in {})", state_dir.display()),
        1 => Ok(found.remove(0)),
        _ => anyhow::bail!("controllers run on {}: pick one with --iface", found.join(", ")),
    }
}

pub fn read(state_dir: &Path, iface: &str) -> Result<Status> {
    let p = path(state_dir, iface);
    let text = std::fs::read(&p)
        .with_context(|| format!("no status at {}: is `xdplb run` running for interface {iface}?", p.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not a status file", p.display()))
}

fn si(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// A table as `status` and `show` draw them: no borders, columns two
/// spaces apart, each as wide as its widest cell (a full IPv6 address too).
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    t
}

/// Right-aligns the numeric columns of `t`.
pub fn align_right(t: &mut comfy_table::Table, columns: &[usize]) {
    for &i in columns {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
}

/// A backend as operators write it: `198.18.0.11`, `[2001:db8::11]:8080`.
pub fn backend_text(b: &BackendStatus) -> String {
    match b.address.parse::<std::net::IpAddr>() {
        Ok(a) => crate::desired::fmt_backend(a, b.port),
        Err(_) if b.port != 0 => format!("{}:{}", b.address, b.port),
        Err(_) => b.address.clone(),
    }
}

/// The table `xdplb status` prints.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "xdplb on {} ({} mode), pid {}, config {} generation {} ({} reloads ok, {} failed), {} flows tracked",
        s.interface,
        s.xdp_mode,
        s.pid,
        s.config_file,
        s.config_generation,
        s.reloads_ok,
        s.reloads_failed,
        s.flows_tracked
    );
    if !s.last_reload_errors.is_empty() {
        let _ = writeln!(o, "LAST RELOAD REJECTED, still running generation {}:", s.config_generation);
        for e in &s.last_reload_errors {
            let _ = writeln!(o, "  {e}");
        }
    }
    if s.node_drained {
        let _ = writeln!(o, "node: DRAINED (xdplb undrain to serve again)");
    }
    for v in &s.vips {
        let _ = writeln!(
            o,
            "\nVIP {} {}/{} {}  {} pkts {} bytes  {} pkt/s {}bit/s",
            v.name,
            // [2001:db8::1]:80, as a backend with a port is written.
            backend_text(&BackendStatus { address: v.address.clone(), port: v.port, ..Default::default() }),
            v.protocol,
            v.forwarding,
            v.packets,
            v.bytes,
            si(v.packets_per_second),
            si(v.bits_per_second)
        );
        let mut t = table(&[
            "backend",
            "weight",
            "health",
            "state",
            "override",
            "packets",
            "bytes",
            "pkt/s",
            "flows",
            "last check",
        ]);
        for b in &v.backends {
            let row: [String; 10] = [
                backend_text(b),
                b.weight.to_string(),
                b.health.clone(),
                b.state.clone(),
                b.r#override.clone(),
                b.packets.to_string(),
                b.bytes.to_string(),
                si(b.packets_per_second),
                b.flows.to_string(),
                b.last_check.clone(),
            ];
            t.add_row(row);
        }
        align_right(&mut t, &[1, 5, 6, 7, 8]);
        for line in t.lines() {
            let _ = writeln!(o, "  {}", line.trim_end());
        }
    }
    if !s.dns.is_empty() {
        let _ = writeln!(o, "\nbackend names:");
        for d in &s.dns {
            let mut line = format!("  {} -> [{}]", d.name, d.addresses.join(", "));
            if !d.draining.is_empty() {
                let _ = write!(line, " draining [{}]", d.draining.join(", "));
            }
            if !d.last_error.is_empty() {
                let _ = write!(line, "  RESOLUTION FAILING (last known addresses kept): {}", d.last_error);
            }
            let _ = writeln!(o, "{line}");
        }
    }
    render_ha(&mut o, s, unix_ms_now());
    let _ = writeln!(o, "\npackets by reason:");
    for (k, v) in &s.reasons {
        let _ = writeln!(o, "  {k:<26} {v}");
    }
    o
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How long ago `then_unix_ms` was: `4s ago`, `3m ago`, `5h ago`, `2d ago`;
/// `never` for 0.
pub fn ago(now_unix_ms: u64, then_unix_ms: u64) -> String {
    if then_unix_ms == 0 {
        return "never".into();
    }
    let s = now_unix_ms.saturating_sub(then_unix_ms) / 1000;
    match s {
        0..120 => format!("{s}s ago"),
        120..7200 => format!("{}m ago", s / 60),
        7200..172_800 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// `a 3, b 1` from counters by why, the zero ones left out.
fn by_why(counts: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = counts.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
    parts.join(", ")
}

/// The BGP and flow sync sections of `xdplb status`, when configured.
fn render_ha(o: &mut String, s: &Status, now: u64) {
    if let Some(b) = &s.bgp {
        let configured = match b.configured_unix_ms {
            0 => "BIRD has taken no routes from this controller yet".to_string(),
            t => format!("last configure {}", ago(now, t)),
        };
        let _ = writeln!(
            o,
            "\nBGP through BIRD at {}, routes in {}: {configured}, {} failed attempts",
            b.bird_socket, b.routes_file, b.configure_failures
        );
        if b.routes.is_empty() {
            let _ = writeln!(o, "  no VIP address");
        } else {
            let mut t = table(&["route", "state", "why", "since"]);
            for r in &b.routes {
                // "healthy backends" is the one why that announces: a state
                // that disagrees with its why waits for BIRD.
                let waiting = !b.bird_error.is_empty() && r.announced != (r.why == "healthy backends");
                let state = match (r.announced, waiting) {
                    (true, false) => "announced",
                    (false, false) => "withdrawn",
                    (true, true) => "announced (withdrawal waits for BIRD)",
                    (false, true) => "withdrawn (announcement waits for BIRD)",
                };
                t.add_row([r.prefix.clone(), state.to_string(), r.why.clone(), ago(now, r.since_unix_ms)]);
            }
            for line in t.lines() {
                let _ = writeln!(o, "  {}", line.trim_end());
            }
        }
        if !b.bird_error.is_empty() {
            let _ = writeln!(o, "  BIRD ERROR (retried every second): {}", b.bird_error);
        }
    }
    if let Some(f) = &s.flow_sync {
        let _ = writeln!(
            o,
            "\nflow sync on {}: {} flows deviate; sent {} records in {} datagrams ({} bytes), received {} records, \
             {} flows installed",
            f.listen,
            f.deviating_flows,
            f.records_sent,
            f.datagrams_sent,
            f.bytes_sent,
            f.records_received,
            f.flows_installed
        );
        let mut t = table(&["peer", "last heard", "records", "send error"]);
        for p in &f.peers {
            t.add_row([
                p.address.clone(),
                ago(now, p.last_heard_unix_ms),
                p.records_received.to_string(),
                p.send_error.clone(),
            ]);
        }
        align_right(&mut t, &[2]);
        for line in t.lines() {
            let _ = writeln!(o, "  {}", line.trim_end());
        }
        let rejected = by_why(&f.records_rejected);
        if !rejected.is_empty() {
            let _ = writeln!(o, "  records rejected: {rejected}");
        }
        let refused = by_why(&f.datagrams_refused);
        if !refused.is_empty() {
            let _ = writeln!(o, "  datagrams refused: {refused}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ha_sections_show_the_drain_the_routes_with_why_and_the_sync_channel() {
        let now = 1_000_000_000;
        let s = Status {
            node_drained: true,
            bgp: Some(BgpStatus {
                routes_file: "/run/xdplb/lb0.bird.conf".into(),
                bird_socket: "/run/bird/bird.ctl".into(),
                bird_error: "cannot reach BIRD at /run/bird/bird.ctl: connection refused (is BIRD running? \
                             systemctl start bird)"
                    .into(),
                configured_unix_ms: now - 300_000,
                configure_failures: 4,
                routes: vec![
                    RouteStatus {
                        prefix: "198.18.0.10/32".into(),
                        announced: true,
                        why: "healthy backends".into(),
                        since_unix_ms: now - 7_200_000,
                    },
                    RouteStatus {
                        prefix: "2001:db8::10/128".into(),
                        announced: false,
                        why: "healthy backends".into(),
                        since_unix_ms: now - 5_000,
                    },
                ],
            }),
            flow_sync: Some(SyncStatus {
                listen: "198.18.0.1:7946".into(),
                peers: vec![
                    PeerStatus {
                        address: "198.18.0.2:7946".into(),
                        last_heard_unix_ms: now - 2_000,
                        records_received: 40,
                        send_error: String::new(),
                    },
                    PeerStatus {
                        address: "198.18.0.3:7946".into(),
                        send_error: "connection refused".into(),
                        ..Default::default()
                    },
                ],
                deviating_flows: 3,
                records_sent: 120,
                datagrams_sent: 12,
                bytes_sent: 5100,
                records_received: 40,
                flows_installed: 38,
                records_rejected: [("rate limit".to_string(), 2), ("unknown VIP".to_string(), 0)].into(),
                datagrams_refused: [("bad key".to_string(), 5)].into(),
            }),
            ..Default::default()
        };
        assert!(render(&s).contains("\nnode: DRAINED (xdplb undrain to serve again)\n"));
        let mut o = String::new();
        render_ha(&mut o, &s, now);
        let expected = "
BGP through BIRD at /run/bird/bird.ctl, routes in /run/xdplb/lb0.bird.conf: last configure 5m ago, 4 failed attempts
  route             state                                    why               since
  198.18.0.10/32    announced                                healthy backends  2h ago
  2001:db8::10/128  withdrawn (announcement waits for BIRD)  healthy backends  5s ago
  BIRD ERROR (retried every second): cannot reach BIRD at /run/bird/bird.ctl: connection refused (is BIRD running? systemctl start bird)

flow sync on 198.18.0.1:7946: 3 flows deviate; sent 120 records in 12 datagrams (5100 bytes), received 40 records, 38 flows installed
  peer             last heard  records  send error
  198.18.0.2:7946  2s ago           40
  198.18.0.3:7946  never             0  connection refused
  records rejected: rate limit 2
  datagrams refused: bad key 5
";
        assert_eq!(o, expected, "got:\n{o}");
        assert!(!render(&Status::default()).contains("BGP"), "nothing of BGP without `bgp:`");
    }

    #[test]
    fn status_write_never_follows_a_symlink_at_its_temporary_name() {
        use std::os::unix::fs::{PermissionsExt as _, symlink};
        let dir = std::env::temp_dir().join(format!("xdplb-status-symlink-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&state_dir).unwrap();
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // Exactly where `write` puts its temporary file (it carries this process's pid), and the file itself.
        symlink(&victim, state_dir.join(format!(".lb0.json.{}.tmp", std::process::id()))).unwrap();
        symlink(&victim, path(&state_dir, "lb0")).unwrap();
        let status = Status { interface: "lb0".into(), pid: 7, ..Default::default() };
        write(&state_dir, &status).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let meta = std::fs::symlink_metadata(path(&state_dir, "lb0")).unwrap();
        assert!(meta.file_type().is_file(), "the status replaced the symlink with a file of its own");
        let written: Status = serde_json::from_slice(&std::fs::read(path(&state_dir, "lb0")).unwrap()).unwrap();
        assert_eq!(written.pid, 7);
        let left: Vec<_> = std::fs::read_dir(&state_dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["lb0.json"], "no temporary file or symlink is left");
        std::fs::remove_dir_all(&dir).ok();
    }
}
