//! The category index: query semantics, facets against the store, the index fed by
//! imports against one rebuilt from the store, recovery of a lagging index, rebuild, and
//! the export round trip.

use std::path::{Path, PathBuf};

use corpusdb::index::query::{parse, TermField};
use corpusdb::index::{self, Index};
use corpusdb::ingest::IngestOptions;
use corpusdb::store::Store;

use crate::util::{bin, corpusdb, ingest, run_ok, stored_hashes, write};

/// Ten examples with known categories, sources, turns and lengths.
fn known_corpus(dir: &Path) -> std::path::PathBuf {
    let store_path = dir.join("store");
    let store = Store::open(&store_path).unwrap();
    let mut math = String::new();
    for i in 0..4 {
        // 1 turn; chars = len("What is i+i?") + len(answer)
        math.push_str(&format!(
            r#"{{"instruction": "What is {i}+{i}?", "output": "It is {}."}}"#,
            2 * i
        ));
        math.push('\n');
    }
    let mut chat = String::new();
    for i in 0..3 {
        chat.push_str(&format!(
            r#"{{"messages": [{{"role": "user", "content": "Hello number {i}"}}, {{"role": "assistant", "content": "Hi there, friend {i}."}}, {{"role": "user", "content": "How are you?"}}, {{"role": "assistant", "content": "Very well, thank you for asking."}}]}}"#
        ));
        chat.push('\n');
    }
    let code = r#"{"instruction": "Write hello world in Python", "output": "print('hello world')"}
{"instruction": "Reverse a list in Python", "output": "xs[::-1] reverses the list xs and returns a new list."}
{"instruction": "What is 1+1?", "output": "It is 2."}
"#;
    ingest(
        &store,
        &write(dir, "math.jsonl", math.as_bytes()),
        "gsm",
        "math",
    );
    ingest(
        &store,
        &write(dir, "chat.jsonl", chat.as_bytes()),
        "ultrachat",
        "conversation",
    );
    // The last code record repeats a math record: a duplicate from a new source.
    ingest(
        &store,
        &write(dir, "code.jsonl", code.as_bytes()),
        "codealpaca",
        "code",
    );
    let index = Index::open_or_create(&store_path, false).unwrap();
    index.catch_up(&store, &|_, _| {}).unwrap();
    store_path
}

fn stored_hashes_with_prefix(store: &corpusdb::store::Store, prefix: &str) -> u64 {
    store
        .ordinals()
        .filter(|entry| entry.as_ref().unwrap().1.to_hex().starts_with(prefix))
        .count() as u64
}

fn count(index: &Index, q: &str) -> u64 {
    index.count(&parse(q).unwrap()).unwrap()
}

#[test]
fn every_operator_selects_the_right_examples() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = known_corpus(dir.path());
    let index = Index::open_or_create(&store_path, false).unwrap();
    assert_eq!(count(&index, ""), 9);
    assert_eq!(count(&index, "*"), 9);
    assert_eq!(count(&index, "category:math"), 4);
    assert_eq!(count(&index, "category:nothing"), 0);
    assert_eq!(
        count(&index, "source:codealpaca"),
        3,
        "the duplicate carries its new source"
    );
    assert_eq!(count(&index, "source:gsm source:codealpaca"), 1);
    assert_eq!(count(&index, "source:gsm AND source:codealpaca"), 1);
    assert_eq!(count(&index, "category:math OR category:code"), 6);
    assert_eq!(count(&index, "NOT category:math"), 5);
    assert_eq!(count(&index, "-category:math -category:code"), 3);
    assert_eq!(count(&index, "turns:2"), 3);
    assert_eq!(count(&index, "turns:>=2"), 3);
    assert_eq!(count(&index, "turns:>1"), 3);
    assert_eq!(count(&index, "turns:<2"), 6);
    assert_eq!(count(&index, "turns:<=1"), 6);
    assert_eq!(count(&index, "messages:4"), 3);
    // Every math record is "What is i+i?" (12 characters) + "It is 2i." (8).
    assert_eq!(count(&index, "chars:20"), 4);
    assert_eq!(count(&index, "chars:<=20"), 4);
    assert_eq!(count(&index, "chars:<20"), 0);
    assert_eq!(count(&index, "chars:>20 category:math"), 0);
    assert_eq!(
        count(
            &index,
            "(category:math OR category:conversation) AND turns:>=2"
        ),
        3
    );
    assert_eq!(
        count(
            &index,
            "category:math AND NOT (chars:>20 OR source:codealpaca)"
        ),
        3
    );
    assert_eq!(count(&index, "ordinal:<3"), 3);

    // Hashes, whole or a prefix, in any case, select the example, excluded or not.
    let store = corpusdb::store::Store::open_read_only(&store_path).unwrap();
    for entry in store.ordinals() {
        let (ordinal, hash) = entry.unwrap();
        let hex = hash.to_hex();
        for query in [
            format!("hash:{hex}"),
            format!("hash:{}", hex.to_uppercase()),
            format!("hash:{}", &hex[..16]),
            format!("hash:{}", &hex[..24]),
        ] {
            let hits = index.search(&parse(&query).unwrap(), 0, 10).unwrap();
            assert_eq!(
                hits.iter().map(|h| (h.ordinal, h.hash)).collect::<Vec<_>>(),
                [(ordinal, hash)],
                "{query}"
            );
        }
        let prefix = &hex[..4];
        let sharing = stored_hashes_with_prefix(&store, prefix);
        assert_eq!(
            count(&index, &format!("hash:{prefix}")),
            sharing,
            "{prefix}"
        );
    }
    let mut absent = store.ordinals().next().unwrap().unwrap().1.to_hex();
    absent.replace_range(39.., if absent.ends_with('0') { "1" } else { "0" });
    assert_eq!(
        count(&index, &format!("hash:{absent}")),
        1,
        "the first 16 digits (64 bits) decide"
    );
    assert_eq!(count(&index, "hash:ffffffffffffffff"), 0);
    for bad in [
        "hash:abc",
        "hash:xyz123",
        "hash:0123456789012345678901234567890123456789ab",
    ] {
        let err = parse(bad).unwrap_err();
        assert!(err.expected.contains("4 to 40 hex digits"), "{bad}: {err}");
    }

    let hits = index
        .search(&parse("category:conversation").unwrap(), 1, 10)
        .unwrap();
    assert_eq!(
        hits.iter().map(|h| h.ordinal).collect::<Vec<_>>(),
        [5, 6],
        "insertion order, offset applied"
    );
    assert_eq!(
        index
            .matching_ordinals(&parse("category:code").unwrap())
            .unwrap(),
        [7, 8]
    );

    let err = index.count(&parse("chars:<1").unwrap()).unwrap();
    assert_eq!(err, 0, "an empty result is not an error");
    assert!(matches!(
        index.count(&parse("hello").unwrap()),
        Err(index::Error::NoFullText)
    ));
}

#[test]
fn full_text_stores_search_the_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    run_ok(corpusdb(&store_path).args(["init", "--full-text"]));
    let file = write(
        dir.path(),
        "a.jsonl",
        br#"{"instruction": "Tell me about rivers", "output": "Rivers carry water to the sea."}
{"instruction": "Tell me about mountains", "output": "Mountains are tall."}
"#,
    );
    run_ok(
        corpusdb(&store_path)
            .args(["ingest", "--source", "s", "--category", "geo"])
            .arg(&file),
    );
    let index = Index::open_or_create(&store_path, false).unwrap();
    assert!(index.full_text());
    assert_eq!(count(&index, "rivers"), 1);
    assert_eq!(count(&index, "\"to the sea\""), 1);
    assert_eq!(count(&index, "tell category:geo"), 2);
    assert_eq!(count(&index, "volcano"), 0);
}

#[test]
fn index_only_commands_read_the_counters_alone_and_catch_up_when_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = known_corpus(dir.path());
    {
        // Imported by the library, not fed to the index: the index is two changes behind.
        let store = Store::open(&store_path).unwrap();
        let more = br#"{"instruction": "What is 7+7?", "output": "It is 14."}
{"instruction": "What is 8+8?", "output": "It is 16."}
"#;
        ingest(
            &store,
            &write(dir.path(), "more.jsonl", more),
            "gsm",
            "math",
        );
        let counters = store.counters().unwrap();
        drop(store);
        let read = Store::read_counters(&store_path).unwrap();
        assert_eq!(
            (read.changes, read.examples, read.categories),
            (counters.changes, counters.examples, counters.categories)
        );
    }
    let out = run_ok(corpusdb(&store_path).args(["query", "category:math", "--count"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6");
    let out = run_ok(corpusdb(&store_path).arg("categories"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let math = stdout.lines().find(|l| l.starts_with("math")).unwrap();
    assert!(math.split_whitespace().nth(1) == Some("6"), "{stdout}");
    // Up to date now: the same answers without opening the store's other families.
    let out = run_ok(corpusdb(&store_path).args(["query", "category:math", "--count"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6");
    assert!(matches!(
        Store::read_counters(&dir.path().join("nothing")),
        Err(corpusdb::store::Error::Missing { .. })
    ));
}

#[test]
fn facets_equal_the_store_counts() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = known_corpus(dir.path());
    let store = Store::open_read_only(&store_path).unwrap();
    let index = Index::open_or_create(&store_path, false).unwrap();
    let counters = store.counters().unwrap();
    assert_eq!(
        index.facet(TermField::Category).unwrap(),
        counters.categories
    );
    let sources = index.facet(TermField::Source).unwrap();
    assert_eq!(sources.get("gsm"), Some(&4));
    assert_eq!(sources.get("codealpaca"), Some(&3));
    assert_eq!(sources.get("ultrachat"), Some(&3));
    assert_eq!(index.num_docs().unwrap(), counters.examples);
}

#[test]
fn a_lagging_index_is_brought_up_to_date_and_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = known_corpus(dir.path());
    // The store commits, the index does not: what a crash between the two leaves behind.
    {
        let store = Store::open(&store_path).unwrap();
        let more = write(
            dir.path(),
            "more.jsonl",
            br#"{"instruction": "What is 0+0?", "output": "It is 0."}
{"instruction": "Name a prime", "output": "7"}
"#,
        );
        ingest(&store, &more, "late", "math");
        let index = Index::open_or_create(&store_path, false).unwrap();
        assert!(index.indexed_through().unwrap() < store.counters().unwrap().changes);
        assert_eq!(
            index.count(&parse("category:math").unwrap()).unwrap(),
            4,
            "still the old state"
        );
        // The same index, once caught up, answers from the new commit, not from the
        // searcher it opened for the question before.
        index.catch_up(&store, &|_, _| {}).unwrap();
        assert_eq!(count(&index, "category:math"), 5);
        assert_eq!(count(&index, "source:late"), 2);
    }
    let out = run_ok(corpusdb(&store_path).args(["check"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("consistent"));
    let index = Index::open_or_create(&store_path, false).unwrap();
    assert_eq!(count(&index, "category:math"), 5);
    assert_eq!(
        count(&index, "source:late"),
        2,
        "the duplicate 0+0 gained the source `late`"
    );
    let store = Store::open_read_only(&store_path).unwrap();
    assert!(index::check(&store, &index, 100)
        .unwrap()
        .problems
        .is_empty());
}

#[test]
fn check_fails_when_the_index_disagrees_and_reindex_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = known_corpus(dir.path());
    let queries = [
        "category:math",
        "source:codealpaca",
        "turns:>=2 OR chars:<25",
        "NOT category:code",
    ];
    let answers = |index: &Index| -> Vec<Vec<u64>> {
        queries
            .iter()
            .map(|q| index.matching_ordinals(&parse(q).unwrap()).unwrap())
            .collect()
    };
    let before = answers(&Index::open_or_create(&store_path, false).unwrap());
    // Damage the index: drop it and create an empty one that claims to be up to date.
    std::fs::remove_dir_all(index::index_dir(&store_path)).unwrap();
    {
        let store = Store::open(&store_path).unwrap();
        let index = Index::open_or_create(&store_path, false).unwrap();
        index.rebuild(&store, &|_, _| {}).unwrap();
        // Remove one document behind the store's back.
        let mut writer: tantivy::IndexWriter =
            tantivy::Index::open_in_dir(index::index_dir(&store_path))
                .unwrap()
                .writer(15_000_000)
                .unwrap();
        let schema = writer.index().schema();
        writer.delete_term(tantivy::Term::from_field_u64(
            schema.get_field("ordinal").unwrap(),
            0,
        ));
        let mut commit = writer.prepare_commit().unwrap();
        commit.set_payload(&format!(
            "{} 9 {}",
            store.counters().unwrap().changes,
            index::INDEX_SCHEMA_VERSION
        ));
        commit.commit().unwrap();
    }
    let out = corpusdb(&store_path).arg("check").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("the store has 9 examples, the index 8 documents"),
        "{stdout}"
    );
    run_ok(corpusdb(&store_path).arg("reindex"));
    run_ok(corpusdb(&store_path).arg("check"));
    assert_eq!(
        answers(&Index::open_or_create(&store_path, false).unwrap()),
        before
    );
}

#[test]
fn export_then_ingest_gives_the_same_hash_set() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = known_corpus(dir.path());
    let out_file = dir.path().join("all.jsonl");
    run_ok(
        corpusdb(&store_path)
            .args(["export", "*", "--with-metadata", "--out"])
            .arg(&out_file),
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let hashes: Vec<&str> = lines.iter().map(|l| l["_hash"].as_str().unwrap()).collect();
    let inserted: Vec<String> = Store::open_read_only(&store_path)
        .unwrap()
        .ordinals()
        .map(|item| item.unwrap().1.to_hex())
        .collect();
    assert_eq!(hashes, inserted, "exports come in insertion order");
    let math: Vec<_> = lines.iter().filter(|l| l["_category"] == "math").collect();
    assert_eq!(math.len(), 4);
    assert!(math.iter().all(|l| l["messages"][0]["role"] == "user"));
    let shared = lines
        .iter()
        .find(|l| l["_sources"].as_array().unwrap().len() == 2)
        .unwrap();
    assert_eq!(shared["_sources"], serde_json::json!(["codealpaca", "gsm"]));
    let copy = dir.path().join("copy");
    run_ok(
        corpusdb(&copy)
            .args(["ingest", "--source", "export", "--category", "any"])
            .arg(&out_file),
    );
    assert_eq!(stored_hashes(&copy), stored_hashes(&store_path));

    let math = dir.path().join("math.jsonl");
    run_ok(
        corpusdb(&store_path)
            .args(["export", "category:math", "--out"])
            .arg(&math),
    );
    assert_eq!(std::fs::read_to_string(&math).unwrap().lines().count(), 4);
}

#[test]
fn query_errors_point_at_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = known_corpus(dir.path());
    let out = corpusdb(&store_path)
        .args(["query", "category:math AND (turns:>1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("query error at position 27: expected `)`, found the end of the query"),
        "{stderr}"
    );
    let out =
        run_ok(corpusdb(&store_path).args(["query", "category:conversation", "--format", "jsonl"]));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["sources"][0], "ultrachat");
    let out = run_ok(corpusdb(&store_path).args(["categories", "--json"]));
    let facets: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(facets["examples"], 9);
    assert_eq!(facets["counts"][0]["name"], "math");
}

#[test]
fn readers_work_while_an_import_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let corpus = dir.path().join("corpus.jsonl");
    run_ok(
        bin()
            .args(["generate", "--records", "3000", "--out"])
            .arg(&corpus),
    );
    let mut import = corpusdb(&store_path)
        .args([
            "ingest",
            "--source",
            "syn",
            "--category",
            "general",
            "--batch-size",
            "200",
            "--write-buffer-mb",
            "1",
        ])
        .arg(&corpus)
        .env("CORPUSDB_TEST_BATCH_DELAY_MS", "40")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut answered = 0;
    while import.try_wait().unwrap().is_none() {
        if store_path.join("CURRENT").exists() {
            let out = corpusdb(&store_path)
                .args(["query", "category:general", "--count"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let n: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            assert!(n <= 3000);
            answered += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(import.wait().unwrap().success());
    assert!(answered > 0, "the import ended before any reader ran");
    let out = run_ok(corpusdb(&store_path).arg("check"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("consistent"));
}

/// The known corpus exported as JSONL (parsed) and as Parquet (its path) into `dir`.
fn jsonl_and_parquet_exports(dir: &Path) -> (Vec<serde_json::Value>, PathBuf) {
    let store_path = known_corpus(dir);
    let jsonl = dir.join("all.jsonl");
    let parquet_file = dir.join("all.parquet");
    run_ok(
        corpusdb(&store_path)
            .args(["export", "*", "--with-metadata", "--out"])
            .arg(&jsonl),
    );
    run_ok(
        corpusdb(&store_path)
            .args([
                "export",
                "*",
                "--with-metadata",
                "--format",
                "parquet",
                "--out",
            ])
            .arg(&parquet_file),
    );
    let expected: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (expected, parquet_file)
}

#[test]
fn parquet_export_reads_back_with_the_same_content() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let dir = tempfile::tempdir().unwrap();
    let (expected, parquet_file) = jsonl_and_parquet_exports(dir.path());
    let reader = SerializedFileReader::new(std::fs::File::open(&parquet_file).unwrap()).unwrap();
    assert_eq!(reader.metadata().file_metadata().num_rows(), 9);
    let rows: Vec<serde_json::Value> = reader
        .get_row_iter(None)
        .unwrap()
        .map(|r| r.unwrap().to_json_value())
        .collect();
    assert_eq!(rows.len(), expected.len());
    for (row, want) in rows.iter().zip(&expected) {
        assert_eq!(row["_hash"], want["_hash"]);
        assert_eq!(row["_category"], want["_category"]);
        assert_eq!(row["_sources"], want["_sources"]);
        let messages = row["messages"].as_array().unwrap();
        assert_eq!(messages.len(), want["messages"].as_array().unwrap().len());
        for (got, want) in messages.iter().zip(want["messages"].as_array().unwrap()) {
            assert_eq!(got["role"], want["role"]);
            assert_eq!(got["content"], want["content"]);
        }
    }
}

/// pyarrow, the reader behind Hugging Face `datasets`, reads the export.
#[test]
#[ignore = "needs Python with pyarrow (CORPUSDB_PYTHON; scripts/python-checks runs it)"]
fn pyarrow_reads_the_parquet_export() {
    let dir = tempfile::tempdir().unwrap();
    let (expected, parquet_file) = jsonl_and_parquet_exports(dir.path());
    let script = "import sys, pyarrow.parquet as pq\nt = pq.read_table(sys.argv[1])\nprint(t.num_rows, t.column('messages')[0][0]['content'])";
    let python =
        std::env::var_os("CORPUSDB_PYTHON").unwrap_or_else(|| std::ffi::OsString::from("python3"));
    let out = std::process::Command::new(python)
        .args(["-c", script])
        .arg(&parquet_file)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "pyarrow failed to read the export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = format!(
        "9 {}",
        expected[0]["messages"][0]["content"].as_str().unwrap()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
}

#[test]
fn a_parquet_export_ingests_back_to_the_same_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = known_corpus(dir.path());
    let parquet_file = dir.path().join("all.parquet");
    run_ok(
        corpusdb(&store_path)
            .args(["export", "*", "--format", "parquet", "--out"])
            .arg(&parquet_file),
    );
    let copy = dir.path().join("copy");
    let out = run_ok(
        corpusdb(&copy)
            .args(["ingest", "--source", "pq", "--category", "any"])
            .arg(&parquet_file),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 9, stored 9, duplicates 0, rejected 0")
    );
    assert_eq!(stored_hashes(&copy), stored_hashes(&store_path));
    // Resuming inside a Parquet file skips the rows already read.
    let mut reader = corpusdb::reader::RecordReader::open(&parquet_file, None, 1 << 20).unwrap();
    let all: Vec<_> = std::iter::from_fn(|| reader.next_item().unwrap()).collect();
    let mut reader = corpusdb::reader::RecordReader::open(&parquet_file, None, 1 << 20).unwrap();
    for _ in 0..4 {
        reader.next_item().unwrap().unwrap();
    }
    let resume = reader.resume_point();
    let mut resumed =
        corpusdb::reader::RecordReader::open(&parquet_file, Some(resume), 1 << 20).unwrap();
    let rest: Vec<_> = std::iter::from_fn(|| resumed.next_item().unwrap()).collect();
    assert_eq!(rest.len(), all.len() - 4);
    assert_eq!(format!("{:?}", rest[0].body), format!("{:?}", all[4].body));
    assert_eq!(rest[0].at, all[4].at);
}

#[test]
fn an_index_of_another_schema_version_is_rebuilt_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = known_corpus(dir.path());
    let meta = corpusdb::index::index_dir(&store_path).join("meta.json");
    let set_payload = |payload: &str| {
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
        json["payload"] = serde_json::Value::String(payload.into());
        std::fs::write(&meta, json.to_string()).unwrap();
    };
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    let payload = json["payload"].as_str().unwrap().to_string();
    let numbers: Vec<u64> = payload.split(' ').map(|n| n.parse().unwrap()).collect();
    assert_eq!(
        numbers[2],
        corpusdb::index::INDEX_SCHEMA_VERSION,
        "{payload}"
    );
    let changes = numbers[0];
    let store = corpusdb::store::Store::open(&store_path).unwrap();
    // Written before versions (two numbers): version 1, whose hashes were terms.
    set_payload(&format!("{} {}", numbers[0], numbers[1]));
    let index = Index::open_or_create(&store_path, false).unwrap();
    assert_eq!(index.catch_up(&store, &|_, _| {}).unwrap(), changes);
    assert_eq!(count(&index, "*"), 9);
    drop(index);
    // The same version: kept, nothing to replay.
    let index = Index::open_or_create(&store_path, false).unwrap();
    assert_eq!(index.catch_up(&store, &|_, _| {}).unwrap(), 0);
    drop(index);
    // Another version: rebuilt from the whole change log, with the same answers.
    set_payload(&format!("{} {} 999", numbers[0], numbers[1]));
    let index = Index::open_or_create(&store_path, false).unwrap();
    assert_eq!(index.catch_up(&store, &|_, _| {}).unwrap(), changes);
    assert_eq!(count(&index, "*"), 9);
}

/// Three files that overlap: the second repeats part of the first under another source
/// (those examples gain a source) and has a bad record; the third gives several examples
/// per record. Small batches make many index feeds.
fn overlapping_files(dir: &Path) -> Vec<(PathBuf, IngestOptions)> {
    let first = dir.join("first.jsonl");
    corpusdb::synth::generate_file(
        &first,
        &corpusdb::synth::SynthSpec {
            records: 1500,
            seed: 11,
            ..Default::default()
        },
    )
    .unwrap();
    let second = dir.join("second.jsonl");
    corpusdb::synth::generate_file(
        &second,
        &corpusdb::synth::SynthSpec {
            records: 800,
            seed: 12,
            ..Default::default()
        },
    )
    .unwrap();
    let mut text = std::fs::read_to_string(&first).unwrap();
    let repeated: String = text.lines().step_by(3).map(|l| format!("{l}\n")).collect();
    text = std::fs::read_to_string(&second).unwrap();
    text.push_str("{\"instruction\": \n");
    text.push_str(&repeated);
    std::fs::write(&second, text).unwrap();
    // Two message trees that give three conversations.
    let trees = dir.join("trees.jsonl");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats/oasst.jsonl"),
        &trees,
    )
    .unwrap();
    let mut options = vec![
        IngestOptions::new("first", "instruction"),
        IngestOptions::new("second", "general"),
        IngestOptions::new("third", "colours"),
    ];
    options[1].rules = vec![
        corpusdb::category::Rule::Code,
        corpusdb::category::Rule::Math,
    ];
    for o in &mut options {
        o.batch_records = 97;
    }
    vec![first, second, trees]
        .into_iter()
        .zip(options)
        .collect()
}

/// Queries whose answers (ordinals) an index fed by imports must share with a rebuilt one.
const QUERIES: [&str; 9] = [
    "*",
    "category:instruction",
    "category:code OR category:math",
    "source:first",
    "source:second",
    "source:first AND source:second",
    "turns:>=2 AND chars:<800",
    "messages:2",
    "NOT source:second",
];

fn answers(index: &Index) -> Vec<Vec<u64>> {
    QUERIES
        .iter()
        .map(|q| index.matching_ordinals(&parse(q).unwrap()).unwrap())
        .collect()
}

/// Imports `files` with the index fed by each committed batch, then commits it without
/// replaying the change log.
fn ingest_fed(store: &Store, index: &Index, files: &[(PathBuf, IngestOptions)]) {
    let feed = index.feed(store).unwrap();
    for (path, options) in files {
        let outcome = corpusdb::ingest::ingest_file(store, path, options, &feed).unwrap();
        let run = outcome.run;
        assert!(run.adds_up(), "{run:?}");
        assert!(run.stored > 0, "{run:?}");
    }
    feed.commit().unwrap();
}

#[test]
fn an_index_fed_by_the_import_equals_one_rebuilt_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let files = overlapping_files(dir.path());
    let store = Store::open(&store_path).unwrap();
    let index = Index::open_or_create(&store_path, false).unwrap();
    ingest_fed(&store, &index, &files);
    let counters = store.counters().unwrap();
    assert_eq!(
        counters.read + counters.extra,
        counters.examples + counters.duplicates + counters.rejected + counters.joined
    );
    assert_eq!(counters.rejected, 1);
    assert_eq!(
        counters.extra, 1,
        "a tree with two replies gives two examples"
    );
    // The feed alone brought the index to the end of the change log.
    assert_eq!(index.indexed_through().unwrap(), counters.changes);
    assert_eq!(index.num_docs().unwrap(), counters.examples);
    let both = count(&index, "source:first AND source:second");
    assert!(both > 400, "repeats gained the second source: {both}");
    assert_eq!(count(&index, "source:third"), 3);
    assert_eq!(
        index.facet(TermField::Category).unwrap(),
        counters.categories
    );
    let fed = crate::util::index_documents(&store_path);
    let fed_answers = answers(&index);

    index.rebuild(&store, &|_, _| {}).unwrap();
    let rebuilt = crate::util::index_documents(&store_path);
    assert_eq!(fed.len() as u64, counters.examples);
    assert_eq!(fed, rebuilt);
    assert_eq!(fed_answers, answers(&index));
    assert!(index::check(&store, &index, 10_000)
        .unwrap()
        .problems
        .is_empty());
}

#[test]
fn a_full_text_index_fed_by_the_import_finds_the_same_words() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let mut files = overlapping_files(dir.path());
    // The second import does not hand its texts over: the feed reads them from the store.
    files[1].1.keep_text = false;
    files[0].1.keep_text = true;
    files[2].1.keep_text = true;
    let store = Store::open(&store_path).unwrap();
    let index = Index::open_or_create(&store_path, true).unwrap();
    ingest_fed(&store, &index, &files);
    let words = [
        "basil",
        "\"basil alive\"",
        "the",
        "water",
        "function",
        "nothing",
    ];
    let fed: Vec<u64> = words.iter().map(|w| count(&index, w)).collect();
    assert!(fed.iter().filter(|&&n| n > 0).count() >= 4, "{fed:?}");
    let fed_docs = crate::util::index_documents(&store_path);
    index.rebuild(&store, &|_, _| {}).unwrap();
    let rebuilt: Vec<u64> = words.iter().map(|w| count(&index, w)).collect();
    assert_eq!(fed, rebuilt);
    assert_eq!(fed_docs, crate::util::index_documents(&store_path));
}

#[test]
fn a_crash_between_the_store_commit_and_the_index_commit_is_repaired_by_the_next_command() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let files = overlapping_files(dir.path());
    {
        let store = Store::open(&store_path).unwrap();
        let index = Index::open_or_create(&store_path, false).unwrap();
        ingest_fed(&store, &index, &files[..1]);
        // The second import's batches are fed but never committed to the index: what a
        // kill after the store's last commit leaves.
        let feed = index.feed(&store).unwrap();
        corpusdb::ingest::ingest_file(&store, &files[1].0, &files[1].1, &feed).unwrap();
        assert!(feed.indexed_through() == store.counters().unwrap().changes);
        drop(feed);
        assert!(index.indexed_through().unwrap() < store.counters().unwrap().changes);
        assert_eq!(count(&index, "source:second"), 0, "nothing of it committed");
    }
    // The next command (a reader) replays the change log.
    let out = run_ok(corpusdb(&store_path).args(["query", "source:second", "--count"]));
    let second: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let store = Store::open(&store_path).unwrap();
    let index = Index::open_or_create(&store_path, false).unwrap();
    assert_eq!(
        index.indexed_through().unwrap(),
        store.counters().unwrap().changes
    );
    let caught_up = crate::util::index_documents(&store_path);
    let caught_up_answers = answers(&index);
    index.rebuild(&store, &|_, _| {}).unwrap();
    assert_eq!(second, count(&index, "source:second"));
    assert!(second > 700, "{second}");
    assert_eq!(caught_up, crate::util::index_documents(&store_path));
    assert_eq!(caught_up_answers, answers(&index));
}

#[test]
fn a_resumed_import_feeds_the_index_from_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let mut files = overlapping_files(dir.path());
    let store = Store::open(&store_path).unwrap();
    let index = Index::open_or_create(&store_path, false).unwrap();
    ingest_fed(&store, &index, &files[..1]);
    // --strict stops at the bad record of the second file: the batches before it are in
    // the store, the index's feed is dropped uncommitted.
    files[1].1.strict = true;
    {
        let feed = index.feed(&store).unwrap();
        let stopped = corpusdb::ingest::ingest_file(&store, &files[1].0, &files[1].1, &feed);
        assert!(matches!(
            stopped,
            Err(corpusdb::ingest::Error::Strict { .. })
        ));
    }
    let partial = store.imports().unwrap()[1].counts;
    assert!(partial.read > 0 && partial.read < 800, "{partial:?}");
    assert!(index.indexed_through().unwrap() < store.counters().unwrap().changes);
    // The next import catches the index up from the change log, then feeds it.
    files[1].1.strict = false;
    let feed = index.feed(&store).unwrap();
    assert!(feed.catch_up(&|_, _| {}).unwrap() > 0);
    let outcome = corpusdb::ingest::ingest_file(&store, &files[1].0, &files[1].1, &feed).unwrap();
    assert!(outcome.resumed_from.is_some());
    assert!(outcome.import.counts.adds_up());
    assert_eq!(outcome.import.counts.read, 800 + 1 + 500);
    let outcome = corpusdb::ingest::ingest_file(&store, &files[2].0, &files[2].1, &feed).unwrap();
    assert!(outcome.run.adds_up());
    feed.commit().unwrap();
    drop(feed);
    let counters = store.counters().unwrap();
    assert_eq!(index.indexed_through().unwrap(), counters.changes);
    assert_eq!(
        counters.read + counters.extra,
        counters.examples + counters.duplicates + counters.rejected + counters.joined
    );
    let fed = crate::util::index_documents(&store_path);
    let fed_answers = answers(&index);
    index.rebuild(&store, &|_, _| {}).unwrap();
    assert_eq!(fed, crate::util::index_documents(&store_path));
    assert_eq!(fed_answers, answers(&index));
}
