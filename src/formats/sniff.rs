//! The top-level fields of a JSON object, found without parsing their values: detection
//! needs only which fields are present, and this scan runs at memchr speed where a serde
//! pass would validate (and for a mixed file, repeat) the whole record.

use std::borrow::Cow;

use memchr::memchr2;

/// `(name, raw value text)` of each top-level field of the object in `text`, or `None`
/// when the text is not a well-formed object (the caller's parser then says why).
pub fn top_fields(text: &str) -> Option<Vec<(Cow<'_, str>, &str)>> {
    let bytes = text.as_bytes();
    let mut at = skip_space(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_space(bytes, at + 1);
    let mut fields = Vec::new();
    if bytes.get(at) == Some(&b'}') {
        return (skip_space(bytes, at + 1) == bytes.len()).then_some(fields);
    }
    loop {
        if bytes.get(at) != Some(&b'"') {
            return None;
        }
        let end = string_end(bytes, at)?;
        let raw_name = &text[at + 1..end - 1];
        let name = if raw_name.contains('\\') {
            Cow::Owned(serde_json::from_str::<String>(&text[at..end]).ok()?)
        } else {
            Cow::Borrowed(raw_name)
        };
        at = skip_space(bytes, end);
        if bytes.get(at) != Some(&b':') {
            return None;
        }
        at = skip_space(bytes, at + 1);
        let value_end = value_end(bytes, at)?;
        fields.push((name, &text[at..value_end]));
        at = skip_space(bytes, value_end);
        match bytes.get(at) {
            Some(b',') => at = skip_space(bytes, at + 1),
            Some(b'}') => {
                return (skip_space(bytes, at + 1) == bytes.len()).then_some(fields);
            }
            _ => return None,
        }
    }
}

fn skip_space(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(|b| b.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

/// Index just past the string starting at `start` (which is `"`).
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut at = start + 1;
    loop {
        let i = at + memchr2(b'"', b'\\', &bytes[at..])?;
        if bytes[i] == b'\\' {
            at = i + 2;
            if at > bytes.len() {
                return None;
            }
        } else {
            return Some(i + 1);
        }
    }
}

/// Index just past the value starting at `start`.
fn value_end(bytes: &[u8], start: usize) -> Option<usize> {
    match bytes.get(start)? {
        b'"' => string_end(bytes, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut at = start;
            loop {
                match bytes.get(at)? {
                    b'"' => {
                        at = string_end(bytes, at)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at + 1);
                        }
                    }
                    _ => {}
                }
                at += 1;
            }
        }
        _ => {
            let len = bytes[start..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
                .unwrap_or(bytes.len() - start);
            (len > 0).then_some(start + len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_top_level_fields_and_their_raw_values() {
        let fields =
            top_fields(r#" {"a": "x\"}", "b":[1,{"c":"]"}], "n" : null, "k\u0041": 2} "#).unwrap();
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_ref(), *v)).collect();
        assert_eq!(
            pairs,
            [
                ("a", r#""x\"}""#),
                ("b", r#"[1,{"c":"]"}]"#),
                ("n", "null"),
                ("kA", "2")
            ]
        );
        assert_eq!(top_fields("{}").unwrap().len(), 0);
        for bad in [
            r#"{"a": 1"#,
            r#"{"a" 1}"#,
            r#"{"a": "x}"#,
            "[1]",
            r#"{"a": 1} x"#,
            r#"{"a": }"#,
        ] {
            assert!(top_fields(bad).is_none(), "{bad}");
        }
    }
}
