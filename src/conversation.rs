//! The canonical conversation every dataset format maps into, and its content hash.
//!
//! A [`Conversation`] is what gets trained on: ordered messages with a role, plus optional
//! tool (function) schemas. Everything else about an example (category, sources, counts)
//! is metadata that lives beside it in the store and never enters the hash.
//!
//! # Canonical form, version 1
//!
//! The key of an example is the SHA-1 of these bytes, built from the *normalised* messages:
//!
//! ```text
//! "corpusdb-canonical/1\0"
//! [ 'F' len:u64le tools-json ]                  only when tool schemas are present
//! per message, in order:
//!   role-tag:u8                                 'S' system, 'U' user, 'A' assistant, 'T' tool
//!   'c' len:u64le content-utf8
//!   [ 'n' len:u64le name ]                      only when the message has a name
//!   [ 'k' len:u64le tool-calls-json ]           only when the message has tool calls
//!   '.'                                         end of message
//! ```
//!
//! Every variable-length field is length-prefixed and every message is closed, so no two
//! different conversations can produce the same bytes by shifting text between messages.
//! Text normalisation (applied once, before hashing and storing): `\r\n` (and any run of
//! `\r` ending in `\n`) becomes `\n`, Unicode NFC, and a field of whitespace only becomes
//! empty; the text is stored so, its indentation and surrounding whitespace kept. The
//! canonical form trims leading and trailing whitespace of each field, so copies that
//! differ only there are one example (and keys are those of stores that trimmed the stored
//! text). JSON values (tools, tool calls) are re-serialised with sorted object keys and no
//! insignificant space.
//! Changing any of this changes every key: bump [`CANONICAL_VERSION`] and the store schema.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// Version of the canonical byte form hashed into every key.
pub const CANONICAL_VERSION: u32 = 1;
const CANONICAL_MAGIC: &[u8] = b"corpusdb-canonical/1\0";

/// Who speaks a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The name used in OpenAI-style `messages` and in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// Resolves a role name as datasets spell it (case-insensitive), including ShareGPT's
    /// aliases (`human`, `gpt`, `chatgpt`, `bing`, `bard`, ...). `None` for unknown names.
    pub fn from_alias(name: &str) -> Option<Role> {
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        Some(match name {
            "system" | "system_prompt" | "developer" => Role::System,
            "user" | "human" | "prompter" | "question" => Role::User,
            "assistant" | "gpt" | "chatgpt" | "bing" | "bard" | "model" | "bot" | "ai"
            | "function_call" => Role::Assistant,
            "tool" | "function" | "observation" | "function_response" | "ipython" => Role::Tool,
            _ => return None,
        })
    }

    fn tag(self) -> u8 {
        match self {
            Role::System => b'S',
            Role::User => b'U',
            Role::Assistant => b'A',
            Role::Tool => b'T',
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Function or participant name (tool results, named speakers).
    pub name: Option<String>,
    /// Tool calls made by an assistant message, as canonical JSON.
    pub tool_calls: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            name: None,
            tool_calls: None,
        }
    }
}

/// The training content of one example.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// Tool (function) schemas offered to the model, as canonical JSON.
    pub tools: Option<String>,
}

/// What a source says about an example beyond the conversation: kept beside it in the
/// store, never part of its hash.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extras {
    /// Plain text (a `text` field), not a dialogue: a single assistant message.
    pub raw_text: bool,
    /// The dispreferred reply of a preference pair (HH-RLHF, UltraFeedback), whole.
    pub rejected: Option<Vec<Message>>,
}

/// Why a conversation cannot become an example.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidConversation {
    #[error("empty conversation: no messages")]
    NoMessages,
    #[error("no assistant message with content")]
    NoAssistantContent,
}

impl Conversation {
    pub fn new(messages: Vec<Message>) -> Conversation {
        Conversation {
            messages,
            tools: None,
        }
    }

    /// Normalises every text field in place (see the module docs for the rules).
    pub fn normalize(&mut self) {
        for message in &mut self.messages {
            normalize_in_place(&mut message.content);
            if let Some(name) = &mut message.name {
                normalize_in_place(name);
            }
        }
    }

    /// Checks that the conversation can train something.
    pub fn validate(&self) -> Result<(), InvalidConversation> {
        if self.messages.is_empty() {
            return Err(InvalidConversation::NoMessages);
        }
        let has_reply = self.messages.iter().any(|m| {
            m.role == Role::Assistant && (!m.content.is_empty() || m.tool_calls.is_some())
        });
        if !has_reply {
            return Err(InvalidConversation::NoAssistantContent);
        }
        Ok(())
    }

    /// Appends the canonical bytes (module docs) of an already normalised conversation.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        self.canonical_into(out);
    }

    fn canonical_into(&self, out: &mut impl CanonicalSink) {
        out.put(CANONICAL_MAGIC);
        if let Some(tools) = &self.tools {
            field(out, b'F', tools);
        }
        for message in &self.messages {
            out.put(&[message.role.tag()]);
            field(out, b'c', message.content.trim());
            if let Some(name) = &message.name {
                field(out, b'n', name.trim());
            }
            if let Some(calls) = &message.tool_calls {
                field(out, b'k', calls);
            }
            out.put(b".");
        }
    }

    /// SHA-1 of the canonical form. The conversation must already be normalised. The
    /// canonical bytes go straight into the hash, never copied into a buffer.
    pub fn content_hash(&self) -> ContentHash {
        let mut hasher = Sha1::new();
        self.canonical_into(&mut hasher);
        ContentHash(hasher.finalize().into())
    }

    /// Characters (Unicode scalar values) over all message contents.
    pub fn char_count(&self) -> u64 {
        self.messages.iter().map(|m| count_chars(&m.content)).sum()
    }

    /// Turns: the number of assistant messages (one per exchange).
    pub fn turn_count(&self) -> u32 {
        self.messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count() as u32
    }
}

fn count_chars(s: &str) -> u64 {
    if s.is_ascii() {
        s.len() as u64
    } else {
        s.chars().count() as u64
    }
}

/// Where canonical bytes go: a buffer, or the hash itself.
trait CanonicalSink {
    fn put(&mut self, bytes: &[u8]);
}

impl CanonicalSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl CanonicalSink for Sha1 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

fn field(out: &mut impl CanonicalSink, tag: u8, value: &str) {
    out.put(&[tag]);
    out.put(&(value.len() as u64).to_le_bytes());
    out.put(value.as_bytes());
}

/// Normalises one text field: CRLF to LF, NFC, and whitespace only to empty; the rest of
/// the text, leading and trailing whitespace included, is kept. Borrows when nothing
/// changes, which is the common case for ASCII text.
pub fn normalize_text(text: &str) -> Cow<'_, str> {
    let mut current: Cow<'_, str> = Cow::Borrowed(text);
    if memchr::memchr(b'\r', text.as_bytes()).is_some() {
        current = Cow::Owned(drop_carriage_returns_before_newlines(text));
    }
    if !is_nfc(&current) {
        current = Cow::Owned(current.nfc().collect());
    }
    if current.trim().is_empty() {
        return Cow::Borrowed("");
    }
    current
}

/// Whether `text` is NFC by the quick check (`is_nfc_quick(..) == Yes`, a "maybe" counts
/// as no), without its per-character table lookups where they cannot matter: most text is
/// ASCII, or CJK and other scripts made only of characters NFC leaves alone.
fn is_nfc(text: &str) -> bool {
    let bytes = text.as_bytes();
    let stable = stable_starters();
    // The quick check of `unicode_normalization`, with runs of characters below U+0300
    // skipped by a byte scan, and starters that NFC always allows decided by one bit.
    let mut last_class = 0u8;
    let mut maybe = false;
    let mut at = 0;
    while let Some(skipped) = lead_byte_from_u0300(&bytes[at..]) {
        if skipped > 0 {
            // Characters below U+0300 are starters NFC always allows: the check's
            // state after them is its initial state.
            last_class = 0;
        }
        at += skipped;
        let c = text[at..]
            .chars()
            .next()
            .expect("a lead byte starts a character");
        at += c.len_utf8();
        let code = c as u32;
        if code < 0x1_0000 && stable[code as usize / 64] >> (code % 64) & 1 == 1 {
            last_class = 0;
            continue;
        }
        let class = unicode_normalization::char::canonical_combining_class(c);
        if last_class > class && class != 0 {
            return false;
        }
        match is_nfc_quick(std::iter::once(c)) {
            IsNormalized::Yes => {}
            IsNormalized::No => return false,
            IsNormalized::Maybe => maybe = true,
        }
        last_class = class;
    }
    !maybe
}

/// The offset of the first byte >= 0xCC: the first character at or above U+0300, since
/// only such characters have lead bytes there and no other byte is that high. Scanned 32
/// bytes at a time without an early exit inside a chunk, which the compiler vectorises.
fn lead_byte_from_u0300(bytes: &[u8]) -> Option<usize> {
    if bytes.first().is_some_and(|&b| b >= 0xCC) {
        return Some(0);
    }
    let mut offset = 0;
    for chunk in bytes.chunks(32) {
        if chunk.iter().fold(false, |any, &b| any | (b >= 0xCC)) {
            return chunk.iter().position(|&b| b >= 0xCC).map(|i| offset + i);
        }
        offset += chunk.len();
    }
    None
}

/// One bit per Basic Multilingual Plane character: set for starters that NFC always
/// allows (combining class 0, quick check yes), from `unicode_normalization`'s tables.
fn stable_starters() -> &'static [u64; 1024] {
    static STABLE: std::sync::OnceLock<Box<[u64; 1024]>> = std::sync::OnceLock::new();
    STABLE.get_or_init(|| {
        let mut bits = Box::new([0u64; 1024]);
        for c in (0..0x1_0000u32).filter_map(char::from_u32) {
            if unicode_normalization::char::canonical_combining_class(c) == 0
                && is_nfc_quick(std::iter::once(c)) == IsNormalized::Yes
            {
                bits[c as usize / 64] |= 1 << (c as u32 % 64);
            }
        }
        bits
    })
}

/// `\r\n` -> `\n`, and so is any run of `\r` ending in `\n` (`\r\r\n`), which keeps
/// normalisation idempotent. A `\r` not followed by `\n` stays.
fn drop_carriage_returns_before_newlines(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\r' {
            let run = bytes[i..].iter().take_while(|&&b| b == b'\r').count();
            if bytes.get(i + run) != Some(&b'\n') {
                out.extend_from_slice(&bytes[i..i + run]);
            }
            i += run;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII carriage returns were removed")
}

pub fn normalize_in_place(text: &mut String) {
    let normalized = match normalize_text(text) {
        Cow::Borrowed(s) if s.len() == text.len() => return,
        Cow::Borrowed(s) => s.to_owned(),
        Cow::Owned(s) => s,
    };
    *text = normalized;
}

/// Re-serialises a JSON value canonically (sorted keys, no spaces) for hashing and storage.
pub fn canonical_json(value: &serde_json::Value) -> String {
    // serde_json's default Map is a BTreeMap, so keys come out sorted.
    serde_json::to_string(value).expect("a JSON value always serialises")
}

/// The 20-byte SHA-1 key of an example.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentHash(pub [u8; 20]);

impl ContentHash {
    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    pub fn from_slice(bytes: &[u8]) -> Option<ContentHash> {
        Some(ContentHash(bytes.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

impl FromStr for ContentHash {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s).map_err(|e| format!("`{s}` is not a hex SHA-1: {e}"))?;
        ContentHash::from_slice(&bytes)
            .ok_or_else(|| format!("`{s}` has {} hex digits, a SHA-1 has 40", s.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_borrows_clean_ascii() {
        assert!(matches!(
            normalize_text("plain text"),
            Cow::Borrowed("plain text")
        ));
        // Surrounding whitespace is kept (a code reply's indentation); whitespace only is
        // empty.
        assert_eq!(normalize_text("  a\r\nb \n"), "  a\nb \n");
        assert_eq!(normalize_text(" \r\n\t"), "");
        // "e" + combining acute accent composes to U+00E9.
        assert_eq!(normalize_text("cafe\u{301}"), "caf\u{e9}");
        assert_eq!(normalize_text("a\r\r\nb\rc"), "a\nb\rc");
    }

    #[test]
    fn characters_below_u0300_are_their_own_nfc() {
        for c in (0..0x300u32).filter_map(char::from_u32) {
            let s = c.to_string();
            assert!(is_nfc(&s));
            assert_eq!(s.nfc().collect::<String>(), s, "U+{:04X}", c as u32);
        }
        assert!(!is_nfc("e\u{301}"));
    }

    /// The shortcut agrees with the library's own quick check on every character of
    /// every plane, alone, after a letter, and before a combining mark; and on seeded
    /// random mixes of ASCII, CJK, Hangul jamo, combining marks and characters that
    /// are never NFC, at every offset within a 32-byte chunk.
    #[test]
    fn the_nfc_shortcut_agrees_with_the_quick_check() {
        let reference = |s: &str| is_nfc_quick(s.chars()) == IsNormalized::Yes;
        for c in (0..0x11_0000u32).filter_map(char::from_u32) {
            for s in [
                c.to_string(),
                format!("a{c}"),
                format!("{c}\u{301}"),
                format!("{c}\u{323}\u{301}"),
            ] {
                assert_eq!(is_nfc(&s), reference(&s), "{s:?}");
            }
        }
        let pieces = [
            "a",
            " ",
            "\n",
            "\u{e9}",
            "\u{4e2d}",
            "\u{6587}",
            "\u{1100}",
            "\u{1161}",
            "\u{ac00}",
            "\u{301}",
            "\u{323}",
            "\u{340}",
            "\u{f900}",
            "\u{3099}",
            "\u{30ab}",
            "\u{1f600}",
            "\u{2014}",
            "\u{5d0}\u{591}",
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut s = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s.push_str(pieces[(state % pieces.len() as u64) as usize]);
            }
            assert_eq!(is_nfc(&s), reference(&s), "{s:?}");
        }
    }

    #[test]
    fn normalisation_is_idempotent() {
        for text in [
            "a\r\r\nb",
            " x\r\n\r\n ",
            "e\u{301}\u{323} ",
            "\u{3000}t\u{3000}",
            "a\r",
        ] {
            let once = normalize_text(text).into_owned();
            assert_eq!(normalize_text(&once), once, "{text:?}");
        }
    }

    /// Stored text keeps its surrounding whitespace, and the key is that of the trimmed
    /// text: copies that differ only there are one example, under the key a store that
    /// trimmed would give.
    #[test]
    fn the_key_trims_what_the_stored_text_keeps() {
        let code = "    indented()\n    more()\n";
        let mut kept = Conversation::new(vec![
            Message::new(Role::User, " Fix this: "),
            Message::new(Role::Assistant, code),
        ]);
        kept.normalize();
        assert_eq!(kept.messages[1].content, code);
        let trimmed = Conversation::new(vec![
            Message::new(Role::User, "Fix this:"),
            Message::new(Role::Assistant, code.trim()),
        ]);
        assert_eq!(kept.content_hash(), trimmed.content_hash());
        let mut blank = Conversation::new(vec![
            Message::new(Role::User, "q"),
            Message::new(Role::Assistant, " \n "),
        ]);
        blank.normalize();
        assert!(blank.validate().is_err(), "whitespace only is no reply");
    }

    #[test]
    fn role_aliases() {
        assert_eq!(Role::from_alias("GPT"), Some(Role::Assistant));
        assert_eq!(Role::from_alias("human"), Some(Role::User));
        assert_eq!(Role::from_alias("wizard"), None);
    }
}
