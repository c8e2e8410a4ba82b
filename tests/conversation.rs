use corpusdb::conversation::{ContentHash, Conversation, Message, Role};
use corpusdb::formats::parse_record;

fn conv(messages: &[(Role, &str)]) -> Conversation {
    let mut c = Conversation::new(messages.iter().map(|(r, t)| Message::new(*r, *t)).collect());
    c.normalize();
    c
}

#[test]
fn hash_of_the_canonical_form_is_pinned() {
    // Changing this value means every stored key changes: bump the schema version.
    // Computed independently: sha1(b"corpusdb-canonical/1\0" + b"U" + b"c" + u64le(12) +
    // b"What is 2+2?" + b"." + b"A" + b"c" + u64le(1) + b"4" + b".").
    let c = conv(&[(Role::User, "What is 2+2?"), (Role::Assistant, "4")]);
    assert_eq!(
        c.content_hash().to_hex(),
        "1a2deb9cf0b5a4b36fdf3d8a83a1d7e3a3f6ee50"
    );
    let again = conv(&[(Role::User, "What is 2+2?"), (Role::Assistant, "4")]);
    assert_eq!(c.content_hash(), again.content_hash());
}

#[test]
fn normalisation_folds_line_ends_unicode_forms_and_outer_space() {
    let base = conv(&[(Role::User, "Café\nau lait"), (Role::Assistant, "Oui.")]);
    let crlf = conv(&[(Role::User, "Café\r\nau lait"), (Role::Assistant, "Oui.")]);
    let decomposed = conv(&[
        (Role::User, "Cafe\u{301}\nau lait"),
        (Role::Assistant, "Oui."),
    ]);
    let padded = conv(&[
        (Role::User, "  Café\nau lait \n"),
        (Role::Assistant, "Oui.\t"),
    ]);
    assert_eq!(base.content_hash(), crlf.content_hash());
    assert_eq!(base.content_hash(), decomposed.content_hash());
    assert_eq!(base.content_hash(), padded.content_hash());
    // Inner whitespace is content.
    let inner = conv(&[(Role::User, "Café\n\nau lait"), (Role::Assistant, "Oui.")]);
    assert_ne!(base.content_hash(), inner.content_hash());
}

#[test]
fn framing_prevents_collisions_by_concatenation_or_role() {
    let hashes: Vec<ContentHash> = [
        conv(&[(Role::User, "ab"), (Role::Assistant, "c")]),
        conv(&[(Role::User, "a"), (Role::Assistant, "bc")]),
        conv(&[(Role::User, "abc"), (Role::Assistant, "")]),
        conv(&[(Role::System, "ab"), (Role::Assistant, "c")]),
        conv(&[(Role::Assistant, "ab"), (Role::User, "c")]),
        conv(&[(Role::User, "ab"), (Role::Assistant, "c"), (Role::User, "")]),
    ]
    .iter()
    .map(Conversation::content_hash)
    .collect();
    for (i, a) in hashes.iter().enumerate() {
        for b in &hashes[i + 1..] {
            assert_ne!(a, b);
        }
    }
    let mut with_tools = conv(&[(Role::User, "ab"), (Role::Assistant, "c")]);
    with_tools.tools = Some("[]".into());
    assert_ne!(with_tools.content_hash(), hashes[0]);
    let mut named = conv(&[(Role::User, "ab"), (Role::Assistant, "c")]);
    named.messages[0].name = Some("ann".into());
    assert_ne!(named.content_hash(), hashes[0]);
}

#[test]
fn the_same_conversation_in_three_formats_has_one_hash() {
    let alpaca = parse_record(
        "alpaca",
        br#"{"instruction": "Name a color.", "input": "", "output": "Blue."}"#,
    )
    .unwrap();
    let messages = parse_record(
        "messages",
        br#"{"messages": [{"role": "user", "content": "Name a color.\r\n"}, {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}"#,
    )
    .unwrap();
    let sharegpt = parse_record(
        "sharegpt",
        br#"{"id": "x", "conversations": [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": " Blue. "}]}"#,
    )
    .unwrap();
    assert_eq!(alpaca.content_hash(), messages.content_hash());
    assert_eq!(alpaca.content_hash(), sharegpt.content_hash());
}

#[test]
fn sharegpt_role_aliases_and_alpaca_input() {
    for alias in ["gpt", "chatgpt", "bing", "bard", "assistant"] {
        let record = format!(
            r#"{{"conversations": [{{"from": "user", "value": "q"}}, {{"from": "{alias}", "value": "a"}}]}}"#
        );
        let c = parse_record("sharegpt", record.as_bytes()).unwrap();
        assert_eq!(c.messages[1].role, Role::Assistant, "{alias}");
    }
    let c = parse_record("sharegpt", br#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#).unwrap();
    assert_eq!(
        c.messages.iter().map(|m| m.role).collect::<Vec<_>>(),
        [Role::System, Role::User, Role::Assistant]
    );
    let err = parse_record(
        "sharegpt",
        br#"{"conversations": [{"from": "wizard", "value": "q"}]}"#,
    )
    .unwrap_err();
    assert_eq!(err, "unknown role `wizard` in turn 1");

    let c = parse_record(
        "alpaca",
        br#"{"instruction": "Translate", "input": "hola", "output": "hello"}"#,
    )
    .unwrap();
    assert_eq!(c.messages[0].content, "Translate\n\nhola");
    assert_eq!(c.turn_count(), 1);
}

#[test]
fn tool_calls_and_schemas_are_part_of_the_content() {
    let record = br#"{"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "messages": [{"role": "user", "content": "call f"},
                     {"role": "assistant", "content": null, "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "name": "f", "content": "ok"},
                     {"role": "assistant", "content": "done"}]}"#;
    let c = parse_record("messages", record).unwrap();
    assert_eq!(
        c.messages[1].tool_calls.as_deref(),
        Some(r#"[{"function":{"arguments":"{}","name":"f"},"id":"1"}]"#)
    );
    assert_eq!(c.messages[2].role, Role::Tool);
    assert!(c.tools.is_some());
}

#[test]
fn conversations_that_cannot_train_are_refused() {
    assert_eq!(
        parse_record("messages", br#"{"messages": []}"#).unwrap_err(),
        "empty conversation: no messages"
    );
    assert_eq!(
        parse_record("alpaca", br#"{"instruction": "x", "output": "   "}"#).unwrap_err(),
        "no assistant message with content"
    );
}

#[test]
fn legacy_function_calls_and_empty_tool_lists_dedupe_with_the_current_form() {
    let current = parse_record(
        "messages",
        br#"{"tools": [{"type": "function", "function": {"name": "f"}}], "messages": [{"role": "user", "content": "go"},
            {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}"#,
    )
    .unwrap();
    let legacy = parse_record(
        "messages",
        br#"{"functions": [{"name": "f"}], "messages": [{"role": "user", "content": "go"},
            {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}]}"#,
    )
    .unwrap();
    assert_eq!(current.content_hash(), legacy.content_hash());

    let plain = parse_record("messages", br#"{"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#).unwrap();
    let empty_lists = parse_record("messages", br#"{"tools": [], "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "tool_calls": []}]}"#).unwrap();
    assert_eq!(plain.content_hash(), empty_lists.content_hash());
    assert_eq!(
        parse_record("messages", br#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": []}]}"#).unwrap_err(),
        "message 2 lacks required field `content`"
    );
    let sharegpt_spelled_openai = parse_record("sharegpt", br#"{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#).unwrap();
    assert_eq!(sharegpt_spelled_openai.messages.len(), 2);
}

#[test]
fn alpaca_parts_are_trimmed_before_they_are_joined() {
    let tidy = parse_record(
        "alpaca",
        br#"{"instruction": "Sum", "input": "1 2", "output": "3"}"#,
    )
    .unwrap();
    let spaced = parse_record(
        "alpaca",
        br#"{"instruction": "Sum  \r\n", "input": "\n1 2 ", "output": "3"}"#,
    )
    .unwrap();
    assert_eq!(tidy.content_hash(), spaced.content_hash());
    assert_eq!(spaced.messages[0].content, "Sum\n\n1 2");
}
