//! `corpusdb ingest`: import files (or a manifest of them) with a progress bar.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use corpusdb::formats::Format;
use corpusdb::ingest::{self, IngestOptions, Observer};
use corpusdb::manifest::Manifest;
use corpusdb::reader::{human_bytes, Position};
use corpusdb::store::{ImportCounts, Store, StoreOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Import JSONL / JSON-array files (optionally .gz or .zst) into the store.
///
/// Each file is one import, identified by --source and the file's content fingerprint:
/// running it again does nothing, and an interrupted import continues from its last
/// committed record. Records that cannot be read go to the rejects ledger (see
/// `corpusdb rejects`) and the import goes on, unless --strict is given.
#[derive(clap::Args)]
pub struct Args {
    /// Files to import: .jsonl, .json (an array of records), optionally .gz or .zst.
    #[arg(required_unless_present = "manifest")]
    files: Vec<PathBuf>,
    /// Dataset name kept in the provenance of every record (e.g. gsm8k).
    #[arg(long, required_unless_present = "manifest")]
    source: Option<String>,
    /// Category of the new examples (metadata only, never part of the hash).
    #[arg(long, required_unless_present = "manifest")]
    category: Option<String>,
    /// Record shape; `auto` decides per record from its fields.
    #[arg(long, value_enum, default_value_t = Format::Auto)]
    format: Format,
    /// A YAML manifest listing sources, categories and files (see configs/).
    #[arg(long, conflicts_with_all = ["files", "source", "category"])]
    manifest: Option<PathBuf>,
    /// Stop at the first bad record instead of recording it and going on.
    #[arg(long)]
    strict: bool,
    /// Records larger than this many bytes are rejected without being read whole.
    #[arg(long, default_value_t = corpusdb::reader::DEFAULT_MAX_RECORD_BYTES)]
    max_record_bytes: usize,
    /// Memory (MiB) that buffers writes before they are flushed to disk together with
    /// their checkpoint; an import that is killed redoes at most this much work.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=65536))]
    write_buffer_mb: u64,
    /// Also write every batch to the write-ahead log: a killed import then redoes
    /// nothing, at about a quarter more ingest time.
    #[arg(long)]
    wal: bool,
    /// Records per atomic batch (each batch is one checkpoint).
    #[arg(long, default_value_t = 4096, hide = true)]
    batch_size: usize,
}

pub fn run(store_path: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let jobs: Vec<(IngestOptions, Vec<PathBuf>)> = match &args.manifest {
        Some(path) => Manifest::load(path)?
            .imports
            .into_iter()
            .map(|import| {
                let mut options = IngestOptions::new(import.source, import.category);
                options.format = import.format;
                (options, import.files)
            })
            .collect(),
        None => {
            let source = args.source.clone().context("--source is required")?;
            let category = args.category.clone().context("--category is required")?;
            let mut options = IngestOptions::new(source, category);
            options.format = args.format;
            vec![(options, args.files.clone())]
        }
    };
    for (options, files) in &jobs {
        if options.source.trim().is_empty() || options.category.trim().is_empty() {
            bail!("source and category must not be empty");
        }
        for file in files {
            if !file.is_file() {
                bail!("{}: no such file", file.display());
            }
        }
    }
    let store = Store::open_with(
        store_path,
        &StoreOptions {
            wal: args.wal,
            write_buffer_bytes: (args.write_buffer_mb as usize) << 20,
            ..StoreOptions::default()
        },
    )?;
    let delay = std::env::var("CORPUSDB_TEST_BATCH_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let mut total = ImportCounts::default();
    let started = Instant::now();
    for (mut options, files) in jobs {
        options.strict = args.strict;
        options.max_record_bytes = args.max_record_bytes;
        options.batch_records = args.batch_size;
        options.batch_delay = delay;
        for file in files {
            let bar = Bar::new();
            let outcome = ingest::ingest_file(&store, &file, &options, &bar);
            bar.finish();
            let outcome = outcome?;
            let name = file.display();
            if outcome.already_done {
                println!(
                    "{name}: already imported as source `{}` (import {}), nothing to do",
                    options.source, outcome.import.id
                );
                continue;
            }
            for (line, reason) in &outcome.first_rejects {
                eprintln!("{name}:{line}: rejected: {reason}");
            }
            if outcome.run.rejected > outcome.first_rejects.len() as u64 {
                eprintln!(
                    "{name}: … and {} more rejects; see `corpusdb rejects --source {}`",
                    outcome.run.rejected - outcome.first_rejects.len() as u64,
                    options.source
                );
            }
            for note in &outcome.notes {
                eprintln!("{name}: {note}");
            }
            let run = outcome.run;
            let secs = outcome.elapsed.as_secs_f64().max(1e-9);
            let resumed = match outcome.resumed_from {
                Some(at) => format!(" (resumed at record {}, line {})", at.records, at.line()),
                None => String::new(),
            };
            println!(
                "{name}{resumed}: read {}, stored {}, duplicates {}, rejected {} in {:.2}s ({:.0} records/s, {}/s)",
                run.read, run.stored, run.duplicates, run.rejected, secs, run.read as f64 / secs,
                human_bytes((outcome.bytes as f64 / secs) as u64)
            );
            total.add(&run);
        }
    }
    // The index follows the store's change log; bring it up to date while we hold the store.
    let index = corpusdb::index::Index::open_or_create(store.path(), false)?;
    super::index::catch_up_waiting(&store, &index)?;
    if total.read > 0 {
        println!(
            "total: read {} = stored {} + duplicates {} + rejected {} in {:.2}s",
            total.read,
            total.stored,
            total.duplicates,
            total.rejected,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
struct Bar {
    bar: ProgressBar,
    started: Mutex<Instant>,
}

impl Bar {
    fn new() -> Bar {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(5));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Bar {
            bar,
            started: Mutex::new(Instant::now()),
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Observer for Bar {
    fn file_started(&self, path: &Path, file_bytes: u64, resume: Option<Position>) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.bar.set_prefix(name);
        self.bar.set_length(file_bytes);
        if let Some(at) = resume {
            self.bar
                .set_message(format!("resuming at record {}", at.records));
        }
        *self.started.lock().expect("not poisoned") = Instant::now();
    }

    fn batch_committed(&self, file_bytes_read: u64, run: &ImportCounts) {
        self.bar.set_position(file_bytes_read);
        let secs = self
            .started
            .lock()
            .expect("not poisoned")
            .elapsed()
            .as_secs_f64()
            .max(1e-9);
        self.bar.set_message(format!(
            "{} records ({:.0}/s), {} dup, {} rejected",
            run.read,
            run.read as f64 / secs,
            run.duplicates,
            run.rejected
        ));
    }
}
