//! Field mappings: a record shape described in YAML instead of code.
//!
//! ```yaml
//! name: dolly
//! description: Databricks Dolly (instruction, context, response)
//! detect: [instruction, context, response]    # fields whose presence identifies the shape
//! system: "{system_prompt?}"                  # optional leading system message
//! turns:                                      # fixed messages, each a role and a template
//!   - role: user
//!     content: ["{instruction}", "{context?}"]   # parts joined by a blank line, empty parts dropped
//!   - role: assistant
//!     content: "{response}"
//! ```
//!
//! Instead of `turns`, the messages can come from a list of objects (`messages: {path,
//! role, content, roles}`), a list of strings that alternate speakers (`alternating:
//! {path, first}`), or one string split at speaker markers (`transcript: {path, markers}`).
//! `rejected:` takes the same four forms for the dispreferred side of preference data,
//! `each: {path, as, limit}` makes one example per list item, `group: {by, order}` joins
//! consecutive rows sharing a key into one conversation (the `turns` then apply per row,
//! and role `alternate` switches speaker per message), `require` keeps only records whose
//! fields have the given values, `replace` rewrites text (e.g. `_comma_` to `,`), and
//! `raw_text: true` marks plain text that is not a dialogue.

use crate::reject::RejectReason;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::conversation::{canonical_json, Conversation, Message, Role};

use super::template::{JsonPath, Scope, Template};
use super::Example;

/// A mapping as written in YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub detect: Vec<String>,
    #[serde(default)]
    pub system: Option<ContentSpec>,
    #[serde(default)]
    pub turns: Option<Vec<TurnSpec>>,
    #[serde(default)]
    pub messages: Option<MessagesSpec>,
    #[serde(default)]
    pub alternating: Option<AlternatingSpec>,
    #[serde(default)]
    pub transcript: Option<TranscriptSpec>,
    #[serde(default)]
    pub tools: Option<String>,
    #[serde(default)]
    pub rejected: Option<BodySpec>,
    #[serde(default)]
    pub each: Option<EachSpec>,
    #[serde(default)]
    pub group: Option<GroupSpec>,
    #[serde(default)]
    pub require: BTreeMap<String, Value>,
    #[serde(default)]
    pub replace: BTreeMap<String, String>,
    #[serde(default)]
    pub raw_text: bool,
    /// The kind of value a field holds in records of this shape (`answer: string`):
    /// what tells apart formats whose fields are the same when detecting.
    #[serde(default)]
    pub values: BTreeMap<String, ValueKind>,
}

/// The kind of a JSON value, as `values:` of a mapping names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueKind {
    String,
    Number,
    Bool,
    List,
    Object,
}

impl ValueKind {
    fn fits(self, value: &Value) -> bool {
        matches!(
            (self, value),
            (ValueKind::String, Value::String(_))
                | (ValueKind::Number, Value::Number(_))
                | (ValueKind::Bool, Value::Bool(_))
                | (ValueKind::List, Value::Array(_))
                | (ValueKind::Object, Value::Object(_))
        )
    }
}

/// Where the messages of the rejected side come from: exactly one of the four fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodySpec {
    #[serde(default)]
    pub turns: Option<Vec<TurnSpec>>,
    #[serde(default)]
    pub messages: Option<MessagesSpec>,
    #[serde(default)]
    pub alternating: Option<AlternatingSpec>,
    #[serde(default)]
    pub transcript: Option<TranscriptSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnSpec {
    /// `system`, `user`, `assistant`, `tool` (or any alias), or `alternate`.
    pub role: String,
    pub content: ContentSpec,
}

/// A template, a list of template parts, or parts with a separator and a fallback text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ContentSpec {
    One(String),
    Parts(Vec<String>),
    Full {
        parts: Vec<String>,
        #[serde(default = "blank_line")]
        sep: String,
        /// Text used when every part renders empty (e.g. an unanswerable question).
        #[serde(default)]
        otherwise: Option<String>,
    },
}

fn blank_line() -> String {
    "\n\n".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagesSpec {
    pub path: String,
    #[serde(default = "role_field")]
    pub role: String,
    #[serde(default = "content_field")]
    pub content: String,
    /// Extra role names of this dataset: `{prompter: user, bot: assistant}`.
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
}

fn role_field() -> String {
    "role".to_string()
}

fn content_field() -> String {
    "content".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlternatingSpec {
    pub path: String,
    #[serde(default = "user_role")]
    pub first: String,
}

fn user_role() -> String {
    "user".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscriptSpec {
    pub path: String,
    /// Marker text to role: `{"\n\nHuman:": user, "\n\nAssistant:": assistant}`.
    pub markers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EachSpec {
    pub path: String,
    #[serde(rename = "as")]
    pub name: String,
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub by: String,
    #[serde(default)]
    pub order: Option<String>,
}

/// A compiled mapping.
#[derive(Debug)]
pub struct Mapping {
    pub name: String,
    pub description: String,
    pub detect: Vec<JsonPath>,
    system: Option<Content>,
    body: Body,
    tools: Option<JsonPath>,
    rejected: Option<Body>,
    each: Option<(JsonPath, String, Option<usize>)>,
    pub group: Option<(JsonPath, Option<JsonPath>)>,
    require: Vec<(JsonPath, Value)>,
    replace: Vec<(String, String)>,
    raw_text: bool,
    values: Vec<(JsonPath, ValueKind)>,
}

#[derive(Debug)]
struct Content {
    parts: Vec<Template>,
    sep: String,
    otherwise: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TurnRole {
    Fixed(Role),
    Alternate,
}

#[derive(Debug)]
enum Body {
    Turns(Vec<(TurnRole, Content)>),
    Messages {
        path: JsonPath,
        role: JsonPath,
        content: JsonPath,
        roles: BTreeMap<String, Role>,
    },
    Alternating {
        path: JsonPath,
        first: Role,
    },
    Transcript {
        path: JsonPath,
        markers: Vec<(String, Role)>,
    },
}

fn role(name: &str) -> Result<Role, String> {
    Role::from_alias(name).ok_or_else(|| format!("unknown role `{name}`"))
}

impl Content {
    fn compile(spec: &ContentSpec) -> Result<Content, String> {
        let (parts, sep, otherwise) = match spec {
            ContentSpec::One(one) => (std::slice::from_ref(one), "\n\n", None),
            ContentSpec::Parts(parts) => (parts.as_slice(), "\n\n", None),
            ContentSpec::Full {
                parts,
                sep,
                otherwise,
            } => (parts.as_slice(), sep.as_str(), otherwise.clone()),
        };
        Ok(Content {
            parts: parts
                .iter()
                .map(|p| Template::parse(p))
                .collect::<Result<_, _>>()?,
            sep: sep.to_string(),
            otherwise,
        })
    }

    fn render(&self, scope: &Scope<'_>) -> Result<String, RejectReason> {
        let mut texts = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            let text = part.render(scope)?;
            if !text.trim().is_empty() {
                texts.push(text);
            }
        }
        // Whitespace beside a separator goes; the content's own ends stay (a code reply's
        // first indentation), as the stored text keeps them.
        let mut out = String::new();
        let last = texts.len().saturating_sub(1);
        for (i, text) in texts.iter().enumerate() {
            let mut text = text.as_str();
            if i > 0 {
                out.push_str(&self.sep);
                text = text.trim_start();
            }
            if i < last {
                text = text.trim_end();
            }
            out.push_str(text);
        }
        if out.is_empty() {
            if let Some(otherwise) = &self.otherwise {
                out.push_str(otherwise);
            }
        }
        Ok(out)
    }

    fn fields(&self, out: &mut Vec<String>) {
        for part in &self.parts {
            for (field, optional) in part.fields() {
                out.push(if optional || self.otherwise.is_some() {
                    format!("{field}?")
                } else {
                    field.to_string()
                });
            }
        }
    }
}

impl Body {
    fn compile(spec: &BodySpec) -> Result<Body, String> {
        Body::compile_parts(
            spec.turns.as_deref(),
            spec.messages.as_ref(),
            spec.alternating.as_ref(),
            spec.transcript.as_ref(),
        )
    }

    fn compile_parts(
        turns: Option<&[TurnSpec]>,
        messages: Option<&MessagesSpec>,
        alternating: Option<&AlternatingSpec>,
        transcript: Option<&TranscriptSpec>,
    ) -> Result<Body, String> {
        let given = [
            turns.is_some(),
            messages.is_some(),
            alternating.is_some(),
            transcript.is_some(),
        ];
        if given.iter().filter(|&&g| g).count() != 1 {
            return Err(
                "give exactly one of `turns`, `messages`, `alternating`, `transcript`".into(),
            );
        }
        if let Some(turns) = turns {
            let turns = turns
                .iter()
                .map(|turn| {
                    let role = match turn.role.as_str() {
                        "alternate" => TurnRole::Alternate,
                        name => TurnRole::Fixed(role(name)?),
                    };
                    Ok((role, Content::compile(&turn.content)?))
                })
                .collect::<Result<Vec<_>, String>>()?;
            return Ok(Body::Turns(turns));
        }
        if let Some(m) = messages {
            return Ok(Body::Messages {
                path: JsonPath::parse(&m.path)?,
                role: JsonPath::parse(&m.role)?,
                content: JsonPath::parse(&m.content)?,
                roles: m
                    .roles
                    .iter()
                    .map(|(k, v)| Ok((k.to_ascii_lowercase(), role(v)?)))
                    .collect::<Result<_, String>>()?,
            });
        }
        if let Some(a) = alternating {
            return Ok(Body::Alternating {
                path: JsonPath::parse(&a.path)?,
                first: role(&a.first)?,
            });
        }
        let t = transcript.expect("one body form is given");
        if t.markers.is_empty() {
            return Err("`transcript` needs at least one marker".into());
        }
        if t.markers.keys().any(|m| m.trim().is_empty()) {
            return Err("`transcript` markers must not be empty or blank".into());
        }
        Ok(Body::Transcript {
            path: JsonPath::parse(&t.path)?,
            markers: t
                .markers
                .iter()
                .map(|(k, v)| Ok((k.clone(), role(v)?)))
                .collect::<Result<_, String>>()?,
        })
    }

    fn fields(&self, out: &mut Vec<String>) {
        match self {
            Body::Turns(turns) => turns.iter().for_each(|(_, c)| c.fields(out)),
            Body::Messages {
                path,
                role,
                content,
                ..
            } => out.push(format!(
                "{}: [{{{}, {}}}]",
                path.as_str(),
                role.as_str(),
                content.as_str()
            )),
            Body::Alternating { path, .. } => out.push(format!("{}: [text, ...]", path.as_str())),
            Body::Transcript { path, markers } => out.push(format!(
                "{} (split at {})",
                path.as_str(),
                markers
                    .iter()
                    .map(|(m, _)| format!("{:?}", m.trim()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Appends the messages of one record (or one row of a group).
    fn render(&self, scope: &Scope<'_>, out: &mut Vec<Message>) -> Result<(), RejectReason> {
        match self {
            Body::Turns(turns) => {
                for (turn_role, content) in turns {
                    let role = match turn_role {
                        TurnRole::Fixed(role) => *role,
                        TurnRole::Alternate => {
                            let spoken = out.iter().filter(|m| m.role != Role::System).count();
                            if spoken % 2 == 0 {
                                Role::User
                            } else {
                                Role::Assistant
                            }
                        }
                    };
                    out.push(Message::new(role, content.render(scope)?));
                }
            }
            Body::Messages {
                path,
                role: role_path,
                content,
                roles,
            } => {
                let list = list_at(scope, path)?;
                for (i, item) in list.iter().enumerate() {
                    let name =
                        role_path
                            .resolve(item)
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                RejectReason::missing_field(
                                    role_path.as_str(),
                                    format!(
                                        "{}[{i}] lacks required field `{}`",
                                        path.as_str(),
                                        role_path.as_str()
                                    ),
                                )
                            })?;
                    let role = roles
                        .get(&name.to_ascii_lowercase())
                        .copied()
                        .or_else(|| Role::from_alias(name))
                        .ok_or_else(|| {
                            format!("unknown role `{name}` in {}[{i}]", path.as_str())
                        })?;
                    let mut text = String::new();
                    super::template::scalar(
                        content.resolve(item).ok_or_else(|| {
                            RejectReason::missing_field(
                                content.as_str(),
                                format!(
                                    "{}[{i}] lacks required field `{}`",
                                    path.as_str(),
                                    content.as_str()
                                ),
                            )
                        })?,
                        &mut text,
                    );
                    out.push(Message::new(role, text));
                }
            }
            Body::Alternating { path, first } => {
                let list = list_at(scope, path)?;
                let second = if *first == Role::User {
                    Role::Assistant
                } else {
                    Role::User
                };
                for (i, item) in list.iter().enumerate() {
                    let text = item
                        .as_str()
                        .ok_or_else(|| format!("{}[{i}] is not a string", path.as_str()))?;
                    let role = if i % 2 == 0 { *first } else { second };
                    out.push(Message::new(role, text));
                }
            }
            Body::Transcript { path, markers } => {
                let text = scope.resolve(path).ok_or_else(|| {
                    RejectReason::missing_field(
                        path.as_str(),
                        format!("lacks required field `{}`", path.as_str()),
                    )
                })?;
                let text = text
                    .as_str()
                    .ok_or_else(|| format!("field `{}` is not a string", path.as_str()))?;
                split_transcript(text, markers, out)
                    .map_err(|e| format!("field `{}`: {e}", path.as_str()))?;
            }
        }
        Ok(())
    }
}

fn list_at<'v>(scope: &Scope<'v>, path: &JsonPath) -> Result<&'v Vec<Value>, RejectReason> {
    scope
        .resolve(path)
        .ok_or_else(|| {
            RejectReason::missing_field(
                path.as_str(),
                format!("lacks required field `{}`", path.as_str()),
            )
        })?
        .as_array()
        .ok_or_else(|| format!("field `{}` is not a list", path.as_str()).into())
}

/// Splits `text` at speaker markers (`"\n\nHuman:"`, ...). A marker also matches at the very
/// start of the text without its leading whitespace. Text before the first marker is an
/// error unless it is blank.
pub(crate) fn split_transcript(
    text: &str,
    markers: &[(String, Role)],
    out: &mut Vec<Message>,
) -> Result<(), String> {
    let mut current: Option<Role> = None;
    let mut rest = text;
    let mut first = true;
    loop {
        // The earliest marker from here; at the start, markers match without leading space.
        let mut found: Option<(usize, usize, Role)> = None;
        for (marker, role) in markers {
            let candidates = [
                rest.find(marker.as_str()).map(|i| (i, marker.len())),
                (first && rest.trim_start().starts_with(marker.trim_start())).then(|| {
                    let skipped = rest.len() - rest.trim_start().len();
                    (0, skipped + marker.trim_start().len())
                }),
            ];
            for (at, len) in candidates.into_iter().flatten() {
                if found
                    .is_none_or(|(best, best_len, _)| at < best || (at == best && len > best_len))
                {
                    found = Some((at, len, *role));
                }
            }
        }
        first = false;
        let Some((at, len, role)) = found else {
            break;
        };
        let before = &rest[..at];
        match current {
            // The space around markers belongs to the transcript, not to the turn.
            Some(speaker) => out.push(Message::new(speaker, before.trim())),
            None if before.trim().is_empty() => {}
            None => {
                return Err(format!(
                    "text before the first speaker marker: `{}`",
                    super::excerpt(before.trim(), 40)
                ))
            }
        }
        current = Some(role);
        rest = &rest[at + len..];
    }
    match current {
        Some(speaker) => out.push(Message::new(speaker, rest.trim())),
        None => {
            return Err(format!(
                "no speaker marker ({}) found",
                markers
                    .iter()
                    .map(|(m, _)| format!("{:?}", m.trim()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
    Ok(())
}

impl Mapping {
    pub fn compile(spec: &MappingSpec) -> Result<Mapping, crate::invalid::Invalid> {
        let in_mapping =
            |e: String| crate::invalid::Invalid(format!("format `{}`: {e}", spec.name));
        let paths = |list: &[String]| -> Result<Vec<JsonPath>, String> {
            list.iter()
                .map(|p| JsonPath::parse(p).map_err(String::from))
                .collect()
        };
        if spec.detect.is_empty() {
            return Err(in_mapping("`detect` must name at least one field".into()));
        }
        let body = Body::compile_parts(
            spec.turns.as_deref(),
            spec.messages.as_ref(),
            spec.alternating.as_ref(),
            spec.transcript.as_ref(),
        )
        .map_err(in_mapping)?;
        if spec.group.is_some() && !matches!(body, Body::Turns(_)) {
            return Err(in_mapping("`group` works with `turns` only".into()));
        }
        if spec.group.is_some()
            && (spec.each.is_some()
                || spec.rejected.is_some()
                || spec.tools.is_some()
                || !spec.require.is_empty())
        {
            return Err(in_mapping(
                "`group` cannot be combined with `each`, `rejected`, `tools` or `require`".into(),
            ));
        }
        if spec.each.as_ref().is_some_and(|e| e.limit == Some(0)) {
            return Err(in_mapping("`each.limit` must be at least 1".into()));
        }
        Ok(Mapping {
            name: spec.name.clone(),
            description: spec.description.clone(),
            detect: paths(&spec.detect).map_err(in_mapping)?,
            system: spec
                .system
                .as_ref()
                .map(Content::compile)
                .transpose()
                .map_err(in_mapping)?,
            body,
            tools: spec
                .tools
                .as_deref()
                .map(JsonPath::parse)
                .transpose()
                .map_err(|e| in_mapping(e.0))?,
            rejected: spec
                .rejected
                .as_ref()
                .map(Body::compile)
                .transpose()
                .map_err(in_mapping)?,
            each: spec
                .each
                .as_ref()
                .map(|e| Ok::<_, String>((JsonPath::parse(&e.path)?, e.name.clone(), e.limit)))
                .transpose()
                .map_err(in_mapping)?,
            group: spec
                .group
                .as_ref()
                .map(|g| {
                    Ok::<_, String>((
                        JsonPath::parse(&g.by)?,
                        g.order.as_deref().map(JsonPath::parse).transpose()?,
                    ))
                })
                .transpose()
                .map_err(in_mapping)?,
            require: spec
                .require
                .iter()
                .map(|(k, v)| Ok((JsonPath::parse(k)?, v.clone())))
                .collect::<Result<_, String>>()
                .map_err(in_mapping)?,
            replace: spec
                .replace
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            raw_text: spec.raw_text,
            values: spec
                .values
                .iter()
                .map(|(k, v)| Ok((JsonPath::parse(k)?, *v)))
                .collect::<Result<_, String>>()
                .map_err(in_mapping)?,
        })
    }

    /// Whether every field named in `values:` that `record` has holds that kind of value.
    pub fn values_fit(&self, record: &Value) -> bool {
        self.values
            .iter()
            .all(|(path, kind)| path.resolve(record).is_none_or(|v| kind.fits(v)))
    }

    /// The fields a record of this shape has, for `corpusdb formats`.
    pub fn fields(&self) -> String {
        let mut fields = Vec::new();
        if let Some((by, order)) = &self.group {
            fields.push(format!("rows grouped by {}", by.as_str()));
            if let Some(order) = order {
                fields.push(format!("ordered by {}", order.as_str()));
            }
        }
        if let Some(system) = &self.system {
            system.fields(&mut fields);
        }
        if let Some((path, _, _)) = &self.each {
            fields.push(format!("{}: [...] (one example each)", path.as_str()));
        }
        self.body.fields(&mut fields);
        if let Some(tools) = &self.tools {
            fields.push(format!("{}?", tools.as_str()));
        }
        if let Some(rejected) = &self.rejected {
            let mut r = Vec::new();
            rejected.fields(&mut r);
            fields.push(format!("{} (rejected side)", r.join(", ")));
        }
        for (path, value) in &self.require {
            fields.push(format!("{} = {value}", path.as_str()));
        }
        let mut seen = std::collections::HashSet::new();
        fields.retain(|f| seen.insert(f.clone()));
        fields.join(", ")
    }

    /// Maps one record (for grouped formats: a JSON array of rows) to its examples.
    pub fn convert(
        &self,
        record: &Value,
    ) -> Result<Vec<Result<Example, RejectReason>>, RejectReason> {
        if self.group.is_some() {
            return Ok(vec![self.convert_rows(record)]);
        }
        // The fields that identify the shape are required, even where a template would
        // tolerate their absence (an unanswerable SQuAD question still has `answers`).
        self.check_detected(record)?;
        for (path, expected) in &self.require {
            let found = path.resolve(record).unwrap_or(&Value::Null);
            if !json_equal(found, expected) {
                return Err(format!(
                    "field `{}` is {}, format {} keeps only records where it is {}",
                    path.as_str(),
                    canonical_json(found),
                    self.name,
                    canonical_json(expected)
                )
                .into());
            }
        }
        let Some((path, name, limit)) = &self.each else {
            return Ok(vec![self.example(&Scope::of(record))]);
        };
        let scope = Scope::of(record);
        let value = scope.resolve(path).ok_or_else(|| {
            RejectReason::missing_field(
                path.as_str(),
                format!("lacks required field `{}`", path.as_str()),
            )
        })?;
        // Some datasets (APPS) store the list as a JSON-encoded string.
        let decoded;
        let items = match value {
            Value::Array(items) => items,
            Value::String(text) => {
                decoded = serde_json::from_str::<Value>(text).ok();
                match &decoded {
                    Some(Value::Array(items)) => items,
                    _ if text.trim().is_empty() => {
                        return Err(format!("field `{}` is empty", path.as_str()).into())
                    }
                    _ => return Err(format!("field `{}` is not a list", path.as_str()).into()),
                }
            }
            _ => return Err(format!("field `{}` is not a list", path.as_str()).into()),
        };
        if items.is_empty() {
            return Err(format!("field `{}` is an empty list", path.as_str()).into());
        }
        let take = limit.unwrap_or(usize::MAX);
        Ok(items
            .iter()
            .take(take)
            .map(|item| {
                self.example(&Scope {
                    record,
                    item: Some((name, item)),
                })
            })
            .collect())
    }

    fn check_detected(&self, record: &Value) -> Result<(), RejectReason> {
        match self
            .detect
            .iter()
            .find(|path| path.resolve(record).is_none())
        {
            Some(path) => Err(RejectReason::missing_field(
                path.as_str(),
                format!("lacks required field `{}`", path.as_str()),
            )),
            None => Ok(()),
        }
    }

    fn example(&self, scope: &Scope<'_>) -> Result<Example, RejectReason> {
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            let text = system.render(scope)?;
            if !text.is_empty() {
                messages.push(Message::new(Role::System, text));
            }
        }
        self.body.render(scope, &mut messages)?;
        let mut conversation = Conversation::new(messages);
        if let Some(tools) = &self.tools {
            // Tools given as JSON text are that JSON.
            let decoded = match scope.resolve(tools) {
                Some(Value::String(text)) => serde_json::from_str::<Value>(text).ok(),
                Some(other) => Some(other.clone()),
                None => None,
            };
            conversation.tools = decoded
                .filter(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
                .map(|v| canonical_json(&v));
        }
        let rejected = match &self.rejected {
            Some(body) => {
                let mut messages = Vec::new();
                body.render(scope, &mut messages)
                    .map_err(|e| format!("rejected side: {e}"))?;
                Some(messages)
            }
            None => None,
        };
        let mut example = Example::new(conversation);
        example.extras.rejected = rejected;
        example.extras.raw_text = self.raw_text;
        self.rewrite(&mut example);
        Ok(example)
    }

    fn convert_rows(&self, rows: &Value) -> Result<Example, RejectReason> {
        let (by, order) = self.group.as_ref().expect("grouped");
        let rows = rows
            .as_array()
            .ok_or("a grouped record must be a list of rows")?;
        let mut rows: Vec<&Value> = rows.iter().collect();
        if let Some(order) = order {
            for (i, row) in rows.iter().enumerate() {
                if order.resolve(row).is_none() {
                    return Err(RejectReason::missing_field(
                        order.as_str(),
                        format!("row {} lacks required field `{}`", i + 1, order.as_str()),
                    ));
                }
            }
            rows.sort_by(|a, b| compare(order.resolve(a), order.resolve(b)));
        }
        let mut messages = Vec::new();
        if let (Some(system), Some(first)) = (&self.system, rows.first()) {
            let text = system.render(&Scope::of(first))?;
            if !text.is_empty() {
                messages.push(Message::new(Role::System, text));
            }
        }
        for (i, row) in rows.iter().enumerate() {
            self.body
                .render(&Scope::of(row), &mut messages)
                .map_err(|e| {
                    let key = by.resolve(row).map(canonical_json).unwrap_or_default();
                    format!("{} {key}, row {}: {e}", by.as_str(), i + 1)
                })?;
        }
        let mut example = Example::new(Conversation::new(messages));
        example.extras.raw_text = self.raw_text;
        self.rewrite(&mut example);
        Ok(example)
    }

    fn rewrite(&self, example: &mut Example) {
        if self.replace.is_empty() {
            return;
        }
        let rejected = example.extras.rejected.iter_mut().flatten();
        for message in example.conversation.messages.iter_mut().chain(rejected) {
            for (from, to) in &self.replace {
                if message.content.contains(from.as_str()) {
                    message.content = message.content.replace(from.as_str(), to);
                }
            }
        }
    }
}

/// Numbers compare numerically, everything else by its canonical JSON.
fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    match (a.and_then(Value::as_f64), b.and_then(Value::as_f64)) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        _ => a.map(canonical_json).cmp(&b.map(canonical_json)),
    }
}

/// Equality where `1` and `1.0` are equal and a string matches its number spelling.
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::String(s), Value::Number(n)) | (Value::Number(n), Value::String(s)) => {
            s.trim().parse::<f64>().ok() == n.as_f64()
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_splits_at_markers() {
        let markers = vec![
            ("\n\nHuman:".to_string(), Role::User),
            ("\n\nAssistant:".to_string(), Role::Assistant),
        ];
        let mut out = Vec::new();
        split_transcript(
            "Human: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao",
            &markers,
            &mut out,
        )
        .unwrap();
        let roles: Vec<_> = out.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [Role::User, Role::Assistant, Role::User, Role::Assistant]
        );
        assert_eq!(out[1].content.trim(), "hello");
        let err = split_transcript("preamble\n\nHuman: x", &markers, &mut Vec::new());
        assert!(err
            .unwrap_err()
            .starts_with("text before the first speaker marker"));
        let err = split_transcript("nothing here", &markers, &mut Vec::new());
        assert!(err.unwrap_err().starts_with("no speaker marker"));
    }
}
