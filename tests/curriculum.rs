//! Curriculum plans and training batches: determinism, exact mixtures in every prefix,
//! epochs as permutations, the held-out split, resume and elastic ranks, loss masks and
//! packing boundaries. The tokenizer is a byte-level BPE trained here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use corpusdb::batches::{self, BatchOptions, ChatTokenizer};
use corpusdb::conversation::{Conversation, Message, Role};
use corpusdb::curriculum::{Curriculum, Plan};
use corpusdb::index::Index;
use corpusdb::ingest::{self, IngestOptions};
use corpusdb::store::Store;
use corpusdb::synth::{self, SplitMix64, SynthSpec};

/// A store with five categories of synthetic examples, and its caught-up index.
pub fn store_with_categories(dir: &Path) -> (Store, Index) {
    let store = Store::open(&dir.join("store")).unwrap();
    for (i, category) in ["code", "math", "qa", "creative", "tool"]
        .iter()
        .enumerate()
    {
        let file = dir.join(format!("{category}.jsonl"));
        synth::generate_file(
            &file,
            &SynthSpec {
                records: 40 + 20 * i as u64,
                seed: 7 + i as u64,
                ..SynthSpec::default()
            },
        )
        .unwrap();
        ingest::ingest_file(
            &store,
            &file,
            &IngestOptions::new(*category, *category),
            &ingest::Quiet,
        )
        .unwrap();
    }
    let index = Index::open_or_create(store.path(), false).unwrap();
    index.catch_up(&store, &|_, _| {}).unwrap();
    (store, index)
}

fn curriculum(yaml: &str) -> Curriculum {
    serde_yaml::from_str(yaml).unwrap()
}

fn order(plan: &Plan) -> Vec<u64> {
    (0..plan.total)
        .map(|p| plan.at(p).unwrap().ordinal)
        .collect()
}

#[test]
fn orders_are_deterministic_epochs_are_permutations_and_held_out_examples_never_appear() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, index) = store_with_categories(dir.path());
    let spec = |seed: u64| {
        curriculum(&format!(
            "name: t\nseed: {seed}\neval: {{fraction: 0.1}}\nphases:\n  - {{name: all, select: '*', epochs: 3, learning_rate: 1.0e-5}}\n  - {{name: math, select: 'category:math', epochs: 1, learning_rate: 1.0e-6}}\n"
        ))
    };
    let plan = Plan::build(&index, &spec(1)).unwrap();
    assert_eq!(order(&plan), order(&Plan::build(&index, &spec(1)).unwrap()));
    let other = Plan::build(&index, &spec(2)).unwrap();
    assert_ne!(order(&plan), order(&other));
    assert_ne!(plan.fingerprint, other.fingerprint);

    let phase = &plan.phases[0];
    let mut available: Vec<u64> = phase.groups[0]
        .ordinals
        .iter()
        .map(|&o| u64::from(o))
        .collect();
    available.sort_unstable();
    let all = order(&plan);
    let epochs: Vec<&[u64]> = all[..phase.len() as usize]
        .chunks(phase.per_epoch as usize)
        .collect();
    assert_eq!(epochs.len(), 3);
    for epoch in &epochs {
        let mut sorted = epoch.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, available, "each example exactly once per epoch");
    }
    assert_ne!(epochs[0], epochs[1], "each epoch is a fresh permutation");

    // The held-out split: about a tenth, chosen by content, in no phase.
    let held: BTreeSet<u64> = plan.eval.iter().copied().collect();
    let stored = index.num_docs().unwrap();
    assert!(
        !held.is_empty() && (held.len() as u64) < stored / 5,
        "{} of {stored}",
        held.len()
    );
    assert!(all.iter().all(|o| !held.contains(o)));
    assert_eq!(held.len() as u64 + phase.per_epoch, stored);
    assert_eq!(
        plan.eval, other.eval,
        "the split depends on content, not on the seed"
    );
}

#[test]
fn every_prefix_keeps_mixture_shares_within_one_example() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, index) = store_with_categories(dir.path());
    let plan = Plan::build(
        &index,
        &curriculum(
            "name: t\nseed: 3\nphases:\n  - name: mix\n    select: '*'\n    epochs: 2\n    learning_rate: 1.0e-5\n    mixture:\n      by: category\n      examples: 250\n      shares: {code: 0.5, math: 0.3, tool: 0.2}\n",
        ),
    )
    .unwrap();
    let phase = &plan.phases[0];
    assert_eq!(phase.per_epoch, 250);
    let quotas: Vec<u64> = phase.groups.iter().map(|g| g.quota).collect();
    assert_eq!(quotas, [125, 75, 50]);
    for epoch in 0..2u64 {
        let mut counts = [0u64; 3];
        let mut seen: Vec<Vec<u64>> = vec![Vec::new(); 3];
        for t in 0..250 {
            let planned = plan.at(epoch * 250 + t).unwrap();
            counts[planned.group] += 1;
            seen[planned.group].push(planned.ordinal);
            for (g, &q) in quotas.iter().enumerate() {
                let exact = (t + 1) as f64 * q as f64 / 250.0;
                assert!(
                    (counts[g] as f64 - exact).abs() < 1.0,
                    "epoch {epoch}, prefix {}: group {g}",
                    t + 1
                );
            }
        }
        // code (fewer examples than its quota) repeats: every full cycle is a permutation.
        let code = &phase.groups[0];
        for cycle in seen[0]
            .chunks(code.ordinals.len())
            .filter(|c| c.len() == code.ordinals.len())
        {
            let mut sorted: Vec<u64> = cycle.to_vec();
            sorted.sort_unstable();
            let mut all: Vec<u64> = code.ordinals.iter().map(|&o| u64::from(o)).collect();
            all.sort_unstable();
            assert_eq!(sorted, all);
        }
    }
    // Without upsampling, a share the group cannot fill is refused with the reason.
    let code_size = phase.groups[0].ordinals.len();
    assert!(code_size < 125);
    let refused = Plan::build(
        &index,
        &curriculum(
            "name: t\nphases:\n  - name: mix\n    select: '*'\n    learning_rate: 1.0e-5\n    mixture: {by: category, examples: 250, upsample: false, shares: {code: 0.5, math: 0.5}}\n",
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains(&format!(
            "group `code` needs 125 examples per epoch but has {code_size}"
        )),
        "{refused}"
    );
}

/// Excluding examples and lifting the exclusion re-indexes their documents after all the
/// others, out of ordinal order in the index: the plan, built from ordinals, is the same
/// plan as before (order, held-out split and fingerprint), every group ascending.
#[test]
fn a_plan_is_unchanged_when_its_examples_are_re_indexed_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, index) = store_with_categories(dir.path());
    let spec = curriculum(
        "name: t\nseed: 5\neval: {fraction: 0.1}\nphases:\n  - {name: all, select: '*', learning_rate: 1.0e-5}\n  - name: mix\n    select: '*'\n    learning_rate: 1.0e-5\n    mixture: {by: category, shares: {code: 0.5, math: 0.3, tool: 0.2}}\n",
    );
    let before = Plan::build(&index, &spec).unwrap();
    let filters_path = dir.path().join("filters.yaml");
    std::fs::write(
        &filters_path,
        "filters:\n  - {name: length, kind: example_chars, min: 1, max: 1400}\n",
    )
    .unwrap();
    let filters = corpusdb::filters::Filters::load(&filters_path).unwrap();
    let run = corpusdb::filters::apply_to_store(&store, &filters, false, &|_, _| {}).unwrap();
    let excluded = run.filters["length"].excluded;
    let stored = store.counters().unwrap().examples;
    assert!(
        excluded > 0 && excluded < stored / 2,
        "{excluded} of {stored}"
    );
    index.catch_up(&store, &|_, _| {}).unwrap();
    let during = Plan::build(&index, &spec).unwrap();
    assert_eq!(
        during.phases[0].len() + during.eval.len() as u64 + excluded,
        before.phases[0].len() + before.eval.len() as u64
    );

    assert_eq!(corpusdb::filters::undo(&store, "length").unwrap(), excluded);
    index.catch_up(&store, &|_, _| {}).unwrap();
    let after = Plan::build(&index, &spec).unwrap();
    assert_eq!(after.fingerprint, before.fingerprint);
    assert_eq!(after.eval, before.eval);
    assert!(after.eval.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(order(&after), order(&before));
    for phase in &after.phases {
        for group in &phase.groups {
            assert!(
                group.ordinals.windows(2).all(|w| w[0] < w[1]),
                "{}",
                group.name
            );
        }
    }
}

/// A byte-level BPE trained on `text`, with ChatML's markers as special tokens.
pub fn trained_tokenizer(dir: &Path, text: &str) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, text).unwrap();
    let path = dir.join("tokenizer.json");
    batches::template::train_byte_level_bpe(&corpus, 600, &path).unwrap();
    path
}

fn chat(turns: &[(Role, &str)]) -> Conversation {
    Conversation::new(turns.iter().map(|(r, t)| Message::new(*r, *t)).collect())
}

fn trained_text(tokenizer: &ChatTokenizer, conversation: &Conversation) -> String {
    let encoded = tokenizer.encode(conversation).unwrap();
    let trained: Vec<u32> = encoded
        .ids
        .iter()
        .zip(&encoded.trained)
        .filter(|(_, &t)| t)
        .map(|(&id, _)| id)
        .collect();
    tokenizer.tokenizer().decode(&trained, false).unwrap()
}

#[test]
fn loss_masks_cover_exactly_the_assistant_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = trained_tokenizer(
        dir.path(),
        "the cat sat on the mat\nhello there how are you\nfine thanks and you\n",
    );
    let conversation = chat(&[
        (Role::System, "be brief"),
        (Role::User, "hello there"),
        (Role::Assistant, "fine thanks"),
        (Role::User, "and you?"),
        (Role::Assistant, "the cat sat on the mat"),
    ]);
    // ChatML (no tokenizer_config.json).
    let chatml = ChatTokenizer::load(&path).unwrap();
    assert!(!chatml.has_model_template());
    assert_eq!(
        chatml.render(&conversation).unwrap(),
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nfine thanks<|im_end|>\n<|im_start|>user\nand you?<|im_end|>\n<|im_start|>assistant\nthe cat sat on the mat<|im_end|>\n"
    );
    assert_eq!(
        trained_text(&chatml, &conversation),
        "fine thanks<|im_end|>the cat sat on the mat<|im_end|>"
    );
    // A model template from tokenizer_config.json, rendered with HF semantics.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({
            "bos_token": "<s>",
            "eos_token": {"content": "</s>"},
            "chat_template": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}[SYS]{{ message['content'].strip() }}[/SYS]\n{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]\n{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}\n{% else %}{{ raise_exception('unknown role') }}{% endif %}{% endfor %}"
        })
        .to_string(),
    )
    .unwrap();
    let model = ChatTokenizer::load(dir.path()).unwrap();
    assert!(model.has_model_template());
    assert_eq!(
        model.render(&conversation).unwrap(),
        "<s>[SYS]be brief[/SYS]\n[INST] hello there [/INST]\nfine thanks</s>\n[INST] and you? [/INST]\nthe cat sat on the mat</s>\n"
    );
    assert_eq!(
        trained_text(&model, &conversation),
        "fine thanks</s>the cat sat on the mat</s>"
    );
    let tool = chat(&[
        (Role::User, "hi"),
        (Role::Tool, "{}"),
        (Role::Assistant, "ok"),
    ]);
    assert!(model.encode(&tool).unwrap_err().0.contains("unknown role"));
}

pub fn options(batch_size: usize, rank: usize, ranks: usize, packing: bool) -> BatchOptions {
    BatchOptions {
        batch_size,
        max_seq_len: 4096,
        packing,
        rank,
        ranks,
    }
}

pub fn fixture(dir: &Path) -> (Store, Plan, ChatTokenizer) {
    let (store, index) = store_with_categories(dir);
    let mut text = String::new();
    store
        .for_each_example(|_, e| {
            for m in e.conversation.messages.iter().take(2) {
                text.push_str(&m.content);
                text.push('\n');
            }
            Ok(())
        })
        .unwrap();
    let tokenizer = ChatTokenizer::load(&trained_tokenizer(dir, &text)).unwrap();
    let plan = Plan::build(
        &index,
        &curriculum(
            "name: t\nseed: 9\neval: {fraction: 0.05}\nphases:\n  - {name: a, select: 'category:code OR category:math', epochs: 2, learning_rate: 2.0e-5}\n  - {name: b, select: '*', learning_rate: 1.0e-5}\n",
        ),
    )
    .unwrap();
    (store, plan, tokenizer)
}

/// One batch as the tests compare them: its plan positions and input ids.
type Seen = (Vec<u64>, Vec<Vec<u32>>);

/// (positions, input ids) of every batch of one rank from `position`, at most `limit`.
fn run(
    store: &Store,
    plan: &Plan,
    tokenizer: &ChatTokenizer,
    position: u64,
    o: &BatchOptions,
    limit: usize,
) -> (Vec<Seen>, u64) {
    let mut out = Vec::new();
    let mut next = position;
    batches::with_stream(store, plan, tokenizer, position, o, 2, |stream| {
        for batch in stream.take(limit) {
            let batch = batch.unwrap();
            next = batch.next.position;
            out.push((
                batch.positions.clone(),
                batch.input_ids.to_vec2::<u32>().unwrap(),
            ));
        }
    });
    (out, next)
}

#[test]
fn resumed_runs_equal_the_uninterrupted_run_also_with_another_rank_count() {
    let dir = tempfile::tempdir().unwrap();
    let (store, plan, tokenizer) = fixture(dir.path());
    let one = options(6, 0, 1, true);
    let (whole, end) = run(&store, &plan, &tokenizer, 0, &one, usize::MAX);
    assert_eq!(end, plan.total);
    let mut rng = SplitMix64::new(11);
    for _ in 0..3 {
        // Interrupted twice at random points, resumed from the saved position each time.
        let mut pieces = Vec::new();
        let mut at = 0;
        let first = 1 + rng.below(whole.len() as u64 / 2) as usize;
        let second = 1 + rng.below(whole.len() as u64 / 2) as usize;
        for limit in [first, second, usize::MAX] {
            let state = plan.state(at);
            let (part, next) = run(
                &store,
                &plan,
                &tokenizer,
                plan.resume(&state).unwrap(),
                &one,
                limit,
            );
            pieces.extend(part);
            at = next;
        }
        assert_eq!(pieces, whole);
    }

    // Two ranks for a while, then one: together they consume the global order exactly
    // once, without repeats or gaps, and one rank's batches after the switch equal the
    // uninterrupted single-rank run from that position.
    let mut consumed: Vec<u64> = Vec::new();
    let mut at = 0;
    for _ in 0..4 {
        let mut next = at;
        for rank in 0..2 {
            let (part, n) = run(&store, &plan, &tokenizer, at, &options(6, rank, 2, true), 1);
            consumed.extend(part.iter().flat_map(|(p, _)| p.clone()));
            next = n;
        }
        at = next;
    }
    let (rest, end) = run(&store, &plan, &tokenizer, at, &one, usize::MAX);
    consumed.extend(rest.iter().flat_map(|(p, _)| p.clone()));
    assert_eq!(end, plan.total);
    consumed.sort_unstable();
    assert_eq!(consumed, (0..plan.total).collect::<Vec<_>>());
    let (expected, _) = run(&store, &plan, &tokenizer, at, &one, usize::MAX);
    assert_eq!(rest, expected);
    // A state from another plan is refused.
    let mut foreign = plan.state(3);
    foreign.fingerprint = "0000000000000000".into();
    assert!(plan
        .resume(&foreign)
        .unwrap_err()
        .to_string()
        .contains("the store or the curriculum changed"));
}

#[test]
fn packed_sequences_never_attend_across_examples() {
    let dir = tempfile::tempdir().unwrap();
    let (store, plan, tokenizer) = fixture(dir.path());
    for packing in [true, false] {
        let o = options(8, 0, 1, packing);
        let batch = batches::batch_at(&store, &plan, &tokenizer, 0, &o)
            .unwrap()
            .unwrap();
        let segments = batch.segment_ids.to_vec2::<u32>().unwrap();
        let positions = batch.position_ids.to_vec2::<u32>().unwrap();
        let labels = batch.labels.to_vec2::<i64>().unwrap();
        let ids = batch.input_ids.to_vec2::<u32>().unwrap();
        let cu = batch.cu_seqlens.to_vec1::<u32>().unwrap();
        let starts = batch.seq_starts.to_vec1::<u32>().unwrap();
        let width = segments[0].len();
        assert_eq!(cu.len(), batch.positions.len() + 1);
        assert_eq!(starts.len(), batch.positions.len());
        if packing {
            assert_eq!(width, 4096);
            assert!(
                segments.len() < batch.positions.len(),
                "several examples share rows"
            );
        } else {
            assert_eq!(segments.len(), batch.positions.len());
        }
        let flat = |v: &Vec<Vec<u32>>| v.concat();
        let (seg, pos) = (flat(&segments), flat(&positions));
        // Every example: inside one row from its start, its length from cu_seqlens, its
        // own segment id, positions from 0; the spans never overlap.
        let mut span_of = vec![usize::MAX; seg.len()];
        for (i, &start) in starts.iter().enumerate() {
            let (start, len) = (start as usize, (cu[i + 1] - cu[i]) as usize);
            assert!(
                len > 0 && start / width == (start + len - 1) / width,
                "example {i} crosses a row"
            );
            for j in 0..len {
                assert_eq!(seg[start + j], i as u32 + 1);
                assert_eq!(pos[start + j], j as u32);
                assert_eq!(span_of[start + j], usize::MAX, "spans overlap");
                span_of[start + j] = i;
            }
        }
        assert_eq!(cu[cu.len() - 1] as usize, batch.tokens);
        assert_eq!(seg.iter().filter(|&&s| s != 0).count(), batch.tokens);
        // Attention allowed by the segment ids (causal, same segment) is exactly attention
        // within one example's span.
        for row in 0..segments.len() {
            for q in 0..width {
                for k in 0..=q {
                    let (fq, fk) = (row * width + q, row * width + k);
                    let by_segments = seg[fq] != 0 && seg[fq] == seg[fk];
                    let by_spans = span_of[fq] != usize::MAX && span_of[fq] == span_of[fk];
                    assert_eq!(by_segments, by_spans, "row {row}, query {q}, key {k}");
                }
            }
        }
        // Labels are the ids where trained, and nothing on padding.
        for (r, row) in labels.iter().enumerate() {
            for (c, &label) in row.iter().enumerate() {
                if segments[r][c] == 0 {
                    assert_eq!(label, batches::IGNORE);
                } else if label != batches::IGNORE {
                    assert_eq!(label, i64::from(ids[r][c]));
                }
            }
        }
        assert!(batch.trained_tokens > 0 && batch.trained_tokens < batch.tokens);
        assert_eq!(batch.learning_rate, 2.0e-5);
    }
}

#[test]
fn plan_and_batches_commands_on_the_sample_corpus() {
    use crate::util::{corpusdb, run_ok};
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let store = dir.path().join("store");
    run_ok(
        corpusdb(&store)
            .args(["ingest", "--manifest"])
            .arg(root.join("configs/sample-corpus.yaml")),
    );
    let curriculum = root.join("configs/curriculum/emergent_personality.yaml");
    let out = run_ok(
        corpusdb(&store)
            .args(["plan", "--json", "--batch-size", "8", "--curriculum"])
            .arg(&curriculum),
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let phases = plan["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 5);
    assert_eq!(phases[3]["name"], "mixed-fluency");
    assert_eq!(phases[3]["epochs"], 2);
    assert_eq!(phases[1]["learning_rate"], 1.5e-5);
    let total: u64 = phases.iter().map(|p| p["examples"].as_u64().unwrap()).sum();
    assert_eq!(plan["examples"], total);
    assert!(phases[3]["notes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n.as_str().unwrap().contains("`emotional` has no examples")));

    let tokenizer = trained_tokenizer(dir.path(), "hello world\nthe answer is four\n");
    let state = dir.path().join("state.json");
    let dump = dir.path().join("dump.jsonl");
    let out = run_ok(
        corpusdb(&store)
            .args([
                "batches",
                "--limit",
                "2",
                "--batch-size",
                "4",
                "--curriculum",
            ])
            .arg(&curriculum)
            .arg("--tokenizer")
            .arg(&tokenizer)
            .arg("--state")
            .arg(&state)
            .arg("--dump")
            .arg(&dump),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 batches, 8 examples"), "{stdout}");
    assert!(stdout.contains("packing efficiency"), "{stdout}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(saved["position"], 8);
    assert_eq!(saved["fingerprint"], plan["fingerprint"]);
    assert_eq!(std::fs::read_to_string(&dump).unwrap().lines().count(), 2);
    let out = run_ok(
        corpusdb(&store)
            .args([
                "batches",
                "--limit",
                "1",
                "--batch-size",
                "2",
                "--ranks",
                "2",
                "--rank",
                "1",
                "--curriculum",
            ])
            .arg(&curriculum)
            .arg("--tokenizer")
            .arg(&tokenizer)
            .arg("--resume")
            .arg(&state),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("state: position 12 of"));
}
