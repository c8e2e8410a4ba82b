//! Field paths and text templates of the field-mapping language.
//!
//! A path names a value inside a JSON record: `question`, `answers.text[0]`,
//! `context.sentences[1][0]`. A template is text with `{path}` placeholders: `{path}` must
//! resolve to a non-null value, `{path?}` renders as nothing when it does not, and
//! `{path|filter}` transforms the value (`letters`, `letter`, `lines`, `json`,
//! `values(0=No,1=Yes)`).

use crate::reject::RejectReason;
use std::fmt::Write as _;

use serde_json::Value;

use crate::conversation::canonical_json;

/// One step of a [`JsonPath`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A dotted path with optional `[index]` steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, crate::invalid::Invalid> {
        let bad = |why: &str| format!("bad field path `{text}`: {why}");
        let mut steps = Vec::new();
        for part in text.split('.') {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if key.is_empty() && (steps.is_empty() || rest.is_empty()) {
                return Err(bad("empty field name").into());
            }
            if !key.is_empty() {
                steps.push(Step::Key(key.to_string()));
            }
            while !rest.is_empty() {
                let close = rest
                    .find(']')
                    .filter(|_| rest.starts_with('['))
                    .ok_or_else(|| bad("expected `[index]`"))?;
                let index = rest[1..close]
                    .trim()
                    .parse()
                    .map_err(|_| bad("an index must be a whole number"))?;
                steps.push(Step::Index(index));
                rest = &rest[close + 1..];
            }
        }
        Ok(JsonPath {
            text: text.to_string(),
            steps,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Number of steps: a deeper path is a more specific detection signal.
    pub fn depth(&self) -> usize {
        self.steps.len()
    }

    /// The first key, where scoped names (`each` items) are looked up.
    fn head(&self) -> Option<&str> {
        match self.steps.first() {
            Some(Step::Key(key)) => Some(key),
            _ => None,
        }
    }

    /// Whether the path resolves in a record given as its top-level fields, unparsed:
    /// detection reads only the fields it needs (deeper paths parse their top field).
    pub fn present_in(&self, fields: &[(std::borrow::Cow<'_, str>, &str)]) -> bool {
        let Some(Step::Key(head)) = self.steps.first() else {
            return false;
        };
        let Some((_, raw)) = fields.iter().rev().find(|(name, _)| name == head) else {
            return false;
        };
        if self.steps.len() == 1 {
            return *raw != "null";
        }
        serde_json::from_str::<Value>(raw)
            .ok()
            .is_some_and(|value| Self::walk(&self.steps[1..], &value).is_some())
    }

    /// The value at this path, or `None` when a step is missing or the value is null.
    pub fn resolve<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        Self::walk(&self.steps, value)
    }

    fn walk<'v>(steps: &[Step], mut value: &'v Value) -> Option<&'v Value> {
        for step in steps {
            value = match step {
                Step::Key(key) => value.as_object()?.get(key)?,
                Step::Index(i) => value.as_array()?.get(*i)?,
            };
        }
        (!value.is_null()).then_some(value)
    }
}

/// Names bound while rendering: the record, and the current `each` item if any.
pub struct Scope<'v> {
    pub record: &'v Value,
    pub item: Option<(&'v str, &'v Value)>,
}

impl<'v> Scope<'v> {
    pub fn of(record: &'v Value) -> Scope<'v> {
        Scope { record, item: None }
    }

    pub fn resolve(&self, path: &JsonPath) -> Option<&'v Value> {
        if let (Some((name, item)), Some(head)) = (self.item, path.head()) {
            if head == name {
                return JsonPath::walk(&path.steps[1..], item);
            }
        }
        path.resolve(self.record)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Filter {
    /// A list as `A. first\nB. second`.
    Letters,
    /// An index (0 → `A`) or a letter as an answer letter.
    Letter,
    /// A list, one item per line.
    Lines,
    /// Canonical JSON of the value.
    Json,
    /// A lookup table for small enums: `values(0=No,1=Yes)`.
    Values(Vec<(String, String)>),
}

impl Filter {
    fn parse(text: &str) -> Result<Filter, String> {
        let text = text.trim();
        Ok(match text {
            "letters" => Filter::Letters,
            "letter" => Filter::Letter,
            "lines" => Filter::Lines,
            "json" => Filter::Json,
            _ if text.starts_with("values(") && text.ends_with(')') => Filter::Values(
                text["values(".len()..text.len() - 1]
                    .split(',')
                    .map(|pair| {
                        pair.split_once('=')
                            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                            .ok_or_else(|| {
                                format!("bad `values` entry `{pair}`: expected key=text")
                            })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            _ => {
                return Err(format!(
                "unknown filter `{text}` (filters: letters, letter, lines, json, values(k=v,...))"
            ))
            }
        })
    }

    fn apply(&self, value: &Value, out: &mut String) -> Result<(), RejectReason> {
        match self {
            Filter::Letters => {
                let items = value.as_array().ok_or("`letters` needs a list")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push('\n');
                    }
                    let _ = write!(out, "{}. ", letter(i));
                    scalar(item, out);
                }
            }
            Filter::Letter => match value {
                Value::Number(n) => {
                    let i = n
                        .as_u64()
                        .filter(|&i| i < 26)
                        .ok_or("`letter` needs an index from 0 to 25")?;
                    out.push(letter(i as usize));
                }
                other => scalar(other, out),
            },
            Filter::Lines => match value.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push('\n');
                        }
                        scalar(item, out);
                    }
                }
                None => scalar(value, out),
            },
            Filter::Json => out.push_str(&canonical_json(value)),
            Filter::Values(table) => {
                let mut key = String::new();
                scalar(value, &mut key);
                let (_, text) = table
                    .iter()
                    .find(|(k, _)| *k == key)
                    .ok_or_else(|| format!("value `{key}` is not one of the mapped values"))?;
                out.push_str(text);
            }
        }
        Ok(())
    }
}

fn letter(i: usize) -> char {
    (b'A' + (i % 26) as u8) as char
}

/// Plain rendering: strings as they are, numbers and booleans as JSON writes them, lists
/// of scalars joined with ", ", anything else as canonical JSON.
pub fn scalar(value: &Value, out: &mut String) {
    match value {
        Value::String(s) => out.push_str(s),
        Value::Null => {}
        Value::Number(_) | Value::Bool(_) => {
            let _ = write!(out, "{value}");
        }
        Value::Array(items) if items.iter().all(|v| !v.is_array() && !v.is_object()) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                scalar(item, out);
            }
        }
        other => out.push_str(&canonical_json(other)),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field {
        path: JsonPath,
        optional: bool,
        filter: Option<Filter>,
    },
}

/// A parsed template string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `text`; `{{` and `}}` stand for literal braces.
    pub fn parse(text: &str) -> Result<Template, crate::invalid::Invalid> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            literal.push_str(&rest[..i]);
            let brace = rest.as_bytes()[i];
            rest = &rest[i + 1..];
            if rest.as_bytes().first() == Some(&brace) {
                literal.push(brace as char);
                rest = &rest[1..];
                continue;
            }
            if brace == b'}' {
                return Err(format!("template `{text}`: unmatched `}}` (write `}}}}`)").into());
            }
            let close = rest
                .find('}')
                .ok_or_else(|| format!("template `{text}`: unclosed `{{`"))?;
            let inner = &rest[..close];
            rest = &rest[close + 1..];
            let (path, filter) = match inner.split_once('|') {
                Some((path, filter)) => (path, Some(Filter::parse(filter)?)),
                None => (inner, None),
            };
            let path = path.trim();
            let (path, optional) = match path.strip_suffix('?') {
                Some(path) => (path, true),
                None => (path, false),
            };
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Field {
                path: JsonPath::parse(path)?,
                optional,
                filter,
            });
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Template { pieces })
    }

    /// The required fields this template reads (for `corpusdb formats`).
    pub fn fields(&self) -> impl Iterator<Item = (&str, bool)> {
        self.pieces.iter().filter_map(|piece| match piece {
            Piece::Field { path, optional, .. } => Some((path.as_str(), *optional)),
            Piece::Text(_) => None,
        })
    }

    /// The paths of its required fields (`{path}`, not `{path?}`), in order.
    pub fn required_paths(&self) -> Vec<&str> {
        self.pieces
            .iter()
            .filter_map(|piece| match piece {
                Piece::Field {
                    path,
                    optional: false,
                    ..
                } => Some(path.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Renders the template. A required field that is missing is an error naming it; if
    /// every field is optional and missing, the result is empty (literal text is dropped
    /// too, so `"Context: {context?}"` disappears as a whole).
    pub fn render(&self, scope: &Scope<'_>) -> Result<String, RejectReason> {
        let mut out = String::new();
        let mut any_field = false;
        let mut any_value = false;
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Field {
                    path,
                    optional,
                    filter,
                } => {
                    any_field = true;
                    match scope.resolve(path) {
                        Some(value) => {
                            let start = out.len();
                            match filter {
                                Some(filter) => filter
                                    .apply(value, &mut out)
                                    .map_err(|e| format!("field `{}`: {e}", path.as_str()))?,
                                None => scalar(value, &mut out),
                            }
                            any_value |= !out[start..].trim().is_empty();
                        }
                        None if *optional => {}
                        None => {
                            return Err(RejectReason::missing_field(
                                path.as_str(),
                                format!("lacks required field `{}`", path.as_str()),
                            ))
                        }
                    }
                }
            }
        }
        if any_field && !any_value {
            out.clear();
        }
        Ok(out)
    }
}

/// The required fields of template text `text` (see [`Template::required_paths`]).
pub fn required_fields(text: &str) -> Result<Vec<String>, crate::invalid::Invalid> {
    Ok(Template::parse(text)?
        .required_paths()
        .into_iter()
        .map(String::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(template: &str, value: &Value) -> Result<String, String> {
        Template::parse(template)?
            .render(&Scope::of(value))
            .map_err(|e| e.message)
    }

    #[test]
    fn paths_and_indexes() {
        let v = json!({"answers": {"text": ["Paris", "paris"]}, "m": [[1, 2]]});
        assert_eq!(render("{answers.text[0]}", &v).unwrap(), "Paris");
        assert_eq!(render("{m[0][1]}", &v).unwrap(), "2");
        assert_eq!(render("{answers.text}", &v).unwrap(), "Paris, paris");
        assert_eq!(
            render("{answers.text[2]}", &v).unwrap_err(),
            "lacks required field `answers.text[2]`"
        );
        assert!(JsonPath::parse("a[x]").is_err());
        assert!(JsonPath::parse("a..b").is_err());
    }

    #[test]
    fn optional_fields_drop_their_literal_text() {
        let v = json!({"q": "Why?", "c": null});
        assert_eq!(render("Context: {c?}", &v).unwrap(), "");
        assert_eq!(render("Q: {q} {c?}", &v).unwrap(), "Q: Why? ");
        assert_eq!(render("{{literal}} {q}", &v).unwrap(), "{literal} Why?");
    }

    #[test]
    fn filters() {
        let v = json!({"choices": ["red", "blue"], "answer": 1, "label": 0});
        assert_eq!(render("{choices|letters}", &v).unwrap(), "A. red\nB. blue");
        assert_eq!(render("{answer|letter}", &v).unwrap(), "B");
        assert_eq!(render("{choices|lines}", &v).unwrap(), "red\nblue");
        assert_eq!(
            render("{label|values(0=Acceptable, 1=Wrong)}", &v).unwrap(),
            "Acceptable"
        );
        assert!(render("{answer|values(0=x)}", &v)
            .unwrap_err()
            .contains("not one of the mapped values"));
        assert!(Template::parse("{a|upper}")
            .unwrap_err()
            .0
            .contains("unknown filter"));
    }
}
