//! ICMP errors about NAT connections, translated both ways as Linux's NAT
//! translates them (nf_nat_icmp_reply_translation): the outer address on
//! the NAT side, the quoted packet's address and port, and every checksum
//! (the outer IPv4 header's, the quoted IPv4 header's, the quoted TCP/UDP
//! checksum where the quote holds it, the ICMP / ICMPv6 checksum with its
//! pseudo-header). The TTL / hop limit goes down by one, as for the
//! connection's own packets. Neither way creates or refreshes state: an
//! error proves nothing about the connection.
//!
//! - To the backend: an error to a NAT VIP about a reply its client got
//!   (quoted VIP:vport → client:cport) goes to the connection's backend as
//!   the client's packets do (`nat::forward`), its destination and the
//!   quote's source made the backend's: as if the backend's own reply had
//!   met it. Only once the backend has answered through us (any state but
//!   embryonic): before that no reply went out to be quoted. Otherwise (an
//!   untracked tuple, an embryonic connection, a backend gone or down) it
//!   passes to the host untouched, as every error not about a VIP's flow.
//! - To the client: an error from the backend side (as `nat::reply` judges
//!   it: in on the backend interface, or one-armed from the backend's MAC)
//!   about a packet the backend got (quoted client:cport → backend:bport)
//!   goes to the client as replies do, the quote's destination made the
//!   VIP's again, and the outer source too if the backend itself sent it (a
//!   router's error keeps the router's address). In any state: an embryonic
//!   connection's first datagram can meet a closed port.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use lb_common::{
    maps::{BACKEND_ACTIVE, BACKEND_DRAINING, CFG_NAT, FAMILY_V4, FlowKey, NAT_EMBRYONIC, PROTO_TCP, PROTO_UDP},
    reasons,
};

use crate::{
    icmp,
    maps::{BACKEND_STATS, CONFIG, NAT_FLOWS, NAT_REVERSE, VIP_STATS, backend, count_bytes},
    nat::{self, diff, fold},
    parse::{ETH_LEN, Icmp, Ipv4Hdr, Packet, ptr_at},
    trace::Observe,
};

/// The ICMP header's length; the quoted packet follows it.
const ICMP_HDR: usize = 8;
/// Bounds the quote's offset for the verifier (parse walks at most 512 bytes
/// of IPv6 extension headers).
const MAX_QUOTE_OFF: usize = 600;

/// An address (with its port in the quote) and what it becomes: the
/// source's (`source`) or the destination's.
struct Change<'a> {
    source: bool,
    old: &'a [u32; 4],
    new: &'a [u32; 4],
}

/// Where an ICMP error's quoted packet lies in the frame.
struct Quote {
    /// Its IP header.
    ip: usize,
    /// Its transport header, whose first 8 bytes (ports; UDP's checksum) lie
    /// within the ICMP message.
    l4: usize,
    /// The ICMP message's end: the outer IP packet's, not the frame's (which
    /// may carry link padding, in no checksum).
    end: usize,
}

/// An ICMP error to a NAT VIP; `pkt.flow` is the client-side 5-tuple of the
/// connection whose reply it quotes (`icmp::classify`). See the module.
#[inline(always)]
pub fn to_backend(ctx: &XdpContext, pkt: &Packet, vip_id: u32, obs: &mut impl Observe) -> (u32, u32) {
    const NOT_OURS: (u32, u32) = (XDP_PASS, reasons::PASS_VIP_OTHER_PROTO);
    // SAFETY: a hash map lookup; the value is copied out at once.
    let Some(flow) = (unsafe { NAT_FLOWS.get(&pkt.flow) }).copied() else { return NOT_OURS };
    if flow.state == NAT_EMBRYONIC {
        return NOT_OURS;
    }
    let Some(b) = backend(flow.backend_id).copied() else { return NOT_OURS };
    if b.generation != flow.generation || (b.state != BACKEND_ACTIVE && b.state != BACKEND_DRAINING) {
        return NOT_OURS;
    }
    let Some(cfg) = CONFIG.get(0) else { return (XDP_DROP, reasons::DROP_BAD_BACKEND) };
    if let Some(done) = nat::last_hop(ctx, pkt) {
        return done;
    }
    obs.backend(flow.backend_id, &b);
    let port = if b.port != 0 { b.port } else { pkt.flow.dport };
    let vip = &pkt.flow.dst;
    let outer = Change { source: false, old: vip, new: &b.addr };
    let quoted = Change { source: true, old: vip, new: &b.addr };
    if translate(ctx, pkt, &outer, &quoted, pkt.flow.dport, port).is_none() {
        return (XDP_DROP, reasons::DROP_MALFORMED_L4);
    }
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    count_bytes(&VIP_STATS, vip_id, frame_len);
    count_bytes(&BACKEND_STATS, flow.backend_id, frame_len);
    nat::to_backend(ctx, &b, cfg)
}

/// An ICMP error to an address that is no VIP's. None if it is not one
/// about a NAT connection from the backend side. See the module.
#[inline(always)]
pub fn to_client(ctx: &XdpContext, icmp: &Icmp, obs: &mut impl Observe) -> Option<(u32, u32)> {
    let cfg = CONFIG.get(0)?;
    if cfg.flags & CFG_NAT == 0 {
        return None;
    }
    // The quoted client → backend packet's tuple reversed: the reply key.
    let key = icmp::error_flow(ctx, icmp)?;
    // SAFETY: a hash map lookup; the value is copied out at once.
    let r = *unsafe { NAT_REVERSE.get(&key) }?;
    // From the backend side only, as `nat::reply` has it.
    let one_armed = cfg.backend_ifindex == cfg.client_ifindex;
    if !one_armed && ctx.ingress_ifindex() != cfg.backend_ifindex as usize {
        return None;
    }
    if one_armed {
        let client_side = FlowKey {
            src: key.dst,
            dst: r.vip_addr,
            sport: key.dport,
            dport: r.vip_port,
            protocol: key.protocol,
            family: key.family,
            _pad: [0; 2],
        };
        if !nat::from_backend(ctx, NAT_FLOWS.get_ptr_mut(&client_side)) {
            return None;
        }
    }
    obs.packet(&key, 0);
    obs.nat_reply(&r);
    let pkt = Packet { flow: key, l3_len: icmp.l3_len, tos: icmp.tos, tcp_flags: 0, l4_off: icmp.l4_off };
    if let Some(done) = nat::last_hop(ctx, &pkt) {
        return Some(done);
    }
    // The backend's own error comes from the VIP; a router's keeps its address.
    let source = if icmp.src == key.src { &r.vip_addr } else { &icmp.src };
    let outer = Change { source: true, old: &icmp.src, new: source };
    let quoted = Change { source: false, old: &key.src, new: &r.vip_addr };
    if translate(ctx, &pkt, &outer, &quoted, key.sport, r.vip_port).is_none() {
        return Some((XDP_DROP, reasons::DROP_MALFORMED_L4));
    }
    Some(nat::to_client(ctx, &r, cfg).unwrap_or((XDP_DROP, reasons::DROP_MALFORMED_L4)))
}

/// Translates the error `pkt` (its `l4_off` the ICMP header's; its flow for
/// the family and the quoted protocol): the outer address and TTL, the
/// quoted address and port (`old_port` → `port`), every checksum. Checks
/// where the quote lies before it writes anything; None (the frame half
/// written only if the frame ends short of what was checked) if it cannot.
#[inline(always)]
fn translate(ctx: &XdpContext, pkt: &Packet, outer: &Change, quoted: &Change, old_port: u16, port: u16) -> Option<()> {
    let v4 = pkt.flow.family == FAMILY_V4;
    let q = quote(ctx, pkt, v4)?;
    let icmp_check = ptr_at::<u16>(ctx, pkt.l4_off + 2)?;
    let mut sum = rewrite_quote(ctx, &q, pkt, quoted, old_port, port)?;
    nat::rewrite_ip(ctx, v4, outer.source, outer.old, outer.new)?;
    if !v4 {
        // ICMPv6's checksum covers the outer addresses (its pseudo-header).
        sum = diff(sum, outer.old, outer.new, 4);
    }
    // SAFETY: ptr_at checked that the 2-byte checksum lies within the frame.
    unsafe {
        let old = icmp_check.read_unaligned();
        icmp_check.write_unaligned(!fold(!old as u32 + fold(sum) as u32));
    }
    Some(())
}

/// Where the quoted packet lies: its transport header's first 8 bytes must
/// lie within the ICMP message (RFC 792 and RFC 4443 quote at least them).
/// `icmp::classify` / `icmp::error_flow` checked that the message lies
/// within the frame and the quoted IP header's version and length.
#[inline(always)]
fn quote(ctx: &XdpContext, pkt: &Packet, v4: bool) -> Option<Quote> {
    let ip = pkt.l4_off + ICMP_HDR;
    if ip > MAX_QUOTE_OFF {
        return None;
    }
    let ihl = if v4 {
        let hdr = ptr_at::<Ipv4Hdr>(ctx, ip)?;
        // SAFETY: ptr_at checked that a whole IPv4 header lies within the frame.
        (unsafe { (*hdr).ver_ihl } & 0x0f) as usize * 4
    } else {
        40
    };
    let end = ETH_LEN + pkt.l3_len as usize;
    let l4 = ip + ihl;
    if l4 + 8 > end {
        return None;
    }
    Some(Quote { ip, l4, end })
}

/// Rewrites the quoted packet's address and port (`change`, `old_port` →
/// `port`) and fixes its IPv4 header checksum and its TCP/UDP checksum. A
/// transport checksum the quote cuts off is left as it is (Linux does the
/// same: nothing can be verified of it); an IPv4 UDP checksum of 0 stays 0.
/// Returns what the ICMP checksum's sum gains: every 16-bit word changed
/// lies at an even offset of the message, so the differences add up.
#[inline(always)]
fn rewrite_quote(ctx: &XdpContext, q: &Quote, pkt: &Packet, change: &Change, old_port: u16, port: u16) -> Option<u32> {
    let v4 = pkt.flow.family == FAMILY_V4;
    let words = if v4 { 1 } else { 4 };
    let mut sum = diff(0, change.old, change.new, words);
    if v4 {
        let a = ptr_at::<u32>(ctx, q.ip + if change.source { 12 } else { 16 })?;
        let check = ptr_at::<u16>(ctx, q.ip + 10)?;
        // SAFETY: ptr_at checked that the address and the checksum lie within the frame.
        unsafe {
            let old = check.read_unaligned();
            let new = !fold(diff(!old as u32, change.old, change.new, 1));
            a.write_unaligned(change.new[0]);
            check.write_unaligned(new);
            sum += !old as u32 + new as u32;
        }
    } else {
        let a = ptr_at::<[u32; 4]>(ctx, q.ip + if change.source { 8 } else { 24 })?;
        // SAFETY: ptr_at checked that the 16-byte address lies within the frame.
        unsafe { a.write_unaligned(*change.new) };
    }
    let p = ptr_at::<u16>(ctx, q.l4 + if change.source { 0 } else { 2 })?;
    // SAFETY: ptr_at checked that the 2-byte port lies within the frame.
    unsafe { p.write_unaligned(port) };
    sum += !old_port as u32 + port as u32;
    let udp = pkt.flow.protocol == PROTO_UDP;
    let check_off = if pkt.flow.protocol == PROTO_TCP { 16 } else { 6 };
    if q.l4 + check_off + 2 > q.end {
        return Some(sum);
    }
    let check = ptr_at::<u16>(ctx, q.l4 + check_off)?;
    // SAFETY: ptr_at checked that the 2-byte checksum lies within the frame.
    let old = unsafe { check.read_unaligned() };
    if udp && v4 && old == 0 {
        return Some(sum);
    }
    let mut new = !fold(diff(!old as u32, change.old, change.new, words) + !old_port as u32 + port as u32);
    if udp && new == 0 {
        new = 0xffff;
    }
    // SAFETY: as above.
    unsafe { check.write_unaligned(new) };
    Some(sum + !old as u32 + new as u32)
}
