//! Guarded write batches (PostgreSQL): read without the revision lock, then
//! write everything in one statement that commits only if nothing was
//! committed since the reads.
//!
//! Why: under the lock a small batch costs five round trips (BEGIN, lock and
//! read the counter, read the keys, write, COMMIT), and a batch's latency is
//! what a shard's commit rate, and so etcdctl's paced load, depends on.
//! Guarded, it costs two: one statement reads the counter row and the keys,
//! one statement writes, and that statement is its own transaction.
//!
//! Why the answers are still those of the lock: every writer of a shard, in
//! any router, writes the counter row (`ks_meta`) in the transaction that
//! changes anything (a lease grant or revoke included, see `write.rs`), and
//! every write changes the row's version ([`Dialect::meta_version`]: a new
//! row version carries its writer's transaction id). The write statement
//! updates the counter only where the version is still the one read at the
//! start; that update takes the row lock and, if another transaction
//! committed meanwhile, sees the newer row and matches nothing. Every part of
//! the statement writes only if the update matched. So a guarded batch
//! commits only if every row it read is still current, the same outcome as
//! holding the lock from the start, and commit order stays revision order.
//!
//! What a guarded batch cannot do, it hands back with
//! [`ShardError::NeedsLock`], and the caller runs the batch again under the
//! lock: when the guard fails (another router wrote), and when a request
//! must read the batch's own writes (a range after a write in the same
//! batch), which needs them written inside an open transaction. Batches with
//! lease or compaction requests always run under the lock.

use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse};
use kubeshard_proto::mvccpb::KeyValue;
use sqlx::{ColumnIndex, Connection, Database, Decode, Encode, Executor, IntoArguments, Row, Type};

use super::sql::{RowsAffected, SqlShard, kv_from_row};
use super::write::{self, HistoryRow, TxOps};
use super::write_sql;
use super::{LeaseRecord, Revisions, WriteRequest};
use crate::dialect::Dialect;
use crate::error::{Result, ShardError};
use crate::keys::KeyRange;

/// Whether a batch may run guarded: only requests whose writes are all
/// buffered until the end of the batch (leases and compaction write as they
/// go, so they take the lock).
pub(super) fn suits_guarded(batch: &[WriteRequest]) -> bool {
    batch.iter().all(|r| {
        matches!(
            r,
            WriteRequest::Put(_)
                | WriteRequest::DeleteRange(_)
                | WriteRequest::Txn(_)
                | WriteRequest::Bump { .. }
        )
    })
}

/// Locked batches to run after a guard failed before trying guarded again.
/// A failed guard means another router writes this shard too; while it
/// does, most guarded batches would fail and cost their round trips twice.
const LOCKED_AFTER_CONTENTION: u32 = 64;

/// Whether the next batch may try the guarded path: not for a while after
/// a guard failed.
#[derive(Debug, Default)]
pub(super) struct GuardPause {
    locked_batches_left: AtomicU32,
}

impl GuardPause {
    /// True if this batch may run guarded; counts down the pause otherwise.
    pub(super) fn take_turn(&self) -> bool {
        self.locked_batches_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err()
    }

    /// A guard failed: run the next batches under the lock.
    pub(super) fn contended(&self) {
        self.locked_batches_left
            .store(LOCKED_AFTER_CONTENTION, Ordering::Relaxed);
    }
}

/// A write batch reading outside any transaction, written by one guarded
/// statement at the end.
pub(super) struct GuardedTx<'t, 'k, DB: Database> {
    shard: &'t SqlShard<DB>,
    conn: &'k mut DB::Connection,
    /// The dialect's expression for the counter row's version.
    version: &'static str,
    /// The version the batch read at its start.
    seen: Option<String>,
    /// Statements that read: with more than one, a batch that writes
    /// nothing still checks that they all saw the same state.
    reads: usize,
}

impl<'t, 'k, DB: Database> GuardedTx<'t, 'k, DB> {
    pub(super) fn new(
        shard: &'t SqlShard<DB>,
        conn: &'k mut DB::Connection,
        version: &'static str,
    ) -> Self {
        GuardedTx {
            shard,
            conn,
            version,
            seen: None,
            reads: 0,
        }
    }

    fn dialect(&self) -> &'static dyn Dialect {
        self.shard.dialect()
    }

    fn seen(&self) -> Result<String> {
        self.seen.clone().ok_or_else(|| {
            ShardError::Corrupt("guarded batch wrote before reading the counter".into())
        })
    }
}

impl<DB> GuardedTx<'_, '_, DB>
where
    DB: Database,
    i64: Type<DB> + for<'r> Decode<'r, DB>,
    String: Type<DB> + for<'r> Decode<'r, DB>,
    usize: ColumnIndex<DB::Row>,
{
    /// The revisions of the counter row that starts `rows`, remembering its
    /// version for the guard.
    fn counter_row(&mut self, rows: &[DB::Row]) -> Result<Revisions> {
        let row = rows
            .first()
            .ok_or_else(|| ShardError::Corrupt("ks_meta has no row".into()))?;
        self.seen = Some(row.try_get(2)?);
        Ok(Revisions {
            current: row.try_get(0)?,
            compacted: row.try_get(1)?,
        })
    }
}

/// What a guarded batch cannot do.
fn needs_lock<T>(why: &'static str) -> Result<T> {
    Err(ShardError::NeedsLock {
        why,
        contended: false,
    })
}

/// Another writer committed since the batch read.
fn contended<T>() -> Result<T> {
    Err(ShardError::NeedsLock {
        why: "another writer committed while the batch read",
        contended: true,
    })
}

#[async_trait]
impl<'t, 'k, DB> TxOps for GuardedTx<'t, 'k, DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB>,
    i64: Type<DB> + for<'r> Decode<'r, DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    Vec<u8>: Type<DB> + for<'r> Decode<'r, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    String: Type<DB> + for<'r> Decode<'r, DB>,
    usize: ColumnIndex<DB::Row>,
    DB::QueryResult: RowsAffected,
{
    fn max_key_len(&self) -> Option<usize> {
        self.dialect().max_key_len()
    }

    fn backend(&self) -> &'static str {
        self.dialect().name()
    }

    async fn lock_meta(&mut self) -> Result<Revisions> {
        let st = write_sql::guarded_meta(self.dialect(), self.version);
        let rows = SqlShard::<DB>::fetch_all_in(&mut *self.conn, &st).await?;
        self.reads += 1;
        self.counter_row(&rows)
    }

    async fn start(&mut self, keys: &[&[u8]]) -> Result<(Revisions, Vec<KeyValue>)> {
        let Some(st) = write_sql::guarded_start(self.dialect(), self.version, keys) else {
            return write::start_separately(self, keys).await;
        };
        let rows = SqlShard::<DB>::fetch_all_in(&mut *self.conn, &st).await?;
        self.reads += 1;
        let revs = self.counter_row(&rows)?;
        let mut live = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<Vec<u8>>, _>(3)?.is_some() {
                live.push(kv_from_row::<DB>(row, 3)?);
            }
        }
        Ok((revs, live))
    }

    async fn set_revisions(&mut self, _revs: Revisions) -> Result<()> {
        needs_lock("the counter is written by the final statement")
    }

    async fn live_get(&mut self, keys: &[&[u8]]) -> Result<Vec<KeyValue>> {
        let statements = write_sql::live_get(self.dialect(), keys);
        self.reads += statements.len();
        SqlShard::<DB>::kvs_in(&mut *self.conn, &statements).await
    }

    async fn live_in_range(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        let st = write_sql::live_in_range(self.dialect(), range);
        self.reads += 1;
        SqlShard::<DB>::kvs_in(&mut *self.conn, &[st]).await
    }

    async fn live_with_lease(&mut self, lease: i64) -> Result<Vec<KeyValue>> {
        let st = write_sql::live_with_lease(self.dialect(), lease);
        self.reads += 1;
        SqlShard::<DB>::kvs_in(&mut *self.conn, &[st]).await
    }

    async fn range(&mut self, request: &RangeRequest, revs: Revisions) -> Result<RangeResponse> {
        // Two statements at most (rows, count); counted as two reads.
        self.reads += 2;
        self.shard
            .range_in(&mut *self.conn, request, revs, None)
            .await
    }

    async fn write_history(&mut self, _rows: &[HistoryRow]) -> Result<()> {
        needs_lock("a request reads the batch's own writes")
    }

    async fn write_live(&mut self, _upserts: &[&KeyValue], _deletes: &[&[u8]]) -> Result<()> {
        needs_lock("a request reads the batch's own writes")
    }

    async fn leases_existing(&mut self, ids: &[i64]) -> Result<Vec<i64>> {
        let statements = write_sql::leases_existing(self.dialect(), ids);
        self.reads += statements.len();
        SqlShard::<DB>::ints_in(&mut *self.conn, &statements).await
    }

    async fn lease_insert(&mut self, _lease: LeaseRecord) -> Result<()> {
        needs_lock("leases are written under the lock")
    }

    async fn lease_delete(&mut self, _id: i64) -> Result<()> {
        needs_lock("leases are written under the lock")
    }

    async fn lease_deadline(&mut self, id: i64) -> Result<Option<i64>> {
        let st = write_sql::lease_deadline(self.dialect(), id);
        self.reads += 1;
        Ok(SqlShard::<DB>::ints_in(&mut *self.conn, &[st])
            .await?
            .first()
            .copied())
    }

    async fn write_final(
        &mut self,
        history: &[HistoryRow],
        upserts: &[&KeyValue],
        deletes: &[&[u8]],
        revs: Option<Revisions>,
    ) -> Result<()> {
        let d = self.dialect();
        let seen = self.seen()?;
        let Some(revs) = revs else {
            if !history.is_empty() || !upserts.is_empty() || !deletes.is_empty() {
                return Err(ShardError::Corrupt(
                    "a batch wrote rows without using a revision".into(),
                ));
            }
            // Nothing to write. Reads in one statement saw one snapshot;
            // reads in several must not straddle another writer's commit.
            if self.reads > 1 {
                let st = write_sql::meta_unchanged(d, self.version, &seen);
                if SqlShard::<DB>::fetch_all_in(&mut *self.conn, &st)
                    .await?
                    .is_empty()
                {
                    return contended();
                }
            }
            return Ok(());
        };
        if let Some(st) =
            write_sql::guarded_final(d, self.version, &seen, history, upserts, deletes, revs)
        {
            let rows = SqlShard::<DB>::fetch_all_in(&mut *self.conn, &st).await?;
            let written: i64 = match rows.first() {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            return match written {
                1 => Ok(()),
                0 => contended(),
                n => Err(ShardError::Corrupt(format!("{n} counter rows in ks_meta"))),
            };
        }
        // Too large for one statement: a transaction that starts with the
        // guarded counter update (taking the lock), then the rows.
        let mut tx = self.conn.begin().await?;
        let st = write_sql::guarded_set_revisions(d, self.version, &seen, revs);
        if SqlShard::<DB>::execute_in(&mut tx, &st).await? != 1 {
            tx.rollback().await?;
            return contended();
        }
        for st in write_sql::write_history(d, history) {
            SqlShard::<DB>::execute_in(&mut tx, &st).await?;
        }
        for st in write_sql::write_live(d, upserts, deletes) {
            SqlShard::<DB>::execute_in(&mut tx, &st).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
