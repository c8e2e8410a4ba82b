//! Near-duplicate clusters on real stores: quality against exact Jaccard computed by brute
//! force on a sample with known edits, determinism, incremental runs, and the reversible
//! exclusions as queries, `show` and `analyze` see them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use corpusdb::conversation::ContentHash;
use corpusdb::index::query::parse;
use corpusdb::index::Index;
use corpusdb::neardup::{self, Config, MinHasher, Options};
use corpusdb::store::{ClusterMembership, Store};
use corpusdb::synth::{self, NearDupSpec};

use crate::util::{corpusdb, ingest, run_ok};

/// Writes the near-duplicate sample (`records` records, 40% edited copies) as JSONL.
fn sample(dir: &Path, name: &str, records: u64, seed: u64) -> PathBuf {
    let path = dir.join(name);
    let mut out = std::fs::File::create(&path).unwrap();
    synth::write_near_duplicates(
        &mut out,
        &NearDupSpec {
            records,
            copy_fraction: 0.4,
            seed,
        },
    )
    .unwrap();
    path
}

fn run(store: &Store, options: &Options) -> neardup::Outcome {
    neardup::run(store, options, &|_, _, _| {}).unwrap()
}

fn memberships(store: &Store) -> BTreeMap<ContentHash, ClusterMembership> {
    store.cluster_memberships().map(|m| m.unwrap()).collect()
}

/// Every stored example's shingle set, in hash order.
fn shingle_sets(store: &Store, ngram: usize) -> Vec<(ContentHash, Vec<u64>)> {
    let mut out = Vec::new();
    store
        .for_each_example(|hash, example| {
            let text = neardup::training_text(&example.conversation);
            out.push((*hash, neardup::shingles(&text, ngram)));
            Ok(())
        })
        .unwrap();
    out
}

/// Pair counts of one sample, against exact Jaccard computed by brute force.
#[derive(Default, Debug)]
struct Quality {
    /// Pairs at exact J >= 0.85, and how many of them share a cluster.
    true_pairs: u64,
    found: u64,
    /// Linked pairs (estimated J >= 0.8), and how many are at exact J >= 0.8 / >= 0.75.
    linked: u64,
    strict: u64,
    within_margin: u64,
    /// Pairs in one cluster whose exact J is below 0.3 (unrelated conversations).
    unrelated_together: u64,
    /// Mean of estimated minus exact J over the stored pairs.
    mean_error: f64,
}

fn quality(dir: &Path, seed: u64) -> Quality {
    let file = sample(dir, &format!("sample-{seed}.jsonl"), 700, seed);
    let store = Store::open(&dir.join(format!("store-{seed}"))).unwrap();
    ingest(&store, &file, "sample", "instruction");
    run(&store, &Options::default());
    let clusters = memberships(&store);
    let pairs: HashMap<(ContentHash, ContentHash), f32> = store
        .near_dup_pairs()
        .map(|p| {
            let (a, b, j) = p.unwrap();
            ((a, b), j)
        })
        .collect();
    let sets = shingle_sets(&store, 5);
    let mut q = Quality::default();
    for i in 0..sets.len() {
        for j in i + 1..sets.len() {
            let exact = neardup::exact_jaccard(&sets[i].1, &sets[j].1);
            let (a, b) = (sets[i].0, sets[j].0);
            let together = matches!(
                (clusters.get(&a), clusters.get(&b)),
                (Some(x), Some(y)) if x.cluster == y.cluster
            );
            if exact >= 0.85 {
                q.true_pairs += 1;
                q.found += u64::from(together);
            }
            if pairs.get(&(a, b)).is_some_and(|&j| f64::from(j) >= 0.8) {
                q.linked += 1;
                q.strict += u64::from(exact >= 0.8);
                q.within_margin += u64::from(exact >= 0.75);
            }
            q.unrelated_together += u64::from(together && exact < 0.3);
        }
    }
    let exact_of: HashMap<ContentHash, &Vec<u64>> = sets.iter().map(|(h, s)| (*h, s)).collect();
    let errors: Vec<f64> = pairs
        .iter()
        .map(|((a, b), &j)| f64::from(j) - neardup::exact_jaccard(exact_of[a], exact_of[b]))
        .collect();
    q.mean_error = errors.iter().sum::<f64>() / errors.len() as f64;
    q
}

/// Recall is measured on pairs at exact J >= 0.85 and precision on linked pairs (estimated
/// J >= 0.8) at exact J >= 0.75: with 112 permutations the estimate's standard deviation
/// near 0.8 is about 0.04, so pairs within that band of the threshold fall either way.
/// The strict precision (exact J >= 0.8) is checked too, with its own bound.
#[test]
fn clusters_match_exact_jaccard_on_a_sample_with_known_edits() {
    let dir = tempfile::tempdir().unwrap();
    let mut total = Quality::default();
    for seed in [1, 2, 3] {
        let q = quality(dir.path(), seed);
        assert!(q.true_pairs > 100, "the sample has near-duplicates: {q:?}");
        assert_eq!(q.unrelated_together, 0, "unrelated examples in one cluster");
        assert!(q.mean_error.abs() < 0.02, "the estimate is biased: {q:?}");
        total.true_pairs += q.true_pairs;
        total.found += q.found;
        total.linked += q.linked;
        total.strict += q.strict;
        total.within_margin += q.within_margin;
    }
    let recall = total.found as f64 / total.true_pairs as f64;
    let precision = total.within_margin as f64 / total.linked as f64;
    let strict = total.strict as f64 / total.linked as f64;
    eprintln!(
        "recall {recall:.3} ({}/{} pairs at exact J >= 0.85); precision {precision:.3} \
         ({}/{} linked pairs at exact J >= 0.75), strict {strict:.3} (at exact J >= 0.8)",
        total.found, total.true_pairs, total.within_margin, total.linked
    );
    assert!(recall >= 0.9, "recall {recall}");
    assert!(precision >= 0.95, "precision {precision}");
    assert!(strict >= 0.9, "strict precision {strict}");
}

#[test]
fn the_representative_follows_the_rule_and_the_rest_are_excluded_reversibly() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    // The same conversation three ways: the original, one with a sentence more in the
    // assistant reply, one with another system prompt; and an unrelated one.
    let reply = "Rust checks ownership at compile time. Every value has one owner. When the owner goes out of scope the value is dropped. Borrowing lends access without moving ownership. The borrow checker enforces these rules so memory stays safe without a garbage collector. References must always be valid.";
    let longer = format!("{reply} Lifetimes describe how long references live.");
    let line = |system: &str, reply: &str| {
        serde_json::json!({"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Explain ownership in Rust and why it matters for memory safety."},
            {"role": "assistant", "content": reply},
        ]})
        .to_string()
    };
    let a = dir.path().join("a.jsonl");
    std::fs::write(
        &a,
        [
            line("You are a helpful assistant.", reply),
            line("You are a concise assistant.", reply),
        ]
        .join("\n"),
    )
    .unwrap();
    let b = dir.path().join("b.jsonl");
    std::fs::write(
        &b,
        [
            line("You are a helpful assistant.", &longer),
            line(
                "You are a helpful assistant.",
                "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside chloroplasts of plant cells, which is where most energy in food chains starts.",
            ),
        ]
        .join("\n"),
    )
    .unwrap();
    {
        let store = Store::open(&store_path).unwrap();
        ingest(&store, &a, "preferred", "instruction");
        ingest(&store, &b, "other", "instruction");
        let hashes: Vec<ContentHash> = store.ordinals().map(|o| o.unwrap().1).collect();
        let (original, other_prompt, with_more, unrelated) =
            (hashes[0], hashes[1], hashes[2], hashes[3]);

        // Without a priority the longest assistant text wins.
        let outcome = run(&store, &Options::default());
        assert_eq!((outcome.clusters, outcome.members), (1, 3), "{outcome:?}");
        let clusters = memberships(&store);
        assert!(!clusters.contains_key(&unrelated));
        assert_eq!(clusters[&original].representative, with_more);
        assert_eq!(
            clusters[&original].cluster,
            *[original, other_prompt, with_more].iter().min().unwrap()
        );
        let excluded = store.exclusions_of(&original).unwrap();
        assert_eq!(excluded.len(), 1);
        assert_eq!(excluded[0].filter, "near-dup");
        assert!(
            excluded[0]
                .measured
                .starts_with(&format!("near-dup of {} (J=0.", with_more.to_hex())),
            "{}",
            excluded[0].measured
        );
        assert!(store.exclusions_of(&with_more).unwrap().is_empty());

        // With a priority list the preferred source wins (then the longer text, then
        // the lower hash): the representative moves and exclusions follow it.
        let preferred = Options {
            priority: vec!["preferred".into()],
            ..Options::default()
        };
        let outcome = run(&store, &preferred);
        assert_eq!(outcome.signed, 0, "nothing new to sign");
        let expected = original.min(other_prompt);
        assert_eq!(memberships(&store)[&original].representative, expected);
        assert!(store.exclusions_of(&expected).unwrap().is_empty());
        assert_eq!(store.exclusions_of(&with_more).unwrap().len(), 1);
        assert_eq!((outcome.excluded, outcome.lifted), (2, 1), "{outcome:?}");

        // A dry run at another threshold writes nothing.
        let before = memberships(&store);
        let dry = run(
            &store,
            &Options {
                dry_run: true,
                config: Config {
                    threshold: 0.99,
                    ..Config::default()
                },
                ..preferred.clone()
            },
        );
        assert_eq!(dry.clusters, 0);
        assert_eq!(dry.lifted, 2);
        assert_eq!(memberships(&store), before);
        assert_eq!(store.exclusions().count(), 2);

        // The index sees clusters and exclusions.
        let index = Index::open_or_create(&store_path, false).unwrap();
        index.catch_up(&store, &|_, _| {}).unwrap();
        let id = before[&original].cluster_id();
        let count = |q: &str| index.count(&parse(q).unwrap()).unwrap();
        assert_eq!(
            count(&format!("cluster:{id}")),
            3,
            "excluded members included"
        );
        assert_eq!(count("excluded:near-dup"), 2);
        assert_eq!(count("*"), 2);

        // Undo lifts every near-dup exclusion; clusters stay known.
        assert_eq!(neardup::undo(&store).unwrap(), 2);
        index.catch_up(&store, &|_, _| {}).unwrap();
        assert_eq!(count("*"), 4);
        assert_eq!(count(&format!("cluster:{id}")), 3);
        assert_eq!(store.exclusions().count(), 0);
    }

    // The CLI: show lists the cluster with sources, query finds it, analyze reports it.
    let shown = run_ok(corpusdb(&store_path).args(["dedup", "--near", "--prefer", "preferred"]));
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("1 clusters at J >= 0.8 (3 examples"),
        "{text}"
    );
    let hashes: Vec<String> = {
        let store = Store::open_read_only(&store_path).unwrap();
        store.ordinals().map(|o| o.unwrap().1.to_hex()).collect()
    };
    let show = run_ok(corpusdb(&store_path).args(["show", &hashes[2], "--json"]));
    let value: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let members = value["cluster"]["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let sources: Vec<&str> = members
        .iter()
        .map(|m| m["sources"][0]["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources.iter().filter(|s| **s == "preferred").count(),
        2,
        "{sources:?}"
    );
    assert!(value["exclusions"][0]["measured"]
        .as_str()
        .unwrap()
        .starts_with("near-dup of "));
    let id = value["cluster"]["id"].as_str().unwrap().to_string();
    let listed = run_ok(corpusdb(&store_path).args(["query", &format!("cluster:{id}")]));
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 4);
    let analysis = corpusdb(&store_path)
        .args(["analyze", "--json"])
        .output()
        .unwrap();
    let analysis: serde_json::Value = serde_json::from_slice(&analysis.stdout).unwrap();
    assert_eq!(analysis["clusters"], 1);
    assert_eq!(analysis["near_duplicates"], 2);
    let other = analysis["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "other")
        .unwrap();
    assert_eq!(
        (
            other["near_duplicates"].as_u64(),
            other["near_duplicate_share"].as_f64()
        ),
        (Some(1), Some(0.5))
    );
    let undo = run_ok(corpusdb(&store_path).args(["dedup", "--near", "--undo"]));
    assert!(String::from_utf8_lossy(&undo.stdout).contains("2 near-duplicate exclusion(s) lifted"));
}

#[test]
fn the_same_seed_gives_the_same_signatures_and_clusters() {
    let hasher = MinHasher::new(&Config::default());
    let text = "The quick brown fox jumps over the lazy dog near the river bank today.";
    assert_eq!(
        hasher.signature(text),
        MinHasher::new(&Config::default()).signature(text)
    );
    assert_eq!(hasher.signature(text).len(), 112);
    let reseeded = MinHasher::new(&Config {
        seed: 2,
        ..Config::default()
    });
    assert_ne!(hasher.signature(text), reseeded.signature(text));
    // Pinned values: a change to shingling or hashing changes stored signatures, so it
    // must raise `SIGNATURE_VERSION` (and then these numbers).
    assert_eq!(
        &hasher.signature(text)[..4],
        &[435914158, 23765460, 116264317, 210507053],
        "{:?}",
        &hasher.signature(text)[..4]
    );

    let dir = tempfile::tempdir().unwrap();
    let file = sample(dir.path(), "sample.jsonl", 300, 11);
    let mut results = Vec::new();
    for name in ["one", "two"] {
        let store = Store::open(&dir.path().join(name)).unwrap();
        ingest(&store, &file, "sample", "instruction");
        run(&store, &Options::default());
        let mut signatures = BTreeMap::new();
        for (hash, _) in shingle_sets(&store, 5) {
            signatures.insert(hash, store.signature(&hash).unwrap().unwrap());
        }
        results.push((signatures, memberships(&store)));
    }
    assert_eq!(results[0], results[1]);
    assert!(!results[0].1.is_empty());
}

#[test]
fn an_incremental_run_signs_only_new_examples_and_finds_the_same_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let file = sample(dir.path(), "all.jsonl", 400, 3);
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let first = dir.path().join("first.jsonl");
    let second = dir.path().join("second.jsonl");
    std::fs::write(&first, lines[..250].join("\n")).unwrap();
    std::fs::write(&second, lines[250..].join("\n")).unwrap();

    let whole = Store::open(&dir.path().join("whole")).unwrap();
    ingest(&whole, &first, "s", "instruction");
    ingest(&whole, &second, "s", "instruction");
    run(&whole, &Options::default());

    let parts = Store::open(&dir.path().join("parts")).unwrap();
    ingest(&parts, &first, "s", "instruction");
    let before = run(&parts, &Options::default());
    let stored_before = parts.counters().unwrap().examples;
    assert_eq!(before.signed, stored_before);
    ingest(&parts, &second, "s", "instruction");
    let after = run(&parts, &Options::default());
    assert_eq!(
        after.signed,
        parts.counters().unwrap().examples - stored_before,
        "only the new examples are signed"
    );
    assert!(after.new_pairs > 0);
    assert_eq!(memberships(&parts), memberships(&whole));
    let exclusions = |store: &Store| -> Vec<_> {
        store
            .exclusions()
            .map(|e| {
                let (hash, e) = e.unwrap();
                (hash, e.measured)
            })
            .collect()
    };
    assert_eq!(exclusions(&parts), exclusions(&whole));

    // Other parameters sign everything again.
    let again = run(
        &parts,
        &Options {
            config: Config {
                ngram: 3,
                ..Config::default()
            },
            ..Options::default()
        },
    );
    assert!(again.resigned_all);
    assert_eq!(again.signed, parts.counters().unwrap().examples);
}

#[test]
fn a_store_written_before_the_neardup_family_reads_without_it() {
    // The frozen schema-2 store has no `neardup` family: read-only commands see no
    // clusters, and the first writable open adds the family.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat/store-v2");
    std::fs::create_dir_all(&path).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        assert!(entry.file_type().unwrap().is_file());
        std::fs::copy(entry.path(), path.join(entry.file_name())).unwrap();
    }
    {
        let store = Store::open_read_only(&path).unwrap();
        assert_eq!(store.cluster_memberships().count(), 0);
        assert_eq!(store.neardup_params().unwrap(), None);
        let hash = store.hash_at(0).unwrap().unwrap();
        assert_eq!(store.signature(&hash).unwrap(), None);
        assert_eq!(store.cluster_membership(&hash).unwrap(), None);
    }
    let stats = run_ok(corpusdb(&path).args(["stats"]));
    assert!(String::from_utf8_lossy(&stats.stdout).contains("examples   92"));
    run_ok(corpusdb(&path).args(["dedup", "--near"]));
    let store = Store::open_read_only(&path).unwrap();
    assert!(store.neardup_params().unwrap().is_some());
    assert_eq!(store.signed_through().unwrap(), 92);
}
