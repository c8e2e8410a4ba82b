//! A deterministic generator of realistic instruction data, for benchmarks and tests.
//!
//! Records are JSONL in the three built-in shapes (alpaca, messages, sharegpt), multi-turn,
//! about 1.5 KB on average, with a chosen fraction of exact repeats of earlier records (some
//! with extra whitespace or CRLF line ends, which normalisation must fold together). The
//! same seed gives the same bytes on every machine: the PRNG is SplitMix64, defined here.

use std::io::{self, Write};

use serde_json::json;

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub records: u64,
    /// Fraction of records that repeat an earlier record's content.
    pub duplicate_fraction: f64,
    pub seed: u64,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            records: 100_000,
            duplicate_fraction: 0.15,
            seed: 42,
        }
    }
}

/// What was generated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynthStats {
    pub records: u64,
    /// Records with content not seen before in this file.
    pub unique: u64,
    pub bytes: u64,
}

/// SplitMix64: tiny, fast, and fixed forever (unlike a library PRNG's stream).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The stream for a key: the seed mixed with each integer of the key in turn
    /// (counter-based streams: every `(seed, key)` is its own sequence).
    pub fn keyed(seed: u64, key: &[u64]) -> SplitMix64 {
        let mut state = SplitMix64(seed);
        for &k in key {
            state = SplitMix64(state.next_u64() ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        state
    }

    /// Uniform in `[0, 1)` with 24 bits of precision.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn next_normal(&mut self) -> f32 {
        let u1 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "data",
    "answer",
    "question",
    "because",
    "function",
    "value",
    "first",
    "second",
    "result",
    "explain",
    "example",
    "system",
    "people",
    "time",
    "water",
    "energy",
    "history",
    "language",
    "number",
    "problem",
    "solution",
    "step",
    "therefore",
    "consider",
    "important",
    "different",
    "between",
    "through",
    "however",
    "research",
    "science",
    "city",
    "music",
    "story",
    "friend",
    "feeling",
    "reason",
    "method",
    "equation",
    "variable",
    "list",
    "string",
    "memory",
    "network",
    "process",
    "thread",
    "market",
    "price",
    "health",
    "sleep",
    "learning",
    "teacher",
    "student",
    "book",
    "chapter",
    "river",
    "mountain",
    "planet",
    "light",
    "sound",
    "color",
    "simple",
    "complex",
    "quickly",
    "carefully",
    "often",
    "rarely",
    "always",
    "a",
    "an",
    "of",
    "to",
    "in",
    "and",
    "or",
    "is",
    "are",
    "was",
    "with",
    "for",
    "on",
    "that",
    "this",
    "it",
    "can",
    "will",
    "should",
    "would",
    "not",
    "more",
    "most",
    "less",
    "each",
    "every",
    "some",
    "many",
    "few",
    "small",
    "large",
    "new",
    "old",
    "good",
    "better",
    "best",
    "café",
    "naïve",
    "résumé",
    "Zürich",
    "São",
    "Paulo",
    "東京",
    "数据",
    "χ²",
    "→",
];

const OPENERS: &[&str] = &[
    "Explain",
    "Describe",
    "Summarize",
    "Write",
    "Compare",
    "List",
    "Calculate",
    "Translate",
    "Why does",
    "How can",
    "What is",
    "Suggest",
];

fn sentence(rng: &mut SplitMix64, words: u64) -> String {
    let mut out = String::with_capacity(words as usize * 7);
    for i in 0..words {
        let word = WORDS[rng.below(WORDS.len() as u64) as usize];
        if i == 0 {
            let mut chars = word.chars();
            if let Some(c) = chars.next() {
                out.extend(c.to_uppercase());
                out.push_str(chars.as_str());
            }
        } else {
            out.push(' ');
            out.push_str(word);
        }
    }
    out.push('.');
    out
}

fn paragraph(rng: &mut SplitMix64, target_chars: usize) -> String {
    let mut out = String::with_capacity(target_chars + 64);
    while out.len() < target_chars {
        if !out.is_empty() {
            out.push(if rng.below(5) == 0 { '\n' } else { ' ' });
        }
        let words = 6 + rng.below(14);
        out.push_str(&sentence(rng, words));
    }
    out
}

/// The content of one unique record, rebuilt from its own seed so repeats cost no memory.
fn record(content_seed: u64, variant: u64) -> serde_json::Value {
    let mut rng = SplitMix64::new(content_seed);
    let shape = rng.below(3);
    let turns = 1 + rng.below(3) + (rng.below(4) == 0) as u64;
    let prompt_chars = 60 + rng.below(240) as usize;
    let reply_chars = 150 + rng.below(750) as usize;
    let mut pairs = Vec::new();
    for turn in 0..turns {
        let opener = OPENERS[rng.below(OPENERS.len() as u64) as usize];
        let prompt = format!(
            "{opener} {}",
            paragraph(&mut rng, prompt_chars / (turn as usize + 1))
        );
        let reply = paragraph(&mut rng, reply_chars);
        pairs.push((prompt, reply));
    }
    // Repeats sometimes differ only in ways normalisation removes.
    let dress = |text: &str| match variant % 3 {
        1 => format!("{text}  \n"),
        2 => text.replace('\n', "\r\n"),
        _ => text.to_string(),
    };
    match shape {
        0 => {
            let (prompt, reply) = &pairs[0];
            let input = if rng.below(2) == 0 {
                paragraph(&mut rng, 120)
            } else {
                String::new()
            };
            json!({"instruction": dress(prompt), "input": input, "output": dress(reply)})
        }
        1 => {
            let mut messages = Vec::new();
            if rng.below(3) == 0 {
                messages.push(json!({"role": "system", "content": "You are a helpful assistant."}));
            }
            for (prompt, reply) in &pairs {
                messages.push(json!({"role": "user", "content": dress(prompt)}));
                messages.push(json!({"role": "assistant", "content": dress(reply)}));
            }
            json!({ "messages": messages })
        }
        _ => {
            let mut turns = Vec::new();
            for (prompt, reply) in &pairs {
                turns.push(json!({"from": "human", "value": dress(prompt)}));
                turns.push(json!({"from": "gpt", "value": dress(reply)}));
            }
            json!({ "id": format!("conv-{content_seed}"), "conversations": turns })
        }
    }
}

/// Writes `spec.records` JSONL records to a new file at `path`.
pub fn generate_file(path: &std::path::Path, spec: &SynthSpec) -> io::Result<SynthStats> {
    let mut out = io::BufWriter::new(std::fs::File::create(path)?);
    let stats = generate(&mut out, spec)?;
    out.flush()?;
    Ok(stats)
}

/// Writes `spec.records` JSONL records to `out`.
pub fn generate(out: &mut impl Write, spec: &SynthSpec) -> io::Result<SynthStats> {
    let mut rng = SplitMix64::new(spec.seed);
    let mut stats = SynthStats::default();
    let mut line = Vec::with_capacity(4096);
    for index in 0..spec.records {
        let repeat = stats.unique > 0 && rng.unit() < spec.duplicate_fraction;
        let (content_seed, variant) = if repeat {
            let earlier = rng.below(stats.unique);
            (content_seed(spec.seed, earlier), 1 + rng.below(3))
        } else {
            stats.unique += 1;
            (content_seed(spec.seed, stats.unique - 1), 0)
        };
        line.clear();
        serde_json::to_writer(&mut line, &record(content_seed, variant))?;
        line.push(b'\n');
        out.write_all(&line)?;
        stats.bytes += line.len() as u64;
        stats.records = index + 1;
    }
    Ok(stats)
}

fn content_seed(seed: u64, unique_index: u64) -> u64 {
    SplitMix64::new(seed ^ unique_index.wrapping_mul(0x2545_F491_4F6C_DD1D)).next_u64()
}

/// What [`near_duplicates`] generates: originals and edited copies of them.
#[derive(Clone, Debug)]
pub struct NearDupSpec {
    pub records: u64,
    /// Fraction of records that are edited copies of an earlier original.
    pub copy_fraction: f64,
    pub seed: u64,
}

/// The edits a near-duplicate copy can carry.
pub const EDITS: [&str; 6] = [
    "insert-sentence",
    "remove-sentence",
    "system-prompt",
    "whitespace",
    "numbering",
    "rewrite-sentences",
];

/// One generated record: the original it derives from (its own index for an original),
/// the edits applied, and the record (`messages` shape).
#[derive(Clone, Debug)]
pub struct NearDupRecord {
    pub family: u64,
    pub edits: Vec<&'static str>,
    pub record: serde_json::Value,
}

/// A conversation as sentences, so that edits can work on them.
struct Draft {
    system: Option<String>,
    turns: Vec<(String, Vec<String>)>,
}

const SYSTEM_PROMPTS: &[&str] = &[
    "You are a helpful assistant.",
    "You are a friendly and knowledgeable AI assistant. Answer carefully.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "You are an expert tutor who explains things step by step.",
];

fn draft(seed: u64) -> Draft {
    let mut rng = SplitMix64::new(seed);
    let system = (rng.below(2) == 0)
        .then(|| SYSTEM_PROMPTS[rng.below(SYSTEM_PROMPTS.len() as u64) as usize].to_string());
    let turns = (0..1 + rng.below(3))
        .map(|_| {
            let opener = OPENERS[rng.below(OPENERS.len() as u64) as usize];
            let prompt_chars = 40 + rng.below(160) as usize;
            let prompt = format!("{opener} {}", paragraph(&mut rng, prompt_chars));
            let sentences = (0..4 + rng.below(12))
                .map(|_| {
                    let words = 6 + rng.below(14);
                    sentence(&mut rng, words)
                })
                .collect();
            (prompt, sentences)
        })
        .collect();
    Draft { system, turns }
}

impl Draft {
    fn edit(&mut self, edit: &str, rng: &mut SplitMix64) {
        let turn = rng.below(self.turns.len() as u64) as usize;
        let sentences = &mut self.turns[turn].1;
        match edit {
            "insert-sentence" => {
                let at = rng.below(sentences.len() as u64 + 1) as usize;
                let words = 6 + rng.below(14);
                sentences.insert(at, sentence(rng, words));
            }
            "remove-sentence" if sentences.len() > 2 => {
                sentences.remove(rng.below(sentences.len() as u64) as usize);
            }
            "remove-sentence" => sentences.push(sentence(rng, 8)),
            "system-prompt" => {
                self.system = match &self.system {
                    Some(_) if rng.below(3) == 0 => None,
                    current => loop {
                        let next = SYSTEM_PROMPTS[rng.below(SYSTEM_PROMPTS.len() as u64) as usize];
                        if current.as_deref() != Some(next) {
                            break Some(next.to_string());
                        }
                    },
                }
            }
            "whitespace" => {
                for s in sentences.iter_mut() {
                    if rng.below(2) == 0 {
                        *s = s.replace(' ', "  ");
                    }
                    if rng.below(3) == 0 {
                        s.push('\n');
                    }
                }
            }
            "numbering" => {
                for (i, s) in sentences.iter_mut().enumerate() {
                    *s = match rng.below(3) {
                        0 => format!("{}. {s}", i + 1),
                        1 => format!("{}) {s}", i + 1),
                        _ => format!("- {s}"),
                    };
                }
            }
            // A heavier edit: a third of the sentences replaced.
            _ => {
                let n = sentences.len();
                for _ in 0..n.div_ceil(3) {
                    let at = rng.below(n as u64) as usize;
                    let words = 6 + rng.below(14);
                    sentences[at] = sentence(rng, words);
                }
            }
        }
    }

    fn record(&self) -> serde_json::Value {
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        for (prompt, sentences) in &self.turns {
            messages.push(json!({"role": "user", "content": prompt}));
            messages.push(json!({"role": "assistant", "content": sentences.join(" ")}));
        }
        json!({ "messages": messages })
    }
}

/// Originals and near-duplicate copies of them, with the edits each copy carries: the
/// sample near-duplicate detection is measured on. A copy takes one edit, or two or three
/// (a third of copies), from [`EDITS`].
pub fn near_duplicates(spec: &NearDupSpec) -> impl Iterator<Item = NearDupRecord> + '_ {
    let mut rng = SplitMix64::new(spec.seed ^ 0x6e65_6172);
    let mut originals = 0u64;
    (0..spec.records).map(move |_| {
        if originals > 0 && rng.unit() < spec.copy_fraction {
            let family = rng.below(originals);
            let mut copy = draft(content_seed(spec.seed, family));
            let count = if rng.below(3) == 0 {
                2 + rng.below(2)
            } else {
                1
            };
            let mut edits = Vec::new();
            for _ in 0..count {
                let edit = EDITS[rng.below(EDITS.len() as u64) as usize];
                copy.edit(edit, &mut rng);
                edits.push(edit);
            }
            NearDupRecord {
                family,
                edits,
                record: copy.record(),
            }
        } else {
            originals += 1;
            NearDupRecord {
                family: originals - 1,
                edits: Vec::new(),
                record: draft(content_seed(spec.seed, originals - 1)).record(),
            }
        }
    })
}

/// Writes [`near_duplicates`] as JSONL (`messages` shape).
pub fn write_near_duplicates(out: &mut impl Write, spec: &NearDupSpec) -> io::Result<SynthStats> {
    let mut stats = SynthStats::default();
    let mut line = Vec::with_capacity(4096);
    for record in near_duplicates(spec) {
        line.clear();
        serde_json::to_writer(&mut line, &record.record)?;
        line.push(b'\n');
        out.write_all(&line)?;
        stats.records += 1;
        stats.unique += record.edits.is_empty() as u64;
        stats.bytes += line.len() as u64;
    }
    Ok(stats)
}
