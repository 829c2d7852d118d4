//! The writer actor: owns the write path of one shard.
//!
//! Requests queue in the actor's mailbox; whenever no transaction is in
//! flight, everything queued becomes one batch, applied in one database
//! transaction (one fsync for many writes). While it commits, new requests
//! queue up for the next batch, so batches grow with load.
//!
//! Each request must be answered within `--datastore-timeout` of its
//! arrival (`deadline.rs`): one whose time ran out in the queue is refused
//! without being sent, and a batch is bounded by the earliest deadline of
//! its requests. A late batch that had not sent its commit fails with
//! "request timed out" (it never commits: its connection is closed); one
//! that had is reported as possibly committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::deadline;
use crate::error::{Result, ShardError};
use crate::observe::ShardObserver;
use crate::store::{ShardStore, WriteRequest, WriteResponse, late_batch};
use crate::watch::WatchHub;

/// Most requests in one transaction.
const MAX_BATCH: usize = 1024;

type Reply = oneshot::Sender<Result<WriteResponse>>;

/// Messages of the writer actor.
#[derive(Debug)]
pub enum WriterMessage {
    Write {
        request: WriteRequest,
        /// The write must get a revision above this one (0: no floor).
        floor: i64,
        /// When its answer is due.
        deadline: Instant,
        reply: Reply,
    },
    /// The batch in flight has finished.
    Committed,
}

struct WriterActor;

/// A queued write: the request, its floor and where its answer goes.
struct Queued {
    request: WriteRequest,
    floor: i64,
    deadline: Instant,
    reply: Reply,
}

struct WriterState {
    store: Arc<dyn ShardStore>,
    hub: Arc<WatchHub>,
    observer: Option<Arc<dyn ShardObserver>>,
    pending: Vec<Queued>,
    in_flight: bool,
    /// Raised while the database has no space for writes (etcd's NOSPACE).
    no_space: Arc<AtomicBool>,
}

impl Actor for WriterActor {
    type Msg = WriterMessage;
    type State = WriterState;
    type Arguments = (
        Arc<dyn ShardStore>,
        Arc<WatchHub>,
        Option<Arc<dyn ShardObserver>>,
        Arc<AtomicBool>,
    );

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (store, hub, observer, no_space): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(WriterState {
            store,
            hub,
            observer,
            pending: Vec::new(),
            in_flight: false,
            no_space,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WriterMessage::Write {
                request,
                floor,
                deadline,
                reply,
            } => state.pending.push(Queued {
                request,
                floor,
                deadline,
                reply,
            }),
            WriterMessage::Committed => state.in_flight = false,
        }
        if !state.in_flight {
            refuse_late(&mut state.pending);
        }
        if !state.in_flight && !state.pending.is_empty() {
            let take = state.pending.len().min(MAX_BATCH);
            let batch: Vec<_> = state.pending.drain(..take).collect();
            state.in_flight = true;
            let store = state.store.clone();
            let hub = state.hub.clone();
            let observer = state.observer.clone();
            let no_space = state.no_space.clone();
            tokio::spawn(async move {
                let shard = Batch {
                    store: store.as_ref(),
                    hub: &hub,
                    no_space: &no_space,
                };
                run_batch(shard, observer.as_deref(), batch).await;
                // Fails only when the actor is stopping; nothing left to do then.
                let _ = myself.send_message(WriterMessage::Committed);
            });
        }
        Ok(())
    }
}

/// Commits a batch, hands its events to the watch hub, then answers. A
/// batch whose writes carry floors starts with a Bump to the highest of
/// them, in the same transaction: either all of it commits, every write
/// above its floor, or none.
async fn commit(
    store: &dyn ShardStore,
    hub: &WatchHub,
    requests: &[WriteRequest],
    floor: i64,
) -> Result<Vec<Result<WriteResponse>>> {
    let bumped;
    let requests = if floor > 0 {
        bumped = std::iter::once(WriteRequest::Bump { floor })
            .chain(requests.iter().cloned())
            .collect::<Vec<_>>();
        &bumped[..]
    } else {
        requests
    };
    // Events are only assembled when someone watches.
    let committed = store.commit_batch(requests, hub.has_subscribers()).await?;
    hub.publish_committed(committed.before, committed.last, committed.events);
    let mut responses = committed.responses;
    if floor > 0 && !responses.is_empty() {
        // The Bump answers nothing a client asked.
        let _bump = responses.remove(0);
    }
    Ok(responses)
}

/// Answers, without sending them, the queued requests whose time ran out
/// while earlier batches ran.
fn refuse_late(pending: &mut Vec<Queued>) {
    let now = Instant::now();
    if pending.iter().all(|q| q.deadline > now) {
        return;
    }
    let (late, waiting): (Vec<_>, Vec<_>) = pending.drain(..).partition(|q| q.deadline <= now);
    *pending = waiting;
    debug!(requests = late.len(), "writes timed out in the queue");
    for q in late {
        let _ = q.reply.send(Err(ShardError::TimedOut));
    }
}

/// What a batch runs against.
#[derive(Clone, Copy)]
struct Batch<'a> {
    store: &'a dyn ShardStore,
    hub: &'a WatchHub,
    no_space: &'a AtomicBool,
}

/// [`commit`] until `deadline`; a database out of space raises the NOSPACE
/// alarm, and a batch that commits lowers it.
async fn commit_until(
    deadline: Instant,
    shard: Batch<'_>,
    requests: &[WriteRequest],
    floor: i64,
) -> Result<Vec<Result<WriteResponse>>> {
    let limit = deadline.saturating_duration_since(Instant::now());
    let call = commit(shard.store, shard.hub, requests, floor);
    let done = match deadline::bounded_marked(limit, call).await {
        (Err(elapsed), _) => Err(late_batch(elapsed)),
        // The commit went out and no answer says it failed.
        (Ok(Err(e)), true) if !e.is_rolled_back() => Err(ShardError::CommitUnknown),
        (Ok(done), _) => done,
    };
    match done {
        Err(e) if e.is_disk_full() => {
            if !shard.no_space.swap(true, Ordering::AcqRel) {
                warn!(error = %e, "the database has no space left: NOSPACE alarm raised");
            }
            Err(ShardError::NoSpace(e.to_string()))
        }
        Ok(results) => {
            if shard.no_space.swap(false, Ordering::AcqRel) {
                warn!("a write batch committed again: NOSPACE alarm cleared");
            }
            Ok(results)
        }
        Err(e) => Err(e),
    }
}

async fn run_batch(shard: Batch<'_>, observer: Option<&dyn ShardObserver>, batch: Vec<Queued>) {
    let floor = batch.iter().map(|q| q.floor).max().unwrap_or(0);
    let Some(due) = batch.iter().map(|q| q.deadline).min() else {
        return;
    };
    let (requests, rest): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|q| (q.request, (q.floor, q.deadline, q.reply)))
        .unzip();
    let started = std::time::Instant::now();
    let committed = commit_until(due, shard, &requests, floor).await;
    let elapsed = started.elapsed();
    if let Some(observer) = observer {
        observer.write_batch(requests.len(), elapsed.as_secs_f64(), committed.is_ok());
    }
    tracing::debug!(
        size = requests.len(),
        micros = elapsed.as_micros() as u64,
        "write batch"
    );
    match committed {
        Ok(results) => {
            for ((_, _, reply), result) in rest.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(e) if requests.len() > 1 && !e.is_connection_problem() => {
            // One request may have tripped the database (e.g. a value over
            // a server limit): run each alone so only that one fails.
            warn!(error = %e, size = requests.len(), "write batch failed; retrying its requests one by one");
            for (request, (floor, due, reply)) in requests.into_iter().zip(rest) {
                let alone = std::slice::from_ref(&request);
                let result = match commit_until(due, shard, alone, floor).await {
                    Ok(mut results) => results
                        .pop()
                        .unwrap_or_else(|| Err(ShardError::Corrupt("empty batch result".into()))),
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
        }
        Err(ShardError::TopologyChanged { stored, serving }) => {
            // Nothing was written; every request learns why, so that the
            // router switches topology and sends it again.
            debug!(stored, serving, "write batch refused: the topology changed");
            for (_, _, reply) in rest {
                let _ = reply.send(Err(ShardError::TopologyChanged { stored, serving }));
            }
        }
        Err(e @ (ShardError::TimedOut | ShardError::CommitUnknown | ShardError::NoSpace(_))) => {
            // Each request learns the same: not written, may be, no space.
            warn!(error = %e, size = requests.len(), "write batch failed");
            for (_, _, reply) in rest {
                let answer = match &e {
                    ShardError::TimedOut => ShardError::TimedOut,
                    ShardError::NoSpace(why) => ShardError::NoSpace(why.clone()),
                    _ => ShardError::CommitUnknown,
                };
                let _ = reply.send(Err(answer));
            }
        }
        Err(e) => {
            warn!(error = %e, size = requests.len(), "write batch failed");
            let message = e.to_string();
            let mut replies = rest.into_iter().map(|(_, _, reply)| reply);
            if let Some(first) = replies.next() {
                let _ = first.send(Err(e));
            }
            for reply in replies {
                let _ = reply.send(Err(ShardError::BatchFailed(message.clone())));
            }
        }
    }
}

/// The instant `limit` from now (a year at most: an absurd flag must not
/// overflow the clock).
fn due_in(limit: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(limit)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// Handle to a shard's writer actor.
#[derive(Debug, Clone)]
pub struct ShardWriter {
    actor: ActorRef<WriterMessage>,
    shard: Arc<str>,
    /// How long a request may wait for its answer (`--datastore-timeout`).
    limit: Duration,
    no_space: Arc<AtomicBool>,
}

impl ShardWriter {
    /// Starts the writer actor of shard `shard`; `observer` hears of every
    /// batch; each request is answered within `limit`.
    pub async fn spawn(
        shard: &str,
        store: Arc<dyn ShardStore>,
        hub: Arc<WatchHub>,
        observer: Option<Arc<dyn ShardObserver>>,
        limit: Duration,
    ) -> Result<Self> {
        let no_space = Arc::new(AtomicBool::new(false));
        let arguments = (store, hub, observer, no_space.clone());
        let (actor, _join) = Actor::spawn(None, WriterActor, arguments)
            .await
            .map_err(|e| ShardError::Stopped(format!("{shard}: writer did not start: {e}")))?;
        Ok(ShardWriter {
            actor,
            shard: shard.into(),
            limit,
            no_space,
        })
    }

    /// Queues a write and waits for its commit.
    pub async fn write(&self, request: WriteRequest) -> Result<WriteResponse> {
        self.write_above(0, request).await
    }

    /// Queues a write that must get a revision above `floor` (the shard's
    /// counter is raised to it in the write's own transaction) and waits
    /// for its commit.
    pub async fn write_above(&self, floor: i64, request: WriteRequest) -> Result<WriteResponse> {
        self.write_until(due_in(self.limit), floor, request).await
    }

    /// [`ShardWriter::write_above`], answered by `deadline` (the request
    /// arrived earlier than the writer's queue).
    pub async fn write_until(
        &self,
        deadline: Instant,
        floor: i64,
        request: WriteRequest,
    ) -> Result<WriteResponse> {
        let deadline = deadline.min(due_in(self.limit));
        let (reply, answer) = oneshot::channel();
        self.actor
            .send_message(WriterMessage::Write {
                request,
                floor,
                deadline,
                reply,
            })
            .map_err(|_| ShardError::Stopped(self.shard.to_string()))?;
        answer
            .await
            .map_err(|_| ShardError::Stopped(self.shard.to_string()))?
    }

    /// Whether the last write batch found the database out of space
    /// (etcd's NOSPACE alarm); the next one that commits lowers it.
    pub fn out_of_space(&self) -> bool {
        self.no_space.load(Ordering::Acquire)
    }

    /// Lowers the NOSPACE alarm (Maintenance.Alarm DEACTIVATE); a write
    /// that finds no space raises it again.
    pub fn clear_out_of_space(&self) -> bool {
        self.no_space.swap(false, Ordering::AcqRel)
    }

    /// Stops the actor after the requests already queued.
    pub fn stop(&self) {
        self.actor.stop(None);
    }

    /// Whether the actor still takes writes (it ends only when stopped or
    /// if it panicked).
    pub fn is_running(&self) -> bool {
        self.actor.get_status() == ractor::ActorStatus::Running
    }
}
