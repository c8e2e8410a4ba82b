//! Stores written by earlier corpusdb versions (`tests/compat/store-v2/` and
//! `tests/compat/store-v3/`: schema versions 2 and 3, the sample corpus of
//! `configs/sample-corpus.yaml`) open and read the same in this one:
//! counters, every example under the hash of its own content, provenance, imports and
//! rejects. A change that breaks this changes the on-disk format: bump `SCHEMA_VERSION`,
//! and keep this store as the one an older version wrote (opening it must then be refused
//! with the version message, below).

use std::path::Path;

use corpusdb::store::{Store, SCHEMA_VERSION};

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A writable copy of a frozen store (opening may write RocksDB's own files).
pub fn frozen(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/compat")
            .join(name),
        &path,
    );
    (dir, path)
}

#[test]
fn a_store_written_by_schema_version_2_reads_the_same() {
    let (_dir, path) = frozen("store-v2");
    assert_eq!(SCHEMA_VERSION, 4, "update this test and the frozen stores");
    // Read-only, it stays a version-2 store; opened for writing, it is upgraded in place
    // and its untagged, block-compressed values keep reading.
    check_frozen(&Store::open_read_only(&path).unwrap(), true);
    check_frozen(&Store::open(&path).unwrap(), true);
    check_frozen(&Store::open_read_only(&path).unwrap(), true);
}

#[test]
fn a_store_written_by_schema_version_3_reads_the_same() {
    let (_dir, path) = frozen("store-v3");
    // Its whole values stay under their hashes: read-only it stays version 3, opened for
    // writing it gains the bodies family, empty until the next import.
    check_frozen(&Store::open_read_only(&path).unwrap(), false);
    check_frozen(&Store::open(&path).unwrap(), false);
    check_frozen(&Store::open_read_only(&path).unwrap(), false);
    let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), &path).unwrap();
    assert!(families.iter().any(|f| f == "bodies"), "{families:?}");
}

fn check_frozen(store: &Store, legacy_rejects: bool) {
    let counters = store.counters().unwrap();
    // As `corpusdb stats` printed when the store was written.
    assert_eq!(
        (
            counters.read,
            counters.examples,
            counters.duplicates,
            counters.rejected
        ),
        (108, 92, 7, 5)
    );
    assert_eq!((counters.joined, counters.extra), (5, 1));
    assert_eq!(counters.categories["instruction"], 30);
    assert_eq!(counters.categories["tool"], 3);
    assert_eq!(counters.sources["sample-alpaca"], 27);
    assert_eq!(store.imports().unwrap().len(), 10);
    // Every example is stored under the SHA-1 of its canonical content, densely numbered.
    let mut ordinals = Vec::new();
    let mut with_tool_calls = 0;
    store
        .for_each_example(|hash, example| {
            assert_eq!(
                *hash,
                example.conversation.content_hash(),
                "ordinal {}",
                example.ordinal
            );
            assert_eq!(store.hash_at(example.ordinal).unwrap(), Some(*hash));
            assert_eq!(
                store.example_at(example.ordinal).unwrap(),
                Some((*hash, example.clone()))
            );
            assert!(!store.provenance(hash).unwrap().is_empty());
            with_tool_calls += example
                .conversation
                .messages
                .iter()
                .filter(|m| m.tool_calls.is_some())
                .count();
            ordinals.push(example.ordinal);
            Ok(())
        })
        .unwrap();
    ordinals.sort_unstable();
    assert_eq!(ordinals, (0..92).collect::<Vec<u64>>());
    assert!(with_tool_calls >= 2, "{with_tool_calls}");
    // Duplicates kept their provenance: 92 examples, 99 provenance entries.
    let mut entries = 0;
    store
        .for_each_example(|hash, _| {
            entries += store.provenance(hash).unwrap().len();
            Ok(())
        })
        .unwrap();
    assert_eq!(entries, 92 + 7);
    let rejects = store.rejects(None).unwrap();
    assert_eq!(rejects.len(), 5);
    assert!(rejects
        .iter()
        .all(|r| !r.reason.is_empty() && !r.path.is_empty()));
    if !legacy_rejects {
        return;
    }
    // Written before kinds were stored: each kind is read from its text, once, on decode.
    for reject in &rejects {
        let typed = reject.reason();
        let want = match reject.record {
            // A note about a whole file is the reject without a record.
            None => corpusdb::reject::RejectReason::new(
                corpusdb::reject::RejectKind::FileNote,
                reject.reason.clone(),
            ),
            Some(_) => corpusdb::reject::RejectReason::classify_legacy(&reject.reason),
        };
        assert_eq!(typed, want, "{}", reject.reason);
    }
    assert!(
        rejects
            .iter()
            .any(|r| r.kind != corpusdb::reject::RejectKind::InvalidRecord),
        "the sample's rejects are not all of one kind: {:?}",
        rejects.iter().map(|r| &r.reason).collect::<Vec<_>>()
    );
}

/// Reject kinds are stored as fixed one-byte codes (not variant indexes), and a reject
/// of this version ends with its kind and subject, so an older reader ignores them.
#[test]
fn reject_kind_codes_are_fixed() {
    use corpusdb::reject::RejectKind;
    let pinned = [
        (RejectKind::Other, 0u8),
        (RejectKind::MalformedJson, 1),
        (RejectKind::InvalidUtf8, 2),
        (RejectKind::TooLarge, 3),
        (RejectKind::Truncated, 4),
        (RejectKind::MissingField, 5),
        (RejectKind::InvalidRecord, 6),
        (RejectKind::Filter, 7),
        (RejectKind::FileNote, 8),
    ];
    assert_eq!(pinned.len(), RejectKind::ALL.len());
    for (kind, code) in pinned {
        assert_eq!(bincode::serialize(&kind).unwrap(), vec![code], "{kind:?}");
        assert_eq!(bincode::deserialize::<RejectKind>(&[code]).unwrap(), kind);
        assert_eq!(RejectKind::from_code(code), Some(kind));
    }
    assert!(bincode::deserialize::<RejectKind>(&[200]).is_err());
    let reject = corpusdb::store::Reject {
        import_id: 1,
        source: "s".into(),
        path: "p".into(),
        record: Some(3),
        part: 0,
        line: 4,
        byte_offset: 10,
        reason: "lacks required field `output`".into(),
        raw: b"{}".to_vec(),
        raw_truncated: false,
        kind: RejectKind::MissingField,
        subject: "output".into(),
    };
    let new = bincode::serialize(&reject).unwrap();
    let legacy = corpusdb::store::LegacyReject {
        import_id: 1,
        source: "s".into(),
        path: "p".into(),
        record: Some(3),
        part: 0,
        line: 4,
        byte_offset: 10,
        reason: "lacks required field `output`".into(),
        raw: b"{}".to_vec(),
        raw_truncated: false,
    };
    let old = bincode::serialize(&legacy).unwrap();
    // The old encoding is a prefix of the new one: kind byte, then the subject.
    assert!(new.starts_with(&old));
    assert_eq!(new[old.len()], 5);
    // An old record decodes as a legacy one, read into the same typed reject.
    assert!(bincode::deserialize::<corpusdb::store::Reject>(&old).is_err());
    assert_eq!(corpusdb::store::Reject::from(legacy), reject);
}

/// The stored enums are written as explicit codes (`stored_codes!` in `store::types`;
/// bincode, u32 little-endian, the bytes derived variant indexes wrote): these are the
/// codes schema version 2 uses. JSON keeps the variant names, and unknown codes are
/// refused.
#[test]
fn stored_enum_codes_are_fixed() {
    use corpusdb::conversation::Role;
    use corpusdb::reader::{Compression, Container};
    use corpusdb::store::ImportState;
    fn code<T: serde::Serialize>(value: &T) -> Vec<u8> {
        bincode::serialize(value).unwrap()
    }
    for (role, tag) in [
        (Role::System, 0u8),
        (Role::User, 1),
        (Role::Assistant, 2),
        (Role::Tool, 3),
    ] {
        assert_eq!(code(&role), [tag, 0, 0, 0], "{role:?}");
    }
    assert_eq!(code(&ImportState::Partial), [0, 0, 0, 0]);
    assert_eq!(code(&ImportState::Done), [1, 0, 0, 0]);
    for (container, tag) in [
        (Container::Jsonl, 0u8),
        (Container::JsonArray, 1),
        (Container::Parquet, 2),
        (Container::Document, 3),
        (Container::DocumentList, 4),
        (Container::DocumentById, 5),
    ] {
        assert_eq!(code(&container), [tag, 0, 0, 0], "{container:?}");
    }
    for (compression, tag) in [
        (Compression::None, 0u8),
        (Compression::Gzip, 1),
        (Compression::Zstd, 2),
    ] {
        assert_eq!(code(&compression), [tag, 0, 0, 0], "{compression:?}");
    }
    assert!(bincode::deserialize::<Role>(&[4, 0, 0, 0]).is_err());
    assert!(bincode::deserialize::<ImportState>(&[2, 0, 0, 0]).is_err());
    assert_eq!(
        bincode::deserialize::<Container>(&[3, 0, 0, 0]).unwrap(),
        Container::Document
    );
    assert_eq!(
        serde_json::to_string(&Role::Assistant).unwrap(),
        "\"Assistant\""
    );
    assert_eq!(
        serde_json::from_str::<Compression>("\"Zstd\"").unwrap(),
        Compression::Zstd
    );
}

#[test]
fn a_store_with_a_family_this_build_does_not_know_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    drop(Store::open(&path).unwrap());
    // What a newer corpusdb leaves behind: one more column family.
    let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), &path).unwrap();
    let mut db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, &families).unwrap();
    db.create_cf("from_the_future", &rocksdb::Options::default())
        .unwrap();
    drop(db);
    let error = Store::open(&path).err().expect("the open must fail");
    let message = error.to_string();
    assert!(message.contains("newer corpusdb"), "{message}");
    assert!(message.contains("from_the_future"), "{message}");
    // Readers still open it: they need no more than the families they know.
    Store::open_read_only(&path).unwrap();
}
