//! The write path of a shard: a batch of requests applied in one database
//! transaction under the revision lock (group commit).
//!
//! Each request gets its own revision, exactly as etcd would give it. Keys
//! that point requests touch are read once for the whole batch; changes are
//! buffered and written with multi-row statements, so a batch of N puts costs
//! a handful of statements, not 3N. Because every writer of the shard holds
//! the revision lock while it reads and writes, reading a key's current row
//! and then writing its successor inside the transaction cannot race with
//! another writer (kine's read-then-insert race needs two unlocked writers).

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use futures::future::BoxFuture;
use kubeshard_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kubeshard_proto::etcdserverpb::request_op::Request;
use kubeshard_proto::etcdserverpb::response_op::Response;
use kubeshard_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use kubeshard_proto::mvccpb::event::EventType;
use kubeshard_proto::mvccpb::{Event, KeyValue};

use super::fence::{self, Serving};
use super::selection::SelectedRange;
use super::{LeaseRecord, RevisionClass, Revisions, WriteRequest, WriteResponse};
use crate::error::{Result, ShardError};
use crate::keys::KeyRange;

/// One row of `ks_history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub revision: i64,
    pub sub: i64,
    pub key: Vec<u8>,
    pub deleted: bool,
    pub create_revision: i64,
    /// mod_revision of the key's previous row (0 if it did not exist), so
    /// that watch events can carry prev_kv.
    pub prev_revision: i64,
    pub version: i64,
    pub lease: i64,
    pub value: Vec<u8>,
}

/// The statements a write batch needs, inside one transaction.
#[async_trait]
pub(crate) trait TxOps: Send {
    fn max_key_len(&self) -> Option<usize>;
    fn backend(&self) -> &'static str;
    async fn lock_meta(&mut self) -> Result<Revisions>;
    async fn set_revisions(&mut self, revs: Revisions) -> Result<()>;
    async fn live_get(&mut self, keys: &[&[u8]]) -> Result<Vec<KeyValue>>;
    async fn live_in_range(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>>;
    async fn live_with_lease(&mut self, lease: i64) -> Result<Vec<KeyValue>>;
    async fn range(&mut self, request: &RangeRequest, revs: Revisions) -> Result<RangeResponse>;
    async fn write_history(&mut self, rows: &[HistoryRow]) -> Result<()>;
    async fn write_live(&mut self, upserts: &[&KeyValue], deletes: &[&[u8]]) -> Result<()>;
    async fn leases_existing(&mut self, ids: &[i64]) -> Result<Vec<i64>>;
    async fn lease_insert(&mut self, lease: LeaseRecord) -> Result<()>;
    async fn lease_delete(&mut self, id: i64) -> Result<()>;
    async fn lease_deadline(&mut self, id: i64) -> Result<Option<i64>>;

    /// The start of every batch: the revisions, then the live rows of
    /// `keys`. Backends that can read both in one round trip override it.
    async fn start(&mut self, keys: &[&[u8]]) -> Result<(Revisions, Vec<KeyValue>)> {
        start_separately(self, keys).await
    }

    /// The end of every batch: its remaining changes, then the counter if
    /// it moved. Backends that can do it in fewer round trips override it.
    async fn write_final(
        &mut self,
        history: &[HistoryRow],
        upserts: &[&KeyValue],
        deletes: &[&[u8]],
        revs: Option<Revisions>,
    ) -> Result<()> {
        write_final_separately(self, history, upserts, deletes, revs).await
    }
}

/// [`TxOps::start`] in two statements: the counter, then the keys.
pub(crate) async fn start_separately<T: TxOps + ?Sized>(
    ops: &mut T,
    keys: &[&[u8]],
) -> Result<(Revisions, Vec<KeyValue>)> {
    let revs = ops.lock_meta().await?;
    let live = if keys.is_empty() {
        Vec::new()
    } else {
        ops.live_get(keys).await?
    };
    Ok((revs, live))
}

/// [`TxOps::write_final`] one kind of change at a time.
pub(crate) async fn write_final_separately<T: TxOps + ?Sized>(
    ops: &mut T,
    history: &[HistoryRow],
    upserts: &[&KeyValue],
    deletes: &[&[u8]],
    revs: Option<Revisions>,
) -> Result<()> {
    if !history.is_empty() {
        ops.write_history(history).await?;
    }
    if !upserts.is_empty() || !deletes.is_empty() {
        ops.write_live(upserts, deletes).await?;
    }
    if let Some(revs) = revs {
        ops.set_revisions(revs).await?;
    }
    Ok(())
}

/// What a committed batch did.
#[derive(Debug)]
pub struct CommittedBatch {
    /// One result per request.
    pub responses: Vec<Result<WriteResponse>>,
    /// The shard's revision before the batch.
    pub before: i64,
    /// The shard's revision after it (equal to `before` if nothing changed).
    pub last: i64,
    /// Watch events of revisions (before, last], with prev_kv, if asked for.
    pub events: Option<Vec<Event>>,
    /// How the batch was committed.
    pub path: WritePath,
}

/// How a write batch reached the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePath {
    /// Under the revision lock, from the start.
    Locked,
    /// Read without the lock, written by one guarded statement
    /// (`guarded_writes.rs`).
    Guarded,
    /// Tried guarded, then run again under the lock (another writer
    /// committed meanwhile, or a request read the batch's own writes).
    RerunLocked,
    /// Written by one guarded statement without reading first: the
    /// statement checked that the batch's keys were in the state the
    /// writer knew (`guarded_writes.rs`).
    Speculative,
}

/// Applies `batch` and returns one result per request. An `Err` means the
/// transaction must be rolled back: nothing of the batch may be committed.
/// `serving` is taken once per batch: the database must not be fenced
/// ahead of its version, and revisions are of its class.
pub(crate) async fn apply_batch(
    ops: &mut dyn TxOps,
    batch: &[WriteRequest],
    serving: Serving,
    collect_events: bool,
) -> Result<CommittedBatch> {
    let (keys, leases) = prefetch_keys(batch);
    let (revs, live) = ops.start(&keys).await?;
    fence::check(serving.version, revs.epoch)?;
    let mut state = BatchState {
        ops,
        class: serving.class,
        start: revs,
        revs,
        keys: HashMap::new(),
        leases: HashMap::new(),
        leases_changed: false,
        history: Vec::new(),
        live: BTreeSet::new(),
        events: collect_events.then(Vec::new),
    };
    for key in &keys {
        state.keys.insert(key.to_vec(), None);
    }
    for kv in live {
        state.keys.insert(kv.key.clone(), Some(kv));
    }
    state.prefetch_leases(&leases).await?;
    let mut responses = Vec::with_capacity(batch.len());
    for request in batch {
        match state.apply(request).await {
            Err(e) if is_fatal(&e) => return Err(e),
            result => responses.push(result),
        }
    }
    state.finish().await?;
    Ok(CommittedBatch {
        responses,
        before: state.start.current,
        last: state.revs.current,
        events: state.events,
        path: WritePath::Locked,
    })
}

/// The buffered live changes of `live` (changed keys), given the keys'
/// current values: keys to upsert and keys to delete.
fn live_changes<'k>(
    live: &'k BTreeSet<Vec<u8>>,
    keys: &'k HashMap<Vec<u8>, Option<KeyValue>>,
) -> (Vec<&'k KeyValue>, Vec<&'k [u8]>) {
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    for key in live {
        match keys.get(key) {
            Some(Some(kv)) => upserts.push(kv),
            _ => deletes.push(key.as_slice()),
        }
    }
    (upserts, deletes)
}

/// Errors that leave the transaction unusable (as opposed to a request refused).
fn is_fatal(e: &ShardError) -> bool {
    matches!(
        e,
        ShardError::Database(_)
            | ShardError::Sqlite(_)
            | ShardError::Corrupt(_)
            | ShardError::NeedsLock { .. }
            | ShardError::NotSpeculative { .. }
            | ShardError::Stopped(_)
            | ShardError::TopologyChanged { .. }
    )
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// The revision being written by one request and its next sub-revision.
#[derive(Debug)]
struct Writer {
    /// The shard's revision before this request.
    before: i64,
    revision: i64,
    sub: i64,
    /// For keys this request wrote: their mod_revision before the request.
    /// A txn may put a key and delete it later (etcd allows it across nested
    /// txns); both events' prev_kv is the key as it was before the txn.
    prev_before: HashMap<Vec<u8>, Option<KeyValue>>,
}

impl Writer {
    fn changed(&self) -> bool {
        self.sub > 0
    }

    fn next_sub(&mut self) -> i64 {
        let s = self.sub;
        self.sub += 1;
        s
    }

    /// The revision a read inside this request sees.
    fn view(&self) -> i64 {
        if self.changed() {
            self.revision
        } else {
            self.before
        }
    }
}

struct BatchState<'o> {
    ops: &'o mut dyn TxOps,
    /// Which revisions this shard may hand out.
    class: RevisionClass,
    start: Revisions,
    /// `current` is the last revision handed out, including this batch's.
    revs: Revisions,
    /// Known current state of keys: `None` is absent.
    keys: HashMap<Vec<u8>, Option<KeyValue>>,
    /// Known existence of leases.
    leases: HashMap<i64, bool>,
    /// Whether a lease was granted or revoked: the batch then writes the
    /// counter row even if no revision was used, so that a guarded batch
    /// of another router that read the lease fails its guard.
    leases_changed: bool,
    /// Changes not yet written to the database.
    history: Vec<HistoryRow>,
    /// Keys whose `ks_live` row must be written: their state is in `keys`.
    live: BTreeSet<Vec<u8>>,
    /// The watch events of the batch, when the caller wants them.
    events: Option<Vec<Event>>,
}

impl BatchState<'_> {
    async fn prefetch_leases(&mut self, leases: &[i64]) -> Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        for id in leases {
            self.leases.insert(*id, false);
        }
        for id in self.ops.leases_existing(leases).await? {
            self.leases.insert(id, true);
        }
        Ok(())
    }

    async fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>> {
        if let Some(state) = self.keys.get(key) {
            return Ok(state.clone());
        }
        let found = self.ops.live_get(&[key]).await?.into_iter().next();
        self.keys.insert(key.to_vec(), found.clone());
        Ok(found)
    }

    async fn lease_exists(&mut self, id: i64) -> Result<bool> {
        if let Some(exists) = self.leases.get(&id) {
            return Ok(*exists);
        }
        let exists = !self.ops.leases_existing(&[id]).await?.is_empty();
        self.leases.insert(id, exists);
        Ok(exists)
    }

    /// Writes buffered changes so that range statements see them.
    async fn flush(&mut self) -> Result<()> {
        if !self.history.is_empty() {
            self.ops.write_history(&self.history).await?;
            self.history.clear();
        }
        if !self.live.is_empty() {
            let (upserts, deletes) = live_changes(&self.live, &self.keys);
            self.ops.write_live(&upserts, &deletes).await?;
            self.live.clear();
        }
        Ok(())
    }

    /// Writes what is still buffered and the counter, if it moved.
    async fn finish(&mut self) -> Result<()> {
        let revs = (self.revs != self.start || self.leases_changed).then_some(self.revs);
        let (upserts, deletes) = live_changes(&self.live, &self.keys);
        self.ops
            .write_final(&self.history, &upserts, &deletes, revs)
            .await?;
        self.history.clear();
        self.live.clear();
        Ok(())
    }

    /// The key-values currently in `range`.
    async fn current_in(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        match range {
            KeyRange::Single(key) => Ok(self.get(key).await?.into_iter().collect()),
            KeyRange::Span { .. } if range.is_empty() => Ok(Vec::new()),
            KeyRange::Span { .. } => {
                self.flush().await?;
                let found = self.ops.live_in_range(range).await?;
                for kv in &found {
                    self.keys.insert(kv.key.clone(), Some(kv.clone()));
                }
                Ok(found)
            }
        }
    }

    fn check_key_len(&self, key: &[u8]) -> Result<()> {
        match self.ops.max_key_len() {
            Some(max) if key.len() > max => Err(ShardError::KeyTooLong {
                len: key.len(),
                max,
                backend: self.ops.backend(),
            }),
            _ => Ok(()),
        }
    }

    async fn apply(&mut self, request: &WriteRequest) -> Result<WriteResponse> {
        let mut w = Writer {
            before: self.revs.current,
            revision: self.class.next_after(self.revs.current),
            sub: 0,
            prev_before: HashMap::new(),
        };
        let response = match request {
            WriteRequest::Put(p) => {
                if p.lease != 0 && !self.lease_exists(p.lease).await? {
                    return Err(ShardError::LeaseNotFound);
                }
                self.check_put(p).await?;
                let prev = self.put(p, &mut w).await?;
                WriteResponse::Put(PutResponse {
                    header: header(w.revision),
                    prev_kv: if p.prev_kv { prev } else { None },
                })
            }
            WriteRequest::DeleteRange(d) => {
                let deleted = self.delete(d, &mut w).await?;
                WriteResponse::DeleteRange(DeleteRangeResponse {
                    header: header(w.view()),
                    deleted: deleted.len() as i64,
                    prev_kvs: if d.prev_kv { deleted } else { Vec::new() },
                })
            }
            WriteRequest::Txn(t) => {
                let path = self.compare_path(t).await?;
                self.check_txn(t, &path, &mut 0, true).await?;
                self.check_txn(t, &path, &mut 0, false).await?;
                let mut response = self.exec_txn(t, &path, &mut 0, &mut w).await?;
                response.header = header(w.view());
                WriteResponse::Txn(response)
            }
            WriteRequest::LeaseGrant { id, ttl, now_ms } => {
                if self.lease_exists(*id).await? {
                    return Err(ShardError::LeaseExists);
                }
                self.ops
                    .lease_insert(LeaseRecord {
                        id: *id,
                        ttl: *ttl,
                        expires_at_ms: now_ms.saturating_add(ttl.saturating_mul(1000)),
                    })
                    .await?;
                self.leases.insert(*id, true);
                self.leases_changed = true;
                WriteResponse::LeaseGrant {
                    id: *id,
                    ttl: *ttl,
                    revision: w.view(),
                }
            }
            WriteRequest::LeaseRevoke { id } => {
                if !self.lease_exists(*id).await? {
                    return Err(ShardError::LeaseNotFound);
                }
                self.revoke(*id, &mut w).await?;
                WriteResponse::LeaseRevoke { revision: w.view() }
            }
            WriteRequest::LeaseExpire { id, now_ms } => {
                let expired = match self.ops.lease_deadline(*id).await? {
                    Some(deadline) if deadline <= *now_ms => {
                        self.revoke(*id, &mut w).await?;
                        true
                    }
                    _ => false,
                };
                WriteResponse::LeaseExpire {
                    expired,
                    revision: w.view(),
                }
            }
            WriteRequest::Compact { revision } => {
                if *revision <= self.revs.compacted {
                    return Err(ShardError::Compacted {
                        compact_revision: self.revs.compacted,
                    });
                }
                if *revision > self.revs.current {
                    return Err(ShardError::FutureRevision);
                }
                self.revs.compacted = *revision;
                WriteResponse::Compact {
                    revision: self.revs.current,
                }
            }
            WriteRequest::Bump { floor } => {
                self.revs.current = self.revs.current.max(*floor);
                WriteResponse::Bump {
                    revision: self.revs.current,
                }
            }
        };
        if w.changed() {
            self.revs.current = w.revision;
        }
        Ok(response)
    }

    /// etcd's checks of a Put before anything is written.
    async fn check_put(&mut self, p: &PutRequest) -> Result<()> {
        self.check_key_len(&p.key)?;
        if (p.ignore_value || p.ignore_lease) && self.get(&p.key).await?.is_none() {
            return Err(ShardError::KeyNotFound);
        }
        Ok(())
    }

    /// Writes a put; returns the previous key-value.
    async fn put(&mut self, p: &PutRequest, w: &mut Writer) -> Result<Option<KeyValue>> {
        let prev = self.get(&p.key).await?;
        let value = match (&prev, p.ignore_value) {
            (Some(prev), true) => prev.value.clone(),
            _ => p.value.clone(),
        };
        let lease = match (&prev, p.ignore_lease) {
            (Some(prev), true) => prev.lease,
            _ => p.lease,
        };
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: prev.as_ref().map_or(w.revision, |k| k.create_revision),
            mod_revision: w.revision,
            version: prev.as_ref().map_or(1, |k| k.version + 1),
            value,
            lease,
        };
        // The key before this request (a txn writes a key at most once,
        // except a put followed by a delete in a later nested txn).
        let before = w
            .prev_before
            .entry(kv.key.clone())
            .or_insert_with(|| prev.clone())
            .clone();
        if let Some(events) = &mut self.events {
            events.push(Event {
                r#type: EventType::Put as i32,
                kv: Some(kv.clone()),
                prev_kv: before.clone(),
            });
        }
        self.history.push(HistoryRow {
            revision: w.revision,
            sub: w.next_sub(),
            key: kv.key.clone(),
            deleted: false,
            create_revision: kv.create_revision,
            prev_revision: before.as_ref().map_or(0, |k| k.mod_revision),
            version: kv.version,
            lease: kv.lease,
            value: kv.value.clone(),
        });
        self.live.insert(kv.key.clone());
        self.keys.insert(kv.key.clone(), Some(kv));
        Ok(prev)
    }

    /// Deletes the keys of a DeleteRange; returns what was deleted, in key order.
    async fn delete(&mut self, d: &DeleteRangeRequest, w: &mut Writer) -> Result<Vec<KeyValue>> {
        let range = KeyRange::new(&d.key, &d.range_end);
        let victims = self.current_in(&range).await?;
        for kv in &victims {
            self.tombstone(kv, w);
        }
        Ok(victims)
    }

    fn tombstone(&mut self, kv: &KeyValue, w: &mut Writer) {
        // etcd's prev_kv is the key at the previous revision: for a key put
        // earlier in this same txn, its value from before the txn.
        let before = if kv.mod_revision == w.revision {
            w.prev_before.get(&kv.key).cloned().flatten()
        } else {
            Some(kv.clone())
        };
        if let Some(events) = &mut self.events {
            events.push(Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: kv.key.clone(),
                    mod_revision: w.revision,
                    ..Default::default()
                }),
                prev_kv: before.clone(),
            });
        }
        self.history.push(HistoryRow {
            revision: w.revision,
            sub: w.next_sub(),
            key: kv.key.clone(),
            deleted: true,
            create_revision: 0,
            prev_revision: before.as_ref().map_or(0, |k| k.mod_revision),
            version: 0,
            lease: 0,
            value: Vec::new(),
        });
        self.live.insert(kv.key.clone());
        self.keys.insert(kv.key.clone(), None);
    }

    /// Deletes the lease and every key attached to it, in one revision.
    async fn revoke(&mut self, id: i64, w: &mut Writer) -> Result<()> {
        self.flush().await?;
        let attached = self.ops.live_with_lease(id).await?;
        for kv in &attached {
            self.tombstone(kv, w);
        }
        self.ops.lease_delete(id).await?;
        self.leases.insert(id, false);
        self.leases_changed = true;
        Ok(())
    }

    /// Evaluates every compare of the txn and of the nested txns on the
    /// chosen branches, before anything is written (etcd's compareToPath).
    fn compare_path<'a>(&'a mut self, t: &'a TxnRequest) -> BoxFuture<'a, Result<Vec<bool>>> {
        Box::pin(async move {
            let mut ok = true;
            for c in &t.compare {
                if !self.compare(c).await? {
                    ok = false;
                    break;
                }
            }
            let mut path = vec![ok];
            let ops = if ok { &t.success } else { &t.failure };
            for op in ops {
                if let Some(Request::RequestTxn(nested)) = &op.request {
                    path.extend(self.compare_path(nested).await?);
                }
            }
            Ok(path)
        })
    }

    async fn compare(&mut self, c: &Compare) -> Result<bool> {
        let range = KeyRange::new(&c.key, &c.range_end);
        let kvs = self.current_in(&range).await?;
        let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
        if kvs.is_empty() {
            // A missing key has no value to compare: etcd fails value
            // compares and compares the other targets against zero.
            if target == CompareTarget::Value {
                return Ok(false);
            }
            return Ok(compare_kv(c, &KeyValue::default()));
        }
        Ok(kvs.iter().all(|kv| compare_kv(c, kv)))
    }

    /// etcd's checkRequests: puts need their lease and, with ignore_*, their
    /// key (the `puts` pass); ranges need a readable revision (the other
    /// pass). Like etcd, the put pass runs over the whole txn before the range
    /// pass, and each checks a level's ops before its nested txns, so a txn
    /// with several faults reports the same one. Runs before any write.
    fn check_txn<'a>(
        &'a mut self,
        t: &'a TxnRequest,
        path: &'a [bool],
        at: &'a mut usize,
        puts: bool,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let ok = path.get(*at).copied().unwrap_or(false);
            *at += 1;
            let ops = if ok { &t.success } else { &t.failure };
            for op in ops {
                match &op.request {
                    Some(Request::RequestPut(p)) if puts => {
                        self.check_put(p).await?;
                        if p.lease != 0 && !self.lease_exists(p.lease).await? {
                            return Err(ShardError::LeaseNotFound);
                        }
                    }
                    Some(Request::RequestRange(r)) if !puts && r.revision != 0 => {
                        if r.revision > self.revs.current {
                            return Err(ShardError::FutureRevision);
                        }
                        if r.revision < self.revs.compacted {
                            return Err(ShardError::Compacted {
                                compact_revision: self.revs.compacted,
                            });
                        }
                    }
                    _ => {}
                }
            }
            for op in ops {
                if let Some(Request::RequestTxn(nested)) = &op.request {
                    self.check_txn(nested, path, at, puts).await?;
                }
            }
            Ok(())
        })
    }

    fn exec_txn<'a>(
        &'a mut self,
        t: &'a TxnRequest,
        path: &'a [bool],
        at: &'a mut usize,
        w: &'a mut Writer,
    ) -> BoxFuture<'a, Result<TxnResponse>> {
        Box::pin(async move {
            let ok = path.get(*at).copied().unwrap_or(false);
            *at += 1;
            let ops = if ok { &t.success } else { &t.failure };
            let mut responses = Vec::with_capacity(ops.len());
            for op in ops {
                let response = match &op.request {
                    Some(Request::RequestRange(r)) => {
                        Response::ResponseRange(self.read(r, w).await?)
                    }
                    Some(Request::RequestPut(p)) => {
                        let prev = self.put(p, w).await?;
                        Response::ResponsePut(PutResponse {
                            header: header(w.revision),
                            prev_kv: if p.prev_kv { prev } else { None },
                        })
                    }
                    Some(Request::RequestDeleteRange(d)) => {
                        let deleted = self.delete(d, w).await?;
                        Response::ResponseDeleteRange(DeleteRangeResponse {
                            header: header(w.view()),
                            deleted: deleted.len() as i64,
                            prev_kvs: if d.prev_kv { deleted } else { Vec::new() },
                        })
                    }
                    Some(Request::RequestTxn(nested)) => {
                        let mut r = self.exec_txn(nested, path, at, w).await?;
                        // etcd gives a nested txn an empty header (revision 0).
                        r.header = Some(ResponseHeader::default());
                        Response::ResponseTxn(r)
                    }
                    None => continue,
                };
                responses.push(ResponseOp {
                    response: Some(response),
                });
            }
            Ok(TxnResponse {
                header: None,
                succeeded: ok,
                responses,
            })
        })
    }

    /// A Range inside a txn: sees the txn's own earlier writes.
    async fn read(&mut self, r: &RangeRequest, w: &Writer) -> Result<RangeResponse> {
        match SelectedRange::of(r)? {
            Some(selected) => {
                let read = self.read_unfiltered(&selected.unfiltered, w).await?;
                Ok(selected.answer(r, read))
            }
            None => self.read_unfiltered(r, w).await,
        }
    }

    async fn read_unfiltered(&mut self, r: &RangeRequest, w: &Writer) -> Result<RangeResponse> {
        let point = r.range_end.is_empty()
            && r.revision == 0
            && r.min_mod_revision == 0
            && r.max_mod_revision == 0
            && r.min_create_revision == 0
            && r.max_create_revision == 0;
        if point {
            let found = self.get(&r.key).await?;
            let count = i64::from(found.is_some());
            let kvs = match found {
                Some(_) if r.count_only => Vec::new(),
                Some(mut kv) => {
                    if r.keys_only {
                        kv.value.clear();
                    }
                    vec![kv]
                }
                None => Vec::new(),
            };
            return Ok(RangeResponse {
                header: header(w.view()),
                kvs,
                more: false,
                count,
            });
        }
        self.flush().await?;
        let revs = Revisions {
            current: w.view(),
            compacted: self.revs.compacted,
            epoch: self.revs.epoch,
        };
        self.ops.range(r, revs).await
    }
}

/// etcd's compareKV.
fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
    let ordering = match target {
        CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        CompareTarget::Create => kv.create_revision.cmp(&union_int(c, target)),
        CompareTarget::Mod => kv.mod_revision.cmp(&union_int(c, target)),
        CompareTarget::Version => kv.version.cmp(&union_int(c, target)),
        CompareTarget::Lease => kv.lease.cmp(&union_int(c, target)),
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ordering == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ordering != Ordering::Equal,
        Ok(CompareResult::Greater) => ordering == Ordering::Greater,
        Ok(CompareResult::Less) => ordering == Ordering::Less,
        Err(_) => true,
    }
}

/// The integer a compare holds for its target; etcd reads 0 when the union
/// holds another variant.
fn union_int(c: &Compare, target: CompareTarget) -> i64 {
    match (&c.target_union, target) {
        (Some(TargetUnion::Version(v)), CompareTarget::Version)
        | (Some(TargetUnion::CreateRevision(v)), CompareTarget::Create)
        | (Some(TargetUnion::ModRevision(v)), CompareTarget::Mod)
        | (Some(TargetUnion::Lease(v)), CompareTarget::Lease) => *v,
        _ => 0,
    }
}

/// The keys and leases the requests of a batch name directly, sorted and
/// deduplicated: read once, at the start of the batch.
fn prefetch_keys(batch: &[WriteRequest]) -> (Vec<&[u8]>, Vec<i64>) {
    let mut keys: Vec<&[u8]> = Vec::new();
    let mut leases: Vec<i64> = Vec::new();
    for request in batch {
        match request {
            WriteRequest::Put(p) => {
                keys.push(&p.key);
                if p.lease != 0 {
                    leases.push(p.lease);
                }
            }
            WriteRequest::DeleteRange(d) if d.range_end.is_empty() => keys.push(&d.key),
            WriteRequest::Txn(t) => collect_txn_keys(t, &mut keys, &mut leases),
            WriteRequest::LeaseGrant { id, .. } | WriteRequest::LeaseRevoke { id } => {
                leases.push(*id)
            }
            _ => {}
        }
    }
    keys.sort_unstable();
    keys.dedup();
    leases.sort_unstable();
    leases.dedup();
    (keys, leases)
}

fn collect_txn_keys<'a>(t: &'a TxnRequest, keys: &mut Vec<&'a [u8]>, leases: &mut Vec<i64>) {
    for c in &t.compare {
        if c.range_end.is_empty() {
            keys.push(&c.key);
        }
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(Request::RequestPut(p)) => {
                keys.push(&p.key);
                if p.lease != 0 {
                    leases.push(p.lease);
                }
            }
            Some(Request::RequestDeleteRange(d)) if d.range_end.is_empty() => keys.push(&d.key),
            Some(Request::RequestRange(r)) if r.range_end.is_empty() => keys.push(&r.key),
            Some(Request::RequestTxn(nested)) => collect_txn_keys(nested, keys, leases),
            _ => {}
        }
    }
}
