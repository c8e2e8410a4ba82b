//! The two building blocks of a plan's order: keyed permutations with O(1) random access,
//! and the interleaving schedule that keeps mixture shares exact in every prefix.

/// SplitMix64's finaliser: a good 64-bit mix for keys and round functions.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A key from several parts (seed, phase, epoch, group, cycle).
pub fn key(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x5eed_c0de_u64, |acc, &part| mix(acc ^ mix(part)))
}

/// A pseudo-random permutation of `0..n` chosen by `key`, evaluated one index at a time:
/// a balanced Feistel network on the smallest even number of bits covering `n`, with
/// cycle walking back into range. No table is stored, so any position of any epoch is
/// found in constant expected time.
#[derive(Clone, Copy, Debug)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    key: u64,
}

impl Permutation {
    pub fn new(n: u64, key: u64) -> Permutation {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        Permutation { n, half_bits, key }
    }

    /// The image of `i` (`i < n`).
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mask = (1u64 << self.half_bits) - 1;
        let mut x = i;
        loop {
            let (mut left, mut right) = (x >> self.half_bits, x & mask);
            for round in 0..4u64 {
                let f = mix(self.key ^ mix(right ^ (round << 56))) & mask;
                (left, right) = (right, left ^ f);
            }
            x = (left << self.half_bits) | right;
            if x < self.n {
                return x;
            }
        }
    }
}

/// Positions per checkpoint of the running counts of a [`Schedule`].
const BLOCK: usize = 1024;

/// Which group fills each position of an epoch, so that after every prefix each group's
/// count is within one of its exact share (`quota × prefix / total`). Item k (from 1) of a
/// group with quota q may take prefix length τ only inside (k−1)·T/q < τ < k·T/q + 1;
/// earliest-deadline-first over those windows always succeeds (Tijdeman: a sequence with
/// discrepancy below 1 exists for any shares, and EDF is optimal for unit jobs with
/// release times and deadlines). Ties go to the earlier group.
#[derive(Clone, Debug)]
pub struct Schedule {
    quotas: Vec<u64>,
    /// Group per position (empty for a single group).
    groups: Vec<u8>,
    /// Counts per group before each block of `BLOCK` positions.
    checkpoints: Vec<u32>,
}

impl Schedule {
    /// `quotas[g]` positions per epoch for group `g` (at most 255 groups).
    pub fn new(quotas: &[u64]) -> Schedule {
        assert!(quotas.len() <= 255, "at most 255 groups");
        let total: u64 = quotas.iter().sum();
        let g = quotas.len();
        if g <= 1 {
            return Schedule {
                quotas: quotas.to_vec(),
                groups: Vec::new(),
                checkpoints: Vec::new(),
            };
        }
        let t128 = u128::from(total);
        // Release (earliest prefix length) and deadline (latest) of item k of a group.
        let release = |k: u64, q: u64| (u128::from(k - 1) * t128 / u128::from(q)) as u64 + 1;
        let deadline = |k: u64, q: u64| (u128::from(k) * t128).div_ceil(u128::from(q)) as u64;
        let mut groups = Vec::with_capacity(total as usize);
        let mut checkpoints = Vec::with_capacity((total as usize / BLOCK + 1) * g);
        let mut counts = vec![0u64; g];
        // Release and deadline of each group's next item (never released once its quota
        // is met): only the chosen group's change per position, so only it is recomputed.
        let next = |count: u64, quota: u64| {
            if count < quota {
                (release(count + 1, quota), deadline(count + 1, quota))
            } else {
                (u64::MAX, u64::MAX)
            }
        };
        let mut upcoming: Vec<(u64, u64)> = quotas.iter().map(|&q| next(0, q)).collect();
        for t in 0..total {
            if (t as usize).is_multiple_of(BLOCK) {
                checkpoints.extend(counts.iter().map(|&c| c as u32));
            }
            let tau = t + 1;
            let (mut best_due, mut chosen) = (u64::MAX, usize::MAX);
            for (i, &(released, due)) in upcoming.iter().enumerate() {
                if released <= tau && due < best_due {
                    (best_due, chosen) = (due, i);
                }
            }
            assert!(chosen < g, "some group always has a released item");
            counts[chosen] += 1;
            upcoming[chosen] = next(counts[chosen], quotas[chosen]);
            groups.push(chosen as u8);
        }
        Schedule {
            quotas: quotas.to_vec(),
            groups,
            checkpoints,
        }
    }

    pub fn len(&self) -> u64 {
        self.quotas.iter().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The group at position `t` and how many positions of that group come before it.
    pub fn at(&self, t: u64) -> (usize, u64) {
        if self.groups.is_empty() {
            return (0, t);
        }
        let t = t as usize;
        let group = self.groups[t] as usize;
        let block = t / BLOCK;
        let g = self.quotas.len();
        let mut before = u64::from(self.checkpoints[block * g + group]);
        before += self.groups[block * BLOCK..t]
            .iter()
            .filter(|&&x| x as usize == group)
            .count() as u64;
        (group, before)
    }

    /// Bytes this schedule holds (for reports).
    pub fn bytes(&self) -> usize {
        self.groups.len() + self.checkpoints.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_bijections_and_depend_on_the_key() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4097] {
            let p = Permutation::new(n, 42);
            let mut seen: Vec<u64> = (0..n).map(|i| p.apply(i)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
        let a: Vec<u64> = (0..100)
            .map(|i| Permutation::new(100, 1).apply(i))
            .collect();
        let b: Vec<u64> = (0..100)
            .map(|i| Permutation::new(100, 2).apply(i))
            .collect();
        assert_ne!(a, b);
    }

    #[test]
    fn every_prefix_of_a_schedule_is_within_one_of_exact() {
        for quotas in [
            vec![3u64, 5, 7],
            vec![1, 1, 98],
            vec![500, 300, 150, 49, 1],
            vec![10, 0, 10],
        ] {
            let s = Schedule::new(&quotas);
            let total: u64 = quotas.iter().sum();
            let mut counts = vec![0u64; quotas.len()];
            for t in 0..total {
                let (g, before) = s.at(t);
                assert_eq!(before, counts[g]);
                counts[g] += 1;
                for (i, &q) in quotas.iter().enumerate() {
                    let exact = (t + 1) as f64 * q as f64 / total as f64;
                    assert!(
                        (counts[i] as f64 - exact).abs() < 1.0,
                        "{quotas:?} at {t}: group {i} has {} for {exact:.3}",
                        counts[i]
                    );
                }
            }
            assert_eq!(counts, quotas);
        }
    }

    /// The schedule is part of every plan's order (and not of its fingerprint), so it
    /// must stay the earliest-deadline choice among released items, recomputed for
    /// every group at every position as its definition reads.
    #[test]
    fn a_schedule_is_the_earliest_deadline_order_of_its_definition() {
        fn direct(quotas: &[u64]) -> Vec<usize> {
            let total: u64 = quotas.iter().sum();
            let mut counts = vec![0u64; quotas.len()];
            let mut order = Vec::new();
            for tau in 1..=total {
                let mut best: Option<(f64, usize)> = None;
                for (i, &q) in quotas.iter().enumerate() {
                    let k = counts[i] + 1;
                    if k > q
                        || ((k - 1) as f64 * total as f64 / q as f64).floor() + 1.0 > tau as f64
                    {
                        continue;
                    }
                    let due = (k as f64 * total as f64 / q as f64).ceil();
                    if best.is_none_or(|(d, _)| due < d) {
                        best = Some((due, i));
                    }
                }
                let chosen = best.expect("a released item").1;
                counts[chosen] += 1;
                order.push(chosen);
            }
            order
        }
        for quotas in [
            vec![3u64, 5, 7],
            vec![1, 1, 98],
            vec![500, 300, 150, 49, 1],
            vec![10, 0, 10],
            vec![260, 180, 160, 130, 100, 60, 40, 35, 25, 10],
        ] {
            let s = Schedule::new(&quotas);
            let total: u64 = quotas.iter().sum();
            let ours: Vec<usize> = (0..total).map(|t| s.at(t).0).collect();
            assert_eq!(ours, direct(&quotas), "{quotas:?}");
        }
    }
}
