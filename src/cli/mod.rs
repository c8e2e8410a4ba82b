//! Command-line interface: one file per subcommand; the library does the work.

mod analyze;
mod dedup;
mod export;
mod filter;
mod formats;
mod generate;
mod index;
mod ingest;
mod inspect;
mod plan;
mod tokenize;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

const LONG_ABOUT: &str = "\
corpusdb turns heterogeneous instruction-tuning datasets into one deduplicated corpus.

Every example is a conversation stored under the SHA-1 of its canonical content, so the
same conversation from two datasets is stored once and both sources are kept as provenance.
Imports resume where they stopped and are no-ops when repeated; bad records are kept in a
rejects ledger with file, line and reason. Quality filters and near-duplicate
detection (`dedup --near`) set examples aside reversibly,
`analyze` checks the distribution against the corpus plan, and `plan` / `batches` stream
curriculum-ordered, tokenized training batches straight from the store, and `train`
LoRA-trains a Llama-family model on them (candle; CPU, or CUDA with the `cuda` feature).

Typical use:
  corpusdb ingest data/dolly.jsonl --source dolly --category instruction
  corpusdb ingest --manifest configs/sample-corpus.yaml
  corpusdb ingest --registry configs/sources.yaml --data-dir ~/datasets
  corpusdb formats
  corpusdb filter --dry-run
  corpusdb dedup --near --dry-run
  corpusdb analyze --html report.html
  corpusdb plan --curriculum configs/curriculum/emergent_personality.yaml
  corpusdb tokenize --tokenizer DIR
  corpusdb batches --curriculum configs/curriculum/emergent_personality.yaml --tokenizer DIR
  corpusdb train --config configs/training/emergent_personality.yaml --model DIR|FILE.gguf
  corpusdb eval --model DIR --adapter runs/emergent_personality/adapter
  corpusdb stats
  corpusdb imports
  corpusdb rejects --source dolly
  corpusdb show 3f2a9c
  corpusdb categories
  corpusdb query 'category:math AND turns:>=2' --limit 5";

#[derive(Parser)]
#[command(name = "corpusdb", version, about = "Embedded corpus database for instruction-tuning data", long_about = LONG_ABOUT)]
struct Cli {
    /// Directory of the store (created by the first ingest).
    #[arg(
        long,
        global = true,
        env = "CORPUSDB_STORE",
        default_value = "storage/corpus"
    )]
    store: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Ingest(Box<ingest::Args>),
    Formats(formats::Args),
    Filter(filter::Args),
    Dedup(dedup::Args),
    Analyze(analyze::Args),
    Plan(plan::PlanArgs),
    Batches(plan::BatchesArgs),
    TrainTokenizer(plan::TrainTokenizerArgs),
    Tokenize(tokenize::Args),
    Imports(inspect::ImportsArgs),
    Stats(inspect::StatsArgs),
    Show(inspect::ShowArgs),
    Rejects(inspect::RejectsArgs),
    Init(index::InitArgs),
    Query(index::QueryArgs),
    Categories(index::CategoriesArgs),
    Reindex(index::ReindexArgs),
    Check(index::CheckArgs),
    Export(export::Args),
    Generate(generate::Args),
    InitModel(train::InitModelArgs),
    Train(Box<train::TrainArgs>),
    Eval(Box<train::EvalArgs>),
    MergeAdapter(train::MergeArgs),
}

pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Ingest(args) => ingest::run(&cli.store, *args),
        Command::Formats(args) => formats::run(args),
        Command::Filter(args) => filter::run(&cli.store, args),
        Command::Dedup(args) => dedup::run(&cli.store, args),
        Command::Analyze(args) => analyze::run(&cli.store, args),
        Command::Plan(args) => plan::plan(&cli.store, args),
        Command::Batches(args) => plan::batches(&cli.store, args),
        Command::TrainTokenizer(args) => plan::train_tokenizer(&cli.store, args),
        Command::Tokenize(args) => tokenize::run(&cli.store, args),
        Command::Imports(args) => inspect::imports(&cli.store, args),
        Command::Stats(args) => inspect::stats(&cli.store, args),
        Command::Show(args) => inspect::show(&cli.store, args),
        Command::Rejects(args) => inspect::rejects(&cli.store, args),
        Command::Init(args) => index::init(&cli.store, args),
        Command::Query(args) => index::query(&cli.store, args),
        Command::Categories(args) => index::categories(&cli.store, args),
        Command::Reindex(args) => index::reindex(&cli.store, args),
        Command::Check(args) => index::check(&cli.store, args),
        Command::Export(args) => export::run(&cli.store, args),
        Command::Generate(args) => generate::run(args),
        Command::InitModel(args) => train::init_model(args),
        Command::Train(args) => train::train(&cli.store, *args),
        Command::Eval(args) => train::eval(&cli.store, *args),
        Command::MergeAdapter(args) => train::merge_adapter(args),
    }
}
