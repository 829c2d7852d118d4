//! A small in-memory model of etcd 3.4's MVCC store, written from etcd's
//! source (server/etcdserver/apply.go, mvcc/kvstore_txn.go, lease/lessor.go),
//! not from kubeshard's. It is deliberately naive: history is one flat log of
//! changes and every read scans it.

use std::collections::{BTreeMap, BTreeSet};

use kubeshard_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kubeshard_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use kubeshard_proto::etcdserverpb::request_op::Request;
use kubeshard_proto::etcdserverpb::response_op::Response;
use kubeshard_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use kubeshard_proto::mvccpb::{Event, KeyValue, event::EventType};
use kubeshard_selector::Selector;
use kubeshard_shard_worker::WriteRequest;

/// An error answer, by `ShardError` variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fail {
    Compacted(i64),
    FutureRevision,
    LeaseNotFound,
    LeaseExists,
    KeyNotFound,
    KeyTooLong,
    Other(String),
}

/// A write answer; headers hold only a revision.
#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    LeaseGrant { id: i64, ttl: i64, revision: i64 },
    LeaseRevoke { revision: i64 },
    LeaseExpire { expired: bool, revision: i64 },
    Compact { revision: i64 },
    Bump { revision: i64 },
}

pub fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// etcd's key ranges: empty end = one key, "\0" = no upper bound.
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        _ => key >= start && key < end,
    }
}

/// One change of one key: a put (`Some`) or a delete (`None`).
#[derive(Debug, Clone)]
struct Change {
    rev: i64,
    key: Vec<u8>,
    kv: Option<KeyValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub ttl: i64,
    pub expires_at_ms: i64,
}

/// The revision a write request builds and whether it changed anything yet
/// (etcd's storeTxnWrite: beginRev + 1, len(changes) > 0).
struct W {
    before: i64,
    rev: i64,
    changed: bool,
}

impl W {
    /// The revision reads inside the request see.
    fn view(&self) -> i64 {
        if self.changed { self.rev } else { self.before }
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub rev: i64,
    pub compacted: i64,
    /// The compaction revision at the last physical purge of history.
    pub purged_at: Option<i64>,
    /// Every change ever made, in (revision, sub) order.
    log: Vec<Change>,
    pub leases: BTreeMap<i64, Lease>,
    /// The revisions the shard hands out (every stride-th one).
    stride: i64,
    offset: i64,
}

fn branch(t: &TxnRequest, ok: bool) -> &[RequestOp] {
    if ok { &t.success } else { &t.failure }
}

impl Model {
    /// A model of a shard that hands out revisions `offset` modulo `stride`.
    pub fn new(stride: i64, offset: i64) -> Self {
        Model {
            stride,
            offset,
            rev: 1,
            compacted: 0,
            purged_at: None,
            log: Vec::new(),
            leases: BTreeMap::new(),
        }
    }

    /// `key` as of revision `at`.
    pub fn get(&self, key: &[u8], at: i64) -> Option<KeyValue> {
        let last = self.log.iter().rev().find(|c| c.key == key && c.rev <= at);
        last.and_then(|c| c.kv.clone())
    }

    /// Every key-value of the range as of revision `at`, in key order.
    pub fn snapshot(&self, start: &[u8], end: &[u8], at: i64) -> Vec<KeyValue> {
        let keys: BTreeSet<&[u8]> = self
            .log
            .iter()
            .map(|c| c.key.as_slice())
            .filter(|k| in_range(k, start, end))
            .collect();
        keys.into_iter().filter_map(|k| self.get(k, at)).collect()
    }

    /// etcd's applierV3backend.Range against current revision `cur`.
    pub fn range(&self, r: &RangeRequest, cur: i64) -> Result<RangeResponse, Fail> {
        if r.revision > cur {
            return Err(Fail::FutureRevision);
        }
        let at = if r.revision <= 0 { cur } else { r.revision };
        if at < self.compacted {
            return Err(Fail::Compacted(self.compacted));
        }
        let mut kvs = self.snapshot(&r.key, &r.range_end, at);
        // kubeshard's selectors: the range holds only the matching keys.
        let selector = Selector::parse(&r.label_selector, &r.field_selector)
            .map_err(|e| Fail::Other(e.to_string()))?;
        kvs.retain(|kv| selector.matches_value(&kv.value));
        let count = kvs.len() as i64;
        if r.count_only {
            kvs.clear();
        }
        let keep = |min: i64, max: i64, v: i64| (min == 0 || v >= min) && (max == 0 || v <= max);
        kvs.retain(|kv| {
            keep(r.min_mod_revision, r.max_mod_revision, kv.mod_revision)
                && keep(
                    r.min_create_revision,
                    r.max_create_revision,
                    kv.create_revision,
                )
        });
        let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
        let mut order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
        if target != SortTarget::Key && order == SortOrder::None {
            order = SortOrder::Ascend;
        }
        let cmp = |a: &KeyValue, b: &KeyValue| match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        // Go's sort on these few keys is an insertion sort: stable, also
        // under sort.Reverse, so ties keep key order either way.
        match order {
            SortOrder::Ascend => kvs.sort_by(cmp),
            SortOrder::Descend => kvs.sort_by(|a, b| cmp(b, a)),
            SortOrder::None => {}
        }
        let mut more = false;
        if r.limit > 0 && kvs.len() as i64 > r.limit {
            kvs.truncate(r.limit as usize);
            more = true;
        }
        if r.keys_only {
            kvs.iter_mut().for_each(|kv| kv.value.clear());
        }
        Ok(RangeResponse {
            header: header(cur),
            kvs,
            more,
            count,
        })
    }

    fn put(&mut self, p: &PutRequest, w: &mut W) -> PutResponse {
        let prev = self.get(&p.key, w.view());
        let old = prev.clone().unwrap_or_default();
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: if prev.is_some() {
                old.create_revision
            } else {
                w.rev
            },
            mod_revision: w.rev,
            version: old.version + 1,
            value: if p.ignore_value {
                old.value
            } else {
                p.value.clone()
            },
            lease: if p.ignore_lease { old.lease } else { p.lease },
        };
        self.log.push(Change {
            rev: w.rev,
            key: p.key.clone(),
            kv: Some(kv),
        });
        w.changed = true;
        PutResponse {
            header: header(w.rev),
            prev_kv: if p.prev_kv { prev } else { None },
        }
    }

    fn delete_kvs(&mut self, victims: &[KeyValue], w: &mut W) {
        for kv in victims {
            self.log.push(Change {
                rev: w.rev,
                key: kv.key.clone(),
                kv: None,
            });
            w.changed = true;
        }
    }

    fn delete(&mut self, d: &DeleteRangeRequest, w: &mut W) -> DeleteRangeResponse {
        let victims = self.snapshot(&d.key, &d.range_end, w.view());
        self.delete_kvs(&victims, w);
        DeleteRangeResponse {
            header: header(w.view()),
            deleted: victims.len() as i64,
            prev_kvs: if d.prev_kv { victims } else { Vec::new() },
        }
    }

    /// etcd's applyCompare.
    fn compare(&self, c: &Compare, at: i64) -> bool {
        let kvs = self.snapshot(&c.key, &c.range_end, at);
        if kvs.is_empty() {
            return c.target != CompareTarget::Value as i32 && compare_kv(c, &KeyValue::default());
        }
        kvs.iter().all(|kv| compare_kv(c, kv))
    }

    /// etcd's compareToPath: every compare, nested ones too, sees the state
    /// before the txn.
    fn compare_path(&self, t: &TxnRequest, at: i64, path: &mut Vec<bool>) {
        let ok = t.compare.iter().all(|c| self.compare(c, at));
        path.push(ok);
        for op in branch(t, ok) {
            if let Some(Request::RequestTxn(nested)) = &op.request {
                self.compare_path(nested, at, path);
            }
        }
    }

    /// etcd's checkRequests with checkPut (`puts`) or checkRange: this level's
    /// ops first, then the nested txns, all against the state before the txn.
    fn check(&self, t: &TxnRequest, path: &[bool], i: &mut usize, puts: bool) -> Result<(), Fail> {
        let ops = branch(t, path[*i]);
        *i += 1;
        for op in ops {
            match &op.request {
                Some(Request::RequestPut(p)) if puts => {
                    if (p.ignore_value || p.ignore_lease) && self.get(&p.key, self.rev).is_none() {
                        return Err(Fail::KeyNotFound);
                    }
                    if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                        return Err(Fail::LeaseNotFound);
                    }
                }
                Some(Request::RequestRange(r)) if !puts && r.revision != 0 => {
                    if r.revision > self.rev {
                        return Err(Fail::FutureRevision);
                    }
                    if r.revision < self.compacted {
                        return Err(Fail::Compacted(self.compacted));
                    }
                }
                _ => {}
            }
        }
        for op in ops {
            if let Some(Request::RequestTxn(nested)) = &op.request {
                self.check(nested, path, i, puts)?;
            }
        }
        Ok(())
    }

    /// etcd's applyTxn; nested txn responses keep an empty header.
    fn exec(&mut self, t: &TxnRequest, path: &[bool], i: &mut usize, w: &mut W) -> TxnResponse {
        let ok = path[*i];
        *i += 1;
        let mut responses = Vec::new();
        for op in branch(t, ok) {
            let response = match &op.request {
                Some(Request::RequestRange(r)) => {
                    Response::ResponseRange(self.range(r, w.view()).expect("checked before"))
                }
                Some(Request::RequestPut(p)) => Response::ResponsePut(self.put(p, w)),
                Some(Request::RequestDeleteRange(d)) => {
                    Response::ResponseDeleteRange(self.delete(d, w))
                }
                Some(Request::RequestTxn(nested)) => {
                    let mut r = self.exec(nested, path, i, w);
                    r.header = Some(ResponseHeader::default());
                    Response::ResponseTxn(r)
                }
                None => continue,
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        TxnResponse {
            header: None,
            succeeded: ok,
            responses,
        }
    }

    /// Deletes every key attached to the lease, in key order, in one revision.
    fn revoke(&mut self, id: i64, w: &mut W) {
        let attached = self.lease_keys(id);
        let victims: Vec<KeyValue> = attached
            .iter()
            .filter_map(|k| self.get(k, self.rev))
            .collect();
        self.delete_kvs(&victims, w);
        self.leases.remove(&id);
    }

    pub fn lease_keys(&self, id: i64) -> Vec<Vec<u8>> {
        let live = self.snapshot(b"\0", b"\0", self.rev);
        live.into_iter()
            .filter(|kv| kv.lease == id)
            .map(|kv| kv.key)
            .collect()
    }

    /// KeepAlive: extends a lease that has not expired yet.
    pub fn renew(&mut self, id: i64, now_ms: i64) -> Option<i64> {
        match self.leases.get_mut(&id) {
            Some(l) if l.expires_at_ms > now_ms => {
                l.expires_at_ms = now_ms + l.ttl * 1000;
                Some(l.ttl)
            }
            _ => None,
        }
    }

    /// One write request, as etcd applies it.
    pub fn apply(&mut self, request: &WriteRequest) -> Result<Resp, Fail> {
        // The next revision of the shard's class after the current one.
        let next = self.rev + 1 + (self.offset - self.rev - 1).rem_euclid(self.stride);
        let mut w = W {
            before: self.rev,
            rev: next,
            changed: false,
        };
        let resp = match request {
            WriteRequest::Put(p) => {
                if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                    return Err(Fail::LeaseNotFound);
                }
                if (p.ignore_value || p.ignore_lease) && self.get(&p.key, self.rev).is_none() {
                    return Err(Fail::KeyNotFound);
                }
                Resp::Put(self.put(p, &mut w))
            }
            WriteRequest::DeleteRange(d) => Resp::DeleteRange(self.delete(d, &mut w)),
            WriteRequest::Txn(t) => {
                let mut path = Vec::new();
                self.compare_path(t, self.rev, &mut path);
                self.check(t, &path, &mut 0, true)?;
                self.check(t, &path, &mut 0, false)?;
                let mut r = self.exec(t, &path, &mut 0, &mut w);
                r.header = header(w.view());
                Resp::Txn(r)
            }
            WriteRequest::LeaseGrant { id, ttl, now_ms } => {
                if self.leases.contains_key(id) {
                    return Err(Fail::LeaseExists);
                }
                let expires_at_ms = now_ms + ttl * 1000;
                self.leases.insert(
                    *id,
                    Lease {
                        ttl: *ttl,
                        expires_at_ms,
                    },
                );
                Resp::LeaseGrant {
                    id: *id,
                    ttl: *ttl,
                    revision: self.rev,
                }
            }
            WriteRequest::LeaseRevoke { id } => {
                if !self.leases.contains_key(id) {
                    return Err(Fail::LeaseNotFound);
                }
                self.revoke(*id, &mut w);
                Resp::LeaseRevoke { revision: w.view() }
            }
            WriteRequest::LeaseExpire { id, now_ms } => {
                let expired = self
                    .leases
                    .get(id)
                    .is_some_and(|l| l.expires_at_ms <= *now_ms);
                if expired {
                    self.revoke(*id, &mut w);
                }
                Resp::LeaseExpire {
                    expired,
                    revision: w.view(),
                }
            }
            WriteRequest::Compact { revision } => {
                if *revision <= self.compacted {
                    return Err(Fail::Compacted(self.compacted));
                }
                if *revision > self.rev {
                    return Err(Fail::FutureRevision);
                }
                self.compacted = *revision;
                Resp::Compact { revision: self.rev }
            }
            WriteRequest::Bump { floor } => {
                self.rev = self.rev.max(*floor);
                Resp::Bump { revision: self.rev }
            }
        };
        if w.changed {
            self.rev = w.rev;
        }
        Ok(resp)
    }

    /// The events of the range with revisions in [from, to], as a watch
    /// sees them: deletes carry key and mod_revision only; prev_kv is the
    /// key's value just before. Once history was purged at the compaction
    /// revision C, the tombstones at C, the puts at C that a tombstone of the
    /// same revision replaced, and the rows they or the puts at C replaced
    /// are gone (as in etcd, whose compaction removes them too).
    pub fn events(&self, start: &[u8], end: &[u8], from: i64, to: i64) -> Vec<Event> {
        let purged = self.purged_at == Some(self.compacted);
        let mut out = Vec::new();
        for (i, c) in self.log.iter().enumerate() {
            if c.rev < from || c.rev > to || !in_range(&c.key, start, end) {
                continue;
            }
            let at_purge = purged && c.rev == self.compacted;
            // A put at C that a delete of the same txn (same revision)
            // replaced is gone too: etcd drops the key's whole generation
            // when its tombstone is at or below the compaction revision.
            if at_purge
                && self.log[i + 1..]
                    .iter()
                    .any(|later| later.rev == c.rev && later.key == c.key)
            {
                continue;
            }
            let (r#type, kv) = match &c.kv {
                Some(kv) => (EventType::Put, kv.clone()),
                None if at_purge => continue,
                None => (
                    EventType::Delete,
                    KeyValue {
                        key: c.key.clone(),
                        mod_revision: c.rev,
                        ..Default::default()
                    },
                ),
            };
            out.push(Event {
                r#type: r#type as i32,
                kv: Some(kv),
                prev_kv: if at_purge {
                    None
                } else {
                    self.get(&c.key, c.rev - 1)
                },
            });
        }
        out
    }
}

/// etcd's compareKV: a target union of another kind compares against zero.
fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let ord = match (CompareTarget::try_from(c.target), &c.target_union) {
        (Ok(CompareTarget::Value), Some(TargetUnion::Value(v))) => kv.value.cmp(v),
        (Ok(CompareTarget::Value), _) => kv.value.as_slice().cmp(&[][..]),
        (Ok(CompareTarget::Version), Some(TargetUnion::Version(v))) => kv.version.cmp(v),
        (Ok(CompareTarget::Version), _) => kv.version.cmp(&0),
        (Ok(CompareTarget::Create), Some(TargetUnion::CreateRevision(v))) => {
            kv.create_revision.cmp(v)
        }
        (Ok(CompareTarget::Create), _) => kv.create_revision.cmp(&0),
        (Ok(CompareTarget::Mod), Some(TargetUnion::ModRevision(v))) => kv.mod_revision.cmp(v),
        (Ok(CompareTarget::Mod), _) => kv.mod_revision.cmp(&0),
        (Ok(CompareTarget::Lease), Some(TargetUnion::Lease(v))) => kv.lease.cmp(v),
        (Ok(CompareTarget::Lease), _) => kv.lease.cmp(&0),
        (Err(_), _) => std::cmp::Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord.is_eq(),
        Ok(CompareResult::NotEqual) => ord.is_ne(),
        Ok(CompareResult::Greater) => ord.is_gt(),
        Ok(CompareResult::Less) => ord.is_lt(),
        Err(_) => true,
    }
}
