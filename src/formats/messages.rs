//! OpenAI chat messages: `{"messages": [{"role", "content", "name"?, "tool_calls"?}],
//! "tools"?}`.
//!
//! `content` may be a string, `null` (an assistant message that only calls tools), or a
//! list of parts of which the `text` parts are joined with newlines. OpenAI's legacy
//! function calling (`function_call` on a message, `functions` beside the messages) maps
//! to the same `tool_calls` / `tools` form as the current API, so both dedupe together.
//! Empty `tool_calls` / `tools` lists count as absent.

use crate::reject::RejectReason;
use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::conversation::{canonical_json, Conversation, Message, Role};

use super::{missing, system_message, RawRecord};

#[derive(Deserialize)]
pub(crate) struct RawMessage<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(default)]
    content: Content,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<serde_json::Value>,
    #[serde(default)]
    function_call: Option<serde_json::Value>,
}

/// Message content as OpenAI-style datasets write it.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Content {
    /// `null` or absent.
    #[default]
    Missing,
    Text(String),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ContentVisitor)
    }
}

struct ContentVisitor;

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

impl<'de> Visitor<'de> for ContentVisitor {
    type Value = Content;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, null, or a list of {\"type\": \"text\", \"text\": ...} parts")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Content, E> {
        Ok(Content::Text(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Content, E> {
        Ok(Content::Text(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Content, E> {
        Ok(Content::Missing)
    }

    fn visit_none<E: de::Error>(self) -> Result<Content, E> {
        Ok(Content::Missing)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
        let mut text = String::new();
        while let Some(part) = seq.next_element::<Part>()? {
            if let Some(part_text) = part.text {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&part_text);
            }
        }
        Ok(Content::Text(text))
    }
}

pub(super) fn convert(record: RawRecord<'_>) -> Result<Conversation, RejectReason> {
    let raw = record
        .messages
        .ok_or_else(|| missing("messages", "messages"))?;
    let mut messages = Vec::with_capacity(raw.len() + 1);
    messages.extend(system_message(record.system));
    for (i, message) in raw.into_iter().enumerate() {
        let role_name = message.role.ok_or_else(|| {
            RejectReason::missing_field(
                "role",
                format!("message {} lacks required field `role`", i + 1),
            )
        })?;
        let role = Role::from_alias(&role_name)
            .ok_or_else(|| format!("unknown role `{role_name}` in message {}", i + 1))?;
        let legacy_call = message
            .function_call
            .filter(|v| !v.is_null())
            .map(|call| serde_json::Value::Array(vec![as_function(call)]));
        let tool_calls = present(message.tool_calls)
            .or(legacy_call)
            .map(|v| canonical_json(&v));
        let content = match message.content {
            Content::Text(text) => text,
            Content::Missing if tool_calls.is_some() => String::new(),
            Content::Missing => {
                return Err(RejectReason::missing_field(
                    "content",
                    format!("message {} lacks required field `content`", i + 1),
                ))
            }
        };
        messages.push(Message {
            role,
            content,
            name: message.name.map(Cow::into_owned),
            tool_calls,
        });
    }
    let legacy_tools = present(record.functions).map(|functions| match functions {
        serde_json::Value::Array(list) => {
            serde_json::Value::Array(list.into_iter().map(as_function).collect())
        }
        other => other,
    });
    let tools = present(record.tools)
        .or(legacy_tools)
        .map(|v| canonical_json(&v));
    Ok(Conversation { messages, tools })
}

/// `null`, `[]` and `{}` say "none". Many datasets (and Parquet columns) hold tools and
/// tool calls as JSON text: a string that parses as a list or object is that value.
fn present(value: Option<serde_json::Value>) -> Option<serde_json::Value> {
    let value = value.map(|v| match v {
        serde_json::Value::String(text) => match serde_json::from_str(&text) {
            Ok(parsed @ (serde_json::Value::Array(_) | serde_json::Value::Object(_))) => parsed,
            _ => serde_json::Value::String(text),
        },
        other => other,
    });
    value.filter(|v| match v {
        serde_json::Value::Null => false,
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        _ => true,
    })
}

/// A legacy function (call or schema) in the current API's wrapper.
fn as_function(function: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"type": "function", "function": function})
}
