//! The node's place in a highly available group: whether it is drained
//! (`xdplb drain`), what it announces (BGP routes through BIRD, keepalived's
//! track file) and the flow sync channel with its peers.
//!
//! Every apply ends in `after_apply`: announcements follow the backends'
//! health, and a changed Maglev table sends the flows that now deviate from
//! it to the peers. At stop the routes are withdrawn first and the
//! controller waits `withdraw_wait` before it exits or detaches.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::Daemon;
use crate::{
    announce::{self, Announcer, Decision, NodeState},
    config::{BgpSettings, FlowSyncSettings},
    flowsync::{FlowSync, SyncView},
    reconcile::{ApplyReport, VipSpec},
    runtime,
    status::SyncStatus,
};

/// How long the stop waits for BIRD to take the withdrawal.
const WITHDRAW_LIMIT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(super) struct Ha {
    /// `xdplb drain` of the whole node.
    pub drained: bool,
    /// Set once the program is attached: nothing is announced before.
    attached_at: Option<Instant>,
    /// SIGTERM came: everything is withdrawn.
    stopping: bool,
    bgp: Option<(BgpSettings, Announcer)>,
    sync: Option<(FlowSyncSettings, FlowSync)>,
    /// The view the sync channel judges deviation by, as last sent to it.
    view: Option<SyncView>,
    sync_status: Arc<Mutex<SyncStatus>>,
    /// What was decided last, to log changes and to tell warm-up's end.
    decided: BTreeMap<IpAddr, Decision>,
    /// The track file's content as last written (None: not yet).
    track_written: Option<bool>,
}

impl Ha {
    fn node_state(&self, warmup: Duration) -> NodeState {
        NodeState {
            drained: self.drained,
            warming: self.attached_at.is_none_or(|t| t.elapsed() < warmup),
            stopping: self.stopping,
        }
    }
}

impl Daemon {
    fn warmup(&self) -> Duration {
        self.config.bgp.as_ref().map_or(Duration::ZERO, |b| b.warmup)
    }

    /// Right after attach: the node may announce (after the warm-up), and the
    /// sections of the file start.
    pub(super) fn ha_attached(&mut self) {
        self.ha.drained = runtime::load_drained(&self.opts.state_dir, &self.link.name);
        if self.ha.drained {
            warn!("the node was left drained by `xdplb drain`: announcing nothing until `xdplb undrain`");
        }
        self.ha.attached_at = Some(Instant::now());
        self.ha_follow_config();
        let specs = crate::desired::vip_specs(&self.config, &self.overrides, &self.observed);
        self.announce_vips(&specs);
    }

    /// Starts, restarts or stops BGP announcement and flow sync as the
    /// configuration now says (at attach and after each reload).
    pub(super) fn ha_follow_config(&mut self) {
        if self.ha.attached_at.is_none() {
            return;
        }
        let want_bgp = self.config.bgp.clone();
        if self.ha.bgp.as_ref().map(|(s, _)| s) != want_bgp.as_ref() {
            self.ha.bgp = want_bgp.map(|s| {
                let file = s
                    .routes_file
                    .clone()
                    .unwrap_or_else(|| announce::default_routes_file(&self.opts.state_dir, &self.link.name));
                info!(
                    "bgp: announcing VIP addresses through BIRD ({}), routes in {}",
                    s.bird_socket.display(),
                    file.display()
                );
                let a = Announcer::start(&s, file);
                (s, a)
            });
            // A new announcer knows nothing yet: decide again.
            self.ha.decided.clear();
            let specs = crate::desired::vip_specs(&self.config, &self.overrides, &self.observed);
            self.announce_vips(&specs);
        }
        let want_sync = self.config.flow_sync.clone();
        if self.ha.sync.as_ref().map(|(s, _)| s) != want_sync.as_ref() {
            // A changed section on the same address takes the old channel's
            // socket over (its tasks close it only later); none stops it.
            let old = self.ha.sync.take().map(|(_, s)| s);
            if let Some(s) = want_sync {
                let view = self.reconciler.sync_view(&self.dp, self.ha.view.as_ref());
                let status = self.ha.sync_status.clone();
                let started = self.dp.flows_map().and_then(|flows| match old {
                    Some(o) => o.restart(&s, flows, view.clone(), status),
                    None => FlowSync::start(&s, flows, view.clone(), status),
                });
                match started {
                    Ok(sync) => {
                        info!("flow_sync: sharing deviating flows with {} peers from {}", s.peers.len(), s.listen);
                        self.ha.view = Some(view);
                        self.ha.sync = Some((s, sync));
                    }
                    Err(e) => warn!("flow_sync: {e:#}; flows are not shared (fix the file and reload)"),
                }
            }
        }
    }

    /// After every apply: announcements follow the backends, and a changed
    /// table makes the sync channel look for flows that now deviate.
    pub(super) fn after_apply(&mut self, specs: &[VipSpec], report: Option<&ApplyReport>) {
        self.announce_vips(specs);
        let changed = report.is_none_or(|r| r.tables_swapped + r.vips_added + r.vips_removed + r.backends_written > 0);
        if changed && let Some((_, sync)) = &self.ha.sync {
            let view = self.reconciler.sync_view(&self.dp, self.ha.view.as_ref());
            sync.tables_changed(view.clone());
            self.ha.view = Some(view);
        }
    }

    /// Decides what this node announces, tells BIRD (through the announcer)
    /// and keepalived (the track file).
    fn announce_vips(&mut self, specs: &[VipSpec]) {
        if self.ha.attached_at.is_none() {
            return;
        }
        let node = self.ha.node_state(self.warmup());
        let decisions = announce::decide(specs, node);
        if decisions != self.ha.decided {
            if let Some((_, a)) = &self.ha.bgp {
                a.want(decisions.clone());
            }
            self.ha.decided = decisions;
        }
        let can_serve = announce::can_serve(&self.ha.decided, self.ha.drained, self.ha.stopping);
        if self.ha.track_written != Some(can_serve) {
            match announce::write_track_file(&self.opts.state_dir, &self.link.name, can_serve) {
                Ok(()) => self.ha.track_written = Some(can_serve),
                Err(e) => warn!("cannot write keepalived's track file: {e:#}"),
            }
        }
    }

    /// Every tick: the end of the warm-up announces.
    pub(super) fn ha_tick(&mut self) {
        let warming = self.ha.decided.values().any(|d| d.why == announce::WHY_WARMING);
        if warming && !self.ha.node_state(self.warmup()).warming {
            info!("warm-up over: announcing");
            let specs = crate::desired::vip_specs(&self.config, &self.overrides, &self.observed);
            self.announce_vips(&specs);
        }
    }

    /// A wait for BIRD to take what is announced now; None without `bgp:`.
    pub(super) fn bird_taken_later(&self) -> Option<announce::Taken> {
        self.ha.bgp.as_ref().map(|(_, a)| a.taken_later())
    }

    /// `xdplb drain` / `xdplb undrain` of the node: what it did, a line each.
    pub(super) fn set_node_drained(&mut self, drained: bool) -> Vec<String> {
        if let Err(e) = runtime::save_drained(&self.opts.state_dir, &self.link.name, drained) {
            warn!("cannot keep the node's drain for a restart: {e:#}");
        }
        let was = std::mem::replace(&mut self.ha.drained, drained);
        let specs = crate::desired::vip_specs(&self.config, &self.overrides, &self.observed);
        self.announce_vips(&specs);
        let routes = self.ha.decided.len();
        let line = match (was, drained, &self.ha.bgp) {
            (true, true, _) | (false, false, _) => {
                format!("the node is already {}", if drained { "drained" } else { "serving" })
            }
            (_, true, Some(_)) => format!(
                "node drained: {routes} VIP address(es) withdrawn from BGP, keepalived's track file says fault; \
                 `xdplb undrain` to serve again"
            ),
            (_, true, None) => {
                "node drained: keepalived's track file says fault; `xdplb undrain` to serve again".to_string()
            }
            (_, false, _) => "node serving again: VIP addresses with healthy backends announced".to_string(),
        };
        vec![line]
    }

    /// Status fields of this module.
    pub(super) fn ha_status(&self, s: &mut crate::status::Status) {
        s.node_drained = self.ha.drained;
        s.bgp = self.ha.bgp.as_ref().map(|(_, a)| a.status());
        s.flow_sync = self.ha.sync.as_ref().map(|_| self.ha.sync_status.lock().unwrap().clone());
    }

    /// The first step of a stop: withdraw every route (and say fault to
    /// keepalived), wait for BIRD to take it, then give the routers
    /// `withdraw_wait` to move the traffic away.
    pub(super) async fn ha_stop(&mut self) {
        let announced = self.ha.decided.values().any(|d| d.announce);
        self.ha.stopping = true;
        let specs = crate::desired::vip_specs(&self.config, &self.overrides, &self.observed);
        self.announce_vips(&specs);
        self.ha.sync = None;
        let Some((settings, a)) = &self.ha.bgp else { return };
        match a.withdraw_all(WITHDRAW_LIMIT).await {
            Ok(()) => info!("bgp: every route withdrawn"),
            Err(e) => warn!("bgp: withdrawing at stop: {e:#}"),
        }
        if announced && !settings.withdraw_wait.is_zero() {
            info!("waiting {:?} (bgp.withdraw_wait) for the routers to move the traffic away", settings.withdraw_wait);
            tokio::time::sleep(settings.withdraw_wait).await;
        }
    }
}
