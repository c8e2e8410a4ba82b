//! Quality filters: named checks with parameters, configured in YAML
//! (`configs/filters.yaml` is the default set).
//!
//! ```yaml
//! filters:
//!   - name: max-turns          # the name rejects and exclusions are recorded under
//!     kind: max_turns          # what is checked (see [`Check`])
//!     max: 32
//! ```
//!
//! A filter looks at one normalised conversation and either passes it or says what it
//! measured ("41 turns > 32"). During ingest a failing record goes to the rejects ledger
//! with the filter's name and the measurement; against a store (`corpusdb filter`) a
//! failing example is marked excluded, reversibly, and nothing is deleted.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

use crate::conversation::{Conversation, Role};

/// What a filter checks.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Check {
    /// Characters of every non-system message within [min, max].
    MessageChars {
        #[serde(default)]
        min: Option<u64>,
        #[serde(default)]
        max: Option<u64>,
    },
    /// Characters of the whole example within [min, max].
    ExampleChars {
        #[serde(default)]
        min: Option<u64>,
        #[serde(default)]
        max: Option<u64>,
    },
    /// An assistant message that is empty or whitespace and calls no tool.
    EmptyAssistant,
    /// Degenerate repetition: the share of repeated word n-grams in any assistant message
    /// (1 - distinct/total) above `max_ratio`, counted once a message has `min_ngrams`.
    RepeatedNgrams {
        #[serde(default = "default_n")]
        n: usize,
        max_ratio: f64,
        #[serde(default = "default_min_ngrams")]
        min_ngrams: usize,
    },
    /// Control characters (other than newline, tab, carriage return) and U+FFFD
    /// replacement characters, as a share of all characters, above `max_ratio`.
    ControlChars { max_ratio: f64 },
    /// Any of `phrases` (case-insensitive) in a message of the given roles (default:
    /// assistant), e.g. "As an AI language model".
    Phrases {
        phrases: Vec<String>,
        #[serde(default = "assistant_only")]
        roles: Vec<String>,
    },
    /// The language of the user and assistant text (ISO 639-3 codes, e.g. `eng`), decided
    /// by a detector only when the text has `min_chars` and the detection is reliable.
    Language {
        allow: Vec<String>,
        #[serde(default = "default_min_chars")]
        min_chars: usize,
    },
    /// More than `max` turns (assistant messages).
    MaxTurns { max: u32 },
}

fn default_n() -> usize {
    3
}

fn default_min_ngrams() -> usize {
    20
}

fn default_min_chars() -> usize {
    40
}

fn assistant_only() -> Vec<String> {
    vec!["assistant".to_string()]
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct FilterSpec {
    pub name: String,
    #[serde(flatten)]
    pub check: Check,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterFile {
    filters: Vec<FilterSpec>,
}

/// A compiled filter set.
#[derive(Clone, Debug)]
pub struct Filters {
    filters: Vec<Compiled>,
}

#[derive(Clone, Debug)]
struct Compiled {
    name: String,
    check: Check,
    /// Lower-cased phrases, for `Phrases`.
    phrases: Vec<String>,
    roles: Vec<Role>,
    languages: HashSet<whatlang::Lang>,
}

/// A filter that failed: its name and what it measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub filter: String,
    pub measured: String,
}

impl Failure {
    /// The reason recorded in the rejects ledger.
    pub fn reason(&self) -> String {
        format!("filter `{}`: {}", self.filter, self.measured)
    }
}

impl Filters {
    pub fn load(path: &Path) -> Result<Filters, crate::manifest::Error> {
        let file: FilterFile = crate::manifest::load_yaml(path)?;
        Filters::new(file.filters).map_err(|message| crate::manifest::Error::Invalid {
            path: path.to_owned(),
            message: message.0,
        })
    }

    pub fn new(specs: Vec<FilterSpec>) -> Result<Filters, crate::invalid::Invalid> {
        let mut names = HashSet::new();
        let mut filters = Vec::with_capacity(specs.len());
        for spec in specs {
            if !names.insert(spec.name.clone()) {
                return Err(format!("filter `{}` is defined twice", spec.name).into());
            }
            let mut compiled = Compiled {
                name: spec.name.clone(),
                check: spec.check.clone(),
                phrases: Vec::new(),
                roles: Vec::new(),
                languages: HashSet::new(),
            };
            match &spec.check {
                Check::Phrases { phrases, roles } => {
                    compiled.phrases = phrases.iter().map(|p| p.to_lowercase()).collect();
                    compiled.roles = roles
                        .iter()
                        .map(|r| {
                            Role::from_alias(r).ok_or_else(|| {
                                format!("filter `{}`: unknown role `{r}`", spec.name)
                            })
                        })
                        .collect::<Result<_, _>>()?;
                }
                Check::Language { allow, .. } => {
                    for code in allow {
                        let lang = whatlang::Lang::from_code(code).ok_or_else(|| {
                            format!(
                                "filter `{}`: unknown language code `{code}` (ISO 639-3, e.g. eng, deu, fra)",
                                spec.name
                            )
                        })?;
                        compiled.languages.insert(lang);
                    }
                }
                Check::RepeatedNgrams { n, .. } if *n == 0 => {
                    return Err(format!("filter `{}`: n must be at least 1", spec.name).into());
                }
                _ => {}
            }
            filters.push(compiled);
        }
        Ok(Filters { filters })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.filters.iter().map(|f| f.name.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// The first filter `conversation` fails, if any.
    pub fn first_failure(&self, conversation: &Conversation) -> Option<Failure> {
        self.filters.iter().find_map(|f| f.check(conversation))
    }

    /// Every filter `conversation` fails.
    pub fn failures(&self, conversation: &Conversation) -> Vec<Failure> {
        self.filters
            .iter()
            .filter_map(|f| f.check(conversation))
            .collect()
    }
}

fn range_failure(what: &str, value: u64, min: Option<u64>, max: Option<u64>) -> Option<String> {
    if let Some(min) = min.filter(|&min| value < min) {
        return Some(format!("{what} {value} < {min}"));
    }
    if let Some(max) = max.filter(|&max| value > max) {
        return Some(format!("{what} {value} > {max}"));
    }
    None
}

impl Compiled {
    fn check(&self, conversation: &Conversation) -> Option<Failure> {
        let measured = self.measure(conversation)?;
        Some(Failure {
            filter: self.name.clone(),
            measured,
        })
    }

    fn measure(&self, conversation: &Conversation) -> Option<String> {
        let messages = &conversation.messages;
        match &self.check {
            Check::MessageChars { min, max } => {
                messages.iter().enumerate().find_map(|(i, m)| {
                    if m.role == Role::System {
                        return None;
                    }
                    let chars = m.content.chars().count() as u64;
                    // An assistant message that only calls tools has no text to measure.
                    if chars == 0 && m.tool_calls.is_some() {
                        return None;
                    }
                    range_failure(
                        &format!("message {} ({}) has", i + 1, m.role),
                        chars,
                        *min,
                        *max,
                    )
                    .map(|s| format!("{s} characters"))
                })
            }
            Check::ExampleChars { min, max } => {
                range_failure("example has", conversation.char_count(), *min, *max)
                    .map(|s| format!("{s} characters"))
            }
            Check::EmptyAssistant => messages
                .iter()
                .position(|m| {
                    m.role == Role::Assistant
                        && m.content.trim().is_empty()
                        && m.tool_calls.is_none()
                })
                .map(|i| format!("message {} is an empty assistant message", i + 1)),
            Check::RepeatedNgrams {
                n,
                max_ratio,
                min_ngrams,
            } => messages
                .iter()
                .filter(|m| m.role == Role::Assistant)
                .filter_map(|m| repeated_ngram_ratio(&m.content, *n, *min_ngrams))
                .find(|&ratio| ratio > *max_ratio)
                .map(|ratio| format!("repeated {n}-gram ratio {ratio:.2} > {max_ratio}")),
            Check::ControlChars { max_ratio } => {
                let mut total = 0u64;
                let mut control = 0u64;
                for m in messages {
                    for c in m.content.chars() {
                        total += 1;
                        if (c.is_control() && !matches!(c, '\n' | '\t' | '\r')) || c == '\u{FFFD}' {
                            control += 1;
                        }
                    }
                }
                let ratio = control as f64 / total.max(1) as f64;
                (ratio > *max_ratio)
                    .then(|| format!("control character ratio {ratio:.3} > {max_ratio}"))
            }
            Check::Phrases { .. } => messages
                .iter()
                .filter(|m| self.roles.contains(&m.role))
                .find_map(|m| {
                    let lower = m.content.to_lowercase();
                    self.phrases
                        .iter()
                        .find(|p| lower.contains(p.as_str()))
                        .map(|p| format!("contains \"{p}\""))
                }),
            Check::Language { min_chars, .. } => {
                let mut text = String::new();
                for m in messages.iter().filter(|m| m.role != Role::System) {
                    if text.len() >= 4096 {
                        break;
                    }
                    text.push_str(&m.content);
                    text.push('\n');
                }
                if text.chars().count() < *min_chars {
                    return None;
                }
                let info = whatlang::detect(&text)?;
                (info.is_reliable() && !self.languages.contains(&info.lang())).then(|| {
                    format!(
                        "language {} ({:.2} confidence) is not allowed",
                        info.lang().code(),
                        info.confidence()
                    )
                })
            }
            Check::MaxTurns { max } => {
                let turns = conversation.turn_count();
                (turns > *max).then(|| format!("{turns} turns > {max}"))
            }
        }
    }
}

/// 1 - distinct/total over the word n-grams of `text`; `None` below `min_ngrams`.
pub fn repeated_ngram_ratio(text: &str, n: usize, min_ngrams: usize) -> Option<f64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < n {
        return None;
    }
    let total = words.len() + 1 - n;
    if total < min_ngrams {
        return None;
    }
    let distinct: HashSet<&[&str]> = words.windows(n).collect();
    Some(1.0 - distinct.len() as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_ratio() {
        assert_eq!(repeated_ngram_ratio("a b c d e", 3, 1), Some(0.0));
        let looped = "la la la la la la la la la la";
        assert!(repeated_ngram_ratio(looped, 3, 1).unwrap() > 0.8);
        assert_eq!(repeated_ngram_ratio("a b", 3, 1), None);
    }
}

/// What running filters against a store did (or, dry, would do), per filter.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FilterCounts {
    /// Examples this run newly excludes.
    pub excluded: u64,
    /// Examples that were excluded by this filter and still fail it.
    pub kept: u64,
    /// Examples this filter had excluded that now pass (their exclusion is lifted).
    pub lifted: u64,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StoreRun {
    pub examples: u64,
    pub dry_run: bool,
    pub filters: std::collections::BTreeMap<String, FilterCounts>,
}

/// Examples checked and written per batch.
const STORE_CHUNK: usize = 8192;

/// Applies `filters` to every example of `store`: failing examples are marked excluded by
/// the failing filters, and exclusions by these filters that no longer hold are lifted.
/// Exclusions by filters not in `filters` are left alone. Every change goes to the change
/// log, so the index follows. With `dry_run` nothing is written.
pub fn apply_to_store(
    store: &crate::store::Store,
    filters: &Filters,
    dry_run: bool,
    progress: &dyn Fn(u64, u64),
) -> crate::store::Result<StoreRun> {
    use rayon::prelude::*;
    use std::collections::HashMap;

    let names: HashSet<&str> = filters.names().collect();
    // Current exclusions by these filters (the set is small next to the store).
    let mut before: HashMap<crate::conversation::ContentHash, Vec<String>> = HashMap::new();
    for item in store.exclusions() {
        let (hash, exclusion) = item?;
        if names.contains(exclusion.filter.as_str()) {
            before.entry(hash).or_default().push(exclusion.filter);
        }
    }
    let mut run = StoreRun {
        dry_run,
        filters: filters
            .names()
            .map(|n| (n.to_string(), FilterCounts::default()))
            .collect(),
        ..StoreRun::default()
    };
    let total = store.counters()?.examples;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut chunk = Vec::with_capacity(STORE_CHUNK);
    let flush = |chunk: &mut Vec<(crate::conversation::ContentHash, Conversation)>,
                 run: &mut StoreRun|
     -> crate::store::Result<()> {
        let failures: Vec<Vec<Failure>> = chunk
            .par_iter()
            .map(|(_, conversation)| filters.failures(conversation))
            .collect();
        let mut counters = store.counters()?;
        let mut batch = store.exclusion_batch(&mut counters);
        for ((hash, _), failed) in chunk.iter().zip(failures) {
            let previous = before.get(hash).map(Vec::as_slice).unwrap_or_default();
            for failure in &failed {
                let counts = run.filters.get_mut(&failure.filter).expect("known filter");
                if previous.contains(&failure.filter) {
                    counts.kept += 1;
                } else {
                    counts.excluded += 1;
                    batch.exclude(
                        hash,
                        &crate::store::Exclusion {
                            filter: failure.filter.clone(),
                            measured: failure.measured.clone(),
                            unix: now,
                        },
                    );
                }
            }
            for name in previous {
                if !failed.iter().any(|f| &f.filter == name) {
                    run.filters.get_mut(name).expect("known filter").lifted += 1;
                    batch.lift(hash, name);
                }
            }
        }
        run.examples += chunk.len() as u64;
        if !dry_run {
            batch.commit()?;
        }
        chunk.clear();
        progress(run.examples, total);
        Ok(())
    };
    store.for_each_example(|hash, example| {
        chunk.push((*hash, example.conversation));
        if chunk.len() >= STORE_CHUNK {
            flush(&mut chunk, &mut run)?;
        }
        Ok(())
    })?;
    flush(&mut chunk, &mut run)?;
    if !dry_run {
        store.flush()?;
    }
    Ok(run)
}

/// Lifts every exclusion made by the filter `name`; returns how many examples it freed.
pub fn undo(store: &crate::store::Store, name: &str) -> crate::store::Result<u64> {
    let mut hashes = Vec::new();
    for item in store.exclusions() {
        let (hash, exclusion) = item?;
        if exclusion.filter == name {
            hashes.push(hash);
        }
    }
    for chunk in hashes.chunks(STORE_CHUNK) {
        let mut counters = store.counters()?;
        let mut batch = store.exclusion_batch(&mut counters);
        for hash in chunk {
            batch.lift(hash, name);
        }
        batch.commit()?;
    }
    store.flush()?;
    Ok(hashes.len() as u64)
}
