//! IP-in-IP decapsulation for backends (this kernel has no `ipip` driver):
//! strips the outer IPv4 or IPv6 header of IPv4/IPv6-in-IPv4/IPv6 packets
//! and passes the inner packet to the stack, which delivers it to the VIP
//! held on the backend's loopback. Everything else passes untouched.
//!
//! `DECAP_FILTER` (set by `xdplb decap` at load time) may restrict which
//! outer sources are decapsulated (the balancers' `ipip_source_v4/v6`) and
//! which inner destinations (the VIPs): without it, anyone who can reach the
//! backend could have a packet delivered as if it came from any client.
//!
//! An IP-in-IP packet that is not decapsulated here (the filter refuses it,
//! or its inner header is cut) is dropped and counted "refused": passed,
//! a kernel `ipip` / `ip6tnl` device on the backend (tunl0 up, the usual
//! LVS-TUN setup) would decapsulate it anyway, past the filter. Everything
//! that is not IP-in-IP passes untouched and is not counted (it is the
//! backend's own traffic; the interface counters have it).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use lb_common::decap::{DECAP_F_SOURCES, DECAP_F_VIPS, DECAP_MAX_SOURCES, DECAP_MAX_VIPS, DecapFilter};

use crate::{
    maps::DECAP_STATS,
    parse::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPPROTO_IPIP, IPPROTO_IPV6, Ipv4Hdr, Ipv6Hdr, ptr_at},
};

/// `DECAP_STATS` slots. The map keeps its two slots (a running program's
/// layout); the second, once "passed untouched", counts refused IP-in-IP.
const DECAPSULATED: u32 = 0;
const REFUSED: u32 = 1;

/// What to decapsulate. Read-only data, written by `xdplb decap` before the
/// program is loaded (all zeros: everything, as before the filter existed).
#[unsafe(no_mangle)]
static DECAP_FILTER: DecapFilter = DecapFilter::ANY;

/// A field of `DECAP_FILTER`, read from the object's data at run time: a
/// plain read would be folded to the compile-time zeros.
#[inline(always)]
fn filter<T: Copy>(field: &T) -> T {
    // SAFETY: `field` points into DECAP_FILTER, a static that lives for the whole program.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot, only written by this CPU.
        unsafe { *c += 1 };
    }
}

/// The outer header of an IP-in-IP packet.
struct Outer {
    /// Its length: the bytes to strip.
    len: usize,
    /// The inner packet's EtherType.
    inner_type: u16,
    /// Whether the outer header is IPv6.
    v6: bool,
}

#[inline(always)]
pub fn decap(ctx: &XdpContext) -> u32 {
    let Some(outer) = outer_header(ctx) else {
        return XDP_PASS;
    };
    if allowed(ctx, &outer) == Some(true) && strip_outer(ctx, &outer).is_some() {
        count(DECAPSULATED);
        XDP_PASS
    } else {
        count(REFUSED);
        XDP_DROP
    }
}

/// For an IP-in-IP packet, its outer header.
#[inline(always)]
fn outer_header(ctx: &XdpContext) -> Option<Outer> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked that the header is inside the packet.
    let (len, protocol, v6) = match unsafe { (*eth).ether_type } {
        ETH_P_IP => {
            // SAFETY: as above.
            let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)? };
            // Fragmented outer packets are left for the stack.
            if ip.ver_ihl >> 4 != 4 || u16::from_be(ip.frag_off) & 0x3fff != 0 {
                return None;
            }
            ((ip.ver_ihl & 0x0f) as usize * 4, ip.protocol, false)
        }
        ETH_P_IPV6 => {
            // SAFETY: as above.
            let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)? };
            (core::mem::size_of::<Ipv6Hdr>(), ip.next_hdr, true)
        }
        _ => return None,
    };
    if len < 20 {
        return None;
    }
    match protocol {
        IPPROTO_IPIP => Some(Outer { len, inner_type: ETH_P_IP, v6 }),
        IPPROTO_IPV6 => Some(Outer { len, inner_type: ETH_P_IPV6, v6 }),
        _ => None,
    }
}

#[inline(always)]
fn word(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
}

/// Whether the filter lets this packet be decapsulated; None when the
/// headers it needs are not in the packet.
#[inline(always)]
fn allowed(ctx: &XdpContext, outer: &Outer) -> Option<bool> {
    let flags = filter(&DECAP_FILTER.flags);
    if flags & DECAP_F_SOURCES != 0 {
        let ok = if outer.v6 {
            // SAFETY: ptr_at checked that the header is inside the packet.
            let src = unsafe { (*ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)?).src };
            source_v6_allowed(&[word(&src, 0), word(&src, 1), word(&src, 2), word(&src, 3)])
        } else {
            // SAFETY: as above.
            let src = unsafe { (*ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)?).src };
            source_v4_allowed(word(&src, 0))
        };
        if !ok {
            return Some(false);
        }
    }
    if flags & DECAP_F_VIPS != 0 {
        let inner = ETH_LEN + outer.len;
        let ok = if outer.inner_type == ETH_P_IPV6 {
            // SAFETY: as above.
            let dst = unsafe { (*ptr_at::<Ipv6Hdr>(ctx, inner)?).dst };
            vip_v6_listed(&[word(&dst, 0), word(&dst, 1), word(&dst, 2), word(&dst, 3)])
        } else {
            // SAFETY: as above.
            let dst = unsafe { (*ptr_at::<Ipv4Hdr>(ctx, inner)?).dst };
            vip_v4_listed(word(&dst, 0))
        };
        if !ok {
            return Some(false);
        }
    }
    Some(true)
}

#[inline(always)]
fn source_v4_allowed(src: u32) -> bool {
    let n = filter(&DECAP_FILTER.sources_v4) as usize;
    for i in 0..DECAP_MAX_SOURCES {
        if i >= n {
            break;
        }
        let p = &DECAP_FILTER.source_v4[i];
        if src & filter(&p.mask) == filter(&p.addr) {
            return true;
        }
    }
    false
}

#[inline(always)]
fn source_v6_allowed(src: &[u32; 4]) -> bool {
    let n = filter(&DECAP_FILTER.sources_v6) as usize;
    for i in 0..DECAP_MAX_SOURCES {
        if i >= n {
            break;
        }
        let p = &DECAP_FILTER.source_v6[i];
        let (mask, addr) = (filter(&p.mask), filter(&p.addr));
        if (0..4).all(|w| src[w] & mask[w] == addr[w]) {
            return true;
        }
    }
    false
}

#[inline(always)]
fn vip_v4_listed(dst: u32) -> bool {
    let n = filter(&DECAP_FILTER.vips_v4) as usize;
    for i in 0..DECAP_MAX_VIPS {
        if i >= n {
            break;
        }
        if dst == filter(&DECAP_FILTER.vip_v4[i]) {
            return true;
        }
    }
    false
}

#[inline(always)]
fn vip_v6_listed(dst: &[u32; 4]) -> bool {
    let n = filter(&DECAP_FILTER.vips_v6) as usize;
    for i in 0..DECAP_MAX_VIPS {
        if i >= n {
            break;
        }
        if *dst == filter(&DECAP_FILTER.vip_v6[i]) {
            return true;
        }
    }
    false
}

#[inline(always)]
fn strip_outer(ctx: &XdpContext, outer: &Outer) -> Option<()> {
    let strip = outer.len;
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked that the header is inside the packet.
    let (dst, src) = unsafe { ((*eth).dst, (*eth).src) };
    // The inner header must be there before we commit to stripping.
    ptr_at::<[u8; 20]>(ctx, ETH_LEN + strip)?;
    // SAFETY: a helper call on this program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return None;
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked the new head, after the adjustment.
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
        (*eth).ether_type = outer.inner_type;
    }
    Some(())
}
