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
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Route {
    dst: Option<IpAddr>,
    len: u8,
    /// RTA_PRIORITY: of routes with the same prefix the kernel uses the lowest.
    metric: u32,
    gateway: Option<IpAddr>,
    oif: Option<u32>,
    /// A multipath route's next hops (RTA_MULTIPATH): gateway, interface.
    nexthops: Vec<(Option<IpAddr>, u32)>,
    /// The nexthop object the route uses (RTA_NH_ID); with
    /// `nexthop_compat_mode` off the dump says nothing more.
    nh_id: Option<u32>,
}

impl Route {
    /// The main table's unicast route `r` says, if it is one.
    fn from_message(r: &RouteMessage) -> Option<Self> {
        if r.header.table != RouteHeader::RT_TABLE_MAIN || r.header.kind != RouteType::Unicast {
            return None;
        }
        let mut route = Route { len: r.header.destination_prefix_length, ..Route::default() };
        for attr in &r.attributes {
            match attr {
                RouteAttribute::Destination(d) => route.dst = route_addr(d),
                RouteAttribute::Gateway(g) => route.gateway = route_addr(g),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                RouteAttribute::Priority(p) => route.metric = *p,
                RouteAttribute::NhId(id) => route.nh_id = Some(*id),
                RouteAttribute::MultiPath(hops) => {
                    route.nexthops = hops
                        .iter()
                        .map(|h| {
                            let gateway = h.attributes.iter().find_map(|a| match a {
                                RouteAttribute::Gateway(g) => route_addr(g),
                                _ => None,
                            });
                            (gateway, h.interface_index)
                        })
                        .collect();
                }
                _ => {}
            }
        }
        if route.dst.is_none() {
            // The default route.
            route.dst = Some(match r.header.address_family {
                AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            });
        }
        Some(route)
    }

    /// Its next hops: (gateway, interface), one unless multipath.
    fn hops(&self) -> Vec<(Option<IpAddr>, Option<u32>)> {
        if self.nexthops.is_empty() {
            vec![(self.gateway, self.oif)]
        } else {
            self.nexthops.iter().map(|&(g, i)| (g, Some(i))).collect()
        }
    }
}

/// How an address that is not on a connected network is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    Gateway(IpAddr),
    /// A multipath route: the kernel spreads flows over these gateways.
    Multipath(Vec<IpAddr>),
    /// A nexthop object the routing table dump does not spell out.
    NexthopObject(u32),
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Gateway(g) => write!(f, "gateway {g}"),
            Via::Multipath(gs) => {
                let gs: Vec<String> = gs.iter().map(ToString::to_string).collect();
                write!(f, "a multipath route via gateways {}", gs.join(", "))
            }
            Via::NexthopObject(id) => write!(f, "nexthop object {id}"),
        }
    }
}

/// The main routing table (unicast routes, both families), as one dump read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes(Vec<Route>);

impl Routes {
    /// The route toward `dst`, as the kernel picks it from the main table:
    /// the longest matching prefix, then the lowest metric (policy routing
    /// is not consulted).
    fn lookup(&self, dst: IpAddr) -> Option<&Route> {
        self.0
            .iter()
            .filter(|r| r.dst.is_some_and(|d| contains(d, r.len, dst)))
            .max_by_key(|r| (r.len, std::cmp::Reverse(r.metric)))
    }

    /// How `dst` is reached if not directly: the gateway of its route, the
    /// gateways of a multipath route (a gateway among them makes it routed),
    /// or a nexthop object the dump did not spell out. None: on a directly
    /// connected network, or no route at all.
    pub fn gateway(&self, dst: IpAddr) -> Option<Via> {
        let route = self.lookup(dst)?;
        if route.nexthops.is_empty() && route.gateway.is_none() && route.oif.is_none() {
            return route.nh_id.map(Via::NexthopObject);
        }
        let mut gateways: Vec<IpAddr> = route.hops().into_iter().filter_map(|(g, _)| g).filter(|g| *g != dst).collect();
        gateways.sort();
        gateways.dedup();
        match (route.nexthops.is_empty(), gateways.len()) {
            (_, 0) => None,
            (true, _) => Some(Via::Gateway(gateways[0])),
            (false, _) => Some(Via::Multipath(gateways)),
        }
    }

    /// A table of `(prefix, length, gateway, interface index)` routes, metric 0.
    #[cfg(test)]
    pub(crate) fn from_routes(routes: &[(IpAddr, u8, Option<IpAddr>, u32)]) -> Self {
        Self(
            routes
                .iter()
                .map(|&(dst, len, gateway, oif)| Route {
                    dst: Some(dst),
                    len,
                    gateway,
                    oif: Some(oif),
                    ..Route::default()
                })
                .collect(),
        )
    }

    /// Adds a multipath route over `(gateway, interface index)` next hops.
    #[cfg(test)]
    pub(crate) fn add_multipath(&mut self, dst: IpAddr, len: u8, hops: &[(IpAddr, u32)]) {
        let nexthops = hops.iter().map(|&(g, i)| (Some(g), i)).collect();
        self.0.push(Route { dst: Some(dst), len, nexthops, ..Route::default() });
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
        for msg in [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<Ipv6Addr>::new().build()] {
            let mut dump = self.handle.route().get(msg).execute();
            while let Some(r) = dump.try_next().await.context("dumping the routing table failed")? {
                out.extend(Route::from_message(&r));
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
            let r = match next_hop(&self.ifaces, &routes, addr) {
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

/// The next hop toward `dst` by the main table (policy routing is not
/// consulted); of a multipath route, the first next hop through one of
/// our interfaces (XDP sends every flow the same way).
fn next_hop(ifaces: &[(u32, String)], routes: &Routes, dst: IpAddr) -> Result<(IpAddr, u32)> {
    let route = routes.lookup(dst).ok_or_else(|| anyhow!("no route to {dst}"))?;
    let hops = route.hops();
    if let Some((gateway, oif)) =
        hops.iter().find_map(|&(g, o)| o.filter(|o| ifaces.iter().any(|(i, _)| i == o)).map(|o| (g, o)))
    {
        return Ok((gateway.unwrap_or(dst), oif));
    }
    if let (Some(id), [(None, None)]) = (route.nh_id, &hops[..]) {
        bail!(
            "the route to {dst} uses nexthop object {id}, which the routing table dump does not spell out \
             (sysctl net.ipv4.nexthop_compat_mode is 0): xdplb cannot tell its interface"
        );
    }
    let mut others: Vec<String> =
        hops.iter().map(|(_, o)| o.map_or("no interface".to_string(), |i| format!("interface index {i}"))).collect();
    others.dedup();
    let names: Vec<&str> = ifaces.iter().map(|(_, n)| n.as_str()).collect();
    bail!(
        "the route to {dst} leaves through {}, not {}: xdplb can only send to backends reachable through the interfaces it is attached to",
        others.join(" or "),
        names.join(" or ")
    );
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

    use std::net::IpAddr;

    use netlink_packet_route::{
        AddressFamily,
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteNextHop, RouteType},
    };

    use super::{Misses, Neighbours, Resolution, Route, Routes, Via, WITHDRAW_AFTER, contains, next_hop};

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
        assert!(contains(a("198.18.0.0"), 24, a("198.18.0.77")));
        assert!(!contains(a("198.18.0.0"), 24, a("198.18.1.1")));
        assert!(contains(a("0.0.0.0"), 0, a("198.18.1.1")));
        assert!(contains(a("2001:db8::"), 64, a("2001:db8::11")));
        assert!(!contains(a("2001:db8::"), 64, a("198.18.0.1")));
    }

    #[test]
    fn a_gateway_is_named_only_for_a_routed_address() {
        let routes = Routes::from_routes(&[
            (a("198.18.0.0"), 24, None, 2),
            (a("198.19.5.0"), 24, Some(a("198.18.0.254")), 2),
            (a("0.0.0.0"), 0, Some(a("198.18.0.1")), 2),
            (a("2001:db8::"), 64, None, 2),
            // A host route whose gateway is the host itself (`via` the same address): connected.
            (a("198.19.6.6"), 32, Some(a("198.19.6.6")), 2),
        ]);
        assert_eq!(routes.gateway(a("198.18.0.11")), None, "connected");
        assert_eq!(routes.gateway(a("198.19.5.5")), Some(Via::Gateway(a("198.18.0.254"))));
        assert_eq!(routes.gateway(a("203.0.113.9")), Some(Via::Gateway(a("198.18.0.1"))), "the default route");
        assert_eq!(routes.gateway(a("2001:db8::11")), None);
        assert_eq!(routes.gateway(a("2001:db8:9::1")), None, "no route: nothing to say");
        assert_eq!(routes.gateway(a("198.19.6.6")), None);
    }

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rta_addr(a: IpAddr) -> RouteAddress {
        match a {
            IpAddr::V4(v4) => RouteAddress::Inet(v4),
            IpAddr::V6(v6) => RouteAddress::Inet6(v6),
        }
    }

    /// A main-table unicast route as the kernel dumps it (`ip route add
    /// DST/LEN [via GW] [dev IF] [metric M]`, or with `nexthop` clauses).
    fn message(dst: &str, len: u8, metric: Option<u32>, mut attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = if a(dst).is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        m.header.destination_prefix_length = len;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.kind = RouteType::Unicast;
        if len > 0 {
            attrs.push(RouteAttribute::Destination(rta_addr(a(dst))));
        }
        attrs.extend(metric.map(RouteAttribute::Priority));
        m.attributes = attrs;
        m
    }

    fn via(gw: &str, oif: u32) -> Vec<RouteAttribute> {
        vec![RouteAttribute::Gateway(rta_addr(a(gw))), RouteAttribute::Oif(oif)]
    }

    fn dev(oif: u32) -> Vec<RouteAttribute> {
        vec![RouteAttribute::Oif(oif)]
    }

    fn multipath(hops: &[(&str, u32)]) -> Vec<RouteAttribute> {
        let hops = hops
            .iter()
            .map(|&(gw, oif)| {
                let mut h = RouteNextHop::default();
                h.interface_index = oif;
                h.attributes = vec![RouteAttribute::Gateway(rta_addr(a(gw)))];
                h
            })
            .collect();
        vec![RouteAttribute::MultiPath(hops)]
    }

    fn table(msgs: &[RouteMessage]) -> Routes {
        Routes(msgs.iter().filter_map(Route::from_message).collect())
    }

    /// `ip route add 198.19.5.0/24 dev lb0` and a backup `via 198.18.0.254
    /// metric 200`: the kernel uses the connected one, whichever is listed first.
    #[test]
    fn of_equal_prefixes_the_lowest_metric_wins() {
        let connected = message("198.19.5.0", 24, Some(100), dev(2));
        let backup = message("198.19.5.0", 24, Some(200), via("198.18.0.254", 2));
        for msgs in [[connected.clone(), backup.clone()], [backup.clone(), connected.clone()]] {
            assert_eq!(table(&msgs).gateway(a("198.19.5.5")), None, "{msgs:?}");
        }
        // No metric attribute is metric 0 (IPv4's default): it beats any other.
        let plain = message("198.19.5.0", 24, None, via("198.18.0.253", 2));
        let routes = table(&[connected.clone(), plain]);
        assert_eq!(routes.gateway(a("198.19.5.5")), Some(Via::Gateway(a("198.18.0.253"))));
        // A longer prefix still wins over a lower metric.
        let host = message("198.19.5.5", 32, Some(1000), via("198.18.0.252", 2));
        assert_eq!(table(&[connected, backup, host]).gateway(a("198.19.5.5")), Some(Via::Gateway(a("198.18.0.252"))));
        // IPv6: `metric 1024` is the kernel's default.
        let v6 = [
            message("2001:db8:5::", 64, Some(1024), via("2001:db8::fe", 2)),
            message("2001:db8:5::", 64, Some(256), dev(2)),
        ];
        assert_eq!(table(&v6).gateway(a("2001:db8:5::5")), None);
    }

    /// `ip route add 198.19.5.0/24 nexthop via 198.18.0.253 nexthop via
    /// 198.18.0.254`: no single gateway, but routed all the same.
    #[test]
    fn a_multipath_route_is_routed_and_names_its_gateways() {
        let routes = table(&[
            message("198.18.0.0", 24, None, dev(2)),
            message("198.19.5.0", 24, None, multipath(&[("198.18.0.254", 2), ("198.18.0.253", 2)])),
            message("0.0.0.0", 0, None, via("198.18.0.1", 2)),
        ]);
        let want = Via::Multipath(vec![a("198.18.0.253"), a("198.18.0.254")]);
        assert_eq!(routes.gateway(a("198.19.5.5")), Some(want.clone()));
        assert_eq!(want.to_string(), "a multipath route via gateways 198.18.0.253, 198.18.0.254");
        assert_eq!(routes.gateway(a("198.18.0.11")), None);
        // Resolution sends through the first next hop on our interface.
        let lb0 = [(2, "lb0".to_string())];
        assert_eq!(next_hop(&lb0, &routes, a("198.19.5.5")).unwrap(), (a("198.18.0.254"), 2));
        let elsewhere = table(&[message("198.19.5.0", 24, None, multipath(&[("10.0.0.1", 7), ("10.0.0.2", 8)]))]);
        let err = next_hop(&lb0, &elsewhere, a("198.19.5.5")).unwrap_err().to_string();
        assert!(err.contains("leaves through interface index 7 or interface index 8, not lb0"), "{err}");
    }

    /// With `nexthop_compat_mode` off, a route through a nexthop object
    /// carries only its id: nothing says the backend is connected.
    #[test]
    fn a_route_through_an_unspelled_nexthop_object_is_not_taken_as_connected() {
        let routes = table(&[
            message("198.18.0.0", 24, None, dev(2)),
            message("198.19.5.0", 24, None, vec![RouteAttribute::NhId(7)]),
            // With compat mode on, the dump spells out the object's gateway too.
            message("198.19.6.0", 24, None, [vec![RouteAttribute::NhId(8)], via("198.18.0.254", 2)].concat()),
        ]);
        assert_eq!(routes.gateway(a("198.19.5.5")), Some(Via::NexthopObject(7)));
        assert_eq!(routes.gateway(a("198.19.6.6")), Some(Via::Gateway(a("198.18.0.254"))));
        let lb0 = [(2, "lb0".to_string())];
        let err = next_hop(&lb0, &routes, a("198.19.5.5")).unwrap_err().to_string();
        assert!(err.contains("uses nexthop object 7"), "{err}");
    }

    #[test]
    fn other_tables_and_kinds_are_not_routes_to_backends() {
        let mut local = message("198.19.5.0", 24, None, dev(2));
        local.header.table = 255;
        let mut blackhole = message("198.19.5.0", 24, None, vec![]);
        blackhole.header.kind = RouteType::BlackHole;
        assert_eq!(table(&[local, blackhole]), Routes::default());
        let default = Route::from_message(&message("::", 0, None, via("fe80::1", 2))).unwrap();
        assert_eq!((default.dst, default.len), (Some(a("::")), 0));
    }
}
