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

/// Every example's (hash, value from its header on) as RocksDB holds them, and
/// `values_tagged_from`: the whole values under their hash (before `bodies_from`), then
/// the bodies by ordinal with their leading hash split off as the key.
pub fn raw_values(path: &Path) -> (RawPairs, u64) {
    let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), path).unwrap();
    let db =
        rocksdb::DB::open_cf_for_read_only(&rocksdb::Options::default(), path, &families, false)
            .unwrap();
    let meta = db.cf_handle("meta").unwrap();
    let meta_u64 = |key: &[u8]| {
        db.get_cf(meta, key)
            .unwrap()
            .map_or(u64::MAX, |b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let (tagged_from, bodies_from) = (meta_u64(b"values_tagged_from"), meta_u64(b"bodies_from"));
    let pairs = |family: &str| -> RawPairs {
        db.cf_handle(family).map_or_else(Vec::new, |cf| {
            db.iterator_cf(cf, rocksdb::IteratorMode::Start)
                .map(|item| {
                    let (k, v) = item.unwrap();
                    (k.to_vec(), v.to_vec())
                })
                .collect()
        })
    };
    let ordinal = |value: &[u8]| u64::from_le_bytes(value[..8].try_into().unwrap());
    let mut values: RawPairs = pairs("examples")
        .into_iter()
        .filter(|(_, value)| ordinal(value) < bodies_from)
        .collect();
    let bodies = pairs("bodies");
    for (key, value) in &bodies {
        let (hash, rest) = value.split_at(20);
        assert_eq!(
            u64::from_be_bytes(key[..].try_into().unwrap()),
            ordinal(rest)
        );
        values.push((hash.to_vec(), rest.to_vec()));
    }
    // Every example is in one family or the other.
    assert_eq!(
        values.len(),
        pairs("examples").len(),
        "examples and bodies disagree"
    );
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
    let family = |name: &str| family_options(&path, name);
    let level0_raw = "compression_per_level=kNoCompression:kLZ4Compression:";
    let examples = family("examples");
    assert!(
        examples.contains(level0_raw) && examples.contains("bottommost_compression=kZSTD"),
        "{examples}"
    );
    // Bodies, keyed by ordinal, are compressed once by their flush: zstd on every level,
    // at the store's value level (1).
    let bodies = family("bodies");
    assert!(
        bodies.contains("\n  compression=kZSTD")
            && bodies.contains("\n  compression_opts={")
            && bodies.contains(";level=1;"),
        "{bodies}"
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

#[test]
fn a_version_3_store_takes_new_imports_with_their_bodies_apart() {
    let (_dir, path) = crate::compat::frozen("store-v3");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&path).unwrap();
    let stored = import(&store, &corpus(dir.path(), 600, 9), "new", 64 << 10);
    assert!(stored > 400);
    assert_eq!(check_all(&store), 92 + stored);
    // Lookups by hash, sorted hashes and ordinals see both layouts.
    let mut hashes = Vec::new();
    store
        .for_each_example(|hash, _| {
            hashes.push(*hash);
            Ok(())
        })
        .unwrap();
    hashes.sort_unstable();
    let mut visited = Vec::new();
    store
        .for_each_sorted(&hashes, |hash, example| {
            assert_eq!(store.example_at(example.ordinal).unwrap().unwrap().0, *hash);
            visited.push(*hash);
            Ok(())
        })
        .unwrap();
    assert_eq!(visited, hashes);
    let mut from = Vec::new();
    store
        .for_each_from(80, |_, example| {
            from.push(example.ordinal);
            Ok(())
        })
        .unwrap();
    assert_eq!(from, (80..92 + stored).collect::<Vec<_>>());
    // Headers alone, in hash order, for both layouts; sources from one provenance read.
    let multi = store.multi_sourced().unwrap();
    let mut headers = Vec::new();
    store
        .for_each_header(|hash, header| {
            let example = store.get(hash).unwrap().unwrap();
            assert_eq!(
                (header.ordinal, header.category, header.first_import),
                (
                    example.ordinal,
                    example.category.as_str(),
                    example.first_import
                )
            );
            let ids = import_ids(&store, hash);
            match multi.get(hash) {
                Some(listed) => assert_eq!(*listed, ids),
                None => assert_eq!(ids, [example.first_import]),
            }
            headers.push(*hash);
            Ok(())
        })
        .unwrap();
    assert_eq!(headers, hashes);
    assert!(!multi.is_empty());
    // Chosen ordinals on both sides of the upgrade, and one past the end.
    let end = 92 + stored;
    let mut seen = Vec::new();
    store
        .for_each_at(&[3, 91, 92, end - 1, end], |ordinal, found| {
            seen.push((ordinal, found.map(|(_, example)| example.ordinal)));
            Ok(())
        })
        .unwrap();
    assert_eq!(
        seen,
        [
            (3, Some(3)),
            (91, Some(91)),
            (92, Some(92)),
            (end - 1, Some(end - 1)),
            (end, None)
        ]
    );
    store.compact();
    assert_eq!(check_all(&store), 92 + stored);
    drop(store);
    let (values, _) = raw_values(&path);
    assert_eq!(values.len() as u64, 92 + stored);
    let store = Store::open_read_only(&path).unwrap();
    assert_eq!(check_all(&store), 92 + stored);
}

/// The imports that gave `hash`, each once, in order, from its provenance.
fn import_ids(store: &Store, hash: &corpusdb::conversation::ContentHash) -> Vec<u32> {
    let mut ids: Vec<u32> = store
        .provenance(hash)
        .unwrap()
        .iter()
        .map(|p| p.import_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The latest OPTIONS file's section of family `name`.
fn family_options(store: &Path, name: &str) -> String {
    let latest = std::fs::read_dir(store)
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
    let options = std::fs::read_to_string(latest).unwrap();
    let at = options.find(&format!("[CFOptions \"{name}\"]")).unwrap();
    let section = &options[at..];
    section[..section[1..].find("\n[").map_or(section.len(), |i| i + 1)].to_owned()
}

#[test]
fn ingest_compression_lz4_reads_back_like_zstd_and_mixes_with_it() {
    use crate::util::{corpusdb, run_ok};
    let dir = tempfile::tempdir().unwrap();
    let first = corpus(dir.path(), 600, 21);
    let second = corpus(dir.path(), 400, 22);
    let zstd = dir.path().join("zstd");
    let lz4 = dir.path().join("lz4");
    let ingest = |store: &Path, file: &Path, source: &str, extra: &[&str]| {
        run_ok(
            corpusdb(store)
                .args(["ingest", "--source", source, "--category", "general"])
                .args(extra)
                .arg(file),
        );
    };
    ingest(&zstd, &first, "one", &[]);
    ingest(&lz4, &first, "one", &["--compression", "lz4"]);
    let bodies = family_options(&lz4, "bodies");
    assert!(
        bodies.contains("\n  compression=kLZ4Compression"),
        "{bodies}"
    );
    // A later import with the default writes zstd beside the lz4 bodies.
    ingest(&zstd, &second, "two", &[]);
    ingest(&lz4, &second, "two", &[]);
    let bodies = family_options(&lz4, "bodies");
    assert!(bodies.contains("\n  compression=kZSTD"), "{bodies}");
    let export = |store: &Path| {
        let out = dir.path().join(format!(
            "{}.jsonl",
            store.file_name().unwrap().to_string_lossy()
        ));
        run_ok(corpusdb(store).args(["export", "*", "--out"]).arg(&out));
        std::fs::read_to_string(out).unwrap()
    };
    let (from_zstd, from_lz4) = (export(&zstd), export(&lz4));
    let stored = crate::util::stored_hashes(&zstd).len();
    assert!(stored > 600, "{stored}");
    assert_eq!(from_zstd.lines().count(), stored);
    assert_eq!(from_zstd, from_lz4);
    run_ok(corpusdb(&lz4).arg("check"));
    // An unknown codec is refused before anything is opened.
    let out = corpusdb(&dir.path().join("none"))
        .args(["ingest", "--source", "x", "--category", "general"])
        .args(["--compression", "brotli"])
        .arg(&first)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("brotli"));
    assert!(!dir.path().join("none").exists());
}

/// Provenance is read only for stored hashes, so where it rests (the last level) it keeps
/// no bloom filters, which every open of the store would hold in memory; the examples
/// family keeps them for dedup's questions about absent hashes. Reads still answer.
#[test]
fn resting_provenance_keeps_no_filters_and_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open(&path).unwrap();
    let file = corpus(dir.path(), 1500, 31);
    let stored = import(&store, &file, "one", 64 << 10);
    // The same records again: every example gains a second source.
    assert_eq!(import(&store, &file, "two", 64 << 10), 0);
    store.flush().unwrap();
    store.compact();
    let families = store.footprint().unwrap();
    let family = |name: &str| families.iter().find(|f| f.name == name).unwrap();
    assert!(family("examples").filter_bytes > 0, "{families:?}");
    let provenance = family("provenance");
    assert!(
        provenance.table_files > 0 && provenance.disk_bytes > 0,
        "{families:?}"
    );
    assert_eq!(provenance.filter_bytes, 0, "{families:?}");
    assert!(family("bodies").index_bytes > 0, "{families:?}");
    let mut seen = 0;
    store
        .for_each_example(|hash, _| {
            assert_eq!(import_ids(&store, hash).len(), 2, "{}", hash.to_hex());
            seen += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, stored);
}
