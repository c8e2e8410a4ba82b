//! corpusdb's trainer on a GPU: correctness against the CPU, and LoRA training speed.
//! `scripts/gpu-check` builds this with `--features cuda` and runs it beside PyTorch + PEFT.
//!
//! ```text
//! gpu --check [--device cuda|cpu] [--emulate]
//!     CUDA against the CPU on a small random model (f32 reference on the CPU):
//!     the dropout kernel bit for bit, LoRA gradients of one micro-batch (CUDA f32 with
//!     corpusdb's kernels, with candle's composed ops, and bf16), the losses of the first
//!     optimizer steps, and a checkpoint written on one device resumed on the other.
//!     Prints one JSON object; exits 1 when a comparison is outside its tolerance.
//!     `--emulate` runs the "device" side on the CPU with the composed ops CUDA uses.
//! gpu --speed --model DIR [--rows 8] [--seq 2048] [--steps 3] [--checkpointing layers|none]
//!     [--dtype bf16|f32] [--device cuda|cpu]
//!     Full optimizer steps (LoRA r=32, alpha 64, dropout 0.05 on all seven projections,
//!     AdamW) on random token ids with every token trained, as benches/peft_baseline.py
//!     does; prints one JSON object (tokens/s, step times, losses).
//! gpu --profile --model DIR [--rows 4] [--seq 2048] [--dtype bf16|f32] [--device cuda|cpu]
//!     Where a step's time goes: one decoder layer, attention, the frozen products, the
//!     LoRA deltas, RMS norm and the loss, each timed alone (milliseconds).
//! ```
//!
//! Under `cargo test --all-targets` (no arguments) it runs the emulated check on a tiny
//! model: the fused CPU ops against the composed ones, f32 and bf16.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use corpusdb::batches::{self, Batch, BatchOptions, Tokenized};
use corpusdb::model::{self, weights, DropoutKey, Llama, LlamaConfig, Lora, LoraConfig};
use corpusdb::train::step::{accumulate_gradients, StepOptions};
use corpusdb::train::{checkpoint, loss, optim, Checkpointing};
use serde_json::{json, Value};

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].as_str())
}

fn device_of(name: Option<&str>) -> Device {
    match name.unwrap_or(if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "cpu"
    }) {
        "cpu" => Device::Cpu,
        "cuda" => {
            let device =
                Device::new_cuda(0).expect("a CUDA device (this binary needs --features cuda)");
            #[cfg(feature = "cuda")]
            if let Device::Cuda(cuda) = &device {
                model::cuda::tune_for_training(cuda).unwrap();
            }
            device
        }
        other => panic!("--device is cpu or cuda, not {other}"),
    }
}

fn dtype_of(name: Option<&str>) -> DType {
    match name.unwrap_or("bf16") {
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        other => panic!("--dtype is bf16 or f32, not {other}"),
    }
}

/// One micro-batch of `rows` x `seq` random token ids, every token trained.
fn random_batch(vocab: usize, rows: usize, seq: usize, seed: u64) -> (Batch, loss::Targets) {
    let mut rng = model::rng::SplitMix64::new(seed);
    let examples = (0..rows)
        .map(|i| {
            let ids: Vec<u32> = (0..seq).map(|_| rng.below(vocab as u64) as u32).collect();
            let trained = vec![true; seq];
            (i as u64, i as u64, Tokenized { ids, trained })
        })
        .collect();
    let options = BatchOptions {
        batch_size: rows,
        max_seq_len: seq,
        packing: true,
        rank: 0,
        ranks: 1,
    };
    let batch = batches::assemble(examples, 0, &options).expect("a batch");
    let targets = loss::Targets::of(&batch).expect("targets");
    (batch, targets)
}

/// A model, its adapter and optimizer on one device.
struct Trainer {
    model: Llama,
    lora: Lora,
    optimizer: optim::AdamW,
    checkpointing: Checkpointing,
}

impl Trainer {
    fn new(
        model: Llama,
        device: &Device,
        checkpointing: Checkpointing,
        b_seed: Option<u64>,
    ) -> Trainer {
        let mut lora = Lora::new(LoraConfig::default(), &model.config, 1, device).unwrap();
        if let Some(seed) = b_seed {
            // Non-zero B so that A has a gradient too (B starts at zero).
            let tensors: HashMap<String, Tensor> = lora
                .named_vars()
                .into_iter()
                .enumerate()
                .map(|(i, (key, var))| {
                    let t = var.as_tensor();
                    let values = if key.contains("lora_B") {
                        model::rng::normal(seed, &[i as u64], t.elem_count(), 0.02)
                    } else {
                        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    };
                    let t = Tensor::from_vec(values, t.shape(), device).unwrap();
                    (key, t)
                })
                .collect();
            lora.assign(&tensors).unwrap();
        }
        Trainer {
            model,
            lora,
            optimizer: optim::AdamW::new(optim::OptimizerConfig::default()),
            checkpointing,
        }
    }

    /// Gradients (mean over trained tokens) of one micro-batch, and its mean loss.
    fn gradients(
        &self,
        batch: &Batch,
        targets: &loss::Targets,
        step: u64,
    ) -> (HashMap<String, Tensor>, f64) {
        let key = DropoutKey {
            seed: 1,
            step,
            micro_batch: 0,
        };
        let options = StepOptions {
            checkpointing: self.checkpointing,
            loss_chunk: 1024,
        };
        let mut grads = HashMap::new();
        let nll = accumulate_gradients(
            &self.model,
            &self.lora,
            key,
            batch,
            targets,
            options,
            &mut grads,
        )
        .unwrap();
        let n = targets.len() as f64;
        for g in grads.values_mut() {
            *g = (&*g / n).unwrap();
        }
        (grads, nll / n)
    }

    /// One optimizer step; returns the mean loss.
    fn step(&mut self, batch: &Batch, targets: &loss::Targets, step: u64) -> f64 {
        let (mut grads, loss) = self.gradients(batch, targets, step);
        optim::clip_global_norm(&mut grads, 1.0).unwrap();
        let params: Vec<(String, &Var)> = self.lora.named_vars();
        self.optimizer.step(&params, &grads, 1e-3).unwrap();
        // Wait for the device, so that a step's time is its own.
        self.model.device.synchronize().unwrap();
        loss
    }

    fn lora_values(&self) -> HashMap<String, Vec<f32>> {
        self.lora
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, flat(v.as_tensor())))
            .collect()
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max |a| over all keys of `reference`.
fn relative_error(reference: &HashMap<String, Vec<f32>>, other: &HashMap<String, Vec<f32>>) -> f64 {
    let (mut diff, mut scale) = (0f64, 0f64);
    for (key, a) in reference {
        let b = &other[key];
        for (x, y) in a.iter().zip(b) {
            diff = diff.max((f64::from(*x) - f64::from(*y)).abs());
            scale = scale.max(f64::from(*x).abs());
        }
    }
    diff / scale.max(f64::MIN_POSITIVE)
}

fn grads_f32(grads: &HashMap<String, Tensor>) -> HashMap<String, Vec<f32>> {
    grads.iter().map(|(k, g)| (k.clone(), flat(g))).collect()
}

fn check_config(tiny: bool) -> LlamaConfig {
    let (hidden, layers, intermediate, vocab, heads) = if tiny {
        (64, 2, 172, 512, 4)
    } else {
        (256, 4, 688, 4096, 8)
    };
    serde_json::from_value(json!({
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads / 2, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
    }))
    .unwrap()
}

/// The relative error of what `run` returns with corpusdb's CUDA kernels against candle's
/// composed ops (the same on the CPU, where the kernels do not exist).
fn kernels_against_composed(mut run: impl FnMut() -> HashMap<String, Vec<f32>>) -> f64 {
    set_kernels(true);
    let kernels = run();
    set_kernels(false);
    let composed = run();
    set_kernels(true);
    relative_error(&composed, &kernels)
}

fn set_kernels(_on: bool) {
    #[cfg(feature = "cuda")]
    model::cuda::set_kernels_enabled(_on);
}

fn set_flash(_on: bool) {
    #[cfg(feature = "cuda")]
    model::cuda::set_flash_enabled(_on);
}

/// CUDA (or `device`) against the CPU; returns the report and whether everything passed.
/// `emulate` (with the CPU as `device`) runs the device's side with the composed ops CUDA
/// uses where it has no kernel of its own, so the CPU can try the GPU's code paths.
fn check(device: &Device, tiny: bool, emulate: bool) -> (Value, bool) {
    let on_device = |yes: bool| model::set_composed_ops(emulate && yes);
    let config = check_config(tiny);
    let tensors = weights::random_tensors(&config, 5);
    let load = |device: &Device, dtype: DType| {
        Llama::from_tensors(
            config.clone(),
            |n| Ok(tensors.get(n).cloned()),
            device,
            dtype,
        )
        .unwrap()
    };
    let (rows, seq) = if tiny { (2, 32) } else { (2, 256) };
    let (batch, targets) = random_batch(config.vocab_size, rows, seq, 11);
    let mut report = serde_json::Map::new();
    let mut passed = true;
    let mut verdict =
        |name: &str, value: f64, tolerance: f64, report: &mut serde_json::Map<String, Value>| {
            let ok = value <= tolerance;
            passed &= ok;
            report.insert(
                name.into(),
                json!({"value": value, "tolerance": tolerance, "ok": ok}),
            );
        };

    // 1. The dropout kernel draws the CPU's mask bit for bit (an odd size crosses chunks).
    let n = 3 * 65_536 + 17;
    let x = Tensor::from_vec(model::rng::normal(3, &[1], n, 1.0), n, &Device::Cpu).unwrap();
    let cpu = model::lora::keyed_dropout(&x, 9, [1, 2, 3, 4], 0.05).unwrap();
    on_device(true);
    let dev =
        model::lora::keyed_dropout(&x.to_device(device).unwrap(), 9, [1, 2, 3, 4], 0.05).unwrap();
    on_device(false);
    let d = (cpu - dev.to_device(&Device::Cpu).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    verdict("dropout_max_abs_diff", f64::from(d), 0.0, &mut report);

    // 1b. The RMS norm kernels against the composed ops on the device, forward and
    // gradient (dimension not a multiple of the block, as in real models' odd shapes).
    on_device(true);
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let (rows, dim) = (37, 300);
        let tensor = |key: u64, n: usize, shape: &[usize]| {
            Tensor::from_vec(model::rng::normal(5, &[key], n, 1.0), shape, device)
                .and_then(|t| t.to_dtype(dtype))
                .unwrap()
        };
        let x = Var::from_tensor(&tensor(1, rows * dim, &[rows, dim])).unwrap();
        let w = tensor(2, dim, &[dim]);
        let upstream = tensor(3, rows * dim, &[rows, dim]);
        let error = kernels_against_composed(|| {
            let y = model::rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
            let grads = (y.to_dtype(DType::F32).unwrap() * upstream.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = grads.get(x.as_tensor()).expect("a gradient").clone();
            HashMap::from([("y".to_string(), flat(&y)), ("dx".to_string(), flat(&dx))])
        });
        let name = format!("rms_norm_kernel_rel_err_{dtype:?}").to_lowercase();
        verdict(&name, error, tolerance, &mut report);
    }
    on_device(false);

    // 1c. The attention kernels (cuBLAS products, masked softmax) against the composed ops
    // on the device: packed rows of two segments and plain causal rows, grouped queries.
    on_device(true);
    {
        use corpusdb::model::attention::{self, AttentionMask};
        let (b, kv, group, t, d) = (2, 2, 2, 48, 16);
        let mut ids = vec![1u32; b * t];
        for (i, id) in ids.iter_mut().enumerate() {
            // Row 0: segments 1 (30 tokens) and 2; row 1: one segment then padding (0).
            *id = match (i / t, i % t) {
                (0, j) if j < 30 => 1,
                (0, _) => 2,
                (_, j) if j < 40 => 3,
                _ => 0,
            };
        }
        let masks = [
            ("packed", AttentionMask::Packed(std::sync::Arc::new(ids))),
            ("causal", AttentionMask::Causal),
        ];
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
            for (mask_name, mask) in &masks {
                let tensor = |key: u64, rows: usize| {
                    let n = b * kv * rows * d;
                    Tensor::from_vec(
                        model::rng::normal(8, &[key], n, 1.0),
                        (b, kv, rows, d),
                        device,
                    )
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap()
                };
                let (q, k, v) = (
                    Var::from_tensor(&tensor(1, group * t)).unwrap(),
                    Var::from_tensor(&tensor(2, t)).unwrap(),
                    Var::from_tensor(&tensor(3, t)).unwrap(),
                );
                let upstream = tensor(4, group * t).to_dtype(DType::F32).unwrap();
                let error = kernels_against_composed(|| {
                    let prepared = attention::prepare(mask, b, t, 0, device, dtype).unwrap();
                    let o = attention::attend(
                        q.as_tensor(),
                        k.as_tensor(),
                        v.as_tensor(),
                        0.25,
                        &prepared,
                    )
                    .unwrap();
                    let grads = (o.to_dtype(DType::F32).unwrap() * &upstream)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let mut out = HashMap::from([("o".to_string(), flat(&o))]);
                    for (name, var) in [("dq", &q), ("dk", &k), ("dv", &v)] {
                        out.insert(
                            name.to_string(),
                            flat(grads.get(var.as_tensor()).expect("a gradient")),
                        );
                    }
                    out
                });
                let name = format!("attention_kernel_rel_err_{mask_name}_{dtype:?}").to_lowercase();
                verdict(&name, error, tolerance, &mut report);
            }
        }
    }
    on_device(false);

    // 1d. The flash kernels (bf16, head widths 64 and 128, a last tile cut short) against
    // the composed ops in f32 on the same inputs: output and the three gradients.
    if device.is_cuda() {
        use corpusdb::model::attention::{self, AttentionMask};
        let (b, kv, group, t) = (2, 2, 2, 200);
        let ids: Vec<u32> = (0..b * t)
            .map(|i| match (i / t, i % t) {
                (0, j) if j < 70 => 1,
                (0, j) if j < 160 => 2,
                (0, _) => 0,
                _ => 3,
            })
            .collect();
        let masks = [
            ("packed", AttentionMask::Packed(std::sync::Arc::new(ids))),
            ("causal", AttentionMask::Causal),
        ];
        for d in [64, 128] {
            let tensor = |key: u64, rows: usize| {
                let n = b * kv * rows * d;
                Tensor::from_vec(
                    model::rng::normal(9, &[key, d as u64], n, 1.0),
                    (b, kv, rows, d),
                    device,
                )
                .and_then(|t| t.to_dtype(DType::BF16))
                .unwrap()
            };
            let (q, k, v, d_out) = (
                tensor(1, group * t),
                tensor(2, t),
                tensor(3, t),
                tensor(4, group * t),
            );
            for (mask_name, mask) in &masks {
                let mut used = false;
                let mut run = |dtype: DType| {
                    let prepared = attention::prepare(mask, b, t, 0, device, dtype).unwrap();
                    used |= prepared.flash(d);
                    let cast = |x: &Tensor| x.to_dtype(dtype).unwrap();
                    let (o, dq, dk, dv) = attention::attend_with_gradients(
                        &cast(&q),
                        &cast(&k),
                        &cast(&v),
                        1.0 / (d as f64).sqrt(),
                        &prepared,
                        &cast(&d_out),
                    )
                    .unwrap();
                    HashMap::from([
                        ("o".to_string(), flat(&o)),
                        ("dq".to_string(), flat(&dq)),
                        ("dk".to_string(), flat(&dk)),
                        ("dv".to_string(), flat(&dv)),
                    ])
                };
                set_kernels(true);
                let flash = run(DType::BF16);
                set_kernels(false);
                let reference = run(DType::F32);
                set_kernels(true);
                let name = format!("flash_rel_err_{mask_name}_d{d}");
                verdict(&name, relative_error(&reference, &flash), 3e-2, &mut report);
                // 0 when the flash kernels ran, 1 when they did not.
                let missing = if used { 0.0 } else { 1.0 };
                verdict(&format!("{name}_flash_missing"), missing, 0.0, &mut report);
            }
        }
    }

    // 2. Gradients of one micro-batch: CPU f32 against the device, both regimes.
    let reference = Trainer::new(
        load(&Device::Cpu, DType::F32),
        &Device::Cpu,
        Checkpointing::Layers,
        Some(4),
    );
    let (g_ref, loss_ref) = reference.gradients(&batch, &targets, 0);
    let g_ref = grads_f32(&g_ref);
    for (name, dtype, kernels, checkpointing, tolerance) in [
        (
            "grad_rel_err_f32_layers",
            DType::F32,
            true,
            Checkpointing::Layers,
            1e-4,
        ),
        (
            "grad_rel_err_f32_none",
            DType::F32,
            true,
            Checkpointing::None,
            1e-4,
        ),
        (
            "grad_rel_err_f32_composed",
            DType::F32,
            false,
            Checkpointing::Layers,
            1e-4,
        ),
        (
            "grad_rel_err_bf16_layers",
            DType::BF16,
            true,
            Checkpointing::Layers,
            5e-2,
        ),
    ] {
        set_kernels(kernels);
        on_device(true);
        let trainer = Trainer::new(load(device, dtype), device, checkpointing, Some(4));
        let (g, loss) = trainer.gradients(&batch, &targets, 0);
        on_device(false);
        verdict(
            name,
            relative_error(&g_ref, &grads_f32(&g)),
            tolerance,
            &mut report,
        );
        report.insert(format!("{name}_loss"), json!([loss_ref, loss]));
    }
    set_kernels(true);

    // 3. The first optimizer steps' losses: CPU f32, device f32 and bf16.
    let steps = 4;
    let batches: Vec<_> = (0..steps)
        .map(|i| random_batch(config.vocab_size, rows, seq, 100 + i))
        .collect();
    let run = |device: &Device, dtype: DType| -> (Vec<f64>, Trainer) {
        let mut trainer = Trainer::new(load(device, dtype), device, Checkpointing::Layers, None);
        let losses = batches
            .iter()
            .enumerate()
            .map(|(i, (b, t))| trainer.step(b, t, i as u64))
            .collect();
        (losses, trainer)
    };
    let (cpu_losses, cpu_trainer) = run(&Device::Cpu, DType::F32);
    let max_diff = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f64, f64::max)
    };
    for (name, dtype, tolerance) in [("f32", DType::F32, 1e-3), ("bf16", DType::BF16, 5e-2)] {
        on_device(true);
        let (losses, _) = run(device, dtype);
        on_device(false);
        report.insert(
            format!("losses_{name}"),
            json!({"cpu_f32": cpu_losses, "device": losses}),
        );
        verdict(
            &format!("loss_abs_diff_{name}"),
            max_diff(&cpu_losses, &losses),
            tolerance,
            &mut report,
        );
    }

    // 4. A checkpoint written on one device resumes on the other: 2 steps there, 2 here,
    // against 4 steps on the CPU alone.
    let dir = std::env::temp_dir().join(format!("corpusdb-gpu-check-{}", std::process::id()));
    for (name, first, second, device_first) in [
        ("resume_device_to_cpu", device.clone(), Device::Cpu, true),
        ("resume_cpu_to_device", Device::Cpu, device.clone(), false),
    ] {
        on_device(device_first);
        let mut a = Trainer::new(
            load(&first, DType::F32),
            &first,
            Checkpointing::Layers,
            None,
        );
        for (i, (b, t)) in batches.iter().take(2).enumerate() {
            a.step(b, t, i as u64);
        }
        on_device(!device_first);
        let state = checkpoint::TrainerState {
            step: 2,
            seed: 1,
            sampler: corpusdb::curriculum::SamplerState {
                fingerprint: "gpu-check".into(),
                position: 2,
            },
            phase: "check".into(),
        };
        let saved =
            checkpoint::save(&dir.join(name), &a.lora, &a.optimizer, &state, "random").unwrap();
        let mut b = Trainer::new(
            load(&second, DType::F32),
            &second,
            Checkpointing::Layers,
            None,
        );
        checkpoint::load(&saved, &mut b.lora, &mut b.optimizer, &second).unwrap();
        // The adapter crosses devices bit for bit.
        verdict(
            &format!("{name}_restored_rel_err"),
            relative_error(&a.lora_values(), &b.lora_values()),
            0.0,
            &mut report,
        );
        let mut losses = Vec::new();
        for (i, (bt, t)) in batches.iter().enumerate().skip(2) {
            losses.push(b.step(bt, t, i as u64));
        }
        on_device(false);
        verdict(
            &format!("{name}_loss_abs_diff"),
            max_diff(&cpu_losses[2..], &losses),
            1e-3,
            &mut report,
        );
        // Informative only: AdamW's first steps move every weight by about the learning
        // rate whatever the gradient's size, so rounding-level gradient differences near
        // zero show up here at the scale of the learning rate.
        report.insert(
            format!("{name}_lora_rel_err_after"),
            json!(relative_error(&cpu_trainer.lora_values(), &b.lora_values())),
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    report.insert("device".into(), json!(format!("{device:?}")));
    report.insert("passed".into(), json!(passed));
    (Value::Object(report), passed)
}

fn speed(args: &[String]) -> Value {
    let device = device_of(arg(args, "--device"));
    let dtype = dtype_of(arg(args, "--dtype"));
    let num = |name: &str, default: usize| {
        arg(args, name).map_or(default, |v| v.parse().expect("a number"))
    };
    let (rows, seq, steps) = (num("--rows", 8), num("--seq", 2048), num("--steps", 3));
    let checkpointing = match arg(args, "--checkpointing").unwrap_or("layers") {
        "layers" => Checkpointing::Layers,
        "none" => Checkpointing::None,
        other => panic!("--checkpointing is layers or none, not {other}"),
    };
    let path = arg(args, "--model").expect("--model DIR (a Hugging Face folder)");
    let started = Instant::now();
    let model = weights::load(Path::new(path), &device, dtype).unwrap();
    device.synchronize().unwrap();
    let load_seconds = started.elapsed().as_secs_f64();
    let parameters: usize = model
        .named_tensors()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    let vocab = model.config.vocab_size;
    let mut trainer = Trainer::new(model, &device, checkpointing, None);
    let trainable = trainer.lora.parameter_count();
    let mut losses = Vec::new();
    let mut times = Vec::new();
    for i in 0..=steps as u64 {
        let (batch, targets) = random_batch(vocab, rows, seq, 1000 + i);
        let t0 = Instant::now();
        losses.push(trainer.step(&batch, &targets, i));
        times.push(t0.elapsed().as_secs_f64());
    }
    // The first step (kernel loading, allocator warm-up) is not timed.
    let seconds: f64 = times[1..].iter().sum();
    let tokens = (rows * seq * steps) as f64;
    let flops_per_token = 6.0 * parameters as f64;
    json!({
        "system": "corpusdb",
        "model": path,
        "parameters": parameters,
        "trainable_params": trainable,
        "device": format!("{device:?}"),
        "dtype": format!("{dtype:?}"),
        "rows": rows, "seq_len": seq, "steps": steps,
        "gradient_checkpointing": checkpointing == Checkpointing::Layers,
        "load_seconds": load_seconds,
        "warmup_seconds": times[0],
        "step_seconds": &times[1..],
        "tokens_per_s": tokens / seconds,
        "losses": losses,
        // Forward + backward through the frozen base is ~4N FLOPs per token for LoRA; a
        // recomputed forward adds 2N.
        "model_tflops": tokens / seconds
            * (if checkpointing == Checkpointing::Layers { flops_per_token } else { 4.0 * parameters as f64 })
            / 1e12,
    })
}

/// Milliseconds per call of `f` (after one warm-up call), the device synchronised around.
fn time_ms(device: &Device, mut f: impl FnMut()) -> f64 {
    f();
    device.synchronize().unwrap();
    let reps = 3;
    let t0 = Instant::now();
    for _ in 0..reps {
        f();
    }
    device.synchronize().unwrap();
    t0.elapsed().as_secs_f64() * 1e3 / reps as f64
}

/// Where a training step's time goes: one decoder layer and its parts, each timed alone
/// (forward, and forward + backward) at the speed run's shapes.
fn profile(args: &[String]) -> Value {
    use corpusdb::model::attention::{self, AttentionMask};
    use std::sync::Arc;
    let device = device_of(arg(args, "--device"));
    let dtype = dtype_of(arg(args, "--dtype"));
    let num = |name: &str, default: usize| {
        arg(args, name).map_or(default, |v| v.parse().expect("a number"))
    };
    let (rows, seq) = (num("--rows", 4), num("--seq", 2048));
    let path = arg(args, "--model").expect("--model DIR (a Hugging Face folder)");
    let model = weights::load(Path::new(path), &device, dtype).unwrap();
    let lora = Lora::new(LoraConfig::default(), &model.config, 1, &device).unwrap();
    let c = model.config.clone();
    let (batch, targets) = random_batch(c.vocab_size, rows, seq, 7);
    let segments: Vec<u32> = batch.segment_ids.flatten_all().unwrap().to_vec1().unwrap();
    let mask = AttentionMask::Packed(Arc::new(segments));
    let ids = batch.input_ids.to_device(&device).unwrap();
    let positions = batch.position_ids.to_device(&device).unwrap();
    let key = DropoutKey {
        seed: 1,
        step: 0,
        micro_batch: 0,
    };
    let adapter = Some(model::Adapter {
        lora: &lora,
        dropout: Some(key),
    });
    let x = model.embed(&ids).unwrap();
    let upstream = (x.ones_like().unwrap() * 1e-3).unwrap();
    let mut report = serde_json::Map::new();
    let mut put = |name: &str, ms: f64| {
        eprintln!("{name}: {ms:.2} ms");
        report.insert(name.into(), json!(ms));
    };
    put(
        "context_ms",
        time_ms(&device, || {
            model.context(&positions, &mask, 0).unwrap();
        }),
    );
    let context = model.context(&positions, &mask, 0).unwrap();
    put(
        "layer_forward_ms",
        time_ms(&device, || {
            model.decoder_layer(0, &x, &context, adapter, None).unwrap();
        }),
    );
    put(
        "layer_forward_backward_ms",
        time_ms(&device, || {
            let input = Var::from_tensor(&x).unwrap();
            let y = model
                .decoder_layer(0, input.as_tensor(), &context, adapter, None)
                .unwrap();
            (y * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
        }),
    );
    // The layer with tensor ops and no graph (what training runs on CUDA).
    if model::tensor_layer::supported(&model, &lora, &context) {
        put(
            "tensor_layer_forward_ms",
            time_ms(&device, || {
                model::tensor_layer::forward(&model, &lora, 0, &x, &context, key, false).unwrap();
            }),
        );
        put(
            "tensor_layer_forward_backward_ms",
            time_ms(&device, || {
                let mut grads = HashMap::new();
                model::tensor_layer::backward(
                    &model, &lora, 0, &x, &context, key, None, &upstream, true, &mut grads,
                )
                .unwrap();
            }),
        );
    }
    put(
        "layer_forward_no_adapter_ms",
        time_ms(&device, || {
            model.decoder_layer(0, &x, &context, None, None).unwrap();
        }),
    );
    // Attention alone, at the layer's shapes (query heads stacked per key/value head).
    let (kv, d) = (c.kv_heads(), c.head_dim());
    let group = c.num_attention_heads / kv;
    let rand = |key: u64, shape: (usize, usize, usize, usize)| {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec(model::rng::normal(2, &[key], n, 1.0), shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(&device))
            .unwrap()
    };
    let q = Var::from_tensor(&rand(1, (rows, kv, group * seq, d))).unwrap();
    let k = Var::from_tensor(&rand(2, (rows, kv, seq, d))).unwrap();
    let v = Var::from_tensor(&rand(3, (rows, kv, seq, d))).unwrap();
    let prepared = attention::prepare(&mask, rows, seq, 0, &device, dtype).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    put(
        "attention_forward_ms",
        time_ms(&device, || {
            attention::attend(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                scale,
                &prepared,
            )
            .unwrap();
        }),
    );
    put(
        "attention_forward_backward_ms",
        time_ms(&device, || {
            let o = attention::attend(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                scale,
                &prepared,
            )
            .unwrap();
            o.sum_all().unwrap().backward().unwrap();
        }),
    );
    // Attention as training runs it (no graph): the flash kernels, then the kept
    // probabilities (cuBLAS products and the softmax kernel).
    let d_out = rand(4, (rows, kv, group * seq, d));
    for (name, flash) in [
        ("attention_flash_forward_backward_ms", true),
        ("attention_kept_forward_backward_ms", false),
    ] {
        set_flash(flash);
        let prepared = attention::prepare(&mask, rows, seq, 0, &device, dtype).unwrap();
        if flash && !prepared.flash(d) {
            continue;
        }
        put(
            name,
            time_ms(&device, || {
                attention::attend_with_gradients(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    scale,
                    &prepared,
                    &d_out,
                )
                .unwrap();
            }),
        );
    }
    set_flash(true);
    // The seven frozen products of a layer, forward only.
    let flat = x.reshape((rows * seq, c.hidden_size)).unwrap();
    let wide = Tensor::zeros((rows * seq, c.intermediate_size), dtype, &device).unwrap();
    put(
        "projections_forward_ms",
        time_ms(&device, || {
            for (t, w) in model.layers[0].projections.iter().enumerate() {
                let input = if t == 6 { &wide } else { &flat };
                model::frozen::frozen_linear(input, w).unwrap();
            }
        }),
    );
    let flat_f32 = flat.to_dtype(DType::F32).unwrap();
    put(
        "dropout_forward_ms",
        time_ms(&device, || {
            model::lora::keyed_dropout(&flat_f32, 1, [0, 0, 0, 0], 0.05).unwrap();
        }),
    );
    put(
        "lora_deltas_forward_ms",
        time_ms(&device, || {
            for target in model::Target::ALL {
                let input = if target == model::Target::Down {
                    &wide
                } else {
                    &flat
                };
                lora.delta(0, target, input, Some(&key)).unwrap();
            }
        }),
    );
    put(
        "lora_deltas_forward_backward_ms",
        time_ms(&device, || {
            let mut total: Option<Tensor> = None;
            for target in model::Target::ALL {
                let input = if target == model::Target::Down {
                    &wide
                } else {
                    &flat
                };
                let delta = lora.delta(0, target, input, Some(&key)).unwrap().unwrap();
                let s = delta.sum_all().unwrap();
                total = Some(match total {
                    Some(t) => (t + s).unwrap(),
                    None => s,
                });
            }
            total.unwrap().backward().unwrap();
        }),
    );
    put(
        "rms_norm_forward_backward_ms",
        time_ms(&device, || {
            let input = Var::from_tensor(&x).unwrap();
            let y = model::rms_norm(input.as_tensor(), &model.layers[0].input_norm, 1e-5).unwrap();
            (y * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
        }),
    );
    // The loss over all trained tokens, chunk by chunk, with its gradient.
    let hidden = x.reshape((rows * seq, c.hidden_size)).unwrap();
    let picked = hidden
        .index_select(
            &Tensor::new(targets.positions.as_slice(), &device).unwrap(),
            0,
        )
        .unwrap();
    put(
        "loss_forward_backward_ms",
        time_ms(&device, || {
            for start in (0..targets.len()).step_by(1024) {
                let len = 1024.min(targets.len() - start);
                let rows = Var::from_tensor(&picked.narrow(0, start, len).unwrap()).unwrap();
                let nll = loss::nll_of_logits(
                    &model.logits(rows.as_tensor()).unwrap(),
                    &targets.tokens[start..start + len],
                )
                .unwrap()
                .sum_all()
                .unwrap();
                nll.backward().unwrap();
            }
        }),
    );
    put(
        "loss_with_tensors_ms",
        time_ms(&device, || {
            for start in (0..targets.len()).step_by(1024) {
                let len = 1024.min(targets.len() - start);
                loss::chunk_with_tensors(
                    &model,
                    &picked.narrow(0, start, len).unwrap(),
                    &targets.tokens[start..start + len],
                )
                .unwrap();
            }
        }),
    );
    report.insert("layers".into(), json!(c.num_hidden_layers));
    report.insert("rows".into(), json!(rows));
    report.insert("seq_len".into(), json!(seq));
    report.insert("model".into(), json!(path));
    Value::Object(report)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--speed") {
        println!("{}", speed(&args));
        return;
    }
    if args.iter().any(|a| a == "--profile") {
        println!("{}", profile(&args));
        return;
    }
    let explicit = args.iter().any(|a| a == "--check");
    let emulate = args.iter().any(|a| a == "--emulate");
    let device = if explicit && !emulate {
        device_of(arg(&args, "--device"))
    } else {
        Device::Cpu
    };
    let (report, passed) = check(&device, !explicit, emulate || !explicit);
    println!("{report}");
    if !passed {
        std::process::exit(1);
    }
}
