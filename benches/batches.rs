//! Training batches from the store: plan build time, time to the first batch, tokens/s
//! with chat template + tokenization + packing, resume latency; and the in-memory part
//! of a plan (schedule and permutations) at 10M positions.
//!
//! ```text
//! cargo bench --bench batches                                   # 1M-record store
//! CORPUSDB_BENCH_EXAMPLES=100000 cargo bench --bench batches    # examples streamed
//! ```
//!
//! Under `cargo test --all-targets` it runs once on 2,000 records as a smoke test. It
//! shares the store and tokenizer of `benches/analyze.rs` (`target/bench-analyze/`).

use std::time::Instant;

use corpusdb::batches::{self, BatchOptions, ChatTokenizer};
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
    let stats = batches::with_stream(&store, &plan, &tokenizer, 0, &options, 4, |stream| {
        for batch in stream.take(limit as usize) {
            batch.unwrap();
        }
        stream.stats()
    });
    println!(
        "stream: {} batches of {} examples, {} tokens in {:.2}s: {:.0} tokens/s, {:.0} examples/s; packing efficiency {:.1}%; first batch after {:.3}s",
        stats.batches,
        options.batch_size,
        stats.tokens,
        stats.seconds,
        stats.tokens as f64 / stats.seconds,
        stats.examples as f64 / stats.seconds,
        100.0 * stats.tokens as f64 / stats.capacity as f64,
        stats.seconds_to_first_batch
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
