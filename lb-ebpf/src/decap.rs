//! IP-in-IP decapsulation for backends (this kernel has no `ipip` driver):
//! strips the outer IPv4 or IPv6 header of IPv4/IPv6-in-IPv4/IPv6 packets
//! and passes the inner packet to the stack, which delivers it to the VIP
//! held on the backend's loopback. Everything else passes untouched.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, helpers::bpf_xdp_adjust_head, programs::XdpContext};

use crate::{
    maps::DECAP_STATS,
    parse::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPPROTO_IPIP, IPPROTO_IPV6, Ipv4Hdr, Ipv6Hdr, ptr_at},
};

const DECAPSULATED: u32 = 0;
const PASSED: u32 = 1;

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn decap(ctx: &XdpContext) -> u32 {
    match outer_header(ctx) {
        Some((strip, inner_type)) => {
            if strip_outer(ctx, strip, inner_type).is_some() {
                count(DECAPSULATED);
            } else {
                count(PASSED);
            }
        }
        None => count(PASSED),
    }
    XDP_PASS
}

/// For an IP-in-IP packet, the outer header's length and the inner EtherType.
#[inline(always)]
fn outer_header(ctx: &XdpContext) -> Option<(usize, u16)> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let (len, protocol) = match unsafe { (*eth).ether_type } {
        ETH_P_IP => {
            let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)? };
            // Fragmented outer packets are left for the stack.
            if ip.ver_ihl >> 4 != 4 || u16::from_be(ip.frag_off) & 0x3fff != 0 {
                return None;
            }
            ((ip.ver_ihl & 0x0f) as usize * 4, ip.protocol)
        }
        ETH_P_IPV6 => {
            let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)? };
            (core::mem::size_of::<Ipv6Hdr>(), ip.next_hdr)
        }
        _ => return None,
    };
    if len < 20 {
        return None;
    }
    match protocol {
        IPPROTO_IPIP => Some((len, ETH_P_IP)),
        IPPROTO_IPV6 => Some((len, ETH_P_IPV6)),
        _ => None,
    }
}

#[inline(always)]
fn strip_outer(ctx: &XdpContext, strip: usize, inner_type: u16) -> Option<()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let (dst, src) = unsafe { ((*eth).dst, (*eth).src) };
    // The inner header must be there before we commit to stripping.
    ptr_at::<[u8; 20]>(ctx, ETH_LEN + strip)?;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return None;
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
        (*eth).ether_type = inner_type;
    }
    Some(())
}
