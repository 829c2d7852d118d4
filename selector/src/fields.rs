//! Field selectors in Kubernetes' syntax (k8s.io/apimachinery/pkg/fields):
//! `path=value`, `path==value`, `path!=value`, a comma meaning AND; `\`
//! escapes `,`, `=`, `!` and itself in values.

use crate::SelectorError;
use crate::object::{Object, Scalar};

/// One term of a field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    /// A dotted path into the object, such as `metadata.name`.
    pub field: String,
    /// `=`/`==` (true) or `!=` (false).
    pub equal: bool,
    pub value: String,
}

impl FieldRequirement {
    /// Whether the object's field compares as required; a field that
    /// cannot be read (not decoded, missing, not a scalar) matches.
    pub fn matches(&self, object: &Object) -> bool {
        match object.field(&self.field) {
            Scalar::Value(v) => (v == self.value) == self.equal,
            Scalar::Unknown => true,
        }
    }
}

/// Parses a field selector; the empty string selects everything.
pub fn parse_fields(selector: &str) -> Result<Vec<FieldRequirement>, SelectorError> {
    let fail = |reason: String| SelectorError::Field {
        selector: selector.to_string(),
        reason,
    };
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut requirements = Vec::new();
    for term in split_terms(selector) {
        requirements.push(parse_term(term).map_err(fail)?);
    }
    Ok(requirements)
}

/// Splits at commas not escaped by a backslash.
fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
}

fn parse_term(term: &str) -> Result<FieldRequirement, String> {
    // The first unescaped operator splits the term; `!=` and `==` before `=`.
    let mut escaped = false;
    for (i, c) in term.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        let (equal, len) = match c {
            '\\' => {
                escaped = true;
                continue;
            }
            '!' if term[i..].starts_with("!=") => (false, 2),
            '=' if term[i..].starts_with("==") => (true, 2),
            '=' => (true, 1),
            _ => continue,
        };
        let field = term[..i].trim();
        if field.is_empty() {
            return Err(format!("the term {term:?} names no field"));
        }
        if field.contains(|c: char| c.is_whitespace() || c == '\\' || c == '!') {
            return Err(format!("the field name {field:?} is not a field path"));
        }
        return Ok(FieldRequirement {
            field: field.to_string(),
            equal,
            value: unescape(&term[i + len..])?,
        });
    }
    Err(format!("the term {term:?} has no operator (=, == or !=)"))
}

fn unescape(value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            if matches!(c, ',' | '=') {
                return Err(format!(
                    "{c:?} in the value {value:?} must be escaped with '\\'"
                ));
            }
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(e @ ('\\' | ',' | '=' | '!')) => out.push(e),
            Some(e) => return Err(format!("invalid escape sequence \\{e} in {value:?}")),
            None => {
                return Err(format!(
                    "the value {value:?} ends with an unfinished escape"
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(field: &str, equal: bool, value: &str) -> FieldRequirement {
        FieldRequirement {
            field: field.into(),
            equal,
            value: value.into(),
        }
    }

    #[test]
    fn parses_terms() {
        assert_eq!(
            parse_fields("metadata.name=a,metadata.namespace!=b,spec.x==c\\,d,e="),
            Ok(vec![
                req("metadata.name", true, "a"),
                req("metadata.namespace", false, "b"),
                req("spec.x", true, "c,d"),
                req("e", true, ""),
            ])
        );
        assert_eq!(parse_fields(""), Ok(vec![]));
        assert_eq!(parse_fields("a=x\\=y"), Ok(vec![req("a", true, "x=y")]));
    }

    #[test]
    fn refuses_malformed_selectors() {
        for bad in [
            "a", "=b", "a=b,", "a=b\\", "a=b\\q", "a=b=c", "a b=c", ",", "a=b,,c=d",
        ] {
            assert!(parse_fields(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
