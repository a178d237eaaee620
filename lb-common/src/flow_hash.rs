//! The flow hash that indexes a VIP's Maglev table and derives the IP-in-IP
//! outer source. The dataplane and the controller (and tests) compute it with
//! this one function, so userspace can predict the backend of any flow.
//!
//! Addresses are the raw network-order bytes of the packet read as native
//! `u32` words (IPv4 in word 0, the rest zero); ports are raw network order.

#[inline(always)]
const fn mix32(mut h: u32) -> u32 {
    // murmur3's finaliser: full avalanche in a handful of ALU ops, cheap in eBPF.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn step(h: u32, w: u32) -> u32 {
    let k = w.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

const SEED: u32 = 0x9e37_79b9;

/// Hash of a 5-tuple.
#[inline(always)]
pub fn five_tuple(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = SEED ^ proto as u32;
    h = step(h, src[0]);
    h = step(h, src[1]);
    h = step(h, src[2]);
    h = step(h, src[3]);
    h = step(h, dst[0]);
    h = step(h, dst[1]);
    h = step(h, dst[2]);
    h = step(h, dst[3]);
    h = step(h, (sport as u32) << 16 | dport as u32);
    mix32(h)
}

/// Hash of the client address only (`hash: source-ip`, session affinity).
#[inline(always)]
pub fn source_ip(src: &[u32; 4]) -> u32 {
    let mut h = SEED;
    h = step(h, src[0]);
    h = step(h, src[1]);
    h = step(h, src[2]);
    h = step(h, src[3]);
    mix32(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_hash() {
        let base = five_tuple(&[1, 0, 0, 0], &[2, 0, 0, 0], 1000, 80, 6);
        assert_ne!(base, five_tuple(&[3, 0, 0, 0], &[2, 0, 0, 0], 1000, 80, 6));
        assert_ne!(base, five_tuple(&[1, 0, 0, 0], &[3, 0, 0, 0], 1000, 80, 6));
        assert_ne!(base, five_tuple(&[1, 0, 0, 0], &[2, 0, 0, 0], 1001, 80, 6));
        assert_ne!(base, five_tuple(&[1, 0, 0, 0], &[2, 0, 0, 0], 1000, 81, 6));
        assert_ne!(base, five_tuple(&[1, 0, 0, 0], &[2, 0, 0, 0], 1000, 80, 17));
        assert_ne!(base, five_tuple(&[1, 0, 0, 1], &[2, 0, 0, 0], 1000, 80, 6));
    }

    #[test]
    fn consecutive_ports_spread_evenly() {
        // 65536 flows differing only in source port, into 16 buckets.
        let mut buckets = [0u32; 16];
        for port in 0..=u16::MAX {
            buckets[(five_tuple(&[7, 0, 0, 0], &[9, 0, 0, 0], port, 80, 6) % 16) as usize] += 1;
        }
        let mean = 65536 / 16;
        for b in buckets {
            assert!(b.abs_diff(mean) < mean / 20, "bucket {b} vs mean {mean}");
        }
    }
}
