//! Analysis throughput with exact token counts: a synthetic store, a byte-level BPE
//! tokenizer trained here on part of it, then `analyze` cold (every example tokenized)
//! and warm (counts read from the per-tokenizer cache), and without a tokenizer.
//!
//! ```text
//! cargo bench --bench analyze                                   # 1M examples
//! CORPUSDB_BENCH_RECORDS=200000 cargo bench --bench analyze
//! ```
//!
//! Under `cargo test --all-targets` it runs once on 2,000 records as a smoke test. The
//! store and tokenizer are kept in `target/bench-analyze/` between runs.

use std::time::Instant;

use corpusdb::analyze::{self, Targets, TokenCounter};
use corpusdb::store::Store;

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let records: u64 = std::env::var("CORPUSDB_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if measuring { 1_000_000 } else { 2_000 });
    let vocab = if measuring { 32_000 } else { 2_000 };
    let (store_dir, tokenizer) = common::store_and_tokenizer(records, vocab);
    let store = Store::open_read_only(&store_dir).unwrap();
    let examples = store.counters().unwrap().examples;
    let counter = TokenCounter::load(&tokenizer).unwrap();
    let targets = Targets::strategy_default();
    let _ = std::fs::remove_dir_all(store_dir.join("analysis"));
    println!("{examples} examples, byte-level BPE vocabulary {vocab}");
    println!(
        "{:<26} {:>9} {:>14} {:>14} {:>12}",
        "run", "seconds", "examples/s", "tokens/s", "tokens"
    );
    for run in [
        "exact, cold cache",
        "exact, warm cache",
        "estimate (no tokenizer)",
    ] {
        let started = Instant::now();
        let tokens = (run != "estimate (no tokenizer)").then_some(&counter);
        let analysis = analyze::analyze(&store, tokens, &targets, &|_, _| {}).unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(analysis.examples, examples);
        println!(
            "{run:<26} {secs:>9.2} {:>14.0} {:>14.0} {:>12}",
            examples as f64 / secs,
            analysis.tokens as f64 / secs,
            analysis.tokens
        );
    }
}
