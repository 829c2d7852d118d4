//! Kubernetes label and field selectors, evaluated against the objects
//! kube-apiserver stores: JSON, or its protobuf envelope (`k8s\0` +
//! runtime.Unknown). This is kubeshard's selector push-down: a Range or a
//! Watch carrying selectors gets only the matching keys.
//!
//! The answer may be a superset, never a subset: kube-apiserver filters
//! again. So whatever cannot be decoded (values encrypted at rest, anything
//! that is not an object) or evaluated (a field of a protobuf object other
//! than name and namespace, a missing or non-scalar JSON field) counts as
//! matching.
#![forbid(unsafe_code)]

mod fields;
mod labels;
mod object;
mod protobuf;

pub use fields::{FieldRequirement, parse_fields};
pub use labels::{LabelOp, LabelRequirement, parse_labels};
pub use object::{Object, ObjectMeta, protobuf_object};

/// A selector that could not be parsed; the text says where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("invalid label selector {selector:?}: {reason}")]
    Label { selector: String, reason: String },
    #[error("invalid field selector {selector:?}: {reason}")]
    Field { selector: String, reason: String },
}

/// A label selector and a field selector, both of which must match
/// (an empty one matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub labels: Vec<LabelRequirement>,
    pub fields: Vec<FieldRequirement>,
}

impl Selector {
    /// Parses the two selector strings of a request (empty: no filter).
    pub fn parse(label_selector: &str, field_selector: &str) -> Result<Selector, SelectorError> {
        Ok(Selector {
            labels: parse_labels(label_selector)?,
            fields: parse_fields(field_selector)?,
        })
    }

    /// True when the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    /// Whether a stored value matches: decodes it first.
    pub fn matches_value(&self, value: &[u8]) -> bool {
        self.is_empty() || self.matches(&Object::decode(value))
    }

    /// Whether a decoded object matches (an opaque one always does).
    pub fn matches(&self, object: &Object) -> bool {
        let Some(meta) = object.meta() else {
            return true;
        };
        self.labels.iter().all(|r| r.matches(&meta.labels))
            && self.fields.iter().all(|r| r.matches(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json(name: &str, labels: &str) -> Vec<u8> {
        format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"ns1","labels":{{{labels}}}}},"spec":{{"nodeName":"node-1","priority":7}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn labels_and_fields_together() {
        let Ok(sel) = Selector::parse("app=web,tier in (a,b)", "metadata.name=p1") else {
            panic!("parse");
        };
        assert!(sel.matches_value(&pod_json("p1", r#""app":"web","tier":"a""#)));
        assert!(!sel.matches_value(&pod_json("p2", r#""app":"web","tier":"a""#)));
        assert!(!sel.matches_value(&pod_json("p1", r#""app":"web","tier":"c""#)));
        assert!(!sel.matches_value(&pod_json("p1", r#""app":"db","tier":"a""#)));
    }

    #[test]
    fn undecodable_values_match() {
        let Ok(sel) = Selector::parse("app=web", "metadata.name=p1") else {
            panic!("parse");
        };
        assert!(sel.matches_value(b"k8s:enc:aescbc:v1:key1:\x01\x02"));
        assert!(sel.matches_value(b"not an object"));
        assert!(sel.matches_value(b""));
        assert!(sel.matches_value(b"{not json"));
    }

    #[test]
    fn json_fields_by_path() {
        let v = pod_json("p1", "");
        let check = |f: &str| match Selector::parse("", f) {
            Ok(sel) => sel.matches_value(&v),
            Err(e) => panic!("{e}"),
        };
        assert!(check("spec.nodeName=node-1"));
        assert!(!check("spec.nodeName=node-2"));
        assert!(check("spec.nodeName!=node-2"));
        assert!(check("spec.priority=7"));
        assert!(check("metadata.namespace=ns1"));
        assert!(!check("metadata.namespace!=ns1"));
        // Missing or non-scalar: cannot tell, so it matches.
        assert!(check("spec.missing=x"));
        assert!(check("spec=x"));
    }

    #[test]
    fn errors_name_the_selector() {
        let Err(e) = Selector::parse("app in (", "") else {
            panic!("accepted");
        };
        assert!(
            e.to_string()
                .starts_with("invalid label selector \"app in (\"")
        );
        let Err(e) = Selector::parse("", "metadata.name") else {
            panic!("accepted");
        };
        assert!(e.to_string().starts_with("invalid field selector"));
    }
}
