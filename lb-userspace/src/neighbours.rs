//! Next hops and their MAC addresses, from the kernel over netlink.
//!
//! For each backend: ask the routing table for the route to it (the gateway,
//! or the backend itself on a connected subnet), check it leaves through the
//! balanced interface (XDP_TX can only send there), and read the next hop's
//! MAC from the neighbour table. A missing entry is solicited by sending an
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
    route::{RouteAddress, RouteAttribute},
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// How a backend is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    Resolved {
        next_hop: IpAddr,
        mac: [u8; 6],
    },
    /// Why the backend cannot be used now (for logs and `status`).
    Unresolved(String),
}

pub struct Neighbours {
    handle: Handle,
    ifindex: u32,
    iface: String,
}

fn full_prefix(a: IpAddr) -> u8 {
    if a.is_ipv4() { 32 } else { 128 }
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
    pub fn new(iface: &str, ifindex: u32) -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket failed")?;
        tokio::spawn(conn);
        Ok(Self { handle, ifindex, iface: iface.to_string() })
    }

    /// The next hop toward `dst`.
    async fn next_hop(&self, dst: IpAddr) -> Result<IpAddr> {
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, full_prefix(dst))
            .map_err(|e| anyhow!("{e:?}"))?
            .build();
        let route = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_next()
            .await
            .map_err(|e| anyhow!("no route to {dst}: {e}"))?
            .ok_or_else(|| anyhow!("no route to {dst}"))?;
        let mut gateway = None;
        let mut oif = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Gateway(g) => gateway = route_addr(g),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        if oif != Some(self.ifindex) {
            let other = oif.map_or("no interface".to_string(), |i| format!("interface index {i}"));
            bail!(
                "the route to {dst} leaves through {other}, not {}: xdplb can only send to backends reachable through the interface it is attached to",
                self.iface
            );
        }
        Ok(gateway.unwrap_or(dst))
    }

    /// The interface's neighbour table: address → MAC, for usable entries.
    async fn table(&self) -> Result<HashMap<IpAddr, [u8; 6]>> {
        let mut out = HashMap::new();
        let mut dump = self.handle.neighbours().get().execute();
        while let Some(msg) = dump.try_next().await.context("dumping the neighbour table failed")? {
            if msg.header.ifindex != self.ifindex
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
                out.insert(a, m);
            }
        }
        Ok(out)
    }

    /// Resolves every address; solicits the next hops not yet in the table.
    pub async fn resolve(&self, addrs: &[IpAddr]) -> HashMap<IpAddr, Resolution> {
        let table = match self.table().await {
            Ok(t) => t,
            Err(e) => {
                let why = format!("{e:#}");
                return addrs.iter().map(|a| (*a, Resolution::Unresolved(why.clone()))).collect();
            }
        };
        let mut out = HashMap::new();
        for &addr in addrs {
            let r = match self.next_hop(addr).await {
                Err(e) => Resolution::Unresolved(format!("{e:#}")),
                Ok(nh) => match table.get(&nh) {
                    Some(mac) => Resolution::Resolved { next_hop: nh, mac: *mac },
                    None => {
                        solicit(nh);
                        Resolution::Unresolved(format!(
                            "waiting for the MAC address of next hop {nh} on {}",
                            self.iface
                        ))
                    }
                },
            };
            out.insert(addr, r);
        }
        out
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
