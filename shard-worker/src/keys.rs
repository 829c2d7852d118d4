//! etcd's key ranges: one key, [start, end), or everything from start on.

/// The keys a request addresses, decoded from etcd's (key, range_end) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// `range_end` empty: exactly this key.
    Single(Vec<u8>),
    /// `[start, end)`; `end == None` means no upper bound (`range_end == "\0"`).
    Span {
        start: Vec<u8>,
        end: Option<Vec<u8>>,
    },
}

impl KeyRange {
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key.to_vec()),
            [0] => KeyRange::Span {
                start: key.to_vec(),
                end: None,
            },
            end => KeyRange::Span {
                start: key.to_vec(),
                end: Some(end.to_vec()),
            },
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Single(k) => k.as_slice() == key,
            KeyRange::Span { start, end } => {
                key >= start.as_slice() && end.as_ref().is_none_or(|e| key < e.as_slice())
            }
        }
    }

    /// True when no key can be in the range (end at or below start).
    pub fn is_empty(&self) -> bool {
        match self {
            KeyRange::Single(_) => false,
            KeyRange::Span { start, end } => end.as_ref().is_some_and(|e| e <= start),
        }
    }

    /// Whether two ranges share a key (for etcd's duplicate-key check in Txn).
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        match (self, other) {
            (KeyRange::Single(a), b) | (b, KeyRange::Single(a)) => b.contains(a),
            (KeyRange::Span { start: s1, end: e1 }, KeyRange::Span { start: s2, end: e2 }) => {
                if self.is_empty() || other.is_empty() {
                    return false;
                }
                let s1_below_e2 = e2.as_ref().is_none_or(|e| s1 < e);
                let s2_below_e1 = e1.as_ref().is_none_or(|e| s2 < e);
                s1_below_e2 && s2_below_e1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_etcd_forms() {
        assert_eq!(KeyRange::new(b"a", b""), KeyRange::Single(b"a".to_vec()));
        let from = KeyRange::new(b"b", b"\0");
        assert!(from.contains(b"b") && from.contains(b"zzz") && !from.contains(b"a"));
        let all = KeyRange::new(b"\0", b"\0");
        assert!(all.contains(b"\0") && all.contains(b"/registry"));
        let span = KeyRange::new(b"a", b"c");
        assert!(span.contains(b"b") && !span.contains(b"c"));
        assert!(KeyRange::new(b"c", b"a").is_empty());
    }

    #[test]
    fn overlap() {
        let a = KeyRange::new(b"a", b"c");
        assert!(a.overlaps(&KeyRange::new(b"b", b"")));
        assert!(!a.overlaps(&KeyRange::new(b"c", b"")));
        assert!(a.overlaps(&KeyRange::new(b"b", b"\0")));
        assert!(!a.overlaps(&KeyRange::new(b"c", b"d")));
        assert!(KeyRange::new(b"x", b"").overlaps(&KeyRange::new(b"x", b"")));
    }
}
