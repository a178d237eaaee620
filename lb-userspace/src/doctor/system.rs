//! The host as doctor sees it, and how to read it from what the tools print
//! (`ip -j`, `ethtool -k`, /proc files). Pure: every parser takes text.

use std::{collections::HashMap, net::IpAddr};

use serde_json::Value;

/// How an XDP program is attached (IFLA_XDP_ATTACHED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Driver,
    Skb,
    Hw,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpProg {
    pub mode: XdpMode,
    pub id: u32,
    /// The kernel's program name (at most 15 characters).
    pub name: String,
}

/// The other end of a veth pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerRef {
    /// In this network namespace, by name.
    Local(String),
    /// In another network namespace, known here by its id (`ip netns list-id`).
    Remote { netnsid: i32, ifindex: u32 },
}

/// One network interface of this namespace, with its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// UP, LOWER_UP, LOOPBACK, NOARP, ... as `ip` prints them.
    pub flags: Vec<String>,
    pub operstate: String,
    pub mtu: u32,
    /// `linkinfo.info_kind`: veth, bridge, ipip, ip6tnl, ...; none for a physical NIC.
    pub kind: Option<String>,
    pub xdp: Vec<XdpProg>,
    pub peer: Option<PeerRef>,
    pub addrs: Vec<(IpAddr, u8)>,
}

impl Link {
    fn flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }

    /// Administratively up (`ip link set dev IF up`).
    pub fn is_up(&self) -> bool {
        self.flag("UP")
    }

    /// The link layer is up: a cable, a running peer.
    pub fn has_carrier(&self) -> bool {
        self.flag("LOWER_UP")
    }

    pub fn is_loopback(&self) -> bool {
        self.flag("LOOPBACK")
    }

    /// Answers no ARP (loopback, dummy, tunnels): a VIP there is not announced.
    pub fn is_noarp(&self) -> bool {
        self.flag("NOARP") || self.is_loopback()
    }

    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }

    /// A kernel IP-in-IP tunnel device: decapsulates IPv4-in-IPv4 (ipip) or
    /// IPv6-in-IPv6 (ip6tnl) itself.
    pub fn tunnel_family(&self) -> Option<u8> {
        match self.kind.as_deref() {
            Some("ipip") => Some(4),
            Some("ip6tnl") => Some(6),
            _ => None,
        }
    }

    pub fn has_program(&self, name: &str) -> Option<&XdpProg> {
        self.xdp.iter().find(|p| p.name == name)
    }

    pub fn holds(&self, addr: IpAddr) -> Option<u8> {
        self.addrs.iter().find(|(a, _)| *a == addr).map(|&(_, len)| len)
    }
}

/// What the peer of a veth looks like, possibly from another namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// The named network namespace (`ip netns`) it is in; None when it is
    /// this one, or the namespace has no name.
    pub namespace: Option<String>,
    /// Its id here, when it is in another namespace.
    pub netnsid: Option<i32>,
    /// Whether an XDP program runs on it in driver mode; None: unknown.
    pub driver_xdp: Option<bool>,
}

/// A default route (`ip -j route show default`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub gateway: Option<IpAddr>,
    pub dev: String,
}

/// `ip -j -d addr show`: every interface with its XDP programs, veth peer and addresses.
pub fn parse_links(json: &str) -> Result<Vec<Link>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("`ip -j -d addr show` printed no JSON: {e}"))?;
    let list = v.as_array().ok_or("`ip -j -d addr show` printed no list")?;
    Ok(list.iter().filter_map(parse_link).collect())
}

fn parse_link(v: &Value) -> Option<Link> {
    let name = v["ifname"].as_str()?.to_string();
    let index = v["ifindex"].as_u64()? as u32;
    let flags =
        v["flags"].as_array().map_or(Vec::new(), |f| f.iter().filter_map(|x| x.as_str().map(str::to_string)).collect());
    let kind = v["linkinfo"]["info_kind"].as_str().map(str::to_string);
    // A veth peer elsewhere shows as link_index + link_netnsid; one here by name.
    let peer = match (v["link_netnsid"].as_i64(), v["link_index"].as_u64(), v["link"].as_str()) {
        (Some(netnsid), Some(ifindex), _) => Some(PeerRef::Remote { netnsid: netnsid as i32, ifindex: ifindex as u32 }),
        (None, _, Some(local)) => Some(PeerRef::Local(local.to_string())),
        _ => None,
    };
    let addrs = v["addr_info"].as_array().map_or(Vec::new(), |list| {
        list.iter().filter_map(|a| Some((a["local"].as_str()?.parse().ok()?, a["prefixlen"].as_u64()? as u8))).collect()
    });
    Some(Link {
        index,
        name,
        flags,
        operstate: v["operstate"].as_str().unwrap_or("UNKNOWN").to_string(),
        mtu: v["mtu"].as_u64().unwrap_or(0) as u32,
        kind,
        xdp: parse_xdp(&v["xdp"]),
        peer,
        addrs,
    })
}

/// The `xdp` object of `ip -j link`: one program, or several under
/// `attached` (mode 4, "multi": one per mode).
fn parse_xdp(v: &Value) -> Vec<XdpProg> {
    let one = |entry: &Value| -> Option<XdpProg> {
        let mode = match entry["mode"].as_u64()? {
            1 => XdpMode::Driver,
            2 => XdpMode::Skb,
            3 => XdpMode::Hw,
            _ => return None,
        };
        let prog = &entry["prog"];
        Some(XdpProg { mode, id: prog["id"].as_u64()? as u32, name: prog["name"].as_str().unwrap_or("").to_string() })
    };
    match v["attached"].as_array() {
        Some(list) => list.iter().filter_map(one).collect(),
        None => one(v).into_iter().collect(),
    }
}

/// `ip -j netns list-id`: namespace id → name.
pub fn parse_netns_ids(json: &str) -> HashMap<i32, String> {
    let v: Value = serde_json::from_str(json).unwrap_or(Value::Null);
    v.as_array()
        .map(|list| {
            list.iter().filter_map(|e| Some((e["nsid"].as_i64()? as i32, e["name"].as_str()?.to_string()))).collect()
        })
        .unwrap_or_default()
}

/// `ip -j route show default` (either family).
pub fn parse_default_routes(json: &str) -> Vec<Route> {
    let v: Value = serde_json::from_str(json).unwrap_or(Value::Null);
    v.as_array()
        .map(|list| {
            list.iter()
                .filter_map(|r| {
                    Some(Route {
                        gateway: r["gateway"].as_str().and_then(|g| g.parse().ok()),
                        dev: r["dev"].as_str()?.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `ethtool -k IF`: whether `tx-checksumming` is on (`on`, `on [fixed]`, ...).
pub fn parse_tx_checksumming(text: &str) -> Option<bool> {
    let value = text.lines().find_map(|l| l.trim().strip_prefix("tx-checksumming:"))?;
    match value.split_whitespace().next()? {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// A /proc/sys value such as `1\n`.
pub fn parse_sysctl(text: &str) -> Option<u32> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use crate::mounts::{mount_of, parse_mountinfo, parse_ppid};

    /// `ip -j -d addr show` in a test cluster's balancer namespace (shortened).
    const IP_ADDR: &str = r#"[
{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"qdisc":"noqueue","operstate":"UNKNOWN","group":"default","txqlen":1000,"link_type":"loopback","address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo"},{"family":"inet","local":"198.18.100.1","prefixlen":32,"scope":"global","label":"lo"},{"family":"inet6","local":"::1","prefixlen":128,"scope":"host"}]},
{"ifindex":5,"link_index":2,"ifname":"lb0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1600,"xdp":{"mode":1,"prog":{"id":1521,"name":"xdplb_balancer","tag":"614b434cd8324ecc","jited":1}},"qdisc":"noqueue","operstate":"UP","link_type":"ether","link_netnsid":0,"linkinfo":{"info_kind":"veth"},"addr_info":[{"family":"inet","local":"198.18.0.2","prefixlen":24},{"family":"inet6","local":"2001:db8::2","prefixlen":64}]},
{"ifindex":3,"link":"x2","ifname":"x1","flags":["BROADCAST","MULTICAST","M-DOWN"],"mtu":1500,"operstate":"DOWN","linkinfo":{"info_kind":"veth"},"addr_info":[]},
{"ifindex":7,"ifname":"eth1","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":9000,"operstate":"UP","xdp":{"mode":4,"attached":[{"mode":1,"prog":{"id":10,"name":"xdplb_decap"}},{"mode":2,"prog":{"id":11,"name":"other"}}]},"addr_info":[]}
]"#;

    #[test]
    fn links_with_flags_addresses_xdp_and_peers() {
        let links = parse_links(IP_ADDR).unwrap();
        assert_eq!(links.len(), 4);
        let lo = &links[0];
        assert!(lo.is_loopback() && lo.is_noarp() && lo.is_up() && lo.has_carrier());
        assert_eq!(lo.holds("198.18.100.1".parse().unwrap()), Some(32));
        assert_eq!(lo.holds("198.18.100.2".parse().unwrap()), None);
        let lb0 = &links[1];
        assert_eq!((lb0.name.as_str(), lb0.index, lb0.mtu), ("lb0", 5, 1600));
        assert!(lb0.is_veth() && lb0.is_up() && !lb0.is_noarp());
        assert_eq!(lb0.peer, Some(PeerRef::Remote { netnsid: 0, ifindex: 2 }));
        assert_eq!(
            lb0.has_program("xdplb_balancer"),
            Some(&XdpProg { mode: XdpMode::Driver, id: 1521, name: "xdplb_balancer".into() })
        );
        assert_eq!(lb0.addrs.len(), 2);
        let x1 = &links[2];
        assert!(!x1.is_up() && !x1.has_carrier());
        assert_eq!(x1.peer, Some(PeerRef::Local("x2".into())));
        assert!(x1.xdp.is_empty());
        let eth1 = &links[3];
        assert_eq!(eth1.kind, None);
        assert_eq!(eth1.xdp.len(), 2, "both programs of a multi attachment");
        assert_eq!(eth1.xdp[1].mode, XdpMode::Skb);
        assert!(parse_links("not json").is_err());
    }

    #[test]
    fn tunnel_devices_decapsulate_their_family() {
        let mut l = parse_links(IP_ADDR).unwrap().remove(3);
        assert_eq!(l.tunnel_family(), None);
        l.kind = Some("ipip".into());
        assert_eq!(l.tunnel_family(), Some(4));
        l.kind = Some("ip6tnl".into());
        assert_eq!(l.tunnel_family(), Some(6));
    }

    #[test]
    fn ethtool_tx_checksumming() {
        let on = "Features for lb0:\nrx-checksumming: on\ntx-checksumming: on\n\ttx-checksum-ipv4: off [fixed]\n";
        assert_eq!(parse_tx_checksumming(on), Some(true));
        let off = "Features for lb0:\nrx-checksumming: on\ntx-checksumming: off\n\ttx-checksum-ip-generic: off\n";
        assert_eq!(parse_tx_checksumming(off), Some(false));
        assert_eq!(parse_tx_checksumming("tx-checksumming: off [fixed]\n"), Some(false));
        assert_eq!(parse_tx_checksumming("tx-checksumming: on [requested off]\n"), Some(true));
        assert_eq!(parse_tx_checksumming("Cannot get device features\n"), None);
    }

    #[test]
    fn sysctl_values() {
        assert_eq!(parse_sysctl("1\n"), Some(1));
        assert_eq!(parse_sysctl("2"), Some(2));
        assert_eq!(parse_sysctl(""), None);
    }

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
23 27 0:22 / /sys rw,relatime shared:7 - sysfs sysfs rw
48 23 0:39 / /sys/fs/bpf rw,relatime master:2 propagate_from:1 - bpf bpf rw
49 27 0:40 / /tmp/my\\040dir/bpffs rw,relatime - bpf bpf rw,mode=700
50 27 0:41 / /tmp/stack rw - tmpfs tmpfs rw
51 27 0:42 / /tmp/stack rw - bpf bpf rw
";

    #[test]
    fn mountinfo_lines() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 6);
        assert_eq!(m[1].propagation, vec!["shared:7"]);
        assert_eq!(m[2].propagation, vec!["master:2", "propagate_from:1"]);
        assert!(m[1].propagates() && m[2].propagates() && !m[3].propagates());
        assert_eq!((m[2].dev.as_str(), m[2].fstype.as_str()), ("0:39", "bpf"));
        assert_eq!(m[3].mount_point, PathBuf::from("/tmp/my dir/bpffs"), "octal escapes");
    }

    #[test]
    fn the_mount_holding_a_path_is_the_deepest_and_topmost() {
        let m = parse_mountinfo(MOUNTINFO);
        let of = |p: &str| mount_of(&m, std::path::Path::new(p)).map(|m| m.id);
        assert_eq!(of("/sys/fs/bpf/xdplb/lb0"), Some(48));
        assert_eq!(of("/sys/fs/bpfx"), Some(23), "a path component, not a string prefix");
        assert_eq!(of("/tmp/my dir/bpffs/xdplb"), Some(49));
        assert_eq!(of("/tmp/stack/xdplb"), Some(51), "the last of mounts on one point is on top");
        assert_eq!(of("/run/xdplb"), Some(27));
    }

    #[test]
    fn ip_json_lists() {
        let ids = parse_netns_ids(r#"[{"nsid":0,"name":"xdplbt-1-sw"},{"nsid":1}]"#);
        assert_eq!(ids.get(&0).map(String::as_str), Some("xdplbt-1-sw"));
        assert_eq!(ids.len(), 1);
        assert!(parse_netns_ids("").is_empty());
        let routes = parse_default_routes(
            r#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0","flags":[]},{"dst":"default","dev":"wg0","flags":[]}]"#,
        );
        assert_eq!(
            routes,
            vec![
                Route { gateway: Some("192.0.2.1".parse().unwrap()), dev: "eth0".into() },
                Route { gateway: None, dev: "wg0".into() }
            ]
        );
    }

    #[test]
    fn ppid_from_status() {
        assert_eq!(parse_ppid("Name:\tbash\nPid:\t12\nPPid:\t7\n"), Some(7));
        assert_eq!(parse_ppid("Name:\tbash\n"), None);
    }
}
