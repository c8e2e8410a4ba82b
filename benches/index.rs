//! Index costs and query latencies: indexing after ingest (metadata-only and full text),
//! by replaying the change log and fed by the import, category facets, fetching 10k
//! matches, and export throughput.
//!
//! ```text
//! cargo bench --bench index                                  # 1M examples, 10 categories
//! CORPUSDB_BENCH_RECORDS=200000 cargo bench --bench index
//! ```
//!
//! Under `cargo test --all-targets` it runs once on 2,000 records as a smoke test.

use std::path::{Path, PathBuf};
use std::time::Instant;

use corpusdb::index::query::{parse, TermField};
use corpusdb::index::Index;
use corpusdb::ingest::{self, IngestOptions};
use corpusdb::store::Store;
use corpusdb::synth::{self, SynthSpec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CATEGORIES: [&str; 10] = [
    "code",
    "instruction",
    "math",
    "qa",
    "conversation",
    "emotional",
    "creative",
    "tool",
    "moral",
    "specialized",
];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

/// One file per category, generated once.
fn parts(work: &Path, records: u64) -> Vec<PathBuf> {
    CATEGORIES
        .iter()
        .enumerate()
        .map(|(i, category)| {
            let path = work.join(format!("part-{records}-{category}.jsonl"));
            if !path.exists() {
                let spec = SynthSpec {
                    records: records / 10,
                    seed: 1000 + i as u64,
                    ..SynthSpec::default()
                };
                synth::generate_file(&path, &spec).unwrap();
            }
            path
        })
        .collect()
}

/// Imports the parts, one source each; `keep_text` hands the texts to `observer`.
fn ingest_parts(
    store: &Store,
    parts: &[PathBuf],
    observer: &dyn ingest::Observer,
    keep_text: bool,
) -> u64 {
    let mut stored = 0;
    for (path, category) in parts.iter().zip(CATEGORIES) {
        let mut options = IngestOptions::new(format!("src-{category}"), category);
        options.keep_text = keep_text;
        stored += ingest::ingest_file(store, path, &options, observer)
            .unwrap()
            .run
            .stored;
    }
    stored
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let records: u64 = env_or(
        "CORPUSDB_BENCH_RECORDS",
        if measuring { 1_000_000 } else { 2_000 },
    );
    let full_text_records: u64 = env_or("CORPUSDB_BENCH_FULL_TEXT_RECORDS", records.min(100_000));
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let work = PathBuf::from(target).join("bench-index");
    std::fs::create_dir_all(&work).unwrap();
    let files = parts(&work, records);

    // The import with the index fed by each committed batch, first, so that no other
    // store's compactions run beside it.
    let fed_dir = work.join(format!("store-fed-{records}"));
    let _ = std::fs::remove_dir_all(&fed_dir);
    let fed_secs = {
        let fed_store = Store::open(&fed_dir).unwrap();
        let fed_index = Index::open_or_create(&fed_dir, false).unwrap();
        let started = Instant::now();
        let feed = fed_index.feed(&fed_store).unwrap();
        let fed_stored = ingest_parts(&fed_store, &files, &feed, false);
        feed.catch_up(&|_, _| {}).unwrap();
        drop(feed);
        let fed_secs = started.elapsed().as_secs_f64();
        assert_eq!(fed_index.num_docs().unwrap(), fed_stored);
        fed_secs
    };
    let _ = std::fs::remove_dir_all(&fed_dir);

    let store_dir = work.join(format!("store-{records}"));
    let _ = std::fs::remove_dir_all(&store_dir);
    let store = Store::open(&store_dir).unwrap();
    let started = Instant::now();
    let stored = ingest_parts(&store, &files, &ingest::Quiet, false);
    let store_secs = started.elapsed().as_secs_f64();
    let index = Index::open_or_create(&store_dir, false).unwrap();
    let started = Instant::now();
    index.catch_up(&store, &|_, _| {}).unwrap();
    let index_secs = started.elapsed().as_secs_f64();
    println!("{records} records, {stored} examples in 10 categories");
    println!(
        "ingest, store only:            {:>8.2}s  {:>9.0} records/s",
        store_secs,
        records as f64 / store_secs
    );
    println!(
        "metadata index catch-up:       {:>8.2}s  {:>9.0} examples/s  (store + index: {:.0} records/s)",
        index_secs,
        stored as f64 / index_secs,
        records as f64 / (store_secs + index_secs)
    );
    println!(
        "ingest with the index fed:     {:>8.2}s  {:>9.0} records/s  ({:.2}s over the store alone)",
        fed_secs,
        records as f64 / fed_secs,
        fed_secs - store_secs
    );

    let categories = median_ms(21, || {
        index.facet(TermField::Category).unwrap();
    });
    let sources = median_ms(21, || {
        index.facet(TermField::Source).unwrap();
    });
    let math = parse("category:math").unwrap();
    let fetch = median_ms(5, || {
        assert!(!index.search(&math, 0, 10_000).unwrap().is_empty());
    });
    let ordinals_ms = median_ms(5, || {
        index.matching_ordinals(&math).unwrap();
    });
    let complex = parse("(category:math OR category:code) AND turns:>=2 AND chars:<2000").unwrap();
    let complex_ms = median_ms(5, || {
        index.count(&complex).unwrap();
    });
    println!("category facet (median of 21): {categories:>8.2} ms");
    println!("source facet (median of 21):   {sources:>8.2} ms");
    println!("10k matches with hashes:       {fetch:>8.2} ms");
    println!("all ordinals of category:math: {ordinals_ms:>8.2} ms");
    println!("count of a 3-clause query:     {complex_ms:>8.2} ms");

    use corpusdb::export::{self, Selection};
    let math_only = Selection::from_ordinals(&index.matching_ordinals(&math).unwrap());
    let exports = [
        ("JSONL, everything", Selection::All, false, false),
        ("JSONL + metadata, everything", Selection::All, true, false),
        ("JSONL, category:math", math_only, false, false),
        ("Parquet, everything", Selection::All, false, true),
    ];
    for (what, selection, with_metadata, parquet) in &exports {
        let started = Instant::now();
        let n = if *parquet {
            export::write_parquet(
                &store,
                selection,
                std::io::sink(),
                *with_metadata,
                export::PARQUET_ROWS_PER_GROUP,
                &|_| {},
            )
            .unwrap()
        } else {
            export::write_jsonl(
                &store,
                selection,
                &mut std::io::sink(),
                *with_metadata,
                &|_| {},
            )
            .unwrap()
        };
        let secs = started.elapsed().as_secs_f64();
        println!(
            "export {what:<29} {secs:>8.2}s  {:>9.0} examples/s",
            n as f64 / secs
        );
    }
    drop(index);
    drop(store);

    // Full text at a smaller size: the same pipeline with a text field in the index.
    let ft_dir = work.join(format!("store-ft-{full_text_records}"));
    let _ = std::fs::remove_dir_all(&ft_dir);
    let ft_files = parts(&work, full_text_records);
    let store = Store::open(&ft_dir).unwrap();
    let index = Index::open_or_create(&ft_dir, true).unwrap();
    let started = Instant::now();
    let stored = ingest_parts(&store, &ft_files, &ingest::Quiet, false);
    let store_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    index.catch_up(&store, &|_, _| {}).unwrap();
    let index_secs = started.elapsed().as_secs_f64();
    println!(
        "full text, {full_text_records} records: store {:.2}s ({:.0}/s), index {:.2}s ({:.0}/s), store + index {:.0} records/s",
        store_secs,
        full_text_records as f64 / store_secs,
        index_secs,
        stored as f64 / index_secs,
        full_text_records as f64 / (store_secs + index_secs)
    );
    drop(index);
    drop(store);
    let _ = std::fs::remove_dir_all(&ft_dir);
    let store = Store::open(&ft_dir).unwrap();
    let index = Index::open_or_create(&ft_dir, true).unwrap();
    let started = Instant::now();
    let feed = index.feed(&store).unwrap();
    ingest_parts(&store, &ft_files, &feed, true);
    feed.catch_up(&|_, _| {}).unwrap();
    drop(feed);
    let fed_secs = started.elapsed().as_secs_f64();
    assert_eq!(index.num_docs().unwrap(), stored);
    println!(
        "full text, {full_text_records} records, index fed by the import: {:.2}s ({:.0} records/s)",
        fed_secs,
        full_text_records as f64 / fed_secs
    );
}
