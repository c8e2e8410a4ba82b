//! Why a record did not become an example: a kind with the subject it names, and the
//! message shown to people. The lowest module: formats, the reader, filters and the store
//! all speak it, and the store keeps the kind as a one-byte code.

use serde::{Deserialize, Serialize};

/// What kind of problem made a record a reject. Stored as the one-byte code of
/// [`RejectKind::code`], never as a variant index: reordering the variants changes
/// nothing on disk, and a test pins every code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectKind {
    /// None of the others.
    Other,
    /// Not valid JSON.
    MalformedJson,
    /// Not UTF-8 text.
    InvalidUtf8,
    /// Longer than the record size limit.
    TooLarge,
    /// Cut off by the end of the file.
    Truncated,
    /// A field the format requires is absent or null; the subject names it.
    MissingField,
    /// Readable, but not a record of the format (a value of the wrong type, no
    /// conversation, an unknown role).
    InvalidRecord,
    /// A quality filter failed; the subject is the filter's name.
    Filter,
    /// A note about a whole file rather than one record.
    FileNote,
}

impl RejectKind {
    pub const ALL: [RejectKind; 9] = [
        RejectKind::Other,
        RejectKind::MalformedJson,
        RejectKind::InvalidUtf8,
        RejectKind::TooLarge,
        RejectKind::Truncated,
        RejectKind::MissingField,
        RejectKind::InvalidRecord,
        RejectKind::Filter,
        RejectKind::FileNote,
    ];

    /// The stored byte.
    pub fn code(self) -> u8 {
        match self {
            RejectKind::Other => 0,
            RejectKind::MalformedJson => 1,
            RejectKind::InvalidUtf8 => 2,
            RejectKind::TooLarge => 3,
            RejectKind::Truncated => 4,
            RejectKind::MissingField => 5,
            RejectKind::InvalidRecord => 6,
            RejectKind::Filter => 7,
            RejectKind::FileNote => 8,
        }
    }

    pub fn from_code(code: u8) -> Option<RejectKind> {
        RejectKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The kind's name in JSON output.
    pub fn name(self) -> &'static str {
        match self {
            RejectKind::Other => "other",
            RejectKind::MalformedJson => "malformed-json",
            RejectKind::InvalidUtf8 => "invalid-utf8",
            RejectKind::TooLarge => "too-large",
            RejectKind::Truncated => "truncated",
            RejectKind::MissingField => "missing-field",
            RejectKind::InvalidRecord => "invalid-record",
            RejectKind::Filter => "filter",
            RejectKind::FileNote => "file-note",
        }
    }
}

impl Serialize for RejectKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(self.code())
    }
}

impl<'de> Deserialize<'de> for RejectKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = u8::deserialize(deserializer)?;
        RejectKind::from_code(code)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown reject kind code {code}")))
    }
}

/// Why a record was rejected: its kind, the subject the kind names (the missing field,
/// the filter; empty otherwise) and the message shown to people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectReason {
    pub kind: RejectKind,
    pub subject: String,
    pub message: String,
}

impl RejectReason {
    pub fn new(kind: RejectKind, message: impl Into<String>) -> RejectReason {
        RejectReason {
            kind,
            subject: String::new(),
            message: message.into(),
        }
    }

    /// The required field `field` is absent or null.
    pub fn missing_field(field: &str, message: impl Into<String>) -> RejectReason {
        RejectReason {
            kind: RejectKind::MissingField,
            subject: field.to_string(),
            message: message.into(),
        }
    }

    /// The quality filter `name` failed.
    pub fn filter(name: &str, message: impl Into<String>) -> RejectReason {
        RejectReason {
            kind: RejectKind::Filter,
            subject: name.to_string(),
            message: message.into(),
        }
    }

    /// The same reason with `prefix` before its message ("conversation 3: ").
    pub fn prefixed(mut self, prefix: &str) -> RejectReason {
        self.message.insert_str(0, prefix);
        self
    }

    /// The group `rejects --by-reason` counts it in: the kind and its subject, without
    /// the message's details ("missing field `output`", "filter `max-turns`").
    pub fn group(&self) -> String {
        let label = match self.kind {
            RejectKind::Other => "other",
            RejectKind::MalformedJson => "malformed JSON",
            RejectKind::InvalidUtf8 => "invalid UTF-8",
            RejectKind::TooLarge => "record over the size limit",
            RejectKind::Truncated => "truncated record",
            RejectKind::MissingField => "missing field",
            RejectKind::InvalidRecord => "not a record of the format",
            RejectKind::Filter => "filter",
            RejectKind::FileNote => "file note",
        };
        if self.subject.is_empty() {
            label.to_string()
        } else {
            format!("{label} `{}`", self.subject)
        }
    }

    /// The kind and subject of a reject stored before they were, read from the messages
    /// that version wrote.
    pub fn classify_legacy(message: &str) -> RejectReason {
        let mut text = message;
        if let Some(rest) = text.strip_prefix("conversation ") {
            if let Some((n, rest)) = rest.split_once(": ") {
                if n.bytes().all(|b| b.is_ascii_digit()) {
                    text = rest;
                }
            }
        }
        let between_backticks = |after: &str| -> Option<String> {
            let start = text.find(after)? + after.len();
            let end = text[start..].find('`')?;
            Some(text[start..start + end].to_string())
        };
        let lower = text.to_ascii_lowercase();
        let mut reason = if text.starts_with("filter `") {
            RejectReason::filter(&between_backticks("filter `").unwrap_or_default(), message)
        } else if let Some(field) = between_backticks("lacks required field `") {
            RejectReason::missing_field(&field, message)
        } else if lower.contains("utf-8") {
            RejectReason::new(RejectKind::InvalidUtf8, message)
        } else if lower.contains("over the") && lower.contains("limit") {
            RejectReason::new(RejectKind::TooLarge, message)
        } else if lower.contains("truncated") {
            RejectReason::new(RejectKind::Truncated, message)
        } else if lower.starts_with("malformed json") {
            RejectReason::new(RejectKind::MalformedJson, message)
        } else {
            RejectReason::new(RejectKind::InvalidRecord, message)
        };
        reason.message = message.to_string();
        reason
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A format's own message about a record it cannot read.
impl From<String> for RejectReason {
    fn from(message: String) -> RejectReason {
        RejectReason::new(RejectKind::InvalidRecord, message)
    }
}

impl From<&str> for RejectReason {
    fn from(message: &str) -> RejectReason {
        RejectReason::new(RejectKind::InvalidRecord, message)
    }
}

/// A reason equals the message it shows (the kind is compared by `kind`).
impl PartialEq<&str> for RejectReason {
    fn eq(&self, other: &&str) -> bool {
        self.message == *other
    }
}

impl PartialEq<str> for RejectReason {
    fn eq(&self, other: &str) -> bool {
        self.message == other
    }
}

/// A record whose content a format's templates or paths cannot use.
impl From<crate::invalid::Invalid> for RejectReason {
    fn from(invalid: crate::invalid::Invalid) -> RejectReason {
        RejectReason::new(RejectKind::InvalidRecord, invalid.0)
    }
}
