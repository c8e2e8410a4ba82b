//! Masked next-token loss over packed batches.
//!
//! Labels in a [`Batch`] are the trained tokens themselves; the loss of position `j`
//! predicts the label at `j + 1` of the same example. Only positions whose next token is
//! trained are run through the output head, so prompt tokens cost no vocabulary-sized
//! logits at all.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

use crate::batches::{Batch, IGNORE};
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

/// Negative log-likelihood `[targets]` (f32, or f64 for f64 models) of each target of the batch.
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
    let logits = model.logits(&picked)?;
    nll_of_logits(&logits, &targets.tokens)
}

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
    if device.is_cpu() {
        return logits.contiguous()?.apply_op1(CrossEntropy {
            targets: tokens.to_vec(),
        });
    }
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let log_sum = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let index = Tensor::new(tokens, device)?.unsqueeze(1)?;
    let target = logits.gather(&index, D::Minus1)?;
    (log_sum - target)?.squeeze(1)
}

/// Per-row cross-entropy of `[rows, vocab]` logits against one target per row.
struct CrossEntropy {
    targets: Vec<u32>,
}

/// `(rows of logits, vocab)` of a contiguous CPU tensor, as f64 for the arithmetic.
fn rows_f64(storage: &CpuStorage, layout: &Layout) -> Result<(Vec<f64>, usize)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("cross-entropy: the logits must be contiguous")
    };
    let vocab = layout.dims().last().copied().unwrap_or(1);
    let values = match storage {
        CpuStorage::F32(v) => v[start..end].iter().map(|&x| f64::from(x)).collect(),
        CpuStorage::F64(v) => v[start..end].to_vec(),
        _ => candle_core::bail!("cross-entropy: f32 or f64 logits only"),
    };
    Ok((values, vocab))
}

fn log_sum_exp(row: &[f64]) -> f64 {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + row.iter().map(|&x| (x - max).exp()).sum::<f64>().ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (values, vocab) = rows_f64(storage, layout)?;
        let nll: Vec<f64> = values
            .par_chunks(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| log_sum_exp(row) - row[t as usize])
            .collect();
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(nll.iter().map(|&x| x as f32).collect()),
            _ => CpuStorage::F64(nll),
        };
        Ok((out, Shape::from(self.targets.len())))
    }

    /// `d logits = g · (softmax(logits) - onehot(target))` per row.
    fn bwd(&self, logits: &Tensor, _nll: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let g: Vec<f64> = grad.to_dtype(DType::F64)?.to_vec1()?;
        let logits = logits.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("cross-entropy: logits left the CPU")
        };
        let (mut values, vocab) = rows_f64(storage, layout)?;
        values
            .par_chunks_mut(vocab)
            .zip(self.targets.par_iter().zip(g.par_iter()))
            .for_each(|(row, (&t, &g))| {
                let lse = log_sum_exp(row);
                for x in row.iter_mut() {
                    *x = g * (*x - lse).exp();
                }
                row[t as usize] -= g;
            });
        let shape = layout.shape().clone();
        let out = Tensor::from_vec(values, shape, logits.device())?;
        Ok(Some(out.to_dtype(logits.dtype())?))
    }
}
