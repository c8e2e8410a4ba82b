//! Records out of files: decompression, then JSONL lines or JSON array elements.
//!
//! The reader yields the raw bytes of each record with its position (record index, line,
//! byte offset in the decompressed stream); it never parses records, so it can resume at
//! any committed [`Position`] and skip oversized or truncated records without holding them
//! in memory. Containers: JSONL, a JSON array of records and a JSON object document that
//! holds them (a list under a key, or an `id -> record` object), all streamed, each
//! optionally gzip- or zstd-compressed, and Parquet (rows streamed by row group and handed
//! on as JSON records); all detected by magic bytes and first bytes, not by extension.
//!
//! [`PrefixHasher`] hashes the file's bytes as far as the reader has consumed them, so an
//! import's checkpoint can record what the records before it were read from.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::reject::{RejectKind, RejectReason};
use sha1::{Digest, Sha1};

/// Records larger than this are rejected (and skipped without buffering) by default.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 16 << 20;

/// Where a record starts, or where reading resumes after a committed record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Records consumed before this point (the 0-based index of the next record).
    pub records: u64,
    /// Newlines consumed before this point (the 1-based line is `lines + 1`).
    pub lines: u64,
    /// Bytes of the decompressed stream consumed before this point.
    pub bytes: u64,
}

impl Position {
    pub fn line(&self) -> u64 {
        self.lines + 1
    }
}

/// Where and how to continue reading a file that was partly read before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub at: Position,
    pub container: Container,
}

/// One record as it appears in the file.
#[derive(Debug)]
pub struct RawItem {
    /// Where the record starts; `at.records` is its 0-based index.
    pub at: Position,
    pub body: RawBody,
    /// The record's key in an `id -> record` document (metadata: never hashed).
    pub id: Option<String>,
}

/// The longest record id kept (bytes); longer ids are cut at a character boundary.
pub const MAX_ID_BYTES: usize = 1024;

#[derive(Debug)]
pub enum RawBody {
    /// The record's bytes (without the line terminator or array separators).
    Bytes(Vec<u8>),
    /// The record cannot be read as a unit; `prefix` keeps its first bytes.
    Unreadable {
        reason: RejectReason,
        prefix: Vec<u8>,
    },
}

/// A problem with the file as a whole rather than one record (empty file, array never
/// closed). Reported and kept in the ledger, but not counted as a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileNote {
    pub at: Position,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Container {
    Jsonl,
    JsonArray,
    /// Apache Parquet: each row becomes a JSON record (nested lists and structs included).
    Parquet,
    /// A JSON object document as imports begun before documents were streamed read it:
    /// whole (up to [`MAX_DOCUMENT_BYTES`]), positions counting records. Only such an
    /// import's resume reads a file this way.
    Document,
    /// A JSON object document whose records are a list (`{"data": [...]}`, or under the
    /// `--records` path), streamed element by element like a JSON array; positions are
    /// bytes and lines of the stream, so resuming seeks.
    DocumentList,
    /// A JSON object document whose records are the values of an `id -> record` object
    /// (the document itself, or the object under a key), streamed member by member; each
    /// record keeps its id.
    DocumentById,
}

impl Container {
    /// Records inside a JSON object document (streamed).
    fn in_document(self) -> bool {
        matches!(self, Container::DocumentList | Container::DocumentById)
    }
}

/// The largest JSON object document read whole ([`Container::Document`] resumes only).
pub const MAX_DOCUMENT_BYTES: u64 = 2 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Identifies a file's content cheaply: SHA-1 over its length, its first and last MiB and
/// 16 evenly spaced 64 KiB blocks between them. An import is keyed by (source name,
/// fingerprint), so renaming a file does not re-import it and changing its content does.
pub fn fingerprint(path: &Path) -> io::Result<String> {
    const EDGE: u64 = 1 << 20;
    const BLOCK: u64 = 64 << 10;
    const BLOCKS: u64 = 16;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = Sha1::new();
    hasher.update(len.to_le_bytes());
    let mut spans = vec![(0, EDGE.min(len))];
    if len > 2 * EDGE {
        let inner = len - 2 * EDGE;
        spans.extend((0..BLOCKS).map(|i| (EDGE + inner * i / BLOCKS, BLOCK.min(inner))));
    }
    if len > EDGE {
        let tail = EDGE.min(len - EDGE);
        spans.push((len - tail, tail));
    }
    let mut buf = vec![0u8; EDGE as usize];
    for (offset, size) in spans {
        file.seek(SeekFrom::Start(offset))?;
        let n = read_up_to(&mut file, &mut buf[..size as usize])?;
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// SHA-1 of the whole file as it is on disk (compressed files as compressed), hex.
pub fn file_sha1(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha1::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The SHA-1 of a file's first `bytes` bytes as they are on disk: what an import's
/// records up to its checkpoint were read from (compressed files as compressed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePrefix {
    pub bytes: u64,
    pub sha1: [u8; 20],
}

impl FilePrefix {
    pub fn sha1_hex(&self) -> String {
        hex::encode(self.sha1)
    }
}

/// Hashes a file from its start as far as asked, reading each byte once: an import
/// extends it to what its reader has consumed at each checkpoint and records the
/// [`FilePrefix`]; extended to the end it is the whole file's SHA-1 ([`file_sha1`]).
pub struct PrefixHasher {
    file: File,
    hasher: Sha1,
    hashed: u64,
}

impl PrefixHasher {
    pub fn new(path: &Path) -> io::Result<PrefixHasher> {
        Ok(PrefixHasher {
            file: File::open(path)?,
            hasher: Sha1::new(),
            hashed: 0,
        })
    }

    /// Hashes the file's first `recorded.bytes` bytes and compares them with `recorded`:
    /// the hasher, positioned after them, when they are the same; `None` when they
    /// differ (or the file is shorter now).
    pub fn resume(path: &Path, recorded: &FilePrefix) -> io::Result<Option<PrefixHasher>> {
        let mut hasher = PrefixHasher::new(path)?;
        hasher.extend_to(recorded.bytes)?;
        Ok((hasher.digest() == *recorded).then_some(hasher))
    }

    /// Hashes on to byte `end` (or the end of the file, if sooner); nothing when `end` is
    /// behind what is hashed.
    pub fn extend_to(&mut self, end: u64) -> io::Result<()> {
        let mut buf = vec![0u8; (1 << 20).min(end.saturating_sub(self.hashed)) as usize];
        while self.hashed < end {
            let want = ((end - self.hashed) as usize).min(buf.len());
            let n = self.file.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            self.hasher.update(&buf[..n]);
            self.hashed += n as u64;
        }
        Ok(())
    }

    /// The hash of the bytes hashed so far.
    pub fn digest(&self) -> FilePrefix {
        FilePrefix {
            bytes: self.hashed,
            sha1: self.hasher.clone().finalize().into(),
        }
    }
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Counts bytes read from the underlying (possibly compressed) file, for progress.
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The decompressed stream of `file` from raw byte `seek_to`, and a counter of the raw
/// bytes read (starting at `seek_to`).
fn decoded_input(
    mut file: File,
    compression: Compression,
    seek_to: u64,
) -> io::Result<(Box<dyn BufRead + Send>, Arc<AtomicU64>)> {
    file.seek(SeekFrom::Start(seek_to))?;
    let counter = Arc::new(AtomicU64::new(seek_to));
    let counted = CountingReader {
        inner: file,
        count: counter.clone(),
    };
    const BUF: usize = 256 << 10;
    let input: Box<dyn BufRead + Send> = match compression {
        Compression::None => Box::new(BufReader::with_capacity(BUF, counted)),
        Compression::Gzip => Box::new(BufReader::with_capacity(
            BUF,
            flate2::read::MultiGzDecoder::new(BufReader::with_capacity(BUF, counted)),
        )),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            BUF,
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(BUF, counted))?,
        )),
    };
    Ok((input, counter))
}

/// Streams the records of one file.
pub struct RecordReader {
    path: PathBuf,
    input: Box<dyn BufRead + Send>,
    container: Container,
    compression: Compression,
    pos: Position,
    max_record_bytes: usize,
    array: ArrayState,
    file_bytes_read: Arc<AtomicU64>,
    file_len: u64,
    notes: Vec<FileNote>,
    finished: bool,
    /// Rows of a Parquet file, streamed row group by row group.
    rows: Option<ParquetRows>,
    /// The records of a JSON object document, in order.
    document: Option<std::vec::IntoIter<Vec<u8>>>,
    /// Where a document's records are (`--records`); found by their shape without it.
    records: Option<String>,
    /// Where a streamed document's records start.
    records_start: Option<Position>,
}

struct ParquetRows {
    rows: parquet::record::reader::RowIter<'static>,
    total: u64,
    /// Per row group: rows up to its end, and the file's bytes up to the end of its data
    /// (and of every group before it).
    group_ends: Vec<(u64, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArrayState {
    /// Before the opening `[`.
    Start,
    /// After `[`: a record or `]` comes next.
    First,
    /// After a record: `,` or `]` comes next.
    AfterRecord,
    /// After `]`.
    Closed,
}

impl RecordReader {
    /// Opens `path` at its beginning (`resume` = `None`) or at a point returned by
    /// [`RecordReader::resume_point`] of an earlier reader of the same file.
    pub fn open(
        path: &Path,
        resume: Option<Resume>,
        max_record_bytes: usize,
    ) -> io::Result<RecordReader> {
        RecordReader::open_as(path, resume, max_record_bytes, true, None)
    }

    /// [`RecordReader::open`] for a JSON object document whose records are at `records`:
    /// a dotted path (`data`, `problems.train`) or a JSON pointer (`/data/0/items`) to a
    /// list of records or an `id -> record` object.
    pub fn open_document(
        path: &Path,
        resume: Option<Resume>,
        max_record_bytes: usize,
        records: &str,
    ) -> io::Result<RecordReader> {
        RecordReader::open_as(path, resume, max_record_bytes, true, Some(records))
    }

    /// A reader at the start of a document's records, as [`RecordReader::records_start`]
    /// of an earlier reader of the same file found it: no second pass over the
    /// document's structure.
    pub fn open_records_at(
        path: &Path,
        start: Resume,
        max_record_bytes: usize,
    ) -> io::Result<RecordReader> {
        let mut reader = RecordReader::open_as(path, Some(start), max_record_bytes, true, None)?;
        reader.array = ArrayState::Start;
        Ok(reader)
    }

    /// Where the records of a streamed document start (the `[` or `{` that opens them),
    /// before any is read.
    pub fn records_start(&self) -> Option<Resume> {
        self.records_start.map(|at| Resume {
            at,
            container: self.container,
        })
    }

    /// [`RecordReader::open`]; `documents`: whether a first object that continues past
    /// its first line may be a JSON object document (else the file is JSONL).
    fn open_as(
        path: &Path,
        resume: Option<Resume>,
        max_record_bytes: usize,
        documents: bool,
        records: Option<&str>,
    ) -> io::Result<RecordReader> {
        let mut file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut file, &mut magic)?;
        let compression = match &magic[..n] {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
            _ => Compression::None,
        };
        let start = resume.map_or(Position::default(), |r| r.at);
        if &magic[..n] == b"PAR1" {
            return RecordReader::open_parquet(path, start, max_record_bytes, file_len);
        }
        let document = resume.is_some_and(|r| r.container == Container::Document);
        // Plain files seek to the checkpoint; compressed ones decompress and discard; a
        // document read whole is read again from its start.
        let seek_to = if compression == Compression::None && !document {
            start.bytes
        } else {
            0
        };
        let (mut input, counter) = decoded_input(file, compression, seek_to)?;
        if seek_to < start.bytes && !document {
            let skipped = io::copy(&mut (&mut input).take(start.bytes), &mut io::sink())?;
            if skipped < start.bytes {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file is shorter than the checkpoint of its earlier import",
                ));
            }
        }
        let mut reader = RecordReader {
            path: path.to_owned(),
            input,
            container: resume.map_or(Container::Jsonl, |r| r.container),
            compression,
            pos: start,
            max_record_bytes,
            array: if resume.is_some() {
                ArrayState::AfterRecord
            } else {
                ArrayState::Start
            },
            file_bytes_read: counter,
            file_len,
            notes: Vec::new(),
            finished: false,
            rows: None,
            document: None,
            records: records.map(String::from),
            records_start: None,
        };
        if resume.is_none() {
            if !reader.detect_container(documents)? {
                // Not one JSON value after all (a JSONL file whose first record is cut
                // short): read it again as JSONL.
                return RecordReader::open_as(path, None, max_record_bytes, false, None);
            }
        } else if document && !reader.load_document(start.records)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the JSON document no longer parses as it did when its import began",
            ));
        }
        Ok(reader)
    }

    /// A Parquet file: rows are read through the `parquet` crate's row API; positions
    /// count rows (`line` is the 1-based row number), and resuming skips rows.
    fn open_parquet(
        path: &Path,
        start: Position,
        max_record_bytes: usize,
        file_len: u64,
    ) -> io::Result<RecordReader> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let invalid = |e: parquet::errors::ParquetError| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a readable Parquet file: {e}"),
            )
        };
        // Resuming skips whole row groups by their metadata, then rows within one group.
        let (skipped_groups, skipped_rows, group_ends) = {
            let reader = SerializedFileReader::new(File::open(path)?).map_err(invalid)?;
            let mut groups = 0;
            let mut rows = 0u64;
            let mut ends = Vec::new();
            let (mut rows_end, mut bytes_end) = (0u64, 0u64);
            let mut counting = true;
            for group in reader.metadata().row_groups() {
                let group_rows = group.num_rows().max(0) as u64;
                rows_end += group_rows;
                for column in group.columns() {
                    let (offset, len) = column.byte_range();
                    bytes_end = bytes_end.max(offset + len);
                }
                ends.push((rows_end, bytes_end));
                if counting && rows + group_rows <= start.records {
                    rows += group_rows;
                    groups += 1;
                } else {
                    counting = false;
                }
            }
            (groups, rows, ends)
        };
        let skip_groups = move |_: &parquet::file::metadata::RowGroupMetaData, index: usize| {
            index >= skipped_groups
        };
        let options = parquet::file::serialized_reader::ReadOptionsBuilder::new()
            .with_predicate(Box::new(skip_groups))
            .build();
        let reader =
            SerializedFileReader::new_with_options(File::open(path)?, options).map_err(invalid)?;
        let total = reader.metadata().file_metadata().num_rows().max(0) as u64;
        let mut rows = reader.into_iter();
        for _ in skipped_rows..start.records {
            if rows.next().is_none() {
                break;
            }
        }
        let reader = RecordReader {
            path: path.to_owned(),
            input: Box::new(io::empty()),
            container: Container::Parquet,
            compression: Compression::None,
            pos: start,
            max_record_bytes,
            array: ArrayState::Closed,
            file_bytes_read: Arc::new(AtomicU64::new(0)),
            file_len,
            notes: Vec::new(),
            finished: false,
            rows: Some(ParquetRows {
                rows,
                total,
                group_ends,
            }),
            document: None,
            records: None,
            records_start: None,
        };
        reader.update_parquet_progress();
        Ok(reader)
    }

    fn update_parquet_progress(&self) {
        if let Some(rows) = &self.rows {
            let done = self.file_len.saturating_mul(self.pos.records) / rows.total.max(1);
            self.file_bytes_read
                .store(done.min(self.file_len), Ordering::Relaxed);
        }
    }

    fn next_row(&mut self) -> io::Result<Option<RawItem>> {
        let Some(rows) = &mut self.rows else {
            return Ok(None);
        };
        let row = match rows.rows.next() {
            None => return Ok(None),
            Some(Ok(row)) => row,
            Some(Err(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        };
        let bytes = serde_json::to_vec(&row.to_json_value()).map_err(io::Error::from)?;
        let at = self.pos;
        let len = bytes.len() as u64;
        // `bytes` counts the JSON produced (for throughput); resuming counts rows.
        self.pos.bytes += len;
        self.pos.lines += 1;
        if self.pos.records.is_multiple_of(4096) {
            self.update_parquet_progress();
        }
        Ok(Some(self.finish_item(at, bytes, len, true)))
    }

    /// Skips a byte order mark and leading blank space; a first byte `[` makes the file a
    /// JSON array, an object that continues past its first line a JSON object document
    /// (with `documents`), anything else JSONL. Returns `false` when the supposed
    /// document is not one JSON value, so the file must be read again as JSONL.
    fn detect_container(&mut self, documents: bool) -> io::Result<bool> {
        if self.input.fill_buf()?.starts_with(b"\xef\xbb\xbf") {
            self.input.consume(3);
            self.pos.bytes += 3;
        }
        match self.skip_whitespace() {
            Ok(Some(b'[')) => self.container = Container::JsonArray,
            Ok(Some(b'{'))
                if documents && (self.records.is_some() || self.first_line_continues()?) =>
            {
                return self.open_document_stream();
            }
            Ok(Some(_)) => self.container = Container::Jsonl,
            Ok(None) => {
                let message = if self.file_len == 0 {
                    "empty file: no records"
                } else {
                    "file holds no records"
                };
                self.notes.push(FileNote {
                    at: self.pos,
                    message: message.into(),
                });
                self.finished = true;
            }
            Err(e) => self.stream_failed(e)?,
        }
        Ok(true)
    }

    /// Whether the object that starts the file continues past its first line (a
    /// pretty-printed document, not JSONL). Decided on the buffered bytes: a first line
    /// longer than the buffer counts as JSONL.
    fn first_line_continues(&mut self) -> io::Result<bool> {
        let buf = self.input.fill_buf()?;
        let Some(end) = memchr::memchr(b'\n', buf) else {
            return Ok(false);
        };
        Ok(matches!(
            serde_json::from_slice::<serde::de::IgnoredAny>(&buf[..end]),
            Err(e) if e.classify() == serde_json::error::Category::Eof
        ))
    }

    /// Reads the rest of the input as one JSON object document and keeps its records
    /// from index `skip` on; a document without a recognisable list of records is a
    /// note naming the keys it has. `false`: the input is not one JSON value.
    fn load_document(&mut self, skip: u64) -> io::Result<bool> {
        let mut bytes = Vec::new();
        if let Err(e) = (&mut self.input)
            .take(MAX_DOCUMENT_BYTES + 1)
            .read_to_end(&mut bytes)
        {
            // A corrupt compressed stream is a note; other I/O errors are errors.
            self.stream_failed(e)?;
            return Ok(true);
        }
        let note = |message: String| FileNote {
            at: Position::default(),
            message,
        };
        if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
            self.notes.push(note(format!(
                "a JSON object document over {}: split it into JSONL",
                human_bytes(MAX_DOCUMENT_BYTES)
            )));
            self.finished = true;
            return Ok(true);
        }
        let value = match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(value) => value,
            Err(_) if self.records.is_none() => return Ok(false),
            Err(e) => {
                self.notes
                    .push(note(format!("malformed JSON document: {e}")));
                self.finished = true;
                return Ok(true);
            }
        };
        drop(bytes);
        let found = match &self.records {
            Some(at) => records_at(value, at),
            None => document_records(value),
        };
        let records = match found {
            Ok(records) => records,
            Err(message) => {
                self.notes.push(note(message));
                self.finished = true;
                return Ok(true);
            }
        };
        let skip = (skip as usize).min(records.len());
        let encoded: Vec<Vec<u8>> = records
            .into_iter()
            .skip(skip)
            .map(|r| serde_json::to_vec(&r).expect("values serialise"))
            .collect();
        self.pos = Position {
            records: skip as u64,
            lines: skip as u64,
            bytes: 0,
        };
        self.document = Some(encoded.into_iter());
        Ok(true)
    }

    fn next_document_record(&mut self) -> io::Result<Option<RawItem>> {
        let Some(bytes) = self.document.as_mut().and_then(Iterator::next) else {
            return Ok(None);
        };
        let at = self.pos;
        let len = bytes.len() as u64;
        self.pos.bytes += len;
        // `line` is the 1-based record number, as for Parquet rows.
        self.pos.lines += 1;
        Ok(Some(self.finish_item(at, bytes, len, true)))
    }

    /// Where a later reader resumes: just after the last record returned.
    pub fn resume_point(&self) -> Resume {
        Resume {
            at: self.pos,
            container: self.container,
        }
    }

    /// A compressed stream that is corrupt or cut off ends the file with a note (every
    /// record before it is kept); any other I/O error is returned.
    fn stream_failed(&mut self, error: io::Error) -> io::Result<()> {
        let decoding = (self.compression != Compression::None
            || self.container == Container::Parquet)
            && matches!(
                error.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof | io::ErrorKind::Other
            );
        if !decoding {
            return Err(error);
        }
        self.notes.push(FileNote {
            at: self.pos,
            message: format!(
                "{} is corrupt or truncated after line {} ({error}); the records before it \
                 were kept",
                match self.container {
                    Container::Parquet => "Parquet data".to_string(),
                    _ => format!("{:?} stream", self.compression),
                },
                self.pos.lines
            ),
        });
        self.finished = true;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn container(&self) -> Container {
        self.container
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Position after the last record returned: where a resumed reader starts.
    pub fn position(&self) -> Position {
        self.pos
    }

    /// How far into the file on disk the records returned so far lie: the raw bytes read
    /// from it (a stream, compressed or not), or the end of the row group holding the last
    /// row returned (Parquet). What a checkpoint's [`FilePrefix`] covers.
    pub fn covered_bytes(&self) -> u64 {
        match &self.rows {
            Some(rows) => {
                let last = self.pos.records.saturating_sub(1);
                rows.group_ends
                    .iter()
                    .find(|(rows_end, _)| *rows_end > last)
                    .or(rows.group_ends.last())
                    .map_or(0, |(_, bytes)| *bytes)
            }
            None => self.file_bytes_read.load(Ordering::Relaxed),
        }
    }

    /// Bytes of the file on disk read so far, and the file's size (for progress).
    pub fn file_progress(&self) -> (u64, u64) {
        (self.file_bytes_read.load(Ordering::Relaxed), self.file_len)
    }

    /// A handle that keeps reporting file progress after the reader moved to another thread.
    pub fn progress_counter(&self) -> Arc<AtomicU64> {
        self.file_bytes_read.clone()
    }

    /// File-level notes gathered so far (drained).
    pub fn take_notes(&mut self) -> Vec<FileNote> {
        std::mem::take(&mut self.notes)
    }

    /// The next record, `None` at the end of the file.
    pub fn next_item(&mut self) -> io::Result<Option<RawItem>> {
        if self.finished {
            return Ok(None);
        }
        let item = match self.container {
            Container::Jsonl => self.next_line(),
            Container::JsonArray => self.next_element(),
            Container::Parquet => self.next_row(),
            Container::Document => self.next_document_record(),
            Container::DocumentList => self.next_element(),
            Container::DocumentById => self.next_member(),
        };
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                self.stream_failed(e)?;
                None
            }
        };
        if item.is_none() {
            self.finished = true;
            if self.pos.records == 0 && self.notes.is_empty() {
                self.notes.push(FileNote {
                    at: self.pos,
                    message: "file holds no records".into(),
                });
            }
        }
        Ok(item)
    }

    /// Consumes one byte already seen through `fill_buf`.
    fn bump(&mut self, byte: u8) {
        self.input.consume(1);
        self.pos.bytes += 1;
        if byte == b'\n' {
            self.pos.lines += 1;
        }
    }

    fn skip_whitespace(&mut self) -> io::Result<Option<u8>> {
        loop {
            let buf = self.input.fill_buf()?;
            if buf.is_empty() {
                return Ok(None);
            }
            let ws = buf
                .iter()
                .take_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
                .count();
            let lines = memchr::memchr_iter(b'\n', &buf[..ws]).count() as u64;
            let next = buf.get(ws).copied();
            self.input.consume(ws);
            self.pos.bytes += ws as u64;
            self.pos.lines += lines;
            if next.is_some() {
                return Ok(next);
            }
        }
    }

    fn next_line(&mut self) -> io::Result<Option<RawItem>> {
        loop {
            let at = self.pos;
            let mut line = Vec::new();
            let mut len: u64 = 0;
            let mut saw_newline = false;
            loop {
                let buf = self.input.fill_buf()?;
                if buf.is_empty() {
                    break;
                }
                let (chunk, used) = match memchr::memchr(b'\n', buf) {
                    Some(i) => {
                        saw_newline = true;
                        (&buf[..i], i + 1)
                    }
                    None => (buf, buf.len()),
                };
                let room = self
                    .max_record_bytes
                    .saturating_add(1)
                    .saturating_sub(line.len());
                line.extend_from_slice(&chunk[..chunk.len().min(room)]);
                len += chunk.len() as u64;
                self.input.consume(used);
                self.pos.bytes += used as u64;
                if saw_newline {
                    self.pos.lines += 1;
                    break;
                }
            }
            if len == 0 && !saw_newline {
                return Ok(None);
            }
            if line.last() == Some(&b'\r') {
                line.pop();
                len -= 1;
            }
            if line.iter().all(u8::is_ascii_whitespace) && len <= line.len() as u64 {
                continue; // blank lines separate nothing and are not records
            }
            let item = self.finish_item(at, line, len, saw_newline);
            return Ok(Some(item));
        }
    }

    fn finish_item(
        &mut self,
        mut at: Position,
        bytes: Vec<u8>,
        len: u64,
        complete: bool,
    ) -> RawItem {
        at.records = self.pos.records;
        self.pos.records += 1;
        let body = if len > self.max_record_bytes as u64 {
            RawBody::Unreadable {
                reason: RejectReason::new(
                    RejectKind::TooLarge,
                    format!(
                        "record is {} long, over the {} limit (not read past its start)",
                        human_bytes(len),
                        human_bytes(self.max_record_bytes as u64)
                    ),
                ),
                prefix: prefix(bytes),
            }
        } else if !complete
            && (self.container == Container::JsonArray || self.container.in_document())
        {
            RawBody::Unreadable {
                reason: RejectReason::new(
                    RejectKind::Truncated,
                    format!(
                        "JSON {} ends inside this record (file truncated?): the record \
                         starting at line {} byte {} has no closing bracket",
                        if self.container == Container::JsonArray {
                            "array"
                        } else {
                            "document"
                        },
                        at.line(),
                        at.bytes
                    ),
                ),
                prefix: prefix(bytes),
            }
        } else {
            RawBody::Bytes(bytes)
        };
        RawItem { at, body, id: None }
    }

    fn next_element(&mut self) -> io::Result<Option<RawItem>> {
        loop {
            let Some(byte) = self.skip_whitespace()? else {
                if self.array != ArrayState::Closed {
                    let message = match self.array {
                        ArrayState::Start => "file holds no records".to_string(),
                        _ if self.container.in_document() => "the JSON document ends inside \
                            its list of records (file truncated?); every complete record was kept"
                            .to_string(),
                        _ => "JSON array is not closed with `]` (file truncated?); every complete \
                              record was kept"
                            .to_string(),
                    };
                    self.notes.push(FileNote {
                        at: self.pos,
                        message,
                    });
                }
                return Ok(None);
            };
            match (self.array, byte) {
                (ArrayState::Start, b'[') => {
                    self.bump(byte);
                    self.array = ArrayState::First;
                }
                (ArrayState::First, b']') | (ArrayState::AfterRecord, b']') => {
                    self.bump(byte);
                    self.array = ArrayState::Closed;
                }
                (ArrayState::AfterRecord, b',') => {
                    self.bump(byte);
                    self.array = ArrayState::First;
                }
                (ArrayState::Closed, _) => {
                    // After a document's list of records comes the rest of the document.
                    if !self.container.in_document() {
                        self.notes.push(FileNote {
                            at: self.pos,
                            message: "data after the end of the JSON array was ignored".into(),
                        });
                    }
                    io::copy(&mut self.input, &mut io::sink())?;
                    return Ok(None);
                }
                (ArrayState::First, _) => return self.scan_value(None).map(Some),
                (ArrayState::AfterRecord, _) | (ArrayState::Start, _) => {
                    // Missing comma or a stray byte: read a value from here and reject it.
                    let mut item = self.scan_value(None)?;
                    if let RawBody::Bytes(bytes) = item.body {
                        item.body = RawBody::Unreadable {
                            reason: RejectReason::new(
                                RejectKind::MalformedJson,
                                "malformed JSON array: expected `,` or `]` before this record",
                            ),
                            prefix: prefix(bytes),
                        };
                    }
                    self.array = ArrayState::AfterRecord;
                    return Ok(Some(item));
                }
            }
        }
    }

    /// Reads one JSON value byte-exactly by tracking strings and bracket depth.
    fn scan_value(&mut self, at: Option<Position>) -> io::Result<RawItem> {
        let at = at.unwrap_or(self.pos);
        let scanned = self.scan_raw(self.max_record_bytes.saturating_add(1))?;
        self.array = ArrayState::AfterRecord;
        Ok(self.finish_item(at, scanned.bytes, scanned.len, scanned.complete))
    }

    /// Consumes one JSON value (string, number, literal, object or array) by tracking
    /// strings and bracket depth, keeping its first `keep` bytes. A scalar ends at a
    /// delimiter, which stays unread.
    fn scan_raw(&mut self, keep: usize) -> io::Result<Scanned> {
        let mut value = Vec::new();
        let mut len: u64 = 0;
        let mut depth: u32 = 0;
        let mut in_string = false;
        let mut escaped = false;
        let mut first = None;
        let mut complete = false;
        let mut control_in_string = false;
        'outer: loop {
            let buf = self.input.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            let mut used = 0;
            let mut lines = 0;
            while used < buf.len() {
                if in_string && !escaped {
                    // Most of a record is string content: jump to the next byte that
                    // matters inside a string.
                    match memchr::memchr3(b'"', b'\\', b'\n', &buf[used..]) {
                        Some(skip) => used += skip,
                        None => {
                            used = buf.len();
                            break;
                        }
                    }
                }
                let b = buf[used];
                if first.is_some()
                    && depth == 0
                    && !in_string
                    && matches!(b, b',' | b']' | b'}' | b':' | b' ' | b'\t' | b'\r' | b'\n')
                {
                    complete = true;
                    break;
                }
                used += 1;
                if b == b'\n' {
                    lines += 1;
                }
                first.get_or_insert(b);
                if in_string {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                        if depth == 0 {
                            complete = true;
                            break;
                        }
                    } else if b == b'\n' {
                        control_in_string = true;
                    }
                } else {
                    match b {
                        b'"' => in_string = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.saturating_sub(1);
                            if depth == 0 {
                                complete = true;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            let room = keep.saturating_sub(value.len());
            value.extend_from_slice(&buf[..used.min(room)]);
            len += used as u64;
            self.input.consume(used);
            self.pos.bytes += used as u64;
            self.pos.lines += lines;
            if complete {
                break 'outer;
            }
        }
        // A scalar running to the end of the file is complete too.
        let complete =
            complete || (first.is_some() && depth == 0 && !in_string && first != Some(b'"'));
        Ok(Scanned {
            bytes: value,
            len,
            complete,
            first,
            control_in_string,
        })
    }

    /// Consumes `byte` if it comes next after blank space.
    fn eat(&mut self, byte: u8) -> io::Result<bool> {
        if self.skip_whitespace()? == Some(byte) {
            self.bump(byte);
            return Ok(true);
        }
        Ok(false)
    }

    /// Reads the JSON string that comes next (an object's key): `Err` when it is not a
    /// whole, valid string.
    fn read_key(&mut self) -> io::Result<Result<String, String>> {
        self.skip_whitespace()?;
        let scanned = self.scan_raw(self.max_record_bytes.saturating_add(1))?;
        if !scanned.complete || scanned.first != Some(b'"') {
            return Ok(Err("expected a key in quotes".into()));
        }
        if scanned.len > scanned.bytes.len() as u64 {
            return Ok(Err(format!(
                "a key of {}, over the record size limit",
                human_bytes(scanned.len)
            )));
        }
        Ok(serde_json::from_slice::<String>(&scanned.bytes).map_err(|e| format!("bad key: {e}")))
    }

    /// Finds the records of a JSON object document that starts at the next byte, leaving
    /// the reader at the `[` or `{` that opens them: under `--records`, else where a scan
    /// of the document's structure finds them. `false`: the input is not one JSON value
    /// (so not a document: the caller reads it as JSONL).
    fn open_document_stream(&mut self) -> io::Result<bool> {
        self.container = Container::DocumentList;
        let at = self.records.clone();
        let segments = match &at {
            Some(at) => path_segments(at),
            None => {
                let mut scan = self.rescan()?;
                let survey = match scan.survey() {
                    Ok(survey) => survey,
                    // A corrupt compressed stream: read as JSONL, which keeps what comes
                    // before the damage and notes it.
                    Err(_) if scan.compression != Compression::None => return Ok(false),
                    Err(e) => return Err(e),
                };
                match survey {
                    Survey::NotAValue => return Ok(false),
                    Survey::NotFound(message) => {
                        self.file_note(message);
                        return Ok(true);
                    }
                    Survey::At(key) => key.into_iter().collect(),
                }
            }
        };
        let shown = at.as_deref().unwrap_or("");
        match self.navigate(shown, &segments) {
            Ok(Ok(container)) => {
                self.container = container;
                self.records_start = Some(self.pos);
            }
            Ok(Err(message)) => self.file_note(message),
            Err(e) => self.stream_failed(e)?,
        }
        Ok(true)
    }

    /// A note about the whole file that ends its reading.
    fn file_note(&mut self, message: String) {
        self.notes.push(FileNote {
            at: self.pos,
            message,
        });
        self.finished = true;
    }

    /// Another reader of the same file from its start, at its first non-blank byte, for
    /// a pass over the document's structure.
    fn rescan(&self) -> io::Result<RecordReader> {
        let (input, counter) = decoded_input(File::open(&self.path)?, self.compression, 0)?;
        let mut scan = RecordReader {
            path: self.path.clone(),
            input,
            container: Container::DocumentList,
            compression: self.compression,
            pos: Position::default(),
            max_record_bytes: self.max_record_bytes,
            array: ArrayState::Start,
            file_bytes_read: counter,
            file_len: self.file_len,
            notes: Vec::new(),
            finished: false,
            rows: None,
            document: None,
            records: None,
            records_start: None,
        };
        if scan.input.fill_buf()?.starts_with(b"\xef\xbb\xbf") {
            scan.input.consume(3);
        }
        Ok(scan)
    }

    /// One pass over a JSON object document's structure, keeping no values: the key of
    /// its one member that holds records (a non-empty list of objects, or a non-empty
    /// object of objects) beside other metadata, or, when every member is an object, the
    /// document itself as an `id -> record` object. A document cut short is judged by
    /// what it holds before the cut (its reading then ends with a note).
    fn survey(&mut self) -> io::Result<Survey> {
        if !self.eat(b'{')? {
            return Ok(Survey::NotAValue);
        }
        let mut keys = Vec::new();
        let mut count = 0usize;
        let mut holders = Vec::new();
        let mut all_objects = true;
        let mut cut = false;
        if self.skip_whitespace()? == Some(b'}') {
            self.bump(b'}');
        } else {
            loop {
                if self.skip_whitespace()?.is_none() {
                    cut = true;
                    break;
                }
                let Ok(key) = self.read_key()? else {
                    return Ok(Survey::NotAValue);
                };
                if !self.eat(b':')? {
                    if self.skip_whitespace()?.is_none() {
                        cut = true;
                        break;
                    }
                    return Ok(Survey::NotAValue);
                }
                let first = self.skip_whitespace()?;
                let members = match first {
                    Some(b'[') => self.survey_members(b'[', b']')?,
                    Some(b'{') => self.survey_members(b'{', b'}')?,
                    None => Members::Cut(false),
                    _ => {
                        let scanned = self.scan_raw(0)?;
                        match (scanned.complete, scanned.control_in_string) {
                            (_, true) => Members::Malformed,
                            (true, false) => Members::Done(false),
                            (false, false) => Members::Cut(false),
                        }
                    }
                };
                let holds = match members {
                    Members::Done(holds) => holds,
                    Members::Cut(holds) => {
                        cut = true;
                        holds
                    }
                    Members::Malformed => return Ok(Survey::NotAValue),
                };
                all_objects &= first == Some(b'{');
                if holds {
                    holders.push(key.clone());
                }
                if keys.len() < 20 {
                    keys.push(key);
                }
                count += 1;
                if cut {
                    break;
                }
                match self.skip_whitespace()? {
                    Some(b',') => self.bump(b','),
                    Some(b'}') => {
                        self.bump(b'}');
                        break;
                    }
                    None => {
                        cut = true;
                        break;
                    }
                    _ => return Ok(Survey::NotAValue),
                }
            }
        }
        if !cut && self.skip_whitespace()?.is_some() {
            return Ok(Survey::NotAValue);
        }
        if let [key] = holders.as_slice() {
            return Ok(Survey::At(Some(key.clone())));
        }
        if count > 1 && all_objects {
            return Ok(Survey::At(None));
        }
        Ok(Survey::NotFound(format!(
            "a JSON object document whose records were not found: {} of its keys ({}) hold a list of objects{}; write the records as JSONL or a JSON array, or name them with --records",
            holders.len(),
            keys.join(", "),
            if cut { " before the document ends (cut short?)" } else { "" }
        )))
    }

    /// Consumes a list (`open` = `[`) or object (`{`): whether it is non-empty and every
    /// element (or member value) is an object, as far as the input goes.
    fn survey_members(&mut self, open: u8, close: u8) -> io::Result<Members> {
        self.bump(open);
        let mut count = 0u64;
        let mut objects = true;
        loop {
            match self.skip_whitespace()? {
                Some(b) if b == close && count == 0 => {
                    self.bump(b);
                    return Ok(Members::Done(false));
                }
                None => return Ok(Members::Cut(count > 0 && objects)),
                Some(_) => {}
            }
            if open == b'{' {
                if self.read_key()?.is_err() {
                    return Ok(match self.skip_whitespace()? {
                        None => Members::Cut(count > 0 && objects),
                        Some(_) => Members::Malformed,
                    });
                }
                if !self.eat(b':')? {
                    return Ok(match self.skip_whitespace()? {
                        None => Members::Cut(count > 0 && objects),
                        Some(_) => Members::Malformed,
                    });
                }
            }
            let first = self.skip_whitespace()?;
            objects &= first.is_none() || first == Some(b'{');
            let scanned = self.scan_raw(0)?;
            if scanned.control_in_string {
                return Ok(Members::Malformed);
            }
            count += 1;
            if !scanned.complete {
                return Ok(Members::Cut(objects));
            }
            match self.skip_whitespace()? {
                Some(b',') => self.bump(b','),
                Some(b) if b == close => {
                    self.bump(b);
                    return Ok(Members::Done(objects));
                }
                None => return Ok(Members::Cut(objects)),
                _ => return Ok(Members::Malformed),
            }
        }
    }

    /// Walks from the document's start along `segments` (object keys, or list indexes)
    /// to the list or object of records; `Err`: a message naming what is there instead.
    fn navigate(&mut self, at: &str, segments: &[String]) -> io::Result<Result<Container, String>> {
        let malformed = |what: &str| format!("malformed JSON document: {what}");
        for (depth, segment) in segments.iter().enumerate() {
            match self.skip_whitespace()? {
                Some(b'{') => {
                    self.bump(b'{');
                    let mut keys = Vec::new();
                    loop {
                        if self.skip_whitespace()? == Some(b'}') {
                            let place = if depth == 0 {
                                "the document's keys"
                            } else {
                                "the keys there"
                            };
                            return Ok(Err(format!(
                                "--records {at}: nothing there ({place}: {})",
                                keys.join(", ")
                            )));
                        }
                        let key = match self.read_key()? {
                            Ok(key) => key,
                            Err(e) => return Ok(Err(malformed(&e))),
                        };
                        if !self.eat(b':')? {
                            return Ok(Err(malformed(&format!("no `:` after the key `{key}`"))));
                        }
                        if key == *segment {
                            break;
                        }
                        if keys.len() < 20 {
                            keys.push(key);
                        }
                        self.skip_whitespace()?;
                        if !self.scan_raw(0)?.complete {
                            return Ok(Err(malformed("the document ends inside a value")));
                        }
                        match self.skip_whitespace()? {
                            Some(b',') => self.bump(b','),
                            Some(b'}') => {}
                            _ => return Ok(Err(malformed("expected `,` or `}` after a value"))),
                        }
                    }
                }
                Some(b'[') => {
                    let Ok(index) = segment.parse::<u64>() else {
                        return Ok(Err(format!(
                            "--records {at}: a list where `{segment}` is looked up (name its elements by index)"
                        )));
                    };
                    self.bump(b'[');
                    for _ in 0..index {
                        if self.skip_whitespace()? == Some(b']') {
                            return Ok(Err(format!(
                                "--records {at}: the list has no element {index}"
                            )));
                        }
                        self.scan_raw(0)?;
                        if !self.eat(b',')? {
                            return Ok(Err(format!(
                                "--records {at}: the list has no element {index}"
                            )));
                        }
                    }
                }
                other => return Ok(Err(not_records(at, other))),
            }
        }
        match self.skip_whitespace()? {
            Some(b'[') => Ok(Ok(Container::DocumentList)),
            Some(b'{') => Ok(Ok(Container::DocumentById)),
            other => Ok(Err(not_records(at, other))),
        }
    }

    /// The next member of an `id -> record` object: its value as the record, its key as
    /// the record's id, its position that of the key.
    fn next_member(&mut self) -> io::Result<Option<RawItem>> {
        loop {
            let Some(byte) = self.skip_whitespace()? else {
                if self.array != ArrayState::Closed {
                    self.notes.push(FileNote {
                        at: self.pos,
                        message: "the JSON document ends inside its `id -> record` object \
                                  (file truncated?); every complete record was kept"
                            .into(),
                    });
                }
                return Ok(None);
            };
            match (self.array, byte) {
                (ArrayState::Start, b'{') => {
                    self.bump(byte);
                    self.array = ArrayState::First;
                }
                (ArrayState::First | ArrayState::AfterRecord, b'}') => {
                    self.bump(byte);
                    self.array = ArrayState::Closed;
                }
                (ArrayState::AfterRecord, b',') => {
                    self.bump(byte);
                    self.array = ArrayState::First;
                }
                (ArrayState::Closed, _) => {
                    // The rest of the document holds no records.
                    io::copy(&mut self.input, &mut io::sink())?;
                    return Ok(None);
                }
                (ArrayState::First, b'"') => {
                    let at = self.pos;
                    let key = self.read_key()?;
                    let colon = self.eat(b':')?;
                    let mut item = self.scan_value(Some(at))?;
                    let problem = match (&key, colon) {
                        (Err(e), _) => Some(format!("malformed JSON: {e}")),
                        (Ok(key), false) => Some(format!(
                            "malformed JSON object of records: no `:` after the id `{key}`"
                        )),
                        (Ok(_), true) => None,
                    };
                    item.id = key.ok().map(cut_id);
                    if let (Some(message), RawBody::Bytes(bytes)) = (problem, &mut item.body) {
                        item.body = RawBody::Unreadable {
                            reason: RejectReason::new(RejectKind::MalformedJson, message),
                            prefix: prefix(std::mem::take(bytes)),
                        };
                    }
                    return Ok(Some(item));
                }
                (_, _) => {
                    // A stray byte where an id should be: read a value from here and
                    // reject it.
                    let mut item = self.scan_value(None)?;
                    if let RawBody::Bytes(bytes) = item.body {
                        item.body = RawBody::Unreadable {
                            reason: RejectReason::new(
                                RejectKind::MalformedJson,
                                "malformed JSON object of records: expected `\"id\": record`, `,` or `}` here",
                            ),
                            prefix: prefix(bytes),
                        };
                    }
                    return Ok(Some(item));
                }
            }
        }
    }
}

/// What one [`RecordReader::scan_raw`] consumed.
struct Scanned {
    /// The value's first bytes (as many as asked for).
    bytes: Vec<u8>,
    /// Its whole length.
    len: u64,
    complete: bool,
    first: Option<u8>,
    /// A raw line break inside a string (not JSON: a JSONL line cut short, not a
    /// document).
    control_in_string: bool,
}

/// What a survey saw of a list or object.
enum Members {
    /// Whole: whether it holds records.
    Done(bool),
    /// The input ends inside it: whether it holds records so far.
    Cut(bool),
    Malformed,
}

/// Where a survey of a JSON object document found its records.
enum Survey {
    /// Under this key of the document, or (`None`) the document's own members.
    At(Option<String>),
    /// Not there: why, naming the document's keys.
    NotFound(String),
    /// The input is not one JSON value.
    NotAValue,
}

/// `--records` as object keys or list indexes: a JSON pointer (`/data/0/items`) or a
/// dotted path (`data.train`).
fn path_segments(at: &str) -> Vec<String> {
    match at.strip_prefix('/') {
        Some(pointer) => pointer
            .split('/')
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect(),
        None => at.split('.').map(String::from).collect(),
    }
}

fn not_records(at: &str, first: Option<u8>) -> String {
    let what = match first {
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(b'-' | b'0'..=b'9') => "a number",
        None => "the end of the document",
        Some(_) => "malformed JSON",
    };
    format!("--records {at}: {what} there, not a list of records or an object of them")
}

/// An id as kept: at most [`MAX_ID_BYTES`], cut at a character boundary.
fn cut_id(mut id: String) -> String {
    if id.len() > MAX_ID_BYTES {
        let mut end = MAX_ID_BYTES;
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        id.truncate(end);
    }
    id
}

/// The records at `at` in `document`: a JSON pointer (`/data`) or a dotted path
/// (`data.train`), holding a list of records or an `id -> record` object.
fn records_at(document: serde_json::Value, at: &str) -> Result<Vec<serde_json::Value>, String> {
    use serde_json::Value;
    let pointer = if at.starts_with('/') {
        at.to_string()
    } else {
        format!(
            "/{}",
            at.split('.')
                .map(|k| k.replace('~', "~0").replace('/', "~1"))
                .collect::<Vec<_>>()
                .join("/")
        )
    };
    let keys = |v: &Value| match v {
        Value::Object(map) => map.keys().take(20).cloned().collect::<Vec<_>>().join(", "),
        _ => "none: the document is not an object".into(),
    };
    let mut document = document;
    let Some(found) = document.pointer_mut(&pointer) else {
        return Err(format!(
            "--records {at}: nothing there (the document's keys: {})",
            keys(&document)
        ));
    };
    match found.take() {
        Value::Array(items) => Ok(items),
        Value::Object(map) => Ok(map.into_iter().map(|(_, v)| v).collect()),
        other => Err(format!(
            "--records {at}: a {} there, not a list of records or an object of them",
            match other {
                Value::String(_) => "string",
                Value::Number(_) => "number",
                Value::Bool(_) => "boolean",
                _ => "null",
            }
        )),
    }
}

/// The records of a JSON object document: the list (or `id -> record` object) under its
/// one key that holds records beside other metadata (`{"version": 2, "data": [...]}`),
/// or the document's own values when they are all records (`{"id1": {...}, ...}`).
fn document_records(document: serde_json::Value) -> Result<Vec<serde_json::Value>, String> {
    use serde_json::Value;
    let Value::Object(top) = document else {
        return Err("the document is not a JSON object".into());
    };
    let records_in = |value: &Value| match value {
        Value::Array(items) => !items.is_empty() && items.iter().all(Value::is_object),
        Value::Object(map) => !map.is_empty() && map.values().all(Value::is_object),
        _ => false,
    };
    let holders: Vec<&String> = top
        .iter()
        .filter(|(_, v)| records_in(v))
        .map(|(k, _)| k)
        .collect();
    let values = |value: Value| match value {
        Value::Array(items) => items,
        Value::Object(map) => map.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    if let [key] = holders.as_slice() {
        let key = (*key).clone();
        let mut top = top;
        return Ok(values(top.remove(&key).expect("a key of the object")));
    }
    // Every value an object: an `id -> record` object.
    if top.len() > 1 && top.values().all(Value::is_object) {
        return Ok(top.into_iter().map(|(_, v)| v).collect());
    }
    let keys: Vec<&str> = top.keys().map(String::as_str).take(20).collect();
    Err(format!(
        "a JSON object document whose records were not found: {} of its keys ({}) hold a list of objects; write the records as JSONL or a JSON array",
        holders.len(),
        keys.join(", ")
    ))
}

const PREFIX_BYTES: usize = 4096;

fn prefix(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.truncate(PREFIX_BYTES);
    bytes
}

/// `1536` -> `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
