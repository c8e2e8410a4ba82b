//! One decoder layer's forward and backward passes on the CPU in f32, without a graph.
//!
//! The checkpointed training step runs every layer forward once, then again in the
//! backward pass with its gradient. Through candle's autograd the bookkeeping costs more
//! than the arithmetic: every node's gradient is accumulated into a freshly zeroed tensor,
//! each LoRA update is half a dozen nodes beside its frozen product, and every elementwise
//! pass allocates. Here the layer is written out by hand: the products go straight to
//! `gemm` (a transpose is a swap of strides, an update is accumulated into the output it
//! belongs to), dropout masks are drawn again from their keys instead of being kept, and
//! the backward pass holds one layer's activations. The gradients are the graph's: the
//! tests compare them with `checkpointing: none`, whose graph is checked against f64
//! finite differences.

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use super::num_float::exp_f32;
use super::{attention, lora::peft_key, rng, Context, DropoutKey, Llama, Lora, Target};

/// Rows per parallel chunk of the elementwise passes.
const ROWS_PER_TASK: usize = 32;

/// Whether [`forward`] and [`backward`] can run this model, adapter and context: f32
/// weights and adapter on the CPU with the blockwise attention op.
pub fn supported(model: &Llama, lora: &Lora, context: &Context) -> bool {
    super::fused_cpu(&model.device)
        && model.dtype == DType::F32
        && lora.dtype() == DType::F32
        && context.mask.is_blockwise()
}

/// What [`forward`] keeps of one layer for [`backward`] when asked to: about a fifth of
/// the values the graph would keep (the norms' outputs, the attention output's copy and
/// the MLP's product are recomputed from what is kept; dropout masks are kept as bits).
pub struct Activations(Saved);

/// Layer `layer`'s output for `x: [batch, seq, hidden]` with the adapter in training mode
/// (dropout masks of `key`): the same values as [`Llama::decoder_layer`]. With `keep`,
/// also what [`backward`] needs, so that it does not run the layer again.
pub fn forward(
    model: &Llama,
    lora: &Lora,
    layer: usize,
    x: &Tensor,
    context: &Context,
    key: DropoutKey,
    keep: bool,
) -> Result<(Tensor, Option<Activations>)> {
    let pass = Pass::new(model, lora, layer, x, context, key)?;
    let input = values(x)?;
    let (y, saved) = pass.forward(input.get())?;
    let y = Tensor::from_vec(y, x.shape(), &Device::Cpu)?;
    Ok((y, keep.then_some(Activations(saved))))
}

/// Back-propagates `upstream` (the gradient of layer `layer`'s output) through the layer
/// on input `x`, from `kept` activations or by running the layer again: adds the
/// gradients of its LoRA matrices to `grads` (by PEFT key) and returns the gradient of
/// `x` when `input_gradient` is set.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    model: &Llama,
    lora: &Lora,
    layer: usize,
    x: &Tensor,
    context: &Context,
    key: DropoutKey,
    kept: Option<Activations>,
    upstream: &Tensor,
    input_gradient: bool,
    grads: &mut HashMap<String, Tensor>,
) -> Result<Option<Tensor>> {
    let pass = Pass::new(model, lora, layer, x, context, key)?;
    let input = values(x)?;
    let saved = match kept {
        Some(Activations(saved)) => saved,
        None => pass.forward(input.get())?.1,
    };
    let upstream = upstream.to_dtype(DType::F32)?.contiguous()?;
    let dy = values(&upstream)?;
    let dx = pass.backward(input.get(), saved, dy.get(), input_gradient, grads)?;
    dx.map(|dx| Tensor::from_vec(dx, x.shape(), &Device::Cpu))
        .transpose()
}

/// A CPU f32 tensor's contiguous values, borrowed for as long as this lives.
pub(crate) struct Values<'a> {
    guard: Box<dyn std::ops::Deref<Target = Storage> + 'a>,
    start: usize,
    len: usize,
}

impl Values<'_> {
    pub(crate) fn get(&self) -> &[f32] {
        match &**self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.start + self.len],
            _ => unreachable!("checked by values()"),
        }
    }
}

pub(crate) fn values(tensor: &Tensor) -> Result<Values<'_>> {
    let (guard, layout) = tensor.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("cpu layer: a {:?} tensor is not contiguous", tensor.dims())
    };
    if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
        candle_core::bail!("cpu layer: f32 tensors on the CPU only")
    }
    Ok(Values {
        guard: Box::new(guard),
        start,
        len: end - start,
    })
}

/// A row-major matrix, or a transposed view of one (strides between rows and columns).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    pub(crate) fn t(self) -> Mat<'a> {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// `dst = beta · a · b`, or `dst += beta · a · b` when `accumulate`; `dst` is row-major.
pub(crate) fn product(dst: &mut [f32], a: Mat, b: Mat, accumulate: bool, beta: f32) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(k, b.rows, "inner dimensions");
    assert!(dst.len() >= m * n, "destination of {m} x {n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    for x in [a, b] {
        assert!((x.rows - 1) * x.row_stride + (x.cols - 1) * x.col_stride < x.data.len());
    }
    // Safety: every index the product reads or writes is within the slices (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

/// `dst += src`, in parallel.
fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
}

/// What the backward pass needs from the forward pass.
struct Saved {
    /// `1/√(mean(x²) + ε)` per token, before attention and before the MLP.
    r1: Vec<f32>,
    r2: Vec<f32>,
    /// Each adapted projection's dropout mask (bit set = kept) and its scaled rank-r
    /// intermediate `s · dropout(input) · Aᵀ`.
    masks: [Option<Vec<u64>>; 7],
    lora_mid: [Option<Vec<f32>>; 7],
    /// Rotated queries and keys and the values, `[batch, heads, seq, dim]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention's output in the same layout, and per query its log-sum-exp.
    o: Vec<f32>,
    lse: Vec<f64>,
    /// The residual stream after attention.
    h: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

/// One layer's weights, adapter and shapes for one pass.
struct Pass<'a> {
    model: &'a Llama,
    lora: &'a Lora,
    layer: usize,
    context: &'a Context<'a>,
    key: DropoutKey,
    batch: usize,
    seq: usize,
    tokens: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
    intermediate: usize,
}

impl<'a> Pass<'a> {
    fn new(
        model: &'a Llama,
        lora: &'a Lora,
        layer: usize,
        x: &Tensor,
        context: &'a Context<'a>,
        key: DropoutKey,
    ) -> Result<Pass<'a>> {
        let (batch, seq, hidden) = x.dims3()?;
        let c = &model.config;
        if hidden != c.hidden_size || !supported(model, lora, context) {
            candle_core::bail!(
                "cpu layer: unsupported model, adapter or input {:?}",
                x.dims()
            )
        }
        Ok(Pass {
            model,
            lora,
            layer,
            context,
            key,
            batch,
            seq,
            tokens: batch * seq,
            hidden,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            dim: c.head_dim(),
            intermediate: c.intermediate_size,
        })
    }

    fn weight(&self, target: Target) -> Result<Values<'a>> {
        values(&self.model.layers[self.layer].projections[target as usize])
    }

    /// The dropout mask of this layer's `target` for `n` values, or `None` without
    /// dropout or adapter.
    fn mask(&self, target: Target, n: usize) -> Option<Vec<u64>> {
        let p = self.lora.config.dropout as f32;
        self.lora.layers[self.layer][target as usize].as_ref()?;
        (p > 0.0).then(|| {
            let key = [
                self.key.step,
                self.key.micro_batch,
                self.layer as u64,
                target as u64,
            ];
            rng::dropout_bits(self.key.seed, &key, n, p)
        })
    }

    /// `values` after inverted dropout with `mask`.
    fn dropped<'x>(&self, mask: Option<&[u64]>, values: &'x [f32]) -> Cow<'x, [f32]> {
        let Some(mask) = mask else {
            return Cow::Borrowed(values);
        };
        let mut out = values.to_vec();
        self.drop_in_place(mask, &mut out);
        Cow::Owned(out)
    }

    fn drop_in_place(&self, mask: &[u64], values: &mut [f32]) {
        let keep = 1.0 / (1.0 - self.lora.config.dropout as f32);
        values
            .par_chunks_mut(1 << 14)
            .zip(mask.par_chunks((1 << 14) / 64))
            .for_each(|(values, words)| {
                for (i, v) in values.iter_mut().enumerate() {
                    *v = if words[i / 64] >> (i % 64) & 1 == 1 {
                        *v * keep
                    } else {
                        0.0
                    };
                }
            });
    }

    /// `input · Wᵀ` plus the adapter's update; the update's rank-r intermediate is kept
    /// for the backward pass.
    fn project(
        &self,
        target: Target,
        input: &[f32],
        mask: Option<&[u64]>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let (out_dim, in_dim) = self.model.config.projection_shape(target);
        let m = self.tokens;
        let w = self.weight(target)?;
        let mut out = vec![0f32; m * out_dim];
        product(
            &mut out,
            Mat::new(input, m, in_dim),
            Mat::new(w.get(), out_dim, in_dim).t(),
            false,
            1.0,
        );
        let Some(pair) = &self.lora.layers[self.layer][target as usize] else {
            return Ok((out, None));
        };
        let (a, b) = (values(pair.a.as_tensor())?, values(pair.b.as_tensor())?);
        let r = self.lora.config.r;
        let dropped = self.dropped(mask, input);
        let mut mid = vec![0f32; m * r];
        product(
            &mut mid,
            Mat::new(&dropped, m, in_dim),
            Mat::new(a.get(), r, in_dim).t(),
            false,
            self.lora.scale() as f32,
        );
        product(
            &mut out,
            Mat::new(&mid, m, r),
            Mat::new(b.get(), out_dim, r).t(),
            true,
            1.0,
        );
        Ok((out, Some(mid)))
    }

    /// The backward pass of [`Pass::project`]: writes (or with `accumulate`, adds) the
    /// gradient of `input` into `d_input` and adds the adapter's gradients to `grads`.
    #[allow(clippy::too_many_arguments)]
    fn project_backward(
        &self,
        target: Target,
        input: &[f32],
        mask: Option<&[u64]>,
        mid: Option<&[f32]>,
        d_out: &[f32],
        d_input: &mut [f32],
        accumulate: bool,
        grads: &mut HashMap<String, Tensor>,
    ) -> Result<()> {
        let (out_dim, in_dim) = self.model.config.projection_shape(target);
        let m = self.tokens;
        let w = self.weight(target)?;
        product(
            d_input,
            Mat::new(d_out, m, out_dim),
            Mat::new(w.get(), out_dim, in_dim),
            accumulate,
            1.0,
        );
        let (Some(pair), Some(mid)) = (&self.lora.layers[self.layer][target as usize], mid) else {
            return Ok(());
        };
        let (a, b) = (values(pair.a.as_tensor())?, values(pair.b.as_tensor())?);
        let r = self.lora.config.r;
        let scale = self.lora.scale() as f32;
        // dB = d_outᵀ · mid
        let mut d_b = vec![0f32; out_dim * r];
        product(
            &mut d_b,
            Mat::new(d_out, m, out_dim).t(),
            Mat::new(mid, m, r),
            false,
            1.0,
        );
        // d_mid = d_out · B, then dA = s · d_midᵀ · dropout(input)
        let mut d_mid = vec![0f32; m * r];
        product(
            &mut d_mid,
            Mat::new(d_out, m, out_dim),
            Mat::new(b.get(), out_dim, r),
            false,
            1.0,
        );
        let mut d_a = vec![0f32; r * in_dim];
        {
            let dropped = self.dropped(mask, input);
            product(
                &mut d_a,
                Mat::new(&d_mid, m, r).t(),
                Mat::new(&dropped, m, in_dim),
                false,
                scale,
            );
        }
        // d_input += dropout(s · d_mid · A), the same mask as the forward pass.
        if let Some(mask) = mask {
            let mut d_dropped = vec![0f32; m * in_dim];
            product(
                &mut d_dropped,
                Mat::new(&d_mid, m, r),
                Mat::new(a.get(), r, in_dim),
                false,
                scale,
            );
            self.drop_in_place(mask, &mut d_dropped);
            add_into(d_input, &d_dropped);
        } else {
            product(
                d_input,
                Mat::new(&d_mid, m, r),
                Mat::new(a.get(), r, in_dim),
                true,
                scale,
            );
        }
        let device = &Device::Cpu;
        add_gradient(
            grads,
            peft_key(self.layer, target, 'A'),
            Tensor::from_vec(d_a, (r, in_dim), device)?,
        )?;
        add_gradient(
            grads,
            peft_key(self.layer, target, 'B'),
            Tensor::from_vec(d_b, (out_dim, r), device)?,
        )
    }

    fn forward(&self, x: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let weights = &self.model.layers[self.layer];
        let eps = self.model.config.rms_norm_eps;
        let m = self.tokens;
        let (n1, r1) = super::rms_norm_rows_scaled(x, values(&weights.input_norm)?.get(), eps);
        let mut masks: [Option<Vec<u64>>; 7] = Default::default();
        let mut lora_mid: [Option<Vec<f32>>; 7] = Default::default();
        let mut project = |target: Target, input: &[f32]| -> Result<Vec<f32>> {
            let mask = self.mask(target, input.len());
            let (out, mid) = self.project(target, input, mask.as_deref())?;
            masks[target as usize] = mask;
            lora_mid[target as usize] = mid;
            Ok(out)
        };
        let q_lin = project(Target::Q, &n1)?;
        let k_lin = project(Target::K, &n1)?;
        let v_lin = project(Target::V, &n1)?;
        drop(n1);
        let cos = values(&self.context.cos)?;
        let sin = values(&self.context.sin)?;
        let rotary = Some((cos.get(), sin.get()));
        let q = self.head_major(&q_lin, self.heads, rotary);
        let k = self.head_major(&k_lin, self.kv_heads, rotary);
        let v = self.head_major(&v_lin, self.kv_heads, None);
        drop((q_lin, k_lin, v_lin));
        let (o, lse) = self.attention_forward(&q, &k, &v);
        let attended = self.token_major(&o, self.heads, None);
        let mut h = project(Target::O, &attended)?;
        drop(attended);
        add_into(&mut h, x);
        let (n2, r2) =
            super::rms_norm_rows_scaled(&h, values(&weights.post_attention_norm)?.get(), eps);
        let gate = project(Target::Gate, &n2)?;
        let up = project(Target::Up, &n2)?;
        drop(n2);
        let act = silu_product(&gate, &up);
        let mut y = project(Target::Down, &act)?;
        drop(act);
        add_into(&mut y, &h);
        debug_assert_eq!(y.len(), m * self.hidden);
        Ok((
            y,
            Saved {
                r1,
                r2,
                masks,
                lora_mid,
                q,
                k,
                v,
                o,
                lse,
                h,
                gate,
                up,
            },
        ))
    }

    fn attention_shape(&self) -> attention::BlockwiseShape {
        attention::BlockwiseShape {
            b: self.batch,
            kv_heads: self.kv_heads,
            rows: self.heads / self.kv_heads * self.seq,
            s: self.seq,
            d: self.dim,
            scale: 1.0 / (self.dim as f64).sqrt(),
        }
    }

    fn attention_forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f64>) {
        attention::blockwise_forward(&self.context.mask, self.attention_shape(), q, k, v)
    }

    fn backward(
        &self,
        x: &[f32],
        saved: Saved,
        dy: &[f32],
        input_gradient: bool,
        grads: &mut HashMap<String, Tensor>,
    ) -> Result<Option<Vec<f32>>> {
        let weights = &self.model.layers[self.layer];
        let (m, hidden, d) = (self.tokens, self.hidden, self.dim);
        let Saved {
            r1,
            r2,
            masks,
            lora_mid,
            q,
            k,
            v,
            o,
            lse,
            h,
            gate,
            up,
        } = saved;
        let mask = |t: Target| masks[t as usize].as_deref();
        let mid = |t: Target| lora_mid[t as usize].as_deref();
        // MLP: y = h + down(silu(gate) · up)
        let mut d_act = vec![0f32; m * self.intermediate];
        {
            let act = silu_product(&gate, &up);
            self.project_backward(
                Target::Down,
                &act,
                mask(Target::Down),
                mid(Target::Down),
                dy,
                &mut d_act,
                false,
                grads,
            )?;
        }
        // d_up = d_act · silu(g); d_gate = d_act · up · σ(g) · (1 + g · (1 − σ(g)))
        let mut d_up = d_act;
        let mut d_gate = vec![0f32; m * self.intermediate];
        d_up.par_chunks_mut(1 << 14)
            .zip(d_gate.par_chunks_mut(1 << 14))
            .zip(gate.par_chunks(1 << 14).zip(up.par_chunks(1 << 14)))
            .for_each(|((du, dg), (g, u))| {
                for (((du, dg), &g), &u) in du.iter_mut().zip(dg).zip(g).zip(u) {
                    let sigmoid = 1.0 / (1.0 + exp_f32(-g));
                    let da = *du;
                    *du = da * g * sigmoid;
                    *dg = da * u * sigmoid * (1.0 + g * (1.0 - sigmoid));
                }
            });
        drop((gate, up));
        let post_norm = values(&weights.post_attention_norm)?;
        let mut d_n2 = vec![0f32; m * hidden];
        {
            let n2 = rms_apply(&h, &r2, post_norm.get());
            for (target, grad, accumulate) in
                [(Target::Gate, &d_gate, false), (Target::Up, &d_up, true)]
            {
                self.project_backward(
                    target,
                    &n2,
                    mask(target),
                    mid(target),
                    grad,
                    &mut d_n2,
                    accumulate,
                    grads,
                )?;
            }
        }
        drop((d_gate, d_up));
        let mut d_h = dy.to_vec();
        rms_backward(&h, &r2, post_norm.get(), &d_n2, &mut d_h);
        drop((d_n2, h));
        // Attention: h = x + o_proj(attention(rotate(q), rotate(k), v))
        let mut d_attended = vec![0f32; m * self.heads * d];
        {
            let attended = self.token_major(&o, self.heads, None);
            self.project_backward(
                Target::O,
                &attended,
                mask(Target::O),
                mid(Target::O),
                &d_h,
                &mut d_attended,
                false,
                grads,
            )?;
        }
        let d_o = self.head_major(&d_attended, self.heads, None);
        drop(d_attended);
        let (d_q, d_k, d_v) = attention::blockwise_backward(
            &self.context.mask,
            self.attention_shape(),
            &q,
            &k,
            &v,
            &o,
            &d_o,
            &lse,
        );
        drop((d_o, q, k, v, o, lse));
        let cos = values(&self.context.cos)?;
        let sin = values(&self.context.sin)?;
        let rotary = Some((cos.get(), sin.get()));
        let input_norm = values(&weights.input_norm)?;
        let n1 = rms_apply(x, &r1, input_norm.get());
        let mut d_n1 = vec![0f32; m * hidden];
        for (target, grad, heads, rotary, accumulate) in [
            (Target::Q, d_q, self.heads, rotary, false),
            (Target::K, d_k, self.kv_heads, rotary, true),
            (Target::V, d_v, self.kv_heads, None, true),
        ] {
            let d_lin = self.token_major(&grad, heads, rotary);
            drop(grad);
            self.project_backward(
                target,
                &n1,
                mask(target),
                mid(target),
                &d_lin,
                &mut d_n1,
                accumulate,
                grads,
            )?;
        }
        if !input_gradient {
            return Ok(None);
        }
        let mut d_x = d_h;
        rms_backward(x, &r1, input_norm.get(), &d_n1, &mut d_x);
        Ok(Some(d_x))
    }

    /// `[tokens, heads · dim]` to `[batch, heads, seq, dim]`, rotated by `rotary`
    /// (`cos`, `sin`: `[tokens, dim / 2]`) in the Hugging Face layout (first half / second
    /// half of each head).
    fn head_major(&self, lin: &[f32], heads: usize, rotary: Option<(&[f32], &[f32])>) -> Vec<f32> {
        let (t, d) = (self.seq, self.dim);
        let half = d / 2;
        let mut out = vec![0f32; lin.len()];
        out.par_chunks_mut(t * d).enumerate().for_each(|(bh, dst)| {
            let (b, head) = (bh / heads, bh % heads);
            for i in 0..t {
                let token = b * t + i;
                let src = &lin[(token * heads + head) * d..][..d];
                let o = &mut dst[i * d..][..d];
                match rotary {
                    Some((cos, sin)) => {
                        let (c, s) = (&cos[token * half..][..half], &sin[token * half..][..half]);
                        for j in 0..half {
                            let (x1, x2) = (src[j], src[j + half]);
                            o[j] = x1 * c[j] - x2 * s[j];
                            o[j + half] = x2 * c[j] + x1 * s[j];
                        }
                    }
                    None => o.copy_from_slice(src),
                }
            }
        });
        out
    }

    /// The inverse layout change of [`Pass::head_major`]; with `rotary`, the rotation's
    /// transpose (the gradient of a rotated value).
    fn token_major(&self, att: &[f32], heads: usize, rotary: Option<(&[f32], &[f32])>) -> Vec<f32> {
        let (t, d) = (self.seq, self.dim);
        let half = d / 2;
        let mut lin = vec![0f32; att.len()];
        lin.par_chunks_mut(heads * d)
            .enumerate()
            .for_each(|(token, dst)| {
                let (b, i) = (token / t, token % t);
                for head in 0..heads {
                    let src = &att[((b * heads + head) * t + i) * d..][..d];
                    let o = &mut dst[head * d..][..d];
                    match rotary {
                        Some((cos, sin)) => {
                            let (c, s) =
                                (&cos[token * half..][..half], &sin[token * half..][..half]);
                            for j in 0..half {
                                let (g1, g2) = (src[j], src[j + half]);
                                o[j] = g1 * c[j] + g2 * s[j];
                                o[j + half] = g2 * c[j] - g1 * s[j];
                            }
                        }
                        None => o.copy_from_slice(src),
                    }
                }
            });
        lin
    }
}

/// The normed rows again from the rows and their scales: the values of
/// [`super::rms_norm_rows_scaled`].
fn rms_apply(x: &[f32], scales: &[f32], weight: &[f32]) -> Vec<f32> {
    let dim = weight.len();
    let mut out = x.to_vec();
    out.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(scales.par_chunks(ROWS_PER_TASK))
        .for_each(|(rows, scales)| {
            for (row, &r) in rows.chunks_mut(dim).zip(scales) {
                for (v, &w) in row.iter_mut().zip(weight) {
                    *v = *v * r * w;
                }
            }
        });
    out
}

/// `silu(gate) · up`, with candle's `silu(x) = x / (1 + e^−x)`.
fn silu_product(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut act = vec![0f32; gate.len()];
    act.par_chunks_mut(1 << 14)
        .zip(gate.par_chunks(1 << 14).zip(up.par_chunks(1 << 14)))
        .for_each(|(a, (g, u))| {
            for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                *a = g / (1.0 + exp_f32(-g)) * u;
            }
        });
    act
}

/// Adds the gradient of RMS norm's input to `d_x`:
/// `r·(g∘w) − x·r³·mean(g∘w∘x)` per row.
fn rms_backward(x: &[f32], scales: &[f32], weight: &[f32], d_out: &[f32], d_x: &mut [f32]) {
    let dim = weight.len();
    d_x.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(x.par_chunks(dim * ROWS_PER_TASK))
        .zip(
            d_out
                .par_chunks(dim * ROWS_PER_TASK)
                .zip(scales.par_chunks(ROWS_PER_TASK)),
        )
        .for_each(|((dx, x), (g, scales))| {
            for (((dx, x), g), &r) in dx
                .chunks_mut(dim)
                .zip(x.chunks(dim))
                .zip(g.chunks(dim))
                .zip(scales)
            {
                let dot = x
                    .iter()
                    .zip(g)
                    .zip(weight)
                    .fold(0f32, |acc, ((&x, &g), &w)| acc + g * w * x)
                    / dim as f32;
                let coefficient = dot * r * r * r;
                for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(weight) {
                    *dx += g * w * r - x * coefficient;
                }
            }
        });
}

/// Adds `g` to the gradient kept under `key` in `grads` (or keeps it there).
pub(crate) fn add_gradient(
    grads: &mut HashMap<String, Tensor>,
    key: String,
    g: Tensor,
) -> Result<()> {
    let sum = match grads.remove(&key) {
        Some(sum) => (sum + g)?,
        None => g,
    };
    grads.insert(key, sum);
    Ok(())
}
