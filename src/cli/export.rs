//! `corpusdb export`: stream the examples matching a query to JSONL.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use corpusdb::index::query;

/// Write the examples matching a query (see `corpusdb query --help`) as JSONL in OpenAI
/// `messages` shape, in insertion order: {"messages": [{"role", "content"}], "tools"?}.
/// With --with-metadata each line also has "_hash", "_category" and "_sources".
#[derive(clap::Args)]
pub struct Args {
    /// The query; `*` exports everything.
    query: String,
    /// Output file (`-` for standard output).
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
}

pub fn run(store_path: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let expr = query::parse(&args.query)?;
    let (store, index) = super::index::open_for_reading(store_path)?;
    let ordinals = index.matching_ordinals(&expr)?;
    let sink: Box<dyn Write> = if args.out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            File::create(&args.out)
                .with_context(|| format!("{}: cannot create", args.out.display()))?,
        )
    };
    let mut out = BufWriter::with_capacity(1 << 20, sink);
    let bar = super::index::bar("exporting", ordinals.len() as u64);
    let started = Instant::now();
    let written =
        corpusdb::export::write_jsonl(&store, &ordinals, &mut out, args.with_metadata, &|done| {
            bar.set_position(done)
        });
    bar.finish_and_clear();
    written?;
    out.flush()?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "exported {} examples to {} in {secs:.2}s ({:.0}/s)",
        ordinals.len(),
        args.out.display(),
        ordinals.len() as f64 / secs
    );
    Ok(ExitCode::SUCCESS)
}
