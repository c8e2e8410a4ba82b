//! Helpers shared by the integration tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use corpusdb::conversation::ContentHash;
use corpusdb::ingest::{self, FileOutcome, IngestOptions};
use corpusdb::store::{Counters, ImportRecord, ProvenanceEntry, Reject, Store};

pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

pub fn ingest(store: &Store, path: &Path, source: &str, category: &str) -> FileOutcome {
    let options = IngestOptions::new(source, category);
    ingest::ingest_file(store, path, &options, &ingest::Quiet).unwrap()
}

/// The `corpusdb` binary built for these tests.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_corpusdb"))
}

/// The binary on the store at `store`.
pub fn corpusdb(store: &Path) -> Command {
    let mut cmd = bin();
    cmd.arg("--store").arg(store);
    cmd
}

/// Every stored hash, in hex.
pub fn stored_hashes(store: &Path) -> std::collections::BTreeSet<String> {
    Store::open_read_only(store)
        .unwrap()
        .ordinals()
        .map(|entry| entry.unwrap().1.to_hex())
        .collect()
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let output = cmd.output().unwrap();
    assert!(
        output.status.success(),
        "command failed: {cmd:?}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Everything an import leaves in a store, for comparing two stores.
#[derive(Debug, PartialEq, Eq)]
pub struct Dump {
    pub ordinals: Vec<(u64, ContentHash)>,
    pub provenance: BTreeMap<ContentHash, Vec<ProvenanceEntry>>,
    pub counters: Counters,
    pub imports: Vec<(
        String,
        String,
        corpusdb::store::ImportCounts,
        corpusdb::store::ImportState,
    )>,
    pub rejects: Vec<Reject>,
}

pub fn dump(path: &Path) -> Dump {
    let store = Store::open_read_only(path).unwrap();
    let ordinals: Vec<_> = store.ordinals().map(Result::unwrap).collect();
    let mut provenance = BTreeMap::new();
    for (_, hash) in &ordinals {
        provenance.insert(*hash, store.provenance(hash).unwrap());
        let example = store.get(hash).unwrap().unwrap();
        assert_eq!(
            example.conversation.content_hash(),
            *hash,
            "stored content hashes to its key"
        );
    }
    let imports = store
        .imports()
        .unwrap()
        .into_iter()
        .map(|i: ImportRecord| (i.source, i.fingerprint, i.counts, i.state))
        .collect();
    Dump {
        ordinals,
        provenance,
        counters: store.counters().unwrap(),
        imports,
        rejects: store.rejects(None).unwrap(),
    }
}

/// Every document of the store's index, by hash: its stored fields and its numeric fast
/// fields, read with tantivy directly (so two indexes can be compared field by field).
pub fn index_documents(store: &Path) -> BTreeMap<String, String> {
    use tantivy::schema::OwnedValue;
    let index = tantivy::Index::open_in_dir(corpusdb::index::index_dir(store)).unwrap();
    let schema = index.schema();
    let searcher = index
        .reader_builder()
        .reload_policy(tantivy::ReloadPolicy::Manual)
        .try_into()
        .unwrap()
        .searcher();
    let mut out = BTreeMap::new();
    for (segment_ord, segment) in searcher.segment_readers().iter().enumerate() {
        let numbers: Vec<_> = ["ordinal", "messages", "turns", "chars", "imported", "split"]
            .iter()
            .map(|name| (*name, segment.fast_fields().u64(name).unwrap()))
            .collect();
        for doc in 0..segment.max_doc() {
            if segment.is_deleted(doc) {
                continue;
            }
            let stored: tantivy::TantivyDocument = searcher
                .doc(tantivy::DocAddress::new(segment_ord as u32, doc))
                .unwrap();
            let text = |name: &str| -> Vec<String> {
                stored
                    .get_all(schema.get_field(name).unwrap())
                    .filter_map(|v| match OwnedValue::from(v) {
                        OwnedValue::Str(s) => Some(s),
                        _ => None,
                    })
                    .collect()
            };
            let mut fields = format!(
                "category {:?} sources {:?} excluded {:?}",
                text("category"),
                text("source"),
                text("excluded")
            );
            for (name, column) in &numbers {
                fields.push_str(&format!(
                    " {name} {:?}",
                    column.values_for_doc(doc).collect::<Vec<_>>()
                ));
            }
            let hash = text("hash").concat();
            assert!(
                out.insert(hash.clone(), fields).is_none(),
                "{hash} is indexed twice"
            );
        }
    }
    out
}
