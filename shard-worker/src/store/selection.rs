//! Ranges carrying Kubernetes label or field selectors (kubeshard's
//! push-down extension of RangeRequest): the range is read as if unfiltered,
//! then filtered by the selectors, and everything else applies to the
//! matching keys as etcd applies it to all: `count` is the number of
//! matching keys in range, then the min/max revision filters, `limit`,
//! `more`, `count_only` and `keys_only` apply. Sort order and revision work
//! as on any range.
//!
//! The range read is narrowed to the selector's candidates through the
//! label index (`label_index.rs`) when the selector has a requirement the
//! index knows (an equality or `in` on a label, `metadata.name` or
//! `metadata.namespace`): about as many rows as match. Otherwise (only
//! negations, or other fields) every key of the range is read. Either way
//! the selector then decides exactly, on the values read.

use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse};
use kubeshard_selector::Selector;

use super::label_index::{Narrowing, driving_terms};
use crate::error::{Result, ShardError};
use crate::keys::KeyRange;

/// A selector-carrying range, split into the unfiltered range to read and
/// what to do with its answer.
#[derive(Debug)]
pub(crate) struct SelectedRange {
    selector: Selector,
    /// The range to read: every key in range, with values, in order.
    pub(crate) unfiltered: RangeRequest,
    narrowing: Option<Narrowing>,
}

impl SelectedRange {
    /// None if the request has no selector (an ordinary range).
    pub(crate) fn of(request: &RangeRequest) -> Result<Option<SelectedRange>> {
        if request.label_selector.is_empty() && request.field_selector.is_empty() {
            return Ok(None);
        }
        let selector = Selector::parse(&request.label_selector, &request.field_selector)
            .map_err(ShardError::InvalidSelector)?;
        let unfiltered = RangeRequest {
            limit: 0,
            keys_only: false,
            count_only: false,
            min_mod_revision: 0,
            max_mod_revision: 0,
            min_create_revision: 0,
            max_create_revision: 0,
            label_selector: String::new(),
            field_selector: String::new(),
            ..request.clone()
        };
        let single = matches!(
            KeyRange::new(&request.key, &request.range_end),
            KeyRange::Single(_)
        );
        let narrowing = driving_terms(&selector)
            .filter(|_| !single)
            .map(|terms| Narrowing { terms, mark: 0 });
        Ok(Some(SelectedRange {
            selector,
            unfiltered,
            narrowing,
        }))
    }

    /// The candidates to read instead of the whole range, if the index
    /// can tell them.
    pub(crate) fn narrowing(&self) -> Option<&Narrowing> {
        self.narrowing.as_ref()
    }

    /// The answer to `request` from the answer to `self.unfiltered`.
    pub(crate) fn answer(&self, request: &RangeRequest, mut read: RangeResponse) -> RangeResponse {
        read.kvs.retain(|kv| self.selector.matches_value(&kv.value));
        read.count = read.kvs.len() as i64;
        read.more = false;
        let within = |min: i64, max: i64, v: i64| (min == 0 || v >= min) && (max == 0 || v <= max);
        read.kvs.retain(|kv| {
            within(
                request.min_mod_revision,
                request.max_mod_revision,
                kv.mod_revision,
            ) && within(
                request.min_create_revision,
                request.max_create_revision,
                kv.create_revision,
            )
        });
        if request.count_only {
            read.kvs.clear();
        }
        if request.limit > 0 && read.kvs.len() as i64 > request.limit {
            read.kvs.truncate(request.limit as usize);
            read.more = true;
        }
        if request.keys_only {
            for kv in &mut read.kvs {
                kv.value.clear();
            }
        }
        read
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeshard_proto::mvccpb::KeyValue;

    fn object(key: &str, app: &str) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: format!(r#"{{"metadata":{{"name":"{key}","labels":{{"app":"{app}"}}}}}}"#)
                .into_bytes(),
            ..Default::default()
        }
    }

    #[test]
    fn limit_and_count_refer_to_matching_keys() {
        let request = RangeRequest {
            key: b"a".to_vec(),
            range_end: b"z".to_vec(),
            limit: 2,
            keys_only: true,
            label_selector: "app=web".into(),
            ..Default::default()
        };
        let Ok(Some(selected)) = SelectedRange::of(&request) else {
            panic!("not selected");
        };
        assert_eq!(selected.unfiltered.limit, 0);
        assert!(!selected.unfiltered.keys_only);
        let read = RangeResponse {
            kvs: vec![
                object("a", "web"),
                object("b", "db"),
                object("c", "web"),
                object("d", "web"),
            ],
            count: 4,
            ..Default::default()
        };
        let answer = selected.answer(&request, read);
        let keys: Vec<&[u8]> = answer.kvs.iter().map(|kv| kv.key.as_slice()).collect();
        assert_eq!(keys, vec![b"a".as_slice(), b"c".as_slice()]);
        assert!(answer.more);
        assert_eq!(answer.count, 3);
        assert!(answer.kvs.iter().all(|kv| kv.value.is_empty()));
    }

    #[test]
    fn malformed_selectors_are_refused() {
        let request = RangeRequest {
            key: b"a".to_vec(),
            label_selector: "app in (".into(),
            ..Default::default()
        };
        assert!(matches!(
            SelectedRange::of(&request),
            Err(ShardError::InvalidSelector(_))
        ));
        let plain = RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        };
        assert!(matches!(SelectedRange::of(&plain), Ok(None)));
    }
}
