//! `corpusdb dedup --near`: near-duplicate clusters, excluded reversibly.

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use corpusdb::index::Index;
use corpusdb::neardup::{self, Config, Options, Stage};
use corpusdb::store::{Store, StoreOptions};

/// Find near-duplicate clusters (MinHash-LSH) and exclude all but one member of each.
///
/// Exact copies are already one example (the store's key is the SHA-1 of the content);
/// this finds lightly edited copies: a changed system prompt, a sentence added or
/// removed, other whitespace, punctuation or numbering. Each example's training text (its
/// messages' contents) is simplified (lower case, numbers as 0, punctuation dropped) and
/// cut into word n-grams; a MinHash signature of `bands × rows` permutations estimates
/// the Jaccard similarity of two examples' n-gram sets, and LSH bands find the candidate
/// pairs. Pairs at or above --threshold form clusters (transitively). Each cluster keeps
/// one representative: the member whose best source comes first in --prefer, then the
/// one with the most assistant text, then the lowest hash. The others are excluded with
/// the reason `near-dup of <hash> (J=0.87)`, as a quality filter's exclusions are: left
/// out of queries, exports, analysis and training plans, kept in the store, lifted with
/// --undo.
///
/// Signatures and bucket keys are stored per example, so after another import a run
/// signs only the new examples and compares them with the stored buckets. Changing
/// --ngram, --bands, --rows or --seed signs everything again. `corpusdb query
/// 'cluster:<id>'` lists a cluster (excluded members included), `corpusdb show HASH`
/// shows an example's cluster with each member's sources, and `corpusdb analyze` reports
/// near-duplicate shares per category and source.
///
/// Examples:
///   corpusdb dedup --near --dry-run
///   corpusdb dedup --near --threshold 0.85 --prefer oasst1,dolly
///   corpusdb dedup --near --undo
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Near-duplicates (MinHash-LSH); the only kind this command handles, since exact
    /// copies are merged at import.
    #[arg(long, required = true)]
    near: bool,
    /// Estimated Jaccard similarity at or above which two examples are near-duplicates
    /// (0.5 to 1).
    #[arg(long, default_value_t = 0.8)]
    threshold: f64,
    /// Count what would change without writing anything (signatures included).
    #[arg(long, conflicts_with = "undo")]
    dry_run: bool,
    /// Lift every near-duplicate exclusion and apply nothing (clusters stay known).
    #[arg(long)]
    undo: bool,
    /// Source names in order of priority (comma-separated): a cluster keeps the member
    /// from the first listed source; unlisted sources come last.
    #[arg(long, value_delimiter = ',', value_name = "SOURCE,...")]
    prefer: Vec<String>,
    /// Words per n-gram (shingle).
    #[arg(long, default_value_t = 5)]
    ngram: usize,
    /// LSH bands.
    #[arg(long, default_value_t = 14)]
    bands: usize,
    /// Permutations per band (signatures have bands × rows values).
    #[arg(long, default_value_t = 8)]
    rows: usize,
    /// Seed of the permutations (the same seed gives the same signatures and clusters).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(store_path: &Path, args: Args) -> anyhow::Result<ExitCode> {
    debug_assert!(args.near);
    let store = Store::open_with(
        store_path,
        &StoreOptions {
            write_buffer_bytes: neardup::WRITE_BUFFER_BYTES,
            ..StoreOptions::default()
        },
    )?;
    if args.undo {
        let freed = neardup::undo(&store)?;
        let index = Index::open_or_create(store.path(), false)?;
        super::index::catch_up_waiting(&store, &index)?;
        if args.json {
            println!("{}", serde_json::json!({"lifted": freed}));
        } else {
            println!("{freed} near-duplicate exclusion(s) lifted");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let config = Config {
        ngram: args.ngram,
        bands: args.bands,
        rows: args.rows,
        seed: args.seed,
        threshold: args.threshold,
    };
    if let Err(invalid) = config.validate() {
        bail!("{invalid}");
    }
    let options = Options {
        config,
        priority: args.prefer,
        dry_run: args.dry_run,
    };
    let total = store.counters()?.examples;
    let bar = super::index::bar("signing", total);
    let outcome = neardup::run(&store, &options, &|stage, done, total| {
        let name = match stage {
            Stage::Signing => "signing",
            Stage::Linking => "linking",
            Stage::Writing => "writing",
            Stage::Clustering => "clustering",
        };
        bar.set_prefix(name);
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    if !args.dry_run {
        let index = Index::open_or_create(store.path(), false)?;
        super::index::catch_up_waiting(&store, &index)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(ExitCode::SUCCESS);
    }
    let o = &outcome;
    println!(
        "{} examples, {} signed now{}; {} candidate pairs compared, {} new pairs at J >= {}",
        o.examples,
        o.signed,
        if o.resigned_all {
            " (parameters changed: all signed again)"
        } else {
            ""
        },
        o.candidates,
        o.new_pairs,
        neardup::PAIR_FLOOR
    );
    println!(
        "{} clusters at J >= {} ({} examples, largest {}): {} near-duplicates",
        o.clusters, o.threshold, o.members, o.largest_cluster, o.near_duplicates
    );
    let verb = if o.dry_run { "would be " } else { "" };
    println!(
        "{} {verb}excluded, {} already excluded, {} {verb}lifted{}",
        o.excluded,
        o.kept,
        o.lifted,
        if o.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}
