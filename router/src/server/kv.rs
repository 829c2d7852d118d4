//! etcd's KV service: Range, Put, DeleteRange, Txn, Compact, routed to the
//! shards of their keys. A range over several shards is read from all of
//! them at one revision and merged; a Txn must stay inside one shard.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::Arc;

use futures::future::join_all;
use kubeshard_config::ShardId;
use kubeshard_proto::etcdserverpb::kv_server::Kv;
use kubeshard_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use kubeshard_proto::etcdserverpb::request_op::Request as Op;
use kubeshard_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RangeStreamResponse, TxnRequest, TxnResponse,
};
use kubeshard_proto::mvccpb::KeyValue;
use kubeshard_shard_worker::{WriteRequest, WriteResponse};
use tonic::{Request, Response, Status};

use super::Core;
use crate::error::{EtcdError, cross_shard_txn, shard_status, unimplemented};
use crate::shards::Shards;
use crate::topology_change::on_topology;
use crate::validate;

#[derive(Debug)]
pub struct KvService {
    core: Arc<Core>,
}

impl KvService {
    pub fn new(core: Arc<Core>) -> Self {
        KvService { core }
    }

    /// A write on shard `id`, once its keys are not held (an online move).
    async fn write(
        shards: &Shards,
        id: ShardId,
        request: WriteRequest,
    ) -> Result<WriteResponse, Status> {
        shards.hold_off(&[id]).await.map_err(shard_status)?;
        shards.write(id, request).await.map_err(shard_status)
    }

    /// A range inside one shard, with a header no lower than the floor,
    /// within `--datastore-timeout` (its steps are bounded each, and
    /// together too).
    async fn range_one(
        shards: &Shards,
        id: ShardId,
        request: &RangeRequest,
    ) -> Result<RangeResponse, Status> {
        let read = Self::range_one_unbounded(shards, id, request);
        kubeshard_shard_worker::deadline::bounded(shards.limit(), read)
            .await
            .unwrap_or_else(|_| Err(shard_status(kubeshard_shard_worker::ShardError::TimedOut)))
    }

    async fn range_one_unbounded(
        shards: &Shards,
        id: ShardId,
        request: &RangeRequest,
    ) -> Result<RangeResponse, Status> {
        if request.revision <= 0 && !request.serializable {
            // Other routers' writes: the header covers them (`peers.rs`).
            shards.catch_up().await.map_err(shard_status)?;
        }
        let mut target = shards.floor();
        if request.revision > target {
            // Another router may have written up to it.
            target = shards.refresh().await.map_err(shard_status)?;
        }
        match shards.raise(id, target).await {
            Ok(_) => {}
            // A database out of space cannot raise its counter, and reads
            // must go on: the shard is read at its own counter, a header
            // below the floor but still above nothing written to it later.
            Err(e) if e.is_disk_full() => {}
            Err(e) => return Err(shard_status(e)),
        }
        let response = shards
            .get(id)
            .store
            .range(request)
            .await
            .map_err(shard_status)?;
        if let Some(h) = &response.header {
            shards.observe(id, h.revision);
        }
        Ok(response)
    }

    /// A range over several shards: every shard is read at one revision R
    /// (the revision asked for, or else the floor after reading the shards'
    /// counters) after lagging shards were raised to it, and the answers are
    /// merged as one etcd would give them; within `--datastore-timeout`.
    async fn range_many(
        &self,
        shards: &Shards,
        ids: &[ShardId],
        request: &RangeRequest,
    ) -> Result<RangeResponse, Status> {
        let read = self.range_many_unbounded(shards, ids, request);
        kubeshard_shard_worker::deadline::bounded(shards.limit(), read)
            .await
            .unwrap_or_else(|_| Err(shard_status(kubeshard_shard_worker::ShardError::TimedOut)))
    }

    async fn range_many_unbounded(
        &self,
        shards: &Shards,
        ids: &[ShardId],
        request: &RangeRequest,
    ) -> Result<RangeResponse, Status> {
        let mut floor = shards.floor();
        if request.revision > floor {
            floor = shards.refresh().await.map_err(shard_status)?;
            if request.revision > floor {
                return Err(EtcdError::FutureRevision.into());
            }
        } else if request.revision <= 0 && !request.serializable {
            // A linearizable read must show every write acknowledged before
            // it, by any router: read at no less than the shards' counters,
            // and, with other routers, no less than every shard's (its
            // header then covers their writes elsewhere too, `peers.rs`).
            floor = if shards.peers().present() {
                shards.catch_up().await.map_err(shard_status)?;
                shards.floor()
            } else {
                shards.refresh_some(ids).await.map_err(shard_status)?
            };
        }
        let at = if request.revision > 0 {
            request.revision
        } else {
            floor
        };
        shards
            .raise_all(ids, floor.max(at))
            .await
            .map_err(shard_status)?;
        let mut per_shard = request.clone();
        per_shard.revision = at;
        let sort_target = SortTarget::try_from(request.sort_target).unwrap_or(SortTarget::Key);
        // Merging by value needs the values, even if the client wants none.
        if request.keys_only && sort_target == SortTarget::Value {
            per_shard.keys_only = false;
        }
        let reads = ids.iter().map(|id| {
            let per_shard = &per_shard;
            async move { (*id, shards.get(*id).store.range(per_shard).await) }
        });
        let mut answers = Vec::with_capacity(ids.len());
        for (id, answer) in join_all(reads).await {
            let answer = answer.map_err(shard_status)?;
            if let Some(h) = &answer.header {
                shards.observe(id, h.revision);
            }
            answers.push(answer);
        }
        let mut merged = merge_ranges(request, answers);
        // A read at the current revision answers with the revision it was
        // read at: a list at R then a watch from R+1 misses nothing.
        if request.revision <= 0 {
            merged.header = self.core.header(at);
        } else {
            self.core.fill(&mut merged.header);
        }
        Ok(merged)
    }

    /// The one shard of a Txn's keys, or etcd's answer for a Txn that
    /// spans shards.
    fn txn_shard(shards: &Shards, txn: &TxnRequest) -> Result<ShardId, Status> {
        let mut ids = BTreeSet::new();
        collect_txn_shards(shards, txn, &mut ids);
        let mut iter = ids.iter();
        match (iter.next(), iter.next()) {
            (None, _) => Ok(shards.default_id()),
            (Some(id), None) => Ok(*id),
            _ => Err(cross_shard_txn(&shards.names(&ids))),
        }
    }
}

/// Every shard a Txn's compares and operations touch.
fn collect_txn_shards(
    shards: &crate::shards::Shards,
    txn: &TxnRequest,
    ids: &mut BTreeSet<ShardId>,
) {
    for c in &txn.compare {
        ids.extend(shards.for_range(&c.key, &c.range_end));
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match &op.request {
            Some(Op::RequestRange(r)) => ids.extend(shards.for_range(&r.key, &r.range_end)),
            Some(Op::RequestPut(p)) => {
                ids.insert(shards.route(&p.key));
            }
            Some(Op::RequestDeleteRange(d)) => ids.extend(shards.for_range(&d.key, &d.range_end)),
            Some(Op::RequestTxn(t)) => collect_txn_shards(shards, t, ids),
            None => {}
        }
    }
}

/// etcd's order of a sorted range: the sort target, then key order for
/// ties (etcd sorts a key-ordered list stably), as the shards' SQL does.
fn range_order(request: &RangeRequest) -> impl Fn(&KeyValue, &KeyValue) -> Ordering {
    let target = SortTarget::try_from(request.sort_target).unwrap_or(SortTarget::Key);
    let order = SortOrder::try_from(request.sort_order).unwrap_or(SortOrder::None);
    move |a: &KeyValue, b: &KeyValue| {
        let by_target = match target {
            SortTarget::Key => Ordering::Equal,
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        match (order, target) {
            (SortOrder::Descend, SortTarget::Key) => b.key.cmp(&a.key),
            (SortOrder::Descend, _) => by_target.reverse().then_with(|| a.key.cmp(&b.key)),
            _ => by_target.then_with(|| a.key.cmp(&b.key)),
        }
    }
}

/// Merges the answers of several shards to one range, as one store would
/// have answered it: exact count, order, limit and `more`.
fn merge_ranges(request: &RangeRequest, answers: Vec<RangeResponse>) -> RangeResponse {
    // The lowest shard counter: every shard is at least there.
    let mut header: Option<i64> = None;
    let mut count = 0;
    let mut more = false;
    let mut kvs = Vec::new();
    for answer in answers {
        if let Some(h) = &answer.header {
            header = Some(header.map_or(h.revision, |r| r.min(h.revision)));
        }
        count += answer.count;
        more |= answer.more;
        kvs.extend(answer.kvs);
    }
    kvs.sort_by(range_order(request));
    if request.limit > 0 && kvs.len() as i64 > request.limit {
        kvs.truncate(request.limit as usize);
        more = true;
    }
    if request.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    RangeResponse {
        header: header.map(|revision| kubeshard_proto::etcdserverpb::ResponseHeader {
            revision,
            ..Default::default()
        }),
        kvs,
        more,
        count,
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!(
        "kubeshard: shard answered {what} with another response type"
    ))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let request = request.into_inner();
        self.core.limits.check_size(&request)?;
        validate::check_range(&request)?;
        let selected = !request.label_selector.is_empty() || !request.field_selector.is_empty();
        if selected {
            self.core
                .metrics
                .selected_requests
                .with_label_values(&["range"])
                .inc();
        }
        let mut response = on_topology!(self.core, |shards| async {
            let ids = shards.for_range(&request.key, &request.range_end);
            if selected {
                // Selected ranges read through the label index: keep it.
                for id in &ids {
                    shards.get(*id).labels.activate();
                }
            }
            shards.hold_off(&ids).await.map_err(shard_status)?;
            match ids.as_slice() {
                [id] => Self::range_one(shards, *id, &request).await,
                _ => self.range_many(shards, &ids, &request).await,
            }
        })?;
        self.core.fill(&mut response.header);
        Ok(Response::new(response))
    }

    type RangeStreamStream =
        futures::stream::BoxStream<'static, Result<RangeStreamResponse, Status>>;

    async fn range_stream(
        &self,
        _request: Request<RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(unimplemented(
            "KV.RangeStream",
            "use Range with limit and pagination",
        ))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let request = request.into_inner();
        self.core.limits.check_size(&request)?;
        validate::check_put(&request)?;
        let written = on_topology!(self.core, |shards| async {
            let id = shards.route(&request.key);
            Self::write(shards, id, WriteRequest::Put(request.clone())).await
        })?;
        match written {
            WriteResponse::Put(mut r) => {
                self.core.fill(&mut r.header);
                Ok(Response::new(r))
            }
            _ => Err(unexpected("Put")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let request = request.into_inner();
        self.core.limits.check_size(&request)?;
        validate::check_delete(&request)?;
        let mut merged = on_topology!(self.core, |shards| async {
            let ids = shards.for_range(&request.key, &request.range_end);
            shards.hold_off(&ids).await.map_err(shard_status)?;
            // A delete over several shards runs shard by shard, each
            // part with its own revision (there is no atomic commit
            // across databases; docs/topology.md). Its answer is the
            // sum of the parts.
            let mut merged = DeleteRangeResponse::default();
            for id in ids {
                match Self::write(shards, id, WriteRequest::DeleteRange(request.clone())).await? {
                    WriteResponse::DeleteRange(r) => {
                        merged.header = r.header;
                        merged.deleted += r.deleted;
                        merged.prev_kvs.extend(r.prev_kvs);
                    }
                    _ => return Err(unexpected("DeleteRange")),
                }
            }
            Ok(merged)
        })?;
        merged.prev_kvs.sort_by(|a, b| a.key.cmp(&b.key));
        self.core.fill(&mut merged.header);
        Ok(Response::new(merged))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let request = request.into_inner();
        self.core.limits.check_size(&request)?;
        validate::check_txn(&request, self.core.limits.max_txn_ops)?;
        let written = on_topology!(self.core, |shards| async {
            let id = Self::txn_shard(shards, &request)?;
            Self::write(shards, id, WriteRequest::Txn(request.clone())).await
        })?;
        match written {
            WriteResponse::Txn(mut r) => {
                self.core.fill(&mut r.header);
                Ok(Response::new(r))
            }
            _ => Err(unexpected("Txn")),
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let request = request.into_inner();
        let header =
            crate::compaction::compact(&self.core, request.revision, request.physical).await?;
        Ok(Response::new(CompactionResponse {
            header: self.core.header(header),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, version: i64, create: i64, modified: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            version,
            create_revision: create,
            mod_revision: modified,
            lease: 0,
        }
    }

    fn answer(revision: i64, kvs: Vec<KeyValue>, count: i64, more: bool) -> RangeResponse {
        RangeResponse {
            header: Some(kubeshard_proto::etcdserverpb::ResponseHeader {
                revision,
                ..Default::default()
            }),
            kvs,
            more,
            count,
        }
    }

    fn keys(r: &RangeResponse) -> Vec<String> {
        r.kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect()
    }

    #[test]
    fn merge_orders_by_key_and_applies_the_limit() {
        let request = RangeRequest {
            limit: 3,
            ..Default::default()
        };
        let merged = merge_ranges(
            &request,
            vec![
                answer(
                    9,
                    vec![
                        kv("a", "", 1, 2, 2),
                        kv("c", "", 1, 3, 3),
                        kv("e", "", 1, 4, 4),
                    ],
                    5,
                    true,
                ),
                answer(
                    7,
                    vec![kv("b", "", 1, 5, 5), kv("d", "", 1, 6, 6)],
                    2,
                    false,
                ),
            ],
        );
        assert_eq!(keys(&merged), ["a", "b", "c"]);
        assert_eq!(merged.count, 7);
        assert!(merged.more);
        assert_eq!(merged.header.map(|h| h.revision), Some(7));
    }

    #[test]
    fn merge_without_limit_has_no_more() {
        let request = RangeRequest::default();
        let merged = merge_ranges(
            &request,
            vec![
                answer(3, vec![kv("b", "", 1, 2, 2)], 1, false),
                answer(3, vec![kv("a", "", 1, 3, 3)], 1, false),
            ],
        );
        assert_eq!(keys(&merged), ["a", "b"]);
        assert!(!merged.more);
    }

    #[test]
    fn merge_sorts_like_the_shards() {
        let data = || {
            vec![
                answer(
                    9,
                    vec![kv("a", "z", 3, 2, 8), kv("c", "m", 1, 3, 3)],
                    2,
                    false,
                ),
                answer(
                    9,
                    vec![kv("b", "m", 3, 5, 5), kv("d", "a", 2, 6, 6)],
                    2,
                    false,
                ),
            ]
        };
        let sorted = |target: SortTarget, order: SortOrder, keys_only: bool| {
            let request = RangeRequest {
                sort_target: target as i32,
                sort_order: order as i32,
                keys_only,
                ..Default::default()
            };
            merge_ranges(&request, data())
        };
        let by_key_desc = sorted(SortTarget::Key, SortOrder::Descend, false);
        assert_eq!(keys(&by_key_desc), ["d", "c", "b", "a"]);
        // Ties on the target keep key order, ascending, in both directions.
        let by_version_desc = sorted(SortTarget::Version, SortOrder::Descend, false);
        assert_eq!(keys(&by_version_desc), ["a", "b", "d", "c"]);
        let by_value = sorted(SortTarget::Value, SortOrder::None, true);
        assert_eq!(keys(&by_value), ["d", "b", "c", "a"]);
        assert!(by_value.kvs.iter().all(|kv| kv.value.is_empty()));
        let by_mod_desc = sorted(SortTarget::Mod, SortOrder::Descend, false);
        assert_eq!(keys(&by_mod_desc), ["a", "d", "b", "c"]);
    }
}
