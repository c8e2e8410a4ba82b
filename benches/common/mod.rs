//! Shared by the benchmarks: a synthetic store of `records` records and a byte-level BPE
//! tokenizer trained on it, kept in `target/bench-analyze/`; page-cache control; the
//! Python venvs of the baselines.

use std::path::{Path, PathBuf};
use std::time::Instant;

use corpusdb::ingest::{self, IngestOptions};
use corpusdb::store::Store;
use corpusdb::synth::{self, SynthSpec};

/// The store directory and tokenizer.json, built on first use.
#[allow(dead_code)]
pub fn store_and_tokenizer(records: u64, vocab: usize) -> (PathBuf, PathBuf) {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let work = PathBuf::from(target).join("bench-analyze");
    std::fs::create_dir_all(&work).unwrap();
    let store_dir = work.join(format!("store-{records}"));
    // A store cached by another build may not open with this one (a newer or older
    // layout): build it again.
    if store_dir.exists() && Store::open(&store_dir).is_err() {
        std::fs::remove_dir_all(&store_dir).unwrap();
    }
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
    let tokenizer = work.join(format!("tokenizer-chat-{vocab}.json"));
    if !tokenizer.exists() {
        train_tokenizer(&store_dir, &tokenizer, vocab);
    }
    (store_dir, tokenizer)
}

/// A byte-level BPE (no prefix space, ChatML's markers as special tokens) trained on the
/// text of the first 20,000 examples.
fn train_tokenizer(store_dir: &Path, out: &Path, vocab: usize) {
    let store = Store::open_read_only(store_dir).unwrap();
    let started = Instant::now();
    corpusdb::batches::template::train_from_store(&store, 20_000, vocab, out).unwrap();
    eprintln!(
        "trained the tokenizer in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// Drops every file under `dir` from the page cache (`posix_fadvise` DONTNEED: clean
/// pages only, no privileges needed), so the next reads come from the disk.
#[allow(dead_code)]
pub fn evict(dir: &Path) {
    use std::os::fd::AsRawFd;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            evict(&path);
        } else if let Ok(file) = std::fs::File::open(&path) {
            // Safety: a valid descriptor; the call only advises the kernel.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// Pages of the files under `dir` that are in the page cache, and all their pages.
#[allow(dead_code)]
pub fn resident_pages(dir: &Path) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    let (mut resident, mut total) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let (r, t) = resident_pages(&path);
            resident += r;
            total += t;
            continue;
        }
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        let len = file.metadata().unwrap().len() as usize;
        if len == 0 {
            continue;
        }
        // Safety: a shared read-only map of an open file, unmapped before it closes.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            if map == libc::MAP_FAILED {
                continue;
            }
            let pages = len.div_ceil(4096);
            let mut vec = vec![0u8; pages];
            if libc::mincore(map, len, vec.as_mut_ptr()) == 0 {
                resident += vec.iter().filter(|&&b| b & 1 != 0).count() as u64;
            }
            total += pages as u64;
            libc::munmap(map, len);
        }
    }
    (resident, total)
}

/// The python of a venv at `<work>/venv` holding `packages`, made with pip on first use.
#[allow(dead_code)]
pub fn venv(work: &Path, packages: &[&str]) -> PathBuf {
    use std::process::Command;
    let venv = work.join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        eprintln!(
            "setting up {} (pip install {})",
            venv.display(),
            packages.join(" ")
        );
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap()
            .success()
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q"])
                .args(packages)
                .status()
                .unwrap()
                .success();
        assert!(ok, "could not install {packages:?} into {}", venv.display());
    }
    python
}

/// `(measuring, records, work dir)` of a bench run: `--bench` measures `measured` records
/// (`CORPUSDB_BENCH_RECORDS` overrides), a test run takes 2,000; files are kept in
/// `target/<name>/`.
#[allow(dead_code)]
pub fn bench_run(name: &str, measured: u64) -> (bool, u64, PathBuf) {
    let measuring = std::env::args().any(|a| a == "--bench");
    let records = std::env::var("CORPUSDB_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if measuring { measured } else { 2_000 });
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let work = PathBuf::from(target).join(name);
    std::fs::create_dir_all(&work).unwrap();
    (measuring, records, work)
}
