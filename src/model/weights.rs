//! Model weights in and out: Hugging Face folders (memory-mapped safetensors, sharded or
//! not), GGUF files (dequantized), and seeded random initialisation for tiny models.
//!
//! llama.cpp's converter permutes the rows of `q_proj` and `k_proj` so that rotary pairs
//! are interleaved; [`unpermute`] restores the Hugging Face layout on load and
//! [`permute`] applies it when writing GGUF, so both formats give the same logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::{layer_tensor_name, rng, Llama, LlamaConfig, Target};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Tensor {
        path: PathBuf,
        source: candle_core::Error,
    },
}

fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn tensor_error(path: &Path) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |source| Error::Tensor {
        path: path.to_owned(),
        source,
    }
}

/// Loads a model from a Hugging Face folder (`config.json` + `model.safetensors` or
/// `model.safetensors.index.json`) or a `.gguf` file.
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Llama, Error> {
    if path.is_dir() {
        load_hf(path, device, dtype)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        load_gguf(path, device, dtype).map(|(model, _)| model)
    } else if path.exists() {
        Err(invalid(
            path,
            "not a model: expected a Hugging Face folder (config.json, *.safetensors) or a .gguf file",
        ))
    } else {
        Err(invalid(path, "no such file or directory"))
    }
}

/// The `config.json` of a Hugging Face folder.
pub fn read_hf_config(dir: &Path) -> Result<LlamaConfig, Error> {
    read_hf_config_file(&dir.join("config.json"))
}

/// A Hugging Face `config.json` given by its own path.
pub fn read_hf_config_file(file: &Path) -> Result<LlamaConfig, Error> {
    let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
        path: file.to_owned(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(file, e.to_string()))?;
    if let Some(kind) = value.get("model_type").and_then(|v| v.as_str()) {
        if kind != "llama" && kind != "mistral" {
            return Err(invalid(
                file,
                format!("model_type `{kind}` is not a Llama-family decoder this trainer supports (llama, mistral)"),
            ));
        }
    }
    // Newer transformers keep rope settings under `rope_parameters`.
    let mut value = value;
    if let Some(params) = value.get("rope_parameters").cloned() {
        let object = value.as_object_mut().expect("checked above");
        if !object.contains_key("rope_theta") {
            if let Some(theta) = params.get("rope_theta") {
                object.insert("rope_theta".into(), theta.clone());
            }
        }
        let kind = params
            .get("rope_type")
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        if kind != "default" && !object.contains_key("rope_scaling") {
            object.insert("rope_scaling".into(), params);
        }
    }
    serde_json::from_value(value).map_err(|e| invalid(file, e.to_string()))
}

fn load_hf(dir: &Path, device: &Device, dtype: DType) -> Result<Llama, Error> {
    let config = read_hf_config(dir)?;
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(&index, e.to_string()))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| invalid(&index, "no `weight_map`"))?;
        let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    for f in &files {
        if !f.exists() {
            return Err(invalid(f, "weights file not found"));
        }
    }
    // SAFETY: the files are memory-mapped read-only; they must not be modified while the
    // model is loading (the tensors are copied out before this function returns).
    let tensors = unsafe { MmapedSafetensors::multi(&files) }.map_err(tensor_error(dir))?;
    Llama::from_tensors(
        config,
        |name| match tensors.get(name) {
            Ok(_) => tensors.load(name, device).map(Some),
            Err(_) => Ok(None),
        },
        device,
        dtype,
    )
    .map_err(tensor_error(dir))
}

/// Llama.cpp's row order of `q`/`k` projections -> Hugging Face's.
pub fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    w.reshape((heads, out / heads / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// Hugging Face's row order of `q`/`k` projections -> llama.cpp's.
pub fn permute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// The heads whose rows llama.cpp permutes in a GGUF tensor, if it is `attn_q`/`attn_k`.
fn permuted_heads(gguf: &str, heads: usize, kv_heads: usize) -> Option<usize> {
    if gguf.ends_with("attn_q.weight") {
        Some(heads)
    } else if gguf.ends_with("attn_k.weight") {
        Some(kv_heads)
    } else {
        None
    }
}

/// GGUF tensor name of a projection.
fn gguf_projection(target: Target) -> &'static str {
    match target {
        Target::Q => "attn_q",
        Target::K => "attn_k",
        Target::V => "attn_v",
        Target::O => "attn_output",
        Target::Gate => "ffn_gate",
        Target::Up => "ffn_up",
        Target::Down => "ffn_down",
    }
}

/// Hugging Face name -> GGUF name.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let part = match rest {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        other => {
            let name = other.strip_suffix(".weight")?.rsplit('.').next()?;
            gguf_projection(Target::parse(name)?)
        }
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

fn metadata_number(content: &gguf_file::Content, key: &str) -> Option<f64> {
    use gguf_file::Value::*;
    Some(match content.metadata.get(key)? {
        U8(v) => *v as f64,
        I8(v) => *v as f64,
        U16(v) => *v as f64,
        I16(v) => *v as f64,
        U32(v) => *v as f64,
        I32(v) => *v as f64,
        U64(v) => *v as f64,
        I64(v) => *v as f64,
        F32(v) => *v as f64,
        F64(v) => *v,
        _ => return None,
    })
}

/// The model of a GGUF file (every tensor dequantized to `dtype`) and the file's
/// metadata, which also holds its tokenizer.
pub fn load_gguf(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(Llama, gguf_file::Content), Error> {
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut file).map_err(tensor_error(path))?;
    let arch = match content.metadata.get("general.architecture") {
        Some(gguf_file::Value::String(s)) => s.clone(),
        _ => return Err(invalid(path, "no general.architecture in the metadata")),
    };
    if arch != "llama" && arch != "mistral" {
        return Err(invalid(
            path,
            format!("architecture `{arch}` is not a Llama-family decoder (llama, mistral)"),
        ));
    }
    let number = |key: &str| metadata_number(&content, &format!("{arch}.{key}"));
    let required = |key: &str| {
        number(key).ok_or_else(|| invalid(path, format!("no {arch}.{key} in the metadata")))
    };
    let embed = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| invalid(path, "no token_embd.weight"))?;
    let (vocab_size, hidden_size) = embed.shape.dims2().map_err(tensor_error(path))?;
    let heads = required("attention.head_count")? as usize;
    let kv_heads = number("attention.head_count_kv").map_or(heads, |v| v as usize);
    let head_dim = number("rope.dimension_count").map(|v| v as usize);
    // llama.cpp keeps llama3 scaling as per-frequency divisors (`rope_freqs.weight`) and
    // linear scaling as `rope.scaling.*`.
    let rope_scaling = if content.tensor_infos.contains_key("rope_freqs.weight") {
        let factors: Vec<f32> = content
            .tensor(&mut file, "rope_freqs.weight", &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all()?.to_vec1())
            .map_err(tensor_error(path))?;
        Some(serde_json::json!({"rope_type": "freq_factors", "factors": factors}))
    } else {
        match content.metadata.get(&format!("{arch}.rope.scaling.type")) {
            Some(gguf_file::Value::String(kind)) if kind == "linear" => Some(serde_json::json!({
                "rope_type": "linear",
                "factor": number("rope.scaling.factor").unwrap_or(1.0),
            })),
            Some(gguf_file::Value::String(kind)) if kind != "none" => {
                return Err(invalid(
                    path,
                    format!("rope scaling `{kind}` is not supported"),
                ))
            }
            _ => None,
        }
    };
    let eos = metadata_number(&content, "tokenizer.ggml.eos_token_id");
    let bos = metadata_number(&content, "tokenizer.ggml.bos_token_id");
    let config = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: required("feed_forward_length")? as usize,
        num_hidden_layers: required("block_count")? as usize,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: head_dim.filter(|&d| d != hidden_size / heads),
        rms_norm_eps: number("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: number("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: number("context_length").map_or(2048, |v| v as usize),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: bos.map(|v| serde_json::json!(v as u64)),
        eos_token_id: eos.map(|v| serde_json::json!(v as u64)),
    };
    let model = Llama::from_tensors(
        config,
        |name| {
            let Some(gguf) = gguf_name(name) else {
                return Ok(None);
            };
            if !content.tensor_infos.contains_key(&gguf) {
                return Ok(None);
            }
            let t = content
                .tensor(&mut file, &gguf, &Device::Cpu)?
                .dequantize(&Device::Cpu)?;
            Ok(Some(match permuted_heads(&gguf, heads, kv_heads) {
                Some(n) => unpermute(&t, n)?,
                None => t,
            }))
        },
        device,
        dtype,
    )
    .map_err(tensor_error(path))?;
    Ok((model, content))
}

/// Writes the model as an f32 GGUF file the way llama.cpp's converter lays it out
/// (q/k rows permuted), with the `llama.*` hyper-parameters.
pub fn save_gguf(model: &Llama, path: &Path) -> Result<(), Error> {
    use gguf_file::Value;
    let c = &model.config;
    let int = |key: &str, v: usize| (format!("llama.{key}"), Value::U32(v as u32));
    let float = |key: &str, v: f64| (format!("llama.{key}"), Value::F32(v as f32));
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        int("block_count", c.num_hidden_layers),
        int("embedding_length", c.hidden_size),
        int("feed_forward_length", c.intermediate_size),
        int("attention.head_count", c.num_attention_heads),
        int("attention.head_count_kv", c.kv_heads()),
        int("rope.dimension_count", c.head_dim()),
        float("rope.freq_base", c.rope_theta),
        float("attention.layer_norm_rms_epsilon", c.rms_norm_eps),
        int("context_length", c.max_position_embeddings),
    ];
    if let Some(eos) = c.eos_ids().first() {
        metadata.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(*eos)));
    }
    let mut tensors = Vec::new();
    for (name, t) in model.named_tensors() {
        let gguf = gguf_name(&name).expect("every model tensor has a GGUF name");
        let t = t
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&Device::Cpu));
        let t = t.and_then(
            |t| match permuted_heads(&gguf, c.num_attention_heads, c.kv_heads()) {
                Some(n) => permute(&t, n),
                None => Ok(t),
            },
        );
        let q = t
            .and_then(|t| QTensor::quantize(&t, GgmlDType::F32))
            .map_err(tensor_error(path))?;
        tensors.push((gguf, q));
    }
    let mut file = std::fs::File::create(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs).map_err(tensor_error(path))
}

/// Random f32 weights for `config` (see [`random_tensors_as`]).
pub fn random_tensors(config: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    random_tensors_as(config, seed, DType::F32)
}

/// Random weights for `config` in `dtype`: projections and embeddings normal with standard
/// deviation `1/sqrt(fan_in)`, norms one. Each tensor is its own keyed stream, so the
/// tensors are drawn in parallel with the values of a sequential draw, and each is
/// converted to `dtype` as soon as it is drawn (an 8B model never exists in f32).
pub fn random_tensors_as(config: &LlamaConfig, seed: u64, dtype: DType) -> HashMap<String, Tensor> {
    use rayon::prelude::*;
    let device = Device::Cpu;
    let (v, h) = (config.vocab_size, config.hidden_size);
    // (name, shape, stream key); key 0 marks a norm (ones).
    let mut plan: Vec<(String, (usize, usize), u64)> = Vec::new();
    let mut key = 0u64;
    let mut normal = |name: String, shape: (usize, usize), plan: &mut Vec<_>| {
        key += 1;
        plan.push((name, shape, key));
    };
    normal("model.embed_tokens.weight".to_string(), (v, h), &mut plan);
    for l in 0..config.num_hidden_layers {
        for target in Target::ALL {
            normal(
                layer_tensor_name(l, target),
                config.projection_shape(target),
                &mut plan,
            );
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            plan.push((format!("model.layers.{l}.{norm}.weight"), (1, h), 0));
        }
    }
    plan.push(("model.norm.weight".to_string(), (1, h), 0));
    if !config.tie_word_embeddings {
        normal("lm_head.weight".to_string(), (v, h), &mut plan);
    }
    plan.into_par_iter()
        .map(|(name, shape, key)| {
            let tensor = if key == 0 {
                Tensor::ones(shape.1, dtype, &device)
            } else {
                let std = 1.0 / (shape.1 as f32).sqrt();
                let values = rng::normal(seed, &[key], shape.0 * shape.1, std);
                Tensor::from_vec(values, shape, &device).and_then(|t| t.to_dtype(dtype))
            };
            (name, tensor.expect("shape matches"))
        })
        .collect()
}

/// Writes `config.json` and `model.safetensors` (f32) into `dir`.
pub fn save_hf(model: &Llama, dir: &Path) -> Result<(), Error> {
    save_hf_as(model, dir, DType::F32)
}

/// Writes `config.json` and `model.safetensors` with the weights in `dtype` into `dir`.
pub fn save_hf_as(model: &Llama, dir: &Path, dtype: DType) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    let config = dir.join("config.json");
    let text = serde_json::to_string_pretty(&model.config.to_hf_json()).expect("json") + "\n";
    std::fs::write(&config, text).map_err(|source| Error::Io {
        path: config.clone(),
        source,
    })?;
    let file = dir.join("model.safetensors");
    let tensors: HashMap<String, Tensor> = model
        .named_tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()
        .map_err(tensor_error(&file))?;
    candle_core::safetensors::save(&tensors, &file).map_err(tensor_error(&file))
}
