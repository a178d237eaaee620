//! Load balancer side: from the facts of this host, what keeps the XDP
//! balancer from forwarding. Pure: `collect` gathers the facts.

use std::collections::HashMap;

use lb_common::maps::programs;

use super::{
    bpffs::{self, PinFacts},
    findings::Finding,
    system::{Link, Peer, XdpMode, XdpProg},
};
use crate::config::XdpModeSetting;

/// Whether a controller runs for the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Controller {
    /// None ever ran here: no status file, no pinned maps.
    Never,
    /// `xdplb run` runs, with this pid.
    Running(u32),
    /// One ran (its pinned maps or status file remain) but none runs now.
    Stopped,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LbFacts {
    /// Checked by `xdplb run` as it starts: the program is not attached yet.
    pub starting: bool,
    /// The configuration file, for the commands of fixes.
    pub config_file: Option<String>,
    /// The balanced interface and, for two-armed NAT, the backend one.
    pub iface: String,
    pub backend_iface: Option<String>,
    /// Every interface of this network namespace.
    pub links: Vec<Link>,
    /// The configured attach mode (what `xdplb run` would use).
    pub mode: XdpModeSetting,
    /// Address families (4, 6) of the VIPs forwarded by IP-in-IP.
    pub ipip_families: Vec<u8>,
    /// The largest IP packet clients send.
    pub client_mtu: u32,
    /// `tx-checksumming` per interface, where ethtool could tell; a
    /// driver-mode veth missing here is reported as not checked.
    pub tx_checksum: HashMap<String, bool>,
    /// The other end of each veth interface.
    pub peers: HashMap<String, Peer>,
    pub controller: Controller,
    /// The running dataplane's `drop_too_big` counter, if a controller publishes one.
    pub drop_too_big: Option<u64>,
    pub pin: Option<PinFacts>,
    /// The configuration announces over BGP but names no flow hash seed
    /// (see `hash_seed::unshared_with_bgp`).
    pub unshared_seed: bool,
}

impl LbFacts {
    fn config(&self) -> &str {
        self.config_file.as_deref().unwrap_or("/etc/xdplb/xdplb.yaml")
    }

    fn run_command(&self) -> String {
        format!("xdplb run --config {} --iface {}", self.config(), self.iface)
    }
}

/// Every finding of the load balancer side.
pub fn decide(f: &LbFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    for name in std::iter::once(&f.iface).chain(&f.backend_iface) {
        let Some(link) = f.links.iter().find(|l| &l.name == name) else {
            out.push(missing(f, name));
            continue;
        };
        out.extend(down(f, link));
        if !f.starting {
            out.extend(attachment(f, link));
        }
        if link.is_veth() && driver_mode(f, link) {
            out.extend(veth_peer(f, link));
            out.extend(veth_tx_checksum(f, link));
        }
    }
    if let Some(link) = f.links.iter().find(|l| l.name == f.iface) {
        out.extend(ipip_mtu(f, link));
    }
    out.extend(f.pin.as_ref().and_then(|p| bpffs::decide(p, f.starting)));
    if f.unshared_seed {
        out.push(
            Finding::warning(
                "hash-seed",
                "the configuration announces VIPs over BGP but gives no flow hash seed (no hash_seed_file, no \
                 flow_sync)",
                "each node then hashes with a random seed of its own: a connection that ECMP moves to another node \
                 (a node joins or leaves) is sent to another backend and breaks",
            )
            .fix("head -c 32 /dev/urandom | base64 > /etc/xdplb/hash-seed.key && chmod 600 /etc/xdplb/hash-seed.key")
            .fix("copy that file to every node, add `hash_seed_file: /etc/xdplb/hash-seed.key` and `xdplb reload`"),
        );
    }
    out
}

fn missing(f: &LbFacts, name: &str) -> Finding {
    let candidates: Vec<&str> = f
        .links
        .iter()
        .filter(|l| !l.is_loopback() && l.is_up() && !l.addrs.is_empty())
        .map(|l| l.name.as_str())
        .collect();
    let mut finding = Finding::error(
        "interface-missing",
        format!("interface {name} does not exist in this network namespace"),
        "xdplb cannot attach to it, so nothing is balanced (an interface of another network namespace is seen only \
         from there: run xdplb with `ip netns exec NAMESPACE`)",
    );
    match candidates.as_slice() {
        [] => finding = finding.fix("ip -br link show   # the interfaces here"),
        list => {
            for c in list {
                finding = finding.fix(format!("xdplb run --config {} --iface {c}", f.config()));
            }
        }
    }
    finding
}

fn down(f: &LbFacts, link: &Link) -> Option<Finding> {
    let name = &link.name;
    if !link.is_up() {
        return Some(
            Finding::error(
                "interface-down",
                format!("interface {name} is down"),
                "it receives and sends nothing, so no packet reaches the XDP program",
            )
            .fix(format!("ip link set dev {name} up")),
        );
    }
    if link.has_carrier() {
        return None;
    }
    let finding = Finding::error(
        "interface-down",
        format!("interface {name} is up but has no carrier (operstate {})", link.operstate),
        "no frame arrives or leaves, so no packet reaches the XDP program",
    );
    Some(match f.peers.get(name) {
        Some(p) => finding.fix(in_namespace(p, &format!("ip link set dev {} up", p.name))),
        None => finding.fix(format!("ethtool {name}   # \"Link detected: no\": check the cable and the switch port")),
    })
}

/// xdplb's balancer on `link`: the untraced program, or the traced one that
/// `xdplb trace` swaps in (the same balancer, also reporting each packet).
fn balancer(link: &Link) -> Option<&XdpProg> {
    link.has_program(programs::BALANCER).or_else(|| link.has_program(programs::TRACED))
}

fn attachment(f: &LbFacts, link: &Link) -> Vec<Finding> {
    let name = &link.name;
    if balancer(link).is_some() {
        let mut out: Vec<Finding> =
            link.has_program(programs::TRACED).map(|p| traced(f, name, p)).into_iter().collect();
        out.extend(match f.controller {
            Controller::Running(_) => None,
            Controller::Stopped | Controller::Never => Some(
                Finding::warning(
                    "controller-not-running",
                    format!("the xdplb program on {name} runs without a controller"),
                    "the dataplane keeps forwarding with its last state, but no health check runs: a backend that \
                     fails keeps its share of new flows, and configuration changes are not applied",
                )
                .fix(f.run_command())
                .or("systemctl start xdplb"),
            ),
        });
        return out;
    }
    if let Some(other) = link.xdp.first() {
        let mode = if other.mode == XdpMode::Skb { "xdpgeneric" } else { "xdp" };
        let finding = Finding::error(
            "xdp-other-program",
            format!(
                "another XDP program is attached to {name}: {} (id {}, {} mode)",
                other.name,
                other.id,
                mode_name(other.mode)
            ),
            "an interface runs one XDP program per mode: xdplb's cannot be attached, and the VIPs' packets go to \
             this one instead",
        );
        let detach = if other.name.starts_with("xdplb_") {
            format!("xdplb detach --iface {name}")
        } else {
            format!("ip link set dev {name} {mode} off")
        };
        return vec![finding.fix(detach).fix(f.run_command())];
    }
    vec![match f.controller {
        Controller::Running(pid) => Finding::error(
            "xdp-not-attached",
            format!("no XDP program is attached to {name}, yet xdplb run (pid {pid}) serves it"),
            "the controller's program is gone from the interface: no packet is balanced",
        )
        .fix(format!("kill {pid} && {}", f.run_command()))
        .or("systemctl restart xdplb"),
        Controller::Stopped => Finding::error(
            "xdp-not-attached",
            format!("no XDP program is attached to {name}, and the controller that served it has stopped"),
            "packets for the VIPs go to this host's own stack, which drops them: nothing is balanced",
        )
        .fix(f.run_command())
        .or("systemctl start xdplb"),
        Controller::Never => Finding::warning(
            "xdp-not-attached",
            format!("no XDP program is attached to {name}: xdplb run has not run here"),
            "until it runs, packets for the VIPs go to this host's own stack, which drops them",
        )
        .fix(f.run_command())
        .or("systemctl start xdplb"),
    }]
}

/// The traced program in the link: `xdplb trace` runs, or was killed and
/// its program waits for the controller to swap the untraced one back. It
/// balances like the untraced one: not an error, nothing to detach.
fn traced(f: &LbFacts, name: &str, p: &XdpProg) -> Finding {
    let what = format!(
        "{name} runs the traced xdplb program ({}, id {}): a trace is running, or an abandoned one's program remains",
        p.name, p.id
    );
    match f.controller {
        Controller::Running(_) => Finding::warning(
            "xdp-traced",
            what,
            "it balances like the untraced program and also reports each packet's decision, which costs a little; \
             when the trace stops (or was killed), the controller swaps the untraced program back within seconds",
        )
        .fix("# none needed: Ctrl-C ends `xdplb trace`, and the controller switches a killed one's program off"),
        Controller::Stopped | Controller::Never => Finding::warning(
            "xdp-traced",
            what,
            "it balances like the untraced program, but with no controller running nothing swaps the untraced \
             one back when the trace ends: a killed trace's program stays until the controller starts",
        )
        .fix(f.run_command()),
    }
}

fn mode_name(m: XdpMode) -> &'static str {
    match m {
        XdpMode::Driver => "driver",
        XdpMode::Skb => "skb",
        XdpMode::Hw => "hw",
    }
}

/// Whether xdplb's program runs (or would run) on `link` in driver mode.
fn driver_mode(f: &LbFacts, link: &Link) -> bool {
    match balancer(link) {
        Some(p) if !f.starting => p.mode == XdpMode::Driver,
        // veth supports native XDP: `auto` attaches in driver mode there.
        _ => f.mode != XdpModeSetting::Skb,
    }
}

/// `COMMAND`, run in the peer's namespace.
fn in_namespace(p: &Peer, command: &str) -> String {
    match (&p.namespace, p.netnsid) {
        (Some(ns), _) => format!("ip netns exec {ns} {command}"),
        (None, Some(id)) => format!("ip netns exec <namespace of netnsid {id}> {command}"),
        (None, None) => command.to_string(),
    }
}

fn veth_peer(f: &LbFacts, link: &Link) -> Option<Finding> {
    let peer = f.peers.get(&link.name)?;
    if peer.driver_xdp != Some(false) {
        return None;
    }
    let where_ = match (&peer.namespace, peer.netnsid) {
        (Some(ns), _) => format!(" in namespace {ns}"),
        (None, Some(id)) => format!(" in the namespace of netnsid {id}"),
        (None, None) => String::new(),
    };
    Some(
        Finding::error(
            "veth-peer-xdp",
            format!("{} is a veth in driver mode and its peer {}{where_} runs no XDP program", link.name, peer.name),
            "a veth silently drops every frame that XDP sends back out of it (XDP_TX, redirect) unless its peer \
             runs an XDP program in driver mode: no packet reaches a backend",
        )
        .fix(in_namespace(peer, &format!("xdplb pass --iface {}", peer.name)))
        .or(format!("{} --xdp-mode skb   # generic mode needs nothing on the peer, but is slower", f.run_command())),
    )
}

fn veth_tx_checksum(f: &LbFacts, link: &Link) -> Option<Finding> {
    let name = &link.name;
    match f.tx_checksum.get(name) {
        Some(false) => return None,
        Some(true) => {}
        None => {
            return Some(
                Finding::warning(
                    "veth-tx-checksum",
                    format!(
                        "{name} is a veth in driver mode, and whether it keeps transmit checksum offload on \
                         could not be checked (ethtool is missing, or could not read it)"
                    ),
                    "with tx-checksumming on, frames that XDP forwards with XDP_TX on veth reach the receivers \
                     with bad TCP/UDP checksums, which they drop silently",
                )
                .fix("apt install ethtool   # or the distribution's package of it")
                .fix(format!("ethtool -k {name} | grep tx-checksumming   # \"off\" is what XDP_TX on veth needs"))
                .fix(format!("ethtool -K {name} tx off   # if it is on")),
            );
        }
    }
    Some(
        Finding::warning(
            "veth-tx-checksum",
            format!("{name} is a veth in driver mode and keeps transmit checksum offload on (tx-checksumming: on)"),
            "a frame that XDP forwards with XDP_TX on veth loses its \"checksum still to do\" state \
             (CHECKSUM_PARTIAL): when the hosts that send through this veth segment (clients, NAT backends) leave \
             TCP/UDP checksums to offload, the receivers get bad checksums and drop the packets silently. This \
             host's own setting shows the segment is not set up for it; a physical NIC computes checksums on the \
             wire and is not affected",
        )
        .fix(format!("ethtool -K {name} tx off"))
        .fix("ethtool -K IFACE tx off   # on every host that sends through this segment, on its own interface")
        .or(format!("{} --xdp-mode skb   # generic mode keeps the checksum state", f.run_command())),
    )
}

fn ipip_mtu(f: &LbFacts, link: &Link) -> Option<Finding> {
    // The XDP program drops what would not fit the interface after encapsulation.
    let failing: Vec<u8> =
        f.ipip_families.iter().copied().filter(|&fam| f.client_mtu.min(link.mtu) + overhead(fam) > link.mtu).collect();
    let worst = failing.iter().copied().max_by_key(|&fam| overhead(fam))?;
    let needed = f.client_mtu + overhead(worst);
    let mss = failing.iter().map(|&fam| mss(link.mtu, fam)).min().unwrap_or(0);
    let counted = match f.drop_too_big {
        Some(n) if n > 0 => format!("; the running dataplane has dropped {n} such packets"),
        _ => String::new(),
    };
    // Below 1320 the MTU an IPv6 client would be told is below 1280, which
    // hosts ignore (RFC 8201 4): the dataplane sends nothing at all.
    let silent_v6 = if failing.contains(&6) && link.mtu < 1320 {
        format!(
            ". For the IPv6 VIPs it is worse: below MTU 1320 the MTU that fits is under 1280, which IPv6 hosts \
             ignore, so no \"packet too big\" is sent and full-size IPv6 packets vanish; an IPv6 VIP with ipip \
             needs an interface MTU of at least 1320 (and {} needs {needed})",
            link.name
        )
    } else {
        String::new()
    };
    Some(
        Finding::error(
            "ipip-mtu",
            format!(
                "{} has MTU {}, too small for IP-in-IP: a {}-byte client packet grows to {needed} bytes ({})",
                link.name,
                link.mtu,
                f.client_mtu,
                if worst == 6 { "IPv6 in IPv6: +40" } else { "IPv4 in IPv4: +20" }
            ),
            format!(
                "the balancer drops packets that do not fit after encapsulation (counted as drop_too_big) and answers \
                 with ICMP \"fragmentation needed\" / \"packet too big\" (at most 100 a second for the whole balancer): \
                 every full-size segment costs the client a round trip and a resend, and clients behind an ICMP filter \
                 hang{counted}{silent_v6}"
            ),
        )
        .fix(format!(
            "ip link set dev {} mtu {needed}   # and on every link to the backends, and the backends' own (xdplb doctor --backend)",
            link.name
        ))
        .or(format!(
            "ip route change default via GATEWAY advmss {mss}   # on every backend: clients then send segments that fit"
        )),
    )
}

fn overhead(family: u8) -> u32 {
    if family == 6 { 40 } else { 20 }
}

/// The TCP MSS that keeps an encapsulated segment within `mtu`.
pub fn mss(mtu: u32, family: u8) -> u32 {
    let headers = if family == 6 { 60 } else { 40 };
    mtu.saturating_sub(overhead(family) + headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::findings::has_errors;
    use crate::doctor::system::PeerRef;

    fn link(name: &str, mtu: u32) -> Link {
        Link {
            index: 5,
            name: name.into(),
            flags: vec!["BROADCAST".into(), "UP".into(), "LOWER_UP".into()],
            operstate: "UP".into(),
            mtu,
            kind: Some("veth".into()),
            xdp: vec![XdpProg { mode: XdpMode::Driver, id: 9, name: programs::BALANCER.into() }],
            peer: Some(PeerRef::Remote { netnsid: 0, ifindex: 2 }),
            addrs: vec![("198.18.0.2".parse().unwrap(), 24)],
        }
    }

    fn peer(driver_xdp: bool) -> Peer {
        Peer { name: "lb".into(), namespace: Some("sw".into()), netnsid: Some(0), driver_xdp: Some(driver_xdp) }
    }

    /// The test cluster's balancer, healthy: lb0 a veth at MTU 1600, tx off, peer with xdplb pass.
    fn healthy() -> LbFacts {
        LbFacts {
            starting: false,
            config_file: Some("/etc/x.yaml".into()),
            iface: "lb0".into(),
            backend_iface: None,
            links: vec![link("lb0", 1600)],
            mode: XdpModeSetting::Auto,
            ipip_families: vec![4, 6],
            client_mtu: 1500,
            tx_checksum: [("lb0".to_string(), false)].into(),
            peers: [("lb0".to_string(), peer(true))].into(),
            controller: Controller::Running(42),
            drop_too_big: Some(0),
            pin: None,
            unshared_seed: false,
        }
    }

    #[test]
    fn bgp_without_a_shared_seed_is_warned_with_the_fix() {
        let f = LbFacts { unshared_seed: true, ..healthy() };
        let found = decide(&f);
        assert_eq!(checks(&f), ["hash-seed"]);
        assert_eq!(found[0].severity, crate::doctor::Severity::Warning);
        assert!(found[0].fix.iter().any(|c| c.contains("hash_seed_file")), "{:?}", found[0].fix);
    }

    fn checks(f: &LbFacts) -> Vec<&'static str> {
        decide(f).iter().map(|x| x.check).collect()
    }

    #[test]
    fn a_healthy_balancer_has_no_finding() {
        assert_eq!(decide(&healthy()), vec![]);
    }

    #[test]
    fn a_missing_interface_suggests_the_ones_there() {
        let mut f = healthy();
        f.iface = "eth9".into();
        let found = decide(&f);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].check, "interface-missing");
        assert_eq!(found[0].fix, vec!["xdplb run --config /etc/x.yaml --iface lb0"]);
    }

    #[test]
    fn down_and_without_carrier() {
        let mut f = healthy();
        f.links[0].flags = vec!["BROADCAST".into()];
        let found = decide(&f);
        assert_eq!(found[0].check, "interface-down");
        assert_eq!(found[0].fix, vec!["ip link set dev lb0 up"]);
        f.links[0].flags = vec!["UP".into()];
        f.links[0].operstate = "LOWERLAYERDOWN".into();
        let found = decide(&f);
        assert!(found[0].what.contains("no carrier"), "{}", found[0].what);
        assert_eq!(found[0].fix, vec!["ip netns exec sw ip link set dev lb up"]);
    }

    #[test]
    fn not_attached_is_an_error_when_a_controller_should_run() {
        let mut f = healthy();
        f.links[0].xdp.clear();
        let found = decide(&f);
        assert_eq!((found[0].check, found[0].severity), ("xdp-not-attached", crate::doctor::Severity::Error));
        assert!(found[0].fix[0].starts_with("kill 42 && xdplb run --config /etc/x.yaml --iface lb0"));
        f.controller = Controller::Stopped;
        assert_eq!(decide(&f)[0].severity, crate::doctor::Severity::Error);
        f.controller = Controller::Never;
        let found = decide(&f);
        assert_eq!((found[0].check, found[0].severity), ("xdp-not-attached", crate::doctor::Severity::Warning));
        // Not at start-up: the controller is about to attach it.
        f.starting = true;
        assert_eq!(decide(&f), vec![]);
    }

    #[test]
    fn attached_without_a_controller() {
        let mut f = healthy();
        f.controller = Controller::Stopped;
        assert_eq!(checks(&f), vec!["controller-not-running"]);
    }

    #[test]
    fn a_running_or_abandoned_trace_is_no_other_program() {
        let mut f = healthy();
        f.links[0].xdp = vec![XdpProg { mode: XdpMode::Driver, id: 11, name: programs::TRACED.into() }];
        let found = decide(&f);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].check, found[0].severity), ("xdp-traced", crate::doctor::Severity::Warning));
        assert!(found[0].what.contains("a trace is running, or an abandoned one"), "{}", found[0].what);
        assert!(!found.iter().any(|x| x.fix.iter().any(|c| c.contains("detach") || c.starts_with("ip link set"))));
        // Still xdplb's program in driver mode: the veth checks apply.
        f.peers.insert("lb0".into(), peer(false));
        assert_eq!(checks(&f), vec!["xdp-traced", "veth-peer-xdp"]);
        f.links[0].xdp[0].mode = XdpMode::Skb;
        assert_eq!(checks(&f), vec!["xdp-traced"]);
        // Without a controller nothing swaps it back: start one.
        f.controller = Controller::Stopped;
        let found = decide(&f);
        assert_eq!(checks(&f), vec!["xdp-traced", "controller-not-running"]);
        assert_eq!(found[0].fix, vec!["xdplb run --config /etc/x.yaml --iface lb0"]);
        assert!(!has_errors(&found));
    }

    #[test]
    fn another_program_in_the_way() {
        let mut f = healthy();
        f.links[0].xdp = vec![XdpProg { mode: XdpMode::Skb, id: 7, name: "katran".into() }];
        let found = decide(&f);
        assert_eq!(found[0].check, "xdp-other-program");
        assert_eq!(found[0].fix[0], "ip link set dev lb0 xdpgeneric off");
        f.links[0].xdp = vec![XdpProg { mode: XdpMode::Driver, id: 7, name: programs::DECAP.into() }];
        assert_eq!(decide(&f)[0].fix[0], "xdplb detach --iface lb0");
    }

    #[test]
    fn a_veth_peer_without_xdp_drops_everything_sent() {
        let mut f = healthy();
        f.peers.insert("lb0".into(), peer(false));
        let found = decide(&f);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].check, "veth-peer-xdp");
        assert_eq!(found[0].fix, vec!["ip netns exec sw xdplb pass --iface lb"]);
        // In generic mode the peer needs nothing.
        f.links[0].xdp[0].mode = XdpMode::Skb;
        assert_eq!(decide(&f), vec![]);
        // Before the program is attached, the configured mode decides.
        f.links[0].xdp.clear();
        f.controller = Controller::Never;
        assert_eq!(checks(&f), vec!["xdp-not-attached", "veth-peer-xdp"]);
        f.mode = XdpModeSetting::Skb;
        assert_eq!(checks(&f), vec!["xdp-not-attached"]);
        // A peer in an unnamed namespace.
        f.mode = XdpModeSetting::Driver;
        f.peers.get_mut("lb0").unwrap().namespace = None;
        let fix = &decide(&f)[1].fix[0];
        assert_eq!(fix, "ip netns exec <namespace of netnsid 0> xdplb pass --iface lb");
    }

    #[test]
    fn tx_checksum_offload_on_a_driver_mode_veth() {
        let mut f = healthy();
        f.tx_checksum.insert("lb0".into(), true);
        let found = decide(&f);
        assert_eq!((found[0].check, found[0].severity), ("veth-tx-checksum", crate::doctor::Severity::Warning));
        assert_eq!(found[0].fix[0], "ethtool -K lb0 tx off");
        // Not a veth: a NIC computes checksums itself.
        f.links[0].kind = None;
        assert_eq!(decide(&f), vec![]);
    }

    #[test]
    fn tx_checksum_offload_that_cannot_be_read_is_said() {
        let mut f = healthy();
        f.tx_checksum.clear();
        let found = decide(&f);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].check, found[0].severity), ("veth-tx-checksum", crate::doctor::Severity::Warning));
        assert!(found[0].what.contains("could not be checked"), "{}", found[0].what);
        assert!(found[0].fix[0].starts_with("apt install ethtool"), "{:?}", found[0].fix);
        // Generic mode, or not a veth: nothing to check.
        f.links[0].xdp[0].mode = XdpMode::Skb;
        assert_eq!(decide(&f), vec![]);
        f.links[0].xdp[0].mode = XdpMode::Driver;
        f.links[0].kind = None;
        assert_eq!(decide(&f), vec![]);
    }

    #[test]
    fn ipip_needs_room_for_the_outer_header() {
        let mut f = healthy();
        f.links[0].mtu = 1500;
        f.drop_too_big = Some(12);
        let found = decide(&f);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].check, "ipip-mtu");
        assert!(found[0].what.contains("grows to 1540 bytes (IPv6 in IPv6: +40)"), "{}", found[0].what);
        assert!(found[0].why.contains("dropped 12 such packets"));
        assert!(found[0].fix[0].starts_with("ip link set dev lb0 mtu 1540"));
        assert!(found[0].alternative[0].contains("advmss 1400"), "{:?}", found[0].alternative);
        f.ipip_families = vec![4];
        f.links[0].mtu = 1520;
        assert_eq!(decide(&f), vec![], "1500 + 20 fits 1520");
        f.links[0].mtu = 1519;
        assert_eq!(checks(&f), vec!["ipip-mtu"]);
        f.ipip_families.clear();
        assert_eq!(decide(&f), vec![], "DSR adds nothing");
    }

    #[test]
    fn ipip6_below_mtu_1320_gets_no_packet_too_big() {
        let mut f = healthy();
        f.ipip_families = vec![4, 6];
        f.links[0].mtu = 1319;
        let found = decide(&f);
        assert_eq!(checks(&f), vec!["ipip-mtu"]);
        assert!(found[0].why.contains("needs an interface MTU of at least 1320"), "{}", found[0].why);
        assert!(found[0].why.contains("no \"packet too big\" is sent"), "{}", found[0].why);
        // From 1320 on the answer is sent: the ordinary finding.
        f.links[0].mtu = 1320;
        assert!(!decide(&f)[0].why.contains("at least 1320"));
        // IPv4 only: its answers are sent at any MTU.
        f.ipip_families = vec![4];
        f.links[0].mtu = 1300;
        assert!(!decide(&f)[0].why.contains("1320"));
    }

    #[test]
    fn mss_for_the_mtu() {
        assert_eq!(mss(1500, 4), 1440);
        assert_eq!(mss(1500, 6), 1400);
    }
}
