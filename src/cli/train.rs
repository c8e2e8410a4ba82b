//! `corpusdb train`, `eval`, `merge-adapter` and `init-model`: LoRA training on the
//! curriculum, evaluation of base against adapter, and model files.

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::DType;
use corpusdb::curriculum::Curriculum;
use corpusdb::eval::{self, EvalOptions, Probes};
use corpusdb::model::{weights, Llama, LlamaConfig, Lora};
use corpusdb::train::{self, memory, Checkpointing, DeviceKind, Resume, RunOptions, TrainConfig};

/// Train a LoRA adapter on the store, phase by phase through the curriculum.
///
/// Batches stream from the store in the plan's order; each optimizer step accumulates
/// `gradient_accumulation` micro-batches of one phase, clips the gradient norm and applies
/// AdamW at the phase's learning rate (with warmup and decay inside the phase). Progress
/// shows loss, learning rate, tokens/s and the ETA; every step is appended to
/// <output>/metrics.jsonl. Checkpoints (adapter, optimizer, sampler position) go to
/// <output>/checkpoints every `checkpoint.every` steps and at the end of each phase; the
/// final adapter, in PEFT's format, to <output>/adapter.
///
/// --model is a Hugging Face folder (config.json, model.safetensors or a sharded index,
/// tokenizer.json, tokenizer_config.json) or a .gguf file (dequantized; its tokenizer is
/// rebuilt from the metadata). `corpusdb init-model` writes a tiny random one.
///
/// --dry-run plans the run's memory instead of training: it reads the training config and
/// the model's config.json only (--model may be the folder or the config.json itself; no
/// weights, no store, no curriculum) and prints the expected peak of a training step,
/// broken down into base weights, LoRA parameters with gradients and AdamW moments, kept
/// activations, one decoder layer's working set, the loss chunk and runtime overhead. It
/// follows the config's `checkpointing` and `loss_chunk`; --tokens, --rows, --dtype and
/// --checkpointing change what is planned, --memory-budget checks it against a size:
///
/// corpusdb train --dry-run --config configs/training/emergent_personality.yaml --model
/// configs/models/llama-3-8b/config.json --dtype bf16 --memory-budget 80GiB
///
/// The plan is arithmetic over the model's shape (see src/train/memory.rs for each term).
/// It assumes the fused attention and RMS norm ops of the CPU's f32 path; with a bf16 base
/// or on CUDA attention keeps its scores and probabilities, and the table notes what they add.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Training config (YAML), e.g. configs/training/emergent_personality.yaml.
    #[arg(long)]
    config: PathBuf,
    /// The base model: a Hugging Face folder or a .gguf file (with --dry-run, a folder or
    /// its config.json).
    #[arg(long)]
    model: PathBuf,
    /// A tokenizer.json (or folder) instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Continue from the newest checkpoint in the output directory.
    #[arg(long, conflicts_with = "resume_from")]
    resume: bool,
    /// Continue from this checkpoint directory.
    #[arg(long)]
    resume_from: Option<PathBuf>,
    /// Stop after this many optimizer steps in all (overrides the config).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Output directory (overrides the config).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Print the run's summary (with --dry-run, the memory plan) as JSON.
    #[arg(long)]
    json: bool,
    /// Print the memory plan of a training step and exit, without loading weights or
    /// opening the store. Exits with status 1 if --memory-budget is given and the
    /// expected peak exceeds it.
    #[arg(long, conflicts_with_all = ["resume", "resume_from", "max_steps", "output", "tokenizer"])]
    dry_run: bool,
    /// Tokens per micro-batch to plan for [default: max_seq_len × rows, a fully packed
    /// micro-batch].
    #[arg(long, requires = "dry_run", value_parser = clap::value_parser!(u64).range(1..))]
    tokens: Option<u64>,
    /// Rows of the micro-batch [default: batch_size, or with --tokens the rows of
    /// max_seq_len tokens they fill].
    #[arg(long, requires = "dry_run", value_parser = clap::value_parser!(u64).range(1..))]
    rows: Option<u64>,
    /// Dtype of the base weights [default: the config's `dtype`, else its device's: cpu
    /// f32, cuda bf16].
    #[arg(long, requires = "dry_run", value_enum)]
    dtype: Option<DtypeArg>,
    /// Activation checkpointing to plan for [default: the config's `checkpointing`].
    #[arg(long, requires = "dry_run", value_enum)]
    checkpointing: Option<CheckpointingArg>,
    /// The memory the run may use, e.g. 80GiB, 24GB, 512MiB (G, M, K are binary): says
    /// whether the plan fits it.
    #[arg(long, requires = "dry_run", value_parser = parse_memory_size)]
    memory_budget: Option<u64>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

impl DtypeArg {
    fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CheckpointingArg {
    /// `layers` from 100M parameters on, `none` below.
    Auto,
    /// Keep only each layer's input; recompute layers in the backward pass.
    Layers,
    /// Keep every activation until the backward pass.
    None,
}

fn parse_memory_size(text: &str) -> Result<u64, String> {
    memory::parse_bytes(text).map_err(|e| e.0)
}

/// `train --dry-run`: the memory plan from the training config and the model's
/// config.json, nothing else loaded.
fn dry_run(config: &TrainConfig, args: &TrainArgs) -> anyhow::Result<ExitCode> {
    let path = &args.model;
    let model = if path.is_dir() {
        weights::read_hf_config(path)?
    } else if path.extension().is_some_and(|e| e == "gguf") {
        bail!(
            "{}: --dry-run reads a config.json, and a GGUF file's hyper-parameters are only read by loading the model; pass the Hugging Face config.json (or folder) of the same model",
            path.display()
        )
    } else {
        weights::read_hf_config_file(path)?
    };
    if model.hidden_size == 0
        || model.num_attention_heads == 0
        || model.kv_heads() == 0
        || model.num_attention_heads % model.kv_heads() != 0
    {
        bail!(
            "{}: hidden_size and the head counts must be positive, num_attention_heads a multiple of num_key_value_heads",
            path.display()
        );
    }
    let seq = config.max_seq_len as u64;
    let (tokens, rows) = match (args.tokens, args.rows) {
        (Some(tokens), Some(rows)) => (tokens, rows),
        (Some(tokens), None) => (tokens, tokens.div_ceil(seq)),
        (None, Some(rows)) => (rows * seq, rows),
        (None, None) => (config.batch_size as u64 * seq, config.batch_size as u64),
    };
    let dtype = args.dtype.map_or(config.weight_dtype(), DtypeArg::dtype);
    let checkpointing = match args.checkpointing {
        Some(CheckpointingArg::Auto) => Checkpointing::Auto,
        Some(CheckpointingArg::Layers) => Checkpointing::Layers,
        Some(CheckpointingArg::None) => Checkpointing::None,
        None => config.checkpointing,
    }
    .resolve(model.parameter_count());
    let pass =
        memory::LayerPass::for_training(config.device == DeviceKind::Cpu, dtype, model.head_dim());
    let plan = memory::plan(
        &model,
        &config.lora,
        tokens as usize,
        rows as usize,
        dtype,
        pass,
        checkpointing,
        config.loss_chunk,
    );
    let fits = args.memory_budget.map(|budget| plan.fits(budget));
    // Written, not printed: a closed pipe (`| head`) is then an error main ignores.
    let mut stdout = std::io::stdout().lock();
    if args.json {
        #[derive(serde::Serialize)]
        struct DryRun<'a> {
            #[serde(flatten)]
            plan: &'a memory::MemoryPlan,
            memory_budget: Option<u64>,
            fits: Option<bool>,
        }
        let out = DryRun {
            plan: &plan,
            memory_budget: args.memory_budget,
            fits,
        };
        writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        write!(stdout, "{plan}")?;
        if let Some(budget) = args.memory_budget {
            let (verdict, margin, side) = if plan.total <= budget {
                ("fits", budget - plan.total, "to spare")
            } else {
                ("does not fit", plan.total - budget, "over")
            };
            writeln!(
                stdout,
                "\n{verdict} the budget of {} ({} {side})",
                memory::format_bytes(budget),
                memory::format_bytes(margin),
            )?;
        }
    }
    Ok(if fits == Some(false) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn train(store_path: &Path, args: TrainArgs) -> anyhow::Result<ExitCode> {
    let mut config = TrainConfig::load(&args.config)?;
    if args.dry_run {
        return dry_run(&config, &args);
    }
    if let Some(output) = args.output {
        config.output = output;
    }
    crate::keep_freed_memory();
    let curriculum = Curriculum::load(&config.curriculum)
        .with_context(|| format!("curriculum of {}", args.config.display()))?;
    let (model, mut tokenizer) = train::load_model_as(
        &args.model,
        args.tokenizer.as_deref(),
        config.device,
        config.weight_dtype(),
    )?;
    if let Some(marker) = &config.end_of_turn {
        tokenizer.set_end_of_turn(marker);
    }
    if !config.inline_tool_calls {
        tokenizer.refuse_ignored_tool_calls();
    }
    super::plan::note_tool_rendering(&tokenizer);
    let (store, plan) = super::plan::store_and_plan(store_path, &curriculum)?;
    note_token_cache(&store, &tokenizer)?;
    let lora_params = config.lora.parameter_count(&model.config)?;
    let steps: u64 = train::steps_per_phase(&plan, &config).iter().sum();
    eprintln!(
        "model {} ({} layers, hidden {}, vocab {}), LoRA r={} alpha={} on {}: {} trainable parameters",
        args.model.display(),
        model.config.num_hidden_layers,
        model.config.hidden_size,
        model.config.vocab_size,
        config.lora.r,
        config.lora.alpha,
        config.lora.targets.join(","),
        lora_params
    );
    eprintln!(
        "plan {}: {} positions in {} phases, {} optimizer steps of {} x {} examples",
        plan.fingerprint,
        plan.total,
        plan.phases.len(),
        steps,
        config.batch_size,
        config.gradient_accumulation
    );
    let resume = match (args.resume, args.resume_from) {
        (_, Some(dir)) => Resume::From(dir),
        (true, None) => Resume::Latest,
        (false, None) => Resume::No,
    };
    let options = RunOptions {
        resume,
        max_steps: args.max_steps,
        base_model: args.model.display().to_string(),
    };
    let mut progress = Progress::new(std::io::stderr().is_terminal(), 10);
    let summary = train::run(
        &config,
        &model,
        &tokenizer,
        &store,
        &plan,
        &options,
        &mut progress,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(ExitCode::SUCCESS);
    }
    let tokens: u64 = summary.steps.iter().map(|s| s.tokens).sum();
    println!(
        "steps {}..{} in {:.1} s ({:.0} tokens/s)",
        summary.first_step,
        summary.first_step + summary.steps.len() as u64,
        summary.seconds,
        tokens as f64 / summary.seconds.max(1e-9)
    );
    let scored: Vec<(u64, f64)> = summary
        .steps
        .iter()
        .filter_map(|s| Some((s.step, s.loss?)))
        .collect();
    if let (Some(first), Some(last)) = (scored.first(), scored.last()) {
        println!(
            "loss {:.4} (step {}) -> {:.4} (step {})",
            first.1, first.0, last.1, last.0
        );
    }
    println!(
        "examples: {} trained, {} left out, {} tokens truncated at max_seq_len {}",
        summary.examples, summary.skipped, summary.truncated_tokens, config.max_seq_len
    );
    for (reason, n) in &summary.skip_reasons {
        println!(
            "  left out {n} x {reason} (e.g. ordinal {}; `corpusdb show` it)",
            summary.skipped_examples[reason]
        );
    }
    println!("adapter: {}", summary.adapter.display());
    if let Some(last) = summary.checkpoints.last() {
        println!("last checkpoint: {}", last.display());
    }
    println!("metrics: {}", config.output.join("metrics.jsonl").display());
    if !summary.finished {
        println!("the plan is not finished: `corpusdb train ... --resume` continues it");
    }
    Ok(ExitCode::SUCCESS)
}

/// Evaluate a model, with and without an adapter: held-out loss and perplexity per
/// category, and greedy answers to probe prompts per context.
///
/// The held-out examples are the curriculum's evaluation split (chosen by content hash,
/// never trained on). Probes come from configs/probes.yaml (technical, empathetic,
/// creative, analytical, conversational, ethical); generation is greedy with a KV cache.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// The base model: a Hugging Face folder or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory (e.g. <output>/adapter or a checkpoint).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The curriculum whose held-out split is scored.
    #[arg(long, default_value = "configs/curriculum/emergent_personality.yaml")]
    curriculum: PathBuf,
    /// Held-out examples per category.
    #[arg(long, default_value_t = 64)]
    per_category: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// Probe prompts (YAML).
    #[arg(long, default_value = "configs/probes.yaml")]
    probes: PathBuf,
    /// Skip the probes.
    #[arg(long)]
    no_probes: bool,
    /// Skip the held-out loss.
    #[arg(long)]
    no_loss: bool,
    /// Overrides the probes file's max_new_tokens.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

impl From<DeviceArg> for DeviceKind {
    fn from(d: DeviceArg) -> DeviceKind {
        match d {
            DeviceArg::Cpu => DeviceKind::Cpu,
            DeviceArg::Cuda => DeviceKind::Cuda,
        }
    }
}

pub fn eval(store_path: &Path, args: EvalArgs) -> anyhow::Result<ExitCode> {
    let (model, tokenizer) =
        train::load_model(&args.model, args.tokenizer.as_deref(), args.device.into())?;
    let adapter = match &args.adapter {
        Some(dir) => Some(Lora::load_peft(dir, &model.config, &model.device)?),
        None => None,
    };
    let mut losses = Vec::new();
    if !args.no_loss {
        let curriculum = Curriculum::load(&args.curriculum)?;
        let (store, plan) = super::plan::store_and_plan(store_path, &curriculum)?;
        let options = EvalOptions {
            per_category: args.per_category,
            batch_size: args.batch_size.max(1),
            max_seq_len: args.max_seq_len.max(2),
        };
        let bar = super::index::bar("held-out loss", 0);
        losses = eval::held_out_loss(
            &model,
            adapter.as_ref(),
            &store,
            &plan,
            &tokenizer,
            &options,
            &|done, total| {
                bar.set_length(total);
                bar.set_position(done)
            },
        )?;
        bar.finish_and_clear();
    }
    let mut answers = Vec::new();
    if !args.no_probes {
        let mut probes = Probes::load(&args.probes)?;
        if let Some(n) = args.max_new_tokens {
            probes.max_new_tokens = n;
        }
        let bar = super::index::bar("probes", 0);
        answers = eval::answer_probes(
            &model,
            adapter.as_ref(),
            &tokenizer,
            &probes,
            &|done, total| {
                bar.set_length(total);
                bar.set_position(done)
            },
        )?;
        bar.finish_and_clear();
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"held_out": losses, "probes": answers})
            )?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !losses.is_empty() {
        println!(
            "{:<14} {:>8} {:>9} {:>10} {:>10} {:>10} {:>10}",
            "category", "examples", "tokens", "base loss", "base ppl", "lora loss", "lora ppl"
        );
        for l in &losses {
            let opt = |v: Option<f64>, precision: usize| {
                v.map_or("-".to_string(), |v| format!("{v:.precision$}"))
            };
            println!(
                "{:<14} {:>8} {:>9} {:>10.4} {:>10.2} {:>10} {:>10}",
                l.category,
                l.examples,
                l.tokens,
                l.base_loss,
                l.base_perplexity,
                opt(l.adapter_loss, 4),
                opt(l.adapter_perplexity, 2)
            );
        }
        if let Some(all) = losses.iter().find(|l| l.category == "*") {
            if all.skipped > 0 || all.truncated_tokens > 0 {
                println!(
                    "left out: {} examples that failed to render or tokenize{}; {} tokens truncated at max_seq_len",
                    all.skipped,
                    all.skip_reason
                        .as_deref()
                        .map_or(String::new(), |r| format!(" (first: {r})")),
                    all.truncated_tokens
                );
            }
        }
    }
    for a in &answers {
        println!("\n[{}] {}", a.context, a.prompt);
        println!(
            "  base:    {}",
            a.base.trim().replace('\n', "\n           ")
        );
        if let Some(text) = &a.adapter {
            println!("  adapter: {}", text.trim().replace('\n', "\n           "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Fold a LoRA adapter into the base weights and write the merged model as a Hugging
/// Face folder (config.json, model.safetensors in f32, and the tokenizer files).
#[derive(clap::Args)]
pub struct MergeArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
}

pub fn merge_adapter(args: MergeArgs) -> anyhow::Result<ExitCode> {
    let (device, _) = DeviceKind::Cpu.open()?;
    let mut model = weights::load(&args.model, &device, candle_core::DType::F32)?;
    let lora = Lora::load_peft(&args.adapter, &model.config, &device)?;
    lora.merge_into(&mut model)?;
    weights::save_hf(&model, &args.out)?;
    let copied = copy_tokenizer_files(&args.model, &args.out)?;
    println!(
        "merged {} into {}: {} ({} tokenizer files copied)",
        args.adapter.display(),
        args.model.display(),
        args.out.display(),
        copied
    );
    Ok(ExitCode::SUCCESS)
}

fn copy_tokenizer_files(from: &Path, to: &Path) -> anyhow::Result<usize> {
    let dir = if from.is_dir() {
        from
    } else {
        from.parent().unwrap_or(Path::new("."))
    };
    let mut copied = 0;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        let source = dir.join(name);
        if source.is_file() {
            std::fs::copy(&source, to.join(name)).with_context(|| source.display().to_string())?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// Write a small randomly initialised Llama model (config.json, model.safetensors and
/// the tokenizer) to train and test with when no real model is at hand.
#[derive(clap::Args)]
pub struct InitModelArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// The tokenizer.json (or folder) the model is for; it sets the vocabulary size (unless
    /// --config does) and is copied beside the weights.
    #[arg(long, required_unless_present = "config")]
    tokenizer: Option<PathBuf>,
    /// A Hugging Face Llama `config.json` to take the shape from (vocabulary, sizes, heads,
    /// rope) instead of the size flags: e.g. configs/models/llama-3-8b/config.json.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Weight dtype of the written model.safetensors: f32 or bf16 (an 8B model is 16 GB in
    /// bf16).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 172)]
    intermediate: usize,
    #[arg(long, default_value_t = 2048)]
    max_positions: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the weights as <out>/model.gguf (f32, without tokenizer metadata: pass
    /// --tokenizer when loading it).
    #[arg(long)]
    gguf: bool,
}

pub fn init_model(args: InitModelArgs) -> anyhow::Result<ExitCode> {
    let tokenizer = match &args.tokenizer {
        Some(path) => {
            let file = if path.is_dir() {
                path.join("tokenizer.json")
            } else {
                path.clone()
            };
            let tokenizer = tokenizers::Tokenizer::from_file(&file)
                .map_err(|e| anyhow::anyhow!("{}: not a tokenizer.json: {e}", file.display()))?;
            Some((file, tokenizer))
        }
        None => None,
    };
    let config = match &args.config {
        Some(file) => {
            let config = weights::read_hf_config_file(file)?;
            if let Some((path, tokenizer)) = &tokenizer {
                if tokenizer.get_vocab_size(true) > config.vocab_size {
                    bail!(
                        "{} has {} tokens, more than the vocabulary of {} ({})",
                        path.display(),
                        tokenizer.get_vocab_size(true),
                        file.display(),
                        config.vocab_size
                    );
                }
            }
            config
        }
        None => {
            let (_, tokenizer) = tokenizer.as_ref().expect("clap requires one of the two");
            if args.heads == 0
                || args.kv_heads == 0
                || !args.heads.is_multiple_of(args.kv_heads)
                || !args.hidden.is_multiple_of(args.heads)
            {
                bail!("--heads must divide --hidden and be a multiple of --kv-heads");
            }
            let eos = ["<|im_end|>", "</s>", "<|endoftext|>"]
                .iter()
                .find_map(|t| tokenizer.token_to_id(t));
            LlamaConfig {
                vocab_size: tokenizer.get_vocab_size(true),
                hidden_size: args.hidden,
                intermediate_size: args.intermediate,
                num_hidden_layers: args.layers,
                num_attention_heads: args.heads,
                num_key_value_heads: Some(args.kv_heads),
                head_dim: None,
                rms_norm_eps: 1e-5,
                rope_theta: 10_000.0,
                rope_scaling: None,
                max_position_embeddings: args.max_positions,
                tie_word_embeddings: false,
                bos_token_id: None,
                eos_token_id: eos.map(|id| serde_json::json!(id)),
            }
        }
    };
    let dtype = args.dtype.dtype();
    let tensors = weights::random_tensors_as(&config, args.seed, dtype);
    let model = Llama::from_tensors(
        config,
        |name| Ok(tensors.get(name).cloned()),
        &candle_core::Device::Cpu,
        dtype,
    )?;
    drop(tensors);
    weights::save_hf_as(&model, &args.out, dtype)?;
    if let Some((file, _)) = &tokenizer {
        std::fs::copy(file, args.out.join("tokenizer.json"))
            .with_context(|| file.display().to_string())?;
        let config_file = file
            .parent()
            .unwrap_or(Path::new("."))
            .join("tokenizer_config.json");
        if config_file.is_file() {
            std::fs::copy(&config_file, args.out.join("tokenizer_config.json"))?;
        }
    }
    if args.gguf {
        weights::save_gguf(&model, &args.out.join("model.gguf"))?;
    }
    let parameters: usize = model
        .named_tensors()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    println!(
        "random model written to {} ({} parameters, vocab {})",
        args.out.display(),
        parameters,
        model.config.vocab_size
    );
    Ok(ExitCode::SUCCESS)
}

/// A training run's progress on stderr: a bar on a terminal, else a line every
/// `log_every` steps (and at the last).
struct Progress {
    bar: indicatif::ProgressBar,
    terminal: bool,
    log_every: u64,
    first_step: u64,
    started: std::time::Instant,
}

impl Progress {
    fn new(terminal: bool, log_every: u64) -> Progress {
        Progress {
            bar: indicatif::ProgressBar::hidden(),
            terminal,
            log_every,
            first_step: 0,
            started: std::time::Instant::now(),
        }
    }
}

impl train::Observer for Progress {
    fn started(&mut self, first_step: u64, last_step: u64) {
        self.first_step = first_step;
        self.started = std::time::Instant::now();
        if self.terminal {
            self.bar = indicatif::ProgressBar::new(last_step.saturating_sub(first_step));
            self.bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
                )
                .expect("template"),
            );
        }
    }

    fn step(&mut self, m: &train::StepMetrics, last_step: u64) {
        let loss = m.loss.map_or("-".into(), |l| format!("{l:.4}"));
        self.bar.set_message(format!(
            "{} loss {loss} lr {:.2e} {:.0} tok/s",
            m.phase, m.learning_rate, m.tokens_per_second
        ));
        self.bar.inc(1);
        let step = m.step;
        if !self.terminal
            && self.log_every > 0
            && (step.is_multiple_of(self.log_every) || step == last_step)
        {
            let done = (step - self.first_step) as f64;
            let eta = self.started.elapsed().as_secs_f64() / done.max(1.0)
                * last_step.saturating_sub(step) as f64;
            eprintln!(
                "step {step}/{last_step} {} loss {loss} lr {:.2e} {:.0} tok/s, eta {eta:.0} s",
                m.phase, m.learning_rate, m.tokens_per_second
            );
        }
    }

    fn ended(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Says whether the batches' tokens come from a token cache (`corpusdb tokenize`) and how
/// much of the store it covers, or how to make one.
fn note_token_cache(
    store: &corpusdb::store::Store,
    tokenizer: &corpusdb::batches::ChatTokenizer,
) -> anyhow::Result<()> {
    let examples = store.counters()?.examples;
    match corpusdb::batches::TokenCache::open(store, tokenizer)? {
        Some(cache) => eprintln!(
            "tokens from the token cache {} ({} of {} examples; the rest are encoded on the fly)",
            cache.dir().display(),
            cache.examples(),
            examples
        ),
        None => eprintln!(
            "examples are tokenized on the fly (`corpusdb tokenize` with this model's tokenizer and settings writes a token cache)"
        ),
    }
    Ok(())
}
