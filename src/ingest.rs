//! The ingest pipeline: file -> records -> conversations -> dedup -> atomic batches.
//!
//! ```text
//! reader thread      parse thread (rayon)          calling thread
//! RecordReader  -->  parse, normalise, hash,  -->  dedup against the store, then one
//!                    encode + compress values
//!   (batches)          (order kept)                 WriteBatch: examples, ordinals,
//!                                                   provenance, rejects, checkpoint, counters;
//!                                                   then `Observer::batch_stored` (an index
//!                                                   fed from it)
//! ```
//!
//! An import is identified by source name + file fingerprint. Its checkpoint (the reader
//! position after the last committed record) is written in the same batch as the data, so
//! a killed import resumes exactly where the store stands, and a finished import is a
//! no-op when run again. Every record read ends up stored, a duplicate, or rejected.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::bounded;
use rayon::prelude::*;

use crate::category::{self, Rule};
use crate::conversation::ContentHash;
use crate::formats::{Detected, Format, Formats, Outcome};
use crate::reader::{
    self, FileNote, FilePrefix, Position, PrefixHasher, RawBody, RawItem, RecordReader, Resume,
};
use crate::store::{
    self, Counters, Dictionary, ImportCounts, ImportRecord, ImportState, Reject, RejectKind,
    RejectReason, Store, ValueCoding,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Detect { path: PathBuf, message: String },
    #[error("{}: changed since its import #{import} (source `{source_name}`) was interrupted: its first {} are no longer those the import read (the sampled fingerprint and the length are the same, so the file was edited in place). The {imported} records imported from it stay in the store. Restore the file to resume that import, or run again with --restart-changed to import the file as it is now as a new import from its start (records that did not change count as duplicates)", path.display(), reader::human_bytes(*checked))]
    Changed {
        path: PathBuf,
        import: u32,
        source_name: String,
        checked: u64,
        imported: u64,
    },
    #[error("{}:{line}: record {record}: {reason} (--strict stops at the first bad record; nothing of its batch was written)", path.display())]
    Strict {
        path: PathBuf,
        line: u64,
        record: u64,
        reason: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to import files.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// Dataset name recorded in provenance (e.g. `gsm8k`).
    pub source: String,
    /// Category given to new examples (metadata, never part of the hash).
    pub category: String,
    /// Content rules that may give an example another category (mixed sources).
    pub rules: Vec<Rule>,
    /// The record shape; `None` detects it from the file's first records.
    pub format: Option<Format>,
    /// Every format known, for detection.
    pub formats: Formats,
    /// Quality filters: a record failing one is rejected with the filter's name.
    pub filters: Option<std::sync::Arc<crate::filters::Filters>>,
    /// Stop at the first bad record instead of recording it and going on.
    pub strict: bool,
    /// Records per atomic batch (and per checkpoint).
    pub batch_records: usize,
    pub max_record_bytes: usize,
    /// Where a JSON object document's records are (`--records`: a dotted path or JSON
    /// pointer); without it, found by their shape.
    pub records: Option<String>,
    /// A partial import whose file changed in the part already read is started again as
    /// a new import (else the run stops with [`Error::Changed`]).
    pub restart_changed: bool,
    /// Pause after each committed batch (a test hook to make kills land mid-import).
    pub batch_delay: Option<Duration>,
    /// Hand each new example's message texts to [`Observer::batch_stored`] (a full-text
    /// index fed by the import); off, the texts are not copied.
    pub keep_text: bool,
    /// Bytes of encoded values a store without a value dictionary collects from an
    /// import's first batches before training one (an import with fewer leaves its
    /// values uncompressed and the next import tries again).
    pub dictionary_sample_bytes: usize,
    /// Whether [`ingest_file`] returns only once the file's data is on disk (the
    /// default), or leaves it to the memtables' own flushes and the caller's (the CLI
    /// between files, which flushes once after its last). A flush started at a file's
    /// end waits for the flush already running, with every writer idle; automatic
    /// flushes and index commits bound what a crash can lose either way, and a resumed
    /// import redoes that.
    pub flush_at_end: bool,
}

/// Default of [`IngestOptions::dictionary_sample_bytes`]: about 100 times the dictionary.
pub const DICTIONARY_SAMPLE_BYTES: usize = 4 << 20;

impl IngestOptions {
    pub fn new(source: impl Into<String>, category: impl Into<String>) -> IngestOptions {
        IngestOptions {
            source: source.into(),
            category: category.into(),
            rules: Vec::new(),
            format: None,
            formats: Formats::builtin(),
            filters: None,
            strict: false,
            batch_records: 4096,
            max_record_bytes: reader::DEFAULT_MAX_RECORD_BYTES,
            records: None,
            restart_changed: false,
            batch_delay: None,
            keep_text: false,
            dictionary_sample_bytes: DICTIONARY_SAMPLE_BYTES,
            flush_at_end: true,
        }
    }
}

/// Receives progress; the CLI draws a progress bar with it. Every method has a no-op default.
pub trait Observer: Sync {
    fn file_started(&self, _path: &Path, _file_bytes: u64, _resume: Option<Position>) {}
    /// After each committed batch, what it wrote: an index fed by the import builds its
    /// documents from this instead of reading the store again.
    fn batch_stored(&self, _batch: &StoredBatch) {}
    /// After each committed batch: file bytes read so far, counts of this run so far.
    fn batch_committed(&self, _file_bytes_read: u64, _run: &ImportCounts) {}
}

/// What one committed batch wrote, from what the import held in memory.
pub struct StoredBatch<'a> {
    /// The import the batch belongs to, as just written (its checkpoint and counts).
    pub import: &'a ImportRecord,
    /// The store's change-log entries the batch took: one per added example and per
    /// example in `gained_source`.
    pub changes: std::ops::Range<u64>,
    /// The examples the batch added, in ordinal order.
    pub added: Vec<AddedExample<'a>>,
    /// Examples stored by earlier imports that this batch gave a provenance entry (and
    /// so perhaps a new source), sorted, each once.
    pub gained_source: Vec<ContentHash>,
}

/// An example a batch added to the store.
pub struct AddedExample<'a> {
    pub hash: ContentHash,
    pub ordinal: u64,
    pub category: &'a str,
    pub messages: u32,
    pub turns: u32,
    pub chars: u64,
    /// Each message's content, with [`IngestOptions::keep_text`].
    pub texts: Option<Vec<String>>,
}

/// An observer that reports nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// What importing one file did.
#[derive(Clone, Debug)]
pub struct FileOutcome {
    pub path: PathBuf,
    pub import: ImportRecord,
    /// The file had been imported completely before; nothing was done.
    pub already_done: bool,
    /// The import continued from this checkpoint.
    pub resumed_from: Option<Position>,
    /// Counts of this run only (the import's totals are in `import.counts`).
    pub run: ImportCounts,
    /// The first rejects of this run: (line, reason).
    pub first_rejects: Vec<(u64, String)>,
    pub notes: Vec<String>,
    pub elapsed: Duration,
    /// Decompressed bytes read in this run.
    pub bytes: u64,
}

/// What the parser works on: one record, or the rows of a group joined into a JSON list.
struct Unit {
    at: Position,
    /// The record's id in an `id -> record` document (a group's: its first row's).
    id: Option<String>,
    /// Records of the file it covers (including `rejects`).
    rows: u64,
    body: RawBody,
    /// Rows inside the group that could not join it (unreadable, no key): rejected on
    /// their own, committed with the group so a checkpoint never splits it.
    rejects: Vec<RowReject>,
}

struct RowReject {
    at: Position,
    reason: RejectReason,
    raw: Vec<u8>,
}

/// The rows of a group being collected.
struct Pending {
    key: String,
    at: Position,
    id: Option<String>,
    rows: Vec<Vec<u8>>,
    size: usize,
    rejects: Vec<RowReject>,
}

/// A slice of the file handed from the reader thread to the parser.
struct RawBatch {
    items: Vec<Unit>,
    notes: Vec<FileNote>,
    end: Position,
    /// The file's bytes the batch's records (and all before them) were read from; the
    /// whole file in the last batch.
    prefix: FilePrefix,
    file_bytes_read: u64,
    last: bool,
}

struct ParsedBatch {
    items: Vec<Parsed>,
    /// A value dictionary trained from this batch and earlier ones, which its values use.
    dictionary: Option<Arc<Dictionary>>,
    notes: Vec<FileNote>,
    end: Position,
    prefix: FilePrefix,
    file_bytes_read: u64,
    last: bool,
}

struct Parsed {
    at: Position,
    id: Option<String>,
    rows: u64,
    row_rejects: Vec<RowReject>,
    /// Each example of the unit, or why the unit gave none.
    outcome: std::result::Result<Vec<std::result::Result<Encoded, RejectReason>>, RejectReason>,
    /// The unit's bytes, kept only when something of it is rejected.
    raw: Vec<u8>,
}

/// A conversation ready to store, prepared on the parallel stage.
struct Encoded {
    hash: ContentHash,
    /// Set by a category rule; otherwise the import's category.
    category: Option<&'static str>,
    chars: u64,
    turns: u32,
    messages: u32,
    /// The messages' contents, with `IngestOptions::keep_text`.
    texts: Option<Vec<String>>,
    /// The tagged value body: bincode of the conversation and its extras, compressed
    /// with the store's dictionary when it has one.
    bytes: Vec<u8>,
}

const FIRST_REJECTS_KEPT: usize = 10;
const BATCH_BYTES: usize = 8 << 20;

/// Imports one file into the store (or resumes its import, or does nothing if done).
pub fn ingest_file(
    store: &Store,
    path: &Path,
    options: &IngestOptions,
    observer: &dyn Observer,
) -> Result<FileOutcome> {
    let started = Instant::now();
    let io_error = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let fingerprint = reader::fingerprint(path).map_err(io_error)?;
    // Detection finds where a document's records start, so the import's reader does not
    // look for them again.
    let mut records_start = None;
    let reading = match &options.format {
        Some(format) => Reading::One(format.clone()),
        None => detect(path, options, &mut records_start).map_err(|message| match message {
            DetectError::Io(e) => io_error(e),
            DetectError::Shape(message) => Error::Detect {
                path: path.to_owned(),
                message,
            },
        })?,
    };
    let mut counters = store.counters()?;
    // The imports of this source whose sampled fingerprint matches. A finished one whose
    // whole-file hash differs is of other content (an edit the samples missed): this file
    // is then new. An unfinished one is resumed if the bytes it read are still the same
    // (its checkpoint's prefix hash); if they changed, the run stops with
    // `Error::Changed` unless `restart_changed` makes the file a new import.
    let candidates: Vec<ImportRecord> = store
        .imports()?
        .into_iter()
        .filter(|import| import.source == options.source && import.fingerprint == fingerprint)
        .collect();
    let mut file_sha1 = None;
    let mut existing = None;
    let mut hasher = None;
    let mut changed = None;
    for import in candidates {
        match (&import.state, &import.file_sha1, &import.prefix) {
            (ImportState::Done, Some(recorded), _) => {
                if file_sha1.is_none() {
                    file_sha1 = Some(reader::file_sha1(path).map_err(io_error)?);
                }
                if file_sha1.as_ref() == Some(recorded) {
                    existing = Some(import);
                    break;
                }
            }
            (ImportState::Done, None, _) => {
                existing = Some(import);
                break;
            }
            (ImportState::Partial, _, Some(prefix)) => {
                match PrefixHasher::resume(path, prefix).map_err(io_error)? {
                    Some(resumed) => {
                        hasher = Some(resumed);
                        existing = Some(import);
                    }
                    None => changed = Some(import),
                }
            }
            // Begun before checkpoints recorded their prefix: resumed unchecked.
            (ImportState::Partial, _, None) => {
                hasher = None;
                existing = Some(import);
            }
        }
    }
    if let (None, Some(import)) = (&existing, &changed) {
        if !options.restart_changed {
            return Err(Error::Changed {
                path: path.to_owned(),
                import: import.id,
                source_name: import.source.clone(),
                checked: import.prefix.map_or(0, |p| p.bytes),
                imported: import.counts.read,
            });
        }
    }
    let now = unix_now();
    let (mut import, resumed_from) = match existing {
        Some(import) if import.state == ImportState::Done => {
            return Ok(FileOutcome {
                path: path.to_owned(),
                import,
                already_done: true,
                resumed_from: None,
                run: ImportCounts::default(),
                first_rejects: Vec::new(),
                notes: Vec::new(),
                elapsed: started.elapsed(),
                bytes: 0,
            });
        }
        Some(import) => {
            // A resumed import reads the rest of the file as it read the start.
            let format = reading.describe(options.format.is_none());
            if import.format != format {
                return Err(Error::Detect {
                    path: path.to_owned(),
                    message: format!(
                        "its import began as `{}` and is resumed as `{format}`; resume it with the same --format, --mapping or --map",
                        import.format
                    ),
                });
            }
            let at = import.checkpoint;
            (import, Some(at))
        }
        None => {
            let id = counters.next_import_id;
            counters.next_import_id += 1;
            let import = ImportRecord {
                id,
                source: options.source.clone(),
                category: options.category.clone(),
                path: path.display().to_string(),
                fingerprint,
                format: reading.describe(options.format.is_none()),
                state: ImportState::Partial,
                checkpoint: Position::default(),
                container: None,
                counts: ImportCounts::default(),
                started_unix: now,
                updated_unix: now,
                file_sha1: None,
                prefix: None,
            };
            (import, None)
        }
    };
    let resume = import.container.map(|container| Resume {
        at: import.checkpoint,
        container,
    });
    let reader = match (resume, records_start) {
        (None, Some(start)) => RecordReader::open_records_at(path, start, options.max_record_bytes)
            .map_err(io_error)?,
        _ => open_reader(path, resume, options).map_err(io_error)?,
    };
    import.container = Some(reader.container());
    let mut hasher = match hasher {
        Some(hasher) => hasher,
        None => PrefixHasher::new(path).map_err(io_error)?,
    };
    let (_, file_len) = reader.file_progress();
    observer.file_started(path, file_len, resumed_from);
    let start_bytes = import.checkpoint.bytes;

    let mut writer = BatchWriter {
        store,
        options,
        import: &mut import,
        counters: &mut counters,
        run: ImportCounts::default(),
        first_rejects: Vec::new(),
        notes: Vec::new(),
        path,
        known_sha1: file_sha1,
        file_len,
    };
    let reading = &reading;
    let rules = &options.rules;
    let filters = options.filters.as_deref();
    let keep_text = options.keep_text;
    std::thread::scope(|scope| -> Result<()> {
        let (raw_tx, raw_rx) = bounded::<std::io::Result<RawBatch>>(2);
        let (parsed_tx, parsed_rx) = bounded::<std::io::Result<ParsedBatch>>(2);
        let batch_records = options.batch_records.max(1);
        let group_by = reading.group_by().cloned();
        let max_record_bytes = options.max_record_bytes;
        scope.spawn(move || {
            let progress = reader.progress_counter();
            let mut units = Units {
                reader,
                group_by,
                max_bytes: max_record_bytes,
                pending: None,
            };
            loop {
                let mut items = Vec::with_capacity(batch_records);
                let mut bytes = 0;
                let mut last = false;
                while items.len() < batch_records && bytes < BATCH_BYTES {
                    match units.next_unit() {
                        Ok(Some(unit)) => {
                            if let RawBody::Bytes(b) = &unit.body {
                                bytes += b.len();
                            }
                            items.push(unit);
                        }
                        Ok(None) => {
                            last = true;
                            break;
                        }
                        Err(e) => {
                            let _ = raw_tx.send(Err(e));
                            return;
                        }
                    }
                }
                // The bytes read so far, hashed once more (the page cache holds them);
                // to the end of the file with the last batch.
                let covered = if last {
                    units.reader.file_progress().1
                } else {
                    units.reader.covered_bytes()
                };
                if let Err(e) = hasher.extend_to(covered) {
                    let _ = raw_tx.send(Err(e));
                    return;
                }
                let batch = RawBatch {
                    items,
                    notes: units.reader.take_notes(),
                    end: units.resume_position(),
                    prefix: hasher.digest(),
                    file_bytes_read: progress.load(Ordering::Relaxed),
                    last,
                };
                if raw_tx.send(Ok(batch)).is_err() || last {
                    return;
                }
            }
        });
        let sample_bytes = options.dictionary_sample_bytes;
        scope.spawn(move || {
            let mut values = Values {
                coding: store.value_coding(),
                samples: Vec::new(),
                sampled: 0,
                target: sample_bytes,
            };
            for batch in raw_rx {
                let parsed = batch.map(|batch| {
                    let dictionary = values.dictionary();
                    let mut items: Vec<Parsed> = batch
                        .items
                        .into_par_iter()
                        .map(|item| {
                            parse_unit(
                                reading,
                                rules,
                                filters,
                                keep_text,
                                dictionary.as_deref(),
                                item,
                            )
                        })
                        .collect();
                    let dictionary = values.learn(store, &mut items);
                    ParsedBatch {
                        items,
                        dictionary,
                        notes: batch.notes,
                        end: batch.end,
                        prefix: batch.prefix,
                        file_bytes_read: batch.file_bytes_read,
                        last: batch.last,
                    }
                });
                if parsed_tx.send(parsed).is_err() {
                    return;
                }
            }
        });
        for batch in parsed_rx {
            let batch = batch.map_err(io_error)?;
            let last = batch.last;
            let file_bytes_read = batch.file_bytes_read;
            writer.commit(batch, observer)?;
            observer.batch_committed(file_bytes_read, &writer.run);
            if last {
                break;
            }
            if let Some(delay) = options.batch_delay {
                std::thread::sleep(delay);
            }
        }
        Ok(())
    })?;
    let BatchWriter {
        run,
        first_rejects,
        notes,
        ..
    } = writer;
    if options.flush_at_end {
        store.flush()?;
    }
    Ok(FileOutcome {
        path: path.to_owned(),
        bytes: import.checkpoint.bytes - start_bytes,
        import,
        already_done: false,
        resumed_from,
        run,
        first_rejects,
        notes,
        elapsed: started.elapsed(),
    })
}

/// How the parse stage encodes values: with the store's dictionary, or collecting
/// samples to train one.
struct Values {
    coding: ValueCoding,
    /// Sample bodies collected so far (while training).
    samples: Vec<Vec<u8>>,
    sampled: usize,
    target: usize,
}

impl Values {
    fn dictionary(&self) -> Option<Arc<Dictionary>> {
        match &self.coding {
            ValueCoding::Compress(dictionary) => Some(dictionary.clone()),
            _ => None,
        }
    }

    /// While the store has no dictionary: takes samples from a parsed batch and, once
    /// there are enough, trains one and compresses the batch with it (returned, to be
    /// stored with the batch).
    fn learn(&mut self, store: &Store, items: &mut [Parsed]) -> Option<Arc<Dictionary>> {
        if !matches!(self.coding, ValueCoding::Train) {
            return None;
        }
        for encoded in items.iter().flat_map(encoded_of) {
            if self.sampled >= self.target {
                break;
            }
            self.sampled += encoded.bytes.len();
            self.samples.push(encoded.bytes.clone());
        }
        if self.sampled < self.target {
            return None;
        }
        let samples: Vec<&[u8]> = self.samples.iter().map(Vec::as_slice).collect();
        let trained = store.train_dictionary(&samples);
        self.samples = Vec::new();
        let Some(dictionary) = trained else {
            // zstd found nothing to learn: this import stores its values as they are.
            self.coding = ValueCoding::Raw;
            return None;
        };
        items.par_iter_mut().for_each(|item| {
            if let Ok(list) = &mut item.outcome {
                for encoded in list.iter_mut().flatten() {
                    if let Some(packed) = store::compress_value(&encoded.bytes, &dictionary) {
                        encoded.bytes = packed;
                    }
                }
            }
        });
        self.coding = ValueCoding::Compress(dictionary.clone());
        Some(dictionary)
    }
}

/// The examples a parsed unit gave.
fn encoded_of(item: &Parsed) -> impl Iterator<Item = &Encoded> {
    item.outcome.iter().flatten().flatten()
}

/// How a file's records are parsed.
enum Reading {
    One(Format),
    /// Records of different shapes: each is detected on its own.
    PerRecord(Formats),
}

impl Reading {
    fn group_by(&self) -> Option<&crate::formats::template::JsonPath> {
        match self {
            Reading::One(format) => format.group_by(),
            Reading::PerRecord(_) => None,
        }
    }

    fn parse(&self, bytes: &[u8]) -> Outcome {
        match self {
            Reading::One(format) => format.parse(bytes),
            Reading::PerRecord(formats) => formats.parse_detected(bytes),
        }
    }

    /// The format as the import record shows it.
    fn describe(&self, detected: bool) -> String {
        match (self, detected) {
            (Reading::One(format), false) => format.name().to_string(),
            (Reading::One(format), true) => format!("auto: {}", format.name()),
            (Reading::PerRecord(_), _) => "auto: per record".to_string(),
        }
    }
}

enum DetectError {
    Io(std::io::Error),
    Shape(String),
}

/// Records sampled from the start of a file to detect its format. Always the start, so a
/// resumed import decides the same way.
const DETECT_SAMPLE: usize = 64;

fn detect(
    path: &Path,
    options: &IngestOptions,
    records_start: &mut Option<Resume>,
) -> std::result::Result<Reading, DetectError> {
    let mut reader = open_reader(path, None, options).map_err(DetectError::Io)?;
    *records_start = reader.records_start();
    let mut sample = Vec::new();
    while sample.len() < DETECT_SAMPLE {
        match reader.next_item().map_err(DetectError::Io)? {
            Some(RawItem {
                body: RawBody::Bytes(bytes),
                ..
            }) => sample.push(bytes),
            Some(_) => {}
            None => break,
        }
    }
    if sample.is_empty() {
        // Nothing readable: the import records the file's notes and rejects.
        return Ok(Reading::PerRecord(options.formats.clone()));
    }
    match options
        .formats
        .detect_sample(sample.iter().map(Vec::as_slice))
    {
        Ok(Detected::One(format)) => Ok(Reading::One(format)),
        Ok(Detected::PerRecord) => Ok(Reading::PerRecord(options.formats.clone())),
        Err(message) => Err(DetectError::Shape(format!(
            "cannot detect the format from the first records: {message}"
        ))),
    }
}

/// Records as the parser takes them: one by one, or, for row formats, consecutive rows
/// with the same key joined into one JSON list.
struct Units {
    reader: RecordReader,
    group_by: Option<crate::formats::template::JsonPath>,
    max_bytes: usize,
    /// The group being collected.
    pending: Option<Pending>,
}

impl Units {
    fn next_unit(&mut self) -> std::io::Result<Option<Unit>> {
        let Some(group_by) = &self.group_by else {
            return Ok(self.reader.next_item()?.map(|item| Unit {
                at: item.at,
                id: item.id,
                rows: 1,
                body: item.body,
                rejects: Vec::new(),
            }));
        };
        loop {
            let Some(item) = self.reader.next_item()? else {
                return Ok(self.pending.take().map(joined));
            };
            let key = match &item.body {
                RawBody::Bytes(bytes) => group_key(group_by, bytes),
                RawBody::Unreadable { reason, .. } => Err(reason.clone()),
            };
            let key = match key {
                Ok(key) => key,
                Err(reason) => {
                    let raw = match item.body {
                        RawBody::Bytes(bytes) | RawBody::Unreadable { prefix: bytes, .. } => bytes,
                    };
                    let reject = RowReject {
                        at: item.at,
                        reason: with_id(reason, item.id.as_deref()),
                        raw,
                    };
                    // Inside a group the row is rejected with the group; the group goes
                    // on, so one bad row does not split a conversation in two.
                    match &mut self.pending {
                        Some(pending) => {
                            pending.rejects.push(reject);
                            continue;
                        }
                        None => {
                            return Ok(Some(Unit {
                                at: reject.at,
                                id: item.id,
                                rows: 1,
                                body: RawBody::Unreadable {
                                    reason: reject.reason,
                                    prefix: reject.raw,
                                },
                                rejects: Vec::new(),
                            }))
                        }
                    }
                }
            };
            let RawBody::Bytes(bytes) = item.body else {
                unreachable!("unreadable rows were handled above")
            };
            match &mut self.pending {
                Some(pending)
                    if pending.key == key && pending.size + bytes.len() < self.max_bytes =>
                {
                    pending.size += bytes.len() + 1;
                    pending.rows.push(bytes);
                }
                _ => {
                    let size = bytes.len() + 2;
                    let done = self.pending.replace(Pending {
                        key,
                        at: item.at,
                        id: item.id,
                        rows: vec![bytes],
                        size,
                        rejects: Vec::new(),
                    });
                    if let Some(group) = done {
                        return Ok(Some(joined(group)));
                    }
                }
            }
        }
    }

    /// Where a resumed import starts: the first row of the group still being collected,
    /// else just after the last record read.
    fn resume_position(&self) -> Position {
        match &self.pending {
            Some(pending) => pending.at,
            None => self.reader.position(),
        }
    }
}

fn group_key(
    group_by: &crate::formats::template::JsonPath,
    bytes: &[u8],
) -> std::result::Result<String, RejectReason> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        RejectReason::new(RejectKind::MalformedJson, format!("malformed JSON: {e}"))
    })?;
    group_by
        .resolve(&value)
        .map(crate::conversation::canonical_json)
        .ok_or_else(|| {
            RejectReason::missing_field(
                group_by.as_str(),
                format!(
                    "row lacks the field `{}` that groups rows",
                    group_by.as_str()
                ),
            )
        })
}

fn joined(group: Pending) -> Unit {
    let mut body = Vec::with_capacity(group.size);
    body.push(b'[');
    for (i, row) in group.rows.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(row);
    }
    body.push(b']');
    Unit {
        at: group.at,
        id: group.id,
        rows: (group.rows.len() + group.rejects.len()) as u64,
        body: RawBody::Bytes(body),
        rejects: group.rejects,
    }
}

fn parse_unit(
    reading: &Reading,
    rules: &[Rule],
    filters: Option<&crate::filters::Filters>,
    keep_text: bool,
    dictionary: Option<&Dictionary>,
    unit: Unit,
) -> Parsed {
    let (outcome, raw) = match unit.body {
        RawBody::Bytes(bytes) => {
            let outcome = reading.parse(&bytes).and_then(|examples| {
                if examples.is_empty() {
                    return Err("the record gives no conversation".to_string().into());
                }
                Ok(examples
                    .into_iter()
                    .map(|example| {
                        let example = example.and_then(|example| {
                            match filters.and_then(|f| f.first_failure(&example.conversation)) {
                                Some(failure) => {
                                    Err(RejectReason::filter(&failure.filter, failure.reason()))
                                }
                                None => Ok(example),
                            }
                        });
                        example.map(|example| Encoded {
                            hash: example.conversation.content_hash(),
                            category: category::assign(rules, &example.conversation),
                            chars: example.conversation.char_count(),
                            turns: example.conversation.turn_count(),
                            messages: example.conversation.messages.len() as u32,
                            texts: keep_text.then(|| {
                                example
                                    .conversation
                                    .messages
                                    .iter()
                                    .map(|m| m.content.clone())
                                    .collect()
                            }),
                            bytes: {
                                let body = store::encode_conversation(
                                    &example.conversation,
                                    &example.extras,
                                );
                                dictionary
                                    .and_then(|d| store::compress_value(&body, d))
                                    .unwrap_or(body)
                            },
                        })
                    })
                    .collect::<Vec<_>>())
            });
            let rejects = match &outcome {
                Ok(list) => list.iter().any(|e| e.is_err()),
                Err(_) => true,
            };
            (outcome, if rejects { bytes } else { Vec::new() })
        }
        RawBody::Unreadable { reason, prefix } => (Err(reason), prefix),
    };
    Parsed {
        at: unit.at,
        id: unit.id,
        rows: unit.rows,
        row_rejects: unit.rejects,
        outcome,
        raw,
    }
}

/// Turns parsed batches into atomic store writes, keeping the import's and store's counts.
struct BatchWriter<'a> {
    store: &'a Store,
    options: &'a IngestOptions,
    import: &'a mut ImportRecord,
    counters: &'a mut Counters,
    run: ImportCounts,
    first_rejects: Vec<(u64, String)>,
    notes: Vec<String>,
    path: &'a Path,
    /// The file's SHA-1 when a re-run already computed it.
    known_sha1: Option<String>,
    /// The file's length when its reading began.
    file_len: u64,
}

impl BatchWriter<'_> {
    fn commit(&mut self, batch: ParsedBatch, observer: &dyn Observer) -> Result<()> {
        if self.options.strict {
            for item in &batch.items {
                // A bad row inside a group comes first in the file.
                let bad = item
                    .row_rejects
                    .first()
                    .map(|r| (r.at, r.reason.clone()))
                    .or(match &item.outcome {
                        Err(reason) => Some((item.at, reason.clone())),
                        Ok(list) => list
                            .iter()
                            .find_map(|e| e.as_ref().err())
                            .map(|reason| (item.at, reason.clone())),
                    }
                    .map(|(at, reason)| (at, with_id(reason, item.id.as_deref()))));
                if let Some((at, reason)) = bad {
                    return Err(Error::Strict {
                        path: self.path.to_owned(),
                        line: at.line(),
                        record: at.records,
                        reason: reason.to_string(),
                    });
                }
            }
        }
        let hashes: Vec<ContentHash> = batch
            .items
            .iter()
            .filter_map(|p| p.outcome.as_ref().ok())
            .flatten()
            .filter_map(|e| e.as_ref().ok().map(|e| e.hash))
            .collect();
        let mut stored_by = self.store.first_imports(&hashes)?.into_iter();
        let mut new_in_batch: HashSet<ContentHash> = HashSet::with_capacity(hashes.len());
        let mut counts = ImportCounts::default();
        let import_id = self.import.id;
        let first_change = self.counters.changes;
        // Borrowed by `added` while the import record is updated.
        let import_category = self.import.category.clone();
        let mut added = Vec::new();
        let mut gained_source = Vec::new();
        let mut write = self.store.import_batch(self.counters, import_id);
        if let Some(dictionary) = batch.dictionary {
            write.add_dictionary(dictionary);
        }
        for item in batch.items {
            counts.read += item.rows;
            counts.joined += item.rows - 1 - item.row_rejects.len() as u64;
            for row in item.row_rejects {
                counts.rejected += 1;
                if self.first_rejects.len() < FIRST_REJECTS_KEPT {
                    self.first_rejects
                        .push((row.at.line(), row.reason.message.clone()));
                }
                let mut raw = row.raw;
                let raw_truncated = raw.len() > Reject::RAW_LIMIT;
                raw.truncate(Reject::RAW_LIMIT);
                write.add_reject(reject_of(
                    self.import,
                    Some(row.at.records),
                    row.at,
                    row.reason,
                    raw,
                    raw_truncated,
                ));
            }
            let examples = match item.outcome {
                Ok(examples) => examples,
                Err(reason) => vec![Err(reason)],
            };
            counts.extra += examples.len() as u64 - 1;
            let several = examples.len() > 1;
            let mut raw = Some(item.raw);
            for (part, example) in examples.into_iter().enumerate() {
                match example {
                    Ok(encoded) => {
                        let hash = encoded.hash;
                        let stored_by_import = stored_by.next().flatten();
                        let seen = stored_by_import.is_some() || !new_in_batch.insert(hash);
                        if seen {
                            counts.duplicates += 1;
                            // The index learns of duplicates that may add a source; a
                            // repeat within the import that stored it changes nothing.
                            if stored_by_import.is_some_and(|first| first != import_id) {
                                write.add_change(hash);
                                gained_source.push(hash);
                            }
                        } else {
                            counts.stored += 1;
                            let category = encoded.category.unwrap_or(&self.import.category);
                            let ordinal = write.add_example(
                                hash,
                                category,
                                encoded.chars,
                                encoded.turns,
                                encoded.bytes,
                            );
                            added.push(AddedExample {
                                hash,
                                ordinal,
                                category: encoded.category.unwrap_or(&import_category),
                                messages: encoded.messages,
                                turns: encoded.turns,
                                chars: encoded.chars,
                                texts: encoded.texts,
                            });
                        }
                        write.add_provenance(
                            hash,
                            item.at.records,
                            item.at.line(),
                            item.id.clone(),
                        );
                    }
                    Err(reason) => {
                        counts.rejected += 1;
                        let reason = if several {
                            reason.prefixed(&format!("conversation {}: ", part + 1))
                        } else {
                            reason
                        };
                        let reason = with_id(reason, item.id.as_deref());
                        if self.first_rejects.len() < FIRST_REJECTS_KEPT {
                            self.first_rejects
                                .push((item.at.line(), reason.message.clone()));
                        }
                        // The record's bytes are kept once, with its first reject.
                        let mut raw = raw.take().unwrap_or_default();
                        let raw_truncated = raw.len() > Reject::RAW_LIMIT;
                        raw.truncate(Reject::RAW_LIMIT);
                        let mut reject = reject_of(
                            self.import,
                            Some(item.at.records),
                            item.at,
                            reason,
                            raw,
                            raw_truncated,
                        );
                        reject.part = part as u32;
                        write.add_reject(reject);
                    }
                }
            }
        }
        for note in batch.notes {
            self.notes
                .push(format!("line {}: {}", note.at.line(), note.message));
            write.add_reject(reject_of(
                self.import,
                None,
                note.at,
                RejectReason::new(RejectKind::FileNote, note.message),
                Vec::new(),
                false,
            ));
        }
        self.import.checkpoint = batch.end;
        self.import.prefix = Some(batch.prefix);
        self.import.updated_unix = unix_now();
        if batch.last {
            self.import.state = ImportState::Done;
            // The whole file's hash, for re-runs to compare, in the same write as `Done`:
            // the last batch's prefix is the whole file.
            let hash = match self.known_sha1.take() {
                Some(hash) => hash,
                None if batch.prefix.bytes == self.file_len => batch.prefix.sha1_hex(),
                None => reader::file_sha1(self.path).map_err(|source| Error::Io {
                    path: self.path.to_owned(),
                    source,
                })?,
            };
            self.import.file_sha1 = Some(hash);
        }
        write.commit(self.import, &counts)?;
        self.run.add(&counts);
        gained_source.sort_unstable();
        gained_source.dedup();
        observer.batch_stored(&StoredBatch {
            import: self.import,
            changes: first_change..self.counters.changes,
            added,
            gained_source,
        });
        Ok(())
    }
}

/// `reason`, naming the record's id when it has one (`id `a17`: ...`).
fn with_id(reason: RejectReason, id: Option<&str>) -> RejectReason {
    match id {
        Some(id) => reason.prefixed(&format!("id `{id}`: ")),
        None => reason,
    }
}

/// A reject of `import`'s record `record` (or a note about its file when `None`) at `at`.
fn reject_of(
    import: &ImportRecord,
    record: Option<u64>,
    at: Position,
    reason: RejectReason,
    raw: Vec<u8>,
    raw_truncated: bool,
) -> Reject {
    Reject {
        import_id: import.id,
        source: import.source.clone(),
        path: import.path.clone(),
        record,
        part: 0,
        line: at.line(),
        byte_offset: at.bytes,
        reason: reason.message,
        raw,
        raw_truncated,
        kind: reason.kind,
        subject: reason.subject,
    }
}

fn open_reader(
    path: &Path,
    resume: Option<reader::Resume>,
    options: &IngestOptions,
) -> std::io::Result<RecordReader> {
    match &options.records {
        Some(at) => RecordReader::open_document(path, resume, options.max_record_bytes, at),
        None => RecordReader::open(path, resume, options.max_record_bytes),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
