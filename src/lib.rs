//! corpusdb: an embedded, storage-centric corpus database for instruction-tuning data.
//!
//! # Layout
//!
//! - [`conversation`]: the canonical conversation and its SHA-1 content hash.
//! - [`formats`]: one mapping per dataset shape, JSON record -> conversation.
//! - [`reader`]: records out of files (JSONL, JSON arrays; gzip, zstd), with positions.
//! - [`store`]: the RocksDB store; the only module that imports RocksDB.
//! - [`ingest`]: the pipeline from files into the store, resumable per record.
//! - [`index`]: the tantivy index of categories, sources and counts, and its query language.
//! - [`export`]: examples out of the store as JSONL.
//! - [`neardup`]: near-duplicate clusters (MinHash-LSH), excluded reversibly.
//! - [`manifest`]: YAML lists of files to ingest (`configs/`).
//! - [`synth`]: a deterministic generator of realistic data for benchmarks and tests.
//!
//! Lower modules never import higher ones: `conversation` <- `formats` <- `ingest`,
//! `reader` <- `ingest`, `store` <- `ingest`.
//!
//! # Example
//!
//! ```no_run
//! use corpusdb::{ingest, store::Store};
//! let store = Store::open("storage/corpus".as_ref())?;
//! let options = ingest::IngestOptions::new("dolly", "instruction");
//! let outcome = ingest::ingest_file(&store, "dolly.jsonl".as_ref(), &options, &ingest::Quiet)?;
//! assert!(outcome.import.counts.adds_up());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod analyze;
pub mod batches;
pub mod category;
pub mod conversation;
pub mod curriculum;
pub mod describe;
pub mod eval;
pub mod export;
pub mod filters;
pub mod formats;
pub mod hub;
pub mod index;
pub mod ingest;
pub mod invalid;
pub mod manifest;
pub mod model;
pub mod neardup;
pub mod reader;
pub mod registry;
pub mod reject;
pub mod report;
pub mod store;
pub mod synth;
pub mod train;
