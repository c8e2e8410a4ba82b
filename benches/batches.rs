//! Training batches from the store: plan build time, time to the first batch, tokens/s
//! with chat template + tokenization + packing, resume latency; and the in-memory part
//! of a plan (schedule and permutations) at 10M positions.
//!
//! Then the token cache: `tokenize` of the whole store, and streams from the cache with
//! the page cache warm and with the store's and the cache's files dropped from it
//! (`posix_fadvise`), beside the on-the-fly stream on a cold page cache.
//!
//! ```text
//! cargo bench --bench batches                                   # 1M-record store
//! CORPUSDB_BENCH_EXAMPLES=100000 cargo bench --bench batches    # examples streamed
//! ```
//!
//! Under `cargo test --all-targets` it runs once on 2,000 records as a smoke test. It
//! shares the store and tokenizer of `benches/analyze.rs` (`target/bench-analyze/`).

use std::time::Instant;

use corpusdb::batches::{self, cache, BatchOptions, ChatTokenizer, StreamStats, TokenCache};
use corpusdb::curriculum::order::{Permutation, Schedule};
use corpusdb::curriculum::{Curriculum, Plan};
use corpusdb::index::Index;
use corpusdb::store::Store;

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let records = env_or(
        "CORPUSDB_BENCH_RECORDS",
        if measuring { 1_000_000 } else { 2_000 },
    );
    let stream_examples = env_or(
        "CORPUSDB_BENCH_EXAMPLES",
        if measuring { 60_000 } else { 200 },
    );
    let vocab = if measuring { 32_000 } else { 2_000 };
    let (store_dir, tokenizer_path) = common::store_and_tokenizer(records, vocab);
    let store = Store::open(&store_dir).unwrap();
    let index = Index::open_or_create(store.path(), false).unwrap();
    let started = Instant::now();
    let indexed = index.catch_up(&store, &|_, _| {}).unwrap();
    if indexed > 0 {
        eprintln!(
            "indexed {indexed} changes in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    let curriculum: Curriculum = serde_yaml::from_str(
        "name: bench\nseed: 1\neval: {fraction: 0.01}\nphases:\n  - {name: all, select: '*', epochs: 2, learning_rate: 1.0e-5}\n",
    )
    .unwrap();
    let started = Instant::now();
    let plan = Plan::build(&index, &curriculum).unwrap();
    let build = started.elapsed().as_secs_f64();
    println!(
        "plan over {} examples ({} positions, {} held out): built in {:.3}s",
        plan.phases[0].per_epoch,
        plan.total,
        plan.eval.len(),
        build
    );

    let tokenizer = ChatTokenizer::load(&tokenizer_path).unwrap();
    let options = BatchOptions {
        batch_size: 32,
        max_seq_len: 4096,
        packing: true,
        rank: 0,
        ranks: 1,
    };
    let limit = stream_examples.div_ceil(options.batch_size as u64);
    let stream = |cache: Option<&TokenCache>, batches: u64| -> StreamStats {
        batches::with_stream_from(&store, cache, &plan, &tokenizer, 0, &options, 4, |s| {
            for batch in s.take(batches as usize) {
                batch.unwrap();
            }
            s.stats()
        })
    };
    let report = |what: &str, stats: &StreamStats| {
        println!(
            "{what}: {} batches of {} examples, {} tokens in {:.2}s: {:.0} tokens/s, {:.0} examples/s; packing efficiency {:.1}%; first batch after {:.3}s",
            stats.batches,
            options.batch_size,
            stats.tokens,
            stats.seconds,
            stats.tokens as f64 / stats.seconds,
            stats.examples as f64 / stats.seconds,
            100.0 * stats.tokens as f64 / stats.capacity as f64,
            stats.seconds_to_first_batch
        );
    };
    report("stream (encoded on the fly, warm)", &stream(None, limit));
    common::evict(&store_dir);
    report(
        "stream (encoded on the fly, store evicted from the page cache)",
        &stream(None, limit),
    );

    // The token cache: written whole, then streamed warm and cold.
    let cache_dir = cache::cache_dir(&store_dir, &tokenizer);
    let _ = std::fs::remove_dir_all(&cache_dir);
    let started = Instant::now();
    let written = cache::tokenize(&store, &tokenizer, &|_, _| {}).unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "tokenize: {} examples, {} tokens in {:.1}s ({:.0} examples/s, {:.0} tokens/s); cache {} MB",
        written.examples,
        written.tokens,
        secs,
        written.examples as f64 / secs,
        written.tokens as f64 / secs,
        (written.tokens * 4 + (written.examples + 1) * 8) / 1_000_000
    );
    // Every position of the plan (or the same number of batches in the smoke run).
    let all = if measuring {
        plan.total.div_ceil(options.batch_size as u64)
    } else {
        limit
    };
    let cache = TokenCache::open(&store, &tokenizer).unwrap().unwrap();
    report(
        "stream from the token cache (warm)",
        &stream(Some(&cache), all),
    );
    drop(cache);
    common::evict(&store_dir);
    let (resident, pages) = common::resident_pages(&store_dir);
    println!(
        "after eviction: {resident} of {pages} pages of the store and cache in the page cache"
    );
    let cache = TokenCache::open(&store, &tokenizer).unwrap().unwrap();
    report(
        "stream from the token cache (store and cache evicted)",
        &stream(Some(&cache), all),
    );

    // Resume: from a state to the example it names, and to the next batch.
    let mut worst_at = 0f64;
    let mut worst_batch = 0f64;
    for i in 1..=20u64 {
        let position = plan.total / 21 * i;
        let state = plan.state(position);
        let started = Instant::now();
        let at = plan.resume(&state).unwrap();
        plan.at(at).unwrap();
        worst_at = worst_at.max(started.elapsed().as_secs_f64());
        let started = Instant::now();
        batches::batch_at(&store, &plan, &tokenizer, at, &options)
            .unwrap()
            .unwrap();
        worst_batch = worst_batch.max(started.elapsed().as_secs_f64());
    }
    println!(
        "resume at 20 points: locate the example <= {:.1} us, build the next batch <= {:.1} ms",
        worst_at * 1e6,
        worst_batch * 1e3
    );

    // 10M positions in memory: a ten-group schedule and permutation lookups.
    let n: u64 = if measuring { 10_000_000 } else { 100_000 };
    let shares = [0.26, 0.18, 0.16, 0.13, 0.10, 0.06, 0.04, 0.035, 0.025, 0.01];
    let quotas = corpusdb::curriculum::apportion(&shares, n);
    let started = Instant::now();
    let schedule = Schedule::new(&quotas);
    let schedule_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let permutation = Permutation::new(n, 7);
    let mut sum = 0u64;
    for t in 0..n {
        let (group, k) = schedule.at(t);
        sum = sum.wrapping_add(group as u64 + permutation.apply(k % n));
    }
    let walk_secs = started.elapsed().as_secs_f64();
    println!(
        "{n} positions, 10 groups: schedule built in {schedule_secs:.2}s ({} MB), every position located in {walk_secs:.2}s ({:.0} ns each; checksum {sum})",
        schedule.bytes() / 1_000_000,
        walk_secs * 1e9 / n as f64
    );
}
