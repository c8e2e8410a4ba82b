//! OpenAssistant message trees (OASST1/OASST2).
//!
//! Nested exports hold one tree per record: `{"message_tree_id", "prompt": {"text", "role",
//! "replies": [...]}}` (a bare root message is accepted too). Flat exports hold one message
//! per row (`message_id`, `parent_id`, `message_tree_id`, `role`, `text`, `rank`); the
//! reader groups consecutive rows of a tree into one record. Every root-to-leaf path is one
//! conversation, or with `best` only the path that follows the best-ranked reply (lowest
//! `rank`) at each step. Deleted messages and their subtrees are skipped, and a path that
//! ends with a prompter message loses that last message.

use crate::reject::RejectReason;
use std::collections::HashMap;

use serde_json::Value;

use crate::conversation::{Conversation, Message, Role};

use super::Example;

/// One message of a tree, borrowed from the record.
struct Node<'v> {
    value: &'v Value,
    replies: Vec<usize>,
}

struct Tree<'v> {
    nodes: Vec<Node<'v>>,
    root: usize,
}

fn is_deleted(message: &Value) -> bool {
    message.get("deleted").and_then(Value::as_bool) == Some(true)
}

/// Rank for ordering replies: lower is better, unranked last, ties in input order.
fn rank(message: &Value) -> f64 {
    message
        .get("rank")
        .and_then(Value::as_f64)
        .unwrap_or(f64::INFINITY)
}

/// A nested tree record.
pub fn convert_nested(
    record: &Value,
    best: bool,
) -> Result<Vec<Result<Example, RejectReason>>, RejectReason> {
    let root = match record.get("prompt") {
        Some(prompt) if prompt.is_object() => prompt,
        Some(_) => return Err("field `prompt` is not a message object".into()),
        None if record.get("text").is_some() => record,
        None => {
            return Err(RejectReason::missing_field(
                "prompt",
                "oasst record lacks required field `prompt`",
            ))
        }
    };
    let mut nodes = Vec::new();
    fn add<'v>(nodes: &mut Vec<Node<'v>>, value: &'v Value) -> usize {
        let index = nodes.len();
        nodes.push(Node {
            value,
            replies: Vec::new(),
        });
        let replies = value
            .get("replies")
            .and_then(Value::as_array)
            .map(|r| r.as_slice())
            .unwrap_or_default();
        for reply in replies {
            if !is_deleted(reply) {
                let child = add(nodes, reply);
                nodes[index].replies.push(child);
            }
        }
        index
    }
    add(&mut nodes, root);
    paths(&mut Tree { nodes, root: 0 }, best)
}

/// The rows of one tree, in any order.
pub fn convert_rows(
    rows: &Value,
    best: bool,
) -> Result<Vec<Result<Example, RejectReason>>, RejectReason> {
    let rows = rows
        .as_array()
        .ok_or("a grouped record must be a list of rows")?;
    let mut nodes = Vec::with_capacity(rows.len());
    let mut by_id = HashMap::with_capacity(rows.len());
    // Every row's id, deleted ones too.
    let mut all_ids = std::collections::HashSet::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let id = row
            .get("message_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                RejectReason::missing_field(
                    "message_id",
                    format!("row {} lacks required field `message_id`", i + 1),
                )
            })?;
        all_ids.insert(id);
        if is_deleted(row) {
            continue;
        }
        by_id.insert(id, nodes.len());
        nodes.push(Node {
            value: row,
            replies: Vec::new(),
        });
    }
    let mut root = None;
    for child in 0..nodes.len() {
        match nodes[child].value.get("parent_id").and_then(Value::as_str) {
            None => {
                if root.replace(child).is_some() {
                    return Err("tree has more than one root message (parent_id null)".into());
                }
            }
            Some(parent) => match by_id.get(parent) {
                Some(&p) => nodes[p].replies.push(child),
                // The parent was deleted (or is missing): the subtree is not reachable.
                None if all_ids.contains(parent) => {}
                None => {
                    return Err(format!(
                        "message {} has parent {parent}, which is not in the tree's rows (are the rows of a tree contiguous?)",
                        nodes[child].value.get("message_id").and_then(Value::as_str).unwrap_or("?")
                    ).into())
                }
            },
        }
    }
    let root = root.ok_or("tree has no root message (a row with parent_id null)")?;
    paths(&mut Tree { nodes, root }, best)
}

fn paths(
    tree: &mut Tree<'_>,
    best: bool,
) -> Result<Vec<Result<Example, RejectReason>>, RejectReason> {
    for node in &tree.nodes {
        let id = node
            .value
            .get("message_id")
            .and_then(Value::as_str)
            .unwrap_or("?");
        match node.value.get("role").and_then(Value::as_str) {
            None => {
                return Err(RejectReason::missing_field(
                    "role",
                    format!("message {id} lacks required field `role`"),
                ))
            }
            Some(name) if Role::from_alias(name).is_none() => {
                return Err(format!("unknown role `{name}` in message {id}").into())
            }
            Some(_) => {}
        }
        if !node.value.get("text").is_some_and(Value::is_string) {
            return Err(RejectReason::missing_field(
                "text",
                format!("message {id} lacks required field `text`"),
            ));
        }
    }
    for node in 0..tree.nodes.len() {
        let mut replies = std::mem::take(&mut tree.nodes[node].replies);
        replies.sort_by(|&a, &b| rank(tree.nodes[a].value).total_cmp(&rank(tree.nodes[b].value)));
        tree.nodes[node].replies = replies;
    }
    let found = walk(tree, best)?;
    if found.is_empty() {
        return Err("tree has no assistant reply".into());
    }
    Ok(found.iter().map(|path| conversation(tree, path)).collect())
}

/// The most messages all of a tree's conversations may hold together: a long chain with
/// many leaves would otherwise need memory quadratic in the tree's size.
const MAX_PATH_MESSAGES: usize = 1 << 20;

/// The root-to-leaf paths, each cut back to its last assistant message (two leaves cut
/// back to the same message give one path), in depth-first order with replies by rank.
/// Iterative, so a chain of any depth cannot overflow the stack.
fn walk(tree: &Tree<'_>, best: bool) -> Result<Vec<Vec<usize>>, RejectReason> {
    let mut found: Vec<Vec<usize>> = Vec::new();
    let mut ends = std::collections::HashSet::new();
    let mut total = 0usize;
    let mut path: Vec<usize> = Vec::new();
    // (node, depth, length of the path up to its last assistant message)
    let mut stack = vec![(tree.root, 0usize, 0usize)];
    while let Some((node, depth, assistant_end)) = stack.pop() {
        path.truncate(depth);
        path.push(node);
        let assistant_end = if role_of(tree.nodes[node].value) == Some(Role::Assistant) {
            depth + 1
        } else {
            assistant_end
        };
        let replies = &tree.nodes[node].replies;
        let replies = if best {
            &replies[..replies.len().min(1)]
        } else {
            &replies[..]
        };
        if replies.is_empty() {
            if assistant_end > 0 && ends.insert(path[assistant_end - 1]) {
                total += assistant_end;
                if total > MAX_PATH_MESSAGES {
                    return Err(format!(
                        "tree expands to more than {MAX_PATH_MESSAGES} messages over its conversations (a long chain with many leaves); the -best format keeps one path"
                    ).into());
                }
                found.push(path[..assistant_end].to_vec());
            }
            continue;
        }
        // Reversed, so the first reply is walked first.
        for &reply in replies.iter().rev() {
            stack.push((reply, depth + 1, assistant_end));
        }
    }
    Ok(found)
}

fn role_of(message: &Value) -> Option<Role> {
    message
        .get("role")
        .and_then(Value::as_str)
        .and_then(Role::from_alias)
}

fn conversation(tree: &Tree<'_>, path: &[usize]) -> Result<Example, RejectReason> {
    let mut messages = Vec::with_capacity(path.len());
    for &node in path {
        let value = tree.nodes[node].value;
        let id = value
            .get("message_id")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let role_name = value.get("role").and_then(Value::as_str).ok_or_else(|| {
            RejectReason::missing_field("role", format!("message {id} lacks required field `role`"))
        })?;
        let role = Role::from_alias(role_name)
            .ok_or_else(|| format!("unknown role `{role_name}` in message {id}"))?;
        let text = value.get("text").and_then(Value::as_str).ok_or_else(|| {
            RejectReason::missing_field("text", format!("message {id} lacks required field `text`"))
        })?;
        messages.push(Message::new(role, text));
    }
    Ok(Example::new(Conversation::new(messages)))
}
