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

/// Where the transport header of the IP packet `ip` starts and which protocol
/// it is, walking IPv6 hop-by-hop, routing, destination-options and AH
/// headers; with the packet's end (its IPv4 total length or IPv6 payload
/// length, never past `ip`). None for anything malformed, truncated or
/// fragmented: bounds-checked throughout, for fuzzed and rewritten frames.
pub fn transport_of(ip: &[u8]) -> Option<(u8, usize, usize)> {
    match ip.first()? >> 4 {
        4 if ip.len() >= 20 => {
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            (ihl >= 20 && ihl <= total && total <= ip.len() && !fragment).then_some((ip[9], ihl, total))
        }
        6 if ip.len() >= 40 => {
            let total = 40 + u16::from_be_bytes([ip[4], ip[5]]) as usize;
            if total > ip.len() {
                return None;
            }
            let (mut next, mut off) = (ip[6], 40);
            // RFC 8200 allows any number; 16 is more than any real chain.
            for _ in 0..16 {
                let len = match next {
                    0 | 43 | 60 => (*ip.get(off + 1)? as usize + 1) * 8,
                    51 => (*ip.get(off + 1)? as usize + 2) * 4,
                    _ => return (off <= total).then_some((next, off, total)),
                };
                next = *ip.get(off)?;
                off += len;
            }
            None
        }
        _ => None,
    }
}

/// The ones' complement sum over the transport segment of `ip` (with the
/// pseudo-header where the protocol has one), and the offset of its checksum
/// field. None where `transport_of` is, or for another protocol.
fn transport_sum(ip: &[u8]) -> Option<(u32, usize)> {
    let (proto, off, total) = transport_of(ip)?;
    let l4 = &ip[off..total];
    let field = match proto {
        6 if l4.len() >= 20 => 16,
        17 if l4.len() >= 8 => 6,
        1 | 58 if l4.len() >= 4 => 2,
        _ => return None,
    };
    let v4 = ip[0] >> 4 == 4;
    let pseudo = match (v4, proto) {
        // ICMPv4 has no pseudo-header.
        (true, 1) => 0,
        (true, _) => sum16(&ip[12..20]) + proto as u32 + l4.len() as u32,
        (false, _) => sum16(&ip[8..40]) + proto as u32 + sum16(&(l4.len() as u32).to_be_bytes()),
    };
    Some((pseudo + sum16(l4), off + field))
}

/// Whether the TCP, UDP, ICMP or ICMPv6 checksum of the IP packet `ip`
/// verifies (an IPv4 UDP checksum of 0, "none", counts as valid); None when
/// it cannot be told (see `transport_of`). Never panics.
pub fn transport_checksum_ok(ip: &[u8]) -> Option<bool> {
    let (sum, field) = transport_sum(ip)?;
    if ip[0] >> 4 == 4 && ip[9] == 17 && ip[field..field + 2] == [0, 0] {
        return Some(true);
    }
    Some(fold(sum) == 0xffff)
}

/// Like `ipv4_header_ok`, for any bytes: false if they cannot hold the header.
pub fn ipv4_header_valid(ip: &[u8]) -> bool {
    let ihl = ip.first().map_or(0, |b| (b & 0x0f) as usize * 4);
    ihl >= 20 && ip.len() >= ihl && ipv4_header_ok(ip)
}

/// Recomputes whatever checksums of an Ethernet frame can be: the IPv4
/// header's, and the transport checksum. A mutated frame stays
/// "well-formed where it can be", so the checks after it still bite.
pub fn fix_checksums(frame: &mut [u8]) {
    let Some(ip) = frame.get_mut(14..) else { return };
    if ip.len() >= 20 && ip[0] >> 4 == 4 && frame[12..14] == [0x08, 0x00] {
        let ip = &mut frame[14..];
        let ihl = (ip[0] & 0x0f) as usize * 4;
        if ihl >= 20 && ip.len() >= ihl {
            ip[10..12].fill(0);
            let c = checksum(&ip[..ihl]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
        }
    }
    let ip = &mut frame[14..];
    if let Some((_, field)) = transport_sum(ip) {
        ip[field..field + 2].fill(0);
        if let Some((sum, _)) = transport_sum(ip) {
            let mut c = !fold(sum);
            // UDP sends a computed 0 as all ones (0 means "no checksum").
            if c == 0 && ip[0] >> 4 == 4 && ip[9] == 17 {
                c = 0xffff;
            }
            ip[field..field + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
}

/// An ICMP (IPv4) or ICMPv6 message in a frame from `src` to `dst`: `kind`
/// and `code`, the 4 bytes after the checksum (`rest`: an echo's identifier
/// and sequence, an MTU), then `body` (echo data, or the quoted packet of an
/// error). Checksums valid.
pub fn icmp(src: IpAddr, dst: IpAddr, kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(body);
    let mut out = Vec::new();
    out.extend_from_slice(&LB_MAC);
    out.extend_from_slice(&CLIENT_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
            out.extend_from_slice(&((20 + msg.len()) as u16).to_be_bytes());
            out.extend_from_slice(&[0, 1, 0, 0, 64, 1, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            out.extend_from_slice(&[58, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed address families"),
    }
    out.extend_from_slice(&msg);
    fix_checksums(&mut out);
    out
}

/// The packet an ICMP or ICMPv6 message quotes: its bytes after the 8-byte
/// ICMP header, to the end of the outer IP packet `ip`. None if `ip` is not
/// a whole ICMP message (see `transport_of`).
pub fn icmp_quote(ip: &[u8]) -> Option<&[u8]> {
    let (proto, off, total) = transport_of(ip)?;
    (matches!(proto, 1 | 58) && total >= off + 8).then(|| &ip[off + 8..total])
}

/// Whether every checksum of the ICMP error `ip` verifies: the outer IPv4
/// header's, the ICMP/ICMPv6 message's (with the IPv6 pseudo-header), the
/// quoted IPv4 header's, and the quoted TCP/UDP checksum when the quote
/// holds the whole quoted packet (a cut quote's cannot be told).
pub fn icmp_error_checksums_ok(ip: &[u8]) -> bool {
    let v4 = ip.first().is_some_and(|b| b >> 4 == 4);
    if (v4 && !ipv4_header_valid(ip)) || transport_checksum_ok(ip) != Some(true) {
        return false;
    }
    let Some(quote) = icmp_quote(ip) else { return false };
    if quote.first().is_some_and(|b| b >> 4 == 4) && !ipv4_header_valid(quote) {
        return false;
    }
    // None: the quote is cut short of its own length.
    transport_checksum_ok(quote) != Some(false)
}

/// `frame` (a TCP segment without IP options or extension headers) with
/// these flags, sequence and acknowledgment numbers, checksums valid.
pub fn tcp_segment(frame: &[u8], flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    let mut f = frame.to_vec();
    let l4 = if f[12..14] == [0x86, 0xdd] { 54 } else { 34 };
    f[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
    f[l4 + 8..l4 + 12].copy_from_slice(&ack.to_be_bytes());
    f[l4 + 13] = flags;
    fix_checksums(&mut f);
    f
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

    #[test]
    fn the_bounds_checked_checkers_agree_and_never_panic() {
        let f = frame(L4::Tcp, "198.18.1.1".parse().unwrap(), 4000, "198.18.0.100".parse().unwrap(), 80);
        let g = frame(L4::Udp, "2001:db8::1".parse().unwrap(), 4000, "2001:db8::100".parse().unwrap(), 53);
        for good in [&f, &g, &with_ipv6_ext(&g, 60)] {
            assert_eq!(transport_checksum_ok(&good[14..]), Some(true));
            let mut bad = good.clone();
            *bad.last_mut().unwrap() ^= 0x40;
            assert_eq!(transport_checksum_ok(&bad[14..]), Some(false));
            fix_checksums(&mut bad);
            assert_eq!(transport_checksum_ok(&bad[14..]), Some(true));
            for len in 0..good.len() {
                transport_checksum_ok(&good[14.min(len)..len]);
                ipv4_header_valid(&good[14.min(len)..len]);
                fix_checksums(&mut good[..len].to_vec());
            }
        }
        assert!(ipv4_header_valid(&f[14..]) && !ipv4_header_valid(&f[14..30]));
        let v4: (IpAddr, IpAddr) = ("198.18.1.1".parse().unwrap(), "198.18.0.100".parse().unwrap());
        let v6: (IpAddr, IpAddr) = ("2001:db8::1".parse().unwrap(), "2001:db8::100".parse().unwrap());
        let ping = icmp(v4.0, v4.1, 8, 0, [0, 1, 0, 1], b"ping");
        assert!(ipv4_header_ok(&ping[14..]) && transport_checksum_ok(&ping[14..]) == Some(true));
        let ping6 = icmp(v6.0, v6.1, 128, 0, [0, 1, 0, 1], b"ping");
        assert_eq!(transport_checksum_ok(&ping6[14..]), Some(true));
        // Cross-checked against etherparse's own ICMPv6 checksum.
        let mut theirs = Vec::new();
        let (IpAddr::V6(s), IpAddr::V6(d)) = v6 else { unreachable!() };
        PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC)
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6_echo_request(1, 1)
            .write(&mut theirs, b"ping")
            .unwrap();
        assert_eq!(theirs[54..58], ping6[54..58]);
    }

    #[test]
    fn icmp_error_checksums_are_all_checked() {
        for (src, dst, kind) in [("198.18.1.1", "198.18.0.100", 3u8), ("2001:db8::1", "2001:db8::100", 1)] {
            let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let quoted = frame(L4::Tcp, dst, 80, src, 4000);
            let ip_len = if src.is_ipv4() { 20 } else { 40 };
            let whole = icmp(src, dst, kind, 3, [0; 4], &quoted[14..]);
            let cut = icmp(src, dst, kind, 3, [0; 4], &quoted[14..14 + ip_len + 8]);
            for good in [&whole, &cut] {
                assert!(icmp_error_checksums_ok(&good[14..]));
                assert_eq!(icmp_quote(&good[14..]).unwrap()[..ip_len + 8], quoted[14..14 + ip_len + 8]);
            }
            // Each flipped bit found, even with the ICMP checksum made right
            // again: in the quoted IPv4 header, or in the whole quoted segment.
            let at = 14 + ip_len + 8 + if src.is_ipv4() { 12 } else { ip_len + 17 };
            let mut bad = whole.clone();
            bad[at] ^= 1;
            fix_checksums(&mut bad);
            assert!(transport_checksum_ok(&bad[14..]) == Some(true) && !icmp_error_checksums_ok(&bad[14..]));
            let mut bad = whole.clone();
            bad[14 + ip_len + 2] ^= 1;
            assert!(!icmp_error_checksums_ok(&bad[14..]), "the ICMP checksum itself");
        }
    }
}
