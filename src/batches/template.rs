//! Conversations to token ids with a loss mask: the model's chat template, then the
//! tokenizer.
//!
//! The template is `chat_template` of `tokenizer_config.json`, rendered with minijinja the
//! way Hugging Face renders it (`trim_blocks`, `lstrip_blocks`, Python string methods,
//! `raise_exception`, `strftime_now`, Python-spaced `tojson`, `bos_token` / `eos_token`,
//! messages with `tool_calls` and `tool_call_id`, `tools`); without one, ChatML
//! (`<|im_start|>role\n...<|im_end|>\n`, Hermes-style tool calls). Each assistant turn's
//! trained span is the text rendering that turn adds after the conversation before it and
//! its generation prompt (content, tool calls, end-of-turn marker); the whole text is
//! tokenized once and every token whose bytes overlap a trained span is trained. The
//! end-of-turn marker is read from the template's output for a probe conversation.

use std::path::{Path, PathBuf};

use crate::conversation::{Conversation, Role};

/// A tokenizer with its chat template.
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: Template,
    /// End-of-turn text trained after each assistant message when the template puts it
    /// right after the content.
    end_of_turn: String,
    pub pad_id: u32,
    /// Where the template came from, for messages.
    origin: String,
    /// End-of-sequence ids of generation_config.json, if the model has one.
    generation_eos: Vec<u32>,
    /// See [`ChatTokenizer::refuse_ignored_tool_calls`].
    refuse_inlining: bool,
    /// SHA-1 of the tokenizer's serialisation and the template's source and specials:
    /// with the settings that can change afterwards, it names the token cache.
    base_fingerprint: [u8; 20],
}

/// Raised whenever rendering or encoding changes what a conversation becomes, so that
/// token caches written before are not used.
const ENCODING_VERSION: u32 = 1;

enum Template {
    Jinja(Box<minijinja::Environment<'static>>, Specials),
    ChatMl,
}

struct Specials {
    bos: String,
    eos: String,
    /// Whether the template writes `tool_calls` and `tools` (probed when it is loaded);
    /// when it does not, they are written into the messages' text instead (see
    /// [`inline_tool_use`]).
    renders_tool_calls: bool,
    renders_tools: bool,
}

/// One tokenized example: ids and, per id, whether it is trained (an assistant token).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

fn token_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and, beside it, `tokenizer_config.json` if present. `path`
    /// is the file or the directory holding it.
    pub fn load(path: &Path) -> Result<ChatTokenizer, crate::invalid::Invalid> {
        let (file, dir): (PathBuf, PathBuf) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_owned())
        } else {
            (
                path.to_owned(),
                path.parent().unwrap_or(Path::new(".")).to_owned(),
            )
        };
        let tokenizer = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| format!("{}: not a tokenizer.json: {e}", file.display()))?;
        let config_file = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = match std::fs::read_to_string(&config_file) {
            Ok(text) => Some(
                serde_json::from_str(&text)
                    .map_err(|e| format!("{}: {e}", config_file.display()))?,
            ),
            Err(_) => None,
        };
        let mut chat = ChatTokenizer::from_parts(tokenizer, config, &config_file)?;
        // generation_config.json's eos ids (a list for Llama-3: <|end_of_text|>, <|eom_id|>,
        // <|eot_id|>) also end generation.
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("{}: {e}", dir.join("generation_config.json").display()))?;
            chat.generation_eos = match value.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().map(|n| n as u32).into_iter().collect()
                }
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|n| n as u32)
                    .collect(),
                _ => Vec::new(),
            };
        }
        Ok(chat)
    }

    /// A tokenizer and a `tokenizer_config.json`-like object (`chat_template`,
    /// `bos_token`, `eos_token`); `origin` names it in errors.
    pub fn from_parts(
        tokenizer: tokenizers::Tokenizer,
        config: Option<serde_json::Value>,
        origin: &Path,
    ) -> Result<ChatTokenizer, crate::invalid::Invalid> {
        let config_file = origin;
        let template_source = config.as_ref().and_then(|c| match c.get("chat_template")? {
            serde_json::Value::String(s) => Some(s.clone()),
            // A list of named templates: the default one.
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => None,
        });
        let base_fingerprint = {
            use sha1::{Digest, Sha1};
            let mut hasher = Sha1::new();
            let serialised = tokenizer
                .to_string(false)
                .map_err(|e| format!("{}: tokenizer: {e}", origin.display()))?;
            hasher.update(serialised.as_bytes());
            let mut field = |value: &str| {
                hasher.update((value.len() as u64).to_le_bytes());
                hasher.update(value.as_bytes());
            };
            field(template_source.as_deref().unwrap_or("<chatml>"));
            for name in ["bos_token", "eos_token"] {
                field(&token_text(config.as_ref().and_then(|c| c.get(name))).unwrap_or_default());
            }
            hasher.finalize().into()
        };
        let specials = Specials {
            bos: token_text(config.as_ref().and_then(|c| c.get("bos_token"))).unwrap_or_default(),
            eos: token_text(config.as_ref().and_then(|c| c.get("eos_token"))).unwrap_or_default(),
            renders_tool_calls: true,
            renders_tools: true,
        };
        let (template, end_of_turn) = match template_source {
            Some(source) => {
                let mut env = minijinja::Environment::new();
                env.set_syntax(
                    minijinja::syntax::SyntaxConfig::builder()
                        .trim_blocks(true)
                        .lstrip_blocks(true)
                        .build()
                        .map_err(|e| e.to_string())?,
                );
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function(
                    "raise_exception",
                    |message: String| -> Result<String, minijinja::Error> {
                        Err(minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            message,
                        ))
                    },
                );
                // transformers' `tojson`: Python's json.dumps spacing, `indent` honoured.
                env.add_filter(
                    "tojson",
                    |value: minijinja::Value,
                     kwargs: minijinja::value::Kwargs|
                     -> Result<String, minijinja::Error> {
                        let indent: Option<usize> = kwargs.get("indent")?;
                        let _: Option<bool> = kwargs.get("ensure_ascii")?;
                        let _: Option<bool> = kwargs.get("sort_keys")?;
                        kwargs.assert_all_used()?;
                        let json = serde_json::to_value(&value).map_err(|e| {
                            minijinja::Error::new(
                                minijinja::ErrorKind::InvalidOperation,
                                e.to_string(),
                            )
                        })?;
                        Ok(python_json(&json, indent))
                    },
                );
                env.add_function("strftime_now", |format: String| strftime_now(&format));
                env.add_template_owned("chat", source)
                    .map_err(|e| format!("{}: chat_template: {e}", config_file.display()))?;
                (Template::Jinja(Box::new(env), specials), String::new())
            }
            None => (Template::ChatMl, "<|im_end|>".to_string()),
        };
        let pad_id = ["<pad>", "<|pad|>", "[PAD]", "<|endoftext|>", "</s>"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .unwrap_or(0);
        let mut chat = ChatTokenizer {
            tokenizer,
            template,
            end_of_turn,
            pad_id,
            origin: origin.display().to_string(),
            generation_eos: Vec::new(),
            refuse_inlining: false,
            base_fingerprint,
        };
        chat.probe_tool_use();
        if chat.end_of_turn.is_empty() {
            chat.end_of_turn = chat.detect_end_of_turn().unwrap_or_default();
        }
        Ok(chat)
    }

    /// The model's end-of-turn marker, read from its template: a probe conversation is
    /// rendered and the special token (or the template's eos text) right after the
    /// assistant's reply is the marker (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`,
    /// `<|end|>`, `</s>`, ...). `None` when the template puts none there.
    fn detect_end_of_turn(&self) -> Option<String> {
        // Two replies, in case a template refuses one of them (templates check lengths,
        // roles, characters).
        ["Probe reply 7f3a.", "Probe reply 7f3a"]
            .iter()
            .find_map(|reply| self.marker_after(reply))
    }

    fn marker_after(&self, reply: &str) -> Option<String> {
        let probe = Conversation {
            messages: vec![
                crate::conversation::Message::new(Role::User, "Probe question?"),
                crate::conversation::Message::new(Role::Assistant, reply),
            ],
            tools: None,
        };
        let text = self.render(&probe).ok()?;
        let after = &text[text.find(reply)? + reply.len()..];
        let after = after.trim_start_matches([' ', '\n']);
        let mut candidates: Vec<String> = self
            .tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        if let Template::Jinja(_, specials) = &self.template {
            candidates.push(specials.eos.clone());
        }
        candidates
            .into_iter()
            .filter(|c| !c.is_empty() && after.starts_with(c.as_str()))
            .max_by_key(|c| c.len())
    }

    /// Finds out whether the template writes tool calls and tool schemas: a probe
    /// conversation with a call and a schema of unlikely names is rendered.
    fn probe_tool_use(&mut self) {
        let Template::Jinja(_, specials) = &mut self.template else {
            return;
        };
        specials.renders_tool_calls = true;
        specials.renders_tools = true;
        let mut call = crate::conversation::Message::new(Role::Assistant, "");
        call.tool_calls = Some(
            r#"[{"function":{"arguments":"{\"q\":1}","name":"probe_call_7f3a"},"id":"abc123XYZ","type":"function"}]"#
                .into(),
        );
        let mut result = crate::conversation::Message::new(Role::Tool, "1");
        result.name = Some("probe_call_7f3a".into());
        let probe = Conversation {
            messages: vec![
                crate::conversation::Message::new(Role::User, "Probe question?"),
                call,
                result,
                crate::conversation::Message::new(Role::Assistant, "Probe reply."),
            ],
            tools: Some(
                r#"[{"function":{"description":"d","name":"probe_schema_7f3a","parameters":{"properties":{},"type":"object"}},"type":"function"}]"#
                    .into(),
            ),
        };
        // A template that raises on tools (or on the tool role) is left as it is: the
        // examples that use them are skipped and reported.
        let Ok(text) = self.render(&probe) else {
            return;
        };
        let (calls, schemas) = (
            text.contains("probe_call_7f3a"),
            text.contains("probe_schema_7f3a"),
        );
        if let Template::Jinja(_, specials) = &mut self.template {
            specials.renders_tool_calls = calls;
            specials.renders_tools = schemas;
        }
    }

    /// Refuses, instead of writing into the messages' text, tool calls (and schemas) that
    /// the model's template ignores: such examples then fail to encode with a reason that
    /// says so (a training config's `inline_tool_calls: false`).
    pub fn refuse_ignored_tool_calls(&mut self) {
        self.refuse_inlining = true;
    }

    /// Whether tool calls and schemas are written into the messages' text because the
    /// model's template ignores them (`(calls, schemas)`); `(false, false)` for ChatML and
    /// for templates that render them.
    pub fn inlines_tool_use(&self) -> (bool, bool) {
        match &self.template {
            Template::Jinja(_, s) => (!s.renders_tool_calls, !s.renders_tools),
            Template::ChatMl => (false, false),
        }
    }

    /// The end-of-turn marker trained after each reply (empty when none is known).
    pub fn end_of_turn(&self) -> &str {
        &self.end_of_turn
    }

    /// Sets the end-of-turn marker (a training config's `end_of_turn:`), for templates
    /// whose own marker cannot be read from their output.
    pub fn set_end_of_turn(&mut self, marker: &str) {
        self.end_of_turn = marker.to_string();
    }

    /// An error naming the template when no end-of-turn marker is known: a model trained
    /// without one never learns to stop.
    pub fn require_end_of_turn(&self) -> Result<(), crate::invalid::Invalid> {
        if self.end_of_turn.is_empty() {
            return Err(format!(
                "{}: the chat template writes no end-of-turn marker after an assistant reply (no special token or eos follows it), so the model would never learn to stop; set `end_of_turn: \"<marker>\"` in the training config (e.g. `<|eot_id|>`, `<end_of_turn>`, `</s>`)",
                self.origin
            ).into());
        }
        Ok(())
    }

    /// Names what [`ChatTokenizer::encode`] makes of a conversation: the tokenizer, the
    /// template and the settings (end-of-turn marker, tool-call inlining), 16 hex digits.
    /// Token caches are kept under it.
    pub fn fingerprint(&self) -> String {
        use sha1::{Digest, Sha1};
        let mut hasher = Sha1::new();
        hasher.update(self.base_fingerprint);
        hasher.update(ENCODING_VERSION.to_le_bytes());
        hasher.update((self.end_of_turn.len() as u64).to_le_bytes());
        hasher.update(self.end_of_turn.as_bytes());
        hasher.update([u8::from(self.refuse_inlining)]);
        hex::encode(&hasher.finalize()[..8])
    }

    /// Where the template came from (the tokenizer_config.json, or the file it was
    /// loaded from).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether a chat template from tokenizer_config.json is used (else ChatML).
    pub fn has_model_template(&self) -> bool {
        matches!(self.template, Template::Jinja(..))
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// The conversation as the model sees it.
    pub fn render(&self, conversation: &Conversation) -> Result<String, crate::invalid::Invalid> {
        self.render_messages(conversation, conversation.messages.len(), false)
            .map_err(crate::invalid::Invalid::from)
    }

    /// The first `upto` messages, optionally followed by the assistant's turn header.
    fn render_messages(
        &self,
        conversation: &Conversation,
        upto: usize,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let shown = &conversation.messages[..upto];
        match &self.template {
            Template::ChatMl => {
                let (mut text, _) = chatml(shown, conversation.tools.as_deref());
                if add_generation_prompt {
                    text.push_str("<|im_start|>assistant\n");
                }
                Ok(text)
            }
            Template::Jinja(env, specials) => {
                let mut messages = hf_messages(shown);
                let mut tools = conversation.tools.as_deref().and_then(hf_tools);
                let uses_tools = tools.is_some() || shown.iter().any(|m| m.tool_calls.is_some());
                if self.refuse_inlining
                    && uses_tools
                    && !(specials.renders_tool_calls && specials.renders_tools)
                {
                    return Err("the chat template ignores tool calls or tool schemas and inline_tool_calls is false".into());
                }
                inline_tool_use(
                    &mut messages,
                    &mut tools,
                    !specials.renders_tool_calls,
                    !specials.renders_tools,
                );
                let template = env.get_template("chat").map_err(|e| e.to_string())?;
                template
                    .render(minijinja::context! {
                        messages => minijinja::Value::from(minijinja::value::Serde(&messages)),
                        tools => minijinja::Value::from(minijinja::value::Serde(&tools)),
                        add_generation_prompt => add_generation_prompt,
                        bos_token => specials.bos.as_str(),
                        eos_token => specials.eos.as_str(),
                    })
                    .map_err(|e| format!("chat template: {e}"))
            }
        }
    }

    /// Token ids of a prompt: the conversation followed by the assistant's turn header,
    /// ready for generation.
    pub fn encode_prompt(
        &self,
        conversation: &Conversation,
    ) -> Result<Vec<u32>, crate::invalid::Invalid> {
        let text = self.render_messages(conversation, conversation.messages.len(), true)?;
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| format!("tokenizer: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids that end an assistant turn: the end-of-turn marker, the eos token and
    /// generation_config.json's eos ids.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = [
            self.end_of_turn.as_str(),
            "<|im_end|>",
            "</s>",
            "<|endoftext|>",
            "<|eot_id|>",
        ]
        .iter()
        .filter(|t| !t.is_empty())
        .filter_map(|t| self.tokenizer.token_to_id(t))
        .collect();
        if let Template::Jinja(_, specials) = &self.template {
            ids.extend(self.tokenizer.token_to_id(&specials.eos));
        }
        ids.extend(&self.generation_eos);
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Text of generated ids (special tokens left out).
    pub fn decode(&self, ids: &[u32]) -> Result<String, crate::invalid::Invalid> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| format!("tokenizer: {e}"))
            .map_err(crate::invalid::Invalid::from)
    }

    /// Byte spans of the rendered text that are trained: each assistant message's content
    /// and the end-of-turn marker right after it. The search for message `i` starts where
    /// the conversation rendered up to it (with the assistant's turn header) ends, so a
    /// reply that also occurs earlier (a choice letter, a role name) is found in its own
    /// turn.
    fn trained_spans(
        &self,
        text: &str,
        conversation: &Conversation,
    ) -> Result<Vec<(usize, usize)>, String> {
        if let Template::ChatMl = self.template {
            // Our own rendering knows where every reply is.
            return Ok(chatml(&conversation.messages, conversation.tools.as_deref()).1);
        }
        let mut spans = Vec::new();
        let mut cursor = 0;
        for (i, m) in conversation.messages.iter().enumerate() {
            if m.role != Role::Assistant || (m.content.is_empty() && m.tool_calls.is_none()) {
                continue;
            }
            let prefix = self.render_messages(conversation, i, true)?;
            // The turn as the template writes it: what rendering it adds to the
            // conversation so far and its generation prompt. Everything in it is the
            // model's to produce (content, tool calls, end-of-turn marker), so it is
            // trained, up to trailing whitespace.
            let through = self.render_messages(conversation, i + 1, false)?;
            if through.len() > prefix.len()
                && through.starts_with(prefix.as_str())
                && text.starts_with(through.as_str())
            {
                // Up to the end marker (a template may write more after the last turn,
                // e.g. Phi-3's eos), else without trailing whitespace.
                let turn = &through[prefix.len()..];
                let end = match turn.rfind(self.end_of_turn.as_str()) {
                    Some(at) if !self.end_of_turn.is_empty() => {
                        prefix.len() + at + self.end_of_turn.len()
                    }
                    _ => through.trim_end().len().max(prefix.len()),
                };
                if end > prefix.len() {
                    spans.push((prefix.len(), end));
                    cursor = end;
                    continue;
                }
            }
            if m.content.is_empty() {
                return Err(
                    "the chat template's text for an assistant turn with tool calls does not extend the conversation before it, so its tokens cannot be found"
                        .into(),
                );
            }
            if text.starts_with(prefix.as_str()) {
                cursor = cursor.max(prefix.len());
            }
            let at = text[cursor..].find(m.content.as_str()).ok_or_else(|| {
                "the chat template changes the assistant's text, so its tokens cannot be found"
                    .to_string()
            })? + cursor;
            let mut end = at + m.content.len();
            if !self.end_of_turn.is_empty() && text[end..].starts_with(self.end_of_turn.as_str()) {
                end += self.end_of_turn.len();
            }
            spans.push((at, end));
            cursor = end;
        }
        Ok(spans)
    }

    /// Token ids of the rendered conversation and which of them are trained: the whole
    /// text is tokenized at once (so merges and prefix spaces are as the model sees them)
    /// and a token is trained when its bytes overlap a trained span.
    pub fn encode(
        &self,
        conversation: &Conversation,
    ) -> Result<Tokenized, crate::invalid::Invalid> {
        let text = self.render(conversation)?;
        let spans = self.trained_spans(&text, conversation)?;
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| format!("tokenizer: {e}"))?;
        let mut trained = Vec::with_capacity(encoding.len());
        let mut span = 0;
        for &(start, end) in encoding.get_offsets() {
            while span < spans.len() && spans[span].1 <= start {
                span += 1;
            }
            trained.push(span < spans.len() && start < spans[span].1 && end > spans[span].0);
        }
        Ok(Tokenized {
            ids: encoding.get_ids().to_vec(),
            trained,
        })
    }
}

/// ChatML text of `messages` (and the offered `tools`), and the trained spans: each
/// assistant turn's content, tool calls and `<|im_end|>`.
///
/// Tool use is rendered the way Hermes-style ChatML models (Qwen2.5, Hermes 2/3) expect:
/// the tool schemas in a `<tools></tools>` block of the system turn (one JSON object per
/// line; a system turn is added when the conversation has none), each call as
/// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` in the assistant turn after
/// its content, and tool results as `tool` turns.
fn chatml(
    messages: &[crate::conversation::Message],
    tools: Option<&str>,
) -> (String, Vec<(usize, usize)>) {
    let mut text = String::new();
    let mut spans = Vec::new();
    let tools_block = tools.and_then(hf_tools).map(|tools| {
        format!(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n{}\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
            tools_block(&tools)
        )
    });
    let has_system = messages.first().is_some_and(|m| m.role == Role::System);
    if let (Some(block), false) = (&tools_block, has_system) {
        text.push_str("<|im_start|>system\n");
        text.push_str(block);
        text.push_str("<|im_end|>\n");
    }
    for (i, m) in messages.iter().enumerate() {
        text.push_str("<|im_start|>");
        text.push_str(m.role.as_str());
        text.push('\n');
        let start = text.len();
        text.push_str(&m.content);
        if let (0, Some(block), Role::System) = (i, &tools_block, m.role) {
            if !m.content.is_empty() {
                text.push_str("\n\n");
            }
            text.push_str(block);
        }
        for call in m
            .tool_calls
            .as_deref()
            .map(hf_tool_calls)
            .into_iter()
            .flatten()
        {
            if text.len() > start {
                text.push('\n');
            }
            text.push_str(&tool_call_block(&call));
        }
        text.push_str("<|im_end|>");
        if m.role == Role::Assistant && text.len() > start + "<|im_end|>".len() {
            spans.push((start, text.len()));
        }
        text.push('\n');
    }
    (text, spans)
}

/// The current UTC time formatted with the strftime codes chat templates use (`%d`, `%b`,
/// `%B`, `%Y`, `%m`, `%H`, `%M`, `%S`, `%%`): Llama-3.2's date line.
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// For templates that ignore tool use (many render only `content`, SmolLM2's among them):
/// each call is appended to its message's content as
/// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (the ChatML rendering's
/// form) and the schemas are put at the end of the system message (one is added first when
/// there is none), so no call is dropped and the model still learns to make it.
fn inline_tool_use(
    messages: &mut Vec<serde_json::Value>,
    tools: &mut Option<serde_json::Value>,
    calls: bool,
    schemas: bool,
) {
    if calls {
        for m in messages.iter_mut() {
            let Some(serde_json::Value::Array(list)) = m.get("tool_calls").cloned() else {
                continue;
            };
            let mut content = m["content"].as_str().unwrap_or_default().to_string();
            for call in &list {
                if !content.is_empty() {
                    content.push('\n');
                }
                content.push_str(&tool_call_block(call));
            }
            m["content"] = content.into();
            if let Some(object) = m.as_object_mut() {
                object.remove("tool_calls");
            }
        }
    }
    if !schemas {
        return;
    }
    if let Some(list) = tools.take() {
        let block = format!("You may call these functions:\n{}", tools_block(&list));
        match messages.first_mut() {
            Some(first) if first["role"] == "system" => {
                let content = first["content"].as_str().unwrap_or_default();
                first["content"] = if content.is_empty() {
                    block.into()
                } else {
                    format!("{content}\n\n{block}").into()
                };
            }
            _ => messages.insert(0, serde_json::json!({"role": "system", "content": block})),
        }
    }
}

/// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` for a call in HF's shape
/// (Hermes' key order: name first).
fn tool_call_block(call: &serde_json::Value) -> String {
    let function = &call["function"];
    format!(
        "<tool_call>\n{{\"name\": {}, \"arguments\": {}}}\n</tool_call>",
        python_json(&function["name"], None),
        python_json(&function["arguments"], None)
    )
}

/// `<tools>` with one schema per line, `</tools>`.
fn tools_block(tools: &serde_json::Value) -> String {
    let mut block = String::from("<tools>");
    for tool in tools.as_array().into_iter().flatten() {
        block.push('\n');
        block.push_str(&python_json(tool, None));
    }
    block.push_str("\n</tools>");
    block
}

/// Tool calls in Hugging Face's chat-template shape: `[{type: "function", function: {name,
/// arguments}, id?}]`, `arguments` as an object when it is a JSON object in a string (the
/// OpenAI wire form the store keeps), as templates expect.
fn hf_tool_calls(calls: &str) -> Vec<serde_json::Value> {
    let Ok(serde_json::Value::Array(list)) = serde_json::from_str::<serde_json::Value>(calls)
    else {
        return Vec::new();
    };
    list.into_iter()
        .map(|call| {
            let mut function = call
                .get("function")
                .cloned()
                .unwrap_or_else(|| call.clone());
            if let Some(serde_json::Value::String(args)) = function.get("arguments") {
                if let Ok(parsed @ serde_json::Value::Object(_)) = serde_json::from_str(args) {
                    function["arguments"] = parsed;
                }
            }
            let mut out = serde_json::json!({"type": "function", "function": function});
            if let Some(id) = call.get("id") {
                out["id"] = id.clone();
            }
            out
        })
        .collect()
}

/// Tool schemas in Hugging Face's shape: `{type: "function", function: {name, description,
/// parameters}}` (bare schemas are wrapped).
fn hf_tools(tools: &str) -> Option<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_str(tools).ok()?;
    let list = match value {
        serde_json::Value::Array(list) => list,
        one @ serde_json::Value::Object(_) => vec![one],
        _ => return None,
    };
    let wrapped: Vec<serde_json::Value> = list
        .into_iter()
        .map(|tool| {
            if tool.get("function").is_some() || tool.get("name").is_none() {
                tool
            } else {
                serde_json::json!({"type": "function", "function": tool})
            }
        })
        .collect();
    (!wrapped.is_empty()).then_some(serde_json::Value::Array(wrapped))
}

/// Messages as Hugging Face templates read them: `role`, `content`, `name`, `tool_calls`
/// in HF's shape, and on tool results the `tool_call_id` of the call they answer (the
/// preceding assistant turn's calls, in order).
fn hf_messages(messages: &[crate::conversation::Message]) -> Vec<serde_json::Value> {
    let mut pending: std::collections::VecDeque<serde_json::Value> = Default::default();
    messages
        .iter()
        .map(|m| {
            let mut v = serde_json::json!({"role": m.role.as_str(), "content": m.content});
            if let Some(name) = &m.name {
                v["name"] = name.clone().into();
            }
            if let Some(calls) = &m.tool_calls {
                let calls = hf_tool_calls(calls);
                pending = calls
                    .iter()
                    .map(|c| c.get("id").cloned().unwrap_or_default())
                    .collect();
                v["tool_calls"] = serde_json::Value::Array(calls);
            }
            if m.role == Role::Tool {
                if let Some(id) = pending.pop_front().filter(|id| !id.is_null()) {
                    v["tool_call_id"] = id;
                }
            }
            v
        })
        .collect()
}

/// JSON as Python's `json.dumps(value, ensure_ascii=False, indent=indent)` writes it (what
/// transformers' `tojson` filter gives templates): `", "` and `": "` separators, or
/// `indent` spaces per level.
pub fn python_json(value: &serde_json::Value, indent: Option<usize>) -> String {
    fn write(out: &mut String, value: &serde_json::Value, indent: Option<usize>, depth: usize) {
        let newline = |out: &mut String, depth: usize| {
            if let Some(n) = indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * depth));
            }
        };
        let (item_sep, key_sep) = if indent.is_some() {
            (",", ": ")
        } else {
            (", ", ": ")
        };
        match value {
            serde_json::Value::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    newline(out, depth + 1);
                    write(out, item, indent, depth + 1);
                }
                newline(out, depth);
                out.push(']');
            }
            serde_json::Value::Object(map) if !map.is_empty() => {
                out.push('{');
                for (i, (key, item)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    newline(out, depth + 1);
                    out.push_str(&serde_json::Value::String(key.clone()).to_string());
                    out.push_str(key_sep);
                    write(out, item, indent, depth + 1);
                }
                newline(out, depth);
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(&mut out, value, indent, 0);
    out
}

/// Trains a small byte-level BPE tokenizer (no prefix space, ChatML's markers as special
/// tokens) on the lines of `text_file` and writes it as `tokenizer.json` to `out`: a real
/// tokenizer for tests, benchmarks and demos when no model's tokenizer is at hand.
pub fn train_byte_level_bpe(
    text_file: &Path,
    vocab: usize,
    out: &Path,
) -> Result<(), crate::invalid::Invalid> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};

    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![
            AddedToken::from("<|im_start|>", true),
            AddedToken::from("<|im_end|>", true),
        ])
        .build()
        .into();
    tokenizer
        .train_from_files(&mut trainer, vec![text_file.to_string_lossy().into_owned()])
        .map_err(|e| format!("training a tokenizer on {}: {e}", text_file.display()))?;
    tokenizer
        .save(out, false)
        .map_err(|e| format!("{}: {e}", out.display()))
        .map_err(crate::invalid::Invalid::from)
}

/// Trains [`train_byte_level_bpe`] on the message texts of the store's first `examples`
/// examples (hash order), through a temporary text file beside `out`.
pub fn train_from_store(
    store: &crate::store::Store,
    examples: usize,
    vocab: usize,
    out: &Path,
) -> Result<(), crate::invalid::Invalid> {
    use std::io::Write;
    let text = out.with_extension("training.txt");
    let written = (|| -> Result<(), String> {
        let io = |e: std::io::Error| format!("{}: {e}", text.display());
        let mut file = std::io::BufWriter::new(std::fs::File::create(&text).map_err(io)?);
        let mut n = 0;
        let mut failure = None;
        store
            .for_each_example(|_, example| {
                if n < examples && failure.is_none() {
                    for m in &example.conversation.messages {
                        if let Err(e) = writeln!(file, "{}", m.content) {
                            failure = Some(e);
                        }
                    }
                    n += 1;
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        if let Some(e) = failure {
            return Err(io(e));
        }
        file.flush().map_err(io)
    })();
    let result = written.and_then(|()| train_byte_level_bpe(&text, vocab, out).map_err(|e| e.0));
    let _ = std::fs::remove_file(&text);
    result.map_err(crate::invalid::Invalid::from)
}

/// The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), rebuilt as a
/// Hugging Face tokenizer, with the file's chat template. Byte-level BPE vocabularies
/// (`tokenizer.ggml.model = gpt2`: SmolLM, Llama 3, Qwen, ...) are supported; for others
/// pass the model's tokenizer.json instead.
pub fn tokenizer_from_gguf(
    metadata: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
    origin: &Path,
) -> Result<ChatTokenizer, crate::invalid::Invalid> {
    use candle_core::quantized::gguf_file::Value;
    let fail = |m: String| format!("{}: {m}", origin.display());
    let strings = |key: &str| -> Result<Vec<String>, String> {
        match metadata.get(key) {
            Some(Value::Array(list)) => Ok(list
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    _ => String::new(),
                })
                .collect()),
            _ => Err(fail(format!("no `{key}` in the metadata"))),
        }
    };
    let id = |key: &str| -> Option<usize> {
        match metadata.get(key)? {
            Value::U32(v) => Some(*v as usize),
            Value::I32(v) => Some(*v as usize),
            Value::U64(v) => Some(*v as usize),
            _ => None,
        }
    };
    let kind = match metadata.get("tokenizer.ggml.model") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(
                fail("no tokenizer.ggml.model in the metadata; pass --tokenizer".into()).into(),
            )
        }
    };
    if kind != "gpt2" {
        return Err(fail(format!(
            "tokenizer type `{kind}` is not rebuilt from GGUF (only byte-level BPE, `gpt2`); pass --tokenizer with the model's tokenizer.json"
        ))
        .into());
    }
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| match v {
                Value::I32(t) => *t as i64,
                Value::U32(t) => *t as i64,
                _ => 1,
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are matched whole, before the model runs.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types.get(i) == Some(&3)})
        })
        .collect();
    let pre = match metadata.get("tokenizer.ggml.pre") {
        Some(Value::String(s)) => s.clone(),
        _ => "default".to_string(),
    };
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre.as_str() {
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
        }
        // SmolLM splits digits one by one before the GPT-2 byte-level split.
        "smollm" => serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        _ => byte_level,
    };
    // Llama 3's tokenizer looks whole words up in the vocabulary before merging.
    let ignore_merges = matches!(pre.as_str(), "llama-bpe" | "llama3" | "smaug-bpe");
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges},
    });
    let tokenizer: tokenizers::Tokenizer = serde_json::from_value(json)
        .map_err(|e| fail(format!("tokenizer in the metadata: {e}")))?;
    let token_at = |key: &str| id(key).and_then(|i| tokens.get(i)).cloned();
    let mut config = serde_json::json!({});
    if let Some(Value::String(template)) = metadata.get("tokenizer.chat_template") {
        config["chat_template"] = template.clone().into();
    }
    if let Some(bos) = token_at("tokenizer.ggml.bos_token_id") {
        config["bos_token"] = bos.into();
    }
    if let Some(eos) = token_at("tokenizer.ggml.eos_token_id") {
        config["eos_token"] = eos.into();
    }
    ChatTokenizer::from_parts(tokenizer, Some(config), origin)
}
