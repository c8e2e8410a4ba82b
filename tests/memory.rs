//! The training memory planner: its arithmetic against numbers worked out by hand, its
//! monotonicity, the Llama-3 8B plan against an 80 GiB card, and `train --dry-run`.

use std::path::{Path, PathBuf};

use candle_core::DType;
use corpusdb::model::{weights, LlamaConfig, LoraConfig};
use corpusdb::train::memory::{self, LayerPass, PeakPhase};
use corpusdb::train::Checkpointing;
use serde_json::Value;

use crate::util::{corpusdb, run_ok, write};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn config(json: &str) -> LlamaConfig {
    serde_json::from_str(json).unwrap()
}

/// 3 layers, hidden 64, 4 heads of 16 over 2 key/value heads, intermediate 160.
fn small() -> LlamaConfig {
    config(
        r#"{"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512}"#,
    )
}

const SMOLLM2: &str = r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "tie_word_embeddings": true, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "rms_norm_eps": 1e-5}"#;

fn lora(r: usize, dropout: f64, targets: &[&str]) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        dropout,
        targets: targets.iter().map(|t| t.to_string()).collect(),
    }
}

fn all_seven(r: usize) -> LoraConfig {
    LoraConfig {
        r,
        ..LoraConfig::default()
    }
}

fn slack(activations: u64) -> u64 {
    (activations as f64 * memory::ALLOCATOR_SLACK).round() as u64
}

#[test]
fn the_plan_of_a_small_model_matches_the_hand_count() {
    let model = small();
    let adapter = lora(4, 0.1, &["q_proj", "v_proj", "down_proj"]);
    let (tokens, rows) = (256u64, 2u64);
    let layers = memory::plan(
        &model,
        &adapter,
        256,
        2,
        DType::F32,
        LayerPass::Graph,
        Checkpointing::Layers,
        100,
    );

    // One layer, per token (q width 64, k/v width 32, r = 4, LoRA on q, v, down):
    let per_token = 2 * 64            // two RMS norm outputs
        + (64 + 32 + 32 + 64 + 160 + 160 + 64) // seven base projection outputs
        + (64 + 64 + 160)             // dropout of q's, v's and down's inputs
        + 3 * 2 * 4                   // x·Aᵀ and its scaled copy, three targets
        + (64 + 32 + 64)              // deltas of q, v, down
        + (64 + 32 + 64)              // base + delta of q, v, down
        + 4 * (64 + 32)               // rotary: 4 half products, 2 halves, cat; q and k
        + 32                          // v made contiguous
        + 64                          // attention output
        + 2 * 4                       // log-sum-exp: an f64 per query head
        + 64                          // o_proj's input, transposed back
        + 160 + 160                   // silu(gate), silu(gate) × up
        + 2 * 64; // two residual sums
    assert_eq!(per_token, 2336);
    assert_eq!(layers.layer_values_per_token, per_token);
    let names: Vec<&str> = layers.layer_terms.iter().map(|t| t.name).collect();
    assert!(names.contains(&"lora dropout outputs"), "{names:?}");

    // Base: embeddings and an untied head of 1000 × 64, per layer the seven projections
    // and two norms, the final norm; f32.
    let projections = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * (160 * 64);
    let parameters = 2 * 1000 * 64 + 3 * (projections + 2 * 64) + 64;
    assert_eq!(parameters, 257_472);
    assert_eq!(layers.base_weights, parameters * 4);
    // LoRA: r × (in + out) for q (64 + 64), v (64 + 32), down (160 + 64), three layers;
    // five f32 copies.
    let lora_parameters = 3 * 4 * ((64 + 64) + (64 + 32) + (160 + 64));
    assert_eq!(layers.inputs.lora.parameters, lora_parameters);
    assert_eq!(layers.lora_and_optimizer, lora_parameters * 5 * 4);

    let hidden = tokens * 64 * 4;
    assert_eq!(layers.kept_activations, (3 + 1) * hidden);
    let working_set = per_token * tokens * 4;
    assert_eq!(layers.layer_working_set, working_set);
    assert_eq!(layers.gradients_flowing, 2 * hidden);
    // The MLP's backward peak (7 × 160 + 64) beats the attention's (6 × 64 + 4 × 32 + 64).
    assert_eq!(layers.backward_transients, (7 * 160 + 64) * tokens * 4);
    // Fused attention: 2 rows × 2 kv heads = 4 pairs of 2 query heads × 128 tokens = 4
    // blocks of 64; 64 tasks wanted for 16 threads, so one block each: 16 tasks, each
    // with a partial dk and dv of 128 × 16; plus two 64 × 64 tiles per thread.
    let attention = (16 * 2 * 128 * 16 + 16 * 2 * 64 * 64) * 4;
    assert_eq!(layers.attention_block, attention);
    // Loss: while a chunk runs, 100 × 1000 logits and their gradient, the final norm's
    // output, all 256 picked rows and their gradients so far, the chunk's rows and their
    // gradient; after the chunks, 9 hidden-sized tensors of the final norm's backward.
    let chunks = 2 * 100 * 1000 + 3 * tokens * 64 + 2 * 100 * 64;
    assert!(chunks > 9 * tokens * 64);
    let loss = chunks * 4;
    assert_eq!(layers.loss_chunk, loss);
    // Rotary tables: cos and sin of 512 positions and of the 256 tokens, 8 values each.
    let rotary = (512 + 256) * 2 * 8 * 4;

    let backward = working_set + 2 * hidden + (7 * 160 + 64) * tokens * 4 + attention;
    assert!(backward > loss);
    assert_eq!(layers.peak_phase, PeakPhase::LayerBackward);
    let activations = 4 * hidden + backward;
    assert_eq!(
        layers.runtime,
        rotary + memory::RUNTIME_FIXED_BYTES + slack(activations)
    );
    assert_eq!(
        layers.total,
        parameters * 4 + lora_parameters * 20 + activations + layers.runtime
    );

    // Without checkpointing: the embeddings and the first two layers' working sets are
    // kept besides the last layer's.
    let none = memory::plan(
        &model,
        &adapter,
        256,
        2,
        DType::F32,
        LayerPass::Graph,
        Checkpointing::None,
        100,
    );
    assert_eq!(none.kept_activations, hidden + 2 * working_set);
    assert_eq!(none.layer_working_set, working_set);
    assert_eq!(none.peak_phase, PeakPhase::LayerBackward);
    let activations = hidden + 2 * working_set + backward;
    assert_eq!(
        none.total,
        parameters * 4
            + lora_parameters * 20
            + activations
            + rotary
            + memory::RUNTIME_FIXED_BYTES
            + slack(activations)
    );
    assert_eq!(none.inputs.rows, rows as usize);

    // bf16 halves the base weights and the rotary tables only.
    let bf16 = memory::plan(
        &model,
        &adapter,
        256,
        2,
        DType::BF16,
        LayerPass::Graph,
        Checkpointing::None,
        100,
    );
    assert_eq!(bf16.base_weights, parameters * 2);
    assert_eq!(bf16.inputs.dtype, "bf16");
    assert_eq!(none.total - bf16.total, parameters * 2 + rotary / 2);
}

#[test]
fn without_dropout_or_targets_the_lora_terms_vanish() {
    let model = small();
    let plain = memory::plan(
        &model,
        &lora(4, 0.0, &[]),
        64,
        1,
        DType::F32,
        LayerPass::Graph,
        Checkpointing::Layers,
        64,
    );
    // Norms, base outputs, rotary, v, output, log-sum-exp, o_proj input, SiLU, product,
    // residuals.
    assert_eq!(
        plain.layer_values_per_token,
        128 + 576 + 384 + 32 + 64 + 8 + 64 + 320 + 128
    );
    assert_eq!(plain.lora_and_optimizer, 0);
    let no_dropout = memory::plan(
        &model,
        &lora(4, 0.0, &["q_proj"]),
        64,
        1,
        DType::F32,
        LayerPass::Graph,
        Checkpointing::Layers,
        64,
    );
    assert_eq!(
        no_dropout.layer_values_per_token,
        plain.layer_values_per_token + 2 * 4 + 64 + 64
    );
}

#[test]
fn a_large_vocabulary_makes_the_loss_the_peak_with_checkpointing() {
    let mut model = small();
    model.vocab_size = 50_000;
    let plan = memory::plan(
        &model,
        &all_seven(4),
        256,
        2,
        DType::F32,
        LayerPass::Graph,
        Checkpointing::Layers,
        1024,
    );
    assert_eq!(plan.peak_phase, PeakPhase::Loss);
    // The chunk is capped at the micro-batch's tokens.
    assert_eq!(plan.inputs.loss_chunk, 256);
    assert_eq!(
        plan.loss_chunk,
        (2 * 256 * 50_000 + 3 * 256 * 64 + 2 * 256 * 64) * 4
    );
    let activations = plan.kept_activations + plan.loss_chunk;
    assert_eq!(
        plan.total,
        plan.base_weights + plan.lora_and_optimizer + activations + plan.runtime
    );
    // A small chunk and a small vocabulary: the final norm's backward is the loss's peak.
    model.vocab_size = 10;
    let plan = memory::plan(
        &model,
        &all_seven(4),
        256,
        2,
        DType::F32,
        LayerPass::Graph,
        Checkpointing::Layers,
        16,
    );
    assert_eq!(plan.loss_chunk, 9 * 256 * 64 * 4);
}

#[test]
fn memory_grows_with_tokens_and_checkpointing_saves_it() {
    let model = config(SMOLLM2);
    let adapter = all_seven(32);
    let mut last = (0, 0);
    for tokens in [256usize, 512, 1024, 2048, 4096, 8192] {
        let rows = tokens.div_ceil(2048);
        let layers = memory::plan(
            &model,
            &adapter,
            tokens,
            rows,
            DType::F32,
            LayerPass::Graph,
            Checkpointing::Layers,
            1024,
        );
        let none = memory::plan(
            &model,
            &adapter,
            tokens,
            rows,
            DType::F32,
            LayerPass::Graph,
            Checkpointing::None,
            1024,
        );
        assert!(
            layers.total > last.0 && none.total > last.1,
            "{tokens} tokens"
        );
        assert!(layers.total < none.total, "{tokens} tokens");
        last = (layers.total, none.total);
    }
    // More layers cost more without checkpointing than with it.
    let mut deep = model.clone();
    deep.num_hidden_layers *= 2;
    let total = |m: &LlamaConfig, c: Checkpointing| {
        memory::plan(m, &adapter, 2048, 1, DType::F32, LayerPass::Graph, c, 1024).total
    };
    let grow = |c: Checkpointing| total(&deep, c) - total(&model, c);
    assert!(grow(Checkpointing::Layers) * 5 < grow(Checkpointing::None));
    // Auto is resolved by the model's size: SmolLM2 (135M) checkpoints.
    let auto = memory::plan(
        &model,
        &adapter,
        2048,
        1,
        DType::F32,
        LayerPass::Graph,
        Checkpointing::Auto,
        1024,
    );
    assert_eq!(auto.inputs.checkpointing, Checkpointing::Layers);
    assert_eq!(auto.inputs.model.parameters, 134_515_008);
}

fn llama3_8b() -> LlamaConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/llama-3-8b");
    weights::read_hf_config(&dir).unwrap()
}

#[test]
fn llama3_8b_fits_80_gib_with_checkpointing_only() {
    let model = llama3_8b();
    assert_eq!(model.parameter_count(), 8_030_261_248);
    let adapter = all_seven(32);
    let plan = |c| {
        memory::plan(
            &model,
            &adapter,
            16_384,
            8,
            DType::BF16,
            LayerPass::Graph,
            c,
            1024,
        )
    };
    let layers = plan(Checkpointing::Layers);
    let none = plan(Checkpointing::None);
    // CUDA's layer with tensor ops keeps less than the graph, attention included.
    let tensors = |c| {
        memory::plan(
            &model,
            &adapter,
            16_384,
            8,
            DType::BF16,
            LayerPass::Tensors,
            c,
            1024,
        )
    };
    assert!(tensors(Checkpointing::Layers).fits(40 * GIB));
    assert!(!tensors(Checkpointing::None).fits(141 * GIB));
    assert!(tensors(Checkpointing::Layers).total < layers.total);
    assert_eq!(layers.inputs.lora.parameters, 83_886_080);
    assert_eq!(layers.base_weights, 8_030_261_248 * 2);
    assert!(layers.fits(80 * GIB), "{layers}");
    assert!(!none.fits(80 * GIB), "{none}");
    // Kept inputs: 33 × 16,384 × 4,096 f32.
    assert_eq!(layers.kept_activations, 33 * 16_384 * 4096 * 4);
    let text = layers.to_string();
    assert!(text.contains("expected peak"), "{text}");
    assert!(text.contains("GiB"), "{text}");
    // Attention on CUDA keeps 8 rows × 32 heads × 2,048² scores and probabilities in
    // bf16, reported beside the plan.
    assert_eq!(layers.cuda_attention, 8 * 32 * 2048 * 2048 * 2 * 2);
    assert!(text.contains("scores and probabilities"), "{text}");
}

#[test]
fn memory_sizes_parse_in_binary_and_decimal_units() {
    assert_eq!(memory::parse_bytes("80GiB"), Ok(80 * GIB));
    assert_eq!(memory::parse_bytes("80 gib"), Ok(80 * GIB));
    assert_eq!(memory::parse_bytes("80G"), Ok(80 * GIB));
    assert_eq!(memory::parse_bytes("24GB"), Ok(24_000_000_000));
    assert_eq!(memory::parse_bytes("512MiB"), Ok(512 * MIB));
    assert_eq!(memory::parse_bytes("1.5GiB"), Ok(3 * GIB / 2));
    assert_eq!(memory::parse_bytes("4096"), Ok(4096));
    assert!(memory::parse_bytes("80 parsecs").is_err());
    assert!(memory::parse_bytes("GiB").is_err());
    assert_eq!(memory::format_bytes(80 * GIB), "80.00 GiB");
    assert_eq!(memory::format_bytes(3 * MIB / 2), "1.5 MiB");
}

fn dry_run_files(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("smollm2");
    std::fs::create_dir_all(&model).unwrap();
    write(&model, "config.json", SMOLLM2.as_bytes());
    let config = write(
        dir,
        "train.yaml",
        format!(
            "curriculum: {}\nlora: {{r: 32, alpha: 64, dropout: 0.05}}\nbatch_size: 4\nmax_seq_len: 128\noutput: {}\n",
            dir.join("no-such-curriculum.yaml").display(),
            dir.join("out").display()
        )
        .as_bytes(),
    );
    (model, config)
}

#[test]
fn train_dry_run_prints_the_plan_without_loading_anything() {
    let dir = tempfile::tempdir().unwrap();
    let (model, config) = dry_run_files(dir.path());
    let store = dir.path().join("store");
    let out = run_ok(
        corpusdb(&store)
            .args(["train", "--dry-run", "--json", "--config"])
            .arg(&config)
            .arg("--model")
            .arg(&model),
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["inputs"]["tokens_per_micro_batch"], 4 * 128);
    assert_eq!(plan["inputs"]["rows"], 4);
    assert_eq!(plan["inputs"]["dtype"], "f32");
    assert_eq!(plan["inputs"]["checkpointing"], "layers");
    assert_eq!(plan["inputs"]["model"]["parameters"], 134_515_008u64);
    assert_eq!(plan["inputs"]["lora"]["parameters"], 9_768_960u64);
    assert_eq!(plan["fits"], Value::Null);
    let field = |name: &str| plan[name].as_u64().unwrap();
    let peak = field("layer_working_set")
        + field("gradients_flowing")
        + field("backward_transients")
        + field("attention_block");
    let peak = peak.max(field("loss_chunk"));
    assert_eq!(
        field("total"),
        field("base_weights")
            + field("lora_and_optimizer")
            + field("kept_activations")
            + peak
            + field("runtime")
    );
    // Neither the store nor the output was touched.
    assert!(!store.exists());
    assert!(!dir.path().join("out").exists());

    // The config.json itself, overrides, and a budget it does not fit: status 1.
    let out = corpusdb(&store)
        .args(["train", "--dry-run", "--json", "--config"])
        .arg(&config)
        .arg("--model")
        .arg(model.join("config.json"))
        .args([
            "--tokens",
            "1000",
            "--dtype",
            "bf16",
            "--checkpointing",
            "none",
        ])
        .args(["--memory-budget", "1MiB"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["inputs"]["tokens_per_micro_batch"], 1000);
    assert_eq!(plan["inputs"]["rows"], 8);
    assert_eq!(plan["inputs"]["dtype"], "bf16");
    assert_eq!(plan["inputs"]["checkpointing"], "none");
    assert_eq!(plan["memory_budget"], MIB);
    assert_eq!(plan["fits"], false);

    // The table, and a budget it fits.
    let out = run_ok(
        corpusdb(&store)
            .args(["train", "--dry-run", "--config"])
            .arg(&config)
            .arg("--model")
            .arg(&model)
            .args(["--memory-budget", "80GiB"]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("expected peak"), "{text}");
    assert!(text.contains("fits the budget of 80.00 GiB"), "{text}");

    // A GGUF file needs loading: refused with a pointer to config.json.
    let gguf = write(dir.path(), "model.gguf", b"GGUF");
    let out = corpusdb(&store)
        .args(["train", "--dry-run", "--config"])
        .arg(&config)
        .arg("--model")
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config.json"), "{stderr}");
    assert!(!store.exists());
}

#[test]
fn the_plan_of_the_layer_by_hand_matches_the_hand_count() {
    let model = small();
    let adapter = lora(4, 0.1, &["q_proj", "v_proj", "down_proj"]);
    let tokens = 256u64;
    let plan = |c| {
        memory::plan(
            &model,
            &adapter,
            256,
            2,
            DType::F32,
            LayerPass::ByHand,
            c,
            100,
        )
    };
    let layers = plan(Checkpointing::Layers);
    // What one layer keeps per token (q width 64, k/v 32, intermediate 160, r = 4):
    let per_token = 2              // two norms' scales
        + (64 + 64 + 160) / 32     // dropout bits of q's, v's and down's inputs
        + 3 * 4                    // the rank-r intermediates
        + (64 + 32 + 32)           // rotated q, k and v
        + 64                       // attention output
        + 2 * 4                    // log-sum-exp: an f64 per query head
        + 64                       // the residual after attention
        + 2 * 160; // gate and up
    assert_eq!(per_token, 607);
    assert_eq!(layers.layer_values_per_token, per_token);
    let hidden = tokens * 64 * 4;
    let working_set = per_token * tokens * 4;
    assert_eq!(layers.kept_activations, (3 + 1) * hidden);
    assert_eq!(layers.layer_working_set, working_set);
    assert_eq!(layers.backward_transients, (3 * 160 + 3 * 64) * tokens * 4);
    // One [chunk, vocab] buffer in the loss, not the graph's two.
    let chunks = 100 * 1000 + 3 * tokens * 64 + 2 * 100 * 64;
    assert_eq!(layers.loss_chunk, chunks * 4);
    let none = plan(Checkpointing::None);
    // Every layer's input and what the first two layers keep; the last is the working set.
    assert_eq!(none.kept_activations, 3 * hidden + 2 * working_set);
    assert_eq!(none.layer_working_set, working_set);
    assert_eq!(none.inputs.layer_pass, LayerPass::ByHand);
    // By hand keeps less than the graph in every regime.
    let graph = |c| {
        memory::plan(
            &model,
            &adapter,
            256,
            2,
            DType::F32,
            LayerPass::Graph,
            c,
            100,
        )
    };
    assert!(layers.total < graph(Checkpointing::Layers).total);
    assert!(none.total < graph(Checkpointing::None).total);
    assert_eq!(memory::LayerPass::of(true, DType::F32), LayerPass::ByHand);
    assert_eq!(memory::LayerPass::of(true, DType::BF16), LayerPass::Graph);
    assert_eq!(memory::LayerPass::of(false, DType::F32), LayerPass::Tensors);
    assert_eq!(
        memory::LayerPass::of(false, DType::BF16),
        LayerPass::Tensors
    );
    assert_eq!(memory::LayerPass::of(false, DType::F64), LayerPass::Graph);
}

/// The plan of CUDA's layer with tensor ops against the peaks nvidia-smi measured on an
/// H200 (benches/results/gpu-check-h200-2026-11-30-tensor-layer.json): within 8%.
#[test]
fn the_tensor_layer_plan_matches_the_h200_peaks() {
    let read = |name: &str| -> LlamaConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("configs/models/{name}/config.json"));
        weights::read_hf_config_file(&path).unwrap()
    };
    for (name, rows, checkpointing, measured_mib) in [
        ("llama-3.2-1b", 4, Checkpointing::Layers, 8_529u64),
        ("llama-3.2-1b", 4, Checkpointing::None, 34_225),
        ("llama-3-8b", 8, Checkpointing::Layers, 34_545),
    ] {
        let model = read(name);
        let plan = memory::plan(
            &model,
            &all_seven(32),
            rows * 2048,
            rows,
            DType::BF16,
            LayerPass::Tensors,
            checkpointing,
            1024,
        );
        assert_eq!(plan.cuda_attention, 0, "counted in the terms");
        let probabilities = plan
            .layer_terms
            .iter()
            .find(|t| t.name == "attention probabilities")
            .unwrap();
        // heads × width bf16 values per token, in f32 units.
        assert_eq!(
            probabilities.values,
            model.num_attention_heads as u64 * 2048 / 2
        );
        let measured = measured_mib * MIB;
        let error = (plan.total as f64 - measured as f64) / measured as f64;
        assert!(
            error.abs() < 0.08,
            "{name} {checkpointing:?}: plan {} vs measured {} ({:+.1}%)",
            memory::format_bytes(plan.total),
            memory::format_bytes(measured),
            error * 100.0
        );
    }
}

/// The plan of CUDA's layer with the flash kernels against the peaks nvidia-smi measured on
/// an H200 (benches/results/gpu-check-h200-2026-12-01-flash.json): never more than 5% under
/// (a plan that says a run fits must be right), at most 15% over (the kept layer inputs are
/// counted in f32; the 8B run keeps them in bf16, 4 GiB less).
#[test]
fn the_flash_layer_plan_matches_the_h200_peaks() {
    let read = |name: &str| -> LlamaConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("configs/models/{name}/config.json"));
        weights::read_hf_config_file(&path).unwrap()
    };
    let mut errors = Vec::new();
    for (name, rows, checkpointing, measured_mib) in [
        ("llama-3.2-1b", 4, Checkpointing::Layers, 5_873u64),
        ("llama-3.2-1b", 4, Checkpointing::None, 15_313),
        ("llama-3-8b", 8, Checkpointing::Layers, 28_049),
    ] {
        let model = read(name);
        let plan = memory::plan(
            &model,
            &all_seven(32),
            rows * 2048,
            rows,
            DType::BF16,
            LayerPass::Flash,
            checkpointing,
            1024,
        );
        assert!(
            plan.layer_terms
                .iter()
                .all(|t| t.name != "attention probabilities"),
            "the flash kernels keep no probabilities"
        );
        let measured = measured_mib * MIB;
        let error = (plan.total as f64 - measured as f64) / measured as f64;
        errors.push(format!(
            "{name} {checkpointing:?}: plan {} vs measured {} ({:+.1}%)",
            memory::format_bytes(plan.total),
            memory::format_bytes(measured),
            error * 100.0
        ));
        assert!(-0.05 < error && error < 0.15, "{}", errors.join("; "));
    }
}
