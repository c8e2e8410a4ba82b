//! `corpusdb tokenize`: the token cache that `batches` and `train` read.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use corpusdb::batches::{cache, ChatTokenizer};
use corpusdb::store::Store;

/// Render and tokenize every example once, for one tokenizer and chat template, into the
/// store's token cache (`<store>/tokens/<fingerprint>/`).
///
/// `batches` and `train` then read each example's token ids and loss mask from the cache
/// instead of reading the example from the store and encoding it: streaming a plan does
/// sequential-friendly reads of a flat file and no tokenizing. The cache is named by the
/// tokenizer, its chat template and the settings that change the tokens (end-of-turn
/// marker, tool-call inlining): a changed tokenizer or template is a new cache, and the
/// old one is simply not used. Run it again after new imports: it only encodes the
/// examples stored since. Examples past the cache's end are encoded on the fly, so a
/// stale cache is never wrong, only slower.
///
/// Pass the same --end-of-turn and --no-inline-tool-calls as the training run (its
/// config's `end_of_turn:` and `inline_tool_calls: false`), or the cache will not match.
#[derive(clap::Args)]
pub struct Args {
    /// The model's tokenizer.json, or the folder holding it with tokenizer_config.json
    /// (whose chat template is used; ChatML when it has none).
    #[arg(long)]
    tokenizer: PathBuf,
    /// End-of-turn marker, for templates whose marker cannot be read from their output.
    #[arg(long, value_name = "MARKER")]
    end_of_turn: Option<String>,
    /// Leave out examples with tool calls the template ignores, instead of writing the
    /// calls into the messages' text (a training config's `inline_tool_calls: false`).
    #[arg(long)]
    no_inline_tool_calls: bool,
}

pub fn run(store_path: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let mut tokenizer = ChatTokenizer::load(&args.tokenizer)?;
    if let Some(marker) = &args.end_of_turn {
        tokenizer.set_end_of_turn(marker);
    }
    if args.no_inline_tool_calls {
        tokenizer.refuse_ignored_tool_calls();
    }
    super::plan::note_tool_rendering(&tokenizer);
    let store = Store::open_read_only(store_path)?;
    let started = Instant::now();
    let bar = super::index::bar("tokenizing", 0);
    let report = cache::tokenize(&store, &tokenizer, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let new = report.examples - report.examples_before;
    if report.rewritten {
        eprintln!("note: the cache held another store's examples and was written again");
    }
    println!(
        "token cache {}: {} examples ({} new in {:.1}s), {} tokens, {} examples that cannot be encoded",
        report.dir.display(),
        report.examples,
        new,
        secs,
        report.tokens,
        report.skipped
    );
    Ok(ExitCode::SUCCESS)
}
