//! Watches carrying Kubernetes selectors (kubeshard's push-down extension
//! of WatchCreateRequest). An event goes to such a watch when its object or
//! its previous object matches, so a watcher also sees objects leave its
//! selection (modified out of it, or deleted). Whatever cannot be decoded
//! matches: the watcher may get more than it selected, never less.
//!
//! A batch of events is decoded at most once per stream, however many of
//! its watches carry selectors (`DecodedBatch`).

use std::sync::OnceLock;

use kubeshard_proto::etcdserverpb::WatchCreateRequest;
use kubeshard_proto::mvccpb::Event;
use kubeshard_proto::mvccpb::event::EventType;
use kubeshard_selector::{Object, Selector, SelectorError};

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
