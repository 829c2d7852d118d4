//! The writer actor: owns the write path of one shard.
//!
//! Requests queue in the actor's mailbox; whenever no transaction is in
//! flight, everything queued becomes one batch, applied in one database
//! transaction (one fsync for many writes). While it commits, new requests
//! queue up for the next batch, so batches grow with load.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tracing::warn;

use crate::error::{Result, ShardError};
use crate::store::{ShardStore, WriteRequest, WriteResponse};
use crate::watch::WatchHub;

/// Most requests in one transaction.
const MAX_BATCH: usize = 1024;

type Reply = oneshot::Sender<Result<WriteResponse>>;

/// Messages of the writer actor.
#[derive(Debug)]
pub enum WriterMessage {
    Write {
        request: WriteRequest,
        reply: Reply,
    },
    /// The batch in flight has finished.
    Committed,
}

struct WriterActor;

struct WriterState {
    store: Arc<dyn ShardStore>,
    hub: Arc<WatchHub>,
    pending: Vec<(WriteRequest, Reply)>,
    in_flight: bool,
}

impl Actor for WriterActor {
    type Msg = WriterMessage;
    type State = WriterState;
    type Arguments = (Arc<dyn ShardStore>, Arc<WatchHub>);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (store, hub): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(WriterState {
            store,
            hub,
            pending: Vec::new(),
            in_flight: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WriterMessage::Write { request, reply } => state.pending.push((request, reply)),
            WriterMessage::Committed => state.in_flight = false,
        }
        if !state.in_flight && !state.pending.is_empty() {
            let take = state.pending.len().min(MAX_BATCH);
            let batch: Vec<_> = state.pending.drain(..take).collect();
            state.in_flight = true;
            let store = state.store.clone();
            let hub = state.hub.clone();
            tokio::spawn(async move {
                run_batch(store.as_ref(), &hub, batch).await;
                // Fails only when the actor is stopping; nothing left to do then.
                let _ = myself.send_message(WriterMessage::Committed);
            });
        }
        Ok(())
    }
}

/// Commits a batch, hands its events to the watch hub, then answers.
async fn commit(
    store: &dyn ShardStore,
    hub: &WatchHub,
    requests: &[WriteRequest],
) -> Result<Vec<Result<WriteResponse>>> {
    // Events are only assembled when someone watches.
    let committed = store.commit_batch(requests, hub.has_subscribers()).await?;
    hub.publish_committed(committed.before, committed.last, committed.events);
    Ok(committed.responses)
}

async fn run_batch(store: &dyn ShardStore, hub: &WatchHub, batch: Vec<(WriteRequest, Reply)>) {
    let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let started = std::time::Instant::now();
    let committed = commit(store, hub, &requests).await;
    tracing::debug!(
        size = requests.len(),
        micros = started.elapsed().as_micros() as u64,
        "write batch"
    );
    match committed {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(e) if requests.len() > 1 && !e.is_connection_problem() => {
            // One request may have tripped the database (e.g. a value over
            // a server limit): run each alone so only that one fails.
            warn!(error = %e, size = requests.len(), "write batch failed; retrying its requests one by one");
            for (request, reply) in requests.into_iter().zip(replies) {
                let result = match commit(store, hub, std::slice::from_ref(&request)).await {
                    Ok(mut results) => results
                        .pop()
                        .unwrap_or_else(|| Err(ShardError::Corrupt("empty batch result".into()))),
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            warn!(error = %e, size = requests.len(), "write batch failed");
            let message = e.to_string();
            let mut replies = replies.into_iter();
            if let Some(first) = replies.next() {
                let _ = first.send(Err(e));
            }
            for reply in replies {
                let _ = reply.send(Err(ShardError::BatchFailed(message.clone())));
            }
        }
    }
}

/// Handle to a shard's writer actor.
#[derive(Debug, Clone)]
pub struct ShardWriter {
    actor: ActorRef<WriterMessage>,
    shard: Arc<str>,
}

impl ShardWriter {
    /// Starts the writer actor of shard `shard`.
    pub async fn spawn(
        shard: &str,
        store: Arc<dyn ShardStore>,
        hub: Arc<WatchHub>,
    ) -> Result<Self> {
        let (actor, _join) = Actor::spawn(None, WriterActor, (store, hub))
            .await
            .map_err(|e| ShardError::Stopped(format!("{shard}: writer did not start: {e}")))?;
        Ok(ShardWriter {
            actor,
            shard: shard.into(),
        })
    }

    /// Queues a write and waits for its commit.
    pub async fn write(&self, request: WriteRequest) -> Result<WriteResponse> {
        let answer = self.submit(request)?;
        answer
            .await
            .map_err(|_| ShardError::Stopped(self.shard.to_string()))?
    }

    /// Queues a write without waiting: writes submitted one after the other
    /// are applied in that order. The receiver gets the answer after commit.
    pub fn submit(
        &self,
        request: WriteRequest,
    ) -> Result<oneshot::Receiver<Result<WriteResponse>>> {
        let (reply, answer) = oneshot::channel();
        self.actor
            .send_message(WriterMessage::Write { request, reply })
            .map_err(|_| ShardError::Stopped(self.shard.to_string()))?;
        Ok(answer)
    }

    /// Stops the actor after the requests already queued.
    pub fn stop(&self) {
        self.actor.stop(None);
    }
}
