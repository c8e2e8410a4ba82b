//! The error of something a user gave that is not valid: a template, a mapping, a filter,
//! a size, a tokenizer or chat template, an adapter, a training config. Its message says
//! what and where; the CLI shows it as is.

/// A value, file or setting that is not valid, with the message that says why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl From<String> for Invalid {
    fn from(message: String) -> Invalid {
        Invalid(message)
    }
}

impl From<&str> for Invalid {
    fn from(message: &str) -> Invalid {
        Invalid(message.to_string())
    }
}

/// A message is what an `Invalid` says.
impl PartialEq<&str> for Invalid {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Into the message, for the private helpers that still speak strings.
impl From<Invalid> for String {
    fn from(invalid: Invalid) -> String {
        invalid.0
    }
}
