//! Seeded randomness for initialisation and dropout.
//!
//! Everything random in training is a pure function of `(seed, what, step, ...)`: a
//! counter-based stream keyed by those integers. The generator state is therefore never
//! saved: a resumed run derives the same numbers from the step it resumes at, and chunks
//! of a large dropout mask can be filled in parallel without changing the result.

pub use crate::synth::SplitMix64;

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
pub fn dropout_mask(seed: u64, key: &[u64], n: usize, p: f32) -> Vec<f32> {
    let mut mask = vec![1f32; n];
    dropout_in_place(seed, key, p, &mut mask, |x, keep| x * keep);
    mask
}

/// The stream a dropout mask is drawn from: chunk `c` of 2^16 elements uses
/// `SplitMix64::keyed(stream, &[c])` (the CUDA kernel draws the same numbers).
pub fn dropout_stream(seed: u64, key: &[u64]) -> u64 {
    SplitMix64::keyed(seed, key).next_u64()
}

/// Inverted dropout applied to `values` in place with the mask of [`dropout_mask`]:
/// dropped values become zero, kept ones `scale(value, 1 / (1 - p))`. Filled in parallel
/// chunks, each with its own sub-stream, so the result does not depend on the number of
/// threads.
pub fn dropout_in_place<T: Copy + Default + Send>(
    seed: u64,
    key: &[u64],
    p: f32,
    values: &mut [T],
    scale: impl Fn(T, f32) -> T + Sync,
) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let keep = 1.0 / (1.0 - p);
    let base = dropout_stream(seed, key);
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = SplitMix64::keyed(base, &[chunk as u64]);
            for v in values {
                *v = if rng.next_f32() < p {
                    T::default()
                } else {
                    scale(*v, keep)
                };
            }
        });
}

/// The decisions of [`dropout_in_place`] for `n` values as bits (set = kept), 64 per
/// word: the same draws, kept at 1/32 of the size of an f32 mask so that a layer's masks
/// can live from its forward pass to its backward pass.
pub fn dropout_bits(seed: u64, key: &[u64], n: usize, p: f32) -> Vec<u64> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let base = dropout_stream(seed, key);
    let mut bits = vec![0u64; n.div_ceil(64)];
    bits.par_chunks_mut(CHUNK / 64)
        .enumerate()
        .for_each(|(chunk, words)| {
            let mut rng = SplitMix64::keyed(base, &[chunk as u64]);
            let len = CHUNK.min(n - chunk * CHUNK);
            for i in 0..len {
                if rng.next_f32() >= p {
                    words[i / 64] |= 1 << (i % 64);
                }
            }
        });
    bits
}
