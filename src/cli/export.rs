//! `corpusdb export`: stream the examples matching a query to JSONL or Parquet.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use corpusdb::index::query;

/// Write the examples matching a query (see `corpusdb query --help`), in insertion order
/// (the store's physical order, the fastest to read).
///
/// JSONL lines are in OpenAI `messages` shape: {"messages": [{"role", "content"}],
/// "tools"?}. Parquet has the same `messages` column as a list of {role, content, name,
/// tool_calls} structs (what Hugging Face `datasets` and pyarrow read as chat data).
/// With --with-metadata both add "_hash", "_category" and "_sources".
#[derive(clap::Args)]
pub struct Args {
    /// The query; `*` exports everything.
    query: String,
    /// Output file (`-` for standard output, JSONL only).
    #[arg(long)]
    out: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    format: ExportFormat,
    /// Add _hash, _category and _sources to every record.
    #[arg(long)]
    with_metadata: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Parquet,
}

pub fn run(store_path: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let expr = query::parse(&args.query)?;
    let (store, index) = super::index::open_for_reading(store_path)?;
    // The whole store is read sequentially, unless some examples are excluded by a
    // quality filter: those are left out, through the index like any other query.
    let any_excluded = store.exclusions().next().is_some();
    let selection = if expr == query::Expr::All && !any_excluded {
        corpusdb::export::Selection::All
    } else {
        corpusdb::export::Selection::from_ordinals(&index.matching_ordinals(&expr)?)
    };
    let total = selection.len(&store)?;
    let bar = super::index::bar("exporting", total);
    let started = Instant::now();
    let progress = |done| bar.set_position(done);
    let to_stdout = args.out.as_os_str() == "-";
    let create = || {
        File::create(&args.out).with_context(|| format!("{}: cannot create", args.out.display()))
    };
    match args.format {
        ExportFormat::Jsonl => {
            let sink: Box<dyn Write> = if to_stdout {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(create()?)
            };
            let mut out = BufWriter::with_capacity(1 << 20, sink);
            corpusdb::export::write_jsonl(
                &store,
                &selection,
                &mut out,
                args.with_metadata,
                &progress,
            )?;
            out.flush()?;
        }
        ExportFormat::Parquet => {
            if to_stdout {
                bail!("Parquet needs a file: give --out FILE.parquet");
            }
            let out = BufWriter::with_capacity(1 << 20, create()?);
            corpusdb::export::write_parquet(
                &store,
                &selection,
                out,
                args.with_metadata,
                corpusdb::export::PARQUET_ROWS_PER_GROUP,
                &progress,
            )?;
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "exported {} examples to {} in {secs:.2}s ({:.0}/s)",
        total,
        args.out.display(),
        total as f64 / secs
    );
    Ok(ExitCode::SUCCESS)
}
