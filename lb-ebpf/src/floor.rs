//! The benchmarks' floor program: parse Ethernet, IPv4/IPv6 and the TCP
//! header, swap the MACs, transmit. `cargo xtask bench` reports every xdplb
//! path as a ratio to this.

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    programs::XdpContext,
};

use crate::parse::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, Ipv4Hdr, Ipv6Hdr, ptr_at};

#[inline(always)]
pub fn floor(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return XDP_PASS };
    let l4 = match unsafe { (*eth).ether_type } {
        ETH_P_IP => match ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) {
            Some(ip) => ETH_LEN + (unsafe { (*ip).ver_ihl } & 0x0f) as usize * 4,
            None => return XDP_PASS,
        },
        ETH_P_IPV6 => match ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) {
            Some(_) => ETH_LEN + core::mem::size_of::<Ipv6Hdr>(),
            None => return XDP_PASS,
        },
        _ => return XDP_PASS,
    };
    if ptr_at::<[u8; 20]>(ctx, l4).is_none() {
        return XDP_PASS;
    }
    unsafe {
        let dst = (*eth).dst;
        (*eth).dst = (*eth).src;
        (*eth).src = dst;
    }
    XDP_TX
}
