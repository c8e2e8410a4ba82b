//! The source registry (configs/sources.yaml) end to end: one fixture per family placed
//! where the registry expects it, imported by the real binary into one store.

use std::collections::BTreeMap;
use std::path::Path;

use corpusdb::store::Store;

use crate::util::{corpusdb, run_ok};

/// Registry source -> fixture file of tests/fixtures/formats.
const PLACED: [(&str, &str); 36] = [
    ("hh-rlhf", "hh-rlhf"),
    ("ultrachat", "ultrachat"),
    ("oasst1", "oasst-rows"),
    ("oasst2", "oasst"),
    ("gsm8k", "gsm8k"),
    ("gsm8k-full", "gsm8k"),
    ("writingprompts", "writingprompts"),
    ("squad_v2", "squad"),
    ("trivia_qa", "triviaqa"),
    ("code-alpaca", "alpaca"),
    ("glaive-function-calling-v2", "glaive"),
    ("empathetic_dialogues", "empathetic-dialogues"),
    ("prosocial-dialog", "prosocial-dialog"),
    ("moral_stories", "moral-stories"),
    ("openorca", "openorca"),
    ("mmlu", "multiple-choice"),
    ("code_contests", "code-contests"),
    ("codesearchnet", "codesearchnet"),
    ("apps", "apps"),
    ("magicoder-oss-instruct", "magicoder"),
    ("openhermes-2.5", "sharegpt"),
    ("flan-v2", "flan"),
    ("ultrafeedback", "preference"),
    ("dolly", "dolly"),
    ("math_qa", "mathqa"),
    ("prm800k", "prm800k"),
    ("competition_math", "math"),
    ("theoremqa", "theoremqa"),
    ("natural_questions", "natural-questions"),
    ("ms_marco", "msmarco"),
    ("hotpot_qa", "hotpotqa"),
    ("eli5", "eli5"),
    ("wiki_qa", "wikiqa"),
    ("ultrachat_200k", "messages"),
    ("the-stack-python", "text"),
    ("ethics-commonsense", "text"),
];

#[test]
fn the_registry_imports_every_present_family_into_one_store() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (source, fixture) in PLACED {
        let folder = data.join(source).join("train");
        std::fs::create_dir_all(&folder).unwrap();
        let from = root.join(format!("tests/fixtures/formats/{fixture}.jsonl"));
        let text = std::fs::read_to_string(&from).unwrap();
        // Two sources read by mappings get records of their own shape.
        let text = match source {
            "the-stack-python" => {
                "{\"content\": \"print('hello')\\n\", \"lang\": \"Python\"}\n".to_string()
            }
            "ethics-commonsense" => "{\"label\": 1, \"input\": \"I took my friend's lunch without asking.\"}\n{\"label\": 0, \"input\": \"I returned the wallet I found.\"}\n".to_string(),
            _ => text,
        };
        std::fs::write(folder.join("part-0.jsonl"), text).unwrap();
    }
    // The Dolly record again as Code Alpaca would spell it: the same conversation.
    std::fs::write(
        data.join("code-alpaca/train/part-1.jsonl"),
        r#"{"instruction": "When was the Eiffel Tower completed?", "input": "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was built for the 1889 World's Fair and completed in March 1889.", "output": "The Eiffel Tower was completed in March 1889."}"#,
    )
    .unwrap();
    // Files the readers do not take are ignored.
    std::fs::write(data.join("dolly/README.md"), "# notes").unwrap();

    let store_dir = dir.path().join("store");
    let registry = root.join("configs/sources.yaml");
    let empty_cache = dir.path().join("hf-cache");
    let run = |store_dir: &Path| {
        run_ok(
            corpusdb(store_dir)
                // No dataset comes from the machine's own Hugging Face cache.
                .env("HF_HUB_CACHE", &empty_cache)
                .arg("ingest")
                .arg("--registry")
                .arg(&registry)
                .arg("--data-dir")
                .arg(&data),
        )
    };
    let output = run(&store_dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains(&format!("registry: {} source(s) with files", PLACED.len())),
        "{stdout}"
    );
    // Sources without files are named with where they come from.
    assert!(
        stderr.contains("note: skipping slimorca (Hugging Face: Open-Orca/SlimOrca)"),
        "{stderr}"
    );

    let store = Store::open_read_only(&store_dir).unwrap();
    let imports = store.imports().unwrap();
    assert_eq!(imports.len(), PLACED.len() + 1, "one import per file");
    let counters = store.counters().unwrap();
    for import in &imports {
        assert!(
            import.counts.adds_up(),
            "{}: {:?}",
            import.source,
            import.counts
        );
    }
    // Every example has the category its source (or a rule) gave it.
    let mut by_source: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let names: BTreeMap<u32, String> = imports.iter().map(|i| (i.id, i.source.clone())).collect();
    for entry in store.ordinals() {
        let (_, hash) = entry.unwrap();
        let example = store.get(&hash).unwrap().unwrap();
        by_source
            .entry(names[&example.first_import].clone())
            .or_default()
            .push(example.category.clone());
    }
    let categories = |source: &str| by_source.get(source).cloned().unwrap_or_default();
    assert!(categories("gsm8k").iter().all(|c| c == "math"));
    assert!(categories("squad_v2").iter().all(|c| c == "qa"));
    assert!(categories("empathetic_dialogues")
        .iter()
        .all(|c| c == "emotional"));
    assert!(categories("glaive-function-calling-v2")
        .iter()
        .all(|c| c == "tool"));
    assert!(categories("writingprompts").iter().all(|c| c == "creative"));
    // OpenHermes is mixed: its rules send the train-speed problem to math.
    assert_eq!(
        categories("openhermes-2.5"),
        ["instruction", "instruction", "math"]
    );
    // gsm8k-full repeats gsm8k: all duplicates, both sources in the provenance.
    let full = imports.iter().find(|i| i.source == "gsm8k-full").unwrap();
    assert_eq!((full.counts.stored, full.counts.duplicates), (0, 2));
    assert!(!by_source.contains_key("gsm8k-full"));
    // The Code Alpaca spelling of the Dolly record is one example with two sources.
    let dolly_hash = corpusdb::formats::Formats::builtin()
        .get("dolly")
        .unwrap()
        .parse(
            std::fs::read_to_string(root.join("tests/fixtures/formats/dolly.jsonl"))
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .as_bytes(),
        )
        .unwrap()
        .remove(0)
        .unwrap()
        .conversation
        .content_hash();
    let mut sources: Vec<&str> = store
        .provenance(&dolly_hash)
        .unwrap()
        .iter()
        .map(|p| names[&p.import_id].as_str())
        .collect();
    sources.sort();
    assert_eq!(sources, ["code-alpaca", "dolly"]);
    // Code Alpaca comes first in the registry, so its category stays.
    assert_eq!(store.get(&dolly_hash).unwrap().unwrap().category, "code");
    assert_eq!(counters.sources.get("code-alpaca"), Some(&4));
    assert_eq!(counters.sources.get("dolly"), Some(&3));
    drop(store);

    // A second run finds every file imported and changes nothing.
    let before = crate::util::stored_hashes(&store_dir);
    let again = run(&store_dir);
    assert!(String::from_utf8_lossy(&again.stdout).contains("already imported"));
    assert_eq!(crate::util::stored_hashes(&store_dir), before);
}

/// A dataset as `huggingface_hub` caches it: `refs/main` names the snapshot, whose files
/// are links into `blobs/`; an older snapshot beside it.
fn fake_hub_cache(cache: &Path, org: &str, name: &str, records: &str) {
    let dataset = cache.join(format!("datasets--{org}--{name}"));
    std::fs::create_dir_all(dataset.join("blobs")).unwrap();
    std::fs::create_dir_all(dataset.join("refs")).unwrap();
    std::fs::write(dataset.join("blobs/b1"), records).unwrap();
    std::fs::write(dataset.join("refs/main"), "rev1\n").unwrap();
    let split = dataset.join("snapshots/rev1/main");
    std::fs::create_dir_all(&split).unwrap();
    std::os::unix::fs::symlink(
        "../../../blobs/b1",
        split.join("train-00000-of-00001.jsonl"),
    )
    .unwrap();
    std::fs::write(split.join("../README.md"), "# card").unwrap();
    let old = dataset.join("snapshots/rev0");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(
        old.join("old.jsonl"),
        "{\"instruction\": \"old\", \"output\": \"x\"}\n",
    )
    .unwrap();
}

#[test]
fn datasets_in_the_hugging_face_cache_are_named_by_hub_id() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    fake_hub_cache(
        &cache,
        "acme",
        "qa",
        "{\"instruction\": \"Name a planet.\", \"output\": \"Mars.\"}\n{\"instruction\": \"Name a color.\", \"output\": \"Red.\"}\n",
    );
    let store_dir = dir.path().join("store");
    run_ok(corpusdb(&store_dir).env("HF_HUB_CACHE", &cache).args([
        "ingest",
        "hf:acme/qa",
        "--source",
        "qa",
        "--category",
        "qa",
    ]));
    {
        let store = Store::open_read_only(&store_dir).unwrap();
        assert_eq!(
            store.counters().unwrap().examples,
            2,
            "refs/main's snapshot only"
        );
        let imports = store.imports().unwrap();
        assert!(imports[0]
            .path
            .ends_with("snapshots/rev1/main/train-00000-of-00001.jsonl"));
    }
    // Not in the cache: the error says where it looked and how to fetch it.
    let out = corpusdb(&store_dir)
        .env("HF_HUB_CACHE", &cache)
        .args([
            "ingest",
            "hf:acme/missing",
            "--source",
            "m",
            "--category",
            "qa",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hf:acme/missing: not in the Hugging Face cache at")
            && stderr.contains("huggingface-cli download --repo-type dataset acme/missing"),
        "{stderr}"
    );
    // A registry source with a hub id and no files under --data-dir comes from the cache.
    let registry = dir.path().join("sources.yaml");
    std::fs::write(
        &registry,
        "sources:\n  - name: acme-qa\n    hub: acme/qa\n    category: qa\n  - name: other\n    hub: acme/other\n    category: qa\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let out = run_ok(
        corpusdb(&dir.path().join("store2"))
            .env("HF_HUB_CACHE", &cache)
            .arg("ingest")
            .arg("--registry")
            .arg(&registry)
            .arg("--data-dir")
            .arg(&data),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("note: acme-qa: 1 file(s) from the Hugging Face cache (acme/qa)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("note: skipping other (Hugging Face: acme/other)"),
        "{stderr}"
    );
    let store = Store::open_read_only(&dir.path().join("store2")).unwrap();
    assert_eq!(store.counters().unwrap().examples, 2);
}
