//! `corpusdb export`: stream the examples matching a query to JSONL.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use corpusdb::index::query;
use corpusdb::store::Store;
use serde_json::{json, Value};

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
    let imports: std::collections::HashMap<u32, String> = store
        .imports()?
        .into_iter()
        .map(|i| (i.id, i.source))
        .collect();
    let mut line = Vec::with_capacity(4096);
    for (done, ordinal) in ordinals.iter().enumerate() {
        let hash = store.hash_at(*ordinal)?.with_context(|| {
            format!("ordinal {ordinal} is indexed but not stored; run `corpusdb reindex`")
        })?;
        let example = store
            .get(&hash)?
            .with_context(|| format!("{hash} is indexed but not stored"))?;
        let record = export_record(&store, &imports, &hash, &example, args.with_metadata)?;
        line.clear();
        serde_json::to_writer(&mut line, &record)?;
        line.push(b'\n');
        out.write_all(&line)?;
        if done % 4096 == 0 {
            bar.set_position(done as u64);
        }
    }
    out.flush()?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "exported {} examples to {} in {secs:.2}s ({:.0}/s)",
        ordinals.len(),
        args.out.display(),
        ordinals.len() as f64 / secs
    );
    Ok(ExitCode::SUCCESS)
}

fn export_record(
    store: &Store,
    imports: &std::collections::HashMap<u32, String>,
    hash: &corpusdb::conversation::ContentHash,
    example: &corpusdb::store::StoredExample,
    with_metadata: bool,
) -> anyhow::Result<Value> {
    let messages: Vec<Value> = example
        .conversation
        .messages
        .iter()
        .map(|m| {
            let mut v = json!({"role": m.role.as_str(), "content": m.content});
            if let Some(name) = &m.name {
                v["name"] = json!(name);
            }
            if let Some(calls) = &m.tool_calls {
                v["tool_calls"] = serde_json::from_str(calls).unwrap_or_else(|_| json!(calls));
            }
            v
        })
        .collect();
    let mut record = json!({ "messages": messages });
    if let Some(tools) = &example.conversation.tools {
        record["tools"] = serde_json::from_str(tools).unwrap_or_else(|_| json!(tools));
    }
    if with_metadata {
        let sources: std::collections::BTreeSet<&str> = store
            .provenance(hash)?
            .iter()
            .filter_map(|p| imports.get(&p.import_id).map(String::as_str))
            .collect();
        record["_hash"] = json!(hash.to_hex());
        record["_category"] = json!(example.category);
        record["_sources"] = json!(sources);
    }
    Ok(record)
}
