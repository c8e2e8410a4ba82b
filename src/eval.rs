//! Evaluation of a model with and without an adapter: next-token loss and perplexity on
//! the curriculum's held-out examples per category, and greedy answers to probe prompts
//! per context (`configs/probes.yaml`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::batches::{self, BatchOptions, ChatTokenizer};
use crate::conversation::{Conversation, Message, Role};
use crate::curriculum::Plan;
use crate::model::{generate_greedy, Adapter, Llama, Lora};
use crate::store::Store;
use crate::train::{token_nll, Error, Targets};

#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Held-out examples evaluated per category (the first ones of the split).
    pub per_category: usize,
    pub batch_size: usize,
    pub max_seq_len: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            per_category: 64,
            batch_size: 8,
            max_seq_len: 1024,
        }
    }
}

/// Loss of one category's held-out examples.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CategoryLoss {
    pub category: String,
    pub examples: usize,
    /// Examples that failed to render or tokenize (left out), with the first reason, and
    /// tokens cut at `max_seq_len`.
    pub skipped: usize,
    pub skip_reason: Option<String>,
    pub truncated_tokens: u64,
    /// Trained (assistant) tokens scored.
    pub tokens: u64,
    pub base_loss: f64,
    pub base_perplexity: f64,
    pub adapter_loss: Option<f64>,
    pub adapter_perplexity: Option<f64>,
}

/// Held-out loss per category (and over all, as category `*`), for the base model and,
/// when given, the adapter.
pub fn held_out_loss(
    model: &Llama,
    adapter: Option<&Lora>,
    store: &Store,
    plan: &Plan,
    tokenizer: &ChatTokenizer,
    options: &EvalOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<CategoryLoss>, Error> {
    // The first `per_category` held-out examples of each category, in split order.
    let mut by_category: BTreeMap<String, Vec<(u64, Conversation)>> = BTreeMap::new();
    for &ordinal in &plan.eval {
        let Some((_, example)) = store.example_at(ordinal).map_err(batches::Error::from)? else {
            continue;
        };
        let list = by_category.entry(example.category.clone()).or_default();
        if list.len() < options.per_category {
            list.push((ordinal, example.conversation));
        }
    }
    let total: u64 = by_category.values().map(|v| v.len() as u64).sum();
    let mut done = 0;
    let batch_options = BatchOptions {
        batch_size: options.batch_size,
        max_seq_len: options
            .max_seq_len
            .min(model.config.max_position_embeddings),
        packing: true,
        rank: 0,
        ranks: 1,
    };
    let mut out = Vec::new();
    let (mut all_tokens, mut all_base, mut all_adapter, mut all_examples) =
        (0u64, 0f64, 0f64, 0usize);
    let mut all_left_out = LeftOut::default();
    for (category, examples) in by_category {
        let (mut tokens, mut base, mut adapted, mut scored) = (0u64, 0f64, 0f64, 0usize);
        let mut left_out = LeftOut::default();
        for chunk in examples.chunks(options.batch_size.max(1)) {
            let mut encoded = Vec::new();
            for (ordinal, conversation) in chunk {
                match tokenizer.encode(conversation) {
                    Ok(mut t) => {
                        left_out.truncated_tokens +=
                            t.ids.len().saturating_sub(batch_options.max_seq_len) as u64;
                        t.ids.truncate(batch_options.max_seq_len);
                        t.trained.truncate(batch_options.max_seq_len);
                        encoded.push((*ordinal, *ordinal, t));
                    }
                    Err(reason) => {
                        left_out.skipped += 1;
                        left_out
                            .reason
                            .get_or_insert(format!("ordinal {ordinal}: {reason}"));
                    }
                }
            }
            done += chunk.len() as u64;
            progress(done, total);
            if encoded.is_empty() {
                continue;
            }
            scored += encoded.len();
            let batch = batches::assemble(encoded, tokenizer.pad_id, &batch_options)?;
            let targets = Targets::of(&batch)?;
            if targets.is_empty() {
                continue;
            }
            tokens += targets.len() as u64;
            base += sum(&token_nll(model, None, &batch, &targets)?)?;
            if let Some(lora) = adapter {
                let adapter = Adapter {
                    lora,
                    dropout: None,
                };
                adapted += sum(&token_nll(model, Some(adapter), &batch, &targets)?)?;
            }
        }
        all_tokens += tokens;
        all_base += base;
        all_adapter += adapted;
        all_examples += scored;
        all_left_out.skipped += left_out.skipped;
        all_left_out.truncated_tokens += left_out.truncated_tokens;
        if all_left_out.reason.is_none() {
            all_left_out.reason = left_out.reason.clone();
        }
        out.push(category_loss(
            category,
            scored,
            left_out,
            tokens,
            base,
            adapter.map(|_| adapted),
        ));
    }
    out.push(category_loss(
        "*".into(),
        all_examples,
        all_left_out,
        all_tokens,
        all_base,
        adapter.map(|_| all_adapter),
    ));
    Ok(out)
}

/// What evaluation could not score.
#[derive(Clone, Default)]
struct LeftOut {
    skipped: usize,
    reason: Option<String>,
    truncated_tokens: u64,
}

fn sum(t: &candle_core::Tensor) -> Result<f64, Error> {
    Ok(t.sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?)
}

fn category_loss(
    category: String,
    examples: usize,
    left_out: LeftOut,
    tokens: u64,
    base: f64,
    adapter: Option<f64>,
) -> CategoryLoss {
    let mean = |nll: f64| {
        if tokens == 0 {
            f64::NAN
        } else {
            nll / tokens as f64
        }
    };
    CategoryLoss {
        category,
        examples,
        skipped: left_out.skipped,
        skip_reason: left_out.reason,
        truncated_tokens: left_out.truncated_tokens,
        tokens,
        base_loss: mean(base),
        base_perplexity: mean(base).exp(),
        adapter_loss: adapter.map(mean),
        adapter_perplexity: adapter.map(|a| mean(a).exp()),
    }
}

/// Probe prompts per context (`configs/probes.yaml`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Probes {
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// A system message put before every prompt.
    #[serde(default)]
    pub system: Option<String>,
    pub contexts: Vec<ProbeContext>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeContext {
    pub name: String,
    pub prompts: Vec<String>,
}

fn default_new_tokens() -> usize {
    96
}

impl Probes {
    pub fn load(path: &Path) -> Result<Probes, Error> {
        let text = std::fs::read_to_string(path).map_err(crate::train::io_error(path))?;
        serde_yaml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeAnswer {
    pub context: String,
    pub prompt: String,
    pub base: String,
    pub adapter: Option<String>,
}

/// Greedy answers of the base model and the adapter to every probe.
pub fn answer_probes(
    model: &Llama,
    adapter: Option<&Lora>,
    tokenizer: &ChatTokenizer,
    probes: &Probes,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<ProbeAnswer>, Error> {
    let stop = tokenizer.stop_ids();
    let total: u64 = probes.contexts.iter().map(|c| c.prompts.len() as u64).sum();
    let mut out = Vec::new();
    for context in &probes.contexts {
        for prompt in &context.prompts {
            let mut messages = Vec::new();
            if let Some(system) = &probes.system {
                messages.push(Message::new(Role::System, system.as_str()));
            }
            messages.push(Message::new(Role::User, prompt.as_str()));
            let ids = tokenizer
                .encode_prompt(&Conversation::new(messages))
                .map_err(|e| Error::Config(e.0))?;
            let answer = |lora: Option<&Lora>| -> Result<String, Error> {
                let generated = generate_greedy(model, lora, &ids, probes.max_new_tokens, &stop)?;
                tokenizer.decode(&generated).map_err(|e| Error::Config(e.0))
            };
            out.push(ProbeAnswer {
                context: context.name.clone(),
                prompt: prompt.clone(),
                base: answer(None)?,
                adapter: adapter.map(|lora| answer(Some(lora))).transpose()?,
            });
            progress(out.len() as u64, total);
        }
    }
    Ok(out)
}
