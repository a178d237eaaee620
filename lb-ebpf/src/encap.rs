//! Rewrites for the forwarding modes: DSR (MAC rewrite) and IP-in-IP
//! (IPv4-in-IPv4, IPv6-in-IPv6), as LVS's `-g` and `-i`.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::maps::{Backend, LbConfig};

use crate::parse::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPPROTO_IPIP, IPPROTO_IPV6, Ipv4Hdr, Ipv6Hdr, ptr_at};

pub enum EncapError {
    /// No headroom to grow the packet.
    AdjustHead,
    /// The packet was shorter than expected after growing it.
    Bounds,
}

/// DSR: the IP packet goes unchanged to the backend's (or next hop's) MAC.
#[inline(always)]
pub fn rewrite_macs(ctx: &XdpContext, backend: &Backend, cfg: &LbConfig) -> Result<(), EncapError> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(EncapError::Bounds)?;
    unsafe {
        (*eth).dst = backend.mac;
        (*eth).src = cfg.if_mac;
    }
    Ok(())
}

/// Ones' complement sum of a 20-byte IPv4 header, folded and inverted.
#[inline(always)]
pub(crate) fn ipv4_checksum(hdr: &Ipv4Hdr) -> u16 {
    let words = unsafe { &*(hdr as *const Ipv4Hdr as *const [u16; 10]) };
    let mut sum = 0u32;
    for w in words {
        sum += *w as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The Don't Fragment bit of an IPv4 header's `frag_off`, in network order.
const IPV4_DF: u16 = 0x4000u16.to_be();

/// Prepends an outer IPv4 header toward `backend` and a fresh Ethernet header.
/// `l3_len` is the inner packet's length, `hash` the flow hash.
#[inline(always)]
pub fn ipip4(
    ctx: &XdpContext,
    backend: &Backend,
    cfg: &LbConfig,
    l3_len: u32,
    tos: u8,
    hash: u32,
) -> Result<(), EncapError> {
    let grow = core::mem::size_of::<Ipv4Hdr>();
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return Err(EncapError::AdjustHead);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(EncapError::Bounds)?;
    let outer = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(EncapError::Bounds)?;
    let inner = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN + grow).ok_or(EncapError::Bounds)?;
    // The outer header keeps the inner one's DF: a path too small for the
    // packet answers "fragmentation needed" rather than fragmenting it.
    // SAFETY: ptr_at checked that the inner header lies within the frame.
    let df = unsafe { (*inner).frag_off } & IPV4_DF;
    let src = cfg.ipip_src_v4 | (hash.to_be() & cfg.ipip_src_v4_host_mask);
    let mut hdr = Ipv4Hdr {
        ver_ihl: 0x45,
        tos,
        tot_len: ((l3_len + grow as u32) as u16).to_be(),
        id: 0,
        frag_off: df,
        ttl: 64,
        protocol: IPPROTO_IPIP,
        check: 0,
        src: src.to_ne_bytes(),
        dst: backend.addr[0].to_ne_bytes(),
    };
    hdr.check = ipv4_checksum(&hdr);
    unsafe {
        (*eth).dst = backend.mac;
        (*eth).src = cfg.if_mac;
        (*eth).ether_type = ETH_P_IP;
        *outer = hdr;
    }
    Ok(())
}

/// Prepends an outer IPv6 header toward `backend` and a fresh Ethernet header.
/// The flow label carries the flow hash, so ECMP and RSS spread flows.
#[inline(always)]
pub fn ipip6(
    ctx: &XdpContext,
    backend: &Backend,
    cfg: &LbConfig,
    l3_len: u32,
    tclass: u8,
    hash: u32,
) -> Result<(), EncapError> {
    let grow = core::mem::size_of::<Ipv6Hdr>();
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return Err(EncapError::AdjustHead);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(EncapError::Bounds)?;
    let outer = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN).ok_or(EncapError::Bounds)?;
    let mut src = [0u8; 16];
    let words = [
        cfg.ipip_src_v6[0],
        cfg.ipip_src_v6[1],
        cfg.ipip_src_v6[2],
        cfg.ipip_src_v6[3] | (hash.to_be() & cfg.ipip_src_v6_host_mask),
    ];
    let mut dst = [0u8; 16];
    for i in 0..4 {
        src[i * 4..i * 4 + 4].copy_from_slice(&words[i].to_ne_bytes());
        dst[i * 4..i * 4 + 4].copy_from_slice(&backend.addr[i].to_ne_bytes());
    }
    let label = hash & 0x000f_ffff;
    let hdr = Ipv6Hdr {
        vtc_flow: [0x60 | (tclass >> 4), (tclass << 4) | (label >> 16) as u8, (label >> 8) as u8, label as u8],
        payload_len: (l3_len as u16).to_be(),
        next_hdr: IPPROTO_IPV6,
        hop_limit: 64,
        src,
        dst,
    };
    unsafe {
        (*eth).dst = backend.mac;
        (*eth).src = cfg.if_mac;
        (*eth).ether_type = ETH_P_IPV6;
        *outer = hdr;
    }
    Ok(())
}
