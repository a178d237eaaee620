//! NAT forwarding (LVS `-m`): the destination becomes the backend's address
//! and port on the way in, the source becomes the VIP's again on the way
//! out, and the TTL / hop limit goes down by one either way, as a router's
//! would. Checksums are updated incrementally (RFC 1624). NAT keeps its own
//! connection table that follows the connection's state (`NAT_EMBRYONIC` in
//! lb-common for the state machine): a spoofed packet creates nothing that
//! outlives the embryonic timeout, and only a SYN creates TCP state.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST,
        xdp_action::{XDP_DROP, XDP_TX},
    },
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use lb_common::{
    maps::{
        BACKEND_ACTIVE, BACKEND_DRAINING, Backend, FAMILY_V4, FlowKey, LbConfig, NAT_ANSWERED, NAT_CLOSED, NAT_CLOSING,
        NAT_EMBRYONIC, NAT_OPEN, NatFlow, NatReply, PROTO_TCP, PROTO_UDP, TX_PORT_BACKEND, TX_PORT_CLIENT, VipMeta,
        nat_unconfirmed,
    },
    reasons,
};

use crate::{
    count_conntrack, maglev_pick,
    maps::{NAT_FLOWS, NAT_REVERSE, TX_PORTS},
    parse::{ETH_LEN, EthHdr, Ipv4Hdr, Ipv6Hdr, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ptr_at},
    trace::Observe,
};

/// bpf_map_update_elem's answer when BPF_NOEXIST finds the key taken.
const EEXIST: i32 = 17;

#[inline(always)]
pub(crate) fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Adds the change from `old` to `new` (native-order 32-bit words of the
/// packet) to a ones'-complement running sum.
#[inline(always)]
pub(crate) fn diff(sum: u32, old: &[u32; 4], new: &[u32; 4], words: usize) -> u32 {
    let mut s = sum;
    for i in 0..4 {
        if i < words {
            s += (!old[i] & 0xffff) + (!old[i] >> 16) + (new[i] & 0xffff) + (new[i] >> 16);
        }
    }
    s
}

/// The new state of an open (or closing) connection after a client or
/// backend packet with these flags. Unconfirmed connections do not come
/// here: a spoofer's RST or FIN must not buy one the longer closed timeout.
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

/// A 32-bit word of the TCP header (host order): 4 the sequence number,
/// 8 the acknowledgment number.
#[inline(always)]
fn tcp_word(ctx: &XdpContext, pkt: &Packet, at: usize) -> Option<u32> {
    // Bounded for the verifier, as in `rewrite`.
    if pkt.l4_off > 600 {
        return None;
    }
    let p = ptr_at::<u32>(ctx, pkt.l4_off + at)?;
    // SAFETY: ptr_at checked that the 4 bytes lie within the frame.
    Some(u32::from_be(unsafe { p.read_unaligned() }))
}

/// The IPv4 TTL or IPv6 hop limit.
#[inline(always)]
fn hop_limit(ctx: &XdpContext, pkt: &Packet) -> Option<u8> {
    if pkt.flow.family == FAMILY_V4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)?;
        // SAFETY: ptr_at checked that the whole IPv4 header lies within the frame.
        Some(unsafe { (*ip).ttl })
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)?;
        // SAFETY: ptr_at checked that the whole IPv6 header lies within the frame.
        Some(unsafe { (*ip).hop_limit })
    }
}

/// A packet NAT would forward but whose TTL / hop limit is 1 or less: it is
/// dropped, counted as `drop_malformed_l4`. Never passed: the balancer's own
/// stack may hold the VIP (keepalived, lo) and would deliver it to a local
/// service on the VIP's port. No "time exceeded" is sent (a router's duty,
/// RFC 1812 5.3.1; traceroute stops one hop early). None if it may be
/// forwarded. Checked before any state is created or refreshed.
#[inline(always)]
pub fn last_hop(ctx: &XdpContext, pkt: &Packet) -> Option<(u32, u32)> {
    match hop_limit(ctx, pkt) {
        Some(hops) if hops > 1 => None,
        _ => Some((XDP_DROP, reasons::DROP_MALFORMED_L4)),
    }
}

/// Rewrites one address (source or destination) and one port of the packet,
/// takes one off its TTL / hop limit, and fixes the IPv4 header and the
/// TCP/UDP checksums. The caller checked (`last_hop`) that the TTL is above 1.
#[inline(always)]
fn rewrite(ctx: &XdpContext, pkt: &Packet, source: bool, addr: &[u32; 4], port: u16) -> Option<()> {
    let v4 = pkt.flow.family == FAMILY_V4;
    let words = if v4 { 1 } else { 4 };
    let (old_addr, old_port) = if source { (&pkt.flow.src, pkt.flow.sport) } else { (&pkt.flow.dst, pkt.flow.dport) };
    rewrite_ip(ctx, v4, source, old_addr, addr)?;
    // Port and transport checksum (which covers the pseudo-header's addresses).
    let l4 = pkt.l4_off;
    if l4 > 600 {
        return None;
    }
    let port_ptr = ptr_at::<u16>(ctx, l4 + if source { 0 } else { 2 })?;
    // SAFETY: ptr_at checked that the 2-byte port lies within the frame.
    unsafe { port_ptr.write_unaligned(port) };
    let check_off = match pkt.flow.protocol {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => return Some(()),
    };
    let check = ptr_at::<u16>(ctx, l4 + check_off)?;
    // SAFETY: ptr_at checked that the 2-byte checksum lies within the frame.
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
    // SAFETY: as above.
    unsafe { check.write_unaligned(new) };
    Some(())
}

/// Rewrites the IP header's source (`source`) or destination address from
/// `old_addr` to `addr`, takes one off its TTL / hop limit, and fixes the
/// IPv4 header checksum. The caller checked (`last_hop`) that the TTL is above 1.
#[inline(always)]
pub(crate) fn rewrite_ip(ctx: &XdpContext, v4: bool, source: bool, old_addr: &[u32; 4], addr: &[u32; 4]) -> Option<()> {
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
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)?;
        let a = ptr_at::<u32>(ctx, addr_off)?;
        // SAFETY: ptr_at checked that the header and the 4-byte address lie within the frame.
        let (ttl, protocol, old) = unsafe { ((*ip).ttl, (*ip).protocol, (*ip).check) };
        let ttl_new = ttl.saturating_sub(1);
        // TTL and protocol share one 16-bit word of the header checksum.
        let mut sum = diff(!old as u32, old_addr, addr, 1);
        sum += (!u16::from_ne_bytes([ttl, protocol]) as u32) + u16::from_ne_bytes([ttl_new, protocol]) as u32;
        // SAFETY: as above; unaligned writes, the IP header may start at any offset.
        unsafe {
            a.write_unaligned(addr[0]);
            (*ip).ttl = ttl_new;
            (*ip).check = !fold(sum);
        }
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)?;
        let a = ptr_at::<[u32; 4]>(ctx, addr_off)?;
        // SAFETY: ptr_at checked that the header and the 16-byte address lie within the frame.
        // The hop limit is in no checksum.
        unsafe {
            a.write_unaligned(*addr);
            (*ip).hop_limit = (*ip).hop_limit.saturating_sub(1);
        }
    }
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

/// Connection tracking for NAT, then Maglev for new connections. Records a
/// new connection in both directions, embryonic. Counts the conntrack
/// outcome.
///
/// Only a SYN starts a TCP connection: another segment of an untracked
/// 5-tuple (a spoofed ACK, or a connection the table forgot) is refused,
/// counted as `drop_malformed_l4`, and creates nothing. A UDP datagram starts
/// a flow. A frame from a group (multicast/broadcast) source MAC is refused
/// the same way: replies would flood. The client's MAC is taken from the
/// packet that creates (or, on a reused port, restarts) the connection and
/// from the ACK that opens it, from no other.
#[inline(always)]
pub fn choose_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &VipMeta,
    hash: impl Fn() -> u32,
    new_connection: bool,
    client_mac: [u8; 6],
    obs: &mut impl Observe,
) -> Result<(u32, Backend), u32> {
    if client_mac[0] & 1 != 0 {
        return Err(reasons::DROP_MALFORMED_L4);
    }
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let tracked = NAT_FLOWS.get_ptr_mut(&pkt.flow);
    if let Some(entry) = tracked {
        // SAFETY: a value pointer from a map lookup, valid for this program run.
        let e = unsafe { *entry };
        let backend = crate::maps::backend(e.backend_id).filter(|b| b.generation == e.generation);
        match backend {
            Some(b) if b.state == BACKEND_ACTIVE || (b.state == BACKEND_DRAINING && !new_connection) => {
                client_side(ctx, pkt, entry, &e, b, now, client_mac);
                count_conntrack(reasons::CONNTRACK_HIT, obs);
                return Ok((e.backend_id, *b));
            }
            Some(b) if b.state == BACKEND_DRAINING => count_conntrack(reasons::CONNTRACK_SYN_RESCHEDULED, obs),
            // A tracked connection whose backend went: chosen again (even
            // mid-stream, so the new backend can reset it), embryonic. The
            // one case where a segment other than a SYN writes state: it
            // replaces an entry a connection already had.
            _ => count_conntrack(reasons::CONNTRACK_STALE, obs),
        }
    } else {
        count_conntrack(reasons::CONNTRACK_MISS, obs);
        if pkt.flow.protocol == PROTO_TCP && !new_connection {
            return Err(reasons::DROP_MALFORMED_L4);
        }
    }
    let (id, b) = maglev_pick(vip, hash(), obs)?;
    let flow = NatFlow {
        backend_id: id,
        generation: b.generation,
        last_seen_ns: now,
        state: NAT_EMBRYONIC,
        _pad: [0; 3],
        backend_isn: 0,
    };
    // A stale entry is replaced; a missing one is created only if no other
    // CPU created it meanwhile.
    let flags = (if tracked.is_some() { BPF_ANY } else { BPF_NOEXIST }) as u64;
    match NAT_FLOWS.insert(&pkt.flow, &flow, flags) {
        Ok(()) => {}
        // Another CPU won the race for this 5-tuple: its choice stands.
        Err(e) if e == -EEXIST => return winner(&pkt.flow),
        Err(_) => return Err(reasons::DROP_NAT_TABLE_FULL),
    }
    let reply_key = reply_key(pkt, &b);
    let reply = NatReply {
        vip_addr: pkt.flow.dst,
        vip_port: pkt.flow.dport,
        client_mac,
        state: NAT_EMBRYONIC,
        _pad: [0; 7],
        last_seen_ns: now,
    };
    // BPF_NOEXIST: a lookup and then an insert would let two CPUs each see
    // the key free and the second overwrite the first's mapping.
    match NAT_REVERSE.insert(&reply_key, &reply, BPF_NOEXIST as u64) {
        Ok(()) => return Ok((id, b)),
        Err(e) if e == -EEXIST => {
            if let Some(r) = NAT_REVERSE.get_ptr_mut(&reply_key) {
                // SAFETY: a value pointer from a map lookup, valid for this program run.
                let same_vip = unsafe { (*r).vip_addr == pkt.flow.dst && (*r).vip_port == pkt.flow.dport };
                // The same reply 5-tuple to the same VIP is the same client
                // address and port: this very connection (another CPU's
                // packet created it just now) or the previous one on this
                // port, left behind. Either way it is ours to restart.
                if same_vip {
                    // SAFETY: as above.
                    unsafe {
                        (*r).client_mac = client_mac;
                        (*r).state = NAT_EMBRYONIC;
                        (*r).last_seen_ns = now;
                    }
                    return Ok((id, b));
                }
            }
            // Two NAT VIPs sharing a backend would map one client port to
            // the same reply 5-tuple: refuse the newcomer rather than
            // misroute the other's replies.
        }
        Err(_) => {}
    }
    let _ = NAT_FLOWS.remove(&pkt.flow);
    Err(reasons::DROP_NAT_TABLE_FULL)
}

/// A client packet of a tracked connection whose backend is live: moves
/// its state. An unconfirmed connection (embryonic, answered) keeps its
/// creation time as `last_seen_ns` whatever the client sends, so a spoofer
/// repeating its SYN cannot keep it; it opens only on the client's ACK of
/// the backend's SYN-ACK (UDP: a datagram after the backend's reply). A SYN
/// on a closed connection is a new one reusing the client's port: embryonic
/// again, in both directions. A SYN on an open one (a retransmission, or a
/// spoofer's) changes nothing but `last_seen_ns`.
#[inline(always)]
fn client_side(
    ctx: &XdpContext,
    pkt: &Packet,
    entry: *mut NatFlow,
    e: &NatFlow,
    b: &Backend,
    now: u64,
    client_mac: [u8; 6],
) {
    let tcp = pkt.flow.protocol == PROTO_TCP;
    let syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let (state, mac) = if tcp && syn && (e.state == NAT_CLOSING || e.state == NAT_CLOSED) {
        (NAT_EMBRYONIC, true)
    } else if e.state == NAT_ANSWERED {
        if !tcp {
            (NAT_OPEN, false)
        } else if pkt.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK
            && tcp_word(ctx, pkt, 8) == Some(e.backend_isn.wrapping_add(1))
        {
            (next_state(NAT_OPEN, pkt.tcp_flags), true)
        } else {
            return;
        }
    } else if nat_unconfirmed(e.state) {
        return;
    } else {
        // SAFETY: a value pointer from a map lookup; concurrent writers store whole fields of a live entry.
        unsafe {
            (*entry).last_seen_ns = now;
            (*entry).state = next_state(e.state, pkt.tcp_flags);
        }
        return;
    };
    // SAFETY: as above.
    unsafe {
        (*entry).last_seen_ns = now;
        (*entry).state = state;
    }
    if let Some(r) = NAT_REVERSE.get_ptr_mut(&reply_key(pkt, b)) {
        // SAFETY: a value pointer from a map lookup, valid for this program run.
        unsafe {
            if mac {
                (*r).client_mac = client_mac;
            }
            (*r).state = if state == NAT_EMBRYONIC { NAT_EMBRYONIC } else { NAT_OPEN };
            (*r).last_seen_ns = now;
        }
    }
}

/// The connection another CPU created for this 5-tuple while we chose, if
/// its backend is still the one it chose; it also wrote the reply entry.
#[inline(always)]
fn winner(flow: &FlowKey) -> Result<(u32, Backend), u32> {
    // SAFETY: a hash map lookup; the value is copied at once.
    let Some(w) = (unsafe { NAT_FLOWS.get(flow) }).copied() else {
        return Err(reasons::DROP_NAT_TABLE_FULL);
    };
    match crate::maps::backend(w.backend_id) {
        Some(b) if b.generation == w.generation && b.state == BACKEND_ACTIVE => Ok((w.backend_id, *b)),
        _ => Err(reasons::DROP_NAT_TABLE_FULL),
    }
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
    to_backend(ctx, backend, cfg)
}

/// Sends the rewritten frame to the backend (its MAC, or its next hop's)
/// out of the backend-facing interface.
#[inline(always)]
pub(crate) fn to_backend(ctx: &XdpContext, backend: &Backend, cfg: &LbConfig) -> (u32, u32) {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return (XDP_DROP, reasons::DROP_MALFORMED_L4) };
    // SAFETY: ptr_at checked that the whole Ethernet header lies within the frame.
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
/// the client. None if the packet is not such a reply, or did not come from
/// the backend side: in on the backend-facing interface (two-armed), from
/// the connection's backend's MAC (one-armed, where clients share the
/// interface). A client-side host cannot forge one to open a connection.
///
/// An unconfirmed connection's entries keep their creation time: the
/// backend's SYN-ACK (its retransmissions too) moves them to ANSWERED and
/// leaves its sequence number for the client's ACK to acknowledge; for UDP
/// any reply does.
#[inline(always)]
pub fn reply(ctx: &XdpContext, pkt: &Packet, cfg: &LbConfig, obs: &mut impl Observe) -> Option<(u32, u32)> {
    let entry = NAT_REVERSE.get_ptr_mut(&pkt.flow)?;
    // SAFETY: a value pointer from a map lookup, valid for this program run.
    let r = unsafe { *entry };
    let one_armed = cfg.backend_ifindex == cfg.client_ifindex;
    if !one_armed && ctx.ingress_ifindex() != cfg.backend_ifindex as usize {
        return None;
    }
    let client_side = FlowKey {
        src: pkt.flow.dst,
        dst: r.vip_addr,
        sport: pkt.flow.dport,
        dport: r.vip_port,
        protocol: pkt.flow.protocol,
        family: pkt.flow.family,
        _pad: [0; 2],
    };
    let unconfirmed = nat_unconfirmed(r.state);
    let flow = if one_armed || unconfirmed { NAT_FLOWS.get_ptr_mut(&client_side) } else { None };
    if one_armed && !from_backend(ctx, flow) {
        return None;
    }
    obs.nat_reply(&r);
    if let Some(done) = last_hop(ctx, pkt) {
        return Some(done);
    }
    if unconfirmed {
        let answer =
            pkt.flow.protocol != PROTO_TCP || pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK;
        if answer && let Some(f) = flow {
            let isn = if pkt.flow.protocol == PROTO_TCP { tcp_word(ctx, pkt, 4).unwrap_or(0) } else { 0 };
            // SAFETY: value pointers from map lookups, valid for this program run.
            unsafe {
                if nat_unconfirmed((*f).state) {
                    (*f).backend_isn = isn;
                    (*f).state = NAT_ANSWERED;
                    (*entry).state = NAT_ANSWERED;
                }
            }
        }
    } else {
        // SAFETY: as above; concurrent writers store whole fields of a live entry.
        unsafe {
            (*entry).last_seen_ns = bpf_ktime_get_ns();
            (*entry).state = next_state(r.state, pkt.tcp_flags);
        }
    }
    if rewrite(ctx, pkt, true, &r.vip_addr, r.vip_port).is_none() {
        return Some((XDP_DROP, reasons::DROP_MALFORMED_L4));
    }
    to_client(ctx, &r, cfg)
}

/// Sends the translated frame to the client (the MAC its packets came
/// from) out of the client-facing interface, counted `nat_reply`. None if
/// the frame has no Ethernet header.
#[inline(always)]
pub(crate) fn to_client(ctx: &XdpContext, r: &NatReply, cfg: &LbConfig) -> Option<(u32, u32)> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked that the whole Ethernet header lies within the frame.
    unsafe {
        (*eth).dst = r.client_mac;
        (*eth).src = cfg.if_mac;
    }
    Some(match send(ctx, TX_PORT_CLIENT, cfg.client_ifindex) {
        Ok(action) => (action, reasons::NAT_REPLY),
        Err(reason) => (XDP_DROP, reason),
    })
}

/// One-armed: whether the frame's source MAC is that of the connection's
/// backend (or its next hop), as BACKENDS has it now. A reply entry whose
/// client-side entry is gone, or whose backend slot went to another
/// server, has no backend to come from.
#[inline(always)]
pub(crate) fn from_backend(ctx: &XdpContext, flow: Option<*mut NatFlow>) -> bool {
    let Some(f) = flow else { return false };
    // SAFETY: a value pointer from a map lookup, valid for this program run.
    let (id, generation) = unsafe { ((*f).backend_id, (*f).generation) };
    let (Some(b), Some(eth)) = (crate::maps::backend(id), ptr_at::<EthHdr>(ctx, 0)) else { return false };
    // SAFETY: ptr_at checked that the whole Ethernet header lies within the frame.
    let src = unsafe { (*eth).src };
    b.generation == generation && src == b.mac
}
