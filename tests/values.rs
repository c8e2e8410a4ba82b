//! Example values compressed once: a dictionary trained by the first import, values
//! tagged raw or by dictionary, legacy values of a version-2 store read beside new ones.

use std::path::{Path, PathBuf};

use corpusdb::ingest::{self, IngestOptions};
use corpusdb::store::{Compression, Store, StoreOptions};
use corpusdb::synth::{self, SynthSpec};

/// A store opened to compress values with a dictionary (not the default).
fn open_compressing(path: &Path) -> Store {
    Store::open_with(
        path,
        &StoreOptions {
            compression: Compression::Dictionary,
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

/// A synthetic corpus of `records` records (about 1.5 KB each).
pub fn corpus(dir: &Path, records: u64, seed: u64) -> PathBuf {
    let path = dir.join(format!("corpus-{records}-{seed}.jsonl"));
    synth::generate_file(
        &path,
        &SynthSpec {
            records,
            seed,
            ..SynthSpec::default()
        },
    )
    .unwrap();
    path
}

pub fn import(store: &Store, path: &Path, source: &str, sample_bytes: usize) -> u64 {
    let mut options = IngestOptions::new(source, "general");
    options.batch_records = 200;
    options.dictionary_sample_bytes = sample_bytes;
    let outcome = ingest::ingest_file(store, path, &options, &ingest::Quiet).unwrap();
    assert!(outcome.import.counts.adds_up());
    outcome.run.stored
}

/// (ordinal, tag) of every stored value, straight from RocksDB; tag `None` for a value
/// below `tagged_from` (untagged).
pub fn tags(path: &Path) -> Vec<(u64, Option<u8>)> {
    let (values, tagged_from) = raw_values(path);
    let mut out: Vec<_> = values
        .iter()
        .map(|(_, value)| {
            let ordinal = u64::from_le_bytes(value[..8].try_into().unwrap());
            let category = u64::from_le_bytes(value[8..16].try_into().unwrap()) as usize;
            let tag = (ordinal >= tagged_from).then(|| value[32 + category]);
            (ordinal, tag)
        })
        .collect();
    out.sort_unstable();
    out
}

/// (key, value) pairs as RocksDB holds them.
pub type RawPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Every (key, value) of the examples family in key order, and `values_tagged_from`.
pub fn raw_values(path: &Path) -> (RawPairs, u64) {
    let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), path).unwrap();
    let db =
        rocksdb::DB::open_cf_for_read_only(&rocksdb::Options::default(), path, &families, false)
            .unwrap();
    let meta = db.cf_handle("meta").unwrap();
    let tagged_from = db
        .get_cf(meta, b"values_tagged_from")
        .unwrap()
        .map_or(u64::MAX, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let examples = db.cf_handle("examples").unwrap();
    let values = db
        .iterator_cf(examples, rocksdb::IteratorMode::Start)
        .map(|item| {
            let (k, v) = item.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect();
    (values, tagged_from)
}

/// Every example decodes and re-hashes to its key, ordinals dense; returns how many.
pub fn check_all(store: &Store) -> u64 {
    let mut ordinals = Vec::new();
    store
        .for_each_example(|hash, example| {
            assert_eq!(*hash, example.conversation.content_hash());
            assert_eq!(store.get(hash).unwrap().unwrap(), example);
            ordinals.push(example.ordinal);
            Ok(())
        })
        .unwrap();
    ordinals.sort_unstable();
    let n = ordinals.len() as u64;
    assert_eq!(ordinals, (0..n).collect::<Vec<_>>());
    assert_eq!(store.counters().unwrap().examples, n);
    n
}

#[test]
fn the_first_import_trains_a_dictionary_and_compresses_values_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let file = corpus(dir.path(), 1500, 1);
    let stored = {
        let store = open_compressing(&path);
        // About two batches of samples: the first batch stays raw.
        let stored = import(&store, &file, "one", 512 << 10);
        assert_eq!(store.dictionaries().len(), 1);
        assert_eq!(check_all(&store), stored);
        stored
    };
    let tags = tags(&path);
    assert_eq!(tags.len() as u64, stored);
    // Batches before the samples sufficed stay raw; the batch that trained and every
    // later one are compressed (tag 1: the dictionary's id).
    let raw = tags.iter().filter(|(_, t)| *t == Some(0)).count();
    let compressed = tags.iter().filter(|(_, t)| *t == Some(1)).count();
    assert_eq!(raw + compressed, tags.len());
    assert!(raw > 0 && raw < 400, "{raw} raw");
    assert!(compressed > 1000, "{compressed} compressed");
    let first_compressed = tags.iter().find(|(_, t)| *t == Some(1)).unwrap().0;
    assert!(tags
        .iter()
        .all(|(ordinal, t)| (*t == Some(1)) == (*ordinal >= first_compressed)));
    // Compressed values are smaller than the raw bincode they hold.
    let (values, _) = raw_values(&path);
    let bytes: usize = values.iter().map(|(_, v)| v.len()).sum();
    let store = Store::open_read_only(&path).unwrap();
    let mut plain = 0usize;
    store
        .for_each_example(|_, example| {
            plain += bincode::serialize(&example).unwrap().len();
            Ok(())
        })
        .unwrap();
    assert!(bytes * 2 < plain, "{bytes} stored for {plain} plain");
    drop(store);
    // The next import uses the stored dictionary from its first value on.
    let store = open_compressing(&path);
    let more = import(&store, &corpus(dir.path(), 300, 2), "two", 256 << 10);
    assert!(more > 0);
    assert_eq!(store.dictionaries().len(), 1);
    assert_eq!(check_all(&store), stored + more);
    drop(store);
    let tags = self::tags(&path);
    assert!(tags
        .iter()
        .filter(|(ordinal, _)| *ordinal >= stored)
        .all(|(_, t)| *t == Some(1)));
}

#[test]
fn an_import_too_small_to_train_stores_raw_values_and_the_next_one_trains() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = open_compressing(&path);
    let small = import(&store, &corpus(dir.path(), 50, 3), "small", 256 << 10);
    assert!(store.dictionaries().is_empty());
    let big = import(&store, &corpus(dir.path(), 1000, 4), "big", 256 << 10);
    assert_eq!(store.dictionaries().len(), 1);
    assert_eq!(check_all(&store), small + big);
    drop(store);
    let tags = tags(&path);
    assert!(tags[..small as usize].iter().all(|(_, t)| *t == Some(0)));
    assert_eq!(tags.last().unwrap().1, Some(1));
}

#[test]
fn block_compression_options_store_raw_values() {
    assert_eq!(StoreOptions::default().compression, Compression::Zstd);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open_with(
        &path,
        &StoreOptions {
            compression: Compression::Zstd,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let stored = import(&store, &corpus(dir.path(), 800, 5), "one", 64 << 10);
    assert!(store.dictionaries().is_empty());
    assert_eq!(check_all(&store), stored);
    drop(store);
    assert!(tags(&path).iter().all(|(_, t)| *t == Some(0)));
    // The examples family: level 0 as flushed, lz4 between, zstd where data rests.
    let options = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("OPTIONS-")
        })
        .max()
        .unwrap();
    let options = std::fs::read_to_string(options).unwrap();
    let family = |name: &str| {
        let at = options.find(&format!("[CFOptions \"{name}\"]")).unwrap();
        let section = &options[at..];
        section[..section[1..].find("\n[").map_or(section.len(), |i| i + 1)].to_owned()
    };
    let level0_raw = "compression_per_level=kNoCompression:kLZ4Compression:";
    let examples = family("examples");
    assert!(
        examples.contains(level0_raw) && examples.contains("bottommost_compression=kZSTD"),
        "{examples}"
    );
    // The other families too (lz4 below level 0).
    let provenance = family("provenance");
    assert!(provenance.contains(level0_raw), "{provenance}");
    // The same store opened to compress values then trains and compresses.
    let store = open_compressing(&path);
    let more = import(&store, &corpus(dir.path(), 800, 6), "two", 64 << 10);
    assert_eq!(store.dictionaries().len(), 1);
    assert_eq!(check_all(&store), stored + more);
}

#[test]
fn the_same_input_gives_the_same_stored_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let file = corpus(dir.path(), 1200, 7);
    let mut runs = Vec::new();
    for name in ["a", "b"] {
        let path = dir.path().join(name);
        let store = open_compressing(&path);
        import(&store, &file, "one", 256 << 10);
        let dictionaries: Vec<Vec<u8>> = store
            .dictionaries()
            .iter()
            .map(|d| d.bytes().to_vec())
            .collect();
        drop(store);
        runs.push((raw_values(&path), dictionaries));
    }
    assert_eq!(runs[0].1.len(), 1);
    assert!(runs[0] == runs[1], "two imports of one file differ");
}

#[test]
fn a_version_2_store_takes_new_imports_and_reads_old_and_new_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    crate::compat::copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat/store-v2"),
        &path,
    );
    let store = open_compressing(&path);
    assert_eq!(store.counters().unwrap().examples, 92);
    let stored = import(&store, &corpus(dir.path(), 1000, 8), "new", 256 << 10);
    assert!(stored > 800);
    assert_eq!(store.dictionaries().len(), 1);
    assert_eq!(check_all(&store), 92 + stored);
    store.compact();
    assert_eq!(check_all(&store), 92 + stored);
    drop(store);
    let tags = tags(&path);
    assert!(tags[..92].iter().all(|(_, t)| t.is_none()), "legacy values");
    assert!(tags[92..].iter().all(|(_, t)| t.is_some()));
    assert_eq!(tags.last().unwrap().1, Some(1));
    let store = Store::open_read_only(&path).unwrap();
    assert_eq!(check_all(&store), 92 + stored);
}
