//! Dataset formats: each maps one JSON record to canonical [`Conversation`]s.
//!
//! A [`Format`] is either code (the common chat shapes, trees, function calling) or a
//! field mapping written in YAML ([`mapping`]); most built-in formats are mappings too, in
//! `builtin.yaml`. [`Formats`] is the set a run knows: the built-ins plus mappings loaded
//! from files. A record yields one example, or several (OASST trees give one per path,
//! APPS one per solution); formats with `group` take consecutive rows sharing a key (the
//! reader joins them into one JSON array). Auto-detection scores each format by the fields
//! it needs that a record has. This module knows nothing of files or the store: it turns
//! bytes into examples or reasons why not.

mod alpaca;
pub mod mapping;
mod messages;
mod oasst;
mod sharegpt;
mod sniff;
mod special;
pub mod template;

use crate::reject::{RejectKind, RejectReason};
use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use serde_json::Value;

use crate::conversation::{Conversation, Extras, Message, Role};

use mapping::{Mapping, MappingSpec};
pub use messages::Content;
use template::JsonPath;

/// The reply given to questions a dataset marks as unanswerable (SQuAD v2, MS MARCO).
pub const UNANSWERABLE: &str = "The context does not contain the answer to this question.";

/// A conversation with what is kept beside it (never hashed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub conversation: Conversation,
    pub extras: Extras,
}

impl Example {
    pub fn new(conversation: Conversation) -> Example {
        Example {
            conversation,
            extras: Extras::default(),
        }
    }
}

/// What one record became: its examples (each valid or not), or why it is none.
pub type Outcome = Result<Vec<Result<Example, RejectReason>>, RejectReason>;

#[derive(Debug)]
enum Kind {
    Alpaca,
    Messages,
    Sharegpt,
    Oasst { best: bool },
    OasstRows { best: bool },
    Glaive,
    MultipleChoice,
    Prm800k,
    Hotpotqa,
    Msmarco,
    Mapping(Box<Mapping>),
}

#[derive(Debug)]
struct FormatDef {
    name: String,
    description: String,
    fields: String,
    /// Alternative sets of fields; a record matching all of one set is a candidate.
    detect: Vec<Vec<JsonPath>>,
    /// Considered by auto-detection (variants of another format's shape are not).
    detectable: bool,
    group_by: Option<JsonPath>,
    kind: Kind,
}

/// A record shape: cheap to clone, shared between the pipeline's threads.
#[derive(Clone, Debug)]
pub struct Format(Arc<FormatDef>);

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.name)
    }
}

impl PartialEq for Format {
    fn eq(&self, other: &Format) -> bool {
        self.0.name == other.0.name
    }
}

impl Format {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn description(&self) -> &str {
        &self.0.description
    }

    /// The fields a record of this shape has (`?` marks optional ones).
    pub fn fields(&self) -> &str {
        &self.0.fields
    }

    /// For row formats: the key whose consecutive equal values make one record.
    pub fn group_by(&self) -> Option<&JsonPath> {
        self.0.group_by.as_ref()
    }

    /// Turns one record's bytes into its examples, normalised and validated.
    pub fn parse(&self, bytes: &[u8]) -> Outcome {
        self.parse_text(utf8(bytes)?)
    }

    fn parse_text(&self, text: &str) -> Outcome {
        let opening = if self.0.group_by.is_some() {
            b'['
        } else {
            b'{'
        };
        check_opening(text, opening)?;
        let name = |e: RejectReason| {
            if e.kind == RejectKind::MissingField && e.message.starts_with("lacks required field") {
                e.prefixed(&format!("{} record ", self.0.name))
            } else {
                e
            }
        };
        let examples = match &self.0.kind {
            Kind::Alpaca | Kind::Messages | Kind::Sharegpt => {
                let record: RawRecord<'_> = serde_json::from_str(text).map_err(malformed_json)?;
                let conversation = match self.0.kind {
                    Kind::Alpaca => alpaca::convert(record)?,
                    Kind::Messages => messages::convert(record)?,
                    _ => sharegpt::convert(record)?,
                };
                vec![Ok(Example::new(conversation))]
            }
            kind => {
                let value: Value = serde_json::from_str(text).map_err(malformed_json)?;
                match kind {
                    Kind::Oasst { best } => oasst::convert_nested(&value, *best).map_err(name)?,
                    Kind::OasstRows { best } => oasst::convert_rows(&value, *best).map_err(name)?,
                    Kind::Glaive => special::glaive(&value).map_err(name)?,
                    Kind::MultipleChoice => special::multiple_choice(&value).map_err(name)?,
                    Kind::Prm800k => special::prm800k(&value).map_err(name)?,
                    Kind::Hotpotqa => special::hotpotqa(&value).map_err(name)?,
                    Kind::Msmarco => special::msmarco(&value).map_err(name)?,
                    Kind::Mapping(mapping) => mapping.convert(&value).map_err(name)?,
                    Kind::Alpaca | Kind::Messages | Kind::Sharegpt => unreachable!(),
                }
            }
        };
        Ok(examples
            .into_iter()
            .map(|e| e.map_err(name).and_then(finish))
            .collect())
    }

    /// How specifically this format matches `record` (the depth of the matched fields),
    /// or `None` when it does not.
    fn score(&self, fields: &TopFields<'_>) -> Option<usize> {
        self.0
            .detect
            .iter()
            .filter(|set| set.iter().all(|path| path.present_in(fields)))
            .map(|set| set.iter().map(JsonPath::depth).sum())
            .max()
    }

    fn detect_fields(&self) -> String {
        self.0.detect[0]
            .iter()
            .map(JsonPath::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether `format` turns `bytes` into at least one example and no reject, and the
/// record (`bytes` parsed) has the kinds of values the format names (`values:`).
fn converts(format: &Format, bytes: &[u8], record: Option<&Value>) -> bool {
    let fit = match (&format.0.kind, record) {
        (Kind::Mapping(mapping), Some(record)) => mapping.values_fit(record),
        (Kind::Mapping(_), None) => false,
        _ => true,
    };
    fit && match format.parse(bytes) {
        Ok(examples) => !examples.is_empty() && examples.iter().all(Result::is_ok),
        Err(_) => false,
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, RejectReason> {
    if let Ok(text) = simdutf8::basic::from_utf8(bytes) {
        return Ok(text);
    }
    // Invalid: core's check says where.
    std::str::from_utf8(bytes).map_err(|e| {
        RejectReason::new(
            RejectKind::InvalidUtf8,
            format!("invalid UTF-8 at byte {} of the record", e.valid_up_to()),
        )
    })
}

fn check_opening(text: &str, opening: u8) -> Result<(), RejectReason> {
    let first = text.trim_start().as_bytes().first().copied();
    if first == Some(opening) {
        return Ok(());
    }
    Err(match first {
        None => "empty record".into(),
        Some(b'[') => "record is a JSON array, expected an object".into(),
        Some(b'{') => "record is a JSON object, expected a list of rows".into(),
        Some(_) => RejectReason::new(
            RejectKind::MalformedJson,
            format!(
                "malformed JSON: expected an object, found `{}`",
                excerpt(text, 40)
            ),
        ),
    })
}

/// serde_json's complaint about a record that is not valid JSON.
fn malformed_json(error: serde_json::Error) -> RejectReason {
    RejectReason::new(
        RejectKind::MalformedJson,
        format!("malformed JSON: {error}"),
    )
}

fn finish(mut example: Example) -> Result<Example, RejectReason> {
    example.conversation.normalize();
    if let Some(rejected) = &mut example.extras.rejected {
        for message in rejected.iter_mut() {
            crate::conversation::normalize_in_place(&mut message.content);
        }
    }
    example.conversation.validate().map_err(|e| e.to_string())?;
    Ok(example)
}

/// A record's top-level fields, values left unparsed.
pub(crate) type TopFields<'a> = [(Cow<'a, str>, &'a str)];

/// The formats a run knows: built-ins and loaded mappings.
#[derive(Clone, Debug)]
pub struct Formats {
    list: Vec<Format>,
}

/// How a file's records are to be read, decided from its first records.
#[derive(Clone, Debug)]
pub enum Detected {
    /// Every sampled record has this shape.
    One(Format),
    /// The sampled records have different shapes: each record is detected on its own.
    PerRecord,
}

impl Formats {
    /// The built-in formats.
    pub fn builtin() -> Formats {
        static BUILTIN: OnceLock<Vec<Format>> = OnceLock::new();
        let list = BUILTIN.get_or_init(|| {
            let code = |name: &str, description: &str, fields: &str, detect: &[&[&str]], kind: Kind| {
                Format(Arc::new(FormatDef {
                    name: name.to_string(),
                    description: description.to_string(),
                    fields: fields.to_string(),
                    detect: detect
                        .iter()
                        .map(|set| set.iter().map(|p| JsonPath::parse(p).expect("valid")).collect())
                        .collect(),
                    detectable: !name.ends_with("-best"),
                    group_by: matches!(kind, Kind::OasstRows { .. })
                        .then(|| JsonPath::parse("message_tree_id").expect("valid")),
                    kind,
                }))
            };
            let tree = "message_tree_id?, prompt: {message_id, role, text, rank?, deleted?, replies: [...]}";
            let rows = "rows grouped by message_tree_id: message_id, parent_id? (null at the root), role, text, rank?, deleted?";
            let mut list = vec![
                code("alpaca", "Alpaca instructions (also Code Alpaca, WizardLM, MathInstruct)",
                    "instruction, input?, output, system?", &[&["instruction", "output"]], Kind::Alpaca),
                code("messages", "OpenAI chat messages, with tools / tool_calls (function calling)",
                    "messages: [{role, content, name?, tool_calls?}], tools?", &[&["messages"]], Kind::Messages),
                code("sharegpt", "ShareGPT conversations (also OpenHermes, SlimOrca, WizardLM v2)",
                    "conversations: [{from, value}], system?", &[&["conversations"]], Kind::Sharegpt),
                code("oasst", "OpenAssistant nested trees; one example per root-to-leaf path",
                    tree, &[&["message_tree_id", "prompt.text"]], Kind::Oasst { best: false }),
                code("oasst-best", "OpenAssistant nested trees; only the best-ranked path",
                    tree, &[&["message_tree_id", "prompt.text"]], Kind::Oasst { best: true }),
                code("oasst-rows", "OpenAssistant flat message rows; one example per root-to-leaf path",
                    rows, &[&["message_id", "message_tree_id", "role", "text"]], Kind::OasstRows { best: false }),
                code("oasst-rows-best", "OpenAssistant flat message rows; only the best-ranked path",
                    rows, &[&["message_id", "message_tree_id", "role", "text"]], Kind::OasstRows { best: true }),
                code("glaive", "Glaive function calling v2 (function schemas in `system`, markers in `chat`)",
                    "system (SYSTEM: ... {schema}), chat (USER: / ASSISTANT: <functioncall> / FUNCTION RESPONSE:)",
                    &[&["system", "chat"]], Kind::Glaive),
                code("multiple-choice", "Multiple choice (MMLU, ARC, ETHICS-like): lettered choices, letter answer",
                    "question, choices (or options): [..] or {text, label}, answer (index or letter) or answerKey",
                    &[&["question", "choices", "answer"], &["question", "options", "answer"], &["question", "choices.text", "answerKey"]], Kind::MultipleChoice),
                code("prm800k", "PRM800K step lists; the chosen completion of each step",
                    "question.problem, label.steps: [{completions: [{text}], chosen_completion, human_completion?}]",
                    &[&["question.problem", "label.steps"]], Kind::Prm800k),
                code("hotpotqa", "HotpotQA multi-hop QA: context paragraphs, question, answer",
                    "question, answer, context?: {title: [..], sentences: [[..]]}",
                    &[&["question", "answer", "context", "supporting_facts"]], Kind::Hotpotqa),
                code("msmarco", "MS MARCO: selected passages and query; \"No Answer Present.\" is unanswerable",
                    "query, answers: [..], wellFormedAnswers?, passages?: {passage_text: [..], is_selected: [..]}",
                    &[&["query", "answers", "passages"]], Kind::Msmarco),
            ];
            let specs: Vec<MappingSpec> = serde_yaml::from_str(include_str!("builtin.yaml"))
                .expect("builtin.yaml is valid");
            for spec in specs {
                list.push(Format::from_mapping(Mapping::compile(&spec).expect("builtin mapping compiles")));
            }
            list
        });
        Formats { list: list.clone() }
    }

    /// A format from command-line turns `ROLE=TEMPLATE` (`user={question}`,
    /// `assistant={answer}`; `system=` too), in order, with the template syntax of YAML
    /// mappings (`\n` is a line break). Its identifying fields are the templates'
    /// required fields; its name spells the turns, so an import records what it used.
    pub fn quick_mapping(&self, turns: &[String]) -> Result<Format, crate::invalid::Invalid> {
        let mut specs = Vec::new();
        let mut detect: Vec<String> = Vec::new();
        for turn in turns {
            let (role, template) = turn.split_once('=').ok_or_else(|| {
                format!("--map {turn}: expected ROLE=TEMPLATE (user={{question}})")
            })?;
            let role = role.trim();
            if crate::conversation::Role::from_alias(role).is_none() {
                return Err(format!(
                    "--map {turn}: unknown role `{role}` (system, user, assistant, tool)"
                )
                .into());
            }
            // A bare field name is its own template: `user=question`.
            let template = if template.contains('{') {
                template.replace("\\n", "\n")
            } else {
                format!("{{{}}}", template.trim())
            };
            for field in template::required_fields(&template)? {
                if !detect.contains(&field) {
                    detect.push(field);
                }
            }
            specs.push(serde_json::json!({"role": role, "content": template}));
        }
        if detect.is_empty() {
            return Err("--map: the turns name no required field ({field})".into());
        }
        let name = format!(
            "map: {}",
            turns
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        );
        let spec: MappingSpec = serde_json::from_value(serde_json::json!({
            "name": name,
            "description": "turns given with --map",
            "detect": detect,
            "turns": specs,
        }))
        .map_err(|e| format!("--map: {e}"))?;
        Ok(Format::from_mapping(Mapping::compile(&spec)?))
    }

    /// Loads a mapping file and adds its format; its name must be new.
    pub fn load_mapping(&mut self, path: &Path) -> Result<Format, crate::invalid::Invalid> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let spec: MappingSpec =
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mapping = Mapping::compile(&spec).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(existing) = self.list.iter().find(|f| f.name() == mapping.name) {
            if let Kind::Mapping(_) = existing.0.kind {
                // The same file loaded twice (two registry entries) is fine.
                if existing.fields() == mapping.fields() {
                    return Ok(existing.clone());
                }
            }
            return Err(format!(
                "{}: format `{}` already exists; give the mapping another name",
                path.display(),
                mapping.name
            )
            .into());
        }
        let format = Format::from_mapping(mapping);
        self.list.push(format.clone());
        Ok(format)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Format> {
        self.list.iter()
    }

    /// The format called `name`, or an error listing the known names.
    pub fn get(&self, name: &str) -> Result<Format, crate::invalid::Invalid> {
        self.list
            .iter()
            .find(|f| f.name() == name)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "unknown format `{name}`; known formats: auto, {} (details: `corpusdb formats`)",
                    self.list.iter().map(Format::name).collect::<Vec<_>>().join(", ")
                )
            }).map_err(crate::invalid::Invalid::from)
    }

    /// The format of one record, chosen by the most specific match.
    pub fn detect(&self, bytes: &[u8]) -> Result<Format, RejectReason> {
        self.detect_text(utf8(bytes)?)
    }

    fn detect_text(&self, text: &str) -> Result<Format, RejectReason> {
        let bytes = text.as_bytes();
        check_opening(text, b'{')?;
        let fields = match sniff::top_fields(text) {
            Some(fields) => fields,
            // Not a well-formed object: let the parser say what is wrong.
            None => {
                serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(malformed_json)?;
                return Err(RejectReason::new(
                    RejectKind::MalformedJson,
                    "malformed JSON: not an object",
                ));
            }
        };
        let mut candidates: Vec<(usize, &Format)> = self
            .list
            .iter()
            .filter(|f| f.0.detectable)
            .filter_map(|f| f.score(&fields).map(|s| (s, f)))
            .collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        match candidates.as_slice() {
            [] => {
                let mut names: Vec<&str> = fields.iter().map(|(k, _)| k.as_ref()).collect();
                names.sort_unstable();
                let fields = names.join(", ");
                Err(format!(
                    "unknown record shape: fields ({fields}) match no format; see `corpusdb formats`, or write a mapping"
                )
                .into())
            }
            [(best, _), (second, _), ..] if best == second => {
                let tied: Vec<&Format> = candidates
                    .iter()
                    .take_while(|(s, _)| s == best)
                    .map(|(_, f)| *f)
                    .collect();
                // The values decide between formats of the same fields: the one format
                // that converts this record and whose `values:` it fits (gsm8k's
                // `answer` is a string, natural-questions' a list) wins.
                let record = serde_json::from_slice::<Value>(bytes).ok();
                let converting: Vec<&Format> = tied
                    .iter()
                    .copied()
                    .filter(|f| converts(f, bytes, record.as_ref()))
                    .collect();
                if let [only] = converting.as_slice() {
                    return Ok((*only).clone());
                }
                let names: Vec<String> = tied
                    .iter()
                    .map(|f| format!("{} ({})", f.name(), f.detect_fields()))
                    .collect();
                Err(format!(
                    "ambiguous record shape: it matches {}; pass --format",
                    names.join(", ")
                )
                .into())
            }
            [(_, best), ..] => Ok((*best).clone()),
        }
    }

    /// Decides a file's format from its first records.
    pub fn detect_sample<'a>(
        &self,
        records: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Detected, crate::invalid::Invalid> {
        let mut seen: Vec<Format> = Vec::new();
        let mut first_error = None;
        for bytes in records {
            match self.detect(bytes) {
                Ok(format) => {
                    if !seen.contains(&format) {
                        seen.push(format);
                    }
                }
                // Bad records are reported when they are imported; an ambiguous shape
                // must be settled by the user.
                Err(e) if e.message.starts_with("ambiguous") => return Err(e.message.into()),
                Err(e) => {
                    first_error.get_or_insert(e.message);
                }
            }
        }
        match seen.as_slice() {
            [one] => Ok(Detected::One(one.clone())),
            [] => Err(first_error
                .unwrap_or_else(|| "the file has no records".to_string())
                .into()),
            many => match many.iter().find(|f| f.group_by().is_some()) {
                Some(rows) => Err(format!(
                    "the first records mix {} rows with other shapes ({}); pass --format",
                    rows.name(),
                    many.iter().map(Format::name).collect::<Vec<_>>().join(", ")
                )
                .into()),
                None => Ok(Detected::PerRecord),
            },
        }
    }

    /// The format of which the record has the largest share of detection fields (at
    /// least one), when only one format does: a record that matches no format is then
    /// reported as that format's record with what it lacks.
    fn closest(&self, bytes: &[u8]) -> Option<Format> {
        let value: Value = serde_json::from_slice(bytes).ok()?;
        // (present, needed) compared as fractions.
        let mut best: Option<(usize, usize, &Format)> = None;
        let mut tied = false;
        for format in self.list.iter().filter(|f| f.0.detectable) {
            for set in &format.0.detect {
                let present = set.iter().filter(|p| p.resolve(&value).is_some()).count();
                if present == 0 {
                    continue;
                }
                match best {
                    Some((p, n, f)) if p * set.len() > present * n || f == format => {}
                    Some((p, n, _)) if p * set.len() == present * n => tied = true,
                    _ => {
                        best = Some((present, set.len(), format));
                        tied = false;
                    }
                }
            }
        }
        best.filter(|_| !tied).map(|(_, _, f)| f.clone())
    }

    /// Detects the record's format, then parses it (files of mixed shapes).
    pub fn parse_detected(&self, bytes: &[u8]) -> Outcome {
        // Validated once for both steps (UTF-8 validation was 2-3% of an import).
        let text = utf8(bytes)?;
        let format = match self.detect_text(text) {
            Ok(format) => format,
            Err(e) if e.message.starts_with("unknown record shape") => match self.closest(bytes) {
                Some(closest) => closest,
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        if format.group_by().is_some() {
            return Err(format!(
                "a {} row in a file of mixed shapes; rows are imported with --format {}",
                format.name(),
                format.name()
            )
            .into());
        }
        format.parse_text(text)
    }
}

impl Format {
    fn from_mapping(mapping: Mapping) -> Format {
        Format(Arc::new(FormatDef {
            name: mapping.name.clone(),
            description: mapping.description.clone(),
            fields: mapping.fields(),
            detect: vec![mapping.detect.clone()],
            detectable: true,
            group_by: mapping.group.as_ref().map(|(by, _)| by.clone()),
            kind: Kind::Mapping(Box::new(mapping)),
        }))
    }
}

/// Parses a record that must give exactly one conversation, in the built-in format `name`
/// (`auto` detects it): a convenience for tests and single records.
pub fn parse_record(name: &str, bytes: &[u8]) -> Result<Conversation, RejectReason> {
    let formats = Formats::builtin();
    let outcome = match name {
        "auto" => formats.parse_detected(bytes)?,
        name => formats.get(name)?.parse(bytes)?,
    };
    let mut examples = outcome.into_iter();
    match (examples.next(), examples.next()) {
        (Some(example), None) => example.map(|e| e.conversation),
        _ => Err("the record does not give exactly one conversation".into()),
    }
}

/// Every field read by any format, borrowed from the input where JSON escapes allow.
#[derive(Deserialize, Default)]
pub(crate) struct RawRecord<'a> {
    #[serde(borrow, default)]
    instruction: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    input: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    output: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    system: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    messages: Option<Vec<messages::RawMessage<'a>>>,
    #[serde(default)]
    tools: Option<serde_json::Value>,
    #[serde(default)]
    functions: Option<serde_json::Value>,
    #[serde(borrow, default)]
    conversations: Option<Vec<sharegpt::RawTurn<'a>>>,
}

/// The optional top-level `system` field some datasets carry, as a leading system message.
fn system_message(system: Option<Cow<'_, str>>) -> Option<Message> {
    system
        .filter(|s| !s.trim().is_empty())
        .map(|s| Message::new(Role::System, s.into_owned()))
}

/// A missing required field, named with the format that needs it.
fn missing(format: &str, field: &str) -> RejectReason {
    RejectReason::missing_field(
        field,
        format!("{format} record lacks required field `{field}`"),
    )
}

/// The first `max` characters of `text`, on one line, for error messages.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_detects_each_shape() {
        let alpaca = br#"{"instruction":"Add","input":"2+2","output":"4"}"#;
        let conv = parse_record("auto", alpaca).unwrap();
        assert_eq!(conv.messages[0].content, "Add\n\n2+2");
        assert_eq!(conv.messages[1].role, Role::Assistant);

        let msgs = br#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#;
        assert_eq!(parse_record("auto", msgs).unwrap().messages.len(), 2);

        let share =
            br#"{"conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":"hello"}]}"#;
        assert_eq!(
            parse_record("auto", share).unwrap(),
            parse_record("auto", msgs).unwrap()
        );
    }

    /// A mapped format keeps a code reply's own indentation; whitespace beside the
    /// separators between its parts goes.
    #[test]
    fn mapped_formats_keep_the_content_s_own_ends() {
        let record = br#"{"prompt": "Complete:  ", "completion": "    return x\n"}"#;
        let conversation = parse_record("prompt-completion", record).unwrap();
        assert_eq!(conversation.messages[1].content, "    return x\n");
        assert_eq!(conversation.messages[0].content, "Complete:  ");
    }

    #[test]
    fn reasons_are_specific_and_typed() {
        let err = parse_record("alpaca", br#"{"instruction":"x"}"#).unwrap_err();
        assert_eq!(err.message, "alpaca record lacks required field `output`");
        assert_eq!(
            (err.kind, err.subject.as_str()),
            (RejectKind::MissingField, "output")
        );
        assert_eq!(err.group(), "missing field `output`");
        let err = parse_record("auto", br#"{"foo":1}"#).unwrap_err();
        assert!(err.message.starts_with("unknown record shape"), "{err}");
        assert_eq!(err.kind, RejectKind::InvalidRecord);
        let err = parse_record("auto", b"{\"messages\": [").unwrap_err();
        assert!(
            err.message.starts_with("malformed JSON: EOF while parsing"),
            "{err}"
        );
        assert_eq!(err.kind, RejectKind::MalformedJson);
        let err = parse_record("auto", b"{\"a\": \"\xff\"}").unwrap_err();
        assert_eq!(err.message, "invalid UTF-8 at byte 7 of the record");
        assert_eq!(err.kind, RejectKind::InvalidUtf8);
        let err = parse_record("sharegpt", br#"{"conversations":[{"from":"human"}]}"#).unwrap_err();
        assert_eq!(
            (err.kind, err.subject.as_str()),
            (RejectKind::MissingField, "value")
        );
    }
}
