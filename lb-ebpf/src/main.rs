//! The xdplb dataplane: one eBPF object with six XDP programs.
//!
//! - `xdplb_balancer`: parse → is it a VIP → flow lookup → choose backend →
//!   rewrite (DSR, IP-in-IP, NAT) → count → XDP_TX or XDP_REDIRECT. With NAT
//!   it also translates backends' replies back. ICMP errors about a VIP's
//!   flow follow it to its backend (NAT translates them, both ways: see
//!   `nat_icmp`); echo requests to a VIP address are answered (see `icmp`).
//!   Anything else leaves with XDP_PASS, untouched.
//! - `xdplb_traced`: the same balancer, reporting every packet's decision and
//!   frame to `xdplb trace`, which swaps it into the link while it runs.
//! - `xdplb_decap`: strips the IP-in-IP header on a backend.
//! - `xdplb_pass`: XDP_PASS, for the peer of a veth we transmit on (a veth
//!   drops XDP_TX frames unless its peer has an XDP program).
//! - `xdplb_bench_floor`: the benchmarks' reference, never attached.
//! - `xdplb_bench_restore`: the benchmarks' wrapper that restores a
//!   rewritten frame (in flood mode, with another source each run) before
//!   tail-calling the program measured, never attached.
#![no_std]
#![no_main]
// Atomic read-modify-write on a global (`icmp`'s rate limit): see there.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod bench_restore;
mod conntrack;
mod decap;
mod encap;
mod floor;
mod icmp;
mod maps;
mod nat;
mod nat_icmp;
mod parse;
mod trace;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{
    flow_hash,
    maps::{
        AddrKey, BACKEND_ACTIVE, Backend, CFG_NAT, FAMILY_V4, FWD_IPIP, FWD_NAT, LbConfig, NO_BACKEND,
        VIP_F_HASH_SOURCE_IP, VIP_F_PASS_WHEN_EMPTY, VipKey, VipMeta,
    },
    reasons,
};

use crate::{
    encap::EncapError,
    maps::{BACKEND_STATS, CONFIG, MAGLEV_POOL, VIP_ADDRS, VIP_STATS, VIPS, backend, count_bytes, count_reason},
    parse::{Packet, Parsed},
    trace::{Observe, Untraced},
};

#[xdp]
pub fn xdplb_balancer(ctx: XdpContext) -> u32 {
    let (action, reason) = balance(&ctx, &mut Untraced);
    count_reason(reason);
    action
}

/// The balancer with its decision written out (`xdplb trace`).
#[xdp]
pub fn xdplb_traced(ctx: XdpContext) -> u32 {
    let mut traced = trace::Traced::start();
    let (action, reason) = balance(&ctx, &mut traced);
    count_reason(reason);
    trace::emit(&ctx, action, reason, traced);
    action
}

#[xdp]
pub fn xdplb_decap(ctx: XdpContext) -> u32 {
    decap::decap(&ctx)
}

#[xdp]
pub fn xdplb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The benchmarks' floor: the least any forwarding XDP program does (parse
/// Ethernet + IP + TCP, swap MACs, XDP_TX). Not used for traffic.
#[xdp]
pub fn xdplb_bench_floor(ctx: XdpContext) -> u32 {
    floor::floor(&ctx)
}

/// The benchmarks' wrapper: restores the frame, then tail-calls the program
/// measured (see `bench_restore`). Not used for traffic.
#[xdp]
pub fn xdplb_bench_restore(ctx: XdpContext) -> u32 {
    bench_restore::restore(&ctx)
}

/// Returns the action and the one reason counted for it; tells `obs` how
/// it got there.
#[inline(always)]
fn balance<O: Observe>(ctx: &XdpContext, obs: &mut O) -> (u32, u32) {
    // An ICMP error about a VIP's flow is balanced as that flow, untracked:
    // `track` is false for it.
    let (pkt, track) = match parse::parse(ctx) {
        Parsed::Packet(p) => (p, true),
        Parsed::Icmp(i) => match icmp::classify(ctx, &i, obs) {
            icmp::Verdict::Error(p) => (p, false),
            icmp::Verdict::Done(action, reason) => return (action, reason),
            // Maybe an error about a NAT connection, from its backend's side.
            icmp::Verdict::NotVipAddress => {
                return nat_icmp::to_client(ctx, &i, obs).unwrap_or((XDP_PASS, reasons::PASS_NOT_VIP));
            }
        },
        Parsed::NotIp => return (XDP_PASS, reasons::PASS_NOT_VIP),
        Parsed::MalformedL3 => return (XDP_PASS, reasons::PASS_MALFORMED_L3),
        Parsed::Fragment(dst) => return for_vip_address(ctx, &dst, XDP_DROP, reasons::DROP_FRAGMENT, obs),
        Parsed::OtherProto(dst) => return for_vip_address(ctx, &dst, XDP_PASS, reasons::PASS_VIP_OTHER_PROTO, obs),
        Parsed::MalformedL4(dst) => return for_vip_address(ctx, &dst, XDP_DROP, reasons::DROP_MALFORMED_L4, obs),
    };
    obs.packet(&pkt.flow, pkt.tcp_flags);
    let vip_key =
        VipKey { addr: pkt.flow.dst, port: pkt.flow.dport, protocol: pkt.flow.protocol, family: pkt.flow.family };
    let Some(vip) = (unsafe { VIPS.get(&vip_key) }) else {
        if !track {
            // About the host's own traffic from a VIP address.
            return (XDP_PASS, reasons::PASS_VIP_OTHER_PROTO);
        }
        // Maybe a reply of a NAT connection, coming back from a backend.
        if let Some(cfg) = CONFIG.get(0)
            && cfg.flags & CFG_NAT != 0
            && let Some(done) = nat::reply(ctx, &pkt, cfg, obs)
        {
            return done;
        }
        return (XDP_PASS, reasons::PASS_NOT_VIP);
    };
    // A frame for another host's MAC (flooded by a switch whose table missed,
    // or seen in promiscuous mode) is that host's to serve: forwarding it here
    // too would give the backend a duplicate.
    if !addressed_to_us(ctx) {
        return (XDP_PASS, reasons::PASS_NOT_VIP);
    }
    // Copy: the controller may replace the element while we run.
    let vip = *vip;
    let Some(cfg) = CONFIG.get(0) else {
        return (XDP_DROP, reasons::DROP_BAD_BACKEND);
    };
    obs.vip(&vip_key, &vip);
    if !track && vip.forwarding == FWD_NAT {
        // About a reply of a NAT connection: to its backend, translated.
        return nat_icmp::to_backend(ctx, &pkt, vip.vip_id, obs);
    }
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    count_bytes(&VIP_STATS, vip.vip_id, frame_len);

    // Before the flow is tracked: a packet that cannot be sent opens no flow.
    if vip.forwarding == FWD_IPIP {
        // The outer header carries the inner length, and a "too big" answer
        // quotes it: a length beyond the frame is a lie, dropped before the
        // MTU is judged by it (never answered: no reply to a malformed packet).
        if pkt.l3_len as u64 > frame_len.saturating_sub(parse::ETH_LEN as u64) {
            return (XDP_DROP, reasons::DROP_MALFORMED_L4);
        }
        if exceeds_mtu(&pkt, cfg) {
            // Never an ICMP error about an ICMP error (RFC 1122 3.2.2).
            return if track { icmp::too_big(ctx, &pkt, cfg) } else { (XDP_DROP, reasons::DROP_TOO_BIG) };
        }
    }
    let chosen = if vip.forwarding == FWD_NAT {
        let new_connection = pkt.tcp_flags & (parse::TCP_SYN | parse::TCP_ACK) == parse::TCP_SYN;
        if let Some(done) = nat::last_hop(ctx, &pkt) {
            return done;
        }
        let client_mac = match parse::ptr_at::<parse::EthHdr>(ctx, 0) {
            Some(eth) => unsafe { (*eth).src },
            None => return (XDP_DROP, reasons::DROP_MALFORMED_L4),
        };
        let hash = || vip_hash(&vip, &pkt.flow, cfg);
        nat::choose_backend(ctx, &pkt, &vip, hash, new_connection, client_mac, obs).map(|(id, b)| (id, b, 0))
    } else {
        conntrack::choose_backend(&pkt.flow, &vip, cfg, pkt.tcp_flags, track, obs)
    };
    let (backend_id, backend, hash) = match chosen {
        Ok(b) => b,
        Err(reasons::DROP_NO_BACKEND) if vip.flags & VIP_F_PASS_WHEN_EMPTY != 0 => {
            return (XDP_PASS, reasons::PASS_ALL_DOWN);
        }
        Err(reason) => return (XDP_DROP, reason),
    };
    obs.backend(backend_id, &backend);
    count_bytes(&BACKEND_STATS, backend_id, frame_len);
    forward(ctx, &pkt, &vip, &backend, cfg, hash)
}

/// The hash Maglev places `flow` of `vip` by (computed only when needed: a
/// tracked flow carries its hash). Always inlined: as a function of its own
/// it is a BPF call whose frame adds to the balancer's, near the verifier's
/// 512 bytes.
#[inline(always)]
pub(crate) fn vip_hash(vip: &VipMeta, flow: &lb_common::maps::FlowKey, cfg: &LbConfig) -> u32 {
    let seed = &cfg.hash_seed;
    if vip.flags & VIP_F_HASH_SOURCE_IP != 0 {
        flow_hash::source_ip(seed, &flow.src)
    } else {
        flow_hash::five_tuple(seed, &flow.src, &flow.dst, flow.sport, flow.dport, flow.protocol)
    }
}

/// Whether the frame's destination MAC is the interface's own (CONFIG's
/// `if_mac`), compared as a word and a half-word.
#[inline(always)]
pub(crate) fn addressed_to_us(ctx: &XdpContext) -> bool {
    let (Some(cfg), Some(eth)) = (CONFIG.get(0), parse::ptr_at::<parse::EthHdr>(ctx, 0)) else {
        return false;
    };
    // SAFETY: ptr_at checked that a whole Ethernet header lies within the frame.
    let d = unsafe { (*eth).dst };
    let m = cfg.if_mac;
    u32::from_ne_bytes([d[0], d[1], d[2], d[3]]) == u32::from_ne_bytes([m[0], m[1], m[2], m[3]])
        && u16::from_ne_bytes([d[4], d[5]]) == u16::from_ne_bytes([m[4], m[5]])
}

/// A packet we could not balance: dropped (and counted) if it is addressed to
/// a VIP address in a frame for this interface, passed untouched otherwise
/// (the host it is for judges it).
#[inline(always)]
fn for_vip_address(ctx: &XdpContext, dst: &AddrKey, action: u32, reason: u32, obs: &mut impl Observe) -> (u32, u32) {
    // SAFETY: a hash map lookup; the value is only tested for presence.
    if unsafe { VIP_ADDRS.get(dst) }.is_some() && addressed_to_us(ctx) {
        obs.vip_address(dst);
        (action, reason)
    } else {
        (XDP_PASS, reasons::PASS_NOT_VIP)
    }
}

/// Counts how the connection table answered, and tells `obs`.
#[inline(always)]
pub(crate) fn count_conntrack(reason: u32, obs: &mut impl Observe) {
    count_reason(reason);
    obs.conntrack(reason);
}

/// The backend in the VIP's Maglev table slot for `hash`.
#[inline(always)]
pub(crate) fn maglev_pick(vip: &VipMeta, hash: u32, obs: &mut impl Observe) -> Result<(u32, Backend), u32> {
    if vip.ring_size == 0 {
        return Err(reasons::DROP_NO_BACKEND);
    }
    let index = hash % vip.ring_size;
    obs.maglev(hash, index);
    let slot = vip.ring_offset + index;
    let Some(&id) = MAGLEV_POOL.get(slot) else {
        return Err(reasons::DROP_BAD_BACKEND);
    };
    if id == NO_BACKEND {
        return Err(reasons::DROP_NO_BACKEND);
    }
    let Some(b) = backend(id) else {
        return Err(reasons::DROP_BAD_BACKEND);
    };
    // The controller takes a backend out of the table before it marks it
    // anything but active; an inactive one here means a torn update.
    if b.state != BACKEND_ACTIVE {
        return Err(reasons::DROP_BAD_BACKEND);
    }
    Ok((id, *b))
}

/// Whether IP-in-IP would take the packet beyond the interface MTU.
#[inline(always)]
fn exceeds_mtu(pkt: &Packet, cfg: &LbConfig) -> bool {
    let overhead = if pkt.flow.family == FAMILY_V4 { 20 } else { 40 };
    cfg.mtu != 0 && pkt.l3_len + overhead > cfg.mtu
}

#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet, vip: &VipMeta, backend: &Backend, cfg: &LbConfig, hash: u32) -> (u32, u32) {
    if vip.forwarding == FWD_NAT {
        return nat::forward(ctx, pkt, backend, cfg);
    }
    let result = if vip.forwarding == FWD_IPIP {
        // The length (against the frame) and the MTU were checked before
        // the flow was tracked, in `balance`.
        if pkt.flow.family == FAMILY_V4 {
            encap::ipip4(ctx, backend, cfg, pkt.l3_len, pkt.tos, hash)
        } else {
            encap::ipip6(ctx, backend, cfg, pkt.l3_len, pkt.tos, hash)
        }
    } else {
        encap::rewrite_macs(ctx, backend, cfg)
    };
    match result {
        Ok(()) => (XDP_TX, reasons::TX),
        Err(EncapError::AdjustHead) | Err(EncapError::Bounds) => (XDP_DROP, reasons::DROP_ENCAP_FAILED),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
