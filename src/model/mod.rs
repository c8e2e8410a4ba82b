//! A Llama-family decoder in candle, written for training adapters on it.
//!
//! Every op on the path from a LoRA parameter to the loss has a backward pass. candle's
//! fused kernels (`ops::rms_norm`, `ops::softmax_last_dim`, `rope`) have none and would
//! silently cut the gradient, so rotary embeddings are composed from elementary ops, and
//! RMS norm and the attention probabilities are our own fused CPU ops with explicit
//! backward passes (composed from elementary ops on other devices). Base projections are
//! [`frozen_linear`], so no gradient buffer is ever allocated for a base weight.
//!
//! Attention is grouped-query with a causal mask that also stops at packed-sequence
//! boundaries (tokens only see earlier tokens of their own segment), positions come from
//! the batch (each packed example restarts at 0), and a [`KvCache`] serves generation.

pub mod attention;
pub mod blas;
pub mod cpu_layer;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod frozen;
pub mod lora;
pub mod rng;
pub mod tensor_layer;
pub mod weights;

use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

pub use attention::AttentionMask;
pub use frozen::frozen_linear;
pub use lora::{DropoutKey, Lora, LoraConfig, Target};

/// The fields of a Hugging Face `config.json` that a Llama-family model needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// `{"rope_type": "llama3" | "linear", "factor": ..}` as in transformers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    /// One id or a list of ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// `(out, in)` features of a projection.
    pub fn projection_shape(&self, target: Target) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim(),
            self.kv_heads() * self.head_dim(),
        );
        match target {
            Target::Q => (q, h),
            Target::K | Target::V => (kv, h),
            Target::O => (h, q),
            Target::Gate | Target::Up => (i, h),
            Target::Down => (h, i),
        }
    }

    /// Parameters of the base model (embeddings, projections, norms, an untied head).
    pub fn parameter_count(&self) -> u64 {
        let (v, h) = (self.vocab_size as u64, self.hidden_size as u64);
        let projections: u64 = Target::ALL
            .iter()
            .map(|&t| {
                let (out, inp) = self.projection_shape(t);
                (out * inp) as u64
            })
            .sum();
        let per_layer = projections + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers as u64 * per_layer + h + head
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|n| n as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .filter_map(|v| v.as_u64().map(|n| n as u32))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// `config.json` as transformers writes it for `LlamaForCausalLM`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("plain data");
        let object = value.as_object_mut().expect("a struct");
        object.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        object.insert("model_type".into(), "llama".into());
        object.insert("hidden_act".into(), "silu".into());
        object.insert("torch_dtype".into(), "float32".into());
        object.insert("attention_bias".into(), false.into());
        object.insert("mlp_bias".into(), false.into());
        value
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0 || self.kv_heads() == 0 {
            return Err("num_attention_heads and num_key_value_heads must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if let Some(scaling) = &self.rope_scaling {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            // `dynamic` only changes positions beyond max_position_embeddings.
            if !matches!(
                kind,
                "default" | "linear" | "llama3" | "dynamic" | "freq_factors"
            ) {
                return Err(format!(
                    "rope_scaling type `{kind}` is not supported (default, linear, llama3, dynamic)"
                ));
            }
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} is odd: rotary embeddings need pairs",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// Rotary inverse frequencies, with `rope_scaling` applied.
    pub fn inverse_frequencies(&self) -> Vec<f32> {
        let dim = self.head_dim();
        let mut inv: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / dim as f64))
            .collect();
        let scaling = self.rope_scaling.as_ref();
        let kind = scaling
            .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let number = |key: &str, default: f64| {
            scaling
                .and_then(|s| s.get(key))
                .and_then(|v| v.as_f64())
                .unwrap_or(default)
        };
        let factor = number("factor", 1.0);
        match kind {
            "linear" => inv.iter_mut().for_each(|f| *f /= factor),
            // Per-frequency divisors, as GGUF files store llama3 scaling (`rope_freqs`).
            "freq_factors" => {
                let factors = scaling
                    .and_then(|s| s.get("factors"))
                    .and_then(|f| f.as_array())
                    .cloned()
                    .unwrap_or_default();
                for (f, d) in inv.iter_mut().zip(factors) {
                    *f /= d.as_f64().unwrap_or(1.0);
                }
            }
            "llama3" => {
                let low = number("low_freq_factor", 1.0);
                let high = number("high_freq_factor", 4.0);
                let original = number("original_max_position_embeddings", 8192.0);
                let (low_wavelen, high_wavelen) = (original / low, original / high);
                for f in inv.iter_mut() {
                    let wavelen = std::f64::consts::TAU / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (original / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            _ => {}
        }
        inv.into_iter().map(|f| f as f32).collect()
    }
}

/// The seven projections of a decoder layer, in [`Target`] order.
pub struct Layer {
    pub input_norm: Tensor,
    pub post_attention_norm: Tensor,
    pub projections: [Tensor; 7],
}

pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when tied to the embeddings.
    pub lm_head: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    pub device: Device,
    pub dtype: DType,
}

/// An adapter applied during a forward pass. `dropout: Some(key)` is training: dropout
/// with the masks of `key`, and the graph to the adapter's parameters is recorded.
/// `None` is inference: no dropout, and the parameters enter detached, so no graph is
/// kept (evaluation and generation hold no activations for a backward pass).
#[derive(Clone, Copy)]
pub struct Adapter<'a> {
    pub lora: &'a Lora,
    pub dropout: Option<DropoutKey>,
}

/// Rotary tables and mask of one forward pass, shared by its layers ([`Llama::context`]).
pub struct Context<'a> {
    cos: Tensor,
    sin: Tensor,
    mask: attention::Prepared<'a>,
}

impl Context<'_> {
    /// `−sin`: rotating by it undoes a rotation, which carries a gradient back through one.
    fn neg_sin(&self) -> Result<Tensor> {
        self.sin.neg()
    }
}

/// Keys and values of earlier positions, per layer, for generation.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The Hugging Face name of a tensor of layer `layer`.
pub fn layer_tensor_name(layer: usize, target: Target) -> String {
    format!(
        "model.layers.{layer}.{}.{}.weight",
        target.module(),
        target.name()
    )
}

impl Llama {
    /// Builds the model from tensors named as in Hugging Face checkpoints
    /// (`model.layers.0.self_attn.q_proj.weight`, ...), converted to `dtype` on `device`.
    pub fn from_tensors(
        config: LlamaConfig,
        mut tensor: impl FnMut(&str) -> Result<Option<Tensor>>,
        device: &Device,
        dtype: DType,
    ) -> Result<Llama> {
        config.check().map_err(candle_core::Error::msg)?;
        let mut fetch = |name: &str, shape: &[usize], required: bool| -> Result<Option<Tensor>> {
            let Some(t) = tensor(name)? else {
                if required {
                    candle_core::bail!("missing tensor `{name}`")
                }
                return Ok(None);
            };
            if t.dims() != shape {
                candle_core::bail!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )
            }
            Ok(Some(t.to_device(device)?.to_dtype(dtype)?.contiguous()?))
        };
        let mut get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            Ok(fetch(name, shape, true)?.expect("required"))
        };
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = get("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let mut projections = Vec::with_capacity(7);
            for target in Target::ALL {
                let (out, inp) = config.projection_shape(target);
                projections.push(get(&layer_tensor_name(l, target), &[out, inp])?);
            }
            layers.push(Layer {
                input_norm: get(&format!("model.layers.{l}.input_layernorm.weight"), &[h])?,
                post_attention_norm: get(
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                projections: projections.try_into().expect("seven"),
            });
        }
        let norm = get("model.norm.weight", &[h])?;
        // Some checkpoints leave out a head equal to the embeddings.
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            fetch("lm_head.weight", &[v, h], false)?
        };
        let mut config = config;
        if lm_head.is_none() {
            config.tie_word_embeddings = true;
        }
        let (cos, sin) = rotary_tables(&config, device, dtype)?;
        Ok(Llama {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
            dtype,
        })
    }

    /// Every tensor by its Hugging Face name (for saving merged weights).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (l, layer) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{l}.input_layernorm.weight"),
                layer.input_norm.clone(),
            ));
            out.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                layer.post_attention_norm.clone(),
            ));
            for target in Target::ALL {
                out.push((
                    layer_tensor_name(l, target),
                    layer.projections[target as usize].clone(),
                ));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.clone()));
        }
        out
    }

    pub(crate) fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Final hidden states `[batch, seq, hidden]` (after the last norm).
    ///
    /// `positions` are each token's position in its own sequence; `mask` says which
    /// keys each query sees (causal, or causal within packed examples).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttentionMask,
        adapter: Option<Adapter>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        if let Some(cache) = cache.as_deref_mut() {
            cache.layers.resize(self.layers.len(), None);
        }
        let past = cache.as_deref().map_or(0, KvCache::len);
        let context = self.context(positions, mask, past)?;
        let mut x = self.embed(input_ids)?;
        for l in 0..self.layers.len() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            x = self.decoder_layer(l, &x, &context, adapter, layer_cache)?;
        }
        self.final_norm(&x)
    }

    /// The embeddings `[batch, seq, hidden]` of `input_ids: [batch, seq]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        self.embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))
    }

    /// What every layer of one forward pass shares: the rotary tables at the batch's
    /// `positions: [batch, seq]` and the mask for `past` cached positions.
    pub fn context<'a>(
        &self,
        positions: &Tensor,
        mask: &'a AttentionMask,
        past: usize,
    ) -> Result<Context<'a>> {
        let (b, t) = positions.dims2()?;
        let flat_positions = positions.flatten_all()?;
        let half = self.config.head_dim() / 2;
        let table = |t_: &Tensor| {
            t_.index_select(&flat_positions, 0)?
                .reshape((b, 1, t, half))
        };
        Ok(Context {
            cos: table(&self.cos)?,
            sin: table(&self.sin)?,
            mask: attention::prepare(mask, b, t, past, &self.device, self.dtype)?,
        })
    }

    /// [`Llama::context`] with the composed attention (an additive mask) whatever the
    /// device: the path CUDA takes without its kernels, for tests on the CPU.
    pub fn context_composed<'a>(
        &self,
        positions: &Tensor,
        mask: &'a AttentionMask,
    ) -> Result<Context<'a>> {
        let (b, t) = positions.dims2()?;
        let mut context = self.context(positions, mask, 0)?;
        context.mask = attention::prepare_composed(mask, b, t, 0, &self.device, self.dtype)?;
        Ok(context)
    }

    /// Decoder layer `layer` on `x: [batch, seq, hidden]`: attention and MLP blocks, each
    /// with its residual.
    pub fn decoder_layer(
        &self,
        layer: usize,
        x: &Tensor,
        context: &Context,
        adapter: Option<Adapter>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let weights = &self.layers[layer];
        let eps = self.config.rms_norm_eps;
        let normed = rms_norm(x, &weights.input_norm, eps)?;
        let attended = self.attention(layer, &normed, context, adapter, cache)?;
        let x = (x + attended)?;
        let normed = rms_norm(&x, &weights.post_attention_norm, eps)?;
        let mlp = self.mlp(layer, &normed, adapter)?;
        x + mlp
    }

    /// The norm after the last layer.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }

    /// Logits `[.., vocab]` (f32, or f64 for f64 models) of hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let h = *dims.last().expect("rank >= 1");
        let rows = hidden.elem_count() / h;
        let flat = hidden.reshape((rows, h))?;
        let logits = frozen_linear(&flat, self.lm_head())?.to_dtype(reduction_dtype(self.dtype))?;
        let mut shape = dims;
        *shape.last_mut().expect("rank >= 1") = self.config.vocab_size;
        logits.reshape(shape)
    }

    /// Full forward pass: logits `[batch, seq, vocab]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttentionMask,
        adapter: Option<Adapter>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, positions, mask, adapter, cache)?;
        self.logits(&hidden)
    }

    /// Base projection plus the adapter's update, on `x: [m, in]`.
    fn project(
        &self,
        layer: usize,
        target: Target,
        x: &Tensor,
        adapter: Option<Adapter>,
    ) -> Result<Tensor> {
        let base = frozen_linear(x, &self.layers[layer].projections[target as usize])?;
        match adapter {
            Some(adapter) => match adapter
                .lora
                .delta(layer, target, x, adapter.dropout.as_ref())?
            {
                Some(delta) => {
                    let dtype = base.dtype();
                    base + delta.to_dtype(dtype)?
                }
                None => Ok(base),
            },
            None => Ok(base),
        }
    }

    fn attention(
        &self,
        layer: usize,
        x: &Tensor,
        context: &Context,
        adapter: Option<Adapter>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let (heads, kv_heads, dim) = (
            self.config.num_attention_heads,
            self.config.kv_heads(),
            self.config.head_dim(),
        );
        let x = x.reshape((b * t, h))?;
        let split = |y: Tensor, n: usize| y.reshape((b, t, n, dim))?.transpose(1, 2);
        let q = split(self.project(layer, Target::Q, &x, adapter)?, heads)?;
        let k = split(self.project(layer, Target::K, &x, adapter)?, kv_heads)?;
        let v = split(self.project(layer, Target::V, &x, adapter)?, kv_heads)?;
        let (cos, sin) = (&context.cos, &context.sin);
        let q = rotate(&q, cos, sin)?;
        let mut k = rotate(&k, cos, sin)?;
        let mut v = v.contiguous()?;
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.as_ref() {
                k = Tensor::cat(&[past_k, &k], 2)?;
                v = Tensor::cat(&[past_v, &v], 2)?;
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let group = heads / kv_heads;
        // Query heads sharing a key/value head are stacked along the sequence axis, so
        // keys and values are never repeated in memory.
        let q = q.contiguous()?.reshape((b, kv_heads, group * t, dim))?;
        let scale = 1.0 / (dim as f64).sqrt();
        let out = attention::attend(&q, &k, &v, scale, &context.mask)?
            .reshape((b, heads, t, dim))?
            .transpose(1, 2)?
            .reshape((b * t, heads * dim))?;
        self.project(layer, Target::O, &out, adapter)?
            .reshape((b, t, h))
    }

    fn mlp(&self, layer: usize, x: &Tensor, adapter: Option<Adapter>) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let x = x.reshape((b * t, h))?;
        let gate = self.project(layer, Target::Gate, &x, adapter)?;
        let up = self.project(layer, Target::Up, &x, adapter)?;
        let act = (gate.silu()? * up)?;
        self.project(layer, Target::Down, &act, adapter)?
            .reshape((b, t, h))
    }
}

/// `cos` and `sin` of every position up to `max_position_embeddings`: `[positions, dim/2]`.
fn rotary_tables(config: &LlamaConfig, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    let inv = config.inverse_frequencies();
    let positions = config.max_position_embeddings.max(1);
    let half = inv.len();
    let mut angles = Vec::with_capacity(positions * half);
    for p in 0..positions {
        angles.extend(inv.iter().map(|f| p as f32 * f));
    }
    let angles = Tensor::from_vec(angles, (positions, half), device)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}

/// Rotary embedding in the Hugging Face layout (first half / second half of each head),
/// from differentiable ops. `x: [b, heads, t, dim]`, `cos`/`sin`: `[b, 1, t, dim/2]`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let first = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let second = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[first, second], D::Minus1)
}

/// The dtype reductions (norms, softmax, loss) run in: f32, or f64 for f64 models.
pub fn reduction_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

static COMPOSED_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every op take its composed path on the CPU too (the path CUDA runs for what has no
/// kernel of its own), so that the CPU can run the GPU's code paths; the GPU check uses it.
pub fn set_composed_ops(on: bool) {
    COMPOSED_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether `device` is a GPU that runs corpusdb's own CUDA kernels (`cuda` feature, unless
/// `CORPUSDB_CUDA_KERNELS=composed`).
pub(crate) fn cuda_kernels(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return cuda::kernels_enabled();
    }
    let _ = device;
    false
}

/// Whether `device` runs the fused CPU ops (the CPU, unless [`set_composed_ops`]).
pub(crate) fn fused_cpu(device: &Device) -> bool {
    device.is_cpu() && !COMPOSED_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

/// RMS norm, with a backward pass (candle's fused one has none). On the CPU (f32, f64)
/// one fused op that keeps only its input for the backward; elsewhere composed from
/// elementary ops, computed in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let fused = if fused_cpu(x.device()) {
        matches!(dtype, DType::F32 | DType::F64)
    } else {
        cuda_kernels(x.device()) && matches!(dtype, DType::F32 | DType::BF16)
    };
    if fused && weight.dtype() == dtype {
        return x.contiguous()?.apply_op1(RmsNorm {
            weight: weight.contiguous()?,
            eps,
        });
    }
    let x = x.to_dtype(reduction_dtype(dtype))?;
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    x.broadcast_div(&scale)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// `y = x · w / √(mean(x²) + ε)` per row; `w` is frozen.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

fn rms_norm_rows<T: num_float::Float>(input: &[T], weight: &[T], eps: f64) -> Vec<T> {
    rms_norm_rows_scaled(input, weight, eps).0
}

/// RMS norm of every row, and each row's scale `1/√(mean(x²) + ε)` (what the backward
/// pass of the CPU layer needs).
pub(crate) fn rms_norm_rows_scaled<T: num_float::Float>(
    input: &[T],
    weight: &[T],
    eps: f64,
) -> (Vec<T>, Vec<T>) {
    use rayon::prelude::*;
    const ROWS: usize = 64;
    let dim = weight.len().max(1);
    let mut out = input.to_vec();
    let mut scales = vec![T::zero(); input.len() / dim];
    out.par_chunks_mut(dim * ROWS)
        .zip(scales.par_chunks_mut(ROWS))
        .for_each(|(rows, scales)| {
            for (row, r) in rows.chunks_mut(dim).zip(scales) {
                let mean =
                    row.iter().fold(T::zero(), |acc, &v| acc + v * v) / T::from_f64(dim as f64);
                let scale = T::from_f64(1.0) / (mean + T::from_f64(eps)).sqrt();
                for (v, &w) in row.iter_mut().zip(weight) {
                    *v = *v * scale * w;
                }
                *r = scale;
            }
        });
    (out, scales)
}

impl candle_core::CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("rms norm: the input must be contiguous")
        };
        if layout.dims().last() != Some(&self.weight.elem_count()) {
            candle_core::bail!(
                "rms norm: weight of {} for rows of {:?}",
                self.weight.elem_count(),
                layout.dims()
            )
        }
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let (w_start, w_end) = weight_layout.contiguous_offsets().expect("made contiguous");
        let out = match (storage, &*weight) {
            (CpuStorage::F32(v), candle_core::Storage::Cpu(CpuStorage::F32(w))) => {
                CpuStorage::F32(rms_norm_rows(&v[start..end], &w[w_start..w_end], self.eps))
            }
            (CpuStorage::F64(v), candle_core::Storage::Cpu(CpuStorage::F64(w))) => {
                CpuStorage::F64(rms_norm_rows(&v[start..end], &w[w_start..w_end], self.eps))
            }
            _ => {
                candle_core::bail!("rms norm: input and weight must both be f32 or f64 on the CPU")
            }
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(w) = &*weight else {
            candle_core::bail!("rms norm: input on CUDA, weight elsewhere")
        };
        let out = cuda::rms_norm_forward(storage, layout, w, weight_layout, self.eps as f32)?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _output: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rms_norm_backward(x, &self.weight, self.eps, grad)?))
    }
}

/// The gradient of [`rms_norm`] with respect to `x` for the upstream gradient `grad`:
/// `dx = r·(g∘w) − x·r³·mean(g∘w∘x)` with `r = 1/√(mean(x²) + ε)` per row; one kernel on
/// CUDA, tensor ops (in f32 for bf16) elsewhere.
pub(crate) fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    grad: &Tensor,
) -> Result<Tensor> {
    if cuda_kernels(x.device()) && matches!(x.dtype(), DType::F32 | DType::BF16) {
        return x.contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &RmsNormGrad {
                weight: weight.contiguous()?,
                eps,
            },
        );
    }
    let dtype = x.dtype();
    let wide = reduction_dtype(dtype);
    let (x, grad, weight) = (
        x.to_dtype(wide)?,
        grad.to_dtype(wide)?,
        weight.to_dtype(wide)?,
    );
    let gw = grad.broadcast_mul(&weight)?;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let dot = (&gw * &x)?.mean_keepdim(D::Minus1)?;
    let dx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&(dot * r.powf(3.0)?)?)?)?;
    dx.to_dtype(dtype)
}

/// The gradient of [`RmsNorm`] with respect to its input, `(x, upstream) -> dx`: one
/// kernel on CUDA (the CPU computes it from tensor ops in `RmsNorm::bwd`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RmsNormGrad {
    weight: Tensor,
    eps: f64,
}

impl candle_core::CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("rms norm gradient: the CPU uses tensor ops")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &candle_core::Layout,
        g: &candle_core::CudaStorage,
        g_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(w) = &*weight else {
            candle_core::bail!("rms norm gradient: input on CUDA, weight elsewhere")
        };
        let out = cuda::rms_norm_backward(
            x,
            x_layout,
            (g, g_layout),
            w,
            weight_layout,
            self.eps as f32,
        )?;
        Ok((out, x_layout.shape().clone()))
    }
}

/// The few float operations the fused CPU ops (RMS norm, attention, loss) need, for f32
/// and f64; their sums are kept in f64.
pub(crate) mod num_float {
    pub trait Float:
        Copy
        + Send
        + Sync
        + PartialEq
        + 'static
        + std::ops::Sub<Output = Self>
        + std::ops::Add<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
    {
        fn from_f64(v: f64) -> Self;
        fn to_f64(self) -> f64;
        fn sqrt(self) -> Self;
        fn zero() -> Self;
        fn exp(self) -> Self;
        /// `e^x` where the loop around it should vectorise: f32 by [`exp_f32`], f64 exact.
        fn exp_fast(self) -> Self;
        fn maximum(self, other: Self) -> Self;
        fn neg_infinity() -> Self;
    }
    macro_rules! float {
        ($t:ty) => {
            impl Float for $t {
                fn from_f64(v: f64) -> Self {
                    v as $t
                }
                fn to_f64(self) -> f64 {
                    self as f64
                }
                fn sqrt(self) -> Self {
                    <$t>::sqrt(self)
                }
                fn zero() -> Self {
                    0.0
                }
                fn exp(self) -> Self {
                    <$t>::exp(self)
                }
                fn exp_fast(self) -> Self {
                    ExpFast::exp_fast(self)
                }
                fn maximum(self, other: Self) -> Self {
                    <$t>::max(self, other)
                }
                fn neg_infinity() -> Self {
                    <$t>::NEG_INFINITY
                }
            }
        };
    }
    float!(f32);
    float!(f64);

    impl ExpFast for f32 {
        fn exp_fast(self) -> f32 {
            exp_f32(self)
        }
    }
    impl ExpFast for f64 {
        fn exp_fast(self) -> f64 {
            self.exp()
        }
    }

    pub trait ExpFast {
        fn exp_fast(self) -> Self;
    }

    /// The sum of `values` in f64, in four running sums (one sum would wait on every
    /// add); the same order every time.
    pub fn sum_f64<T: Float>(values: &[T]) -> f64 {
        let mut sums = [0f64; 4];
        let mut quads = values.chunks_exact(4);
        for quad in &mut quads {
            for (s, v) in sums.iter_mut().zip(quad) {
                *s += v.to_f64();
            }
        }
        let rest: f64 = quads.remainder().iter().map(|v| v.to_f64()).sum();
        (sums[0] + sums[1]) + (sums[2] + sums[3]) + rest
    }

    /// `e^x` in f32 without branches or calls, so that loops over it vectorise: the
    /// exponent by rounding `x·log₂e` (adding 1.5·2²³ rounds to an integer), the rest by
    /// Cephes' degree-6 polynomial on `[−ln 2 / 2, ln 2 / 2]`. Within one ulp of the exact
    /// value for `x` in `[−87.3, 88.37]` (tested), 0 below (masked scores are `−∞`), ∞
    /// above (exactly, from 88.72), NaN for NaN.
    #[inline(always)]
    pub fn exp_f32(x: f32) -> f32 {
        const ROUND: f32 = 12_582_912.0;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const LOW: f32 = -87.3;
        const HIGH: f32 = 88.37;
        let input = x;
        let x = x.clamp(LOW, HIGH);
        let t = x * std::f32::consts::LOG2_E + ROUND;
        let n = t - ROUND;
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = 1.987_569_2e-4_f32;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let y = p * (r * r) + r + 1.0;
        // 2^n: n's bits are the low bits of t's mantissa.
        let exponent = (t.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
        let y = y * f32::from_bits(exponent as u32);
        // Selects, not branches: the loop still vectorises.
        let y = if input > HIGH { f32::INFINITY } else { y };
        let y = if input < LOW { 0.0 } else { y };
        if input.is_nan() {
            input
        } else {
            y
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn exp_f32_is_within_an_ulp() {
            let n = 2_000_000;
            let mut worst = 0f64;
            for i in 0..=n {
                let x = (-87.3 + (88.37 + 87.3) * (i as f64 / n as f64)) as f32;
                let exact = (x as f64).exp();
                let got = super::exp_f32(x) as f64;
                worst = worst.max(((got - exact) / exact).abs());
            }
            assert!(worst < f32::EPSILON as f64, "relative error {worst:e}");
            assert_eq!(super::exp_f32(f32::NEG_INFINITY), 0.0);
            assert_eq!(super::exp_f32(-100.0), 0.0);
            assert_eq!(super::exp_f32(0.0), 1.0);
            assert_eq!(super::exp_f32(100.0), f32::INFINITY);
            assert!(super::exp_f32(f32::NAN).is_nan());
        }
    }
}

/// A large negative number rather than -inf, so masked scores never produce NaN.
pub const MASKED: f32 = -1e9;

/// Greedy decoding with a KV cache: the prompt once, then one token per step. Stops at
/// any of `stop` or after `max_new_tokens`.
pub fn generate_greedy(
    model: &Llama,
    adapter: Option<&Lora>,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        candle_core::bail!("generation needs at least one prompt token")
    }
    let device = &model.device;
    let adapter = adapter.map(|lora| Adapter {
        lora,
        dropout: None,
    });
    let mut cache = KvCache::default();
    let mut out = Vec::new();
    let limit = model.config.max_position_embeddings;
    let mut next_input: Vec<u32> = prompt.to_vec();
    while out.len() < max_new_tokens {
        let past = cache.len();
        let new = next_input.len();
        if past + new > limit {
            if past == 0 {
                candle_core::bail!("the prompt has {new} tokens; the model takes at most {limit}")
            }
            break;
        }
        let ids = Tensor::new(next_input.as_slice(), device)?.unsqueeze(0)?;
        let positions: Vec<u32> = (past as u32..(past + new) as u32).collect();
        let positions = Tensor::new(positions.as_slice(), device)?.unsqueeze(0)?;
        let hidden = model.hidden_states(
            &ids,
            &positions,
            &AttentionMask::Causal,
            adapter,
            Some(&mut cache),
        )?;
        let last = hidden.narrow(1, new - 1, 1)?;
        let logits = model.logits(&last)?.flatten_all()?;
        let token = logits.argmax(0)?.to_scalar::<u32>()?;
        if stop.contains(&token) {
            break;
        }
        out.push(token);
        next_input = vec![token];
    }
    Ok(out)
}
