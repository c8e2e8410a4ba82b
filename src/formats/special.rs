//! Record shapes that need a little code rather than a field mapping: Glaive function
//! calling, multiple choice (MMLU, ARC), PRM800K step lists, HotpotQA and MS MARCO.

use crate::reject::RejectReason;
use serde_json::{json, Value};

use crate::conversation::{canonical_json, Conversation, Message, Role};

use super::mapping::split_transcript;
use super::template::scalar;
use super::{Example, UNANSWERABLE};

fn str_field<'v>(record: &'v Value, field: &str) -> Result<&'v str, RejectReason> {
    match record.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(Value::Null) | None => Err(RejectReason::missing_field(
            field,
            format!("lacks required field `{field}`"),
        )),
        Some(_) => Err(format!("field `{field}` is not a string").into()),
    }
}

fn single(example: Example) -> Vec<Result<Example, RejectReason>> {
    vec![Ok(example)]
}

/// One question and its answer.
fn exchange(
    user: impl Into<String>,
    assistant: impl Into<String>,
) -> Vec<Result<Example, RejectReason>> {
    single(Example::new(Conversation::new(vec![
        Message::new(Role::User, user),
        Message::new(Role::Assistant, assistant),
    ])))
}

/// Glaive function calling v2: `{"system": "SYSTEM: ... -\n{schema}\n{schema}", "chat":
/// "USER: ...\n\n\nASSISTANT: <functioncall> {...} <|endoftext|>\n\n\nFUNCTION RESPONSE:
/// ..."}`. Function schemas become the example's tools, `<functioncall>` payloads become
/// tool calls, and function responses become tool messages.
pub fn glaive(record: &Value) -> Result<Vec<Result<Example, RejectReason>>, RejectReason> {
    let system = str_field(record, "system")?;
    let chat = str_field(record, "chat")?;
    let system = system.trim();
    let system = system.strip_prefix("SYSTEM:").unwrap_or(system).trim();
    // The function schemas are JSON objects following the prose.
    let (prose, schemas) = match system.find('{') {
        Some(at) => (&system[..at], &system[at..]),
        None => (system, ""),
    };
    let mut tools = Vec::new();
    for schema in serde_json::Deserializer::from_str(schemas).into_iter::<Value>() {
        let schema =
            schema.map_err(|e| format!("field `system`: function schema is not JSON: {e}"))?;
        tools.push(json!({"type": "function", "function": schema}));
    }
    let prose = prose.trim().trim_end_matches('-').trim();
    let markers = [
        ("USER:".to_string(), Role::User),
        ("ASSISTANT:".to_string(), Role::Assistant),
        ("FUNCTION RESPONSE:".to_string(), Role::Tool),
    ];
    let mut turns = Vec::new();
    split_transcript(chat, &markers, &mut turns).map_err(|e| format!("field `chat`: {e}"))?;
    let mut messages = Vec::with_capacity(turns.len() + 1);
    if !prose.is_empty() {
        messages.push(Message::new(Role::System, prose));
    }
    for mut turn in turns {
        let text = turn.content.replace("<|endoftext|>", "");
        turn.content = text.trim().to_string();
        if turn.role == Role::Assistant {
            if let Some(at) = turn.content.find("<functioncall>") {
                let call = turn.content[at + "<functioncall>".len()..].trim();
                turn.tool_calls = Some(function_call(call)?);
                turn.content = turn.content[..at].trim().to_string();
            }
        }
        messages.push(turn);
    }
    let mut conversation = Conversation::new(messages);
    if !tools.is_empty() {
        conversation.tools = Some(canonical_json(&Value::Array(tools)));
    }
    Ok(single(Example::new(conversation)))
}

/// A Glaive `<functioncall>` payload as an OpenAI tool call list. Glaive quotes the
/// arguments object in single quotes (`"arguments": '{"a": 1}'`), which is not JSON.
fn function_call(text: &str) -> Result<String, RejectReason> {
    let parsed: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => {
            let fixed = match (text.find('\''), text.rfind('\'')) {
                (Some(a), Some(b)) if a < b => {
                    format!("{}{}{}", &text[..a], &text[a + 1..b], &text[b + 1..])
                }
                _ => text.to_string(),
            };
            serde_json::from_str(&fixed).map_err(|e| {
                format!(
                    "function call is not JSON ({e}): `{}`",
                    super::excerpt(text, 60)
                )
            })?
        }
    };
    let name = parsed.get("name").and_then(Value::as_str).ok_or_else(|| {
        RejectReason::missing_field("name", "function call lacks required field `name`")
    })?;
    let arguments = match parsed.get("arguments") {
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v) => canonical_json(&v),
            Err(_) => s.clone(),
        },
        Some(v) => canonical_json(v),
        None => "{}".to_string(),
    };
    Ok(canonical_json(&json!([{
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }])))
}

/// Multiple choice: `question` with `choices` (a list, or `{"text": [...], "label": [...]}`)
/// and `answer` (an index or a letter) or `answerKey` (a label). The user sees the question
/// and the lettered choices; the assistant answers with the letter and the choice.
pub fn multiple_choice(record: &Value) -> Result<Vec<Result<Example, RejectReason>>, RejectReason> {
    let question = str_field(record, "question")?;
    let choices = record
        .get("choices")
        .or_else(|| record.get("options"))
        .ok_or_else(|| RejectReason::missing_field("choices", "lacks required field `choices`"))?;
    let (texts, labels): (Vec<String>, Vec<String>) = match choices {
        Value::Array(items) => {
            let texts = items
                .iter()
                .map(|v| {
                    let mut s = String::new();
                    scalar(v, &mut s);
                    s
                })
                .collect::<Vec<_>>();
            let labels = (0..texts.len())
                .map(|i| ((b'A' + i as u8) as char).to_string())
                .collect();
            (texts, labels)
        }
        Value::Object(map) => {
            let list = |name: &str| -> Result<Vec<String>, String> {
                map.get(name)
                    .and_then(Value::as_array)
                    .ok_or_else(|| format!("field `choices.{name}` is missing or not a list"))
                    .map(|items| {
                        items
                            .iter()
                            .map(|v| {
                                let mut s = String::new();
                                scalar(v, &mut s);
                                s
                            })
                            .collect()
                    })
            };
            (list("text")?, list("label")?)
        }
        _ => return Err("field `choices` is not a list".into()),
    };
    if texts.is_empty() || texts.len() != labels.len() {
        return Err("field `choices` is empty or its texts and labels differ in number".into());
    }
    let answer = record
        .get("answerKey")
        .or_else(|| record.get("answer"))
        .ok_or_else(|| RejectReason::missing_field("answer", "lacks required field `answer`"))?;
    let index = match answer {
        Value::Number(n) => n.as_u64().map(|n| n as usize),
        Value::String(s) => labels
            .iter()
            .position(|l| l.eq_ignore_ascii_case(s.trim()))
            .or_else(|| s.trim().parse::<usize>().ok()),
        _ => None,
    }
    .filter(|&i| i < texts.len())
    .ok_or_else(|| {
        format!(
            "answer {} is not one of the {} choices",
            canonical_json(answer),
            texts.len()
        )
    })?;
    let mut user = question.trim().to_string();
    user.push_str("\n\n");
    for (i, (label, text)) in labels.iter().zip(&texts).enumerate() {
        if i > 0 {
            user.push('\n');
        }
        user.push_str(&format!("{label}. {}", text.trim()));
    }
    let reply = format!("{}. {}", labels[index], texts[index].trim());
    Ok(exchange(user, reply))
}

/// PRM800K: `question.problem` and `label.steps[]`, each step with `completions` and the
/// `chosen_completion` index (or a `human_completion`). The chosen steps, one per line,
/// are the answer; the trajectory ends at the first step with no choice.
pub fn prm800k(record: &Value) -> Result<Vec<Result<Example, RejectReason>>, RejectReason> {
    let problem = record
        .pointer("/question/problem")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            RejectReason::missing_field(
                "question.problem",
                "lacks required field `question.problem`",
            )
        })?;
    let steps = record
        .pointer("/label/steps")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            RejectReason::missing_field("label.steps", "lacks required field `label.steps`")
        })?;
    let mut answer = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let text = if let Some(human) = step.get("human_completion").filter(|v| !v.is_null()) {
            human.get("text").and_then(Value::as_str).or(human.as_str())
        } else {
            match step.get("chosen_completion").and_then(Value::as_u64) {
                Some(chosen) => step
                    .pointer(&format!("/completions/{chosen}/text"))
                    .and_then(Value::as_str),
                None => break,
            }
        };
        let text =
            text.ok_or_else(|| format!("step {} has no text for its chosen completion", i + 1))?;
        answer.push(text.trim());
    }
    if answer.is_empty() {
        return Err("no step has a chosen completion".into());
    }
    Ok(exchange(problem, answer.join("\n")))
}

/// HotpotQA: the context paragraphs (`context: {title: [...], sentences: [[...]]}` or a
/// list of `[title, [sentences]]`) then the question; the answer is `answer`.
pub fn hotpotqa(record: &Value) -> Result<Vec<Result<Example, RejectReason>>, RejectReason> {
    let question = str_field(record, "question")?;
    let answer = str_field(record, "answer")?;
    let mut paragraphs = Vec::new();
    let mut push = |title: &Value, sentences: &Value| {
        let mut text = String::new();
        scalar(title, &mut text);
        text.push_str(": ");
        if let Some(list) = sentences.as_array() {
            for s in list {
                scalar(s, &mut text);
            }
        }
        paragraphs.push(text.trim().to_string());
    };
    match record.get("context") {
        Some(Value::Object(map)) => {
            let titles = map
                .get("title")
                .and_then(Value::as_array)
                .ok_or("field `context.title` is not a list")?;
            let sentences = map
                .get("sentences")
                .and_then(Value::as_array)
                .ok_or("field `context.sentences` is not a list")?;
            for (title, s) in titles.iter().zip(sentences) {
                push(title, s);
            }
        }
        Some(Value::Array(items)) => {
            for item in items {
                if let Some([title, s]) = item.as_array().map(|a| a.as_slice()) {
                    push(title, s);
                }
            }
        }
        Some(Value::Null) | None => {}
        Some(_) => return Err("field `context` is neither a list nor an object".into()),
    }
    paragraphs.push(question.trim().to_string());
    Ok(exchange(paragraphs.join("\n\n"), answer))
}

/// MS MARCO: the selected passages then the `query`; the answer is the first well-formed
/// answer, else the first answer. "No Answer Present." becomes the unanswerable reply.
pub fn msmarco(record: &Value) -> Result<Vec<Result<Example, RejectReason>>, RejectReason> {
    let query = str_field(record, "query")?;
    let first = |field: &str| {
        record.get(field).and_then(Value::as_array).and_then(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .find(|s| !s.trim().is_empty())
        })
    };
    let answer = first("wellFormedAnswers")
        .or_else(|| first("answers"))
        .ok_or_else(|| {
            RejectReason::missing_field(
                "answers",
                "lacks required field `answers` (or it is empty)",
            )
        })?;
    let answer = if answer.trim() == "No Answer Present." {
        UNANSWERABLE
    } else {
        answer
    };
    let mut parts = Vec::new();
    if let Some(passages) = record.get("passages") {
        let texts = passages.get("passage_text").and_then(Value::as_array);
        let selected = passages.get("is_selected").and_then(Value::as_array);
        if let (Some(texts), Some(selected)) = (texts, selected) {
            for (text, sel) in texts.iter().zip(selected) {
                if sel.as_i64() == Some(1) {
                    if let Some(text) = text.as_str() {
                        parts.push(text.trim().to_string());
                    }
                }
            }
        }
    }
    parts.push(query.trim().to_string());
    Ok(exchange(parts.join("\n\n"), answer))
}
