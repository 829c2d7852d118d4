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

/// Most events read per poll.
const EVENTS_PER_POLL: usize = 1000;
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

    fn publish(&self, batch: EventBatch) {
        let sender = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.send_replace(batch.closed);
        // No receivers is fine: nobody is watching.
        let _ = sender.send(Arc::new(batch));
    }
}

/// Runs the poller of one shard until the task is aborted.
pub async fn run_poller(store: Arc<dyn ShardStore>, hub: Arc<WatchHub>, interval: Duration) {
    let mut after = hub.closed();
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = hub.wake.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        loop {
            match store.poll_events(after, EVENTS_PER_POLL).await {
                Ok(page) => {
                    failures = 0;
                    if page.closed > after {
                        let more = page.more;
                        hub.publish(EventBatch {
                            after,
                            closed: page.closed,
                            events: page.events,
                        });
                        after = page.closed;
                        if more {
                            continue;
                        }
                    }
                    break;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(100) {
                        warn!(error = %e, failures, "watch poll failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}
