//! `corpusdb ingest`: import files (or a manifest of them) with a progress bar.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use corpusdb::category::Rule;
use corpusdb::formats::Formats;
use corpusdb::ingest::{self, IngestOptions, Observer};
use corpusdb::manifest::Manifest;
use corpusdb::reader::{human_bytes, Position};
use corpusdb::registry::Registry;
use corpusdb::store::{Compression, ImportCounts, Store, StoreOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Import dataset files (or a manifest, or a registry of them) into the store.
///
/// Files are .jsonl, .json (an array of records) or .parquet, optionally .gz or .zst. Each
/// file is one import, identified by --source and the file's content fingerprint: running
/// it again does nothing, and an interrupted import continues from its last committed
/// record. Records that cannot be read go to the rejects ledger (see `corpusdb rejects`)
/// and the import goes on, unless --strict is given. `corpusdb formats` lists the record
/// shapes; without --format the shape is detected from each file's first records.
#[derive(clap::Args)]
pub struct Args {
    /// Files to import: .jsonl, .json (an array of records or a document holding them),
    /// .parquet; optionally .gz/.zst. `hf:ORG/NAME[/PATTERN]` takes a dataset's files
    /// from the Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub).
    #[arg(required_unless_present_any = ["manifest", "registry"])]
    files: Vec<PathBuf>,
    /// Dataset name kept in the provenance of every record (e.g. gsm8k).
    #[arg(long, required_unless_present_any = ["manifest", "registry"])]
    source: Option<String>,
    /// Category of the new examples (metadata only, never part of the hash).
    #[arg(long, required_unless_present_any = ["manifest", "registry"])]
    category: Option<String>,
    /// Record shape (see `corpusdb formats`); `auto` detects it from the first records.
    #[arg(long, default_value = "auto", conflicts_with = "mapping")]
    format: String,
    /// One turn of a quick mapping, in order: ROLE=TEMPLATE with the template syntax of
    /// YAML mappings, or ROLE=FIELD (`--map user=question --map 'assistant={answer}'`,
    /// `--map 'user={question}\n\n{options|letters}'`). Recorded as the import's format,
    /// so a resume must give the same turns.
    #[arg(long = "map", value_name = "ROLE=TEMPLATE", conflicts_with_all = ["mapping", "manifest", "registry"])]
    map: Vec<String>,
    /// Where the records of a JSON object document are: a dotted path (`data`,
    /// `problems.train`) or a JSON pointer (`/data`) to a list of records or an
    /// `id -> record` object. Without it, a pretty-printed document's records are found by
    /// their shape.
    #[arg(long, value_name = "PATH")]
    records: Option<String>,
    /// A YAML field mapping that defines the record shape (see `corpusdb formats --help`).
    #[arg(long)]
    mapping: Option<PathBuf>,
    /// Category rules for mixed sources, tried in order: an example with tool calls,
    /// code or math gets the category `tool`, `code` or `math` instead of --category.
    #[arg(long, value_enum, value_delimiter = ',')]
    rules: Vec<Rule>,
    /// A YAML manifest listing sources, categories and files (see configs/).
    #[arg(long, conflicts_with_all = ["files", "source", "category", "registry"])]
    manifest: Option<PathBuf>,
    /// The source registry (configs/sources.yaml): imports every listed dataset whose
    /// files are present under --data-dir and says which are missing.
    #[arg(long, requires = "data_dir", conflicts_with_all = ["files", "source", "category"])]
    registry: Option<PathBuf>,
    /// Where the registry's datasets were downloaded: DIR/<source name>/... by default.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// With --registry: import only these sources (comma-separated names).
    #[arg(long, value_delimiter = ',', requires = "registry")]
    only: Vec<String>,
    /// Quality filters (e.g. configs/filters.yaml) applied while importing: a record
    /// that fails one is rejected with the filter's name and what it measured.
    #[arg(long, value_name = "FILE")]
    filters: Option<PathBuf>,
    /// Stop at the first bad record instead of recording it and going on.
    #[arg(long)]
    strict: bool,
    /// An interrupted import resumes only if the part of the file it already read is
    /// unchanged (checked by hash); if it changed, ingest stops and names the file. With
    /// this flag such a file is imported again from its start as a new import instead
    /// (records that did not change count as duplicates).
    #[arg(long)]
    restart_changed: bool,
    /// Download `hf:ORG/NAME[/PATTERN]` datasets (or, with --registry, each listed source
    /// with a `hub:` id that is neither under --data-dir nor cached) from the Hugging Face
    /// Hub into its cache first: the files it does not hold yet; an interrupted transfer
    /// resumes. Honours HF_ENDPOINT, HF_TOKEN (or HF_HOME/token), HF_HUB_CACHE and HF_HOME.
    #[arg(long, conflicts_with = "manifest")]
    download: bool,
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
    /// How this import compresses example bodies on disk: zstd (the smallest store) or
    /// lz4 (less CPU per record for a larger store; BENCHMARKS.md has both). Bodies keep
    /// the compression they were written with, so imports may differ.
    #[arg(long, default_value = Compression::BY_NAME[0].0, value_parser = compression_by_name())]
    compression: Compression,
    /// Records per atomic batch (each batch is one checkpoint).
    #[arg(long, default_value_t = 4096, hide = true)]
    batch_size: usize,
}

/// `--compression`: the store's codec names.
fn compression_by_name() -> impl clap::builder::TypedValueParser<Value = Compression> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Compression::BY_NAME.map(|(name, _)| name))
        .map(|name| Compression::by_name(&name).expect("a possible value"))
}

/// Options for one source: its format resolved against the known formats.
fn options_for(
    formats: &mut Formats,
    source: String,
    category: String,
    format: Option<&str>,
    mapping: Option<&Path>,
    rules: Vec<Rule>,
) -> anyhow::Result<IngestOptions> {
    let mut options = IngestOptions::new(source, category);
    options.rules = rules;
    options.format = match (format, mapping) {
        (_, Some(mapping)) => Some(formats.load_mapping(mapping)?),
        (None | Some("auto"), None) => None,
        (Some(name), None) => Some(formats.get(name)?),
    };
    Ok(options)
}

pub fn run(store_path: &Path, args: Args) -> anyhow::Result<ExitCode> {
    // Parse threads allocate each batch and the writer frees it: mimalloc returning those
    // pages to the OS and faulting them in again cost about 7% of an import's CPU.
    crate::keep_freed_memory();
    crate::return_freed_memtables();
    let mut formats = Formats::builtin();
    let mut jobs: Vec<(IngestOptions, Vec<PathBuf>)> = Vec::new();
    if let Some(path) = &args.manifest {
        for import in Manifest::load(path)?.imports {
            let options = options_for(
                &mut formats,
                import.source,
                import.category,
                import.format.as_deref(),
                import.mapping.as_deref(),
                import.rules,
            )
            .with_context(|| format!("{}", path.display()))?;
            jobs.push((options, import.files));
        }
    } else if let Some(path) = &args.registry {
        let data_dir = args.data_dir.as_deref().context("--data-dir is required")?;
        if !data_dir.is_dir() {
            bail!("{}: no such directory (--data-dir)", data_dir.display());
        }
        let registry = Registry::load(path)?;
        for name in &args.only {
            if !registry.sources.iter().any(|s| &s.name == name) {
                bail!("--only {name}: no such source in {}", path.display());
            }
        }
        let hub_cache = corpusdb::registry::hub_cache_dir();
        let (mut present, mut missing) = (0, Vec::new());
        for source in registry.sources {
            if !args.only.is_empty() && !args.only.contains(&source.name) {
                continue;
            }
            let mut files = source.files(data_dir)?;
            if files.is_empty() {
                // Not under --data-dir: the Hugging Face cache may hold it.
                if let (Some(hub), Some(cache)) = (&source.hub, &hub_cache) {
                    if args.download && corpusdb::registry::hub_cache_files(cache, hub)?.is_empty()
                    {
                        download_dataset(cache, hub)
                            .with_context(|| format!("source {}", source.name))?;
                    }
                    files = corpusdb::registry::hub_cache_files(cache, hub)?;
                    if !files.is_empty() {
                        eprintln!(
                            "note: {}: {} file(s) from the Hugging Face cache ({hub})",
                            source.name,
                            files.len()
                        );
                    }
                }
            }
            if files.is_empty() {
                missing.push(source);
                continue;
            }
            present += 1;
            let options = options_for(
                &mut formats,
                source.name.clone(),
                source.category.clone(),
                source.format.as_deref(),
                source.mapping.as_deref(),
                source.rules.clone(),
            )
            .with_context(|| format!("{}: source {}", path.display(), source.name))?;
            jobs.push((options, files));
        }
        for source in &missing {
            let hub = source
                .hub
                .as_deref()
                .map(|hub| format!(" (Hugging Face: {hub})"))
                .unwrap_or_default();
            let cached = match (&source.hub, &hub_cache) {
                (Some(_), Some(cache)) => format!(" or in {}", cache.display()),
                _ => String::new(),
            };
            eprintln!(
                "note: skipping {}{hub}: no readable files under {}{cached}",
                source.name,
                data_dir.join(&source.name).display()
            );
        }
        println!(
            "registry: {present} source(s) with files, {} skipped",
            missing.len()
        );
    } else {
        let source = args.source.clone().context("--source is required")?;
        let category = args.category.clone().context("--category is required")?;
        let options = options_for(
            &mut formats,
            source,
            category,
            Some(&args.format),
            args.mapping.as_deref(),
            args.rules.clone(),
        )?;
        let mut options = options;
        if !args.map.is_empty() {
            if args.format != "auto" {
                bail!("--map gives the record shape; it goes without --format");
            }
            options.format = Some(formats.quick_mapping(&args.map)?);
        }
        jobs.push((options, hub_files(&args.files, args.download)?));
    }
    let filters = match &args.filters {
        Some(path) => Some(std::sync::Arc::new(corpusdb::filters::Filters::load(path)?)),
        None => None,
    };
    for (options, files) in &mut jobs {
        options.formats = formats.clone();
        options.filters = filters.clone();
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
            compression: args.compression,
            ..StoreOptions::default()
        },
    )?;
    let delay = std::env::var("CORPUSDB_TEST_BATCH_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let mut total = ImportCounts::default();
    let started = Instant::now();
    // The index is fed by the import's batches; its change log repairs it after a crash.
    let index = corpusdb::index::Index::open_or_create(store.path(), false)?;
    let feed = super::index::feed_waiting(&store, &index)?;
    for (mut options, files) in jobs {
        options.strict = args.strict;
        options.restart_changed = args.restart_changed;
        options.max_record_bytes = args.max_record_bytes;
        options.records = args.records.clone();
        options.batch_records = args.batch_size;
        options.batch_delay = delay;
        options.keep_text = index.full_text();
        // No flush between files: one started there waits for the automatic flush
        // already running, with both cores' writers idle (about 0.8 s a file); the store
        // is flushed once after the last.
        options.flush_at_end = false;
        for file in files {
            let bar = Bar::new();
            let observer = Feeding {
                bar: &bar,
                feed: &feed,
            };
            let outcome = ingest::ingest_file(&store, &file, &options, &observer);
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
                "{name}{resumed}: {}: read {}{}, stored {}, duplicates {}, rejected {} in {:.2}s ({:.0} records/s, {}/s)",
                outcome.import.format,
                run.read,
                shape_note(&run),
                run.stored,
                run.duplicates,
                run.rejected,
                secs,
                run.read as f64 / secs,
                human_bytes((outcome.bytes as f64 / secs) as u64)
            );
            total.add(&run);
        }
    }
    store.flush()?;
    // Whatever the feed missed comes from the change log.
    super::index::finish_feed(&store, &feed)?;
    if total.read > 0 {
        println!(
            "total: read {}{} = stored {} + duplicates {} + rejected {} in {:.2}s",
            total.read,
            shape_note(&total),
            total.stored,
            total.duplicates,
            total.rejected,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// How records became examples when that is not one to one: rows joined into one
/// conversation, and records (trees, solution lists) that gave several.
pub fn shape_note(counts: &ImportCounts) -> String {
    match (counts.joined, counts.extra) {
        (0, 0) => String::new(),
        (joined, 0) => format!(" (-{joined} joined rows)"),
        (0, extra) => format!(" (+{extra} extra examples)"),
        (joined, extra) => format!(" (-{joined} joined rows, +{extra} extra examples)"),
    }
}

/// The progress bar and the index, both fed by the import.
struct Feeding<'a> {
    bar: &'a Bar,
    feed: &'a corpusdb::index::Feed<'a>,
}

impl Observer for Feeding<'_> {
    fn file_started(&self, path: &Path, file_bytes: u64, resume: Option<Position>) {
        self.bar.file_started(path, file_bytes, resume);
    }

    fn batch_stored(&self, batch: &ingest::StoredBatch) {
        self.feed.batch_stored(batch);
    }

    fn batch_committed(&self, file_bytes_read: u64, run: &ImportCounts) {
        self.bar.batch_committed(file_bytes_read, run);
    }
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

/// The files to import: each `hf:ORG/NAME[/PATTERN]` argument stands for that dataset's
/// files in the Hugging Face cache ([`corpusdb::registry::hub_cache_files`]), downloaded
/// there first with `download`.
fn hub_files(files: &[PathBuf], download: bool) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for file in files {
        let Some(repo) = file.to_str().and_then(|f| f.strip_prefix("hf:")) else {
            out.push(file.clone());
            continue;
        };
        let cache = corpusdb::registry::hub_cache_dir()
            .context("hf: names a dataset in the Hugging Face cache, but HOME is not set")?;
        if download {
            download_dataset(&cache, repo)?;
        }
        let found = corpusdb::registry::hub_cache_files(&cache, repo)?;
        if found.is_empty() {
            bail!(
                "{}: not in the Hugging Face cache at {} (add --download, or fetch it with `huggingface-cli download --repo-type dataset {}`; HF_HUB_CACHE or HF_HOME point elsewhere)",
                file.display(),
                cache.display(),
                repo.splitn(3, '/').take(2).collect::<Vec<_>>().join("/")
            );
        }
        out.extend(found);
    }
    Ok(out)
}

/// Downloads the readable files of `repo` (`ORG/NAME[/PATTERN]`, revision `main`) that the
/// cache does not hold yet, resuming interrupted ones, and says what it fetched.
fn download_dataset(cache: &std::path::Path, repo: &str) -> anyhow::Result<()> {
    let mut parts = repo.trim_matches('/').splitn(3, '/');
    let (Some(org), Some(name)) = (parts.next(), parts.next()) else {
        bail!("hf:{repo}: a Hugging Face dataset is named ORG/NAME")
    };
    let pattern = parts.next().unwrap_or("**");
    let id = format!("{org}/{name}");
    let hub = corpusdb::hub::Hub::from_env();
    let (commit, files) = hub.dataset_files(&id, "main")?;
    let wanted: Vec<_> = files
        .into_iter()
        .filter(|f| corpusdb::registry::hub_file_wanted(pattern, &f.path))
        .collect();
    if wanted.is_empty() {
        bail!("hf:{repo}: the dataset at {commit} has no JSON, JSONL or Parquet file under `{pattern}`")
    }
    hub.download(cache, &id, "main", &commit, &wanted, |path, size| {
        let size = size.map_or(String::new(), |s| {
            format!(" ({})", corpusdb::train::memory::format_bytes(s))
        });
        eprintln!("downloading {id}/{path}{size}");
    })?;
    Ok(())
}
