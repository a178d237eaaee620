//! Backends by DNS name, as HAProxy's `resolvers`: a task resolves every
//! configured name at `resolvers.interval` (A and AAAA, through hickory) and
//! hands the answers to the daemon; `Names` keeps, per name, the addresses in
//! use, those draining after they left the answer, and the last error.
//!
//! A failed resolution — a timeout, SERVFAIL, NXDOMAIN or an empty answer —
//! keeps the last known addresses: a DNS outage must never empty a pool that
//! is serving. To take a name's servers out, remove the name from the file.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig},
    name_server::TokioConnectionProvider,
    proto::xfer::Protocol,
};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, Resolvers};

/// One name's answer: its addresses, or why there are none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub name: String,
    pub result: Result<Vec<IpAddr>, String>,
}

/// Every backend name of a configuration, sorted and once each.
pub fn names_of(config: &Config) -> Vec<String> {
    let set: BTreeSet<String> =
        config.vips.iter().flat_map(|v| v.named_backends.iter().map(|b| b.name.clone())).collect();
    set.into_iter().collect()
}

fn resolver(settings: &Resolvers) -> Result<TokioResolver> {
    let mut builder = if settings.nameservers.is_empty() {
        TokioResolver::builder_tokio().context(
            "cannot read the system's DNS configuration (/etc/resolv.conf); \
             name the DNS servers in `resolvers: {nameservers: [...]}`",
        )?
    } else {
        let mut config = ResolverConfig::new();
        for &addr in &settings.nameservers {
            config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(addr, Protocol::Tcp));
        }
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
    };
    let opts = builder.options_mut();
    opts.timeout = settings.timeout;
    opts.attempts = 2;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // Every round asks the servers: a changed record is seen within one interval.
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    Ok(builder.build())
}

/// Starts the resolving task. It resolves the names in `names` (updated by
/// reloads) right away, then every `interval` and whenever the list changes.
pub fn spawn(settings: &Resolvers, mut names: watch::Receiver<Vec<String>>) -> Result<mpsc::Receiver<Vec<Answer>>> {
    let resolver = resolver(settings)?;
    let (tx, rx) = mpsc::channel(4);
    let interval = settings.interval;
    // A round never takes longer than both attempts' time limits.
    let limit = settings.timeout * 2 + Duration::from_millis(500);
    tokio::spawn(async move {
        loop {
            let list = names.borrow_and_update().clone();
            if !list.is_empty() {
                let lookups = list.iter().map(|name| {
                    let resolver = &resolver;
                    async move {
                        let result = match tokio::time::timeout(limit, resolver.lookup_ip(format!("{name}."))).await {
                            Err(_) => Err(format!("no answer within {limit:?}")),
                            Ok(Err(e)) if e.is_no_records_found() => Err(format!("no A/AAAA records ({e})")),
                            Ok(Err(e)) => Err(e.to_string()),
                            Ok(Ok(found)) => Ok(found.iter().collect::<Vec<IpAddr>>()),
                        };
                        Answer { name: name.clone(), result }
                    }
                });
                let answers = futures_util::future::join_all(lookups).await;
                if tx.send(answers).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                changed = names.changed() => if changed.is_err() { return },
            }
        }
    });
    Ok(rx)
}

/// What the controller knows of one name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameState {
    /// The addresses of the last good answer.
    pub current: BTreeSet<IpAddr>,
    /// Addresses that left the answer, and since when (draining until the hold ends).
    pub obsolete: BTreeMap<IpAddr, Instant>,
    /// The last resolution's error, if it failed.
    pub last_error: Option<String>,
    /// When the last good answer came.
    pub resolved_at: Option<SystemTime>,
    pub failures: u64,
}

/// Every name's state; the daemon's single source for name → addresses.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub states: BTreeMap<String, NameState>,
}

/// What `Names::update` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The addresses used as backends changed: apply again.
    pub backends: bool,
    /// Names whose resolution newly failed, with the error (to log once).
    pub failed: Vec<(String, String)>,
    /// Names that resolve again after failing.
    pub recovered: Vec<String>,
}

impl Names {
    /// Forgets names the configuration no longer has.
    pub fn retain(&mut self, names: &[String]) {
        self.states.retain(|n, _| names.contains(n));
    }

    /// Takes a round of answers; `hold` is how long a vanished address drains.
    pub fn update(&mut self, answers: Vec<Answer>, now: Instant, hold: Duration) -> Changes {
        let mut changes = Changes::default();
        for a in answers {
            let state = self.states.entry(a.name.clone()).or_default();
            match a.result {
                Ok(addrs) if !addrs.is_empty() => {
                    let fresh: BTreeSet<IpAddr> = addrs.into_iter().collect();
                    if fresh != state.current {
                        changes.backends = true;
                    }
                    for gone in state.current.difference(&fresh) {
                        state.obsolete.entry(*gone).or_insert(now);
                    }
                    state.obsolete.retain(|addr, _| !fresh.contains(addr));
                    state.current = fresh;
                    state.resolved_at = Some(SystemTime::now());
                    if state.last_error.take().is_some() {
                        changes.recovered.push(a.name);
                    }
                }
                result => {
                    let error = result.err().unwrap_or_else(|| "an empty answer".into());
                    state.failures += 1;
                    if state.last_error.as_ref() != Some(&error) {
                        changes.failed.push((a.name, error.clone()));
                    }
                    state.last_error = Some(error);
                }
            }
        }
        for state in self.states.values_mut() {
            let before = state.obsolete.len();
            state.obsolete.retain(|_, since| now.duration_since(*since) < hold);
            changes.backends |= state.obsolete.len() != before;
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(name: &str, addrs: &[&str]) -> Answer {
        Answer { name: name.into(), result: Ok(addrs.iter().map(|a| a.parse().unwrap()).collect()) }
    }

    fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_vanished_address_drains_for_the_hold_then_goes() {
        let hold = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut n = Names::default();
        assert!(n.update(vec![ok("web", &["198.18.0.11", "198.18.0.12"])], t0, hold).backends);
        assert!(!n.update(vec![ok("web", &["198.18.0.12", "198.18.0.11"])], t0, hold).backends, "same set");
        let c = n.update(vec![ok("web", &["198.18.0.12", "198.18.0.13"])], t0 + Duration::from_secs(1), hold);
        assert!(c.backends);
        let s = &n.states["web"];
        assert_eq!(s.current, set(&["198.18.0.12", "198.18.0.13"]));
        assert_eq!(s.obsolete.keys().copied().collect::<BTreeSet<_>>(), set(&["198.18.0.11"]));
        // Still draining within the hold; gone after it.
        assert!(!n.update(vec![], t0 + Duration::from_secs(30), hold).backends);
        assert!(n.update(vec![], t0 + Duration::from_secs(31), hold).backends);
        assert!(n.states["web"].obsolete.is_empty());
        // An address that comes back stops draining.
        n.update(vec![ok("web", &["198.18.0.12"])], t0 + Duration::from_secs(40), hold);
        n.update(vec![ok("web", &["198.18.0.12", "198.18.0.13"])], t0 + Duration::from_secs(41), hold);
        assert!(n.states["web"].obsolete.is_empty());
    }

    #[test]
    fn a_failed_resolution_keeps_the_last_known_set_and_is_reported_once() {
        let hold = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut n = Names::default();
        n.update(vec![ok("web", &["198.18.0.11"])], t0, hold);
        let fail = |e: &str| Answer { name: "web".into(), result: Err(e.into()) };
        let c = n.update(vec![fail("timed out")], t0, hold);
        assert_eq!((c.backends, c.failed), (false, vec![("web".to_string(), "timed out".to_string())]));
        assert!(n.update(vec![fail("timed out")], t0, hold).failed.is_empty(), "reported once");
        let c = n.update(vec![ok("web", &[])], t0, hold);
        assert_eq!(c.failed, vec![("web".to_string(), "an empty answer".to_string())]);
        let s = &n.states["web"];
        assert_eq!((s.current.clone(), s.failures), (set(&["198.18.0.11"]), 3));
        let c = n.update(vec![ok("web", &["198.18.0.11"])], t0, hold);
        assert_eq!((c.backends, c.recovered), (false, vec!["web".to_string()]));
        assert_eq!(n.states["web"].last_error, None);
    }
}
