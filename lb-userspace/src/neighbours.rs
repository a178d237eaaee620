//! Next hops and their MAC addresses, from the kernel over netlink.
//!
//! For each backend: find its route in the main routing table (the gateway,
//! or the backend itself on a connected subnet; one dump per refresh, matched
//! locally, so 100,000 backends cost two netlink dumps), check it leaves
//! through the balanced interface (XDP_TX can only send there), and read the
//! next hop's MAC from the neighbour table. A missing entry is solicited by sending an
//! empty UDP datagram to the next hop's discard port, which makes the kernel
//! resolve it (ARP or neighbour discovery).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};

struct Route {
    dst: Option<IpAddr>,
    len: u8,
    gateway: Option<IpAddr>,
    oif: Option<u32>,
}

/// Whether `prefix/len` contains `addr`.
fn contains(prefix: IpAddr, len: u8, addr: IpAddr) -> bool {
    match (prefix, addr) {
        (IpAddr::V4(p), IpAddr::V4(a)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len.min(32)) };
            u32::from(p) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(p), IpAddr::V6(a)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len.min(128)) };
            u128::from(p) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// How a backend is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Reached through interface `ifindex`, next hop `next_hop` at `mac`.
    Resolved { next_hop: IpAddr, mac: [u8; 6], ifindex: u32 },
    /// Why the backend cannot be used now (for logs and `status`).
    Unresolved(String),
}

pub struct Neighbours {
    handle: Handle,
    /// The interfaces xdplb can send through: (index, name).
    ifaces: Vec<(u32, String)>,
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Neighbours {
    /// Opens a netlink connection (its task runs on the current tokio runtime).
    pub fn new(ifaces: Vec<(u32, String)>) -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket failed")?;
        tokio::spawn(conn);
        Ok(Self { handle, ifaces })
    }

    /// The main routing table, both families: one dump, however many backends.
    async fn routes(&self) -> Result<Vec<Route>> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let mut dump = self.handle.route().get(msg).execute();
            while let Some(r) = dump.try_next().await.context("dumping the routing table failed")? {
                if r.header.table != RouteHeader::RT_TABLE_MAIN || r.header.kind != RouteType::Unicast {
                    continue;
                }
                let mut route = Route { dst: None, len: r.header.destination_prefix_length, gateway: None, oif: None };
                for attr in &r.attributes {
                    match attr {
                        RouteAttribute::Destination(d) => route.dst = route_addr(d),
                        RouteAttribute::Gateway(g) => route.gateway = route_addr(g),
                        RouteAttribute::Oif(i) => route.oif = Some(*i),
                        _ => {}
                    }
                }
                if route.dst.is_none() {
                    // The default route.
                    route.dst = Some(match r.header.address_family {
                        netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    });
                }
                out.push(route);
            }
        }
        Ok(out)
    }

    /// The next hop toward `dst`: longest-prefix match over the main table
    /// (policy routing is not consulted).
    fn next_hop(&self, routes: &[Route], dst: IpAddr) -> Result<(IpAddr, u32)> {
        let route = routes
            .iter()
            .filter(|r| r.dst.is_some_and(|d| contains(d, r.len, dst)))
            .max_by_key(|r| r.len)
            .ok_or_else(|| anyhow!("no route to {dst}"))?;
        let Some(oif) = route.oif.filter(|o| self.ifaces.iter().any(|(i, _)| i == o)) else {
            let other = route.oif.map_or("no interface".to_string(), |i| format!("interface index {i}"));
            let names: Vec<&str> = self.ifaces.iter().map(|(_, n)| n.as_str()).collect();
            bail!(
                "the route to {dst} leaves through {other}, not {}: xdplb can only send to backends reachable through the interfaces it is attached to",
                names.join(" or ")
            );
        };
        Ok((route.gateway.unwrap_or(dst), oif))
    }

    /// The interface's neighbour table: address → MAC, for usable entries.
    async fn table(&self) -> Result<HashMap<(u32, IpAddr), [u8; 6]>> {
        let mut out = HashMap::new();
        let mut dump = self.handle.neighbours().get().execute();
        while let Some(msg) = dump.try_next().await.context("dumping the neighbour table failed")? {
            if !self.ifaces.iter().any(|(i, _)| *i == msg.header.ifindex)
                || matches!(
                    msg.header.state,
                    NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
                )
            {
                continue;
            }
            let mut addr = None;
            let mut mac = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => addr = Some(IpAddr::V4(*a)),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => addr = Some(IpAddr::V6(*a)),
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]]);
                    }
                    _ => {}
                }
            }
            if let (Some(a), Some(m)) = (addr, mac) {
                out.insert((msg.header.ifindex, a), m);
            }
        }
        Ok(out)
    }

    /// Resolves every address; solicits the next hops not yet in the table.
    /// Fails only when the kernel's tables cannot be read at all.
    pub async fn resolve(&self, addrs: &[IpAddr]) -> Result<HashMap<IpAddr, Resolution>> {
        let routes = self.routes().await?;
        let table = self.table().await?;
        let mut out = HashMap::new();
        for &addr in addrs {
            let r = match self.next_hop(&routes, addr) {
                Err(e) => Resolution::Unresolved(format!("{e:#}")),
                Ok((nh, oif)) => match table.get(&(oif, nh)) {
                    Some(mac) => Resolution::Resolved { next_hop: nh, mac: *mac, ifindex: oif },
                    None => {
                        solicit(nh);
                        let name = self.ifaces.iter().find(|(i, _)| *i == oif).map_or("?", |(_, n)| n.as_str());
                        Resolution::Unresolved(format!("waiting for the MAC address of next hop {nh} on {name}"))
                    }
                },
            };
            out.insert(addr, r);
        }
        Ok(out)
    }
}

/// Makes the kernel resolve `addr` by sending it an empty datagram to the
/// discard port (9).
fn solicit(addr: IpAddr) {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    if let Ok(sock) = UdpSocket::bind(bind) {
        let _ = sock.send_to(&[], SocketAddr::new(addr, 9));
    }
}

#[cfg(test)]
mod tests {
    use super::contains;

    #[test]
    fn prefixes_contain_addresses() {
        let a = |s: &str| s.parse().unwrap();
        assert!(contains(a("198.18.0.0"), 24, a("198.18.0.77")));
        assert!(!contains(a("198.18.0.0"), 24, a("198.18.1.1")));
        assert!(contains(a("0.0.0.0"), 0, a("198.18.1.1")));
        assert!(contains(a("2001:db8::"), 64, a("2001:db8::11")));
        assert!(!contains(a("2001:db8::"), 64, a("198.18.0.1")));
    }
}
