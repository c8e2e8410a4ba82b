//! The token cache (`corpusdb tokenize`): batches read from it equal the batches encoded
//! from the store, it is extended after new imports, not used for another tokenizer,
//! template setting or store, and survives a killed writer.

use std::path::Path;

use corpusdb::batches::{self, cache, BatchOptions, ChatTokenizer, TokenCache};
use corpusdb::curriculum::{Curriculum, Plan};
use corpusdb::index::Index;
use corpusdb::store::Store;

use crate::curriculum::{fixture, options, trained_tokenizer};
use crate::util::{self, corpusdb, run_ok};

/// Everything a batch carries that training reads, for comparisons.
#[derive(Debug, PartialEq)]
struct Seen {
    positions: Vec<u64>,
    ordinals: Vec<u64>,
    input_ids: Vec<Vec<u32>>,
    labels: Vec<Vec<i64>>,
    position_ids: Vec<Vec<u32>>,
    cu_seqlens: Vec<u32>,
    /// Examples the template refused, with the reason.
    refused: Vec<(u64, String)>,
    learning_rate: f64,
}

/// Every batch of the plan, and how many examples came from the cache.
fn stream(
    store: &Store,
    cache: Option<&TokenCache>,
    plan: &Plan,
    tokenizer: &ChatTokenizer,
    o: &BatchOptions,
) -> (Vec<Seen>, u64) {
    batches::with_stream_from(store, cache, plan, tokenizer, 0, o, 2, |stream| {
        let seen = stream
            .by_ref()
            .map(|b| {
                let b = b.unwrap();
                Seen {
                    positions: b.positions.clone(),
                    ordinals: b.ordinals.clone(),
                    input_ids: b.input_ids.to_vec2().unwrap(),
                    labels: b.labels.to_vec2().unwrap(),
                    position_ids: b.position_ids.to_vec2().unwrap(),
                    cu_seqlens: b.cu_seqlens.to_vec1().unwrap(),
                    refused: b.skipped.clone(),
                    learning_rate: b.learning_rate,
                }
            })
            .collect();
        (seen, stream.stats().cached)
    })
}

fn plan_of(store: &Store) -> Plan {
    let index = Index::open_or_create(store.path(), false).unwrap();
    index.catch_up(store, &|_, _| {}).unwrap();
    let curriculum: Curriculum = serde_yaml::from_str(
        "name: t\nseed: 5\nphases:\n  - {name: a, select: '*', epochs: 2, learning_rate: 1.0e-5}\n",
    )
    .unwrap();
    Plan::build(&index, &curriculum).unwrap()
}

#[test]
fn batches_from_the_cache_equal_batches_encoded_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (store, plan, tokenizer) = fixture(dir.path());
    let examples = store.counters().unwrap().examples;
    let report = cache::tokenize(&store, &tokenizer, &|_, _| {}).unwrap();
    assert_eq!((report.examples_before, report.examples), (0, examples));
    assert!(report.tokens > examples * 10, "{report:?}");
    let cache = TokenCache::open(&store, &tokenizer)
        .unwrap()
        .expect("a cache");
    assert_eq!(cache.examples(), examples);
    // Every example's tokens as the tokenizer makes them.
    for ordinal in 0..examples {
        let hash = store.hash_at(ordinal).unwrap().unwrap();
        let conversation = store.get(&hash).unwrap().unwrap().conversation;
        let expected = tokenizer.encode(&conversation).unwrap();
        assert_eq!(cache.get(ordinal).unwrap().unwrap(), expected);
    }
    assert!(cache.get(examples).is_none());
    for packing in [true, false] {
        let o = options(6, 0, 1, packing);
        let (encoded, none_cached) = stream(&store, None, &plan, &tokenizer, &o);
        let (cached, from_cache) = stream(&store, Some(&cache), &plan, &tokenizer, &o);
        assert_eq!(none_cached, 0);
        assert_eq!(from_cache, plan.total);
        assert!(encoded.len() > 5);
        assert_eq!(cached, encoded);
    }
    // `with_stream` finds the cache by itself; so does a second rank.
    let o = options(4, 1, 2, true);
    let found = batches::with_stream(&store, &plan, &tokenizer, 0, &o, 2, |s| {
        s.by_ref().for_each(|b| drop(b.unwrap()));
        s.stats()
    });
    assert_eq!(found.cached, found.examples);
    assert_eq!(
        stream(&store, Some(&cache), &plan, &tokenizer, &o).0,
        stream(&store, None, &plan, &tokenizer, &o).0
    );
}

#[test]
fn new_imports_extend_the_cache_and_examples_past_its_end_are_encoded() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, tokenizer) = fixture(dir.path());
    let first = cache::tokenize(&store, &tokenizer, &|_, _| {}).unwrap();
    let more = dir.path().join("more.jsonl");
    corpusdb::synth::generate_file(
        &more,
        &corpusdb::synth::SynthSpec {
            records: 70,
            seed: 99,
            ..Default::default()
        },
    )
    .unwrap();
    util::ingest(&store, &more, "more", "general");
    let total = store.counters().unwrap().examples;
    assert!(total > first.examples);
    let plan = plan_of(&store);
    let o = options(8, 0, 1, true);
    let (expected, _) = stream(&store, None, &plan, &tokenizer, &o);
    // The cache covers the old examples only: the new ones are encoded from the store.
    let stale = TokenCache::open(&store, &tokenizer).unwrap().unwrap();
    let (partly, cached) = stream(&store, Some(&stale), &plan, &tokenizer, &o);
    assert_eq!(partly, expected);
    assert!(
        cached > 0 && cached < plan.total,
        "{cached} of {}",
        plan.total
    );
    // A second tokenize encodes the new examples only.
    let second = cache::tokenize(&store, &tokenizer, &|_, _| {}).unwrap();
    assert_eq!(
        (second.examples_before, second.examples),
        (first.examples, total)
    );
    let full = TokenCache::open(&store, &tokenizer).unwrap().unwrap();
    let (all, cached) = stream(&store, Some(&full), &plan, &tokenizer, &o);
    assert_eq!(all, expected);
    assert_eq!(cached, plan.total);
    // Extending gives the bytes a single run gives.
    let once = tempfile::tempdir().unwrap();
    copy_store_without_tokens(store.path(), once.path());
    let copy = Store::open_read_only(once.path()).unwrap();
    cache::tokenize(&copy, &tokenizer, &|_, _| {}).unwrap();
    for file in ["tokens.bin", "offsets.bin"] {
        assert_eq!(
            std::fs::read(full.dir().join(file)).unwrap(),
            std::fs::read(cache::cache_dir(once.path(), &tokenizer).join(file)).unwrap(),
            "{file}"
        );
    }
}

fn copy_store_without_tokens(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn another_tokenizer_setting_or_store_does_not_use_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (store, plan, tokenizer) = fixture(dir.path());
    cache::tokenize(&store, &tokenizer, &|_, _| {}).unwrap();
    // Another end-of-turn marker makes other tokens: another cache, none written yet.
    let mut other = ChatTokenizer::load(&dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(other.fingerprint(), tokenizer.fingerprint());
    other.set_end_of_turn("</s>");
    assert_ne!(other.fingerprint(), tokenizer.fingerprint());
    assert!(TokenCache::open(&store, &other).unwrap().is_none());
    let o = options(6, 0, 1, true);
    let stats = batches::with_stream(&store, &plan, &other, 0, &o, 2, |s| {
        s.by_ref().for_each(|b| drop(b.unwrap()));
        s.stats()
    });
    assert_eq!(stats.cached, 0);
    // Another tokenizer file.
    let retrained = tempfile::tempdir().unwrap();
    let another = ChatTokenizer::load(&trained_tokenizer(
        retrained.path(),
        "entirely different words for another vocabulary\n",
    ))
    .unwrap();
    assert_ne!(another.fingerprint(), tokenizer.fingerprint());
    // The cache directory moved under another store (same tokenizer): its examples are
    // not that store's, so it is not used, and tokenize writes it again.
    let elsewhere = tempfile::tempdir().unwrap();
    let (other_store, _) = crate::curriculum::store_with_categories(elsewhere.path());
    let other_store_path = other_store.path().to_owned();
    drop(other_store);
    let source = cache::cache_dir(store.path(), &tokenizer);
    let target = cache::cache_dir(&other_store_path, &tokenizer);
    std::fs::create_dir_all(&target).unwrap();
    for file in ["tokens.bin", "offsets.bin", "skipped.jsonl", "meta.json"] {
        std::fs::copy(source.join(file), target.join(file)).unwrap();
    }
    // Same first example (the same synthetic seeds), so the last one tells them apart:
    // add one more example to the other store.
    let other_store = Store::open(&other_store_path).unwrap();
    let extra = util::write(
        elsewhere.path(),
        "extra.jsonl",
        br#"{"instruction": "A question only the other store has", "output": "Its answer."}"#,
    );
    util::ingest(&other_store, &extra, "extra", "general");
    let report = cache::tokenize(&other_store, &tokenizer, &|_, _| {}).unwrap();
    let examples = other_store.counters().unwrap().examples;
    assert_eq!(report.examples, examples);
    let moved = TokenCache::open(&other_store, &tokenizer).unwrap().unwrap();
    let hash = other_store.hash_at(examples - 1).unwrap().unwrap();
    let conversation = other_store.get(&hash).unwrap().unwrap().conversation;
    assert_eq!(
        moved.get(examples - 1).unwrap().unwrap(),
        tokenizer.encode(&conversation).unwrap()
    );
}

#[test]
fn a_killed_tokenize_leaves_a_cache_that_reads_and_resumes_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let (store, plan, tokenizer) = fixture(dir.path());
    let report = cache::tokenize(&store, &tokenizer, &|_, _| {}).unwrap();
    let cache_dir = cache::cache_dir(store.path(), &tokenizer);
    let clean: Vec<Vec<u8>> = ["tokens.bin", "offsets.bin"]
        .iter()
        .map(|f| std::fs::read(cache_dir.join(f)).unwrap())
        .collect();
    // What a writer killed after appending a partial chunk leaves: bytes past what
    // meta.json covers, and meta.json saying fewer examples than the files hold.
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cache_dir.join("meta.json")).unwrap())
            .unwrap();
    let keep = report.examples / 2;
    let offsets = &clean[1];
    let at = |i: u64| u64::from_le_bytes(offsets[i as usize * 8..][..8].try_into().unwrap());
    meta["examples"] = keep.into();
    meta["tokens"] = at(keep).into();
    meta["last_hash"] = store.hash_at(keep - 1).unwrap().unwrap().to_hex().into();
    std::fs::write(cache_dir.join("meta.json"), meta.to_string()).unwrap();
    let mut tokens = clean[0].clone();
    tokens.extend_from_slice(&[0xAB; 10]);
    std::fs::write(cache_dir.join("tokens.bin"), tokens).unwrap();
    // A reader uses what meta.json covers and encodes the rest.
    let partial = TokenCache::open(&store, &tokenizer).unwrap().unwrap();
    assert_eq!(partial.examples(), keep);
    let o = options(6, 0, 1, true);
    assert_eq!(
        stream(&store, Some(&partial), &plan, &tokenizer, &o).0,
        stream(&store, None, &plan, &tokenizer, &o).0
    );
    drop(partial);
    // tokenize resumes from meta.json and ends with the bytes of a clean run.
    let resumed = cache::tokenize(&store, &tokenizer, &|_, _| {}).unwrap();
    assert_eq!(
        (resumed.examples_before, resumed.examples),
        (keep, report.examples)
    );
    for (file, bytes) in ["tokens.bin", "offsets.bin"].iter().zip(&clean) {
        assert_eq!(
            &std::fs::read(cache_dir.join(file)).unwrap(),
            bytes,
            "{file}"
        );
    }
}

#[test]
fn examples_the_template_refuses_are_left_out_alike_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = fixture(dir.path());
    let zebras = util::write(
        dir.path(),
        "zebras.jsonl",
        b"{\"instruction\": \"Tell me about zebras\", \"output\": \"Stripes.\"}\n{\"instruction\": \"Count to three\", \"output\": \"One, two, three.\"}\n",
    );
    util::ingest(&store, &zebras, "zebras", "general");
    // A model template that refuses one example.
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        dir.path().join("tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        model.join("tokenizer_config.json"),
        serde_json::json!({
            "eos_token": "<|im_end|>",
            "chat_template": "{% for message in messages %}{% if 'zebra' in message['content'] %}{{ raise_exception('no zebras here') }}{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
        })
        .to_string(),
    )
    .unwrap();
    let tokenizer = ChatTokenizer::load(&model).unwrap();
    let report = cache::tokenize(&store, &tokenizer, &|_, _| {}).unwrap();
    assert_eq!(report.skipped, 1);
    let plan = plan_of(&store);
    let o = options(8, 0, 1, true);
    let (expected, _) = stream(&store, None, &plan, &tokenizer, &o);
    let cache = TokenCache::open(&store, &tokenizer).unwrap().unwrap();
    let (cached, from_cache) = stream(&store, Some(&cache), &plan, &tokenizer, &o);
    assert_eq!(cached, expected);
    assert_eq!(from_cache, plan.total);
    let refused: Vec<_> = cached.iter().flat_map(|s| s.refused.clone()).collect();
    assert_eq!(refused.len(), 2, "the refused example, once per epoch");
    assert!(refused[0].1.contains("no zebras here"), "{refused:?}");
}

#[test]
fn the_tokenize_command_reports_the_cache_and_batches_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = fixture(dir.path());
    let store_path = store.path().to_owned();
    drop(store);
    let tokenizer = dir.path().join("tokenizer.json");
    let out = run_ok(
        corpusdb(&store_path)
            .args(["tokenize", "--tokenizer"])
            .arg(&tokenizer),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("token cache"), "{text}");
    assert!(text.contains(" new in "), "{text}");
    let curriculum = util::write(
        dir.path(),
        "c.yaml",
        b"name: t\nseed: 1\nphases:\n  - {name: a, select: '*', learning_rate: 1.0e-5}\n",
    );
    let out = run_ok(
        corpusdb(&store_path)
            .args(["batches", "--curriculum"])
            .arg(&curriculum)
            .arg("--tokenizer")
            .arg(&tokenizer),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("examples from the token cache (0 encoded from the store)"),
        "{text}"
    );
    // Again: nothing new to encode.
    let out = run_ok(
        corpusdb(&store_path)
            .args(["tokenize", "--tokenizer"])
            .arg(&tokenizer),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("(0 new in"));
}

#[test]
fn analyze_counts_tokens_as_trained_from_a_complete_cache() {
    use corpusdb::analyze::{self, Targets, TokenCounter};
    let dir = tempfile::tempdir().unwrap();
    let (store, _, tokenizer) = fixture(dir.path());
    let counter = TokenCounter::load(&dir.path().join("tokenizer.json")).unwrap();
    let targets = Targets::strategy_default();
    let before = analyze::analyze(&store, Some(&counter), &targets, &|_, _| {}).unwrap();
    assert!(!before.token_count.contains("token cache"));
    let report = cache::tokenize(&store, &tokenizer, &|_, _| {}).unwrap();
    let after = analyze::analyze(&store, Some(&counter), &targets, &|_, _| {}).unwrap();
    assert!(
        after.token_count.contains("token cache"),
        "{}",
        after.token_count
    );
    // The template's markers are counted too.
    assert_eq!(after.tokens, report.tokens);
    assert!(after.tokens > before.tokens);
}
