//! The ingest pipeline: file -> records -> conversations -> dedup -> atomic batches.
//!
//! ```text
//! reader thread      parse thread (rayon)          calling thread
//! RecordReader  -->  parse, normalise, hash  -->   dedup against the store, then one
//!   (batches)          (order kept)                 WriteBatch: examples, ordinals,
//!                                                   provenance, rejects, checkpoint, counters
//! ```
//!
//! An import is identified by source name + file fingerprint. Its checkpoint (the reader
//! position after the last committed record) is written in the same batch as the data, so
//! a killed import resumes exactly where the store stands, and a finished import is a
//! no-op when run again. Every record read ends up stored, a duplicate, or rejected.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::bounded;
use rayon::prelude::*;

use crate::conversation::ContentHash;
use crate::formats::{self, Format};
use crate::reader::{self, FileNote, Position, RawBody, RawItem, RecordReader, Resume};
use crate::store::{
    self, Counters, ExampleHeader, ImportCounts, ImportRecord, ImportState, ProvenanceValue,
    Reject, Store,
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
    pub format: Format,
    /// Stop at the first bad record instead of recording it and going on.
    pub strict: bool,
    /// Records per atomic batch (and per checkpoint).
    pub batch_records: usize,
    pub max_record_bytes: usize,
    /// Pause after each committed batch (a test hook to make kills land mid-import).
    pub batch_delay: Option<Duration>,
}

impl IngestOptions {
    pub fn new(source: impl Into<String>, category: impl Into<String>) -> IngestOptions {
        IngestOptions {
            source: source.into(),
            category: category.into(),
            format: Format::Auto,
            strict: false,
            batch_records: 4096,
            max_record_bytes: reader::DEFAULT_MAX_RECORD_BYTES,
            batch_delay: None,
        }
    }
}

/// Receives progress; the CLI draws a progress bar with it. Every method has a no-op default.
pub trait Observer: Sync {
    fn file_started(&self, _path: &Path, _file_bytes: u64, _resume: Option<Position>) {}
    /// After each committed batch: file bytes read so far, counts of this run so far.
    fn batch_committed(&self, _file_bytes_read: u64, _run: &ImportCounts) {}
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

/// A slice of the file handed from the reader thread to the parser.
struct RawBatch {
    items: Vec<RawItem>,
    notes: Vec<FileNote>,
    end: Position,
    file_bytes_read: u64,
    last: bool,
}

struct ParsedBatch {
    items: Vec<Parsed>,
    notes: Vec<FileNote>,
    end: Position,
    file_bytes_read: u64,
    last: bool,
}

struct Parsed {
    at: Position,
    outcome: std::result::Result<Encoded, (String, Vec<u8>)>,
}

/// A conversation ready to store, prepared on the parallel stage.
struct Encoded {
    hash: ContentHash,
    chars: u64,
    turns: u32,
    /// bincode of the conversation.
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
    let mut counters = store.counters()?;
    let existing = store
        .imports()?
        .into_iter()
        .find(|import| import.source == options.source && import.fingerprint == fingerprint);
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
                format: options.format.name().to_string(),
                state: ImportState::Partial,
                checkpoint: Position::default(),
                container: None,
                counts: ImportCounts::default(),
                started_unix: now,
                updated_unix: now,
            };
            (import, None)
        }
    };
    let resume = import.container.map(|container| Resume {
        at: import.checkpoint,
        container,
    });
    let mut reader =
        RecordReader::open(path, resume, options.max_record_bytes).map_err(io_error)?;
    import.container = Some(reader.container());
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
    };
    let format = options.format;
    std::thread::scope(|scope| -> Result<()> {
        let (raw_tx, raw_rx) = bounded::<std::io::Result<RawBatch>>(2);
        let (parsed_tx, parsed_rx) = bounded::<std::io::Result<ParsedBatch>>(2);
        let batch_records = options.batch_records.max(1);
        scope.spawn(move || {
            let progress = reader.progress_counter();
            loop {
                let mut items = Vec::with_capacity(batch_records);
                let mut bytes = 0;
                let mut last = false;
                while items.len() < batch_records && bytes < BATCH_BYTES {
                    match reader.next_item() {
                        Ok(Some(item)) => {
                            if let RawBody::Bytes(b) = &item.body {
                                bytes += b.len();
                            }
                            items.push(item);
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
                let batch = RawBatch {
                    items,
                    notes: reader.take_notes(),
                    end: reader.position(),
                    file_bytes_read: progress.load(Ordering::Relaxed),
                    last,
                };
                if raw_tx.send(Ok(batch)).is_err() || last {
                    return;
                }
            }
        });
        scope.spawn(move || {
            for batch in raw_rx {
                let parsed = batch.map(|batch| ParsedBatch {
                    items: batch
                        .items
                        .into_par_iter()
                        .map(|item| parse_item(format, item))
                        .collect(),
                    notes: batch.notes,
                    end: batch.end,
                    file_bytes_read: batch.file_bytes_read,
                    last: batch.last,
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
            writer.commit(batch)?;
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
    store.flush()?;
    let BatchWriter {
        run,
        first_rejects,
        notes,
        ..
    } = writer;
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

fn parse_item(format: Format, item: RawItem) -> Parsed {
    let outcome = match item.body {
        RawBody::Bytes(bytes) => match formats::parse_record(format, &bytes) {
            Ok(conversation) => Ok(Encoded {
                hash: conversation.content_hash(),
                chars: conversation.char_count(),
                turns: conversation.turn_count(),
                bytes: store::encode_conversation(&conversation),
            }),
            Err(reason) => Err((reason, bytes)),
        },
        RawBody::Unreadable { reason, prefix } => Err((reason, prefix)),
    };
    Parsed {
        at: item.at,
        outcome,
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
}

impl BatchWriter<'_> {
    fn commit(&mut self, batch: ParsedBatch) -> Result<()> {
        if self.options.strict {
            if let Some(bad) = batch.items.iter().find(|p| p.outcome.is_err()) {
                let reason = bad
                    .outcome
                    .as_ref()
                    .err()
                    .map(|(r, _)| r.clone())
                    .unwrap_or_default();
                return Err(Error::Strict {
                    path: self.path.to_owned(),
                    line: bad.at.line(),
                    record: bad.at.records,
                    reason,
                });
            }
        }
        let hashes: Vec<ContentHash> = batch
            .items
            .iter()
            .filter_map(|p| p.outcome.as_ref().ok().map(|e| e.hash))
            .collect();
        let mut stored_by = self.store.first_imports(&hashes)?.into_iter();
        let mut new_in_batch: HashSet<ContentHash> = HashSet::with_capacity(hashes.len());
        let mut counts = ImportCounts::default();
        let mut write = self.store.batch();
        let import_id = self.import.id;
        // Keys go into the memtable in sorted order: consecutive skiplist inserts then
        // share most of their search path (measured in BENCHMARKS.md).
        let mut new_examples = Vec::new();
        let mut provenance = Vec::with_capacity(batch.items.len());
        let mut changed = Vec::new();
        for item in batch.items {
            counts.read += 1;
            match item.outcome {
                Ok(encoded) => {
                    let hash = encoded.hash;
                    let stored_by_import = stored_by.next().flatten();
                    let seen = stored_by_import.is_some() || !new_in_batch.insert(hash);
                    // The index learns of new examples and of duplicates that may add a
                    // source; a repeat within the import that stored it changes nothing.
                    if !seen || stored_by_import.is_some_and(|first| first != import_id) {
                        changed.push(hash);
                    }
                    if seen {
                        counts.duplicates += 1;
                    } else {
                        counts.stored += 1;
                        new_examples.push((self.counters.examples, encoded));
                        self.counters.examples += 1;
                    }
                    provenance.push((hash, item.at.records, item.at.line()));
                }
                Err((reason, mut raw)) => {
                    counts.rejected += 1;
                    if self.first_rejects.len() < FIRST_REJECTS_KEPT {
                        self.first_rejects.push((item.at.line(), reason.clone()));
                    }
                    let raw_truncated = raw.len() > Reject::RAW_LIMIT;
                    raw.truncate(Reject::RAW_LIMIT);
                    write.put_reject(&self.reject(
                        Some(item.at.records),
                        item.at,
                        reason,
                        raw,
                        raw_truncated,
                    ));
                }
            }
        }
        new_examples.sort_unstable_by_key(|(_, encoded)| encoded.hash);
        for (ordinal, encoded) in &new_examples {
            let header = ExampleHeader {
                ordinal: *ordinal,
                category: &self.import.category,
                first_import: import_id,
                chars: encoded.chars,
                turns: encoded.turns,
            };
            write.put_example(&encoded.hash, &header, &encoded.bytes);
        }
        provenance.sort_unstable();
        changed.sort_unstable();
        changed.dedup();
        for hash in &changed {
            write.put_change(self.counters.changes, hash);
            self.counters.changes += 1;
        }
        for (hash, record, line) in provenance {
            write.put_provenance(&hash, import_id, record, &ProvenanceValue { line });
        }
        for note in batch.notes {
            self.notes
                .push(format!("line {}: {}", note.at.line(), note.message));
            write.put_reject(&self.reject(None, note.at, note.message, Vec::new(), false));
        }
        if counts.stored > 0 {
            *self
                .counters
                .categories
                .entry(self.import.category.clone())
                .or_default() += counts.stored;
        }
        if counts.stored + counts.duplicates > 0 {
            *self
                .counters
                .sources
                .entry(self.import.source.clone())
                .or_default() += counts.stored + counts.duplicates;
        }
        self.counters.read += counts.read;
        self.counters.duplicates += counts.duplicates;
        self.counters.rejected += counts.rejected;
        self.import.counts.add(&counts);
        self.import.checkpoint = batch.end;
        self.import.updated_unix = unix_now();
        if batch.last {
            self.import.state = ImportState::Done;
        }
        write.put_import(self.import);
        write.put_counters(self.counters);
        self.store.write(write)?;
        self.run.add(&counts);
        Ok(())
    }

    fn reject(
        &self,
        record: Option<u64>,
        at: Position,
        reason: String,
        raw: Vec<u8>,
        raw_truncated: bool,
    ) -> Reject {
        Reject {
            import_id: self.import.id,
            source: self.import.source.clone(),
            path: self.import.path.clone(),
            record,
            line: at.line(),
            byte_offset: at.bytes,
            reason,
            raw,
            raw_truncated,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
