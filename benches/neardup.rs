//! Near-duplicate detection end to end, against datatrove's MinHash pipeline on the same
//! corpus with the same settings (5-grams, 14 bands × 8 rows).
//!
//! ```text
//! cargo bench --bench neardup                                    # 500k records
//! CORPUSDB_BENCH_RECORDS=200000 cargo bench --bench neardup
//! CORPUSDB_BENCH_DATATROVE=1 cargo bench --bench neardup         # also run datatrove
//! ```
//!
//! The corpus is `synth::near_duplicates` (seed 42, 30% edited copies), written twice: as
//! `messages` JSONL for corpusdb and as `{"id", "text"}` JSONL for datatrove, where the
//! text is exactly what corpusdb signs (`neardup::training_text`). Timed for corpusdb: the
//! import into a fresh store, then `neardup::run` (read the store, sign, link, write
//! signatures / buckets / pairs, cluster, choose representatives, write exclusions) in a
//! child process of its own, as `corpusdb dedup --near` runs, with its peak RSS (`VmHWM`);
//! then a run with nothing new, and a run after importing 2% more records. With `CORPUSDB_BENCH_DATATROVE=1` the
//! bench makes a venv under the target directory (`pip install 'datatrove[processing]'
//! orjson spacy`) on first use and
//! runs `benches/baseline_minhash.py` on the text file (2 workers). Under `cargo test
//! --all-targets` it runs once on 2,000 records as a smoke test. Files are kept in
//! `target/bench-neardup/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use corpusdb::ingest::{self, IngestOptions};
use corpusdb::neardup::{self, Options};
use corpusdb::store::{Store, StoreOptions};
use corpusdb::synth::{self, NearDupSpec};

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The corpus as `messages` JSONL and as datatrove's `{"id", "text"}` JSONL.
fn corpus(work: &Path, records: u64) -> (PathBuf, PathBuf) {
    let messages = work.join(format!("corpus-{records}.jsonl"));
    let texts = work.join(format!("text-{records}.jsonl"));
    if messages.exists() && texts.exists() {
        return (messages, texts);
    }
    let spec = NearDupSpec {
        records,
        copy_fraction: 0.3,
        seed: 42,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(&messages).unwrap());
    let mut text_out = std::io::BufWriter::new(std::fs::File::create(&texts).unwrap());
    use std::io::Write;
    for (i, record) in synth::near_duplicates(&spec).enumerate() {
        serde_json::to_writer(&mut out, &record.record).unwrap();
        out.write_all(b"\n").unwrap();
        let text: Vec<&str> = record.record["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        serde_json::to_writer(
            &mut text_out,
            &serde_json::json!({"id": i.to_string(), "text": text.join("\n")}),
        )
        .unwrap();
        text_out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
    text_out.flush().unwrap();
    (messages, texts)
}

fn datatrove(work: &Path, texts: &Path) {
    // The JSONL reader needs orjson; the English word tokenizer, spaCy.
    let python = common::venv(work, &["datatrove[processing]", "orjson", "spacy"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/baseline_minhash.py");
    let output = Command::new(&python)
        .arg(script)
        .arg(texts)
        .arg(work.join("datatrove"))
        .args(["--workers", "2"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "datatrove failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("datatrove: {}", stdout.lines().last().unwrap_or(""));
}

/// One `neardup::run` on the store at `store_dir`, in this process (a child of the bench, so
/// that its peak RSS is the run's alone, as a `corpusdb dedup --near` process's would be).
fn dedup_phase(store_dir: &Path) {
    let store = Store::open_with(
        store_dir,
        &StoreOptions {
            write_buffer_bytes: neardup::WRITE_BUFFER_BYTES,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    let outcome = neardup::run(&store, &Options::default(), &|_, _, _| {}).unwrap();
    drop(store);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{secs:.2}s ({:.0} examples/s), peak RSS {:.0} MiB; {} signed, {} candidate pairs, \
         {} new pairs, {} clusters, {} near-duplicates, {} newly excluded",
        outcome.examples as f64 / secs,
        peak_rss_mib(),
        outcome.signed,
        outcome.candidates,
        outcome.new_pairs,
        outcome.clusters,
        outcome.near_duplicates,
        outcome.excluded
    );
}

/// Runs [`dedup_phase`] in a child process; returns its report and wall seconds.
fn dedup_child(store_dir: &Path) -> (String, f64) {
    let started = Instant::now();
    let output = Command::new(std::env::current_exe().unwrap())
        .env("CORPUSDB_BENCH_DEDUP_STORE", store_dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = String::from_utf8_lossy(&output.stdout).trim().to_string();
    (report, started.elapsed().as_secs_f64())
}

fn main() {
    if let Some(store_dir) = std::env::var_os("CORPUSDB_BENCH_DEDUP_STORE") {
        dedup_phase(Path::new(&store_dir));
        return;
    }
    let (_, records, work) = common::bench_run("bench-neardup", 500_000);
    let (messages, texts) = corpus(&work, records);
    let bytes = std::fs::metadata(&messages).unwrap().len();
    println!(
        "{records} records, {:.0} MB (messages JSONL), {:.0} MB text JSONL",
        bytes as f64 / 1e6,
        std::fs::metadata(&texts).unwrap().len() as f64 / 1e6
    );

    let store_dir = work.join(format!("store-{records}"));
    let _ = std::fs::remove_dir_all(&store_dir);
    reset_peak_rss();
    let started = Instant::now();
    {
        let store = Store::open(&store_dir).unwrap();
        let imported = ingest::ingest_file(
            &store,
            &messages,
            &IngestOptions::new("bench", "general"),
            &ingest::Quiet,
        )
        .unwrap();
        store.flush().unwrap();
        println!(
            "corpusdb ingest: {:.2}s, {} examples stored, peak RSS {:.0} MiB",
            started.elapsed().as_secs_f64(),
            imported.import.counts.stored,
            peak_rss_mib()
        );
    }
    let ingest_secs = started.elapsed().as_secs_f64();

    let (report, dedup_secs) = dedup_child(&store_dir);
    println!("corpusdb dedup --near: {report}");
    println!("corpusdb ingest + dedup: {:.2}s", ingest_secs + dedup_secs);
    // Nothing new: the store walk and the clustering only.
    let (report, _) = dedup_child(&store_dir);
    println!("corpusdb dedup --near again (nothing new): {report}");

    // Another import of 2% more records (copies of earlier originals among them): the
    // incremental run signs only those and looks them up in the stored buckets.
    let extra = (records / 50).max(1);
    let more = work.join(format!("more-{records}.jsonl"));
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&more).unwrap());
        let spec = NearDupSpec {
            records: records + extra,
            copy_fraction: 0.3,
            seed: 42,
        };
        for record in synth::near_duplicates(&spec).skip(records as usize) {
            serde_json::to_writer(&mut out, &record.record).unwrap();
            out.write_all(b"\n").unwrap();
        }
        out.flush().unwrap();
        let store = Store::open(&store_dir).unwrap();
        ingest::ingest_file(
            &store,
            &more,
            &IngestOptions::new("bench-more", "general"),
            &ingest::Quiet,
        )
        .unwrap();
    }
    let (report, _) = dedup_child(&store_dir);
    println!("corpusdb dedup --near after importing {extra} more records: {report}");

    if std::env::var("CORPUSDB_BENCH_DATATROVE").is_ok_and(|v| v == "1") {
        datatrove(&work, &texts);
    }
}
