//! `corpusdb plan` and `corpusdb batches`: the curriculum's order, and training batches
//! streamed from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use corpusdb::batches::{self, BatchOptions, ChatTokenizer};
use corpusdb::curriculum::{Curriculum, Plan, PlanReport, SamplerState};
use serde_json::json;

/// Show what a curriculum trains on, phase by phase.
///
/// Per phase: examples per epoch and in all, epochs, learning rate, steps for a batch
/// size, and per mixture group the examples available, used per epoch, the repeat factor
/// and the target against the realised share. With --tokenizer, the exact number of
/// content tokens the phase trains on (counts cached in the store, as `analyze` does).
/// The plan's order is a pure function of the store, the curriculum and its seed; its
/// fingerprint names it in sampler states.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// The curriculum (YAML), e.g. configs/curriculum/emergent_personality.yaml.
    #[arg(long)]
    curriculum: PathBuf,
    /// A tokenizer.json (or a model directory) for exact token counts.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Examples per optimizer step (all ranks together), for the step counts.
    #[arg(long, default_value_t = 32)]
    batch_size: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn plan(store_path: &Path, args: PlanArgs) -> anyhow::Result<ExitCode> {
    crate::small_pages_only();
    let curriculum = Curriculum::load(&args.curriculum)?;
    // The store itself only when tokens are counted: opening all its table files takes
    // about 0.2 s at 10M examples.
    let index = super::index::open_index_for_reading(store_path)?;
    let started = std::time::Instant::now();
    let plan = Plan::build(&index, &curriculum)?;
    let built = started.elapsed().as_secs_f64();
    let tokens = match &args.tokenizer {
        Some(path) => {
            let store = corpusdb::store::Store::open_read_only(store_path)?;
            let counter = corpusdb::analyze::TokenCounter::load(path)?;
            let bar = super::index::bar("counting tokens", 0);
            let (counts, note) =
                corpusdb::analyze::token_counts(&store, &counter, &|done, total| {
                    bar.set_length(total);
                    bar.set_position(done)
                })?;
            bar.finish_and_clear();
            if let Some(note) = note {
                eprintln!("note: {note}");
            }
            Some(counts)
        }
        None => None,
    };
    let report = PlanReport::of(&plan, args.batch_size, tokens.as_deref(), built);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "curriculum {} (plan {}): {} examples in {} phases, {} held out for evaluation; built in {:.2}s",
        report.curriculum,
        report.fingerprint,
        report.examples,
        report.phases.len(),
        report.held_out,
        report.build_seconds
    );
    for phase in &report.phases {
        println!(
            "\n{}. {}  [{}]\n   {} epoch(s) x {} = {} examples, lr {}, {} steps of {}{}",
            phase.phase,
            phase.name,
            phase.select,
            phase.epochs,
            phase.per_epoch,
            phase.examples,
            phase.learning_rate,
            phase.steps,
            report.batch_size,
            match phase.tokens {
                Some(t) => format!(", {t} tokens"),
                None => String::new(),
            }
        );
        if phase.groups.len() > 1
            || phase
                .groups
                .first()
                .is_some_and(|g| g.target_share.is_some())
        {
            println!(
                "   {:<16} {:>10} {:>10} {:>7} {:>8} {:>8}",
                "group", "available", "per epoch", "repeat", "target", "share"
            );
            for g in &phase.groups {
                println!(
                    "   {:<16} {:>10} {:>10} {:>7.2} {:>7.1}% {:>7.1}%",
                    g.name,
                    g.available,
                    g.per_epoch,
                    g.repeat,
                    100.0 * g.target_share.unwrap_or(0.0),
                    100.0 * g.share
                );
            }
        }
        for note in &phase.notes {
            println!("   note: {note}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The store, read-only, and the plan of `curriculum` over it. The store opens on a
/// second thread while the plan builds from the index: at 10M examples each takes a few
/// hundred milliseconds, and a resumed run waits for both.
pub fn store_and_plan(
    store_path: &Path,
    curriculum: &Curriculum,
) -> anyhow::Result<(corpusdb::store::Store, Plan)> {
    std::thread::scope(|scope| {
        let store = scope.spawn(|| corpusdb::store::Store::open_read_only(store_path));
        let index = super::index::open_index_for_reading(store_path)?;
        let plan = Plan::build(&index, curriculum)?;
        let store = store.join().expect("opening the store does not panic")?;
        Ok((store, plan))
    })
}

/// Stream training batches from the store and report throughput.
///
/// Each step takes the next `ranks x batch-size` examples of the plan's order (never
/// across a phase); this rank gets every `ranks`-th of them. Conversations are rendered
/// with the model's chat template (tokenizer_config.json beside tokenizer.json, else
/// ChatML), tokenized with assistant tokens as the only trained labels, and packed into
/// rows of --max-seq-len tokens (or padded with --no-packing). Prints tokens/s, packing or
/// padding efficiency and the time to the first batch; --state saves where the run
/// stands, --resume continues from such a file (with any number of ranks).
#[derive(clap::Args)]
pub struct BatchesArgs {
    #[arg(long)]
    curriculum: PathBuf,
    /// tokenizer.json, or a model directory holding it (and tokenizer_config.json).
    #[arg(long)]
    tokenizer: PathBuf,
    /// The text that ends an assistant turn, when the chat template's own marker cannot be
    /// read from its output (a training config's `end_of_turn:`).
    #[arg(long)]
    end_of_turn: Option<String>,
    /// Examples per rank per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// One example per row, padded, instead of packing several into each row.
    #[arg(long)]
    no_packing: bool,
    #[arg(long, default_value_t = 0)]
    rank: usize,
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// Stop after this many batches (0: the whole plan).
    #[arg(long, default_value_t = 0)]
    limit: u64,
    /// Write every batch as a JSON line (positions, ordinals, ids, labels, boundaries).
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Continue from a sampler state file written by --state.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Write the sampler state after the last batch to this file.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Batches built ahead on the background thread.
    #[arg(long, default_value_t = 4)]
    prefetch: usize,
}

/// Says on stderr when the model's chat template ignores tool calls or schemas, which are
/// then written into the messages' text (README, "Tool calls").
pub fn note_tool_rendering(tokenizer: &ChatTokenizer) {
    let (calls, schemas) = tokenizer.inlines_tool_use();
    let what = match (calls, schemas) {
        (true, true) => "tool calls and tool schemas",
        (true, false) => "tool calls",
        (false, true) => "tool schemas",
        (false, false) => return,
    };
    eprintln!(
        "note: the chat template ignores {what}; they are written into the messages' text as <tool_call>/<tools> blocks"
    );
}

pub fn batches(store_path: &Path, args: BatchesArgs) -> anyhow::Result<ExitCode> {
    crate::small_pages_only();
    if args.ranks == 0 || args.rank >= args.ranks {
        bail!("--rank must be below --ranks");
    }
    let curriculum = Curriculum::load(&args.curriculum)?;
    let mut tokenizer = ChatTokenizer::load(&args.tokenizer)?;
    if let Some(marker) = &args.end_of_turn {
        tokenizer.set_end_of_turn(marker);
    }
    note_tool_rendering(&tokenizer);
    tokenizer.require_end_of_turn().map_err(|e| {
        anyhow::anyhow!(
            "{}",
            e.0.replace("in the training config", "with --end-of-turn")
        )
    })?;
    let (store, plan) = store_and_plan(store_path, &curriculum)?;
    let position = match &args.resume {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
            let state: SamplerState =
                serde_json::from_str(&text).with_context(|| path.display().to_string())?;
            plan.resume(&state)?
        }
        None => 0,
    };
    let options = BatchOptions {
        batch_size: args.batch_size.max(1),
        max_seq_len: args.max_seq_len.max(1),
        packing: !args.no_packing,
        rank: args.rank,
        ranks: args.ranks,
    };
    let mut dump = match &args.dump {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| path.display().to_string())?,
        )),
        None => None,
    };
    let mut last_state = plan.state(position);
    let mut seen = 0u64;
    let consume = |stream: &mut batches::BatchStream| -> anyhow::Result<batches::StreamStats> {
        for batch in &mut *stream {
            let batch = batch?;
            last_state = batch.next.clone();
            if let Some(out) = &mut dump {
                let line = json!({
                    "phase": batch.phase,
                    "learning_rate": batch.learning_rate,
                    "positions": batch.positions,
                    "ordinals": batch.ordinals,
                    "input_ids": batch.input_ids.to_vec2::<u32>().unwrap_or_default(),
                    "labels": batch.labels.to_vec2::<i64>().unwrap_or_default(),
                    "position_ids": batch.position_ids.to_vec2::<u32>().unwrap_or_default(),
                    "cu_seqlens": batch.cu_seqlens.to_vec1::<u32>().unwrap_or_default(),
                "seq_starts": batch.seq_starts.to_vec1::<u32>().unwrap_or_default(),
                    "next": batch.next,
                });
                writeln!(out, "{line}")?;
            }
            for (ordinal, reason) in &batch.skipped {
                eprintln!("skipped ordinal {ordinal}: {reason}");
            }
            seen += 1;
            if args.limit != 0 && seen >= args.limit {
                break;
            }
        }
        Ok(stream.stats())
    };
    let stats = batches::with_stream(
        &store,
        &plan,
        &tokenizer,
        position,
        &options,
        args.prefetch,
        consume,
    )?;
    if let Some(out) = &mut dump {
        out.flush()?;
    }
    if let Some(path) = &args.state {
        std::fs::write(path, serde_json::to_string(&last_state)?)?;
    }
    let secs = stats.seconds.max(1e-9);
    println!(
        "{} batches, {} examples, {} tokens ({} trained) in {:.2}s: {:.0} tokens/s",
        stats.batches,
        stats.examples,
        stats.tokens,
        stats.trained_tokens,
        secs,
        stats.tokens as f64 / secs
    );
    println!(
        "{} efficiency {:.1}% (real tokens / row capacity), first batch after {:.3}s, {} tokens truncated, {} examples skipped",
        if options.packing { "packing" } else { "padding" },
        100.0 * stats.tokens as f64 / stats.capacity.max(1) as f64,
        stats.seconds_to_first_batch,
        stats.truncated,
        stats.skipped
    );
    if stats.cached > 0 {
        println!(
            "{} of {} examples from the token cache ({} encoded from the store)",
            stats.cached,
            stats.examples + stats.skipped,
            stats.examples + stats.skipped - stats.cached
        );
    }
    println!(
        "state: position {} of {} (plan {})",
        last_state.position, plan.total, plan.fingerprint
    );
    Ok(ExitCode::SUCCESS)
}

/// Train a small byte-level BPE tokenizer on the store's text (for trying `batches` and
/// `analyze --tokenizer` without a model at hand; real training uses the model's own).
#[derive(clap::Args)]
pub struct TrainTokenizerArgs {
    /// Where to write tokenizer.json.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8000)]
    vocab: usize,
    /// Examples whose text trains it (in hash order).
    #[arg(long, default_value_t = 20_000)]
    examples: usize,
}

pub fn train_tokenizer(store_path: &Path, args: TrainTokenizerArgs) -> anyhow::Result<ExitCode> {
    let store = corpusdb::store::Store::open_read_only(store_path)?;
    batches::template::train_from_store(&store, args.examples, args.vocab, &args.out)?;
    println!("tokenizer written to {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
