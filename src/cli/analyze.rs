//! `corpusdb analyze`: the distribution of the corpus against its targets.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use corpusdb::analyze::{self, Analysis, Group, Targets, TokenCounter};
use corpusdb::store::Store;

/// Show the corpus per category and per source against the targets, and check them.
///
/// Per category and per source: examples in use, share, characters, tokens, mean / median
/// / p95 length in tokens, turns, duplicates removed, records rejected and examples
/// excluded (by quality filters or as near-duplicates). When `dedup --near` has run, the
/// near-duplicate clusters and the share of near-duplicates per category and per source
/// (of all stored examples, excluded ones included) follow. Tokens are exact with --tokenizer (counted in parallel and
/// cached per tokenizer in the store, so a second run is fast), otherwise estimated as
/// characters / 4 and labelled so. The targets (default: the corpus plan's expected
/// distribution, as in configs/targets.yaml) are shown beside the actual shares, and the
/// checks (enough categories, none above the maximum share, per-category minimums) pass
/// or fail: the exit code is 1 when one fails, so scripts can gate on it.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face tokenizer.json (or a model directory holding one) for exact counts.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Targets and constraints (YAML, as configs/targets.yaml); default: the corpus plan.
    #[arg(long)]
    targets: Option<PathBuf>,
    /// Print the analysis as JSON.
    #[arg(long)]
    json: bool,
    /// Also write a self-contained HTML report (charts, no network needed) to this file.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
}

pub fn run(store_path: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let targets = match &args.targets {
        Some(path) => Targets::load(path)?,
        None => Targets::strategy_default(),
    };
    let counter = match &args.tokenizer {
        Some(path) => Some(TokenCounter::load(path)?),
        None => None,
    };
    let store = Store::open_read_only(store_path)?;
    let total = store.counters()?.examples;
    let bar = super::index::bar("analysing", total);
    let analysis = analyze::analyze(&store, counter.as_ref(), &targets, &|done, _| {
        bar.set_position(done)
    })?;
    bar.finish_and_clear();
    if let Some(path) = &args.html {
        let title = format!("corpusdb analysis of {}", store.path().display());
        std::fs::write(path, corpusdb::report::render(&analysis, &title))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&analysis)?);
    } else {
        print_tables(&analysis);
    }
    Ok(if analysis.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn pct(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

fn print_tables(a: &Analysis) {
    let tokens = if a.tokens_exact { "tokens" } else { "tokens~" };
    println!(
        "{} examples in use, {} excluded; {} records read, {} duplicates, {} rejected",
        a.examples, a.excluded, a.records_read, a.duplicates, a.rejected
    );
    println!("tokens: {} ({})\n", a.tokens, a.token_count);
    let header = |first: &str, with_target: bool| {
        print!("{first:<22} {:>9} {:>7}", "examples", "share");
        if with_target {
            print!(" {:>13} {:>9}", "target", "status");
        }
        println!(
            " {:>12} {:>7} {:>7} {:>7} {:>5} {:>6} {:>6} {:>6}",
            tokens, "mean", "median", "p95", "turns", "dup", "rej", "excl"
        );
    };
    let stats = |g: Option<&Group>| match g {
        Some(g) => println!(
            " {:>12} {:>7.0} {:>7} {:>7} {:>5.1} {:>6} {:>6} {:>6}",
            g.tokens,
            g.mean_tokens,
            g.median_tokens,
            g.p95_tokens,
            g.mean_turns,
            g.duplicates,
            g.rejected,
            g.excluded
        ),
        None => println!(),
    };
    header("category", true);
    for row in &a.targets {
        let group = a.categories.iter().find(|g| g.name == row.category);
        let target = match (row.min_share, row.max_share) {
            (Some(x), Some(y)) => format!("{}-{}", pct(x), pct(y)),
            (Some(x), None) => format!(">={}", pct(x)),
            (None, Some(y)) => format!("<={}", pct(y)),
            (None, None) => "-".to_string(),
        };
        print!(
            "{:<22} {:>9} {:>7} {:>13} {:>9}",
            row.category,
            group.map_or(0, |g| g.examples),
            pct(row.share),
            target,
            row.status
        );
        stats(group);
    }
    println!();
    header("source", false);
    for g in &a.sources {
        print!("{:<22} {:>9} {:>7}", g.name, g.examples, pct(g.share));
        stats(Some(g));
    }
    println!();
    if a.clusters > 0 {
        println!(
            "near-duplicates: {} clusters, {} examples in them, {} near-duplicates ({} of stored examples)",
            a.clusters,
            a.cluster_members,
            a.near_duplicates,
            pct(a.near_duplicates as f64 / (a.examples + a.excluded).max(1) as f64)
        );
        for (title, groups) in [("category", &a.categories), ("source", &a.sources)] {
            println!(
                "{title:<22} {:>9} {:>9} {:>9} {:>7}",
                "stored", "clustered", "near-dup", "share"
            );
            for g in groups.iter().filter(|g| g.examples + g.excluded > 0) {
                println!(
                    "{:<22} {:>9} {:>9} {:>9} {:>7}",
                    g.name,
                    g.examples + g.excluded,
                    g.cluster_members,
                    g.near_duplicates,
                    pct(g.near_duplicate_share)
                );
            }
        }
        println!();
    }
    for check in &a.checks {
        println!(
            "{}  {}: {}",
            if check.passed { "PASS" } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    for note in &a.notes {
        println!("note: {note}");
    }
}
