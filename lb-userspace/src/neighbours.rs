//! Next hops and their MAC addresses, from the kernel over netlink.
//!
//! For each backend: find its route in the main routing table (the gateway,
//! or the backend itself on a connected subnet; one dump per refresh, matched
//! locally, so 100,000 backends cost two netlink dumps), check it leaves
//! through the balanced interface (XDP_TX can only send there), and read the
//! next hop's MAC from the neighbour table. A missing entry is solicited by sending an
//! empty UDP datagram to the next hop's discard port, which makes the kernel
//! resolve it (ARP or neighbour discovery).
//!
//! Netlink can stall (a kernel busy with a huge table, a socket whose buffer
//! overflowed): every dump has a time limit, and after a failure the next
//! refresh opens a new connection. A backend whose next hop stops resolving
//! is withdrawn only after `WITHDRAW_AFTER` consecutive failed rounds, so one
//! flapping neighbour entry does not reshuffle its flows.
//!
//! The routing table of the last successful round is kept ([`Routes`]): a
//! reload asks it whether a DSR backend sits behind a gateway (see
//! `desired::routed_dsr_backends`) without a netlink exchange on the event loop.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};

#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    dst: Option<IpAddr>,
    len: u8,
    gateway: Option<IpAddr>,
    oif: Option<u32>,
}

/// The main routing table (unicast routes, both families), as one dump read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes(Vec<Route>);

impl Routes {
    /// The route toward `dst`: the longest matching prefix (policy routing
    /// is not consulted).
    fn lookup(&self, dst: IpAddr) -> Option<&Route> {
        self.0.iter().filter(|r| r.dst.is_some_and(|d| contains(d, r.len, dst))).max_by_key(|r| r.len)
    }

    /// The gateway `dst` is reached through, if its route has one (None: on
    /// a directly connected network, or no route at all).
    pub fn gateway(&self, dst: IpAddr) -> Option<IpAddr> {
        self.lookup(dst)?.gateway.filter(|g| *g != dst)
    }

    /// A table of `(prefix, length, gateway, interface index)` routes.
    #[cfg(test)]
    pub(crate) fn from_routes(routes: &[(IpAddr, u8, Option<IpAddr>, u32)]) -> Self {
        Self(
            routes
                .iter()
                .map(|&(dst, len, gateway, oif)| Route { dst: Some(dst), len, gateway, oif: Some(oif) })
                .collect(),
        )
    }
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
    /// The connection's task; aborted when the connection is rebuilt.
    conn: tokio::task::JoinHandle<()>,
    /// The last dump failed: open a new connection before the next one.
    broken: bool,
    /// How long one dump may take.
    timeout: Duration,
    /// The interfaces xdplb can send through: (index, name).
    ifaces: Vec<(u32, String)>,
    /// The routing table as the last successful dump read it.
    routes: Option<Arc<Routes>>,
}

/// How long a routing or neighbour table dump may take.
pub const NETLINK_TIMEOUT: Duration = Duration::from_secs(2);

/// Consecutive failed resolutions after which a backend that had a next hop
/// is withdrawn.
pub const WITHDRAW_AFTER: u32 = 3;

/// Consecutive failed resolutions per backend address: decides which MAC
/// the dataplane keeps using.
#[derive(Debug, Default)]
pub struct Misses {
    failed: HashMap<IpAddr, u32>,
}

impl Misses {
    /// The MAC to use for `addr` after this round's resolution `r`, given
    /// the one used so far: a resolved one, or the previous one until
    /// `WITHDRAW_AFTER` rounds in a row have failed.
    pub fn mac_to_use(&mut self, addr: IpAddr, before: Option<[u8; 6]>, r: &Resolution) -> Option<[u8; 6]> {
        match r {
            Resolution::Resolved { mac, .. } => {
                self.failed.remove(&addr);
                Some(*mac)
            }
            Resolution::Unresolved(_) => {
                let n = self.failed.entry(addr).or_default();
                *n = n.saturating_add(1);
                if *n >= WITHDRAW_AFTER { None } else { before }
            }
        }
    }

    /// Forgets the addresses not in `addrs`.
    pub fn retain(&mut self, addrs: &[IpAddr]) {
        self.failed.retain(|a, _| addrs.contains(a));
    }
}

/// Runs one netlink exchange, failing if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => bail!("{what} did not answer within {} ms", limit.as_millis()),
    }
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
        let (handle, conn) = connect()?;
        Ok(Self { handle, conn, broken: false, timeout: NETLINK_TIMEOUT, ifaces, routes: None })
    }

    /// A resolver whose connection never answers (its task is not run while
    /// the returned guard lives): every dump times out after `timeout`.
    #[cfg(test)]
    pub(crate) fn stalled(timeout: Duration) -> (Self, Box<dyn std::any::Any + Send>) {
        let mut n = Self::new(Vec::new()).unwrap();
        let (conn, handle, _) = rtnetlink::new_connection().unwrap();
        n.conn.abort();
        n.handle = handle;
        n.timeout = timeout;
        (n, Box::new(conn))
    }

    /// Opens a new netlink connection in place of one that failed.
    fn reconnect(&mut self) -> Result<()> {
        let (handle, conn) = connect()?;
        self.conn.abort();
        self.handle = handle;
        self.conn = conn;
        self.broken = false;
        Ok(())
    }

    /// The main routing table, both families: one dump, however many backends.
    async fn dump_routes(&self) -> Result<Routes> {
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
        Ok(Routes(out))
    }

    /// The routing table as the last successful round (or `read_routes`) read it.
    pub fn last_routes(&self) -> Option<Arc<Routes>> {
        self.routes.clone()
    }

    /// Reads the routing table now (one dump, bounded by the timeout).
    pub async fn read_routes(&mut self) -> Result<Arc<Routes>> {
        if self.broken {
            self.reconnect().context("reopening the netlink connection failed")?;
        }
        match within(self.timeout, "the routing table dump", self.dump_routes()).await {
            Ok(r) => {
                let r = Arc::new(r);
                self.routes = Some(r.clone());
                Ok(r)
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// The next hop toward `dst`: longest-prefix match over the main table
    /// (policy routing is not consulted).
    fn next_hop(&self, routes: &Routes, dst: IpAddr) -> Result<(IpAddr, u32)> {
        let route = routes.lookup(dst).ok_or_else(|| anyhow!("no route to {dst}"))?;
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
    /// Each dump is bounded by the timeout; after a failure the connection
    /// is rebuilt before the next call.
    pub async fn resolve(&mut self, addrs: &[IpAddr]) -> Result<HashMap<IpAddr, Resolution>> {
        if self.broken {
            self.reconnect().context("reopening the netlink connection failed")?;
        }
        let tables = async {
            let routes = within(self.timeout, "the routing table dump", self.dump_routes()).await?;
            let table = within(self.timeout, "the neighbour table dump", self.table()).await?;
            Ok::<_, anyhow::Error>((routes, table))
        };
        let (routes, table) = match tables.await {
            Ok(t) => t,
            Err(e) => {
                self.broken = true;
                return Err(e);
            }
        };
        let routes = Arc::new(routes);
        self.routes = Some(routes.clone());
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

fn connect() -> Result<(Handle, tokio::task::JoinHandle<()>)> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket failed")?;
    Ok((handle, tokio::spawn(conn)))
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
    use std::time::Duration;

    use super::{Misses, Neighbours, Resolution, Routes, WITHDRAW_AFTER, contains};

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn resolved(mac: [u8; 6]) -> Resolution {
        Resolution::Resolved { next_hop: "198.18.0.1".parse().unwrap(), mac, ifindex: 2 }
    }

    #[test]
    fn a_backend_is_withdrawn_only_after_consecutive_failures() {
        let addr = "198.18.0.9".parse().unwrap();
        let down = Resolution::Unresolved("waiting for the MAC address".into());
        let mut m = Misses::default();
        let mut mac = m.mac_to_use(addr, None, &resolved(MAC));
        assert_eq!(mac, Some(MAC));
        for _ in 1..WITHDRAW_AFTER {
            mac = m.mac_to_use(addr, mac, &down);
            assert_eq!(mac, Some(MAC), "withdrawn before {WITHDRAW_AFTER} failures in a row");
        }
        // A success in between starts the count again.
        mac = m.mac_to_use(addr, mac, &resolved(MAC));
        for _ in 1..WITHDRAW_AFTER {
            mac = m.mac_to_use(addr, mac, &down);
        }
        assert_eq!(mac, Some(MAC));
        mac = m.mac_to_use(addr, mac, &down);
        assert_eq!(mac, None, "still used after {WITHDRAW_AFTER} failures in a row");
        // Never resolved: never used.
        let other = "198.18.0.10".parse().unwrap();
        assert_eq!(m.mac_to_use(other, None, &down), None);
        // A new MAC is taken at once.
        assert_eq!(m.mac_to_use(addr, Some(MAC), &resolved([2, 0, 0, 0, 0, 2])), Some([2, 0, 0, 0, 0, 2]));
    }

    /// A netlink connection whose task never runs never answers: the dump
    /// must give up, and the next call must work on a new connection.
    #[tokio::test]
    async fn a_stalled_netlink_connection_times_out_and_is_rebuilt() {
        let mut n = Neighbours::new(Vec::new()).unwrap();
        let (conn, handle, _) = rtnetlink::new_connection().unwrap();
        n.conn.abort();
        n.handle = handle;
        n.timeout = Duration::from_millis(200);
        let addrs = ["198.18.0.9".parse().unwrap()];
        let first = tokio::time::timeout(Duration::from_secs(10), n.resolve(&addrs)).await;
        let err = first.expect("a dump on a stalled connection never returned").unwrap_err();
        assert!(format!("{err:#}").contains("did not answer"), "{err:#}");
        drop(conn);
        let second = tokio::time::timeout(Duration::from_secs(10), n.resolve(&addrs)).await;
        let r = second.expect("the rebuilt connection never answered").expect("the rebuilt connection failed");
        assert!(matches!(r.get(&addrs[0]), Some(Resolution::Unresolved(_))));
    }

    #[test]
    fn prefixes_contain_addresses() {
        let a = |s: &str| s.parse().unwrap();
        assert!(contains(a("198.18.0.0"), 24, a("198.18.0.77")));
        assert!(!contains(a("198.18.0.0"), 24, a("198.18.1.1")));
        assert!(contains(a("0.0.0.0"), 0, a("198.18.1.1")));
        assert!(contains(a("2001:db8::"), 64, a("2001:db8::11")));
        assert!(!contains(a("2001:db8::"), 64, a("198.18.0.1")));
    }

    #[test]
    fn a_gateway_is_named_only_for_a_routed_address() {
        let a = |s: &str| s.parse().unwrap();
        let routes = Routes::from_routes(&[
            (a("198.18.0.0"), 24, None, 2),
            (a("198.19.5.0"), 24, Some(a("198.18.0.254")), 2),
            (a("0.0.0.0"), 0, Some(a("198.18.0.1")), 2),
            (a("2001:db8::"), 64, None, 2),
            // A host route whose gateway is the host itself (`via` the same address): connected.
            (a("198.19.6.6"), 32, Some(a("198.19.6.6")), 2),
        ]);
        assert_eq!(routes.gateway(a("198.18.0.11")), None, "connected");
        assert_eq!(routes.gateway(a("198.19.5.5")), Some(a("198.18.0.254")));
        assert_eq!(routes.gateway(a("203.0.113.9")), Some(a("198.18.0.1")), "the default route");
        assert_eq!(routes.gateway(a("2001:db8::11")), None);
        assert_eq!(routes.gateway(a("2001:db8:9::1")), None, "no route: nothing to say");
        assert_eq!(routes.gateway(a("198.19.6.6")), None);
    }
}
