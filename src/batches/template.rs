//! Conversations to token ids with a loss mask: the model's chat template, then the
//! tokenizer.
//!
//! The template is `chat_template` of `tokenizer_config.json`, rendered with minijinja the
//! way Hugging Face renders it (`trim_blocks`, `lstrip_blocks`, Python string methods,
//! `raise_exception`, `bos_token` / `eos_token`, `add_generation_prompt = false`); without
//! one, ChatML (`<|im_start|>role\n...<|im_end|>\n`). In the rendered text each assistant
//! message's content, plus the end-of-turn token right after it, is a trained span; the
//! whole text is tokenized once and every token whose bytes overlap a trained span is
//! trained.

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
}

enum Template {
    Jinja(Box<minijinja::Environment<'static>>, Specials),
    ChatMl,
}

struct Specials {
    bos: String,
    eos: String,
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
    pub fn load(path: &Path) -> Result<ChatTokenizer, String> {
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
        ChatTokenizer::from_parts(tokenizer, config, &config_file)
    }

    /// A tokenizer and a `tokenizer_config.json`-like object (`chat_template`,
    /// `bos_token`, `eos_token`); `origin` names it in errors.
    pub fn from_parts(
        tokenizer: tokenizers::Tokenizer,
        config: Option<serde_json::Value>,
        origin: &Path,
    ) -> Result<ChatTokenizer, String> {
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
        let specials = Specials {
            bos: token_text(config.as_ref().and_then(|c| c.get("bos_token"))).unwrap_or_default(),
            eos: token_text(config.as_ref().and_then(|c| c.get("eos_token"))).unwrap_or_default(),
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
                env.add_template_owned("chat", source)
                    .map_err(|e| format!("{}: chat_template: {e}", config_file.display()))?;
                // Templates end assistant turns with their own marker; ChatML-style
                // templates use <|im_end|>, most others the eos token.
                let end = if env
                    .get_template("chat")
                    .map(|t| t.source().contains("<|im_end|>"))
                    .unwrap_or(false)
                {
                    "<|im_end|>".to_string()
                } else {
                    specials.eos.clone()
                };
                (Template::Jinja(Box::new(env), specials), end)
            }
            None => (Template::ChatMl, "<|im_end|>".to_string()),
        };
        let pad_id = ["<pad>", "<|pad|>", "[PAD]", "<|endoftext|>", "</s>"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .unwrap_or(0);
        Ok(ChatTokenizer {
            tokenizer,
            template,
            end_of_turn,
            pad_id,
        })
    }

    /// Whether a chat template from tokenizer_config.json is used (else ChatML).
    pub fn has_model_template(&self) -> bool {
        matches!(self.template, Template::Jinja(..))
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// The conversation as the model sees it.
    pub fn render(&self, conversation: &Conversation) -> Result<String, String> {
        self.render_messages(conversation, conversation.messages.len(), false)
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
                let (mut text, _) = chatml(shown);
                if add_generation_prompt {
                    text.push_str("<|im_start|>assistant\n");
                }
                Ok(text)
            }
            Template::Jinja(env, specials) => {
                let messages: Vec<serde_json::Value> = shown
                    .iter()
                    .map(|m| {
                        let mut v =
                            serde_json::json!({"role": m.role.as_str(), "content": m.content});
                        if let Some(name) = &m.name {
                            v["name"] = name.clone().into();
                        }
                        if let Some(calls) = &m.tool_calls {
                            v["tool_calls"] =
                                serde_json::from_str(calls).unwrap_or(serde_json::Value::Null);
                        }
                        v
                    })
                    .collect();
                let tools: Option<serde_json::Value> = conversation
                    .tools
                    .as_deref()
                    .and_then(|t| serde_json::from_str(t).ok());
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
    pub fn encode_prompt(&self, conversation: &Conversation) -> Result<Vec<u32>, String> {
        let text = self.render_messages(conversation, conversation.messages.len(), true)?;
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| format!("tokenizer: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids that end an assistant turn: the end-of-turn marker and the eos token.
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
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Text of generated ids (special tokens left out).
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| format!("tokenizer: {e}"))
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
            return Ok(chatml(&conversation.messages).1);
        }
        let mut spans = Vec::new();
        let mut cursor = 0;
        for (i, m) in conversation.messages.iter().enumerate() {
            if m.role != Role::Assistant || m.content.is_empty() {
                continue;
            }
            let prefix = self.render_messages(conversation, i, true)?;
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
    pub fn encode(&self, conversation: &Conversation) -> Result<Tokenized, String> {
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

/// ChatML text of `messages`, and the trained spans: each assistant reply, with the
/// `<|im_end|>` right after it when nothing (tool calls) comes between.
fn chatml(messages: &[crate::conversation::Message]) -> (String, Vec<(usize, usize)>) {
    let mut text = String::new();
    let mut spans = Vec::new();
    for m in messages {
        text.push_str("<|im_start|>");
        text.push_str(m.role.as_str());
        text.push('\n');
        let start = text.len();
        text.push_str(&m.content);
        let content_end = text.len();
        if let Some(calls) = &m.tool_calls {
            if !m.content.is_empty() {
                text.push('\n');
            }
            text.push_str(calls);
        }
        text.push_str("<|im_end|>");
        if m.role == Role::Assistant && !m.content.is_empty() {
            let end = if m.tool_calls.is_some() {
                content_end
            } else {
                text.len()
            };
            spans.push((start, end));
        }
        text.push('\n');
    }
    (text, spans)
}

/// Trains a small byte-level BPE tokenizer (no prefix space, ChatML's markers as special
/// tokens) on the lines of `text_file` and writes it as `tokenizer.json` to `out`: a real
/// tokenizer for tests, benchmarks and demos when no model's tokenizer is at hand.
pub fn train_byte_level_bpe(text_file: &Path, vocab: usize, out: &Path) -> Result<(), String> {
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
}

/// Trains [`train_byte_level_bpe`] on the message texts of the store's first `examples`
/// examples (hash order), through a temporary text file beside `out`.
pub fn train_from_store(
    store: &crate::store::Store,
    examples: usize,
    vocab: usize,
    out: &Path,
) -> Result<(), String> {
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
    let result = written.and_then(|()| train_byte_level_bpe(&text, vocab, out));
    let _ = std::fs::remove_file(&text);
    result
}

/// The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), rebuilt as a
/// Hugging Face tokenizer, with the file's chat template. Byte-level BPE vocabularies
/// (`tokenizer.ggml.model = gpt2`: SmolLM, Llama 3, Qwen, ...) are supported; for others
/// pass the model's tokenizer.json instead.
pub fn tokenizer_from_gguf(
    metadata: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
    origin: &Path,
) -> Result<ChatTokenizer, String> {
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
            return Err(fail(
                "no tokenizer.ggml.model in the metadata; pass --tokenizer".into(),
            ))
        }
    };
    if kind != "gpt2" {
        return Err(fail(format!(
            "tokenizer type `{kind}` is not rebuilt from GGUF (only byte-level BPE, `gpt2`); pass --tokenizer with the model's tokenizer.json"
        )));
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
