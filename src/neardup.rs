//! Near-duplicate clusters: MinHash signatures over word n-grams, LSH banding, candidate
//! pairs verified by their estimated Jaccard similarity, union-find clusters, and a kept
//! representative per cluster; the others are excluded, reversibly, like the quality
//! filters' exclusions.
//!
//! # Signatures
//!
//! The training text (every message's content, joined by newlines) is simplified the way
//! datatrove's MinHash stage does it: lower case, each number (digits, optionally with one
//! decimal part) becomes `0`, everything that is not a letter or digit separates words.
//! Each word is hashed once (FNV-1a 64, then a SplitMix64 finaliser); an n-gram's hash
//! mixes its words' hashes in order, and distinct n-gram hashes are the shingles (a text
//! shorter than n words is one shingle). For each of `bands × rows` hash functions
//! `h_i(x) = (a_i·x + b_i mod 2^64) >> 32` (multiply-add-shift, `a_i` odd and `b_i` drawn
//! from SplitMix64 of the seed) the signature keeps the minimum over the shingles, 32
//! bits. datatrove computes `(a_i·x + b_i) mod (2^61 − 1)` instead; over shingle hashes
//! that are already uniformly mixed both behave as random permutations, and the 64-bit
//! product vectorises (AVX2 / AVX-512 when the CPU has them, chosen at run time, the same
//! bits either way). Two signatures agree in a slot with probability equal to the Jaccard
//! similarity of the shingle sets (plus about 2^-32), so the share of equal slots
//! estimates it.
//!
//! # Candidates, pairs, clusters
//!
//! Band `k`'s `rows` values hash (with `k`) to one 64-bit bucket key; examples sharing a
//! bucket are candidates. With the defaults (14 bands × 8 rows, as datatrove) a pair at
//! Jaccard 0.8 shares a bucket with probability 1 − (1 − 0.8^8)^14 = 0.92, at 0.9 with
//! 0.9999. A candidate pair whose estimated similarity is at least [`PAIR_FLOOR`] is kept
//! in the store with that estimate, so clusters can be recomputed at any threshold above
//! the floor without signing again. Each member of a bucket is compared with at most
//! [`BUCKET_COMPARE`] earlier members: enough to connect a cluster, and it bounds the work
//! of a bucket that thousands of templated examples share. Clusters are the connected
//! components of the pairs at or above the threshold (union-find).
//!
//! # The representative
//!
//! Each cluster keeps one member: the one whose best source comes first in the priority
//! list (sources not listed come after every listed one), then the one with the most
//! assistant characters, then the smallest hash. The others are excluded under the name
//! [`EXCLUSION_NAME`] with the reason `near-dup of <hash> (J=0.87)` (the estimated
//! similarity to the representative); [`undo`] lifts them, nothing is deleted.
//!
//! # Incremental
//!
//! Signatures and bucket keys are stored per example (`neardup` family of the store), with
//! the ordinal below which every example is signed, so a later run reads and signs only
//! the examples imported since and compares them with each other and with the stored
//! buckets; pairs between stored examples are already in the store. Clustering
//! reads every stored pair, which costs memory in proportion to the pairs, not the corpus.

use std::collections::{BTreeMap, HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;

use crate::conversation::{ContentHash, Conversation, Role};
use crate::store::{self, ClusterMembership, Exclusion, NearDupParams, Store};

/// The name near-duplicate exclusions are recorded under (as a filter's name).
pub const EXCLUSION_NAME: &str = "near-dup";

/// Version of the shingling and hashing below; stored with the signatures.
pub const SIGNATURE_VERSION: u32 = 1;

/// Candidate pairs estimated below this similarity are not kept; thresholds must be at
/// least this.
pub const PAIR_FLOOR: f64 = 0.5;

/// Earlier members of one bucket each member is compared with.
pub const BUCKET_COMPARE: usize = 32;

/// The memtable size a run's store should be opened with (`StoreOptions::
/// write_buffer_bytes`): a run writes signatures and bucket keys in bulk while it holds the
/// new signatures in memory, and smaller memtables keep its peak near 0.6 GB at 500k
/// examples (BENCHMARKS.md).
pub const WRITE_BUFFER_BYTES: usize = 32 << 20;

/// Examples signed, and keys written, per store batch.
const CHUNK: usize = 8192;

/// MinHash and clustering parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// Words per shingle.
    pub ngram: usize,
    /// LSH bands; signatures have `bands × rows` values.
    pub bands: usize,
    /// Values per band.
    pub rows: usize,
    /// Seed of the permutations: the same seed gives the same signatures.
    pub seed: u64,
    /// Pairs at or above this estimated Jaccard similarity are near-duplicates.
    pub threshold: f64,
}

impl Default for Config {
    /// datatrove's defaults: 5-grams, 14 bands × 8 rows (112 permutations), seed 1; and a
    /// threshold of 0.8.
    fn default() -> Config {
        Config {
            ngram: 5,
            bands: 14,
            rows: 8,
            seed: 1,
            threshold: 0.8,
        }
    }
}

impl Config {
    fn params(&self) -> NearDupParams {
        NearDupParams {
            version: SIGNATURE_VERSION,
            ngram: self.ngram as u32,
            bands: self.bands as u32,
            rows: self.rows as u32,
            seed: self.seed,
        }
    }

    /// Checks the values a user gave.
    pub fn validate(&self) -> Result<(), crate::invalid::Invalid> {
        if self.ngram == 0 || self.bands == 0 || self.rows == 0 {
            return Err("n-gram size, bands and rows must be at least 1".into());
        }
        if self.bands > 255 || self.bands * self.rows > 4096 {
            return Err(format!(
                "{} bands × {} rows is too many (at most 255 bands, 4096 permutations)",
                self.bands, self.rows
            )
            .into());
        }
        if !(PAIR_FLOOR..=1.0).contains(&self.threshold) {
            return Err(format!(
                "threshold {} is outside [{PAIR_FLOOR}, 1] (pairs below {PAIR_FLOOR} are not kept)",
                self.threshold
            )
            .into());
        }
        Ok(())
    }
}

/// Computes signatures and bucket keys for one [`Config`].
#[derive(Clone, Debug)]
pub struct MinHasher {
    ngram: usize,
    bands: usize,
    rows: usize,
    a: Vec<u64>,
    b: Vec<u64>,
}

impl MinHasher {
    pub fn new(config: &Config) -> MinHasher {
        let permutations = config.bands * config.rows;
        let mut rng = crate::synth::SplitMix64::new(config.seed);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..permutations {
            // Odd multipliers: x -> a·x is then a bijection of u64.
            a.push(rng.next_u64() | 1);
            b.push(rng.next_u64());
        }
        MinHasher {
            ngram: config.ngram,
            bands: config.bands,
            rows: config.rows,
            a,
            b,
        }
    }

    pub fn permutations(&self) -> usize {
        self.a.len()
    }

    /// The distinct shingle hashes of `text`, sorted.
    pub fn shingles(&self, text: &str) -> Vec<u64> {
        shingles(text, self.ngram)
    }

    /// The MinHash signature of `text`; all `u32::MAX` for a text without words.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        self.signature_of_shingles(&self.shingles(text))
    }

    pub fn signature_of_shingles(&self, shingles: &[u64]) -> Vec<u32> {
        let mut minimum = vec![u32::MAX; self.permutations()];
        #[cfg(target_arch = "x86_64")]
        {
            // The same integer operations, vectorised for the wider units when the CPU
            // has them (the result is bit for bit the same).
            if std::arch::is_x86_feature_detected!("avx512dq") {
                // SAFETY: the CPU supports the features the function is compiled for.
                unsafe { min_hash_avx512(&self.a, &self.b, shingles, &mut minimum) };
                return minimum;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: as above.
                unsafe { min_hash_avx2(&self.a, &self.b, shingles, &mut minimum) };
                return minimum;
            }
        }
        min_hash(&self.a, &self.b, shingles, &mut minimum);
        minimum
    }

    /// One bucket key per band; none for a text without words (it matches nothing).
    pub fn buckets(&self, signature: &[u32]) -> Vec<u64> {
        if signature.iter().all(|&v| v == u32::MAX) {
            return Vec::new();
        }
        signature
            .chunks_exact(self.rows)
            .take(self.bands)
            .enumerate()
            .map(|(band, rows)| {
                let mut h = mix(band as u64 ^ 0x6e65_6172_6475_7021);
                for &v in rows {
                    h = mix(h ^ u64::from(v));
                }
                h
            })
            .collect()
    }
}

/// Folds every shingle into the running minimum of each permutation
/// `h_i(x) = (a_i·x + b_i mod 2^64) >> 32` (multiply-add-shift: the high half of the
/// product depends on every bit of the already well-mixed shingle hash).
#[inline(always)]
fn min_hash(a: &[u64], b: &[u64], shingles: &[u64], minimum: &mut [u32]) {
    for &x in shingles {
        for ((low, &a), &b) in minimum.iter_mut().zip(a).zip(b) {
            let v = (a.wrapping_mul(x).wrapping_add(b) >> 32) as u32;
            *low = (*low).min(v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
unsafe fn min_hash_avx512(a: &[u64], b: &[u64], shingles: &[u64], minimum: &mut [u32]) {
    min_hash(a, b, shingles, minimum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn min_hash_avx2(a: &[u64], b: &[u64], shingles: &[u64], minimum: &mut [u32]) {
    min_hash(a, b, shingles, minimum)
}

/// SplitMix64's finaliser: a bijection on u64 that spreads every input bit.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The words of `text` as datatrove's simplification leaves them, hashed: lower case,
/// numbers as `0`, separated by anything that is not alphanumeric.
fn word_hashes(text: &str) -> Vec<u64> {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0100_0000_01b3;
    let mut words = Vec::with_capacity(text.len() / 5);
    let mut h = FNV_OFFSET;
    let mut in_word = false;
    let mut in_number = false;
    let mut chars = text.chars().peekable();
    let feed = |h: &mut u64, c: char| {
        let mut buf = [0u8; 4];
        for &byte in c.encode_utf8(&mut buf).as_bytes() {
            *h = (*h ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
    };
    while let Some(c) = chars.next() {
        if c.is_numeric() {
            // A number (with at most one decimal part) is one `0`.
            if !in_number {
                feed(&mut h, '0');
                in_number = true;
            }
            in_word = true;
            if matches!(chars.peek(), Some('.' | ',')) {
                let mut ahead = chars.clone();
                ahead.next();
                if ahead.peek().is_some_and(|d| d.is_numeric()) {
                    chars.next();
                }
            }
        } else if c.is_alphanumeric() {
            in_number = false;
            in_word = true;
            if c.is_ascii() {
                feed(&mut h, c.to_ascii_lowercase());
            } else {
                for lower in c.to_lowercase() {
                    feed(&mut h, lower);
                }
            }
        } else {
            in_number = false;
            if in_word {
                words.push(mix(h));
                h = FNV_OFFSET;
                in_word = false;
            }
        }
    }
    if in_word {
        words.push(mix(h));
    }
    words
}

/// Distinct n-gram hashes of `text`, sorted.
pub fn shingles(text: &str, ngram: usize) -> Vec<u64> {
    let words = word_hashes(text);
    if words.is_empty() {
        return Vec::new();
    }
    let n = ngram.min(words.len());
    let mut out: Vec<u64> = words
        .windows(n)
        .map(|window| {
            let mut h = n as u64;
            for &w in window {
                h = mix(h.rotate_left(17) ^ w);
            }
            h
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The text near-duplicates are judged on: every message's content, in order.
pub fn training_text(conversation: &Conversation) -> String {
    let mut text = String::new();
    for (i, message) in conversation.messages.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        text.push_str(&message.content);
    }
    text
}

/// The share of equal slots of two signatures: the estimated Jaccard similarity.
pub fn estimated_jaccard(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 0.0;
    }
    let equal = a.iter().zip(b).filter(|(x, y)| x == y).count();
    equal as f64 / a.len() as f64
}

/// The exact Jaccard similarity of two sorted shingle sets (the brute-force reference).
pub fn exact_jaccard(a: &[u64], b: &[u64]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    common as f64 / (a.len() + b.len() - common) as f64
}

/// What a run should do.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub config: Config,
    /// Source names, highest priority first, for choosing representatives.
    pub priority: Vec<String>,
    /// Compute and count, write nothing.
    pub dry_run: bool,
}

/// Where a run is, for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Reading the store and signing examples without a signature.
    Signing,
    /// Looking up and verifying candidate pairs.
    Linking,
    /// Writing signatures, buckets and pairs.
    Writing,
    /// Building clusters and choosing representatives.
    Clustering,
}

/// What a run did (or, dry, would do).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Outcome {
    pub dry_run: bool,
    pub threshold: f64,
    /// Examples in the store.
    pub examples: u64,
    /// Examples signed by this run (the others had a signature).
    pub signed: u64,
    /// Whether stored signatures were dropped because the parameters changed.
    pub resigned_all: bool,
    /// Candidate pairs compared by this run.
    pub candidates: u64,
    /// Pairs found by this run at or above [`PAIR_FLOOR`].
    pub new_pairs: u64,
    /// Clusters (two or more members) at the threshold.
    pub clusters: u64,
    /// Examples in clusters.
    pub members: u64,
    /// Members that are not their cluster's representative.
    pub near_duplicates: u64,
    /// Near-duplicates newly excluded (or whose reason changed).
    pub excluded: u64,
    /// Near-duplicates that were excluded already, for the same reason.
    pub kept: u64,
    /// Exclusions lifted (the example is now a representative or in no cluster).
    pub lifted: u64,
    /// The largest cluster's size.
    pub largest_cluster: u64,
}

/// Signs what is unsigned, links new pairs, clusters at the threshold and excludes every
/// member that is not its cluster's representative (see the module docs).
pub fn run(
    store: &Store,
    options: &Options,
    progress: &dyn Fn(Stage, u64, u64),
) -> store::Result<Outcome> {
    let config = &options.config;
    let hasher = MinHasher::new(config);
    let params = config.params();
    let examples = store.counters()?.examples;
    let mut outcome = Outcome {
        dry_run: options.dry_run,
        threshold: config.threshold,
        examples,
        ..Outcome::default()
    };
    // Stored signatures are usable only if they were made the same way.
    let stored_params = store.neardup_params()?;
    let reuse = stored_params == Some(params);
    outcome.resigned_all = !reuse && store.has_signatures()?;
    if !options.dry_run && !reuse {
        let mut counters = store.counters()?;
        let mut batch = store.near_dup_batch(&mut counters);
        batch.reset_signatures(&params);
        batch.commit()?;
    }
    let had_signatures = reuse && store.has_signatures()?;
    // Examples below this ordinal are signed: only those after it are read (in hash
    // order; a first run reads the whole store in its physical order); a killed run may
    // have signed some of those, which are skipped.
    let signed_through = if reuse { store.signed_through()? } else { 0 };
    let mut unsigned_hashes = Vec::new();
    if signed_through > 0 {
        for item in store.ordinals() {
            let (ordinal, hash) = item?;
            if ordinal >= signed_through {
                unsigned_hashes.push(hash);
            }
        }
        unsigned_hashes.sort_unstable();
    }

    // 1. Sign every example without a signature, in hash order, chunks on rayon.
    let mut new_hashes: Vec<ContentHash> = Vec::new();
    let mut new_signatures: Vec<u32> = Vec::new();
    let width = hasher.permutations();
    {
        let mut cursor = store.signature_cursor();
        let mut pending: Vec<(ContentHash, String)> = Vec::with_capacity(CHUNK);
        let mut done = 0u64;
        let mut sign = |pending: &mut Vec<(ContentHash, String)>| {
            let signed: Vec<Vec<u32>> = pending
                .par_iter()
                .map(|(_, text)| hasher.signature(text))
                .collect();
            for ((hash, _), signature) in pending.drain(..).zip(signed) {
                new_hashes.push(hash);
                new_signatures.extend_from_slice(&signature);
            }
        };
        let mut visit = |hash: &ContentHash, example: store::StoredExample| {
            done += 1;
            if reuse && cursor.get(hash)?.is_some() {
                return Ok(());
            }
            pending.push((*hash, training_text(&example.conversation)));
            if pending.len() >= CHUNK {
                sign(&mut pending);
                progress(Stage::Signing, done, examples);
            }
            Ok(())
        };
        if signed_through == 0 {
            store.for_each_example(&mut visit)?;
        } else {
            store.for_each_sorted(&unsigned_hashes, &mut visit)?;
        }
        sign(&mut pending);
        progress(Stage::Signing, done, examples);
    }
    outcome.signed = new_hashes.len() as u64;
    let signature_of = |i: usize| &new_signatures[i * width..(i + 1) * width];

    // 2. Candidates among the new examples: sort (bucket, index) and walk equal runs.
    // (Bucket keys are cheap to recompute from a signature: they are not kept per example.)
    let mut keyed: Vec<(u64, u32)> = (0..new_hashes.len())
        .into_par_iter()
        .flat_map_iter(|i| {
            hasher
                .buckets(signature_of(i))
                .into_iter()
                .map(move |bucket| (bucket, i as u32))
        })
        .collect();
    keyed.par_sort_unstable();
    let mut checked: HashSet<(u32, u32)> = HashSet::new();
    let mut new_pairs: Vec<(ContentHash, ContentHash, f32)> = Vec::new();
    let mut start = 0;
    while start < keyed.len() {
        let mut end = start + 1;
        while end < keyed.len() && keyed[end].0 == keyed[start].0 {
            end += 1;
        }
        for later in start + 1..end {
            let j = keyed[later].1;
            for &(_, i) in &keyed[later.saturating_sub(BUCKET_COMPARE).max(start)..later] {
                if !checked.insert((i, j)) {
                    continue;
                }
                outcome.candidates += 1;
                let jaccard = estimated_jaccard(signature_of(i as usize), signature_of(j as usize));
                if jaccard >= PAIR_FLOOR {
                    new_pairs.push((
                        new_hashes[i as usize],
                        new_hashes[j as usize],
                        jaccard as f32,
                    ));
                }
            }
        }
        start = end;
    }
    drop(checked);
    progress(Stage::Linking, 0, new_hashes.len() as u64);

    // 3. Candidates between new and stored examples: the stored buckets hold only
    //    examples signed by earlier runs (this run's are written below).
    let mut stored_signatures: HashMap<ContentHash, Vec<u32>> = HashMap::new();
    if had_signatures {
        let mut seen: HashSet<(u32, ContentHash)> = HashSet::new();
        let mut previous = None;
        let mut members = Vec::new();
        for (n, &(bucket, i)) in keyed.iter().enumerate() {
            if previous != Some(bucket) {
                members = store.bucket_members(bucket, BUCKET_COMPARE)?;
                previous = Some(bucket);
            }
            for other in &members {
                if *other == new_hashes[i as usize] || !seen.insert((i, *other)) {
                    continue;
                }
                if !stored_signatures.contains_key(other) {
                    let Some(signature) = store.signature(other)? else {
                        continue;
                    };
                    stored_signatures.insert(*other, signature);
                }
                outcome.candidates += 1;
                let jaccard =
                    estimated_jaccard(signature_of(i as usize), &stored_signatures[other]);
                if jaccard >= PAIR_FLOOR {
                    new_pairs.push((new_hashes[i as usize], *other, jaccard as f32));
                }
            }
            if n % 65_536 == 0 {
                progress(Stage::Linking, n as u64, keyed.len() as u64);
            }
        }
    }
    drop(keyed);
    outcome.new_pairs = new_pairs.len() as u64;

    // 4. Write pairs first, then signatures: a run killed in between signs the rest again
    //    and finds their pairs with the stored ones, so no pair is lost.
    if !options.dry_run {
        let mut counters = store.counters()?;
        let mut batch = store.near_dup_batch(&mut counters);
        for (a, b, jaccard) in &new_pairs {
            batch.put_pair(a, b, *jaccard);
            if batch.len() >= CHUNK * 4 {
                batch.commit()?;
                batch = store.near_dup_batch(&mut counters);
            }
        }
        batch.commit()?;
        for (chunk_index, chunk) in new_hashes.chunks(CHUNK).enumerate() {
            let mut batch = store.near_dup_batch(&mut counters);
            let mut chunk_buckets = Vec::with_capacity(chunk.len() * config.bands);
            for (offset, hash) in chunk.iter().enumerate() {
                let i = chunk_index * CHUNK + offset;
                batch.put_signature(hash, signature_of(i));
                chunk_buckets.extend(
                    hasher
                        .buckets(signature_of(i))
                        .into_iter()
                        .map(|bucket| (bucket, *hash)),
                );
            }
            // Keys in sorted order: consecutive memtable inserts share their search path.
            chunk_buckets.sort_unstable();
            for (bucket, hash) in &chunk_buckets {
                batch.put_bucket(*bucket, hash);
            }
            batch.commit()?;
            progress(
                Stage::Writing,
                ((chunk_index + 1) * CHUNK).min(new_hashes.len()) as u64,
                new_hashes.len() as u64,
            );
        }
    }

    if !options.dry_run && signed_through != examples {
        let mut counters = store.counters()?;
        let mut batch = store.near_dup_batch(&mut counters);
        batch.set_signed_through(examples);
        batch.commit()?;
    }

    // 5. Clusters over every pair at the threshold.
    let mut pairs: Vec<(ContentHash, ContentHash, f32)> = Vec::new();
    if reuse || !options.dry_run {
        for pair in store.near_dup_pairs() {
            let pair = pair?;
            if f64::from(pair.2) >= config.threshold {
                pairs.push(pair);
            }
        }
    }
    if options.dry_run {
        pairs.extend(
            new_pairs
                .iter()
                .filter(|p| f64::from(p.2) >= config.threshold)
                .map(|&(a, b, j)| if a < b { (a, b, j) } else { (b, a, j) }),
        );
        pairs.sort_unstable_by_key(|p| (p.0, p.1));
        pairs.dedup_by(|x, y| (x.0, x.1) == (y.0, y.1));
    }
    drop(new_pairs);
    let clusters = clusters(&pairs);
    progress(Stage::Clustering, 0, clusters.len() as u64);

    // The facts the representative rule needs, for every member (hash order).
    let rank: HashMap<&str, usize> = options
        .priority
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i))
        .collect();
    let import_source: HashMap<u32, String> = store
        .imports()?
        .into_iter()
        .map(|i| (i.id, i.source))
        .collect();
    let mut all_members: Vec<ContentHash> = clusters.iter().flatten().copied().collect();
    all_members.sort_unstable();
    let mut facts: HashMap<ContentHash, (usize, u64)> = HashMap::with_capacity(all_members.len());
    let mut provenance = store.provenance_cursor();
    store.for_each_sorted(&all_members, |hash, example| {
        let best_source = provenance
            .get(hash)?
            .iter()
            .filter_map(|p| import_source.get(&p.import_id))
            .map(|source| rank.get(source.as_str()).copied().unwrap_or(usize::MAX))
            .min()
            .unwrap_or(usize::MAX);
        let assistant_chars: u64 = example
            .conversation
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| m.content.chars().count() as u64)
            .sum();
        facts.insert(*hash, (best_source, assistant_chars));
        Ok(())
    })?;
    // `new_hashes` is in hash order (the store walk's): found by binary search.
    let signature = |hash: &ContentHash| -> store::Result<Option<Vec<u32>>> {
        if let Ok(i) = new_hashes.binary_search(hash) {
            return Ok(Some(signature_of(i).to_vec()));
        }
        if let Some(signature) = stored_signatures.get(hash) {
            return Ok(Some(signature.clone()));
        }
        store.signature(hash)
    };
    let mut memberships: HashMap<ContentHash, ClusterMembership> =
        HashMap::with_capacity(all_members.len());
    for members in &clusters {
        let representative = *members
            .iter()
            .min_by_key(|hash| {
                let (source, chars) = facts.get(hash).copied().unwrap_or((usize::MAX, 0));
                (source, std::cmp::Reverse(chars), **hash)
            })
            .expect("a cluster has members");
        let mut kept_signature = None;
        let mut kept = || -> store::Result<Vec<u32>> {
            if kept_signature.is_none() {
                kept_signature = Some(signature(&representative)?.unwrap_or_default());
            }
            Ok(kept_signature.clone().unwrap_or_default())
        };
        outcome.clusters += 1;
        outcome.members += members.len() as u64;
        outcome.largest_cluster = outcome.largest_cluster.max(members.len() as u64);
        for hash in members {
            let jaccard = if *hash == representative {
                1.0
            } else {
                outcome.near_duplicates += 1;
                // Most members are paired with the representative directly (pairs are
                // sorted by their two hashes); the others are compared by signature.
                let key = if *hash < representative {
                    (*hash, representative)
                } else {
                    (representative, *hash)
                };
                match pairs.binary_search_by_key(&key, |p| (p.0, p.1)) {
                    Ok(at) => pairs[at].2,
                    Err(_) => {
                        estimated_jaccard(&signature(hash)?.unwrap_or_default(), &kept()?) as f32
                    }
                }
            };
            memberships.insert(
                *hash,
                ClusterMembership {
                    cluster: members[0],
                    representative,
                    jaccard,
                    members: members.len() as u32,
                },
            );
        }
    }

    // 6. Memberships and exclusions: write what changed, lift what no longer holds.
    let mut previous_exclusions: HashMap<ContentHash, String> = HashMap::new();
    for item in store.exclusions() {
        let (hash, exclusion) = item?;
        if exclusion.filter == EXCLUSION_NAME {
            previous_exclusions.insert(hash, exclusion.measured);
        }
    }
    let mut previous_memberships: HashMap<ContentHash, ClusterMembership> = HashMap::new();
    for item in store.cluster_memberships() {
        let (hash, membership) = item?;
        previous_memberships.insert(hash, membership);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut counters = store.counters()?;
    let mut batch = store.near_dup_batch(&mut counters);
    let mut sorted: Vec<(&ContentHash, &ClusterMembership)> = memberships.iter().collect();
    sorted.sort_unstable_by_key(|(hash, _)| **hash);
    for (hash, membership) in sorted {
        if previous_memberships.get(hash) != Some(membership) {
            batch.set_membership(hash, membership);
        }
        if membership.representative == *hash {
            continue;
        }
        let measured = reason(&membership.representative, membership.jaccard);
        if previous_exclusions.get(hash) == Some(&measured) {
            outcome.kept += 1;
        } else {
            outcome.excluded += 1;
            batch.exclude(
                hash,
                &Exclusion {
                    filter: EXCLUSION_NAME.to_string(),
                    measured,
                    unix: now,
                },
            );
        }
        if batch.len() >= CHUNK && !options.dry_run {
            batch.commit()?;
            batch = store.near_dup_batch(&mut counters);
        }
    }
    let mut gone: Vec<&ContentHash> = previous_memberships
        .keys()
        .filter(|h| !memberships.contains_key(h))
        .collect();
    gone.sort_unstable();
    for hash in gone {
        batch.remove_membership(hash);
    }
    let mut freed: Vec<&ContentHash> = previous_exclusions
        .keys()
        .filter(|h| memberships.get(h).is_none_or(|m| m.representative == **h))
        .collect();
    freed.sort_unstable();
    for hash in freed {
        outcome.lifted += 1;
        batch.lift(hash, EXCLUSION_NAME);
        if batch.len() >= CHUNK && !options.dry_run {
            batch.commit()?;
            batch = store.near_dup_batch(&mut counters);
        }
    }
    if !options.dry_run {
        batch.commit()?;
        store.flush()?;
    }
    progress(Stage::Clustering, outcome.clusters, outcome.clusters);
    Ok(outcome)
}

/// The exclusion reason of a near-duplicate.
pub fn reason(representative: &ContentHash, jaccard: f32) -> String {
    format!("near-dup of {} (J={jaccard:.2})", representative.to_hex())
}

/// Connected components with two or more members, each sorted (so its first member is
/// its id), in order of their ids.
fn clusters(pairs: &[(ContentHash, ContentHash, f32)]) -> Vec<Vec<ContentHash>> {
    let mut index: HashMap<ContentHash, usize> = HashMap::new();
    let mut hashes = Vec::new();
    let mut id = |hash: ContentHash, hashes: &mut Vec<ContentHash>| {
        *index.entry(hash).or_insert_with(|| {
            hashes.push(hash);
            hashes.len() - 1
        })
    };
    let mut parent: Vec<usize> = Vec::new();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for &(a, b, _) in pairs {
        let (a, b) = (id(a, &mut hashes), id(b, &mut hashes));
        parent.resize(hashes.len(), usize::MAX);
        for x in [a, b] {
            if parent[x] == usize::MAX {
                parent[x] = x;
            }
        }
        let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
        if ra != rb {
            // The smaller index becomes the root: the result does not depend on pair order
            // beyond which components exist.
            parent[ra.max(rb)] = ra.min(rb);
        }
    }
    let mut components: BTreeMap<usize, Vec<ContentHash>> = BTreeMap::new();
    for (x, hash) in hashes.iter().enumerate() {
        let root = find(&mut parent, x);
        components.entry(root).or_default().push(*hash);
    }
    let mut out: Vec<Vec<ContentHash>> = components
        .into_values()
        .map(|mut members| {
            members.sort_unstable();
            members
        })
        .collect();
    out.sort_unstable_by_key(|members| members[0]);
    out
}

/// Lifts every near-duplicate exclusion; returns how many examples it freed. Clusters and
/// signatures stay, so `cluster:` queries still work and the next run is incremental.
pub fn undo(store: &Store) -> store::Result<u64> {
    crate::filters::undo(store, EXCLUSION_NAME)
}

/// One member of a cluster, as `show` and queries report it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Member {
    pub hash: ContentHash,
    pub membership: ClusterMembership,
}

/// The members of the cluster whose id (see [`ClusterMembership::cluster_id`]) starts with
/// `id_hex`, in hash order.
pub fn cluster_members(store: &Store, id_hex: &str) -> store::Result<Vec<Member>> {
    let id_hex = id_hex.to_ascii_lowercase();
    let mut out = Vec::new();
    for item in store.cluster_memberships() {
        let (hash, membership) = item?;
        if membership.cluster.to_hex().starts_with(&id_hex) {
            out.push(Member { hash, membership });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectorised_and_portable_signatures_agree() {
        let hasher = MinHasher::new(&Config::default());
        let shingles = shingles("one two three four five six seven eight nine ten eleven", 3);
        let mut portable = vec![u32::MAX; hasher.permutations()];
        min_hash(&hasher.a, &hasher.b, &shingles, &mut portable);
        assert_eq!(hasher.signature_of_shingles(&shingles), portable);
        assert!(portable.iter().all(|&v| v != u32::MAX));
    }

    #[test]
    fn simplification_folds_case_punctuation_and_numbers() {
        assert_eq!(
            shingles("Step 1: Add 2.5 cups, then STIR.", 2),
            shingles("step 7) add 10 cups then stir", 2)
        );
        assert_ne!(shingles("add two cups", 2), shingles("add three cups", 2));
        assert_eq!(shingles("", 5), Vec::<u64>::new());
        assert_eq!(shingles("just three words", 5).len(), 1);
    }

    #[test]
    fn clusters_are_components() {
        let h = |n: u8| ContentHash([n; 20]);
        let found = clusters(&[(h(3), h(1), 0.9), (h(5), h(6), 0.9), (h(1), h(2), 0.9)]);
        assert_eq!(found, vec![vec![h(1), h(2), h(3)], vec![h(5), h(6)]]);
    }
}
