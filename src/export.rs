//! Exports: examples out of the store as JSONL in OpenAI `messages` shape.
//!
//! Each line is `{"messages": [{"role", "content", "name"?, "tool_calls"?}], "tools"?}`;
//! with metadata it also carries `_hash`, `_category` and `_sources`. Re-ingesting an
//! export yields the same hashes (the stored text is already canonical).

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};

use serde_json::value::RawValue;
use serde_json::Value;

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

/// What to export: everything, or the examples at some ordinals.
pub enum Selection {
    All,
    /// Sorted ascending.
    Ordinals(Vec<u64>),
}

impl Selection {
    /// The examples at `ordinals` (as the index lists its matches), in insertion order.
    pub fn from_ordinals(ordinals: &[u64]) -> Selection {
        let mut ordinals = ordinals.to_vec();
        ordinals.sort_unstable();
        ordinals.dedup();
        Selection::Ordinals(ordinals)
    }

    /// How many examples the selection names.
    pub fn len(&self, store: &Store) -> Result<u64, Error> {
        Ok(match self {
            Selection::All => store.counters()?.examples,
            Selection::Ordinals(ordinals) => ordinals.len() as u64,
        })
    }

    fn for_each(
        &self,
        store: &Store,
        mut visit: impl FnMut(&ContentHash, StoredExample) -> store::Result<()>,
    ) -> Result<(), Error> {
        match self {
            Selection::All => store.for_each_example(visit)?,
            Selection::Ordinals(ordinals) => {
                let mut missing = None;
                store.for_each_at(ordinals, |ordinal, found| match found {
                    Some((hash, example)) => visit(&hash, example),
                    None => {
                        missing.get_or_insert(ordinal);
                        Ok(())
                    }
                })?;
                if let Some(ordinal) = missing {
                    return Err(Error::Missing(ordinal));
                }
            }
        }
        Ok(())
    }
}

/// One JSONL line; tools and tool calls are embedded as the JSON they are stored as.
#[derive(serde::Serialize)]
struct Line<'a> {
    messages: Vec<LineMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a RawValue>,
    #[serde(rename = "_hash", skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
    #[serde(rename = "_category", skip_serializing_if = "Option::is_none")]
    category: Option<&'a str>,
    #[serde(rename = "_sources", skip_serializing_if = "Option::is_none")]
    sources: Option<BTreeSet<&'a str>>,
}

#[derive(serde::Serialize)]
struct LineMessage<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a RawValue>,
}

impl<'a> Line<'a> {
    /// The `messages` form of an example, without metadata.
    fn of(example: &'a StoredExample) -> Line<'a> {
        Line {
            messages: example
                .conversation
                .messages
                .iter()
                .map(|m| LineMessage {
                    role: m.role.as_str(),
                    content: &m.content,
                    name: m.name.as_deref(),
                    tool_calls: raw(m.tool_calls.as_deref()),
                })
                .collect(),
            tools: raw(example.conversation.tools.as_deref()),
            hash: None,
            category: None,
            sources: None,
        }
    }
}

fn raw(json: Option<&str>) -> Option<&RawValue> {
    json.and_then(|j| serde_json::from_str(j).ok())
}

/// Writes the selected examples as JSONL, in insertion order (the bodies' physical
/// order, which reads every table block once); returns how many.
pub fn write_jsonl(
    store: &Store,
    selection: &Selection,
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
    let mut done = 0u64;
    let mut failure = None;
    let mut cursor = store.provenance_cursor();
    selection.for_each(store, |hash, example| {
        let provenance = if with_metadata {
            cursor.get(hash)?
        } else {
            Vec::new()
        };
        let mut record = Line::of(&example);
        if with_metadata {
            record.hash = Some(hash.to_hex());
            record.category = Some(&example.category);
            record.sources = Some(
                provenance
                    .iter()
                    .filter_map(|p| sources.get(&p.import_id).map(String::as_str))
                    .collect(),
            );
        }
        line.clear();
        serde_json::to_writer(&mut line, &record).expect("export lines always serialise");
        line.push(b'\n');
        if let Err(e) = out.write_all(&line) {
            failure.get_or_insert(e);
        }
        done += 1;
        if done.is_multiple_of(8192) {
            progress(done);
        }
        Ok(())
    })?;
    if let Some(e) = failure {
        return Err(Error::Io(e));
    }
    progress(done);
    Ok(done)
}

/// The OpenAI `messages` form of an example, as a JSON value (what `show --json` prints).
pub fn messages_record(example: &StoredExample) -> Value {
    serde_json::to_value(Line::of(example)).expect("export lines always serialise")
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

/// Rows per Parquet row group in exports: the unit readers stream and skip by.
pub const PARQUET_ROWS_PER_GROUP: usize = 50_000;

/// Writes the selected examples as a Parquet file (zstd-compressed, row groups of
/// `rows_per_group` examples, insertion order); returns how many.
pub fn write_parquet<W: Write + Send>(
    store: &Store,
    selection: &Selection,
    out: W,
    with_metadata: bool,
    rows_per_group: usize,
    progress: &dyn Fn(u64),
) -> Result<u64, Error> {
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;

    let schema = parquet::schema::parser::parse_message_type(&parquet_schema(with_metadata))
        .map_err(parquet_error)?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).map_err(parquet_error)?,
        ))
        .build();
    let mut writer = SerializedFileWriter::new(out, Arc::new(schema), Arc::new(properties))
        .map_err(parquet_error)?;
    let sources: HashMap<u32, String> = store
        .imports()?
        .into_iter()
        .map(|i| (i.id, i.source))
        .collect();
    let leaves = if with_metadata { 8 } else { 5 };
    let mut columns: Vec<Leaf> = (0..leaves).map(|_| Leaf::default()).collect();
    let mut rows = 0;
    let mut done = 0u64;
    let mut failure = None;
    let mut cursor = store.provenance_cursor();
    selection.for_each(store, |hash, example| {
        if failure.is_some() {
            return Ok(());
        }
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
            let provenance = cursor.get(hash)?;
            let names: BTreeSet<&str> = provenance
                .iter()
                .filter_map(|p| sources.get(&p.import_id).map(String::as_str))
                .collect();
            for (i, name) in names.into_iter().enumerate() {
                columns[7].push(Some(name), 1, i16::from(i > 0));
            }
        }
        rows += 1;
        done += 1;
        if rows == rows_per_group.max(1) {
            if let Err(e) = write_row_group(&mut writer, &mut columns) {
                failure = Some(e);
            }
            rows = 0;
            progress(done);
        }
        Ok(())
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if rows > 0 {
        write_row_group(&mut writer, &mut columns)?;
    }
    writer.close().map_err(parquet_error)?;
    progress(done);
    Ok(done)
}

fn parquet_error(e: parquet::errors::ParquetError) -> Error {
    Error::Io(io::Error::other(e.to_string()))
}

/// Writes the buffered leaves as one row group and empties them.
fn write_row_group<W: Write + Send>(
    writer: &mut parquet::file::writer::SerializedFileWriter<W>,
    columns: &mut [Leaf],
) -> Result<(), Error> {
    use parquet::data_type::ByteArrayType;
    let mut group = writer.next_row_group().map_err(parquet_error)?;
    for leaf in columns.iter_mut() {
        let mut column = group
            .next_column()
            .map_err(parquet_error)?
            .expect("one writer per leaf");
        let descriptor = column.typed::<ByteArrayType>().get_descriptor().clone();
        let definition = (descriptor.max_def_level() > 0).then_some(&leaf.definition[..]);
        let repetition = (descriptor.max_rep_level() > 0).then_some(&leaf.repetition[..]);
        column
            .typed::<ByteArrayType>()
            .write_batch(&leaf.values, definition, repetition)
            .map_err(parquet_error)?;
        column.close().map_err(parquet_error)?;
        *leaf = Leaf::default();
    }
    group.close().map_err(parquet_error)?;
    Ok(())
}
