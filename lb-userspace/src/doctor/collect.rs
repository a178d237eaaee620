//! Gathers the facts doctor decides on: the only part of doctor that reads
//! the system (`ip`, `ethtool`, /proc, netlink). A fact that cannot be read
//! is left out, and the check that needs it says nothing, or, where a
//! silent pass would hide a problem (`tx-checksumming` of a driver-mode
//! veth, without ethtool), says that it could not check.

use std::{collections::HashMap, net::IpAddr, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::TryStreamExt as _;
use netlink_packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};
use tracing::debug;

use super::{
    backend::{BackendFacts, Conf},
    lb::{Controller, LbFacts},
    system::{self, Link, Peer, PeerRef, XdpMode},
};
use crate::{
    config::{Config, XdpModeSetting},
    dataplane,
    pins::PinFacts,
    reconcile::Forwarding,
    status,
};

/// Runs a tool; its standard output if it succeeded.
fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every interface of this network namespace, with addresses and XDP programs.
pub fn links() -> Result<Vec<Link>> {
    system::parse_links(&output("ip", &["-j", "-d", "addr", "show"])?).map_err(|e| anyhow!(e))
}

/// `tx-checksumming` of `iface`; None when ethtool is missing or cannot tell
/// (the veth check then warns that it could not check).
fn tx_checksum(iface: &str) -> Option<bool> {
    match output("ethtool", &["-k", iface]) {
        Ok(text) => {
            let on = system::parse_tx_checksumming(&text);
            if on.is_none() {
                debug!("doctor: `ethtool -k {iface}` shows no tx-checksumming line");
            }
            on
        }
        Err(e) => {
            debug!("doctor: {e:#}");
            None
        }
    }
}

fn conf(iface: &str) -> Conf {
    let read = |key: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{iface}/{key}"))
            .ok()
            .and_then(|t| system::parse_sysctl(&t))
    };
    Conf { arp_ignore: read("arp_ignore"), arp_announce: read("arp_announce"), rp_filter: read("rp_filter") }
}

fn default_routes() -> Vec<system::Route> {
    ["-4", "-6"]
        .iter()
        .filter_map(|fam| output("ip", &["-j", fam, "route", "show", "default"]).ok())
        .flat_map(|text| system::parse_default_routes(&text))
        .collect()
}

/// The peer of each veth among `names`.
async fn peers(links: &[Link], names: &[&str]) -> HashMap<String, Peer> {
    let mut out = HashMap::new();
    let mut ns_names: Option<HashMap<i32, String>> = None;
    for link in links.iter().filter(|l| l.is_veth() && names.contains(&l.name.as_str())) {
        let peer = match &link.peer {
            Some(PeerRef::Local(name)) => Peer {
                name: name.clone(),
                namespace: None,
                netnsid: None,
                driver_xdp: links.iter().find(|l| &l.name == name).map(has_driver_xdp),
            },
            &Some(PeerRef::Remote { netnsid, ifindex }) => {
                let names = ns_names.get_or_insert_with(|| {
                    output("ip", &["-j", "netns", "list-id"]).map(|t| system::parse_netns_ids(&t)).unwrap_or_default()
                });
                let (name, driver_xdp) = match remote_link(netnsid, ifindex).await {
                    Ok((name, xdp)) => (name, Some(xdp)),
                    Err(e) => {
                        debug!("doctor: the peer of {} (netnsid {netnsid}, ifindex {ifindex}): {e:#}", link.name);
                        (format!("(ifindex {ifindex})"), None)
                    }
                };
                Peer { name, namespace: names.get(&netnsid).cloned(), netnsid: Some(netnsid), driver_xdp }
            }
            None => continue,
        };
        out.insert(link.name.clone(), peer);
    }
    out
}

fn has_driver_xdp(l: &Link) -> bool {
    l.xdp.iter().any(|p| p.mode == XdpMode::Driver)
}

/// Name and driver-mode XDP of interface `ifindex` in the namespace known
/// here as `netnsid`: RTM_GETLINK with IFLA_TARGET_NETNSID, which `ip`
/// cannot ask for.
async fn remote_link(netnsid: i32, ifindex: u32) -> Result<(String, bool)> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket failed")?;
    let task = tokio::spawn(conn);
    let mut req = handle.link().get().match_index(ifindex);
    req.message_mut().attributes.push(LinkAttribute::IfNetnsId(netnsid));
    let reply = tokio::time::timeout(Duration::from_secs(2), req.execute().try_next()).await;
    task.abort();
    let msg = reply.context("netlink gave no answer")?.context("RTM_GETLINK failed")?.context("no such link")?;
    let mut name = String::new();
    let mut driver = false;
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = n,
            LinkAttribute::Xdp(xdp) => {
                for x in xdp {
                    match x {
                        LinkXdp::Attached(XdpAttached::Driver) => driver = true,
                        LinkXdp::DrvProgId(id) if id != 0 => driver = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok((name, driver))
}

/// Whether pins under `pin_root` outlive the process (shared with `xdplb run`).
pub fn pin(pin_root: &Path) -> PinFacts {
    crate::pins::facts(pin_root)
}

/// Whether a controller serves `iface`, and its `drop_too_big` counter.
fn controller(state_dir: &Path, pin_root: &Path, iface: &str) -> (Controller, Option<u64>) {
    match status::read(state_dir, iface) {
        Ok(s) if status::pid_alive(s.pid) => (Controller::Running(s.pid), s.reasons.get("drop_too_big").copied()),
        Ok(_) => (Controller::Stopped, None),
        Err(_) if dataplane::has_pinned_state(&pin_root.join(iface)) => (Controller::Stopped, None),
        Err(_) => (Controller::Never, None),
    }
}

/// What the load balancer side is checked with.
pub struct LbInput<'a> {
    pub starting: bool,
    pub config: Option<&'a Config>,
    pub config_file: Option<&'a Path>,
    pub iface: &'a str,
    pub mode: XdpModeSetting,
    pub client_mtu: u32,
    pub pin_root: &'a Path,
    pub state_dir: &'a Path,
}

pub async fn lb(input: &LbInput<'_>) -> Result<LbFacts> {
    let links = links()?;
    let backend_iface = input.config.and_then(|c| c.backend_interface.clone()).filter(|b| b != input.iface);
    let names: Vec<&str> = std::iter::once(input.iface).chain(backend_iface.as_deref()).collect();
    let tx_checksum = names.iter().filter_map(|n| Some((n.to_string(), tx_checksum(n)?))).collect();
    let mut ipip_families: Vec<u8> = input
        .config
        .map(|c| {
            c.vips
                .iter()
                .filter(|v| v.forwarding == Forwarding::Ipip)
                .map(|v| if v.address.is_ipv4() { 4 } else { 6 })
                .collect()
        })
        .unwrap_or_default();
    ipip_families.sort_unstable();
    ipip_families.dedup();
    let (controller, drop_too_big) = if input.starting {
        (Controller::Never, None)
    } else {
        controller(input.state_dir, input.pin_root, input.iface)
    };
    Ok(LbFacts {
        starting: input.starting,
        config_file: input.config_file.map(|p| p.display().to_string()),
        iface: input.iface.to_string(),
        peers: peers(&links, &names).await,
        backend_iface,
        links,
        mode: input.mode,
        ipip_families,
        client_mtu: input.client_mtu,
        tx_checksum,
        controller,
        drop_too_big,
        pin: Some(pin(input.pin_root)),
        unshared_seed: input.config.is_some_and(crate::hash_seed::unshared_with_bgp),
    })
}

pub fn backend(
    vips: Vec<(IpAddr, Forwarding)>,
    iface: Option<&str>,
    client_mtu: u32,
    pin_root: &Path,
) -> Result<BackendFacts> {
    let links = links()?;
    let conf =
        std::iter::once("all").chain(links.iter().map(|l| l.name.as_str())).map(|i| (i.to_string(), conf(i))).collect();
    let ipip = vips.iter().any(|(_, f)| *f == Forwarding::Ipip);
    Ok(BackendFacts {
        vips,
        iface: iface.map(str::to_string),
        links,
        conf,
        client_mtu,
        default_routes: default_routes(),
        pin: ipip.then(|| pin(pin_root)),
    })
}
