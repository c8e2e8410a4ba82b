//! The candle model and its LoRA adapters on tiny random models: gradients against
//! finite differences, a fresh adapter changes nothing, packed examples never see each
//! other, the KV cache, PEFT files, merging, and GGUF against safetensors.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use corpusdb::batches::{self, BatchOptions, Tokenized};
use corpusdb::model::{
    self, frozen_linear, generate_greedy, weights, Adapter, AttentionMask, DropoutKey, Llama,
    LlamaConfig, Lora, LoraConfig, Target,
};
use corpusdb::train::{loss, optim};

pub fn tiny_config(vocab: usize) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "eos_token_id": 1,
    }))
    .unwrap()
}

pub fn tiny_model(config: &LlamaConfig, seed: u64, dtype: DType) -> Llama {
    let tensors = weights::random_tensors(config, seed);
    Llama::from_tensors(
        config.clone(),
        |n| Ok(tensors.get(n).cloned()),
        &Device::Cpu,
        dtype,
    )
    .unwrap()
}

/// A packed batch of token sequences, every token after the first trained.
pub fn batch_of(sequences: &[Vec<u32>], width: usize) -> batches::Batch {
    let examples = sequences
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            let mut trained = vec![true; ids.len()];
            trained[0] = false;
            (
                i as u64,
                i as u64,
                Tokenized {
                    ids: ids.clone(),
                    trained,
                },
            )
        })
        .collect();
    let options = BatchOptions {
        batch_size: sequences.len(),
        max_seq_len: width,
        packing: true,
        rank: 0,
        ranks: 1,
    };
    batches::assemble(examples, 0, &options).unwrap()
}

pub fn lora_config(r: usize, dropout: f64) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        dropout,
        ..LoraConfig::default()
    }
}

/// Sets every B of the adapter to small random values, so that A has a gradient too.
pub fn randomize_b(lora: &Lora, seed: u64) {
    for (i, (key, var)) in lora.named_vars().into_iter().enumerate() {
        if key.ends_with("lora_B.weight") {
            let values = model::rng::normal(seed, &[i as u64], var.elem_count(), 0.1);
            let t = Tensor::from_vec(values, var.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(var.dtype())
                .unwrap();
            var.set(&t).unwrap();
        }
    }
}

/// `(f(v + eps·e_i) − f(v − eps·e_i)) / 2eps` for entry `i` of an f64 variable; the
/// variable is restored afterwards.
pub fn central_difference(var: &Var, i: usize, eps: f64, objective: impl Fn() -> f64) -> f64 {
    let original: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
    let at = |delta: f64| {
        let mut moved = original.clone();
        moved[i] += delta;
        var.set(&Tensor::from_vec(moved, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        objective()
    };
    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
    var.set(&Tensor::from_vec(original, var.shape(), &Device::Cpu).unwrap())
        .unwrap();
    numeric
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn logits_of(model: &Llama, adapter: Option<Adapter>, ids: &[u32]) -> Tensor {
    let device = &model.device;
    let input = Tensor::new(ids, device).unwrap().unsqueeze(0).unwrap();
    let positions: Vec<u32> = (0..ids.len() as u32).collect();
    let positions = Tensor::new(positions.as_slice(), device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&input, &positions, &AttentionMask::Causal, adapter, None)
        .unwrap()
}

#[test]
fn finite_differences_agree_with_backprop_for_every_lora_matrix() {
    let config = tiny_config(40);
    let model = tiny_model(&config, 3, DType::F64);
    let lora = Lora::with_dtype(lora_config(3, 0.1), &config, 5, &Device::Cpu, DType::F64).unwrap();
    randomize_b(&lora, 11);
    // Two packed examples in one row plus one in a second row: masks, positions and GQA
    // are all on the path.
    let batch = batch_of(
        &[
            vec![2, 5, 7, 9, 11],
            vec![3, 4, 8],
            vec![1, 6, 10, 12, 13, 14],
        ],
        8,
    );
    let targets = loss::Targets::of(&batch).unwrap();
    let key = DropoutKey {
        seed: 1,
        step: 0,
        micro_batch: 0,
    };
    let loss_value = || -> Tensor {
        let adapter = Adapter {
            lora: &lora,
            dropout: Some(key),
        };
        loss::token_nll(&model, Some(adapter), &batch, &targets)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss_value().backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (key, var) in lora.named_vars() {
        let grad: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reaches {key}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            grad.iter().any(|g| g.abs() > 1e-9),
            "{key}: gradient is all zero"
        );
        let original: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        for &i in &[0, original.len() / 2, original.len() - 1] {
            let numeric =
                central_difference(var, i, eps, || loss_value().to_scalar::<f64>().unwrap());
            assert!(
                (numeric - grad[i]).abs() <= 1e-6 + 1e-4 * numeric.abs(),
                "{key}[{i}]: finite difference {numeric} vs backprop {}",
                grad[i]
            );
            checked += 1;
        }
    }
    // 2 layers x 7 projections x (A, B) x 3 entries.
    assert_eq!(checked, 2 * 7 * 2 * 3);
}

#[test]
fn frozen_linear_gives_only_the_input_a_gradient() {
    let device = Device::Cpu;
    let x = Var::from_tensor(
        &Tensor::new(
            &[[1f32, 2., 3.], [4., 5., 6.], [0., 1., 0.], [2., 2., 2.]],
            &device,
        )
        .unwrap(),
    )
    .unwrap();
    let w = Tensor::new(&[[0.5f32, -1., 2.], [1., 0., -0.5]], &device).unwrap();
    let y = frozen_linear(x.as_tensor(), &w).unwrap();
    let wt = w.t().unwrap();
    let plain = x.as_tensor().matmul(&wt).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap(), plain.to_vec2::<f32>().unwrap());
    let grads = y.sum_all().unwrap().backward().unwrap();
    let gx = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(gx, vec![vec![1.5, -1.0, 1.5]; 4]);
    // Nothing of the weight's size was computed or kept.
    let shapes: Vec<Vec<usize>> = grads
        .get_ids()
        .map(|id| grads.get_id(*id).unwrap().dims().to_vec())
        .collect();
    assert!(
        !shapes.iter().any(|s| s == &[3, 2] || s == &[2, 3]),
        "{shapes:?}"
    );
    // candle's own matmul computes and keeps a gradient for the (transposed) weight.
    let plain_grads = plain.sum_all().unwrap().backward().unwrap();
    assert_eq!(plain_grads.get(&wt).unwrap().dims(), &[3, 2]);
}

#[test]
fn a_fresh_adapter_leaves_the_output_equal_to_the_base_model() {
    let config = tiny_config(40);
    let model = tiny_model(&config, 3, DType::F32);
    let lora = Lora::new(LoraConfig::default(), &config, 5, &Device::Cpu).unwrap();
    let ids = [2, 9, 4, 17, 30, 5];
    let base = logits_of(&model, None, &ids);
    for dropout in [
        None,
        Some(DropoutKey {
            seed: 1,
            step: 3,
            micro_batch: 0,
        }),
    ] {
        let adapted = logits_of(
            &model,
            Some(Adapter {
                lora: &lora,
                dropout,
            }),
            &ids,
        );
        assert_eq!(max_abs_diff(&base, &adapted), 0.0);
    }
    // With a non-zero B the output does change.
    randomize_b(&lora, 2);
    let adapted = logits_of(
        &model,
        Some(Adapter {
            lora: &lora,
            dropout: None,
        }),
        &ids,
    );
    assert!(max_abs_diff(&base, &adapted) > 1e-4);
}

#[test]
fn packed_examples_see_only_themselves() {
    let config = tiny_config(40);
    let model = tiny_model(&config, 3, DType::F32);
    let (a, b) = (vec![3u32, 8, 1, 22, 7], vec![5u32, 9, 12]);
    let batch = batch_of(&[a.clone(), b.clone()], 8);
    let (rows, width) = batch.input_ids.dims2().unwrap();
    assert_eq!(rows, 1, "both examples share a row");
    let segments: Vec<u32> = batch.segment_ids.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(segments.len(), rows * width);
    let mask = AttentionMask::Packed(std::sync::Arc::new(segments.clone()));
    let packed = model
        .forward(&batch.input_ids, &batch.position_ids, &mask, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let starts: Vec<u32> = batch.seq_starts.to_vec1().unwrap();
    let lens = [a.len(), b.len()];
    for (k, ids) in [a, b].iter().enumerate() {
        let alone = logits_of(&model, None, ids).squeeze(0).unwrap();
        // seq_starts follow the layout order: find the slot holding this example.
        let flat: Vec<u32> = batch.input_ids.flatten_all().unwrap().to_vec1().unwrap();
        let slot = (0..starts.len())
            .find(|&s| {
                let at = starts[s] as usize;
                flat[at..at + lens[k]] == ids[..]
                    && segments[at..at + lens[k]]
                        .iter()
                        .all(|&g| g == segments[at])
            })
            .unwrap();
        let inside = packed.narrow(0, starts[slot] as usize, ids.len()).unwrap();
        assert!(
            max_abs_diff(&alone, &inside) < 1e-5,
            "example {k} sees its neighbour"
        );
    }
}

#[test]
fn greedy_generation_with_the_kv_cache_matches_recomputing_everything() {
    let config = tiny_config(40);
    let model = tiny_model(&config, 4, DType::F32);
    let lora = Lora::new(lora_config(4, 0.0), &config, 5, &Device::Cpu).unwrap();
    randomize_b(&lora, 3);
    let prompt = [2u32, 14, 7, 30];
    let cached = generate_greedy(&model, Some(&lora), &prompt, 12, &[]).unwrap();
    assert_eq!(cached.len(), 12);
    let mut ids = prompt.to_vec();
    for _ in 0..12 {
        let logits = logits_of(
            &model,
            Some(Adapter {
                lora: &lora,
                dropout: None,
            }),
            &ids,
        );
        let last = logits.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
        ids.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    assert_eq!(cached, ids[prompt.len()..]);
    // Stop tokens end generation.
    let stopped = generate_greedy(&model, Some(&lora), &prompt, 12, &[cached[3]]).unwrap();
    assert_eq!(
        stopped,
        cached[..cached.iter().position(|&t| t == cached[3]).unwrap()]
    );
}

#[test]
fn loss_falls_when_overfitting_a_handful_of_examples() {
    let config = tiny_config(40);
    let model = tiny_model(&config, 3, DType::F32);
    let lora = Lora::new(lora_config(8, 0.05), &config, 5, &Device::Cpu).unwrap();
    let batch = batch_of(
        &[
            vec![2, 5, 7, 9, 11, 13],
            vec![3, 4, 8, 16],
            vec![1, 6, 10, 12, 20],
        ],
        16,
    );
    let targets = loss::Targets::of(&batch).unwrap();
    let params: Vec<(String, Var)> = lora
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    let refs: Vec<(String, &Var)> = params.iter().map(|(k, v)| (k.clone(), v)).collect();
    let mut optimizer = optim::AdamW::new(optim::OptimizerConfig::default());
    let mut losses = Vec::new();
    for step in 0..40 {
        let adapter = Adapter {
            lora: &lora,
            dropout: Some(DropoutKey {
                seed: 1,
                step,
                micro_batch: 0,
            }),
        };
        let nll = loss::token_nll(&model, Some(adapter), &batch, &targets).unwrap();
        let mean = nll.mean_all().unwrap();
        losses.push(mean.to_scalar::<f32>().unwrap());
        let backward = mean.backward().unwrap();
        let mut grads: HashMap<String, Tensor> = params
            .iter()
            .map(|(k, v)| (k.clone(), backward.get(v.as_tensor()).unwrap().clone()))
            .collect();
        optim::clip_global_norm(&mut grads, 1.0).unwrap();
        optimizer.step(&refs, &grads, 1e-2).unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first * 0.3, "loss {first} -> {last}: {losses:?}");
}

#[test]
fn peft_files_have_peft_names_shapes_and_config_and_merge_matches() {
    let config = tiny_config(40);
    let mut model = tiny_model(&config, 3, DType::F32);
    let lora = Lora::new(lora_config(4, 0.05), &config, 5, &Device::Cpu).unwrap();
    randomize_b(&lora, 9);
    let dir = tempfile::tempdir().unwrap();
    lora.save_peft(dir.path(), "tiny-base").unwrap();

    let tensors =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(tensors.len(), 2 * 7 * 2);
    assert_eq!(
        lora.parameter_count(),
        lora_config(4, 0.05).parameter_count(&config).unwrap()
    );
    for layer in 0..2 {
        for target in Target::ALL {
            let (out, inp) = config.projection_shape(target);
            let module = if matches!(target, Target::Gate | Target::Up | Target::Down) {
                "mlp"
            } else {
                "self_attn"
            };
            let a = &tensors[&format!(
                "base_model.model.model.layers.{layer}.{module}.{}.lora_A.weight",
                target.name()
            )];
            let b = &tensors[&format!(
                "base_model.model.model.layers.{layer}.{module}.{}.lora_B.weight",
                target.name()
            )];
            assert_eq!((a.dims(), b.dims()), (&[4, inp][..], &[out, 4][..]));
            assert_eq!((a.dtype(), b.dtype()), (DType::F32, DType::F32));
        }
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8.0);
    assert_eq!(json["lora_dropout"], 0.05);
    assert_eq!(json["bias"], "none");
    assert_eq!(json["base_model_name_or_path"], "tiny-base");
    assert_eq!(
        json["target_modules"],
        serde_json::json!([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj"
        ])
    );

    // Loading gives the same adapter, and merging it gives the same logits.
    let loaded = Lora::load_peft(dir.path(), &config, &Device::Cpu).unwrap();
    let ids = [4u32, 8, 15, 16, 23, 39];
    let with_adapter = logits_of(
        &model,
        Some(Adapter {
            lora: &lora,
            dropout: None,
        }),
        &ids,
    );
    let with_loaded = logits_of(
        &model,
        Some(Adapter {
            lora: &loaded,
            dropout: None,
        }),
        &ids,
    );
    assert_eq!(max_abs_diff(&with_adapter, &with_loaded), 0.0);
    loaded.merge_into(&mut model).unwrap();
    let merged = logits_of(&model, None, &ids);
    assert!(max_abs_diff(&with_adapter, &merged) < 1e-4);

    // A wrong shape is refused with the key named.
    let other = tiny_config(40);
    let mut bigger = other.clone();
    bigger.hidden_size = 32;
    let err = Lora::load_peft(dir.path(), &bigger, &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        err.0.contains("base_model.model.model.layers.") && err.0.contains("shape"),
        "{err}"
    );
}

#[test]
fn gguf_and_safetensors_give_the_same_logits() {
    let config = tiny_config(40);
    let model = tiny_model(&config, 6, DType::F32);
    let dir = tempfile::tempdir().unwrap();
    weights::save_hf(&model, &dir.path().join("hf")).unwrap();
    weights::save_gguf(&model, &dir.path().join("tiny.gguf")).unwrap();
    let from_hf = weights::load(&dir.path().join("hf"), &Device::Cpu, DType::F32).unwrap();
    let from_gguf = weights::load(&dir.path().join("tiny.gguf"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(from_hf.config, model.config);
    assert_eq!(from_gguf.config.num_key_value_heads, Some(2));
    let ids = [1u32, 7, 3, 19, 33, 2, 8];
    let reference = logits_of(&model, None, &ids);
    assert_eq!(
        max_abs_diff(&reference, &logits_of(&from_hf, None, &ids)),
        0.0
    );
    assert_eq!(
        max_abs_diff(&reference, &logits_of(&from_gguf, None, &ids)),
        0.0
    );

    // The GGUF file really holds llama.cpp's row order for q and k (else the check
    // above would pass without un-permuting).
    let q = &model.layers[0].projections[Target::Q as usize];
    let permuted = weights::permute(q, 4).unwrap();
    assert!(max_abs_diff(q, &permuted) > 0.0);
    assert_eq!(
        max_abs_diff(q, &weights::unpermute(&permuted, 4).unwrap()),
        0.0
    );

    // Bad paths are named.
    let err = weights::load(&dir.path().join("missing"), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn sharded_safetensors_load_like_one_file() {
    let config = tiny_config(40);
    let model = tiny_model(&config, 6, DType::F32);
    let dir = tempfile::tempdir().unwrap();
    weights::save_hf(&model, dir.path()).unwrap();
    let single = dir.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    std::fs::remove_file(&single).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let subset: HashMap<String, Tensor> = part
            .iter()
            .map(|&n| (n.clone(), tensors[n].clone()))
            .collect();
        candle_core::safetensors::save(&subset, dir.path().join(&file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let sharded = weights::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let ids = [3u32, 1, 4, 1, 5, 9, 2, 6];
    assert_eq!(
        max_abs_diff(
            &logits_of(&model, None, &ids),
            &logits_of(&sharded, None, &ids)
        ),
        0.0
    );
}

#[test]
fn rope_scaling_matches_transformers() {
    let mut config = tiny_config(40);
    config.head_dim = Some(64);
    config.rope_theta = 500_000.0;
    config.rope_scaling = Some(
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    );
    // transformers 5.24 `ROPE_INIT_FUNCTIONS["llama3"]` for the same settings: the high
    // frequencies kept, the middle band smoothed, the low ones divided by the factor.
    let expected = [
        (0, 1.0),
        (1, 0.663_601_3),
        (14, 0.003_211_446_1),
        (15, 0.001_371_893_7),
        (16, 0.000_524_846_02),
        (17, 0.000_178_507_79),
        (18, 7.784_655_5e-5),
        (31, 3.767_322_6e-7),
    ];
    let inv = config.inverse_frequencies();
    assert_eq!(inv.len(), 32);
    for (i, want) in expected {
        assert!(
            ((inv[i] as f64) - want).abs() <= 1e-6 * want,
            "llama3 frequency {i}: {} vs {want}",
            inv[i]
        );
    }
    config.rope_theta = 10_000.0;
    config.rope_scaling = Some(serde_json::json!({"rope_type": "linear", "factor": 4.0}));
    let inv = config.inverse_frequencies();
    for (i, want) in [
        (0, 0.25),
        (1, 0.187_473_55),
        (2, 0.140_585_33),
        (3, 0.105_424_13),
    ] {
        assert!(
            ((inv[i] as f64) - want).abs() <= 1e-6 * want,
            "linear frequency {i}: {} vs {want}",
            inv[i]
        );
    }
    // Unknown kinds are refused rather than silently ignored.
    config.rope_scaling = Some(serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    let tensors = weights::random_tensors(&config, 1);
    let err = Llama::from_tensors(
        config,
        |n| Ok(tensors.get(n).cloned()),
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("yarn"), "{err}");
}

/// bf16 on the CPU composes RMS norm (as CUDA does) and runs attention blockwise on
/// widened values. Its logits must match the f32 path up to bf16 precision, for a causal
/// sequence and for packed rows. (The composed attention itself is checked against the
/// fused op in `step::the_composed_attention_agrees_with_the_fused_op`.)
#[test]
fn the_composed_path_agrees_with_the_fused_one() {
    let config = tiny_config(40);
    let tensors = weights::random_tensors(&config, 12);
    let load = |dtype| {
        Llama::from_tensors(
            config.clone(),
            |n| Ok(tensors.get(n).cloned()),
            &Device::Cpu,
            dtype,
        )
        .unwrap()
    };
    let (fused, composed) = (load(DType::F32), load(DType::BF16));
    let ids = [2u32, 9, 4, 17, 30, 5, 11];
    let (a, b) = (
        logits_of(&fused, None, &ids),
        logits_of(&composed, None, &ids),
    );
    let scale = a
        .abs()
        .unwrap()
        .max_keepdim(2)
        .unwrap()
        .max_keepdim(1)
        .unwrap()
        .flatten_all()
        .unwrap();
    let scale = scale.to_vec1::<f32>().unwrap()[0] as f64;
    assert!(max_abs_diff(&a, &b.to_dtype(DType::F32).unwrap()) < 0.05 * scale);

    let batch = batch_of(&[vec![3, 8, 1, 22, 7], vec![5, 9, 12], vec![6, 6, 2, 1]], 8);
    let segments: Vec<u32> = batch.segment_ids.flatten_all().unwrap().to_vec1().unwrap();
    let mask = AttentionMask::Packed(std::sync::Arc::new(segments));
    let run = |m: &Llama| {
        m.forward(&batch.input_ids, &batch.position_ids, &mask, None, None)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    assert!(max_abs_diff(&run(&fused), &run(&composed)) < 0.05 * scale);
}
