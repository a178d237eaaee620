//! ICMP to a VIP address: errors about a VIP's flow go to that flow's
//! backend (path-MTU discovery through DSR and IP-in-IP; NAT translates
//! them, in `nat_icmp`, which also reads `error_flow`), echo requests are
//! answered when a VIP on the address allows it, and an IP-in-IP packet too
//! big for the interface is answered with "fragmentation needed" / "packet
//! too big", as Katran does.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_csum_diff, bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    maps::{FAMILY_V4, FAMILY_V6, FlowKey, LbConfig, PROTO_TCP, PROTO_UDP, VIP_ADDR_F_ICMP_ECHO},
    reasons,
};

use crate::{
    addressed_to_us,
    encap::ipv4_checksum,
    maps::VIP_ADDRS,
    parse::{
        ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPPROTO_ICMP, IPPROTO_ICMPV6, Icmp, Ipv4Hdr, Ipv6Hdr, Packet, ptr_at,
        v4_words, v6_words,
    },
    trace::Observe,
};

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    /// Echo: identifier and sequence; errors: unused or the MTU.
    rest: [u8; 4],
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// What an ICMP message to a VIP address comes to.
pub enum Verdict {
    /// Handled here (answered, passed or dropped): the action and its reason.
    Done(u32, u32),
    /// An error about this flow (client → VIP, as the client sends it): to
    /// its backend, like the flow's own packets, but never tracked.
    Error(Packet),
    /// Not to a VIP address: maybe an error about a NAT connection from its
    /// backend's side (`nat_icmp::to_client`), else not ours.
    NotVipAddress,
}

/// Sorts an ICMP message. Anything not for a VIP address in a frame for
/// this interface passes untouched, as before; so do messages that are
/// not about a VIP's flow (the host's own traffic from the VIP address).
#[inline(always)]
pub fn classify(ctx: &XdpContext, icmp: &Icmp, obs: &mut impl Observe) -> Verdict {
    // SAFETY: a hash map lookup; the value is copied out at once.
    let Some(&on_addr) = (unsafe { VIP_ADDRS.get(icmp.dst) }) else {
        return Verdict::NotVipAddress;
    };
    if !addressed_to_us(ctx) {
        return Verdict::Done(XDP_PASS, reasons::PASS_NOT_VIP);
    }
    obs.vip_address(&icmp.dst);
    let Some((kind, code)) = header(ctx, icmp) else {
        return Verdict::Done(XDP_DROP, reasons::DROP_MALFORMED_L4);
    };
    let v4 = icmp.dst.family == FAMILY_V4;
    let echo = if v4 { kind == ICMP_ECHO_REQUEST } else { kind == ICMPV6_ECHO_REQUEST };
    if echo && code == 0 {
        if on_addr & VIP_ADDR_F_ICMP_ECHO == 0 {
            return Verdict::Done(XDP_PASS, reasons::PASS_VIP_OTHER_PROTO);
        }
        // RFC 1122 3.2.1.3, RFC 4443 2.2: never answer a group or broadcast.
        if !answerable(ctx, &icmp.src, v4) {
            return Verdict::Done(XDP_DROP, reasons::DROP_MALFORMED_L4);
        }
        let done = if v4 { echo_reply4(ctx, icmp) } else { echo_reply6(ctx, icmp) };
        return match done {
            Echo::Answered => Verdict::Done(XDP_TX, reasons::TX),
            Echo::NotPlain => Verdict::Done(XDP_PASS, reasons::PASS_VIP_OTHER_PROTO),
            Echo::Malformed => Verdict::Done(XDP_DROP, reasons::DROP_MALFORMED_L4),
        };
    }
    if !is_error(kind, v4) {
        return Verdict::Done(XDP_PASS, reasons::PASS_VIP_OTHER_PROTO);
    }
    let quoted = if v4 { quoted_flow4(ctx, icmp) } else { quoted_flow6(ctx, icmp) };
    match quoted {
        Quoted::Flow(flow) => {
            Verdict::Error(Packet { flow, l3_len: icmp.l3_len, tos: icmp.tos, tcp_flags: 0, l4_off: icmp.l4_off })
        }
        Quoted::NotOurs => Verdict::Done(XDP_PASS, reasons::PASS_VIP_OTHER_PROTO),
        Quoted::Malformed => Verdict::Done(XDP_DROP, reasons::DROP_MALFORMED_L4),
    }
}

/// The message's type and code, if its IP packet is whole (within the
/// frame) and its ICMP header inside it: an answer or a forwarded error
/// carries the packet's own length, which must be true.
#[inline(always)]
fn header(ctx: &XdpContext, icmp: &Icmp) -> Option<(u8, u8)> {
    let hdr = ptr_at::<IcmpHdr>(ctx, icmp.l4_off)?;
    let in_frame = (ctx.data_end() - ctx.data()).saturating_sub(ETH_LEN);
    let header_end = icmp.l4_off - ETH_LEN + core::mem::size_of::<IcmpHdr>();
    if icmp.l3_len as usize > in_frame || (icmp.l3_len as usize) < header_end {
        return None;
    }
    // SAFETY: ptr_at checked that the 8-byte ICMP header lies within the frame.
    Some(unsafe { ((*hdr).kind, (*hdr).code) })
}

/// Whether the type is an error we follow: destination unreachable, time
/// exceeded, and (IPv6) packet too big.
#[inline(always)]
fn is_error(kind: u8, v4: bool) -> bool {
    if v4 {
        matches!(kind, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
    } else {
        matches!(kind, ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED)
    }
}

/// For an ICMP error to any address: the flow its quoted packet belongs
/// to, reversed as `Quoted::Flow` has it (the quoted packet's source must
/// be the error's destination). None for anything else, malformed or not.
#[inline(always)]
pub fn error_flow(ctx: &XdpContext, icmp: &Icmp) -> Option<FlowKey> {
    let (kind, _) = header(ctx, icmp)?;
    let v4 = icmp.dst.family == FAMILY_V4;
    if !is_error(kind, v4) {
        return None;
    }
    match if v4 { quoted_flow4(ctx, icmp) } else { quoted_flow6(ctx, icmp) } {
        Quoted::Flow(flow) => Some(flow),
        Quoted::NotOurs | Quoted::Malformed => None,
    }
}

enum Quoted {
    /// The client → VIP flow the quoted VIP → client packet belongs to.
    Flow(FlowKey),
    /// Not a TCP/UDP packet from this address (or a non-first fragment):
    /// no VIP flow to map it to.
    NotOurs,
    /// The quoted header is truncated or invalid.
    Malformed,
}

/// The quoted packet's ports: RFC 792 and RFC 4443 quote at least the
/// first 8 bytes of the transport header.
#[repr(C)]
struct QuotedPorts {
    sport: u16,
    dport: u16,
    _rest: [u16; 2],
}

#[inline(always)]
fn quoted_flow4(ctx: &XdpContext, icmp: &Icmp) -> Quoted {
    let q = icmp.l4_off + core::mem::size_of::<IcmpHdr>();
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, q) else { return Quoted::Malformed };
    // SAFETY: ptr_at checked that a whole IPv4 header lies within the frame.
    let ip = unsafe { &*ip };
    let ihl = (ip.ver_ihl & 0x0f) as usize * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < 20 {
        return Quoted::Malformed;
    }
    let src = v4_words(&ip.src);
    if (ip.protocol != PROTO_TCP && ip.protocol != PROTO_UDP)
        || src != icmp.dst.addr
        || u16::from_be(ip.frag_off) & 0x1fff != 0
    {
        return Quoted::NotOurs;
    }
    let Some(ports) = ptr_at::<QuotedPorts>(ctx, q + ihl) else { return Quoted::Malformed };
    // SAFETY: ptr_at checked the 8 bytes.
    let (sport, dport) = unsafe { ((*ports).sport, (*ports).dport) };
    Quoted::Flow(FlowKey {
        src: v4_words(&ip.dst),
        dst: src,
        sport: dport,
        dport: sport,
        protocol: ip.protocol,
        family: FAMILY_V4,
        _pad: [0; 2],
    })
}

/// Extension headers in the quoted IPv6 packet are not walked: a backend's
/// reply to a VIP client carries none.
#[inline(always)]
fn quoted_flow6(ctx: &XdpContext, icmp: &Icmp) -> Quoted {
    let q = icmp.l4_off + core::mem::size_of::<IcmpHdr>();
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, q) else { return Quoted::Malformed };
    // SAFETY: ptr_at checked that a whole IPv6 header lies within the frame.
    let ip = unsafe { &*ip };
    if ip.vtc_flow[0] >> 4 != 6 {
        return Quoted::Malformed;
    }
    let src = v6_words(&ip.src);
    if (ip.next_hdr != PROTO_TCP && ip.next_hdr != PROTO_UDP) || src != icmp.dst.addr {
        return Quoted::NotOurs;
    }
    let Some(ports) = ptr_at::<QuotedPorts>(ctx, q + core::mem::size_of::<Ipv6Hdr>()) else {
        return Quoted::Malformed;
    };
    // SAFETY: ptr_at checked the 8 bytes.
    let (sport, dport) = unsafe { ((*ports).sport, (*ports).dport) };
    Quoted::Flow(FlowKey {
        src: v6_words(&ip.dst),
        dst: src,
        sport: dport,
        dport: sport,
        protocol: ip.next_hdr,
        family: FAMILY_V6,
        _pad: [0; 2],
    })
}

/// RFC 1624: the checksum `check` after a 16-bit word of what it covers
/// changed from `old` to `new` (all as read from the packet).
#[inline(always)]
fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u64 + !old as u64 + new as u64)
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    // Three folds bring any sum of a few 32-bit values to 16 bits; a fixed
    // count keeps the verifier from seeing a loop.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Whether a packet's sender may get an answer: its source MAC and its
/// source address are unicast. A multicast or broadcast source (or the
/// unspecified or loopback address, which no packet on a wire may carry)
/// is never answered: the answer would go to a group, or to nobody.
#[inline(always)]
fn answerable(ctx: &XdpContext, src: &[u32; 4], v4: bool) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return false };
    // SAFETY: ptr_at checked that a whole Ethernet header lies within the frame.
    if unsafe { (*eth).src[0] } & 1 != 0 {
        return false;
    }
    let first = src[0].to_ne_bytes()[0];
    if v4 {
        // 0/8 "this network", 127/8 loopback, 224/4 multicast, 240/4
        // reserved with 255.255.255.255 (broadcast).
        !(first == 0 || first == 127 || first >= 224)
    } else {
        // ff00::/8 multicast, :: unspecified, ::1 loopback.
        !(first == 0xff || *src == [0; 4] || *src == [0, 0, 0, 1u32.to_be()])
    }
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Option<()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked that a whole Ethernet header lies within the frame.
    unsafe { core::mem::swap(&mut (*eth).dst, &mut (*eth).src) };
    Some(())
}

/// The reply's TTL / hop limit, as Linux's default.
const REPLY_TTL: u8 = 64;

enum Echo {
    Answered,
    /// IPv4 options or IPv6 extension headers: the reply would have to
    /// handle them (reverse a source route, ...); the host's stack does.
    NotPlain,
    Malformed,
}

/// Echo reply: the request with its addresses and MACs swapped, type 0, a
/// fresh TTL. Swapping addresses leaves every checksum as it was; the TTL
/// (IPv4 header) and the type (ICMP) change one word each.
///
/// Whether the header is plain is read from it here, not from `l4_off`:
/// knowing `l4_off` exactly lets LLVM drop the IP header's bounds check
/// below as implied by the ICMP header's, which the verifier then refuses.
#[inline(always)]
fn echo_reply4(ctx: &XdpContext, icmp: &Icmp) -> Echo {
    let (Some(ip), Some(hdr)) = (ptr_at::<Ipv4Hdr>(ctx, ETH_LEN), ptr_at::<IcmpHdr>(ctx, icmp.l4_off)) else {
        return Echo::Malformed;
    };
    // SAFETY: ptr_at checked both headers; nothing else holds a reference to them.
    unsafe {
        let (ip, hdr) = (&mut *ip, &mut *hdr);
        if ip.ver_ihl != 0x45 {
            return Echo::NotPlain;
        }
        core::mem::swap(&mut ip.src, &mut ip.dst);
        let old = u16::from_ne_bytes([ip.ttl, ip.protocol]);
        ip.ttl = REPLY_TTL;
        ip.check = csum_replace(ip.check, old, u16::from_ne_bytes([ip.ttl, ip.protocol]));
        let old = u16::from_ne_bytes([hdr.kind, hdr.code]);
        hdr.kind = ICMP_ECHO_REPLY;
        hdr.check = csum_replace(hdr.check, old, u16::from_ne_bytes([hdr.kind, hdr.code]));
    }
    match swap_macs(ctx) {
        Some(()) => Echo::Answered,
        None => Echo::Malformed,
    }
}

/// As `echo_reply4`; the ICMPv6 checksum also covers the addresses (its
/// pseudo-header), whose swap does not change the sum; the hop limit is not covered.
#[inline(always)]
fn echo_reply6(ctx: &XdpContext, icmp: &Icmp) -> Echo {
    let (Some(ip), Some(hdr)) = (ptr_at::<Ipv6Hdr>(ctx, ETH_LEN), ptr_at::<IcmpHdr>(ctx, icmp.l4_off)) else {
        return Echo::Malformed;
    };
    // SAFETY: ptr_at checked both headers; nothing else holds a reference to them.
    unsafe {
        let (ip, hdr) = (&mut *ip, &mut *hdr);
        if ip.next_hdr != IPPROTO_ICMPV6 {
            return Echo::NotPlain;
        }
        core::mem::swap(&mut ip.src, &mut ip.dst);
        ip.hop_limit = REPLY_TTL;
        let old = u16::from_ne_bytes([hdr.kind, hdr.code]);
        hdr.kind = ICMPV6_ECHO_REPLY;
        hdr.check = csum_replace(hdr.check, old, u16::from_ne_bytes([hdr.kind, hdr.code]));
    }
    match swap_macs(ctx) {
        Some(()) => Echo::Answered,
        None => Echo::Malformed,
    }
}

/// "Fragmentation needed" / "packet too big" answers the whole balancer
/// sends at most in a second, over all CPUs (one victim of spoofed
/// sources gets no more than this; Linux's own default is 1000 ICMP
/// messages a second for the whole host).
pub const TOO_BIG_PER_SEC: u64 = 100;

/// The answers sent in the current second: the second's number (the
/// monotonic coarse clock in whole seconds, 32 bits) in the high half, the
/// count in the low half, in one word so that one store moves both. Shared
/// by all CPUs. A global variable (the object's .bss, which aya loads as a
/// map of its own, never pinned: a restart forgets it), not a new pinned
/// map: a running dataplane's pinned maps stay as they are.
static mut TOO_BIG_SENT: u64 = 0;

/// Whether one more answer fits this second's budget.
///
/// This build targets BPF v1 (bpf-linker's `--cpu generic`), where LLVM
/// has an atomic add but neither a fetching add nor a compare-and-swap
/// (those are v3; `core::sync::atomic` offers none on this target). So:
/// an atomic add, then a read. Within a second that is exact: the k-th
/// add reads a count of k or more, so only the first `TOO_BIG_PER_SEC`
/// adds can pass. A new second is opened by a plain store of (second, 1)
/// by the CPU that first sees it; CPUs that see the old second at the very
/// same moment each store it, and each such store can let up to the limit
/// through again: at most the limit times the CPUs racing at the turn,
/// never more. Over the limit the word is only read, so a flood does not
/// make every CPU write one cache line.
#[inline(always)]
fn too_big_allowed() -> bool {
    // SAFETY: a helper without arguments.
    let second = (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) & 0xffff_ffff;
    let word = core::ptr::addr_of_mut!(TOO_BIG_SENT);
    // SAFETY: an aligned u64 of this object's .bss; BPF's 64-bit loads and
    // stores are single instructions, never torn.
    let seen = unsafe { core::ptr::read_volatile(word) };
    if seen >> 32 == second {
        if seen & 0xffff_ffff >= TOO_BIG_PER_SEC {
            return false;
        }
        // SAFETY: as above; the add is one atomic instruction (BPF_ATOMIC | BPF_ADD).
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(word, 1) };
        // SAFETY: as above.
        let now = unsafe { core::ptr::read_volatile(word) };
        return now >> 32 == second && now & 0xffff_ffff <= TOO_BIG_PER_SEC;
    }
    // Only forward: a CPU whose clock read lags must not take the word
    // back a second (and so open that second again).
    if second < seen >> 32 {
        return false;
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(word, (second << 32) | 1) };
    true
}

/// How much of the original packet the answer quotes: as much as fits the
/// size every host must accept (RFC 1812 4.3.2.3: 576 bytes; RFC 4443 2.4:
/// the IPv6 minimum MTU, 1280).
const QUOTE4: usize = 576 - 20 - 8;
const QUOTE6: usize = 1280 - 40 - 8;
/// RFC 8200 5: every IPv6 link carries 1280 bytes; a smaller "packet too
/// big" MTU is ignored by the hosts that get it.
const IPV6_MIN_MTU: u32 = 1280;

/// Answers an IP-in-IP packet that the outer header would take beyond the
/// interface MTU: the client is told the MTU that fits (interface MTU minus
/// the outer header) in an ICMP message from the VIP address, sent back
/// with XDP_TX. The original is dropped, so the reason is `drop_too_big`
/// either way. An IPv4 packet without DF is answered too: XDP cannot
/// fragment it (as Katran). Not answered (dropped): over the rate limit;
/// shorter than the quote (an interface MTU below 576 / 1280); from a
/// multicast or broadcast source (`answerable`); IPv6 when the MTU that
/// fits is below 1280, which hosts ignore (RFC 8201 4) — telling them 1280
/// would be a lie, so nothing is said (the doctor's `ipip-mtu` reports it).
/// The caller has checked that the packet's IP length is the frame's.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, cfg: &LbConfig) -> (u32, u32) {
    let sent = if pkt.flow.family == FAMILY_V4 { too_big4(ctx, pkt, cfg) } else { too_big6(ctx, pkt, cfg) };
    match sent {
        Some(()) => (XDP_TX, reasons::DROP_TOO_BIG),
        None => (XDP_DROP, reasons::DROP_TOO_BIG),
    }
}

/// Grows the frame's head by `grow` bytes and cuts it to `len` bytes.
#[inline(always)]
fn reshape(ctx: &XdpContext, grow: usize, len: usize) -> Option<()> {
    // SAFETY: the helper checks the headroom itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    let delta = len as i64 - (ctx.data_end() - ctx.data()) as i64;
    // SAFETY: a shrink (delta <= 0, see the callers' length checks) the helper bounds itself.
    if delta > 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return None;
    }
    Some(())
}

/// Adds the bytes at `off ..+ N` (N a multiple of 4, at most 512) of the
/// frame to the checksum `seed`.
#[inline(always)]
fn csum_add<const N: usize>(ctx: &XdpContext, off: usize, seed: u32) -> Option<u32> {
    let p = ptr_at::<[u8; N]>(ctx, off)?;
    // SAFETY: ptr_at checked that the N bytes lie within the frame; the helper only reads them.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, N as u32, seed) };
    if sum < 0 { None } else { Some(sum as u32) }
}

#[inline(always)]
fn too_big4(ctx: &XdpContext, pkt: &Packet, cfg: &LbConfig) -> Option<()> {
    const HDRS: usize = 20 + 8;
    if (pkt.l3_len as usize) < QUOTE4
        || ctx.data() + ETH_LEN + QUOTE4 > ctx.data_end()
        || !answerable(ctx, &pkt.flow.src, true)
        || !too_big_allowed()
    {
        return None;
    }
    let client_mac = {
        let eth = ptr_at::<EthHdr>(ctx, 0)?;
        // SAFETY: ptr_at checked that a whole Ethernet header lies within the frame.
        unsafe { (*eth).src }
    };
    reshape(ctx, HDRS, ETH_LEN + HDRS + QUOTE4)?;
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)?;
    let icmp = ptr_at::<IcmpHdr>(ctx, ETH_LEN + 20)?;
    let mut hdr = Ipv4Hdr {
        ver_ihl: 0x45,
        tos: 0,
        tot_len: ((HDRS + QUOTE4) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: REPLY_TTL,
        protocol: IPPROTO_ICMP,
        check: 0,
        src: pkt.flow.dst[0].to_ne_bytes(),
        dst: pkt.flow.src[0].to_ne_bytes(),
    };
    hdr.check = ipv4_checksum(&hdr);
    let mtu = (cfg.mtu.saturating_sub(20) as u16).to_be_bytes();
    // SAFETY: ptr_at checked each header after the frame was reshaped.
    unsafe {
        (*eth).dst = client_mac;
        (*eth).src = cfg.if_mac;
        (*eth).ether_type = ETH_P_IP;
        *ip = hdr;
        *icmp = IcmpHdr { kind: ICMP_DEST_UNREACH, code: ICMP_FRAG_NEEDED, check: 0, rest: [0, 0, mtu[0], mtu[1]] };
    }
    // The ICMP message: its header and the quote, 556 bytes.
    let at = ETH_LEN + 20;
    let sum = csum_add::<512>(ctx, at, 0)?;
    let sum = csum_add::<{ 8 + QUOTE4 - 512 }>(ctx, at + 512, sum)?;
    // SAFETY: as above.
    unsafe { (*icmp).check = !fold(sum as u64) };
    Some(())
}

#[inline(always)]
fn too_big6(ctx: &XdpContext, pkt: &Packet, cfg: &LbConfig) -> Option<()> {
    const HDRS: usize = 40 + 8;
    if (pkt.l3_len as usize) < QUOTE6
        || cfg.mtu < IPV6_MIN_MTU + 40
        || ctx.data() + ETH_LEN + QUOTE6 > ctx.data_end()
        || !answerable(ctx, &pkt.flow.src, false)
        || !too_big_allowed()
    {
        return None;
    }
    let client_mac = {
        let eth = ptr_at::<EthHdr>(ctx, 0)?;
        // SAFETY: ptr_at checked that a whole Ethernet header lies within the frame.
        unsafe { (*eth).src }
    };
    reshape(ctx, HDRS, ETH_LEN + HDRS + QUOTE6)?;
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)?;
    let icmp = ptr_at::<IcmpHdr>(ctx, ETH_LEN + 40)?;
    let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
    for i in 0..4 {
        src[i * 4..i * 4 + 4].copy_from_slice(&pkt.flow.dst[i].to_ne_bytes());
        dst[i * 4..i * 4 + 4].copy_from_slice(&pkt.flow.src[i].to_ne_bytes());
    }
    let hdr = Ipv6Hdr {
        vtc_flow: [0x60, 0, 0, 0],
        payload_len: ((8 + QUOTE6) as u16).to_be(),
        next_hdr: IPPROTO_ICMPV6,
        hop_limit: REPLY_TTL,
        src,
        dst,
    };
    // SAFETY: ptr_at checked each header after the frame was reshaped.
    unsafe {
        (*eth).dst = client_mac;
        (*eth).src = cfg.if_mac;
        (*eth).ether_type = ETH_P_IPV6;
        *ip = hdr;
        *icmp =
            IcmpHdr { kind: ICMPV6_PACKET_TOO_BIG, code: 0, check: 0, rest: cfg.mtu.saturating_sub(40).to_be_bytes() };
    }
    // The pseudo-header (addresses from the packet, then the length and
    // next header as they would be read from memory), then the message:
    // its header and the quote, 1240 bytes.
    let at = ETH_LEN + 40;
    let sum = csum_add::<32>(ctx, ETH_LEN + 8, 0)?;
    let sum = csum_add::<512>(ctx, at, sum)?;
    let sum = csum_add::<512>(ctx, at + 512, sum)?;
    let sum = csum_add::<{ 8 + QUOTE6 - 1024 }>(ctx, at + 1024, sum)?;
    let pseudo = ((8 + QUOTE6) as u16).to_be() as u64 + (IPPROTO_ICMPV6 as u16).to_be() as u64;
    // SAFETY: as above.
    unsafe { (*icmp).check = !fold(sum as u64 + pseudo) };
    Some(())
}
