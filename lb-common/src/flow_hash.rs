//! The flow hash that indexes a VIP's Maglev table and derives the IP-in-IP
//! outer source. The dataplane and the controller (and tests) compute it with
//! this one function, so userspace can predict the backend of any flow.
//!
//! A secret seed (`LbConfig::hash_seed`, the same on every node of a site)
//! enters the first and the last step, so that without it nobody can
//! compute which tuples land on one server. Seed [0, 0] gives the hash of
//! version-1 dataplanes, which had none.
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
pub fn five_tuple(seed: &[u32; 2], src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = SEED ^ seed[0] ^ proto as u32;
    h = step(h, src[0]);
    h = step(h, src[1]);
    h = step(h, src[2]);
    h = step(h, src[3]);
    h = step(h, dst[0]);
    h = step(h, dst[1]);
    h = step(h, dst[2]);
    h = step(h, dst[3]);
    h = step(h, (sport as u32) << 16 | dport as u32);
    mix32(h ^ seed[1])
}

/// Hash of the client address only (`hash: source-ip`, session affinity).
#[inline(always)]
pub fn source_ip(seed: &[u32; 2], src: &[u32; 4]) -> u32 {
    let mut h = SEED ^ seed[0];
    h = step(h, src[0]);
    h = step(h, src[1]);
    h = step(h, src[2]);
    h = step(h, src[3]);
    mix32(h ^ seed[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    use alloc::vec::Vec;

    const NO_SEED: [u32; 2] = [0, 0];

    #[test]
    fn every_field_changes_the_hash() {
        let h =
            |src: [u32; 4], dst: [u32; 4], sport, dport, proto| five_tuple(&NO_SEED, &src, &dst, sport, dport, proto);
        let base = h([1, 0, 0, 0], [2, 0, 0, 0], 1000, 80, 6);
        assert_ne!(base, h([3, 0, 0, 0], [2, 0, 0, 0], 1000, 80, 6));
        assert_ne!(base, h([1, 0, 0, 0], [3, 0, 0, 0], 1000, 80, 6));
        assert_ne!(base, h([1, 0, 0, 0], [2, 0, 0, 0], 1001, 80, 6));
        assert_ne!(base, h([1, 0, 0, 0], [2, 0, 0, 0], 1000, 81, 6));
        assert_ne!(base, h([1, 0, 0, 0], [2, 0, 0, 0], 1000, 80, 17));
        assert_ne!(base, h([1, 0, 0, 1], [2, 0, 0, 0], 1000, 80, 6));
    }

    #[test]
    fn seed_zero_is_the_unseeded_hash_of_version_1() {
        // Values of version 1's hash (no seed), so a migrated dataplane
        // that keeps seed [0, 0] moves no untracked flow.
        assert_eq!(five_tuple(&NO_SEED, &[1, 0, 0, 0], &[2, 0, 0, 0], 1000, 80, 6), 0xebe7_0c3f);
        assert_eq!(source_ip(&NO_SEED, &[1, 0, 0, 0]), 0xee1a_409f);
    }

    #[test]
    fn each_seed_word_reorders_the_flows() {
        // Two seeds agree on about 1 flow in 16 buckets' worth, not on all.
        let flows = |seed: [u32; 2]| -> Vec<u32> {
            (0..1000u16).map(|p| five_tuple(&seed, &[7, 0, 0, 0], &[9, 0, 0, 0], p, 80, 6) % 16).collect()
        };
        let base = flows(NO_SEED);
        for seed in [[1, 0], [0, 1], [0xdead_beef, 0x1234_5678]] {
            let same = flows(seed).iter().zip(&base).filter(|(a, b)| a == b).count();
            assert!(same < 150, "seed {seed:x?}: {same} of 1000 flows in the same bucket");
        }
        let ips = (0..1000u32).filter(|&i| source_ip(&[5, 6], &[i, 0, 0, 0]) == source_ip(&NO_SEED, &[i, 0, 0, 0]));
        assert_eq!(ips.count(), 0);
    }

    #[test]
    fn consecutive_ports_spread_evenly() {
        // 65536 flows differing only in source port, into 16 buckets.
        let mut buckets = [0u32; 16];
        for port in 0..=u16::MAX {
            buckets[(five_tuple(&NO_SEED, &[7, 0, 0, 0], &[9, 0, 0, 0], port, 80, 6) % 16) as usize] += 1;
        }
        let mean = 65536 / 16;
        for b in buckets {
            assert!(b.abs_diff(mean) < mean / 20, "bucket {b} vs mean {mean}");
        }
    }
}
