//! Crash resume: the binary is killed with SIGKILL mid-import, again and again, then
//! finishes; the store must equal that of an uninterrupted import.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use corpusdb::store::{ImportState, Store};

use crate::util::{bin, corpusdb, dump, index_documents, run_ok};

/// The import of `file`: `args` add a format, a batch size, durability options.
fn ingest_cmd(store: &Path, file: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = bin();
    cmd.arg("--store").arg(store).arg("ingest").arg(file);
    cmd.args(["--source", "synthetic", "--category", "general"]);
    if !args.contains(&"--batch-size") {
        cmd.args(["--batch-size", "300"]);
    }
    cmd.args(args);
    cmd
}

/// Without the log, a kill loses what was not flushed yet: a 1 MiB write buffer makes
/// flushes (and so durable checkpoints) happen every few hundred records.
#[test]
fn sigkill_then_resume_equals_an_uninterrupted_import() {
    kill_resume_compare(&["--write-buffer-mb", "1"]);
}

/// With the log, every committed batch survives a kill.
#[test]
fn sigkill_then_resume_equals_an_uninterrupted_import_with_the_wal() {
    kill_resume_compare(&["--wal"]);
}

/// Row formats join consecutive rows into one conversation: a checkpoint must never split
/// a conversation, also when a kill lands while a group's rows are being read. Small
/// batches put checkpoints inside groups all the time; a broken row sits mid-group.
#[test]
fn sigkill_then_resume_of_a_row_format_equals_an_uninterrupted_import() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("rows.jsonl");
    let mut text = String::new();
    let mut rng = corpusdb::synth::SplitMix64::new(5);
    for dialogue in 0..2500u64 {
        let rows = 1 + rng.below(4);
        for response in 0..rows {
            if dialogue == 1200 && response == 1 {
                text.push_str("{\"dialogue_id\": 1200, \"broken\n");
            }
            text.push_str(&format!(
                "{{\"dialogue_id\": {dialogue}, \"response_id\": {response}, \"context\": \"question {} of dialogue {dialogue}\", \"response\": \"answer {}\"}}\n",
                response,
                rng.below(50)
            ));
        }
    }
    std::fs::write(&corpus, text).unwrap();
    let args = ["--format", "prosocial-dialog", "--batch-size", "7", "--wal"];
    let reference = dir.path().join("reference");
    run_ok(&mut ingest_cmd(&reference, &corpus, &args));
    let expected = dump(&reference);
    assert!(expected.counters.joined > 2000, "{:?}", expected.counters);
    assert_eq!(expected.counters.rejected, 1);

    let crashed = dir.path().join("crashed");
    let mut kills = 0;
    for wait_ms in [120u64, 300, 200, 450, 90] {
        let mut child = ingest_cmd(&crashed, &corpus, &args)
            .env("CORPUSDB_TEST_BATCH_DELAY_MS", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(wait_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(kills >= 2, "killed only {kills} times");
    run_ok(&mut ingest_cmd(&crashed, &corpus, &args));
    assert_eq!(dump(&crashed), expected);
}

fn kill_resume_compare(durability: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    run_ok(
        bin()
            .args(["generate", "--records", "6000", "--seed", "7", "--out"])
            .arg(&corpus),
    );
    // Bad records in the middle and at the end must be accounted for identically.
    let mut text = std::fs::read(&corpus).unwrap();
    let middle = text.len() / 2;
    let cut = middle + text[middle..].iter().position(|&b| b == b'\n').unwrap() + 1;
    text.splice(cut..cut, b"{\"broken\": \n\xff\xfe\n".iter().copied());
    text.extend_from_slice(b"{\"instruction\": \"tail\"}\n");
    std::fs::write(&corpus, &text).unwrap();

    let reference = dir.path().join("reference");
    run_ok(&mut ingest_cmd(&reference, &corpus, &[]));
    let expected = dump(&reference);
    assert_eq!(expected.counters.read, 6003);
    assert_eq!(expected.counters.rejected, 3);
    assert!(
        expected.counters.duplicates > 500,
        "the generator repeats ~15%"
    );

    let crashed = dir.path().join("crashed");
    let mut kills = 0;
    let mut partial_seen = Vec::new();
    // Fixed delays land anywhere, also before the first checkpoint on a loaded machine;
    // `None` waits until a checkpoint is on disk (seen by a reader) before the kill.
    for wait_ms in [Some(150u64), Some(400), None, Some(700), Some(100)] {
        let mut child = ingest_cmd(&crashed, &corpus, durability)
            .env("CORPUSDB_TEST_BATCH_DELAY_MS", "60")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let checkpointed = || {
            crashed.join("CURRENT").exists()
                && Store::open_read_only(&crashed).is_ok_and(|store| {
                    store.imports().is_ok_and(|imports| {
                        imports
                            .iter()
                            .any(|i| i.state == ImportState::Partial && i.counts.read > 0)
                    })
                })
        };
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            match wait_ms {
                Some(ms) if start.elapsed() >= Duration::from_millis(ms) => break,
                None if start.elapsed() >= Duration::from_secs(60) || checkpointed() => break,
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        // A kill while RocksDB creates the store's column families leaves a store without
        // some of them: nothing was imported yet, and the next run completes it.
        let opened = crashed
            .join("CURRENT")
            .exists()
            .then(|| Store::open_read_only(&crashed))
            .and_then(|opened| match opened {
                Err(e) if e.to_string().contains("Column family not found") => None,
                other => Some(other.unwrap()),
            });
        if let Some(store) = opened {
            for import in store.imports().unwrap() {
                assert!(
                    import.counts.adds_up(),
                    "counts add up at every checkpoint: {:?}",
                    import.counts
                );
                partial_seen.push((import.state, import.counts.read));
            }
            let counters = store.counters().unwrap();
            assert_eq!(
                counters.read,
                counters.examples + counters.duplicates + counters.rejected
            );
        }
    }
    assert!(
        kills >= 3,
        "the import should have been killed mid-way several times, got {kills}"
    );
    assert!(
        partial_seen
            .iter()
            .any(|(state, read)| *state == ImportState::Partial && *read > 0),
        "some kill should land after a committed batch: {partial_seen:?}"
    );
    // The index never saw the killed imports' batches; the next command that opens it
    // replays the store's change log, after which store and index agree.
    let check = run_ok(corpusdb(&crashed).arg("check"));
    assert!(String::from_utf8_lossy(&check.stdout).contains("consistent"));
    let finish = run_ok(&mut ingest_cmd(&crashed, &corpus, durability));
    let stdout = String::from_utf8_lossy(&finish.stdout);
    assert!(
        stdout.contains("resumed at record") || stdout.contains("nothing to do"),
        "{stdout}"
    );
    assert_eq!(dump(&crashed), expected);
    run_ok(corpusdb(&crashed).arg("check"));
    // What the killed and resumed imports fed the index, with the change log filling the
    // gaps the kills left, is what a rebuild from the store gives.
    let fed = index_documents(&crashed);
    assert_eq!(fed.len() as u64, expected.counters.examples);
    run_ok(corpusdb(&crashed).arg("reindex"));
    assert_eq!(fed, index_documents(&crashed));

    // And once complete, another run is a no-op.
    let again = run_ok(&mut ingest_cmd(&crashed, &corpus, durability));
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
    assert_eq!(dump(&crashed), expected);
}
