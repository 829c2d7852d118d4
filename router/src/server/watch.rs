//! etcd's Watch service. One session per gRPC stream multiplexes any number
//! of watches; it follows the shard's event broadcast in revision order, so
//! every watch sees each event once, in order, and a progress answer at H
//! means every watch of the stream has received everything up to H.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kubeshard_proto::etcdserverpb::watch_create_request::FilterType;
use kubeshard_proto::etcdserverpb::watch_request::RequestUnion;
use kubeshard_proto::etcdserverpb::watch_server::Watch;
use kubeshard_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use kubeshard_proto::mvccpb::Event;
use kubeshard_proto::mvccpb::event::EventType;
use kubeshard_shard_worker::{EventBatch, KeyRange, ShardError};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::Core;
use crate::error::shard_status;

/// Events read from history per page while a watch catches up.
const HISTORY_PAGE: usize = 1000;
/// How long a progress request may wait for the shard's events to be published.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct WatchService {
    core: Arc<Core>,
}

impl WatchService {
    pub fn new(core: Arc<Core>) -> Self {
        WatchService { core }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let session = Session {
            core: self.core.clone(),
            tx,
            watchers: BTreeMap::new(),
            next_id: 0,
            closed: 0,
            progress_waiting: Vec::new(),
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[derive(Debug)]
struct Watcher {
    range: KeyRange,
    /// The lowest revision this watch has not been sent yet.
    next: i64,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    progress_notify: bool,
    /// Events went out since the last periodic progress notification.
    sent_since_tick: bool,
}

impl Watcher {
    fn wants(&self, event: &Event) -> bool {
        let Some(kv) = &event.kv else { return false };
        if kv.mod_revision < self.next || !self.range.contains(&kv.key) {
            return false;
        }
        let is_put = event.r#type == EventType::Put as i32;
        !(is_put && self.no_put || !is_put && self.no_delete)
    }

    fn shape(&self, event: &Event) -> Event {
        let mut event = event.clone();
        if !self.prev_kv {
            event.prev_kv = None;
        }
        event
    }
}

/// The client went away: the session ends.
struct Gone;

struct Session {
    core: Arc<Core>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    /// Every event at or below this revision has been handled for all watchers.
    closed: i64,
    /// Revisions of progress requests waiting for `closed` to reach them.
    progress_waiting: Vec<i64>,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>) {
        let hub = self.core.shard.hub.clone();
        let (closed, mut events) = hub.subscribe();
        self.core.metrics.watch_streams.inc();
        self.closed = closed;
        let (progress_tx, mut progress_rx) = mpsc::channel::<i64>(16);
        let period = self.core.options.progress_notify_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            let step = tokio::select! {
                message = inbound.next() => match message {
                    Some(Ok(request)) => self.on_request(request, &progress_tx).await,
                    _ => Err(Gone),
                },
                batch = events.recv() => match batch {
                    Ok(batch) => self.on_batch(&batch).await,
                    // The next batch shows the gap, which is then read from history.
                    Err(RecvError::Lagged(_)) => Ok(()),
                    Err(RecvError::Closed) => Err(Gone),
                },
                Some(target) = progress_rx.recv() => {
                    self.progress_waiting.push(target);
                    self.answer_progress().await
                }
                _ = tick.tick() => self.periodic_progress().await,
            };
            if step.is_err() {
                break;
            }
        }
        debug!(watches = self.watchers.len(), "watch stream ended");
        self.core.metrics.watch_streams.dec();
        self.core.metrics.watches.sub(self.watchers.len() as i64);
    }

    async fn send(&self, response: WatchResponse) -> Result<(), Gone> {
        self.tx.send(Ok(response)).await.map_err(|_| Gone)
    }

    fn response(&self, revision: i64, watch_id: i64) -> WatchResponse {
        WatchResponse {
            header: self.core.header(revision),
            watch_id,
            ..Default::default()
        }
    }

    async fn on_request(
        &mut self,
        request: WatchRequest,
        progress_tx: &mpsc::Sender<i64>,
    ) -> Result<(), Gone> {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create).await,
            Some(RequestUnion::CancelRequest(cancel)) => {
                // etcd answers only the cancellation of a watch that exists.
                if self.watchers.remove(&cancel.watch_id).is_some() {
                    self.core.metrics.watches.dec();
                    let mut r = self.response(self.closed, cancel.watch_id);
                    r.canceled = true;
                    self.send(r).await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                // Find the shard's current revision and wait, off this loop,
                // until its events are published; the answer goes out once
                // this stream has handled them too.
                let core = self.core.clone();
                let progress_tx = progress_tx.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let synced = tokio::time::timeout(
                        PROGRESS_TIMEOUT,
                        core.shard.hub.sync(core.shard.store.as_ref()),
                    )
                    .await;
                    match synced {
                        Ok(Ok(target)) => {
                            let _ = progress_tx.send(target).await;
                        }
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(shard_status(e))).await;
                        }
                        Err(_) => {
                            let _ = tx
                                .send(Err(Status::unavailable(
                                    "kubeshard: watch progress: shard events not published in time",
                                )))
                                .await;
                        }
                    }
                });
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, create: WatchCreateRequest) -> Result<(), Gone> {
        let revs = match self.core.shard.store.revisions().await {
            Ok(revs) => revs,
            // Ending the stream with Unavailable (rather than canceling this
            // watch) lets etcd's Go client re-create the stream and resume
            // every watch from its last revision without telling the caller.
            Err(e) => {
                let _ = self.tx.send(Err(shard_status(e))).await;
                return Err(Gone);
            }
        };
        let id = if create.watch_id != 0 {
            if self.watchers.contains_key(&create.watch_id) {
                let mut r = self.response(revs.current, -1);
                r.created = true;
                r.canceled = true;
                r.cancel_reason = "mvcc: duplicate watch ID provided on the WatchStream".into();
                return self.send(r).await;
            }
            create.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        };
        let start = if create.start_revision <= 0 {
            revs.current + 1
        } else {
            create.start_revision
        };
        let mut created = self.response(revs.current, id);
        created.created = true;
        self.send(created).await?;
        if start < revs.compacted {
            return self.cancel_compacted(id, revs.compacted).await;
        }
        let watcher = Watcher {
            range: KeyRange::new(&create.key, &create.range_end),
            next: start,
            no_put: create.filters.contains(&(FilterType::Noput as i32)),
            no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: create.prev_kv,
            progress_notify: create.progress_notify,
            sent_since_tick: false,
        };
        let catch_up = watcher.next <= self.closed;
        self.watchers.insert(id, watcher);
        self.core.metrics.watches.inc();
        if catch_up {
            self.catch_up(id).await?;
        }
        Ok(())
    }

    /// Sends a watch its history from its start up to `closed`.
    async fn catch_up(&mut self, id: i64) -> Result<(), Gone> {
        let store = self.core.shard.store.clone();
        loop {
            let Some(w) = self.watchers.get(&id) else {
                return Ok(());
            };
            if w.next > self.closed {
                return Ok(());
            }
            match store
                .history(&w.range, w.next, self.closed, HISTORY_PAGE)
                .await
            {
                Ok(page) => {
                    self.deliver_to(id, &page.events, page.closed).await?;
                    if !page.more {
                        if let Some(w) = self.watchers.get_mut(&id) {
                            w.next = w.next.max(self.closed + 1);
                        }
                        return Ok(());
                    }
                }
                Err(ShardError::Compacted { compact_revision }) => {
                    if self.watchers.remove(&id).is_some() {
                        self.core.metrics.watches.dec();
                    }
                    return self.cancel_compacted(id, compact_revision).await;
                }
                Err(e) => {
                    let _ = self.tx.send(Err(shard_status(e))).await;
                    return Err(Gone);
                }
            }
        }
    }

    async fn cancel_compacted(&self, id: i64, compact_revision: i64) -> Result<(), Gone> {
        // etcd's header for this response has revision 0.
        let mut r = self.response(0, id);
        r.compact_revision = compact_revision;
        r.canceled = true;
        self.send(r).await
    }

    async fn on_batch(&mut self, batch: &EventBatch) -> Result<(), Gone> {
        if batch.closed <= self.closed {
            return Ok(());
        }
        if batch.after > self.closed {
            self.fill_gap(batch.after).await?;
        }
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            self.deliver_to(id, &batch.events, batch.closed).await?;
        }
        self.closed = batch.closed;
        self.answer_progress().await
    }

    /// This stream fell behind the broadcast: read the missed revisions
    /// (closed, to] from history, for all watches at once.
    async fn fill_gap(&mut self, to: i64) -> Result<(), Gone> {
        let everything = KeyRange::Span {
            start: Vec::new(),
            end: None,
        };
        let store = self.core.shard.store.clone();
        while self.closed < to {
            match store
                .history(&everything, self.closed + 1, to, HISTORY_PAGE)
                .await
            {
                Ok(page) => {
                    let ids: Vec<i64> = self.watchers.keys().copied().collect();
                    for id in ids {
                        self.deliver_to(id, &page.events, page.closed).await?;
                    }
                    self.closed = page.closed.max(self.closed);
                    if !page.more {
                        self.closed = to;
                    }
                }
                Err(ShardError::Compacted { compact_revision }) => {
                    let ids: Vec<i64> = self.watchers.keys().copied().collect();
                    for id in ids {
                        if self.watchers.remove(&id).is_some() {
                            self.core.metrics.watches.dec();
                        }
                        self.cancel_compacted(id, compact_revision).await?;
                    }
                    self.closed = to;
                }
                Err(e) => {
                    let _ = self.tx.send(Err(shard_status(e))).await;
                    return Err(Gone);
                }
            }
        }
        Ok(())
    }

    /// Sends watch `id` the events it wants and moves it past `closed`.
    async fn deliver_to(&mut self, id: i64, events: &[Event], closed: i64) -> Result<(), Gone> {
        let Some(w) = self.watchers.get_mut(&id) else {
            return Ok(());
        };
        let wanted: Vec<Event> = events
            .iter()
            .filter(|e| w.wants(e))
            .map(|e| w.shape(e))
            .collect();
        w.next = w.next.max(closed + 1);
        if wanted.is_empty() {
            return Ok(());
        }
        w.sent_since_tick = true;
        self.core.metrics.watch_events.inc_by(wanted.len() as u64);
        let mut r = self.response(closed, id);
        r.events = wanted;
        self.send(r).await
    }

    async fn answer_progress(&mut self) -> Result<(), Gone> {
        let closed = self.closed;
        let before = self.progress_waiting.len();
        self.progress_waiting.retain(|target| *target > closed);
        for _ in self.progress_waiting.len()..before {
            self.send(self.response(closed, -1)).await?;
        }
        Ok(())
    }

    /// etcd's progress_notify: watches that asked for it and got no events
    /// during the interval learn the revision they are complete up to.
    async fn periodic_progress(&mut self) -> Result<(), Gone> {
        let mut due = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            if w.progress_notify && !w.sent_since_tick {
                due.push(*id);
            }
            w.sent_since_tick = false;
        }
        for id in due {
            self.send(self.response(self.closed, id)).await?;
        }
        Ok(())
    }
}
