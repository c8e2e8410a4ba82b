//! A deterministic generator of realistic instruction data, for benchmarks and tests.
//!
//! Records are JSONL in the three built-in shapes (alpaca, messages, sharegpt), multi-turn,
//! with a chosen fraction of exact repeats of earlier records (some with extra whitespace or
//! CRLF line ends, which normalisation must fold together). Lengths follow a [`Lengths`]
//! profile: uniform ranges of about 1.5 KB a record, or the long-tailed lengths and 1-8
//! turns of public chat data. The same seed gives the same bytes on every machine: the
//! PRNG is SplitMix64, defined here.

use std::io::{self, Write};

use serde_json::json;

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub records: u64,
    /// Fraction of records that repeat an earlier record's content.
    pub duplicate_fraction: f64,
    pub seed: u64,
    pub lengths: Lengths,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            records: 100_000,
            duplicate_fraction: 0.15,
            seed: 42,
            lengths: Lengths::Uniform,
        }
    }
}

/// How long generated conversations are (`corpusdb generate --lengths`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Lengths {
    /// 1-4 turns; prompts of 60-300 characters and replies of 150-900, uniformly: about
    /// 1.5 KB a record, narrow. The benchmarks' corpora.
    #[default]
    Uniform,
    /// Like public chat data (ShareGPT, OpenAssistant, Alpaca-style sets): alpaca-shaped
    /// records are single-turn, conversations have 1-8 turns, half of them one turn, and
    /// every prompt and reply length is log-normal with a long tail (medians of 150 and
    /// 800 characters in conversations, 120 and 450 in alpaca records; up to 8,000 and
    /// 16,000): about 3 KB a record on average, a median of 1.6 KB, 3% above 12 KB.
    Chat,
}

/// How many turns a chat-profile conversation has: 1-8, half of them one.
const CHAT_TURN_WEIGHTS: [u64; 8] = [50, 17, 10, 7, 6, 4, 3, 3];

/// A log-normal length in characters (median, log-space deviation), clamped to `[min, max]`.
fn log_normal(rng: &mut SplitMix64, median: f64, sigma: f64, min: usize, max: usize) -> usize {
    let chars = median * (sigma * rng.next_normal() as f64).exp();
    (chars as usize).clamp(min, max)
}

/// Turns (prompt, reply) of a record: their number and lengths in characters.
fn turn_lengths(rng: &mut SplitMix64, lengths: Lengths, alpaca: bool) -> Vec<(usize, usize)> {
    match lengths {
        Lengths::Uniform => {
            let turns = 1 + rng.below(3) + (rng.below(4) == 0) as u64;
            let prompt_chars = 60 + rng.below(240) as usize;
            let reply_chars = 150 + rng.below(750) as usize;
            (0..turns as usize)
                .map(|turn| (prompt_chars / (turn + 1), reply_chars))
                .collect()
        }
        Lengths::Chat if alpaca => vec![(
            log_normal(rng, 120.0, 0.8, 12, 4_000),
            log_normal(rng, 450.0, 1.0, 8, 8_000),
        )],
        Lengths::Chat => {
            let mut pick = rng.below(CHAT_TURN_WEIGHTS.iter().sum());
            let mut turns = 1;
            for weight in CHAT_TURN_WEIGHTS {
                if pick < weight {
                    break;
                }
                pick -= weight;
                turns += 1;
            }
            (0..turns)
                .map(|_| {
                    (
                        log_normal(rng, 150.0, 1.0, 8, 8_000),
                        log_normal(rng, 800.0, 0.9, 16, 16_000),
                    )
                })
                .collect()
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
fn record(content_seed: u64, variant: u64, lengths: Lengths) -> serde_json::Value {
    let mut rng = SplitMix64::new(content_seed);
    let shape = rng.below(3);
    let mut pairs = Vec::new();
    for (prompt_chars, reply_chars) in turn_lengths(&mut rng, lengths, shape == 0) {
        let opener = OPENERS[rng.below(OPENERS.len() as u64) as usize];
        let prompt = format!("{opener} {}", paragraph(&mut rng, prompt_chars));
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
                let chars = match lengths {
                    Lengths::Uniform => 120,
                    Lengths::Chat => log_normal(&mut rng, 200.0, 1.0, 8, 8_000),
                };
                paragraph(&mut rng, chars)
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
        serde_json::to_writer(&mut line, &record(content_seed, variant, spec.lengths))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(spec: &SynthSpec) -> Vec<String> {
        let mut out = Vec::new();
        generate(&mut out, spec).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Turns of a record (user messages), and whether it is alpaca-shaped.
    fn turns(line: &str) -> (usize, bool) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(messages) = record["messages"].as_array() {
            (
                messages.iter().filter(|m| m["role"] == "user").count(),
                false,
            )
        } else if let Some(turns) = record["conversations"].as_array() {
            (turns.len() / 2, false)
        } else {
            assert!(record["instruction"].is_string(), "{line}");
            (1, true)
        }
    }

    #[test]
    fn same_seed_same_bytes_for_both_profiles() {
        for lengths in [Lengths::Uniform, Lengths::Chat] {
            let spec = |seed| SynthSpec {
                records: 300,
                seed,
                lengths,
                ..SynthSpec::default()
            };
            assert_eq!(lines(&spec(3)), lines(&spec(3)));
            assert_ne!(lines(&spec(3)), lines(&spec(4)));
        }
    }

    #[test]
    fn the_chat_profile_has_one_to_eight_turns_and_a_long_tail() {
        let spec = SynthSpec {
            records: 20_000,
            duplicate_fraction: 0.0,
            seed: 9,
            lengths: Lengths::Chat,
        };
        let records = lines(&spec);
        let mut by_turns = [0usize; 9];
        let mut conversations = 0;
        for line in &records {
            let (turns, alpaca) = turns(line);
            assert!((1..=8).contains(&turns), "{turns} turns");
            if !alpaca {
                by_turns[turns] += 1;
                conversations += 1;
            }
        }
        // Every count from 1 to 8 occurs, about half of the conversations have one turn
        // and more turns are rarer.
        assert!(by_turns[1..].iter().all(|&n| n > 0), "{by_turns:?}");
        let single = by_turns[1] as f64 / conversations as f64;
        assert!((0.45..0.55).contains(&single), "{single}");
        assert!(by_turns[2] > by_turns[4] && by_turns[4] > by_turns[8]);

        let mut sizes: Vec<usize> = records.iter().map(String::len).collect();
        sizes.sort_unstable();
        let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        let median = sizes[sizes.len() / 2];
        let p99 = sizes[sizes.len() * 99 / 100];
        assert!((2_500.0..3_500.0).contains(&mean), "mean {mean}");
        assert!(median < 2_000 && p99 > 12_000, "median {median}, p99 {p99}");

        // The uniform profile stays narrow: 1-4 turns, nothing above 6 KB.
        let uniform = lines(&SynthSpec {
            lengths: Lengths::Uniform,
            ..spec
        });
        assert!(uniform.iter().all(|l| turns(l).0 <= 4 && l.len() < 6_000));
    }
}
