//! JSON object documents as datasets publish them: records kept with their ids, large
//! documents streamed record by record.

use corpusdb::store::Store;

use crate::util::{corpusdb, ingest, run_ok, write};

#[test]
fn records_of_an_id_to_record_document_keep_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let path = write(
        dir.path(),
        "by-id.json",
        br#"{
  "q-17": {"instruction": "Name a planet.", "output": "Mars."},
  "q-18": {"instruction": "Name a color.",
           "output": "Red."},
  "q-19": {"output": "no instruction"}
}
"#,
    );
    let store = Store::open(&store_dir).unwrap();
    let outcome = ingest(&store, &path, "doc", "instruction");
    let counts = outcome.run;
    assert_eq!(
        (
            counts.read,
            counts.stored,
            counts.duplicates,
            counts.rejected
        ),
        (3, 2, 0, 1)
    );
    // The reject names the record's id, index and line.
    let rejects = store.rejects(None).unwrap();
    assert_eq!((rejects[0].record, rejects[0].line), (Some(2), 5));
    assert!(
        rejects[0].reason.starts_with("id `q-19`: ") && rejects[0].reason.contains("instruction"),
        "{}",
        rejects[0].reason
    );
    // The id is metadata: the same record from JSONL is a duplicate of it.
    let jsonl = write(
        dir.path(),
        "same.jsonl",
        b"{\"instruction\": \"Name a planet.\", \"output\": \"Mars.\"}\n",
    );
    assert_eq!(
        ingest(&store, &jsonl, "jsonl", "instruction")
            .run
            .duplicates,
        1
    );
    let mut mars = None;
    store
        .for_each_example(|hash, example| {
            if example.conversation.messages[1].content == "Mars." {
                mars = Some(*hash);
            }
            Ok(())
        })
        .unwrap();
    let mars = mars.unwrap();
    let sources = store.sources_of(&mars).unwrap();
    assert_eq!(sources.len(), 2);
    assert_eq!(sources[0].id.as_deref(), Some("q-17"));
    assert_eq!((sources[0].record, sources[0].line), (0, 2));
    assert!(sources[0].place().ends_with("by-id.json#q-17"));
    assert_eq!(sources[1].id, None);
    assert!(sources[1].place().ends_with("same.jsonl:1"));
    drop(store);

    let shown = run_ok(corpusdb(&store_dir).args(["show", &mars.to_hex()]));
    let shown = String::from_utf8(shown.stdout).unwrap();
    assert!(
        shown.contains("by-id.json#q-17 (line 2, record 0)")
            && shown.contains("same.jsonl:1 (record 0)"),
        "{shown}"
    );
    let listed = run_ok(corpusdb(&store_dir).args(["rejects"]));
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert!(listed.contains("id `q-19`"), "{listed}");
}

/// A pretty-printed document of `n` alpaca records of about 1 KiB, record `big` holding a
/// 64 KiB reply: a list under `data` beside metadata, or (`by_id`) an `id -> record`
/// object under `problems`.
fn document(n: usize, big: usize, by_id: bool) -> String {
    let mut out = String::from("{\n  \"version\": 3,\n  \"license\": \"cc-by\",\n");
    out.push_str(if by_id {
        "  \"problems\": {\n"
    } else {
        "  \"data\": [\n"
    });
    for i in 0..n {
        let reply = if i == big {
            "z".repeat(64 << 10)
        } else {
            format!("Answer {i}: {}", "y".repeat(1000))
        };
        let record =
            format!("{{\"instruction\": \"Question {i}?\",\n      \"output\": \"{reply}\"}}");
        let sep = if i + 1 < n { ",\n" } else { "\n" };
        if by_id {
            out.push_str(&format!("    \"p{i}\": {record}{sep}"));
        } else {
            out.push_str(&format!("    {record}{sep}"));
        }
    }
    out.push_str(if by_id { "  },\n" } else { "  ],\n" });
    out.push_str("  \"notes\": {\"source\": \"generated\"}\n}\n");
    out
}

#[test]
fn a_document_is_streamed_record_by_record_and_an_oversized_record_is_only_rejected() {
    use corpusdb::ingest::{self, IngestOptions};
    use corpusdb::store::{ImportState, RejectKind};
    let dir = tempfile::tempdir().unwrap();
    let n = 3000;
    // Plain, and gzip-compressed (resumed by decompressing and discarding).
    for (by_id, gzip) in [(false, false), (true, false), (true, true)] {
        let name = match (by_id, gzip) {
            (false, _) => "list.json",
            (true, false) => "by-id.json",
            (true, true) => "by-id.json.gz",
        };
        let text = document(n, 1700, by_id);
        assert!(text.len() > 3 << 20);
        let bytes = if gzip {
            use std::io::Write;
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(text.as_bytes()).unwrap();
            encoder.finish().unwrap()
        } else {
            text.clone().into_bytes()
        };
        let path = write(dir.path(), name, &bytes);
        let mut options = IngestOptions::new("doc", "instruction");
        options.max_record_bytes = 4 << 10;
        options.batch_records = 256;

        // One run: every record read, the oversized one rejected by index (and id).
        let store = Store::open(&dir.path().join(format!("once-{name}"))).unwrap();
        let once = ingest::ingest_file(&store, &path, &options, &ingest::Quiet).unwrap();
        let counts = once.import.counts;
        assert_eq!(
            (
                counts.read,
                counts.stored,
                counts.duplicates,
                counts.rejected
            ),
            (n as u64, n as u64 - 1, 0, 1),
            "{name}"
        );
        assert!(once.notes.is_empty(), "{:?}", once.notes);
        let rejects = store.rejects(None).unwrap();
        assert_eq!(rejects.len(), 1);
        assert_eq!(
            (rejects[0].record, rejects[0].kind),
            (Some(1700), RejectKind::TooLarge)
        );
        assert!(rejects[0].path.ends_with(name), "{}", rejects[0].path);
        assert!(
            rejects[0].reason.contains("over the 4.0 KiB limit")
                && (!by_id || rejects[0].reason.starts_with("id `p1700`: ")),
            "{}",
            rejects[0].reason
        );
        // Lines are the file's: record i starts on line 5 + 2i.
        let sources = store
            .sources_of(&first_hash(&store, "Question 10?"))
            .unwrap();
        assert_eq!((sources[0].record, sources[0].line), (10, 5 + 2 * 10));
        assert_eq!(sources[0].id.as_deref(), by_id.then_some("p10"));
        let once_hashes = hashes(&store);
        drop(store);

        // Interrupted at the oversized record (strict), then resumed: the same store.
        let store = Store::open(&dir.path().join(format!("resumed-{name}"))).unwrap();
        let mut strict = options.clone();
        strict.strict = true;
        let err = ingest::ingest_file(&store, &path, &strict, &ingest::Quiet)
            .unwrap_err()
            .to_string();
        assert!(err.contains("record 1700"), "{err}");
        let partial = store.imports().unwrap().remove(0);
        assert_eq!(partial.state, ImportState::Partial);
        assert_eq!(partial.checkpoint.records, 1536);
        let resumed = ingest::ingest_file(&store, &path, &options, &ingest::Quiet).unwrap();
        assert_eq!(resumed.resumed_from, Some(partial.checkpoint));
        assert_eq!(resumed.run.read, n as u64 - 1536);
        assert_eq!(resumed.import.counts, counts);
        assert_eq!(hashes(&store), once_hashes);
        let sources = store
            .sources_of(&first_hash(&store, "Question 2999?"))
            .unwrap();
        assert_eq!(sources[0].id.as_deref(), by_id.then_some("p2999"));
    }
}

#[test]
fn a_document_cut_short_keeps_its_complete_records() {
    let dir = tempfile::tempdir().unwrap();
    let text = document(50, 1000, true);
    let cut = text.find("\"p30\"").unwrap() + 40;
    let path = write(dir.path(), "cut.json", &text.as_bytes()[..cut]);
    let store = Store::open(&dir.path().join("store")).unwrap();
    let outcome = ingest(&store, &path, "doc", "instruction");
    let counts = outcome.import.counts;
    assert_eq!((counts.read, counts.stored, counts.rejected), (31, 30, 1));
    let rejects = store.rejects(None).unwrap();
    assert!(
        rejects[0]
            .reason
            .starts_with("id `p30`: JSON document ends inside this record"),
        "{}",
        rejects[0].reason
    );
    assert!(
        rejects[1].record.is_none() && rejects[1].reason.contains("file truncated?"),
        "{rejects:?}"
    );
}

fn hashes(store: &Store) -> Vec<String> {
    let mut out = Vec::new();
    store
        .for_each_example(|hash, _| {
            out.push(hash.to_hex());
            Ok(())
        })
        .unwrap();
    out
}

fn first_hash(store: &Store, instruction: &str) -> corpusdb::conversation::ContentHash {
    let mut found = None;
    store
        .for_each_example(|hash, example| {
            if example.conversation.messages[0].content == instruction {
                found = Some(*hash);
            }
            Ok(())
        })
        .unwrap();
    found.unwrap()
}
