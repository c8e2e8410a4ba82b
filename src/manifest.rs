//! Manifests: YAML files listing what to ingest, so a whole corpus is one command.
//!
//! ```yaml
//! imports:
//!   - source: dolly            # dataset name kept in provenance
//!     category: instruction    # category of new examples
//!     format: dolly            # a format of `corpusdb formats`, or auto (the default)
//!     # mapping: dolly.yaml    # or a field-mapping file instead of a format
//!     rules: [code, math]      # optional category rules for mixed sources
//!     files: [../data/dolly.jsonl]
//! ```
//!
//! Relative file paths are resolved against the manifest's own directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::category::Rule;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub imports: Vec<ManifestImport>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestImport {
    pub source: String,
    pub category: String,
    /// A format name; `None` or `auto` detects it.
    #[serde(default)]
    pub format: Option<String>,
    /// A field-mapping file (relative to the manifest) defining the format.
    #[serde(default)]
    pub mapping: Option<PathBuf>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    pub files: Vec<PathBuf>,
}

/// `base/rel` with `.` and `name/..` folded away, so messages show `data/x.jsonl` rather
/// than `configs/../data/x.jsonl`. Purely textual: symlinks are not resolved.
pub(crate) fn lexical_join(base: &Path, relative: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in base.join(relative).components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Why a YAML config (manifest, registry) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// Reads and deserialises a YAML file, naming the file in any error.
pub(crate) fn load_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_yaml::from_str(&text).map_err(|source| Error::Yaml {
        path: path.to_owned(),
        source,
    })
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest, Error> {
        let mut manifest: Manifest = load_yaml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for import in &mut manifest.imports {
            if let Some(mapping) = &mut import.mapping {
                *mapping = lexical_join(base, mapping);
            }
            for file in &mut import.files {
                if file.is_relative() {
                    *file = lexical_join(base, file);
                }
            }
        }
        Ok(manifest)
    }
}
