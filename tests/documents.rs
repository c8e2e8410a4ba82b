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
        (counts.read, counts.stored, counts.duplicates, counts.rejected),
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
    assert_eq!(ingest(&store, &jsonl, "jsonl", "instruction").run.duplicates, 1);
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
        shown.contains("by-id.json#q-17 (line 2, record 0)") && shown.contains("same.jsonl:1 (record 0)"),
        "{shown}"
    );
    let listed = run_ok(corpusdb(&store_dir).args(["rejects"]));
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert!(listed.contains("id `q-19`"), "{listed}");
}
