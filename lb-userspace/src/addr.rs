//! Conversions between std's addresses and the dataplane's `[u32; 4]` words
//! of raw network-order bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::maps::{AddrKey, FAMILY_V4, FAMILY_V6};

pub fn words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

pub fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

pub fn from_words(words: &[u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

pub fn addr_key(addr: IpAddr) -> AddrKey {
    AddrKey { addr: words(addr), family: family(addr), _pad: [0; 3] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for a in ["198.18.0.1", "2001:db8::1:2"] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(from_words(&words(ip), family(ip)), ip);
        }
        // Word 0 holds the first octets as they are on the wire.
        assert_eq!(words("198.18.0.1".parse().unwrap())[0].to_ne_bytes(), [198, 18, 0, 1]);
    }
}
