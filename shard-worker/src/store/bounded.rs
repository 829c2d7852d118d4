//! Every database call of a shard within `--datastore-timeout`: a decorator
//! around any [`ShardStore`] (`deadline.rs` says how a late call is dropped
//! and its connections closed).
//!
//! A read that passes the deadline fails with [`ShardError::TimedOut`]. A
//! write batch fails with `TimedOut` if it had not sent its commit, and with
//! [`ShardError::CommitUnknown`] if it had; the writer bounds batches more
//! tightly still, by the deadlines of their requests (`writer.rs`). The
//! other writes (lease renewals, locks, purges, label index runs) do not
//! mark their commit and so report `CommitUnknown` when late: each is
//! repeated or superseded by the next one, but none is said not to have
//! happened.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse};

use super::{
    CommittedBatch, Connections, EventPage, LabelChange, LabelIndexOutcome, LeaseRecord, Revisions,
    ShardStore, WriteRequest,
};
use crate::deadline::{self, Elapsed};
use crate::error::{Result, ShardError};
use crate::keys::KeyRange;

/// A Defragment rewrites the whole database: it gets this many times the
/// limit of other calls.
const DEFRAGMENT_FACTOR: u32 = 20;

#[derive(Debug)]
pub struct Bounded {
    inner: Arc<dyn ShardStore>,
    limit: Duration,
}

impl Bounded {
    pub fn wrap(store: Arc<dyn ShardStore>, limit: Duration) -> Arc<dyn ShardStore> {
        Arc::new(Bounded {
            inner: store,
            limit,
        })
    }

    /// A call that reads only: nothing of it takes effect when it is late.
    async fn read<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        deadline::bounded(self.limit, call)
            .await
            .unwrap_or(Err(ShardError::TimedOut))
    }

    /// A call that writes and does not mark its commit.
    async fn write<T>(&self, limit: Duration, call: impl Future<Output = Result<T>>) -> Result<T> {
        deadline::bounded(limit, call)
            .await
            .unwrap_or(Err(ShardError::CommitUnknown))
    }
}

/// What a late write batch tells its requests.
pub fn late_batch(elapsed: Elapsed) -> ShardError {
    if elapsed.committing {
        ShardError::CommitUnknown
    } else {
        ShardError::TimedOut
    }
}

#[async_trait]
impl ShardStore for Bounded {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn connections(&self) -> Option<Connections> {
        self.inner.connections()
    }

    fn serving(&self) -> super::fence::Serving {
        self.inner.serving()
    }

    fn serve(&self, version: i64, class: super::RevisionClass) {
        self.inner.serve(version, class);
    }

    async fn revisions(&self) -> Result<Revisions> {
        self.read(self.inner.revisions()).await
    }

    async fn range(&self, request: &RangeRequest) -> Result<RangeResponse> {
        self.read(self.inner.range(request)).await
    }

    async fn commit_batch(
        &self,
        batch: &[WriteRequest],
        collect_events: bool,
    ) -> Result<CommittedBatch> {
        let call = self.inner.commit_batch(batch, collect_events);
        deadline::bounded(self.limit, call)
            .await
            .unwrap_or_else(|elapsed| Err(late_batch(elapsed)))
    }

    async fn poll_events(&self, after: i64, max_events: usize) -> Result<EventPage> {
        self.read(self.inner.poll_events(after, max_events)).await
    }

    async fn history(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        max_events: usize,
    ) -> Result<EventPage> {
        self.read(self.inner.history(range, from, to, max_events))
            .await
    }

    async fn index_labels(
        &self,
        from: i64,
        to: i64,
        changes: &[LabelChange],
    ) -> Result<LabelIndexOutcome> {
        let call = self.inner.index_labels(from, to, changes);
        self.write(self.limit, call).await
    }

    async fn purge_compacted(&self, upto: i64, batch: i64) -> Result<u64> {
        let call = self.inner.purge_compacted(upto, batch);
        self.write(self.limit, call).await
    }

    async fn lease_renew(&self, id: i64, now_ms: i64) -> Result<Option<i64>> {
        self.write(self.limit, self.inner.lease_renew(id, now_ms))
            .await
    }

    async fn lease_get(&self, id: i64) -> Result<Option<LeaseRecord>> {
        self.read(self.inner.lease_get(id)).await
    }

    async fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        self.read(self.inner.lease_keys(id)).await
    }

    async fn lease_list(&self) -> Result<Vec<i64>> {
        self.read(self.inner.lease_list()).await
    }

    async fn expired_leases(&self, now_ms: i64, limit: i64) -> Result<Vec<i64>> {
        self.read(self.inner.expired_leases(now_ms, limit)).await
    }

    async fn try_lock(&self, name: &str, owner: &str, now_ms: i64, hold_ms: i64) -> Result<bool> {
        let call = self.inner.try_lock(name, owner, now_ms, hold_ms);
        self.write(self.limit, call).await
    }

    async fn db_size(&self) -> Result<i64> {
        self.read(self.inner.db_size()).await
    }

    async fn defragment(&self) -> Result<()> {
        let limit = self.limit.saturating_mul(DEFRAGMENT_FACTOR);
        self.write(limit, self.inner.defragment()).await
    }
}
