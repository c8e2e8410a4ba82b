//! The category index: tantivy, beside the store in `<store>/index/`.
//!
//! One document per stored example: hash, ordinal, category, every source name
//! (multi-valued), message/turn/character counts, first import time, and optionally the
//! conversation text. The index is derived state: the store's change log (`changes`
//! family: one entry per new example or new provenance) says what to (re)index, and the
//! index's commit payload records how far it has read that log. Opening the index replays
//! the gap, so a crash between a store commit and an index commit never leaves them
//! disagreeing; `rebuild` recreates it from the store alone.
//!
//! An import feeds the index as it goes ([`Feed`], an [`ingest::Observer`]): each committed
//! batch's documents are built from what the import holds in memory, and the index
//! commits (after a flush makes the store's side durable) every so many changes and when
//! the import ends. The change log stays the recovery path: an index commit records the
//! log position it covers, so whatever a crash loses between the two commits is replayed
//! by the next command.

pub mod query;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tantivy::collector::{Count, TopDocs};
use tantivy::query::{
    AllQuery, BooleanQuery, EmptyQuery, Occur, Query, QueryParser, RangeQuery, TermQuery,
};
use tantivy::schema::{
    Field, IndexRecordOption, NumericOptions, OwnedValue, Schema, FAST, INDEXED, STORED, STRING,
    TEXT,
};
use tantivy::{DocAddress, Order, TantivyDocument, Term};

use crate::conversation::ContentHash;
use crate::ingest::{self, StoredBatch};
use crate::store::{self, ImportRecord, ProvenanceEntry, Store, StoredExample};

use query::{Expr, NumField, Op, TermField};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("index at {path}: {source}")]
    Tantivy {
        path: PathBuf,
        source: tantivy::TantivyError,
    },
    #[error("index at {path} is being written by another process (an import?); try again when it finishes")]
    Busy { path: PathBuf },
    #[error("free-text search needs a store created with `corpusdb init --full-text`; use field terms such as category:math")]
    NoFullText,
    #[error(transparent)]
    Query(#[from] query::ParseError),
    #[error("a plan holds ordinals below 2^32, and this store has examples past that")]
    OrdinalsBeyondU32,
}

/// What [`Index::split_selection`] returns.
#[derive(Debug, Default)]
pub struct SplitSelection {
    /// Matches with a split key below the threshold, ascending.
    pub below: Vec<u64>,
    /// The other matches, ascending.
    pub rest: Vec<u32>,
    beyond_u32: bool,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

const WRITER_BYTES: usize = 64 << 20;
/// Changes replayed between two index commits (bounds memory during a long catch-up).
const CHANGES_PER_COMMIT: usize = 200_000;
/// Changes fed by an import between two index commits. Each commit first flushes the
/// store, so it bounds the replay after a crash, not memory (tantivy's writer spills
/// segments within `WRITER_BYTES`).
const FED_CHANGES_PER_COMMIT: u64 = 500_000;

/// The layout of the index's documents, written with every commit (the third number of
/// the commit payload; indexes from before it count as 1). An index of another version is
/// rebuilt from the store's change log, as is one whose fields differ: raise it whenever
/// what a document holds changes, not only its fields.
pub const INDEX_SCHEMA_VERSION: u64 = 2;

#[derive(Clone, Copy)]
struct Fields {
    hash: Field,
    ordinal: Field,
    category: Field,
    source: Field,
    messages: Field,
    turns: Field,
    chars: Field,
    imported: Field,
    /// Names of the filters that exclude the example, plus [`EXCLUDED_MARK`].
    excluded: Field,
    /// The near-duplicate cluster id (`ClusterMembership::cluster_id`), for members of one.
    cluster: Field,
    /// The first 8 bytes of the hash, big-endian: a stable pseudo-random key per content
    /// (held-out splits are chosen by it).
    split: Field,
    text: Option<Field>,
}

/// The `excluded` value every excluded example has, whatever filters exclude it.
pub const EXCLUDED_MARK: &str = "*";

fn schema(full_text: bool) -> Schema {
    let mut builder = Schema::builder();
    // Numbers are ranges only, which tantivy answers from fast fields, so they have no
    // terms. The hash is stored, not indexed: a unique 40-character term per document
    // was most of the index's cost at import (BENCHMARKS.md); `hash:` queries go by the
    // `split` key (the hash's first 64 bits) instead.
    let number = NumericOptions::default().set_fast();
    builder.add_text_field("hash", STORED);
    builder.add_u64_field("ordinal", INDEXED | FAST | STORED);
    builder.add_text_field("category", STRING | FAST | STORED);
    builder.add_text_field("source", STRING | FAST | STORED);
    builder.add_u64_field("messages", number.clone());
    builder.add_u64_field("turns", number.clone());
    builder.add_u64_field("chars", number);
    builder.add_u64_field("imported", FAST);
    builder.add_text_field("excluded", STRING | FAST | STORED);
    builder.add_u64_field("split", FAST);
    builder.add_text_field("cluster", STRING | FAST | STORED);
    if full_text {
        builder.add_text_field("text", TEXT);
    }
    builder.build()
}

fn fields(schema: &Schema) -> Fields {
    let get = |name| {
        schema
            .get_field(name)
            .expect("the index schema has every field")
    };
    Fields {
        hash: get("hash"),
        ordinal: get("ordinal"),
        category: get("category"),
        source: get("source"),
        messages: get("messages"),
        turns: get("turns"),
        chars: get("chars"),
        imported: get("imported"),
        excluded: get("excluded"),
        split: get("split"),
        cluster: get("cluster"),
        text: schema.get_field("text").ok(),
    }
}

/// The index directory of a store.
pub fn index_dir(store_path: &Path) -> PathBuf {
    store_path.join("index")
}

pub struct Index {
    index: tantivy::Index,
    fields: Fields,
    path: PathBuf,
    /// The last searcher and the commit it was opened at: a new one opens every
    /// segment's files again, and a command asks for one per query.
    searcher: std::sync::Mutex<Option<(u64, tantivy::Searcher)>>,
}

/// One example as the index holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedExample {
    pub hash: ContentHash,
    pub ordinal: u64,
    pub category: String,
    pub sources: Vec<String>,
}

impl Index {
    /// Opens the index of a store, creating it (metadata only unless `full_text`) if absent.
    pub fn open_or_create(store_path: &Path, full_text: bool) -> Result<Index> {
        let path = index_dir(store_path);
        let error = |source| Error::Tantivy {
            path: path.clone(),
            source,
        };
        let existing = if path.join("meta.json").exists() {
            let index = tantivy::Index::open_in_dir(&path).map_err(error)?;
            // An index of an older layout is rebuilt from the store's change log.
            let current = schema(index.schema().get_field("text").is_ok());
            let version = payload_numbers(&index.load_metas().map_err(error)?.payload)[2];
            if version == INDEX_SCHEMA_VERSION
                && current
                    .fields()
                    .all(|(_, entry)| index.schema().get_field(entry.name()).is_ok())
            {
                Some(index)
            } else {
                drop(index);
                std::fs::remove_dir_all(&path).map_err(|e| {
                    error(tantivy::TantivyError::from(
                        tantivy::directory::error::OpenDirectoryError::wrap_io_error(
                            e,
                            path.clone(),
                        ),
                    ))
                })?;
                None
            }
        } else {
            None
        };
        let index = if let Some(index) = existing {
            index
        } else {
            std::fs::create_dir_all(&path).map_err(|e| {
                error(tantivy::TantivyError::from(
                    tantivy::directory::error::OpenDirectoryError::wrap_io_error(e, path.clone()),
                ))
            })?;
            tantivy::Index::create_in_dir(&path, schema(full_text)).map_err(error)?
        };
        let fields = fields(&index.schema());
        Ok(Index {
            index,
            fields,
            path,
            searcher: std::sync::Mutex::new(None),
        })
    }

    pub fn full_text(&self) -> bool {
        self.fields.text.is_some()
    }

    fn error(&self, source: tantivy::TantivyError) -> Error {
        match source {
            tantivy::TantivyError::LockFailure(..) => Error::Busy {
                path: self.path.clone(),
            },
            source => Error::Tantivy {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// How far the index has read the store's change log.
    pub fn indexed_through(&self) -> Result<u64> {
        Ok(self.payload()?.0)
    }

    /// The commit payload: `"<changes read> <ordinal bound>"`, where no example with an
    /// ordinal at or above the bound is in the index (so adding it needs no delete).
    fn payload(&self) -> Result<(u64, u64)> {
        let metas = self.index.load_metas().map_err(|e| self.error(e))?;
        let [through, bound, _] = payload_numbers(&metas.payload);
        Ok((through, bound))
    }

    /// Indexes every change the store has that the index has not seen; returns how many
    /// changes were replayed. Needs the index's writer lock (`Error::Busy` if taken).
    pub fn catch_up(&self, store: &Store, progress: &dyn Fn(u64, u64)) -> Result<u64> {
        // A reader of an index that is up to date takes no lock.
        if self.payload()?.0 >= store.counters()?.changes {
            return Ok(0);
        }
        self.feed(store)?.catch_up(progress)
    }

    /// Takes the index's writer (`Error::Busy` if another process holds it) to feed it
    /// from an import and the store's change log until the [`Feed`] is dropped.
    pub fn feed<'a>(&'a self, store: &'a Store) -> Result<Feed<'a>> {
        let writer = self
            .index
            .writer::<TantivyDocument>(WRITER_BYTES)
            .map_err(|e| self.error(e))?;
        // Read under the lock: no other process commits from here on.
        let (through, bound) = self.payload()?;
        Ok(Feed {
            index: self,
            store,
            state: Mutex::new(FeedState {
                writer,
                through,
                bound,
                committed: through,
                imports: imports_by_id(store)?,
                marks: None,
                behind: false,
            }),
        })
    }

    /// (Re)indexes the examples of `chunk` in hash order, so the store reads each table
    /// block once; returns the new ordinal bound.
    fn index_chunk(
        &self,
        writer: &tantivy::IndexWriter<TantivyDocument>,
        store: &Store,
        imports: &HashMap<u32, ImportRecord>,
        marks: &Marks,
        chunk: &mut Vec<ContentHash>,
        bound: u64,
    ) -> Result<u64> {
        chunk.sort_unstable();
        chunk.dedup();
        let mut new_bound = bound;
        let mut failure = None;
        let mut provenance = store.provenance_cursor();
        store.for_each_sorted(chunk, |hash, example| {
            if example.ordinal < bound {
                writer.delete_term(Term::from_field_u64(self.fields.ordinal, example.ordinal));
            }
            new_bound = new_bound.max(example.ordinal + 1);
            let sources = source_names(&provenance.get(hash)?, imports);
            let doc = self.stored_document(hash, &example, &sources, imports, marks);
            if let Err(e) = writer.add_document(doc) {
                failure.get_or_insert(e);
            }
            Ok(())
        })?;
        chunk.clear();
        match failure {
            Some(e) => Err(self.error(e)),
            None => Ok(new_bound),
        }
    }

    /// The document of a stored example (its sources from the whole provenance).
    fn stored_document(
        &self,
        hash: &ContentHash,
        example: &StoredExample,
        sources: &BTreeSet<String>,
        imports: &HashMap<u32, ImportRecord>,
        marks: &Marks,
    ) -> TantivyDocument {
        let facts = Facts {
            hash,
            ordinal: example.ordinal,
            category: &example.category,
            messages: example.conversation.messages.len() as u64,
            turns: u64::from(example.turns),
            chars: example.chars,
            imported: imports
                .get(&example.first_import)
                .map_or(0, |i| i.started_unix),
            excluded: marks.excluded.get(hash),
            cluster: marks.clusters.get(hash).map(String::as_str),
        };
        self.document(
            &facts,
            sources.iter().map(String::as_str),
            example
                .conversation
                .messages
                .iter()
                .map(|m| m.content.as_str()),
        )
    }

    /// One example's document, whether its facts come from the store or from an import.
    fn document<'s, 't>(
        &self,
        facts: &Facts,
        sources: impl IntoIterator<Item = &'s str>,
        texts: impl IntoIterator<Item = &'t str>,
    ) -> TantivyDocument {
        let f = &self.fields;
        let mut doc = TantivyDocument::default();
        doc.add_text(f.hash, facts.hash.to_hex());
        doc.add_u64(f.ordinal, facts.ordinal);
        doc.add_u64(f.split, split_key(facts.hash));
        doc.add_text(f.category, facts.category);
        for source in sources {
            doc.add_text(f.source, source);
        }
        doc.add_u64(f.messages, facts.messages);
        doc.add_u64(f.turns, facts.turns);
        doc.add_u64(f.chars, facts.chars);
        doc.add_u64(f.imported, facts.imported);
        if let Some(filters) = facts.excluded.filter(|f| !f.is_empty()) {
            doc.add_text(f.excluded, EXCLUDED_MARK);
            for filter in filters {
                doc.add_text(f.excluded, filter);
            }
        }
        if let Some(cluster) = facts.cluster {
            doc.add_text(f.cluster, cluster);
        }
        if let Some(text) = f.text {
            for content in texts {
                doc.add_text(text, content);
            }
        }
        doc
    }

    /// Drops every document and indexes the store from scratch (in insertion order).
    pub fn rebuild(&self, store: &Store, progress: &dyn Fn(u64, u64)) -> Result<u64> {
        let counters = store.counters()?;
        let imports = imports_by_id(store)?;
        let mut writer = self
            .index
            .writer::<TantivyDocument>(WRITER_BYTES)
            .map_err(|e| self.error(e))?;
        writer.delete_all_documents().map_err(|e| self.error(e))?;
        let marks = Marks::read(store)?;
        let mut done = 0u64;
        let mut failure = None;
        // Bodies are read in ordinal order, so sources come from one read of the
        // provenance ahead (only examples with several; one entry is the first import).
        let multi_sourced = store.multi_sourced()?;
        let source_of = |id: &u32| imports.get(id).map(|i| i.source.clone());
        store.for_each_example(|hash, example| {
            let sources: BTreeSet<String> = match multi_sourced.get(hash) {
                Some(ids) => ids.iter().filter_map(source_of).collect(),
                None => source_of(&example.first_import).into_iter().collect(),
            };
            let doc = self.stored_document(hash, &example, &sources, &imports, &marks);
            if let Err(e) = writer.add_document(doc) {
                failure.get_or_insert(e);
            }
            done += 1;
            if done.is_multiple_of(10_000) {
                progress(done, counters.examples);
            }
            Ok(())
        })?;
        if let Some(e) = failure {
            return Err(self.error(e));
        }
        commit(&mut writer, counters.changes, counters.examples).map_err(|e| self.error(e))?;
        progress(done, counters.examples);
        Ok(done)
    }

    /// A searcher of the last commit (the one already open when nothing was committed
    /// since).
    fn searcher(&self) -> Result<tantivy::Searcher> {
        let opstamp = self.index.load_metas().map_err(|e| self.error(e))?.opstamp;
        let mut last = self.searcher.lock().expect("no panic while holding it");
        if let Some((seen, searcher)) = &*last {
            if *seen == opstamp {
                return Ok(searcher.clone());
            }
        }
        let reader: tantivy::IndexReader = self
            .index
            .reader_builder()
            .reload_policy(tantivy::ReloadPolicy::Manual)
            .try_into()
            .map_err(|e| self.error(e))?;
        // A commit between the two reads makes this searcher newer than `opstamp`: the
        // next call opens another, never uses an older one.
        let searcher = reader.searcher();
        *last = Some((opstamp, searcher.clone()));
        Ok(searcher)
    }

    /// Number of examples matching `expr`.
    pub fn count(&self, expr: &Expr) -> Result<u64> {
        let query = self.compile_visible(expr)?;
        let searcher = self.searcher()?;
        Ok(searcher.search(&query, &Count).map_err(|e| self.error(e))? as u64)
    }

    /// Examples matching `expr` in insertion order, skipping `offset`, at most `limit`.
    pub fn search(&self, expr: &Expr, offset: usize, limit: usize) -> Result<Vec<IndexedExample>> {
        self.documents_from(&*self.compile_visible(expr)?, offset, limit)
    }

    fn documents_from(
        &self,
        query: &dyn Query,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<IndexedExample>> {
        let searcher = self.searcher()?;
        let collector = TopDocs::with_limit(limit.max(1))
            .and_offset(offset)
            .order_by_fast_field::<u64>("ordinal", Order::Asc);
        let hits: Vec<(Option<u64>, DocAddress)> = searcher
            .search(query, &collector)
            .map_err(|e| self.error(e))?;
        let mut out = Vec::with_capacity(hits.len());
        for (_, address) in hits.into_iter().take(limit) {
            let doc: TantivyDocument = searcher.doc(address).map_err(|e| self.error(e))?;
            out.push(self.indexed(&doc));
        }
        Ok(out)
    }

    fn indexed(&self, doc: &TantivyDocument) -> IndexedExample {
        let text = |field| -> Vec<String> {
            doc.get_all(field)
                .filter_map(|v| match OwnedValue::from(v) {
                    OwnedValue::Str(s) => Some(s),
                    _ => None,
                })
                .collect()
        };
        let hash = text(self.fields.hash)
            .first()
            .and_then(|h| h.parse().ok())
            .unwrap_or(ContentHash([0; 20]));
        let ordinal = doc
            .get_first(self.fields.ordinal)
            .and_then(|v| match OwnedValue::from(v) {
                OwnedValue::U64(n) => Some(n),
                _ => None,
            })
            .unwrap_or(0);
        IndexedExample {
            hash,
            ordinal,
            category: text(self.fields.category)
                .into_iter()
                .next()
                .unwrap_or_default(),
            sources: text(self.fields.source),
        }
    }

    /// Ordinals of every example matching `expr`, ascending: the streaming order of
    /// exports and selections (8 bytes per match, no per-document allocation).
    pub fn matching_ordinals(&self, expr: &Expr) -> Result<Vec<u64>> {
        let query = self.compile_visible(expr)?;
        let searcher = self.searcher()?;
        searcher
            .search(&query, &OrdinalCollector)
            .map_err(|e| self.error(e))
    }

    /// Every visible match of `expr`, split by its `split` key (the first 64 bits of the
    /// content hash): the ordinals whose key is below `threshold` and those at or above
    /// it, both ascending. Plans keep the second part as `u32` (4 bytes a match, built
    /// without a larger intermediate: at 10M examples a plan scans the whole index).
    pub fn split_selection(&self, expr: &Expr, threshold: u64) -> Result<SplitSelection> {
        let query = self.compile_visible(expr)?;
        let searcher = self.searcher()?;
        let split = searcher
            .search(&query, &SplitCollector { threshold })
            .map_err(|e| self.error(e))?;
        if split.beyond_u32 {
            return Err(Error::OrdinalsBeyondU32);
        }
        Ok(split)
    }

    /// Examples per value of a term field (category, source, excluded), excluded
    /// examples left out (but counted for `excluded` itself).
    pub fn facet(&self, field: TermField) -> Result<BTreeMap<String, u64>> {
        let mut counts = self.facet_all(field)?;
        if field == TermField::Excluded {
            return Ok(counts);
        }
        let searcher = self.searcher()?;
        let hidden = searcher
            .search(
                &self.excluded_query(),
                &FacetCollector {
                    field: field.name(),
                },
            )
            .map_err(|e| self.error(e))?;
        for (value, n) in hidden {
            if let Some(count) = counts.get_mut(&value) {
                *count -= n.min(*count);
                if *count == 0 {
                    counts.remove(&value);
                }
            }
        }
        Ok(counts)
    }

    /// Live documents per value of a term field, excluded examples included.
    pub fn facet_all(&self, field: TermField) -> Result<BTreeMap<String, u64>> {
        let searcher = self.searcher()?;
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let schema_field = self.term_field(field);
        for segment in searcher.segment_readers() {
            if !segment.has_deletes() {
                // Without deletions the term dictionary's document frequencies are exact:
                // O(distinct values), independent of the number of documents.
                let inverted = segment
                    .inverted_index(schema_field)
                    .map_err(|e| self.error(e))?;
                let mut terms = inverted
                    .terms()
                    .stream()
                    .map_err(|e| self.error(e.into()))?;
                while terms.advance() {
                    let value = String::from_utf8_lossy(terms.key()).into_owned();
                    *counts.entry(value).or_default() += u64::from(terms.value().doc_freq);
                }
                continue;
            }
            let Some(column) = segment
                .fast_fields()
                .str(field.name())
                .map_err(|e| self.error(e))?
            else {
                continue;
            };
            let mut per_ord = vec![0u64; column.num_terms()];
            let alive = segment.alive_bitset();
            for doc in 0..segment.max_doc() {
                if alive.is_some_and(|bits| !bits.is_alive(doc)) {
                    continue;
                }
                for ord in column.term_ords(doc) {
                    per_ord[ord as usize] += 1;
                }
            }
            let mut value = String::new();
            for (ord, count) in per_ord.into_iter().enumerate() {
                if count > 0
                    && column
                        .ord_to_str(ord as u64, &mut value)
                        .map_err(|e| self.error(e.into()))?
                {
                    *counts.entry(value.clone()).or_default() += count;
                }
            }
        }
        Ok(counts)
    }

    /// Live documents in the index.
    pub fn num_docs(&self) -> Result<u64> {
        Ok(self.searcher()?.num_docs())
    }

    fn term_field(&self, field: TermField) -> Field {
        match field {
            TermField::Category => self.fields.category,
            TermField::Source => self.fields.source,
            // Not indexed: `compile` turns hash terms into ranges of the split key.
            TermField::Hash => self.fields.hash,
            TermField::Excluded => self.fields.excluded,
            TermField::Cluster => self.fields.cluster,
        }
    }

    /// `expr` as a query that leaves out excluded examples, unless it asks about
    /// exclusions or names a hash or a cluster (whose members are mostly excluded).
    fn compile_visible(&self, expr: &Expr) -> Result<Box<dyn Query>> {
        let query = self.compile(expr)?;
        if expr.mentions(TermField::Excluded)
            || expr.mentions(TermField::Hash)
            || expr.mentions(TermField::Cluster)
        {
            return Ok(query);
        }
        Ok(Box::new(BooleanQuery::new(vec![
            (Occur::Must, query),
            (Occur::MustNot, Box::new(self.excluded_query())),
        ])))
    }

    /// The document of one ordinal, from the term index (a range would scan the column).
    fn ordinal_query(&self, ordinal: u64) -> TermQuery {
        TermQuery::new(
            Term::from_field_u64(self.fields.ordinal, ordinal),
            IndexRecordOption::Basic,
        )
    }

    fn excluded_query(&self) -> TermQuery {
        TermQuery::new(
            Term::from_field_text(self.fields.excluded, EXCLUDED_MARK),
            IndexRecordOption::Basic,
        )
    }

    fn compile(&self, expr: &Expr) -> Result<Box<dyn Query>> {
        let f = &self.fields;
        Ok(match expr {
            Expr::All => Box::new(AllQuery),
            Expr::Term {
                field: TermField::Hash,
                value,
            } => match split_key_range(value) {
                Some((low, high)) => Box::new(RangeQuery::new(
                    Bound::Included(Term::from_field_u64(f.split, low)),
                    Bound::Included(Term::from_field_u64(f.split, high)),
                )),
                None => Box::new(EmptyQuery),
            },
            Expr::Term { field, value } => {
                let field = self.term_field(*field);
                Box::new(TermQuery::new(
                    Term::from_field_text(field, value),
                    IndexRecordOption::Basic,
                ))
            }
            Expr::Range {
                field: NumField::Ordinal,
                op: Op::Eq,
                value,
            } => Box::new(self.ordinal_query(*value)),
            Expr::Range { field, op, value } => {
                let field = match field {
                    NumField::Chars => f.chars,
                    NumField::Turns => f.turns,
                    NumField::Messages => f.messages,
                    NumField::Ordinal => f.ordinal,
                };
                let term = Term::from_field_u64(field, *value);
                let (lower, upper) = match op {
                    Op::Lt => (Bound::Unbounded, Bound::Excluded(term)),
                    Op::Le => (Bound::Unbounded, Bound::Included(term)),
                    Op::Gt => (Bound::Excluded(term), Bound::Unbounded),
                    Op::Ge => (Bound::Included(term), Bound::Unbounded),
                    Op::Eq => (Bound::Included(term.clone()), Bound::Included(term)),
                };
                Box::new(RangeQuery::new(lower, upper))
            }
            Expr::Text(text) => {
                let field = f.text.ok_or(Error::NoFullText)?;
                let parser = QueryParser::for_index(&self.index, vec![field]);
                let quoted = format!("\"{}\"", text.replace(['"', '\\'], " "));
                parser
                    .parse_query(&quoted)
                    .map_err(|e| self.error(e.into()))?
            }
            Expr::Not(inner) => Box::new(BooleanQuery::new(vec![
                (Occur::Must, Box::new(AllQuery) as Box<dyn Query>),
                (Occur::MustNot, self.compile(inner)?),
            ])),
            Expr::And(parts) => Box::new(BooleanQuery::new(
                parts
                    .iter()
                    .map(|p| Ok((Occur::Must, self.compile(p)?)))
                    .collect::<Result<_>>()?,
            )),
            Expr::Or(parts) => Box::new(BooleanQuery::new(
                parts
                    .iter()
                    .map(|p| Ok((Occur::Should, self.compile(p)?)))
                    .collect::<Result<_>>()?,
            )),
        })
    }
}

/// What one document says about an example.
struct Facts<'a> {
    hash: &'a ContentHash,
    ordinal: u64,
    category: &'a str,
    messages: u64,
    turns: u64,
    chars: u64,
    /// When its first import started (unix seconds).
    imported: u64,
    /// The filters that exclude it.
    excluded: Option<&'a Vec<String>>,
    /// Its near-duplicate cluster.
    cluster: Option<&'a str>,
}

/// The index's writer, held while an import runs ([`Index::feed`]). As an
/// [`ingest::Observer`] it indexes each committed batch from what the import holds in
/// memory; [`Feed::catch_up`] replays the store's change log for whatever it was not
/// given. Nothing is visible to readers before [`Feed::commit`] or `catch_up`; dropping a
/// feed drops what it did not commit (the change log still has it).
pub struct Feed<'a> {
    index: &'a Index,
    store: &'a Store,
    state: Mutex<FeedState>,
}

struct FeedState {
    writer: tantivy::IndexWriter<TantivyDocument>,
    /// Changes of the store's log indexed so far, committed or not.
    through: u64,
    /// No example with an ordinal at or above it is indexed, committed or not.
    bound: u64,
    /// `through` at the last commit.
    committed: u64,
    imports: HashMap<u32, ImportRecord>,
    /// The store's exclusions and clusters, read when first needed: they cannot change
    /// while an import holds the store.
    marks: Option<Marks>,
    /// A batch was not indexed (it did not start where the index stands, or tantivy
    /// failed): later batches are left to `catch_up`, which reads them from the store.
    behind: bool,
}

impl Feed<'_> {
    /// Replays the store's change log from where the index stands (what was fed
    /// included) and commits; returns how many changes were replayed.
    pub fn catch_up(&self, progress: &dyn Fn(u64, u64)) -> Result<u64> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *guard;
        let from = state.through;
        let to = self.store.counters()?.changes;
        if from >= to {
            if state.committed != state.through {
                self.commit_state(state)?;
            }
            return Ok(0);
        }
        let index = self.index;
        let marks = Marks::read(self.store)?;
        state.imports = imports_by_id(self.store)?;
        let mut chunk = Vec::new();
        let mut replayed = 0u64;
        for change in self.store.changes_from(from) {
            let (sequence, hash) = change?;
            if sequence >= to {
                break;
            }
            chunk.push(hash);
            replayed += 1;
            if chunk.len() >= CHANGES_PER_COMMIT {
                state.bound = index.index_chunk(
                    &state.writer,
                    self.store,
                    &state.imports,
                    &marks,
                    &mut chunk,
                    state.bound,
                )?;
                state.through = sequence + 1;
                self.commit_state(state)?;
                progress(sequence + 1 - from, to - from);
            }
        }
        state.bound = index.index_chunk(
            &state.writer,
            self.store,
            &state.imports,
            &marks,
            &mut chunk,
            state.bound,
        )?;
        // Kept for batches fed afterwards.
        state.marks = Some(marks);
        state.through = to;
        state.behind = false;
        self.commit_state(state)?;
        progress(to - from, to - from);
        Ok(replayed)
    }

    /// Makes what was fed visible and durable, after flushing the store so that the
    /// index never covers changes the store could still lose.
    pub fn commit(&self) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.commit_state(&mut state)
    }

    /// How far the index has read the store's change log, committed or not.
    pub fn indexed_through(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).through
    }

    fn commit_state(&self, state: &mut FeedState) -> Result<()> {
        self.store.flush()?;
        commit(&mut state.writer, state.through, state.bound).map_err(|e| self.index.error(e))?;
        state.committed = state.through;
        Ok(())
    }

    /// Indexes one committed batch: new examples from the import's facts, examples that
    /// gained a source from the store (their documents list every source).
    fn add(&self, state: &mut FeedState, batch: &StoredBatch) -> Result<()> {
        let index = self.index;
        // Raised first: if this batch is replayed after a failure, its documents are
        // replaced, not added twice.
        if let Some(last) = batch.added.last() {
            state.bound = state.bound.max(last.ordinal + 1);
        }
        state
            .imports
            .entry(batch.import.id)
            .or_insert_with(|| batch.import.clone());
        let source = batch.import.source.as_str();
        let mut from_store = batch.gained_source.clone();
        for example in &batch.added {
            if index.full_text() && example.texts.is_none() {
                from_store.push(example.hash);
                continue;
            }
            // A new example has no exclusions and no cluster: filters and near-duplicate
            // detection only mark stored examples.
            let facts = Facts {
                hash: &example.hash,
                ordinal: example.ordinal,
                category: example.category,
                messages: u64::from(example.messages),
                turns: u64::from(example.turns),
                chars: example.chars,
                imported: batch.import.started_unix,
                excluded: None,
                cluster: None,
            };
            let texts = example.texts.iter().flatten().map(String::as_str);
            let doc = index.document(&facts, [source], texts);
            state.writer.add_document(doc).map_err(|e| index.error(e))?;
        }
        if !from_store.is_empty() {
            let marks = match &mut state.marks {
                Some(marks) => marks,
                none => none.insert(Marks::read(self.store)?),
            };
            state.bound = index.index_chunk(
                &state.writer,
                self.store,
                &state.imports,
                marks,
                &mut from_store,
                state.bound,
            )?;
        }
        Ok(())
    }
}

impl ingest::Observer for Feed<'_> {
    fn batch_stored(&self, batch: &StoredBatch) {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *guard;
        let expected = (batch.added.len() + batch.gained_source.len()) as u64;
        if state.behind
            || batch.changes.start != state.through
            || batch.changes.end - batch.changes.start != expected
        {
            state.behind = true;
            return;
        }
        if self.add(state, batch).is_err() {
            state.behind = true;
            return;
        }
        state.through = batch.changes.end;
        if state.through - state.committed >= FED_CHANGES_PER_COMMIT
            && self.commit_state(state).is_err()
        {
            state.behind = true;
        }
    }
}

/// The split key of a hash: its first 8 bytes, big-endian.
pub fn split_key(hash: &ContentHash) -> u64 {
    u64::from_be_bytes(hash.as_bytes()[..8].try_into().expect("20 bytes"))
}

/// The split keys a `hash:` value covers: its first 16 hex digits, the rest of the key
/// free (a whole SHA-1 or a prefix; the query parser checks the digits).
fn split_key_range(hex: &str) -> Option<(u64, u64)> {
    let digits = hex.get(..hex.len().min(16))?;
    let padded = |fill: char| {
        let mut key = digits.to_string();
        key.extend(std::iter::repeat_n(fill, 16 - digits.len()));
        u64::from_str_radix(&key, 16).ok()
    };
    Some((padded('0')?, padded('f')?))
}

/// Collects the ordinals of every match, split by their `split` key.
struct SplitCollector {
    threshold: u64,
}

struct SplitSegmentCollector {
    threshold: u64,
    ordinal: tantivy::columnar::Column<u64>,
    split: tantivy::columnar::Column<u64>,
    out: SplitSelection,
}

impl tantivy::collector::Collector for SplitCollector {
    type Fruit = SplitSelection;
    type Child = SplitSegmentCollector;

    fn for_segment(
        &self,
        _segment: tantivy::SegmentOrdinal,
        reader: &tantivy::SegmentReader,
    ) -> tantivy::Result<SplitSegmentCollector> {
        Ok(SplitSegmentCollector {
            threshold: self.threshold,
            ordinal: reader.fast_fields().u64("ordinal")?,
            split: reader.fast_fields().u64("split")?,
            out: SplitSelection {
                // Room for every live document: pages a narrow query never touches are
                // never faulted in, and a wide one is not copied as it grows.
                rest: Vec::with_capacity(reader.num_docs() as usize),
                ..SplitSelection::default()
            },
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<SplitSelection>) -> tantivy::Result<SplitSelection> {
        let beyond_u32 = fruits.iter().any(|f| f.beyond_u32);
        let (below, rest): (Vec<_>, Vec<_>) = fruits.into_iter().map(|f| (f.below, f.rest)).unzip();
        Ok(SplitSelection {
            below: merge_sorted_runs(below),
            rest: merge_sorted_runs(rest),
            beyond_u32,
        })
    }
}

impl tantivy::collector::SegmentCollector for SplitSegmentCollector {
    type Fruit = SplitSelection;

    fn collect(&mut self, doc: tantivy::DocId, _score: tantivy::Score) {
        self.collect_block(&[doc]);
    }

    /// A block of matches at a time: the columns decode it in one call each.
    fn collect_block(&mut self, docs: &[tantivy::DocId]) {
        let mut ordinals = [None; tantivy::COLLECT_BLOCK_BUFFER_LEN];
        let mut splits = [None; tantivy::COLLECT_BLOCK_BUFFER_LEN];
        for docs in docs.chunks(tantivy::COLLECT_BLOCK_BUFFER_LEN) {
            let (ordinals, splits) = (&mut ordinals[..docs.len()], &mut splits[..docs.len()]);
            ordinals.fill(None);
            splits.fill(None);
            self.ordinal.first_vals(docs, ordinals);
            self.split.first_vals(docs, splits);
            for (&ordinal, &split) in ordinals.iter().zip(splits.iter()) {
                let (Some(ordinal), Some(split)) = (ordinal, split) else {
                    continue;
                };
                if split < self.threshold {
                    self.out.below.push(ordinal);
                } else if let Ok(ordinal) = u32::try_from(ordinal) {
                    self.out.rest.push(ordinal);
                } else {
                    self.out.beyond_u32 = true;
                }
            }
        }
    }

    fn harvest(self) -> SplitSelection {
        self.out
    }
}

/// The segments' matches in one ascending list. Documents are added in ordinal order, so
/// each segment's matches are an ascending run, and ordered by their first element the
/// runs are usually the answer already. Merged segments interleave (tantivy merges
/// segments of similar sizes, not neighbours): then ordinals, unique and dense, go
/// through a bitmap (a bit per ordinal up to the largest, read back in order), which at
/// millions of matches takes a fraction of a sort's time.
fn merge_sorted_runs<T>(mut runs: Vec<Vec<T>>) -> Vec<T>
where
    T: Copy + Ord + Into<u64> + TryFrom<u64>,
{
    if runs.len() == 1 && runs[0].is_sorted() {
        return runs.pop().expect("one run");
    }
    runs.sort_by_key(|run| run.first().copied());
    let mut all = Vec::with_capacity(runs.iter().map(Vec::len).sum());
    for run in &runs {
        all.extend_from_slice(run);
    }
    if all.is_sorted() {
        return all;
    }
    let largest: u64 = all.iter().max().copied().map_or(0, Into::into);
    if largest / 64 > all.len() as u64 {
        // Too sparse for a bitmap to pay.
        all.sort_unstable();
        return all;
    }
    let mut bits = vec![0u64; (largest / 64 + 1) as usize];
    for &ordinal in &all {
        let ordinal: u64 = ordinal.into();
        bits[(ordinal / 64) as usize] |= 1 << (ordinal % 64);
    }
    all.clear();
    for (word_index, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let ordinal = word_index as u64 * 64 + u64::from(word.trailing_zeros());
            all.push(
                T::try_from(ordinal)
                    .ok()
                    .expect("an ordinal read back fits its type"),
            );
            word &= word - 1;
        }
    }
    all
}

/// Counts the values of a string fast field over the matches.
struct FacetCollector {
    field: &'static str,
}

struct FacetSegmentCollector {
    column: Option<tantivy::columnar::StrColumn>,
    per_ord: Vec<u64>,
}

impl tantivy::collector::Collector for FacetCollector {
    type Fruit = BTreeMap<String, u64>;
    type Child = FacetSegmentCollector;

    fn for_segment(
        &self,
        _segment: tantivy::SegmentOrdinal,
        reader: &tantivy::SegmentReader,
    ) -> tantivy::Result<FacetSegmentCollector> {
        let column = reader.fast_fields().str(self.field)?;
        let terms = column.as_ref().map_or(0, |c| c.num_terms());
        Ok(FacetSegmentCollector {
            column,
            per_ord: vec![0; terms],
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(
        &self,
        fruits: Vec<BTreeMap<String, u64>>,
    ) -> tantivy::Result<BTreeMap<String, u64>> {
        let mut all = BTreeMap::new();
        for fruit in fruits {
            for (value, n) in fruit {
                *all.entry(value).or_default() += n;
            }
        }
        Ok(all)
    }
}

impl tantivy::collector::SegmentCollector for FacetSegmentCollector {
    type Fruit = BTreeMap<String, u64>;

    fn collect(&mut self, doc: tantivy::DocId, _score: tantivy::Score) {
        if let Some(column) = &self.column {
            for ord in column.term_ords(doc) {
                self.per_ord[ord as usize] += 1;
            }
        }
    }

    fn harvest(self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Some(column) = &self.column {
            let mut value = String::new();
            for (ord, n) in self.per_ord.into_iter().enumerate() {
                if n > 0 && column.ord_to_str(ord as u64, &mut value).unwrap_or(false) {
                    out.insert(value.clone(), n);
                }
            }
        }
        out
    }
}

/// Collects the `ordinal` fast field of every match.
struct OrdinalCollector;

struct OrdinalSegmentCollector {
    column: tantivy::columnar::Column<u64>,
    ordinals: Vec<u64>,
}

impl tantivy::collector::Collector for OrdinalCollector {
    type Fruit = Vec<u64>;
    type Child = OrdinalSegmentCollector;

    fn for_segment(
        &self,
        _segment: tantivy::SegmentOrdinal,
        reader: &tantivy::SegmentReader,
    ) -> tantivy::Result<OrdinalSegmentCollector> {
        Ok(OrdinalSegmentCollector {
            column: reader.fast_fields().u64("ordinal")?,
            ordinals: Vec::new(),
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<Vec<u64>>) -> tantivy::Result<Vec<u64>> {
        Ok(merge_sorted_runs(fruits))
    }
}

impl tantivy::collector::SegmentCollector for OrdinalSegmentCollector {
    type Fruit = Vec<u64>;

    fn collect(&mut self, doc: tantivy::DocId, _score: tantivy::Score) {
        if let Some(ordinal) = self.column.first(doc) {
            self.ordinals.push(ordinal);
        }
    }

    fn harvest(self) -> Vec<u64> {
        self.ordinals
    }
}

/// The commit payload's numbers: changes indexed, the ordinal bound, and the schema
/// version (1 when absent: written before versions; the current one when there is no
/// commit yet).
fn payload_numbers(payload: &Option<String>) -> [u64; 3] {
    let Some(payload) = payload else {
        return [0, 0, INDEX_SCHEMA_VERSION];
    };
    let mut numbers = payload
        .split_whitespace()
        .map(|n| n.parse::<u64>().unwrap_or(0));
    [
        numbers.next().unwrap_or(0),
        numbers.next().unwrap_or(0),
        numbers.next().unwrap_or(1),
    ]
}

fn commit(
    writer: &mut tantivy::IndexWriter<TantivyDocument>,
    through: u64,
    bound: u64,
) -> tantivy::Result<()> {
    let mut prepared = writer.prepare_commit()?;
    prepared.set_payload(&format!("{through} {bound} {INDEX_SCHEMA_VERSION}"));
    prepared.commit()?;
    Ok(())
}

/// What the store marks on examples after their import: the filters excluding each
/// excluded example and the near-duplicate cluster of each clustered one (small sets
/// next to the store, read whole).
#[derive(Default)]
struct Marks {
    excluded: HashMap<ContentHash, Vec<String>>,
    clusters: HashMap<ContentHash, String>,
}

impl Marks {
    fn read(store: &Store) -> Result<Marks> {
        let mut marks = Marks::default();
        for item in store.exclusions() {
            let (hash, exclusion) = item?;
            marks
                .excluded
                .entry(hash)
                .or_default()
                .push(exclusion.filter);
        }
        for item in store.cluster_memberships() {
            let (hash, membership) = item?;
            marks.clusters.insert(hash, membership.cluster_id());
        }
        Ok(marks)
    }
}

fn imports_by_id(store: &Store) -> Result<HashMap<u32, ImportRecord>> {
    Ok(store.imports()?.into_iter().map(|i| (i.id, i)).collect())
}

fn source_names(
    provenance: &[ProvenanceEntry],
    imports: &HashMap<u32, ImportRecord>,
) -> BTreeSet<String> {
    provenance
        .iter()
        .filter_map(|p| imports.get(&p.import_id).map(|i| i.source.clone()))
        .collect()
}

/// What `check` found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub store_examples: u64,
    pub index_documents: u64,
    pub sampled: u64,
    /// Human-readable disagreements; empty when store and index agree.
    pub problems: Vec<String>,
}

/// Compares the index with the store: document and per-category counts, then `sample`
/// documents spread evenly over the insertion order, field by field.
pub fn check(store: &Store, index: &Index, sample: u64) -> Result<CheckReport> {
    let counters = store.counters()?;
    let mut report = CheckReport {
        store_examples: counters.examples,
        index_documents: index.num_docs()?,
        ..CheckReport::default()
    };
    if report.store_examples != report.index_documents {
        report.problems.push(format!(
            "the store has {} examples, the index {} documents",
            report.store_examples, report.index_documents
        ));
    }
    let indexed = index.facet_all(TermField::Category)?;
    for (category, &count) in &counters.categories {
        let found = indexed.get(category).copied().unwrap_or(0);
        if found != count {
            report
                .problems
                .push(format!("category {category}: store {count}, index {found}"));
        }
    }
    for (category, &found) in &indexed {
        if !counters.categories.contains_key(category) {
            report
                .problems
                .push(format!("category {category}: store 0, index {found}"));
        }
    }
    let imports = imports_by_id(store)?;
    let step = (counters.examples / sample.max(1)).max(1);
    for entry in store
        .ordinals()
        .step_by(step as usize)
        .take(sample as usize)
    {
        let (ordinal, hash) = entry?;
        report.sampled += 1;
        let hits = index.documents_from(&index.ordinal_query(ordinal), 0, 2)?;
        let Some(example) = store.get(&hash)? else {
            report.problems.push(format!(
                "ordinal {ordinal} points to {hash}, which the store lacks"
            ));
            continue;
        };
        let sources: Vec<String> = source_names(&store.provenance(&hash)?, &imports)
            .into_iter()
            .collect();
        let expected = IndexedExample {
            hash,
            ordinal,
            category: example.category,
            sources,
        };
        match hits.as_slice() {
            [one] if *one == expected => {}
            [one] => report.problems.push(format!(
                "{hash}: store says {expected:?}, index says {one:?}"
            )),
            [] => report
                .problems
                .push(format!("{hash}: in the store, not in the index")),
            _ => report
                .problems
                .push(format!("{hash}: indexed more than once")),
        }
    }
    Ok(report)
}
