//! Label selectors in Kubernetes' syntax (k8s.io/apimachinery/pkg/labels):
//! `key`, `!key`, `key=value`, `key==value`, `key!=value`,
//! `key in (a,b)`, `key notin (a,b)`, `key>1`, `key<1`; a comma means AND.

use std::collections::BTreeMap;

use crate::SelectorError;

/// How a label requirement compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOp {
    /// The label exists with one of the values (`=`, `==` and `in`).
    In,
    /// The label is missing or has none of the values (`!=`, `notin`).
    NotIn,
    /// The label exists (`key`).
    Exists,
    /// The label is missing (`!key`).
    DoesNotExist,
    /// The label's value is an integer above the requirement's (`>`).
    GreaterThan,
    /// The label's value is an integer below the requirement's (`<`).
    LessThan,
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRequirement {
    pub key: String,
    pub op: LabelOp,
    /// The values of In/NotIn (at least one), the one integer of
    /// GreaterThan/LessThan, none otherwise.
    pub values: Vec<String>,
}

impl LabelRequirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.op {
            LabelOp::In => value.is_some_and(|v| self.values.contains(v)),
            LabelOp::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            LabelOp::Exists => value.is_some(),
            LabelOp::DoesNotExist => value.is_none(),
            LabelOp::GreaterThan | LabelOp::LessThan => {
                let (Some(have), Some(want)) = (
                    value.and_then(|v| v.parse::<i64>().ok()),
                    self.values.first().and_then(|v| v.parse::<i64>().ok()),
                ) else {
                    return false;
                };
                if self.op == LabelOp::GreaterThan {
                    have > want
                } else {
                    have < want
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token<'s> {
    Ident(&'s str),
    Not,
    NotEquals,
    Equals,
    DoubleEquals,
    Open,
    Close,
    Comma,
    Greater,
    Less,
    End,
}

fn describe(t: &Token<'_>) -> String {
    match t {
        Token::Ident(s) => format!("{s:?}"),
        Token::Not => "'!'".into(),
        Token::NotEquals => "'!='".into(),
        Token::Equals => "'='".into(),
        Token::DoubleEquals => "'=='".into(),
        Token::Open => "'('".into(),
        Token::Close => "')'".into(),
        Token::Comma => "','".into(),
        Token::Greater => "'>'".into(),
        Token::Less => "'<'".into(),
        Token::End => "the end".into(),
    }
}

fn is_special(c: char) -> bool {
    matches!(c, '=' | '!' | '(' | ')' | ',' | '>' | '<')
}

fn lex(s: &str) -> Vec<Token<'_>> {
    let mut tokens = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start();
        let Some(c) = rest.chars().next() else {
            tokens.push(Token::End);
            return tokens;
        };
        let (token, len) = match c {
            '!' if rest.starts_with("!=") => (Token::NotEquals, 2),
            '!' => (Token::Not, 1),
            '=' if rest.starts_with("==") => (Token::DoubleEquals, 2),
            '=' => (Token::Equals, 1),
            '(' => (Token::Open, 1),
            ')' => (Token::Close, 1),
            ',' => (Token::Comma, 1),
            '>' => (Token::Greater, 1),
            '<' => (Token::Less, 1),
            _ => {
                let len = rest
                    .find(|c: char| c.is_whitespace() || is_special(c))
                    .unwrap_or(rest.len());
                (Token::Ident(&rest[..len]), len)
            }
        };
        tokens.push(token);
        rest = &rest[len..];
    }
}

struct Parser<'s> {
    tokens: Vec<Token<'s>>,
    at: usize,
}

impl<'s> Parser<'s> {
    fn peek(&self) -> &Token<'s> {
        self.tokens.get(self.at).unwrap_or(&Token::End)
    }

    fn next(&mut self) -> Token<'s> {
        let t = self.peek().clone();
        self.at += 1;
        t
    }

    fn requirement(&mut self) -> Result<LabelRequirement, String> {
        let negated = self.peek() == &Token::Not;
        if negated {
            self.at += 1;
        }
        let key = match self.next() {
            Token::Ident(k) => k.to_string(),
            t => return Err(format!("expected a label key, found {}", describe(&t))),
        };
        check_key(&key)?;
        if negated {
            return match self.peek() {
                Token::Comma | Token::End => Ok(LabelRequirement {
                    key,
                    op: LabelOp::DoesNotExist,
                    values: Vec::new(),
                }),
                t => Err(format!(
                    "expected ',' or the end after '!{key}', found {}",
                    describe(t)
                )),
            };
        }
        let op = match self.peek() {
            Token::Comma | Token::End => {
                return Ok(LabelRequirement {
                    key,
                    op: LabelOp::Exists,
                    values: Vec::new(),
                });
            }
            Token::Equals | Token::DoubleEquals => LabelOp::In,
            Token::NotEquals => LabelOp::NotIn,
            Token::Greater => LabelOp::GreaterThan,
            Token::Less => LabelOp::LessThan,
            Token::Ident("in") => return self.set(key, LabelOp::In),
            Token::Ident("notin") => return self.set(key, LabelOp::NotIn),
            t => {
                return Err(format!(
                    "expected an operator (=, ==, !=, in, notin, >, <) after {key:?}, found {}",
                    describe(t)
                ));
            }
        };
        self.at += 1;
        let value = match self.peek() {
            Token::Ident(v) => {
                let v = v.to_string();
                self.at += 1;
                v
            }
            // `key=` compares with the empty value, as Kubernetes does.
            Token::Comma | Token::End if matches!(op, LabelOp::In | LabelOp::NotIn) => {
                String::new()
            }
            t => {
                return Err(format!(
                    "expected a value after {key:?}, found {}",
                    describe(t)
                ));
            }
        };
        if matches!(op, LabelOp::GreaterThan | LabelOp::LessThan) {
            if value.parse::<i64>().is_err() {
                return Err(format!(
                    "for '>' and '<' the value must be an integer, not {value:?}"
                ));
            }
        } else {
            check_value(&value)?;
        }
        Ok(LabelRequirement {
            key,
            op,
            values: vec![value],
        })
    }

    fn set(&mut self, key: String, op: LabelOp) -> Result<LabelRequirement, String> {
        self.at += 1;
        match self.next() {
            Token::Open => {}
            t => {
                return Err(format!(
                    "expected '(' after 'in'/'notin', found {}",
                    describe(&t)
                ));
            }
        }
        let mut values = Vec::new();
        // Kubernetes reads `(a,,b)` and `(a,)` as holding the empty value.
        let mut expect_value = true;
        loop {
            match self.next() {
                Token::Ident(v) if expect_value => {
                    check_value(v)?;
                    values.push(v.to_string());
                    expect_value = false;
                }
                Token::Comma => {
                    if expect_value {
                        values.push(String::new());
                    }
                    expect_value = true;
                }
                Token::Close => {
                    if expect_value && !values.is_empty() {
                        values.push(String::new());
                    }
                    break;
                }
                t => {
                    return Err(format!(
                        "expected a value, ',' or ')' in the set of {key:?}, found {}",
                        describe(&t)
                    ));
                }
            }
        }
        if values.is_empty() {
            return Err(format!("the set of values of {key:?} is empty"));
        }
        values.sort();
        values.dedup();
        Ok(LabelRequirement { key, op, values })
    }
}

/// Parses a label selector; the empty string selects everything.
pub fn parse_labels(selector: &str) -> Result<Vec<LabelRequirement>, SelectorError> {
    let fail = |reason: String| SelectorError::Label {
        selector: selector.to_string(),
        reason,
    };
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut parser = Parser {
        tokens: lex(selector),
        at: 0,
    };
    let mut requirements = Vec::new();
    loop {
        requirements.push(parser.requirement().map_err(fail)?);
        match parser.next() {
            Token::Comma => {}
            Token::End => break,
            t => {
                return Err(fail(format!(
                    "expected ',' or the end, found {}",
                    describe(&t)
                )));
            }
        }
    }
    Ok(requirements)
}

/// A label key: an optional DNS subdomain prefix and '/', then a name of
/// at most 63 characters.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let subdomain = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !subdomain {
            return Err(format!(
                "the prefix of label key {key:?} must be a DNS subdomain (lowercase letters, digits, '-' and '.')"
            ));
        }
    }
    if name.is_empty() || !is_name(name) {
        return Err(format!(
            "label key {key:?} must be at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_name(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} must be empty or at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ))
    }
}

fn is_name(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.len() <= 63
        && edge(s.chars().next())
        && edge(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, op: LabelOp, values: &[&str]) -> LabelRequirement {
        LabelRequirement {
            key: key.into(),
            op,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn parses_every_operator() {
        let parsed = parse_labels(
            "a=1, b==2,c!=3, d in (x, y), e notin (z),f,!g, h>4, i<5, example.com/j=k",
        );
        assert_eq!(
            parsed,
            Ok(vec![
                req("a", LabelOp::In, &["1"]),
                req("b", LabelOp::In, &["2"]),
                req("c", LabelOp::NotIn, &["3"]),
                req("d", LabelOp::In, &["x", "y"]),
                req("e", LabelOp::NotIn, &["z"]),
                req("f", LabelOp::Exists, &[]),
                req("g", LabelOp::DoesNotExist, &[]),
                req("h", LabelOp::GreaterThan, &["4"]),
                req("i", LabelOp::LessThan, &["5"]),
                req("example.com/j", LabelOp::In, &["k"]),
            ])
        );
        assert_eq!(parse_labels(""), Ok(vec![]));
        assert_eq!(parse_labels("a="), Ok(vec![req("a", LabelOp::In, &[""])]));
        assert_eq!(parse_labels("a=="), Ok(vec![req("a", LabelOp::In, &[""])]));
        assert_eq!(
            parse_labels("a in (x,)"),
            Ok(vec![req("a", LabelOp::In, &["", "x"])])
        );
    }

    #[test]
    fn refuses_malformed_selectors() {
        for bad in [
            "a in ()",
            "a in (x",
            "a in x",
            "=a",
            "a b",
            "a,",
            ",a",
            "!a=b",
            "a>b",
            "a=b c",
            "a=-b",
            "Example.com/a=b",
            "-a",
            "a=(b)",
            "a notin",
            "a=b)",
        ] {
            assert!(parse_labels(bad).is_err(), "{bad:?} was accepted");
        }
        let long = "a".repeat(64);
        assert!(parse_labels(&long).is_err());
        assert!(parse_labels(&format!("a={long}")).is_err());
    }

    #[test]
    fn matching_follows_kubernetes() {
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            ("n".to_string(), "7".to_string()),
        ]
        .into_iter()
        .collect();
        let check = |s: &str| match parse_labels(s) {
            Ok(reqs) => reqs.iter().all(|r| r.matches(&labels)),
            Err(e) => panic!("{e}"),
        };
        assert!(check("app=web"));
        assert!(!check("app=db"));
        assert!(check("app!=db"));
        assert!(check("other!=db"), "!= matches a missing label");
        assert!(check("other notin (a)"));
        assert!(!check("app notin (web)"));
        assert!(check("app in (db,web)"));
        assert!(check("app"));
        assert!(!check("!app"));
        assert!(check("!other"));
        assert!(check("n>6"));
        assert!(!check("n>7"));
        assert!(check("n<8"));
        assert!(
            !check("app>1"),
            "a value that is not an integer never compares"
        );
        assert!(!check("app=web,other"));
    }
}
