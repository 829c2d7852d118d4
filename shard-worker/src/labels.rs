//! The label indexer of one shard: keeps the label index
//! (`store/label_index.rs`) up to date from the shard's watch hub, after
//! commit and off the write path.
//!
//! It starts at the first range with selectors this router sends the shard
//! (`LabelIndexer::activate`): stores that never see one (etcd's own
//! clients) pay nothing, and the index's answers are right however far
//! behind it is (it only costs reading the history above its mark). Once
//! active it catches up from the database, then applies the hub's batches,
//! gathered for a moment so that one transaction covers many commits.
//! Several routers may index one shard: the mark row orders them, and a
//! run another router already applied is skipped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kubeshard_proto::mvccpb::Event;
use kubeshard_proto::mvccpb::event::EventType;
use tokio::sync::Notify;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::{info, warn};

use crate::error::Result;
use crate::store::{LabelChange, LabelIndexOutcome, ShardStore};
use crate::watch::{EventBatch, WatchHub};

/// How long batches are gathered into one index transaction.
const GATHER: Duration = Duration::from_millis(100);
/// Events read from history per step while catching up.
const CATCH_UP_PAGE: usize = 1000;
/// Pause after a failed index transaction.
const RETRY: Duration = Duration::from_secs(1);

/// The switch that starts a shard's indexer.
#[derive(Debug, Default)]
pub struct LabelIndexer {
    wanted: Notify,
    active: AtomicBool,
}

impl LabelIndexer {
    /// Starts indexing (once; later calls do nothing).
    pub fn activate(&self) {
        if !self.active.swap(true, Ordering::AcqRel) {
            self.wanted.notify_one();
        }
    }
}

/// The final state of each key changed by `events` (in revision order).
fn final_states<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<LabelChange> {
    let mut last: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
    for event in events {
        let Some(kv) = &event.kv else { continue };
        let value = (event.r#type == EventType::Put as i32).then_some(kv.value.as_slice());
        last.insert(kv.key.as_slice(), value);
    }
    last.into_iter()
        .map(|(key, value)| LabelChange {
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        })
        .collect()
}

/// Runs one shard's indexer until the task is aborted.
pub async fn run_label_indexer(
    store: Arc<dyn ShardStore>,
    hub: Arc<WatchHub>,
    indexer: Arc<LabelIndexer>,
) {
    indexer.wanted.notified().await;
    info!(backend = store.backend(), "label index: started");
    loop {
        // (Re)subscribe, then bring the index to where the hub starts.
        let (start, mut receiver) = hub.subscribe();
        while let Err(e) = catch_up(&*store, start).await {
            warn!(error = %e, "label index: catching up failed; retrying");
            tokio::time::sleep(RETRY).await;
        }
        loop {
            let mut batches: Vec<Arc<EventBatch>> = match receiver.recv().await {
                Ok(batch) => vec![batch],
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return,
            };
            tokio::time::sleep(GATHER).await;
            let mut lagged = false;
            loop {
                match receiver.try_recv() {
                    Ok(batch) => batches.push(batch),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Lagged(_)) => {
                        lagged = true;
                        break;
                    }
                    Err(TryRecvError::Closed) => return,
                }
            }
            let (Some(first), Some(last)) = (batches.first(), batches.last()) else {
                continue;
            };
            let (from, to) = (first.after, last.closed);
            let changes = final_states(batches.iter().flat_map(|b| b.events.iter()));
            while let Err(e) = apply(&*store, from, to, &changes).await {
                warn!(error = %e, "label index: update failed; retrying");
                tokio::time::sleep(RETRY).await;
            }
            if lagged {
                break;
            }
        }
    }
}

/// Applies the run (from, to], first filling any gap below `from` from the
/// database's history.
async fn apply(store: &dyn ShardStore, from: i64, to: i64, changes: &[LabelChange]) -> Result<()> {
    loop {
        match store.index_labels(from, to, changes).await? {
            LabelIndexOutcome::Applied | LabelIndexOutcome::Ahead { .. } => return Ok(()),
            LabelIndexOutcome::Gap { mark } => fill(store, mark, from).await?,
        }
    }
}

/// Brings the index to at least `upto` when it is below (the shard must be
/// at `upto` already).
pub async fn catch_up(store: &dyn ShardStore, upto: i64) -> Result<()> {
    match store.index_labels(upto, upto, &[]).await? {
        LabelIndexOutcome::Gap { mark } => fill(store, mark, upto).await,
        _ => Ok(()),
    }
}

/// Applies the history above `mark` page by page until the index reaches
/// `upto`. Compaction may have purged some of it: what is missing then is
/// only deletes (the last row of a live key is never purged), which leave
/// stale terms behind, extra candidates that the selector drops.
async fn fill(store: &dyn ShardStore, mut mark: i64, upto: i64) -> Result<()> {
    while mark < upto {
        let page = store.poll_events(mark, CATCH_UP_PAGE).await?;
        if page.closed <= mark {
            // The shard is not at `upto` yet (raised by another process):
            // try again with the next batch.
            return Ok(());
        }
        let changes = final_states(&page.events);
        mark = match store.index_labels(mark, page.closed, &changes).await? {
            LabelIndexOutcome::Applied => page.closed,
            LabelIndexOutcome::Ahead { mark } | LabelIndexOutcome::Gap { mark } => mark,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeshard_proto::mvccpb::KeyValue;

    fn event(kind: EventType, key: &str, value: &str) -> Event {
        Event {
            r#type: kind as i32,
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    #[test]
    fn the_last_event_of_a_key_wins() {
        let events = [
            event(EventType::Put, "a", "1"),
            event(EventType::Put, "b", "1"),
            event(EventType::Delete, "a", ""),
            event(EventType::Put, "b", "2"),
            event(EventType::Delete, "c", ""),
            event(EventType::Put, "c", "3"),
        ];
        let changes = final_states(&events);
        let summary: Vec<(&[u8], Option<&[u8]>)> = changes
            .iter()
            .map(|c| (c.key.as_slice(), c.value.as_deref()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (b"a".as_slice(), None),
                (b"b".as_slice(), Some(b"2".as_slice())),
                (b"c".as_slice(), Some(b"3".as_slice())),
            ]
        );
    }
}
