//! LoRA training driven by the curriculum: batches stream from the store in plan order,
//! each step accumulates gradients over `gradient_accumulation` micro-batches of the same
//! phase, clips them and applies AdamW at the phase's learning rate (warmup and decay
//! within each phase).
//!
//! Everything a run depends on is a function of `(config, store snapshot, step)`: the
//! batches come from the plan position, dropout masks from `(seed, step, micro-batch)`.
//! A checkpoint therefore holds only the adapter, the optimizer moments, the step and
//! the sampler position, and a resumed run on the CPU computes exactly the losses an
//! uninterrupted run would have.

pub mod checkpoint;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod step;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::batches::{self, BatchOptions, ChatTokenizer};
use crate::curriculum::Plan;
use crate::model::{DropoutKey, Llama, Lora, LoraConfig};
use crate::store::Store;
pub use checkpoint::{Checkpoint, TrainerState};
pub use loss::{token_nll, Targets};
pub use optim::{AdamW, Decay, OptimizerConfig, ScheduleConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Batches(#[from] batches::Error),
    #[error(transparent)]
    Curriculum(#[from] crate::curriculum::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Checkpoint(String),
}

pub(crate) fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The device and the dtype of the frozen base weights on it (LoRA parameters and
    /// optimizer state are always f32).
    pub fn open(self) -> Result<(Device, DType), Error> {
        match self {
            DeviceKind::Cpu => Ok((Device::Cpu, self.default_dtype())),
            DeviceKind::Cuda => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::Config(
                        "device `cuda` needs a build with `--features cuda`".into(),
                    ));
                }
                let device = Device::new_cuda(0)?;
                #[cfg(feature = "cuda")]
                if let Device::Cuda(cuda) = &device {
                    crate::model::cuda::tune_for_training(cuda)?;
                }
                Ok((device, self.default_dtype()))
            }
        }
    }

    /// f32 on the CPU, bf16 on CUDA.
    pub fn default_dtype(self) -> DType {
        match self {
            DeviceKind::Cpu => DType::F32,
            DeviceKind::Cuda => DType::BF16,
        }
    }
}

/// The dtype of a model's frozen weights (`dtype:` in a training config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    F32,
    Bf16,
}

impl WeightDtype {
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many optimizer steps (and at the end of every phase).
    #[serde(default = "default_every")]
    pub every: u64,
    /// Checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_every() -> u64 {
    500
}
fn default_keep() -> usize {
    3
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: default_every(),
            keep: default_keep(),
        }
    }
}

/// A training config (`configs/training/*.yaml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The curriculum whose plan orders the batches and sets each phase's rate.
    pub curriculum: PathBuf,
    #[serde(default)]
    pub lora: LoraConfig,
    /// Examples per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_accumulation")]
    pub gradient_accumulation: usize,
    #[serde(default = "default_seq")]
    pub max_seq_len: usize,
    #[serde(default = "default_true")]
    pub packing: bool,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Where checkpoints, the final adapter and `metrics.jsonl` go.
    pub output: PathBuf,
    #[serde(default)]
    pub device: DeviceKind,
    /// Dtype of the frozen base weights and activations (`f32` or `bf16`); LoRA
    /// parameters, the loss and the optimizer state are f32 either way. Default: f32 on
    /// the CPU, bf16 on CUDA.
    #[serde(default)]
    pub dtype: Option<WeightDtype>,
    /// Seed of adapter initialisation and dropout; the curriculum's seed if absent.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop after this many optimizer steps (a checkpoint is written).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Multiplies every phase's learning rate (the curriculum's rates suit a pretrained
    /// model; a tiny random one needs far larger steps).
    #[serde(default = "default_scale")]
    pub learning_rate_scale: f64,
    /// Whether each decoder layer's activations are recomputed in the backward pass
    /// instead of being kept from the forward pass.
    #[serde(default)]
    pub checkpointing: Checkpointing,
    /// Trained tokens whose logits are computed at once by the loss (their logits and
    /// gradient, `[loss_chunk, vocab]` each, are the loss's whole working set).
    #[serde(default = "default_loss_chunk")]
    pub loss_chunk: usize,
    /// The share of examples that may fail to render or tokenize (each is left out and
    /// counted, with its reason, in `metrics.jsonl` and the summary); above it, once 100
    /// examples have been seen, training stops with the grouped reasons.
    #[serde(default = "default_max_skipped_share")]
    pub max_skipped_share: f64,
    /// The text that ends an assistant turn, trained after each reply, when the chat
    /// template's own marker cannot be found (e.g. `<|eot_id|>`, `<end_of_turn>`).
    #[serde(default)]
    pub end_of_turn: Option<String>,
    /// When the model's chat template ignores tool calls or schemas: write them into the
    /// messages' text (`true`, the default) or leave such examples out as skipped.
    #[serde(default = "default_true")]
    pub inline_tool_calls: bool,
}

fn default_max_skipped_share() -> f64 {
    0.01
}

/// Activation checkpointing (`checkpointing:` in a training config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// `layers` for models of [`Checkpointing::AUTO_PARAMETERS`] parameters or more,
    /// `none` below.
    #[default]
    Auto,
    /// Keep only each decoder layer's input; recompute the layer in the backward pass.
    Layers,
    /// Keep every activation until the backward pass (fastest, most memory).
    None,
}

impl Checkpointing {
    /// Models from this size on checkpoint by default: from about 100M parameters the
    /// kept activations of a 2,048-token micro-batch outgrow the model itself.
    pub const AUTO_PARAMETERS: u64 = 100_000_000;

    /// `Layers` or `None` for a model of `parameters` base parameters.
    pub fn resolve(self, parameters: u64) -> Checkpointing {
        match self {
            Checkpointing::Auto if parameters >= Self::AUTO_PARAMETERS => Checkpointing::Layers,
            Checkpointing::Auto => Checkpointing::None,
            other => other,
        }
    }
}

fn default_loss_chunk() -> usize {
    1024
}

fn default_scale() -> f64 {
    1.0
}

fn default_batch() -> usize {
    8
}
fn default_accumulation() -> usize {
    1
}
fn default_seq() -> usize {
    2048
}
fn default_true() -> bool {
    true
}

impl TrainConfig {
    pub fn load(path: &Path) -> Result<TrainConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(io_error(path))?;
        let config: TrainConfig = serde_yaml::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        config
            .check()
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    pub fn check(&self) -> Result<(), crate::invalid::Invalid> {
        if self.batch_size == 0 || self.gradient_accumulation == 0 || self.max_seq_len < 2 {
            return Err(
                "batch_size and gradient_accumulation must be at least 1, max_seq_len at least 2"
                    .into(),
            );
        }
        let o = &self.optimizer;
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) || o.eps <= 0.0 {
            return Err("optimizer: beta1 and beta2 must be in [0, 1) and eps positive".into());
        }
        if o.weight_decay < 0.0 || o.max_grad_norm < 0.0 {
            return Err("optimizer: weight_decay and max_grad_norm must not be negative".into());
        }
        if !(0.0..=1.0).contains(&self.schedule.min_lr_ratio)
            || !(0.0..=1.0).contains(&self.schedule.warmup_ratio)
        {
            return Err("schedule: min_lr_ratio and warmup_ratio must be in [0, 1]".into());
        }
        if self.learning_rate_scale.is_nan() || self.learning_rate_scale <= 0.0 {
            return Err("learning_rate_scale must be positive".into());
        }
        if self.loss_chunk == 0 {
            return Err("loss_chunk must be at least 1".into());
        }
        if self.checkpoint.every == 0 || self.checkpoint.keep == 0 {
            return Err("checkpoint.every and checkpoint.keep must be at least 1".into());
        }
        self.lora.targets().map(|_| ())
    }

    /// The dtype of the base weights: the config's, or the device's default.
    pub fn weight_dtype(&self) -> DType {
        self.dtype
            .map_or_else(|| self.device.default_dtype(), WeightDtype::dtype)
    }

    pub fn batch_options(&self) -> BatchOptions {
        BatchOptions {
            batch_size: self.batch_size,
            max_seq_len: self.max_seq_len,
            packing: self.packing,
            rank: 0,
            ranks: 1,
        }
    }

    /// Positions one optimizer step covers.
    fn step_span(&self) -> u64 {
        (self.batch_size * self.gradient_accumulation) as u64
    }
}

/// Optimizer steps of each phase of the plan (a step never crosses a phase).
pub fn steps_per_phase(plan: &Plan, config: &TrainConfig) -> Vec<u64> {
    plan.phases
        .iter()
        .map(|p| p.len().div_ceil(config.step_span()))
        .collect()
}

/// One optimizer step's record (a line of `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub phase: String,
    /// Mean next-token loss over the step's trained tokens (none when no token of the
    /// step was trained, e.g. every reply was truncated away).
    pub loss: Option<f64>,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    /// Plan position after the step.
    pub position: u64,
    /// Examples trained in the step, examples left out (rendering or tokenizing failed),
    /// and tokens cut off by `max_seq_len`.
    #[serde(default)]
    pub examples: u64,
    #[serde(default)]
    pub skipped: u64,
    #[serde(default)]
    pub truncated_tokens: u64,
}

/// How a run starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// A fresh adapter (refused if the output already has checkpoints).
    No,
    /// The newest checkpoint in the output directory.
    Latest,
    /// A given checkpoint directory.
    From(PathBuf),
}

pub struct RunOptions {
    pub resume: Resume,
    /// Overrides `max_steps` of the config.
    pub max_steps: Option<u64>,
    /// Recorded as `base_model_name_or_path` in saved adapters.
    pub base_model: String,
}

/// What a training run reports as it goes ([`run`]); the library prints nothing itself
/// (the CLI draws a progress bar or logs lines from these).
pub trait Observer {
    /// The run goes from step `first_step` to `last_step`.
    fn started(&mut self, _first_step: u64, _last_step: u64) {}
    /// Step `metrics.step` of `last_step` finished (also written to `metrics.jsonl`).
    fn step(&mut self, _metrics: &StepMetrics, _last_step: u64) {}
    /// A checkpoint was written to `dir`.
    fn checkpoint(&mut self, _dir: &Path) {}
    /// The run ended after [`Observer::started`] (finished, stopped at `max_steps`, or
    /// failed).
    fn ended(&mut self) {}
}

/// An observer that ignores everything.
pub struct Quiet;

impl Observer for Quiet {}

#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub first_step: u64,
    pub steps: Vec<StepMetrics>,
    /// Examples trained, left out, and tokens truncated over the run.
    pub examples: u64,
    pub skipped: u64,
    pub truncated_tokens: u64,
    /// Why examples were left out: reason -> count (the first ordinal of each in
    /// `skipped_examples`).
    pub skip_reasons: std::collections::BTreeMap<String, u64>,
    pub skipped_examples: std::collections::BTreeMap<String, u64>,
    pub adapter: PathBuf,
    pub checkpoints: Vec<PathBuf>,
    pub finished: bool,
    pub seconds: f64,
}

/// Trains a LoRA adapter on `model` through the curriculum `plan`.
pub fn run(
    config: &TrainConfig,
    model: &Llama,
    tokenizer: &ChatTokenizer,
    store: &Store,
    plan: &Plan,
    options: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<RunSummary, Error> {
    let started = Instant::now();
    tokenizer
        .require_end_of_turn()
        .map_err(|e| Error::Config(e.0))?;
    if config.max_seq_len > model.config.max_position_embeddings {
        return Err(Error::Config(format!(
            "max_seq_len {} exceeds the model's max_position_embeddings {}",
            config.max_seq_len, model.config.max_position_embeddings
        )));
    }
    let seed = config.seed.unwrap_or(plan.curriculum.seed);
    let device = model.device.clone();
    std::fs::create_dir_all(&config.output).map_err(io_error(&config.output))?;
    let checkpoints_dir = config.output.join("checkpoints");
    let resume_from = match &options.resume {
        Resume::No => {
            if let Some(existing) = checkpoint::latest(&checkpoints_dir)? {
                return Err(Error::Checkpoint(format!(
                    "{} already holds checkpoints ({}); pass --resume to continue, or choose another output",
                    checkpoints_dir.display(),
                    existing.display()
                )));
            }
            None
        }
        Resume::Latest => Some(checkpoint::latest(&checkpoints_dir)?.ok_or_else(|| {
            Error::Checkpoint(format!(
                "no checkpoint in {} to resume from",
                checkpoints_dir.display()
            ))
        })?),
        Resume::From(dir) => Some(dir.clone()),
    };

    let mut lora = Lora::new(config.lora.clone(), &model.config, seed, &device)?;
    let mut optimizer = AdamW::new(config.optimizer.clone());
    let mut step = 0u64;
    let mut position = 0u64;
    if let Some(dir) = &resume_from {
        let state = checkpoint::load(dir, &mut lora, &mut optimizer, &device)?;
        position = plan.resume(&state.sampler)?;
        step = state.step;
        // Checkpoints and metrics after the resumed step belong to a run that is now
        // abandoned: set aside (never deleted), so that `--resume` and pruning only see
        // this run, and the metrics log has each step once.
        checkpoint::set_aside_after(&checkpoints_dir, step)?;
        truncate_metrics(&config.output.join("metrics.jsonl"), step)?;
    }
    let first_step = step;
    let max_steps = options.max_steps.or(config.max_steps);
    let phase_steps = steps_per_phase(plan, config);
    let total_steps: u64 = phase_steps.iter().sum::<u64>();
    let last_step = max_steps.map_or(total_steps, |m| m.min(total_steps));

    let metrics_file = config.output.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_file)
        .map_err(io_error(&metrics_file))?;
    observer.started(step, last_step);

    let params: Vec<(String, candle_core::Var)> = lora
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    let param_refs: Vec<(String, &candle_core::Var)> =
        params.iter().map(|(k, v)| (k.clone(), v)).collect();
    let options_batches = config.batch_options();

    let mut summary = RunSummary {
        first_step,
        steps: Vec::new(),
        examples: 0,
        skipped: 0,
        truncated_tokens: 0,
        skip_reasons: Default::default(),
        skipped_examples: Default::default(),
        adapter: config.output.join("adapter"),
        checkpoints: Vec::new(),
        finished: false,
        seconds: 0.0,
    };
    if step >= last_step || position >= plan.total {
        observer.ended();
        summary.finished = position >= plan.total;
        lora.save_peft(&summary.adapter, &options.base_model)
            .map_err(|e| Error::Checkpoint(e.0))?;
        return Ok(summary);
    }

    // Accumulated over the micro-batches of the current step.
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let (mut nll_sum, mut targets_n, mut tokens, mut trained) = (0f64, 0u64, 0u64, 0u64);
    let (mut step_examples, mut step_skipped, mut step_truncated) = (0u64, 0u64, 0u64);
    let mut micro = 0u64;
    let mut step_started = Instant::now();

    let step_options = step::StepOptions {
        checkpointing: config.checkpointing.resolve(model.config.parameter_count()),
        loss_chunk: config.loss_chunk,
    };
    let start = position;
    let train_on = |stream: &mut batches::BatchStream| -> Result<(), Error> {
        for batch in stream {
            let batch = batch?;
            let targets = Targets::of(&batch)?;
            if !targets.is_empty() {
                let dropout = DropoutKey {
                    seed,
                    step,
                    micro_batch: micro,
                };
                nll_sum += step::accumulate_gradients(
                    model,
                    &lora,
                    dropout,
                    &batch,
                    &targets,
                    step_options,
                    &mut grads,
                )?;
                targets_n += targets.len() as u64;
            }
            tokens += batch.tokens as u64;
            trained += targets.len() as u64;
            step_examples += batch.seq_starts.dim(0)? as u64;
            step_skipped += batch.skipped.len() as u64;
            step_truncated += batch.truncated as u64;
            for (ordinal, reason) in &batch.skipped {
                // Reasons are grouped by their first line (a template's error, a tokenizer's).
                let reason: String = reason
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect();
                *summary.skip_reasons.entry(reason.clone()).or_default() += 1;
                summary.skipped_examples.entry(reason).or_insert(*ordinal);
            }
            micro += 1;
            let phase = &plan.phases[batch.phase];
            let phase_end = phase.start + phase.len();
            let next = batch.next.position;
            if micro < config.gradient_accumulation as u64 && next < phase_end {
                continue;
            }

            // The step is complete: normalise by its trained tokens, clip, update.
            let step_in_phase = (position - phase.start) / config.step_span();
            let lr = config.schedule.rate(
                phase.learning_rate * config.learning_rate_scale,
                step_in_phase,
                phase_steps[batch.phase],
            );
            let mut grad_norm = 0.0;
            if targets_n > 0 {
                for g in grads.values_mut() {
                    *g = (&*g / targets_n as f64)?;
                }
                grad_norm = optim::clip_global_norm(&mut grads, config.optimizer.max_grad_norm)?;
                if !grad_norm.is_finite() {
                    return Err(Error::Checkpoint(format!(
                    "the gradient norm of step {} is {grad_norm} (loss {}); stopped before it reaches the adapter, the last checkpoint is intact",
                    step + 1,
                    nll_sum / targets_n as f64
                )));
                }
                optimizer.step(&param_refs, &grads, lr)?;
            }
            step += 1;
            position = next;
            let seconds = step_started.elapsed().as_secs_f64();
            let record = StepMetrics {
                step,
                phase: phase.name.clone(),
                loss: (targets_n > 0).then(|| nll_sum / targets_n as f64),
                learning_rate: lr,
                grad_norm,
                tokens,
                trained_tokens: trained,
                tokens_per_second: tokens as f64 / seconds.max(1e-9),
                elapsed_seconds: started.elapsed().as_secs_f64(),
                position,
                examples: step_examples,
                skipped: step_skipped,
                truncated_tokens: step_truncated,
            };
            summary.examples += step_examples;
            summary.skipped += step_skipped;
            summary.truncated_tokens += step_truncated;
            writeln!(metrics, "{}", serde_json::to_string(&record).expect("json"))
                .map_err(io_error(&metrics_file))?;
            observer.step(&record, last_step);
            summary.steps.push(record);
            grads.clear();
            (nll_sum, targets_n, tokens, trained, micro) = (0.0, 0, 0, 0, 0);
            (step_examples, step_skipped, step_truncated) = (0, 0, 0);
            let seen = summary.examples + summary.skipped;
            if seen >= 100 && summary.skipped as f64 > config.max_skipped_share * seen as f64 {
                let reasons: Vec<String> = summary
                    .skip_reasons
                    .iter()
                    .map(|(reason, n)| {
                        format!(
                            "  {n} x {reason} (e.g. ordinal {})",
                            summary.skipped_examples[reason]
                        )
                    })
                    .collect();
                return Err(Error::Config(format!(
                "{} of {seen} examples ({:.1}%) could not be rendered or tokenized, more than max_skipped_share ({:.1}%); stopped after step {step} (the last checkpoint is intact):\n{}",
                summary.skipped,
                100.0 * summary.skipped as f64 / seen as f64,
                100.0 * config.max_skipped_share,
                reasons.join("\n")
            )));
            }
            step_started = Instant::now();

            let stop = step >= last_step;
            if step.is_multiple_of(config.checkpoint.every) || next >= phase_end || stop {
                let state = TrainerState {
                    step,
                    seed,
                    sampler: plan.state(position),
                    phase: phase.name.clone(),
                };
                let dir = checkpoint::save(
                    &checkpoints_dir,
                    &lora,
                    &optimizer,
                    &state,
                    &options.base_model,
                )?;
                checkpoint::prune(&checkpoints_dir, config.checkpoint.keep)?;
                observer.checkpoint(&dir);
                summary.checkpoints.push(dir);
            }
            if stop {
                break;
            }
        }
        Ok(())
    };
    let trained =
        batches::with_stream(store, plan, tokenizer, start, &options_batches, 2, train_on);
    observer.ended();
    trained?;
    lora.save_peft(&summary.adapter, &options.base_model)
        .map_err(|e| Error::Checkpoint(e.0))?;
    summary.finished = position >= plan.total;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Loads a model (Hugging Face folder or `.gguf`) and its chat tokenizer: `tokenizer`
/// if given, else the folder's `tokenizer.json` or the GGUF file's own tokenizer.
pub fn load_model(
    path: &Path,
    tokenizer: Option<&Path>,
    device: DeviceKind,
) -> Result<(Llama, ChatTokenizer), Error> {
    load_model_as(path, tokenizer, device, device.default_dtype())
}

/// [`load_model`] with base weights of `dtype` (f32 or bf16).
pub fn load_model_as(
    path: &Path,
    tokenizer: Option<&Path>,
    device: DeviceKind,
    dtype: DType,
) -> Result<(Llama, ChatTokenizer), Error> {
    let (device, _) = device.open()?;
    let model_error = |e: crate::model::weights::Error| Error::Config(e.to_string());
    let (model, chat) = if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let (model, content) =
            crate::model::weights::load_gguf(path, &device, dtype).map_err(model_error)?;
        let chat = match tokenizer {
            Some(t) => ChatTokenizer::load(t),
            None => batches::template::tokenizer_from_gguf(&content.metadata, path),
        }
        .map_err(|e| Error::Config(e.0))?;
        (model, chat)
    } else {
        let model = crate::model::weights::load(path, &device, dtype).map_err(model_error)?;
        let chat =
            ChatTokenizer::load(tokenizer.unwrap_or(path)).map_err(|e| Error::Config(e.0))?;
        (model, chat)
    };
    // Ids, not the count: a vocabulary may have gaps.
    let vocab = chat
        .tokenizer()
        .get_vocab(true)
        .values()
        .max()
        .map_or(0, |&id| id as usize + 1);
    if vocab > model.config.vocab_size {
        return Err(Error::Config(format!(
            "the tokenizer has {vocab} tokens but {} has a vocabulary of {}",
            path.display(),
            model.config.vocab_size
        )));
    }
    Ok((model, chat))
}

/// Drops the lines of a metrics log after step `step`.
fn truncate_metrics(path: &Path, step: u64) -> Result<(), Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(path)(e)),
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    if kept.len() != text.len() {
        std::fs::write(path, kept).map_err(io_error(path))?;
    }
    Ok(())
}
