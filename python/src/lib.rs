//! `corpusdb._corpusdb`: the Python extension module of the `corpusdb` package.
//!
//! It calls the library functions the command line uses, with the same semantics: reads
//! open the store read-only and catch the index up with the store's change log (going on
//! with what is indexed when an import is busy updating it), `ingest` holds the store for
//! writing and feeds the index from the import's batches, and `RawBatches` builds the
//! batches of `corpusdb batches` (token cache included). Every call that reads or writes
//! the store releases the GIL. Results that are JSON in the command line's `--json`
//! output are handed over as the same values (dicts and lists); batch tensors are handed
//! over as little-endian buffers with a dtype and a shape (`corpusdb.Batches` makes numpy
//! arrays of them).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use corpusdb::batches::{self, BatchOptions, ChatTokenizer, TokenCache};
use corpusdb::category::Rule;
use corpusdb::curriculum::{Curriculum, Plan, SamplerState};
use corpusdb::describe;
use corpusdb::formats::Formats;
use corpusdb::index::query::{self, TermField};
use corpusdb::index::{Feed, Index};
use corpusdb::ingest::{self, IngestOptions};
use corpusdb::store::{Compression, ImportCounts, Store, StoreOptions};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};
use serde_json::{json, Value};

pyo3::create_exception!(
    _corpusdb,
    CorpusdbError,
    PyException,
    "An error of the corpus database, with the library's message."
);

/// The message of an error and of its sources (each one not already said), as the
/// command line prints it.
fn message(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}

fn err(error: impl std::error::Error) -> PyErr {
    CorpusdbError::new_err(message(&error))
}

fn fail(text: impl Into<String>) -> PyErr {
    CorpusdbError::new_err(text.into())
}

type Result<T> = std::result::Result<T, PyErr>;

/// A JSON value as the Python value `json.loads` makes of it.
fn to_py(py: Python<'_>, value: &Value) -> Result<Py<PyAny>> {
    let text = serde_json::to_string(value).map_err(err)?;
    Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
}

fn from_py(py: Python<'_>, value: &Bound<'_, PyAny>) -> Result<Value> {
    let text: String = py
        .import("json")?
        .call_method1("dumps", (value,))?
        .extract()?;
    serde_json::from_str(&text).map_err(err)
}

/// Opens the store read-only and its index, bringing the index up to date when it can
/// (`corpusdb query` and friends). Returns a warning when another process is updating the
/// index and what is indexed may be incomplete.
fn open_for_reading(path: &Path) -> Result<(Store, Index, Option<String>)> {
    let store = Store::open_read_only(path).map_err(err)?;
    let index = Index::open_or_create(store.path(), false).map_err(err)?;
    let behind = store
        .counters()
        .map_err(err)?
        .changes
        .saturating_sub(index.indexed_through().map_err(err)?);
    let mut warning = None;
    if behind > 0 {
        match index.catch_up(&store, &|_, _| {}) {
            Ok(_) => {}
            Err(corpusdb::index::Error::Busy { .. }) => {
                warning = Some(format!("the index is {behind} changes behind the store and another process is updating it; results may be incomplete"));
            }
            Err(e) => return Err(err(e)),
        }
    }
    Ok((store, index, warning))
}

fn warn(py: Python<'_>, warning: Option<String>) -> Result<()> {
    if let Some(text) = warning {
        py.import("warnings")?.call_method1("warn", (text,))?;
    }
    Ok(())
}

fn counts_json(c: &ImportCounts) -> Value {
    json!({
        "read": c.read,
        "stored": c.stored,
        "duplicates": c.duplicates,
        "rejected": c.rejected,
        "joined": c.joined,
        "extra": c.extra,
    })
}

/// Takes the index's writer for an import, waiting while a reader that is catching up
/// holds it, and replays what the index lacks.
fn feed_waiting<'a>(store: &'a Store, index: &'a Index) -> Result<Feed<'a>> {
    let mut attempts = 0;
    let feed = loop {
        match index.feed(store) {
            Err(corpusdb::index::Error::Busy { .. }) if attempts < 600 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => break other.map_err(err)?,
        }
    };
    feed.catch_up(&|_, _| {}).map_err(err)?;
    Ok(feed)
}

/// A corpus store on disk (the directory `corpusdb --store` names).
///
/// Each call opens the store as the command line does: read-only for reads (so they work
/// while an import writes), for writing in `ingest`.
#[pyclass(name = "Store", module = "corpusdb._corpusdb", frozen)]
struct PyStore {
    path: PathBuf,
}

#[pymethods]
impl PyStore {
    #[new]
    fn new(path: PathBuf) -> Self {
        PyStore { path }
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn __repr__(&self) -> String {
        format!("Store({:?})", self.path.display().to_string())
    }

    /// The store's counters, as `corpusdb stats --json` prints them.
    fn stats(&self, py: Python<'_>) -> Result<Py<PyAny>> {
        let path = &self.path;
        let value = py.detach(|| -> Result<Value> {
            let store = Store::open_read_only(path).map_err(err)?;
            Ok(describe::StoreSummary::read(&store).map_err(err)?.to_json())
        })?;
        to_py(py, &value)
    }

    /// Every import, as `corpusdb imports --json` lists them.
    fn imports(&self, py: Python<'_>) -> Result<Py<PyAny>> {
        let path = &self.path;
        let value = py.detach(|| -> Result<Value> {
            let store = Store::open_read_only(path).map_err(err)?;
            let imports = store.imports().map_err(err)?;
            Ok(Value::Array(
                imports.iter().map(describe::import_json).collect(),
            ))
        })?;
        to_py(py, &value)
    }

    /// Examples per category (or per source, or excluded per filter) from the index.
    #[pyo3(signature = (by = "category"))]
    fn categories(&self, py: Python<'_>, by: &str) -> Result<Py<PyAny>> {
        let field = match by {
            "category" => TermField::Category,
            "source" => TermField::Source,
            "excluded" => TermField::Excluded,
            other => {
                return Err(fail(format!(
                    "by={other:?}: expected \"category\", \"source\" or \"excluded\""
                )))
            }
        };
        let path = &self.path;
        let (counts, warning) = py.detach(|| -> Result<_> {
            let (_store, index, warning) = open_for_reading(path)?;
            Ok((index.facet(field).map_err(err)?, warning))
        })?;
        warn(py, warning)?;
        to_py(py, &json!(counts))
    }

    /// The number of examples matching a query.
    fn count(&self, py: Python<'_>, query: &str) -> Result<u64> {
        let expr = query::parse(query).map_err(err)?;
        let path = &self.path;
        let (n, warning) = py.detach(|| -> Result<_> {
            let (_store, index, warning) = open_for_reading(path)?;
            Ok((index.count(&expr).map_err(err)?, warning))
        })?;
        warn(py, warning)?;
        Ok(n)
    }

    /// Examples matching a query in insertion order: hash, ordinal, category, sources,
    /// chars, turns and messages.
    #[pyo3(signature = (query, limit = 20, offset = 0))]
    fn query(&self, py: Python<'_>, query: &str, limit: usize, offset: usize) -> Result<Py<PyAny>> {
        let expr = query::parse(query).map_err(err)?;
        let path = &self.path;
        let (value, warning) = py.detach(|| -> Result<_> {
            let (store, index, warning) = open_for_reading(path)?;
            let hits = index.search(&expr, offset, limit).map_err(err)?;
            let mut list = Vec::with_capacity(hits.len());
            for hit in &hits {
                let example = store.get(&hit.hash).map_err(err)?.ok_or_else(|| {
                    fail(format!(
                        "index lists {} but the store lacks it; run `corpusdb reindex`",
                        hit.hash
                    ))
                })?;
                let record = corpusdb::export::messages_record(&example);
                list.push(json!({
                    "hash": hit.hash.to_hex(),
                    "ordinal": hit.ordinal,
                    "category": hit.category,
                    "sources": hit.sources,
                    "chars": example.chars,
                    "turns": example.turns,
                    "messages": record["messages"],
                    "tools": record.get("tools"),
                }));
            }
            Ok((Value::Array(list), warning))
        })?;
        warn(py, warning)?;
        to_py(py, &value)
    }

    /// One example by its SHA-1 or a unique prefix of at least 4 hex digits, as
    /// `corpusdb show --json` prints it: messages, provenance, exclusions, cluster.
    fn show(&self, py: Python<'_>, hash: &str) -> Result<Py<PyAny>> {
        let path = &self.path;
        let value = py.detach(|| -> Result<Value> {
            let store = Store::open_read_only(path).map_err(err)?;
            let hash = describe::resolve_hash(&store, hash).map_err(err)?;
            describe::example_json(&store, &hash).map_err(err)
        })?;
        to_py(py, &value)
    }

    /// Imports files as `corpusdb ingest FILES --source S --category C` does: one import
    /// per file, deduplicated against the store, bad records into the rejects ledger
    /// (unless `strict`), an interrupted import resumed, a finished one a no-op. Returns
    /// {"files": [per file: path, import, format, already_done, resumed_from, counts of
    /// this run, first rejects, notes], "total": counts}. `compression` is "zstd" (the
    /// default) or "lz4", as `ingest --compression`.
    #[pyo3(signature = (paths, source, category, format = None, mapping = None, rules = None, filters = None, strict = false, compression = "zstd"))]
    #[allow(clippy::too_many_arguments)]
    fn ingest(
        &self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        source: String,
        category: String,
        format: Option<String>,
        mapping: Option<PathBuf>,
        rules: Option<Vec<String>>,
        filters: Option<PathBuf>,
        strict: bool,
        compression: &str,
    ) -> Result<Py<PyAny>> {
        if source.trim().is_empty() || category.trim().is_empty() {
            return Err(fail("source and category must not be empty"));
        }
        let compression = Compression::by_name(compression).ok_or_else(|| {
            let known: Vec<&str> = Compression::BY_NAME.iter().map(|(name, _)| *name).collect();
            fail(format!(
                "compression {compression:?}: expected {}",
                known.join(" or ")
            ))
        })?;
        let mut rule_list = Vec::new();
        for rule in rules.unwrap_or_default() {
            let parsed: Rule = serde_json::from_value(Value::String(rule.clone()))
                .map_err(|_| fail(format!("rule {rule:?}: expected tool, code or math")))?;
            rule_list.push(parsed);
        }
        let path = &self.path;
        let value = py.detach(|| -> Result<Value> {
            let mut formats = Formats::builtin();
            let mut options = IngestOptions::new(source, category);
            options.rules = rule_list;
            options.format = match (format.as_deref(), mapping.as_deref()) {
                (Some(_), Some(_)) => return Err(fail("give format or mapping, not both")),
                (_, Some(mapping)) => Some(formats.load_mapping(mapping).map_err(err)?),
                (None | Some("auto"), None) => None,
                (Some(name), None) => Some(formats.get(name).map_err(err)?),
            };
            options.formats = formats;
            options.filters = match &filters {
                Some(path) => Some(Arc::new(
                    corpusdb::filters::Filters::load(path).map_err(err)?,
                )),
                None => None,
            };
            options.strict = strict;
            for file in &paths {
                if !file.is_file() {
                    return Err(fail(format!("{}: no such file", file.display())));
                }
            }
            let store = Store::open_with(
                path,
                &StoreOptions {
                    compression,
                    ..StoreOptions::default()
                },
            )
            .map_err(err)?;
            let index = Index::open_or_create(store.path(), false).map_err(err)?;
            options.keep_text = index.full_text();
            // As the CLI: no flush between files, one after the last.
            options.flush_at_end = false;
            let feed = feed_waiting(&store, &index)?;
            let mut total = ImportCounts::default();
            let mut files = Vec::new();
            for file in &paths {
                let outcome = ingest::ingest_file(&store, file, &options, &feed).map_err(err)?;
                total.add(&outcome.run);
                let mut entry = counts_json(&outcome.run);
                let extra = json!({
                    "path": file,
                    "import": outcome.import.id,
                    "format": outcome.import.format,
                    "already_done": outcome.already_done,
                    "resumed_from": outcome.resumed_from.map(|at| json!({"records": at.records, "line": at.line()})),
                    "first_rejects": outcome.first_rejects.iter().map(|(line, reason)| json!({"line": line, "reason": reason})).collect::<Vec<_>>(),
                    "notes": outcome.notes,
                    "seconds": outcome.elapsed.as_secs_f64(),
                });
                if let (Value::Object(entry), Value::Object(extra)) = (&mut entry, extra) {
                    entry.extend(extra);
                }
                files.push(entry);
            }
            store.flush().map_err(err)?;
            // Whatever the feed missed comes from the change log.
            feed.catch_up(&|_, _| {}).map_err(err)?;
            Ok(json!({"files": files, "total": counts_json(&total)}))
        })?;
        to_py(py, &value)
    }

    /// Writes the examples matching a query to `path` as `corpusdb export` does (JSONL
    /// lines or Parquet rows in `messages` shape, in insertion order, excluded examples left
    /// out). Returns the number of examples written.
    #[pyo3(signature = (query, path, format = "jsonl", with_metadata = false))]
    fn export(
        &self,
        py: Python<'_>,
        query: &str,
        path: PathBuf,
        format: &str,
        with_metadata: bool,
    ) -> Result<u64> {
        let expr = query::parse(query).map_err(err)?;
        let parquet = match format {
            "jsonl" => false,
            "parquet" => true,
            other => {
                return Err(fail(format!(
                    "format={other:?}: expected \"jsonl\" or \"parquet\""
                )))
            }
        };
        let store_path = &self.path;
        let (total, warning) = py.detach(|| -> Result<_> {
            use corpusdb::export::Selection;
            use std::io::Write;
            let (store, index, warning) = open_for_reading(store_path)?;
            let any_excluded = store.exclusions().next().is_some();
            let selection = if expr == query::Expr::All && !any_excluded {
                Selection::All
            } else {
                Selection::from_ordinals(&index.matching_ordinals(&expr).map_err(err)?)
            };
            let total = selection.len(&store).map_err(err)?;
            let file = std::fs::File::create(&path)
                .map_err(|e| fail(format!("{}: cannot create: {e}", path.display())))?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            if parquet {
                corpusdb::export::write_parquet(
                    &store,
                    &selection,
                    out,
                    with_metadata,
                    corpusdb::export::PARQUET_ROWS_PER_GROUP,
                    &|_| {},
                )
                .map_err(err)?;
            } else {
                corpusdb::export::write_jsonl(&store, &selection, &mut out, with_metadata, &|_| {})
                    .map_err(err)?;
                out.flush()
                    .map_err(|e| fail(format!("{}: {e}", path.display())))?;
            }
            Ok((total, warning))
        })?;
        warn(py, warning)?;
        Ok(total)
    }

    /// The matches of `query` as a `pyarrow.RecordBatchReader` over the Parquet export's
    /// columns (`messages` as a list of {role, content} structs, `tools`, and with
    /// `with_metadata` `_hash`, `_category` and `_sources`). The export is written to a temporary
    /// Parquet file, read into Arrow memory and the file removed; needs pyarrow.
    #[pyo3(signature = (query = "*", with_metadata = false))]
    fn to_arrow(&self, py: Python<'_>, query: &str, with_metadata: bool) -> Result<Py<PyAny>> {
        let table = self.arrow_table(py, query, with_metadata)?;
        Ok(table.call_method0("to_reader")?.unbind())
    }

    /// The matches of `query` as a Hugging Face `datasets.Dataset` (in memory, from the
    /// same Arrow table as [`to_arrow`]): its `messages` column is chat data as
    /// `apply_chat_template` and TRL take it. Needs `datasets`.
    #[pyo3(signature = (query = "*", with_metadata = false))]
    fn to_hf_dataset(&self, py: Python<'_>, query: &str, with_metadata: bool) -> Result<Py<PyAny>> {
        let table = self.arrow_table(py, query, with_metadata)?;
        let datasets = py.import("datasets")?;
        let in_memory = py
            .import("datasets.table")?
            .getattr("InMemoryTable")?
            .call1((table,))?;
        Ok(datasets.getattr("Dataset")?.call1((in_memory,))?.unbind())
    }
}

impl PyStore {
    /// The Parquet export of `query` read back as a `pyarrow.Table`.
    fn arrow_table<'py>(
        &self,
        py: Python<'py>,
        query: &str,
        with_metadata: bool,
    ) -> Result<Bound<'py, PyAny>> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let parquet = py.import("pyarrow.parquet")?;
        let path = std::env::temp_dir().join(format!(
            "corpusdb-arrow-{}-{}.parquet",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let read = self
            .export(py, query, path.clone(), "parquet", with_metadata)
            .and_then(|_| parquet.call_method1("read_table", (&path,)));
        let _ = std::fs::remove_file(&path);
        read
    }
}

/// What the batch stream shares with its builder thread.
struct Source {
    store: Store,
    plan: Plan,
    tokenizer: ChatTokenizer,
    cache: Option<TokenCache>,
    options: BatchOptions,
}

/// One batch with its tensors as flat vectors (built off the GIL).
struct Plain {
    positions: Vec<u64>,
    ordinals: Vec<u64>,
    phase: usize,
    learning_rate: f64,
    shape: (usize, usize),
    input_ids: Vec<u32>,
    labels: Vec<i64>,
    position_ids: Vec<u32>,
    segment_ids: Vec<u32>,
    cu_seqlens: Vec<u32>,
    seq_starts: Vec<u32>,
    tokens: usize,
    trained_tokens: usize,
    capacity: usize,
    truncated: usize,
    skipped: Vec<(u64, String)>,
    cached: usize,
    next: SamplerState,
}

fn plain(batch: batches::Batch) -> std::result::Result<Plain, String> {
    let flat_u32 =
        |t: &corpusdb::batches::Batch, which: &str| -> std::result::Result<Vec<u32>, String> {
            let tensor = match which {
                "input_ids" => &t.input_ids,
                "position_ids" => &t.position_ids,
                "segment_ids" => &t.segment_ids,
                "cu_seqlens" => &t.cu_seqlens,
                _ => &t.seq_starts,
            };
            tensor
                .flatten_all()
                .and_then(|t| t.to_vec1::<u32>())
                .map_err(|e| message(&e))
        };
    let shape = batch.input_ids.dims2().map_err(|e| message(&e))?;
    Ok(Plain {
        input_ids: flat_u32(&batch, "input_ids")?,
        position_ids: flat_u32(&batch, "position_ids")?,
        segment_ids: flat_u32(&batch, "segment_ids")?,
        cu_seqlens: flat_u32(&batch, "cu_seqlens")?,
        seq_starts: flat_u32(&batch, "seq_starts")?,
        labels: batch
            .labels
            .flatten_all()
            .and_then(|t| t.to_vec1::<i64>())
            .map_err(|e| message(&e))?,
        shape,
        positions: batch.positions,
        ordinals: batch.ordinals,
        phase: batch.phase,
        learning_rate: batch.learning_rate,
        tokens: batch.tokens,
        trained_tokens: batch.trained_tokens,
        capacity: batch.capacity,
        truncated: batch.truncated,
        skipped: batch.skipped,
        cached: batch.cached,
        next: batch.next,
    })
}

/// Builds the step at `at`; `None` when the plan is finished.
fn build(source: &Source, at: u64) -> std::result::Result<Option<Plain>, String> {
    match batches::batch_from(
        &source.store,
        source.cache.as_ref(),
        &source.plan,
        &source.tokenizer,
        at,
        &source.options,
    ) {
        Ok(Some(batch)) => plain(batch).map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(message(&e)),
    }
}

/// Asks the kernel for the cached tokens of this rank's examples in the next steps.
fn read_ahead(source: &Source, mut at: u64, steps: usize) {
    let Some(cache) = &source.cache else { return };
    let options = &source.options;
    let mut ordinals = Vec::new();
    for _ in 0..steps {
        let Some((start, end)) = batches::step_window(&source.plan, at, options) else {
            break;
        };
        ordinals.extend(
            (start + options.rank as u64..end)
                .step_by(options.ranks.max(1))
                .filter_map(|p| source.plan.at(p).map(|planned| planned.ordinal)),
        );
        at = end;
    }
    cache.prefetch(&ordinals);
}

type Built = std::result::Result<Option<Plain>, String>;

/// This rank's training batches of a curriculum, as `corpusdb batches` builds them, from
/// the start of the plan or a sampler state on. Yields dicts whose tensors are
/// `(bytearray, dtype, shape)` triples; use `corpusdb.Batches` for numpy arrays.
#[pyclass(module = "corpusdb._corpusdb")]
struct RawBatches {
    source: Arc<Source>,
    /// Where the consumer stands: the position after the last batch it was given.
    position: u64,
    prefetch: usize,
    queue: Option<Mutex<Receiver<Built>>>,
    done: bool,
}

impl RawBatches {
    fn next_plain(&mut self, py: Python<'_>) -> Built {
        if self.prefetch == 0 {
            let source = &self.source;
            let at = self.position;
            return py.detach(|| {
                read_ahead(source, at, 8);
                build(source, at)
            });
        }
        if self.queue.is_none() {
            let (tx, rx) = sync_channel(self.prefetch);
            let source = Arc::clone(&self.source);
            let mut at = self.position;
            std::thread::spawn(move || loop {
                read_ahead(&source, at, 8);
                let built = build(&source, at);
                let stop = !matches!(built, Ok(Some(_)));
                if let Ok(Some(batch)) = &built {
                    at = batch.next.position;
                }
                // The receiver is gone when the iterator was dropped or repositioned.
                if tx.send(built).is_err() || stop {
                    return;
                }
            });
            self.queue = Some(Mutex::new(rx));
        }
        let queue = self.queue.as_ref().expect("started above");
        py.detach(|| {
            queue
                .lock()
                .map_err(|_| "the batch builder stopped".to_string())?
                .recv()
                .unwrap_or_else(|_| Err("the batch builder stopped".to_string()))
        })
    }
}

fn buffer<'py, T: Copy>(
    py: Python<'py>,
    values: &[T],
    bytes: impl Fn(T) -> Vec<u8>,
) -> Bound<'py, PyByteArray> {
    let raw: Vec<u8> = values.iter().flat_map(|&v| bytes(v)).collect();
    PyByteArray::new(py, &raw)
}

#[pymethods]
impl RawBatches {
    #[new]
    #[pyo3(signature = (store, curriculum, tokenizer, batch_size = 8, max_seq_len = 2048, packing = true, rank = 0, world_size = 1, state = None, end_of_turn = None, prefetch = 4))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        store: PathBuf,
        curriculum: PathBuf,
        tokenizer: PathBuf,
        batch_size: usize,
        max_seq_len: usize,
        packing: bool,
        rank: usize,
        world_size: usize,
        state: Option<&Bound<'_, PyAny>>,
        end_of_turn: Option<String>,
        prefetch: usize,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(fail(format!(
                "rank {rank} must be below world_size {world_size}"
            )));
        }
        if batch_size == 0 || max_seq_len == 0 {
            return Err(fail("batch_size and max_seq_len must be at least 1"));
        }
        let state: Option<SamplerState> = match state {
            Some(state) if !state.is_none() => {
                Some(serde_json::from_value(from_py(py, state)?).map_err(|e| {
                    fail(format!(
                        "state: {e} (expected {{\"fingerprint\": str, \"position\": int}})"
                    ))
                })?)
            }
            _ => None,
        };
        let (source, position, warning) = py.detach(|| -> Result<_> {
            let curriculum = Curriculum::load(&curriculum).map_err(err)?;
            let mut tokenizer = ChatTokenizer::load(&tokenizer).map_err(err)?;
            if let Some(marker) = &end_of_turn {
                tokenizer.set_end_of_turn(marker);
            }
            tokenizer
                .require_end_of_turn()
                .map_err(|e| fail(e.0.replace("in the training config", "with end_of_turn=")))?;
            let (store, index, warning) = open_for_reading(&store)?;
            let plan = Plan::build(&index, &curriculum).map_err(err)?;
            let position = match &state {
                Some(state) => plan.resume(state).map_err(err)?,
                None => 0,
            };
            let cache = TokenCache::open(&store, &tokenizer).map_err(err)?;
            let options = BatchOptions {
                batch_size,
                max_seq_len,
                packing,
                rank,
                ranks: world_size,
            };
            Ok((
                Source {
                    store,
                    plan,
                    tokenizer,
                    cache,
                    options,
                },
                position,
                warning,
            ))
        })?;
        warn(py, warning)?;
        Ok(RawBatches {
            source: Arc::new(source),
            position,
            prefetch,
            queue: None,
            done: false,
        })
    }

    /// The plan position after the last batch returned (where a resumed run starts).
    #[getter]
    fn position(&self) -> u64 {
        self.position
    }

    /// Examples in the plan's global order (all phases, all ranks).
    #[getter]
    fn total(&self) -> u64 {
        self.source.plan.total
    }

    /// The plan's fingerprint (named in sampler states).
    #[getter]
    fn fingerprint(&self) -> String {
        self.source.plan.fingerprint.clone()
    }

    /// The sampler state after the last batch returned: {"fingerprint", "position"}.
    fn state(&self, py: Python<'_>) -> Result<Py<PyAny>> {
        to_py(py, &json!(self.source.plan.state(self.position)))
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> Result<Option<Py<PyAny>>> {
        if self.done {
            return Ok(None);
        }
        let batch = match self.next_plain(py) {
            Ok(Some(batch)) => batch,
            Ok(None) => {
                self.done = true;
                self.queue = None;
                return Ok(None);
            }
            Err(e) => {
                self.done = true;
                self.queue = None;
                return Err(fail(e));
            }
        };
        self.position = batch.next.position;
        let dict = PyDict::new(py);
        let (rows, width) = batch.shape;
        let le32 = |v: u32| v.to_le_bytes().to_vec();
        dict.set_item(
            "input_ids",
            (buffer(py, &batch.input_ids, le32), "uint32", (rows, width)),
        )?;
        dict.set_item(
            "labels",
            (
                buffer(py, &batch.labels, |v: i64| v.to_le_bytes().to_vec()),
                "int64",
                (rows, width),
            ),
        )?;
        dict.set_item(
            "position_ids",
            (
                buffer(py, &batch.position_ids, le32),
                "uint32",
                (rows, width),
            ),
        )?;
        dict.set_item(
            "segment_ids",
            (
                buffer(py, &batch.segment_ids, le32),
                "uint32",
                (rows, width),
            ),
        )?;
        dict.set_item(
            "cu_seqlens",
            (
                buffer(py, &batch.cu_seqlens, le32),
                "uint32",
                (batch.cu_seqlens.len(),),
            ),
        )?;
        dict.set_item(
            "seq_starts",
            (
                buffer(py, &batch.seq_starts, le32),
                "uint32",
                (batch.seq_starts.len(),),
            ),
        )?;
        dict.set_item("positions", batch.positions)?;
        dict.set_item("ordinals", batch.ordinals)?;
        dict.set_item("phase", batch.phase)?;
        dict.set_item("learning_rate", batch.learning_rate)?;
        dict.set_item("tokens", batch.tokens)?;
        dict.set_item("trained_tokens", batch.trained_tokens)?;
        dict.set_item("capacity", batch.capacity)?;
        dict.set_item("truncated", batch.truncated)?;
        dict.set_item("skipped", batch.skipped)?;
        dict.set_item("cached", batch.cached)?;
        dict.set_item("next", to_py(py, &json!(batch.next))?)?;
        Ok(Some(dict.into_any().unbind()))
    }
}

#[pymodule]
fn _corpusdb(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CorpusdbError", m.py().get_type::<CorpusdbError>())?;
    m.add_class::<PyStore>()?;
    m.add_class::<RawBatches>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
