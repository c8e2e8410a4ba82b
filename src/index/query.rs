//! The query language of `corpusdb query` and curriculum selections.
//!
//! ```text
//! query    := or
//! or       := and ( "OR" and )*
//! and      := unary ( "AND"? unary )*          adjacent terms are ANDed
//! unary    := ( "NOT" | "-" ) unary | primary
//! primary  := "(" or ")" | field ":" value | field ":" op number | word | "phrase"
//! op       := "<" | "<=" | ">" | ">=" | "="
//! ```
//!
//! Fields: `category`, `source`, `hash` (a SHA-1 or a prefix of 4 or more hex digits),
//! `excluded`, `cluster` (terms), and `chars`,
//! `turns`, `messages`, `ordinal` (numbers, with ranges). Examples excluded by a quality
//! filter or as near-duplicates match only queries that name `excluded` (e.g.
//! `excluded:*`, `excluded:max-turns`, `excluded:near-dup`), a `hash` or a `cluster`
//! (`cluster:<id>` lists every member of a near-duplicate cluster). A bare word or quoted phrase searches the
//! conversation text when the store indexes full text. Keywords are upper case; `*` alone
//! matches everything. Errors name the byte position and what was expected there.

use std::fmt;

/// A parsed query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    All,
    Term { field: TermField, value: String },
    Range { field: NumField, op: Op, value: u64 },
    Text(String),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermField {
    Category,
    Source,
    Hash,
    /// The filters that exclude an example (`excluded:*` for any).
    Excluded,
    /// The near-duplicate cluster of an example (16 hex digits, `corpusdb dedup --near`).
    Cluster,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumField {
    Chars,
    Turns,
    Messages,
    Ordinal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
}

impl NumField {
    pub fn name(self) -> &'static str {
        match self {
            NumField::Chars => "chars",
            NumField::Turns => "turns",
            NumField::Messages => "messages",
            NumField::Ordinal => "ordinal",
        }
    }
}

impl TermField {
    pub fn name(self) -> &'static str {
        match self {
            TermField::Category => "category",
            TermField::Source => "source",
            TermField::Hash => "hash",
            TermField::Excluded => "excluded",
            TermField::Cluster => "cluster",
        }
    }
}

impl Expr {
    /// Whether the query names `field` anywhere.
    pub fn mentions(&self, field: TermField) -> bool {
        match self {
            Expr::Term { field: f, .. } => *f == field,
            Expr::Not(inner) => inner.mentions(field),
            Expr::And(parts) | Expr::Or(parts) => parts.iter().any(|p| p.mentions(field)),
            Expr::All | Expr::Range { .. } | Expr::Text(_) => false,
        }
    }
}

/// A syntax error at a byte position of the query.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    pub position: usize,
    pub expected: String,
    pub found: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "query error at position {}: expected {}, found {}",
            self.position, self.expected, self.found
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Phrase(String),
    Colon,
    Op(Op),
    LParen,
    RParen,
    Minus,
    End,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("`{w}`"),
            Token::Phrase(p) => format!("\"{p}\""),
            Token::Colon => "`:`".into(),
            Token::Op(_) => "a comparison".into(),
            Token::LParen => "`(`".into(),
            Token::RParen => "`)`".into(),
            Token::Minus => "`-`".into(),
            Token::End => "the end of the query".into(),
        }
    }
}

fn tokenize(input: &str) -> Result<Vec<(usize, Token)>, ParseError> {
    let bytes = input.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        let token = match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'(' => {
                i += 1;
                Token::LParen
            }
            b')' => {
                i += 1;
                Token::RParen
            }
            b':' => {
                i += 1;
                Token::Colon
            }
            b'-' if tokens.last().is_none_or(|(_, t)| *t != Token::Colon) => {
                i += 1;
                Token::Minus
            }
            b'<' | b'>' | b'=' => {
                i += 1;
                let eq = bytes.get(i) == Some(&b'=');
                if eq && c != b'=' {
                    i += 1;
                }
                Token::Op(match (c, eq) {
                    (b'<', true) => Op::Le,
                    (b'<', false) => Op::Lt,
                    (b'>', true) => Op::Ge,
                    (b'>', false) => Op::Gt,
                    _ => Op::Eq,
                })
            }
            b'"' => {
                let mut text = String::new();
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => {
                            return Err(ParseError {
                                position: input.len(),
                                expected: "a closing `\"`".into(),
                                found: "the end of the query".into(),
                            })
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\')
                            if bytes.get(i + 1).is_some_and(|b| *b == b'"' || *b == b'\\') =>
                        {
                            text.push(bytes[i + 1] as char);
                            i += 2;
                        }
                        Some(_) => {
                            let ch = input[i..].chars().next().expect("inside the string");
                            text.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                }
                Token::Phrase(text)
            }
            _ => {
                while i < bytes.len()
                    && !matches!(
                        bytes[i],
                        b' ' | b'\t'
                            | b'\n'
                            | b'\r'
                            | b'('
                            | b')'
                            | b':'
                            | b'"'
                            | b'<'
                            | b'>'
                            | b'='
                    )
                {
                    i += 1;
                }
                Token::Word(input[start..i].to_string())
            }
        };
        tokens.push((start, token));
    }
    tokens.push((input.len(), Token::End));
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    next: usize,
}

/// Parses a query; an empty query (or `*`) matches everything.
pub fn parse(input: &str) -> Result<Expr, ParseError> {
    let mut parser = Parser {
        tokens: tokenize(input)?,
        next: 0,
    };
    if parser.peek() == &Token::End {
        return Ok(Expr::All);
    }
    let expr = parser.or()?;
    match parser.peek() {
        Token::End => Ok(expr),
        _ => Err(parser.error("`AND`, `OR` or the end of the query")),
    }
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.next].1
    }

    fn bump(&mut self) -> (usize, Token) {
        let token = self.tokens[self.next].clone();
        if self.next + 1 < self.tokens.len() {
            self.next += 1;
        }
        token
    }

    fn error(&self, expected: &str) -> ParseError {
        let (position, token) = &self.tokens[self.next];
        ParseError {
            position: *position,
            expected: expected.into(),
            found: token.describe(),
        }
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Token::Word(w) if w == keyword)
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut parts = vec![self.and()?];
        while self.is_keyword("OR") {
            self.bump();
            parts.push(self.and()?);
        }
        Ok(if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Expr::Or(parts)
        })
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut parts = vec![self.unary()?];
        loop {
            if self.is_keyword("AND") {
                self.bump();
                parts.push(self.unary()?);
            } else if matches!(self.peek(), Token::End | Token::RParen) || self.is_keyword("OR") {
                break;
            } else {
                parts.push(self.unary()?);
            }
        }
        Ok(if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Expr::And(parts)
        })
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        if self.is_keyword("NOT") || self.peek() == &Token::Minus {
            self.bump();
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        const OPERAND: &str = "a term such as `category:math`, `chars:<2000`, a word, or `(`";
        match self.peek().clone() {
            Token::LParen => {
                self.bump();
                let inner = self.or()?;
                if self.peek() != &Token::RParen {
                    return Err(self.error("`)`"));
                }
                self.bump();
                Ok(inner)
            }
            Token::Phrase(text) => {
                self.bump();
                Ok(Expr::Text(text))
            }
            Token::Word(word) if word == "*" => {
                self.bump();
                Ok(Expr::All)
            }
            Token::Word(word) if matches!(word.as_str(), "AND" | "OR") => Err(self.error(OPERAND)),
            Token::Word(word) => {
                let (position, _) = self.bump();
                if self.peek() != &Token::Colon {
                    return Ok(Expr::Text(word));
                }
                self.bump();
                self.field_value(position, &word)
            }
            _ => Err(self.error(OPERAND)),
        }
    }

    /// A `hash:` value: a whole SHA-1 or a prefix of at least 4 hex digits, any case.
    fn hash_value(&mut self, value: String) -> Result<Expr, ParseError> {
        if (4..=40).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Expr::Term {
                field: TermField::Hash,
                value: value.to_ascii_lowercase(),
            });
        }
        self.next -= 1;
        Err(self.error("a hash for `hash`: 4 to 40 hex digits (a SHA-1 or its prefix)"))
    }

    fn field_value(&mut self, position: usize, field: &str) -> Result<Expr, ParseError> {
        let term_field = match field {
            "category" => Some(TermField::Category),
            "source" => Some(TermField::Source),
            "hash" => Some(TermField::Hash),
            "excluded" => Some(TermField::Excluded),
            "cluster" => Some(TermField::Cluster),
            _ => None,
        };
        if let Some(field) = term_field {
            return match self.bump() {
                (_, Token::Word(value)) | (_, Token::Phrase(value)) => {
                    if field == TermField::Hash {
                        return self.hash_value(value);
                    }
                    Ok(Expr::Term { field, value })
                }
                _ => {
                    self.next -= 1;
                    Err(self.error(&format!("a value for `{}`", field.name())))
                }
            };
        }
        let num_field = match field {
            "chars" => NumField::Chars,
            "turns" => NumField::Turns,
            "messages" => NumField::Messages,
            "ordinal" => NumField::Ordinal,
            _ => {
                return Err(ParseError {
                    position,
                    expected: "a field: category, source, hash, excluded, cluster, chars, turns, messages, ordinal"
                        .into(),
                    found: format!("`{field}`"),
                })
            }
        };
        let op = match self.peek() {
            Token::Op(op) => {
                let op = *op;
                self.bump();
                op
            }
            _ => Op::Eq,
        };
        match self.peek().clone() {
            Token::Word(word) => match word.parse::<u64>() {
                Ok(value) => {
                    self.bump();
                    Ok(Expr::Range {
                        field: num_field,
                        op,
                        value,
                    })
                }
                Err(_) => Err(self.error(&format!("a whole number for `{}`", num_field.name()))),
            },
            _ => Err(self.error(&format!("a whole number for `{}`", num_field.name()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(field: TermField, value: &str) -> Expr {
        Expr::Term {
            field,
            value: value.into(),
        }
    }

    #[test]
    fn precedence_and_grouping() {
        let q = parse("category:math OR category:code turns:>=3").unwrap();
        assert_eq!(
            q,
            Expr::Or(vec![
                term(TermField::Category, "math"),
                Expr::And(vec![
                    term(TermField::Category, "code"),
                    Expr::Range {
                        field: NumField::Turns,
                        op: Op::Ge,
                        value: 3
                    }
                ])
            ])
        );
        let q = parse("(category:math OR category:code) AND NOT source:gsm8k -chars:<10").unwrap();
        assert_eq!(
            q,
            Expr::And(vec![
                Expr::Or(vec![
                    term(TermField::Category, "math"),
                    term(TermField::Category, "code")
                ]),
                Expr::Not(Box::new(term(TermField::Source, "gsm8k"))),
                Expr::Not(Box::new(Expr::Range {
                    field: NumField::Chars,
                    op: Op::Lt,
                    value: 10
                })),
            ])
        );
        assert_eq!(parse("").unwrap(), Expr::All);
        assert_eq!(
            parse("source:\"my set\"").unwrap(),
            term(TermField::Source, "my set")
        );
        assert_eq!(
            parse("source:hh-rlhf").unwrap(),
            term(TermField::Source, "hh-rlhf")
        );
    }

    #[test]
    fn errors_name_position_and_expectation() {
        let err = parse("category:math AND").unwrap_err();
        assert_eq!(err.to_string(), "query error at position 17: expected a term such as `category:math`, `chars:<2000`, a word, or `(`, found the end of the query");
        let err = parse("(category:math").unwrap_err();
        assert_eq!((err.position, err.expected.as_str()), (14, "`)`"));
        let err = parse("chars:<lots").unwrap_err();
        assert_eq!(
            (err.position, err.expected.as_str()),
            (7, "a whole number for `chars`")
        );
        let err = parse("colour:red").unwrap_err();
        assert_eq!(err.position, 0);
        assert!(err.expected.starts_with("a field"));
        assert_eq!(
            parse("hash:00FFab12").unwrap(),
            term(TermField::Hash, "00ffab12"),
            "hex digits in any case"
        );
        let err = parse("hash:12g4").unwrap_err();
        assert_eq!(
            (err.position, err.expected.as_str()),
            (
                5,
                "a hash for `hash`: 4 to 40 hex digits (a SHA-1 or its prefix)"
            )
        );
        let err = parse("category:math)").unwrap_err();
        assert_eq!((err.position, err.found.as_str()), (13, "`)`"));
    }
}
