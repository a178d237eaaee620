//! The status the controller publishes every second: what the maps count,
//! what health and neighbours say, what the operator set, as one snapshot
//! (`status::Status`) written to the state file and served on /metrics.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use lb_common::{
    maps::{BACKEND_ACTIVE, BACKEND_DRAINING},
    reasons,
};
use tracing::warn;

use super::Daemon;
use crate::{
    addr::fmt_mac,
    config,
    desired::{self, BackendRef, Override},
    neighbours::Resolution,
    reconcile::{Forwarding, HashMode},
    status::{self, BackendStatus, VipStatus},
};

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Daemon {
    /// Assembles the status from the maps, the health table and the
    /// controller's own view, and writes it (see `status`).
    pub(super) fn publish_status(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.previous_at).as_secs_f64().max(0.001);
        self.previous_at = now;
        // Counted off the loop; the status shows the last count (at most a
        // tick or two old).
        self.count_flows();
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
                let key = desired::health_key(v, address, Some(port).filter(|p| *p != 0));
                let health = if sorry { None } else { self.checker.table.lock().unwrap().get(&key).cloned() };
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
        let nat_connections =
            if self.config.vips.iter().any(|v| v.forwarding == Forwarding::Nat) { self.nat_connections } else { 0 };
        // The new status is assembled and written outside the lock, then
        // replaces the old one: no copy of 100,000 backends' status is made,
        // and the status page never waits for the file.
        let mut s = {
            let mut published = self.status.lock().unwrap();
            let old_vips = std::mem::take(&mut published.vips);
            let fields = published.clone();
            published.vips = old_vips;
            fields
        };
        {
            s.updated_unix_ms = unix_ms();
            s.vips = vips;
            s.flows_tracked = self.flows_tracked;
            s.reasons = reasons::NAMES.iter().zip(reason_counts).map(|(n, c)| (n.to_string(), c)).collect();
            s.nat_connections = nat_connections;
            s.nat_evicted_idle = self.nat_evicted.0;
            s.nat_evicted_closed = self.nat_evicted.1;
            s.apply_pending = self.unapplied.clone().unwrap_or_default();
            self.ha_status(&mut s);
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
        }
        if let Err(e) = status::write(&self.opts.state_dir, &s) {
            warn!("cannot write the status file: {e:#}");
        }
        *self.status.lock().unwrap() = s;
    }
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
