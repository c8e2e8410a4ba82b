//! The memory-bounded training step: blockwise attention against a plain f64 softmax and
//! finite differences, and activation checkpointing and the chunked loss against the
//! one-graph reference (`token_nll` + backward), whose gradients the model tests check by
//! finite differences.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use corpusdb::model::{attention, AttentionMask, DropoutKey, Lora};
use corpusdb::train::step::{accumulate_gradients, StepOptions};
use corpusdb::train::{loss, Checkpointing};

use crate::model::{
    batch_of, central_difference, lora_config, max_abs_diff, randomize_b, tiny_config, tiny_model,
};

/// Deterministic normal values (standard deviation 0.5).
fn values(seed: u64, n: usize) -> Vec<f64> {
    corpusdb::model::rng::normal(seed, &[n as u64], n, 0.5)
        .into_iter()
        .map(|v| v as f64)
        .collect()
}

/// A tensor's values in f64, flattened.
fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `‖got − want‖ / ‖want‖` over paired values.
fn relative_error<'a>(pairs: impl IntoIterator<Item = (&'a [f64], &'a [f64])>) -> f64 {
    let (mut diff, mut norm) = (0.0, 0.0);
    for (got, want) in pairs {
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(want) {
            diff += (a - b) * (a - b);
            norm += b * b;
        }
    }
    assert!(norm > 0.0, "zero reference");
    (diff / norm).sqrt()
}

/// `softmax(q·kᵀ·scale + mask)·v` by the definition, in f64, for the stacked layout
/// `q: [b, kv, group × t, d]`, `k`, `v`: `[b, kv, past + t, d]`.
#[allow(clippy::too_many_arguments)]
fn reference_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    (b, kv, rows, d): (usize, usize, usize, usize),
    t: usize,
    past: usize,
    segments: Option<&[u32]>,
    scale: f64,
) -> Vec<f64> {
    let s = past + t;
    let mut out = vec![0.0; q.len()];
    for row in 0..b {
        for h in 0..kv {
            let pair = row * kv + h;
            for r in 0..rows {
                let i = r % t;
                let visible: Vec<usize> = (0..s)
                    .filter(|&j| {
                        j <= past + i
                            && segments.is_none_or(|seg| seg[row * t + i] == seg[row * t + j])
                    })
                    .collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|x| q[(pair * rows + r) * d + x] * k[(pair * s + j) * d + x])
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for (w, &j) in weights.iter().zip(&visible) {
                    for x in 0..d {
                        out[(pair * rows + r) * d + x] += w / total * v[(pair * s + j) * d + x];
                    }
                }
            }
        }
    }
    out
}

/// Packed segment ids for rows of width `t`: runs of the given lengths, then padding (0).
fn packed(rows: &[&[usize]], t: usize) -> Vec<u32> {
    let mut ids = Vec::new();
    for runs in rows {
        let mut row = Vec::new();
        for (n, &len) in runs.iter().enumerate() {
            row.extend(std::iter::repeat_n(n as u32 + 1, len));
        }
        row.resize(t, 0);
        ids.extend(row);
    }
    ids
}

struct Case {
    b: usize,
    kv: usize,
    group: usize,
    t: usize,
    past: usize,
    d: usize,
    segments: Option<Vec<u32>>,
}

impl Case {
    fn tensors(&self, dtype: DType) -> (Tensor, Tensor, Tensor) {
        let (rows, s) = (self.group * self.t, self.past + self.t);
        let make = |seed, n| {
            Tensor::from_vec(
                values(seed, self.b * self.kv * n * self.d),
                (self.b, self.kv, n, self.d),
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
        };
        (make(1, rows), make(2, s), make(3, s))
    }

    fn mask(&self) -> AttentionMask {
        match &self.segments {
            Some(ids) => AttentionMask::Packed(Arc::new(ids.clone())),
            None => AttentionMask::Causal,
        }
    }

    fn check_forward(&self, dtype: DType, tolerance: f64) {
        let (q, k, v) = self.tensors(dtype);
        let mask = self.mask();
        let prepared =
            attention::prepare(&mask, self.b, self.t, self.past, &Device::Cpu, dtype).unwrap();
        let scale = 1.0 / (self.d as f64).sqrt();
        let out = attention::attend(&q, &k, &v, scale, &prepared).unwrap();
        assert_eq!(out.dims(), q.dims());
        let expected = reference_attention(
            &flat(&q),
            &flat(&k),
            &flat(&v),
            (self.b, self.kv, self.group * self.t, self.d),
            self.t,
            self.past,
            self.segments.as_deref(),
            scale,
        );
        let got = flat(&out);
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < tolerance, "max difference {worst} ({dtype:?})");
    }
}

#[test]
fn blockwise_attention_matches_the_definition() {
    // Several 64-query and 64-key blocks, GQA groups, packed runs that cross block
    // boundaries, padding, and a single-token example.
    let t = 150;
    let packed_case = Case {
        b: 2,
        kv: 2,
        group: 2,
        t,
        past: 0,
        d: 8,
        segments: Some(packed(&[&[70, 1, 66], &[150]], t)),
    };
    packed_case.check_forward(DType::F64, 1e-12);
    packed_case.check_forward(DType::F32, 1e-5);
    // Causal with cached positions before the new tokens (generation).
    Case {
        b: 1,
        kv: 3,
        group: 1,
        t: 70,
        past: 90,
        d: 4,
        segments: None,
    }
    .check_forward(DType::F64, 1e-12);
    // Segment ids that come back after another one: only equal ids see each other.
    let mut scattered = packed(&[&[20, 30, 20]], 70);
    scattered[50..].iter_mut().for_each(|s| *s = 1);
    Case {
        b: 1,
        kv: 1,
        group: 2,
        t: 70,
        past: 0,
        d: 4,
        segments: Some(scattered),
    }
    .check_forward(DType::F64, 1e-12);
}

/// The composed path (candle ops and an additive mask: what CUDA runs) and the fused op
/// give the same output and the same gradients of q, k and v.
#[test]
fn the_composed_attention_agrees_with_the_fused_op() {
    let t = 90;
    let case = Case {
        b: 2,
        kv: 2,
        group: 3,
        t,
        past: 0,
        d: 8,
        segments: Some(packed(&[&[40, 1, 30], &[90]], t)),
    };
    let mask = case.mask();
    let (q, k, v) = case.tensors(DType::F64);
    let weights = Tensor::from_vec(values(5, q.elem_count()), q.shape(), &Device::Cpu).unwrap();
    let run = |composed: bool| {
        let prepared = if composed {
            attention::prepare_composed(&mask, 2, t, 0, &Device::Cpu, DType::F64)
        } else {
            attention::prepare(&mask, 2, t, 0, &Device::Cpu, DType::F64)
        }
        .unwrap();
        let vars = [&q, &k, &v].map(|x| Var::from_tensor(x).unwrap());
        let out = attention::attend(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            0.3,
            &prepared,
        )
        .unwrap();
        let grads = (&out * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut all = vec![out];
        all.extend(
            vars.iter()
                .map(|v| grads.get(v.as_tensor()).unwrap().clone()),
        );
        all
    };
    for (name, (a, b)) in ["output", "dq", "dk", "dv"]
        .iter()
        .zip(run(false).iter().zip(run(true).iter()))
    {
        let diff = max_abs_diff(a, b);
        assert!(diff < 1e-12, "{name}: fused and composed differ by {diff}");
    }
}

#[test]
fn blockwise_attention_gradients_agree_with_finite_differences() {
    let t = 80;
    let case = Case {
        b: 1,
        kv: 2,
        group: 2,
        t,
        past: 0,
        d: 4,
        segments: Some(packed(&[&[30, 45]], t)),
    };
    let (q, k, v) = case.tensors(DType::F64);
    let mask = case.mask();
    let prepared = attention::prepare(&mask, 1, t, 0, &Device::Cpu, DType::F64).unwrap();
    let weights = Tensor::from_vec(values(9, q.elem_count()), q.shape(), &Device::Cpu).unwrap();
    let (q, k, v) = (
        Var::from_tensor(&q).unwrap(),
        Var::from_tensor(&k).unwrap(),
        Var::from_tensor(&v).unwrap(),
    );
    let objective = || -> Tensor {
        let out =
            attention::attend(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.5, &prepared).unwrap();
        (out * &weights).unwrap().sum_all().unwrap()
    };
    let grads = objective().backward().unwrap();
    let eps = 1e-6;
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        let grad: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let original: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        let n = original.len();
        // Entries in the first and last blocks, in both segments and in the padding.
        for i in [0, 7, n / 3 + 1, n / 2 + 3, n - 5, n - 1] {
            let numeric =
                central_difference(var, i, eps, || objective().to_scalar::<f64>().unwrap());
            assert!(
                (numeric - grad[i]).abs() <= 1e-7 + 1e-5 * numeric.abs(),
                "d{name}[{i}]: finite difference {numeric} vs backprop {}",
                grad[i]
            );
        }
    }
}

/// Gradients of every LoRA matrix and the summed loss, by the layer-by-layer driver.
fn driven(
    model: &corpusdb::model::Llama,
    lora: &Lora,
    batch: &corpusdb::batches::Batch,
    checkpointing: Checkpointing,
    loss_chunk: usize,
) -> (f64, HashMap<String, Tensor>) {
    let targets = loss::Targets::of(batch).unwrap();
    let mut grads = HashMap::new();
    let key = DropoutKey {
        seed: 4,
        step: 2,
        micro_batch: 1,
    };
    let options = StepOptions {
        checkpointing,
        loss_chunk,
    };
    let nll = accumulate_gradients(model, lora, key, batch, &targets, options, &mut grads).unwrap();
    (nll, grads)
}

/// The driver's loss and gradients in every mode (checkpointing, loss chunk) against one
/// graph over the whole batch (`token_nll` + backward), within `tolerance` of each
/// gradient's largest value.
fn assert_driven_matches_one_graph(model: &corpusdb::model::Llama, lora: &Lora, tolerance: f64) {
    let batch = batch_of(
        &[
            vec![2, 5, 7, 9, 11, 3, 3, 8],
            vec![3, 4, 8],
            vec![1, 6, 10, 12, 13, 14, 30],
            vec![9, 9, 1],
        ],
        12,
    );
    let targets = loss::Targets::of(&batch).unwrap();
    // The reference: one graph, all logits at once.
    let adapter = corpusdb::model::Adapter {
        lora,
        dropout: Some(DropoutKey {
            seed: 4,
            step: 2,
            micro_batch: 1,
        }),
    };
    let nll = loss::token_nll(model, Some(adapter), &batch, &targets)
        .unwrap()
        .sum_all()
        .unwrap();
    let reference_loss = nll
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let reference = nll.backward().unwrap();
    let dtype = model.dtype;
    for (checkpointing, chunk) in [
        (Checkpointing::None, 1024),
        (Checkpointing::Layers, 1024),
        (Checkpointing::Layers, 5),
        (Checkpointing::None, 1),
    ] {
        let (loss, grads) = driven(model, lora, &batch, checkpointing, chunk);
        assert!(
            (loss - reference_loss).abs() <= tolerance * reference_loss.abs(),
            "{checkpointing:?}/{chunk} {dtype:?}: loss {loss} vs {reference_loss}"
        );
        let vars = lora.named_vars();
        assert_eq!(grads.len(), vars.len(), "every matrix gets a gradient");
        for (key, var) in vars {
            let expected = reference.get(var.as_tensor()).unwrap();
            let got = &grads[&key];
            let scale = max_abs_diff(expected, &expected.zeros_like().unwrap());
            let diff = max_abs_diff(got, expected);
            assert!(scale > 0.0, "{key}: zero reference gradient");
            assert!(
                diff <= tolerance * scale,
                "{checkpointing:?}/{chunk} {dtype:?} {key}: differs by {diff} (scale {scale})"
            );
        }
    }
}

/// In f32 on the CPU the driver runs each layer by hand (`model::cpu_layer`); in f64 it
/// runs candle's graph: both against the one-graph reference.
#[test]
fn checkpointed_and_chunked_steps_give_the_one_graph_gradients() {
    for dtype in [DType::F64, DType::F32] {
        let mut config = tiny_config(40);
        config.num_hidden_layers = 3;
        let model = tiny_model(&config, 3, dtype);
        let lora = Lora::with_dtype(lora_config(3, 0.1), &config, 5, &Device::Cpu, dtype).unwrap();
        randomize_b(&lora, 11);
        let tolerance = if dtype == DType::F64 { 1e-11 } else { 2e-5 };
        assert_driven_matches_one_graph(&model, &lora, tolerance);
    }
}

/// The hand-written layer with some projections not adapted and without dropout, and
/// with heads that share no key/value head (one group each).
#[test]
fn the_layer_by_hand_handles_partial_targets_and_no_dropout() {
    for (kv_heads, dropout, targets) in [
        (2, 0.0, vec!["q_proj", "v_proj", "down_proj"]),
        (4, 0.3, vec!["k_proj", "o_proj", "gate_proj", "up_proj"]),
    ] {
        let mut config = tiny_config(40);
        config.num_key_value_heads = Some(kv_heads);
        let model = tiny_model(&config, 8, DType::F32);
        let mut lora_settings = lora_config(4, dropout);
        lora_settings.targets = targets.iter().map(|t| t.to_string()).collect();
        let lora = Lora::new(lora_settings, &config, 6, &Device::Cpu).unwrap();
        randomize_b(&lora, 12);
        assert_driven_matches_one_graph(&model, &lora, 2e-5);
    }
}

/// The kept bits of a dropout mask are the f32 mask's non-zero values, across the
/// parallel chunks' boundaries.
#[test]
fn dropout_bits_are_the_dropout_mask() {
    use corpusdb::model::rng;
    let n = (1 << 16) * 2 + 77;
    let mask = rng::dropout_mask(3, &[1, 2, 3, 4], n, 0.3);
    let bits = rng::dropout_bits(3, &[1, 2, 3, 4], n, 0.3);
    assert_eq!(bits.len(), n.div_ceil(64));
    let kept = (0..n)
        .filter(|&i| bits[i / 64] >> (i % 64) & 1 == 1)
        .count();
    assert!(
        (kept as f64 / n as f64 - 0.7).abs() < 0.01,
        "{kept} of {n} kept"
    );
    for (i, &m) in mask.iter().enumerate() {
        assert_eq!(bits[i / 64] >> (i % 64) & 1 == 1, m != 0.0, "value {i}");
    }
    assert!(bits[n / 64] >> (n % 64) == 0, "no bits past the end");
}

#[test]
fn a_checkpointed_step_is_deterministic_and_accumulates() {
    let config = tiny_config(40);
    let model = tiny_model(&config, 7, DType::F32);
    let lora = Lora::new(lora_config(2, 0.2), &config, 1, &Device::Cpu).unwrap();
    randomize_b(&lora, 2);
    let batch = batch_of(&[vec![4, 8, 15, 16, 23, 42 % 40], vec![1, 2, 3]], 8);
    let (loss_a, a) = driven(&model, &lora, &batch, Checkpointing::Layers, 4);
    let (loss_b, b) = driven(&model, &lora, &batch, Checkpointing::Layers, 4);
    assert_eq!(loss_a, loss_b);
    for (key, g) in &a {
        let (x, y): (Vec<f32>, Vec<f32>) = (
            g.flatten_all().unwrap().to_vec1().unwrap(),
            b[key].flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(x, y, "{key} differs between identical runs");
    }
    // A second micro-batch adds to the same map: the sum of two identical ones is twice one.
    let targets = loss::Targets::of(&batch).unwrap();
    let mut twice = a.clone();
    let key = DropoutKey {
        seed: 4,
        step: 2,
        micro_batch: 1,
    };
    let options = StepOptions {
        checkpointing: Checkpointing::Layers,
        loss_chunk: 4,
    };
    accumulate_gradients(&model, &lora, key, &batch, &targets, options, &mut twice).unwrap();
    for (key, g) in &a {
        let doubled = (g * 2.0).unwrap();
        let diff = max_abs_diff(&twice[key], &doubled);
        assert!(diff < 1e-6, "{key}: accumulated gradient off by {diff}");
    }
}

/// The numerics of a bf16 base (what CUDA runs), tested on the CPU: bf16 weights and
/// activations, f32 adapter and loss. Its loss and LoRA gradients must match the same model
/// in f64 within bf16's precision (8 bits of mantissa), with and without checkpointing.
#[test]
fn a_bf16_base_gives_the_f64_gradients_within_bf16_precision() {
    let mut config = tiny_config(40);
    config.num_hidden_layers = 3;
    let batch = batch_of(
        &[
            vec![2, 5, 7, 9, 11, 3, 3, 8],
            vec![3, 4, 8],
            vec![1, 6, 10, 12, 13, 14, 30],
        ],
        12,
    );
    let setup = |model_dtype, lora_dtype| {
        let model = tiny_model(&config, 3, model_dtype);
        let lora =
            Lora::with_dtype(lora_config(3, 0.1), &config, 5, &Device::Cpu, lora_dtype).unwrap();
        randomize_b(&lora, 11);
        (model, lora)
    };
    let (exact_model, exact_lora) = setup(DType::F64, DType::F64);
    let (exact_loss, exact) = driven(&exact_model, &exact_lora, &batch, Checkpointing::None, 1024);
    let (model, lora) = setup(DType::BF16, DType::F32);
    for checkpointing in [Checkpointing::None, Checkpointing::Layers] {
        let (loss, grads) = driven(&model, &lora, &batch, checkpointing, 7);
        assert!(
            (loss - exact_loss).abs() <= 0.01 * exact_loss,
            "{checkpointing:?}: bf16 loss {loss} vs f64 {exact_loss}"
        );
        assert_eq!(grads.len(), exact.len());
        // Relative error of the whole gradient: ‖g_bf16 − g_f64‖ / ‖g_f64‖.
        let pairs: Vec<(Vec<f64>, Vec<f64>)> = exact
            .iter()
            .map(|(key, reference)| (flat(&grads[key]), flat(reference)))
            .collect();
        let relative = relative_error(pairs.iter().map(|(g, w)| (g.as_slice(), w.as_slice())));
        assert!(
            relative < 0.05,
            "{checkpointing:?}: bf16 gradients are {relative:.4} away from f64"
        );
        // Not trivially equal: bf16 rounding must be visible.
        assert!(relative > 1e-6, "bf16 gave exactly the f64 gradients");
    }
}

/// The layer written with tensor ops (CUDA's path, here with the composed attention)
/// against candle's graph of the same layer: output, input gradient and every LoRA
/// gradient, in f32 and over a bf16 base, with and without kept activations.
#[test]
fn the_tensor_layer_gives_the_graph_gradients() {
    use corpusdb::model::tensor_layer;
    let relative = |a: &Tensor, b: &Tensor| relative_error([(&flat(a)[..], &flat(b)[..])]);
    let (b, t) = (2, 9);
    let segments: Vec<u32> = [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 2, 2].to_vec();
    let positions: Vec<u32> = [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 0, 1].to_vec();
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 0.03)] {
        let mut config = tiny_config(40);
        config.intermediate_size = 40;
        let model = tiny_model(&config, 21, dtype);
        let lora = Lora::new(lora_config(4, 0.2), &config, 7, &Device::Cpu).unwrap();
        randomize_b(&lora, 13);
        let mask = AttentionMask::Packed(Arc::new(segments.clone()));
        let positions = Tensor::from_vec(positions.clone(), (b, t), &Device::Cpu).unwrap();
        let h = config.hidden_size;
        let x = Tensor::from_vec(values(31, b * t * h), (b, t, h), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let upstream = Tensor::from_vec(values(32, b * t * h), (b, t, h), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let key = DropoutKey {
            seed: 9,
            step: 3,
            micro_batch: 1,
        };
        // The graph: sum(y · upstream) back-propagated from the layer's output.
        let graph_context = model.context(&positions, &mask, 0).unwrap();
        let input = Var::from_tensor(&x).unwrap();
        let adapter = corpusdb::model::Adapter {
            lora: &lora,
            dropout: Some(key),
        };
        let y_graph = model
            .decoder_layer(1, input.as_tensor(), &graph_context, Some(adapter), None)
            .unwrap();
        let store = (&y_graph * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx_graph = store.get(input.as_tensor()).unwrap();

        let context = model.context_composed(&positions, &mask).unwrap();
        assert!(tensor_layer::supported(&model, &lora, &context));
        for keep in [true, false] {
            let (y, kept) =
                tensor_layer::forward(&model, &lora, 1, &x, &context, key, keep).unwrap();
            assert_eq!(kept.is_some(), keep);
            let error = relative(&y, &y_graph);
            assert!(error < tolerance, "{dtype:?}: output {error}");
            let mut grads = HashMap::new();
            let dx = tensor_layer::backward(
                &model, &lora, 1, &x, &context, key, kept, &upstream, true, &mut grads,
            )
            .unwrap()
            .expect("the input gradient was asked for");
            let error = relative(&dx, dx_graph);
            assert!(
                error < tolerance,
                "{dtype:?} keep {keep}: input gradient {error}"
            );
            let mut compared = 0;
            for (name, var) in lora.named_vars() {
                if !name.contains("layers.1.") {
                    continue;
                }
                let expected = store.get(var.as_tensor()).unwrap();
                let error = relative(&grads[&name], expected);
                assert!(error < tolerance, "{dtype:?} keep {keep} {name}: {error}");
                compared += 1;
            }
            assert_eq!(compared, 14, "seven projections, A and B each");
            assert_eq!(grads.len(), 14);
            // Without the input gradient the LoRA gradients are the same.
            let mut again = HashMap::new();
            let none = tensor_layer::backward(
                &model, &lora, 1, &x, &context, key, None, &upstream, false, &mut again,
            )
            .unwrap();
            assert!(none.is_none());
            for (name, g) in &grads {
                assert!(relative(&again[name], g) < 1e-6, "{name}");
            }
        }
    }
}

/// The loss chunk with tensor ops (CUDA's path, composed here) against the CPU's chunk by
/// hand: the same summed loss and gradient of the rows in f32, and within bf16 rounding
/// over a bf16 base.
#[test]
fn the_tensor_loss_chunk_gives_the_cpu_chunk() {
    let config = tiny_config(40);
    let h = config.hidden_size;
    let n = 11;
    let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % 40).collect();
    let rows = Tensor::from_vec(values(41, n * h), (n, h), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let exact = tiny_model(&config, 5, DType::F32);
    let (want_nll, want) = loss::chunk_by_hand(&exact, &rows, &tokens).unwrap();
    let want = flat(&want);
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 0.02)] {
        let model = tiny_model(&config, 5, dtype);
        let (nll, gradient) =
            loss::chunk_with_tensors(&model, &rows.to_dtype(dtype).unwrap(), &tokens).unwrap();
        assert!(
            (nll - want_nll).abs() <= tolerance * want_nll.abs(),
            "{dtype:?}: loss {nll} vs {want_nll}"
        );
        let relative = relative_error([(&flat(&gradient)[..], &want[..])]);
        assert!(relative < tolerance, "{dtype:?}: gradient {relative}");
    }
    let bad = loss::chunk_with_tensors(&exact, &rows, &[40; 11]).unwrap_err();
    assert!(bad.to_string().contains("outside the vocabulary"), "{bad}");
}
