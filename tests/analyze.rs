//! `corpusdb analyze` on a corpus whose numbers are known, with a word-level tokenizer
//! built here (one token per word), its checks and exit code, and the HTML report.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{corpusdb, run_ok, write};

/// A word-level tokenizer.json: every whitespace-separated word is one token.
pub fn word_tokenizer(dir: &Path) -> PathBuf {
    write(
        dir,
        "tokenizer.json",
        br#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1}, "unk_token": "[UNK]"}}"#,
    )
}

/// code: "a b"/"c" (3 tokens, 4 chars) + its repeat, and "a b c"/"d e" (excluded later);
/// math: "x"/"y z w" (4 tokens) and a broken record.
fn known_store(dir: &Path) -> PathBuf {
    let store = dir.join("store");
    let code = write(
        dir,
        "code.jsonl",
        br#"{"instruction": "a b", "output": "c"}
{"instruction": "a b c", "output": "d e"}
{"instruction": "a b", "output": "c"}
"#,
    );
    let math = write(
        dir,
        "math.jsonl",
        br#"{"instruction": "x", "output": "y z w"}
{"instruction": "broken
"#,
    );
    for (file, source, category) in [(&code, "src-code", "code"), (&math, "src-math", "math")] {
        run_ok(
            corpusdb(&store)
                .args([
                    "ingest",
                    "--format",
                    "alpaca",
                    "--source",
                    source,
                    "--category",
                    category,
                ])
                .arg(file),
        );
    }
    let filters = write(
        dir,
        "filters.yaml",
        b"filters:\n  - name: no-de\n    kind: phrases\n    phrases: [\"d e\"]\n",
    );
    run_ok(corpusdb(&store).args(["filter", "--config"]).arg(&filters));
    store
}

fn analyze(store: &Path, extra: &[&str]) -> (Value, std::process::Output) {
    let out = corpusdb(store)
        .args(["analyze", "--json"])
        .args(extra)
        .output()
        .unwrap();
    (serde_json::from_slice(&out.stdout).unwrap(), out)
}

fn group<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("no group {name} in {list}"))
}

#[test]
fn analysis_numbers_are_exact_on_a_known_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let store = known_store(dir.path());
    let tokenizer = word_tokenizer(dir.path());
    let tokenizer_arg = tokenizer.to_str().unwrap();
    let targets = write(dir.path(), "t.yaml", b"min_categories: 2\nmax_share: 0.5\n");
    let (a, out) = analyze(
        &store,
        &[
            "--tokenizer",
            tokenizer_arg,
            "--targets",
            targets.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{a}");
    assert_eq!(a["examples"], 2);
    assert_eq!(a["excluded"], 1);
    assert_eq!(a["records_read"], 5);
    assert_eq!(a["duplicates"], 1);
    assert_eq!(a["rejected"], 1);
    assert_eq!(a["tokens"], 7);
    assert_eq!(a["tokens_exact"], true);
    let code = group(&a["categories"], "code");
    assert_eq!(code["examples"], 1);
    assert_eq!(code["share"], 0.5);
    assert_eq!(code["tokens"], 3);
    assert_eq!(code["chars"], 4);
    assert_eq!(code["median_tokens"], 3);
    assert_eq!(code["p95_tokens"], 3);
    assert_eq!(code["duplicates"], 1);
    assert_eq!(code["excluded"], 1);
    assert_eq!(code["rejected"], 0);
    let math = group(&a["categories"], "math");
    assert_eq!(math["tokens"], 4);
    assert_eq!(math["rejected"], 1);
    assert_eq!(math["mean_turns"], 1.0);
    assert_eq!(math["histogram"][0], 1, "4 tokens fall in the first bin");
    assert_eq!(group(&a["sources"], "src-code")["excluded"], 1);
    assert_eq!(a["sources_per_category"]["math"]["src-math"], 1);
    assert!(a["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["passed"] == true));

    // The counts are cached per tokenizer; a second run reads them and agrees.
    let cached: Vec<_> = std::fs::read_dir(store.join("analysis")).unwrap().collect();
    assert_eq!(cached.len(), 1);
    let (again, _) = analyze(
        &store,
        &[
            "--tokenizer",
            tokenizer_arg,
            "--targets",
            targets.to_str().unwrap(),
        ],
    );
    assert_eq!(again, a);

    // Without a tokenizer, tokens are estimated (characters / 4, rounded up) and say so.
    let (estimated, _) = analyze(&store, &["--targets", targets.to_str().unwrap()]);
    assert_eq!(estimated["tokens_exact"], false);
    assert_eq!(estimated["token_count"], "estimate (characters / 4)");
    assert_eq!(group(&estimated["categories"], "code")["tokens"], 1);
}

#[test]
fn a_failing_constraint_exits_1_and_names_the_category() {
    let dir = tempfile::tempdir().unwrap();
    let store = known_store(dir.path());
    let targets = write(
        dir.path(),
        "t.yaml",
        b"min_categories: 2\nmax_share: 0.4\ncategories:\n  math: {min_examples: 5}\n",
    );
    let out = corpusdb(&store)
        .args(["analyze", "--targets"])
        .arg(&targets)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PASS  at least 2 categories"), "{stdout}");
    assert!(
        stdout.contains("FAIL  no category above 40.0%: over: code at 50.0%, math at 50.0%"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAIL  math: at least 5 examples: math has 1"),
        "{stdout}"
    );
    // The default targets are the corpus plan's: ten categories, none above 28%.
    let out = corpusdb(&store).args(["analyze"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL  at least 10 categories: 2 categories have examples"));
    assert!(stdout.contains("25.0%-28.0%"), "{stdout}");
}

/// Tags that must be closed, checked as a stack; void elements and `<!...>` need no close.
fn check_balanced(html: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("every tag closes") + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') || tag.ends_with('/') {
            continue;
        }
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        if ["meta", "br", "hr", "img", "link"].contains(&name.as_str()) {
            continue;
        }
        if tag.starts_with('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.as_str()),
                "unbalanced </{name}>"
            );
        } else {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
}

#[test]
fn the_html_report_is_well_formed_with_a_chart_in_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let store = known_store(dir.path());
    let report = dir.path().join("report.html");
    let out = corpusdb(&store)
        .args(["analyze", "--html"])
        .arg(&report)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "the default targets fail here");
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    check_balanced(&html);
    let sections: Vec<&str> = html.split("<section").skip(1).collect();
    assert_eq!(sections.len(), 4);
    for section in &sections {
        let section = &section[..section.find("</section>").unwrap()];
        assert_eq!(section.matches("<svg").count(), 1, "{section}");
    }
    // Self-contained: nothing is fetched.
    for needle in ["src=", "href=", "<script", "@import", "url("] {
        assert!(!html.contains(needle), "report references `{needle}`");
    }
    assert!(html.contains("FAIL") && html.contains("Tokens (estimated)"));

    // Rendered by a real browser when one is installed.
    let chromium = ["chromium", "chromium-browser"].into_iter().find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok()
    });
    if let Some(chromium) = chromium {
        let shot = dir.path().join("report.png");
        let out = std::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--window-size=1200,2000",
            ])
            .arg(format!("--screenshot={}", shot.display()))
            .arg(format!("file://{}", report.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let png = std::fs::read(&shot).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{} bytes",
            png.len()
        );
    }
}
