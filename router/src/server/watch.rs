//! etcd's Watch service. One session per gRPC stream multiplexes any number
//! of watches and follows the event broadcast of every shard.
//!
//! Each shard's broadcast comes with a mark: every event of that shard at or
//! below it has arrived. A watch covers the shards its range may live on; it
//! queues their events and sends them once every one of those shards has
//! passed them, merged in revision order, so it sees each event once, in
//! order. A watch waiting for an idle shard asks the router to raise that
//! shard (`Shards::advance`). A progress answer at H goes out only when
//! every shard behind the stream's watches has passed H.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use futures::stream::select_all;
use kubeshard_config::ShardId;
use kubeshard_proto::etcdserverpb::watch_create_request::FilterType;
use kubeshard_proto::etcdserverpb::watch_request::RequestUnion;
use kubeshard_proto::etcdserverpb::watch_server::Watch;
use kubeshard_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use kubeshard_proto::mvccpb::Event;
use kubeshard_proto::mvccpb::event::EventType;
use kubeshard_shard_worker::{EventBatch, KeyRange, ShardError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::Core;
use super::stopping::UntilStopped;
use super::watch_selector::{DecodedBatch, WatchIndex, WatchSelector};
use crate::error::shard_status;
use crate::shards::Shards;

/// Events read from history per page while a watch catches up.
const HISTORY_PAGE: usize = 1000;
/// How often waiting watches and progress requests ask again for lagging
/// shards to be raised.
const ADVANCE_RETRY: Duration = Duration::from_secs(1);
/// How long a progress request may wait for the shards' events to be published.
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
    type WatchStream = UntilStopped<ReceiverStream<Result<WatchResponse, Status>>>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        // The stream lives on this topology version; it ends when the
        // version is retired (`topology_change.rs`), and clients resume.
        let shards = self.core.views.current();
        let session = Session {
            marks: vec![0; shards.len()],
            shards,
            core: self.core.clone(),
            tx,
            watchers: BTreeMap::new(),
            index: WatchIndex::default(),
            pending: BTreeSet::new(),
            next_id: 0,
            progress_waiting: Vec::new(),
            last_progress: 0,
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(
            self.core.stop.end_on_stop(ReceiverStream::new(rx)),
        ))
    }
}

#[derive(Debug)]
struct Watcher {
    range: KeyRange,
    /// The shards the range may live on, and per shard the events received
    /// but not sent yet (in revision order).
    shards: Vec<ShardId>,
    queues: Vec<VecDeque<Event>>,
    /// The lowest revision this watch has not been sent yet.
    next: i64,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    /// Label and field selectors (kubeshard's extension), if any.
    selector: Option<WatchSelector>,
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

    /// Queues the events of the shard at `pos` in `shards` that this watch
    /// wants; true if it queued any.
    fn enqueue(&mut self, pos: usize, batch: &DecodedBatch<'_>) -> bool {
        self.enqueue_some(pos, batch, 0..batch.events().len())
    }

    /// The same, over the events at `indexes` (in order) only.
    fn enqueue_some(
        &mut self,
        pos: usize,
        batch: &DecodedBatch<'_>,
        indexes: impl IntoIterator<Item = usize>,
    ) -> bool {
        let events = batch.events();
        let wanted: Vec<Event> = indexes
            .into_iter()
            .filter_map(|i| events.get(i).map(|e| (i, e)))
            .filter(|(i, e)| {
                self.wants(e)
                    && self
                        .selector
                        .as_ref()
                        .is_none_or(|s| batch.decoded(*i).is_none_or(|decoded| s.wants(decoded)))
            })
            .map(|(_, e)| self.shape(e))
            .collect();
        let queued = !wanted.is_empty();
        if let Some(queue) = self.queues.get_mut(pos) {
            queue.extend(wanted);
        }
        queued
    }

    /// Takes the queued events at or below `bound`, in revision order.
    fn take_until(&mut self, bound: i64) -> Vec<Event> {
        let mut out = Vec::new();
        let mut sources = 0;
        for queue in &mut self.queues {
            let before = out.len();
            while queue.front().is_some_and(|e| revision(e) <= bound) {
                if let Some(e) = queue.pop_front() {
                    out.push(e);
                }
            }
            sources += usize::from(out.len() > before);
        }
        if sources > 1 {
            // Events of one revision come from one shard: a stable sort
            // keeps their order inside the revision.
            out.sort_by_key(revision);
        }
        out
    }

    /// The highest revision queued, if any.
    fn highest_queued(&self) -> Option<i64> {
        self.queues
            .iter()
            .filter_map(|q| q.back().map(revision))
            .max()
    }
}

fn revision(event: &Event) -> i64 {
    event.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// The client went away: the session ends.
struct Gone;

/// One more on a gauge while it lives (also when its future is dropped).
struct GaugeHeld<'a>(&'a prometheus::IntGauge);

impl<'a> GaugeHeld<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        GaugeHeld(gauge)
    }
}

impl Drop for GaugeHeld<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct Session {
    core: Arc<Core>,
    shards: Arc<Shards>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    /// The watches by a label their selector requires.
    index: WatchIndex,
    /// The watches with queued events: the only ones a batch can release.
    pending: BTreeSet<i64>,
    next_id: i64,
    /// Per shard: every event of the shard at or below this revision has
    /// been queued for (or sent to) the watches covering the shard.
    marks: Vec<i64>,
    /// Revisions of progress requests waiting for the marks to reach them.
    progress_waiting: Vec<i64>,
    /// The last progress answer (answers never go back).
    last_progress: i64,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>) {
        let mut streams = Vec::with_capacity(self.shards.len());
        for (id, shard) in self.shards.all() {
            let (closed, receiver) = shard.hub.subscribe();
            self.marks[id.index()] = closed;
            let stream =
                tokio_stream::wrappers::BroadcastStream::new(receiver).map(move |item| (id, item));
            streams.push(stream);
        }
        let mut events = select_all(streams);
        self.core.metrics.watch_streams.inc();
        let (progress_tx, mut progress_rx) = mpsc::channel::<i64>(16);
        let period = self.core.options.progress_notify_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // Asks again for lagging shards to be raised while events wait for
        // them (an earlier raise may have failed, e.g. its database was down).
        let mut retry = tokio::time::interval(ADVANCE_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                message = inbound.next() => match message {
                    Some(Ok(request)) => self.on_request(request, &progress_tx).await,
                    _ => Err(Gone),
                },
                batch = events.next() => match batch {
                    Some((id, Ok(batch))) => self.on_batch(id, &batch).await,
                    // The next batch shows the gap, which is then read from history.
                    Some((id, Err(BroadcastStreamRecvError::Lagged(_)))) => {
                        self.core.metrics.watch_lagged(&self.shards.get(id).name);
                        Ok(())
                    }
                    None => Err(Gone),
                },
                Some(target) = progress_rx.recv() => {
                    self.progress_waiting.push(target);
                    self.answer_progress().await
                }
                _ = tick.tick() => self.periodic_progress().await,
                _ = retry.tick() => {
                    self.advance_waiting();
                    Ok(())
                }
                _ = self.shards.retired() => self.end_retired().await,
                // The response stream is gone (the router is stopping): the
                // request stream must go too, or the connection stays open.
                _ = self.tx.closed() => Err(Gone),
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
        // Once the version is retired, the shards may serve the next one:
        // what this stream read since may be of the new topology.
        if self.shards.is_retired() {
            return self.end_retired().await;
        }
        let permit = match self.tx.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Closed(())) => return Err(Gone),
            Err(mpsc::error::TrySendError::Full(())) => {
                // The client reads slower than its events come: a slow
                // watcher, counted while it holds this stream up.
                let _slow = GaugeHeld::new(&self.core.metrics.slow_watch_streams);
                self.tx.reserve().await.map_err(|_| Gone)?
            }
        };
        permit.send(Ok(response));
        Ok(())
    }

    /// Ends the stream because the topology changed: etcd's Go client
    /// re-creates the stream and resumes every watch from the revision
    /// after the last it got, on the new topology.
    async fn end_retired(&self) -> Result<(), Gone> {
        let _ = self
            .tx
            .send(Err(shard_status(ShardError::TopologyChanged {
                stored: self.shards.version() + 1,
                serving: self.shards.version(),
            })))
            .await;
        Err(Gone)
    }

    /// Ends the stream with a database error: etcd's Go client re-creates
    /// the stream and resumes every watch from its last revision.
    async fn fail(&self, e: ShardError) -> Result<(), Gone> {
        let _ = self.tx.send(Err(shard_status(e))).await;
        Err(Gone)
    }

    fn response(&self, revision: i64, watch_id: i64) -> WatchResponse {
        WatchResponse {
            header: self.core.header(revision),
            watch_id,
            ..Default::default()
        }
    }

    /// Every shard some watch of this stream covers.
    fn covered_shards(&self) -> BTreeSet<ShardId> {
        self.watchers
            .values()
            .flat_map(|w| w.shards.iter().copied())
            .collect()
    }

    /// The revision up to which watch `w` has every event of its shards.
    fn complete_to(&self, w: &Watcher) -> i64 {
        w.shards
            .iter()
            .map(|id| self.marks[id.index()])
            .min()
            .unwrap_or(0)
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
                if self.remove_watcher(cancel.watch_id) {
                    self.core.metrics.watches.dec();
                    let mut r = self.response(self.shards.floor(), cancel.watch_id);
                    r.canceled = true;
                    self.send(r).await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                // Find the revision every covered shard must reach and get
                // them there, off this loop; the answer goes out once this
                // stream has passed it on every covered shard.
                let shards = self.shards.clone();
                let covered: Vec<ShardId> = self.covered_shards().into_iter().collect();
                let progress_tx = progress_tx.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let reached =
                        tokio::time::timeout(PROGRESS_TIMEOUT, progress_target(&shards, &covered))
                            .await;
                    match reached {
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
        let shards = self.shards.clone();
        let ids = shards.for_range(&create.key, &create.range_end);
        // Keys arriving (an online move): the watch starts once they are
        // whole.
        if let Err(e) = shards.hold_off(&ids).await {
            return self.fail(e).await;
        }
        let (current, compacted) = match watch_start(&shards, &ids).await {
            Ok(revs) => revs,
            Err(e) => return self.fail(e).await,
        };
        let id = if create.watch_id != 0 {
            if self.watchers.contains_key(&create.watch_id) {
                let mut r = self.response(current, -1);
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
            current + 1
        } else {
            create.start_revision
        };
        let mut created = self.response(current, id);
        created.created = true;
        let selector = match WatchSelector::of(&create) {
            Ok(selector) => selector,
            Err(e) => {
                // etcd refuses one watch of a shared stream this way (as it
                // does when permission is denied), leaving the others be.
                created.canceled = true;
                created.cancel_reason = format!("etcdserver: {e}");
                return self.send(created).await;
            }
        };
        if selector.is_some() {
            self.core
                .metrics
                .selected_requests
                .with_label_values(&["watch"])
                .inc();
        }
        self.send(created).await?;
        if start < compacted {
            return self.cancel_compacted(id, compacted).await;
        }
        let watcher = Watcher {
            range: KeyRange::new(&create.key, &create.range_end),
            queues: vec![VecDeque::new(); ids.len()],
            shards: ids,
            next: start,
            no_put: create.filters.contains(&(FilterType::Noput as i32)),
            no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: create.prev_kv,
            selector,
            progress_notify: create.progress_notify,
            sent_since_tick: false,
        };
        let catch_up = watcher
            .shards
            .iter()
            .any(|s| start <= self.marks[s.index()]);
        self.index.insert(id, watcher.selector.as_ref());
        self.watchers.insert(id, watcher);
        self.core.metrics.watches.inc();
        if catch_up {
            self.catch_up(id).await?;
        }
        self.release(id).await
    }

    /// Queues a new watch's history from its start up to the stream's mark
    /// of each of its shards, page by page, sending what every shard has
    /// been read up to as it goes.
    async fn catch_up(&mut self, id: i64) -> Result<(), Gone> {
        let Some(w) = self.watchers.get(&id) else {
            return Ok(());
        };
        let range = w.range.clone();
        let start = w.next;
        let shards = w.shards.clone();
        let marks: Vec<i64> = shards.iter().map(|s| self.marks[s.index()]).collect();
        let mut cursors = vec![start; shards.len()];
        loop {
            // A shard is read when all it had read so far went out. If none
            // is (the shards holding the bound back are read to their marks),
            // the others are read on: what they hold beyond the bound waits
            // in the queues like events of the live batches.
            let Some(w) = self.watchers.get(&id) else {
                return Ok(());
            };
            let mut read: Vec<usize> = (0..shards.len())
                .filter(|pos| cursors[*pos] <= marks[*pos] && w.queues[*pos].is_empty())
                .collect();
            if read.is_empty() {
                read = (0..shards.len())
                    .filter(|pos| cursors[*pos] <= marks[*pos])
                    .collect();
            }
            for pos in read {
                let shard = &shards[pos];
                let store = &self.shards.get(*shard).store;
                match store
                    .history(&range, cursors[pos], marks[pos], HISTORY_PAGE)
                    .await
                {
                    Ok(page) => {
                        if let Some(w) = self.watchers.get_mut(&id)
                            && w.enqueue(pos, &DecodedBatch::new(&page.events))
                        {
                            self.pending.insert(id);
                        }
                        cursors[pos] = if page.more {
                            page.closed + 1
                        } else {
                            marks[pos] + 1
                        };
                    }
                    Err(ShardError::Compacted { compact_revision }) => {
                        if self.remove_watcher(id) {
                            self.core.metrics.watches.dec();
                        }
                        return self.cancel_compacted(id, compact_revision).await;
                    }
                    Err(e) => return self.fail(e).await,
                }
            }
            // Every shard has been read up to here.
            let bound = cursors.iter().map(|c| c - 1).min().unwrap_or(0);
            self.flush(id, bound).await?;
            if cursors.iter().zip(&marks).all(|(c, m)| c > m) {
                return Ok(());
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

    async fn on_batch(&mut self, shard: ShardId, batch: &EventBatch) -> Result<(), Gone> {
        let index = shard.index();
        if batch.closed <= self.marks[index] {
            return Ok(());
        }
        if batch.after > self.marks[index] {
            self.fill_gap(shard, batch.after).await?;
        }
        self.enqueue_all(shard, &batch.events);
        self.marks[index] = batch.closed;
        self.release_covering(shard).await?;
        self.answer_progress().await
    }

    /// Queues `events` of `shard` for every watch covering it.
    fn enqueue_all(&mut self, shard: ShardId, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let batch = DecodedBatch::new(events);
        // Watches the index cannot find by label test every event; the
        // others only the events the index finds for them, so the cost per
        // event does not grow with the number of selected watches.
        for id in self.index.unindexed() {
            if let Some(w) = self.watchers.get_mut(id)
                && let Some(pos) = w.shards.iter().position(|s| *s == shard)
                && w.enqueue(pos, &batch)
            {
                self.pending.insert(*id);
            }
        }
        if !self.index.has_indexed() {
            return;
        }
        let mut per_watch: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        let mut found = BTreeSet::new();
        for i in 0..events.len() {
            let Some(decoded) = batch.decoded(i) else {
                continue;
            };
            found.clear();
            self.index.candidates(decoded, &mut found);
            for id in &found {
                per_watch.entry(*id).or_default().push(i);
            }
        }
        for (id, indexes) in per_watch {
            if let Some(w) = self.watchers.get_mut(&id)
                && let Some(pos) = w.shards.iter().position(|s| *s == shard)
                && w.enqueue_some(pos, &batch, indexes)
            {
                self.pending.insert(id);
            }
        }
    }

    /// This stream fell behind a shard's broadcast: read the missed
    /// revisions (mark, to] of that shard from history, for all watches.
    async fn fill_gap(&mut self, shard: ShardId, to: i64) -> Result<(), Gone> {
        let everything = KeyRange::Span {
            start: Vec::new(),
            end: None,
        };
        let index = shard.index();
        let store = self.shards.get(shard).store.clone();
        while self.marks[index] < to {
            match store
                .history(&everything, self.marks[index] + 1, to, HISTORY_PAGE)
                .await
            {
                Ok(page) => {
                    self.enqueue_all(shard, &page.events);
                    self.marks[index] = if page.more {
                        page.closed.max(self.marks[index])
                    } else {
                        to
                    };
                    self.release_covering(shard).await?;
                }
                Err(ShardError::Compacted { compact_revision }) => {
                    for id in self.covering(shard) {
                        if self.remove_watcher(id) {
                            self.core.metrics.watches.dec();
                        }
                        self.cancel_compacted(id, compact_revision).await?;
                    }
                    self.marks[index] = to;
                }
                Err(e) => return self.fail(e).await,
            }
        }
        Ok(())
    }

    /// The watches covering `shard`.
    fn covering(&self, shard: ShardId) -> Vec<i64> {
        self.watchers
            .iter()
            .filter(|(_, w)| w.shards.contains(&shard))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Sends what every watch covering `shard` can have now. Only watches
    /// with queued events have anything to send.
    async fn release_covering(&mut self, shard: ShardId) -> Result<(), Gone> {
        let ready: Vec<i64> = self
            .pending
            .iter()
            .copied()
            .filter(|id| {
                self.watchers
                    .get(id)
                    .is_some_and(|w| w.shards.contains(&shard))
            })
            .collect();
        for id in ready {
            self.release(id).await?;
        }
        Ok(())
    }

    /// Forgets watch `id`; false if there was none.
    fn remove_watcher(&mut self, id: i64) -> bool {
        let Some(w) = self.watchers.remove(&id) else {
            return false;
        };
        self.index.remove(id, w.selector.as_ref());
        self.pending.remove(&id);
        true
    }

    /// Sends watch `id` its queued events up to where all its shards are
    /// complete; if some wait for an idle shard, asks for it to be raised.
    async fn release(&mut self, id: i64) -> Result<(), Gone> {
        let Some(w) = self.watchers.get(&id) else {
            return Ok(());
        };
        let bound = self.complete_to(w);
        self.flush(id, bound).await?;
        if let Some(w) = self.watchers.get(&id) {
            self.advance_for(w);
        }
        Ok(())
    }

    /// Asks for the shards that watch `w`'s queued events wait for to be
    /// raised past them.
    fn advance_for(&self, w: &Watcher) {
        if let Some(waiting_for) = w.highest_queued() {
            for shard in &w.shards {
                if self.marks[shard.index()] < waiting_for {
                    self.shards.advance(*shard, waiting_for);
                }
            }
        }
    }

    /// Asks for every shard that queued events or progress requests wait
    /// for to be raised (cheap when it is already under way or done).
    fn advance_waiting(&self) {
        for w in self.watchers.values() {
            self.advance_for(w);
        }
        if let Some(target) = self.progress_waiting.iter().max() {
            let needed = (*target).max(self.last_progress);
            for shard in self.covered_shards() {
                if self.marks[shard.index()] < needed {
                    self.shards.advance(shard, needed);
                }
            }
        }
    }

    /// Sends watch `id` its queued events at or below `bound` and moves it
    /// past `bound`.
    async fn flush(&mut self, id: i64, bound: i64) -> Result<(), Gone> {
        let Some(w) = self.watchers.get_mut(&id) else {
            return Ok(());
        };
        if bound < w.next {
            return Ok(());
        }
        let events = w.take_until(bound);
        w.next = bound + 1;
        if w.queues.iter().all(VecDeque::is_empty) {
            self.pending.remove(&id);
        }
        if events.is_empty() {
            return Ok(());
        }
        w.sent_since_tick = true;
        self.core.metrics.watch_events.inc_by(events.len() as u64);
        let mut r = self.response(bound, id);
        r.events = events;
        self.send(r).await
    }

    async fn answer_progress(&mut self) -> Result<(), Gone> {
        if self.progress_waiting.is_empty() {
            return Ok(());
        }
        let covered = self.covered_shards();
        let mut waiting = std::mem::take(&mut self.progress_waiting);
        waiting.sort_unstable();
        let mut still = Vec::new();
        for target in waiting {
            let needed = target.max(self.last_progress);
            let lagging: Vec<ShardId> = covered
                .iter()
                .copied()
                .filter(|s| self.marks[s.index()] < needed)
                .collect();
            if !lagging.is_empty() {
                for shard in lagging {
                    self.shards.advance(shard, needed);
                }
                still.push(target);
                continue;
            }
            // Every watch must have its events up to `needed` first.
            let ids: Vec<i64> = self.watchers.keys().copied().collect();
            for id in ids {
                self.release(id).await?;
            }
            self.last_progress = needed;
            self.send(self.response(needed, -1)).await?;
        }
        self.progress_waiting = still;
        Ok(())
    }

    /// etcd's progress_notify: watches that asked for it and got no events
    /// during the interval learn the revision they are complete up to.
    async fn periodic_progress(&mut self) -> Result<(), Gone> {
        let floor = self.shards.floor();
        let mut due = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            if w.progress_notify && !w.sent_since_tick {
                due.push(*id);
            }
            w.sent_since_tick = false;
        }
        for id in due {
            let Some(w) = self.watchers.get(&id) else {
                continue;
            };
            let complete = self.complete_to(w);
            // Idle shards move on for the next notification.
            for shard in &w.shards {
                self.shards.advance(*shard, floor);
            }
            // Like etcd (3.6.2 on), no notification for a watch that starts
            // beyond what its shards have reached.
            if complete >= w.next - 1 {
                self.send(self.response(complete, id)).await?;
            }
        }
        Ok(())
    }
}

/// The current revision and compaction mark for a new watch over `ids`.
/// Every shard is first raised to the floor, and to each other's counter,
/// so that any write the watch has not seen gets a revision above the
/// answer.
async fn watch_start(shards: &Shards, ids: &[ShardId]) -> Result<(i64, i64), ShardError> {
    shards.raise_all(ids, shards.floor()).await?;
    let reads = ids
        .iter()
        .map(|id| async move { (*id, shards.get(*id).store.revisions().await) });
    let mut current = 0;
    let mut compacted = 0;
    for (id, revs) in join_all(reads).await {
        let revs = revs?;
        shards.observe(id, revs.current);
        current = current.max(revs.current);
        compacted = compacted.max(revs.compacted);
    }
    if ids.len() > 1 {
        shards.raise_all(ids, current).await?;
    }
    Ok((current, compacted))
}

/// The revision a progress request answers: the store's current revision
/// over the covered shards (at least the floor), once every covered shard
/// has reached and published it.
async fn progress_target(shards: &Shards, covered: &[ShardId]) -> Result<i64, ShardError> {
    let mut target = shards.floor();
    let reads = covered
        .iter()
        .map(|id| async move { (*id, shards.get(*id).store.revisions().await) });
    for (id, revs) in join_all(reads).await {
        let current = revs?.current;
        shards.observe(id, current);
        target = target.max(current);
    }
    shards.raise_all(covered, target).await?;
    for id in covered {
        shards.get(*id).hub.wait_closed(target).await;
    }
    Ok(target)
}
