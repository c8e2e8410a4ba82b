//! The source registry: every dataset of the corpus plan, and which of them are present.
//!
//! ```yaml
//! sources:
//!   - name: gsm8k              # source name in provenance; default folder DIR/gsm8k/
//!     hub: openai/gsm8k        # Hugging Face dataset id (where to download it from)
//!     format: gsm8k            # a format of `corpusdb formats` (default: auto)
//!     # mapping: mappings/x.yaml   # or a field-mapping file, relative to the registry
//!     category: math
//!     rules: [code]            # optional category rules for mixed sources
//!     target: 100000           # examples the corpus plan expects from it
//!     files: ["gsm8k/**"]      # optional globs under the data directory
//! ```
//!
//! `corpusdb ingest --registry FILE --data-dir DIR` imports every source whose files are
//! present; each file is an ordinary import, so a second run resumes or skips it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::category::Rule;
pub use crate::manifest::Error;
use crate::manifest::{lexical_join, load_yaml};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub sources: Vec<Source>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub name: String,
    #[serde(default)]
    pub hub: Option<String>,
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub mapping: Option<PathBuf>,
    pub category: String,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub target: Option<u64>,
    /// Globs relative to the data directory; default `<name>/**`.
    #[serde(default)]
    pub files: Vec<String>,
}

/// File extensions the readers take (compressed variants included).
const READABLE: [&str; 7] = [
    ".jsonl", ".json", ".ndjson", ".parquet", ".gz", ".zst", ".zstd",
];

impl Registry {
    pub fn load(path: &Path) -> Result<Registry, Error> {
        let mut registry: Registry = load_yaml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut names = std::collections::HashSet::new();
        for source in &mut registry.sources {
            if !names.insert(source.name.clone()) {
                return Err(Error::Invalid {
                    path: path.to_owned(),
                    message: format!("source `{}` is listed twice", source.name),
                });
            }
            if source.format.is_some() && source.mapping.is_some() {
                return Err(Error::Invalid {
                    path: path.to_owned(),
                    message: format!("source `{}` gives both `format` and `mapping`", source.name),
                });
            }
            if let Some(mapping) = &mut source.mapping {
                *mapping = lexical_join(base, mapping);
            }
        }
        Ok(registry)
    }
}

impl Source {
    /// The source's readable files under `data_dir`, sorted; empty when none are present.
    pub fn files(&self, data_dir: &Path) -> Result<Vec<PathBuf>, Error> {
        let default = [format!("{}/**", self.name)];
        let patterns: &[String] = if self.files.is_empty() {
            &default
        } else {
            &self.files
        };
        files_under(data_dir, patterns, &format!("source `{}`", self.name))
    }
}

/// The readable files under `data_dir` that match `patterns` (globs of path components),
/// sorted; `owner` names who gave the patterns in an error.
fn files_under(data_dir: &Path, patterns: &[String], owner: &str) -> Result<Vec<PathBuf>, Error> {
    let mut found = Vec::new();
    for raw in patterns {
        let pattern: Vec<&str> = raw.split('/').filter(|p| !p.is_empty()).collect();
        // Files stay inside the data directory.
        if raw.starts_with('/') || pattern.iter().any(|p| *p == ".." || p.contains('\\')) {
            return Err(Error::Invalid {
                path: data_dir.to_owned(),
                message: format!(
                    "{owner}: `{raw}` leaves the data directory (`..` and absolute paths are refused)"
                ),
            });
        }
        // Walk from the literal directories at the front of the pattern.
        let literal = pattern
            .iter()
            .take_while(|p| !p.contains(['*', '?', '[']))
            .count();
        let mut root = data_dir.to_path_buf();
        for part in &pattern[..literal] {
            root.push(part);
        }
        if root.is_file() {
            found.push(root);
            continue;
        }
        if !root.is_dir() {
            continue;
        }
        // A pattern that names a directory means everything under it.
        let rest = match &pattern[literal..] {
            [] => &["**"][..],
            rest => rest,
        };
        walk(&root, &mut Vec::new(), rest, &mut found)?;
    }
    found.retain(|f| {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        READABLE.iter().any(|ext| name.ends_with(ext))
    });
    found.sort();
    found.dedup();
    Ok(found)
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (where `datasets` and `huggingface_hub` download to).
pub fn hub_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = var("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// The readable files of dataset `repo` (`ORG/NAME`, optionally `/PATTERN` within the
/// dataset, e.g. `openai/gsm8k/main/**`) in the hub cache `cache`: the snapshot that
/// `refs/main` names, else the newest one. Empty when the dataset is not in the cache.
pub fn hub_cache_files(cache: &Path, repo: &str) -> Result<Vec<PathBuf>, Error> {
    let mut parts = repo.trim_matches('/').splitn(3, '/');
    let (Some(org), Some(name)) = (parts.next(), parts.next()) else {
        return Err(Error::Invalid {
            path: PathBuf::from(repo),
            message: "a Hugging Face dataset is named ORG/NAME".into(),
        });
    };
    let pattern = parts.next().unwrap_or("**");
    let dataset = cache.join(format!("datasets--{org}--{name}"));
    let snapshots = dataset.join("snapshots");
    if !snapshots.is_dir() {
        return Ok(Vec::new());
    }
    let named = std::fs::read_to_string(dataset.join("refs/main"))
        .ok()
        .map(|rev| snapshots.join(rev.trim()))
        .filter(|dir| dir.is_dir());
    let snapshot = match named {
        Some(dir) => dir,
        None => {
            let entries = std::fs::read_dir(&snapshots).map_err(|source| Error::Io {
                path: snapshots.clone(),
                source,
            })?;
            let newest = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
            match newest {
                Some(entry) => entry.path(),
                None => return Ok(Vec::new()),
            }
        }
    };
    files_under(&snapshot, &[pattern.to_string()], &format!("hf:{repo}"))
}

fn walk(
    dir: &Path,
    relative: &mut Vec<String>,
    pattern: &[&str],
    found: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        relative.push(name);
        // Real directories only: a link to a directory could loop or leave the tree. A
        // link to a file (the Hugging Face cache's snapshots) is read.
        if kind.is_dir() {
            walk(&path, relative, pattern, found)?;
        } else if (kind.is_file() || path.is_file()) && matches(pattern, relative) {
            found.push(path);
        }
        relative.pop();
    }
    Ok(())
}

/// Glob match of path components: `**` any number of components, `*` and `?` within one.
/// Whether the file at `path` in a Hub dataset (`data/train-00000.parquet`) is one that
/// `hf:ORG/NAME/PATTERN` reads: a readable extension, and the path matched by `pattern`
/// or under a directory it names (what [`hub_cache_files`] finds once it is downloaded).
pub fn hub_file_wanted(pattern: &str, path: &str) -> bool {
    if !READABLE.iter().any(|ext| path.ends_with(ext)) {
        return false;
    }
    let path: Vec<String> = path.split('/').map(str::to_string).collect();
    let pattern: Vec<&str> = pattern.split('/').filter(|p| !p.is_empty()).collect();
    let mut under = pattern.clone();
    under.push("**");
    matches(&pattern, &path) || matches(&under, &path)
}

fn matches(pattern: &[&str], path: &[String]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => {
            matches(&pattern[1..], path) || (!path.is_empty() && matches(pattern, &path[1..]))
        }
        (Some(p), Some(name)) => {
            component(p.as_bytes(), name.as_bytes()) && matches(&pattern[1..], &path[1..])
        }
        _ => false,
    }
}

fn component(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            component(&pattern[1..], name) || (!name.is_empty() && component(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => component(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => component(&pattern[1..], &name[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        let pattern: Vec<&str> = pattern.split('/').collect();
        let path: Vec<String> = path.split('/').map(String::from).collect();
        matches(&pattern, &path)
    }

    #[test]
    fn globs() {
        assert!(m("**", "a/b/c.jsonl"));
        assert!(m("**/*.parquet", "data/train-0001.parquet"));
        assert!(m("*.jsonl", "x.jsonl"));
        assert!(!m("*.jsonl", "d/x.jsonl"));
        assert!(m("train-?.json", "train-1.json"));
        assert!(!m("**/*.parquet", "x.jsonl"));
    }

    fn source(name: &str, files: &[&str]) -> Source {
        Source {
            name: name.into(),
            hub: None,
            format: None,
            mapping: None,
            category: "c".into(),
            rules: Vec::new(),
            target: None,
            files: files.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn files_stay_inside_the_data_directory_and_links_to_directories_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("s/sub")).unwrap();
        std::fs::write(data.join("s/sub/a.jsonl"), "{}").unwrap();
        std::fs::write(dir.path().join("outside.jsonl"), "{}").unwrap();
        // A loop, and a link out of the tree.
        std::os::unix::fs::symlink(data.join("s"), data.join("s/sub/loop")).unwrap();
        std::os::unix::fs::symlink(dir.path(), data.join("s/up")).unwrap();
        let found = source("s", &[]).files(&data).unwrap();
        assert_eq!(found, vec![data.join("s/sub/a.jsonl")]);
        for bad in [
            &["../outside.jsonl"][..],
            &["s/../../outside.jsonl"],
            &["/etc/*"],
        ] {
            let err = source("s", bad).files(&data).unwrap_err().to_string();
            assert!(err.contains("leaves the data directory"), "{err}");
        }
        let err = source("..", &[]).files(&data).unwrap_err().to_string();
        assert!(err.contains("leaves the data directory"), "{err}");
    }
}
