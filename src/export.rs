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

/// The Parquet schema of an export: `messages` is a list of structs, as Hugging Face
/// `datasets` writes chat data; metadata columns follow when asked for.
fn parquet_schema(with_metadata: bool) -> String {
    let metadata = if with_metadata {
        "required binary _hash (STRING);
         required binary _category (STRING);
         required group _sources (LIST) { repeated group list { required binary element (STRING); } }"
    } else {
        ""
    };
    format!(
        "message corpusdb_example {{
           required group messages (LIST) {{
             repeated group list {{
               required group element {{
                 required binary role (STRING);
                 required binary content (STRING);
                 optional binary name (STRING);
                 optional binary tool_calls (STRING);
               }}
             }}
           }}
           optional binary tools (STRING);
           {metadata}
         }}"
    )
}

/// Values and levels of one leaf column of a row group.
#[derive(Default)]
struct Leaf {
    values: Vec<parquet::data_type::ByteArray>,
    definition: Vec<i16>,
    repetition: Vec<i16>,
}

impl Leaf {
    fn push(&mut self, value: Option<&str>, defined: i16, repeated: i16) {
        if let Some(value) = value {
            self.values.push(value.as_bytes().to_vec().into());
        }
        self.definition.push(defined);
        self.repetition.push(repeated);
    }
}

const PARQUET_ROWS_PER_GROUP: usize = 50_000;

/// Writes the examples at `ordinals` as a Parquet file (zstd-compressed, row groups of
/// 50,000 examples); returns how many.
pub fn write_parquet<W: Write + Send>(
    store: &Store,
    ordinals: &[u64],
    out: W,
    with_metadata: bool,
    progress: &dyn Fn(u64),
) -> Result<u64, Error> {
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;

    let parquet_error =
        |e: parquet::errors::ParquetError| Error::Io(io::Error::other(e.to_string()));
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(&parquet_schema(with_metadata))
            .map_err(parquet_error)?,
    );
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).map_err(parquet_error)?,
        ))
        .build();
    let mut writer =
        SerializedFileWriter::new(out, schema, Arc::new(properties)).map_err(parquet_error)?;
    let sources: HashMap<u32, String> = store
        .imports()?
        .into_iter()
        .map(|i| (i.id, i.source))
        .collect();
    let leaves = if with_metadata { 8 } else { 5 };
    for (chunk_index, chunk) in ordinals.chunks(PARQUET_ROWS_PER_GROUP).enumerate() {
        let mut columns: Vec<Leaf> = (0..leaves).map(|_| Leaf::default()).collect();
        for &ordinal in chunk {
            let hash = store.hash_at(ordinal)?.ok_or(Error::Missing(ordinal))?;
            let example = store.get(&hash)?.ok_or(Error::Missing(ordinal))?;
            for (i, m) in example.conversation.messages.iter().enumerate() {
                let rep = i16::from(i > 0);
                columns[0].push(Some(m.role.as_str()), 1, rep);
                columns[1].push(Some(&m.content), 1, rep);
                columns[2].push(m.name.as_deref(), 1 + i16::from(m.name.is_some()), rep);
                columns[3].push(
                    m.tool_calls.as_deref(),
                    1 + i16::from(m.tool_calls.is_some()),
                    rep,
                );
            }
            let tools = example.conversation.tools.as_deref();
            columns[4].push(tools, i16::from(tools.is_some()), 0);
            if with_metadata {
                columns[5].push(Some(&hash.to_hex()), 0, 0);
                columns[6].push(Some(&example.category), 0, 0);
                let names: BTreeSet<&str> = store
                    .provenance(&hash)?
                    .iter()
                    .filter_map(|p| sources.get(&p.import_id).map(String::as_str))
                    .collect();
                for (i, name) in names.into_iter().enumerate() {
                    columns[7].push(Some(name), 1, i16::from(i > 0));
                }
            }
        }
        let mut group = writer.next_row_group().map_err(parquet_error)?;
        for leaf in &columns {
            let mut column = group
                .next_column()
                .map_err(parquet_error)?
                .expect("one writer per leaf");
            let descriptor = column
                .typed::<parquet::data_type::ByteArrayType>()
                .get_descriptor()
                .clone();
            let definition = (descriptor.max_def_level() > 0).then_some(&leaf.definition[..]);
            let repetition = (descriptor.max_rep_level() > 0).then_some(&leaf.repetition[..]);
            column
                .typed::<parquet::data_type::ByteArrayType>()
                .write_batch(&leaf.values, definition, repetition)
                .map_err(parquet_error)?;
            column.close().map_err(parquet_error)?;
        }
        group.close().map_err(parquet_error)?;
        progress((chunk_index * PARQUET_ROWS_PER_GROUP + chunk.len()) as u64);
    }
    writer.close().map_err(parquet_error)?;
    Ok(ordinals.len() as u64)
}
