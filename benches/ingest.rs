//! Ingest throughput: generates a realistic corpus, imports it into a fresh store and
//! reports examples/s, MB/s, store size and peak RSS.
//!
//! ```text
//! cargo bench --bench ingest
//! CORPUSDB_BENCH_RECORDS=1000000 CORPUSDB_BENCH_COMPRESSION=dict,zstd,lz4,none cargo bench --bench ingest
//! CORPUSDB_BENCH_WAL=1 cargo bench --bench ingest          # batches also go to the WAL
//! CORPUSDB_BENCH_PARSE_ONLY=1 cargo bench --bench ingest    # reader + parse + hash only
//! CORPUSDB_BENCH_VALUE_LEVEL=3 cargo bench --bench ingest   # zstd level of the values (dict)
//! ```
//!
//! After the import it exports the stored examples as `messages` JSONL and as Parquet
//! (nested list-of-struct messages, zstd) and imports each into a fresh store, to compare
//! the two inputs on the same data (`CORPUSDB_BENCH_PARQUET=0` skips this).
//!
//! Under `cargo test --all-targets` it runs once on 2,000 records as a smoke test.
//! The corpus is kept at `target/bench-ingest/corpus-N.jsonl` so the Python baseline
//! (`benches/baseline_merge.py`) can run on the same input.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use corpusdb::ingest::{self, IngestOptions};
use corpusdb::store::{Compression, Store, StoreOptions};
use corpusdb::synth::{self, SynthSpec};

// glibc's malloc spends measurable time freeing, on the writer thread, buffers that the
// parse threads allocated; mimalloc handles such cross-thread frees cheaply (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident set size of this process since the last reset, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU seconds (user + system, all threads) this process has used so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not and gets a smoke run.
    let measuring = std::env::args().any(|a| a == "--bench");
    let records: u64 = env_or(
        "CORPUSDB_BENCH_RECORDS",
        if measuring { 300_000 } else { 2_000 },
    );
    let compressions =
        std::env::var("CORPUSDB_BENCH_COMPRESSION").unwrap_or_else(|_| "zstd".into());
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let work = PathBuf::from(target).join("bench-ingest");
    std::fs::create_dir_all(&work).unwrap();
    let corpus = work.join(format!("corpus-{records}.jsonl"));
    if !corpus.exists() {
        let started = Instant::now();
        let stats = synth::generate_file(
            &corpus,
            &SynthSpec {
                records,
                ..SynthSpec::default()
            },
        )
        .unwrap();
        eprintln!(
            "generated {} records ({} unique) in {:.1}s",
            stats.records,
            stats.unique,
            started.elapsed().as_secs_f64()
        );
    }
    if std::env::var("CORPUSDB_BENCH_PARSE_ONLY").is_ok() {
        parse_only(&corpus);
        return;
    }
    let input_bytes = std::fs::metadata(&corpus).unwrap().len();
    println!(
        "corpus: {} ({} records, {:.1} MB, {:.0} B/record)",
        corpus.display(),
        records,
        input_bytes as f64 / 1e6,
        input_bytes as f64 / records as f64
    );
    println!(
        "{:<6} {:>10} {:>12} {:>9} {:>10} {:>10} {:>10} {:>8}",
        "comp", "seconds", "examples/s", "MB/s", "stored", "store MB", "peak RSS", "CPU s"
    );
    println!("(store MB: right after the import / after a full compaction, untimed; CPU s: all threads during the import)");
    for name in compressions.split(',') {
        let compression = match name.trim() {
            // Values compressed once with a trained dictionary.
            "dict" => Compression::Dictionary,
            // Block compression: lz4 upper levels, zstd bottommost; raw values (the default).
            "zstd" => Compression::Zstd,
            "lz4" => Compression::Lz4,
            "none" => Compression::None,
            other => panic!("unknown compression {other}"),
        };
        let store_dir = work.join(format!("store-{name}"));
        let _ = std::fs::remove_dir_all(&store_dir);
        reset_peak_rss();
        let cpu_before = cpu_seconds();
        let started = Instant::now();
        let store = Store::open_with(
            &store_dir,
            &StoreOptions {
                compression,
                wal: std::env::var("CORPUSDB_BENCH_WAL").is_ok(),
                value_level: env_or(
                    "CORPUSDB_BENCH_VALUE_LEVEL",
                    StoreOptions::default().value_level,
                ),
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let options = IngestOptions::new("bench", "general");
        let outcome = ingest::ingest_file(&store, &corpus, &options, &ingest::Quiet).unwrap();
        store.flush().unwrap();
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_before;
        let peak = peak_rss();
        let size_after_import = dir_size(&store_dir);
        store.compact();
        drop(store);
        let size_compacted = dir_size(&store_dir);
        // Read speed of the compacted store: every example decoded, as an export reads it.
        let export_secs = {
            let store = Store::open_read_only(&store_dir).unwrap();
            let started = Instant::now();
            corpusdb::export::write_jsonl(
                &store,
                &corpusdb::export::Selection::All,
                &mut std::io::sink(),
                false,
                &|_| {},
            )
            .unwrap();
            started.elapsed().as_secs_f64()
        };
        assert!(outcome.import.counts.adds_up());
        println!(
            "{:<6} {:>10.2} {:>12.0} {:>9.1} {:>10} {:>10} {:>7.0} MiB {:>8.2}",
            name,
            secs,
            outcome.run.read as f64 / secs,
            input_bytes as f64 / secs / 1e6,
            outcome.run.stored,
            format!(
                "{:.0}/{:.0}",
                size_after_import as f64 / 1e6,
                size_compacted as f64 / 1e6
            ),
            peak as f64 / (1 << 20) as f64,
            cpu
        );
        println!(
            "{:<6} export of the compacted store to JSONL (untimed above): {:.2} s, {:.0} examples/s",
            name,
            export_secs,
            outcome.run.stored as f64 / export_secs
        );
    }
    if std::env::var("CORPUSDB_BENCH_PARQUET").as_deref() != Ok("0") {
        let first = compressions.split(',').next().unwrap_or("dict").trim();
        parquet_vs_jsonl(&work, &work.join(format!("store-{first}")), records);
    }
}

/// The same examples as `messages` JSONL and as Parquet, each imported into a fresh store.
fn parquet_vs_jsonl(work: &Path, source_store: &Path, records: u64) {
    use corpusdb::export::{self, Selection};
    let jsonl = work.join(format!("export-{records}.jsonl"));
    let parquet = work.join(format!("export-{records}.parquet"));
    {
        let store = Store::open_read_only(source_store).unwrap();
        let mut out = BufWriter::new(File::create(&jsonl).unwrap());
        export::write_jsonl(&store, &Selection::All, &mut out, false, &|_| {}).unwrap();
        out.flush().unwrap();
        export::write_parquet(
            &store,
            &Selection::All,
            BufWriter::new(File::create(&parquet).unwrap()),
            false,
            export::PARQUET_ROWS_PER_GROUP,
            &|_| {},
        )
        .unwrap();
    }
    println!(
        "\n{:<8} {:>10} {:>10} {:>12} {:>10}",
        "input", "file MB", "seconds", "examples/s", "stored"
    );
    let messages = corpusdb::formats::Formats::builtin()
        .get("messages")
        .unwrap();
    for (name, file) in [("jsonl", &jsonl), ("parquet", &parquet)] {
        let store_dir = work.join(format!("store-from-{name}"));
        let _ = std::fs::remove_dir_all(&store_dir);
        let started = Instant::now();
        let store = Store::open(&store_dir).unwrap();
        let mut options = IngestOptions::new("bench", "general");
        options.format = Some(messages.clone());
        let outcome = ingest::ingest_file(&store, file, &options, &ingest::Quiet).unwrap();
        store.flush().unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert!(outcome.import.counts.adds_up());
        assert_eq!(outcome.run.rejected, 0);
        println!(
            "{:<8} {:>10.1} {:>10.2} {:>12.0} {:>10}",
            name,
            std::fs::metadata(file).unwrap().len() as f64 / 1e6,
            secs,
            outcome.run.read as f64 / secs,
            outcome.run.stored
        );
    }
}

/// Reader + parse + hash on the rayon pool, no store: the ceiling of the front half.
fn parse_only(corpus: &Path) {
    use rayon::prelude::*;
    let started = Instant::now();
    let mut reader = corpusdb::reader::RecordReader::open(corpus, None, 16 << 20).unwrap();
    let mut n = 0u64;
    let mut ok = 0u64;
    loop {
        let mut items = Vec::with_capacity(4096);
        while items.len() < 4096 {
            match reader.next_item().unwrap() {
                Some(item) => items.push(item),
                None => break,
            }
        }
        if items.is_empty() {
            break;
        }
        n += items.len() as u64;
        ok += items
            .into_par_iter()
            .filter(|item| match &item.body {
                corpusdb::reader::RawBody::Bytes(b) => corpusdb::formats::parse_record("auto", b)
                    .map(|c| c.content_hash())
                    .is_ok(),
                _ => false,
            })
            .count() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "parse only: {n} records ({ok} ok) in {secs:.2}s: {:.0} records/s",
        n as f64 / secs
    );
}
