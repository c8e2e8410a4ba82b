//! `corpusdb ingest` end to end against the merge a user would otherwise write: the
//! strategy document's Python merge script (`benches/baseline_merge.py`) and a Hugging
//! Face `datasets` pipeline (`benches/baseline_datasets.py`), one after another on the
//! same files, with the ratios.
//!
//! ```text
//! cargo bench --bench peers                                 # 500k records in 4 files
//! CORPUSDB_BENCH_RECORDS=1000000 cargo bench --bench peers
//! ```
//!
//! The corpus is `corpusdb generate`'s (four files of a quarter each, seeds 1-4: alpaca,
//! messages and sharegpt shapes mixed, 1-4 turns, 15% repeats). corpusdb runs as its
//! release binary, `ingest` of the four files into a fresh store with format detection,
//! so the time includes the store, provenance, rejects ledger, checkpoints and the
//! metadata index. Each program's wall time and peak RSS (`wait4`) are measured from
//! outside. The bench makes a venv under the target directory with `datasets` on first
//! use. Under `cargo test --all-targets` it runs once on 2,000 records, corpusdb and the
//! Python script only, as a smoke test. Files are kept in `target/bench-peers/`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use corpusdb::synth::{self, SynthSpec};

mod common;

/// Wall seconds, peak RSS (MiB), stdout of a child run to its end.
// The child is reaped by `wait4`, which also gives its own peak RSS.
#[allow(clippy::zombie_processes)]
fn measured(mut command: Command) -> (f64, f64, String) {
    let started = Instant::now();
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
        text
    });
    let mut status = 0;
    // Safety: a zeroed rusage is valid; wait4 reaps our own child and fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4");
    let secs = started.elapsed().as_secs_f64();
    let text = reader.join().unwrap();
    let status = ExitStatus::from_raw(status);
    assert!(status.success(), "{command:?} failed: {status}\n{text}");
    (secs, usage.ru_maxrss as f64 / 1024.0, text)
}

fn corpus(work: &Path, records: u64) -> Vec<PathBuf> {
    (1..=4u64)
        .map(|seed| {
            let path = work.join(format!("part-{records}-{seed}.jsonl"));
            if !path.exists() {
                synth::generate_file(
                    &path,
                    &SynthSpec {
                        records: records / 4,
                        seed,
                        ..SynthSpec::default()
                    },
                )
                .unwrap();
            }
            path
        })
        .collect()
}

fn main() {
    let (measuring, records, work) = common::bench_run("bench-peers", 500_000);
    let files = corpus(&work, records);
    let bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    println!(
        "{records} records in {} files, {} MB",
        files.len(),
        bytes / 1_000_000
    );
    // Nothing from an earlier run in the page cache's favour: every program reads the
    // files once before its timed run.
    for file in &files {
        std::fs::read(file).unwrap();
    }

    let store = work.join("store");
    let _ = std::fs::remove_dir_all(&store);
    let mut ingest = Command::new(env!("CARGO_BIN_EXE_corpusdb"));
    ingest
        .arg("--store")
        .arg(&store)
        .args(["ingest", "--source", "peers", "--category", "general"])
        .args(&files);
    let (secs, rss, out) = measured(ingest);
    let corpusdb_rate = records as f64 / secs;
    println!(
        "corpusdb ingest (store + provenance + rejects + index): {secs:.2}s, {corpusdb_rate:.0} records/s, peak RSS {rss:.0} MiB; {}",
        out.lines().last().unwrap_or("")
    );

    let script = |name: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches")
            .join(name)
    };
    let mut merge = Command::new("python3");
    merge
        .arg(script("baseline_merge.py"))
        .args(&files)
        .arg(work.join("merged.jsonl"));
    let (secs, rss, out) = measured(merge);
    let merge_rate = records as f64 / secs;
    println!(
        "Python merge script: {secs:.2}s, {merge_rate:.0} records/s, peak RSS {rss:.0} MiB; {}",
        out.trim()
    );
    let mut ratios = format!(
        "corpusdb / Python merge: {:.2}x",
        corpusdb_rate / merge_rate
    );
    if measuring {
        let mut datasets = Command::new(common::venv(&work, &["datasets"]));
        datasets
            .arg(script("baseline_datasets.py"))
            .arg(work.join("datasets"))
            .args(&files);
        let (secs, rss, out) = measured(datasets);
        let datasets_rate = records as f64 / secs;
        println!(
            "Hugging Face datasets: {secs:.2}s, {datasets_rate:.0} records/s, peak RSS {rss:.0} MiB; {}",
            out.trim()
        );
        ratios += &format!(
            ", corpusdb / datasets: {:.2}x",
            corpusdb_rate / datasets_rate
        );
    }
    println!("{ratios}");
}
