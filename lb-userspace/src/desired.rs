//! Configuration + what the controller observes (health, next-hop MACs) →
//! the VIPs the dataplane should have. A pure function: the daemon calls it
//! after every change and hands the result to the reconciler.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use crate::{
    config::{BackendConfig, Config, OnAllDown, VipConfig},
    dns::NameState,
    reconcile::{BackendSpec, Forwarding, VipSpec},
};

/// A backend as the health checker and status know it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendRef {
    pub vip: String,
    pub addr: IpAddr,
    /// 0 when the backend has no port of its own.
    pub port: u16,
}

impl BackendRef {
    pub fn of(vip: &VipConfig, addr: IpAddr, port: Option<u16>) -> Self {
        Self { vip: vip.name.clone(), addr, port: port.unwrap_or(0) }
    }
}

/// What the controller knows beyond the file.
#[derive(Default, Clone, Debug)]
pub struct Observed {
    /// Health by backend; absent means down.
    pub healthy: HashMap<BackendRef, bool>,
    /// MAC of the next hop toward each backend address; absent = unresolved.
    pub next_hop_mac: HashMap<IpAddr, [u8; 6]>,
    /// The interface each backend address is reached through, when known.
    pub next_hop_ifindex: HashMap<IpAddr, u32>,
    /// (client-facing, backend-facing) interface indexes: a NAT backend must
    /// be behind the backend-facing one, any other behind the client-facing one.
    pub interfaces: Option<(u32, u32)>,
}

impl Observed {
    /// The MAC to send a backend's packets to, if it is reachable the way its VIP's mode needs.
    fn mac_for(&self, addr: &IpAddr, forwarding: Forwarding) -> Option<[u8; 6]> {
        let mac = self.next_hop_mac.get(addr).copied()?;
        match (self.interfaces, self.next_hop_ifindex.get(addr)) {
            (Some((client, backend)), Some(&via)) => {
                let want = if forwarding == Forwarding::Nat { backend } else { client };
                (via == want).then_some(mac)
            }
            _ => Some(mac),
        }
    }
}

/// The configuration with every backend name replaced by the addresses it
/// resolves to (of the VIP's family): current ones with the configured
/// weight, ones that left the answer at weight 0 (draining) until their hold
/// ends. An address also listed by itself keeps its own entry.
pub fn expand_names(config: &Config, names: &BTreeMap<String, NameState>) -> Config {
    let mut out = config.clone();
    for v in &mut out.vips {
        for nb in &v.named_backends {
            let Some(state) = names.get(&nb.name) else { continue };
            let draining = state.obsolete.keys().map(|a| (*a, 0));
            for (address, weight) in state.current.iter().map(|a| (*a, nb.weight)).chain(draining) {
                if address.is_ipv4() != v.address.is_ipv4()
                    || v.backends.iter().any(|b| b.address == address && b.port == nb.port)
                {
                    continue;
                }
                v.backends.push(BackendConfig { address, port: nb.port, weight, pos: nb.pos });
            }
        }
    }
    out
}

/// What a reload changes, one line each, for the log and `xdplb reload`:
/// VIPs added and removed, and per VIP the backends (by address or name)
/// added, removed and reweighted, and a changed health check.
pub fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    fn members(v: &VipConfig) -> BTreeMap<String, u32> {
        let port = |p: Option<u16>| p.map(|p| format!(":{p}")).unwrap_or_default();
        let by_addr = v.backends.iter().map(|b| (format!("{}{}", b.address, port(b.port)), b.weight));
        by_addr.chain(v.named_backends.iter().map(|b| (format!("{}{}", b.name, port(b.port)), b.weight))).collect()
    }
    let mut out = Vec::new();
    let key = |v: &VipConfig| v.name.clone();
    for v in &new.vips {
        let Some(o) = old.vips.iter().find(|o| key(o) == key(v)) else {
            out.push(format!("VIP {} added ({}:{}, {} backends)", v.name, v.address, v.port, members(v).len()));
            continue;
        };
        let (before, after) = (members(o), members(v));
        for (b, w) in &after {
            match before.get(b) {
                None => out.push(format!("VIP {}: backend {b} added (weight {w})", v.name)),
                Some(was) if was != w => out.push(format!("VIP {}: backend {b} weight {was} -> {w}", v.name)),
                _ => {}
            }
        }
        for b in before.keys().filter(|b| !after.contains_key(*b)) {
            out.push(format!("VIP {}: backend {b} removed", v.name));
        }
        if (o.address, o.port, o.protocol, o.forwarding, o.hash)
            != (v.address, v.port, v.protocol, v.forwarding, v.hash)
        {
            out.push(format!("VIP {}: address, port, protocol, forwarding or hash changed", v.name));
        }
        if o.health_check != v.health_check {
            out.push(format!("VIP {}: health check changed (its backends are checked anew)", v.name));
        }
        if o.on_all_down != v.on_all_down {
            out.push(format!("VIP {}: on_all_down changed", v.name));
        }
    }
    for o in old.vips.iter().filter(|o| !new.vips.iter().any(|v| key(v) == key(o))) {
        out.push(format!("VIP {} removed", o.name));
    }
    if old.resolvers != new.resolvers {
        out.push("resolvers changed".into());
    }
    out
}

/// Every address the controller must resolve a next hop for.
pub fn addresses_to_resolve(config: &Config) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = config
        .vips
        .iter()
        .flat_map(|v| {
            let sorry = match v.on_all_down {
                OnAllDown::SorryServer { address, .. } => Some(address),
                _ => None,
            };
            v.backends.iter().map(|b| b.address).chain(sorry)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The dataplane key of a configured VIP.
pub fn vip_key(v: &VipConfig) -> lb_common::maps::VipKey {
    lb_common::maps::VipKey {
        addr: crate::addr::words(v.address),
        port: v.port.to_be(),
        protocol: v.protocol.number(),
        family: crate::addr::family(v.address),
    }
}

pub fn vip_specs(config: &Config, observed: &Observed) -> Vec<VipSpec> {
    config.vips.iter().map(|v| vip_spec(v, observed)).collect()
}

fn vip_spec(v: &VipConfig, observed: &Observed) -> VipSpec {
    let mut backends: Vec<BackendSpec> = v
        .backends
        .iter()
        .map(|b| {
            let mac = observed.mac_for(&b.address, v.forwarding);
            let healthy = observed.healthy.get(&BackendRef::of(v, b.address, b.port)).copied().unwrap_or(false);
            BackendSpec {
                addr: b.address,
                port: b.port.unwrap_or(0),
                weight: b.weight,
                mac: mac.unwrap_or_default(),
                // A backend we cannot reach at layer 2 gets no traffic.
                healthy: healthy && mac.is_some(),
            }
        })
        .collect();
    let any_up = backends.iter().any(|b| b.healthy && b.weight > 0);
    if let (false, OnAllDown::SorryServer { address, port }) = (any_up, &v.on_all_down) {
        let mac = observed.mac_for(address, v.forwarding);
        backends.push(BackendSpec {
            addr: *address,
            port: port.unwrap_or(0),
            weight: 1,
            mac: mac.unwrap_or_default(),
            healthy: mac.is_some(),
        });
    }
    VipSpec {
        name: v.name.clone(),
        addr: v.address,
        port: v.port,
        protocol: v.protocol.number(),
        forwarding: v.forwarding,
        hash: v.hash,
        table_size: v.table_size,
        backends,
        pass_when_empty: v.on_all_down == OnAllDown::Pass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    const CONFIG: &str = "vips:\n  - name: web\n    address: 198.18.0.100\n    port: 80\n    on_all_down: sorry_server\n    sorry_server: {address: 198.18.0.99}\n    backends:\n      - address: 198.18.0.11\n      - address: 198.18.0.12\n        weight: 0\n";

    fn observed(up: &[&str], resolved: &[&str]) -> Observed {
        let mut o = Observed::default();
        for a in up {
            o.healthy.insert(BackendRef { vip: "web".into(), addr: a.parse().unwrap(), port: 0 }, true);
        }
        for a in resolved {
            o.next_hop_mac.insert(a.parse().unwrap(), [2, 0, 0, 0, 0, 1]);
        }
        o
    }

    #[test]
    fn health_and_resolution_decide_who_is_up() {
        let c = config::parse("c.yaml", CONFIG).unwrap();
        let all = ["198.18.0.11", "198.18.0.12", "198.18.0.99"];
        let specs = vip_specs(&c, &observed(&["198.18.0.11", "198.18.0.12"], &all));
        let b = &specs[0].backends;
        assert_eq!(b.len(), 2, "no sorry server while a backend is up");
        assert!(b[0].healthy && b[0].weight == 1 && b[1].healthy && b[1].weight == 0);
        // Healthy but unresolved: not used.
        let specs = vip_specs(&c, &observed(&["198.18.0.11"], &["198.18.0.99"]));
        assert!(!specs[0].backends[0].healthy);
        assert_eq!(specs[0].backends.len(), 3, "no backend up: the sorry server joins");
        assert!(specs[0].backends[2].healthy && specs[0].backends[2].addr.to_string() == "198.18.0.99");
        // A draining backend being up does not keep the sorry server away.
        let specs = vip_specs(&c, &observed(&["198.18.0.12"], &all));
        assert_eq!(specs[0].backends.len(), 3);
        assert_eq!(addresses_to_resolve(&c).len(), 3);
    }

    #[test]
    fn names_expand_to_their_addresses_of_the_vip_family() {
        let text = "vips:\n  - name: web\n    address: 198.18.100.1\n    port: 80\n    backends:\n      - address: 198.18.0.11\n      - address: web.pool.test\n        weight: 3\n  - name: web6\n    address: 2001:db8:100::1\n    port: 80\n    backends:\n      - address: web.pool.test\n";
        let c = config::parse("c.yaml", text).unwrap();
        let mut names = BTreeMap::new();
        let mut state = NameState::default();
        for a in ["198.18.0.11", "198.18.0.12", "2001:db8::12"] {
            state.current.insert(a.parse().unwrap());
        }
        state.obsolete.insert("198.18.0.13".parse().unwrap(), std::time::Instant::now());
        names.insert("web.pool.test".to_string(), state);
        let e = expand_names(&c, &names);
        let got: Vec<(String, u32)> = e.vips[0].backends.iter().map(|b| (b.address.to_string(), b.weight)).collect();
        // The static entry keeps its weight; the name adds .12 at 3 and drains .13.
        assert_eq!(got, [("198.18.0.11".into(), 1), ("198.18.0.12".into(), 3), ("198.18.0.13".into(), 0)]);
        let got6: Vec<String> = e.vips[1].backends.iter().map(|b| b.address.to_string()).collect();
        assert_eq!(got6, ["2001:db8::12"]);
        // Unresolved names add nothing.
        assert_eq!(expand_names(&c, &BTreeMap::new()).vips[0].backends.len(), 1);
    }

    #[test]
    fn a_reload_says_what_it_changed() {
        let old = config::parse("c.yaml", CONFIG).unwrap();
        let new_text = CONFIG
            .replace(
                "      - address: 198.18.0.12\n        weight: 0\n",
                "      - address: 198.18.0.12\n        weight: 5\n      - address: web.pool.test\n",
            )
            .replace("      - address: 198.18.0.11\n", "")
            + "  - name: api\n    address: 198.18.100.2\n    port: 443\n    backends: [{address: 198.18.0.21}]\n";
        let new = config::parse("c.yaml", &new_text).unwrap();
        assert_eq!(
            describe_changes(&old, &new),
            [
                "VIP web: backend 198.18.0.12 weight 0 -> 5",
                "VIP web: backend web.pool.test added (weight 1)",
                "VIP web: backend 198.18.0.11 removed",
                "VIP api added (198.18.100.2:443, 1 backends)",
            ]
        );
        assert_eq!(describe_changes(&new, &old).last().map(String::as_str), Some("VIP api removed"));
        assert!(describe_changes(&old, &old).is_empty());
    }
}
