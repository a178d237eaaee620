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
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use lb_common::{
    maps::{
        BACKEND_ACTIVE, BACKEND_DRAINING, Backend, FAMILY_V4, FlowKey, LbConfig, NAT_CLOSED, NAT_CLOSING,
        NAT_EMBRYONIC, NAT_OPEN, NatFlow, NatReply, PROTO_TCP, PROTO_UDP, TX_PORT_BACKEND, TX_PORT_CLIENT, VipMeta,
    },
    reasons,
};

use crate::{
    count_conntrack, maglev_pick,
    maps::{BACKENDS, NAT_FLOWS, NAT_REVERSE, TX_PORTS},
    parse::{ETH_LEN, EthHdr, Ipv4Hdr, Ipv6Hdr, Packet, TCP_FIN, TCP_RST, ptr_at},
    trace::Observe,
};

/// bpf_map_update_elem's answer when BPF_NOEXIST finds the key taken.
const EEXIST: i32 = 17;

/// The client's MAC is copied into the reply entry when a client packet is
/// the first of its connection in a new 2^30 ns (about 1 s) slice: a router
/// that changed MAC is followed within a second, at one extra lookup per
/// connection and second, not per packet.
const MAC_REFRESH_SHIFT: u32 = 30;

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

/// The new state after a client or backend packet with these flags. An
/// embryonic connection stays so whatever the client sends (a spoofer's RST
/// or FIN must not buy it the longer closed timeout): only the backend's
/// reply opens it (`reply`).
#[inline(always)]
fn next_state(state: u8, flags: u8) -> u8 {
    if state == NAT_EMBRYONIC {
        state
    } else if flags & TCP_RST != 0 {
        NAT_CLOSED
    } else if flags & TCP_FIN != 0 && state < NAT_CLOSING {
        NAT_CLOSING
    } else {
        state
    }
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

/// A packet NAT would forward but whose TTL / hop limit is 1 or less: it
/// goes to the kernel untouched, which answers "time exceeded" as a router
/// must (RFC 1812 5.3.1), counted as `pass_malformed_l3` (its IP header says
/// it can go no further). None if it may be forwarded. Checked before any
/// state is created or refreshed.
#[inline(always)]
pub fn last_hop(ctx: &XdpContext, pkt: &Packet) -> Option<(u32, u32)> {
    match hop_limit(ctx, pkt) {
        Some(hops) if hops > 1 => None,
        _ => Some((XDP_PASS, reasons::PASS_MALFORMED_L3)),
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
/// a flow, embryonic until the backend answers.
#[inline(always)]
pub fn choose_backend(
    pkt: &Packet,
    vip: &VipMeta,
    hash: impl Fn() -> u32,
    new_connection: bool,
    client_mac: [u8; 6],
    obs: &mut impl Observe,
) -> Result<(u32, Backend), u32> {
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let tracked = NAT_FLOWS.get_ptr_mut(&pkt.flow);
    if let Some(entry) = tracked {
        // SAFETY: a value pointer from a map lookup, valid for this program run.
        let e = unsafe { *entry };
        let backend = BACKENDS.get(e.backend_id).filter(|b| b.generation == e.generation);
        match backend {
            Some(b) if b.state == BACKEND_ACTIVE || (b.state == BACKEND_DRAINING && !new_connection) => {
                // A SYN on a connection that closed is a new one reusing the
                // client's port: embryonic again, in both directions. A SYN on
                // an open one (a retransmission, or a spoofer's) changes nothing.
                let reused = new_connection && (e.state == NAT_CLOSING || e.state == NAT_CLOSED);
                let state = if reused { NAT_EMBRYONIC } else { next_state(e.state, pkt.tcp_flags) };
                // SAFETY: as above; concurrent writers store whole fields of a live entry.
                unsafe {
                    (*entry).last_seen_ns = now;
                    (*entry).state = state;
                }
                if (reused || now >> MAC_REFRESH_SHIFT != e.last_seen_ns >> MAC_REFRESH_SHIFT)
                    && let Some(r) = NAT_REVERSE.get_ptr_mut(&reply_key(pkt, b))
                {
                    // SAFETY: a value pointer from a map lookup, valid for this program run.
                    unsafe {
                        (*r).client_mac = client_mac;
                        if reused {
                            (*r).state = NAT_EMBRYONIC;
                            (*r).last_seen_ns = now;
                        }
                    }
                }
                count_conntrack(reasons::CONNTRACK_HIT, obs);
                return Ok((e.backend_id, *b));
            }
            Some(b) if b.state == BACKEND_DRAINING => count_conntrack(reasons::CONNTRACK_SYN_RESCHEDULED, obs),
            // A tracked connection whose backend went: chosen again (even
            // mid-stream, so the new backend can reset it), embryonic.
            _ => count_conntrack(reasons::CONNTRACK_STALE, obs),
        }
    } else {
        count_conntrack(reasons::CONNTRACK_MISS, obs);
        if pkt.flow.protocol == PROTO_TCP && !new_connection {
            return Err(reasons::DROP_MALFORMED_L4);
        }
    }
    let (id, b) = maglev_pick(vip, hash(), obs)?;
    let flow =
        NatFlow { backend_id: id, generation: b.generation, last_seen_ns: now, state: NAT_EMBRYONIC, _pad: [0; 7] };
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

/// The connection another CPU created for this 5-tuple while we chose, if
/// its backend is still the one it chose; it also wrote the reply entry.
#[inline(always)]
fn winner(flow: &FlowKey) -> Result<(u32, Backend), u32> {
    // SAFETY: a hash map lookup; the value is copied at once.
    let Some(w) = (unsafe { NAT_FLOWS.get(flow) }).copied() else {
        return Err(reasons::DROP_NAT_TABLE_FULL);
    };
    match BACKENDS.get(w.backend_id) {
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
/// the client. The first reply opens an embryonic connection, both
/// directions. None if the packet is not such a reply.
#[inline(always)]
pub fn reply(ctx: &XdpContext, pkt: &Packet, cfg: &LbConfig, obs: &mut impl Observe) -> Option<(u32, u32)> {
    let entry = NAT_REVERSE.get_ptr_mut(&pkt.flow)?;
    // SAFETY: a value pointer from a map lookup, valid for this program run.
    let r = unsafe { *entry };
    obs.nat_reply(&r);
    if let Some(done) = last_hop(ctx, pkt) {
        return Some(done);
    }
    let state = if r.state == NAT_EMBRYONIC {
        let client_side = FlowKey {
            src: pkt.flow.dst,
            dst: r.vip_addr,
            sport: pkt.flow.dport,
            dport: r.vip_port,
            protocol: pkt.flow.protocol,
            family: pkt.flow.family,
            _pad: [0; 2],
        };
        if let Some(f) = NAT_FLOWS.get_ptr_mut(&client_side) {
            // SAFETY: a value pointer from a map lookup, valid for this program run.
            unsafe {
                if (*f).state == NAT_EMBRYONIC {
                    (*f).state = NAT_OPEN;
                }
            }
        }
        NAT_OPEN
    } else {
        r.state
    };
    // SAFETY: as above.
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        (*entry).state = next_state(state, pkt.tcp_flags);
    }
    if rewrite(ctx, pkt, true, &r.vip_addr, r.vip_port).is_none() {
        return Some((XDP_DROP, reasons::DROP_MALFORMED_L4));
    }
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
