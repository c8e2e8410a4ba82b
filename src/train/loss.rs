//! Masked next-token loss over packed batches.
//!
//! Labels in a [`Batch`] are the trained tokens themselves; the loss of position `j`
//! predicts the label at `j + 1` of the same example. Only positions whose next token is
//! trained are run through the output head, so prompt tokens cost no vocabulary-sized
//! logits at all.

use candle_core::{Result, Tensor, D};

use crate::batches::{Batch, IGNORE};
use crate::model::{packed_causal_mask, reduction_dtype, Adapter, Llama};

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
    let mask = packed_causal_mask(&segments, rows, width, device)?;
    let ids = batch.input_ids.to_device(device)?;
    let positions = batch.position_ids.to_device(device)?;
    let hidden = model.hidden_states(&ids, &positions, Some(&mask), adapter, None)?;
    let h = hidden.dim(D::Minus1)?;
    let picked = hidden
        .reshape((rows * width, h))?
        .index_select(&Tensor::new(targets.positions.as_slice(), device)?, 0)?;
    let logits = model.logits(&picked)?;
    nll_of_logits(&logits, &targets.tokens)
}

/// `logsumexp(logits) - logits[target]` per row, from differentiable ops.
pub fn nll_of_logits(logits: &Tensor, tokens: &[u32]) -> Result<Tensor> {
    let device = logits.device();
    let logits = logits.to_dtype(reduction_dtype(logits.dtype()))?;
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
