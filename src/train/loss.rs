//! Masked next-token loss over packed batches.
//!
//! Labels in a [`Batch`] are the trained tokens themselves; the loss of position `j`
//! predicts the label at `j + 1` of the same example. Only positions whose next token is
//! trained are run through the output head, so prompt tokens cost no vocabulary-sized
//! logits at all.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

use crate::batches::{Batch, IGNORE};
use crate::model::num_float::{sum_f64, Float};
use crate::model::{reduction_dtype, Adapter, AttentionMask, Llama};

/// The positions of a batch that predict a trained token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// Index into the flattened `[rows × width]` of the predicting position.
    pub positions: Vec<u32>,
    /// The token it must predict.
    pub tokens: Vec<u32>,
    /// Index of its example in the batch (`segment id - 1`).
    pub examples: Vec<usize>,
}

impl Targets {
    pub fn of(batch: &Batch) -> Result<Targets> {
        let labels: Vec<i64> = batch.labels.flatten_all()?.to_vec1()?;
        let segments: Vec<u32> = batch.segment_ids.flatten_all()?.to_vec1()?;
        let (rows, width) = batch.labels.dims2()?;
        let mut targets = Targets::default();
        for r in 0..rows {
            for j in 0..width.saturating_sub(1) {
                let (here, next) = (r * width + j, r * width + j + 1);
                if labels[next] != IGNORE && segments[next] != 0 && segments[next] == segments[here]
                {
                    targets.positions.push(here as u32);
                    targets.tokens.push(labels[next] as u32);
                    targets.examples.push(segments[next] as usize - 1);
                }
            }
        }
        Ok(targets)
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// Negative log-likelihood `[targets]` (f32, or f64 for f64 models) of each target of the
/// batch, in one forward pass (the reference the training step's layer-by-layer driver,
/// [`super::step`], is tested against; evaluation uses it without a graph).
pub fn token_nll(
    model: &Llama,
    adapter: Option<Adapter>,
    batch: &Batch,
    targets: &Targets,
) -> Result<Tensor> {
    let device = &model.device;
    let (rows, width) = batch.input_ids.dims2()?;
    let segments: Vec<u32> = batch.segment_ids.flatten_all()?.to_vec1()?;
    let mask = AttentionMask::Packed(std::sync::Arc::new(segments));
    let ids = batch.input_ids.to_device(device)?;
    let positions = batch.position_ids.to_device(device)?;
    let hidden = model.hidden_states(&ids, &positions, &mask, adapter, None)?;
    let h = hidden.dim(D::Minus1)?;
    let picked = hidden
        .reshape((rows * width, h))?
        .index_select(&Tensor::new(targets.positions.as_slice(), device)?, 0)?;
    // Logits a chunk at a time: evaluation never holds `[targets, vocab]` at once.
    let chunks = (0..targets.len())
        .step_by(LOGITS_CHUNK)
        .map(|start| {
            let len = LOGITS_CHUNK.min(targets.len() - start);
            let logits = model.logits(&picked.narrow(0, start, len)?)?;
            nll_of_logits(&logits, &targets.tokens[start..start + len])
        })
        .collect::<Result<Vec<_>>>()?;
    if chunks.is_empty() {
        return Tensor::zeros(0, reduction_dtype(model.dtype), device);
    }
    Tensor::cat(&chunks, 0)
}

/// Targets whose logits [`token_nll`] computes at once.
const LOGITS_CHUNK: usize = 1024;

/// `logsumexp(logits) - logits[target]` per row. On the CPU one fused op (the backward,
/// `softmax - onehot`, is computed from the logits and the result, so nothing of the
/// vocabulary's size is kept but the logits); elsewhere composed from differentiable ops.
pub fn nll_of_logits(logits: &Tensor, tokens: &[u32]) -> Result<Tensor> {
    let device = logits.device();
    let logits = logits.to_dtype(reduction_dtype(logits.dtype()))?;
    let (rows, vocab) = logits.dims2()?;
    if rows != tokens.len() {
        candle_core::bail!("{rows} rows of logits for {} targets", tokens.len())
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target token {bad} is outside the vocabulary of {vocab}")
    }
    if crate::model::fused_cpu(device) {
        return logits.contiguous()?.apply_op1(CrossEntropy {
            targets: tokens.to_vec(),
        });
    }
    let log_sum = log_sum_exp_rows(&logits)?;
    let index = Tensor::new(tokens, device)?.unsqueeze(1)?;
    let target = logits.gather(&index, D::Minus1)?;
    (log_sum - target)?.squeeze(1)
}

/// `ln Σ exp` of every row of `logits: [rows, vocab]`, `[rows, 1]`: the maximum
/// subtracted first (it enters the graph as a constant, its gradient cancels).
fn log_sum_exp_rows(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max
}

/// Per-row cross-entropy of `[rows, vocab]` logits against one target per row.
struct CrossEntropy {
    targets: Vec<u32>,
}

fn max_of<T: Float>(row: &[T]) -> T {
    row.iter().fold(T::neg_infinity(), |m, &x| m.maximum(x))
}

/// `ln Σ exp(row)`: the exponentials in the logits' own precision (vectorised, within an
/// ulp of values in `(0, 1]`), summed in f64.
fn log_sum_exp<T: Float>(row: &[T]) -> f64 {
    let max = max_of(row);
    let mut block = [T::zero(); 64];
    let mut sum = 0f64;
    for chunk in row.chunks(64) {
        let block = &mut block[..chunk.len()];
        for (e, &x) in block.iter_mut().zip(chunk) {
            *e = (x - max).exp_fast();
        }
        sum += sum_f64(block);
    }
    max.to_f64() + sum.ln()
}

fn nll_rows<T: Float>(logits: &[T], vocab: usize, targets: &[u32]) -> Vec<T> {
    use rayon::prelude::*;
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| T::from_f64(log_sum_exp(row) - row[t as usize].to_f64()))
        .collect()
}

/// `g · (softmax(row) - onehot(target))` for every row, with one exponential per logit.
fn nll_gradient<T: Float>(logits: &[T], vocab: usize, targets: &[u32], grad: &[f64]) -> Vec<T> {
    use rayon::prelude::*;
    let mut out: Vec<T> = logits.to_vec();
    out.par_chunks_mut(vocab)
        .zip(targets.par_iter().zip(grad.par_iter()))
        .for_each(|(row, (&t, &g))| {
            row_to_gradient(row, t as usize, g);
        });
    out
}

/// Overwrites the logits `row` with `g · (softmax(row) - onehot(target))` and returns the
/// row's negative log-likelihood: `exp(x - max)` is kept in place and scaled by `g / Σ`.
fn row_to_gradient<T: Float>(row: &mut [T], target: usize, g: f64) -> f64 {
    let max = max_of(row);
    let logit = row[target];
    for x in row.iter_mut() {
        *x = (*x - max).exp_fast();
    }
    let sum = sum_f64(row);
    let scale = T::from_f64(g / sum);
    for x in row.iter_mut() {
        *x = *x * scale;
    }
    row[target] = row[target] - T::from_f64(g);
    max.to_f64() + sum.ln() - logit.to_f64()
}

/// The summed cross-entropy of `rows: [n, hidden]` (final-norm outputs at trained
/// positions, f32 on the CPU) against `tokens`, and its gradient with respect to `rows`,
/// holding one `[n, vocab]` buffer: the logits, overwritten by their gradient. The values
/// of [`nll_of_logits`] and its backward pass, without a graph (whose gradient
/// accumulation would hold three more such buffers).
pub fn chunk_by_hand(model: &Llama, rows: &Tensor, tokens: &[u32]) -> Result<(f64, Tensor)> {
    use crate::model::cpu_layer::{product, values, Mat};
    use rayon::prelude::*;
    let rows = rows.contiguous()?;
    let (n, hidden) = rows.dims2()?;
    let vocab = model.config.vocab_size;
    if n != tokens.len() || model.dtype != DType::F32 {
        candle_core::bail!("loss chunk: {n} f32 rows for {} tokens", tokens.len())
    }
    let head = values(model.lm_head())?;
    let input = values(&rows)?;
    let mut logits = vec![0f32; n * vocab];
    product(
        &mut logits,
        Mat::new(input.get(), n, hidden),
        Mat::new(head.get(), vocab, hidden).t(),
        false,
        1.0,
    );
    // Per row, then summed in order: rayon's own sum would add in an order that depends
    // on scheduling, and a resumed run must repeat the same losses to the last bit.
    let per_row: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(tokens.par_iter())
        .map(|(row, &token)| row_to_gradient(row, token as usize, 1.0))
        .collect();
    let nll: f64 = per_row.iter().sum();
    let mut d_rows = vec![0f32; n * hidden];
    product(
        &mut d_rows,
        Mat::new(&logits, n, vocab),
        Mat::new(head.get(), vocab, hidden),
        false,
        1.0,
    );
    Ok((
        nll,
        Tensor::from_vec(d_rows, (n, hidden), &candle_core::Device::Cpu)?,
    ))
}

/// [`chunk_by_hand`] with tensor ops on any device (CUDA's path): the chunk's logits in
/// the model's dtype, their cross-entropy and its gradient by one kernel on CUDA (composed
/// ops elsewhere), and the rows' gradient through the head. No graph; one `[n, vocab]`
/// buffer beside the logits.
pub fn chunk_with_tensors(model: &Llama, rows: &Tensor, tokens: &[u32]) -> Result<(f64, Tensor)> {
    let (n, _) = rows.dims2()?;
    let vocab = model.config.vocab_size;
    if n != tokens.len() {
        candle_core::bail!("loss chunk: {n} rows for {} tokens", tokens.len())
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target token {bad} is outside the vocabulary of {vocab}")
    }
    let head = model.lm_head();
    let logits = rows.to_dtype(model.dtype)?.matmul(&head.t()?)?;
    let targets = Tensor::new(tokens, rows.device())?;
    #[cfg(feature = "cuda")]
    let (nll, gradient) = if crate::model::cuda_kernels(rows.device()) {
        crate::model::cuda::cross_entropy(&logits, &targets)?
    } else {
        composed_cross_entropy(&logits, &targets)?
    };
    #[cfg(not(feature = "cuda"))]
    let (nll, gradient) = composed_cross_entropy(&logits, &targets)?;
    drop(logits);
    // Summed in order, in f64: the same losses to the last bit on a resumed run.
    let nll: f64 = nll.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().sum();
    Ok((nll, gradient.matmul(head)?))
}

/// Per-row negative log-likelihoods (f32) of `logits` against `targets` (u32) and the
/// gradient of their sum, `softmax − onehot`, in the logits' dtype; from tensor ops in f32.
fn composed_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let dtype = logits.dtype();
    let logits = logits.to_dtype(reduction_dtype(dtype))?;
    let log_sum = log_sum_exp_rows(&logits)?;
    let index = targets.unsqueeze(1)?;
    let nll = (&log_sum - logits.gather(&index, D::Minus1)?)?.squeeze(1)?;
    let ones = Tensor::ones(index.shape(), logits.dtype(), logits.device())?;
    let onehot = logits.zeros_like()?.scatter_add(&index, &ones, D::Minus1)?;
    let gradient = (logits.broadcast_sub(&log_sum)?.exp()? - onehot)?.to_dtype(dtype)?;
    Ok((nll.to_dtype(DType::F32)?, gradient))
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("cross-entropy: the logits must be contiguous")
        };
        let vocab = layout.dims().last().copied().unwrap_or(1);
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(nll_rows(&v[start..end], vocab, &self.targets)),
            CpuStorage::F64(v) => CpuStorage::F64(nll_rows(&v[start..end], vocab, &self.targets)),
            _ => candle_core::bail!("cross-entropy: f32 or f64 logits only"),
        };
        Ok((out, Shape::from(self.targets.len())))
    }

    /// `d logits = g · (softmax(logits) - onehot(target))` per row, recomputed from the
    /// logits.
    fn bwd(&self, logits: &Tensor, _nll: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g: Vec<f64> = grad.to_dtype(DType::F64)?.to_vec1()?;
        let logits = logits.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        let (Some((start, end)), candle_core::Storage::Cpu(storage)) =
            (layout.contiguous_offsets(), &*storage)
        else {
            candle_core::bail!("cross-entropy: logits left the CPU")
        };
        let vocab = layout.dims().last().copied().unwrap_or(1);
        let out = match storage {
            CpuStorage::F32(v) => {
                CpuStorage::F32(nll_gradient(&v[start..end], vocab, &self.targets, &g))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(nll_gradient(&v[start..end], vocab, &self.targets, &g))
            }
            _ => candle_core::bail!("cross-entropy: f32 or f64 logits only"),
        };
        Ok(Some(Tensor::from_storage(
            candle_core::Storage::Cpu(out),
            layout.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        )))
    }
}
