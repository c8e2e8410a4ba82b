//! Attention `softmax(q·kᵀ·scale + mask)·v` with a backward pass.
//!
//! On the CPU this is one blockwise op over `(q, k, v)` in the manner of FlashAttention-2:
//! the forward pass walks blocks of keys with an online softmax (a running maximum and
//! sum per query), so no `[queries, keys]` tensor ever exists beyond one block of
//! 64 × 64 scores, and keeps only its output and one log-sum-exp per query. The backward
//! pass recomputes each block's probabilities from `q`, `k` and the log-sum-exp
//! (`dS = P ∘ (dP − rowsum(dO ∘ O))`, `dq = dS·k·scale`, `dk = dSᵀ·q·scale`,
//! `dv = Pᵀ·dO`). The mask is never materialised: it is a rule (causal, and within one
//! packed example) evaluated per block, and blocks no query of a block can see are
//! skipped. Other devices use the composed form with an additive mask tensor.

use std::sync::{Arc, Mutex};

use super::num_float::Float;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};

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
    super::fused_cpu(device) && matches!(dtype, DType::F32 | DType::F64 | DType::BF16)
}

/// A mask ready for one forward pass of `t` new tokens after `past` cached ones: the rule,
/// and on the composed path its additive tensor, built once for all layers.
pub struct Prepared<'a> {
    rule: &'a AttentionMask,
    t: usize,
    past: usize,
    additive: Option<Tensor>,
    /// CUDA with corpusdb's kernels: products through cuBLAS, the masking rule applied
    /// by the softmax kernel (no additive mask exists).
    kernel: bool,
    /// Packed rows' segment ids on the device, for the softmax kernel.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    segments: Option<Tensor>,
    /// CUDA with the flash kernels on: bf16 training attention (no cached positions) runs
    /// as the flash kernels and keeps no probabilities.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    flash: bool,
    /// Packed rows' masking data for the flash kernels.
    #[cfg(feature = "cuda")]
    flash_segments: Option<super::cuda::FlashSegments>,
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
    let kernel = super::cuda_kernels(device) && matches!(dtype, DType::F32 | DType::BF16);
    if kernel {
        mask.check(b, t, past)?;
        let segments = match mask {
            AttentionMask::Packed(ids) => {
                Some(Tensor::from_slice(ids.as_slice(), ids.len(), device)?)
            }
            AttentionMask::Causal => None,
        };
        return prepare_kernel(mask, b, t, past, device, dtype, segments);
    }
    prepare_as(mask, b, t, past, device, dtype, !fused(device, dtype))
}

/// [`prepare`] for the composed path whatever the device: what CUDA runs, so that the
/// CPU tests can check it against the fused op.
pub fn prepare_composed<'a>(
    mask: &'a AttentionMask,
    b: usize,
    t: usize,
    past: usize,
    device: &Device,
    dtype: DType,
) -> Result<Prepared<'a>> {
    prepare_as(mask, b, t, past, device, dtype, true)
}

fn prepare_as<'a>(
    mask: &'a AttentionMask,
    b: usize,
    t: usize,
    past: usize,
    device: &Device,
    dtype: DType,
    composed: bool,
) -> Result<Prepared<'a>> {
    mask.check(b, t, past)?;
    let additive = if !composed {
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
        kernel: false,
        segments: None,
        flash: false,
        #[cfg(feature = "cuda")]
        flash_segments: None,
    })
}

#[cfg(feature = "cuda")]
fn prepare_kernel<'a>(
    mask: &'a AttentionMask,
    b: usize,
    t: usize,
    past: usize,
    device: &Device,
    dtype: DType,
    segments: Option<Tensor>,
) -> Result<Prepared<'a>> {
    let flash = super::cuda::flash_enabled() && dtype == DType::BF16 && past == 0;
    let flash_segments = match (mask, &segments) {
        (AttentionMask::Packed(ids), Some(on_device)) if flash => {
            let (first, last) = segment_bounds(ids, b, t);
            Some(super::cuda::FlashSegments {
                ids: on_device.clone(),
                first: Tensor::from_vec(first, b * t, device)?,
                last: Tensor::from_vec(last, b * t, device)?,
                tiles: Tensor::new(super::cuda::segment_tiles(ids, b, t).as_slice(), device)?,
            })
        }
        _ => None,
    };
    Ok(Prepared {
        rule: mask,
        t,
        past,
        additive: None,
        kernel: true,
        segments,
        flash,
        flash_segments,
    })
}

#[cfg(not(feature = "cuda"))]
fn prepare_kernel<'a>(
    _: &'a AttentionMask,
    _: usize,
    _: usize,
    _: usize,
    _: &Device,
    _: DType,
    _: Option<Tensor>,
) -> Result<Prepared<'a>> {
    candle_core::bail!("attention kernels need a build with the `cuda` feature")
}

/// Per position of each of `b` packed rows of `t` ids, the first and the last position of
/// its segment (the positions with the same id): the key and query ranges the flash
/// kernels must visit.
pub fn segment_bounds(ids: &[u32], b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
    let (mut first, mut last) = (vec![0u32; b * t], vec![0u32; b * t]);
    let mut span = std::collections::HashMap::new();
    for row in 0..b {
        span.clear();
        let row_ids = &ids[row * t..(row + 1) * t];
        for (i, id) in row_ids.iter().enumerate() {
            span.entry(*id).or_insert((i, i)).1 = i;
        }
        for (i, id) in row_ids.iter().enumerate() {
            let (start, end) = span[id];
            first[row * t + i] = start as u32;
            last[row * t + i] = end as u32;
        }
    }
    (first, last)
}

/// `softmax(q·kᵀ·scale + mask)·v` for `q: [b, kv_heads, group × t, d]` (the query heads
/// of one key/value head stacked, `t` new tokens each) and `k`, `v`:
/// `[b, kv_heads, past + t, d]`; the result has the shape and dtype of `q`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &Prepared) -> Result<Tensor> {
    let (b, kv_heads, rows, d) = q.dims4()?;
    let (t, past) = (mask.t, mask.past);
    let s = past + t;
    // The fused op reads raw storage: shapes and dtypes must agree exactly.
    if t == 0
        || rows % t != 0
        || k.dims4()? != (b, kv_heads, s, d)
        || v.dims4()? != (b, kv_heads, s, d)
        || k.dtype() != q.dtype()
        || v.dtype() != q.dtype()
    {
        candle_core::bail!(
            "attention: q {:?} ({:?}), k {:?} ({:?}) and v {:?} do not fit {t} new tokens after {past}",
            q.dims(),
            q.dtype(),
            k.dims(),
            k.dtype(),
            v.dims()
        )
    }
    if mask.kernel {
        return attend_kernel(q, k, v, scale, mask);
    }
    let Some(additive) = &mask.additive else {
        return q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            FlashAttention {
                scale,
                t,
                past,
                mask: mask.rule.clone(),
                log_sum_exp: Mutex::new(Vec::new()),
            },
        );
    };
    let dtype = super::reduction_dtype(q.dtype());
    let group = rows / t;
    let scores = (q.matmul(&k.t()?.contiguous()?)?.to_dtype(dtype)? * scale)?
        .reshape((b, kv_heads, group, t, s))?
        .broadcast_add(additive)?;
    let probs = softmax_last(&scores)?.reshape((b, kv_heads, rows, s))?;
    probs.to_dtype(v.dtype())?.matmul(v)
}

impl Prepared<'_> {
    /// Whether [`attend_keeping`] and [`attend_backward`] can run on this mask: corpusdb's
    /// CUDA kernels or the composed ops (not the CPU's blockwise op, which keeps nothing
    /// for them).
    pub fn keeps_probabilities(&self) -> bool {
        self.kernel || self.additive.is_some()
    }

    /// Whether attention of head width `d` runs as the flash kernels on this mask (and
    /// keeps one log-sum-exp per query instead of the probabilities).
    pub fn flash(&self, d: usize) -> bool {
        #[cfg(feature = "cuda")]
        return self.flash && super::cuda::FLASH_HEAD_DIMS.contains(&d);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = d;
            false
        }
    }
}

/// Attention's output and the gradients of `q`, `k` and `v` for the output's gradient
/// `d_out` (of `q`'s dtype), by the passes training runs without a graph (the flash
/// kernels where they apply): what the GPU check and profile compare and time.
pub fn attend_with_gradients(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &Prepared,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (out, kept) = attend_keeping(q, k, v, scale, mask)?;
    let (dq, dk, dv) = attend_backward(q, k, v, &kept, d_out, scale, mask)?;
    Ok((out, dq, dk, dv))
}

/// What [`attend_keeping`] keeps for [`attend_backward`].
pub(crate) enum Kept {
    /// The probabilities `[b, kv_heads, rows, s]`.
    Probabilities(Tensor),
    /// The flash kernels' output and per-query log-sum-exp.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Flash { out: Tensor, lse: Tensor },
}

/// [`attend`] that also returns the attention probabilities `[b, kv_heads, rows, s]`,
/// which [`attend_backward`] needs: through the CUDA kernels (probabilities in the
/// inputs' dtype) or the composed ops with an additive mask (f32 probabilities).
pub(crate) fn attend_keeping(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &Prepared,
) -> Result<(Tensor, Kept)> {
    let (b, kv_heads, rows, d) = q.dims4()?;
    #[cfg(feature = "cuda")]
    if mask.flash(d) && q.dtype() == DType::BF16 {
        let (out, lse) =
            super::cuda::flash_forward(q, k, v, scale, mask.t, mask.flash_segments.as_ref())?;
        return Ok((out.clone(), Kept::Flash { out, lse }));
    }
    let _ = d;
    let (t, s) = (mask.t, mask.past + mask.t);
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let probs = if mask.kernel {
        masked_softmax(&scores, scale, mask)?
    } else {
        let Some(additive) = &mask.additive else {
            candle_core::bail!(
                "attention by hand: the CPU's blockwise attention keeps no probabilities"
            )
        };
        let group = rows / t;
        let scores = (scores.to_dtype(super::reduction_dtype(q.dtype()))? * scale)?
            .reshape((b, kv_heads, group, t, s))?
            .broadcast_add(additive)?;
        softmax_last(&scores)?.reshape((b, kv_heads, rows, s))?
    };
    let out = probs.to_dtype(v.dtype())?.matmul(v)?;
    Ok((out, Kept::Probabilities(probs)))
}

/// The gradients of `q`, `k` and `v` for the gradient `d_out` of [`attend_keeping`]'s
/// output, from its probabilities.
pub(crate) fn attend_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kept: &Kept,
    d_out: &Tensor,
    scale: f64,
    mask: &Prepared,
) -> Result<(Tensor, Tensor, Tensor)> {
    let probs = match kept {
        Kept::Probabilities(probs) => probs,
        #[cfg(feature = "cuda")]
        Kept::Flash { out, lse } => {
            return super::cuda::flash_backward(
                q,
                k,
                v,
                out,
                lse,
                d_out,
                scale,
                mask.t,
                mask.flash_segments.as_ref(),
            )
        }
        #[cfg(not(feature = "cuda"))]
        Kept::Flash { .. } => candle_core::bail!("flash attention needs the `cuda` feature"),
    };
    let dtype = q.dtype();
    let d_probs = d_out.matmul(&v.t()?)?;
    let d_v = probs.to_dtype(dtype)?.t()?.matmul(d_out)?;
    let d_scores = if mask.kernel {
        softmax_backward(probs, &d_probs, scale)?
    } else {
        // scale · p · (dp − Σ p·dp), in the probabilities' dtype.
        let d_probs = d_probs.to_dtype(probs.dtype())?;
        let dot = (probs * &d_probs)?.sum_keepdim(D::Minus1)?;
        ((probs * d_probs.broadcast_sub(&dot)?)? * scale)?.to_dtype(dtype)?
    };
    let d_q = d_scores.matmul(k)?;
    let d_k = d_scores.t()?.matmul(q)?;
    Ok((d_q, d_k, d_v))
}

/// Softmax over the last dimension, the maximum subtracted first (it enters a graph as a
/// constant: its gradient cancels).
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

#[cfg(feature = "cuda")]
fn masked_softmax(scores: &Tensor, scale: f64, mask: &Prepared) -> Result<Tensor> {
    scores.apply_op1_no_bwd(&super::cuda::MaskedSoftmax {
        scale: scale as f32,
        t: mask.t,
        past: mask.past,
        segments: mask.segments.clone(),
    })
}

#[cfg(not(feature = "cuda"))]
fn masked_softmax(_: &Tensor, _: f64, _: &Prepared) -> Result<Tensor> {
    candle_core::bail!("attention kernels need a build with the `cuda` feature")
}

#[cfg(feature = "cuda")]
fn softmax_backward(probs: &Tensor, d_probs: &Tensor, scale: f64) -> Result<Tensor> {
    super::cuda::masked_softmax_backward(probs, d_probs, scale as f32)
}

#[cfg(not(feature = "cuda"))]
fn softmax_backward(_: &Tensor, _: &Tensor, _: f64) -> Result<Tensor> {
    candle_core::bail!("attention kernels need a build with the `cuda` feature")
}

/// Attention on CUDA with corpusdb's kernels: `q·kᵀ` and `p·v` through cuBLAS in the
/// inputs' dtype, the scaled, masked softmax in f32 by one kernel whose backward needs only
/// its output (no additive mask, no f32 copies of the scores).
#[cfg(feature = "cuda")]
fn attend_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &Prepared,
) -> Result<Tensor> {
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let probs = scores.apply_op1(super::cuda::MaskedSoftmax {
        scale: scale as f32,
        t: mask.t,
        past: mask.past,
        segments: mask.segments.clone(),
    })?;
    probs.matmul(&v.contiguous()?)
}

#[cfg(not(feature = "cuda"))]
fn attend_kernel(_: &Tensor, _: &Tensor, _: &Tensor, _: f64, _: &Prepared) -> Result<Tensor> {
    candle_core::bail!("attention kernels need a build with the `cuda` feature")
}

/// The sum of `values` in eight running sums (a vector's lanes), then across them.
fn sum_in_lanes<T: Float>(values: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = *lane + v;
        }
    }
    let rest = chunks.remainder().iter().fold(T::zero(), |a, &v| a + v);
    lanes.iter().fold(rest, |a, &v| a + v)
}

/// Queries and keys per block: a 64 × 64 block of scores is 16 KiB in f32.
const BLOCK: usize = 64;

struct FlashAttention {
    scale: f64,
    t: usize,
    past: usize,
    mask: AttentionMask,
    /// `max + ln(Σ exp)` of every query's scores, `[b, kv_heads, rows]`, written by the
    /// forward pass for the backward pass.
    log_sum_exp: Mutex<Vec<f64>>,
}

/// Which keys each query of a batch row sees: `first[i] ..= past + i`, and within that
/// range, for segments that are not contiguous, only keys of the query's segment.
struct Visibility<'a> {
    past: usize,
    t: usize,
    segments: Option<&'a [u32]>,
    /// The first key of each query's contiguous segment run (`[rows × t]`), or 0.
    first: Vec<usize>,
    /// Whether every segment is one contiguous run, so `first` decides alone.
    contiguous: bool,
}

impl<'a> Visibility<'a> {
    fn new(mask: &'a AttentionMask, b: usize, t: usize, past: usize) -> Visibility<'a> {
        let mut first = vec![0; b * t];
        let (segments, mut contiguous) = match mask {
            AttentionMask::Causal => (None, true),
            AttentionMask::Packed(segments) => (Some(segments.as_slice()), true),
        };
        if let Some(segments) = segments {
            for row in 0..b {
                let ids = &segments[row * t..(row + 1) * t];
                let mut seen = std::collections::HashSet::new();
                let mut start = 0;
                for i in 0..t {
                    if i > 0 && ids[i] != ids[i - 1] {
                        start = i;
                        contiguous &= seen.insert(ids[i - 1]);
                    }
                    first[row * t + i] = start;
                }
                if t > 0 && seen.contains(&ids[t - 1]) {
                    contiguous = false;
                }
            }
        }
        Visibility {
            past,
            t,
            segments,
            first,
            contiguous,
        }
    }

    /// Keys `[lo, hi)` that some query of `i0..i1` (batch row `row`) may see.
    fn span(&self, row: usize, i0: usize, i1: usize) -> (usize, usize) {
        let lo = if self.contiguous {
            self.first[row * self.t + i0]
        } else {
            0
        };
        (lo, self.past + i1)
    }

    fn sees(&self, row: usize, i: usize, j: usize) -> bool {
        if j > self.past + i || (self.contiguous && j < self.first[row * self.t + i]) {
            return false;
        }
        match self.segments {
            Some(segments) if !self.contiguous => {
                segments[row * self.t + i] == segments[row * self.t + j]
            }
            _ => true,
        }
    }
}

/// Row-major `dst[m × n] (+)= beta · lhs · rhs` with explicit strides (`rs` between rows, `cs`
/// between columns), single-threaded: blocks are already spread over threads.
#[allow(clippy::too_many_arguments)]
unsafe fn block_product<T: Float + 'static>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const T,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const T,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: T,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::from_f64(1.0),
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// One unit of work: query rows `r0..r1` (all of one query head) of head pair `pair`
/// (`batch row × kv_heads + kv head`).
#[derive(Clone, Copy)]
struct Task {
    pair: usize,
    r0: usize,
    r1: usize,
}

/// Splits every head pair's rows into blocks that never cross a query head, grouped
/// into tasks: about four per thread in all, each within one pair.
fn tasks(pairs: usize, rows: usize, t: usize) -> Vec<Vec<Task>> {
    let per_pair = (4 * rayon::current_num_threads()).div_ceil(pairs.max(1));
    let mut blocks = Vec::new();
    for r0 in (0..rows).step_by(t) {
        for i0 in (0..t).step_by(BLOCK) {
            blocks.push((r0 + i0, r0 + (i0 + BLOCK).min(t)));
        }
    }
    let per_task = blocks.len().div_ceil(per_pair.max(1)).max(1);
    let mut out = Vec::new();
    for pair in 0..pairs {
        for chunk in blocks.chunks(per_task) {
            out.push(
                chunk
                    .iter()
                    .map(|&(r0, r1)| Task { pair, r0, r1 })
                    .collect(),
            );
        }
    }
    out
}

struct Shapes {
    kv_heads: usize,
    rows: usize,
    s: usize,
    d: usize,
}

impl FlashAttention {
    /// Scores of queries `r0..r1` against keys `j0..j1`, scaled and masked (hidden ones
    /// `-inf`), into `scores` (`[r1 - r0] × (j1 - j0)`, row stride `BLOCK`).
    #[allow(clippy::too_many_arguments)]
    fn scores<T: Float + 'static>(
        &self,
        vis: &Visibility,
        shapes: &Shapes,
        task: Task,
        q: &[T],
        k: &[T],
        j0: usize,
        j1: usize,
        scores: &mut [T],
    ) {
        let Shapes { kv_heads, d, .. } = *shapes;
        let row = task.pair / kv_heads;
        let (nq, nk) = (task.r1 - task.r0, j1 - j0);
        // Safety: the slices hold the rows and keys addressed (checked by the callers'
        // shapes), and `scores` has room for nq × BLOCK.
        // The scale is the product's factor: no pass over the block for it.
        unsafe {
            block_product(
                nq,
                nk,
                d,
                scores.as_mut_ptr(),
                BLOCK,
                false,
                q.as_ptr().add(task.r0 * d),
                d,
                1,
                k.as_ptr().add(j0 * d),
                1,
                d,
                T::from_f64(self.scale),
            );
        }
        let i0 = task.r0 % self.t;
        // Runs start in order, so the block's last query has the latest segment start.
        let all = vis.contiguous
            && j1 <= vis.past + i0 + 1
            && vis.first[row * self.t + i0 + nq - 1] <= j0;
        if all {
            return;
        }
        for (ii, line) in scores.chunks_mut(BLOCK).take(nq).enumerate() {
            for (jj, x) in line[..nk].iter_mut().enumerate() {
                if !vis.sees(row, i0 + ii, j0 + jj) {
                    *x = T::neg_infinity();
                }
            }
        }
    }

    fn forward<T: Float + 'static>(
        &self,
        vis: &Visibility,
        shapes: &Shapes,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> (Vec<T>, Vec<f64>) {
        use rayon::prelude::*;
        let Shapes {
            kv_heads,
            rows,
            s,
            d,
        } = *shapes;
        let work = tasks(q.len() / (rows * d).max(1), rows, self.t);
        // Per task and query block: the block's output rows and log-sum-exps.
        type Rows<T> = Vec<(Task, Vec<T>, Vec<f64>)>;
        let results: Vec<Rows<T>> = work
            .par_iter()
            .map(|blocks| {
                let mut scores = vec![T::zero(); BLOCK * BLOCK];
                blocks
                    .iter()
                    .map(|&task| {
                        let q = &q[task.pair * rows * d..(task.pair + 1) * rows * d];
                        let k = &k[task.pair * s * d..(task.pair + 1) * s * d];
                        let v = &v[task.pair * s * d..(task.pair + 1) * s * d];
                        let row = task.pair / kv_heads;
                        let nq = task.r1 - task.r0;
                        let i0 = task.r0 % self.t;
                        let mut acc = vec![T::zero(); nq * d];
                        let mut max = vec![T::neg_infinity(); nq];
                        let mut sum = vec![T::zero(); nq];
                        let (lo, hi) = vis.span(row, i0, i0 + nq);
                        for j0 in (lo - lo % BLOCK..hi).step_by(BLOCK) {
                            let j1 = (j0 + BLOCK).min(hi);
                            self.scores(vis, shapes, task, q, k, j0, j1, &mut scores);
                            let nk = j1 - j0;
                            for ii in 0..nq {
                                let line = &mut scores[ii * BLOCK..ii * BLOCK + nk];
                                let block_max =
                                    line.iter().fold(T::neg_infinity(), |m, &x| m.maximum(x));
                                let new_max = max[ii].maximum(block_max);
                                if new_max == T::neg_infinity() {
                                    line.iter_mut().for_each(|x| *x = T::zero());
                                    continue;
                                }
                                let correction = (max[ii] - new_max).exp();
                                // Exponentials, then their sum: each loop vectorises.
                                for x in line.iter_mut() {
                                    *x = (*x - new_max).exp_fast();
                                }
                                let block_sum = sum_in_lanes(line);
                                sum[ii] = sum[ii] * correction + block_sum;
                                max[ii] = new_max;
                                if correction != T::from_f64(1.0) {
                                    acc[ii * d..(ii + 1) * d]
                                        .iter_mut()
                                        .for_each(|a| *a = *a * correction);
                                }
                            }
                            // Safety: `acc` is nq × d, `scores` nq × BLOCK, `v` has keys j0..j1.
                            unsafe {
                                block_product(
                                    nq,
                                    d,
                                    nk,
                                    acc.as_mut_ptr(),
                                    d,
                                    true,
                                    scores.as_ptr(),
                                    BLOCK,
                                    1,
                                    v.as_ptr().add(j0 * d),
                                    d,
                                    1,
                                    T::from_f64(1.0),
                                );
                            }
                        }
                        let mut lse = Vec::with_capacity(nq);
                        for ii in 0..nq {
                            let inv = T::from_f64(1.0) / sum[ii];
                            acc[ii * d..(ii + 1) * d]
                                .iter_mut()
                                .for_each(|a| *a = *a * inv);
                            lse.push(max[ii].to_f64() + sum[ii].to_f64().ln());
                        }
                        (task, acc, lse)
                    })
                    .collect()
            })
            .collect();
        let mut out = vec![T::zero(); q.len()];
        let mut lse = vec![0.0; q.len() / d.max(1)];
        for (task, acc, l) in results.into_iter().flatten() {
            let base = task.pair * rows + task.r0;
            out[base * d..(base + task.r1 - task.r0) * d].copy_from_slice(&acc);
            lse[base..base + task.r1 - task.r0].copy_from_slice(&l);
        }
        (out, lse)
    }

    /// `(dq, dk, dv)` from the inputs, the output and its gradient.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Float + 'static>(
        &self,
        vis: &Visibility,
        shapes: &Shapes,
        q: &[T],
        k: &[T],
        v: &[T],
        out: &[T],
        grad: &[T],
        lse: &[f64],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        use rayon::prelude::*;
        let Shapes {
            kv_heads,
            rows,
            s,
            d,
        } = *shapes;
        let work = tasks(q.len() / (rows * d).max(1), rows, self.t);
        let scale = T::from_f64(self.scale);
        // Each task returns its queries' dq and its own partial dk, dv over all keys.
        type Partial<T> = (usize, Vec<(Task, Vec<T>)>, Vec<T>, Vec<T>);
        let results: Vec<Partial<T>> = work
            .par_iter()
            .map(|blocks| {
                let pair = blocks[0].pair;
                let q = &q[pair * rows * d..(pair + 1) * rows * d];
                let k = &k[pair * s * d..(pair + 1) * s * d];
                let v = &v[pair * s * d..(pair + 1) * s * d];
                let out = &out[pair * rows * d..(pair + 1) * rows * d];
                let grad = &grad[pair * rows * d..(pair + 1) * rows * d];
                let lse = &lse[pair * rows..(pair + 1) * rows];
                let row = pair / kv_heads;
                let mut dk = vec![T::zero(); s * d];
                let mut dv = vec![T::zero(); s * d];
                let mut probs = vec![T::zero(); BLOCK * BLOCK];
                let mut dp = vec![T::zero(); BLOCK * BLOCK];
                let mut dqs = Vec::with_capacity(blocks.len());
                for &task in blocks {
                    let nq = task.r1 - task.r0;
                    let i0 = task.r0 % self.t;
                    // rowsum(dO ∘ O) per query.
                    let dots: Vec<T> = (task.r0..task.r1)
                        .map(|r| {
                            let (g, o) = (&grad[r * d..(r + 1) * d], &out[r * d..(r + 1) * d]);
                            g.iter().zip(o).fold(T::zero(), |acc, (&a, &b)| acc + a * b)
                        })
                        .collect();
                    let mut dq = vec![T::zero(); nq * d];
                    let (lo, hi) = vis.span(row, i0, i0 + nq);
                    for j0 in (lo - lo % BLOCK..hi).step_by(BLOCK) {
                        let j1 = (j0 + BLOCK).min(hi);
                        let nk = j1 - j0;
                        self.scores(vis, shapes, task, q, k, j0, j1, &mut probs);
                        for ii in 0..nq {
                            let l = T::from_f64(lse[task.r0 + ii]);
                            probs[ii * BLOCK..ii * BLOCK + nk]
                                .iter_mut()
                                .for_each(|x| *x = (*x - l).exp_fast());
                        }
                        // Safety: block sizes as above; dk/dv/dq are this task's own.
                        unsafe {
                            // dv[j0..j1] += Pᵀ · dO
                            block_product(
                                nk,
                                d,
                                nq,
                                dv.as_mut_ptr().add(j0 * d),
                                d,
                                true,
                                probs.as_ptr(),
                                1,
                                BLOCK,
                                grad.as_ptr().add(task.r0 * d),
                                d,
                                1,
                                T::from_f64(1.0),
                            );
                            // dP = dO · Vᵀ
                            block_product(
                                nq,
                                nk,
                                d,
                                dp.as_mut_ptr(),
                                BLOCK,
                                false,
                                grad.as_ptr().add(task.r0 * d),
                                d,
                                1,
                                v.as_ptr().add(j0 * d),
                                1,
                                d,
                                T::from_f64(1.0),
                            );
                        }
                        // dS = P ∘ (dP − rowsum(dO ∘ O)) · scale
                        for ii in 0..nq {
                            let (p, g) = (
                                &probs[ii * BLOCK..ii * BLOCK + nk],
                                &mut dp[ii * BLOCK..ii * BLOCK + nk],
                            );
                            for (x, &pv) in g.iter_mut().zip(p) {
                                *x = pv * (*x - dots[ii]) * scale;
                            }
                        }
                        unsafe {
                            // dq += dS · K
                            block_product(
                                nq,
                                d,
                                nk,
                                dq.as_mut_ptr(),
                                d,
                                true,
                                dp.as_ptr(),
                                BLOCK,
                                1,
                                k.as_ptr().add(j0 * d),
                                d,
                                1,
                                T::from_f64(1.0),
                            );
                            // dk[j0..j1] += dSᵀ · Q
                            block_product(
                                nk,
                                d,
                                nq,
                                dk.as_mut_ptr().add(j0 * d),
                                d,
                                true,
                                dp.as_ptr(),
                                1,
                                BLOCK,
                                q.as_ptr().add(task.r0 * d),
                                d,
                                1,
                                T::from_f64(1.0),
                            );
                        }
                    }
                    dqs.push((task, dq));
                }
                (pair, dqs, dk, dv)
            })
            .collect();
        let mut dq = vec![T::zero(); q.len()];
        let mut dk = vec![T::zero(); k.len()];
        let mut dv = vec![T::zero(); v.len()];
        for (pair, dqs, pk, pv) in results {
            for (task, block) in dqs {
                let base = (pair * rows + task.r0) * d;
                dq[base..base + block.len()].copy_from_slice(&block);
            }
            let range = pair * s * d..(pair + 1) * s * d;
            for (acc, x) in dk[range.clone()].iter_mut().zip(pk) {
                *acc = *acc + x;
            }
            for (acc, x) in dv[range].iter_mut().zip(pv) {
                *acc = *acc + x;
            }
        }
        (dq, dk, dv)
    }
}

fn cpu_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a CpuStorage> {
    if layout.contiguous_offsets().is_none() {
        candle_core::bail!("attention: inputs must be contiguous")
    }
    Ok(storage)
}

/// The contiguous values of a CPU tensor of type `T`.
fn values_of<T: candle_core::WithDType>(tensor: &Tensor) -> Result<Vec<T>> {
    tensor.flatten_all()?.to_vec1::<T>()
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, kv_heads, rows, d) = q_layout.shape().dims4()?;
        let s = k_layout.shape().dims4()?.2;
        let shapes = Shapes {
            kv_heads,
            rows,
            s,
            d,
        };
        let vis = Visibility::new(&self.mask, b, self.t, self.past);
        let range = |l: &Layout| {
            let (start, end) = l.contiguous_offsets().expect("checked");
            start..end
        };
        let (q, k, v) = (
            cpu_slice(q, q_layout)?,
            cpu_slice(k, k_layout)?,
            cpu_slice(v, v_layout)?,
        );
        // The forward pass over the three inputs' values, each mapped by `$map`.
        macro_rules! forward {
            ($q:expr, $k:expr, $v:expr, $map:expr) => {
                self.forward(
                    &vis,
                    &shapes,
                    &$map(&$q[range(q_layout)]),
                    &$map(&$k[range(k_layout)]),
                    &$map(&$v[range(v_layout)]),
                )
            };
        }
        let (out, lse) = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (out, lse) = forward!(q, k, v, |s| s);
                (CpuStorage::F32(out), lse)
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (out, lse) = forward!(q, k, v, |s| s);
                (CpuStorage::F64(out), lse)
            }
            // bf16 is widened to f32 for the arithmetic, as the composed path would.
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                let widen = |s: &[half::bf16]| s.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
                let (out, lse) = forward!(q, k, v, widen);
                let out = out.into_iter().map(half::bf16::from_f32).collect();
                (CpuStorage::BF16(out), lse)
            }
            _ => candle_core::bail!("attention: q, k and v must all be f32, f64 or bf16"),
        };
        *self.log_sum_exp.lock().expect("not poisoned") = lse;
        Ok((out, q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, kv_heads, rows, d) = q.dims4()?;
        let s = k.dim(2)?;
        let shapes = Shapes {
            kv_heads,
            rows,
            s,
            d,
        };
        let vis = Visibility::new(&self.mask, b, self.t, self.past);
        let lse = self.log_sum_exp.lock().expect("not poisoned");
        let device = q.device();
        macro_rules! run {
            ($t:ty) => {{
                let (dq, dk, dv) = self.backward(
                    &vis,
                    &shapes,
                    &values_of::<$t>(q)?,
                    &values_of::<$t>(k)?,
                    &values_of::<$t>(v)?,
                    &values_of::<$t>(out)?,
                    &values_of::<$t>(&grad.to_dtype(q.dtype())?)?,
                    &lse,
                );
                (
                    Tensor::from_vec(dq, q.shape(), device)?,
                    Tensor::from_vec(dk, k.shape(), device)?,
                    Tensor::from_vec(dv, v.shape(), device)?,
                )
            }};
        }
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            DType::BF16 => {
                let wide = |t: &Tensor| values_of::<f32>(&t.to_dtype(DType::F32)?);
                let (dq, dk, dv) = self.backward(
                    &vis,
                    &shapes,
                    &wide(q)?,
                    &wide(k)?,
                    &wide(v)?,
                    &wide(out)?,
                    &wide(grad)?,
                    &lse,
                );
                let narrow = |values: Vec<f32>, like: &Tensor| {
                    Tensor::from_vec(values, like.shape(), device)?.to_dtype(DType::BF16)
                };
                (narrow(dq, q)?, narrow(dk, k)?, narrow(dv, v)?)
            }
            other => candle_core::bail!("attention: f32, f64 or bf16 only, not {other:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The shape of a blockwise pass on plain values (the CPU decoder layer, which keeps no
/// graph): `q: [b, kv_heads, rows, d]`, `k`, `v`: `[b, kv_heads, s, d]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct BlockwiseShape {
    pub b: usize,
    pub kv_heads: usize,
    pub rows: usize,
    pub s: usize,
    pub d: usize,
    pub scale: f64,
}

impl BlockwiseShape {
    fn parts<'a>(&self, mask: &'a Prepared) -> (FlashAttention, Visibility<'a>, Shapes) {
        let shapes = Shapes {
            kv_heads: self.kv_heads,
            rows: self.rows,
            s: self.s,
            d: self.d,
        };
        (
            blockwise(mask, self.scale),
            Visibility::new(mask.rule, self.b, mask.t, mask.past),
            shapes,
        )
    }
}

/// The blockwise op's forward pass on plain values: the output and each query's
/// log-sum-exp.
pub(super) fn blockwise_forward(
    mask: &Prepared,
    shape: BlockwiseShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f32>, Vec<f64>) {
    let (op, vis, shapes) = shape.parts(mask);
    op.forward(&vis, &shapes, q, k, v)
}

/// The gradients `(dq, dk, dv)` of [`blockwise_forward`] from its inputs, output,
/// log-sum-exps and the output's gradient.
#[allow(clippy::too_many_arguments)]
pub(super) fn blockwise_backward(
    mask: &Prepared,
    shape: BlockwiseShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    grad: &[f32],
    lse: &[f64],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (op, vis, shapes) = shape.parts(mask);
    op.backward(&vis, &shapes, q, k, v, out, grad, lse)
}

impl Prepared<'_> {
    /// Whether attention runs as the blockwise CPU op (no additive mask, no CUDA kernel).
    pub(super) fn is_blockwise(&self) -> bool {
        self.additive.is_none() && !self.kernel
    }
}

fn blockwise(mask: &Prepared, scale: f64) -> FlashAttention {
    FlashAttention {
        scale,
        t: mask.t,
        past: mask.past,
        mask: mask.rule.clone(),
        log_sum_exp: Mutex::new(Vec::new()),
    }
}
