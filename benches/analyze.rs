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

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use corpusdb::analyze::{self, Targets, TokenCounter};
use corpusdb::ingest::{self, IngestOptions};
use corpusdb::store::Store;
use corpusdb::synth::{self, SynthSpec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let records: u64 = std::env::var("CORPUSDB_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if measuring { 1_000_000 } else { 2_000 });
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let work = PathBuf::from(target).join("bench-analyze");
    std::fs::create_dir_all(&work).unwrap();
    let store_dir = work.join(format!("store-{records}"));
    if !store_dir.exists() {
        let corpus = work.join(format!("corpus-{records}.jsonl"));
        synth::generate_file(
            &corpus,
            &SynthSpec {
                records,
                ..SynthSpec::default()
            },
        )
        .unwrap();
        let store = Store::open(&store_dir).unwrap();
        let started = Instant::now();
        ingest::ingest_file(
            &store,
            &corpus,
            &IngestOptions::new("bench", "general"),
            &ingest::Quiet,
        )
        .unwrap();
        eprintln!("built the store in {:.1}s", started.elapsed().as_secs_f64());
        std::fs::remove_file(&corpus).unwrap();
    }
    let vocab = if measuring { 32_000 } else { 2_000 };
    let tokenizer = work.join(format!("tokenizer-{vocab}.json"));
    if !tokenizer.exists() {
        train_tokenizer(&store_dir, &tokenizer, vocab, &work);
    }
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

/// A GPT-2-style byte-level BPE trained on the text of the first examples.
fn train_tokenizer(
    store_dir: &std::path::Path,
    out: &std::path::Path,
    vocab: usize,
    work: &std::path::Path,
) {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::Tokenizer;

    let text = work.join("train.txt");
    {
        let store = Store::open_read_only(store_dir).unwrap();
        let mut file = BufWriter::new(std::fs::File::create(&text).unwrap());
        let mut n = 0;
        store
            .for_each_example(|_, example| {
                if n < 20_000 {
                    for m in &example.conversation.messages {
                        writeln!(file, "{}", m.content.replace('\n', " ")).unwrap();
                    }
                    n += 1;
                }
                Ok(())
            })
            .unwrap();
        file.flush().unwrap();
    }
    let started = Instant::now();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default()));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer
        .train_from_files(&mut trainer, vec![text.to_string_lossy().into_owned()])
        .unwrap();
    tokenizer.save(out, false).unwrap();
    std::fs::remove_file(&text).unwrap();
    eprintln!(
        "trained the tokenizer in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
