//! Storage of one shard behind a small trait.
//!
//! The data model (see docs/architecture.md):
//! - `ks_meta`: one row holding the last revision handed out and the
//!   compaction revision; write transactions lock it, so commit order is
//!   revision order and a rolled-back write consumes no revision;
//! - `ks_history`: every change, append-only until compaction, keyed by
//!   (revision, sub) and indexed by (key, revision);
//! - `ks_live`: the newest row of every existing key, maintained in the same
//!   transaction, so reads at the current revision cost O(keys in range);
//! - `ks_lease`: leases with absolute deadlines (they survive restarts).

mod bounded;
mod bulk_sql;
pub mod fence;
mod guarded_writes;
mod label_index;
mod observed;
mod page_counts;
mod pool_use;
mod range;
mod selection;
mod sql;
mod sqlite_reads;
mod sqlite_writes;
mod sqlx_rows;
mod statement;
mod write;
mod write_sql;

use async_trait::async_trait;
use kubeshard_proto::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    TxnRequest, TxnResponse,
};
use kubeshard_proto::mvccpb::Event;

use crate::error::Result;
use crate::keys::KeyRange;

pub use bounded::{Bounded, late_batch};
pub use bulk_sql::SqlBulk;
pub use label_index::{LabelChange, LabelIndexOutcome};
pub use observed::Observed;
pub use pool_use::Connections;
pub use sql::SqlShard;
pub(crate) use sqlite_reads::SqliteReads;
pub(crate) use sqlite_writes::SqliteWriter;
pub use write::{CommittedBatch, HistoryRow, WritePath};

/// The revision counter and compaction mark of a shard, read together,
/// with the topology version the database is fenced at (`fence.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revisions {
    pub current: i64,
    pub compacted: i64,
    /// `ks_meta.epoch`: 0 until a topology change fences the database.
    /// Only read; writes of the counter leave it alone.
    pub epoch: i64,
}

/// The revisions a shard hands out: those congruent to `offset` modulo
/// `stride`. With one shard every revision is its own (stride 1); with n
/// shards, shard i takes i, i+n, i+2n, ... so that no two shards ever give
/// the same revision to different writes (invariant 1 of revisions.md)
/// without asking anyone: each shard's counter row stays its own lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevisionClass {
    stride: i64,
    offset: i64,
}

impl RevisionClass {
    /// Every revision: a topology of one shard.
    pub const ALL: RevisionClass = RevisionClass {
        stride: 1,
        offset: 0,
    };

    /// The class of shard `index` among `shards`; None unless index < shards.
    pub fn of_shard(index: usize, shards: usize) -> Option<RevisionClass> {
        if index >= shards {
            return None;
        }
        Some(RevisionClass {
            stride: i64::try_from(shards).ok()?,
            offset: i64::try_from(index).ok()?,
        })
    }

    /// The smallest revision of this class above `revision`.
    pub fn next_after(&self, revision: i64) -> i64 {
        let candidate = revision + 1;
        candidate + (self.offset - candidate).rem_euclid(self.stride)
    }

    pub fn stride(&self) -> i64 {
        self.stride
    }

    pub fn offset(&self) -> i64 {
        self.offset
    }
}

/// A request that goes through the shard's write path (the writer actor).
#[derive(Debug, Clone)]
pub enum WriteRequest {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    LeaseGrant {
        id: i64,
        ttl: i64,
        now_ms: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    /// Revokes the lease only if it is still expired at `now_ms` (a KeepAlive
    /// may have renewed it since it was found).
    LeaseExpire {
        id: i64,
        now_ms: i64,
    },
    /// Marks revisions below `revision` as compacted.
    Compact {
        revision: i64,
    },
    /// Raises the shard's revision counter to at least `floor`, writing
    /// nothing else: every later write of the shard then gets a revision
    /// above `floor`. This is how shards that are written rarely keep up
    /// with the others in one revision space (the floor of revisions.md).
    Bump {
        floor: i64,
    },
}

/// The answer to a [`WriteRequest`]; every variant carries the revision the
/// shard is at after the request.
#[derive(Debug, Clone)]
pub enum WriteResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    LeaseGrant { id: i64, ttl: i64, revision: i64 },
    LeaseRevoke { revision: i64 },
    LeaseExpire { expired: bool, revision: i64 },
    Compact { revision: i64 },
    Bump { revision: i64 },
}

impl WriteResponse {
    /// The revision the shard is at after the request.
    pub fn revision(&self) -> i64 {
        let header = |h: &Option<kubeshard_proto::etcdserverpb::ResponseHeader>| {
            h.as_ref().map_or(0, |h| h.revision)
        };
        match self {
            WriteResponse::Put(r) => header(&r.header),
            WriteResponse::DeleteRange(r) => header(&r.header),
            WriteResponse::Txn(r) => header(&r.header),
            WriteResponse::LeaseGrant { revision, .. }
            | WriteResponse::LeaseRevoke { revision }
            | WriteResponse::LeaseExpire { revision, .. }
            | WriteResponse::Compact { revision }
            | WriteResponse::Bump { revision } => *revision,
        }
    }
}

/// Events read from a shard's history, in revision order.
#[derive(Debug, Clone, Default)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Every event with a revision at or below this one has been read
    /// (`events` holds those above the requested start).
    pub closed: i64,
    /// More events were there beyond `closed` than one page holds.
    pub more: bool,
}

/// One lease as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: i64,
    pub ttl: i64,
    pub expires_at_ms: i64,
}

/// Everything the router and the shard actor need from a shard's database.
#[async_trait]
pub trait ShardStore: Send + Sync + std::fmt::Debug + 'static {
    /// The dialect's name, for logs.
    fn backend(&self) -> &'static str;

    /// How busy the shard's connection pools are, where there are pools.
    fn connections(&self) -> Option<Connections> {
        None
    }

    /// The topology version and revision class this process serves the
    /// database with (`fence.rs`).
    fn serving(&self) -> fence::Serving;

    /// Serves topology `version`, handing out `class`: the database may be
    /// fenced up to that version. Never goes back.
    fn serve(&self, version: i64, class: RevisionClass);

    /// Counter and compaction mark in one snapshot; TopologyChanged if the
    /// database is fenced ahead of what this process serves.
    async fn revisions(&self) -> Result<Revisions>;

    /// A Range request, answered from one snapshot; the header revision is the
    /// shard's counter in that snapshot.
    async fn range(&self, request: &RangeRequest) -> Result<RangeResponse>;

    /// Applies a batch of writes in one database transaction, each write with
    /// its own revision, and commits it. The outer error fails the whole
    /// batch (nothing of it was committed); the inner ones are per request.
    /// With `collect_events`, the outcome also holds the batch's watch events.
    async fn commit_batch(
        &self,
        batch: &[WriteRequest],
        collect_events: bool,
    ) -> Result<CommittedBatch>;

    /// [`ShardStore::commit_batch`] without the events.
    async fn apply_batch(&self, batch: &[WriteRequest]) -> Result<Vec<Result<WriteResponse>>> {
        Ok(self.commit_batch(batch, false).await?.responses)
    }

    /// Events with revisions in (after, closed], at most about `max_events`
    /// (whole revisions are never split), in revision order, with prev_kv.
    async fn poll_events(&self, after: i64, max_events: usize) -> Result<EventPage>;

    /// Events of `range` with revisions in [from, to], at most about
    /// `max_events` (whole revisions are never split), for watch catch-up;
    /// Compacted if `from` is below the compaction revision.
    async fn history(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        max_events: usize,
    ) -> Result<EventPage>;

    /// Brings the label index (`label_index.rs`) from its mark up to `to`
    /// with the final state of every key changed in revisions (from, to],
    /// if its mark is in [from, to); otherwise reports where it is.
    async fn index_labels(
        &self,
        from: i64,
        to: i64,
        changes: &[LabelChange],
    ) -> Result<LabelIndexOutcome>;

    /// Physically deletes history made unreachable by compaction at `upto`,
    /// `batch` revisions per statement. Returns the rows removed.
    async fn purge_compacted(&self, upto: i64, batch: i64) -> Result<u64>;

    /// Extends a lease that has not expired yet; its TTL, or None if unknown.
    async fn lease_renew(&self, id: i64, now_ms: i64) -> Result<Option<i64>>;
    async fn lease_get(&self, id: i64) -> Result<Option<LeaseRecord>>;
    async fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>>;
    async fn lease_list(&self) -> Result<Vec<i64>>;
    async fn expired_leases(&self, now_ms: i64, limit: i64) -> Result<Vec<i64>>;

    /// Takes or extends a named lock held in the database until `now_ms + hold_ms`.
    async fn try_lock(&self, name: &str, owner: &str, now_ms: i64, hold_ms: i64) -> Result<bool>;

    /// Size of the database in bytes.
    async fn db_size(&self) -> Result<i64>;

    /// Gives unused space back to the file system where the database can.
    async fn defragment(&self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::RevisionClass;

    #[test]
    fn one_shard_hands_out_every_revision() {
        let all = RevisionClass::ALL;
        assert_eq!(all.next_after(1), 2);
        assert_eq!(all.next_after(41), 42);
    }

    #[test]
    fn shards_hand_out_disjoint_increasing_revisions() {
        let classes: Vec<RevisionClass> = (0..3)
            .filter_map(|i| RevisionClass::of_shard(i, 3))
            .collect();
        assert_eq!(classes.len(), 3);
        assert_eq!(classes[0].next_after(1), 3);
        assert_eq!(classes[1].next_after(1), 4);
        assert_eq!(classes[2].next_after(1), 2);
        assert_eq!(classes[1].next_after(4), 7);
        let mut seen = std::collections::HashSet::new();
        for class in &classes {
            let mut r = 1;
            for _ in 0..100 {
                let next = class.next_after(r);
                assert!(next > r && next - r <= 3, "{class:?} after {r}: {next}");
                assert!(seen.insert(next), "{next} handed out twice");
                r = next;
            }
        }
        assert_eq!(RevisionClass::of_shard(3, 3), None);
    }
}
