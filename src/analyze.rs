//! The diversity analysis: the corpus per category and per source against the targets of
//! the corpus plan, with token counts and constraint checks.
//!
//! One sequential pass over the store (hash order) gathers, per example in use (not
//! excluded by a quality filter): category, first source, characters, turns, tokens and
//! how many duplicate records it absorbed, and whether it is in a near-duplicate cluster
//! (and not its representative). Tokens are exact with a Hugging Face
//! `tokenizer.json` (the sum over message contents, no chat template or special tokens),
//! counted in parallel and cached per tokenizer in `<store>/analysis/`, so a second
//! analysis tokenizes only new examples; without a tokenizer they are estimated as
//! characters / 4 and labelled as an estimate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::conversation::ContentHash;
use crate::store::{self, Store};

/// The targets and constraints an analysis checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// At least this many categories with examples.
    pub min_categories: usize,
    /// No category above this share of the examples.
    pub max_share: f64,
    /// Expected share range and optional minimum per category.
    #[serde(default)]
    pub categories: BTreeMap<String, CategoryTarget>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryTarget {
    #[serde(default)]
    pub min_share: Option<f64>,
    #[serde(default)]
    pub max_share: Option<f64>,
    /// A check: the category must have at least this many examples.
    #[serde(default)]
    pub min_examples: Option<u64>,
}

impl Targets {
    /// The corpus plan's expected distribution (post-deduplication): ten categories, none
    /// above 28%, and the share range of each.
    pub fn strategy_default() -> Targets {
        let ranges = [
            ("code", 0.25, 0.28),
            ("instruction", 0.18, 0.20),
            ("math", 0.15, 0.18),
            ("qa", 0.12, 0.15),
            ("conversation", 0.10, 0.12),
            ("emotional", 0.05, 0.07),
            ("creative", 0.03, 0.05),
            ("tool", 0.03, 0.05),
            ("moral", 0.02, 0.03),
            ("specialized", 0.01, 0.02),
        ];
        Targets {
            min_categories: 10,
            max_share: 0.28,
            categories: ranges
                .iter()
                .map(|&(name, min, max)| {
                    (
                        name.to_string(),
                        CategoryTarget {
                            min_share: Some(min),
                            max_share: Some(max),
                            min_examples: None,
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn load(path: &Path) -> Result<Targets, crate::manifest::Error> {
        crate::manifest::load_yaml(path)
    }
}

/// Length histogram bins, in tokens: `[0, 64)`, `[64, 128)`, ..., `[16384, ∞)`.
pub const LENGTH_BINS: [u64; 9] = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384];

/// Statistics of one category or one source.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Group {
    pub name: String,
    /// Examples in use (not excluded).
    pub examples: u64,
    /// Of all examples in use.
    pub share: f64,
    pub chars: u64,
    pub tokens: u64,
    /// Example length in tokens (exact or estimated, as the analysis says).
    pub mean_tokens: f64,
    pub median_tokens: u64,
    pub p95_tokens: u64,
    pub mean_turns: f64,
    /// Duplicate records folded into these examples.
    pub duplicates: u64,
    /// Records rejected at import (by the import's category, or source).
    pub rejected: u64,
    /// Examples excluded by quality filters or as near-duplicates.
    pub excluded: u64,
    /// Stored examples in a near-duplicate cluster (`corpusdb dedup --near`), kept or not.
    pub cluster_members: u64,
    /// Stored examples that are near-duplicates of their cluster's representative.
    pub near_duplicates: u64,
    /// `near_duplicates` over the group's stored examples (in use + excluded).
    pub near_duplicate_share: f64,
    /// Examples per length bin (see [`LENGTH_BINS`]; one more bin than bounds).
    pub histogram: Vec<u64>,
}

/// A category's share against its target range.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetRow {
    pub category: String,
    pub share: f64,
    pub min_share: Option<f64>,
    pub max_share: Option<f64>,
    /// `below`, `in range`, `above`, or `no target`.
    pub status: &'static str,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Analysis {
    /// Examples in use (stored and not excluded).
    pub examples: u64,
    pub excluded: u64,
    pub records_read: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub chars: u64,
    pub tokens: u64,
    /// `exact (tokenizer.json ...)` or `estimate (characters / 4)`.
    pub token_count: String,
    pub tokens_exact: bool,
    pub categories: Vec<Group>,
    pub sources: Vec<Group>,
    /// Near-duplicate clusters as the last `dedup --near` left them (0 if never run).
    pub clusters: u64,
    /// Stored examples in those clusters, and those that are not the kept representative.
    pub cluster_members: u64,
    pub near_duplicates: u64,
    /// Examples per source within each category.
    pub sources_per_category: BTreeMap<String, BTreeMap<String, u64>>,
    pub targets: Vec<TargetRow>,
    pub checks: Vec<CheckResult>,
    /// Things the reader should know (e.g. a cache that could not be written).
    pub notes: Vec<String>,
}

impl Analysis {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }
}

/// Exact token counts with a Hugging Face tokenizer.
pub struct TokenCounter {
    tokenizer: tokenizers::Tokenizer,
    /// SHA-1 of the tokenizer.json bytes: names its cache.
    fingerprint: String,
    description: String,
    /// The same tokenizer with its chat template, when it loads as one: a token cache
    /// written for it (`corpusdb tokenize`) gives the counts without tokenizing.
    chat: Option<crate::batches::ChatTokenizer>,
}

impl TokenCounter {
    /// Loads `tokenizer.json` (or the one inside a model directory).
    pub fn load(path: &Path) -> Result<TokenCounter, crate::invalid::Invalid> {
        let file: PathBuf = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_owned()
        };
        let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| format!("{}: not a tokenizer.json: {e}", file.display()))?;
        Ok(TokenCounter {
            tokenizer,
            fingerprint: hex::encode(Sha1::digest(&bytes)),
            description: format!("exact ({})", file.display()),
            chat: crate::batches::ChatTokenizer::load(path).ok(),
        })
    }

    /// Tokens of the message contents (no template, no special tokens).
    pub fn count(&self, contents: &[String]) -> u32 {
        contents
            .iter()
            .map(|text| {
                self.tokenizer
                    .encode_fast(text.as_str(), false)
                    .map(|e| e.len() as u32)
                    .unwrap_or(0)
            })
            .sum()
    }
}

/// Token counts by ordinal, persisted per tokenizer (`u32::MAX`: not counted yet).
struct TokenCache {
    path: PathBuf,
    counts: Vec<u32>,
    dirty: bool,
}

const CACHE_MAGIC: &[u8] = b"corpusdb-tokens/1\0";
const NOT_COUNTED: u32 = u32::MAX;

impl TokenCache {
    fn open(store: &Path, fingerprint: &str, examples: u64) -> TokenCache {
        let path = store
            .join("analysis")
            .join(format!("tokens-{}.bin", &fingerprint[..16]));
        let mut counts = Vec::new();
        if let Ok(mut file) = std::fs::File::open(&path) {
            let mut bytes = Vec::new();
            if file.read_to_end(&mut bytes).is_ok() && bytes.starts_with(CACHE_MAGIC) {
                counts = bytes[CACHE_MAGIC.len()..]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
            }
        }
        counts.resize(examples as usize, NOT_COUNTED);
        TokenCache {
            path,
            counts,
            dirty: false,
        }
    }

    fn save(&self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        std::fs::create_dir_all(self.path.parent().expect("has a parent"))?;
        let tmp = self.path.with_extension("tmp");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        out.write_all(CACHE_MAGIC)?;
        for count in &self.counts {
            out.write_all(&count.to_le_bytes())?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// Per-example facts gathered in the pass.
struct Row {
    ordinal: u64,
    category: u32,
    source: u32,
    chars: u64,
    turns: u32,
    duplicates: u32,
    excluded: bool,
    /// In a near-duplicate cluster, and whether it is not the kept representative.
    in_cluster: bool,
    near_duplicate: bool,
}

/// Collects per-group values.
#[derive(Default)]
struct Acc {
    examples: u64,
    chars: u64,
    tokens: u64,
    turns: u64,
    duplicates: u64,
    excluded: u64,
    rejected: u64,
    cluster_members: u64,
    near_duplicates: u64,
    lengths: Vec<u32>,
}

impl Acc {
    fn finish(mut self, name: &str, total: u64) -> Group {
        let mut histogram = vec![0u64; LENGTH_BINS.len() + 1];
        for &length in &self.lengths {
            let bin = LENGTH_BINS
                .iter()
                .position(|&bound| u64::from(length) < bound)
                .unwrap_or(LENGTH_BINS.len());
            histogram[bin] += 1;
        }
        let (median, p95) = if self.lengths.is_empty() {
            (0, 0)
        } else {
            let n = self.lengths.len();
            let at = |q: f64| ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
            let (_, median, _) = self.lengths.select_nth_unstable(at(0.5));
            let median = u64::from(*median);
            let (_, p95, _) = self.lengths.select_nth_unstable(at(0.95));
            (median, u64::from(*p95))
        };
        let per = |v: u64| {
            if self.examples == 0 {
                0.0
            } else {
                v as f64 / self.examples as f64
            }
        };
        Group {
            name: name.to_string(),
            examples: self.examples,
            share: if total == 0 {
                0.0
            } else {
                self.examples as f64 / total as f64
            },
            chars: self.chars,
            tokens: self.tokens,
            mean_tokens: per(self.tokens),
            median_tokens: median,
            p95_tokens: p95,
            mean_turns: per(self.turns),
            duplicates: self.duplicates,
            rejected: self.rejected,
            excluded: self.excluded,
            cluster_members: self.cluster_members,
            near_duplicates: self.near_duplicates,
            near_duplicate_share: if self.examples + self.excluded == 0 {
                0.0
            } else {
                self.near_duplicates as f64 / (self.examples + self.excluded) as f64
            },
            histogram,
        }
    }
}

/// Examples whose text is collected before tokenizing them in parallel.
const TOKEN_CHUNK: usize = 4096;

/// Token counts of every example by ordinal, from the tokenizer's cache in the store;
/// examples not counted yet are tokenized (in parallel) and the cache is updated. The
/// second value is a note when the cache could not be written.
pub fn token_counts(
    store: &Store,
    counter: &TokenCounter,
    progress: &dyn Fn(u64, u64),
) -> store::Result<(Vec<u32>, Option<String>)> {
    let examples = store.counters()?.examples;
    let mut cache = TokenCache::open(store.path(), &counter.fingerprint, examples);
    let missing = cache.counts.iter().filter(|&&n| n == NOT_COUNTED).count() as u64;
    if missing > 0 {
        let mut pending: Vec<(u64, Vec<String>)> = Vec::new();
        let mut done = 0u64;
        let mut count = |pending: &mut Vec<(u64, Vec<String>)>, cache: &mut TokenCache| {
            let counted: Vec<(u64, u32)> = pending
                .par_iter()
                .map(|(ordinal, contents)| (*ordinal, counter.count(contents)))
                .collect();
            for (ordinal, n) in counted {
                cache.counts[ordinal as usize] = n;
            }
            cache.dirty = true;
            done += pending.len() as u64;
            progress(done, missing);
            pending.clear();
        };
        store.for_each_example(|_, example| {
            if cache
                .counts
                .get(example.ordinal as usize)
                .is_some_and(|&n| n == NOT_COUNTED)
            {
                let contents = example
                    .conversation
                    .messages
                    .into_iter()
                    .map(|m| m.content)
                    .collect();
                pending.push((example.ordinal, contents));
                if pending.len() >= TOKEN_CHUNK {
                    count(&mut pending, &mut cache);
                }
            }
            Ok(())
        })?;
        count(&mut pending, &mut cache);
    }
    let note = cache.save().err().map(|e| {
        format!(
            "token counts not cached ({}: {e}); the next run counts again",
            cache.path.display()
        )
    });
    Ok((cache.counts, note))
}

/// Every example's tokens as trained (the chat template's rendering included) from the
/// counter's token cache, when one covers the whole store; with its directory.
fn cached_token_counts(
    store: &Store,
    counter: &TokenCounter,
    examples: u64,
) -> Option<(Vec<u32>, PathBuf)> {
    let cache = crate::batches::TokenCache::open(store, counter.chat.as_ref()?).ok()??;
    if cache.examples() != examples {
        return None;
    }
    let counts = (0..examples).map(|o| cache.len(o) as u32).collect();
    Some((counts, cache.dir().to_owned()))
}

/// Analyses the store. `progress(done, total)` is called as examples are read.
pub fn analyze(
    store: &Store,
    tokens: Option<&TokenCounter>,
    targets: &Targets,
    progress: &dyn Fn(u64, u64),
) -> store::Result<Analysis> {
    let counters = store.counters()?;
    let imports = store.imports()?;
    let import_source: HashMap<u32, &str> =
        imports.iter().map(|i| (i.id, i.source.as_str())).collect();
    let mut excluded_hashes: HashSet<ContentHash> = HashSet::new();
    for item in store.exclusions() {
        excluded_hashes.insert(item?.0);
    }
    // Near-duplicate clusters: (is the representative) per member; few next to the store.
    let mut clustered: HashMap<ContentHash, bool> = HashMap::new();
    let mut cluster_ids: HashSet<ContentHash> = HashSet::new();
    for item in store.cluster_memberships() {
        let (hash, membership) = item?;
        cluster_ids.insert(membership.cluster);
        clustered.insert(hash, membership.is_representative(&hash));
    }
    let mut names = Names::default();
    let mut notes = Vec::new();
    let mut token_count = match tokens {
        Some(t) => t.description.clone(),
        None => "estimate (characters / 4)".to_string(),
    };
    let token_counts = match tokens {
        Some(counter) => match cached_token_counts(store, counter, counters.examples) {
            Some((counts, dir)) => {
                token_count = format!(
                    "exact, as trained: chat template included (token cache {})",
                    dir.display()
                );
                Some(counts)
            }
            None => {
                let (counts, note) = token_counts(store, counter, progress)?;
                notes.extend(note);
                Some(counts)
            }
        },
        None => None,
    };
    let mut rows: Vec<Row> = Vec::with_capacity(counters.examples as usize);
    let mut provenance = store.provenance_cursor();
    let mut done = 0u64;
    // Headers and provenance, both in hash order: two sequential reads, no bodies.
    store.for_each_header(|hash, example| {
        let sources = provenance.get(hash)?;
        let source = import_source
            .get(&example.first_import)
            .copied()
            .unwrap_or("?");
        rows.push(Row {
            ordinal: example.ordinal,
            category: names.intern(example.category),
            source: names.intern(source),
            chars: example.chars,
            turns: example.turns,
            duplicates: sources.len().saturating_sub(1) as u32,
            excluded: excluded_hashes.contains(hash),
            in_cluster: clustered.contains_key(hash),
            near_duplicate: clustered.get(hash) == Some(&false),
        });
        done += 1;
        if done.is_multiple_of(16_384) {
            progress(done, counters.examples);
        }
        Ok(())
    })?;
    progress(done, counters.examples);

    let in_use = rows.iter().filter(|r| !r.excluded).count() as u64;
    let mut categories: BTreeMap<u32, Acc> = BTreeMap::new();
    let mut sources: BTreeMap<u32, Acc> = BTreeMap::new();
    let mut sources_per_category: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let (mut total_chars, mut total_tokens) = (0u64, 0u64);
    for row in &rows {
        let tokens = match &token_counts {
            Some(counts) => u64::from(counts[row.ordinal as usize]),
            None => row.chars.div_ceil(4),
        };
        for acc in [
            categories.entry(row.category).or_default(),
            sources.entry(row.source).or_default(),
        ] {
            acc.cluster_members += u64::from(row.in_cluster);
            acc.near_duplicates += u64::from(row.near_duplicate);
            if row.excluded {
                acc.excluded += 1;
                continue;
            }
            acc.examples += 1;
            acc.chars += row.chars;
            acc.tokens += tokens;
            acc.turns += u64::from(row.turns);
            acc.duplicates += u64::from(row.duplicates);
            acc.lengths.push(tokens.min(u64::from(u32::MAX)) as u32);
        }
        if !row.excluded {
            total_chars += row.chars;
            total_tokens += tokens;
            *sources_per_category
                .entry(names.list[row.category as usize].clone())
                .or_default()
                .entry(names.list[row.source as usize].clone())
                .or_default() += 1;
        }
    }
    // Rejects belong to the import's source and category.
    for import in &imports {
        if import.counts.rejected == 0 {
            continue;
        }
        let category = names.intern(&import.category);
        let source = names.intern(&import.source);
        categories.entry(category).or_default().rejected += import.counts.rejected;
        sources.entry(source).or_default().rejected += import.counts.rejected;
    }
    let finish = |groups: BTreeMap<u32, Acc>| -> Vec<Group> {
        let mut list: Vec<Group> = groups
            .into_iter()
            .map(|(id, acc)| acc.finish(&names.list[id as usize], in_use))
            .collect();
        list.sort_by(|a, b| b.examples.cmp(&a.examples).then(a.name.cmp(&b.name)));
        list
    };
    let categories = finish(categories);
    let sources = finish(sources);
    let (targets_rows, checks) = check(&categories, targets);
    Ok(Analysis {
        examples: in_use,
        excluded: rows.len() as u64 - in_use,
        records_read: counters.read,
        duplicates: counters.duplicates,
        rejected: counters.rejected,
        chars: total_chars,
        tokens: total_tokens,
        token_count,
        tokens_exact: tokens.is_some(),
        categories,
        sources,
        clusters: cluster_ids.len() as u64,
        cluster_members: clustered.len() as u64,
        near_duplicates: clustered.values().filter(|&&kept| !kept).count() as u64,
        sources_per_category,
        targets: targets_rows,
        checks,
        notes,
    })
}

/// Category and source names, interned so per-example rows stay small.
#[derive(Default)]
struct Names {
    list: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Names {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.list.len() as u32;
        self.list.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }
}

fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

fn check(categories: &[Group], targets: &Targets) -> (Vec<TargetRow>, Vec<CheckResult>) {
    let present: Vec<&Group> = categories.iter().filter(|g| g.examples > 0).collect();
    let mut rows = Vec::new();
    let mut names: Vec<&str> = present.iter().map(|g| g.name.as_str()).collect();
    for name in targets.categories.keys() {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    for name in names {
        let share = present
            .iter()
            .find(|g| g.name == name)
            .map_or(0.0, |g| g.share);
        let target = targets.categories.get(name);
        let (min, max) = (
            target.and_then(|t| t.min_share),
            target.and_then(|t| t.max_share),
        );
        // Shares are compared at the precision they are shown with.
        let shown = (share * 1000.0).round() / 1000.0;
        let status = match (min, max) {
            (None, None) => "no target",
            (Some(min), _) if shown < min => "below",
            (_, Some(max)) if shown > max => "above",
            _ => "in range",
        };
        rows.push(TargetRow {
            category: name.to_string(),
            share,
            min_share: min,
            max_share: max,
            status,
        });
    }
    let mut checks = vec![CheckResult {
        name: format!("at least {} categories", targets.min_categories),
        passed: present.len() >= targets.min_categories,
        detail: format!("{} categories have examples", present.len()),
    }];
    let over: Vec<String> = present
        .iter()
        .filter(|g| g.share > targets.max_share)
        .map(|g| format!("{} at {}", g.name, percent(g.share)))
        .collect();
    checks.push(CheckResult {
        name: format!("no category above {}", percent(targets.max_share)),
        passed: over.is_empty(),
        detail: if over.is_empty() {
            match present.first() {
                Some(top) => format!("largest: {} at {}", top.name, percent(top.share)),
                None => "no examples".to_string(),
            }
        } else {
            format!("over: {}", over.join(", "))
        },
    });
    for (name, target) in &targets.categories {
        if let Some(min) = target.min_examples {
            let n = present
                .iter()
                .find(|g| &g.name == name)
                .map_or(0, |g| g.examples);
            checks.push(CheckResult {
                name: format!("{name}: at least {min} examples"),
                passed: n >= min,
                detail: format!("{name} has {n}"),
            });
        }
    }
    (rows, checks)
}
