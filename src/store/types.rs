//! Values stored in the column families. They are serialised with bincode, so changing a
//! field here changes the on-disk format: bump `SCHEMA_VERSION` when you do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::conversation::{ContentHash, Conversation, Extras, Role};
use crate::reader::{Compression, Container, FilePrefix, Position};
pub use crate::reject::{RejectKind, RejectReason};

/// An example as stored under its content hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredExample {
    /// Insertion order, dense from 0; stable once assigned.
    pub ordinal: u64,
    /// Category given by the first source that produced this content.
    pub category: String,
    /// Import that first produced it.
    pub first_import: u32,
    pub chars: u64,
    pub turns: u32,
    pub conversation: Conversation,
    /// Never part of the hash: raw-text flag, rejected side of a preference pair.
    pub extras: Extras,
}

/// Every field of [`StoredExample`] but the conversation, in the same order. bincode
/// writes a struct as its fields one after another, so `header ++ conversation` encodes
/// exactly the `StoredExample`: the conversation can be encoded on the parallel parse
/// stage and the writer adds the few bytes it alone knows (the ordinal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExampleHeader<'a> {
    pub ordinal: u64,
    pub category: &'a str,
    pub first_import: u32,
    pub chars: u64,
    pub turns: u32,
}

/// Value of a provenance entry; the key holds hash, import id and record index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenanceValue {
    pub line: u64,
}

/// Value of a provenance entry for a record of an `id -> record` document: the line, then
/// the id. Records without an id keep the 8-byte [`ProvenanceValue`], so the two are told
/// apart by length, and a reader that knows only `ProvenanceValue` reads the line of
/// either (bincode ignores trailing bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenanceValueWithId {
    pub line: u64,
    pub id: String,
}

/// One source record that produced a hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenanceEntry {
    pub import_id: u32,
    /// 0-based record index within the file.
    pub record: u64,
    /// 1-based line where the record starts.
    pub line: u64,
    /// The record's key in an `id -> record` document.
    pub id: Option<String>,
}

/// One place an example came from, as `show` reports it (not stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExampleSource {
    pub source: String,
    pub file: String,
    /// 0-based record index within the file.
    pub record: u64,
    /// 1-based line where the record starts.
    pub line: u64,
    /// The record's key in an `id -> record` document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl ExampleSource {
    /// `file:line`, or `file#id` for a record of an `id -> record` document.
    pub fn place(&self) -> String {
        match &self.id {
            Some(id) => format!("{}#{id}", self.file),
            None => format!("{}:{}", self.file, self.line),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportState {
    /// Started; resumes from `checkpoint`.
    Partial,
    /// Every record of the file is accounted for.
    Done,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportCounts {
    /// Records (lines, array elements, rows) read from the file.
    pub read: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Rows joined into the conversation of an earlier row (OASST rows, dialogue turns).
    pub joined: u64,
    /// Examples beyond the first that one record gave (tree paths, one per solution).
    pub extra: u64,
}

impl ImportCounts {
    /// The invariant every import keeps: every record read is stored, a duplicate or
    /// rejected, once rows joined into one conversation and records giving several are
    /// counted: read - joined + extra = stored + duplicates + rejected.
    pub fn adds_up(&self) -> bool {
        self.read + self.extra == self.stored + self.duplicates + self.rejected + self.joined
    }

    /// Examples produced: stored + duplicates + rejected.
    pub fn examples(&self) -> u64 {
        self.read + self.extra - self.joined
    }

    pub fn add(&mut self, other: &ImportCounts) {
        self.read += other.read;
        self.stored += other.stored;
        self.duplicates += other.duplicates;
        self.rejected += other.rejected;
        self.joined += other.joined;
        self.extra += other.extra;
    }
}

/// One file imported under one source name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRecord {
    pub id: u32,
    pub source: String,
    pub category: String,
    /// The path as given when the import started.
    pub path: String,
    /// See `reader::fingerprint`.
    pub fingerprint: String,
    pub format: String,
    pub state: ImportState,
    /// Where to resume: just after the last committed record.
    pub checkpoint: Position,
    /// JSONL or JSON array, decided when the import started; `None` before that.
    pub container: Option<Container>,
    pub counts: ImportCounts,
    pub started_unix: u64,
    pub updated_unix: u64,
    /// SHA-1 of the whole file (`reader::file_sha1`), written when the import is done: a
    /// re-run compares it, so an edit the sampled fingerprint misses is seen. After the
    /// fields above, so that an import record written before it decodes as
    /// [`LegacyImportRecord`] (`None`) and a reader of that version ignores it as
    /// trailing bytes.
    pub file_sha1: Option<String>,
    /// SHA-1 of the file's bytes that the records up to `checkpoint` were read from,
    /// written with every checkpoint: a resume hashes them again and compares, so an edit
    /// in the part already imported is seen. Last, so that a record written before it
    /// decodes as [`ImportRecordBeforePrefix`] (`None`: resumed without the check).
    pub prefix: Option<FilePrefix>,
}

/// An import record as written after `file_sha1` was added and before `prefix`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRecordBeforePrefix {
    pub id: u32,
    pub source: String,
    pub category: String,
    pub path: String,
    pub fingerprint: String,
    pub format: String,
    pub state: ImportState,
    pub checkpoint: Position,
    pub container: Option<Container>,
    pub counts: ImportCounts,
    pub started_unix: u64,
    pub updated_unix: u64,
    pub file_sha1: Option<String>,
}

impl From<LegacyImportRecord> for ImportRecordBeforePrefix {
    fn from(old: LegacyImportRecord) -> ImportRecordBeforePrefix {
        let ImportRecord {
            id,
            source,
            category,
            path,
            fingerprint,
            format,
            state,
            checkpoint,
            container,
            counts,
            started_unix,
            updated_unix,
            file_sha1,
            ..
        } = ImportRecord::from(old);
        ImportRecordBeforePrefix {
            id,
            source,
            category,
            path,
            fingerprint,
            format,
            state,
            checkpoint,
            container,
            counts,
            started_unix,
            updated_unix,
            file_sha1,
        }
    }
}

impl From<ImportRecordBeforePrefix> for ImportRecord {
    fn from(old: ImportRecordBeforePrefix) -> ImportRecord {
        ImportRecord {
            id: old.id,
            source: old.source,
            category: old.category,
            path: old.path,
            fingerprint: old.fingerprint,
            format: old.format,
            state: old.state,
            checkpoint: old.checkpoint,
            container: old.container,
            counts: old.counts,
            started_unix: old.started_unix,
            updated_unix: old.updated_unix,
            file_sha1: old.file_sha1,
            prefix: None,
        }
    }
}

/// An import record as stores of schema version 2 wrote it before `file_sha1`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyImportRecord {
    pub id: u32,
    pub source: String,
    pub category: String,
    pub path: String,
    pub fingerprint: String,
    pub format: String,
    pub state: ImportState,
    pub checkpoint: Position,
    pub container: Option<Container>,
    pub counts: ImportCounts,
    pub started_unix: u64,
    pub updated_unix: u64,
}

impl From<LegacyImportRecord> for ImportRecord {
    fn from(old: LegacyImportRecord) -> ImportRecord {
        ImportRecord {
            id: old.id,
            source: old.source,
            category: old.category,
            path: old.path,
            fingerprint: old.fingerprint,
            format: old.format,
            state: old.state,
            checkpoint: old.checkpoint,
            container: old.container,
            counts: old.counts,
            started_unix: old.started_unix,
            updated_unix: old.updated_unix,
            file_sha1: None,
            prefix: None,
        }
    }
}

/// A record that did not become an example, or a note about a whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    pub import_id: u32,
    pub source: String,
    pub path: String,
    /// 0-based record index; `None` for a note about the whole file.
    pub record: Option<u64>,
    /// Which of the record's examples (0 for the first or only one).
    pub part: u32,
    pub line: u64,
    pub byte_offset: u64,
    /// The message shown to people ([`RejectReason::message`]).
    pub reason: String,
    /// The record's bytes, at most `RAW_LIMIT` of them.
    pub raw: Vec<u8>,
    pub raw_truncated: bool,
    /// The reason's kind and subject. Last, so that a reject written before they were
    /// stored decodes as [`LegacyReject`] (its kind read from its text once) and a reader
    /// of that version reads these as trailing bytes it ignores.
    pub kind: RejectKind,
    pub subject: String,
}

impl Reject {
    /// Raw bytes kept per rejected record; longer records keep their beginning.
    pub const RAW_LIMIT: usize = 64 << 10;

    /// The reason, typed.
    pub fn reason(&self) -> RejectReason {
        RejectReason {
            kind: self.kind,
            subject: self.subject.clone(),
            message: self.reason.clone(),
        }
    }
}

/// A reject as stores of schema version 2 wrote it before kinds were stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyReject {
    pub import_id: u32,
    pub source: String,
    pub path: String,
    pub record: Option<u64>,
    pub part: u32,
    pub line: u64,
    pub byte_offset: u64,
    pub reason: String,
    pub raw: Vec<u8>,
    pub raw_truncated: bool,
}

impl From<LegacyReject> for Reject {
    fn from(old: LegacyReject) -> Reject {
        // A note about a whole file is the reject without a record.
        let typed = match old.record {
            None => RejectReason::new(RejectKind::FileNote, old.reason.clone()),
            Some(_) => RejectReason::classify_legacy(&old.reason),
        };
        Reject {
            import_id: old.import_id,
            source: old.source,
            path: old.path,
            record: old.record,
            part: old.part,
            line: old.line,
            byte_offset: old.byte_offset,
            reason: old.reason,
            raw: old.raw,
            raw_truncated: old.raw_truncated,
            kind: typed.kind,
            subject: typed.subject,
        }
    }
}

/// Store-wide totals, updated in the same batch as the data they count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Stored examples; also the next ordinal.
    pub examples: u64,
    pub read: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// See [`ImportCounts::joined`] and [`ImportCounts::extra`].
    pub joined: u64,
    pub extra: u64,
    pub next_import_id: u32,
    /// Next sequence number of the change log (entries written so far).
    pub changes: u64,
    /// Examples per category.
    pub categories: BTreeMap<String, u64>,
    /// Records per source name that are in the store (stored or duplicate).
    pub sources: BTreeMap<String, u64>,
}

/// An example set aside by a quality filter: skipped by queries, exports and samplers,
/// kept in the store (`corpusdb filter --undo NAME` lifts it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusion {
    pub filter: String,
    /// What the filter measured, e.g. "41 turns > 32".
    pub measured: String,
    pub unix: u64,
}

/// The MinHash parameters stored signatures were computed with (`neardup` family, key
/// `p`). A run with other parameters recomputes every signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NearDupParams {
    /// Version of the shingling and hashing code (text normalisation, word and n-gram
    /// hashes, permutations); raised when any of them changes what a signature holds.
    pub version: u32,
    pub ngram: u32,
    pub bands: u32,
    pub rows: u32,
    pub seed: u64,
}

/// An example's place in a near-duplicate cluster (`neardup` family, key `c` + hash).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterMembership {
    /// The cluster's id: the smallest hash among its members.
    pub cluster: ContentHash,
    /// The member kept; equal to the example's own hash for the representative.
    pub representative: ContentHash,
    /// Estimated Jaccard similarity to the representative (1 for the representative).
    pub jaccard: f32,
    /// Members of the cluster.
    pub members: u32,
}

impl ClusterMembership {
    /// The id queries name the cluster by (`cluster:<id>`): the first 16 hex digits of its
    /// smallest member's hash.
    pub fn cluster_id(&self) -> String {
        self.cluster.to_hex()[..16].to_string()
    }

    pub fn is_representative(&self, hash: &ContentHash) -> bool {
        self.representative == *hash
    }
}

/// The explicit codes of the enums the store writes, in one place: bincode gets the code as
/// a u32 (what a derived variant index wrote, so the bytes are those of schema version 2),
/// JSON the variant's name (what a derive wrote). Reordering or inserting a variant changes
/// nothing on disk; a new variant takes a new code. `tests/compat.rs` pins every code.
macro_rules! stored_codes {
    ($ty:ident { $($variant:ident = $code:literal),+ $(,)? }) => {
        impl $ty {
            /// The stored code.
            pub fn code(self) -> u32 {
                match self {
                    $($ty::$variant => $code),+
                }
            }

            pub fn from_code(code: u32) -> Option<$ty> {
                match code {
                    $($code => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }

        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    let name = match self {
                        $($ty::$variant => stringify!($variant)),+
                    };
                    serializer.serialize_str(name)
                } else {
                    serializer.serialize_u32(self.code())
                }
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let name = String::deserialize(deserializer)?;
                    match name.as_str() {
                        $(stringify!($variant) => Ok($ty::$variant),)+
                        other => Err(serde::de::Error::custom(format!(
                            "unknown {} `{other}`",
                            stringify!($ty)
                        ))),
                    }
                } else {
                    let code = u32::deserialize(deserializer)?;
                    $ty::from_code(code).ok_or_else(|| {
                        serde::de::Error::custom(format!(
                            "unknown {} code {code}",
                            stringify!($ty)
                        ))
                    })
                }
            }
        }
    };
}

stored_codes!(Role {
    System = 0,
    User = 1,
    Assistant = 2,
    Tool = 3,
});
stored_codes!(Container {
    Jsonl = 0,
    JsonArray = 1,
    Parquet = 2,
    Document = 3,
    DocumentList = 4,
    DocumentById = 5,
});
stored_codes!(Compression {
    None = 0,
    Gzip = 1,
    Zstd = 2,
});
stored_codes!(ImportState {
    Partial = 0,
    Done = 1,
});
