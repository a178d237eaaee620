//! The node's place in a highly available group: whether it is drained
//! (`xdplb drain`), what it announces (BGP routes through BIRD, keepalived's
//! track file) and the flow sync channel with its peers.
//!
//! Every apply ends in `after_apply`: announcements follow what the
//! dataplane serves, and a changed Maglev table sends the flows that now
//! deviate from it to the peers. At stop the routes are withdrawn first and
//! the controller waits (`withdraw_wait`, or `TRACK_WAIT` for keepalived)
//! before it exits or detaches.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::Daemon;
use crate::{
    announce::{self, Announcer, Decision, NodeState, Retiring, TrackFile},
    config::{BgpSettings, FlowSyncSettings},
    flowsync::{FlowSync, SyncView},
    reconcile::{ApplyReport, VipSpec},
    runtime,
    status::SyncStatus,
};

/// How long the stop waits for BIRD to take the withdrawal.
const WITHDRAW_LIMIT: Duration = Duration::from_secs(5);

/// How long an announcer replaced at a reload (`bgp:` removed, another
/// `bird_socket` or `routes_file`) has BIRD withdraw its routes before it
/// gives up; its successor writes only after that.
const RETIRE_LIMIT: Duration = Duration::from_secs(5);

/// Without `bgp:`, how long the stop waits after the track file turned to
/// fault before the controller exits or detaches: keepalived reads the file
/// at once (inotify), goes to FAULT and sends a priority-0 advertisement, on
/// which the backup takes over within its skew time (RFC 5798 6.4.3: under
/// a second) and sends gratuitous ARPs. Twice the default `advert_int` of
/// 1 s covers that while keeping a stop short.
const TRACK_WAIT: Duration = Duration::from_secs(2);

/// While flow sync cannot start (its listen address not there yet, say),
/// it is tried again this often.
const SYNC_RETRY: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(super) struct Ha {
    /// `xdplb drain` of the whole node.
    pub drained: bool,
    /// Set once the program is attached: nothing is announced before.
    attached_at: Option<Instant>,
    /// SIGTERM came: everything is withdrawn.
    stopping: bool,
    bgp: Option<(BgpSettings, Announcer)>,
    /// The announcer last replaced or dropped, while it withdraws its routes.
    retiring: Option<Retiring>,
    sync: Option<(FlowSyncSettings, FlowSync)>,
    /// Flow sync failed to start: when to try again.
    sync_retry: Retry,
    /// The view the sync channel judges deviation by, as last sent to it.
    view: Option<SyncView>,
    sync_status: Arc<Mutex<SyncStatus>>,
    /// Each VIP address, and whether the dataplane serves it (a VIP it holds,
    /// with a healthy backend), as the last apply left it (see `after_apply`,
    /// which every apply ends in): node-state changes decide from it without
    /// computing the specs again.
    serving: BTreeMap<IpAddr, bool>,
    /// What was decided last, to tell changes and warm-up's end.
    decided: BTreeMap<IpAddr, Decision>,
    /// keepalived's track file.
    track: TrackFile,
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

/// A start that failed, tried again every `SYNC_RETRY`; its error is logged
/// once while it stays the same.
#[derive(Debug, Default)]
struct Retry {
    next: Option<Instant>,
    logged: Option<String>,
}

impl Retry {
    fn due(&self, now: Instant) -> bool {
        self.next.is_some_and(|t| now >= t)
    }

    /// A failure at `now`: the next try comes `SYNC_RETRY` later. True when
    /// `error` is news (to be logged).
    fn failed(&mut self, error: String, now: Instant) -> bool {
        self.next = Some(now + SYNC_RETRY);
        let news = self.logged.as_ref() != Some(&error);
        self.logged = Some(error);
        news
    }

    /// Started, or no longer wanted: true when it had failed before.
    fn done(&mut self) -> bool {
        std::mem::take(self).logged.is_some()
    }
}

/// How long the stop waits once it withdrew everything: `withdraw_wait`
/// with `bgp:` (if a route was announced), else `TRACK_WAIT` if the track
/// file said the node could serve (keepalived may hold the VIP here) and
/// the program goes with the process (`detaching`). A dataplane that stays
/// attached keeps forwarding whatever still comes: no wait then.
fn stop_wait(bgp: Option<&BgpSettings>, announced: bool, track_said_serve: bool, detaching: bool) -> Duration {
    match bgp {
        Some(s) if announced => s.withdraw_wait,
        Some(_) => Duration::ZERO,
        None if track_said_serve && detaching => TRACK_WAIT,
        None => Duration::ZERO,
    }
}

/// What `xdplb drain` / `undrain` says: the node was drained (`was`) and is
/// now (`drained`), with `bgp:` or not, `withdrawn` addresses announced
/// before the drain.
fn drain_line(was: bool, drained: bool, bgp: bool, withdrawn: usize) -> String {
    match (was, drained, bgp) {
        (true, true, _) | (false, false, _) => {
            format!("the node is already {}", if drained { "drained" } else { "serving" })
        }
        (_, true, true) => format!(
            "node drained: {withdrawn} VIP address(es) withdrawn from BGP, keepalived's track file says fault; \
             `xdplb undrain` to serve again"
        ),
        (_, true, false) => {
            "node drained: keepalived's track file says fault; `xdplb undrain` to serve again".to_string()
        }
        (_, false, _) => "node serving again: VIP addresses with healthy backends announced".to_string(),
    }
}

impl Daemon {
    fn warmup(&self) -> Duration {
        self.config.bgp.as_ref().map_or(Duration::ZERO, |b| b.warmup)
    }

    fn routes_file(&self, s: &BgpSettings) -> PathBuf {
        s.routes_file.clone().unwrap_or_else(|| announce::default_routes_file(&self.opts.state_dir, &self.link.name))
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
        self.announce_now();
    }

    /// Starts, restarts or stops BGP announcement and flow sync as the
    /// configuration now says (at attach and after each reload).
    pub(super) fn ha_follow_config(&mut self) {
        if self.ha.attached_at.is_none() {
            return;
        }
        self.follow_bgp();
        // A reload says again why flow sync does not start, if it still does not.
        self.ha.sync_retry = Retry::default();
        self.follow_sync();
    }

    /// A new `bird_socket` or `routes_file`, or no `bgp:` any more: the
    /// announcer in place withdraws its routes (and removes its file if
    /// another takes its place) before a new one writes.
    fn follow_bgp(&mut self) {
        let want = self.config.bgp.clone();
        let place = |s: &BgpSettings| (s.bird_socket.clone(), self.routes_file(s));
        let (had, wanted) = (self.ha.bgp.as_ref().map(|(s, _)| place(s)), want.as_ref().map(place));
        if had == wanted {
            // At most `warmup` or `withdraw_wait` changed: the announcer stays.
            if let (Some((have, _)), Some(want)) = (&mut self.ha.bgp, want) {
                *have = want;
            }
            self.announce_now();
            return;
        }
        if let Some(((socket, old_file), (_, a))) = had.zip(self.ha.bgp.take()) {
            let moved = wanted.as_ref().is_some_and(|(_, file)| *file != old_file);
            info!(
                "bgp: withdrawing the routes in {} (BIRD at {}): {}",
                old_file.display(),
                socket.display(),
                if wanted.is_some() { "the bgp section changed" } else { "the bgp section was removed" }
            );
            self.ha.retiring = Some(a.retire(moved, RETIRE_LIMIT));
        }
        let (Some(s), Some((_, file))) = (want, wanted) else { return };
        info!("bgp: announcing VIP addresses through BIRD ({}), routes in {}", s.bird_socket.display(), file.display());
        let first = self.decisions();
        let a = match self.ha.retiring.clone() {
            Some(previous) => Announcer::start_after(previous, &s, file, first.clone()),
            None => Announcer::start(&s, file, first.clone()),
        };
        self.ha.bgp = Some((s, a));
        self.ha.decided = first;
        self.follow_track();
    }

    /// Starts, restarts or stops flow sync as the configuration says; one
    /// that fails to start is tried again on the tick (`SYNC_RETRY`).
    fn follow_sync(&mut self) {
        let want_sync = self.config.flow_sync.clone();
        if self.ha.sync.as_ref().map(|(s, _)| s) == want_sync.as_ref() {
            self.ha.sync_retry.done();
            return;
        }
        // A changed section on the same address takes the old channel's
        // socket over (its tasks close it only later); none stops it.
        let old = self.ha.sync.take().map(|(_, s)| s);
        let Some(s) = want_sync else {
            self.ha.sync_retry.done();
            return;
        };
        let view = self.reconciler.sync_view(&self.dp, self.ha.view.as_ref());
        let status = self.ha.sync_status.clone();
        let started = self.dp.flows_map().and_then(|flows| match old {
            Some(o) => o.restart(&s, flows, view.clone(), status),
            None => FlowSync::start(&s, flows, view.clone(), status),
        });
        match started {
            Ok(sync) => {
                if self.ha.sync_retry.done() {
                    info!("flow_sync: started after all");
                }
                info!("flow_sync: sharing deviating flows with {} peers from {}", s.peers.len(), s.listen);
                self.ha.view = Some(view);
                self.ha.sync = Some((s, sync));
            }
            Err(e) => {
                if self.ha.sync_retry.failed(format!("{e:#}"), Instant::now()) {
                    warn!(
                        "flow_sync: {e:#}; flows are not shared: trying again every {}s (or fix the file and reload)",
                        SYNC_RETRY.as_secs()
                    );
                }
            }
        }
    }

    /// After every apply: announcements follow the dataplane, and a changed
    /// table makes the sync channel look for flows that now deviate.
    pub(super) fn after_apply(&mut self, specs: &[VipSpec], report: Option<&ApplyReport>) {
        self.ha.serving = announce::serving(specs, |v| self.reconciler.serving(&v.key()));
        self.announce_now();
        let changed = report.is_none_or(|r| r.tables_swapped + r.vips_added + r.vips_removed + r.backends_written > 0);
        if changed && let Some((_, sync)) = &self.ha.sync {
            let view = self.reconciler.sync_view(&self.dp, self.ha.view.as_ref());
            sync.tables_changed(view.clone());
            self.ha.view = Some(view);
        }
    }

    /// What to announce: the addresses the last apply left serving, in the
    /// node's state now.
    fn decisions(&self) -> BTreeMap<IpAddr, Decision> {
        announce::decide_for(&self.ha.serving, self.ha.node_state(self.warmup()))
    }

    /// Decides what this node announces, tells BIRD (through the announcer)
    /// and keepalived (the track file).
    fn announce_now(&mut self) {
        if self.ha.attached_at.is_none() {
            return;
        }
        let decisions = self.decisions();
        if decisions != self.ha.decided {
            if let Some((_, a)) = &self.ha.bgp {
                a.want(decisions.clone());
            }
            self.ha.decided = decisions;
        }
        self.follow_track();
    }

    /// Has the track file say what was decided (checked each call).
    fn follow_track(&mut self) {
        if self.ha.attached_at.is_none() {
            return;
        }
        let can_serve = announce::can_serve(&self.ha.decided, self.ha.drained, self.ha.stopping);
        self.ha.track.say(&self.opts.state_dir, &self.link.name, can_serve);
    }

    /// Every tick: the end of the warm-up announces, the track file is
    /// checked, and flow sync that failed to start is tried again.
    pub(super) fn ha_tick(&mut self) {
        let warming = self.ha.decided.values().any(|d| d.why == announce::WHY_WARMING);
        if warming && !self.ha.node_state(self.warmup()).warming {
            info!("warm-up over: announcing");
            self.announce_now();
        } else {
            self.follow_track();
        }
        if self.ha.sync_retry.due(Instant::now()) {
            self.follow_sync();
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
        let announced = self.ha.decided.values().filter(|d| d.announce).count();
        let was = std::mem::replace(&mut self.ha.drained, drained);
        self.announce_now();
        vec![drain_line(was, drained, self.ha.bgp.is_some(), announced)]
    }

    /// Status fields of this module.
    pub(super) fn ha_status(&self, s: &mut crate::status::Status) {
        s.node_drained = self.ha.drained;
        s.bgp = self.ha.bgp.as_ref().map(|(_, a)| a.status());
        s.flow_sync =
            self.ha.sync.as_ref().map(|_| self.ha.sync_status.lock().unwrap_or_else(|e| e.into_inner()).clone());
    }

    /// The first step of a stop: withdraw every route (and say fault to
    /// keepalived), wait for BIRD to take it, then give the routers
    /// `withdraw_wait` (keepalived `TRACK_WAIT`) to move the traffic away.
    pub(super) async fn ha_stop(&mut self) {
        let announced = self.ha.decided.values().any(|d| d.announce);
        let track_said_serve = self.ha.track.said() == Some(true);
        self.ha.stopping = true;
        self.announce_now();
        self.ha.sync = None;
        self.ha.sync_retry = Retry::default();
        match (&self.ha.bgp, self.ha.retiring.take()) {
            (Some((_, a)), _) => match a.withdraw_all(WITHDRAW_LIMIT).await {
                Ok(()) => info!("bgp: every route withdrawn"),
                Err(e) => warn!("bgp: withdrawing at stop: {e:#}"),
            },
            // `bgp:` went at a reload, and its announcer still withdraws.
            (None, Some(retiring)) => {
                if tokio::time::timeout(WITHDRAW_LIMIT, retiring.done()).await.is_err() {
                    warn!("bgp: the routes of the removed bgp section are not withdrawn yet");
                }
            }
            (None, None) => {}
        }
        // `--ephemeral` pins go with the process: the program is detached too.
        let detaching = self.opts.detach_on_exit || self.opts.ephemeral;
        let wait = stop_wait(self.ha.bgp.as_ref().map(|(s, _)| s), announced, track_said_serve, detaching);
        if wait.is_zero() {
            return;
        }
        if self.ha.bgp.is_some() {
            info!("waiting {wait:?} (bgp.withdraw_wait) for the routers to move the traffic away");
        } else {
            info!("waiting {wait:?} for keepalived to hand the VIP to another node (the track file says fault)");
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_waits_withdraw_wait_with_bgp_and_for_keepalived_without() {
        let bgp = BgpSettings { withdraw_wait: Duration::from_secs(7), ..Default::default() };
        assert_eq!(stop_wait(Some(&bgp), true, true, false), Duration::from_secs(7));
        assert_eq!(stop_wait(Some(&bgp), false, true, true), Duration::ZERO, "nothing was announced");
        assert_eq!(stop_wait(None, false, true, true), TRACK_WAIT, "keepalived may hold the VIP here");
        assert_eq!(stop_wait(None, false, true, false), Duration::ZERO, "the dataplane stays and forwards");
        assert_eq!(stop_wait(None, false, false, true), Duration::ZERO, "the track file said fault already");
    }

    #[test]
    fn a_drain_counts_the_addresses_it_withdrew() {
        assert_eq!(
            drain_line(false, true, true, 1),
            "node drained: 1 VIP address(es) withdrawn from BGP, keepalived's track file says fault; \
             `xdplb undrain` to serve again"
        );
        assert_eq!(drain_line(true, true, true, 0), "the node is already drained");
        assert_eq!(drain_line(false, false, false, 0), "the node is already serving");
        assert_eq!(
            drain_line(false, true, false, 0),
            "node drained: keepalived's track file says fault; `xdplb undrain` to serve again"
        );
        assert_eq!(
            drain_line(true, false, true, 0),
            "node serving again: VIP addresses with healthy backends announced"
        );
    }

    #[test]
    fn a_failed_start_is_retried_every_few_seconds_and_logged_once_per_error() {
        let t0 = Instant::now();
        let mut r = Retry::default();
        assert!(!r.due(t0), "nothing failed");
        assert!(r.failed("cannot bind 198.18.0.1:7946".into(), t0), "the first error is logged");
        assert!(!r.due(t0 + SYNC_RETRY - Duration::from_millis(1)));
        assert!(r.due(t0 + SYNC_RETRY));
        assert!(!r.failed("cannot bind 198.18.0.1:7946".into(), t0 + SYNC_RETRY), "the same error is not");
        assert!(r.due(t0 + SYNC_RETRY * 2));
        assert!(r.failed("another error".into(), t0 + SYNC_RETRY * 2), "a new error is");
        assert!(r.done(), "it had failed");
        assert!(!r.due(t0 + SYNC_RETRY * 10), "done: no more tries");
        assert!(!r.done());
    }
}
