//! `corpusdb filter`: apply quality filters to the examples already in the store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use corpusdb::filters::{self, Filters};
use corpusdb::index::Index;
use corpusdb::store::Store;

/// Mark examples that fail quality filters as excluded (reversibly; nothing is deleted).
///
/// Excluded examples are left out of `query`, `categories`, `export`, `analyze` and
/// training plans, and stay in the store with the filter's name and what it measured.
/// Running again applies the configuration as it is now: new failures are excluded and
/// exclusions by a listed filter that no longer fails are lifted. `--undo NAME` lifts every
/// exclusion of one filter. Filters are defined in YAML (default: configs/filters.yaml,
/// which documents every kind); `ingest --filters FILE` applies the same filters while
/// importing, rejecting instead of excluding.
#[derive(clap::Args)]
pub struct Args {
    /// The filters to apply.
    #[arg(long, default_value = "configs/filters.yaml")]
    config: PathBuf,
    /// Count what would change without writing anything.
    #[arg(long, conflicts_with = "undo")]
    dry_run: bool,
    /// Lift every exclusion made by the filter of this name, and apply nothing.
    #[arg(long, value_name = "NAME")]
    undo: Option<String>,
    /// Print the counts as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(store_path: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let store = Store::open(store_path)?;
    if let Some(name) = &args.undo {
        let freed = filters::undo(&store, name)?;
        let index = Index::open_or_create(store.path(), false)?;
        super::index::catch_up_waiting(&store, &index)?;
        if args.json {
            println!("{}", serde_json::json!({"filter": name, "lifted": freed}));
        } else {
            println!("filter `{name}`: {freed} exclusion(s) lifted");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let filters = Filters::load(&args.config)?;
    let total = store.counters()?.examples;
    let bar = super::index::bar("filtering", total);
    let run = filters::apply_to_store(&store, &filters, args.dry_run, &|done, _| {
        bar.set_position(done)
    })?;
    bar.finish_and_clear();
    if !args.dry_run {
        let index = Index::open_or_create(store.path(), false)?;
        super::index::catch_up_waiting(&store, &index)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&run)?);
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if args.dry_run { "would be" } else { "" };
    println!(
        "{} examples checked{}",
        run.examples,
        if args.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    );
    println!(
        "{:<20} {:>10} {:>10} {:>10}",
        "filter", "excluded", "still", "lifted"
    );
    for (name, c) in &run.filters {
        println!(
            "{name:<20} {:>10} {:>10} {:>10}",
            c.excluded, c.kept, c.lifted
        );
    }
    if args.dry_run {
        println!("(`excluded` and `lifted` {verb} written without --dry-run)");
    }
    Ok(ExitCode::SUCCESS)
}
