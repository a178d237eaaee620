//! Requests of the runtime API, handled in the event loop. A runtime command
//! changes the overrides, which then take the path every change takes
//! (desired → reconcile → dataplane); `reload` is the reload SIGHUP does.

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::Daemon;
use crate::{
    config::Config,
    desired, dns,
    runtime::{self, Call, Request, Response},
};

/// How long `xdplb drain` waits for BIRD to take the change before answering.
const BIRD_CONFIRM: std::time::Duration = std::time::Duration::from_secs(5);

impl Daemon {
    /// One request from the runtime socket; the response goes back on its reply.
    pub(super) fn on_request(&mut self, (request, reply): Call) {
        if let Request::Node { drained } = request {
            return self.drain_node(drained, reply);
        }
        let response = self.handle(request);
        // A client that went away meanwhile changes nothing: the command stands.
        let _ = reply.send(response);
    }

    fn handle(&mut self, request: Request) -> Response {
        let live = self.live_config();
        let done = match request {
            Request::Reload => return self.reload_verdict(),
            Request::Set { vip, backend, set } => {
                desired::set_override(&live, &mut self.overrides, &vip, &backend, set).map(|l| vec![l])
            }
            Request::Ready { vip, backend } => {
                desired::clear_override(&live, &mut self.overrides, &vip, &backend).map(|l| vec![l])
            }
            Request::Clear { vip } => desired::clear_overrides(&live, &mut self.overrides, vip.as_deref()),
            Request::Node { .. } => unreachable!("handled by drain_node"),
        };
        match done {
            Ok(lines) => {
                for l in &lines {
                    info!("runtime API: {l}");
                }
                self.overrides_changed();
                Response::Done { lines }
            }
            Err(error) => Response::Error { error },
        }
    }

    /// `xdplb drain` / `undrain` of the node: answered once BIRD took the
    /// change (waited for off the loop, at most `BIRD_CONFIRM`), so the
    /// command returns when the routers were told.
    fn drain_node(&mut self, drained: bool, reply: tokio::sync::oneshot::Sender<Response>) {
        let mut lines = self.set_node_drained(drained);
        for l in &lines {
            info!("runtime API: {l}");
        }
        self.publish_status();
        let Some(taken) = self.bird_taken_later() else {
            let _ = reply.send(Response::Done { lines });
            return;
        };
        let (status, state_dir) = (self.status.clone(), self.opts.state_dir.clone());
        tokio::spawn(async move {
            match taken.wait(BIRD_CONFIRM).await {
                Ok(bgp) => {
                    lines.push("BIRD took the change".into());
                    // `xdplb drain && xdplb status` shows the routes withdrawn.
                    let mut s = status.lock().unwrap();
                    s.bgp = Some(bgp);
                    if let Err(e) = crate::status::write(&state_dir, &s) {
                        tracing::warn!("cannot write the status file: {e:#}");
                    }
                }
                Err(why) => lines.push(format!("BIRD has not taken the change yet ({why}); xdplb keeps trying")),
            }
            let _ = reply.send(Response::Done { lines });
        });
    }

    fn reload_verdict(&mut self) -> Response {
        self.reload("xdplb reload");
        // `xdplb reload && xdplb show` shows the new backends.
        self.publish_status();
        let s = self.status.lock().unwrap();
        if s.last_reload_errors.is_empty() {
            Response::Applied { generation: s.config_generation, changes: s.last_reload_changes.clone() }
        } else {
            Response::Rejected { generation: s.config_generation, errors: s.last_reload_errors.clone() }
        }
    }

    /// After a runtime command: keep the overrides, apply them, and publish
    /// the status at once, so `status` and `show` show the change as soon as
    /// the command returns.
    fn overrides_changed(&mut self) {
        self.save_overrides();
        self.apply_logged("a runtime command");
        self.publish_status();
    }

    fn save_overrides(&self) {
        if let Err(e) = runtime::save_overrides(&self.opts.state_dir, &self.link.name, &self.overrides) {
            warn!("cannot keep the runtime overrides for a restart: {e:#}");
        }
    }

    /// At start: the overrides the previous controller left, for the
    /// backends still configured.
    pub(super) fn load_overrides(&mut self) {
        match runtime::load_overrides(&self.opts.state_dir, &self.link.name) {
            Ok(o) => self.overrides = o,
            Err(e) => {
                warn!("{e:#}; starting without runtime overrides");
                return;
            }
        }
        self.prune_overrides();
        for line in desired::list_overrides(&self.config, &self.overrides) {
            info!("runtime override kept from the previous run: {line}");
        }
    }

    /// The backends an override may be set on: the file's, and the current
    /// addresses of its names. Not an address draining after it left its
    /// name's answer: an override must not give it a weight back.
    fn live_config(&self) -> Config {
        let current: BTreeMap<String, dns::NameState> = self
            .names
            .states
            .iter()
            .map(|(n, s)| (n.clone(), dns::NameState { obsolete: BTreeMap::new(), ..s.clone() }))
            .collect();
        desired::expand_names(&self.file_config, &current)
    }

    /// Drops the overrides whose backend is no longer configured: it left the
    /// file, or its name's answer. A line each, also logged.
    pub(super) fn prune_overrides(&mut self) -> Vec<String> {
        if self.overrides.is_empty() {
            return Vec::new();
        }
        let live = self.live_config();
        let dropped = desired::prune_overrides(&mut self.overrides, &live);
        for d in &dropped {
            warn!("{d}");
        }
        if !dropped.is_empty() {
            self.save_overrides();
        }
        dropped
    }
}
