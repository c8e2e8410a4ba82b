//! Categories: the strategy document's ten behavioural categories, and rules that pick a
//! category per example for sources that mix kinds of data (OpenHermes, Flan, ShareGPT).
//!
//! A source has a default category; its rules, tried in order, may override it for one
//! example: `tool` (tool schemas, tool calls or tool messages), `code` (fenced code or
//! lines that read as code), `math` (math notation, "####" answers, or a numeric word
//! problem). A category is metadata: it never enters the hash.

use serde::{Deserialize, Serialize};

use crate::conversation::{Conversation, Role};

/// The default vocabulary: (name, what it covers), after the strategy document's
/// expected distribution.
pub const CATEGORIES: [(&str, &str); 10] = [
    ("code", "Technical/Code"),
    ("instruction", "General Instruction"),
    ("math", "Math & Reasoning"),
    ("qa", "QA & Knowledge"),
    ("conversation", "Conversation"),
    ("emotional", "Psychology & Emotional"),
    ("creative", "Creative Writing"),
    ("tool", "Tool/API"),
    ("moral", "Adversarial/Moral"),
    ("specialized", "Specialized"),
];

/// A content rule; a match gives the category of the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    Tool,
    Code,
    Math,
}

impl Rule {
    pub fn category(self) -> &'static str {
        match self {
            Rule::Tool => "tool",
            Rule::Code => "code",
            Rule::Math => "math",
        }
    }

    pub fn matches(self, conversation: &Conversation) -> bool {
        match self {
            Rule::Tool => {
                conversation.tools.is_some()
                    || conversation
                        .messages
                        .iter()
                        .any(|m| m.tool_calls.is_some() || m.role == Role::Tool)
            }
            Rule::Code => conversation
                .messages
                .iter()
                .filter(|m| m.role != Role::System)
                .any(|m| looks_like_code(&m.content)),
            Rule::Math => conversation
                .messages
                .iter()
                .filter(|m| m.role != Role::System)
                .any(|m| looks_like_math(&m.content)),
        }
    }
}

/// The category the first matching rule gives, if any.
pub fn assign(rules: &[Rule], conversation: &Conversation) -> Option<&'static str> {
    rules
        .iter()
        .find(|rule| rule.matches(conversation))
        .map(|rule| rule.category())
}

/// A fenced code block, or at least three lines (and a third of the non-empty lines)
/// that read as code: statements ending in `;`, `{` or `}`, or lines starting with a
/// keyword of a common language.
pub fn looks_like_code(text: &str) -> bool {
    if text.contains("```") {
        return true;
    }
    const STARTS: [&str; 14] = [
        "def ",
        "class ",
        "import ",
        "from ",
        "#include",
        "fn ",
        "function ",
        "public ",
        "private ",
        "return ",
        "const ",
        "let ",
        "var ",
        "SELECT ",
    ];
    let mut lines = 0;
    let mut code = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        lines += 1;
        if line.ends_with(';')
            || line.ends_with('{')
            || line == "}"
            || STARTS.iter().any(|s| line.starts_with(s))
        {
            code += 1;
        }
    }
    code >= 3 && code * 3 >= lines
}

/// Math notation (LaTeX commands, display math), a GSM8K-style `####` answer, an
/// arithmetic expression, or a word problem: a quantity question with two numbers.
pub fn looks_like_math(text: &str) -> bool {
    const NOTATION: [&str; 9] = [
        "\\frac", "\\boxed", "\\sqrt", "\\sum", "\\int", "$$", "\\(", "\\[", "####",
    ];
    if NOTATION.iter().any(|n| text.contains(n)) {
        return true;
    }
    let bytes = text.as_bytes();
    // digit, optional spaces, operator, optional spaces, digit
    for (i, &b) in bytes.iter().enumerate() {
        if matches!(b, b'+' | b'*' | b'/' | b'=' | b'^') {
            let before = bytes[..i].iter().rev().find(|c| **c != b' ');
            let after = bytes[i + 1..].iter().find(|c| **c != b' ');
            if before.is_some_and(u8::is_ascii_digit) && after.is_some_and(u8::is_ascii_digit) {
                return true;
            }
        }
    }
    let lower = text.to_ascii_lowercase();
    const QUESTIONS: [&str; 6] = [
        "how many",
        "how much",
        "calculate",
        "what is the total",
        "what percentage",
        "solve for",
    ];
    let numbers = lower
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .count();
    numbers >= 2 && QUESTIONS.iter().any(|q| lower.contains(q))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::Message;

    fn chat(user: &str, assistant: &str) -> Conversation {
        Conversation::new(vec![
            Message::new(Role::User, user),
            Message::new(Role::Assistant, assistant),
        ])
    }

    #[test]
    fn rules_pick_categories_in_order() {
        let rules = [Rule::Tool, Rule::Code, Rule::Math];
        let code = chat("Reverse a list", "```python\nxs[::-1]\n```");
        assert_eq!(assign(&rules, &code), Some("code"));
        let math = chat(
            "Tom has 3 apples and buys 4 more. How many apples does he have?",
            "7",
        );
        assert_eq!(assign(&rules, &math), Some("math"));
        assert_eq!(assign(&rules, &chat("What is 12 * 7?", "84")), Some("math"));
        let prose = chat("Write a haiku about rain", "Soft rain on the roof");
        assert_eq!(assign(&rules, &prose), None);
        let mut tool = chat("Weather in Paris?", "");
        tool.messages[1].tool_calls = Some("[]".into());
        assert_eq!(assign(&rules, &tool), Some("tool"));
        // Only the rules a source lists apply.
        assert_eq!(assign(&[Rule::Math], &code), None);
    }

    #[test]
    fn code_needs_more_than_one_stray_line() {
        assert!(!looks_like_code("Return the book; it is due."));
        assert!(looks_like_code(
            "int main() {\n  int x = 1;\n  return x;\n}"
        ));
        assert!(!looks_like_math("I was born in 1990 and moved in 2004."));
    }
}
