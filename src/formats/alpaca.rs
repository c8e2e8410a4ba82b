//! Alpaca: `{"instruction", "input", "output"}`, optionally `"system"`.
//!
//! The user turn is the trimmed instruction, followed by a blank line and the trimmed input
//! when the input is not empty; the assistant turn is the output.

use crate::conversation::{Conversation, Message, Role};
use crate::reject::RejectReason;

use super::{missing, system_message, RawRecord};

pub(super) fn convert(record: RawRecord<'_>) -> Result<Conversation, RejectReason> {
    let instruction = record
        .instruction
        .ok_or_else(|| missing("alpaca", "instruction"))?;
    let output = record.output.ok_or_else(|| missing("alpaca", "output"))?;
    // Each part is trimmed before joining, so spacing around the parts never splits
    // duplicates (the whole message is normalised again later).
    let mut user = instruction.trim().to_owned();
    if let Some(input) = record.input.filter(|input| !input.trim().is_empty()) {
        user.push_str("\n\n");
        user.push_str(input.trim());
    }
    let mut messages = Vec::with_capacity(3);
    messages.extend(system_message(record.system));
    messages.push(Message::new(Role::User, user));
    messages.push(Message::new(Role::Assistant, output.into_owned()));
    Ok(Conversation::new(messages))
}
