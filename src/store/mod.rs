//! The embedded store: RocksDB, the only module that imports it.
//!
//! Column families (byte layouts in `storage/README.md`):
//!
//! | family       | key                                   | value                      |
//! |--------------|---------------------------------------|----------------------------|
//! | `examples`   | SHA-1 (20 bytes)                      | bincode [`ExampleHeader`]  |
//! | `bodies`     | ordinal u64 BE                        | SHA-1, header, tagged body |
//! | `provenance` | SHA-1, import id u32 BE, record u64 BE| bincode [`ProvenanceValue`]|
//! | `ordinals`   | ordinal u64 BE                        | SHA-1 (20 bytes)           |
//! | `imports`    | import id u32 BE                      | bincode [`ImportRecord`]   |
//! | `rejects`    | import id u32 BE, record u64 BE       | bincode [`Reject`]         |
//! | `changes`    | sequence u64 BE                       | SHA-1 (20 bytes)           |
//! | `excluded`   | SHA-1, filter name                    | bincode [`Exclusion`]      |
//! | `meta`       | `schema_version`, `counters`          | u32 LE, bincode [`Counters`]|
//! | `neardup`    | kind byte + key (see [`neardup`])     | signatures, buckets, pairs, clusters |
//!
//! Every change an import makes for one batch of records, including its checkpoint and the
//! running counters, goes through one [`Batch`] written atomically, so a crash at any point
//! leaves the store at a batch boundary that the checkpoint describes exactly.

mod neardup;
mod transaction;
mod types;
mod values;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode,
    Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::conversation::ContentHash;

pub use neardup::SignatureCursor;
pub use transaction::{ExclusionBatch, ImportBatch, NearDupBatch};
pub use types::{
    ClusterMembership, Counters, ExampleHeader, ExampleSource, Exclusion, ImportCounts,
    ImportRecord, ImportRecordBeforePrefix, ImportState, LegacyImportRecord, LegacyReject,
    NearDupParams, ProvenanceEntry, ProvenanceValue, ProvenanceValueWithId, Reject, RejectKind,
    RejectReason, StoredExample,
};
pub use values::{Dictionary, DICTIONARY_BYTES};

/// Version of the on-disk layout (keys, values, canonical hash form).
///
/// Version 3 tags every example value (see [`values`]: raw, or zstd with a stored
/// dictionary) and turns off the examples family's block compression. A version-2 store
/// opened for writing is upgraded in place: `values_tagged_from` records how many
/// (untagged, block-compressed) examples it already had, and they keep reading as before.
/// A binary of version 2 refuses a version-3 store by its schema version.
///
/// Version 4 moves each new example's body out of the hash-keyed `examples` family (which
/// keeps the header, for dedup and lookups by hash) into `bodies`, keyed by ordinal:
/// ordinals only grow, so flushed files never overlap and compaction moves them instead
/// of rewriting them. `bodies_from` records the example count when a version-2 or -3
/// store was upgraded; the examples before it keep their whole value under their hash.
/// A binary of version 3 refuses a version-4 store by its unknown `bodies` family.
pub const SCHEMA_VERSION: u32 = 4;
/// The oldest layout this binary reads (and upgrades when it writes).
pub const OLDEST_SCHEMA_VERSION: u32 = 2;

const CF_EXAMPLES: &str = "examples";
/// Example bodies by ordinal (schema version 4).
const CF_BODIES: &str = "bodies";
const CF_PROVENANCE: &str = "provenance";
const CF_ORDINALS: &str = "ordinals";
const CF_IMPORTS: &str = "imports";
const CF_REJECTS: &str = "rejects";
const CF_META: &str = "meta";
const CF_CHANGES: &str = "changes";
const CF_EXCLUDED: &str = "excluded";
/// Added without a schema change: a store gains it, empty, the first time it is opened
/// for writing; read-only opens of a store that lacks it see no near-duplicate data.
const CF_NEARDUP: &str = "neardup";
const ALL_CFS: [&str; 10] = [
    CF_EXAMPLES,
    CF_BODIES,
    CF_PROVENANCE,
    CF_ORDINALS,
    CF_IMPORTS,
    CF_REJECTS,
    CF_META,
    CF_CHANGES,
    CF_EXCLUDED,
    CF_NEARDUP,
];

const KEY_SCHEMA_VERSION: &[u8] = b"schema_version";
const KEY_COUNTERS: &[u8] = b"counters";
/// Ordinal from which example values are tagged (u64 LE); absent in version-2 stores.
const KEY_TAGGED_FROM: &[u8] = b"values_tagged_from";
/// Examples with this ordinal or above have their body in the `bodies` family.
const KEY_BODIES_FROM: &[u8] = b"bodies_from";

/// Base key of file-level ledger entries (not records) in the rejects family; a note at
/// byte offset `b` of the file is stored under `FILE_NOTE_RECORD - b`.
pub const FILE_NOTE_RECORD: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store at {path} is locked: another corpusdb process is writing to it; wait for it to finish (readers such as `stats` work meanwhile)")]
    Locked { path: PathBuf },
    #[error("no store at {path}: create one with `corpusdb ingest`, or pass --store DIR")]
    Missing { path: PathBuf },
    #[error("store at {path} has schema version {found}, this corpusdb reads versions 2 to {expected}; use a matching corpusdb or re-import into a new store")]
    SchemaMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("store at {path} was written by a newer corpusdb (it has the {family:?} column family, unknown to this one); use that corpusdb or a newer one")]
    Newer { path: PathBuf, family: String },
    #[error("store at {path} is damaged: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("store at {path}: {source}")]
    Rocks {
        path: PathBuf,
        source: rocksdb::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Compression of example bodies (the other families are small and use lz4 blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Each body compressed on its own by the import's parse threads with zstd and a
    /// dictionary trained from the store's first import; no block compression of
    /// `bodies`. A store upgraded from version 2 or 3 keeps zstd on the bottommost level of
    /// `examples` for the whole values written before. More CPU per value than block
    /// compression (BENCHMARKS.md).
    Dictionary,
    /// The options below store bodies as they are and let RocksDB compress blocks.
    None,
    /// lz4 blocks.
    Lz4,
    /// zstd blocks, compressed once by the flush that writes them (the default).
    Zstd,
}

impl Compression {
    /// The codecs an import chooses by name (`ingest --compression`, the Python package's
    /// `Store.ingest`), the default first.
    pub const BY_NAME: [(&'static str, Compression); 2] =
        [("zstd", Compression::Zstd), ("lz4", Compression::Lz4)];

    pub fn by_name(name: &str) -> Option<Compression> {
        Compression::BY_NAME
            .iter()
            .find(|(known, _)| *known == name)
            .map(|&(_, compression)| compression)
    }
}

/// How to open a store for writing.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub compression: Compression,
    /// Write-ahead log for every batch. Off by default: imports carry their own checkpoint
    /// in the same batch, so an atomic flush of all families is as consistent a recovery
    /// point as the log, and skipping the log saves a quarter of the ingest time
    /// (BENCHMARKS.md). Without it, a killed process redoes the work since the last flush
    /// (at most one write buffer).
    pub wal: bool,
    /// Memtable size of the `examples` and `bodies` families, in bytes. Every family
    /// flushes together when `bodies` fills its buffer.
    pub write_buffer_bytes: usize,
    /// Shared block cache, in bytes.
    pub block_cache_bytes: usize,
    /// zstd level of bodies: of each value compressed with a dictionary
    /// ([`Compression::Dictionary`]), or of the `bodies` family's blocks ([`Compression::Zstd`]).
    pub value_level: i32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        // Block compression: measured on an idle machine, compressing each value once
        // with a dictionary cost more import CPU than lz4 + bottommost zstd blocks
        // (BENCHMARKS.md, "Compressing each value once").
        StoreOptions {
            compression: Compression::Zstd,
            wal: false,
            write_buffer_bytes: 128 << 20,
            block_cache_bytes: 64 << 20,
            value_level: values::DEFAULT_LEVEL,
        }
    }
}

pub struct Store {
    db: DB,
    path: PathBuf,
    /// Write options of [`Store::write`]; `None` for a read-only store.
    write_options: Option<WriteOptions>,
    /// Examples from this ordinal on have tagged values (`u64::MAX`: none, a version-2
    /// store opened read-only).
    tagged_from: u64,
    /// Examples from this ordinal on keep their body in the `bodies` family (`u64::MAX`:
    /// none, a store of version 2 or 3 opened read-only).
    bodies_from: u64,
    /// The dictionaries of compressed values, by id.
    dictionaries: values::Dictionaries,
    /// Whether imports compress values ([`Compression::Dictionary`]).
    compress_values: bool,
    /// zstd level of compressed values.
    value_level: i32,
}

/// How an import encodes the example values it writes ([`Store::value_coding`]).
#[derive(Clone, Debug)]
pub enum ValueCoding {
    /// As they are (block compression does the work, or values are not compressed).
    Raw,
    /// The store has no dictionary yet: train one from the import's first values.
    Train,
    /// Compress with this dictionary.
    Compress(Arc<Dictionary>),
}

impl Store {
    /// Opens (creating if needed) a store for writing. Only one process may hold it.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_with(path, &StoreOptions::default())
    }

    pub fn open_with(path: &Path, options: &StoreOptions) -> Result<Store> {
        std::fs::create_dir_all(path).map_err(|e| Error::Corrupt {
            path: path.to_owned(),
            detail: format!("cannot create the directory: {e}"),
        })?;
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        db_options.set_bytes_per_sync(1 << 20);
        // All families flush together, so what is on disk is always one batch boundary
        // even when batches bypass the write-ahead log.
        db_options.set_atomic_flush(true);
        // One memory budget for all memtables, so RSS stays bounded whatever the corpus.
        db_options.set_db_write_buffer_size(options.write_buffer_bytes * 3);
        let descriptors = column_families(options);
        // RocksDB refuses to open a store without every family it has; say why.
        for family in DB::list_cf(&db_options, path).unwrap_or_default() {
            if family != "default" && !descriptors.iter().any(|d| d.name() == family) {
                return Err(Error::Newer {
                    path: path.to_owned(),
                    family,
                });
            }
        }
        let db = DB::open_cf_descriptors(&db_options, path, descriptors)
            .map_err(|e| rocks_error(path, e))?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(false);
        write_options.disable_wal(!options.wal);
        let mut store = Store {
            db,
            path: path.to_owned(),
            write_options: Some(write_options),
            tagged_from: u64::MAX,
            bodies_from: u64::MAX,
            dictionaries: values::Dictionaries::default(),
            compress_values: options.compression == Compression::Dictionary,
            value_level: options.value_level,
        };
        (store.tagged_from, store.bodies_from) = store.check_schema(true)?;
        store.load_dictionaries()?;
        if store.bodies_from > 0 && store.compress_values {
            // Whole values written before version 4 rest in the examples family, those
            // before version 3 raw: they keep zstd where they rest.
            store
                .db
                .set_options_cf(
                    store.cf(CF_EXAMPLES),
                    &[("bottommost_compression", "kZSTD")],
                )
                .map_err(|e| store.rocks(e))?;
        }
        Ok(store)
    }

    /// The counters of the store at `path`, read with only its `meta` family open: a few
    /// milliseconds at any size, where opening every family loads each table file's index
    /// and filter (about 0.2 s at 10M examples). For commands that answer from the index
    /// alone when it is up to date.
    pub fn read_counters(path: &Path) -> Result<Counters> {
        require_existing(path)?;
        let mut options = Options::default();
        // The meta family has a file or two: RocksDB's pool of 16 table-opening threads
        // cost more than opening them.
        options.set_max_file_opening_threads(1);
        // Only `meta`, which every store has: the manifest is not read to list them.
        let db =
            open_read_only_retrying(path, &options, || families_where(|name| name == CF_META))?;
        let cf = db.cf_handle(CF_META).ok_or_else(|| Error::Corrupt {
            path: path.to_owned(),
            detail: "the meta family is missing".into(),
        })?;
        match db
            .get_cf(cf, KEY_COUNTERS)
            .map_err(|e| rocks_error(path, e))?
        {
            Some(bytes) => decode_at(path, &bytes, "counters"),
            None => Ok(Counters::default()),
        }
    }

    /// Opens an existing store for reading; works while another process writes to it and
    /// sees the data committed when it was opened.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        require_existing(path)?;
        let mut options = Options::default();
        // Every table file is opened up front: a writer's compaction may delete files
        // afterwards, and open descriptors keep them readable for this snapshot.
        options.set_max_open_files(-1);
        // A store written before `neardup` or `bodies` lacks them; every other family
        // must be there (one missing is a store still being created, or whose creation
        // was killed: RocksDB then reports the family not found).
        let db = open_read_only_retrying(path, &options, || {
            let present = DB::list_cf(&options, path).unwrap_or_default();
            families_where(|name| {
                ![CF_NEARDUP, CF_BODIES].contains(&name)
                    || present.is_empty()
                    || present.iter().any(|p| p == name)
            })
        })?;
        let mut store = Store {
            db,
            path: path.to_owned(),
            write_options: None,
            tagged_from: u64::MAX,
            bodies_from: u64::MAX,
            dictionaries: values::Dictionaries::default(),
            compress_values: false,
            value_level: values::DEFAULT_LEVEL,
        };
        (store.tagged_from, store.bodies_from) = store.check_schema(false)?;
        store.load_dictionaries()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the schema version (upgrading an older store or initialising a new one
    /// when `may_write`) and returns the ordinals from which values are tagged and from
    /// which bodies are in their own family.
    fn check_schema(&self, may_write: bool) -> Result<(u64, u64)> {
        let meta = self.cf(CF_META);
        match self
            .db
            .get_cf(meta, KEY_SCHEMA_VERSION)
            .map_err(|e| self.rocks(e))?
        {
            Some(bytes) => {
                let found = u32::from_le_bytes(
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| self.corrupt("schema version is not 4 bytes"))?,
                );
                match found {
                    SCHEMA_VERSION => Ok((
                        self.meta_u64(KEY_TAGGED_FROM)?,
                        self.meta_u64(KEY_BODIES_FROM)?,
                    )),
                    // Every example stored so far keeps its whole value under its hash
                    // (untagged before version 3); new ones are tagged, bodies apart.
                    OLDEST_SCHEMA_VERSION..SCHEMA_VERSION if may_write => {
                        let examples = self.counters()?.examples;
                        let tagged_from = match found {
                            OLDEST_SCHEMA_VERSION => examples,
                            _ => self.meta_u64(KEY_TAGGED_FROM)?,
                        };
                        self.mark_version(tagged_from, examples)?;
                        Ok((tagged_from, examples))
                    }
                    OLDEST_SCHEMA_VERSION => Ok((u64::MAX, u64::MAX)),
                    3 => Ok((self.meta_u64(KEY_TAGGED_FROM)?, u64::MAX)),
                    _ => Err(Error::SchemaMismatch {
                        path: self.path.clone(),
                        found,
                        expected: SCHEMA_VERSION,
                    }),
                }
            }
            None if may_write => {
                self.mark_version(0, 0)?;
                Ok((0, 0))
            }
            // A store another process is creating right now has nothing yet: read it as empty.
            None if self
                .db
                .get_cf(meta, KEY_COUNTERS)
                .map_err(|e| self.rocks(e))?
                .is_none() =>
            {
                Ok((0, 0))
            }
            None => Err(self.corrupt("no schema version recorded")),
        }
    }

    /// A u64 the `meta` family must hold.
    fn meta_u64(&self, key: &[u8]) -> Result<u64> {
        let name = String::from_utf8_lossy(key);
        let bytes = self
            .db
            .get_cf(self.cf(CF_META), key)
            .map_err(|e| self.rocks(e))?
            .ok_or_else(|| self.corrupt(&format!("no {name} recorded")))?;
        Ok(u64::from_le_bytes(bytes.as_slice().try_into().map_err(
            |_| self.corrupt(&format!("{name} is not 8 bytes")),
        )?))
    }

    /// Records this schema version, where tagged values begin and where bodies apart
    /// begin, in one write, flushed at once (so readers opening the store see them).
    fn mark_version(&self, tagged_from: u64, bodies_from: u64) -> Result<()> {
        let meta = self.cf(CF_META);
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, KEY_TAGGED_FROM, tagged_from.to_le_bytes());
        batch.put_cf(meta, KEY_BODIES_FROM, bodies_from.to_le_bytes());
        batch.put_cf(meta, KEY_SCHEMA_VERSION, SCHEMA_VERSION.to_le_bytes());
        self.db.write(batch).map_err(|e| self.rocks(e))?;
        self.flush()
    }

    fn load_dictionaries(&self) -> Result<()> {
        let prefix = values::DICTIONARY_KEY_PREFIX;
        for item in self.db.iterator_cf(
            self.cf(CF_META),
            IteratorMode::From(prefix, Direction::Forward),
        ) {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            let Some(id) = key.strip_prefix(prefix) else {
                break;
            };
            let id = u32::from_be_bytes(
                id.try_into()
                    .map_err(|_| self.corrupt("dictionary key is not prefix + u32"))?,
            );
            self.dictionaries.insert(Arc::new(Dictionary::new(
                id,
                value.into_vec(),
                self.value_level,
            )));
        }
        Ok(())
    }

    /// How an import writing to this store encodes example values.
    pub fn value_coding(&self) -> ValueCoding {
        if !self.compress_values {
            return ValueCoding::Raw;
        }
        match self.dictionaries.newest() {
            Some(dictionary) => ValueCoding::Compress(dictionary),
            None => ValueCoding::Train,
        }
    }

    /// Trains the store's next dictionary from sample bodies (as [`encode_conversation`]
    /// writes them), or `None` when they are too few. It is stored by the import batch
    /// that first uses it ([`ImportBatch::add_dictionary`]).
    pub fn train_dictionary(&self, samples: &[&[u8]]) -> Option<Arc<Dictionary>> {
        let mut joined = Vec::with_capacity(samples.iter().map(|s| s.len()).sum());
        let mut sizes = Vec::with_capacity(samples.len());
        for sample in samples {
            let plain = sample.get(1..).unwrap_or_default();
            joined.extend_from_slice(plain);
            sizes.push(plain.len());
        }
        values::train(
            self.dictionaries.next_id(),
            &joined,
            &sizes,
            self.value_level,
        )
        .map(Arc::new)
    }

    /// The dictionaries this store holds.
    pub fn dictionaries(&self) -> Vec<Arc<Dictionary>> {
        let mut out = Vec::new();
        let mut id = 1;
        while let Some(d) = self.dictionaries.get(id) {
            out.push(d);
            id += 1;
        }
        out
    }

    /// Running totals, kept up to date by every import batch.
    pub fn counters(&self) -> Result<Counters> {
        match self
            .db
            .get_cf(self.cf(CF_META), KEY_COUNTERS)
            .map_err(|e| self.rocks(e))?
        {
            Some(bytes) => self.decode(&bytes, "counters"),
            None => Ok(Counters::default()),
        }
    }

    /// For each hash, the import that first stored it, or `None` when it is not stored.
    /// One batched lookup: RocksDB sorts the keys and checks each table's bloom filter for
    /// all of them together, so new content costs no disk read.
    pub fn first_imports(&self, hashes: &[ContentHash]) -> Result<Vec<Option<u32>>> {
        let cf = self.cf(CF_EXAMPLES);
        let keys = hashes.iter().map(ContentHash::as_bytes);
        self.db
            .batched_multi_get_cf(cf, keys, false)
            .into_iter()
            .map(|result| match result.map_err(|e| self.rocks(e))? {
                Some(value) => first_import_of(&value)
                    .map(Some)
                    .ok_or_else(|| self.corrupt("example value is shorter than its header")),
                None => Ok(None),
            })
            .collect()
    }

    pub fn get(&self, hash: &ContentHash) -> Result<Option<StoredExample>> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_EXAMPLES), hash.as_bytes())
            .map_err(|e| self.rocks(e))?
        {
            Some(value) => Ok(Some(self.example_of(hash, &value)?)),
            None => Ok(None),
        }
    }

    /// The example stored under an ordinal, with its hash: one read of its body.
    pub fn example_at(&self, ordinal: u64) -> Result<Option<(ContentHash, StoredExample)>> {
        if ordinal < self.bodies_from {
            let Some(hash) = self.hash_at(ordinal)? else {
                return Ok(None);
            };
            return Ok(self.get(&hash)?.map(|example| (hash, example)));
        }
        match self
            .db
            .get_pinned_cf(self.cf(CF_BODIES), ordinal.to_be_bytes())
            .map_err(|e| self.rocks(e))?
        {
            Some(value) => Ok(Some(self.decode_body(&value)?)),
            None => Ok(None),
        }
    }

    /// Visits the examples of `hashes` (sorted ascending, as `sort_unstable` leaves them)
    /// in that order. Headers are read with one forward-seeking iterator (neighbouring
    /// keys share table blocks), then each slice's bodies in ordinal order, so memory
    /// stays bounded by the slice. Hashes that are not stored are skipped.
    pub fn for_each_sorted(
        &self,
        hashes: &[ContentHash],
        mut visit: impl FnMut(&ContentHash, StoredExample) -> Result<()>,
    ) -> Result<()> {
        const SLICE: usize = 1024;
        debug_assert!(
            hashes.windows(2).all(|w| w[0] <= w[1]),
            "hashes must be sorted"
        );
        let mut headers = self.db.raw_iterator_cf(self.cf(CF_EXAMPLES));
        let mut bodies =
            (self.bodies_from < u64::MAX).then(|| self.db.raw_iterator_cf(self.cf(CF_BODIES)));
        let mut examples: Vec<Option<StoredExample>> = Vec::with_capacity(SLICE);
        let mut apart: Vec<(u64, usize)> = Vec::with_capacity(SLICE);
        for slice in hashes.chunks(SLICE) {
            examples.clear();
            apart.clear();
            for (i, hash) in slice.iter().enumerate() {
                headers.seek(hash.as_bytes());
                headers.status().map_err(|e| self.rocks(e))?;
                let mut example = None;
                if headers.key() == Some(hash.as_bytes().as_slice()) {
                    let value = headers.value().expect("a valid iterator has a value");
                    match self.ordinal_of(value)? {
                        ordinal if ordinal < self.bodies_from => {
                            example = Some(self.decode_example(value)?)
                        }
                        ordinal => apart.push((ordinal, i)),
                    }
                }
                examples.push(example);
            }
            apart.sort_unstable();
            for &(ordinal, i) in &apart {
                let bodies = bodies.as_mut().expect("bodies apart only with the family");
                let found = self.body_at(bodies, ordinal)?;
                examples[i] = Some(self.body_of(&slice[i], ordinal, found)?);
            }
            for (hash, example) in slice.iter().zip(examples.drain(..)) {
                if let Some(example) = example {
                    visit(hash, example)?;
                }
            }
        }
        Ok(())
    }

    /// Visits the examples at `ordinals` (sorted ascending) in that order, with `None` for
    /// an ordinal that is not stored. Bodies are read with one forward-seeking iterator.
    pub fn for_each_at(
        &self,
        ordinals: &[u64],
        mut visit: impl FnMut(u64, Option<(ContentHash, StoredExample)>) -> Result<()>,
    ) -> Result<()> {
        debug_assert!(
            ordinals.windows(2).all(|w| w[0] <= w[1]),
            "ordinals must be sorted"
        );
        let mut bodies =
            (self.bodies_from < u64::MAX).then(|| self.db.raw_iterator_cf(self.cf(CF_BODIES)));
        for &ordinal in ordinals {
            let found = match bodies.as_mut() {
                Some(bodies) if ordinal >= self.bodies_from => self.body_at(bodies, ordinal)?,
                _ => self.example_at(ordinal)?,
            };
            visit(ordinal, found)?;
        }
        Ok(())
    }

    /// The body at `ordinal`, found by seeking `iter` (forward seeks share its blocks).
    fn body_at(
        &self,
        iter: &mut rocksdb::DBRawIteratorWithThreadMode<'_, DB>,
        ordinal: u64,
    ) -> Result<Option<(ContentHash, StoredExample)>> {
        let key = ordinal.to_be_bytes();
        iter.seek(key);
        iter.status().map_err(|e| self.rocks(e))?;
        if iter.key() != Some(key.as_slice()) {
            return Ok(None);
        }
        self.decode_body(iter.value().expect("a valid iterator has a value"))
            .map(Some)
    }

    /// Visits every example: those stored whole under their hash (before version 4) in
    /// hash order, then the rest in ordinal order. Both are sequential reads.
    pub fn for_each_example(
        &self,
        mut visit: impl FnMut(&ContentHash, StoredExample) -> Result<()>,
    ) -> Result<()> {
        if self.bodies_from > 0 {
            self.scan(CF_EXAMPLES, &[], |key, value| {
                if self.ordinal_of(value)? < self.bodies_from {
                    visit(&self.example_key(key)?, self.decode_example(value)?)?;
                }
                Ok(())
            })?;
        }
        self.for_each_body_from(self.bodies_from, &mut visit)
    }

    /// Visits every example's header (ordinal, category, first import, sizes) in hash
    /// order: one sequential read of the small `examples` family, no bodies.
    pub fn for_each_header(
        &self,
        mut visit: impl FnMut(&ContentHash, ExampleHeader<'_>) -> Result<()>,
    ) -> Result<()> {
        self.scan(CF_EXAMPLES, &[], |key, value| {
            // Every layout starts with the header (a version-2 value is a whole
            // `StoredExample`, whose first fields are the header's).
            let len = header_len(value)
                .ok_or_else(|| self.corrupt("example value is shorter than its header"))?;
            let header: ExampleHeader<'_> = self.decode(&value[..len], "example header")?;
            visit(&self.example_key(key)?, header)
        })
    }

    /// The import ids of every example stored from more than one source record (sorted,
    /// without repeats), from one sequential read of the provenance family. An example
    /// not in the map has one provenance entry, from its `first_import`.
    pub fn multi_sourced(&self) -> Result<HashMap<ContentHash, Vec<u32>>> {
        let mut out = HashMap::new();
        let mut current: Option<(ContentHash, Vec<u32>)> = None;
        let mut finish = |entry: Option<(ContentHash, Vec<u32>)>| {
            if let Some((hash, mut ids)) = entry.filter(|(_, ids)| ids.len() > 1) {
                ids.sort_unstable();
                ids.dedup();
                out.insert(hash, ids);
            }
        };
        self.scan(CF_PROVENANCE, &[], |key, _| {
            let (hash, rest) = key
                .split_first_chunk::<20>()
                .ok_or_else(|| self.corrupt("provenance key has the wrong length"))?;
            let (import_id, _) = split_import_record_key(rest)
                .ok_or_else(|| self.corrupt("provenance key has the wrong length"))?;
            let hash = ContentHash::from_slice(hash).expect("20 bytes");
            match current.as_mut() {
                Some((h, ids)) if *h == hash => ids.push(import_id),
                _ => finish(current.replace((hash, vec![import_id]))),
            }
            Ok(())
        })?;
        finish(current);
        Ok(out)
    }

    /// Visits the examples from ordinal `first` on, in ordinal order (sequential reads of
    /// the bodies; examples stored whole before version 4 are looked up by hash).
    pub fn for_each_from(
        &self,
        first: u64,
        mut visit: impl FnMut(&ContentHash, StoredExample) -> Result<()>,
    ) -> Result<()> {
        if first < self.bodies_from {
            for item in self.ordinals_from(first) {
                let (ordinal, hash) = item?;
                if ordinal >= self.bodies_from {
                    break;
                }
                let example = self
                    .get(&hash)?
                    .ok_or_else(|| self.corrupt(&format!("example {ordinal} is missing")))?;
                visit(&hash, example)?;
            }
        }
        self.for_each_body_from(first.max(self.bodies_from), &mut visit)
    }

    /// Visits the bodies family from ordinal `first` on (nothing when the store has none).
    fn for_each_body_from(
        &self,
        first: u64,
        visit: &mut impl FnMut(&ContentHash, StoredExample) -> Result<()>,
    ) -> Result<()> {
        if self.bodies_from == u64::MAX {
            return Ok(());
        }
        self.scan(CF_BODIES, &first.to_be_bytes(), |_, value| {
            let (hash, example) = self.decode_body(value)?;
            visit(&hash, example)
        })
    }

    /// Reads `family` sequentially from `from` (its start when empty) to its end, without
    /// filling the block cache: one pass over the whole family.
    fn scan(
        &self,
        family: &str,
        from: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut options = ReadOptions::default();
        options.fill_cache(false);
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(family), options);
        iter.seek(from);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            visit(key, value)?;
            iter.next();
        }
        iter.status().map_err(|e| self.rocks(e))
    }

    /// A key of the examples family as the hash it is.
    fn example_key(&self, key: &[u8]) -> Result<ContentHash> {
        ContentHash::from_slice(key).ok_or_else(|| self.corrupt("example key is not a SHA-1"))
    }

    /// Hashes whose hex form starts with `hex_prefix` (at most `limit`).
    pub fn hashes_with_prefix(&self, hex_prefix: &str, limit: usize) -> Result<Vec<ContentHash>> {
        let even = &hex_prefix[..hex_prefix.len() & !1];
        let Ok(start) = hex::decode(even) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_EXAMPLES),
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in iter {
            let (key, _) = item.map_err(|e| self.rocks(e))?;
            if !key.starts_with(&start) || out.len() >= limit {
                break;
            }
            if let Some(hash) = ContentHash::from_slice(&key) {
                if hash.to_hex().starts_with(&hex_prefix.to_ascii_lowercase()) {
                    out.push(hash);
                }
            }
        }
        Ok(out)
    }

    /// Every source record that produced `hash`, in import order.
    /// Where the example `hash` came from, each provenance entry with its import's source
    /// name and file (`?` for an import no longer recorded).
    pub fn sources_of(&self, hash: &ContentHash) -> Result<Vec<ExampleSource>> {
        let imports: std::collections::BTreeMap<u32, ImportRecord> =
            self.imports()?.into_iter().map(|i| (i.id, i)).collect();
        Ok(self
            .provenance(hash)?
            .into_iter()
            .map(|p| {
                let import = imports.get(&p.import_id);
                ExampleSource {
                    source: import.map_or("?".into(), |i| i.source.clone()),
                    file: import.map_or("?".into(), |i| i.path.clone()),
                    record: p.record,
                    line: p.line,
                    id: p.id,
                }
            })
            .collect())
    }

    pub fn provenance(&self, hash: &ContentHash) -> Result<Vec<ProvenanceEntry>> {
        let mut out = Vec::new();
        let iter = self
            .db
            .prefix_iterator_cf(self.cf(CF_PROVENANCE), hash.as_bytes());
        for item in iter {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            if !key.starts_with(hash.as_bytes()) {
                break;
            }
            let (import_id, record) = split_import_record_key(&key[20..])
                .ok_or_else(|| self.corrupt("provenance key has the wrong length"))?;
            let (line, id) = self.decode_provenance(&value)?;
            out.push(ProvenanceEntry {
                import_id,
                record,
                line,
                id,
            });
        }
        Ok(out)
    }

    /// A reader of provenance for hashes visited in ascending order: one iterator seeks
    /// forward instead of a new iterator per hash (used by exports and index catch-up,
    /// which walk the store in hash order).
    pub fn provenance_cursor(&self) -> ProvenanceCursor<'_> {
        ProvenanceCursor {
            store: self,
            iter: self.db.raw_iterator_cf(self.cf(CF_PROVENANCE)),
        }
    }

    pub fn imports(&self) -> Result<Vec<ImportRecord>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_IMPORTS), IteratorMode::Start)
        {
            let (_, value) = item.map_err(|e| self.rocks(e))?;
            // Import records written before `prefix` lack it, those before `file_sha1`
            // both.
            let import = match self
                .decode_or_legacy::<ImportRecord, ImportRecordBeforePrefix>(&value, "import")
            {
                Ok(import) => import,
                Err(_) => {
                    self.decode_or_legacy::<ImportRecord, LegacyImportRecord>(&value, "import")?
                }
            };
            out.push(import);
        }
        Ok(out)
    }

    /// Ledger entries, optionally of one import, in (import, record) order.
    pub fn rejects(&self, import_id: Option<u32>) -> Result<Vec<Reject>> {
        let cf = self.cf(CF_REJECTS);
        let prefix = import_id.map(u32::to_be_bytes);
        let iter = match &prefix {
            Some(p) => self
                .db
                .iterator_cf(cf, IteratorMode::From(p, Direction::Forward)),
            None => self.db.iterator_cf(cf, IteratorMode::Start),
        };
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            if prefix.is_some_and(|p| !key.starts_with(&p)) {
                break;
            }
            // Rejects written before kinds were stored lack the last two fields.
            out.push(self.decode_or_legacy::<Reject, LegacyReject>(&value, "reject")?);
        }
        Ok(out)
    }

    /// The hash stored under an ordinal.
    pub fn hash_at(&self, ordinal: u64) -> Result<Option<ContentHash>> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_ORDINALS), ordinal.to_be_bytes())
            .map_err(|e| self.rocks(e))?
        {
            Some(bytes) => {
                Ok(Some(ContentHash::from_slice(&bytes).ok_or_else(|| {
                    self.corrupt("ordinal value is not a SHA-1")
                })?))
            }
            None => Ok(None),
        }
    }

    /// All stored hashes in insertion order, with their ordinals.
    pub fn ordinals(&self) -> impl Iterator<Item = Result<(u64, ContentHash)>> + '_ {
        self.ordinals_from(0)
    }

    /// The stored hashes from ordinal `first` on, in insertion order, with their ordinals.
    pub fn ordinals_from(
        &self,
        first: u64,
    ) -> impl Iterator<Item = Result<(u64, ContentHash)>> + '_ {
        let mut options = ReadOptions::default();
        options.fill_cache(false);
        let start = first.to_be_bytes();
        self.db
            .iterator_cf_opt(
                self.cf(CF_ORDINALS),
                options,
                IteratorMode::From(&start, rocksdb::Direction::Forward),
            )
            .map(move |item| {
                let (key, value) = item.map_err(|e| self.rocks(e))?;
                let ordinal = u64::from_be_bytes(
                    key.as_ref()
                        .try_into()
                        .map_err(|_| self.corrupt("ordinal key is not 8 bytes"))?,
                );
                let hash = ContentHash::from_slice(&value)
                    .ok_or_else(|| self.corrupt("ordinal value is not a SHA-1"))?;
                Ok((ordinal, hash))
            })
    }

    /// The change log from `sequence` on: (sequence, hash of a new or re-sourced example).
    /// Every exclusion, in (hash, filter) order.
    pub fn exclusions(&self) -> impl Iterator<Item = Result<(ContentHash, Exclusion)>> + '_ {
        self.db
            .iterator_cf(self.cf(CF_EXCLUDED), IteratorMode::Start)
            .map(move |item| {
                let (key, value) = item.map_err(|e| self.rocks(e))?;
                let hash = ContentHash::from_slice(&key[..20.min(key.len())])
                    .ok_or_else(|| self.corrupt("exclusion key is not a SHA-1 and a name"))?;
                Ok((hash, self.decode(&value, "exclusion")?))
            })
    }

    /// The filters that exclude `hash` (empty when it is not excluded).
    pub fn exclusions_of(&self, hash: &ContentHash) -> Result<Vec<Exclusion>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_EXCLUDED),
            IteratorMode::From(hash.as_bytes(), Direction::Forward),
        ) {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            if !key.starts_with(hash.as_bytes()) {
                break;
            }
            out.push(self.decode(&value, "exclusion")?);
        }
        Ok(out)
    }

    pub fn changes_from(
        &self,
        sequence: u64,
    ) -> impl Iterator<Item = Result<(u64, ContentHash)>> + '_ {
        let start = sequence.to_be_bytes();
        let mut options = ReadOptions::default();
        options.fill_cache(false);
        self.db
            .iterator_cf_opt(
                self.cf(CF_CHANGES),
                options,
                IteratorMode::From(&start, Direction::Forward),
            )
            .map(move |item| {
                let (key, value) = item.map_err(|e| self.rocks(e))?;
                let sequence = u64::from_be_bytes(
                    key.as_ref()
                        .try_into()
                        .map_err(|_| self.corrupt("change key is not 8 bytes"))?,
                );
                let hash = ContentHash::from_slice(&value)
                    .ok_or_else(|| self.corrupt("change value is not a SHA-1"))?;
                Ok((sequence, hash))
            })
    }

    /// Writes a batch atomically. With the write-ahead log off (the default) the batch is
    /// durable at the next flush, which writes every family at once; with it on, the log
    /// is written but not fsynced. Either way a crash ends the store at a batch boundary.
    fn write(&self, batch: Batch) -> Result<()> {
        let options = self
            .write_options
            .as_ref()
            .ok_or_else(|| self.corrupt("opened read-only"))?;
        self.db
            .write_opt(batch.inner, options)
            .map_err(|e| self.rocks(e))
    }

    /// Starts an empty batch for this store.
    fn batch(&self) -> Batch<'_> {
        self.batch_with_capacity(0)
    }

    /// Starts an empty batch with room for about `bytes` of writes.
    fn batch_with_capacity(&self, bytes: usize) -> Batch<'_> {
        Batch {
            store: self,
            inner: WriteBatch::with_capacity_bytes(bytes),
        }
    }

    /// What each column family holds on disk and keeps in memory while the store is
    /// open (every table file's index and filter blocks), from RocksDB's properties.
    pub fn footprint(&self) -> Result<Vec<FamilyFootprint>> {
        let mut files: HashMap<String, u64> = HashMap::new();
        for file in self.db.live_files().map_err(|e| self.rocks(e))? {
            *files.entry(file.column_family_name).or_default() += 1;
        }
        let mut out = Vec::new();
        for name in ALL_CFS {
            // A read-only open of a store written before `bodies` or `neardup` lacks them.
            let Some(cf) = self.db.cf_handle(name) else {
                continue;
            };
            let int = |property: &str| -> Result<u64> {
                Ok(self
                    .db
                    .property_int_value_cf(cf, property)
                    .map_err(|e| self.rocks(e))?
                    .unwrap_or(0))
            };
            let tables = self
                .db
                .property_value_cf(cf, "rocksdb.aggregated-table-properties")
                .map_err(|e| self.rocks(e))?
                .unwrap_or_default();
            out.push(FamilyFootprint {
                name,
                table_files: files.get(name).copied().unwrap_or(0),
                disk_bytes: int("rocksdb.total-sst-files-size")?,
                index_bytes: table_property(&tables, "index block size"),
                filter_bytes: table_property(&tables, "filter block size"),
            });
        }
        Ok(out)
    }

    /// Compacts every family fully, so the store is at its resting size.
    pub fn compact(&self) {
        for name in ALL_CFS {
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
    }

    /// Makes every written batch durable: one atomic flush of all families' memtables to
    /// table files, waiting for it. A read-only store has nothing to flush.
    pub fn flush(&self) -> Result<()> {
        if self.write_options.is_none() {
            return Ok(());
        }
        let families: Vec<_> = ALL_CFS.iter().map(|name| self.cf(name)).collect();
        let mut options = rocksdb::FlushOptions::default();
        options.set_wait(true);
        self.db
            .flush_cfs_opt(&families, &options)
            .map_err(|e| self.rocks(e))
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is opened with the store")
    }

    /// Decodes a value of this version, or of `Legacy`, the layout before trailing fields
    /// were added. The legacy layout must use every byte, so a damaged or newer value is
    /// reported rather than read as an old one.
    fn decode_or_legacy<T, Legacy>(&self, bytes: &[u8], what: &str) -> Result<T>
    where
        T: serde::de::DeserializeOwned,
        Legacy: serde::de::DeserializeOwned + Into<T>,
    {
        use bincode::Options;
        if let Ok(value) = bincode::deserialize::<T>(bytes) {
            return Ok(value);
        }
        bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .reject_trailing_bytes()
            .deserialize::<Legacy>(bytes)
            .map(Into::into)
            .map_err(|e| self.corrupt(&format!("cannot decode {what}: {e}")))
    }

    /// A provenance value: the line, and the id when the record had one (see
    /// [`ProvenanceValueWithId`]).
    fn decode_provenance(&self, bytes: &[u8]) -> Result<(u64, Option<String>)> {
        if bytes.len() == 8 {
            let value: ProvenanceValue = self.decode(bytes, "provenance")?;
            return Ok((value.line, None));
        }
        let value: ProvenanceValueWithId = self.decode(bytes, "provenance")?;
        Ok((value.line, Some(value.id)))
    }

    /// The ordinal at the start of a value of the examples family.
    fn ordinal_of(&self, value: &[u8]) -> Result<u64> {
        value
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| self.corrupt("example value is shorter than its header"))
    }

    /// The example of a value of the examples family: the whole value before
    /// `bodies_from`, else its header's ordinal names its body.
    fn example_of(&self, hash: &ContentHash, value: &[u8]) -> Result<StoredExample> {
        let ordinal = self.ordinal_of(value)?;
        if ordinal < self.bodies_from {
            return self.decode_example(value);
        }
        let found = match self
            .db
            .get_pinned_cf(self.cf(CF_BODIES), ordinal.to_be_bytes())
            .map_err(|e| self.rocks(e))?
        {
            Some(body) => Some(self.decode_body(&body)?),
            None => None,
        };
        self.body_of(hash, ordinal, found)
    }

    /// The example whose header named `ordinal`, from the body found there: it must be
    /// there and carry the same hash.
    fn body_of(
        &self,
        hash: &ContentHash,
        ordinal: u64,
        found: Option<(ContentHash, StoredExample)>,
    ) -> Result<StoredExample> {
        match found {
            Some((stored, example)) if stored == *hash => Ok(example),
            Some(_) => Err(self.corrupt(&format!(
                "the body of example {ordinal} is not that of {}",
                hash.to_hex()
            ))),
            None => Err(self.corrupt(&format!("example {ordinal} has no body"))),
        }
    }

    /// A value of the bodies family: the example's hash, then its header and body.
    fn decode_body(&self, value: &[u8]) -> Result<(ContentHash, StoredExample)> {
        let hash = value
            .get(..20)
            .and_then(ContentHash::from_slice)
            .ok_or_else(|| self.corrupt("example body is shorter than its hash"))?;
        Ok((hash, self.decode_example(&value[20..])?))
    }

    /// Decodes an example value: untagged below `tagged_from` (schema version 2), else
    /// header + tagged body, decompressed with its dictionary when it names one.
    fn decode_example(&self, value: &[u8]) -> Result<StoredExample> {
        let ordinal = self.ordinal_of(value)?;
        if ordinal < self.tagged_from {
            return self.decode(value, "example");
        }
        let header_len = header_len(value)
            .ok_or_else(|| self.corrupt("example value is shorter than its header"))?;
        let header: OwnedHeader = self.decode(&value[..header_len], "example header")?;
        let (conversation, extras) =
            values::with_plain(&value[header_len..], &self.dictionaries, |plain| {
                bincode::deserialize(plain).map_err(|e| e.to_string())
            })
            .map_err(|e| self.corrupt(&format!("cannot decode example {ordinal}: {e}")))?;
        Ok(StoredExample {
            ordinal: header.ordinal,
            category: header.category,
            first_import: header.first_import,
            chars: header.chars,
            turns: header.turns,
            conversation,
            extras,
        })
    }

    fn decode<'a, T: serde::Deserialize<'a>>(&self, bytes: &'a [u8], what: &str) -> Result<T> {
        decode_at(&self.path, bytes, what)
    }

    fn rocks(&self, e: rocksdb::Error) -> Error {
        rocks_error(&self.path, e)
    }

    fn corrupt(&self, detail: &str) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            detail: detail.to_string(),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Batches written without the log live in memtables until flushed.
        if self.write_options.is_some() {
            let _ = self.flush();
        }
    }
}

/// See [`Store::provenance_cursor`].
pub struct ProvenanceCursor<'a> {
    store: &'a Store,
    iter: rocksdb::DBRawIteratorWithThreadMode<'a, DB>,
}

impl ProvenanceCursor<'_> {
    /// Every source record that produced `hash`; fastest with hashes in ascending order
    /// (forward seeks share blocks).
    pub fn get(&mut self, hash: &ContentHash) -> Result<Vec<ProvenanceEntry>> {
        let mut out = Vec::new();
        self.iter.seek(hash.as_bytes());
        while let (Some(key), Some(value)) = (self.iter.key(), self.iter.value()) {
            if !key.starts_with(hash.as_bytes()) {
                break;
            }
            let (import_id, record) = split_import_record_key(&key[20..])
                .ok_or_else(|| self.store.corrupt("provenance key has the wrong length"))?;
            let (line, id) = self.store.decode_provenance(value)?;
            out.push(ProvenanceEntry {
                import_id,
                record,
                line,
                id,
            });
            self.iter.next();
        }
        self.iter.status().map_err(|e| self.store.rocks(e))?;
        Ok(out)
    }
}

/// Raw writes applied together by [`Store::write`]: private to the store, whose
/// transactions ([`ImportBatch`], [`ExclusionBatch`]) keep its rules.
struct Batch<'a> {
    store: &'a Store,
    inner: WriteBatch,
}

impl Batch<'_> {
    /// Puts a new example's body: hash + header + body under its ordinal in `bodies`, and
    /// its hash under its ordinal in `ordinals`. `head` is its encoded header
    /// ([`header_bytes`]), `conversation` the tagged body (see [`ExampleHeader`]).
    fn put_body(&mut self, hash: &ContentHash, ordinal: u64, head: &[u8], conversation: &[u8]) {
        let mut body = Vec::with_capacity(20 + head.len() + conversation.len());
        body.extend_from_slice(hash.as_bytes());
        body.extend_from_slice(head);
        body.extend_from_slice(conversation);
        self.inner
            .put_cf(self.store.cf(CF_BODIES), ordinal.to_be_bytes(), body);
        self.inner.put_cf(
            self.store.cf(CF_ORDINALS),
            ordinal.to_be_bytes(),
            hash.as_bytes(),
        );
    }

    /// Puts a new example's encoded header under its hash in `examples`.
    fn put_header(&mut self, hash: &ContentHash, head: &[u8]) {
        self.inner
            .put_cf(self.store.cf(CF_EXAMPLES), hash.as_bytes(), head);
    }

    fn put_provenance(
        &mut self,
        hash: &ContentHash,
        import_id: u32,
        record: u64,
        line: u64,
        id: Option<&str>,
    ) {
        let mut key = [0u8; 32];
        key[..20].copy_from_slice(hash.as_bytes());
        key[20..].copy_from_slice(&import_record_key(import_id, record));
        match id {
            None => self.put(CF_PROVENANCE, &key, &ProvenanceValue { line }),
            Some(id) => self.put(
                CF_PROVENANCE,
                &key,
                &ProvenanceValueWithId {
                    line,
                    id: id.to_string(),
                },
            ),
        }
    }

    fn put_reject(&mut self, reject: &Reject) {
        // File notes sort after the records, one key per position in the file.
        let record = reject
            .record
            .unwrap_or(FILE_NOTE_RECORD - reject.byte_offset);
        let mut key = [0u8; 16];
        key[..12].copy_from_slice(&import_record_key(reject.import_id, record));
        key[12..].copy_from_slice(&reject.part.to_be_bytes());
        self.put(CF_REJECTS, &key, reject);
    }

    fn put_import(&mut self, import: &ImportRecord) {
        self.put(CF_IMPORTS, &import.id.to_be_bytes(), import);
    }

    /// Records that the example `hash` is new or gained provenance, for derived indexes.
    fn put_change(&mut self, sequence: u64, hash: &ContentHash) {
        self.inner.put_cf(
            self.store.cf(CF_CHANGES),
            sequence.to_be_bytes(),
            hash.as_bytes(),
        );
    }

    /// Marks `hash` as excluded by the filter named in `exclusion`.
    fn put_exclusion(&mut self, hash: &ContentHash, exclusion: &Exclusion) {
        let key = exclusion_key(hash, &exclusion.filter);
        self.put(CF_EXCLUDED, &key, exclusion);
    }

    /// Lifts the exclusion of `hash` by `filter`.
    fn delete_exclusion(&mut self, hash: &ContentHash, filter: &str) {
        let key = exclusion_key(hash, filter);
        self.inner.delete_cf(self.store.cf(CF_EXCLUDED), key);
    }

    fn put_dictionary(&mut self, dictionary: &Dictionary) {
        self.inner
            .put_cf(self.store.cf(CF_META), dictionary.key(), dictionary.bytes());
    }

    fn put_counters(&mut self, counters: &Counters) {
        self.put(CF_META, KEY_COUNTERS, counters);
    }

    fn put<T: serde::Serialize>(&mut self, cf: &str, key: &[u8], value: &T) {
        let bytes = bincode::serialize(value).expect("store types always serialise");
        self.inner.put_cf(self.store.cf(cf), key, bytes);
    }
}

/// [`ExampleHeader`] when reading.
#[derive(serde::Deserialize)]
struct OwnedHeader {
    ordinal: u64,
    category: String,
    first_import: u32,
    chars: u64,
    turns: u32,
}

/// Length of the encoded [`ExampleHeader`] at the start of an example value.
fn header_len(value: &[u8]) -> Option<usize> {
    let category_len = u64::from_le_bytes(value.get(8..16)?.try_into().ok()?) as usize;
    let len = 16usize.checked_add(category_len)?.checked_add(16)?;
    (len <= value.len()).then_some(len)
}

/// Reads `first_import` out of an encoded example without decoding the conversation:
/// ordinal (u64), category (u64 length + bytes), first_import (u32), little-endian.
fn first_import_of(value: &[u8]) -> Option<u32> {
    let category_len = u64::from_le_bytes(value.get(8..16)?.try_into().ok()?) as usize;
    let at = 16usize.checked_add(category_len)?;
    Some(u32::from_le_bytes(value.get(at..at + 4)?.try_into().ok()?))
}

/// The body of an example value as [`Batch::put_body`] takes it: the raw tag, then
/// the bincode encoding of a conversation and its extras (the last two fields of
/// [`StoredExample`]). [`compress_value`] turns it into a compressed body.
pub fn encode_conversation(
    conversation: &crate::conversation::Conversation,
    extras: &crate::conversation::Extras,
) -> Vec<u8> {
    // Sized up front: growing a 1.5 KB body from a guess copied it twice.
    let size = bincode::serialized_size(&(conversation, extras)).unwrap_or(512);
    let mut body = Vec::with_capacity(size as usize + 10);
    values::put_varint(&mut body, values::TAG_RAW);
    bincode::serialize_into(&mut body, &(conversation, extras))
        .expect("conversations always serialise");
    body
}

/// A raw body ([`encode_conversation`]) compressed with `dictionary` (its id as the
/// tag, then one zstd frame), or `None` when that would not make it smaller.
pub fn compress_value(body: &[u8], dictionary: &Dictionary) -> Option<Vec<u8>> {
    values::compress(body, dictionary)
}

/// The store's families (with their default options) whose names `wanted` keeps.
fn families_where(wanted: impl Fn(&str) -> bool) -> Vec<ColumnFamilyDescriptor> {
    column_families(&StoreOptions::default())
        .into_iter()
        .filter(|d| wanted(d.name()))
        .collect()
}

/// Opens the families `families` gives (asked again at each attempt) read-only,
/// retrying while a writer changes the store under the open.
fn open_read_only_retrying(
    path: &Path,
    options: &Options,
    families: impl Fn() -> Vec<ColumnFamilyDescriptor>,
) -> Result<DB> {
    let mut attempt = 0;
    loop {
        let descriptors = families();
        match DB::open_cf_descriptors_read_only(options, path, descriptors, false) {
            Ok(db) => return Ok(db),
            // A compaction deleted a file between our reading the manifest and opening
            // it, or a writer is still creating the store's column families: the next
            // attempt reads the new manifest.
            Err(e)
                if attempt < 250
                    && (e.to_string().contains("No such file")
                        || e.to_string().contains("Column family not found")) =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(rocks_error(path, e)),
        }
    }
}

/// A value of the store at `path`, or the corruption that keeps it from decoding.
fn decode_at<'a, T: serde::Deserialize<'a>>(path: &Path, bytes: &'a [u8], what: &str) -> Result<T> {
    bincode::deserialize(bytes).map_err(|e| Error::Corrupt {
        path: path.to_owned(),
        detail: format!("cannot decode {what}: {e}"),
    })
}

/// A store is there: reading commands never create one.
fn require_existing(path: &Path) -> Result<()> {
    if path.join("CURRENT").exists() {
        return Ok(());
    }
    Err(Error::Missing {
        path: path.to_owned(),
    })
}

/// One column family's share of the store (`Store::footprint`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyFootprint {
    pub name: &'static str,
    pub table_files: u64,
    pub disk_bytes: u64,
    /// Index blocks of its table files: in memory while the store is open.
    pub index_bytes: u64,
    /// Bloom filter blocks of its table files: in memory while the store is open.
    pub filter_bytes: u64,
}

/// A number from RocksDB's table-properties text (`name=value; ...`), found by the start
/// of its name: the index's entry carries a suffix (`index block size (user-key? 0, ...)`).
fn table_property(text: &str, name: &str) -> u64 {
    text.split("; ")
        .find(|entry| entry.trim_start().starts_with(name))
        .and_then(|entry| entry.rsplit_once('='))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// An example's header as `examples` stores it and `bodies` repeats it.
fn header_bytes(header: &ExampleHeader<'_>) -> Vec<u8> {
    let mut head = Vec::with_capacity(64);
    bincode::serialize_into(&mut head, header).expect("headers always serialise");
    head
}

fn exclusion_key(hash: &ContentHash, filter: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(20 + filter.len());
    key.extend_from_slice(hash.as_bytes());
    key.extend_from_slice(filter.as_bytes());
    key
}

fn import_record_key(import_id: u32, record: u64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&import_id.to_be_bytes());
    key[4..].copy_from_slice(&record.to_be_bytes());
    key
}

fn split_import_record_key(key: &[u8]) -> Option<(u32, u64)> {
    let import_id = u32::from_be_bytes(key.get(..4)?.try_into().ok()?);
    let record = u64::from_be_bytes(key.get(4..12)?.try_into().ok()?);
    (key.len() == 12).then_some((import_id, record))
}

fn column_families(options: &StoreOptions) -> Vec<ColumnFamilyDescriptor> {
    let cache = Cache::new_lru_cache(options.block_cache_bytes);
    ALL_CFS
        .iter()
        .map(|&name| {
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            let mut cf = Options::default();
            match name {
                CF_EXAMPLES => {
                    // Dedup asks "is this hash stored?" for every record: a bloom filter
                    // answers no for new content without touching disk.
                    table.set_bloom_filter(10.0, false);
                    table.set_block_size(16 << 10);
                    cf.set_write_buffer_size(options.write_buffer_bytes);
                    // Absent keys (new content) are answered by a memtable bloom filter
                    // instead of a skiplist search. Its size is this share of the write
                    // buffer, allocated and zeroed with each memtable. All families flush
                    // when `bodies` fills its buffer, so this one holds a key per body of
                    // it: 1% (1.3 MiB of 128) is over 10 bits a key even for bodies of
                    // 100 bytes; 10% allocated 12.8 MiB a memtable (BENCHMARKS.md).
                    cf.set_memtable_prefix_bloom_ratio(0.01);
                    cf.set_memtable_whole_key_filtering(true);
                    // Recent data is rewritten by compaction soon: cheap lz4 there, zstd
                    // where data comes to rest (BENCHMARKS.md has the measurements).
                    match options.compression {
                        // Values arrive compressed: flushes and compactions copy bytes.
                        Compression::Dictionary | Compression::None => {
                            cf.set_compression_type(DBCompressionType::None)
                        }
                        Compression::Lz4 => cf.set_compression_type(DBCompressionType::Lz4),
                        Compression::Zstd => {
                            lz4_below_level0(&mut cf);
                            cf.set_bottommost_compression_type(DBCompressionType::Zstd);
                            // Keys are hashes, so every compaction into the last level
                            // rewrites it; at zstd's fast level 1, not its default 3.
                            cf.set_bottommost_compression_options(-14, 1, 0, 0, true);
                        }
                    }
                    more_level0_files_per_merge(&mut cf);
                }
                CF_BODIES => {
                    // Keys are ordinals, which only grow: flushed files never overlap, so
                    // compaction moves them down without rewriting them, and each body is
                    // compressed once, by the flush that writes it. Every lookup is of a
                    // stored ordinal, so no bloom filter.
                    table.set_block_size(16 << 10);
                    ordinal_keyed_index(&mut table);
                    cf.set_write_buffer_size(options.write_buffer_bytes);
                    cf.set_compression_type(match options.compression {
                        Compression::Dictionary | Compression::None => DBCompressionType::None,
                        Compression::Lz4 => DBCompressionType::Lz4,
                        Compression::Zstd => DBCompressionType::Zstd,
                    });
                    // The level of compressed values; at 1 rather than zstd's default 3
                    // the import is about 5% faster for a 1% larger store (BENCHMARKS.md).
                    // -14: RocksDB's default window bits.
                    cf.set_compression_options(-14, options.value_level, 0, 0);
                }
                CF_NEARDUP => {
                    // Bucket lookups seek by (kind, bucket): a prefix bloom filter answers
                    // "empty bucket" without reading blocks.
                    cf.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(
                        neardup::BUCKET_PREFIX_LEN,
                    ));
                    table.set_bloom_filter(10.0, false);
                    lz4_below_level0(&mut cf);
                }
                CF_PROVENANCE => {
                    cf.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(20));
                    table.set_bloom_filter(10.0, false);
                    // Provenance is only read for stored hashes (`show`, sources of an
                    // example), which the last level holds: filters there would never
                    // answer "absent", yet they were most of the store's table memory
                    // (BENCHMARKS.md, "Table memory").
                    cf.set_optimize_filters_for_hits(true);
                    lz4_below_level0(&mut cf);
                    more_level0_files_per_merge(&mut cf);
                }
                CF_ORDINALS | CF_CHANGES => {
                    // Keys only grow and values are mostly hashes, which do not compress:
                    // nothing is compressed on any level, so flushed files move down whole
                    // (a compression that changes between levels makes compaction
                    // rewrite every file it moves).
                    cf.set_compression_type(DBCompressionType::None);
                    ordinal_keyed_index(&mut table);
                }
                _ => lz4_below_level0(&mut cf),
            }
            cf.set_block_based_table_factory(&table);
            ColumnFamilyDescriptor::new(name, cf)
        })
        .collect()
}

/// Every open table file keeps its index in memory, so the index grows with the store.
/// Keys of the ordinal-keyed families are big-endian counters sharing their leading bytes:
/// with a restart point every 16 entries instead of every one, index entries store only
/// the bytes that differ, and a lookup scans at most 16 entries after its binary search.
fn ordinal_keyed_index(table: &mut BlockBasedOptions) {
    table.set_index_block_restart_interval(16);
}

/// For the families keyed by content hash (`examples`, `provenance`), whose every file
/// overlaps the whole level below. All families flush together, when `bodies` fills its
/// buffer, so their flushes are a few MB each; at RocksDB's default of 4 level-0 files a
/// merge into the level below rewrote that whole level for 20-40 MB of new keys. At 16,
/// a 10M import spends half the compaction CPU (BENCHMARKS.md, "Level 0 of the
/// hash-keyed families"); dedup lookups check the files' bloom filters, so the extra
/// level-0 files cost no disk reads.
fn more_level0_files_per_merge(cf: &mut Options) {
    cf.set_level_zero_file_num_compaction_trigger(16);
    // RocksDB's defaults (20, 36) would slow and stop writes just above the trigger.
    cf.set_level_zero_slowdown_writes_trigger(48);
    cf.set_level_zero_stop_writes_trigger(64);
}

/// lz4 blocks, except on level 0: flushed memtables are merged into the tree within seconds,
/// and compressing them only to decompress them for that merge cost about a tenth of an
/// import's CPU (BENCHMARKS.md, "Level 0 left uncompressed").
fn lz4_below_level0(cf: &mut Options) {
    let mut levels = vec![DBCompressionType::Lz4; 7];
    levels[0] = DBCompressionType::None;
    cf.set_compression_type(DBCompressionType::Lz4);
    cf.set_compression_per_level(&levels);
}

fn rocks_error(path: &Path, e: rocksdb::Error) -> Error {
    let text = e.to_string();
    if text.contains("lock file") || text.contains("LOCK") {
        Error::Locked {
            path: path.to_owned(),
        }
    } else {
        Error::Rocks {
            path: path.to_owned(),
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::{Conversation, Extras, Message, Role};

    #[test]
    fn first_import_is_read_from_the_encoded_header() {
        let example = StoredExample {
            ordinal: 7,
            category: "mäth".into(),
            first_import: 42,
            chars: 3,
            turns: 1,
            conversation: Conversation::new(vec![Message::new(Role::Assistant, "abc")]),
            extras: Extras {
                raw_text: true,
                rejected: None,
            },
        };
        let bytes = bincode::serialize(&example).unwrap();
        assert_eq!(first_import_of(&bytes), Some(42));
        let header = ExampleHeader {
            ordinal: 7,
            category: "mäth",
            first_import: 42,
            chars: 3,
            turns: 1,
        };
        let mut split = bincode::serialize(&header).unwrap();
        let body = encode_conversation(&example.conversation, &example.extras);
        assert_eq!(body[0], 0, "a raw body is tagged 0");
        split.extend(&body[1..]);
        assert_eq!(
            split, bytes,
            "header ++ conversation encodes the whole example"
        );
        assert_eq!(first_import_of(&bytes[..10]), None);
    }

    /// Import records of the three layouts (before `file_sha1`, before `prefix`, now) and
    /// provenance values with and without an id all read back.
    #[test]
    fn import_records_and_provenance_of_every_layout_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let legacy = LegacyImportRecord {
            id: 0,
            source: "s".into(),
            category: "c".into(),
            path: "a.jsonl".into(),
            fingerprint: "f".into(),
            format: "alpaca".into(),
            state: ImportState::Partial,
            checkpoint: crate::reader::Position {
                records: 3,
                lines: 3,
                bytes: 99,
            },
            container: Some(crate::reader::Container::Jsonl),
            counts: ImportCounts::default(),
            started_unix: 1,
            updated_unix: 2,
        };
        let mut before_prefix = ImportRecordBeforePrefix::from(legacy.clone());
        before_prefix.id = 1;
        before_prefix.file_sha1 = Some("abc".into());
        let mut now = ImportRecord::from(before_prefix.clone());
        now.id = 2;
        now.prefix = Some(crate::reader::FilePrefix {
            bytes: 99,
            sha1: [7; 20],
        });
        let mut batch = store.batch();
        batch.put(CF_IMPORTS, &0u32.to_be_bytes(), &legacy);
        batch.put(CF_IMPORTS, &1u32.to_be_bytes(), &before_prefix);
        batch.put(CF_IMPORTS, &2u32.to_be_bytes(), &now);
        let hash = ContentHash([9; 20]);
        batch.put_provenance(&hash, 0, 0, 1, None);
        batch.put_provenance(&hash, 0, 1, 4, Some("q-17"));
        store.write(batch).unwrap();
        let imports = store.imports().unwrap();
        assert_eq!(imports[0], ImportRecord::from(legacy));
        assert_eq!(imports[1], ImportRecord::from(before_prefix));
        assert_eq!(imports[2], now);
        let provenance = store.provenance(&hash).unwrap();
        assert_eq!(
            provenance
                .iter()
                .map(|p| (p.record, p.line, p.id.as_deref()))
                .collect::<Vec<_>>(),
            [(0, 1, None), (1, 4, Some("q-17"))]
        );
    }
}
