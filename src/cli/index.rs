//! Commands over the category index: `init`, `query`, `categories`, `reindex`, `check`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use corpusdb::index::query::{self, TermField};
use corpusdb::index::{Feed, Index, IndexedExample};
use corpusdb::store::{Store, StoreOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// Create an empty store, choosing what its index holds.
///
/// Without --full-text the index holds metadata only (category, sources, counts), which
/// is what `query` terms and `categories` need. With it, the conversation text is indexed
/// as well so that bare words in a query search it; that makes ingest several times slower.
#[derive(clap::Args)]
pub struct InitArgs {
    /// Also index the conversation text for free-text queries.
    #[arg(long)]
    full_text: bool,
}

/// Find examples with the query language and print them in insertion order.
///
/// Terms: category:NAME, source:NAME, hash:SHA1 (or its first 4+ hex digits); numbers
/// with comparisons: chars:<2000, turns:>=3, messages:4, ordinal:>100. Combine with AND
/// (or just a space), OR, NOT / -term and parentheses:
/// `(category:math OR category:code) -source:gsm8k`.
/// Bare words or "quoted phrases" search the text of stores made with `init --full-text`.
#[derive(clap::Args)]
pub struct QueryArgs {
    /// The query; empty or `*` matches everything.
    query: String,
    /// Print at most this many examples.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Skip this many matches first.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,
    /// Print only the number of matches.
    #[arg(long)]
    count: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Jsonl,
    Json,
}

/// Examples per category (or per source), with shares, from the index.
#[derive(clap::Args)]
pub struct CategoriesArgs {
    /// Count per category or per source name.
    #[arg(long, value_enum, default_value_t = FacetBy::Category)]
    by: FacetBy,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FacetBy {
    Category,
    Source,
    /// Examples excluded per quality filter (`*`: by any filter).
    Excluded,
}

/// Rebuild the index from the store (the store is the source of truth).
#[derive(clap::Args)]
pub struct ReindexArgs {}

/// Verify that the index agrees with the store: counts per category, and a sample of
/// documents compared field by field. Exits 1 when they disagree.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// Documents to compare field by field, spread over the whole store.
    #[arg(long, default_value_t = 1000)]
    sample: u64,
}

pub fn init(store_path: &Path, args: InitArgs) -> anyhow::Result<ExitCode> {
    if store_path.join("CURRENT").exists() {
        bail!(
            "{} already holds a store; `init` only creates new ones",
            store_path.display()
        );
    }
    let store = Store::open(store_path)?;
    let index = Index::open_or_create(store.path(), args.full_text)?;
    println!(
        "created {} ({})",
        store_path.display(),
        if index.full_text() {
            "full-text index"
        } else {
            "metadata index"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Opens the store read-only and its index, bringing the index up to date when it can.
pub fn open_for_reading(store_path: &Path) -> anyhow::Result<(Store, Index)> {
    let store = Store::open_read_only(store_path)?;
    let index = Index::open_or_create(store.path(), false)?;
    catch_up(&store, &index, false)?;
    Ok((store, index))
}

/// The index alone, for commands that need nothing else from the store: when it is up
/// to date, the store is not opened beyond its counters (opening every family costs
/// about 0.2 s at 10M examples, the rest of `categories` a few milliseconds).
pub fn open_index_for_reading(store_path: &Path) -> anyhow::Result<Index> {
    let changes = Store::read_counters(store_path)?.changes;
    let index = Index::open_or_create(store_path, false)?;
    if index.indexed_through()? < changes {
        catch_up(&Store::open_read_only(store_path)?, &index, false)?;
    }
    Ok(index)
}

/// Replays the store's change log into the index. `must` makes a busy index an error;
/// otherwise a reader goes on with what is indexed (an import is busy updating it).
pub fn catch_up(store: &Store, index: &Index, must: bool) -> anyhow::Result<()> {
    let behind = store
        .counters()?
        .changes
        .saturating_sub(index.indexed_through()?);
    if behind == 0 {
        return Ok(());
    }
    let bar = bar("indexing", behind);
    let result = index.catch_up(store, &|done, _| bar.set_position(done));
    bar.finish_and_clear();
    match result {
        Ok(_) => Ok(()),
        Err(corpusdb::index::Error::Busy { .. }) if !must => {
            eprintln!("warning: the index is {behind} changes behind the store and another process is updating it; results may be incomplete");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Takes the index's writer for an import, waiting while a reader that is catching up
/// holds it, and replays what the index lacks (a crash between the store's commit and the
/// index's), so that the import's batches follow on where the index stands.
pub fn feed_waiting<'a>(store: &'a Store, index: &'a Index) -> anyhow::Result<Feed<'a>> {
    let mut attempts = 0;
    let feed = loop {
        match index.feed(store) {
            Err(corpusdb::index::Error::Busy { .. }) if attempts < 600 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => break other?,
        }
    };
    finish_feed(store, &feed)?;
    Ok(feed)
}

/// Commits what `feed` was given and replays whatever it was not, with a progress bar.
pub fn finish_feed(store: &Store, feed: &Feed) -> anyhow::Result<()> {
    let behind = store
        .counters()?
        .changes
        .saturating_sub(feed.indexed_through());
    if behind == 0 {
        feed.catch_up(&|_, _| {})?;
        return Ok(());
    }
    let bar = bar("indexing", behind);
    let result = feed.catch_up(&|done, _| bar.set_position(done));
    bar.finish_and_clear();
    result?;
    Ok(())
}

/// Catches up, waiting while a reader that is doing the same holds the index (a reader
/// brings the index to the store state it sees, which the writer then continues from).
pub fn catch_up_waiting(store: &Store, index: &Index) -> anyhow::Result<()> {
    for _ in 0..600 {
        match catch_up(store, index, true) {
            Err(e) if matches!(e.downcast_ref(), Some(corpusdb::index::Error::Busy { .. })) => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
    catch_up(store, index, true)
}

pub fn bar(what: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(5));
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

fn example_json(example: &IndexedExample) -> serde_json::Value {
    json!({
        "hash": example.hash.to_hex(),
        "ordinal": example.ordinal,
        "category": example.category,
        "sources": example.sources,
    })
}

pub fn query(store_path: &Path, args: QueryArgs) -> anyhow::Result<ExitCode> {
    crate::small_pages_only();
    let expr = query::parse(&args.query)?;
    let mut out = std::io::stdout().lock();
    if args.count {
        let index = open_index_for_reading(store_path)?;
        writeln!(out, "{}", index.count(&expr)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (store, index) = open_for_reading(store_path)?;
    let hits = index.search(&expr, args.offset, args.limit)?;
    match args.format {
        OutputFormat::Json => {
            let list: Vec<_> = hits.iter().map(example_json).collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        }
        OutputFormat::Jsonl => {
            for hit in &hits {
                writeln!(out, "{}", example_json(hit))?;
            }
        }
        OutputFormat::Table => {
            writeln!(
                out,
                "{:<12} {:>9}  {:<16} {:>6} {:>5}  {:<24} first words",
                "hash", "ordinal", "category", "chars", "turns", "sources"
            )?;
            for hit in &hits {
                let example = store.get(&hit.hash)?.with_context(|| {
                    format!(
                        "index lists {} but the store lacks it; run `corpusdb reindex`",
                        hit.hash
                    )
                })?;
                let first = example
                    .conversation
                    .messages
                    .iter()
                    .find(|m| !m.content.is_empty())
                    .map(|m| m.content.as_str())
                    .unwrap_or("");
                writeln!(
                    out,
                    "{:<12} {:>9}  {:<16} {:>6} {:>5}  {:<24} {}",
                    &hit.hash.to_hex()[..12],
                    hit.ordinal,
                    hit.category,
                    example.chars,
                    example.turns,
                    hit.sources.join(","),
                    corpusdb::formats::excerpt(first, 50)
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn categories(store_path: &Path, args: CategoriesArgs) -> anyhow::Result<ExitCode> {
    crate::small_pages_only();
    let index = open_index_for_reading(store_path)?;
    let field = match args.by {
        FacetBy::Category => TermField::Category,
        FacetBy::Source => TermField::Source,
        FacetBy::Excluded => TermField::Excluded,
    };
    let counts = index.facet(field)?;
    // Shares are of the examples in use; excluded ones are counted apart.
    let total = index.count(&query::Expr::All)?;
    let mut rows: Vec<_> = counts.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let share = |n: u64| {
        if total == 0 {
            0.0
        } else {
            n as f64 / total as f64
        }
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let list: Vec<_> = rows
            .iter()
            .map(|(name, n)| json!({"name": name, "examples": n, "share": share(*n)}))
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(
                &json!({"examples": total, "by": field.name(), "counts": list})
            )?
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<24} {:>10} {:>7}",
        field.name(),
        "examples",
        "share"
    )?;
    for (name, n) in &rows {
        writeln!(out, "{name:<24} {n:>10} {:>6.1}%", 100.0 * share(*n))?;
    }
    writeln!(out, "{:<24} {total:>10}", "total")?;
    Ok(ExitCode::SUCCESS)
}

pub fn reindex(store_path: &Path, _args: ReindexArgs) -> anyhow::Result<ExitCode> {
    // Holding the store for writing keeps imports out while the index is rebuilt.
    let store = Store::open_with(store_path, &StoreOptions::default())?;
    let index = Index::open_or_create(store.path(), false)?;
    let bar = bar("reindexing", store.counters()?.examples);
    let done = index.rebuild(&store, &|done, _| bar.set_position(done));
    bar.finish_and_clear();
    println!("indexed {} examples", done?);
    Ok(ExitCode::SUCCESS)
}

pub fn check(store_path: &Path, args: CheckArgs) -> anyhow::Result<ExitCode> {
    let (store, index) = open_for_reading(store_path)?;
    let report = corpusdb::index::check(&store, &index, args.sample)?;
    for problem in &report.problems {
        println!("MISMATCH {problem}");
    }
    println!(
        "store {} examples, index {} documents, {} sampled documents compared: {}",
        report.store_examples,
        report.index_documents,
        report.sampled,
        if report.problems.is_empty() {
            "consistent"
        } else {
            "INCONSISTENT"
        }
    );
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
