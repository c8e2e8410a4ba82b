//! Chat templates and loss masks for tool use: tool calls are rendered and trained, tool
//! schemas reach the prompt, and the end-of-turn marker comes from the template.

use corpusdb::batches::ChatTokenizer;
use corpusdb::conversation::{Conversation, Message, Role};

use super::curriculum::trained_tokenizer;

const TOOLS: &str = r#"[{"function":{"description":"Current weather","name":"get_weather","parameters":{"properties":{"city":{"type":"string"}},"required":["city"],"type":"object"}},"type":"function"}]"#;

/// A function-calling exchange as the store keeps it (OpenAI wire form: `arguments` is a
/// JSON string).
fn tool_conversation() -> Conversation {
    let mut call = Message::new(Role::Assistant, "");
    call.tool_calls = Some(
        r#"[{"function":{"arguments":"{\"city\":\"Paris\"}","name":"get_weather"},"id":"call12345","type":"function"}]"#
            .into(),
    );
    let mut result = Message::new(Role::Tool, r#"{"temp": 21}"#);
    result.name = Some("get_weather".into());
    Conversation {
        messages: vec![
            Message::new(Role::System, "You are helpful."),
            Message::new(Role::User, "Weather in Paris?"),
            call,
            result,
            Message::new(Role::Assistant, "It is 21 degrees in Paris."),
        ],
        tools: Some(TOOLS.into()),
    }
}

/// The text of the trained tokens, each trained run on its own line.
fn trained_runs(tokenizer: &ChatTokenizer, conversation: &Conversation) -> Vec<String> {
    let encoded = tokenizer.encode(conversation).unwrap();
    let mut runs = Vec::new();
    let mut current: Vec<u32> = Vec::new();
    for (&id, &trained) in encoded.ids.iter().zip(&encoded.trained) {
        if trained {
            current.push(id);
        } else if !current.is_empty() {
            runs.push(tokenizer.tokenizer().decode(&current, false).unwrap());
            current.clear();
        }
    }
    if !current.is_empty() {
        runs.push(tokenizer.tokenizer().decode(&current, false).unwrap());
    }
    runs
}

fn tokenizer_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = trained_tokenizer(
        dir.path(),
        "weather in paris get_weather city temp degrees you are helpful tool_call tools function\n",
    );
    (dir, path)
}

#[test]
fn chatml_renders_and_trains_tool_calls_and_offers_the_schemas() {
    let (_dir, path) = tokenizer_dir();
    let chatml = ChatTokenizer::load(&path).unwrap();
    let conversation = tool_conversation();
    let text = chatml.render(&conversation).unwrap();
    // The schemas in the system turn, one JSON object per line, Python's spacing.
    assert!(
        text.starts_with("<|im_start|>system\nYou are helpful.\n\n# Tools\n"),
        "{text}"
    );
    assert!(
        text.contains("<tools>\n{\"function\": {\"description\": \"Current weather\", \"name\": \"get_weather\", \"parameters\": {\"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"], \"type\": \"object\"}}, \"type\": \"function\"}\n</tools>"),
        "{text}"
    );
    assert!(
        text.contains("<|im_start|>tool\n{\"temp\": 21}<|im_end|>\n"),
        "{text}"
    );
    // The call turn is trained: the call (arguments as an object) and the end marker.
    assert_eq!(
        trained_runs(&chatml, &conversation),
        vec![
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>",
            "It is 21 degrees in Paris.<|im_end|>",
        ]
    );
    assert_eq!(chatml.end_of_turn(), "<|im_end|>");
}

/// A tokenizer_config.json-style template that renders `tool_calls` the way Qwen2.5's
/// does (HF shape: `tool_call.function.name`, `arguments` an object through `tojson`).
const TOOL_TEMPLATE: &str = "{% if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}{% if message.tool_calls %}{% for tc in message.tool_calls %}<tool_call>{{ tc.function.name }} {{ tc.function.arguments | tojson }} {{ tc.id }}</tool_call>{% endfor %}{% endif %}{% if message.tool_call_id %} (answers {{ message.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn with_template(
    path: &std::path::Path,
    template: &str,
    eos: &str,
    special: &[&str],
) -> ChatTokenizer {
    let mut tokenizer = tokenizers::Tokenizer::from_file(path).unwrap();
    let added: Vec<tokenizers::AddedToken> = special
        .iter()
        .map(|t| tokenizers::AddedToken::from(t.to_string(), true))
        .collect();
    tokenizer.add_special_tokens(&added);
    ChatTokenizer::from_parts(
        tokenizer,
        Some(serde_json::json!({"chat_template": template, "eos_token": eos})),
        std::path::Path::new("tokenizer_config.json"),
    )
    .unwrap()
}

#[test]
fn a_model_template_gets_hugging_face_tool_variables_and_trains_the_calls() {
    let (_dir, path) = tokenizer_dir();
    let model = with_template(&path, TOOL_TEMPLATE, "<|im_end|>", &[]);
    let conversation = tool_conversation();
    let text = model.render(&conversation).unwrap();
    assert!(
        text.starts_with(
            "<|im_start|>system\n{\"function\": {\"description\": \"Current weather\""
        ),
        "{text}"
    );
    assert!(
        text.contains("{\"temp\": 21} (answers call12345)<|im_end|>"),
        "{text}"
    );
    assert_eq!(model.end_of_turn(), "<|im_end|>");
    assert_eq!(
        trained_runs(&model, &conversation),
        vec![
            "<tool_call>get_weather {\"city\": \"Paris\"} call12345</tool_call><|im_end|>",
            "It is 21 degrees in Paris.<|im_end|>",
        ]
    );
}

#[test]
fn the_end_of_turn_marker_is_read_from_the_template_or_refused() {
    let (_dir, path) = tokenizer_dir();
    // Gemma-style: the marker is a special token that is neither ChatML's nor the eos.
    let gemma = "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";
    let model = with_template(
        &path,
        gemma,
        "<eos>",
        &["<start_of_turn>", "<end_of_turn>", "<eos>"],
    );
    assert_eq!(model.end_of_turn(), "<end_of_turn>");
    let chat = Conversation::new(vec![
        Message::new(Role::User, "Weather in Paris?"),
        Message::new(Role::Assistant, "It is 21 degrees."),
    ]);
    assert_eq!(
        trained_runs(&model, &chat),
        vec!["It is 21 degrees.<end_of_turn>"]
    );
    model.require_end_of_turn().unwrap();

    // A template that writes nothing after the reply: refused, with the way out.
    let bare = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}";
    let mut model = with_template(&path, bare, "", &[]);
    assert_eq!(model.end_of_turn(), "");
    let refused = model.require_end_of_turn().unwrap_err();
    assert!(refused.0.contains("end_of_turn:"), "{refused}");
    assert!(refused.0.contains("tokenizer_config.json"), "{refused}");
    model.set_end_of_turn("<|im_end|>");
    model.require_end_of_turn().unwrap();
}

const SPECIALS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|endoftext|>",
];

/// A public model's template (tests/fixtures/templates) over the test tokenizer with the
/// model's special tokens added.
fn public(path: &std::path::Path, name: &str) -> ChatTokenizer {
    let file = format!(
        "{}/tests/fixtures/templates/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let mut tokenizer = tokenizers::Tokenizer::from_file(path).unwrap();
    let added: Vec<tokenizers::AddedToken> = SPECIALS
        .iter()
        .map(|t| tokenizers::AddedToken::from(t.to_string(), true))
        .collect();
    tokenizer.add_special_tokens(&added);
    ChatTokenizer::from_parts(tokenizer, Some(config), std::path::Path::new(&file)).unwrap()
}

#[test]
fn public_templates_train_each_reply_with_its_own_end_marker() {
    let (_dir, path) = tokenizer_dir();
    let chat = Conversation::new(vec![
        Message::new(Role::User, "Weather in Paris?"),
        Message::new(Role::Assistant, "It is 21 degrees."),
        Message::new(Role::User, "And tomorrow?"),
        Message::new(Role::Assistant, "Rain."),
    ]);
    // Mistral's replies start with the space after `[/INST]`: the model writes it.
    for (name, lead, marker) in [
        ("llama-3.1", "", "<|eot_id|>"),
        ("qwen2.5", "", "<|im_end|>"),
        ("mistral-v0.3", " ", "</s>"),
        ("gemma-2", "", "<end_of_turn>"),
        ("phi-3", "", "<|end|>"),
        ("smollm2", "", "<|im_end|>"),
    ] {
        let model = public(&path, name);
        assert_eq!(model.end_of_turn(), marker, "{name}");
        let runs = trained_runs(&model, &chat);
        assert_eq!(
            runs,
            vec![
                format!("{lead}It is 21 degrees.{marker}"),
                format!("{lead}Rain.{marker}")
            ],
            "{name}: {}",
            model.render(&chat).unwrap()
        );
    }
}

#[test]
fn public_templates_with_tools_show_the_schemas_and_train_the_calls() {
    let (_dir, path) = tokenizer_dir();
    let mut conversation = tool_conversation();
    // Mistral's template takes no system turn with tools in all versions; keep it plain.
    conversation.messages.remove(0);
    for (name, lead, marker) in [
        ("llama-3.1", "", "<|eot_id|>"),
        ("qwen2.5", "", "<|im_end|>"),
        ("mistral-v0.3", " ", "</s>"),
    ] {
        let model = public(&path, name);
        let text = model
            .render(&conversation)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            text.contains("Current weather"),
            "{name}: no schema in {text}"
        );
        let runs = trained_runs(&model, &conversation);
        assert_eq!(runs.len(), 2, "{name}: {runs:?}\n{text}");
        assert!(
            runs[0].contains("get_weather")
                && runs[0].contains("Paris")
                && runs[0].ends_with(marker),
            "{name}: the call turn trains {:?}\n{text}",
            runs[0]
        );
        assert_eq!(
            runs[1],
            format!("{lead}It is 21 degrees in Paris.{marker}"),
            "{name}"
        );
    }
}

#[test]
fn a_template_that_ignores_tool_use_gets_the_calls_in_the_text() {
    let (_dir, path) = tokenizer_dir();
    // SmolLM2's template renders only `content`.
    let model = public(&path, "smollm2");
    assert_eq!(model.inlines_tool_use(), (true, true));
    let conversation = tool_conversation();
    let text = model.render(&conversation).unwrap();
    assert!(
        text.contains("You are helpful.\n\nYou may call these functions:\n<tools>\n{\"function\": {\"description\": \"Current weather\""),
        "{text}"
    );
    assert_eq!(
        trained_runs(&model, &conversation),
        vec![
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>",
            "It is 21 degrees in Paris.<|im_end|>",
        ]
    );
    // Templates that write them are left alone.
    assert_eq!(public(&path, "qwen2.5").inlines_tool_use(), (false, false));
    assert_eq!(
        public(&path, "llama-3.1").inlines_tool_use(),
        (false, false)
    );
}

/// The Python interpreter for the transformers comparison: `CORPUSDB_PYTHON`, else `python3`.
fn python() -> std::path::PathBuf {
    std::env::var_os("CORPUSDB_PYTHON").map_or_else(|| "python3".into(), Into::into)
}

#[test]
#[ignore = "needs Python with transformers (CORPUSDB_PYTHON; scripts/python-checks runs it)"]
fn token_ids_equal_transformers_apply_chat_template() {
    let (_dir, path) = tokenizer_dir();
    let plain = Conversation::new(vec![
        Message::new(Role::User, "Weather in Paris?"),
        Message::new(Role::Assistant, "It is 21 degrees."),
    ]);
    let mut system = plain.clone();
    system
        .messages
        .insert(0, Message::new(Role::System, "You are helpful."));
    let mut multi = plain.clone();
    multi
        .messages
        .push(Message::new(Role::User, "And tomorrow?"));
    multi.messages.push(Message::new(Role::Assistant, "Rain."));
    let mut tools = tool_conversation();
    tools.messages.remove(0);
    // The same conversations in Hugging Face's shape, as a user would pass them.
    let hf = |c: &Conversation| -> serde_json::Value {
        let messages: Vec<serde_json::Value> = c
            .messages
            .iter()
            .map(|m| {
                let mut v = serde_json::json!({"role": m.role.as_str(), "content": m.content});
                if let Some(name) = &m.name {
                    v["name"] = name.clone().into();
                }
                if m.tool_calls.is_some() {
                    v["tool_calls"] = serde_json::json!([{"type": "function", "id": "call12345",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]);
                }
                if m.role == Role::Tool {
                    v["tool_call_id"] = "call12345".into();
                }
                v
            })
            .collect();
        let tools: Option<serde_json::Value> =
            c.tools.as_deref().map(|t| serde_json::from_str(t).unwrap());
        serde_json::json!({"messages": messages, "tools": tools})
    };
    for (name, conversations) in [
        ("llama-3.1", vec![&plain, &system, &multi, &tools]),
        ("qwen2.5", vec![&plain, &system, &multi, &tools]),
        ("mistral-v0.3", vec![&plain, &multi, &tools]),
        ("gemma-2", vec![&plain, &multi]),
        ("phi-3", vec![&plain, &system, &multi]),
        ("smollm2", vec![&plain, &system, &multi]),
    ] {
        let file = format!(
            "{}/tests/fixtures/templates/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let request = serde_json::json!({
            "tokenizer": path,
            "config": config,
            "special_tokens": SPECIALS,
            "conversations": conversations.iter().map(|c| hf(c)).collect::<Vec<_>>(),
        });
        let mut child = std::process::Command::new(python())
            .arg(format!(
                "{}/tests/python/chat_template_ids.py",
                env!("CARGO_MANIFEST_DIR")
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("a Python interpreter (set CORPUSDB_PYTHON)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{name}: transformers failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reference: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let model = public(&path, name);
        for (i, conversation) in conversations.iter().enumerate() {
            let ours = model.encode(conversation).unwrap().ids;
            let theirs: Vec<u32> = serde_json::from_value(reference["ids"][i].clone()).unwrap();
            assert_eq!(
                ours,
                theirs,
                "{name}, conversation {i}:\nours:   {:?}\ntheirs: {:?}",
                model.render(conversation).unwrap(),
                model.tokenizer().decode(&theirs, false).unwrap()
            );
        }
    }
}

#[test]
fn generation_config_eos_ids_end_generation_too() {
    let (dir, path) = tokenizer_dir();
    let without = ChatTokenizer::load(&path).unwrap().stop_ids();
    assert!(!without.contains(&7), "{without:?}");
    // Llama-3 lists several (end of text, end of message, end of turn).
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": [7, 9]}"#,
    )
    .unwrap();
    let with = ChatTokenizer::load(dir.path()).unwrap().stop_ids();
    assert!(with.contains(&7) && with.contains(&9), "{with:?}");
    std::fs::write(dir.path().join("generation_config.json"), "{not json").unwrap();
    let refused = ChatTokenizer::load(dir.path()).err().unwrap();
    assert!(refused.0.contains("generation_config.json"), "{refused}");
}

#[test]
fn ignored_tool_calls_can_be_refused_instead_of_inlined() {
    let (_dir, path) = tokenizer_dir();
    let mut model = public(&path, "smollm2");
    model.refuse_ignored_tool_calls();
    let refused = model.encode(&tool_conversation()).unwrap_err();
    assert!(
        refused.0.contains("inline_tool_calls is false"),
        "{refused}"
    );
    // Conversations without tool use are unaffected.
    let plain = Conversation::new(vec![
        Message::new(Role::User, "Weather in Paris?"),
        Message::new(Role::Assistant, "It is 21 degrees."),
    ]);
    assert_eq!(
        trained_runs(&model, &plain),
        vec!["It is 21 degrees.<|im_end|>"]
    );
}
