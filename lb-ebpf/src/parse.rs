//! Packet parsing: Ethernet, IPv4 (with options), IPv6 (with a bounded walk
//! of extension headers), TCP, UDP, and where an ICMP message starts (the
//! `icmp` module reads it). Every access goes through `ptr_at`, which checks
//! the bounds the verifier asks for.

use aya_ebpf::programs::XdpContext;
use lb_common::maps::{AddrKey, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP};

pub const ETH_LEN: usize = 14;
/// EtherTypes in network byte order, as read from the frame on a little-endian machine.
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86ddu16.to_be();

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

/// How many IPv6 extension headers we walk before giving up: enough for
/// hop-by-hop + destination options + routing + AH, and bounded for the verifier.
const MAX_IPV6_EXT_HEADERS: usize = 4;
/// Extension headers beyond this offset are not walked (and bound the offset
/// for the verifier).
const MAX_L4_OFFSET: usize = 512;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: [u8; 4],
    pub payload_len: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The minimum TCP header; the ports and flags are read.
#[repr(C)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    _seq_ack_off: [u8; 9],
    flags: u8,
    _rest: [u8; 6],
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
struct UdpHdr {
    sport: u16,
    dport: u16,
    _len: u16,
    _check: u16,
}

/// The first two bytes of an IPv6 extension header.
#[repr(C)]
struct ExtHdr {
    next_hdr: u8,
    len: u8,
}

/// Returns a pointer to a `T` at `offset` if the whole `T` lies in the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn v4_words(a: &[u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(*a), 0, 0, 0]
}

#[inline(always)]
pub fn v6_words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// A TCP or UDP packet we can balance.
pub struct Packet {
    pub flow: FlowKey,
    /// Length of the IP packet from its own header (without link padding).
    pub l3_len: u32,
    /// IPv4 TOS / IPv6 traffic class, copied to an outer header.
    pub tos: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the TCP/UDP header in the frame.
    pub l4_off: usize,
}

/// An ICMP or ICMPv6 message (not a fragment).
pub struct Icmp {
    /// The sender's address (the family is `dst`'s), as in `FlowKey`.
    pub src: [u32; 4],
    pub dst: AddrKey,
    /// Length of the IP packet from its own header.
    pub l3_len: u32,
    pub tos: u8,
    /// Offset of the ICMP header in the frame.
    pub l4_off: usize,
}

pub enum Parsed {
    Packet(Packet),
    /// ICMP (IPv4) or ICMPv6, to this destination.
    Icmp(Icmp),
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp,
    /// Ethernet or IP header truncated or invalid.
    MalformedL3,
    /// An IP fragment, to this destination.
    Fragment(AddrKey),
    /// Neither TCP nor UDP, to this destination.
    OtherProto(AddrKey),
    /// TCP/UDP header truncated, or extension headers not walkable.
    MalformedL4(AddrKey),
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::MalformedL3;
    };
    match unsafe { (*eth).ether_type } {
        ETH_P_IP => parse_ipv4(ctx),
        ETH_P_IPV6 => parse_ipv6(ctx),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext) -> Parsed {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return Parsed::MalformedL3;
    };
    let ip = unsafe { &*ip };
    let ihl = (ip.ver_ihl & 0x0f) as usize * 4;
    let tot_len = u16::from_be(ip.tot_len) as usize;
    if ip.ver_ihl >> 4 != 4 || ihl < 20 || tot_len < ihl || ctx.data() + ETH_LEN + ihl > ctx.data_end() {
        return Parsed::MalformedL3;
    }
    let dst = AddrKey { addr: v4_words(&ip.dst), family: FAMILY_V4, _pad: [0; 3] };
    // More-fragments flag or a fragment offset: ports are not in every fragment.
    if u16::from_be(ip.frag_off) & 0x3fff != 0 {
        return Parsed::Fragment(dst);
    }
    let (sport, dport, tcp_flags) = match ports(ctx, ip.protocol, ETH_LEN + ihl) {
        Ports::Found(s, d, f) => (s, d, f),
        Ports::NotTcpUdp if ip.protocol == IPPROTO_ICMP => {
            let src = v4_words(&ip.src);
            return Parsed::Icmp(Icmp { src, dst, l3_len: tot_len as u32, tos: ip.tos, l4_off: ETH_LEN + ihl });
        }
        Ports::NotTcpUdp => return Parsed::OtherProto(dst),
        Ports::Truncated => return Parsed::MalformedL4(dst),
    };
    Parsed::Packet(Packet {
        flow: FlowKey {
            src: v4_words(&ip.src),
            dst: dst.addr,
            sport,
            dport,
            protocol: ip.protocol,
            family: FAMILY_V4,
            _pad: [0; 2],
        },
        l3_len: tot_len as u32,
        tos: ip.tos,
        tcp_flags,
        l4_off: ETH_LEN + ihl,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else {
        return Parsed::MalformedL3;
    };
    let ip = unsafe { &*ip };
    if ip.vtc_flow[0] >> 4 != 6 {
        return Parsed::MalformedL3;
    }
    let dst = AddrKey { addr: v6_words(&ip.dst), family: FAMILY_V6, _pad: [0; 3] };
    let mut next = ip.next_hdr;
    let mut off = ETH_LEN + core::mem::size_of::<Ipv6Hdr>();
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let len = match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units beyond the first.
            0 | 43 | 60 => {
                let Some(ext) = ptr_at::<ExtHdr>(ctx, off) else {
                    return Parsed::MalformedL4(dst);
                };
                next = unsafe { (*ext).next_hdr };
                (unsafe { (*ext).len } as usize + 1) * 8
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let Some(ext) = ptr_at::<ExtHdr>(ctx, off) else {
                    return Parsed::MalformedL4(dst);
                };
                next = unsafe { (*ext).next_hdr };
                (unsafe { (*ext).len } as usize + 2) * 4
            }
            44 => return Parsed::Fragment(dst),
            _ => break,
        };
        off += len;
        if off > MAX_L4_OFFSET {
            return Parsed::MalformedL4(dst);
        }
    }
    let (sport, dport, tcp_flags) = match ports(ctx, next, off) {
        Ports::Found(s, d, f) => (s, d, f),
        // Still an extension header after the walk (a fragment header among them): not walkable.
        Ports::NotTcpUdp if matches!(next, 0 | 43 | 44 | 51 | 60) => return Parsed::MalformedL4(dst),
        Ports::NotTcpUdp if next == IPPROTO_ICMPV6 => {
            let l3_len = u16::from_be(ip.payload_len) as u32 + core::mem::size_of::<Ipv6Hdr>() as u32;
            let tos = (ip.vtc_flow[0] << 4) | (ip.vtc_flow[1] >> 4);
            return Parsed::Icmp(Icmp { src: v6_words(&ip.src), dst, l3_len, tos, l4_off: off });
        }
        Ports::NotTcpUdp => return Parsed::OtherProto(dst),
        Ports::Truncated => return Parsed::MalformedL4(dst),
    };
    Parsed::Packet(Packet {
        flow: FlowKey {
            src: v6_words(&ip.src),
            dst: dst.addr,
            sport,
            dport,
            protocol: next,
            family: FAMILY_V6,
            _pad: [0; 2],
        },
        l3_len: u16::from_be(ip.payload_len) as u32 + core::mem::size_of::<Ipv6Hdr>() as u32,
        tos: (ip.vtc_flow[0] << 4) | (ip.vtc_flow[1] >> 4),
        tcp_flags,
        l4_off: off,
    })
}

enum Ports {
    /// Source port, destination port, TCP flags.
    Found(u16, u16, u8),
    NotTcpUdp,
    Truncated,
}

#[inline(always)]
fn ports(ctx: &XdpContext, protocol: u8, off: usize) -> Ports {
    match protocol {
        PROTO_TCP => match ptr_at::<TcpHdr>(ctx, off) {
            Some(t) => unsafe { Ports::Found((*t).sport, (*t).dport, (*t).flags) },
            None => Ports::Truncated,
        },
        PROTO_UDP => match ptr_at::<UdpHdr>(ctx, off) {
            Some(u) => unsafe { Ports::Found((*u).sport, (*u).dport, 0) },
            None => Ports::Truncated,
        },
        _ => Ports::NotTcpUdp,
    }
}
