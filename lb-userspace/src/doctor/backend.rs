//! Backend side: from the facts of a backend host, what makes it drop or
//! misroute the packets the balancer sends it (DSR and IP-in-IP). Pure:
//! `collect` gathers the facts.

use std::{collections::HashMap, net::IpAddr};

use lb_common::maps::programs;

use super::{
    bpffs::{self, PinFacts},
    findings::{Finding, Severity},
    lb::mss,
    system::{Link, Route},
};
use crate::reconcile::Forwarding;

/// The IPv4 settings of one interface (or `all`) that decide ARP and
/// reverse-path filtering: `net.ipv4.conf.IF.*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conf {
    pub arp_ignore: Option<u32>,
    pub arp_announce: Option<u32>,
    pub rp_filter: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendFacts {
    /// The VIPs this host serves and how they reach it (DSR or IP-in-IP).
    pub vips: Vec<(IpAddr, Forwarding)>,
    /// The interface facing the balancer, if given.
    pub iface: Option<String>,
    /// Every interface of this network namespace.
    pub links: Vec<Link>,
    /// `all` and each interface.
    pub conf: HashMap<String, Conf>,
    /// The largest IP packet clients send.
    pub client_mtu: u32,
    pub default_routes: Vec<Route>,
    /// Where `xdplb decap` pins its link (IP-in-IP only).
    pub pin: Option<PinFacts>,
}

impl BackendFacts {
    /// The interfaces packets from the balancer arrive on: the one given,
    /// or every one that is up and does ARP.
    fn receivers(&self) -> Vec<&Link> {
        match &self.iface {
            Some(name) => self.links.iter().filter(|l| &l.name == name).collect(),
            None => self.links.iter().filter(|l| l.is_up() && !l.is_noarp()).collect(),
        }
    }

    /// A setting of `all` and of `iface`: the kernel applies the larger.
    fn effective(&self, iface: &str, key: fn(&Conf) -> Option<u32>) -> Option<(u32, u32, u32)> {
        let all = key(self.conf.get("all")?)?;
        let own = key(self.conf.get(iface)?)?;
        Some((all.max(own), all, own))
    }

    fn ipip_families(&self) -> Vec<u8> {
        let mut f: Vec<u8> = self
            .vips
            .iter()
            .filter(|(_, fwd)| *fwd == Forwarding::Ipip)
            .map(|(a, _)| if a.is_ipv4() { 4 } else { 6 })
            .collect();
        f.sort_unstable();
        f.dedup();
        f
    }
}

/// Every finding of the backend side.
pub fn decide(f: &BackendFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(name) = &f.iface
        && !f.links.iter().any(|l| &l.name == name)
    {
        out.push(
            Finding::error(
                "interface-missing",
                format!("interface {name} does not exist in this network namespace"),
                "the checks of the interface facing the balancer cannot run",
            )
            .fix("ip -br link show   # the interfaces here"),
        );
    }
    let mut seen = Vec::new();
    for &(vip, fwd) in &f.vips {
        // One VIP served both ways is checked once.
        if !seen.contains(&vip) {
            seen.push(vip);
            out.extend(vip_address(f, vip, fwd));
        }
    }
    out.extend(arp(f));
    out.extend(rp_filter(f));
    let families = f.ipip_families();
    if !families.is_empty() {
        out.extend(decap(f, &families));
        out.extend(ipip_mtu(f, &families));
        out.extend(f.pin.as_ref().and_then(|p| bpffs::decide(p, false)));
    }
    out
}

fn host_len(a: IpAddr) -> u8 {
    if a.is_ipv4() { 32 } else { 128 }
}

fn vip_address(f: &BackendFacts, vip: IpAddr, fwd: Forwarding) -> Vec<Finding> {
    let how = match fwd {
        Forwarding::Ipip => "inside an outer IP header addressed to this host",
        _ => "with only the MAC address rewritten",
    };
    let holders: Vec<&Link> = f.links.iter().filter(|l| l.holds(vip).is_some()).collect();
    if holders.is_empty() {
        return vec![
            Finding::error(
                "vip-missing",
                format!("the VIP {vip} is not an address of this host"),
                format!(
                    "the balancer delivers packets for the VIP {how}, still addressed to the VIP; a host drops \
                     packets for an address it does not hold"
                ),
            )
            .fix(format!("ip addr add {vip}/{} dev lo", host_len(vip))),
        ];
    }
    let on_loopback = holders.iter().any(|l| l.is_noarp());
    holders
        .iter()
        .filter(|l| !l.is_noarp())
        .map(|l| {
            let len = l.holds(vip).unwrap_or(host_len(vip));
            let mut finding = Finding::error(
                "vip-not-on-loopback",
                format!("the VIP {vip} is on {}, not on a loopback", l.name),
                format!(
                    "this host answers {} for the VIP on {}: clients and routers on that segment learn this host's \
                     MAC for the VIP and send its traffic here, bypassing the balancer",
                    if vip.is_ipv4() { "ARP" } else { "neighbour solicitations" },
                    l.name
                ),
            )
            .fix(format!("ip addr del {vip}/{len} dev {}", l.name));
            if !on_loopback {
                finding = finding.fix(format!("ip addr add {vip}/{} dev lo", host_len(vip)));
            }
            finding
        })
        .collect()
}

/// `sysctl -w` syntax for `net.ipv4.conf.IF.KEY`; names with dots take the slash form.
fn sysctl_key(iface: &str, key: &str) -> String {
    if iface.contains('.') { format!("net/ipv4/conf/{iface}/{key}") } else { format!("net.ipv4.conf.{iface}.{key}") }
}

/// `sysctl -w` setting `key` to `value` on `all` and on each of `ifaces`.
fn sysctl_fix(key: &str, value: u32, ifaces: &[&str]) -> String {
    let mut cmd = format!("sysctl -w {}={value}", sysctl_key("all", key));
    for i in ifaces {
        cmd += &format!(" {}={value}", sysctl_key(i, key));
    }
    cmd
}

/// `IF (all=A, IF=B)` for each interface, for messages.
fn listing(items: &[(&str, u32, u32)], key: &str) -> String {
    items
        .iter()
        .map(|(i, all, own)| format!("{i} (net.ipv4.conf.all.{key}={all}, net.ipv4.conf.{i}.{key}={own})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn arp(f: &BackendFacts) -> Vec<Finding> {
    let v4: Vec<Forwarding> = f.vips.iter().filter(|(a, _)| a.is_ipv4()).map(|&(_, fwd)| fwd).collect();
    if v4.is_empty() {
        return Vec::new();
    }
    // DSR backends share the segment where the VIP is announced; IP-in-IP ones may not.
    let severity = if v4.contains(&Forwarding::Dsr) { Severity::Error } else { Severity::Warning };
    let receivers = f.receivers();
    let bad = |key: fn(&Conf) -> Option<u32>, ok: fn(u32) -> bool| -> Vec<(&str, u32, u32)> {
        receivers
            .iter()
            .filter_map(|l| {
                let (eff, all, own) = f.effective(&l.name, key)?;
                (!ok(eff)).then_some((l.name.as_str(), all, own))
            })
            .collect()
    };
    let mut out = Vec::new();
    let ignore = bad(|c| c.arp_ignore, |v| v >= 1);
    if !ignore.is_empty() {
        let names: Vec<&str> = ignore.iter().map(|i| i.0).collect();
        let mut finding = Finding::error(
            "arp-ignore",
            format!("arp_ignore is 0 on {}; the larger of the two applies", listing(&ignore, "arp_ignore")),
            "with arp_ignore=0 Linux answers ARP for every local address on every interface, the VIP on lo \
             included: routers and clients on the segment learn this backend's MAC for the VIP and send its \
             traffic here, bypassing the balancer",
        )
        .fix(sysctl_fix("arp_ignore", 1, &names));
        finding.severity = severity;
        out.push(finding);
    }
    let announce = bad(|c| c.arp_announce, |v| v >= 2);
    if !announce.is_empty() {
        let names: Vec<&str> = announce.iter().map(|i| i.0).collect();
        let mut finding = Finding::error(
            "arp-announce",
            format!("arp_announce is below 2 on {}; the larger of the two applies", listing(&announce, "arp_announce")),
            "below 2, this host may send its own ARP requests with the VIP as their source address (a reply \
             from the VIP to a client needs the client's MAC): neighbours then learn this backend's MAC for \
             the VIP and send its traffic here, bypassing the balancer",
        )
        .fix(sysctl_fix("arp_announce", 2, &names));
        finding.severity = severity;
        out.push(finding);
    }
    out
}

fn rp_filter(f: &BackendFacts) -> Option<Finding> {
    if !f.vips.iter().any(|(a, _)| a.is_ipv4()) {
        return None;
    }
    let tunnels = f.links.iter().filter(|l| l.is_up() && l.tunnel_family() == Some(4));
    let mut strict: Vec<(&Link, u32, u32)> = Vec::new();
    for l in f.receivers().into_iter().chain(tunnels) {
        if let Some((1, all, own)) = f.effective(&l.name, |c| c.rp_filter)
            && !strict.iter().any(|(s, _, _)| s.name == l.name)
        {
            strict.push((l, all, own));
        }
    }
    if strict.is_empty() {
        return None;
    }
    let items: Vec<(&str, u32, u32)> = strict.iter().map(|(l, a, o)| (l.name.as_str(), *a, *o)).collect();
    let names: Vec<&str> = items.iter().map(|i| i.0).collect();
    let mut finding = Finding::warning(
        "rp-filter",
        format!(
            "strict reverse-path filtering (rp_filter=1) on {}; the larger of the two applies",
            listing(&items, "rp_filter")
        ),
        "strict mode drops a packet whose source is not routed back through the interface it came in on: DSR and \
         IP-in-IP packets keep the client's address as source, so they are dropped silently when this host's route \
         to the clients leaves through another interface, and always when a kernel tunnel device (tunl0) \
         decapsulates them",
    )
    .fix(format!("{}   # loose: a route back through any interface will do", sysctl_fix("rp_filter", 2, &names)));
    if strict.iter().any(|(l, _, _)| l.tunnel_family().is_some()) {
        finding.severity = Severity::Error;
    }
    Some(finding)
}

fn decap(f: &BackendFacts, families: &[u8]) -> Option<Finding> {
    let receivers = f.receivers();
    let has_decap = match &f.iface {
        Some(_) => receivers.iter().any(|l| l.has_program(programs::DECAP).is_some()),
        None => f.links.iter().any(|l| l.has_program(programs::DECAP).is_some()),
    };
    let tunnels = families.iter().all(|&fam| f.links.iter().any(|l| l.is_up() && l.tunnel_family() == Some(fam)));
    if has_decap || tunnels {
        return None;
    }
    let on = match &f.iface {
        Some(i) => format!(" on {i}"),
        None => " on any interface".to_string(),
    };
    let mut finding = Finding::error(
        "no-decap",
        format!("nothing decapsulates IP-in-IP here: no xdplb decap program{on}, and no kernel ipip/ip6tnl device"),
        format!(
            "the balancer sends the VIP's packets inside an outer IP header addressed to this host (IP protocol {}); \
             without decapsulation the kernel has no handler for them and drops them",
            families.iter().map(|&f| if f == 4 { "4" } else { "41" }).collect::<Vec<_>>().join(" and ")
        ),
    );
    for l in receivers.iter().filter(|l| !l.is_noarp()) {
        finding = finding.fix(format!("xdplb decap --iface {}", l.name));
    }
    if finding.fix.is_empty() {
        finding = finding.fix("xdplb decap --iface IFACE   # the interface facing the balancer");
    }
    Some(finding)
}

fn ipip_mtu(f: &BackendFacts, families: &[u8]) -> Vec<Finding> {
    let overhead = if families.contains(&6) { 40 } else { 20 };
    let needed = f.client_mtu + overhead;
    let decaps: Vec<&Link> = f.links.iter().filter(|l| l.has_program(programs::DECAP).is_some()).collect();
    let links = if f.iface.is_none() && !decaps.is_empty() { decaps } else { f.receivers() };
    links
        .into_iter()
        .filter(|l| l.mtu < needed)
        .map(|l| {
            let fam = if overhead == 40 { 6 } else { 4 };
            let mss = mss(l.mtu, fam);
            let route = f
                .default_routes
                .iter()
                .find(|r| r.dev == l.name)
                .map(|r| match r.gateway {
                    Some(g) => format!("default via {g} dev {}", l.name),
                    None => format!("default dev {}", l.name),
                })
                .unwrap_or_else(|| format!("ROUTE-TO-CLIENTS dev {}", l.name));
            Finding::error(
                "ipip-mtu",
                format!(
                    "{} has MTU {}, too small for IP-in-IP: a {}-byte client packet arrives as {needed} bytes ({})",
                    l.name,
                    l.mtu,
                    f.client_mtu,
                    if overhead == 40 { "IPv6 in IPv6: +40" } else { "IPv4 in IPv4: +20" }
                ),
                "frames larger than the interface's MTU are dropped on receipt, silently: connections open but \
                 full-size segments never arrive",
            )
            .fix(format!(
                "ip link set dev {} mtu {needed}   # and on every link between the balancer and this backend",
                l.name
            ))
            .or(format!(
                "ip route change {route} advmss {mss}   # this backend then asks clients for segments that fit"
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::system::{XdpMode, XdpProg};

    fn link(name: &str, flags: &[&str], mtu: u32, addrs: &[(&str, u8)]) -> Link {
        Link {
            index: 1,
            name: name.into(),
            flags: flags.iter().map(|s| s.to_string()).collect(),
            operstate: "UP".into(),
            mtu,
            kind: None,
            xdp: Vec::new(),
            peer: None,
            addrs: addrs.iter().map(|(a, l)| (a.parse().unwrap(), *l)).collect(),
        }
    }

    const VIP4: &str = "198.18.100.1";
    const VIP6: &str = "2001:db8:100::1";

    /// A test cluster's backend b1, healthy for DSR and IP-in-IP.
    fn healthy() -> BackendFacts {
        let lo = link("lo", &["LOOPBACK", "UP", "LOWER_UP"], 65536, &[("127.0.0.1", 8), (VIP4, 32), (VIP6, 128)]);
        let mut b1 = link("b1", &["BROADCAST", "UP", "LOWER_UP"], 1600, &[("198.18.0.11", 24)]);
        b1.xdp = vec![XdpProg { mode: XdpMode::Driver, id: 3, name: programs::DECAP.into() }];
        let conf = Conf { arp_ignore: Some(0), arp_announce: Some(0), rp_filter: Some(0) };
        BackendFacts {
            vips: vec![
                (VIP4.parse().unwrap(), Forwarding::Dsr),
                (VIP6.parse().unwrap(), Forwarding::Dsr),
                (VIP4.parse().unwrap(), Forwarding::Ipip),
                (VIP6.parse().unwrap(), Forwarding::Ipip),
            ],
            iface: None,
            links: vec![lo, b1],
            conf: [
                ("all".to_string(), Conf { arp_ignore: Some(1), arp_announce: Some(2), ..conf }),
                ("lo".to_string(), conf),
                ("b1".to_string(), conf),
            ]
            .into(),
            client_mtu: 1500,
            default_routes: Vec::new(),
            pin: None,
        }
    }

    fn checks(f: &BackendFacts) -> Vec<&'static str> {
        decide(f).iter().map(|x| x.check).collect()
    }

    #[test]
    fn a_healthy_backend_has_no_finding() {
        assert_eq!(decide(&healthy()), vec![]);
    }

    #[test]
    fn the_vip_must_be_held_on_a_loopback() {
        let mut f = healthy();
        f.links[0].addrs.retain(|(a, _)| a.to_string() != VIP4);
        let found = decide(&f);
        // Once, though it is served by DSR and by IP-in-IP.
        assert_eq!(found.iter().map(|x| x.check).collect::<Vec<_>>(), vec!["vip-missing"]);
        assert_eq!(found[0].fix, vec!["ip addr add 198.18.100.1/32 dev lo"]);
        f.links[1].addrs.push((VIP4.parse().unwrap(), 24));
        let found = decide(&f);
        assert_eq!(found[0].check, "vip-not-on-loopback");
        assert!(found[0].why.contains("answers ARP for the VIP on b1"));
        assert_eq!(found[0].fix, vec!["ip addr del 198.18.100.1/24 dev b1", "ip addr add 198.18.100.1/32 dev lo"]);
        // On lo as well: only the extra one goes.
        f.links[0].addrs.push((VIP4.parse().unwrap(), 32));
        assert_eq!(decide(&f)[0].fix, vec!["ip addr del 198.18.100.1/24 dev b1"]);
    }

    #[test]
    fn arp_settings_take_the_larger_of_all_and_the_interface() {
        let mut f = healthy();
        f.conf.get_mut("all").unwrap().arp_ignore = Some(0);
        let found = decide(&f);
        assert_eq!((found[0].check, found[0].severity), ("arp-ignore", Severity::Error));
        assert!(found[0].what.contains("b1 (net.ipv4.conf.all.arp_ignore=0, net.ipv4.conf.b1.arp_ignore=0)"));
        assert_eq!(found[0].fix, vec!["sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.b1.arp_ignore=1"]);
        f.conf.get_mut("b1").unwrap().arp_ignore = Some(1);
        assert_eq!(decide(&f), vec![], "the interface's 1 wins over all's 0");
        f.conf.get_mut("all").unwrap().arp_announce = Some(1);
        let found = decide(&f);
        assert_eq!(found[0].check, "arp-announce");
        assert_eq!(found[0].fix, vec!["sysctl -w net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.b1.arp_announce=2"]);
        // IP-in-IP only: a warning.
        f.vips.retain(|(_, fwd)| *fwd == Forwarding::Ipip);
        assert_eq!(decide(&f)[0].severity, Severity::Warning);
        // IPv6 only: no ARP.
        f.vips.retain(|(a, _)| a.is_ipv6());
        assert_eq!(decide(&f), vec![]);
    }

    #[test]
    fn dotted_interface_names_take_the_slash_form() {
        assert_eq!(
            sysctl_fix("arp_ignore", 1, &["eth0.100"]),
            "sysctl -w net.ipv4.conf.all.arp_ignore=1 net/ipv4/conf/eth0.100/arp_ignore=1"
        );
    }

    #[test]
    fn strict_rp_filter() {
        let mut f = healthy();
        f.conf.get_mut("b1").unwrap().rp_filter = Some(1);
        let found = decide(&f);
        assert_eq!((found[0].check, found[0].severity), ("rp-filter", Severity::Warning));
        assert!(found[0].fix[0].starts_with("sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.b1.rp_filter=2"));
        f.conf.get_mut("b1").unwrap().rp_filter = Some(2);
        assert_eq!(checks(&f), Vec::<&str>::new(), "max(0, 2) is loose");
        f.conf.get_mut("all").unwrap().rp_filter = Some(1);
        assert_eq!(checks(&f), Vec::<&str>::new(), "max(1, 2) is loose");
        // The interface's 0 does not lower all's strict mode.
        f.conf.get_mut("b1").unwrap().rp_filter = Some(0);
        assert_eq!(checks(&f), vec!["rp-filter"], "max(1, 0) is strict");
        // A kernel tunnel device in strict mode drops every decapsulated packet.
        let mut tunl = link("tunl0", &["NOARP", "UP", "LOWER_UP"], 1480, &[]);
        tunl.kind = Some("ipip".into());
        f.links.push(tunl);
        f.conf.insert("tunl0".into(), Conf { rp_filter: Some(0), ..Conf::default() });
        let found = decide(&f);
        assert_eq!((found[0].check, found[0].severity), ("rp-filter", Severity::Error));
        assert!(found[0].what.contains("b1 (") && found[0].what.contains("tunl0 ("), "{}", found[0].what);
    }

    #[test]
    fn ipip_needs_decapsulation() {
        let mut f = healthy();
        f.links[1].xdp.clear();
        let found = decide(&f);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].check, "no-decap");
        assert!(found[0].why.contains("IP protocol 4 and 41"));
        assert_eq!(found[0].fix, vec!["xdplb decap --iface b1"]);
        // DSR only: nothing to decapsulate.
        f.vips.retain(|(_, fwd)| *fwd == Forwarding::Dsr);
        assert_eq!(decide(&f), vec![]);
        // Kernel tunnel devices of both families do it.
        let mut f = healthy();
        f.links[1].xdp.clear();
        for (name, kind) in [("tunl0", "ipip"), ("ip6tnl0", "ip6tnl")] {
            let mut t = link(name, &["NOARP", "UP", "LOWER_UP"], 1480, &[]);
            t.kind = Some(kind.into());
            f.links.push(t);
        }
        assert_eq!(decide(&f), vec![]);
        f.links.pop();
        assert_eq!(checks(&f), vec!["no-decap"], "no IPv6 tunnel");
    }

    #[test]
    fn ipip_needs_room_for_the_outer_header() {
        let mut f = healthy();
        f.links[1].mtu = 1500;
        f.default_routes = vec![Route { gateway: Some("198.18.0.1".parse().unwrap()), dev: "b1".into() }];
        let found = decide(&f);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].check, "ipip-mtu");
        assert!(found[0].what.contains("arrives as 1540 bytes (IPv6 in IPv6: +40)"), "{}", found[0].what);
        assert!(found[0].fix[0].starts_with("ip link set dev b1 mtu 1540"));
        assert!(found[0].alternative[0].starts_with("ip route change default via 198.18.0.1 dev b1 advmss 1400"));
        f.vips.retain(|(a, _)| a.is_ipv4());
        f.links[1].mtu = 1520;
        assert_eq!(decide(&f), vec![]);
    }

    #[test]
    fn a_given_interface_must_exist_and_is_the_one_checked() {
        let mut f = healthy();
        f.iface = Some("eth7".into());
        let found = checks(&f);
        assert_eq!(found, vec!["interface-missing", "no-decap"]);
    }
}
