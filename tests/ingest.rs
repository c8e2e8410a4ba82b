use corpusdb::ingest::{self, IngestOptions};
use corpusdb::store::{ImportState, Store};

use crate::util::{ingest, write};

const ALPACA: &str = r#"{"instruction": "Name a color.", "input": "", "output": "Blue."}
{"instruction": "Add 2 and 3.", "input": "", "output": "5"}
{"instruction": "Name a color.", "input": "", "output": "Blue."}
"#;

const MESSAGES: &str = r#"{"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]}
{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}
"#;

#[test]
fn duplicates_across_sources_are_stored_once_with_every_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let a = write(dir.path(), "a.jsonl", ALPACA.as_bytes());
    let b = write(dir.path(), "b.jsonl", MESSAGES.as_bytes());
    let first = ingest(&store, &a, "alpaca-set", "instruction");
    assert_eq!(
        (
            first.run.read,
            first.run.stored,
            first.run.duplicates,
            first.run.rejected
        ),
        (3, 2, 1, 0)
    );
    let second = ingest(&store, &b, "chat-set", "conversation");
    assert_eq!(
        (
            second.run.read,
            second.run.stored,
            second.run.duplicates,
            second.run.rejected
        ),
        (2, 1, 1, 0)
    );

    let counters = store.counters().unwrap();
    assert_eq!(counters.examples, 3);
    assert_eq!(counters.duplicates, 2);
    assert_eq!(counters.read, 5);
    assert_eq!(counters.categories.get("instruction"), Some(&2));
    assert_eq!(counters.categories.get("conversation"), Some(&1));
    assert_eq!(counters.sources.get("alpaca-set"), Some(&3));
    assert_eq!(counters.sources.get("chat-set"), Some(&2));

    let hash = corpusdb::formats::parse_record("auto", MESSAGES.lines().next().unwrap().as_bytes())
        .unwrap()
        .content_hash();
    let example = store.get(&hash).unwrap().unwrap();
    assert_eq!(
        example.category, "instruction",
        "the first source's category is kept"
    );
    let provenance = store.provenance(&hash).unwrap();
    let places: Vec<(u32, u64, u64)> = provenance
        .iter()
        .map(|p| (p.import_id, p.record, p.line))
        .collect();
    assert_eq!(
        places,
        [
            (first.import.id, 0, 1),
            (first.import.id, 2, 3),
            (second.import.id, 0, 1)
        ]
    );
}

#[test]
fn a_finished_import_run_again_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let a = write(dir.path(), "a.jsonl", ALPACA.as_bytes());
    let first = ingest(&store, &a, "alpaca-set", "instruction");
    assert!(!first.already_done);
    let before = store.counters().unwrap();
    let again = ingest(&store, &a, "alpaca-set", "instruction");
    assert!(again.already_done);
    assert_eq!(again.run.read, 0);
    assert_eq!(store.counters().unwrap(), before);
    assert_eq!(store.imports().unwrap().len(), 1);
    // A renamed copy has the same fingerprint: still a no-op.
    let copy = write(dir.path(), "renamed.jsonl", ALPACA.as_bytes());
    assert!(ingest(&store, &copy, "alpaca-set", "instruction").already_done);
    // The same file under another source name is a new import of duplicates.
    let other = ingest(&store, &a, "mirror", "instruction");
    assert_eq!((other.run.stored, other.run.duplicates), (0, 3));
}

/// An edit of the same length between the blocks the fingerprint samples keeps the
/// fingerprint; the whole-file hash recorded when the import finished tells the files
/// apart, so the edited file is imported, not called done.
#[test]
fn an_edit_the_fingerprint_does_not_sample_is_imported() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    // About 6 MiB: the 16 sampled blocks of 64 KiB between the first and last MiB leave
    // gaps of 192 KiB.
    let mut text = String::new();
    let mut i = 0;
    while text.len() < 6 << 20 {
        text.push_str(&format!(
            "{{\"instruction\": \"Question number {i:07} about {}\", \"output\": \"Answer {i:07}.\"}}\n",
            "x".repeat(200)
        ));
        i += 1;
    }
    let a = write(dir.path(), "a.jsonl", text.as_bytes());
    let first = ingest(&store, &a, "s", "instruction");
    assert!(!first.already_done);
    assert!(first.import.file_sha1.is_some());
    let records = first.run.read;
    assert_eq!(
        store.imports().unwrap()[0].file_sha1,
        first.import.file_sha1
    );
    assert!(ingest(&store, &a, "s", "instruction").already_done);
    // One `x` becomes `y`, 1 MiB + 128 KiB into the file: inside a gap.
    let at = (1 << 20) + (128 << 10);
    let at = at + text[at..].find('x').unwrap();
    let mut edited = text.into_bytes();
    edited[at] = b'y';
    let before = corpusdb::reader::fingerprint(&a).unwrap();
    std::fs::write(&a, &edited).unwrap();
    assert_eq!(
        corpusdb::reader::fingerprint(&a).unwrap(),
        before,
        "the edit must miss the samples"
    );
    let again = ingest(&store, &a, "s", "instruction");
    assert!(!again.already_done, "the edited file was called done");
    assert_eq!(again.run.read, records);
    assert_eq!((again.run.stored, again.run.duplicates), (1, records - 1));
    assert_eq!(store.imports().unwrap().len(), 2);
    // And the edited file, run again, is done.
    assert!(ingest(&store, &a, "s", "instruction").already_done);
}

/// Stored text keeps its indentation and surrounding whitespace; the key trims it, so a
/// copy that differs only there is a duplicate.
#[test]
fn stored_text_keeps_the_indentation_of_a_code_reply() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let a = write(
        dir.path(),
        "a.jsonl",
        br#"{"instruction": "Indent it", "output": "    return 1\n"}
{"instruction": "Indent it ", "output": "return 1"}
"#,
    );
    let outcome = ingest(&store, &a, "s", "code");
    assert_eq!((outcome.run.stored, outcome.run.duplicates), (1, 1));
    let mut contents = Vec::new();
    store
        .for_each_example(|_, e| {
            contents.push(e.conversation.messages[1].content.clone());
            Ok(())
        })
        .unwrap();
    assert_eq!(contents, ["    return 1\n"]);
}

#[test]
fn the_bad_input_zoo_is_recorded_with_reasons_and_counts_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let mut zoo = Vec::new();
    zoo.extend_from_slice(b"{\"instruction\": \"ok\", \"output\": \"fine\"}\n"); // line 1
    zoo.extend_from_slice(b"{\"instruction\": \"broken\", \"output\": \n"); // 2 malformed
    zoo.extend_from_slice(b"{\"instruction\": \"caf\xe9\", \"output\": \"x\"}\n"); // 3 invalid UTF-8
    zoo.extend_from_slice(b"{\"instruction\": \"no output\"}\n"); // 4 missing field
    zoo.extend_from_slice(b"{\"messages\": []}\n"); // 5 empty conversation
    zoo.extend_from_slice(b"{\"big\": \""); // 6 huge line
    zoo.extend(std::iter::repeat_n(b'y', 50 << 20));
    zoo.extend_from_slice(b"\"}\n");
    zoo.extend_from_slice(b"\x00\x01\x02\xff\xfe garbage \x7f\n"); // 7 binary garbage
    zoo.extend_from_slice(b"[1, 2]\n"); // 8 not an object
    zoo.extend_from_slice(b"{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}, {\"from\": \"gpt\", \"value\": \"hello\"}]}\n"); // 9 ok
    let path = write(dir.path(), "zoo.jsonl", &zoo);
    let outcome = ingest(&store, &path, "zoo", "misc");
    assert_eq!(
        (
            outcome.run.read,
            outcome.run.stored,
            outcome.run.duplicates,
            outcome.run.rejected
        ),
        (9, 2, 0, 7)
    );
    assert!(outcome.import.counts.adds_up());
    assert_eq!(outcome.import.state, ImportState::Done);

    let rejects = store.rejects(None).unwrap();
    let by_line: Vec<(u64, &str)> = rejects
        .iter()
        .map(|r| (r.line, r.reason.as_str()))
        .collect();
    let expect_prefix = [
        (2, "malformed JSON: EOF while parsing"),
        (3, "invalid UTF-8 at byte 20 of the record"),
        (4, "alpaca record lacks required field `output`"),
        (5, "empty conversation: no messages"),
        (6, "record is 50.0 MiB long, over the 16.0 MiB limit"),
        (7, "invalid UTF-8 at byte 3 of the record"),
        (8, "record is a JSON array, expected an object"),
    ];
    assert_eq!(by_line.len(), expect_prefix.len(), "{by_line:#?}");
    for ((line, reason), (want_line, want)) in by_line.iter().zip(expect_prefix) {
        assert_eq!(*line, want_line);
        assert!(
            reason.starts_with(want),
            "line {line}: `{reason}` should start with `{want}`"
        );
    }
    assert!(rejects
        .iter()
        .all(|r| r.path == path.display().to_string() && r.source == "zoo"));
    assert_eq!(
        rejects[0].raw,
        b"{\"instruction\": \"broken\", \"output\": "
    );
    let big = &rejects[4];
    assert!(big.raw_truncated || big.raw.len() <= 64 << 10);
    let counters = store.counters().unwrap();
    assert_eq!(
        counters.read,
        counters.examples + counters.duplicates + counters.rejected
    );
}

#[test]
fn empty_files_and_unclosed_arrays_leave_a_note_but_count_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let empty = write(dir.path(), "empty.jsonl", b"");
    let outcome = ingest(&store, &empty, "empty", "misc");
    assert_eq!(outcome.run.read, 0);
    assert_eq!(outcome.import.state, ImportState::Done);
    let notes = store.rejects(Some(outcome.import.id)).unwrap();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].record, None);
    assert_eq!(notes[0].reason, "empty file: no records");

    let cut = write(
        dir.path(),
        "cut.json",
        b"[{\"instruction\": \"a\", \"output\": \"b\"}, {\"instruction\": \"c\", \"outp",
    );
    let outcome = ingest(&store, &cut, "cut", "misc");
    assert_eq!(
        (outcome.run.read, outcome.run.stored, outcome.run.rejected),
        (2, 1, 1)
    );
    let ledger = store.rejects(Some(outcome.import.id)).unwrap();
    assert!(
        ledger[0]
            .reason
            .starts_with("JSON array ends inside this record"),
        "{:?}",
        ledger[0].reason
    );
    assert_eq!(ledger[0].record, Some(1));
}

#[test]
fn strict_mode_stops_at_the_first_bad_record_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let path = write(
        dir.path(),
        "s.jsonl",
        format!("{ALPACA}{{\"instruction\": 1}}\n").as_bytes(),
    );
    let mut options = IngestOptions::new("s", "misc");
    options.strict = true;
    let err = ingest::ingest_file(&store, &path, &options, &ingest::Quiet).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("s.jsonl:4: record 3: malformed JSON"),
        "{text}"
    );
    assert_eq!(
        store.counters().unwrap().read,
        0,
        "nothing of the failing batch is written"
    );
}

#[test]
fn categories_are_metadata_not_content() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let a = write(dir.path(), "a.jsonl", MESSAGES.as_bytes());
    let b = write(dir.path(), "b.jsonl", format!("{MESSAGES}\n").as_bytes());
    ingest(&store, &a, "one", "qa");
    let second = ingest(&store, &b, "two", "chat");
    assert_eq!((second.run.stored, second.run.duplicates), (0, 2));
}

#[test]
fn a_store_of_another_schema_version_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    drop(Store::open(&path).unwrap());
    {
        // Rewrite the version behind the store's back, as a future release would.
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &path).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, cfs).unwrap();
        let meta = db.cf_handle("meta").unwrap();
        db.put_cf(meta, b"schema_version", 99u32.to_le_bytes())
            .unwrap();
    }
    for result in [Store::open(&path), Store::open_read_only(&path)] {
        let message = result
            .err()
            .expect("a mismatched schema must not open")
            .to_string();
        assert!(
            message.contains(&format!(
                "has schema version 99, this corpusdb reads versions 2 to {}",
                corpusdb::store::SCHEMA_VERSION
            )),
            "{message}"
        );
    }
}

/// The rules the store's transactions keep, read back from a store: dense ordinals, a
/// change log without gaps that names every example, and counters that equal the sums
/// of what the imports wrote.
fn assert_store_rules(store: &Store) {
    let counters = store.counters().unwrap();
    let ordinals: Vec<u64> = store.ordinals().map(|e| e.unwrap().0).collect();
    assert_eq!(ordinals, (0..counters.examples).collect::<Vec<_>>());
    let changes: Vec<(u64, _)> = store.changes_from(0).map(|e| e.unwrap()).collect();
    let sequences: Vec<u64> = changes.iter().map(|(s, _)| *s).collect();
    assert_eq!(sequences, (0..counters.changes).collect::<Vec<_>>());
    let changed: std::collections::HashSet<_> = changes.iter().map(|(_, h)| *h).collect();
    for entry in store.ordinals() {
        assert!(
            changed.contains(&entry.unwrap().1),
            "every example is in the log"
        );
    }
    assert_eq!(counters.categories.values().sum::<u64>(), counters.examples);
    let imports = store.imports().unwrap();
    let sum = |f: &dyn Fn(&corpusdb::store::ImportCounts) -> u64| -> u64 {
        imports.iter().map(|i| f(&i.counts)).sum()
    };
    assert_eq!(sum(&|c| c.stored), counters.examples);
    assert_eq!(sum(&|c| c.read), counters.read);
    assert_eq!(sum(&|c| c.duplicates), counters.duplicates);
    assert_eq!(sum(&|c| c.rejected), counters.rejected);
    assert_eq!(sum(&|c| c.joined), counters.joined);
    assert_eq!(sum(&|c| c.extra), counters.extra);
    for import in &imports {
        assert!(import.counts.adds_up(), "{:?}", import.counts);
    }
    let mut sources = std::collections::BTreeMap::new();
    for import in &imports {
        *sources.entry(import.source.clone()).or_insert(0) +=
            import.counts.stored + import.counts.duplicates;
    }
    sources.retain(|_, n| *n > 0);
    assert_eq!(sources, counters.sources);
    assert_eq!(
        store
            .rejects(None)
            .unwrap()
            .iter()
            .filter(|r| r.record.is_some())
            .count() as u64,
        counters.rejected
    );
}

#[test]
fn imports_and_filters_keep_the_stores_rules() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let first = write(
        dir.path(),
        "a.jsonl",
        br#"{"instruction": "Name a planet.", "output": "Mars."}
{"instruction": "Name a color.", "output": "Red."}
not json
{"instruction": "Name a planet.", "output": "Mars."}
"#,
    );
    let second = write(
        dir.path(),
        "b.jsonl",
        br#"{"instruction": "Name a color.", "output": "Red."}
{"instruction": "Are you a person?", "output": "As an AI language model, I am not a person."}
{"instruction": "Sing", "output": "la la la la la la la la la la la la la la la la la la la la la la la la la la"}
"#,
    );
    ingest(&store, &first, "alpha", "instruction");
    assert_store_rules(&store);
    ingest(&store, &second, "beta", "chat");
    assert_store_rules(&store);
    let counters = store.counters().unwrap();
    assert_eq!(
        (counters.examples, counters.duplicates, counters.rejected),
        (4, 2, 1)
    );
    // The duplicate from another source is a change; the repeat within `a` is not.
    assert_eq!(counters.changes, 5);

    let filters = corpusdb::filters::Filters::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/filters.yaml"),
    )
    .unwrap();
    let run = corpusdb::filters::apply_to_store(&store, &filters, false, &|_, _| {}).unwrap();
    assert_eq!(run.filters["repetition"].excluded, 1);
    assert_eq!(
        store.counters().unwrap().changes,
        7,
        "two exclusions, two entries"
    );
    assert_store_rules(&store);
    assert_eq!(corpusdb::filters::undo(&store, "repetition").unwrap(), 1);
    assert_eq!(store.counters().unwrap().changes, 8);
    assert_store_rules(&store);
}

#[test]
fn a_pretty_printed_json_document_is_imported_record_by_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let path = write(
        dir.path(),
        "doc.json",
        br#"{
  "version": 2,
  "data": [
    {"instruction": "Name a planet.", "output": "Mars."},
    {"instruction": "Name a color.",
     "output": "Red."},
    {"instruction": "Name a planet.", "output": "Mars."},
    {"output": "no instruction"}
  ]
}
"#,
    );
    let outcome = ingest(&store, &path, "doc", "instruction");
    assert_eq!(outcome.import.format, "auto: alpaca");
    let counts = outcome.run;
    assert_eq!(
        (
            counts.read,
            counts.stored,
            counts.duplicates,
            counts.rejected
        ),
        (4, 2, 1, 1)
    );
    let rejects = store.rejects(None).unwrap();
    assert_eq!(rejects[0].record, Some(3));
    assert!(
        rejects[0].reason.contains("instruction"),
        "{}",
        rejects[0].reason
    );
    assert_store_rules(&store);
}

#[test]
fn quick_mappings_on_the_command_line_are_the_imports_format_and_bind_its_resume() {
    use crate::util::{corpusdb, run_ok};
    let dir = tempfile::tempdir().unwrap();
    let data = write(
        dir.path(),
        "qa.jsonl",
        br#"{"question": "Name a planet.", "options": ["Mars", "Paris"], "answer": "A"}
{"question": "Name a city.", "options": ["Mars", "Paris"], "answer": "B"}
"#,
    );
    let store_dir = dir.path().join("store");
    run_ok(
        corpusdb(&store_dir)
            .args(["ingest", "--source", "qa", "--category", "qa"])
            .args([
                "--map",
                r"user={question}\n\n{options|letters}",
                "--map",
                "assistant=answer",
            ])
            .arg(&data),
    );
    let store = Store::open_read_only(&store_dir).unwrap();
    let import = &store.imports().unwrap()[0];
    assert_eq!(
        import.format,
        r"map: user={question}\n\n{options|letters}; assistant=answer"
    );
    assert_eq!(import.counts.stored, 2);
    let mut texts = Vec::new();
    store
        .for_each_example(|_, e| {
            texts.push(
                e.conversation
                    .messages
                    .iter()
                    .map(|m| m.content.clone())
                    .collect::<Vec<_>>(),
            );
            Ok(())
        })
        .unwrap();
    texts.sort();
    assert_eq!(texts[0], ["Name a city.\n\nA. Mars\nB. Paris", "B"]);
    drop(store);

    // A role that does not exist is refused before anything is read.
    let out = corpusdb(&store_dir)
        .args([
            "ingest",
            "--source",
            "x",
            "--category",
            "qa",
            "--map",
            "boss=question",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role `boss`"));

    // A partial import resumes only with the turns it began with.
    let store = Store::open(&dir.path().join("store2")).unwrap();
    let bad = write(
        dir.path(),
        "bad.jsonl",
        b"{\"question\": \"q1\", \"answer\": \"a1\"}\n{\"question\": 5}\n{\"question\": \"q3\", \"answer\": \"a3\"}\n",
    );
    let formats = corpusdb::formats::Formats::builtin();
    let turns = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut options = IngestOptions::new("s", "qa");
    options.format = Some(
        formats
            .quick_mapping(&turns(&["user=question", "assistant=answer"]))
            .unwrap(),
    );
    options.strict = true;
    options.batch_records = 1;
    assert!(ingest::ingest_file(&store, &bad, &options, &ingest::Quiet).is_err());
    assert_eq!(store.imports().unwrap()[0].state, ImportState::Partial);
    let mut other = options.clone();
    other.strict = false;
    other.format = Some(
        formats
            .quick_mapping(&turns(&["user=answer", "assistant=question"]))
            .unwrap(),
    );
    let err = ingest::ingest_file(&store, &bad, &other, &ingest::Quiet)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("its import began as `map: user=question; assistant=answer`"),
        "{err}"
    );
    options.strict = false;
    let done = ingest::ingest_file(&store, &bad, &options, &ingest::Quiet).unwrap();
    assert_eq!(done.import.state, ImportState::Done);
    assert_eq!(
        (done.import.counts.stored, done.import.counts.rejected),
        (2, 1)
    );
}

/// About 6 MiB of distinct alpaca records with one record lacking its instruction past
/// 4 MiB (a strict import stops there, leaving a partial import behind); the number of
/// records.
fn records_with_a_bad_one_after_4_mib() -> (String, u64) {
    let mut text = String::new();
    let mut i = 0;
    let mut bad = false;
    while text.len() < 6 << 20 {
        if !bad && text.len() > 4 << 20 {
            text.push_str("{\"output\": \"no instruction\"}\n");
            bad = true;
        } else {
            text.push_str(&format!(
                "{{\"instruction\": \"Question number {i:07} about {}\", \"output\": \"Answer {i:07}.\"}}\n",
                "x".repeat(200)
            ));
        }
        i += 1;
    }
    (text, i)
}

#[test]
fn an_interrupted_import_resumes_only_if_the_part_it_read_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (text, total) = records_with_a_bad_one_after_4_mib();
    let mut strict = IngestOptions::new("s", "instruction");
    strict.strict = true;
    strict.batch_records = 512;
    let mut options = strict.clone();
    options.strict = false;
    let interrupted = |name: &str, path: &std::path::Path| {
        let store = Store::open(&dir.path().join(name)).unwrap();
        assert!(ingest::ingest_file(&store, path, &strict, &ingest::Quiet).is_err());
        let import = store.imports().unwrap().remove(0);
        assert_eq!(import.state, ImportState::Partial);
        let prefix = import.prefix.unwrap();
        assert!(import.checkpoint.bytes > 3 << 20, "{:?}", import.checkpoint);
        assert!(prefix.bytes >= import.checkpoint.bytes && prefix.bytes < text.len() as u64);
        (store, import)
    };

    // Untouched, the import resumes where it stopped and the counts add up.
    let a = write(dir.path(), "a.jsonl", text.as_bytes());
    let (store, before) = interrupted("untouched", &a);
    let resumed = ingest::ingest_file(&store, &a, &options, &ingest::Quiet).unwrap();
    assert_eq!(resumed.resumed_from, Some(before.checkpoint));
    assert_eq!(resumed.import.id, before.id);
    assert_eq!(resumed.run.read, total - before.checkpoint.records);
    let counts = resumed.import.counts;
    assert_eq!(counts.read, total);
    assert_eq!(
        counts.read,
        counts.stored + counts.duplicates + counts.rejected
    );
    assert_eq!((counts.stored, counts.rejected), (total - 1, 1));
    assert_eq!(
        resumed.import.file_sha1.as_deref(),
        Some(corpusdb::reader::file_sha1(&a).unwrap().as_str())
    );
    assert_store_rules(&store);
    drop(store);

    // An edit inside the part already imported, between the fingerprint's samples.
    let b = write(dir.path(), "b.jsonl", text.as_bytes());
    let (store, before) = interrupted("edited", &b);
    let at = (1 << 20) + (128 << 10);
    let at = at + text[at..].find('x').unwrap();
    assert!((at as u64) < before.checkpoint.bytes);
    let mut edited = text.clone().into_bytes();
    edited[at] = b'y';
    let fingerprint = corpusdb::reader::fingerprint(&b).unwrap();
    std::fs::write(&b, &edited).unwrap();
    assert_eq!(corpusdb::reader::fingerprint(&b).unwrap(), fingerprint);
    let err = ingest::ingest_file(&store, &b, &options, &ingest::Quiet)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("b.jsonl: changed since its import #0 (source `s`) was interrupted")
            && err.contains("--restart-changed"),
        "{err}"
    );
    assert_eq!(
        store.imports().unwrap(),
        std::slice::from_ref(&before),
        "nothing was written"
    );
    // With --restart-changed the file is a new import; what it shares with the old
    // one's records is duplicates.
    options.restart_changed = true;
    let again = ingest::ingest_file(&store, &b, &options, &ingest::Quiet).unwrap();
    assert_ne!(again.import.id, before.id);
    assert_eq!(again.resumed_from, None);
    let counts = again.import.counts;
    assert_eq!(counts.read, total);
    assert_eq!(
        counts.read,
        counts.stored + counts.duplicates + counts.rejected
    );
    assert_eq!(
        (counts.duplicates, counts.rejected),
        (before.counts.stored - 1, 1)
    );
    assert_store_rules(&store);
    // Done now: a run without the flag does nothing.
    options.restart_changed = false;
    assert!(
        ingest::ingest_file(&store, &b, &options, &ingest::Quiet)
            .unwrap()
            .already_done
    );
}

#[test]
fn the_chat_length_profile_imports_without_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let path = dir.path().join("chat.jsonl");
    let stats = corpusdb::synth::generate_file(
        &path,
        &corpusdb::synth::SynthSpec {
            records: 3_000,
            seed: 21,
            lengths: corpusdb::synth::Lengths::Chat,
            ..Default::default()
        },
    )
    .unwrap();
    let outcome = ingest(&store, &path, "chat", "dialogue");
    let run = &outcome.run;
    assert_eq!((run.read, run.rejected), (3_000, 0));
    // Repeats, whitespace- and CRLF-dressed included, fold onto their originals.
    assert_eq!(run.stored, stats.unique);
    assert_eq!(run.duplicates, 3_000 - stats.unique);
}
