//! What a selector needs of a stored value: its ObjectMeta (name,
//! namespace, labels) and, for JSON, the document for field paths.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::protobuf::{Fields, Wire, encode};

/// kube-apiserver's protobuf storage format: this prefix, then a
/// runtime.Unknown message whose `raw` holds the object.
const PROTOBUF_MAGIC: &[u8] = b"k8s\0";

/// The object metadata selectors read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// A stored value, decoded as far as selectors need.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Json {
        meta: ObjectMeta,
        document: Value,
    },
    Protobuf {
        meta: ObjectMeta,
    },
    /// Not an object this crate can read (encrypted, compressed, not
    /// Kubernetes'): every selector matches it.
    Opaque,
}

/// The value of a field, or Unknown when it cannot be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scalar<'a> {
    Value(std::borrow::Cow<'a, str>),
    Unknown,
}

impl Object {
    pub fn decode(value: &[u8]) -> Object {
        if let Some(envelope) = value.strip_prefix(PROTOBUF_MAGIC) {
            return decode_protobuf(envelope)
                .map_or(Object::Opaque, |meta| Object::Protobuf { meta });
        }
        let first = value.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'{')
            && let Ok(document) = serde_json::from_slice::<Value>(value)
            && let Some(meta) = json_meta(&document)
        {
            return Object::Json { meta, document };
        }
        Object::Opaque
    }

    pub fn meta(&self) -> Option<&ObjectMeta> {
        match self {
            Object::Json { meta, .. } | Object::Protobuf { meta } => Some(meta),
            Object::Opaque => None,
        }
    }

    pub(crate) fn field(&self, path: &str) -> Scalar<'_> {
        let Some(meta) = self.meta() else {
            return Scalar::Unknown;
        };
        match path {
            "metadata.name" => return Scalar::Value(meta.name.as_str().into()),
            "metadata.namespace" => return Scalar::Value(meta.namespace.as_str().into()),
            _ => {}
        }
        let Object::Json { document, .. } = self else {
            return Scalar::Unknown;
        };
        let mut at = document;
        for part in path.split('.') {
            match at.get(part) {
                Some(next) => at = next,
                // Missing: the object may be served with a default there.
                None => return Scalar::Unknown,
            }
        }
        match at {
            Value::String(s) => Scalar::Value(s.as_str().into()),
            Value::Bool(b) => Scalar::Value(b.to_string().into()),
            Value::Number(n) => Scalar::Value(n.to_string().into()),
            Value::Null | Value::Array(_) | Value::Object(_) => Scalar::Unknown,
        }
    }
}

/// ObjectMeta of a JSON object; None if it is not shaped like one.
fn json_meta(document: &Value) -> Option<ObjectMeta> {
    let object = document.as_object()?;
    let mut meta = ObjectMeta::default();
    let Some(metadata) = object.get("metadata") else {
        // Every stored Kubernetes object has metadata.
        return None;
    };
    let metadata = metadata.as_object()?;
    let text = |key: &str| match metadata.get(key) {
        None | Some(Value::Null) => Some(String::new()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => None,
    };
    meta.name = text("name")?;
    meta.namespace = text("namespace")?;
    match metadata.get("labels") {
        None | Some(Value::Null) => {}
        Some(Value::Object(labels)) => {
            for (k, v) in labels {
                meta.labels.insert(k.clone(), v.as_str()?.to_string());
            }
        }
        Some(_) => return None,
    }
    Some(meta)
}

/// ObjectMeta out of runtime.Unknown { typeMeta = 1; raw = 2;
/// contentEncoding = 3; contentType = 4 }, whose raw object has its
/// ObjectMeta at field 1 (every stored Kubernetes type does).
fn decode_protobuf(envelope: &[u8]) -> Option<ObjectMeta> {
    let mut raw = None;
    let mut fields = Fields::new(envelope);
    for (number, wire) in fields.by_ref() {
        match (number, wire) {
            (2, Wire::Bytes(b)) => raw = Some(b),
            // A compressed object cannot be read here.
            (3, Wire::Bytes(encoding)) if !encoding.is_empty() => return None,
            _ => {}
        }
    }
    if fields.failed() {
        return None;
    }
    let mut meta_bytes = None;
    let mut fields = Fields::new(raw?);
    for (number, wire) in fields.by_ref() {
        if let (1, Wire::Bytes(b)) = (number, wire) {
            meta_bytes = Some(b);
        }
    }
    if fields.failed() {
        return None;
    }
    let mut meta = ObjectMeta::default();
    let mut fields = Fields::new(meta_bytes.unwrap_or_default());
    for (number, wire) in fields.by_ref() {
        match (number, wire) {
            (1, Wire::Bytes(b)) => meta.name = utf8(b)?,
            (3, Wire::Bytes(b)) => meta.namespace = utf8(b)?,
            (11, Wire::Bytes(entry)) => {
                let (mut key, mut value) = (String::new(), String::new());
                let mut entry_fields = Fields::new(entry);
                for (n, w) in entry_fields.by_ref() {
                    match (n, w) {
                        (1, Wire::Bytes(b)) => key = utf8(b)?,
                        (2, Wire::Bytes(b)) => value = utf8(b)?,
                        _ => {}
                    }
                }
                if entry_fields.failed() {
                    return None;
                }
                meta.labels.insert(key, value);
            }
            _ => {}
        }
    }
    if fields.failed() {
        return None;
    }
    Some(meta)
}

/// An object as kube-apiserver stores it in protobuf (`k8s\0` +
/// runtime.Unknown of a v1 Pod whose ObjectMeta has these name, namespace
/// and labels), for tests and benchmarks of the selectors.
pub fn protobuf_object(name: &str, namespace: &str, labels: &[(&str, &str)]) -> Vec<u8> {
    let mut meta = Vec::new();
    encode::bytes(&mut meta, 1, name.as_bytes());
    encode::bytes(&mut meta, 2, b"generated-");
    encode::bytes(&mut meta, 3, namespace.as_bytes());
    encode::int(&mut meta, 7, 3); // generation
    for (k, v) in labels {
        let mut entry = Vec::new();
        encode::bytes(&mut entry, 1, k.as_bytes());
        encode::bytes(&mut entry, 2, v.as_bytes());
        encode::bytes(&mut meta, 11, &entry);
    }
    let mut object = Vec::new();
    encode::bytes(&mut object, 1, &meta);
    encode::bytes(&mut object, 2, b"\x0a\x04spec");
    let mut type_meta = Vec::new();
    encode::bytes(&mut type_meta, 1, b"v1");
    encode::bytes(&mut type_meta, 2, b"Pod");
    let mut unknown = Vec::new();
    encode::bytes(&mut unknown, 1, &type_meta);
    encode::bytes(&mut unknown, 2, &object);
    encode::bytes(&mut unknown, 4, b"application/vnd.kubernetes.protobuf");
    let mut value = PROTOBUF_MAGIC.to_vec();
    value.extend_from_slice(&unknown);
    value
}

fn utf8(b: &[u8]) -> Option<String> {
    String::from_utf8(b.to_vec()).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn decodes_protobuf_envelope() {
        let value = protobuf_object("p1", "ns1", &[("app", "web"), ("tier", "")]);
        let Object::Protobuf { meta } = Object::decode(&value) else {
            panic!("not decoded");
        };
        assert_eq!(meta.name, "p1");
        assert_eq!(meta.namespace, "ns1");
        assert_eq!(meta.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(meta.labels.get("tier").map(String::as_str), Some(""));
        // Cut anywhere inside, it is undecodable, never misread.
        for cut in PROTOBUF_MAGIC.len() + 1..value.len() {
            match Object::decode(&value[..cut]) {
                Object::Opaque => {}
                Object::Protobuf { meta } => {
                    // A cut between top-level fields still parses; then it
                    // must read what is there, not invent.
                    assert!(meta.name.is_empty() || meta.name == "p1");
                }
                Object::Json { .. } => panic!("json?"),
            }
        }
    }

    #[test]
    fn compressed_or_encrypted_values_are_opaque() {
        let mut unknown = Vec::new();
        encode::bytes(&mut unknown, 2, b"\x0a\x03\x0a\x01x");
        encode::bytes(&mut unknown, 3, b"gzip");
        let mut value = PROTOBUF_MAGIC.to_vec();
        value.extend_from_slice(&unknown);
        assert_eq!(Object::decode(&value), Object::Opaque);
        assert_eq!(Object::decode(b"k8s:enc:kms:v2:x:\x00\x01"), Object::Opaque);
    }

    #[test]
    fn decodes_json_objects() {
        let v = br#" {"kind":"Thing","metadata":{"name":"a","labels":{"x":"1"}}}"#;
        let Object::Json { meta, .. } = Object::decode(v) else {
            panic!("not decoded");
        };
        assert_eq!((meta.name.as_str(), meta.namespace.as_str()), ("a", ""));
        assert_eq!(meta.labels.len(), 1);
        assert_eq!(
            Object::decode(br#"{"metadata":{"labels":{"x":1}}}"#),
            Object::Opaque
        );
        assert_eq!(Object::decode(br#"{"spec":{}}"#), Object::Opaque);
        assert_eq!(Object::decode(b"[1]"), Object::Opaque);
    }
}
