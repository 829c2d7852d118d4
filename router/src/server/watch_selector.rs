//! Watches carrying Kubernetes selectors (kubeshard's push-down extension
//! of WatchCreateRequest). An event goes to such a watch when its object or
//! its previous object matches, so a watcher also sees objects leave its
//! selection (modified out of it, or deleted). Whatever cannot be decoded
//! matches: the watcher may get more than it selected, never less.
//!
//! A batch of events is decoded at most once per stream, however many of
//! its watches carry selectors (`DecodedBatch`), and a stream with many
//! selected watches finds the few an event may concern through an index by
//! label (`WatchIndex`) instead of testing every watch.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use kubeshard_proto::etcdserverpb::WatchCreateRequest;
use kubeshard_proto::mvccpb::Event;
use kubeshard_proto::mvccpb::event::EventType;
use kubeshard_selector::{LabelOp, Object, Selector, SelectorError};

/// The selectors of one watch.
#[derive(Debug)]
pub(super) struct WatchSelector(Selector);

impl WatchSelector {
    /// None if the request has no selector.
    pub(super) fn of(create: &WatchCreateRequest) -> Result<Option<WatchSelector>, SelectorError> {
        if create.label_selector.is_empty() && create.field_selector.is_empty() {
            return Ok(None);
        }
        let selector = Selector::parse(&create.label_selector, &create.field_selector)?;
        Ok((!selector.is_empty()).then_some(WatchSelector(selector)))
    }

    /// A label requirement every match meets: its key and values (the
    /// `=`/`in` requirement with the fewest values), if there is one.
    fn index_key(&self) -> Option<(&str, &[String])> {
        self.0
            .labels
            .iter()
            .filter(|r| r.op == LabelOp::In)
            .min_by_key(|r| r.values.len())
            .map(|r| (r.key.as_str(), r.values.as_slice()))
    }

    pub(super) fn wants(&self, event: &DecodedEvent) -> bool {
        event.now.as_ref().is_some_and(|o| self.0.matches(o))
            || match &event.before {
                Before::Absent => false,
                Before::Unknown => true,
                Before::Object(o) => self.0.matches(o),
            }
    }
}

/// What the key held before the event.
#[derive(Debug)]
enum Before {
    /// Nothing: the event created the key.
    Absent,
    /// The key existed, but the event does not carry its previous value.
    Unknown,
    Object(Object),
}

/// An event's objects, decoded.
#[derive(Debug)]
pub(super) struct DecodedEvent {
    /// The object after a put; None after a delete.
    now: Option<Object>,
    before: Before,
}

impl DecodedEvent {
    fn of(event: &Event) -> DecodedEvent {
        let is_put = event.r#type == EventType::Put as i32;
        let now = event
            .kv
            .as_ref()
            .filter(|_| is_put)
            .map(|kv| Object::decode(&kv.value));
        let before = match (&event.prev_kv, &event.kv) {
            (Some(prev), _) => Before::Object(Object::decode(&prev.value)),
            // A put of version 1 created the key.
            (None, Some(kv)) if is_put && kv.version == 1 => Before::Absent,
            _ => Before::Unknown,
        };
        DecodedEvent { now, before }
    }
}

/// The watches of one stream by a label their selector requires, so that
/// an event is tested only against watches that may want it.
#[derive(Debug, Default)]
pub(super) struct WatchIndex {
    /// Watches without a label requirement to index them by: every event
    /// is tested against them.
    unindexed: BTreeSet<i64>,
    /// Label key, then value: the watches requiring it.
    by_label: HashMap<String, HashMap<String, BTreeSet<i64>>>,
    /// Every watch in `by_label` (for objects that cannot be decoded).
    indexed: BTreeSet<i64>,
}

impl WatchIndex {
    pub(super) fn insert(&mut self, id: i64, selector: Option<&WatchSelector>) {
        match selector.and_then(WatchSelector::index_key) {
            Some((key, values)) => {
                let by_value = self.by_label.entry(key.to_string()).or_default();
                for v in values {
                    by_value.entry(v.clone()).or_default().insert(id);
                }
                self.indexed.insert(id);
            }
            None => {
                self.unindexed.insert(id);
            }
        }
    }

    pub(super) fn remove(&mut self, id: i64, selector: Option<&WatchSelector>) {
        self.unindexed.remove(&id);
        if !self.indexed.remove(&id) {
            return;
        }
        if let Some((key, values)) = selector.and_then(WatchSelector::index_key)
            && let Some(by_value) = self.by_label.get_mut(key)
        {
            for v in values {
                if let Some(ids) = by_value.get_mut(v) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        by_value.remove(v);
                    }
                }
            }
            if by_value.is_empty() {
                self.by_label.remove(key);
            }
        }
    }

    /// Watches every event is tested against.
    pub(super) fn unindexed(&self) -> &BTreeSet<i64> {
        &self.unindexed
    }

    pub(super) fn has_indexed(&self) -> bool {
        !self.indexed.is_empty()
    }

    /// Adds the indexed watches that may want `event` to `out`.
    pub(super) fn candidates(&self, event: &DecodedEvent, out: &mut BTreeSet<i64>) {
        let before = match &event.before {
            Before::Absent => None,
            Before::Unknown => {
                out.extend(&self.indexed);
                return;
            }
            Before::Object(o) => Some(o),
        };
        for object in event.now.iter().chain(before) {
            let Some(meta) = object.meta() else {
                out.extend(&self.indexed);
                return;
            };
            for (key, value) in &meta.labels {
                if let Some(ids) = self.by_label.get(key).and_then(|m| m.get(value)) {
                    out.extend(ids);
                }
            }
        }
    }
}

/// The events of one batch, each decoded on first use.
#[derive(Debug)]
pub(super) struct DecodedBatch<'a> {
    events: &'a [Event],
    decoded: Vec<OnceLock<DecodedEvent>>,
}

impl<'a> DecodedBatch<'a> {
    pub(super) fn new(events: &'a [Event]) -> Self {
        DecodedBatch {
            events,
            decoded: (0..events.len()).map(|_| OnceLock::new()).collect(),
        }
    }

    pub(super) fn events(&self) -> &'a [Event] {
        self.events
    }

    /// The decoded event at `i` (an index into `events`).
    pub(super) fn decoded(&self, i: usize) -> Option<&DecodedEvent> {
        let cell = self.decoded.get(i)?;
        let event = self.events.get(i)?;
        Some(cell.get_or_init(|| DecodedEvent::of(event)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeshard_proto::mvccpb::KeyValue;

    fn kv(app: &str, version: i64) -> KeyValue {
        KeyValue {
            key: b"/registry/things/a".to_vec(),
            value: format!(r#"{{"metadata":{{"name":"a","labels":{{"app":"{app}"}}}}}}"#)
                .into_bytes(),
            version,
            ..Default::default()
        }
    }

    fn put(now: KeyValue, prev: Option<KeyValue>) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(now),
            prev_kv: prev,
        }
    }

    fn delete(prev: Option<KeyValue>) -> Event {
        Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: b"/registry/things/a".to_vec(),
                ..Default::default()
            }),
            prev_kv: prev,
        }
    }

    fn wants(event: &Event) -> bool {
        let create = WatchCreateRequest {
            label_selector: "app=web".into(),
            ..Default::default()
        };
        let Ok(Some(selector)) = WatchSelector::of(&create) else {
            panic!("no selector");
        };
        selector.wants(&DecodedEvent::of(event))
    }

    #[test]
    fn entering_leaving_and_deleted_objects_are_seen() {
        assert!(wants(&put(kv("web", 1), None)), "created in the selection");
        assert!(!wants(&put(kv("db", 1), None)), "created outside");
        assert!(wants(&put(kv("web", 2), Some(kv("db", 1)))), "entering");
        assert!(wants(&put(kv("db", 2), Some(kv("web", 1)))), "leaving");
        assert!(!wants(&put(kv("db", 2), Some(kv("db", 1)))), "never in it");
        assert!(wants(&delete(Some(kv("web", 1)))), "deleted from it");
        assert!(!wants(&delete(Some(kv("db", 1)))), "deleted outside");
        // Without the previous object it cannot be told: sent.
        assert!(wants(&put(kv("db", 2), None)));
        assert!(wants(&delete(None)));
        // Undecodable values match.
        let mut opaque = kv("db", 1);
        opaque.value = b"k8s:enc:aescbc:v1:k:xyz".to_vec();
        assert!(wants(&put(opaque, None)));
    }

    #[test]
    fn the_index_finds_every_watch_an_event_may_concern() {
        let selectors = [
            Some("app=web"),
            Some("app in (web,db),tier=x"),
            Some("app!=web"),
            None,
            Some("tier=x"),
        ];
        let watches: Vec<Option<WatchSelector>> = selectors
            .iter()
            .map(|s| {
                s.and_then(|s| {
                    let create = WatchCreateRequest {
                        label_selector: s.into(),
                        ..Default::default()
                    };
                    WatchSelector::of(&create).ok().flatten()
                })
            })
            .collect();
        let mut index = WatchIndex::default();
        for (id, w) in watches.iter().enumerate() {
            index.insert(id as i64, w.as_ref());
        }
        let events = [
            put(kv("web", 1), None),
            put(kv("db", 2), Some(kv("web", 1))),
            put(kv("other", 2), Some(kv("db", 1))),
            delete(Some(kv("web", 1))),
            delete(None),
        ];
        for event in &events {
            let decoded = DecodedEvent::of(event);
            let mut found: BTreeSet<i64> = index.unindexed().clone();
            index.candidates(&decoded, &mut found);
            for (id, w) in watches.iter().enumerate() {
                let wants = w.as_ref().is_none_or(|w| w.wants(&decoded));
                if wants {
                    assert!(found.contains(&(id as i64)), "watch {id} missed {event:?}");
                }
            }
        }
        // Removed watches are gone from it.
        for (id, w) in watches.iter().enumerate() {
            index.remove(id as i64, w.as_ref());
        }
        assert!(!index.has_indexed() && index.unindexed().is_empty());
        assert!(index.by_label.is_empty());
    }

    #[test]
    fn malformed_selectors_are_refused_and_empty_ones_ignored() {
        let bad = WatchCreateRequest {
            field_selector: "metadata.name".into(),
            ..Default::default()
        };
        assert!(WatchSelector::of(&bad).is_err());
        assert!(matches!(
            WatchSelector::of(&WatchCreateRequest::default()),
            Ok(None)
        ));
    }
}
