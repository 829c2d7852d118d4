//! The watch stream of one shard: a poller that reads the shard's history in
//! revision order and broadcasts it to every watch of this process.
//!
//! Each batch says which revisions it closes: every event at or below
//! `closed` has been published. Because revisions commit in order (the
//! revision lock), reading `revision > last AND revision <= counter` in one
//! snapshot never skips a write that commits later.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kubeshard_proto::mvccpb::Event;
use tokio::sync::{Notify, broadcast, watch};
use tracing::warn;

use crate::error::Result;
use crate::store::ShardStore;

/// Batches a slow subscriber may fall behind before it must re-read history.
const BROADCAST_CAPACITY: usize = 4096;

/// Events with revisions in (after, closed].
#[derive(Debug, Clone, Default)]
pub struct EventBatch {
    pub after: i64,
    pub closed: i64,
    pub events: Vec<Event>,
}

/// Fan-out point of one shard's events.
#[derive(Debug)]
pub struct WatchHub {
    /// Held while publishing and while subscribing, so that a subscriber's
    /// starting mark and its first batch line up exactly.
    publish: Mutex<broadcast::Sender<Arc<EventBatch>>>,
    closed: watch::Sender<i64>,
    wake: Notify,
}

impl WatchHub {
    /// A hub whose events start after revision `start`.
    pub fn new(start: i64) -> Arc<Self> {
        let (sender, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (closed, _) = watch::channel(start);
        Arc::new(WatchHub {
            publish: Mutex::new(sender),
            closed,
            wake: Notify::new(),
        })
    }

    /// Subscribes: the returned mark is the `after` of the first batch the
    /// receiver will get.
    pub fn subscribe(&self) -> (i64, broadcast::Receiver<Arc<EventBatch>>) {
        let sender = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = sender.subscribe();
        (*self.closed.borrow(), receiver)
    }

    /// The highest revision published so far.
    pub fn closed(&self) -> i64 {
        *self.closed.borrow()
    }

    /// Asks the poller to look for new events now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits until everything up to the shard's current revision has been
    /// published; returns that revision.
    pub async fn sync(&self, store: &dyn ShardStore) -> Result<i64> {
        let target = store.revisions().await?.current;
        self.wake();
        let mut marks = self.closed.subscribe();
        // The sender lives as long as the hub, which outlives this borrow.
        let _ = marks.wait_for(|c| *c >= target).await;
        Ok(target)
    }

    /// Waits until everything up to `target` has been published (the
    /// caller makes sure the shard's counter gets there).
    pub async fn wait_closed(&self, target: i64) {
        if self.closed() >= target {
            return;
        }
        self.wake();
        let mut marks = self.closed.subscribe();
        // The sender lives as long as the hub, which outlives this borrow.
        let _ = marks.wait_for(|c| *c >= target).await;
    }

    /// Whether any watch stream follows this hub.
    pub fn has_subscribers(&self) -> bool {
        let sender = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        sender.receiver_count() > 0
    }

    /// Publishes revisions (after, closed] if the hub is still at `after`.
    /// `events: None` means they were not read, which is only allowed while
    /// nobody subscribes (checked under the same lock as `subscribe`).
    fn try_publish(&self, after: i64, closed: i64, events: Option<Vec<Event>>) -> bool {
        let sender = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        if *self.closed.borrow() != after || closed <= after {
            return false;
        }
        let events = match events {
            Some(events) => events,
            None if sender.receiver_count() == 0 => Vec::new(),
            None => return false,
        };
        self.closed.send_replace(closed);
        // No receivers is fine: nobody is watching.
        let _ = sender.send(Arc::new(EventBatch {
            after,
            closed,
            events,
        }));
        true
    }

    /// Publishes a batch this process committed, revisions (before, last],
    /// straight from memory. If writes of another process came in between
    /// (or the events were not collected and someone now watches), the
    /// poller reads the revisions from the database instead.
    pub fn publish_committed(&self, before: i64, last: i64, events: Option<Vec<Event>>) {
        if last > before && !self.try_publish(before, last, events) {
            self.wake();
        }
    }
}

/// Runs the poller of one shard until the task is aborted: it publishes
/// writes of other processes, and anything the writer could not publish.
pub async fn run_poller(
    store: Arc<dyn ShardStore>,
    hub: Arc<WatchHub>,
    interval: Duration,
    batch: usize,
) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = hub.wake.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        loop {
            let after = hub.closed();
            let polled = if hub.has_subscribers() {
                store
                    .poll_events(after, batch)
                    .await
                    .map(|page| (page.closed, Some(page.events), page.more))
            } else {
                // Nobody watches: only the mark moves, no rows are read.
                store
                    .revisions()
                    .await
                    .map(|revs| (revs.current, None, false))
            };
            match polled {
                Ok((closed, events, more)) => {
                    failures = 0;
                    if closed <= after {
                        break;
                    }
                    // Retry when the mark moved meanwhile (the writer
                    // published) or a subscriber came and rows are needed.
                    if !hub.try_publish(after, closed, events) || more {
                        continue;
                    }
                    break;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if matches!(e, crate::ShardError::TopologyChanged { .. }) {
                        // The router switches topology: not a failure.
                        tracing::debug!(error = %e, "watch poll waits for the new topology");
                    } else if failures == 1 || failures.is_multiple_of(100) {
                        warn!(error = %e, failures, "watch poll failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}
