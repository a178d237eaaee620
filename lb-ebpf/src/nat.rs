//! NAT forwarding (LVS `-m`): the destination becomes the backend's address
//! and port on the way in, the source becomes the VIP's again on the way
//! out. Checksums are updated incrementally (RFC 1624). NAT keeps its own
//! connection table that follows TCP state (see `NAT_FLOWS`).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use lb_common::{
    maps::{
        BACKEND_ACTIVE, BACKEND_DRAINING, Backend, FAMILY_V4, FlowKey, LbConfig, NAT_CLOSED, NAT_CLOSING, NAT_OPEN,
        NatFlow, NatReply, PROTO_TCP, PROTO_UDP, TX_PORT_BACKEND, TX_PORT_CLIENT, VipMeta,
    },
    reasons,
};

use crate::{
    count_conntrack, maglev_pick,
    maps::{BACKENDS, NAT_FLOWS, NAT_REVERSE, TX_PORTS},
    parse::{ETH_LEN, EthHdr, Packet, TCP_FIN, TCP_RST, ptr_at},
    trace::Observe,
};

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Adds the change from `old` to `new` (native-order 32-bit words of the
/// packet) to a ones'-complement running sum.
#[inline(always)]
fn diff(sum: u32, old: &[u32; 4], new: &[u32; 4], words: usize) -> u32 {
    let mut s = sum;
    for i in 0..4 {
        if i < words {
            s += (!old[i] & 0xffff) + (!old[i] >> 16) + (new[i] & 0xffff) + (new[i] >> 16);
        }
    }
    s
}

/// The new TCP/UDP state after a packet with these flags.
#[inline(always)]
fn next_state(state: u8, flags: u8) -> u8 {
    if flags & TCP_RST != 0 {
        NAT_CLOSED
    } else if flags & TCP_FIN != 0 && state < NAT_CLOSING {
        NAT_CLOSING
    } else {
        state
    }
}

/// Rewrites one address (source or destination) and one port of the packet,
/// fixing the IPv4 header and the TCP/UDP checksums.
#[inline(always)]
fn rewrite(ctx: &XdpContext, pkt: &Packet, source: bool, addr: &[u32; 4], port: u16) -> Option<()> {
    let v4 = pkt.flow.family == FAMILY_V4;
    let words = if v4 { 1 } else { 4 };
    let (old_addr, old_port) = if source { (&pkt.flow.src, pkt.flow.sport) } else { (&pkt.flow.dst, pkt.flow.dport) };
    // Address in the IP header.
    let addr_off = ETH_LEN
        + if v4 {
            if source { 12 } else { 16 }
        } else if source {
            8
        } else {
            24
        };
    if v4 {
        let a = ptr_at::<u32>(ctx, addr_off)?;
        unsafe { a.write_unaligned(addr[0]) };
        let check = ptr_at::<u16>(ctx, ETH_LEN + 10)?;
        let old = unsafe { check.read_unaligned() };
        let sum = diff(!old as u32, old_addr, addr, 1);
        unsafe { check.write_unaligned(!fold(sum)) };
    } else {
        let a = ptr_at::<[u32; 4]>(ctx, addr_off)?;
        unsafe { a.write_unaligned(*addr) };
    }
    // Port and transport checksum (which covers the pseudo-header's addresses).
    let l4 = pkt.l4_off;
    if l4 > 600 {
        return None;
    }
    let port_ptr = ptr_at::<u16>(ctx, l4 + if source { 0 } else { 2 })?;
    unsafe { port_ptr.write_unaligned(port) };
    let check_off = match pkt.flow.protocol {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => return Some(()),
    };
    let check = ptr_at::<u16>(ctx, l4 + check_off)?;
    let old = unsafe { check.read_unaligned() };
    if pkt.flow.protocol == PROTO_UDP && v4 && old == 0 {
        // IPv4 UDP without a checksum stays without one.
        return Some(());
    }
    let mut sum = diff(!old as u32, old_addr, addr, words);
    sum += (!old_port & 0xffff) as u32 + port as u32;
    let mut new = !fold(sum);
    if pkt.flow.protocol == PROTO_UDP && new == 0 {
        new = 0xffff;
    }
    unsafe { check.write_unaligned(new) };
    Some(())
}

/// Sends the frame out of the interface in `slot` of TX_PORTS: XDP_TX when
/// that is where it came in.
#[inline(always)]
fn send(ctx: &XdpContext, slot: u32, ifindex: u32) -> Result<u32, u32> {
    if ifindex == 0 || ifindex as usize == ctx.ingress_ifindex() {
        return Ok(XDP_TX);
    }
    TX_PORTS.redirect(slot, 0).map_err(|_| reasons::DROP_REDIRECT_FAILED)
}

/// Connection tracking for NAT, then Maglev for new connections. Records the
/// reply mapping of a new connection. Counts the conntrack outcome.
#[inline(always)]
pub fn choose_backend(
    pkt: &Packet,
    vip: &VipMeta,
    hash: impl Fn() -> u32,
    new_connection: bool,
    client_mac: [u8; 6],
    obs: &mut impl Observe,
) -> Result<(u32, Backend), u32> {
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = NAT_FLOWS.get_ptr_mut(&pkt.flow) {
        let e = unsafe { *entry };
        let backend = BACKENDS.get(e.backend_id).filter(|b| b.generation == e.generation);
        match backend {
            Some(b) if b.state == BACKEND_ACTIVE || (b.state == BACKEND_DRAINING && !new_connection) => {
                // A SYN on a tracked 5-tuple is a new connection reusing the
                // client's port: it starts OPEN again, in both directions.
                let state = if new_connection { NAT_OPEN } else { next_state(e.state, pkt.tcp_flags) };
                unsafe {
                    (*entry).last_seen_ns = now;
                    (*entry).state = state;
                }
                if new_connection && let Some(r) = NAT_REVERSE.get_ptr_mut(&reply_key(pkt, b)) {
                    unsafe { (*r).state = NAT_OPEN };
                }
                count_conntrack(reasons::CONNTRACK_HIT, obs);
                return Ok((e.backend_id, *b));
            }
            Some(b) if b.state == BACKEND_DRAINING => count_conntrack(reasons::CONNTRACK_SYN_RESCHEDULED, obs),
            _ => count_conntrack(reasons::CONNTRACK_STALE, obs),
        }
    } else {
        count_conntrack(reasons::CONNTRACK_MISS, obs);
    }
    let (id, b) = maglev_pick(vip, hash(), obs)?;
    let flow = NatFlow {
        backend_id: id,
        generation: b.generation,
        last_seen_ns: now,
        state: next_state(0, pkt.tcp_flags),
        _pad: [0; 7],
    };
    if NAT_FLOWS.insert(&pkt.flow, &flow, 0).is_err() {
        return Err(reasons::DROP_NAT_TABLE_FULL);
    }
    let reply_key = reply_key(pkt, &b);
    // Two NAT VIPs sharing a backend could map one client port to the same
    // reply 5-tuple: refuse the newcomer rather than misroute the other's replies.
    if let Some(other) = unsafe { NAT_REVERSE.get(&reply_key) }
        && (other.vip_addr != pkt.flow.dst || other.vip_port != pkt.flow.dport)
    {
        let _ = NAT_FLOWS.remove(&pkt.flow);
        return Err(reasons::DROP_NAT_TABLE_FULL);
    }
    let reply = NatReply {
        vip_addr: pkt.flow.dst,
        vip_port: pkt.flow.dport,
        client_mac,
        state: flow.state,
        _pad: [0; 7],
        last_seen_ns: now,
    };
    if NAT_REVERSE.insert(&reply_key, &reply, 0).is_err() {
        let _ = NAT_FLOWS.remove(&pkt.flow);
        return Err(reasons::DROP_NAT_TABLE_FULL);
    }
    Ok((id, b))
}

/// The 5-tuple of the backend's replies to this client.
#[inline(always)]
fn reply_key(pkt: &Packet, b: &Backend) -> FlowKey {
    FlowKey {
        src: b.addr,
        dst: pkt.flow.src,
        sport: if b.port != 0 { b.port } else { pkt.flow.dport },
        dport: pkt.flow.sport,
        protocol: pkt.flow.protocol,
        family: pkt.flow.family,
        _pad: [0; 2],
    }
}

/// The way in: to the backend's address and port, out of the backend-facing interface.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, backend: &Backend, cfg: &LbConfig) -> (u32, u32) {
    let port = if backend.port != 0 { backend.port } else { pkt.flow.dport };
    if rewrite(ctx, pkt, false, &backend.addr, port).is_none() {
        return (XDP_DROP, reasons::DROP_MALFORMED_L4);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return (XDP_DROP, reasons::DROP_MALFORMED_L4) };
    unsafe {
        (*eth).dst = backend.mac;
        (*eth).src = cfg.backend_if_mac;
    }
    match send(ctx, TX_PORT_BACKEND, cfg.backend_ifindex) {
        Ok(action) => (action, reasons::TX),
        Err(reason) => (XDP_DROP, reason),
    }
}

/// The way out: a reply of a tracked connection goes back from the VIP to
/// the client. None if the packet is not such a reply.
#[inline(always)]
pub fn reply(ctx: &XdpContext, pkt: &Packet, cfg: &LbConfig, obs: &mut impl Observe) -> Option<(u32, u32)> {
    let entry = NAT_REVERSE.get_ptr_mut(&pkt.flow)?;
    let r = unsafe { *entry };
    obs.nat_reply(&r);
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        (*entry).state = next_state(r.state, pkt.tcp_flags);
    }
    if rewrite(ctx, pkt, true, &r.vip_addr, r.vip_port).is_none() {
        return Some((XDP_DROP, reasons::DROP_MALFORMED_L4));
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe {
        (*eth).dst = r.client_mac;
        (*eth).src = cfg.if_mac;
    }
    Some(match send(ctx, TX_PORT_CLIENT, cfg.client_ifindex) {
        Ok(action) => (action, reasons::NAT_REPLY),
        Err(reason) => (XDP_DROP, reason),
    })
}
