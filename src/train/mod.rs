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

use crate::batches::{self, Batch, BatchOptions, ChatTokenizer};
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

/// Trains a LoRA adapter on `model` through the curriculum `plan`: a [`Trainer`] fed by
/// the plan's batch stream, reporting to `observer`.
pub fn run(
    config: &TrainConfig,
    model: &Llama,
    tokenizer: &ChatTokenizer,
    store: &Store,
    plan: &Plan,
    options: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<RunSummary, Error> {
    let mut trainer = Trainer::new(config, model, tokenizer, plan, options)?;
    observer.started(trainer.step, trainer.last_step);
    if trainer.is_done() {
        observer.ended();
        return trainer.finish();
    }
    let start = trainer.position;
    let options_batches = config.batch_options();
    let trained = batches::with_stream(
        store,
        plan,
        tokenizer,
        start,
        &options_batches,
        2,
        |stream| {
            while let Some(metrics) = trainer.step(stream)? {
                observer.step(&metrics, trainer.last_step);
                if let Some(dir) = trainer.summary.checkpoints.last() {
                    if trainer.checkpointed_at == Some(metrics.step) {
                        observer.checkpoint(dir);
                    }
                }
                if trainer.is_done() {
                    break;
                }
            }
            Ok::<(), Error>(())
        },
    );
    observer.ended();
    trained?;
    trainer.finish()
}

/// A LoRA training run over a curriculum plan, one optimizer step at a time: the adapter,
/// the optimizer, where the run stands in the plan, the metrics log and the checkpoints.
/// The library prints nothing; [`run`] drives it with an [`Observer`].
pub struct Trainer<'a> {
    config: &'a TrainConfig,
    model: &'a Llama,
    plan: &'a Plan,
    options: &'a RunOptions,
    lora: Lora,
    optimizer: AdamW,
    params: Vec<(String, candle_core::Var)>,
    seed: u64,
    /// Optimizer steps done, and the plan position the next step starts at.
    step: u64,
    position: u64,
    last_step: u64,
    phase_steps: Vec<u64>,
    step_options: step::StepOptions,
    checkpoints_dir: PathBuf,
    metrics_file: PathBuf,
    metrics: std::fs::File,
    started: Instant,
    /// The step whose end wrote the newest checkpoint.
    checkpointed_at: Option<u64>,
    /// Why the run must stop after the step just reported (too many examples skipped):
    /// returned by the next call, so that the step itself is reported first.
    stop: Option<Error>,
    summary: RunSummary,
}

/// What the micro-batches of the step under way have added up to.
struct Accumulated {
    grads: HashMap<String, Tensor>,
    nll_sum: f64,
    targets: u64,
    tokens: u64,
    examples: u64,
    skipped: u64,
    truncated: u64,
    micro: u64,
    started: Instant,
}

impl<'a> Trainer<'a> {
    /// A run of `config` on `model` through `plan`: a fresh adapter, or the state of the
    /// checkpoint `options.resume` names (the plan position, the optimizer, the step).
    pub fn new(
        config: &'a TrainConfig,
        model: &'a Llama,
        tokenizer: &ChatTokenizer,
        plan: &'a Plan,
        options: &'a RunOptions,
    ) -> Result<Trainer<'a>, Error> {
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
            // abandoned: set aside (never deleted), so that `--resume` and pruning only
            // see this run, and the metrics log has each step once.
            checkpoint::set_aside_after(&checkpoints_dir, step)?;
            truncate_metrics(&config.output.join("metrics.jsonl"), step)?;
        }
        let max_steps = options.max_steps.or(config.max_steps);
        let phase_steps = steps_per_phase(plan, config);
        let total_steps: u64 = phase_steps.iter().sum::<u64>();
        let last_step = max_steps.map_or(total_steps, |m| m.min(total_steps));
        let metrics_file = config.output.join("metrics.jsonl");
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_file)
            .map_err(io_error(&metrics_file))?;
        let params = lora
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        let step_options = step::StepOptions {
            checkpointing: config.checkpointing.resolve(model.config.parameter_count()),
            loss_chunk: config.loss_chunk,
        };
        let summary = RunSummary {
            first_step: step,
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
        Ok(Trainer {
            config,
            model,
            plan,
            options,
            lora,
            optimizer,
            params,
            seed,
            step,
            position,
            last_step,
            phase_steps,
            step_options,
            checkpoints_dir,
            metrics_file,
            metrics,
            started,
            checkpointed_at: None,
            stop: None,
            summary,
        })
    }

    /// Optimizer steps done so far (counting those before a resume).
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// The step the run stops after (`max_steps`, or the plan's end).
    pub fn last_step(&self) -> u64 {
        self.last_step
    }

    /// The plan position the next step starts at.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Whether the run has reached its last step or the plan's end.
    pub fn is_done(&self) -> bool {
        self.step >= self.last_step || self.position >= self.plan.total
    }

    /// Runs one optimizer step on the next micro-batches of `batches` (the plan's stream
    /// from [`Trainer::position`]): accumulates their gradients, then normalises by the
    /// step's trained tokens, clips, updates the adapter, appends the step to
    /// `metrics.jsonl` and writes a checkpoint when one is due. `None` when the stream has
    /// no batch left.
    pub fn step(
        &mut self,
        batches: &mut dyn Iterator<Item = Result<Batch, batches::Error>>,
    ) -> Result<Option<StepMetrics>, Error> {
        if let Some(stop) = self.stop.take() {
            return Err(stop);
        }
        if self.is_done() {
            return Ok(None);
        }
        let config = self.config;
        let mut acc = Accumulated {
            grads: HashMap::new(),
            nll_sum: 0.0,
            targets: 0,
            tokens: 0,
            examples: 0,
            skipped: 0,
            truncated: 0,
            micro: 0,
            started: Instant::now(),
        };
        let mut trained = 0u64;
        for batch in batches {
            let batch = batch?;
            let targets = Targets::of(&batch)?;
            if !targets.is_empty() {
                let dropout = DropoutKey {
                    seed: self.seed,
                    step: self.step,
                    micro_batch: acc.micro,
                };
                acc.nll_sum += step::accumulate_gradients(
                    self.model,
                    &self.lora,
                    dropout,
                    &batch,
                    &targets,
                    self.step_options,
                    &mut acc.grads,
                )?;
                acc.targets += targets.len() as u64;
            }
            acc.tokens += batch.tokens as u64;
            trained += targets.len() as u64;
            acc.examples += batch.seq_starts.dim(0)? as u64;
            acc.skipped += batch.skipped.len() as u64;
            acc.truncated += batch.truncated as u64;
            for (ordinal, reason) in &batch.skipped {
                // Reasons are grouped by their first line (a template's error, a tokenizer's).
                let reason: String = reason
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect();
                *self.summary.skip_reasons.entry(reason.clone()).or_default() += 1;
                self.summary
                    .skipped_examples
                    .entry(reason)
                    .or_insert(*ordinal);
            }
            acc.micro += 1;
            let phase = &self.plan.phases[batch.phase];
            let phase_end = phase.start + phase.len();
            let next = batch.next.position;
            if acc.micro < config.gradient_accumulation as u64 && next < phase_end {
                continue;
            }
            return self.finish_step(acc, trained, batch.phase, next).map(Some);
        }
        if acc.micro > 0 {
            // The plan's stream ends at a phase's end, which always closes a step.
            return Err(Error::Config(format!(
                "the batch stream ended inside step {} after {} micro-batches",
                self.step + 1,
                acc.micro
            )));
        }
        Ok(None)
    }

    /// The reason the run must stop after the step just returned, if any (more examples
    /// skipped than `max_skipped_share` allows); [`Trainer::step`] returns it too.
    pub fn take_stop(&mut self) -> Option<Error> {
        self.stop.take()
    }

    /// The step's update, metrics and checkpoint, its micro-batches done; `next` is the
    /// plan position after them.
    fn finish_step(
        &mut self,
        mut acc: Accumulated,
        trained: u64,
        phase_index: usize,
        next: u64,
    ) -> Result<StepMetrics, Error> {
        let config = self.config;
        let phase = &self.plan.phases[phase_index];
        let phase_end = phase.start + phase.len();
        let step_in_phase = (self.position - phase.start) / config.step_span();
        let lr = config.schedule.rate(
            phase.learning_rate * config.learning_rate_scale,
            step_in_phase,
            self.phase_steps[phase_index],
        );
        let mut grad_norm = 0.0;
        if acc.targets > 0 {
            for g in acc.grads.values_mut() {
                *g = (&*g / acc.targets as f64)?;
            }
            grad_norm = optim::clip_global_norm(&mut acc.grads, config.optimizer.max_grad_norm)?;
            if !grad_norm.is_finite() {
                return Err(Error::Checkpoint(format!(
                    "the gradient norm of step {} is {grad_norm} (loss {}); stopped before it reaches the adapter, the last checkpoint is intact",
                    self.step + 1,
                    acc.nll_sum / acc.targets as f64
                )));
            }
            let param_refs: Vec<(String, &candle_core::Var)> =
                self.params.iter().map(|(k, v)| (k.clone(), v)).collect();
            self.optimizer.step(&param_refs, &acc.grads, lr)?;
        }
        self.step += 1;
        self.position = next;
        let seconds = acc.started.elapsed().as_secs_f64();
        let record = StepMetrics {
            step: self.step,
            phase: phase.name.clone(),
            loss: (acc.targets > 0).then(|| acc.nll_sum / acc.targets as f64),
            learning_rate: lr,
            grad_norm,
            tokens: acc.tokens,
            trained_tokens: trained,
            tokens_per_second: acc.tokens as f64 / seconds.max(1e-9),
            elapsed_seconds: self.started.elapsed().as_secs_f64(),
            position: self.position,
            examples: acc.examples,
            skipped: acc.skipped,
            truncated_tokens: acc.truncated,
        };
        let summary = &mut self.summary;
        summary.examples += acc.examples;
        summary.skipped += acc.skipped;
        summary.truncated_tokens += acc.truncated;
        writeln!(
            self.metrics,
            "{}",
            serde_json::to_string(&record).expect("json")
        )
        .map_err(io_error(&self.metrics_file))?;
        summary.steps.push(record.clone());
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
            self.stop = Some(Error::Config(format!(
                "{} of {seen} examples ({:.1}%) could not be rendered or tokenized, more than max_skipped_share ({:.1}%); stopped after step {} (the last checkpoint is intact):\n{}",
                summary.skipped,
                100.0 * summary.skipped as f64 / seen as f64,
                100.0 * config.max_skipped_share,
                self.step,
                reasons.join("\n")
            )));
            // No checkpoint of this step: the run resumes from the last one.
            return Ok(record);
        }
        let stop = self.step >= self.last_step;
        if self.step.is_multiple_of(config.checkpoint.every) || next >= phase_end || stop {
            let state = TrainerState {
                step: self.step,
                seed: self.seed,
                sampler: self.plan.state(self.position),
                phase: phase.name.clone(),
            };
            let dir = checkpoint::save(
                &self.checkpoints_dir,
                &self.lora,
                &self.optimizer,
                &state,
                &self.options.base_model,
            )?;
            checkpoint::prune(&self.checkpoints_dir, config.checkpoint.keep)?;
            self.summary.checkpoints.push(dir);
            self.checkpointed_at = Some(self.step);
        }
        Ok(record)
    }

    /// Ends the run: writes the adapter (PEFT) and returns what the run did.
    pub fn finish(mut self) -> Result<RunSummary, Error> {
        self.lora
            .save_peft(&self.summary.adapter, &self.options.base_model)
            .map_err(|e| Error::Checkpoint(e.0))?;
        self.summary.finished = self.position >= self.plan.total;
        self.summary.seconds = self.started.elapsed().as_secs_f64();
        Ok(self.summary)
    }
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
