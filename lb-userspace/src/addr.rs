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

/// A MAC address as `ip link` writes it: `02:00:5e:10:00:01`.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// An address of this host, and whether it is held as a single host
/// (/32, /128): how keepalived adds a virtual address, not how an interface
/// is numbered on its network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddr {
    pub addr: IpAddr,
    pub host_only: bool,
}

/// The prefix length of a netmask's bytes.
fn mask_len(bytes: &[u8]) -> u32 {
    bytes.iter().map(|b| b.count_ones()).sum()
}

/// Every address of this host's interfaces in this network namespace.
pub fn local_addresses() -> Vec<LocalAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list it allocates; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            let mask = ifa.ifa_netmask;
            // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    // SAFETY: the netmask, when present, has the address's family.
                    let len = (!mask.is_null()).then(|| {
                        mask_len(&unsafe { &*(mask as *const libc::sockaddr_in) }.sin_addr.s_addr.to_ne_bytes())
                    });
                    out.push(LocalAddr {
                        addr: IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()),
                        host_only: len == Some(32),
                    });
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    // SAFETY: the netmask, when present, has the address's family.
                    let len = (!mask.is_null())
                        .then(|| mask_len(&unsafe { &*(mask as *const libc::sockaddr_in6) }.sin6_addr.s6_addr));
                    out.push(LocalAddr { addr: IpAddr::from(sin6.sin6_addr.s6_addr), host_only: len == Some(128) });
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
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
