//! A decoder layer's forward and backward passes written out with tensor ops, without
//! candle's autograd graph: the path a CUDA device trains on.
//!
//! The graph path pays for every use of a tensor in the backward pass with a zero-filled
//! gradient and an addition, for the loss-injection trick with a one-block reduction, and
//! it keeps every intermediate alive until the graph is dropped. On an H200, 1B model, one
//! layer's backward was 384 kernels of which matrix products were 7 of 44 ms. Here the
//! backward is the chain rule written once: the frozen products through cuBLAS, the
//! masked softmax and RMS norm through corpusdb's kernels, dropout redrawn from its key,
//! and each gradient formed where it is needed. The same code runs on the CPU (composed
//! attention), where tests hold it to the graph's gradients.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};

use super::{attention, lora::peft_key, rotate, Context, DropoutKey, Llama, Lora, Target};

/// Whether [`forward`] and [`backward`] run this model and adapter on this context: bf16
/// or f32 weights, an f32 adapter, and attention through corpusdb's CUDA kernels or the
/// composed ops (CUDA without its kernels, or the CPU emulating the GPU's paths with
/// [`super::set_composed_ops`]). The CPU's own path is [`super::cpu_layer`].
pub fn supported(model: &Llama, lora: &Lora, context: &Context) -> bool {
    matches!(model.dtype, DType::BF16 | DType::F32)
        && lora.dtype() == DType::F32
        && context.mask.keeps_probabilities()
}

/// What [`forward`] keeps of one layer for [`backward`].
pub struct Activations {
    /// The attention block's normed input (the q, k and v adapters' input).
    normed_attention: Tensor,
    /// Rotated queries `[b, kv_heads, group × t, d]`, rotated keys and values
    /// `[b, kv_heads, t, d]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// What attention's backward pass needs: the probabilities
    /// `[b, kv_heads, group × t, t]`, or the flash kernels' output and log-sum-exp.
    attention: attention::Kept,
    /// The attention output `[m, hidden]` (the o projection's input).
    attended: Tensor,
    /// The residual stream after attention `[m, hidden]`.
    mid: Tensor,
    /// The MLP's normed input.
    normed_mlp: Tensor,
    gate: Tensor,
    up: Tensor,
    /// `silu(gate) · up` (the down projection's input).
    product: Tensor,
    /// Per target, the adapter's `dropout(x)·Aᵀ` `[m, r]` (f32).
    down: [Option<Tensor>; 7],
}

struct Pass<'a> {
    model: &'a Llama,
    lora: &'a Lora,
    layer: usize,
    context: &'a Context<'a>,
    key: DropoutKey,
}

/// Layer `layer`'s output for `x: [batch, seq, hidden]` with the adapter in training mode
/// (dropout masks of `key`): the values of [`Llama::decoder_layer`]. With `keep`, also
/// what [`backward`] needs, so that it does not run the layer again.
pub fn forward(
    model: &Llama,
    lora: &Lora,
    layer: usize,
    x: &Tensor,
    context: &Context,
    key: DropoutKey,
    keep: bool,
) -> Result<(Tensor, Option<Activations>)> {
    let pass = Pass {
        model,
        lora,
        layer,
        context,
        key,
    };
    let (y, kept) = pass.forward(x)?;
    Ok((y, keep.then_some(kept)))
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
    let pass = Pass {
        model,
        lora,
        layer,
        context,
        key,
    };
    let kept = match kept {
        Some(kept) => kept,
        None => pass.forward(x)?.1,
    };
    pass.backward(x, kept, upstream, input_gradient, grads)
}

/// The sizes a layer pass works with: batch rows, tokens per row, hidden width, tokens in
/// all (`m = b·t`), query and key/value heads, head width, query heads per key/value head.
struct Shape {
    b: usize,
    t: usize,
    h: usize,
    m: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
    group: usize,
}

impl Pass<'_> {
    fn shape(&self, x: &Tensor) -> Result<Shape> {
        let config = &self.model.config;
        let (b, t, h) = x.dims3()?;
        let (heads, kv_heads) = (config.num_attention_heads, config.kv_heads());
        Ok(Shape {
            b,
            t,
            h,
            m: b * t,
            heads,
            kv_heads,
            dim: config.head_dim(),
            group: heads / kv_heads,
        })
    }

    fn weight(&self, target: Target) -> &Tensor {
        &self.model.layers[self.layer].projections[target as usize]
    }

    /// The adapter's `A` and `B` for `target` as plain tensors (no graph is recorded).
    fn pair(&self, target: Target) -> Option<(Tensor, Tensor)> {
        self.lora.layers[self.layer][target as usize]
            .as_ref()
            .map(|pair| (pair.a.as_tensor().detach(), pair.b.as_tensor().detach()))
    }

    fn dropout_key(&self, target: Target) -> [u64; 4] {
        [
            self.key.step,
            self.key.micro_batch,
            self.layer as u64,
            target as u64,
        ]
    }

    /// Inverted dropout of `x` (f32) with `target`'s mask; the same call on a gradient is
    /// the gradient through it.
    fn dropout(&self, target: Target, x: &Tensor) -> Result<Tensor> {
        let p = self.lora.config.dropout as f32;
        if p <= 0.0 {
            return Ok(x.clone());
        }
        super::lora::keyed_dropout(x, self.key.seed, self.dropout_key(target), p)
    }

    /// The adapter's input for `target`: `x` (any float dtype) in f32 with `target`'s
    /// dropout mask, without an f32 copy of `x` first where the device can.
    fn dropped(&self, target: Target, x: &Tensor) -> Result<Tensor> {
        let p = self.lora.config.dropout as f32;
        if p <= 0.0 {
            return x.to_dtype(DType::F32);
        }
        super::lora::keyed_dropout_f32(x, self.key.seed, self.dropout_key(target), p)
    }

    /// `x·Wᵀ` plus the adapter's update for `x: [m, in]`; returns the output and the
    /// adapter's rank-r intermediate `dropout(x)·Aᵀ` (f32).
    fn project(&self, target: Target, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let base = x.matmul(&self.weight(target).t()?)?;
        let Some((a, b)) = self.pair(target) else {
            return Ok((base, None));
        };
        let down = self.dropped(target, x)?.matmul(&a.t()?)?;
        // The graph's order of operations, so that both paths compute the same values.
        let delta = (&down * self.lora.scale())?.matmul(&b.t()?)?;
        let y = plus_adapter(base, Some(delta))?;
        Ok((y, Some(down)))
    }

    /// The backward pass of [`Pass::project`] for the output gradient `dy: [m, out]`: adds
    /// the gradients of `A` and `B` to `grads` and, with `input`, returns the adapter's
    /// part of the input gradient (f32), which the caller adds to the frozen part.
    fn project_backward(
        &self,
        target: Target,
        x: &Tensor,
        down: Option<&Tensor>,
        dy: &Tensor,
        input: bool,
        grads: &mut HashMap<String, Tensor>,
    ) -> Result<Option<Tensor>> {
        let (Some((a, b)), Some(down)) = (self.pair(target), down) else {
            return Ok(None);
        };
        let scale = self.lora.scale();
        let dy = dy.to_dtype(DType::F32)?;
        // delta = (s·down)·Bᵀ, down = dropout(x)·Aᵀ.
        let d_b = dy.t()?.matmul(&(down * scale)?)?;
        let d_down = (dy.matmul(&b)? * scale)?;
        let dropped = self.dropped(target, x)?;
        let d_a = d_down.t()?.matmul(&dropped)?;
        drop(dropped);
        super::cpu_layer::add_gradient(grads, peft_key(self.layer, target, 'A'), d_a)?;
        super::cpu_layer::add_gradient(grads, peft_key(self.layer, target, 'B'), d_b)?;
        if !input {
            return Ok(None);
        }
        Ok(Some(self.dropout(target, &d_down.matmul(&a)?)?))
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Activations)> {
        let weights = &self.model.layers[self.layer];
        let eps = self.model.config.rms_norm_eps;
        let Shape {
            b,
            t,
            h,
            m,
            heads,
            kv_heads,
            dim,
            group,
        } = self.shape(x)?;
        let x = x.reshape((m, h))?;

        let normed_attention = super::rms_norm(&x, &weights.input_norm, eps)?;
        let (q, q_down) = self.project(Target::Q, &normed_attention)?;
        let (k, k_down) = self.project(Target::K, &normed_attention)?;
        let (v, v_down) = self.project(Target::V, &normed_attention)?;
        let heads_first = |y: Tensor, n: usize| y.reshape((b, t, n, dim))?.transpose(1, 2);
        let (cos, sin) = (&self.context.cos, &self.context.sin);
        let q = rotate(&heads_first(q, heads)?, cos, sin)?
            .contiguous()?
            .reshape((b, kv_heads, group * t, dim))?;
        let k = rotate(&heads_first(k, kv_heads)?, cos, sin)?.contiguous()?;
        let v = heads_first(v, kv_heads)?.contiguous()?;
        let scale = 1.0 / (dim as f64).sqrt();
        let (out, kept_attention) =
            attention::attend_keeping(&q, &k, &v, scale, &self.context.mask)?;
        let attended = out
            .reshape((b, heads, t, dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((m, heads * dim))?;
        let (o, o_down) = self.project(Target::O, &attended)?;
        let mid = (&x + o)?;

        let normed_mlp = super::rms_norm(&mid, &weights.post_attention_norm, eps)?;
        let (gate, gate_down) = self.project(Target::Gate, &normed_mlp)?;
        let (up, up_down) = self.project(Target::Up, &normed_mlp)?;
        let product = (gate.silu()? * &up)?;
        let (down, down_down) = self.project(Target::Down, &product)?;
        let y = (&mid + down)?.reshape((b, t, h))?;
        let kept = Activations {
            normed_attention,
            q,
            k,
            v,
            attention: kept_attention,
            attended,
            mid,
            normed_mlp,
            gate,
            up,
            product,
            down: [
                q_down, k_down, v_down, o_down, gate_down, up_down, down_down,
            ],
        };
        Ok((y, kept))
    }

    fn backward(
        &self,
        x: &Tensor,
        kept: Activations,
        upstream: &Tensor,
        input_gradient: bool,
        grads: &mut HashMap<String, Tensor>,
    ) -> Result<Option<Tensor>> {
        let weights = &self.model.layers[self.layer];
        let eps = self.model.config.rms_norm_eps;
        let Shape {
            b,
            t,
            h,
            m,
            heads,
            kv_heads,
            dim,
            group,
        } = self.shape(x)?;
        let dtype = x.dtype();
        let Activations {
            normed_attention,
            q,
            k,
            v,
            attention: kept_attention,
            attended,
            mid,
            normed_mlp,
            gate,
            up,
            product,
            down,
        } = kept;
        let dy = upstream.to_dtype(dtype)?.reshape((m, h))?;

        // MLP block: y = mid + down(silu(gate) · up).
        let d_product = {
            let base = dy.matmul(self.weight(Target::Down))?;
            let adapter = self.project_backward(
                Target::Down,
                &product,
                down[Target::Down as usize].as_ref(),
                &dy,
                true,
                grads,
            )?;
            plus_adapter(base, adapter)?
        };
        drop(product);
        let (d_gate, d_up) = swiglu_backward(&gate, &up, &d_product)?;
        drop((gate, up, d_product));
        let mut d_normed = d_gate.matmul(self.weight(Target::Gate))?;
        d_normed = (d_normed + d_up.matmul(self.weight(Target::Up))?)?;
        let mut adapter: Option<Tensor> = None;
        for (target, d) in [(Target::Gate, &d_gate), (Target::Up, &d_up)] {
            let part = self.project_backward(
                target,
                &normed_mlp,
                down[target as usize].as_ref(),
                d,
                true,
                grads,
            )?;
            adapter = sum_parts(adapter, part)?;
        }
        drop((d_gate, d_up, normed_mlp));
        let d_normed = plus_adapter(d_normed, adapter)?;
        let d_mid =
            (&dy + super::rms_norm_backward(&mid, &weights.post_attention_norm, eps, &d_normed)?)?;
        drop((dy, d_normed, mid));

        // Attention block: mid = x + o(attention(rope(q(n)), rope(k(n)), v(n))).
        let d_attended = {
            let base = d_mid.matmul(self.weight(Target::O))?;
            let adapter = self.project_backward(
                Target::O,
                &attended,
                down[Target::O as usize].as_ref(),
                &d_mid,
                true,
                grads,
            )?;
            plus_adapter(base, adapter)?
        };
        drop(attended);
        let d_out = d_attended
            .reshape((b, t, heads, dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, kv_heads, group * t, dim))?;
        drop(d_attended);
        let scale = 1.0 / (dim as f64).sqrt();
        let (dq, dk, dv) = attention::attend_backward(
            &q,
            &k,
            &v,
            &kept_attention,
            &d_out,
            scale,
            &self.context.mask,
        )?;
        drop((q, k, v, kept_attention, d_out));
        let (cos, sin) = (&self.context.cos, &self.context.neg_sin()?);
        // The inverse rotation carries a rotated tensor's gradient back.
        let tokens_first = |d: Tensor, n: usize| -> Result<Tensor> {
            d.transpose(1, 2)?.contiguous()?.reshape((m, n * dim))
        };
        let dq = tokens_first(rotate(&dq.reshape((b, heads, t, dim))?, cos, sin)?, heads)?;
        let dk = tokens_first(rotate(&dk, cos, sin)?, kv_heads)?;
        let dv = tokens_first(dv, kv_heads)?;
        let mut d_normed: Option<Tensor> = None;
        let mut adapter: Option<Tensor> = None;
        for (target, d) in [(Target::Q, &dq), (Target::K, &dk), (Target::V, &dv)] {
            if input_gradient {
                let base = d.matmul(self.weight(target))?;
                d_normed = sum_parts(d_normed, Some(base))?;
            }
            let part = self.project_backward(
                target,
                &normed_attention,
                down[target as usize].as_ref(),
                d,
                input_gradient,
                grads,
            )?;
            adapter = sum_parts(adapter, part)?;
        }
        if !input_gradient {
            return Ok(None);
        }
        let d_normed = plus_adapter(d_normed.expect("three projections"), adapter)?;
        let x = x.reshape((m, h))?;
        let dx = (d_mid + super::rms_norm_backward(&x, &weights.input_norm, eps, &d_normed)?)?;
        Ok(Some(dx.reshape((b, t, h))?))
    }
}

/// `base` plus the adapter's f32 part of the same value or gradient, in `base`'s dtype (on
/// CUDA with its kernels, bf16 rounded once, as PyTorch adds an f32 LoRA term).
fn plus_adapter(base: Tensor, adapter: Option<Tensor>) -> Result<Tensor> {
    match adapter {
        #[cfg(feature = "cuda")]
        Some(adapter)
            if base.dtype() == DType::BF16
                && adapter.dtype() == DType::F32
                && super::cuda_kernels(base.device()) =>
        {
            super::cuda::add_f32_to_bf16(&base, &adapter)
        }
        Some(adapter) => {
            let adapter = adapter.to_dtype(base.dtype())?;
            base + adapter
        }
        None => Ok(base),
    }
}

fn sum_parts(sum: Option<Tensor>, part: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (sum, part) {
        (Some(sum), Some(part)) => Some((sum + part)?),
        (sum, None) => sum,
        (None, part) => part,
    })
}

/// The gradients of `silu(gate) · up` with respect to `gate` and `up` for the upstream
/// gradient `d`: `d·up·silu'(gate)` with `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`, and
/// `d·silu(gate)`; computed in f32.
fn swiglu_backward(gate: &Tensor, up: &Tensor, d: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if super::cuda_kernels(gate.device()) {
        return super::cuda::swiglu_backward(gate, up, d);
    }
    let dtype = gate.dtype();
    let g = gate.to_dtype(DType::F32)?;
    let sigmoid = (g.neg()?.exp()? + 1.0)?.recip()?;
    let silu = (&g * &sigmoid)?;
    let slope = (&sigmoid * ((&g * (1.0 - &sigmoid)?)? + 1.0)?)?;
    let d = d.to_dtype(DType::F32)?;
    let d_up = (&d * silu)?.to_dtype(dtype)?;
    let d_gate = ((d * up.to_dtype(DType::F32)?)? * slope)?.to_dtype(dtype)?;
    Ok((d_gate, d_up))
}
