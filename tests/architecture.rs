//! The rules ARCHITECTURE.md states as absences, checked on the source: only `store`
//! imports RocksDB, the library prints nothing (only `cli` and `main.rs` do), and no public
//! function of the library returns `Result<_, String>`.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `.rs` file under `src/`, as (path relative to `src/`, text without comments).
fn library() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    assert!(files.len() > 40, "found {} source files", files.len());
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let code: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect();
            let name = path
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (name, code.join("\n"))
        })
        .collect()
}

#[test]
fn only_the_store_imports_rocksdb() {
    let offenders: Vec<String> = library()
        .into_iter()
        .filter(|(name, code)| !name.starts_with("store/") && code.contains("rocksdb::"))
        .map(|(name, _)| name)
        .collect();
    assert!(
        offenders.is_empty(),
        "RocksDB used outside store/: {offenders:?}"
    );
}

#[test]
fn the_library_prints_nothing() {
    let printing = ["println!(", "eprintln!(", "print!(", "eprint!(", "dbg!("];
    let offenders: Vec<String> = library()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("cli/") && name != "main.rs")
        .filter(|(_, code)| printing.iter().any(|p| code.contains(p)))
        .map(|(name, _)| name)
        .collect();
    assert!(offenders.is_empty(), "the library prints in {offenders:?}");
}

#[test]
fn no_public_function_returns_a_string_error() {
    let mut offenders = Vec::new();
    for (name, code) in library() {
        if name.starts_with("cli/") || name == "main.rs" {
            continue;
        }
        // A signature runs from `pub fn` to its body's brace.
        let mut rest = code.as_str();
        while let Some(at) = rest.find("pub fn ") {
            let signature = &rest[at..];
            let end = signature.find('{').unwrap_or(signature.len());
            let signature = &signature[..end];
            let returns = signature.split("->").nth(1).unwrap_or("");
            if returns.contains("Result<") && returns.trim_end().ends_with(", String>") {
                let first = signature.lines().next().unwrap_or("");
                offenders.push(format!("{name}: {first}"));
            }
            rest = &rest[at + 7..];
        }
    }
    assert!(
        offenders.is_empty(),
        "public functions with String errors: {offenders:#?}"
    );
}
