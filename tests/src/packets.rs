//! Frames for packet-level tests, built with etherparse, plus an independent
//! checksum verifier (written here, not shared with the dataplane) and the
//! byte surgery for IPv4 options, IPv6 extension headers and fragments.

use std::net::IpAddr;

use etherparse::PacketBuilder;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x01];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn number(self) -> u8 {
        match self {
            L4::Tcp => 6,
            L4::Udp => 17,
        }
    }
}

/// A client → VIP frame with a small payload and valid checksums.
pub fn frame(l4: L4, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    let payload = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n";
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed address families"),
    };
    let mut out = Vec::new();
    match l4 {
        L4::Tcp => ip.tcp(sport, dport, 1000, 64240).write(&mut out, payload),
        L4::Udp => ip.udp(sport, dport).write(&mut out, payload),
    }
    .expect("etherparse builds the frame");
    out
}

/// Like `frame`, but a TCP SYN: the first packet of a connection.
pub fn syn(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    let mut f = frame(L4::Tcp, src, sport, dst, dport);
    let l4 = if src.is_ipv4() { 34 } else { 54 };
    f[l4 + 13] = 0x02;
    // The flags are covered by the checksum: fix it up (RFC 1624).
    let old = u16::from_be_bytes([f[l4 + 16], f[l4 + 17]]);
    let sum = fold(!old as u32 + 0x0002);
    f[l4 + 16..l4 + 18].copy_from_slice(&(!sum).to_be_bytes());
    f
}

/// Ones' complement sum of `data` (odd trailing byte padded), unfolded.
fn sum16(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let hi = chunk[0] as u32;
        let lo = chunk.get(1).copied().unwrap_or(0) as u32;
        sum += (hi << 8) | lo;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// RFC 1071 checksum of `data`, as it belongs in a header.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data))
}

/// True if the IPv4 header at `ip` (its IHL) carries a correct checksum.
pub fn ipv4_header_ok(ip: &[u8]) -> bool {
    let ihl = (ip[0] & 0x0f) as usize * 4;
    fold(sum16(&ip[..ihl])) == 0xffff
}

/// True if the TCP/UDP checksum of the IP packet `ip` verifies, walking IPv4
/// options and the IPv6 extension headers this module inserts.
pub fn l4_checksum_ok(ip: &[u8]) -> bool {
    let (src, dst, proto, l4): (&[u8], &[u8], u8, &[u8]) = if ip[0] >> 4 == 4 {
        let ihl = (ip[0] & 0x0f) as usize * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        (&ip[12..16], &ip[16..20], ip[9], &ip[ihl..total])
    } else {
        let total = 40 + u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let (mut next, mut off) = (ip[6], 40);
        while matches!(next, 0 | 43 | 60) {
            next = ip[off];
            off += (ip[off + 1] as usize + 1) * 8;
        }
        (&ip[8..24], &ip[24..40], next, &ip[off..total])
    };
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    if ip[0] >> 4 == 4 {
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    } else {
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, proto]);
    }
    fold(sum16(&pseudo) + sum16(l4)) == 0xffff
}

fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    frame[24] = 0;
    frame[25] = 0;
    let c = checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Inserts IPv4 options (a multiple of 4 bytes) after the fixed header.
pub fn with_ipv4_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let mut out = frame[..34].to_vec();
    out.extend_from_slice(options);
    out.extend_from_slice(&frame[34..]);
    out[14] = 0x40 | (5 + options.len() / 4) as u8;
    let total = u16::from_be_bytes([out[16], out[17]]) + options.len() as u16;
    out[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(&mut out);
    out
}

/// Sets the IPv4 flags/fragment-offset field (e.g. 0x2000 = more fragments).
pub fn as_ipv4_fragment(frame: &[u8], flags_offset: u16) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[20..22].copy_from_slice(&flags_offset.to_be_bytes());
    fix_ipv4_checksum(&mut out);
    out
}

/// Inserts one IPv6 extension header of type `kind` (8 bytes, or a
/// fragment header) between the IPv6 header and the transport header.
pub fn with_ipv6_ext(frame: &[u8], kind: u8) -> Vec<u8> {
    let next = frame[20];
    let ext: [u8; 8] = match kind {
        // Hop-by-hop / destination options: next, len 0, PadN of 4 bytes.
        0 | 60 => [next, 0, 1, 4, 0, 0, 0, 0],
        // Fragment header: offset 0, more fragments, id 7.
        44 => [next, 0, 0, 1, 0, 0, 0, 7],
        _ => panic!("unsupported extension header {kind}"),
    };
    let mut out = frame[..54].to_vec();
    out.extend_from_slice(&ext);
    out.extend_from_slice(&frame[54..]);
    out[20] = kind;
    let payload = u16::from_be_bytes([out[18], out[19]]) + 8;
    out[18..20].copy_from_slice(&payload.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify_and_surgery_keeps_them_valid() {
        let f = frame(L4::Tcp, "198.18.1.1".parse().unwrap(), 4000, "198.18.0.100".parse().unwrap(), 80);
        assert!(ipv4_header_ok(&f[14..]) && l4_checksum_ok(&f[14..]));
        let o = with_ipv4_options(&f, &[1, 1, 1, 0]);
        assert!(ipv4_header_ok(&o[14..]) && l4_checksum_ok(&o[14..]));
        let mut bad = f.clone();
        bad[40] ^= 1;
        assert!(!l4_checksum_ok(&bad[14..]), "the verifier must catch a flipped bit");
        let s = syn("198.18.1.1".parse().unwrap(), 4000, "198.18.0.100".parse().unwrap(), 80);
        assert!(l4_checksum_ok(&s[14..]) && s[34 + 13] == 0x02);
        let g = frame(L4::Udp, "2001:db8::1".parse().unwrap(), 4000, "2001:db8::100".parse().unwrap(), 53);
        assert!(l4_checksum_ok(&g[14..]));
        assert!(l4_checksum_ok(&with_ipv6_ext(&g, 0)[14..]));
    }
}
