//! ShareGPT: `{"conversations": [{"from", "value"}]}`.
//!
//! Roles use ShareGPT's aliases: `human`/`user`, `gpt`/`chatgpt`/`bing`/`bard`/`assistant`,
//! `system`, and tool-ish names (`function`, `observation`) for tool results. Some exports
//! spell the turn fields `role`/`content`; both spellings are read.

use crate::reject::RejectReason;
use std::borrow::Cow;

use serde::Deserialize;

use crate::conversation::{Conversation, Message, Role};

use super::{missing, system_message, RawRecord};

#[derive(Deserialize)]
pub(crate) struct RawTurn<'a> {
    #[serde(borrow, default, alias = "role")]
    from: Option<Cow<'a, str>>,
    #[serde(borrow, default, alias = "content")]
    value: Option<Cow<'a, str>>,
}

pub(super) fn convert(record: RawRecord<'_>) -> Result<Conversation, RejectReason> {
    let turns = record
        .conversations
        .ok_or_else(|| missing("sharegpt", "conversations"))?;
    let mut messages = Vec::with_capacity(turns.len() + 1);
    messages.extend(system_message(record.system));
    for (i, turn) in turns.into_iter().enumerate() {
        let from = turn.from.ok_or_else(|| {
            RejectReason::missing_field(
                "from",
                format!("turn {} lacks required field `from`", i + 1),
            )
        })?;
        let role = Role::from_alias(&from)
            .ok_or_else(|| format!("unknown role `{from}` in turn {}", i + 1))?;
        let value = turn.value.ok_or_else(|| {
            RejectReason::missing_field(
                "value",
                format!("turn {} lacks required field `value`", i + 1),
            )
        })?;
        messages.push(Message::new(role, value.into_owned()));
    }
    Ok(Conversation::new(messages))
}
