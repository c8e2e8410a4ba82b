//! Attention probabilities `softmax(q·kᵀ·scale + mask)` with a backward pass.
//!
//! On the CPU this is one op over `(q, k)`: the scores are computed, masked and normalised
//! in place, and only the probabilities are kept for the backward pass
//! (`dS = P ∘ (dP − Σ dP∘P)`, `dq = dS·k·scale`, `dk = dSᵀ·q·scale`). Composing it from
//! candle ops would keep four score-sized tensors per layer alive until the backward pass
//! (the product, the scaled and the masked scores, the probabilities); at 1,024 tokens
//! that is most of the training memory. The mask is never materialised: it is a rule
//! (causal, and within one packed example) evaluated while normalising. Other devices use
//! the composed form with an additive mask tensor.

use std::sync::Arc;

use super::num_float::Float;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D};

/// Which keys a query may attend to.
#[derive(Clone, Debug)]
pub enum AttentionMask {
    /// One sequence per row: a query sees every earlier position and itself, including
    /// the cached ones before it.
    Causal,
    /// Packed rows (`[rows × width]` segment ids): causal, and only within the query's own
    /// segment, so packed examples never see each other.
    Packed(Arc<Vec<u32>>),
}

impl AttentionMask {
    /// Whether query `i` (of `t` new tokens after `past` cached ones) of batch row `row`
    /// may see key `j`.
    fn allows(&self, row: usize, t: usize, past: usize, i: usize, j: usize) -> bool {
        if j > past + i {
            return false;
        }
        match self {
            AttentionMask::Causal => true,
            AttentionMask::Packed(segments) => segments[row * t + i] == segments[row * t + j],
        }
    }

    /// The mask as an additive tensor `[b, 1, 1, t, past + t]` (0 or a large negative).
    fn additive(&self, b: usize, t: usize, past: usize, device: &Device) -> Result<Tensor> {
        let s = past + t;
        let mut values = vec![super::MASKED; b * t * s];
        for row in 0..b {
            for i in 0..t {
                for j in 0..s {
                    if self.allows(row, t, past, i, j) {
                        values[(row * t + i) * s + j] = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(values, (b, 1, 1, t, s), device)
    }

    fn check(&self, b: usize, t: usize, past: usize) -> Result<()> {
        if let AttentionMask::Packed(segments) = self {
            if past != 0 || segments.len() != b * t {
                candle_core::bail!(
                    "a packed mask needs {} segment ids and no cached positions (has {}, {past} cached)",
                    b * t,
                    segments.len()
                )
            }
        }
        Ok(())
    }
}

/// Whether attention runs as the fused CPU op for tensors of `dtype` on `device`.
fn fused(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// A mask ready for one forward pass of `t` new tokens after `past` cached ones: the rule,
/// and on the composed path its additive tensor, built once for all layers.
pub struct Prepared<'a> {
    rule: &'a AttentionMask,
    t: usize,
    past: usize,
    additive: Option<Tensor>,
}

/// Checks the mask against the batch and builds what the attention of every layer needs.
pub fn prepare<'a>(
    mask: &'a AttentionMask,
    b: usize,
    t: usize,
    past: usize,
    device: &Device,
    dtype: DType,
) -> Result<Prepared<'a>> {
    mask.check(b, t, past)?;
    let additive = if fused(device, dtype) {
        None
    } else {
        Some(
            mask.additive(b, t, past, device)?
                .to_dtype(super::reduction_dtype(dtype))?,
        )
    };
    Ok(Prepared {
        rule: mask,
        t,
        past,
        additive,
    })
}

/// `softmax(q·kᵀ·scale + mask)` for `q: [b, kv_heads, group × t, d]` (the query heads of
/// one key/value head stacked, `t` new tokens each) and `k: [b, kv_heads, past + t, d]`;
/// the result is `[b, kv_heads, group × t, past + t]` in the reduction dtype.
pub fn probabilities(q: &Tensor, k: &Tensor, scale: f64, mask: &Prepared) -> Result<Tensor> {
    let (b, kv_heads, rows, d) = q.dims4()?;
    let (t, past) = (mask.t, mask.past);
    let s = past + t;
    // The fused op multiplies raw storage: shapes must agree exactly.
    if t == 0 || rows % t != 0 || k.dims4()? != (b, kv_heads, s, d) || k.dtype() != q.dtype() {
        candle_core::bail!(
            "attention: q {:?} ({:?}) and k {:?} ({:?}) do not fit {t} new tokens after {past}",
            q.dims(),
            q.dtype(),
            k.dims(),
            k.dtype()
        )
    }
    let dtype = super::reduction_dtype(q.dtype());
    let Some(additive) = &mask.additive else {
        return q.contiguous()?.apply_op2(
            &k.contiguous()?,
            Probabilities {
                scale,
                t,
                past,
                mask: mask.rule.clone(),
            },
        );
    };
    let group = rows / t;
    let scores = (q.matmul(&k.t()?.contiguous()?)?.to_dtype(dtype)? * scale)?
        .reshape((b, kv_heads, group, t, s))?
        .broadcast_add(additive)?;
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let exp = scores.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?
        .reshape((b, kv_heads, rows, s))
}

struct Probabilities {
    scale: f64,
    t: usize,
    past: usize,
    mask: AttentionMask,
}

impl CustomOp2 for Probabilities {
    fn name(&self) -> &'static str {
        "attention-probabilities"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, kv_heads, rows, d) = q_layout.shape().dims4()?;
        let s = k_layout.shape().dims4()?.2;
        let scores = q.matmul(
            k,
            (b * kv_heads, rows, s, d),
            q_layout,
            &k_layout.transpose(2, 3)?,
        )?;
        let out = match scores {
            CpuStorage::F32(mut v) => {
                normalise(&mut v, self, kv_heads, rows, s);
                CpuStorage::F32(v)
            }
            CpuStorage::F64(mut v) => {
                normalise(&mut v, self, kv_heads, rows, s);
                CpuStorage::F64(v)
            }
            _ => candle_core::bail!("attention: f32 or f64 only"),
        };
        Ok((out, Shape::from((b, kv_heads, rows, s))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dot = (grad * probs)?.sum_keepdim(D::Minus1)?;
        let ds = ((probs * grad.broadcast_sub(&dot)?)? * self.scale)?;
        let dq = ds.matmul(k)?;
        let dk = ds.t()?.contiguous()?.matmul(q)?;
        Ok((Some(dq), Some(dk)))
    }
}

/// Scales, masks and normalises every row of scores `[b, kv_heads, rows, s]` in place.
fn normalise<T: Float>(
    scores: &mut [T],
    op: &Probabilities,
    kv_heads: usize,
    rows: usize,
    s: usize,
) {
    use rayon::prelude::*;
    let (t, past, scale) = (op.t, op.past, op.scale);
    scores
        .par_chunks_mut(s)
        .enumerate()
        .for_each(|(index, row)| {
            let batch_row = index / (kv_heads * rows);
            let i = (index % rows) % t;
            // Keys after the query are never visible: they are zeroed without a look.
            let (visible, hidden) = row.split_at_mut((past + i + 1).min(s));
            hidden.iter_mut().for_each(|v| *v = T::from_f64(0.0));
            // One mask decision per key: hidden ones become -inf, whose exp is 0.
            let mut max = f64::NEG_INFINITY;
            for (j, v) in visible.iter_mut().enumerate() {
                let x = if op.mask.allows(batch_row, t, past, i, j) {
                    v.to_f64() * scale
                } else {
                    f64::NEG_INFINITY
                };
                max = max.max(x);
                *v = T::from_f64(x);
            }
            let mut sum = 0.0;
            for v in visible.iter_mut() {
                let e = (v.to_f64() - max).exp();
                sum += e;
                *v = T::from_f64(e);
            }
            for v in visible.iter_mut() {
                *v = T::from_f64(v.to_f64() / sum);
            }
        });
}
