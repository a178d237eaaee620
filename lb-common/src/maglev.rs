//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016), with weights.
//!
//! Each backend walks its own permutation of the table's slots (offset and
//! skip derived from a hash of its identity) and claims the first slot of it
//! still free. Weights are honoured with credits: every round each backend
//! earns its weight and claims a slot for every `max_weight` it has earned,
//! so over the whole table its share of slots is its share of the weights.
//! With equal weights this is exactly the paper's round-robin population.
//!
//! The table holds, in each slot, the *position* of a backend in the slice
//! it was built from. Backends are identified by a 64-bit key (see
//! [`backend_key`]); building from the same keys and weights always gives the
//! same table, whatever the order the caller lists them in when using
//! [`build`], so two load balancers with the same configuration agree on
//! every flow.

/// Default table size: a prime, as Maglev requires; 65537 slots keep the
/// imbalance under 1% up to 1000 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// Marks a slot not yet filled (and, in a built table, "no backend").
pub const EMPTY: u32 = u32::MAX;

/// A backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Stable identity (e.g. [`backend_key`] of its address and port).
    pub key: u64,
    pub weight: u32,
}

#[inline]
const fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The identity key of a backend: its address words and port.
pub const fn backend_key(addr: &[u32; 4], port: u16) -> u64 {
    let mut h = splitmix64(port as u64);
    let mut i = 0;
    while i < 4 {
        h = splitmix64(h ^ addr[i] as u64);
        i += 1;
    }
    h
}

/// The backend's permutation of a table of `size` slots: (offset, skip).
pub const fn permutation(key: u64, size: u32) -> (u32, u32) {
    let offset = splitmix64(key ^ 0x6d61_676c_6576_3031) % size as u64;
    let skip = splitmix64(key ^ 0x736b_6970_7065_7232) % (size as u64 - 1) + 1;
    (offset as u32, skip as u32)
}

/// Whether `n` is prime (trial division; table sizes are small).
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u64;
    while d * d <= n as u64 {
        if (n as u64).is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Fills `table` (whose length, a prime, is the table size) with positions
/// into `backends`, or [`EMPTY`] everywhere when no backend has a weight.
///
/// `walk` and `credit` are scratch space of `backends.len()` entries each
/// (no allocation, so this also builds in `no_std`): each backend's next
/// slot and skip, and its credit. The result depends on the order of
/// `backends`; sort them by key for an order-free table.
pub fn populate(backends: &[MaglevBackend], table: &mut [u32], walk: &mut [(u32, u32)], credit: &mut [u64]) {
    let size = table.len() as u32;
    table.fill(EMPTY);
    let max_weight = backends.iter().map(|b| b.weight).max().unwrap_or(0);
    if max_weight == 0 || size < 2 {
        return;
    }
    // The permutation is computed once per backend, not per claimed slot.
    for (i, b) in backends.iter().enumerate() {
        walk[i] = permutation(b.key, size);
        credit[i] = 0;
    }
    // slot + skip < 2 × size: one subtraction instead of a division per step.
    let advance = |slot: u32, skip: u32| -> u32 {
        let n = slot as u64 + skip as u64;
        (if n >= size as u64 { n - size as u64 } else { n }) as u32
    };
    let mut filled = 0u32;
    loop {
        for (i, b) in backends.iter().enumerate() {
            if b.weight == 0 {
                continue;
            }
            credit[i] += b.weight as u64;
            if credit[i] < max_weight as u64 {
                continue;
            }
            credit[i] -= max_weight as u64;
            // Walk this backend's permutation to its next free slot. The
            // permutation visits every slot (size is prime, skip in 1..size),
            // and a free slot exists, so this ends.
            let (mut slot, skip) = walk[i];
            while table[slot as usize] != EMPTY {
                slot = advance(slot, skip);
            }
            table[slot as usize] = i as u32;
            walk[i].0 = advance(slot, skip);
            filled += 1;
            if filled == size {
                return;
            }
        }
    }
}

/// Builds a table of `size` slots whose entries are positions in `backends`,
/// independent of the order of `backends`.
///
/// Panics if `size` is not prime (the controller validates it first).
#[cfg(any(test, feature = "user"))]
pub fn build(backends: &[MaglevBackend], size: u32) -> alloc::vec::Vec<u32> {
    use alloc::vec;
    assert!(is_prime(size), "Maglev table size {size} is not prime");
    let mut order: alloc::vec::Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i].key);
    let sorted: alloc::vec::Vec<MaglevBackend> = order.iter().map(|&i| backends[i]).collect();
    let mut table = vec![EMPTY; size as usize];
    let mut walk = vec![(0u32, 0u32); sorted.len()];
    let mut credit = vec![0u64; sorted.len()];
    populate(&sorted, &mut table, &mut walk, &mut credit);
    for slot in table.iter_mut() {
        if *slot != EMPTY {
            *slot = order[*slot as usize] as u32;
        }
    }
    table
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::vec::Vec;
    use std::println;

    fn backends(n: usize, weight: impl Fn(usize) -> u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                key: backend_key(&[0xc612_0000u32.to_be() + i as u32, 0, 0, 0], 80),
                weight: weight(i),
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u32> {
        let mut c = alloc::vec![0u32; n];
        for &s in table {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(2) && is_prime(251) && is_prime(4_099));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0) && !is_prime(4_097));
    }

    /// The smallest prime table size that can hold `n` equal backends within
    /// 1% of each other: no integer split of M slots does better than
    /// ceil(M/n)/(M/n), which exceeds 1.01 at 65537 slots for some n > 655.
    fn table_size_for(n: usize) -> u32 {
        let mut m = DEFAULT_TABLE_SIZE.max(101 * n as u32);
        while !is_prime(m) {
            m += 1;
        }
        m
    }

    #[test]
    fn balance_is_optimal_with_equal_weights_for_2_to_1000_backends() {
        let mut worst = (0.0f64, 0usize, 0u32);
        for n in 2..=1000 {
            // At the default size every backend gets floor or ceil of M/n.
            let table = build(&backends(n, |_| 1), DEFAULT_TABLE_SIZE);
            let c = counts(&table, n);
            let (lo, hi) = (DEFAULT_TABLE_SIZE / n as u32, DEFAULT_TABLE_SIZE.div_ceil(n as u32));
            assert!(c.iter().all(|&x| x == lo || x == hi), "n={n}: counts outside {lo}..={hi}");

            let size = table_size_for(n);
            let c = if size == DEFAULT_TABLE_SIZE { c } else { counts(&build(&backends(n, |_| 1), size), n) };
            let mean = size as f64 / n as f64;
            let ratio = *c.iter().max().unwrap() as f64 / mean;
            assert!(ratio <= 1.01, "n={n}, size {size}: max/mean = {ratio}");
            if ratio > worst.0 {
                worst = (ratio, n, size);
            }
        }
        println!(
            "maglev balance: worst max/mean over 2..=1000 backends = {:.5} (n={}, table {})",
            worst.0, worst.1, worst.2
        );
    }

    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        for (n, bound) in [(10usize, 0.005f64), (100, 0.01), (1000, 0.01)] {
            let all = backends(n, |_| 1);
            let before = build(&all, DEFAULT_TABLE_SIZE);
            let gone = n / 2;
            let survivors: Vec<MaglevBackend> =
                all.iter().enumerate().filter(|&(i, _)| i != gone).map(|(_, b)| *b).collect();
            let after = build(&survivors, DEFAULT_TABLE_SIZE);
            // Positions shift by one past the removed backend; compare keys.
            let key_before = |s: u32| all[s as usize].key;
            let key_after = |s: u32| survivors[s as usize].key;
            let mut moved = 0u32;
            let mut own = 0u32;
            for (b, a) in before.iter().zip(&after) {
                if *b as usize == gone {
                    own += 1;
                    assert_ne!(key_after(*a), all[gone].key);
                } else if key_before(*b) != key_after(*a) {
                    moved += 1;
                }
            }
            let share = moved as f64 / DEFAULT_TABLE_SIZE as f64;
            println!(
                "maglev disruption: n={n}: removed backend's {own} slots moved; \
                 {moved} slots of survivors moved = {:.3}% of the table",
                share * 100.0
            );
            assert!(share <= bound, "n={n}: {share} of slots moved");
        }
    }

    #[test]
    fn slot_shares_follow_weights_within_2_percent() {
        let sets: [&[u32]; 4] = [&[1, 2], &[1, 2, 3, 4], &[10, 1, 1, 5, 7, 100], &[3, 3, 3, 1]];
        for weights in sets {
            let bs = backends(weights.len(), |i| weights[i]);
            let table = build(&bs, DEFAULT_TABLE_SIZE);
            let c = counts(&table, bs.len());
            let total: u32 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let want = w as f64 / total as f64;
                let got = c[i] as f64 / DEFAULT_TABLE_SIZE as f64;
                assert!((got - want).abs() / want <= 0.02, "weights {weights:?}: backend {i} has {got}, want {want}");
            }
        }
    }

    #[test]
    fn weight_zero_gets_no_slot_and_all_zero_is_empty() {
        let bs = backends(3, |i| if i == 1 { 0 } else { 1 });
        let table = build(&bs, 251);
        assert!(table.iter().all(|&s| s != 1 && s != EMPTY));
        let none = build(&backends(3, |_| 0), 251);
        assert!(none.iter().all(|&s| s == EMPTY));
        assert!(build(&[], 251).iter().all(|&s| s == EMPTY));
    }

    #[test]
    fn same_backends_in_any_order_give_the_same_table() {
        let bs = backends(50, |i| 1 + (i % 3) as u32);
        let a = build(&bs, DEFAULT_TABLE_SIZE);
        let mut reversed = bs.clone();
        reversed.reverse();
        let b = build(&reversed, DEFAULT_TABLE_SIZE);
        // Same backend (by key) in every slot.
        assert!(a.iter().zip(&b).all(|(x, y)| bs[*x as usize].key == reversed[*y as usize].key));
        assert_eq!(a, build(&bs, DEFAULT_TABLE_SIZE));
    }
}
