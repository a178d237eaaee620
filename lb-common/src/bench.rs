//! The benchmarks' flood mode: what the restore wrapper (lb-ebpf
//! `bench_restore`, never attached) writes into each run's frame so that one
//! BPF_PROG_TEST_RUN call with a large `repeat` sends that many distinct
//! clients through the balancer. Shared here so the wrapper and its tests
//! agree on the mode numbers and on the arithmetic.

/// `BENCH_VARY` word 0: the saved frame is run as it is.
pub const VARY_OFF: u32 = 0;
/// `BENCH_VARY` word 0: every run gets another IPv4 source address (in
/// `FLOOD_NET_V4`) and source port; the IPv4 header checksum and the TCP
/// or UDP checksum are updated to match. Word 1 is the seed.
pub const VARY_SOURCE_V4: u32 = 1;

/// 198.19.0.0/16 (RFC 2544's benchmarking range): the flood's sources.
pub const FLOOD_NET_V4: u32 = 0xc613_0000;

/// Low bits of a source's index that count one CPU's runs; the CPU number
/// sits above them. Distinct for up to 2^26 runs per CPU and 64 CPUs.
pub const RUNS_PER_CPU_BITS: u32 = 26;

/// A bijection of `u32` (the "lowbias32" integer hash): distinct inputs give
/// distinct outputs, spread like random ones.
#[inline(always)]
const fn permute(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The source (IPv4 address and port, host order) of run `run` on CPU `cpu`
/// under `seed`. Under one seed, distinct (`cpu` mod 64, `run` mod 2^26)
/// give distinct sources: each step is a bijection of `u32`.
#[inline(always)]
pub const fn varied_source_v4(seed: u32, cpu: u32, run: u32) -> (u32, u16) {
    let index = cpu.wrapping_shl(RUNS_PER_CPU_BITS) | (run & ((1 << RUNS_PER_CPU_BITS) - 1));
    let x = permute(index ^ seed);
    (FLOOD_NET_V4 | (x >> 16), x as u16)
}

/// An Internet checksum `check` (as read from the header, host order) after
/// one 16-bit word it covers changed from `old` to `new` (RFC 1624, eqn. 3).
#[inline(always)]
pub const fn checksum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;

    fn full_checksum(words: &[u16]) -> u16 {
        let mut sum: u32 = words.iter().map(|&w| w as u32).sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn sources_are_distinct_across_runs_and_cpus() {
        let mut seen = BTreeSet::new();
        for cpu in 0..4 {
            for run in 0..50_000 {
                let (addr, port) = varied_source_v4(0x1234_5678, cpu, run);
                assert_eq!(addr & 0xffff_0000, FLOOD_NET_V4);
                assert!(seen.insert((addr, port)), "cpu {cpu} run {run} repeats a source");
            }
        }
        // Another seed gives another sequence.
        assert_ne!(varied_source_v4(1, 0, 0), varied_source_v4(2, 0, 0));
    }

    #[test]
    fn replacing_words_matches_a_full_recomputation() {
        let mut words = [0x4500u16, 0x0053, 0x0001, 0x0000, 0x4006, 0x0000, 0xc612, 0x8001, 0xc612, 0x0064];
        words[5] = full_checksum(&words);
        for (i, new) in [(6usize, 0xc613u16), (7, 0xbeef), (7, 0x0000), (6, 0xffff)] {
            let check = checksum_replace(words[5], words[i], new);
            words[i] = new;
            words[5] = 0;
            let want = full_checksum(&words);
            // 0x0000 and 0xffff are the same ones' complement value.
            assert!(check == want || (check, want) == (0xffff, 0) || (check, want) == (0, 0xffff));
            words[5] = check;
        }
    }
}
