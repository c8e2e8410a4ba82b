//! Seeded randomness for initialisation and dropout.
//!
//! Everything random in training is a pure function of `(seed, what, step, ...)`: a
//! counter-based stream keyed by those integers. The generator state is therefore never
//! saved: a resumed run derives the same numbers from the step it resumes at, and chunks
//! of a large dropout mask can be filled in parallel without changing the result.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for masks and init.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The stream for a key: the seed mixed with each integer of the key in turn.
    pub fn keyed(seed: u64, key: &[u64]) -> SplitMix64 {
        let mut state = SplitMix64(seed);
        for &k in key {
            state = SplitMix64(state.next_u64() ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 24 bits of precision.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn next_normal(&mut self) -> f32 {
        let u1 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// `n` values uniform in `[-bound, bound)` from the stream of `key`.
pub fn uniform(seed: u64, key: &[u64], n: usize, bound: f32) -> Vec<f32> {
    let mut rng = SplitMix64::keyed(seed, key);
    (0..n)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
        .collect()
}

/// `n` values from a normal distribution with standard deviation `std`.
pub fn normal(seed: u64, key: &[u64], n: usize, std: f32) -> Vec<f32> {
    let mut rng = SplitMix64::keyed(seed, key);
    (0..n).map(|_| rng.next_normal() * std).collect()
}

/// An inverted-dropout mask of `n` values: `0` with probability `p`, else `1 / (1 - p)`.
/// Filled in parallel chunks, each with its own sub-stream, so the result does not
/// depend on the number of threads.
pub fn dropout_mask(seed: u64, key: &[u64], n: usize, p: f32) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let keep = 1.0 / (1.0 - p);
    let mut mask = vec![0f32; n];
    let base = SplitMix64::keyed(seed, key).next_u64();
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = SplitMix64::keyed(base, &[chunk as u64]);
            for v in values {
                *v = if rng.next_f32() < p { 0.0 } else { keep };
            }
        });
    mask
}
