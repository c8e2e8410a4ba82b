//! The memory a training run needs, planned from the model's shape alone.
//!
//! [`plan`] is pure arithmetic over a [`LlamaConfig`], the LoRA settings and the size of a
//! micro-batch: nothing is loaded, so `corpusdb train --dry-run` can answer "does Llama-3
//! 8B at 16,384 tokens per micro-batch fit 80 GiB?" from a `config.json`.
//!
//! The plan follows what the trainer keeps alive, in bytes:
//!
//! - **base weights** in the run's dtype (f32 on the CPU, bf16 on CUDA);
//! - **LoRA and optimizer**: [`LORA_COPIES`] f32 values per trainable parameter (the
//!   parameter, the step's accumulated gradient, the current micro-batch's gradient, and
//!   AdamW's two moments);
//! - **kept activations**: with `checkpointing: layers` each decoder layer's input
//!   `[tokens, hidden]` (plus one such tensor more: the last layer's output while the
//!   loss runs, the recomputed layer's input copy afterwards); with `checkpointing: none`
//!   the embeddings and every layer's working set but the last one's (counted below);
//! - **layer working set**: one decoder layer's activations with its autograd graph,
//!   [`layer_terms`] f32 values per token (candle keeps every op's inputs alive until the
//!   backward pass, so every intermediate counts);
//! - **gradients flowing**: the gradient entering a layer and the `output · upstream`
//!   product through which it enters the layer's graph;
//! - **backward transients**: the temporaries of one layer's backward pass at its peak
//!   (the SiLU backward in the MLP, or the fused attention's copies);
//! - **attention blocks**: the fused attention backward's per-task partial `dk`/`dv` and
//!   its score tiles;
//! - **loss**: while a chunk runs, `[loss_chunk, vocab]` f32 logits and their gradient
//!   beside the final norm's output, the picked rows and their gradients so far; after
//!   the chunks, the backward pass through the final norm (whichever is larger);
//! - **runtime**: rotary tables, a fixed overhead and allocator slack.
//!
//! The loss (chunk by chunk, on detached final hidden states) and the backward pass
//! through the layers are separate phases of `step::accumulate_gradients` in both modes,
//! so the peak is what both keep plus the larger of the two.
//!
//! Assumptions, each a named constant below so that measured peaks can calibrate it:
//! activations in f32 (with a bf16 base the trainer keeps bf16 activations but adds f32
//! copies on the LoRA path; counting everything in f32 stays an upper bound); the fused
//! CPU ops (RMS norm, keyed dropout, blockwise attention for f32, f64 and bf16). On CUDA
//! RMS norm and dropout are kernels too, but attention keeps `[rows, heads, width, width]`
//! scores and probabilities (cuBLAS products around a masked-softmax kernel): with the
//! layer written with tensor ops ([`LayerPass::Tensors`], CUDA's path) the plan counts
//! them in the layer's terms, in the base dtype; otherwise
//! [`MemoryPlan::cuda_attention`] reports that term, which the total leaves out.

use std::fmt;

use candle_core::DType;
use serde::Serialize;

use super::Checkpointing;
use crate::model::{LlamaConfig, LoraConfig, Target};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Bytes of one activation value: activations and gradients are counted in f32.
pub const ACTIVATION_BYTES: u64 = 4;
/// f32 values per trainable parameter: the parameter, the accumulated gradient, the
/// current micro-batch's gradient, AdamW's first and second moments.
pub const LORA_COPIES: u64 = 5;

// Per-token terms of one decoder layer's working set (see [`layer_terms`]).

/// RMS norms per layer (input and post-attention); the fused CPU op keeps only its input
/// (already counted) and its output.
pub const NORMS_PER_LAYER: u64 = 2;
/// Rank-r tensors per adapted projection: `x·Aᵀ` and the same scaled by `alpha / r`.
pub const LORA_RANK_INTERMEDIATES: u64 = 2;
/// Rotary embedding, in units of the rotated width: `narrow` is a view, but the four
/// half-width products (`x1·cos`, `x2·sin`, `x2·cos`, `x1·sin`), the two half-width
/// results and their `cat` (full width) are all kept: 4 × width.
pub const ROTARY_COPIES: u64 = 4;
/// The attention op's log-sum-exp, one f64 (two f32 units) per query head and token.
pub const LOG_SUM_EXP_UNITS: u64 = 2;
/// Residual sums per layer (after attention, after the MLP).
pub const RESIDUALS_PER_LAYER: u64 = 2;

// Backward pass.

/// `[tokens, hidden]` tensors of a layer's backward pass besides its working set: the
/// gradient flowing in (`upstream`) and the graph's `output · upstream` product through
/// which it enters (the gradient accumulating for a block's input is in the transients).
pub const GRADIENTS_FLOWING: u64 = 2;
/// `[tokens, intermediate]` tensors alive at the peak of the MLP's backward pass (the
/// SiLU node: its incoming gradient, the pending gradient of `up`, the zeroed gradient
/// slot of `gate`, `sigmoid(gate)`, `1 − silu`, their product and the SiLU derivative).
pub const MLP_BACKWARD_INTERMEDIATES: u64 = 7;
/// Query-width tensors alive at the peak of the fused attention's backward pass: the
/// incoming gradient, the op's copies of q, its output and the gradient, the per-block
/// `dq` and the final `dq`.
pub const ATTENTION_BACKWARD_Q: u64 = 6;
/// Key/value-width tensors there: copies of k and v, the final `dk` and `dv`.
pub const ATTENTION_BACKWARD_KV: u64 = 4;
/// Queries and keys per block of the fused attention op.
pub const ATTENTION_BLOCK: u64 = 64;
/// Worker threads the plan assumes for the fused attention, which splits each
/// (row, key/value head) pair into tasks for about four tasks per thread; every task
/// holds a partial `dk` and `dv` over the row's keys until the backward pass ends.
pub const ATTENTION_THREADS: u64 = 16;

// The CPU's hand-written layer (`model::cpu_layer`, f32).

/// `[tokens, intermediate]` buffers at the peak of the hand-written layer's backward pass
/// (the down projection's: its input, recomputed, the input's gradient, and the gradient
/// through the adapter's dropout).
pub const HAND_BACKWARD_INTERMEDIATE: u64 = 3;
/// `[tokens, hidden]` buffers there beside them: the gradient flowing in, the residual
/// stream's gradient and a normed copy.
pub const HAND_BACKWARD_HIDDEN: u64 = 3;
/// `[chunk, vocab]` buffers of a loss chunk by hand (`train::loss::chunk_by_hand`): the
/// logits, overwritten by their gradient.
pub const HAND_LOSS_VOCAB_COPIES: u64 = 1;

// The layer with tensor ops (`model::tensor_layer`: CUDA).

/// `[tokens, heads, width]` tensors in the base dtype at the peak of the attention's
/// backward pass beside the kept probabilities: the probabilities' gradient and the
/// scores' gradient.
pub const TENSOR_ATTENTION_BACKWARD_COPIES: u64 = 2;
/// The fixed overhead on CUDA: the context, cuBLAS's workspace, the binary. Calibrated
/// with the slack below against the H200 runs of BENCHMARKS.md (1B at 4 × 2,048 with and
/// without checkpointing, 8B at 8 × 2,048 with): every estimate within 6% of nvidia-smi's
/// peak.
pub const TENSOR_RUNTIME_FIXED_BYTES: u64 = 512 * MIB;

// Checkpointing and loss.

/// `[tokens, hidden]` tensors kept beside the layer inputs with `checkpointing: layers`:
/// the last layer's output while the loss runs, then the recomputed layer's input copy.
pub const RECOMPUTE_COPIES: u64 = 1;
/// `[chunk, vocab]` tensors while a loss chunk runs: the logits and their gradient.
pub const LOSS_VOCAB_COPIES: u64 = 2;
/// `[tokens, hidden]` tensors while a loss chunk runs: the final norm's output, the rows
/// of trained tokens picked from it, and the chunks' gradients of those rows so far
/// (every token trained, at most).
pub const LOSS_HIDDEN_COPIES: u64 = 3;
/// `[chunk, hidden]` tensors while a loss chunk runs: the chunk's rows (a copy, made a
/// variable) and their gradient.
pub const LOSS_PICKED_COPIES: u64 = 2;
/// `[tokens, hidden]` tensors at the peak of the backward pass through the final norm,
/// after the chunks: the norm's output, the picked rows, their joined gradient and their
/// product (graph nodes), the scattered gradient and the RMS norm backward's four
/// temporaries.
pub const FINAL_NORM_BACKWARD_COPIES: u64 = 9;
/// Attention on CUDA (cuBLAS products and the masked-softmax kernel): `[rows, heads,
/// width, width]` tensors kept in the base dtype, the scores and the probabilities; the
/// backward pass adds as much again (their gradients). Measured on an H200 with the 8B
/// config (BENCHMARKS.md): the plan plus this term lands within 4% of the peak.
pub const CUDA_ATTENTION_DTYPE_COPIES: u64 = 2;

// Runtime.

/// Fixed overhead: the binary, thread stacks, tokenizer, prefetched batches, small
/// tensors; a CUDA context is of the same order. Calibrated with the slack below against
/// the SmolLM2-135M CPU runs of BENCHMARKS.md (f32, 512 to 8,192 tokens per step with
/// `checkpointing: layers`, 4 × 512 with and without): every estimate within 13% of the
/// measured peak.
pub const RUNTIME_FIXED_BYTES: u64 = 192 * MIB;
/// The fixed overhead with the layers by hand (no graph), calibrated the same way against
/// the SmolLM2-135M runs of BENCHMARKS.md (512 to 4,096 tokens per step, both
/// checkpointing settings: every estimate within 9% of the measured peak).
pub const HAND_RUNTIME_FIXED_BYTES: u64 = 96 * MIB;
/// Allocator slack as a share of the activation bytes (freed blocks that are not
/// reused or returned at once).
pub const ALLOCATOR_SLACK: f64 = 0.10;

/// One named per-token term of a decoder layer's working set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Term {
    pub name: &'static str,
    /// f32 values per token.
    pub values: u64,
}

/// How a decoder layer's forward and backward passes run, which decides what they keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerPass {
    /// Written out by hand (`model::cpu_layer`: the CPU in f32): keeps the values of
    /// [`hand_layer_terms`], dropout masks as bits.
    ByHand,
    /// candle's autograd graph (bf16 on the CPU, f64, CUDA without its kernels): keeps
    /// every op's inputs ([`layer_terms`]).
    Graph,
    /// Written with tensor ops (`model::tensor_layer`: CUDA, bf16 or f32): keeps the
    /// values of [`tensor_layer_terms`], attention probabilities included.
    Tensors,
    /// Tensor ops with attention through the flash kernels (CUDA, bf16, head width 64 or
    /// 128): one log-sum-exp per query and head instead of the probabilities.
    Flash,
}

impl LayerPass {
    /// The plan's fixed runtime overhead with this pass.
    pub fn runtime_fixed(self) -> u64 {
        match self {
            LayerPass::ByHand => HAND_RUNTIME_FIXED_BYTES,
            LayerPass::Graph => RUNTIME_FIXED_BYTES,
            LayerPass::Tensors | LayerPass::Flash => TENSOR_RUNTIME_FIXED_BYTES,
        }
    }

    /// The pass training runs for a model of head width `head_dim`: [`LayerPass::of`], with
    /// the flash kernels where a CUDA build has them for this shape and dtype (planned the
    /// same from a build without CUDA).
    pub fn for_training(on_cpu: bool, dtype: DType, head_dim: usize) -> LayerPass {
        let flash = !on_cpu
            && dtype == DType::BF16
            && matches!(head_dim, 64 | 128)
            && std::env::var("CORPUSDB_CUDA_FLASH").map_or(true, |v| v != "0");
        if flash {
            LayerPass::Flash
        } else {
            LayerPass::of(on_cpu, dtype)
        }
    }

    /// The pass training runs on the CPU (`on_cpu`) or a GPU with base weights in `dtype`.
    pub fn of(on_cpu: bool, dtype: DType) -> LayerPass {
        match (on_cpu, dtype) {
            (true, DType::F32) => LayerPass::ByHand,
            (false, DType::BF16 | DType::F32) => LayerPass::Tensors,
            _ => LayerPass::Graph,
        }
    }
}

/// The model's shape, as the plan used it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSummary {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Base parameters ([`LlamaConfig::parameter_count`]).
    pub parameters: u64,
}

/// The LoRA settings, as the plan used them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoraSummary {
    pub r: usize,
    pub dropout: f64,
    /// Known targets in [`Target`] order (unknown names are ignored: a training config
    /// refuses them).
    pub targets: Vec<&'static str>,
    pub parameters: u64,
}

/// Everything the plan was computed from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanInputs {
    pub model: ModelSummary,
    pub lora: LoraSummary,
    pub tokens_per_micro_batch: usize,
    pub rows: usize,
    /// The base weights' dtype (`f32`, `bf16`).
    pub dtype: &'static str,
    pub layer_pass: LayerPass,
    /// `layers` or `none` (`auto` resolved by the model's size).
    pub checkpointing: Checkpointing,
    pub loss_chunk: usize,
}

/// Which phase of a step reaches the peak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeakPhase {
    /// The backward pass through a decoder layer.
    LayerBackward,
    /// The loss over the final hidden states, chunk by chunk.
    Loss,
}

/// The expected peak memory of a training step, broken down in bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub inputs: PlanInputs,
    /// One decoder layer's working set per token, term by term (f32 values).
    pub layer_terms: Vec<Term>,
    /// The sum of `layer_terms`.
    pub layer_values_per_token: u64,
    pub base_weights: u64,
    pub lora_and_optimizer: u64,
    pub kept_activations: u64,
    pub layer_working_set: u64,
    pub gradients_flowing: u64,
    pub backward_transients: u64,
    pub attention_block: u64,
    pub loss_chunk: u64,
    pub runtime: u64,
    pub peak_phase: PeakPhase,
    /// The expected peak: base weights + LoRA and optimizer + kept activations + runtime
    /// + the larger phase (layer working set + gradients + transients + attention
    ///   blocks, or the loss).
    pub total: u64,
    /// Not in the total: what one layer's attention keeps on CUDA (scores and
    /// probabilities, `[rows, heads, width, width]` in the base dtype) beyond the CPU's
    /// blockwise op, plus as much again in its backward pass. Zero for
    /// [`LayerPass::Tensors`], whose terms count them.
    pub cuda_attention: u64,
}

/// The adapted targets of `lora`, in [`Target`] order, each once.
fn targets(lora: &LoraConfig) -> Vec<Target> {
    Target::ALL
        .into_iter()
        .filter(|t| lora.targets.iter().any(|name| name == t.name()))
        .collect()
}

/// One decoder layer's working set with its autograd graph, per token, as named terms of
/// f32 values. Read off `Llama::decoder_layer`, `attention`, `mlp`, `project` and
/// `Lora::delta`: every tensor an op of the forward pass produces and a later op keeps
/// as an input (reshapes and transposes are views; the layer's input is counted by the
/// caller).
pub fn layer_terms(model: &LlamaConfig, lora: &LoraConfig) -> Vec<Term> {
    let h = model.hidden_size as u64;
    let i = model.intermediate_size as u64;
    let q = (model.num_attention_heads * model.head_dim()) as u64;
    let kv = (model.kv_heads() * model.head_dim()) as u64;
    let r = lora.r as u64;
    let adapted = targets(lora);
    let width = |t: Target| {
        let (out, inp) = model.projection_shape(t);
        (out as u64, inp as u64)
    };
    let sum_over = |f: &dyn Fn(u64, u64) -> u64| -> u64 {
        adapted
            .iter()
            .map(|&t| {
                let (out, inp) = width(t);
                f(out, inp)
            })
            .sum()
    };
    let mut terms = vec![
        Term {
            // Outputs of the input and post-attention norms (each feeds q/k/v or gate/up).
            name: "rms norm outputs",
            values: NORMS_PER_LAYER * h,
        },
        Term {
            // `frozen_linear` outputs of all seven projections, adapted or not (an
            // adapted one's output is an input of `base + delta`).
            name: "base projection outputs",
            values: Target::ALL.iter().map(|&t| width(t).0).sum(),
        },
    ];
    if lora.dropout > 0.0 {
        terms.push(Term {
            // Keyed dropout of each adapted projection's input (its own mask), kept as
            // the input of `x·Aᵀ`.
            name: "lora dropout outputs",
            values: sum_over(&|_, inp| inp),
        });
    }
    terms.extend([
        Term {
            // `x·Aᵀ` and `(x·Aᵀ)·scale`, r values each.
            name: "lora rank-r intermediates",
            values: adapted.len() as u64 * LORA_RANK_INTERMEDIATES * r,
        },
        Term {
            // `(x·Aᵀ·scale)·Bᵀ`, an input of `base + delta`.
            name: "lora deltas",
            values: sum_over(&|out, _| out),
        },
        Term {
            // `base + delta`: the projection's output, an input of what follows.
            name: "lora sums",
            values: sum_over(&|out, _| out),
        },
        Term {
            // Products, halves and the rotated q and k (the rotated tensors are the
            // attention op's inputs).
            name: "rotary intermediates and rotated q, k",
            values: ROTARY_COPIES * (q + kv),
        },
        Term {
            // `v.contiguous()`: v transposed to [b, heads, t, d] is copied.
            name: "contiguous v",
            values: kv,
        },
        Term {
            // The attention op's output (its backward reads it).
            name: "attention output",
            values: q,
        },
        Term {
            name: "attention log-sum-exp",
            values: LOG_SUM_EXP_UNITS * model.num_attention_heads as u64,
        },
        Term {
            // The output transposed back to [tokens, heads × d]: a copy, o_proj's input.
            name: "o_proj input",
            values: q,
        },
        Term {
            // `gate.silu()`, an input of the product.
            name: "silu(gate)",
            values: i,
        },
        Term {
            // `silu(gate) × up`, down_proj's input.
            name: "silu(gate) × up",
            values: i,
        },
        Term {
            // `x + attention` and `x + mlp` (the second is the next layer's input).
            name: "residual sums",
            values: RESIDUALS_PER_LAYER * h,
        },
    ]);
    terms.retain(|t| t.values > 0);
    terms
}

/// What the hand-written layer keeps for its backward pass, per token, as named terms of
/// f32 values (read off `model::cpu_layer::Saved`; the layer's input is counted by the
/// caller). The norms' outputs, the attention output's transposed copy and the MLP's
/// product are recomputed from these.
pub fn hand_layer_terms(model: &LlamaConfig, lora: &LoraConfig) -> Vec<Term> {
    let h = model.hidden_size as u64;
    let i = model.intermediate_size as u64;
    let q = (model.num_attention_heads * model.head_dim()) as u64;
    let kv = (model.kv_heads() * model.head_dim()) as u64;
    let adapted = targets(lora);
    let mut terms = vec![Term {
        name: "rms norm scales",
        values: NORMS_PER_LAYER,
    }];
    if lora.dropout > 0.0 {
        let bits: u64 = adapted
            .iter()
            .map(|&t| model.projection_shape(t).1 as u64)
            .sum();
        terms.push(Term {
            // One bit per value of each adapted projection's input.
            name: "dropout masks (bits)",
            values: bits.div_ceil(32),
        });
    }
    terms.extend([
        Term {
            name: "lora rank-r intermediates",
            values: adapted.len() as u64 * lora.r as u64,
        },
        Term {
            name: "rotated q, k and v",
            values: q + 2 * kv,
        },
        Term {
            name: "attention output",
            values: q,
        },
        Term {
            name: "attention log-sum-exp",
            values: LOG_SUM_EXP_UNITS * model.num_attention_heads as u64,
        },
        Term {
            name: "residual after attention",
            values: h,
        },
        Term {
            name: "gate and up outputs",
            values: 2 * i,
        },
    ]);
    terms.retain(|t| t.values > 0);
    terms
}

/// What the layer written with tensor ops keeps for its backward pass, per token, as named
/// terms of f32 units (4 bytes; base-dtype tensors count by their size). Read off
/// `model::tensor_layer::Activations`; `width` is the tokens per row, which the kept
/// attention probabilities `[rows, heads, width, width]` scale with.
pub fn tensor_layer_terms(
    model: &LlamaConfig,
    lora: &LoraConfig,
    dtype: DType,
    width: u64,
) -> Vec<Term> {
    let s = dtype.size_in_bytes() as u64;
    let in_units = |bytes: u64| bytes.div_ceil(ACTIVATION_BYTES);
    let h = model.hidden_size as u64;
    let i = model.intermediate_size as u64;
    let q = (model.num_attention_heads * model.head_dim()) as u64;
    let kv = (model.kv_heads() * model.head_dim()) as u64;
    let mut terms = vec![
        Term {
            name: "normed inputs (f32, the adapters' input)",
            values: 2 * h,
        },
        Term {
            name: "lora rank-r intermediates",
            values: targets(lora).len() as u64 * lora.r as u64,
        },
        Term {
            name: "rotated q, k and v",
            values: in_units((q + 2 * kv) * s),
        },
        Term {
            name: "attention probabilities",
            values: in_units(model.num_attention_heads as u64 * width * s),
        },
        Term {
            name: "attention output",
            values: in_units(q * s),
        },
        Term {
            name: "residual after attention",
            values: in_units(h * s),
        },
        Term {
            name: "gate, up and their product",
            values: in_units(3 * i * s),
        },
    ];
    terms.retain(|t| t.values > 0);
    terms
}

/// What CUDA's layer keeps with the flash kernels ([`LayerPass::Flash`]): the adapters'
/// inputs in the base dtype (their dropout is redrawn in f32 when needed), and for
/// attention its output twice (heads first for its backward, tokens first for the o
/// projection) and one f32 log-sum-exp per query and head, not the probabilities.
pub fn flash_layer_terms(model: &LlamaConfig, lora: &LoraConfig, dtype: DType) -> Vec<Term> {
    let s = dtype.size_in_bytes() as u64;
    let in_units = |bytes: u64| bytes.div_ceil(ACTIVATION_BYTES);
    let h = model.hidden_size as u64;
    let i = model.intermediate_size as u64;
    let q = (model.num_attention_heads * model.head_dim()) as u64;
    let kv = (model.kv_heads() * model.head_dim()) as u64;
    let mut terms = vec![
        Term {
            name: "normed inputs (the adapters' input)",
            values: in_units(2 * h * s),
        },
        Term {
            name: "lora rank-r intermediates",
            values: targets(lora).len() as u64 * lora.r as u64,
        },
        Term {
            name: "rotated q, k and v",
            values: in_units((q + 2 * kv) * s),
        },
        Term {
            name: "attention output (twice) and log-sum-exp",
            values: in_units(2 * q * s + model.num_attention_heads as u64 * 4),
        },
        Term {
            name: "residual after attention",
            values: in_units(h * s),
        },
        Term {
            name: "gate, up and their product",
            values: in_units(3 * i * s),
        },
    ];
    terms.retain(|t| t.values > 0);
    terms
}

/// The fused attention's backward working memory beyond its inputs: each task's partial
/// `dk` and `dv` over its row's keys, and two score tiles per thread.
fn attention_block_bytes(model: &LlamaConfig, tokens: u64, rows: u64) -> u64 {
    let kv_heads = model.kv_heads() as u64;
    let group = (model.num_attention_heads / model.kv_heads().max(1)) as u64;
    let d = model.head_dim() as u64;
    let width = tokens.div_ceil(rows);
    let pairs = rows * kv_heads;
    let blocks_per_pair = group * width.div_ceil(ATTENTION_BLOCK);
    let per_pair = (4 * ATTENTION_THREADS).div_ceil(pairs.max(1));
    let per_task = blocks_per_pair.div_ceil(per_pair.max(1)).max(1);
    let tasks = pairs * blocks_per_pair.div_ceil(per_task);
    let partials = tasks * 2 * width * d;
    let tiles = ATTENTION_THREADS * 2 * ATTENTION_BLOCK * ATTENTION_BLOCK;
    (partials + tiles) * ACTIVATION_BYTES
}

/// The memory plan of training `lora` on `model` with micro-batches of
/// `tokens_per_micro_batch` tokens in `rows` rows, base weights in `dtype`, and the loss
/// over `loss_chunk` trained tokens at a time, each layer run by `pass`. `checkpointing`
/// should be resolved (`Layers` or `None`); `Auto` is resolved here by the model's size.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    model: &LlamaConfig,
    lora: &LoraConfig,
    tokens_per_micro_batch: usize,
    rows: usize,
    dtype: DType,
    pass: LayerPass,
    checkpointing: Checkpointing,
    loss_chunk: usize,
) -> MemoryPlan {
    let parameters = model.parameter_count();
    let checkpointing = checkpointing.resolve(parameters);
    let adapted = targets(lora);
    let lora_parameters: u64 = adapted
        .iter()
        .map(|&t| {
            let (out, inp) = model.projection_shape(t);
            (lora.r * (out + inp)) as u64
        })
        .sum::<u64>()
        * model.num_hidden_layers as u64;

    let tokens = tokens_per_micro_batch.max(1) as u64;
    let rows = rows.clamp(1, tokens as usize) as u64;
    let layers = model.num_hidden_layers as u64;
    let h = model.hidden_size as u64;
    let i = model.intermediate_size as u64;
    let q = (model.num_attention_heads * model.head_dim()) as u64;
    let kv = (model.kv_heads() * model.head_dim()) as u64;
    let vocab = model.vocab_size as u64;
    let a = ACTIVATION_BYTES;

    let width = tokens.div_ceil(rows);
    let layer_terms = match pass {
        LayerPass::ByHand => hand_layer_terms(model, lora),
        LayerPass::Graph => layer_terms(model, lora),
        LayerPass::Tensors => tensor_layer_terms(model, lora, dtype, width),
        LayerPass::Flash => flash_layer_terms(model, lora, dtype),
    };
    let per_token: u64 = layer_terms.iter().map(|t| t.values).sum();
    let working_set = per_token * tokens * a;
    let hidden_states = tokens * h * a;

    let base_weights = parameters * dtype.size_in_bytes() as u64;
    let lora_and_optimizer = LORA_COPIES * lora_parameters * 4;
    let (kept_activations, layer_working_set) = match checkpointing {
        Checkpointing::None => (
            // By hand: every layer's input and what it keeps, the last layer's counted
            // as the working set. The graph: the embeddings (the first layer's input;
            // the others are inside the working sets) and every working set but the last.
            match pass {
                LayerPass::ByHand | LayerPass::Tensors | LayerPass::Flash => layers * hidden_states,
                LayerPass::Graph => hidden_states,
            } + layers.saturating_sub(1) * working_set,
            if layers > 0 { working_set } else { 0 },
        ),
        _ => ((layers + RECOMPUTE_COPIES) * hidden_states, working_set),
    };
    let gradients_flowing = GRADIENTS_FLOWING * hidden_states;
    let mlp_backward = MLP_BACKWARD_INTERMEDIATES * i + h;
    let attention_backward = ATTENTION_BACKWARD_Q * q + ATTENTION_BACKWARD_KV * kv + h;
    let s = dtype.size_in_bytes() as u64;
    let backward_transients = match pass {
        LayerPass::ByHand => (HAND_BACKWARD_INTERMEDIATE * i + HAND_BACKWARD_HIDDEN * h) * a,
        LayerPass::Graph => mlp_backward.max(attention_backward) * a,
        // The attention's gradients of its probabilities and scores, or the MLP's
        // gradients of gate and up beside the f32 copy of its product and its dropout.
        LayerPass::Tensors => {
            (TENSOR_ATTENTION_BACKWARD_COPIES * model.num_attention_heads as u64 * width * s)
                .max(2 * i * s + 2 * i * 4)
        }
        // The MLP's gradients of gate and up beside its product's dropout in f32.
        LayerPass::Flash => 2 * i * s + i * 4,
    } * tokens;
    let attention_block = match pass {
        LayerPass::Tensors | LayerPass::Flash => 0,
        _ => attention_block_bytes(model, tokens, rows),
    };
    let chunk = (loss_chunk.max(1) as u64).min(tokens);
    // In f32 units: by tensors, the logits and their gradient in the base dtype.
    let vocab_units = match pass {
        LayerPass::ByHand => HAND_LOSS_VOCAB_COPIES * chunk * vocab,
        LayerPass::Graph => LOSS_VOCAB_COPIES * chunk * vocab,
        LayerPass::Tensors | LayerPass::Flash => (2 * chunk * vocab * s).div_ceil(a),
    };
    let loss_chunks =
        vocab_units + LOSS_HIDDEN_COPIES * tokens * h + LOSS_PICKED_COPIES * chunk * h;
    let final_norm_backward = FINAL_NORM_BACKWARD_COPIES * tokens * h;
    let loss_chunk_bytes = loss_chunks.max(final_norm_backward) * a;

    let backward_phase =
        layer_working_set + gradients_flowing + backward_transients + attention_block;
    let (peak_phase, phases) = if loss_chunk_bytes > backward_phase {
        (PeakPhase::Loss, loss_chunk_bytes)
    } else {
        (PeakPhase::LayerBackward, backward_phase)
    };
    let activations = kept_activations + phases;
    // cos and sin `[max_position_embeddings, head_dim / 2]` in the base dtype, and the
    // micro-batch's rows of them.
    let rotary = (model.max_position_embeddings as u64 + tokens)
        * model.head_dim() as u64
        * dtype.size_in_bytes() as u64;
    let runtime =
        rotary + pass.runtime_fixed() + (activations as f64 * ALLOCATOR_SLACK).round() as u64;
    let total = base_weights + lora_and_optimizer + activations + runtime;
    let scores = rows * model.num_attention_heads as u64 * width * width;
    let cuda_attention = match pass {
        LayerPass::Tensors | LayerPass::Flash => 0,
        _ => scores * CUDA_ATTENTION_DTYPE_COPIES * s,
    };

    MemoryPlan {
        inputs: PlanInputs {
            model: ModelSummary {
                vocab_size: model.vocab_size,
                hidden_size: model.hidden_size,
                intermediate_size: model.intermediate_size,
                num_hidden_layers: model.num_hidden_layers,
                num_attention_heads: model.num_attention_heads,
                num_key_value_heads: model.kv_heads(),
                head_dim: model.head_dim(),
                tie_word_embeddings: model.tie_word_embeddings,
                max_position_embeddings: model.max_position_embeddings,
                parameters,
            },
            lora: LoraSummary {
                r: lora.r,
                dropout: lora.dropout,
                targets: adapted.iter().map(|t| t.name()).collect(),
                parameters: lora_parameters,
            },
            tokens_per_micro_batch: tokens as usize,
            rows: rows as usize,
            dtype: dtype.as_str(),
            layer_pass: pass,
            checkpointing,
            loss_chunk: chunk as usize,
        },
        layer_values_per_token: per_token,
        layer_terms,
        base_weights,
        lora_and_optimizer,
        kept_activations,
        layer_working_set,
        gradients_flowing,
        backward_transients,
        attention_block,
        loss_chunk: loss_chunk_bytes,
        runtime,
        peak_phase,
        total,
        cuda_attention,
    }
}

impl MemoryPlan {
    /// Whether the expected peak fits `budget` bytes.
    pub fn fits(&self, budget: u64) -> bool {
        self.total <= budget
    }
}

/// `bytes` as KiB, MiB or GiB (binary units).
pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= GIB {
        format!("{:.2} GiB", b / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", b / MIB as f64)
    } else if bytes >= KIB {
        format!("{:.1} KiB", b / KIB as f64)
    } else {
        format!("{bytes} B")
    }
}

/// A parameter count as 8.03B, 135.0M or 9.8K.
fn short_count(n: u64) -> String {
    let f = n as f64;
    if n >= 1_000_000_000 {
        format!("{:.2}B", f / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.1}M", f / 1e6)
    } else if n >= 1_000 {
        format!("{:.1}K", f / 1e3)
    } else {
        n.to_string()
    }
}

/// A memory size such as `80GiB`, `80 GB`, `512MiB`, `1.5T` or `1073741824`: KiB, MiB,
/// GiB and TiB (and K, M, G, T) are powers of 1,024; KB, MB, GB and TB powers of 1,000;
/// no unit (or `B`) is bytes. Case does not matter.
pub fn parse_bytes(text: &str) -> Result<u64, crate::invalid::Invalid> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a memory size (e.g. 80GiB, 512MiB, 24GB)"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let factor: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => KIB as f64,
        "m" | "mib" => MIB as f64,
        "g" | "gib" => GIB as f64,
        "t" | "tib" => (1024 * GIB) as f64,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            )
            .into())
        }
    };
    let bytes = number * factor;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is too large").into());
    }
    Ok(bytes.round() as u64)
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inputs = &self.inputs;
        let m = &inputs.model;
        let l = &inputs.lora;
        let dtype_bytes = self.base_weights / m.parameters.max(1);
        writeln!(
            f,
            "model: {} layers, hidden {}, intermediate {}, vocab {}, {} / {} heads of {} ({} parameters{})",
            m.num_hidden_layers,
            m.hidden_size,
            m.intermediate_size,
            m.vocab_size,
            m.num_attention_heads,
            m.num_key_value_heads,
            m.head_dim,
            short_count(m.parameters),
            if m.tie_word_embeddings { ", tied head" } else { "" }
        )?;
        writeln!(
            f,
            "micro-batch: {} tokens in {} row{}; base {}; checkpointing {}; LoRA r={} on {} ({} parameters); loss chunk {}",
            crate::report::thousands(inputs.tokens_per_micro_batch as u64),
            inputs.rows,
            if inputs.rows == 1 { "" } else { "s" },
            inputs.dtype,
            match inputs.checkpointing {
                Checkpointing::None => "none",
                _ => "layers",
            },
            l.r,
            if l.targets.len() == Target::ALL.len() {
                "all seven projections".to_string()
            } else {
                l.targets.join(", ")
            },
            short_count(l.parameters),
            crate::report::thousands(inputs.loss_chunk as u64)
        )?;
        writeln!(f)?;
        let tokens = crate::report::thousands(inputs.tokens_per_micro_batch as u64);
        let layers = m.num_hidden_layers as u64;
        let without_graph = inputs.layer_pass != LayerPass::Graph;
        let kept_note = match inputs.checkpointing {
            Checkpointing::None if without_graph => format!(
                "layer inputs + {} layers' kept values",
                layers.saturating_sub(1)
            ),
            Checkpointing::None => format!(
                "embeddings + {} layers' working sets",
                layers.saturating_sub(1)
            ),
            _ => format!(
                "{} × {tokens} tokens × {} hidden (layer inputs + 1)",
                layers + RECOMPUTE_COPIES,
                crate::report::thousands(m.hidden_size as u64)
            ),
        };
        let in_phase = |phase: PeakPhase| self.peak_phase == phase;
        let rows: Vec<(&str, u64, String, bool)> = vec![
            (
                "base weights",
                self.base_weights,
                format!(
                    "{} × {dtype_bytes} bytes ({})",
                    short_count(m.parameters),
                    inputs.dtype
                ),
                true,
            ),
            (
                "LoRA + optimizer",
                self.lora_and_optimizer,
                format!(
                    "{} × {LORA_COPIES} f32 (weights, 2 gradients, AdamW m, v)",
                    short_count(l.parameters)
                ),
                true,
            ),
            ("kept activations", self.kept_activations, kept_note, true),
            (
                "layer working set",
                self.layer_working_set,
                format!(
                    "{} f32 per token, one layer {}",
                    crate::report::thousands(self.layer_values_per_token),
                    match inputs.layer_pass {
                        LayerPass::ByHand => "by hand",
                        LayerPass::Graph => "with its graph",
                        LayerPass::Tensors => "with tensor ops",
                        LayerPass::Flash => "with tensor ops and flash attention",
                    }
                ),
                in_phase(PeakPhase::LayerBackward),
            ),
            (
                "gradients flowing",
                self.gradients_flowing,
                format!(
                    "{GRADIENTS_FLOWING} × {tokens} × {} f32",
                    crate::report::thousands(m.hidden_size as u64)
                ),
                in_phase(PeakPhase::LayerBackward),
            ),
            (
                "backward transients",
                self.backward_transients,
                "one layer's backward at its peak".into(),
                in_phase(PeakPhase::LayerBackward),
            ),
            (
                "attention blocks",
                self.attention_block,
                "fused attention: partial dk, dv per task".into(),
                in_phase(PeakPhase::LayerBackward),
            ),
            (
                "loss",
                self.loss_chunk,
                format!(
                    "{} × {} × {} logits {} + hidden states",
                    match inputs.layer_pass {
                        LayerPass::ByHand => HAND_LOSS_VOCAB_COPIES,
                        _ => LOSS_VOCAB_COPIES,
                    },
                    crate::report::thousands(inputs.loss_chunk as u64),
                    crate::report::thousands(m.vocab_size as u64),
                    if matches!(inputs.layer_pass, LayerPass::Tensors | LayerPass::Flash) {
                        inputs.dtype
                    } else {
                        "f32"
                    }
                ),
                in_phase(PeakPhase::Loss),
            ),
            (
                "runtime",
                self.runtime,
                format!(
                    "rotary tables, {} fixed, {:.0}% allocator slack",
                    format_bytes(inputs.layer_pass.runtime_fixed()),
                    ALLOCATOR_SLACK * 100.0
                ),
                true,
            ),
        ];
        for (name, bytes, note, counted) in rows {
            let mark = if counted { ' ' } else { '*' };
            writeln!(f, "  {name:<20} {:>12}{mark}  {note}", format_bytes(bytes))?;
        }
        writeln!(f, "  {}", "-".repeat(35))?;
        writeln!(
            f,
            "  {:<20} {:>12}   ({} bytes)",
            "expected peak",
            format_bytes(self.total),
            crate::report::thousands(self.total)
        )?;
        writeln!(
            f,
            "  * the other phase, not part of the peak (the peak is {})",
            match self.peak_phase {
                PeakPhase::Loss => "the loss",
                PeakPhase::LayerBackward => "a layer's backward pass",
            }
        )?;
        if self.cuda_attention > 0 && inputs.dtype != "f32" && inputs.dtype != "f64" {
            writeln!(
                f,
                "\nnote: on CUDA ({} base) attention keeps {} more per layer (`[rows, heads, width,\nwidth]` scores and probabilities) and as much again in its backward pass, which this\nplan does not count (the CPU's blockwise op keeps none of it)",
                inputs.dtype,
                format_bytes(self.cuda_attention)
            )?;
        }
        Ok(())
    }
}
