//! The gradients of one micro-batch, driven layer by layer.
//!
//! Two memory regimes give the same gradients:
//! - [`Checkpointing::None`]: one forward pass records the whole graph, every layer's
//!   activations stay alive until the backward pass;
//! - [`Checkpointing::Layers`]: the forward pass keeps only each decoder layer's input;
//!   the backward pass recomputes one layer at a time with its graph (same dropout masks:
//!   they are a function of the key), back-propagates the gradient of its output into its
//!   LoRA parameters and its input, and drops it before the next.
//!
//! In both, the loss runs over `loss_chunk` trained tokens at a time: the chunk's logits
//! `[chunk, vocab]` and their gradient are the only vocabulary-sized tensors, and the
//! chunks' gradients of the final hidden states are joined before the backward pass
//! through the layers. A gradient enters a graph as `sum(output · upstream)`, whose
//! gradient with respect to `output` is exactly `upstream`.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var};

use super::loss::{nll_of_logits, Targets};
use super::Checkpointing;
use crate::batches::Batch;
use crate::model::{
    cpu_layer, lora::peft_key, tensor_layer, Adapter, AttentionMask, DropoutKey, Llama, Lora,
    Target,
};

/// How a micro-batch's gradients are computed.
#[derive(Clone, Copy, Debug)]
pub struct StepOptions {
    /// `Layers` or `None` (`Auto` is resolved by the caller; it counts as `None` here).
    pub checkpointing: Checkpointing,
    /// Trained tokens per loss chunk (at least 1).
    pub loss_chunk: usize,
}

/// Runs the forward and backward passes of `batch` with the adapter in training mode
/// (dropout from `dropout`), adds the gradient of the summed loss of `targets` to
/// `grads` (by PEFT key), and returns that summed loss.
pub fn accumulate_gradients(
    model: &Llama,
    lora: &Lora,
    dropout: DropoutKey,
    batch: &Batch,
    targets: &Targets,
    options: StepOptions,
    grads: &mut HashMap<String, Tensor>,
) -> Result<f64> {
    if targets.is_empty() {
        return Ok(0.0);
    }
    let device = &model.device;
    let (rows, width) = batch.input_ids.dims2()?;
    let segments: Vec<u32> = batch.segment_ids.flatten_all()?.to_vec1()?;
    let mask = AttentionMask::Packed(Arc::new(segments));
    let ids = batch.input_ids.to_device(device)?;
    let positions = batch.position_ids.to_device(device)?;
    let context = model.context(&positions, &mask, 0)?;
    let adapter = Some(Adapter {
        lora,
        dropout: Some(dropout),
    });
    let picked_rows = Tensor::new(targets.positions.as_slice(), device)?;
    let hidden = model.config.hidden_size;
    // The final norm and the rows that predict a trained token: `[targets, hidden]`.
    let head_input = |last: &Tensor| -> Result<Tensor> {
        model
            .final_norm(last)?
            .reshape((rows * width, hidden))?
            .index_select(&picked_rows, 0)
    };
    let layers = model.layers.len();
    let embedded = model.embed(&ids)?;

    // On the CPU in f32 each layer is one hand-written pass forward and back over plain
    // values; on CUDA one written with tensor ops. Neither records a graph.
    let keep = options.checkpointing != Checkpointing::Layers;
    macro_rules! layers_by {
        ($layer:ident, $chunk:expr) => {
            return layers_by_hand(
                embedded,
                |l, x| $layer::forward(model, lora, l, x, &context, dropout, keep),
                |x| loss_of_last(model, x, &head_input, &targets.tokens, options, $chunk),
                |l, x, kept, upstream, grads| {
                    $layer::backward(
                        model,
                        lora,
                        l,
                        x,
                        &context,
                        dropout,
                        kept,
                        upstream,
                        l > 0,
                        grads,
                    )
                },
                layers,
                grads,
            )
        };
    }
    if cpu_layer::supported(model, lora, &context) {
        layers_by!(cpu_layer, LossChunk::CpuByHand);
    }
    if tensor_layer::supported(model, lora, &context) {
        layers_by!(tensor_layer, LossChunk::Tensors);
    }

    if options.checkpointing != Checkpointing::Layers {
        let mut x = embedded;
        for l in 0..layers {
            x = model.decoder_layer(l, &x, &context, adapter, None)?;
        }
        let picked = head_input(&x)?;
        let (nll, upstream) = chunked_loss(
            model,
            &picked.detach(),
            &targets.tokens,
            options,
            LossChunk::Graph,
        )?;
        let store = (picked * upstream)?.sum_all()?.backward()?;
        for l in 0..layers {
            collect(lora, l, &store, grads)?;
        }
        return Ok(nll);
    }

    // Forward: keep each layer's input only.
    let mut inputs = Vec::with_capacity(layers);
    let mut x = embedded;
    for l in 0..layers {
        let y = model
            .decoder_layer(l, &x, &context, adapter, None)?
            .detach();
        inputs.push(x);
        x = y;
    }
    let (nll, mut upstream) = loss_of_last(
        model,
        &x,
        &head_input,
        &targets.tokens,
        options,
        LossChunk::Graph,
    )?;
    drop(x);
    // Backward: recompute each layer, last first, with its graph.
    for l in (0..layers).rev() {
        let kept = inputs.pop().expect("one input per layer");
        // The embeddings need no gradient: the first layer's input stays a plain tensor.
        let input = if l > 0 {
            Some(Var::from_tensor(&kept)?)
        } else {
            None
        };
        let x = match &input {
            Some(var) => var.as_tensor().clone(),
            None => kept,
        };
        let y = model.decoder_layer(l, &x, &context, adapter, None)?;
        let store = (y * &upstream)?.sum_all()?.backward()?;
        collect(lora, l, &store, grads)?;
        if let Some(var) = input {
            upstream = gradient_of(&store, var.as_tensor())?;
        }
    }
    Ok(nll)
}

/// How a loss chunk's logits and their gradient are computed.
#[derive(Clone, Copy)]
enum LossChunk {
    /// Candle's graph (`nll_of_logits` and a backward pass).
    Graph,
    /// [`super::loss::chunk_by_hand`]: plain f32 values on the CPU.
    CpuByHand,
    /// [`super::loss::chunk_with_tensors`]: tensor ops, one kernel on CUDA.
    Tensors,
}

type ChunkFn = fn(&Llama, &Tensor, &[u32]) -> Result<(f64, Tensor)>;

/// The layers run forward (each keeping its input, and its activations when `forward` is
/// asked to), the loss of the last output, then the layers backward from the last (each
/// run again when it kept no activations): the summed loss.
fn layers_by_hand<A>(
    embedded: Tensor,
    forward: impl Fn(usize, &Tensor) -> Result<(Tensor, Option<A>)>,
    loss: impl FnOnce(&Tensor) -> Result<(f64, Tensor)>,
    backward: impl Fn(
        usize,
        &Tensor,
        Option<A>,
        &Tensor,
        &mut HashMap<String, Tensor>,
    ) -> Result<Option<Tensor>>,
    layers: usize,
    grads: &mut HashMap<String, Tensor>,
) -> Result<f64> {
    let mut kept = Vec::with_capacity(layers);
    let mut x = embedded;
    for l in 0..layers {
        let (y, activations) = forward(l, &x)?;
        kept.push((x, activations));
        x = y;
    }
    let (nll, mut upstream) = loss(&x)?;
    drop(x);
    for l in (0..layers).rev() {
        let (input, activations) = kept.pop().expect("one input per layer");
        if let Some(dx) = backward(l, &input, activations, &upstream, grads)? {
            upstream = dx;
        }
    }
    Ok(nll)
}

/// The summed loss of the last layer's output `last` and its gradient with respect to
/// `last`, through the final norm and the rows that predict a trained token; the chunks'
/// logits computed as `chunk` says.
fn loss_of_last(
    model: &Llama,
    last: &Tensor,
    head_input: &dyn Fn(&Tensor) -> Result<Tensor>,
    tokens: &[u32],
    options: StepOptions,
    chunk: LossChunk,
) -> Result<(f64, Tensor)> {
    let last = Var::from_tensor(last)?;
    let picked = head_input(last.as_tensor())?;
    let (nll, upstream) = chunked_loss(model, &picked.detach(), tokens, options, chunk)?;
    let store = (picked * upstream)?.sum_all()?.backward()?;
    Ok((nll, gradient_of(&store, last.as_tensor())?))
}

fn gradient_of(store: &candle_core::backprop::GradStore, tensor: &Tensor) -> Result<Tensor> {
    store
        .get(tensor)
        .map(Tensor::detach)
        .ok_or_else(|| candle_core::Error::Msg("no gradient reached a layer's input".into()))
}

/// The summed loss of `picked: [targets, hidden]` (detached final hidden states) and its
/// gradient with respect to `picked`, `options.loss_chunk` rows at a time.
fn chunked_loss(
    model: &Llama,
    picked: &Tensor,
    tokens: &[u32],
    options: StepOptions,
    how: LossChunk,
) -> Result<(f64, Tensor)> {
    let n = picked.dim(0)?;
    let chunk = options.loss_chunk.max(1);
    let mut total = 0.0;
    let mut gradients = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let by_hand = match how {
            LossChunk::CpuByHand => Some(super::loss::chunk_by_hand as ChunkFn),
            LossChunk::Tensors => Some(super::loss::chunk_with_tensors as ChunkFn),
            LossChunk::Graph => None,
        };
        if let Some(chunk_loss) = by_hand {
            let rows = picked.narrow(0, start, len)?;
            let (nll, gradient) = chunk_loss(model, &rows, &tokens[start..start + len])?;
            total += nll;
            gradients.push(gradient);
            continue;
        }
        let rows = Var::from_tensor(&picked.narrow(0, start, len)?)?;
        let nll = nll_of_logits(
            &model.logits(rows.as_tensor())?,
            &tokens[start..start + len],
        )?
        .sum_all()?;
        total += nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = nll.backward()?;
        gradients.push(gradient_of(&store, rows.as_tensor())?);
    }
    Ok((total, Tensor::cat(&gradients, 0)?))
}

/// Adds the gradients of layer `layer`'s LoRA matrices found in `store` to `grads`.
fn collect(
    lora: &Lora,
    layer: usize,
    store: &candle_core::backprop::GradStore,
    grads: &mut HashMap<String, Tensor>,
) -> Result<()> {
    for target in Target::ALL {
        let Some(pair) = &lora.layers[layer][target as usize] else {
            continue;
        };
        for (which, var) in [('A', &pair.a), ('B', &pair.b)] {
            let Some(g) = store.get(var.as_tensor()) else {
                continue;
            };
            cpu_layer::add_gradient(grads, peft_key(layer, target, which), g.detach())?;
        }
    }
    Ok(())
}
