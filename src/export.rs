//! Exports: examples out of the store as JSONL in OpenAI `messages` shape.
//!
//! Each line is `{"messages": [{"role", "content", "name"?, "tool_calls"?}], "tools"?}`;
//! with metadata it also carries `_hash`, `_category` and `_sources`. Re-ingesting an
//! export yields the same hashes (the stored text is already canonical).

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};

use serde_json::{json, Value};

use crate::conversation::ContentHash;
use crate::store::{self, Store, StoredExample};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("ordinal {0} is selected but not stored; run `corpusdb reindex`")]
    Missing(u64),
    #[error("writing the export: {0}")]
    Io(#[from] io::Error),
}

/// Writes the examples at `ordinals` (in that order) as JSONL; returns how many.
pub fn write_jsonl(
    store: &Store,
    ordinals: &[u64],
    out: &mut dyn Write,
    with_metadata: bool,
    progress: &dyn Fn(u64),
) -> Result<u64, Error> {
    let sources: HashMap<u32, String> = store
        .imports()?
        .into_iter()
        .map(|i| (i.id, i.source))
        .collect();
    let mut line = Vec::with_capacity(4096);
    for (done, &ordinal) in ordinals.iter().enumerate() {
        let hash = store.hash_at(ordinal)?.ok_or(Error::Missing(ordinal))?;
        let example = store.get(&hash)?.ok_or(Error::Missing(ordinal))?;
        let mut record = messages_record(&example);
        if with_metadata {
            let names: BTreeSet<&str> = store
                .provenance(&hash)?
                .iter()
                .filter_map(|p| sources.get(&p.import_id).map(String::as_str))
                .collect();
            add_metadata(&mut record, &hash, &example, names);
        }
        line.clear();
        serde_json::to_writer(&mut line, &record).map_err(io::Error::from)?;
        line.push(b'\n');
        out.write_all(&line)?;
        if done % 8192 == 0 {
            progress(done as u64);
        }
    }
    progress(ordinals.len() as u64);
    Ok(ordinals.len() as u64)
}

/// The OpenAI `messages` form of an example.
pub fn messages_record(example: &StoredExample) -> Value {
    let messages: Vec<Value> = example
        .conversation
        .messages
        .iter()
        .map(|m| {
            let mut v = json!({"role": m.role.as_str(), "content": m.content});
            if let Some(name) = &m.name {
                v["name"] = json!(name);
            }
            if let Some(calls) = &m.tool_calls {
                v["tool_calls"] = serde_json::from_str(calls).unwrap_or_else(|_| json!(calls));
            }
            v
        })
        .collect();
    let mut record = json!({ "messages": messages });
    if let Some(tools) = &example.conversation.tools {
        record["tools"] = serde_json::from_str(tools).unwrap_or_else(|_| json!(tools));
    }
    record
}

fn add_metadata(
    record: &mut Value,
    hash: &ContentHash,
    example: &StoredExample,
    sources: BTreeSet<&str>,
) {
    record["_hash"] = json!(hash.to_hex());
    record["_category"] = json!(example.category);
    record["_sources"] = json!(sources);
}
