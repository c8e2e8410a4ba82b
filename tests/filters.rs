//! Quality filters: each kind on both sides of its threshold, at ingest (rejects) and
//! against a store (reversible exclusions that queries, categories and exports skip).

use corpusdb::conversation::{Conversation, Message, Role};
use corpusdb::filters::{Check, FilterSpec, Filters};
use serde_json::Value;

use crate::util::{corpusdb, run_ok, write};

fn chat(user: &str, assistant: &str) -> Conversation {
    Conversation::new(vec![
        Message::new(Role::User, user),
        Message::new(Role::Assistant, assistant),
    ])
}

/// The measurement of the one filter `check` on `conversation`, `None` when it passes.
fn measure(check: Check, conversation: &Conversation) -> Option<String> {
    let filters = Filters::new(vec![FilterSpec {
        name: "f".into(),
        check,
    }])
    .unwrap();
    filters.first_failure(conversation).map(|f| f.measured)
}

#[test]
fn each_filter_passes_below_and_fails_above_its_threshold() {
    let five = chat("hello", "12345");
    let chars = |min, max| Check::MessageChars { min, max };
    assert_eq!(measure(chars(Some(5), Some(5)), &five), None);
    assert_eq!(
        measure(chars(Some(6), None), &five).as_deref(),
        Some("message 1 (user) has 5 < 6 characters")
    );
    assert_eq!(
        measure(chars(None, Some(4)), &five).as_deref(),
        Some("message 1 (user) has 5 > 4 characters")
    );
    let example = |min, max| Check::ExampleChars { min, max };
    assert_eq!(measure(example(Some(10), Some(10)), &five), None);
    assert_eq!(
        measure(example(None, Some(9)), &five).as_deref(),
        Some("example has 10 > 9 characters")
    );
    assert_eq!(
        measure(example(Some(11), None), &five).as_deref(),
        Some("example has 10 < 11 characters")
    );

    let mut empty = chat("hi", "   ");
    // (normalisation would trim it; filters see what the store holds)
    empty.messages[1].content = " ".into();
    assert_eq!(
        measure(Check::EmptyAssistant, &empty).as_deref(),
        Some("message 2 is an empty assistant message")
    );
    let mut calls_tool = chat("hi", "");
    calls_tool.messages[1].tool_calls = Some("[]".into());
    assert_eq!(measure(Check::EmptyAssistant, &calls_tool), None);

    let repeat = |max_ratio| Check::RepeatedNgrams {
        n: 2,
        max_ratio,
        min_ngrams: 4,
    };
    // "a b a b a b": bigrams ab ba ab ba ab -> 2 distinct of 5, ratio 0.6.
    let looping = chat("q", "a b a b a b");
    assert_eq!(measure(repeat(0.6), &looping), None);
    assert_eq!(
        measure(repeat(0.59), &looping).as_deref(),
        Some("repeated 2-gram ratio 0.60 > 0.59")
    );
    // Too short to judge: 3 bigrams < min_ngrams 4.
    assert_eq!(measure(repeat(0.0), &chat("q", "a a a a")), None);

    // 2 control characters among 10.
    let noisy = chat("abcd", "ef\u{0}\u{7}gh");
    let control = |max_ratio| Check::ControlChars { max_ratio };
    assert_eq!(measure(control(0.2), &noisy), None);
    assert_eq!(
        measure(control(0.19), &noisy).as_deref(),
        Some("control character ratio 0.200 > 0.19")
    );
    assert_eq!(measure(control(0.0), &chat("line\none", "tab\there")), None);

    let phrases = |roles: &[&str]| Check::Phrases {
        phrases: vec!["As an AI language model".into()],
        roles: roles.iter().map(|r| r.to_string()).collect(),
    };
    let boiler = chat("Are you human?", "AS AN AI LANGUAGE MODEL, I am not.");
    assert_eq!(
        measure(phrases(&["assistant"]), &boiler).as_deref(),
        Some("contains \"as an ai language model\"")
    );
    assert_eq!(measure(phrases(&["user"]), &boiler), None);

    let english = Check::Language {
        allow: vec!["eng".into()],
        min_chars: 40,
    };
    let german = chat(
        "Wie backt man einen einfachen Apfelkuchen zu Hause?",
        "Man bereitet einen Teig vor, legt die Äpfel darauf und backt ihn vierzig Minuten.",
    );
    let failure = measure(english.clone(), &german).unwrap();
    assert!(failure.starts_with("language deu ("), "{failure}");
    assert!(failure.ends_with(") is not allowed"), "{failure}");
    let english_text = chat(
        "How do I bake a simple apple cake at home?",
        "Make a dough, lay the apple slices on top and bake it for forty minutes.",
    );
    assert_eq!(measure(english.clone(), &english_text), None);
    // Short texts are not judged.
    assert_eq!(measure(english, &chat("Hallo", "Guten Tag")), None);

    let turns = chat("a", "b");
    assert_eq!(measure(Check::MaxTurns { max: 1 }, &turns), None);
    assert_eq!(
        measure(Check::MaxTurns { max: 0 }, &turns).as_deref(),
        Some("1 turns > 0")
    );
}

#[test]
fn bad_filter_configs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "f.yaml",
        b"filters:\n  - name: x\n    kind: language\n    allow: [klingon]\n",
    );
    let error = Filters::load(&bad).unwrap_err().to_string();
    assert!(error.contains("unknown language code `klingon`"), "{error}");
    let unknown = write(
        dir.path(),
        "g.yaml",
        b"filters:\n  - name: x\n    kind: vibes\n",
    );
    let error = Filters::load(&unknown).unwrap_err().to_string();
    assert!(error.contains("unknown variant `vibes`"), "{error}");
    // The shipped default set loads.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let defaults = Filters::load(&root.join("configs/filters.yaml")).unwrap();
    assert!(defaults.names().count() >= 8);
}

fn count(store: &std::path::Path, query: &str) -> u64 {
    let out = run_ok(corpusdb(store).args(["query", query, "--count"]));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn filtering_a_store_excludes_reversibly_and_excluded_examples_leave_queries_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let data = write(
        dir.path(),
        "d.jsonl",
        br#"{"instruction": "Are you a person?", "output": "As an AI language model, I am not a person."}
{"instruction": "Sing", "output": "la la la la la la la la la la la la la la la la la la la la la la la la la la"}
{"instruction": "Name a primary color.", "output": "Red."}
{"instruction": "Name a planet.", "output": "Mars."}
"#,
    );
    run_ok(
        corpusdb(&store)
            .args(["ingest", "--source", "s", "--category", "instruction"])
            .arg(&data),
    );
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/filters.yaml");
    let hashes_before = crate::util::stored_hashes(&store);

    // A dry run counts and changes nothing.
    let out = run_ok(
        corpusdb(&store)
            .args(["filter", "--dry-run", "--json", "--config"])
            .arg(&config),
    );
    let dry: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dry["filters"]["ai-boilerplate"]["excluded"], 1);
    assert_eq!(dry["filters"]["repetition"]["excluded"], 1);
    assert_eq!(count(&store, "*"), 4);
    assert_eq!(count(&store, "excluded:*"), 0);

    run_ok(corpusdb(&store).args(["filter", "--config"]).arg(&config));
    assert_eq!(count(&store, "*"), 2);
    assert_eq!(count(&store, "category:instruction"), 2);
    assert_eq!(count(&store, "excluded:*"), 2);
    assert_eq!(count(&store, "excluded:repetition"), 1);
    let out = run_ok(corpusdb(&store).args(["categories", "--json"]));
    let categories: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(categories["examples"], 2);
    assert_eq!(categories["counts"][0]["examples"], 2);
    let export = dir.path().join("out.jsonl");
    run_ok(corpusdb(&store).args(["export", "*", "--out"]).arg(&export));
    assert_eq!(std::fs::read_to_string(&export).unwrap().lines().count(), 2);
    // Nothing was deleted, and the exclusion says why.
    assert_eq!(crate::util::stored_hashes(&store), hashes_before);
    let out = run_ok(corpusdb(&store).args(["check"]));
    assert!(out.status.success());

    // Running again changes nothing; undo restores.
    let out = run_ok(
        corpusdb(&store)
            .args(["filter", "--json", "--config"])
            .arg(&config),
    );
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["filters"]["repetition"]["excluded"], 0);
    assert_eq!(again["filters"]["repetition"]["kept"], 1);
    run_ok(corpusdb(&store).args(["filter", "--undo", "repetition"]));
    assert_eq!(count(&store, "*"), 3);
    run_ok(corpusdb(&store).args(["filter", "--undo", "ai-boilerplate"]));
    assert_eq!(count(&store, "*"), 4);
    assert_eq!(count(&store, "excluded:*"), 0);
}

#[test]
fn ingest_with_filters_rejects_with_the_filter_name_and_measurement() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let data = write(
        dir.path(),
        "d.jsonl",
        br#"{"instruction": "Are you a person?", "output": "As an AI language model, I am not a person."}
{"instruction": "Name a planet.", "output": "Mars."}
"#,
    );
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/filters.yaml");
    let out = run_ok(
        corpusdb(&store)
            .args(["ingest", "--source", "s", "--category", "c", "--filters"])
            .arg(&config)
            .arg(&data),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 2, stored 1, duplicates 0, rejected 1")
    );
    let out = run_ok(corpusdb(&store).args(["rejects", "--json"]));
    let reject: Value =
        serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(
        reject["reason"],
        "filter `ai-boilerplate`: contains \"as an ai language model\""
    );
    let out = run_ok(corpusdb(&store).args(["rejects", "--by-reason", "--json"]));
    let kinds: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(kinds[0]["reason"], "filter `ai-boilerplate`");
    assert_eq!(kinds[0]["kind"], "filter");
    assert_eq!(kinds[0]["subject"], "ai-boilerplate");
    assert_eq!(kinds[0]["sources"]["s"], 1);
}
