//! Training batches straight from the store: plan positions -> conversations -> chat
//! template and tokens with a loss mask -> packed (or padded) rows -> candle tensors.
//!
//! A step takes the next `ranks × batch_size` positions of the plan's global order (never
//! crossing a phase, whose learning rate applies to the whole step); rank `r` gets every
//! `ranks`-th of them starting at `r`. The sampler state after the step is the position
//! after that window, so a run resumed from it, with any number of ranks, continues the
//! same global order without repeating or skipping an example.
//!
//! Rows hold `max_seq_len` tokens. With packing, examples are placed first-fit by
//! decreasing length; each keeps its own position ids (from 0) and segment id, and
//! `seq_starts` / `cu_seqlens` give every example's place in the rows and its length, so
//! attention never crosses examples. Without packing each example has its own row, padded to the
//! longest in the batch. An example longer than `max_seq_len` keeps its first
//! `max_seq_len` tokens (counted as truncated).

pub mod cache;
pub mod template;

use std::time::Instant;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::curriculum::{Plan, SamplerState};
use crate::store::Store;
pub use cache::TokenCache;
pub use template::{ChatTokenizer, Tokenized};

/// Label of a token that is not trained (the usual ignore index of cross-entropy).
pub const IGNORE: i64 = -100;

#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Examples per rank per step.
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub packing: bool,
    pub rank: usize,
    pub ranks: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            batch_size: 8,
            max_seq_len: 2048,
            packing: true,
            rank: 0,
            ranks: 1,
        }
    }
}

/// One step's batch for one rank.
#[derive(Debug)]
pub struct Batch {
    /// Global plan positions of this rank's examples, in the order of `seq_starts`.
    pub positions: Vec<u64>,
    pub ordinals: Vec<u64>,
    pub phase: usize,
    pub learning_rate: f64,
    /// `[rows, width]` token ids (u32), padding with the tokenizer's pad id.
    pub input_ids: Tensor,
    /// `[rows, width]` (i64): the token id where trained, [`IGNORE`] elsewhere.
    pub labels: Tensor,
    /// `[rows, width]` (u32): position of each token within its own example.
    pub position_ids: Tensor,
    /// `[rows, width]` (u32): 1 + index of the token's example in the batch, 0 for padding.
    pub segment_ids: Tensor,
    /// `[examples + 1]` (u32): cumulative example lengths (flash-attention's varlen
    /// form): example `i` has `cu_seqlens[i+1] - cu_seqlens[i]` tokens.
    pub cu_seqlens: Tensor,
    /// `[examples]` (u32): where each example starts in the flattened `[rows × width]`.
    pub seq_starts: Tensor,
    /// Real tokens, trained tokens, row capacity (rows × width), truncated tokens.
    pub tokens: usize,
    pub trained_tokens: usize,
    pub capacity: usize,
    pub truncated: usize,
    /// Examples that could not be tokenized (see `skipped_reasons`), left out.
    pub skipped: Vec<(u64, String)>,
    /// Examples whose tokens came from the token cache (the rest were read from the
    /// store and encoded).
    pub cached: usize,
    /// Where the run stands after this step (for every rank alike).
    pub next: SamplerState,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("ordinal {0} is in the plan but not in the store")]
    Missing(u64),
    #[error(transparent)]
    Cache(#[from] cache::Error),
}

/// The window of global positions a step starting at `position` covers.
pub fn step_window(plan: &Plan, position: u64, options: &BatchOptions) -> Option<(u64, u64)> {
    let here = plan.at(position)?;
    let phase = &plan.phases[here.phase];
    let end = (position + (options.ranks.max(1) * options.batch_size.max(1)) as u64)
        .min(phase.start + phase.len());
    Some((position, end))
}

/// This rank's (position, ordinal) pairs of the step window `start..end`.
fn rank_positions<'a>(
    plan: &'a Plan,
    start: u64,
    end: u64,
    options: &BatchOptions,
) -> impl Iterator<Item = (u64, u64)> + 'a {
    (start + options.rank as u64..end)
        .step_by(options.ranks.max(1))
        .map(|p| (p, plan.at(p).expect("inside the plan").ordinal))
}

/// Builds the batch of `options.rank` for the step starting at `position`; `None` when
/// the plan is finished. Tokens come from the tokenizer's token cache where one covers
/// the examples (`corpusdb tokenize`), else from the store.
pub fn batch_at(
    store: &Store,
    plan: &Plan,
    tokenizer: &ChatTokenizer,
    position: u64,
    options: &BatchOptions,
) -> Result<Option<Batch>, Error> {
    let cache = TokenCache::open(store, tokenizer)?;
    if let Some(cache) = &cache {
        // One batch alone: its reads are asked for together (a stream reads ahead instead).
        read_ahead(cache, plan, options, position, position, 1);
    }
    batch_from(store, cache.as_ref(), plan, tokenizer, position, options)
}

/// [`batch_at`] with the token cache given: `None` encodes every example from the store.
pub fn batch_from(
    store: &Store,
    cache: Option<&TokenCache>,
    plan: &Plan,
    tokenizer: &ChatTokenizer,
    position: u64,
    options: &BatchOptions,
) -> Result<Option<Batch>, Error> {
    let Some((start, end)) = step_window(plan, position, options) else {
        return Ok(None);
    };
    let mine: Vec<(u64, u64)> = rank_positions(plan, start, end, options).collect();
    let mut encoded = Vec::with_capacity(mine.len());
    let mut from_store = Vec::new();
    for &(p, ordinal) in &mine {
        match cache.and_then(|c| c.get(ordinal)) {
            Some(result) => encoded.push((p, ordinal, result)),
            None => {
                let (_, example) = store.example_at(ordinal)?.ok_or(Error::Missing(ordinal))?;
                from_store.push((p, ordinal, example.conversation));
            }
        }
    }
    let cached = encoded.len();
    encoded.par_extend(
        from_store
            .into_par_iter()
            .map(|(p, ordinal, conversation)| {
                (p, ordinal, tokenizer.encode(&conversation).map_err(|e| e.0))
            }),
    );
    // Plan order, whichever way the tokens came.
    encoded.sort_unstable_by_key(|e| e.0);
    let phase = plan.at(start).expect("inside the plan").phase;
    let mut examples = Vec::with_capacity(encoded.len());
    let mut skipped = Vec::new();
    let mut truncated = 0;
    for (p, ordinal, result) in encoded {
        match result {
            Ok(mut tokens) => {
                if tokens.ids.len() > options.max_seq_len {
                    truncated += tokens.ids.len() - options.max_seq_len;
                    tokens.ids.truncate(options.max_seq_len);
                    tokens.trained.truncate(options.max_seq_len);
                }
                examples.push((p, ordinal, tokens));
            }
            Err(reason) => skipped.push((ordinal, reason)),
        }
    }
    let mut batch = assemble(examples, tokenizer.pad_id, options)?;
    batch.cached = cached;
    batch.phase = phase;
    batch.learning_rate = plan.phases[phase].learning_rate;
    batch.truncated = truncated;
    batch.skipped = skipped;
    batch.next = plan.state(end);
    Ok(Some(batch))
}

/// Rows of examples `(position, ordinal, tokens)`: packed first-fit by decreasing
/// length, or one per row.
pub fn assemble(
    mut examples: Vec<(u64, u64, Tokenized)>,
    pad_id: u32,
    options: &BatchOptions,
) -> Result<Batch, Error> {
    // Row of each example and its offset in that row.
    let mut rows: Vec<usize> = Vec::new(); // used length per row
    let mut placed: Vec<(usize, usize)> = Vec::with_capacity(examples.len());
    let width;
    if options.packing {
        width = options.max_seq_len;
        // Longest first; equal lengths keep plan order, so the layout is deterministic.
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.sort_by(|&a, &b| {
            examples[b]
                .2
                .ids
                .len()
                .cmp(&examples[a].2.ids.len())
                .then(a.cmp(&b))
        });
        let mut slot = vec![(0, 0); examples.len()];
        for i in order {
            let len = examples[i].2.ids.len();
            let row = match rows.iter().position(|&used| used + len <= width) {
                Some(row) => row,
                None => {
                    rows.push(0);
                    rows.len() - 1
                }
            };
            slot[i] = (row, rows[row]);
            rows[row] += len;
        }
        // Examples in row-major order of the layout, for seq_starts and cu_seqlens.
        let mut by_layout: Vec<usize> = (0..examples.len()).collect();
        by_layout.sort_by_key(|&i| slot[i]);
        let mut reordered = Vec::with_capacity(examples.len());
        let mut taken: Vec<Option<(u64, u64, Tokenized)>> =
            examples.into_iter().map(Some).collect();
        for i in by_layout {
            placed.push(slot[i]);
            reordered.push(taken[i].take().expect("each once"));
        }
        examples = reordered;
    } else {
        width = examples
            .iter()
            .map(|e| e.2.ids.len())
            .max()
            .unwrap_or(0)
            .max(1);
        for (i, e) in examples.iter().enumerate() {
            rows.push(e.2.ids.len());
            placed.push((i, 0));
        }
    }
    let n_rows = rows.len().max(1);
    let mut input_ids = vec![pad_id; n_rows * width];
    let mut labels = vec![IGNORE; n_rows * width];
    let mut position_ids = vec![0u32; n_rows * width];
    let mut segment_ids = vec![0u32; n_rows * width];
    let mut cu_seqlens = Vec::with_capacity(examples.len() + 1);
    let mut seq_starts = Vec::with_capacity(examples.len());
    cu_seqlens.push(0u32);
    let (mut tokens, mut trained_tokens) = (0, 0);
    for (i, ((_, _, example), &(row, offset))) in examples.iter().zip(&placed).enumerate() {
        let base = row * width + offset;
        seq_starts.push(base as u32);
        for (j, (&id, &trained)) in example.ids.iter().zip(&example.trained).enumerate() {
            input_ids[base + j] = id;
            position_ids[base + j] = j as u32;
            segment_ids[base + j] = i as u32 + 1;
            if trained {
                labels[base + j] = i64::from(id);
                trained_tokens += 1;
            }
        }
        tokens += example.ids.len();
        cu_seqlens.push(tokens as u32);
    }
    let device = Device::Cpu;
    let shape = (n_rows, width);
    Ok(Batch {
        positions: examples.iter().map(|e| e.0).collect(),
        ordinals: examples.iter().map(|e| e.1).collect(),
        phase: 0,
        learning_rate: 0.0,
        input_ids: Tensor::from_vec(input_ids, shape, &device)?,
        labels: Tensor::from_vec(labels, shape, &device)?,
        position_ids: Tensor::from_vec(position_ids, shape, &device)?,
        segment_ids: Tensor::from_vec(segment_ids, shape, &device)?,
        cu_seqlens: Tensor::new(cu_seqlens.as_slice(), &device)?,
        seq_starts: Tensor::new(seq_starts.as_slice(), &device)?,
        tokens,
        trained_tokens,
        capacity: n_rows * width,
        truncated: 0,
        skipped: Vec::new(),
        cached: 0,
        next: SamplerState {
            fingerprint: String::new(),
            position: 0,
        },
    })
}

/// Steps whose tokens the stream asks the kernel for before it builds them.
const READ_AHEAD_STEPS: u64 = 8;

/// Asks the kernel for the cached tokens of this rank's examples in the `steps` steps
/// from `at`, from `ahead` on (what earlier calls did not ask for); returns the new
/// `ahead`. On a cold page cache the reads then overlap.
fn read_ahead(
    cache: &TokenCache,
    plan: &Plan,
    options: &BatchOptions,
    at: u64,
    mut ahead: u64,
    steps: u64,
) -> u64 {
    let step = (options.ranks.max(1) * options.batch_size.max(1)) as u64;
    let until = at + steps * step;
    ahead = ahead.max(at);
    let mut ordinals = Vec::new();
    while ahead < until {
        let Some((start, end)) = step_window(plan, ahead, options) else {
            break;
        };
        ordinals.extend(rank_positions(plan, start, end, options).map(|(_, o)| o));
        ahead = end;
    }
    cache.prefetch(&ordinals);
    ahead
}

/// Totals of a stream of batches.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StreamStats {
    pub batches: u64,
    pub examples: u64,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub capacity: u64,
    pub truncated: u64,
    pub skipped: u64,
    /// Examples whose tokens came from the token cache.
    pub cached: u64,
    pub seconds_to_first_batch: f64,
    pub seconds: f64,
}

/// This rank's batches from a position on, as an iterator: a background thread builds
/// them into a bounded queue while the consumer uses them ([`with_stream`]). An error
/// ends the stream after it is returned.
pub struct BatchStream {
    batches: crossbeam_channel::Receiver<Result<Batch, Error>>,
    stats: StreamStats,
    started: Instant,
    failed: bool,
}

impl Iterator for BatchStream {
    type Item = Result<Batch, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let batch = match self.batches.recv().ok()? {
            Ok(batch) => batch,
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        };
        let stats = &mut self.stats;
        if stats.batches == 0 {
            stats.seconds_to_first_batch = self.started.elapsed().as_secs_f64();
        }
        stats.batches += 1;
        stats.examples += batch.positions.len() as u64;
        stats.tokens += batch.tokens as u64;
        stats.trained_tokens += batch.trained_tokens as u64;
        stats.capacity += batch.capacity as u64;
        stats.truncated += batch.truncated as u64;
        stats.skipped += batch.skipped.len() as u64;
        stats.cached += batch.cached as u64;
        Some(Ok(batch))
    }
}

impl BatchStream {
    /// What the batches returned so far held, and the time since the stream started.
    pub fn stats(&self) -> StreamStats {
        StreamStats {
            seconds: self.started.elapsed().as_secs_f64(),
            ..self.stats.clone()
        }
    }
}

/// Runs `consume` on this rank's batches from `position` on: a background thread builds
/// them `prefetch` ahead and stops when `consume` returns (whether or not it read them
/// all). Returns what `consume` returns. Tokens come from the tokenizer's token cache
/// where one covers the examples; a cache that cannot be read is the stream's first error.
pub fn with_stream<R>(
    store: &Store,
    plan: &Plan,
    tokenizer: &ChatTokenizer,
    position: u64,
    options: &BatchOptions,
    prefetch: usize,
    consume: impl FnOnce(&mut BatchStream) -> R,
) -> R {
    match TokenCache::open(store, tokenizer) {
        Ok(cache) => with_stream_from(
            store,
            cache.as_ref(),
            plan,
            tokenizer,
            position,
            options,
            prefetch,
            consume,
        ),
        Err(e) => {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let _ = tx.send(Err(Error::Cache(e)));
            drop(tx);
            consume(&mut BatchStream {
                batches: rx,
                stats: StreamStats::default(),
                started: Instant::now(),
                failed: false,
            })
        }
    }
}

/// [`with_stream`] with the token cache given (`None`: every example from the store).
#[allow(clippy::too_many_arguments)]
pub fn with_stream_from<R>(
    store: &Store,
    cache: Option<&TokenCache>,
    plan: &Plan,
    tokenizer: &ChatTokenizer,
    position: u64,
    options: &BatchOptions,
    prefetch: usize,
    consume: impl FnOnce(&mut BatchStream) -> R,
) -> R {
    let started = Instant::now();
    std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded::<Result<Batch, Error>>(prefetch.max(1));
        scope.spawn(move || {
            let mut at = position;
            // The first position whose tokens were not yet asked for (see `read_ahead`).
            let mut ahead = position;
            loop {
                if let Some(cache) = cache {
                    ahead = read_ahead(cache, plan, options, at, ahead, READ_AHEAD_STEPS);
                }
                match batch_from(store, cache, plan, tokenizer, at, options) {
                    Ok(Some(batch)) => {
                        at = batch.next.position;
                        if tx.send(Ok(batch)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        let mut stream = BatchStream {
            batches: rx,
            stats: StreamStats::default(),
            started,
            failed: false,
        };
        let result = consume(&mut stream);
        // Dropping the receiver stops the builder at its next batch, so the scope can end.
        drop(stream);
        result
    })
}
