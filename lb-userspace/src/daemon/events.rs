//! The event loop's handlers: health transitions, DNS answers, the
//! one-second tick (file watch, next hops, retries, drift checks, status),
//! reloads, and the stop. Each ends in the one apply path.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Instant,
};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{DRIFT_CHECK_EVERY_TICKS, Daemon, DnsTask, health_view};
use crate::{
    addr::fmt_mac,
    attach,
    config::{self, CheckKind, Config, InitialState},
    desired, dns, health,
    neighbours::{Resolution, Via},
    notify,
    reconcile::{Forwarding, VipSpec},
    status,
};

impl Daemon {
    /// The configured name of the VIP a health key belongs to, for logs.
    fn vip_name(&self, key: &health::Key) -> String {
        self.config
            .vips
            .iter()
            .find(|v| v.address == key.vip && v.port == key.vip_port && v.protocol.number() == key.protocol)
            .map_or_else(|| format!("{}:{}", key.vip, key.vip_port), |v| v.name.clone())
    }

    fn sync_health(&mut self) {
        self.observed.healthy = health_view(&self.checker);
    }

    /// Takes the maps to the desired state. A VIP that fails does not stop
    /// the others; until all succeed, every tick tries again (`unapplied`).
    pub(super) fn apply(&mut self) -> Result<()> {
        let specs = desired::vip_specs(&self.config, &self.overrides, &self.observed);
        let (vips, config_map) = self.write_desired(&specs);
        self.settle(vips.and(config_map))
    }

    /// Writes `specs` to the VIP maps and the configuration's CONFIG entry
    /// (NAT on or off, IP-in-IP sources): their results apart, since a reload
    /// decides on the VIPs' (see `reload_blamed`).
    fn write_desired(&mut self, specs: &[VipSpec]) -> (Result<()>, Result<()>) {
        // CONFIG first: the VIPs' flow sync view reads the hash seed from it.
        // Without a configured seed, the one the dataplane has now stays.
        let seed = crate::hash_seed::choose(&self.config, self.config_written.hash_seed).0;
        let want = desired::lb_config(&self.link, self.backend_link.as_ref(), &self.config, seed);
        if self.config_written.hash_seed != seed {
            info!(
                interface = self.link.name,
                "the flow hash seed changed (hash_seed_file or the flow_sync key): flows not in the connection table may \
                 change backend"
            );
        }
        let config_map = if self.config_written == want {
            Ok(())
        } else {
            self.dp.set_config(&want).context("updating the CONFIG map failed").map(|()| {
                self.config_written = want;
            })
        };
        let applied = self.reconciler.apply(&mut self.dp, specs);
        self.after_apply(specs, applied.as_ref().ok());
        let vips = applied.map(|_| ());
        (vips, config_map)
    }

    /// Counts a failed apply; notes that the dataplane caught up.
    fn settle(&mut self, result: Result<()>) -> Result<()> {
        match &result {
            Ok(()) => {
                if self.unapplied.take().is_some() {
                    info!("the dataplane holds the desired state again");
                }
            }
            Err(_) => self.status.lock().unwrap().apply_failures += 1,
        }
        result
    }

    /// Notes a failed apply for the per-tick retry, logged once per distinct error.
    fn retry_later(&mut self, why: &str, e: &anyhow::Error) {
        let text = format!("{e:#}");
        // Logged once per distinct error: a retry every second says nothing new.
        if self.unapplied.as_ref() != Some(&text) {
            error!("updating the dataplane after {why} failed: {text}; retrying every second");
        }
        self.unapplied = Some(text);
    }

    pub(super) fn apply_logged(&mut self, why: &str) {
        if let Err(e) = self.apply() {
            self.retry_later(why, &e);
        }
    }

    /// Health transitions: this one and every one already queued, one apply.
    pub(super) fn on_transitions(
        &mut self,
        first: health::Transition,
        more: &mut mpsc::UnboundedReceiver<health::Transition>,
    ) {
        let mut batch = vec![first];
        while let Ok(t) = more.try_recv() {
            batch.push(t);
        }
        for t in batch {
            let vip = self.vip_name(&t.key);
            if t.up {
                info!(vip, backend = %t.key.addr, "backend UP: {}", t.reason);
            } else {
                warn!(vip, backend = %t.key.addr, "backend DOWN: {}", t.reason);
            }
            self.observed.healthy.insert(t.key, t.up);
        }
        self.apply_logged("a health change");
    }

    pub(super) fn on_tick(&mut self) {
        self.ticks += 1;
        // A file being written is not reloaded half-way: only once it reads the same twice.
        if let Some(text) = self.watch.observe(config::read_file(&self.opts.config), Instant::now()) {
            self.reload_with("the file changed", Ok(text));
        }
        // Next hops are read off the loop; a change applies when the round comes back.
        self.start_resolution();
        self.refresh_links();
        if self.unapplied.is_some() {
            self.apply_logged("a retry");
        }
        if self.ticks.is_multiple_of(DRIFT_CHECK_EVERY_TICKS) && self.unapplied.is_none() {
            self.repair_drift();
        }
        if self.ticks.is_multiple_of(2) && self.config.vips.iter().any(|v| v.forwarding == Forwarding::Nat) {
            self.collect_nat();
        }
        self.ha_tick();
        // A killed `xdplb trace` leaves the traced program in the link.
        crate::trace::switch_off_abandoned(&mut self.dp, &self.pin_dir);
        // With very many backends a status costs real time: keep it under 10%.
        if self.previous_at.elapsed() >= self.publish_cost * 10 {
            let started = Instant::now();
            self.publish_status();
            self.publish_cost = started.elapsed();
        }
    }

    /// Reads the interfaces' MAC and MTU again: the dataplane forwards only
    /// frames addressed to the interface's MAC, and sends from it, so a MAC
    /// changed at run time (`ip link set address`, a bond failing over with
    /// `fail_over_mac`) must reach the CONFIG map within a tick.
    fn refresh_links(&mut self) {
        let mut changed = false;
        for link in std::iter::once(&mut self.link).chain(self.backend_link.as_mut()) {
            match super::link(&link.name) {
                Ok(now) if (now.mac, now.mtu) != (link.mac, link.mtu) => {
                    info!(
                        interface = link.name,
                        "interface changed: MAC {} -> {}, MTU {} -> {}",
                        fmt_mac(&link.mac),
                        fmt_mac(&now.mac),
                        link.mtu,
                        now.mtu
                    );
                    link.mac = now.mac;
                    link.mtu = now.mtu;
                    changed = true;
                }
                Ok(_) => {}
                // Gone or unreadable: the attach and doctor say so; keep what we knew.
                Err(_) => {}
            }
        }
        if changed {
            self.apply_logged("an interface change");
        }
    }

    /// Compares the maps with what the controller wrote; anything changed
    /// behind its back (a stray `bpftool map update`, another tool) is put
    /// back and logged.
    fn repair_drift(&mut self) {
        let repaired = self.reconciler.repair_drift(&mut self.dp);
        for line in &repaired {
            warn!("map drift repaired: {line}");
        }
        self.status.lock().unwrap().drift_repairs += repaired.len() as u64;
    }

    /// Starts a round of next-hop resolution on its own task, unless one
    /// still runs (one at a time); `on_resolved` handles its answer.
    fn start_resolution(&mut self) {
        if let Some(resolver) = self.neighbours.take() {
            let addrs = desired::addresses_to_resolve(&self.config);
            super::spawn_resolution(resolver, addrs, self.resolved_tx.clone());
        }
    }

    /// A round of next-hop resolution came back: apply what changed.
    pub(super) fn on_resolved(&mut self, round: super::Resolved) {
        if let Some(routes) = round.resolver.last_routes() {
            self.observed.routes = Some(routes);
        }
        self.neighbours = Some(round.resolver);
        if self.use_resolution(round.result) {
            self.apply_logged("a next-hop change");
        }
    }

    /// The first round, at start-up, awaited in place (the caller bounds it
    /// by the stop signals).
    pub(super) async fn first_resolution(&mut self) {
        let addrs = desired::addresses_to_resolve(&self.config);
        if let Some(resolver) = self.neighbours.as_mut() {
            let result = resolver.resolve(&addrs).await;
            if let Some(routes) = resolver.last_routes() {
                self.observed.routes = Some(routes);
            }
            self.use_resolution(result);
        }
    }

    /// Decides the MAC each backend is sent to from a round's answer; true
    /// when one changed. The round may have started before a reload: only
    /// the addresses the configuration has now count.
    fn use_resolution(&mut self, result: Result<HashMap<IpAddr, Resolution>>) -> bool {
        let resolved = match result {
            Ok(r) => r,
            Err(e) => {
                // Keep what we knew: a netlink hiccup must not take backends down.
                warn!("reading routes and neighbours failed, keeping the last known next hops: {e:#}");
                return false;
            }
        };
        // Sorted: a lookup is a binary search (100,000 backends make a linear one quadratic).
        let addrs = desired::addresses_to_resolve(&self.config);
        let wanted = |a: &IpAddr| addrs.binary_search(a).is_ok();
        self.misses.retain(&addrs);
        let mut changed = false;
        // Next hops found, logged once each (a gateway may stand for thousands of backends).
        let mut found: BTreeMap<(IpAddr, [u8; 6]), (IpAddr, usize)> = BTreeMap::new();
        // Next hops that changed: DSR backends now behind a gateway are named once, below.
        let mut moved = HashMap::new();
        for (addr, r) in resolved.iter().filter(|(a, _)| wanted(a)) {
            let before = self.observed.next_hop_mac.get(addr).copied();
            if let Resolution::Resolved { ifindex, next_hop, .. } = r {
                self.observed.next_hop_ifindex.insert(*addr, *ifindex);
                let was = self.observed.next_hop.insert(*addr, *next_hop);
                if was != Some(*next_hop) {
                    // DSR cannot use it from now on (or can again): the specs change.
                    changed = true;
                    moved.insert(*addr, *next_hop);
                }
            }
            // Kept through a few failed rounds (a solicitation, a flapping entry).
            let now = self.misses.mac_to_use(*addr, before, r);
            if before != now {
                changed = true;
                match (before, now, r) {
                    (_, Some(mac), Resolution::Resolved { next_hop, .. }) => {
                        found.entry((*next_hop, mac)).or_insert((*addr, 0)).1 += 1;
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
        self.warn_routed_dsr(&moved);
        for ((next_hop, mac), (addr, n)) in found {
            match n {
                1 => info!(backend = %addr, "next hop {next_hop} is at {}", fmt_mac(&mac)),
                n => info!(backend = %addr, "next hop {next_hop} is at {} (for {n} backends)", fmt_mac(&mac)),
            }
        }
        self.observed.next_hop_mac.retain(|a, _| wanted(a));
        self.observed.next_hop.retain(|a, _| wanted(a));
        self.observed.next_hop_ifindex.retain(|a, _| wanted(a));
        self.resolution = resolved;
        changed
    }

    /// Backends of DSR VIPs whose route now goes through a gateway
    /// (`moved`: address → new next hop; the start and reloads refuse ones
    /// new to DSR, a route can change later): they get no DSR traffic until
    /// the route is direct again. Named as the file names them (a DNS name
    /// with its address); one pass over the file however many moved.
    fn warn_routed_dsr(&self, moved: &HashMap<IpAddr, IpAddr>) {
        if moved.iter().all(|(a, nh)| a == nh) {
            return;
        }
        // The round's own table (see `on_resolved`) tells a multipath route apart.
        let gateway = |a: IpAddr| {
            let nh = moved.get(&a).filter(|nh| **nh != a)?;
            Some(self.observed.routes.as_ref().and_then(|r| r.gateway(a)).unwrap_or(Via::Gateway(*nh)))
        };
        for line in desired::routed_dsr_backends(&self.file_config, &self.names.states, None, gateway, &self.link.name)
        {
            warn!("backend not used: {line}");
        }
    }

    /// DSR backends that the reload of `parsed` brings behind a gateway,
    /// by the routing table of the last resolution round (at most a tick
    /// old): a reload must not wait for netlink on the event loop, and one
    /// table answers for new backends too. Backends already serving are
    /// left to the resolution rounds. Nothing is said while no table has
    /// been read yet.
    fn routed_dsr(&self, parsed: &Config) -> Vec<String> {
        match &self.observed.routes {
            Some(routes) => desired::routed_dsr_backends(
                parsed,
                &self.names.states,
                Some(&self.config),
                |a| routes.gateway(a),
                &self.link.name,
            ),
            None => {
                warn!("the routing table has not been read yet: DSR backends behind a gateway are not checked");
                Vec::new()
            }
        }
    }

    /// A reload as systemd sees it: RELOADING=1, then READY=1 once the file
    /// is applied or rejected (`systemctl reload` waits for that).
    pub(super) fn reload(&mut self, why: &str) {
        // Read once: this text is what is parsed and what the watcher will not reload again.
        let read = config::read_file(&self.opts.config);
        if let Ok(text) = &read {
            self.watch.seen(text);
        }
        self.reload_with(why, read);
    }

    fn reload_with(&mut self, why: &str, read: std::io::Result<String>) {
        notify::reloading();
        self.reload_config(why, read);
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

    fn reload_config(&mut self, why: &str, read: std::io::Result<String>) {
        let started = Instant::now();
        let path = self.opts.config.display().to_string();
        let generation = self.status.lock().unwrap().config_generation;
        let text = match read {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("{path}: cannot read: {e}");
                error!("reload ({why}) rejected: {msg}; still running generation {generation}");
                self.reject(vec![msg]);
                return;
            }
        };
        let parsed = match config::parse(&path, &text) {
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
        let conflicts = desired::own_address_conflicts(&parsed, &crate::addr::local_addresses());
        if !conflicts.is_empty() {
            let errors: Vec<String> = conflicts.iter().map(|c| format!("{path}: {c}")).collect();
            error!("reload ({why}) rejected: {}; still running generation {generation}", errors.join("; "));
            self.reject(errors);
            return;
        }
        let routed = self.routed_dsr(&parsed);
        if !routed.is_empty() {
            let errors: Vec<String> = routed.iter().map(|c| format!("{path}: {c}")).collect();
            error!("reload ({why}) rejected: {}; still running generation {generation}", errors.join("; "));
            self.reject(errors);
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
        let health_before = health_view(&self.checker);
        let old = std::mem::replace(&mut self.config, new);
        // Most reloads check the same backends the same way: nothing to sync then.
        if !desired::same_health_targets(&old, &self.config) {
            self.checker.sync(desired::health_targets(&self.config), |t| {
                t.check.initial_state == InitialState::Up || t.check.kind == CheckKind::None
            });
        }
        self.sync_health();
        let after = desired::vip_specs(&self.config, &self.overrides, &self.observed);
        let (vips, config_map) = self.write_desired(&after);
        // The specs before the reload are needed only to judge a failure.
        let blamed = vips.as_ref().err().and_then(|e| {
            let observed = desired::Observed { healthy: health_before.clone(), ..self.observed.clone() };
            let before = desired::vip_specs(&old, &self.overrides, &observed);
            reload_blamed(e, self.unapplied.as_deref(), &before, &after)
        });
        if let Some(e) = blamed {
            self.status.lock().unwrap().apply_failures += 1;
            error!("reload ({why}) could not be applied: {e:#}; going back to generation {generation}");
            self.config = old;
            let file_config = self.file_config.clone();
            if let Err(e) = self.follow_names(&file_config) {
                error!("restoring the previous backend names failed: {e:#}");
            }
            self.checker
                .sync(desired::health_targets(&self.config), |t| health_before.get(&t.key).copied().unwrap_or(false));
            self.sync_health();
            self.apply_logged("restoring the previous configuration");
            self.reject(vec![format!("{path}: {e:#}")]);
            return;
        }
        // What failed is only what failed before the reload (a VIP it did
        // not touch) or the CONFIG map: the reload stands, the tick retries.
        if let Err(e) = self.settle(vips.and(config_map)) {
            let pending = format!("{e:#}");
            warn!(
                "reload ({why}) stands, but the dataplane does not hold all of it yet: {pending}; retrying every second"
            );
            self.unapplied = Some(pending);
        }
        self.config_text = text;
        self.ha_follow_config();
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
    pub(super) fn on_dns(&mut self, answers: Vec<dns::Answer>) {
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
        self.checker.sync(desired::health_targets(&self.config), |t| {
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

    /// Stops: the status goes; the dataplane stays (adopted by the next
    /// `xdplb run`) unless `--detach-on-exit`.
    pub(super) async fn shutdown(mut self) -> Result<()> {
        notify::stopping();
        // Withdraw first, detach after: no traffic is sent to a node that stops serving.
        self.ha_stop().await;
        let iface = self.link.name.clone();
        std::fs::remove_file(status::path(&self.opts.state_dir, &iface)).ok();
        if self.opts.detach_on_exit {
            let pin_dir = self.pin_dir.clone();
            drop(self.dp);
            attach::detach(&pin_dir.join("link"))?;
            attach::detach(&pin_dir.join("backend_link"))?;
            crate::pins::remove_maps(&pin_dir);
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

/// The error a reload is rolled back for, if the failed apply of `after`
/// (replacing `before`) is the reload's doing: a VIP it added, changed or
/// removed failed, or a VIP that was applied before (not named in
/// `unapplied`, the error of the last failed apply) fails now. None when
/// every failure is a VIP the reload left as it was and that already failed:
/// that VIP must not hold every other change back.
///
/// The reconciler reports its failures as one error, "N of M VIPs not
/// applied: ...", each VIP's error starting "VIP <name>: ". A failure that
/// cannot be told apart that way (a removal, a map write without the VIP's
/// name, another error) counts as the reload's: it is rolled back.
fn reload_blamed<'e>(
    error: &'e anyhow::Error,
    unapplied: Option<&str>,
    before: &[VipSpec],
    after: &[VipSpec],
) -> Option<&'e anyhow::Error> {
    let text = format!("{error:#}");
    let Some(unapplied) = unapplied else { return Some(error) };
    let Some((count, _)) = text.split_once(" VIPs not applied: ") else { return Some(error) };
    let Some(failed) = count.split_once(" of ").and_then(|(n, _)| n.parse::<usize>().ok()) else {
        return Some(error);
    };
    let label = |s: &VipSpec| format!("VIP {}: ", s.name);
    let named: Vec<&VipSpec> = after.iter().filter(|s| text.contains(&label(s))).collect();
    let untouched = |s: &VipSpec| before.contains(s);
    let already_failing = |s: &VipSpec| unapplied.contains(&label(s));
    if named.len() == failed && named.iter().all(|s| untouched(s) && already_failing(s)) { None } else { Some(error) }
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;

    use super::reload_blamed;
    use crate::reconcile::{BackendSpec, Forwarding, HashMode, VipSpec};

    fn vip(name: &str, port: u16, backends: &[&str]) -> VipSpec {
        VipSpec {
            name: name.into(),
            addr: "198.18.100.1".parse().unwrap(),
            port,
            protocol: 6,
            forwarding: Forwarding::Dsr,
            hash: HashMode::FiveTuple,
            table_size: 65537,
            backends: backends
                .iter()
                .map(|a| BackendSpec { addr: a.parse().unwrap(), port: 0, weight: 1, mac: [2; 6], healthy: true })
                .collect(),
            pass_when_empty: false,
            icmp_echo: true,
        }
    }

    const BIG: &str = "VIP big: the Maglev pool has no free region of 4194301 slots (raise maglev_pool)";

    #[test]
    fn a_vip_the_reload_left_alone_that_already_failed_does_not_roll_it_back() {
        let big = vip("big", 79, &["198.18.1.1"]);
        let before = [big.clone(), vip("web", 80, &["198.18.1.1", "198.18.1.2"])];
        let after = [big, vip("web", 80, &["198.18.1.1", "198.18.1.2", "198.18.1.3"])];
        let e = anyhow!("1 of 2 VIPs not applied: {BIG}");
        let unapplied = format!("1 of 2 VIPs not applied: {BIG}");
        assert!(reload_blamed(&e, Some(&unapplied), &before, &after).is_none());
    }

    #[test]
    fn a_failure_the_reload_may_have_caused_rolls_it_back() {
        let big = vip("big", 79, &["198.18.1.1"]);
        let web = vip("web", 80, &["198.18.1.1"]);
        let failed_before = format!("1 of 2 VIPs not applied: {BIG}");
        let e = anyhow!("1 of 2 VIPs not applied: {BIG}");
        // Everything was applied before: whatever fails now is the reload's.
        assert!(reload_blamed(&e, None, &[big.clone(), web.clone()], &[big.clone(), web.clone()]).is_some());
        // The failing VIP is one the reload changed.
        let big2 = vip("big", 79, &["198.18.1.1", "198.18.1.2"]);
        assert!(reload_blamed(&e, Some(&failed_before), &[big.clone(), web.clone()], &[big2, web.clone()]).is_some());
        // The failing VIP is one the reload added.
        assert!(
            reload_blamed(
                &e,
                Some("1 of 1 VIPs not applied: VIP x: y"),
                std::slice::from_ref(&web),
                &[big.clone(), web.clone()]
            )
            .is_some()
        );
        // A VIP applied before fails too.
        let both = anyhow!("2 of 2 VIPs not applied: {BIG}; VIP web: no room for backend 198.18.1.1");
        assert!(
            reload_blamed(&both, Some(&failed_before), &[big.clone(), web.clone()], &[big.clone(), web.clone()])
                .is_some()
        );
        // A failure that names no VIP (a removal, a map write): not told apart.
        let unnamed = anyhow!("2 of 2 VIPs not applied: {BIG}; updating map BACKENDS failed");
        assert!(
            reload_blamed(&unnamed, Some(&failed_before), &[big.clone(), web.clone()], &[big.clone(), web.clone()])
                .is_some()
        );
        let other = anyhow!("VIP web: 198.18.100.1:80 is declared twice");
        assert!(reload_blamed(&other, Some(&failed_before), &[big.clone(), web.clone()], &[big, web]).is_some());
    }
}
