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
    // Every family is listed with what it holds; the one stored example has a body on disk.
    let families = stats["families"].as_array().unwrap();
    let bodies = families.iter().find(|f| f["name"] == "bodies").unwrap();
    assert!(bodies["disk_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(bodies["table_files"], 1, "{stats}");
    let out = run_ok(corpusdb(&store).arg("stats"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("indexes and filters held in memory while the store is open:"),
        "{text}"
    );

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
    assert_eq!(
        n("read") - n("joined") + n("extra"),
        n("examples") + n("duplicates") + n("rejected")
    );
    // OASST rows join into trees and one tree gives two paths.
    assert_eq!((n("joined"), n("extra")), (5, 1), "{stats}");
    assert_eq!(stats["categories"]["tool"], 3, "{stats}");
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
            == 10
    );
}

#[test]
fn formats_lists_every_format_and_a_mapping_file_defines_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(bin().arg("formats"));
    let listing = String::from_utf8_lossy(&out.stdout);
    for name in [
        "alpaca",
        "oasst-rows",
        "glaive",
        "squad",
        "empathetic-dialogues",
        "text",
    ] {
        assert!(
            listing.lines().any(|l| l.starts_with(name)),
            "{name} missing from:\n{listing}"
        );
    }
    assert!(
        listing.contains("fields: rows grouped by conv_id"),
        "{listing}"
    );

    let mapping = write(
        dir.path(),
        "faq.yaml",
        br#"name: faq
description: Support FAQ export
detect: [q, a.text]
system: "{persona?}"
turns:
  - role: user
    content: ["{topic?}", "{q}"]
  - role: assistant
    content: "{a.text}"
"#,
    );
    let out = run_ok(bin().args(["formats", "--json", "--mapping"]).arg(&mapping));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let faq = list
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "faq")
        .unwrap();
    assert_eq!(faq["fields"], "persona?, topic?, q, a.text");

    let data = write(
        dir.path(),
        "faq.jsonl",
        br#"{"q": "How do I reset my password?", "a": {"text": "Use the link on the sign-in page."}, "topic": "Accounts"}
{"q": "Where is my invoice?", "a": {}}
"#,
    );
    let store = dir.path().join("store");
    let out = run_ok(
        corpusdb(&store)
            .args(["ingest", "--source", "faq", "--category", "qa", "--mapping"])
            .arg(&mapping)
            .arg(&data),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("faq: read 2, stored 1, duplicates 0, rejected 1"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("faq.jsonl:2: rejected: faq record lacks required field `a.text`"),
        "{stderr}"
    );
    // An unknown format name lists the known ones.
    let out = corpusdb(&store)
        .args([
            "ingest",
            "--source",
            "x",
            "--category",
            "qa",
            "--format",
            "nope",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown format `nope`; known formats: auto, alpaca, messages"),
        "{stderr}"
    );
}
