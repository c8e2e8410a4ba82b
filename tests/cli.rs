use std::process::Stdio;

use corpusdb::store::Store;
use serde_json::Value;

use crate::util::{bin, corpusdb, run_ok, write};

#[test]
fn stats_json_has_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let a = write(
        dir.path(),
        "a.jsonl",
        br#"{"instruction": "Name a color.", "output": "Blue."}
{"instruction": "Name a color.", "output": "Blue."}
not json
"#,
    );
    let out = run_ok(
        corpusdb(&store)
            .args(["ingest", "--source", "s1", "--category", "instruction"])
            .arg(&a),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("read 3, stored 1, duplicates 1, rejected 1"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("a.jsonl:3: rejected: malformed JSON"),
        "{stderr}"
    );

    let out = run_ok(corpusdb(&store).args(["stats", "--json"]));
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["examples"], 1);
    assert_eq!(stats["duplicates"], 1);
    assert_eq!(stats["rejected"], 1);
    assert_eq!(stats["categories"]["instruction"], 1);
    assert_eq!(stats["sources"]["s1"], 2);

    let out = run_ok(corpusdb(&store).args(["imports", "--json"]));
    let imports: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(imports[0]["state"], "done");
    assert_eq!(imports[0]["read"], 3);

    let out = run_ok(corpusdb(&store).args(["rejects", "--source", "s1", "--json"]));
    let reject: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(reject["line"], 3);
    assert_eq!(reject["raw"], "not json");

    let hash = {
        let s = Store::open_read_only(&store).unwrap();
        let (_, hash) = s.ordinals().next().unwrap().unwrap();
        hash.to_hex()
    };
    let out = run_ok(corpusdb(&store).args(["show", &hash[..8], "--json"]));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["hash"], hash);
    assert_eq!(shown["messages"][1]["content"], "Blue.");
    assert_eq!(shown["sources"].as_array().unwrap().len(), 2);
}

#[test]
fn a_second_writer_gets_a_clear_locked_error() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let a = write(
        dir.path(),
        "a.jsonl",
        br#"{"instruction": "x", "output": "y"}"#,
    );
    let _held = Store::open(&store_path).unwrap();
    let out = corpusdb(&store_path)
        .args(["ingest", "--source", "s", "--category", "c"])
        .arg(&a)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is locked: another corpusdb process is writing to it"),
        "{stderr}"
    );
    // Readers still work while the writer holds the store.
    run_ok(corpusdb(&store_path).args(["stats"]));
}

#[test]
fn reading_a_missing_store_says_how_to_create_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .arg("--store")
        .arg(dir.path().join("nope"))
        .arg("stats")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no store at"));
}

#[test]
fn the_sample_corpus_manifest_imports_with_duplicates_and_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/sample-corpus.yaml");
    run_ok(corpusdb(&store).args(["ingest", "--manifest", manifest]));
    let out = run_ok(corpusdb(&store).args(["stats", "--json"]));
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = |k: &str| stats[k].as_u64().unwrap();
    assert_eq!(n("read"), n("examples") + n("duplicates") + n("rejected"));
    assert!(n("duplicates") >= 7, "{stats}");
    assert!(n("rejected") >= 5, "{stats}");
    assert!(
        stats["categories"].as_object().unwrap().len() >= 5,
        "{stats}"
    );
    // Running the manifest again changes nothing.
    let again = run_ok(corpusdb(&store).args(["ingest", "--manifest", manifest]));
    assert!(
        String::from_utf8_lossy(&again.stdout)
            .matches("nothing to do")
            .count()
            == 6
    );
}
