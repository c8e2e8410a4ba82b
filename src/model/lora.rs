//! LoRA adapters with PEFT's semantics and file format.
//!
//! A target projection computes `W x + B (A (dropout x)) · alpha / r` with `A: [r, in]`
//! drawn Kaiming-uniform (PEFT's `a = √5`, i.e. `U(-1/√in, 1/√in)`) and `B: [out, r]`
//! zero, so a fresh adapter leaves the model unchanged. Adapters are saved as PEFT saves
//! them: `adapter_model.safetensors` with keys like
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` and an
//! `adapter_config.json`, so PEFT, vLLM and llama.cpp's converter read them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{rng, Llama, LlamaConfig};

/// A projection LoRA can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Q = 0,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// PEFT's module name (`target_modules`).
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The block holding it in Hugging Face names.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn parse(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// LoRA hyper-parameters (the `lora:` section of a training config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
}

fn default_r() -> usize {
    32
}
fn default_alpha() -> f64 {
    64.0
}
fn default_dropout() -> f64 {
    0.05
}
fn default_targets() -> Vec<String> {
    Target::ALL.iter().map(|t| t.name().to_string()).collect()
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_r(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            targets: default_targets(),
        }
    }
}

impl LoraConfig {
    pub fn targets(&self) -> std::result::Result<Vec<Target>, crate::invalid::Invalid> {
        self.targets
            .iter()
            .map(|name| {
                Target::parse(name).ok_or_else(|| {
                    crate::invalid::Invalid(format!(
                        "unknown LoRA target `{name}` (known: {})",
                        default_targets().join(", ")
                    ))
                })
            })
            .collect()
    }

    /// Trainable parameters of an adapter with these settings on `model`.
    pub fn parameter_count(
        &self,
        model: &LlamaConfig,
    ) -> std::result::Result<usize, crate::invalid::Invalid> {
        let per_layer: usize = self
            .targets()?
            .iter()
            .map(|&t| {
                let (out, inp) = model.projection_shape(t);
                self.r * (out + inp)
            })
            .sum();
        Ok(per_layer * model.num_hidden_layers)
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.r == 0 {
            return Err("LoRA rank r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("LoRA dropout {} is not in [0, 1)", self.dropout));
        }
        self.targets().map(|_| ()).map_err(|e| e.0)
    }
}

/// Which dropout mask a forward pass uses: a pure function of these integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub step: u64,
    pub micro_batch: u64,
}

/// Inverted dropout whose mask is a function of its key: drawn in the forward pass and
/// drawn again in the backward pass, so no mask tensor stays alive in between (on the
/// CPU, and on CUDA by a kernel that draws the same numbers; other devices multiply by an
/// uploaded mask).
struct KeyedDropout {
    seed: u64,
    key: [u64; 4],
    p: f32,
}

impl KeyedDropout {
    fn mask(&self, shape: &Shape, device: &Device, dtype: DType) -> Result<Tensor> {
        let mask = rng::dropout_mask(self.seed, &self.key, shape.elem_count(), self.p);
        Tensor::from_vec(mask, shape, device)?.to_dtype(dtype)
    }

    /// `values` with dropout applied (CPU, f32 or f64).
    fn apply(&self, values: &CpuStorage, range: std::ops::Range<usize>) -> Result<CpuStorage> {
        let (seed, key, p) = (self.seed, &self.key, self.p);
        Ok(match values {
            CpuStorage::F32(v) => {
                let mut out = v[range].to_vec();
                rng::dropout_in_place(seed, key, p, &mut out, |x, keep| x * keep);
                CpuStorage::F32(out)
            }
            CpuStorage::F64(v) => {
                let mut out = v[range].to_vec();
                rng::dropout_in_place(seed, key, p, &mut out, |x, keep| x * f64::from(keep));
                CpuStorage::F64(out)
            }
            other => candle_core::bail!(
                "keyed dropout: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        })
    }
}

impl CustomOp1 for KeyedDropout {
    fn name(&self) -> &'static str {
        "keyed-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("keyed dropout: the input must be contiguous")
        };
        Ok((self.apply(storage, start..end)?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let stream = rng::dropout_stream(self.seed, &self.key);
        let keep = 1.0 / (1.0 - self.p);
        let out = super::cuda::keyed_dropout(storage, layout, stream, self.p, keep)?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _input: &Tensor, _output: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if fused_dropout(grad) && !grad.device().is_cpu() {
            return Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?));
        }
        if grad.device().is_cpu() {
            // The gradient through dropout is dropout of the gradient, with the same mask.
            let grad = grad.contiguous()?;
            let (storage, layout) = grad.storage_and_layout();
            if let (candle_core::Storage::Cpu(values), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            {
                let out = self.apply(values, start..end)?;
                return Ok(Some(Tensor::from_storage(
                    candle_core::Storage::Cpu(out),
                    layout.shape().clone(),
                    candle_core::op::BackpropOp::none(),
                    false,
                )));
            }
        }
        Ok(Some(grad.mul(&self.mask(
            grad.shape(),
            grad.device(),
            grad.dtype(),
        )?)?))
    }
}

/// Inverted dropout of `x` with probability `p` and the mask of `(seed, key)`, as the
/// adapter applies it in training (one op on the CPU and on CUDA).
pub fn keyed_dropout(x: &Tensor, seed: u64, key: [u64; 4], p: f32) -> Result<Tensor> {
    let dropout = KeyedDropout { seed, key, p };
    if fused_dropout(x) {
        x.contiguous()?.apply_op1(dropout)
    } else {
        x * dropout.mask(x.shape(), x.device(), x.dtype())?
    }
}

/// [`keyed_dropout`] of `x` in f32 (`x` of any float dtype): on CUDA with its kernels a bf16
/// `x` is read once, without an f32 copy first; the values are those of the f32 copy's.
pub fn keyed_dropout_f32(x: &Tensor, seed: u64, key: [u64; 4], p: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == DType::BF16 && super::cuda::kernels_enabled() {
        let dropout = KeyedDropout { seed, key, p };
        return x.contiguous()?.apply_op1_no_bwd(&dropout);
    }
    keyed_dropout(&x.to_dtype(DType::F32)?, seed, key, p)
}

/// Whether [`KeyedDropout`] runs as one op on `x` (the CPU, and CUDA with its kernels),
/// rather than as a product with an uploaded mask.
fn fused_dropout(x: &Tensor) -> bool {
    let dtype_ok = matches!(x.dtype(), DType::F32 | DType::F64);
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return dtype_ok && super::cuda::kernels_enabled();
    }
    dtype_ok && super::fused_cpu(x.device())
}

/// The `A` and `B` of one projection (f32 trainable variables).
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
}

pub struct Lora {
    pub config: LoraConfig,
    /// Per layer, per [`Target`] (in `Target` order): the pair, if targeted.
    pub layers: Vec<[Option<LoraPair>; 7]>,
    scale: f64,
    /// f32 in training (also over a bf16 base); f64 for gradient checks.
    dtype: DType,
}

/// PEFT's key of a LoRA matrix (`which` is `A` or `B`).
pub fn peft_key(layer: usize, target: Target, which: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{which}.weight",
        target.module(),
        target.name()
    )
}

impl Lora {
    /// A fresh f32 adapter: `A` Kaiming-uniform from `seed`, `B` zero.
    pub fn new(
        config: LoraConfig,
        model: &LlamaConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Lora> {
        Lora::with_dtype(config, model, seed, device, DType::F32)
    }

    /// A fresh adapter with parameters of `dtype`.
    pub fn with_dtype(
        config: LoraConfig,
        model: &LlamaConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Lora> {
        config.check().map_err(candle_core::Error::msg)?;
        let targets = config.targets().map_err(candle_core::Error::msg)?;
        let r = config.r;
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for l in 0..model.num_hidden_layers {
            let mut pairs: [Option<LoraPair>; 7] = Default::default();
            for &target in &targets {
                let (out, inp) = model.projection_shape(target);
                let bound = 1.0 / (inp as f32).sqrt();
                let a = rng::uniform(seed, &[l as u64, target as u64], r * inp, bound);
                pairs[target as usize] = Some(LoraPair {
                    a: Var::from_tensor(&Tensor::from_vec(a, (r, inp), device)?.to_dtype(dtype)?)?,
                    b: Var::zeros((out, r), dtype, device)?,
                });
            }
            layers.push(pairs);
        }
        let scale = config.scale();
        Ok(Lora {
            config,
            layers,
            scale,
            dtype,
        })
    }

    /// The adapter's update for `x: [m, in]`, or `None` when `target` is not adapted.
    /// With a dropout key (training) the graph to `A` and `B` is recorded; without one
    /// (inference) they enter detached.
    pub fn delta(
        &self,
        layer: usize,
        target: Target,
        x: &Tensor,
        dropout: Option<&DropoutKey>,
    ) -> Result<Option<Tensor>> {
        let Some(pair) = &self.layers[layer][target as usize] else {
            return Ok(None);
        };
        let mut x = x.to_dtype(self.dtype)?;
        if let Some(key) = dropout {
            let p = self.config.dropout as f32;
            if p > 0.0 {
                let mask_key = [key.step, key.micro_batch, layer as u64, target as u64];
                x = keyed_dropout(&x, key.seed, mask_key, p)?;
            }
        }
        let (a, b) = if dropout.is_some() {
            (pair.a.as_tensor().clone(), pair.b.as_tensor().clone())
        } else {
            (pair.a.as_tensor().detach(), pair.b.as_tensor().detach())
        };
        // Scaling the rank-r intermediate instead of the output keeps one [m, out] tensor
        // less per projection alive for the backward pass.
        let down = (x.matmul(&a.t()?)? * self.scale)?;
        Ok(Some(down.matmul(&b.t()?)?))
    }

    /// The parameters' dtype (f32 in training, f64 in gradient checks).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `alpha / r`, the factor of every update.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Every trainable variable by its PEFT key, in key order.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (l, pairs) in self.layers.iter().enumerate() {
            for target in Target::ALL {
                if let Some(pair) = &pairs[target as usize] {
                    out.push((peft_key(l, target, 'A'), &pair.a));
                    out.push((peft_key(l, target, 'B'), &pair.b));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn parameter_count(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir`.
    pub fn save_peft(
        &self,
        dir: &Path,
        base_model: &str,
    ) -> std::result::Result<(), crate::invalid::Invalid> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tensors: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        let file = dir.join("adapter_model.safetensors");
        candle_core::safetensors::save(&tensors, &file)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": self.config.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        });
        let file = dir.join("adapter_config.json");
        std::fs::write(
            &file,
            serde_json::to_string_pretty(&config).expect("json") + "\n",
        )
        .map_err(|e| format!("{}: {e}", file.display()))
        .map_err(crate::invalid::Invalid::from)
    }

    /// Reads a PEFT LoRA adapter directory written by PEFT or by [`Lora::save_peft`].
    pub fn load_peft(
        dir: &Path,
        model: &LlamaConfig,
        device: &Device,
    ) -> std::result::Result<Lora, crate::invalid::Invalid> {
        let config_file = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_file)
            .map_err(|e| format!("{}: {e}", config_file.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", config_file.display()))?;
        let field = |k: &str| {
            json.get(k)
                .ok_or_else(|| format!("{}: no `{k}`", config_file.display()))
        };
        if field("peft_type")?.as_str() != Some("LORA") {
            return Err(format!("{}: peft_type is not LORA", config_file.display()).into());
        }
        let targets: Vec<String> = match field("target_modules")? {
            serde_json::Value::Array(list) => list
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            serde_json::Value::String(s) => vec![s.clone()],
            _ => {
                return Err(
                    format!("{}: target_modules is not a list", config_file.display()).into(),
                )
            }
        };
        let flag = |key: &str| json.get(key).and_then(|v| v.as_bool()) == Some(true);
        let non_empty = |key: &str| match json.get(key) {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        for (key, unsupported) in [
            ("use_rslora", flag("use_rslora")),
            ("use_dora", flag("use_dora")),
            ("rank_pattern", non_empty("rank_pattern")),
            ("alpha_pattern", non_empty("alpha_pattern")),
            ("layers_to_transform", non_empty("layers_to_transform")),
        ] {
            if unsupported {
                return Err(format!(
                    "{}: adapters with `{key}` are not supported",
                    config_file.display()
                )
                .into());
            }
        }
        let config = LoraConfig {
            r: field("r")?.as_u64().ok_or("r is not a number")? as usize,
            alpha: field("lora_alpha")?
                .as_f64()
                .ok_or("lora_alpha is not a number")?,
            dropout: json
                .get("lora_dropout")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0),
            targets,
        };
        let file = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let mut lora = Lora::new(config, model, 0, device)
            .map_err(|e| format!("{}: {e}", config_file.display()))?;
        lora.assign(&tensors)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        Ok(lora)
    }

    /// Sets every variable from tensors keyed by PEFT key (shapes must match).
    pub fn assign(
        &mut self,
        tensors: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), crate::invalid::Invalid> {
        for (key, var) in self.named_vars() {
            let t = tensors
                .get(&key)
                .ok_or_else(|| format!("missing `{key}`"))?;
            if t.dims() != var.dims() {
                return Err(format!(
                    "`{key}` has shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )
                .into());
            }
            var.set(&t.to_dtype(self.dtype).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Folds the adapter into the base weights: `W += (B A) · alpha / r`.
    pub fn merge_into(&self, model: &mut Llama) -> Result<()> {
        for (l, pairs) in self.layers.iter().enumerate() {
            for target in Target::ALL {
                if let Some(pair) = &pairs[target as usize] {
                    let w = &mut model.layers[l].projections[target as usize];
                    let delta = (pair.b.as_tensor().matmul(pair.a.as_tensor())? * self.scale)?;
                    let dtype = w.dtype();
                    *w = (w.to_dtype(self.dtype)? + delta)?.to_dtype(dtype)?;
                }
            }
        }
        Ok(())
    }
}
