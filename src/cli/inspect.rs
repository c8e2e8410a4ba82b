//! Read-only commands: `imports`, `stats`, `show`, `rejects`. They open the store
//! read-only, so they work while an import is writing to it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use corpusdb::describe;
use corpusdb::reader::human_bytes;
use corpusdb::store::{FamilyFootprint, ImportRecord, RejectKind, Store};
use serde_json::json;

/// List every import: source, file, state (done/partial) and its counts.
#[derive(clap::Args)]
pub struct ImportsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Totals of the store: examples, duplicates, rejects, per category and per source.
#[derive(clap::Args)]
pub struct StatsArgs {
    /// Print JSON: {"examples", "duplicates", "rejected", "read", "categories", "sources", "imports"}.
    #[arg(long)]
    json: bool,
}

/// Show one example: its conversation, category, counts, every source that produced it,
/// its exclusions, and its near-duplicate cluster with each member's sources.
#[derive(clap::Args)]
pub struct ShowArgs {
    /// The example's SHA-1 in hex, or a unique prefix of at least 4 digits.
    hash: String,
    #[arg(long)]
    json: bool,
}

/// List the rejects ledger: records that did not become examples, with file, line and reason.
#[derive(clap::Args)]
pub struct RejectsArgs {
    /// Only rejects of this source.
    #[arg(long)]
    source: Option<String>,
    /// Print JSON lines (one object per reject, with the raw record as text).
    #[arg(long)]
    json: bool,
    /// Show at most this many (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Count the rejects per kind of reason (and source) instead of listing them.
    #[arg(long)]
    by_reason: bool,
}

pub fn imports(store_path: &Path, args: ImportsArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open_read_only(store_path)?;
    let imports = store.imports()?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let list: Vec<_> = imports.iter().map(describe::import_json).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:>3}  {:<16} {:<8} {:>9} {:>9} {:>9} {:>9}  file",
        "id", "source", "state", "read", "stored", "dup", "rejected"
    )?;
    for import in &imports {
        let c = import.counts;
        writeln!(
            out,
            "{:>3}  {:<16} {:<8} {:>9} {:>9} {:>9} {:>9}  {}",
            import.id,
            import.source,
            describe::state_name(import.state),
            c.read,
            c.stored,
            c.duplicates,
            c.rejected,
            import.path
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stats(store_path: &Path, args: StatsArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open_read_only(store_path)?;
    let summary = describe::StoreSummary::read(&store)?;
    let (counters, excluded) = (&summary.counters, summary.excluded);
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&summary.to_json())?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "store      {}", store.path().display())?;
    writeln!(
        out,
        "examples   {} ({} excluded by quality filters or as near-duplicates)",
        counters.examples, excluded
    )?;
    let shape = super::ingest::shape_note(&corpusdb::store::ImportCounts {
        joined: counters.joined,
        extra: counters.extra,
        ..Default::default()
    });
    writeln!(
        out,
        "read       {}{shape} = stored {} + duplicates {} + rejected {}",
        counters.read, counters.examples, counters.duplicates, counters.rejected
    )?;
    writeln!(
        out,
        "imports    {} ({} partial)",
        summary.imports, summary.partial_imports
    )?;
    print_shares(
        &mut out,
        "category",
        &counters.categories,
        counters.examples,
    )?;
    let records: u64 = counters.sources.values().sum();
    print_shares(&mut out, "source (records)", &counters.sources, records)?;
    print_families(&mut out, &summary.families)?;
    Ok(ExitCode::SUCCESS)
}

/// Where the store's disk goes, and the memory every open of it holds: each table file's
/// index and filter blocks stay loaded, so these grow with the store.
fn print_families(out: &mut impl Write, families: &[FamilyFootprint]) -> std::io::Result<()> {
    writeln!(
        out,
        "\n{:<24} {:>6} {:>11} {:>11} {:>11}",
        "family", "files", "on disk", "index", "filter"
    )?;
    for f in families {
        writeln!(
            out,
            "{:<24} {:>6} {:>11} {:>11} {:>11}",
            f.name,
            f.table_files,
            human_bytes(f.disk_bytes),
            human_bytes(f.index_bytes),
            human_bytes(f.filter_bytes)
        )?;
    }
    let held: u64 = families
        .iter()
        .map(|f| f.index_bytes + f.filter_bytes)
        .sum();
    writeln!(
        out,
        "indexes and filters held in memory while the store is open: {}",
        human_bytes(held)
    )
}

fn print_shares(
    out: &mut impl Write,
    title: &str,
    counts: &BTreeMap<String, u64>,
    total: u64,
) -> std::io::Result<()> {
    writeln!(out, "\n{title:<24} {:>10} {:>7}", "count", "share")?;
    let mut rows: Vec<_> = counts.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (name, count) in rows {
        let share = if total == 0 {
            0.0
        } else {
            100.0 * *count as f64 / total as f64
        };
        writeln!(out, "{name:<24} {count:>10} {share:>6.1}%")?;
    }
    Ok(())
}

pub fn show(store_path: &Path, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open_read_only(store_path)?;
    let hash = describe::resolve_hash(&store, &args.hash)?;
    let details = describe::ExampleDetails::read(&store, &hash)?;
    if args.json {
        writeln!(
            std::io::stdout().lock(),
            "{}",
            serde_json::to_string_pretty(&details.to_json())?
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let describe::ExampleDetails {
        example,
        sources,
        exclusions,
        membership,
        members,
        ..
    } = &details;
    let mut out = std::io::stdout().lock();
    writeln!(out, "hash       {hash}")?;
    writeln!(out, "ordinal    {}", example.ordinal)?;
    writeln!(out, "category   {}", example.category)?;
    writeln!(
        out,
        "size       {} chars, {} messages, {} turns",
        example.chars,
        example.conversation.messages.len(),
        example.turns
    )?;
    writeln!(out, "sources    {}", sources.len())?;
    for s in sources {
        match &s.id {
            Some(_) => writeln!(
                out,
                "  - {} {} (line {}, record {})",
                s.source,
                s.place(),
                s.line,
                s.record
            )?,
            None => writeln!(out, "  - {} {} (record {})", s.source, s.place(), s.record)?,
        }
    }
    for exclusion in exclusions {
        writeln!(
            out,
            "excluded   by `{}`: {}",
            exclusion.filter, exclusion.measured
        )?;
    }
    if let Some(m) = &membership {
        let role = if m.is_representative(&hash) {
            "kept as the representative".to_string()
        } else {
            format!(
                "near-duplicate of {} (J={:.2})",
                m.representative, m.jaccard
            )
        };
        writeln!(
            out,
            "cluster    {} ({} members; this one {role}; `query cluster:{}` lists them)",
            m.cluster_id(),
            members.len(),
            m.cluster_id()
        )?;
        for (member, sources) in members {
            let mark = if member.membership.is_representative(&member.hash) {
                "kept".to_string()
            } else {
                format!("J={:.2}", member.membership.jaccard)
            };
            let names: Vec<String> = sources
                .iter()
                .map(|s| format!("{} {}", s.source, s.place()))
                .collect();
            writeln!(out, "  {} {mark:<6} {}", member.hash, names.join(", "))?;
        }
    }
    for message in &example.conversation.messages {
        writeln!(out, "\n[{}]", message.role)?;
        writeln!(out, "{}", message.content)?;
        if let Some(calls) = &message.tool_calls {
            writeln!(out, "(tool calls) {calls}")?;
        }
    }
    if let Some(tools) = &example.conversation.tools {
        writeln!(out, "\n(tools) {tools}")?;
    }
    if example.extras.raw_text {
        writeln!(out, "\n(raw text, not a dialogue)")?;
    }
    if let Some(rejected) = &example.extras.rejected {
        writeln!(
            out,
            "\n--- rejected side (kept for preference training, not hashed) ---"
        )?;
        for message in rejected {
            writeln!(out, "\n[{}]", message.role)?;
            writeln!(out, "{}", message.content)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rejects(store_path: &Path, args: RejectsArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open_read_only(store_path)?;
    let imports = store.imports()?;
    let selected: Vec<&ImportRecord> = imports
        .iter()
        .filter(|i| args.source.as_ref().is_none_or(|s| &i.source == s))
        .collect();
    if selected.is_empty() {
        if let Some(source) = &args.source {
            bail!("no import of source `{source}` in this store");
        }
    }
    let mut out = std::io::stdout().lock();
    if args.by_reason {
        // Grouped by the stored kind and its subject (the field, the filter), not by text.
        type Group = (RejectKind, String);
        let mut kinds: BTreeMap<Group, (String, BTreeMap<String, u64>)> = BTreeMap::new();
        for import in &selected {
            for reject in store.rejects(Some(import.id))? {
                let reason = reject.reason();
                let (_, sources) = kinds
                    .entry((reason.kind, reason.subject.clone()))
                    .or_insert_with(|| (reason.group(), BTreeMap::new()));
                *sources.entry(reject.source.clone()).or_default() += 1;
            }
        }
        let mut rows: Vec<(u64, Group, String, BTreeMap<String, u64>)> = kinds
            .into_iter()
            .map(|(group, (label, sources))| (sources.values().sum(), group, label, sources))
            .collect();
        rows.sort_by(|a, b| b.0.cmp(&a.0).then(a.2.cmp(&b.2)));
        if args.json {
            let list: Vec<_> = rows
                .iter()
                .map(|(n, (kind, subject), label, sources)| {
                    json!({"reason": label, "kind": kind.name(), "subject": subject,
                           "rejects": n, "sources": sources})
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            return Ok(ExitCode::SUCCESS);
        }
        writeln!(out, "{:>9}  reason (sources)", "rejects")?;
        for (n, _, label, sources) in &rows {
            let sources: Vec<String> = sources.iter().map(|(s, n)| format!("{s} {n}")).collect();
            writeln!(out, "{n:>9}  {label} ({})", sources.join(", "))?;
        }
        if rows.is_empty() {
            writeln!(out, "no rejects")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut shown = 0;
    'imports: for import in selected {
        for reject in store.rejects(Some(import.id))? {
            if args.limit > 0 && shown >= args.limit {
                break 'imports;
            }
            shown += 1;
            let raw = String::from_utf8_lossy(&reject.raw);
            if args.json {
                let value = json!({
                    "source": reject.source,
                    "file": reject.path,
                    "record": reject.record,
                    "part": reject.part,
                    "line": reject.line,
                    "byte": reject.byte_offset,
                    "reason": reject.reason,
                    "kind": reject.kind.name(),
                    "subject": reject.subject,
                    "raw": raw,
                    "raw_truncated": reject.raw_truncated,
                });
                writeln!(out, "{}", serde_json::to_string(&value)?)?;
            } else {
                let what = match reject.record {
                    Some(r) => format!("record {r}"),
                    None => "file".to_string(),
                };
                writeln!(
                    out,
                    "{}:{}: [{}] {what}: {}",
                    reject.path, reject.line, reject.source, reject.reason
                )?;
            }
        }
    }
    if !args.json && shown == 0 {
        writeln!(out, "no rejects")?;
    }
    Ok(ExitCode::SUCCESS)
}
