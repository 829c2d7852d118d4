//! The `count` of a paginated list's next page, known without counting.
//!
//! etcd answers every Range with the number of keys in the whole range, and
//! kube-apiserver lists in pages: page k asks for `[after the last key of
//! page k-1, end)` at the revision of page 1. Counting that rest in SQL
//! costs O(keys left), so a list of n keys in pages of p cost O(n²/p).
//! But a page that returned `limit` keys in key order, at revision R,
//! tells the count of the rest exactly: its count minus `limit`. Counts at
//! a fixed revision never change (a shard commits nothing at or below its
//! current revision again, and a compacted revision is refused before
//! any count is used), so the remembered figure stays true for as long as
//! it is kept, whatever is written meanwhile and whichever router asks.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use kubeshard_proto::etcdserverpb::RangeRequest;
use kubeshard_proto::etcdserverpb::range_request::{SortOrder, SortTarget};

use crate::keys::KeyRange;

/// Continuations remembered per shard; older ones are forgotten first.
const CAPACITY: usize = 1024;
/// Keys longer than this (start plus end) are not remembered, so the cache
/// stays small whatever keys clients send (SQLite keys have no length limit).
const MAX_KEY_BYTES: usize = 4096;

/// `[start, end)` at a revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Continuation {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    revision: i64,
}

#[derive(Debug, Default)]
struct Inner {
    counts: HashMap<Continuation, i64>,
    order: VecDeque<Continuation>,
}

#[derive(Debug, Default)]
pub(crate) struct PageCounts {
    inner: Mutex<Inner>,
}

/// Whether the rows of `request` are the first `limit` keys of its range
/// in key order, and its count the plain number of keys in the range: a
/// span, ascending key order, a limit, no revision filters, rows wanted.
pub(crate) fn is_page(request: &RangeRequest, range: &KeyRange) -> bool {
    let key_order = SortTarget::try_from(request.sort_target) == Ok(SortTarget::Key)
        && matches!(
            SortOrder::try_from(request.sort_order),
            Ok(SortOrder::None | SortOrder::Ascend)
        );
    matches!(range, KeyRange::Span { .. })
        && key_order
        && request.limit > 0
        && !request.count_only
        && request.min_mod_revision == 0
        && request.max_mod_revision == 0
        && request.min_create_revision == 0
        && request.max_create_revision == 0
}

impl PageCounts {
    /// The count of `range` at `revision`, if a previous page taught it.
    pub(crate) fn get(&self, range: &KeyRange, revision: i64) -> Option<i64> {
        let KeyRange::Span { start, end } = range else {
            return None;
        };
        let key = Continuation {
            start: start.clone(),
            end: end.clone(),
            revision,
        };
        let inner = self.inner.lock().ok()?;
        inner.counts.get(&key).copied()
    }

    /// Learns from a page of `range` at `revision` that returned exactly
    /// `returned` keys ending with `last_key` (more keys followed) out of
    /// `count`: the rest, from just after `last_key`, holds count - returned.
    pub(crate) fn learn(
        &self,
        range: &KeyRange,
        revision: i64,
        last_key: &[u8],
        returned: i64,
        count: i64,
    ) {
        let KeyRange::Span { end, .. } = range else {
            return;
        };
        if last_key.len() + end.as_ref().map_or(0, Vec::len) >= MAX_KEY_BYTES {
            return;
        }
        let mut start = last_key.to_vec();
        start.push(0);
        let key = Continuation {
            start,
            end: end.clone(),
            revision,
        };
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.counts.insert(key.clone(), count - returned).is_none() {
            inner.order.push_back(key);
            while inner.order.len() > CAPACITY {
                if let Some(old) = inner.order.pop_front() {
                    inner.counts.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: &[u8], end: &[u8]) -> KeyRange {
        KeyRange::new(start, end)
    }

    #[test]
    fn a_full_page_gives_the_rest_its_count() {
        let counts = PageCounts::default();
        let range = span(b"/a/", b"/a0");
        counts.learn(&range, 7, b"/a/k2", 3, 10);
        assert_eq!(counts.get(&span(b"/a/k2\0", b"/a0"), 7), Some(7));
        // Another revision, start or end is another question.
        assert_eq!(counts.get(&span(b"/a/k2\0", b"/a0"), 8), None);
        assert_eq!(counts.get(&span(b"/a/k2", b"/a0"), 7), None);
        assert_eq!(counts.get(&span(b"/a/k2\0", b"\0"), 7), None);
    }

    #[test]
    fn only_key_ordered_limited_unfiltered_spans_are_pages() {
        let range = span(b"a", b"b");
        let page = RangeRequest {
            key: b"a".to_vec(),
            range_end: b"b".to_vec(),
            limit: 10,
            ..Default::default()
        };
        assert!(is_page(&page, &range));
        assert!(!is_page(&page, &KeyRange::new(b"a", b"")));
        for other in [
            RangeRequest {
                limit: 0,
                ..page.clone()
            },
            RangeRequest {
                sort_order: SortOrder::Descend as i32,
                ..page.clone()
            },
            RangeRequest {
                sort_target: SortTarget::Mod as i32,
                ..page.clone()
            },
            RangeRequest {
                min_mod_revision: 3,
                ..page.clone()
            },
            RangeRequest {
                max_create_revision: 3,
                ..page.clone()
            },
            RangeRequest {
                count_only: true,
                ..page.clone()
            },
        ] {
            assert!(!is_page(&other, &range), "{other:?}");
        }
    }

    #[test]
    fn long_keys_are_not_remembered() {
        let counts = PageCounts::default();
        let range = span(b"a", b"b");
        let long = vec![b'a'; MAX_KEY_BYTES];
        counts.learn(&range, 7, &long, 1, 2);
        let mut next = long.clone();
        next.push(0);
        assert_eq!(counts.get(&KeyRange::new(&next, b"b"), 7), None);
        assert_eq!(counts.inner.lock().map(|i| i.counts.len()).ok(), Some(0));
    }

    #[test]
    fn old_continuations_are_forgotten() {
        let counts = PageCounts::default();
        let range = span(b"a", b"b");
        for i in 0..(CAPACITY as i64 + 5) {
            counts.learn(&range, i, b"k", 1, 2);
        }
        assert_eq!(counts.get(&span(b"k\0", b"b"), 0), None);
        assert_eq!(
            counts.get(&span(b"k\0", b"b"), CAPACITY as i64 + 4),
            Some(1)
        );
        assert_eq!(
            counts.inner.lock().map(|i| i.counts.len()).ok(),
            Some(CAPACITY)
        );
    }
}
