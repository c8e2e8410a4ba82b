//! Dataset formats: each maps one JSON record to the canonical [`Conversation`].
//!
//! A record is parsed once into [`RawRecord`], a struct holding every field any format here
//! reads (unknown fields are skipped without allocation); the format then maps those fields.
//! `Format::Auto` picks the format per record from which fields are present, so a file that
//! mixes shapes still imports. This module knows nothing of files or the store: it turns
//! bytes into a conversation or a reason why not.

mod alpaca;
mod messages;
mod sharegpt;

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

use crate::conversation::{Conversation, Message, Role};

pub use messages::Content;

/// The record shapes this build can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Decide per record from its fields.
    Auto,
    /// `{"instruction", "input"?, "output", "system"?}`.
    Alpaca,
    /// OpenAI chat: `{"messages": [{"role", "content"}], "tools"?}`.
    Messages,
    /// `{"conversations": [{"from", "value"}]}` with role aliases (human, gpt, ...).
    Sharegpt,
}

impl Format {
    /// Every concrete format, with the fields it reads.
    pub const CONCRETE: [(Format, &'static str); 3] = [
        (
            Format::Alpaca,
            "instruction, input (optional), output, system (optional)",
        ),
        (
            Format::Messages,
            "messages: [{role, content, name?, tool_calls?}], tools (optional)",
        ),
        (
            Format::Sharegpt,
            "conversations: [{from, value}], system (optional)",
        ),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Alpaca => "alpaca",
            Format::Messages => "messages",
            Format::Sharegpt => "sharegpt",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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

/// Parses one record (the bytes of one JSONL line or one JSON array element) in `format`
/// into a normalised, validated conversation, or says why it cannot be one.
pub fn parse_record(format: Format, bytes: &[u8]) -> Result<Conversation, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("invalid UTF-8 at byte {} of the record", e.valid_up_to()))?;
    let first = text.trim_start().as_bytes().first().copied();
    if first != Some(b'{') {
        return Err(match first {
            None => "empty record".to_string(),
            Some(b'[') => "record is a JSON array, expected an object".to_string(),
            Some(_) => format!(
                "malformed JSON: expected an object, found `{}`",
                excerpt(text, 40)
            ),
        });
    }
    let record: RawRecord<'_> =
        serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
    let format = match format {
        Format::Auto => detect(&record)?,
        explicit => explicit,
    };
    let mut conversation = match format {
        Format::Alpaca => alpaca::convert(record)?,
        Format::Messages => messages::convert(record)?,
        Format::Sharegpt => sharegpt::convert(record)?,
        Format::Auto => unreachable!("resolved above"),
    };
    conversation.normalize();
    conversation.validate().map_err(|e| e.to_string())?;
    Ok(conversation)
}

fn detect(record: &RawRecord<'_>) -> Result<Format, String> {
    if record.messages.is_some() {
        Ok(Format::Messages)
    } else if record.conversations.is_some() {
        Ok(Format::Sharegpt)
    } else if record.instruction.is_some() || record.output.is_some() {
        Ok(Format::Alpaca)
    } else {
        Err(
            "unknown record shape: no `messages`, `conversations` or `instruction`/`output` \
             field (formats: alpaca, messages, sharegpt)"
                .to_string(),
        )
    }
}

/// The optional top-level `system` field some datasets carry, as a leading system message.
fn system_message(system: Option<Cow<'_, str>>) -> Option<Message> {
    system
        .filter(|s| !s.trim().is_empty())
        .map(|s| Message::new(Role::System, s.into_owned()))
}

/// A missing required field, named with the format that needs it.
fn missing(format: Format, field: &str) -> String {
    format!("{format} record lacks required field `{field}`")
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
        let conv = parse_record(Format::Auto, alpaca).unwrap();
        assert_eq!(conv.messages[0].content, "Add\n\n2+2");
        assert_eq!(conv.messages[1].role, Role::Assistant);

        let msgs = br#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#;
        assert_eq!(parse_record(Format::Auto, msgs).unwrap().messages.len(), 2);

        let share =
            br#"{"conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":"hello"}]}"#;
        assert_eq!(
            parse_record(Format::Auto, share).unwrap(),
            parse_record(Format::Auto, msgs).unwrap()
        );
    }

    #[test]
    fn reasons_are_specific() {
        let err = parse_record(Format::Alpaca, br#"{"instruction":"x"}"#).unwrap_err();
        assert_eq!(err, "alpaca record lacks required field `output`");
        let err = parse_record(Format::Auto, br#"{"foo":1}"#).unwrap_err();
        assert!(err.starts_with("unknown record shape"), "{err}");
        let err = parse_record(Format::Auto, b"{\"messages\": [").unwrap_err();
        assert!(
            err.starts_with("malformed JSON: EOF while parsing"),
            "{err}"
        );
        let err = parse_record(Format::Auto, b"{\"a\": \"\xff\"}").unwrap_err();
        assert_eq!(err, "invalid UTF-8 at byte 7 of the record");
    }
}
