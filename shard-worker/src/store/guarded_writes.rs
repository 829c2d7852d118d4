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
//! Speculative batches skip the read: after a guarded batch commits, the
//! writer knows the counter row (revisions and version) and the live rows
//! of the keys the batch read or wrote ([`KnownState`]), and keys it does
//! not know are assumed absent (new keys: creates, and every key of
//! etcdctl's load). The next batch is computed from that, and its one
//! statement ([`write_sql::speculative_final`]) writes only if the counter
//! row's version is still the known one and each key's live row is the one
//! assumed; otherwise it writes nothing and answers what it saw, and the
//! batch is computed again from that and written guarded as above. So a
//! speculative batch commits exactly when a guarded batch that read the
//! same state would, and costs one round trip instead of two. A batch that
//! would read anything else (ranges, leases), or that writes nothing (its
//! answers would rest on the assumption alone), is not speculative.
//!
//! What a guarded batch cannot do, it hands back with
//! [`ShardError::NeedsLock`], and the caller runs the batch again under the
//! lock: when the guard fails (another router wrote), and when a request
//! must read the batch's own writes (a range after a write in the same
//! batch), which needs them written inside an open transaction. Batches with
//! lease or compaction requests always run under the lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse};
use kubeshard_proto::mvccpb::KeyValue;
use sqlx::{ColumnIndex, Connection, Database, Decode, Encode, Executor, IntoArguments, Row, Type};

use super::sql::SqlShard;
use super::sqlx_rows::{RowsAffected, kv_from_row};
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

/// Whether a batch that may run guarded is worth trying speculatively: a
/// small one (a large batch is not latency-bound, and would not fit one
/// statement) whose puts name no lease (leases are read).
pub(super) fn suits_speculation(batch: &[WriteRequest]) -> bool {
    batch.len() <= write_sql::EXACT_ROWS
        && batch.iter().all(|r| match r {
            WriteRequest::Put(p) => p.lease == 0,
            _ => true,
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

/// Speculative batches to skip after one found the database in another
/// state than assumed (keys that exist although unknown, or another
/// router's writes): such a batch sends its rows for nothing.
const ORDINARY_AFTER_WRONG_GUESS: u32 = 4;

/// Whether the next batch may be speculative.
#[derive(Debug, Default)]
pub(super) struct SpeculationPause {
    ordinary_batches_left: AtomicU32,
}

impl SpeculationPause {
    /// True if this batch may be speculative; counts down the pause otherwise.
    pub(super) fn take_turn(&self) -> bool {
        self.ordinary_batches_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err()
    }

    /// A speculative batch assumed wrong.
    pub(super) fn wrong(&self) {
        self.ordinary_batches_left
            .store(ORDINARY_AFTER_WRONG_GUESS, Ordering::Relaxed);
    }
}

/// Most key and value bytes [`KnownState`] keeps; past that it forgets
/// the keys (new keys are still assumed absent).
const KNOWN_BYTES: usize = 4 << 20;

/// What the writer knows of its shard after a guarded batch: valid while
/// the counter row's version is still `version`, that is, as long as
/// nobody else commits (every commit writes the counter row).
#[derive(Debug)]
pub(super) struct KnownState {
    revs: Revisions,
    version: String,
    /// Keys recent batches read or wrote: their live row, `None` for none.
    keys: HashMap<Vec<u8>, Option<KeyValue>>,
    /// Key and value bytes in `keys`.
    bytes: usize,
}

impl KnownState {
    fn new(revs: Revisions, version: String) -> Self {
        KnownState {
            revs,
            version,
            keys: HashMap::new(),
            bytes: 0,
        }
    }

    fn set(&mut self, key: &[u8], live: Option<&KeyValue>) {
        let size = |kv: &Option<KeyValue>| kv.as_ref().map_or(0, |kv| kv.value.len()) + key.len();
        let new = live.cloned();
        self.bytes += size(&new);
        if let Some(old) = self.keys.insert(key.to_vec(), new) {
            self.bytes = self.bytes.saturating_sub(size(&old));
        }
    }
}

/// The state a batch starts from: the counter row and the live rows of the
/// batch's keys, as one statement saw them.
#[derive(Debug)]
pub(super) struct Snapshot {
    revs: Revisions,
    version: String,
    live: Vec<KeyValue>,
}

/// Where a guarded batch's starting state comes from.
#[derive(Debug)]
pub(super) enum Start {
    /// Read from the database.
    Read,
    /// What a speculative statement that wrote nothing saw.
    Seen(Snapshot),
    /// Assumed from [`KnownState`], checked by the final statement.
    Assume,
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
    /// Where the start comes from (taken by `start`).
    start: Start,
    /// Whether the batch is speculative: it may not read.
    speculative: bool,
    /// What the writer knew before the batch.
    prior: Option<KnownState>,
    /// The batch's revisions, keys and their live rows at its start (keys
    /// and rows only for at most `EXACT_ROWS` keys).
    start_revs: Revisions,
    start_keys: Vec<Vec<u8>>,
    start_live: Vec<KeyValue>,
    /// What the writer knows after the batch, once it committed.
    learned: Option<KnownState>,
    /// What a speculative statement saw when it did not write.
    seen_instead: Option<Snapshot>,
}

impl<'t, 'k, DB: Database> GuardedTx<'t, 'k, DB> {
    /// A guarded batch starting from `start`; `prior` is what the writer
    /// knows (required to assume).
    pub(super) fn new(
        shard: &'t SqlShard<DB>,
        conn: &'k mut DB::Connection,
        version: &'static str,
        start: Start,
        prior: Option<KnownState>,
    ) -> Self {
        GuardedTx {
            shard,
            conn,
            version,
            seen: None,
            reads: 0,
            speculative: matches!(start, Start::Assume),
            start,
            prior,
            start_revs: Revisions {
                current: 0,
                compacted: 0,
                epoch: 0,
            },
            start_keys: Vec::new(),
            start_live: Vec::new(),
            learned: None,
            seen_instead: None,
        }
    }

    /// What the writer knows after the batch: `None` unless it committed
    /// by one guarded statement (or wrote nothing and read consistently).
    pub(super) fn learned(&mut self) -> Option<KnownState> {
        self.learned.take()
    }

    /// What the writer knew before the batch (still true if the batch did
    /// not commit).
    pub(super) fn take_prior(&mut self) -> Option<KnownState> {
        self.prior.take()
    }

    /// After a speculative statement that did not write: the state it saw.
    pub(super) fn seen_instead(&mut self) -> Option<Snapshot> {
        self.seen_instead.take()
    }

    /// A speculative batch refuses whatever needs more than its keys (it
    /// sends nothing before its one statement).
    fn may_read(&self) -> Result<()> {
        if self.speculative {
            return Err(ShardError::NotSpeculative {
                why: "the batch needs more than its keys' live rows",
                wrong: false,
            });
        }
        Ok(())
    }

    /// Records what is known once the batch's state is the database's at
    /// `version` (after its commit, or unchanged): what was known before if
    /// nothing else committed since, the keys it started from, its writes.
    fn learn(
        &mut self,
        version: String,
        revs: Revisions,
        upserts: &[&KeyValue],
        deletes: &[&[u8]],
    ) -> Result<()> {
        let seen = self.seen()?;
        let mut known = match self.prior.take() {
            Some(mut prior) if prior.version == seen => {
                prior.version = version;
                prior.revs = revs;
                prior
            }
            _ => KnownState::new(revs, version),
        };
        for key in &self.start_keys {
            let live = self.start_live.iter().find(|kv| &kv.key == key);
            known.set(key, live);
        }
        for kv in upserts {
            known.set(&kv.key, Some(kv));
        }
        for key in deletes {
            known.set(key, None);
        }
        if known.bytes > KNOWN_BYTES {
            known.keys.clear();
            known.bytes = 0;
        }
        self.learned = Some(known);
        Ok(())
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
    fn counter_row(&mut self, rows: &[DB::Row], at: usize) -> Result<Revisions> {
        let (revs, version) = counter_columns::<DB>(rows, at)?;
        self.seen = Some(version);
        Ok(revs)
    }
}

/// The counter row's revisions and version, from column `at` of the first
/// row.
fn counter_columns<DB>(rows: &[DB::Row], at: usize) -> Result<(Revisions, String)>
where
    DB: Database,
    i64: Type<DB> + for<'r> Decode<'r, DB>,
    String: Type<DB> + for<'r> Decode<'r, DB>,
    usize: ColumnIndex<DB::Row>,
{
    let row = rows
        .first()
        .ok_or_else(|| ShardError::Corrupt("ks_meta has no row".into()))?;
    let revs = Revisions {
        current: row.try_get(at)?,
        compacted: row.try_get(at + 1)?,
        epoch: row.try_get(at + 2)?,
    };
    Ok((revs, row.try_get(at + 3)?))
}

/// The live rows (from column `at` on) of rows that have one.
fn live_rows<DB>(rows: &[DB::Row], at: usize) -> Result<Vec<KeyValue>>
where
    DB: Database,
    i64: Type<DB> + for<'r> Decode<'r, DB>,
    Vec<u8>: Type<DB> + for<'r> Decode<'r, DB>,
    usize: ColumnIndex<DB::Row>,
    DB::QueryResult: RowsAffected,
{
    let mut live = Vec::with_capacity(rows.len());
    for row in rows {
        if row.try_get::<Option<Vec<u8>>, _>(at)?.is_some() {
            live.push(kv_from_row::<DB>(row, at)?);
        }
    }
    Ok(live)
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
        self.may_read()?;
        let st = write_sql::guarded_meta(self.dialect(), self.version);
        let rows = SqlShard::<DB>::fetch_all_in(&mut *self.conn, &st).await?;
        self.reads += 1;
        self.counter_row(&rows, 0)
    }

    async fn start(&mut self, keys: &[&[u8]]) -> Result<(Revisions, Vec<KeyValue>)> {
        let (revs, live) = match std::mem::replace(&mut self.start, Start::Read) {
            Start::Assume => {
                let Some(known) = &self.prior else {
                    return Err(ShardError::NotSpeculative {
                        why: "nothing is known",
                        wrong: false,
                    });
                };
                self.seen = Some(known.version.clone());
                // Unknown keys are assumed absent; the statement checks.
                let live: Vec<KeyValue> = keys
                    .iter()
                    .filter_map(|key| known.keys.get(*key).cloned().flatten())
                    .collect();
                (known.revs, live)
            }
            Start::Seen(snapshot) => {
                self.seen = Some(snapshot.version);
                self.reads += 1;
                (snapshot.revs, snapshot.live)
            }
            Start::Read => match write_sql::guarded_start(self.dialect(), self.version, keys) {
                None => write::start_separately(self, keys).await?,
                Some(st) => {
                    let rows = SqlShard::<DB>::fetch_all_in(&mut *self.conn, &st).await?;
                    self.reads += 1;
                    let revs = self.counter_row(&rows, 0)?;
                    (revs, live_rows::<DB>(&rows, 4)?)
                }
            },
        };
        self.start_revs = revs;
        // Kept to learn from and to check a speculation, which only small
        // batches do: a large batch's rows are not copied. (What it
        // writes is still learned; what it only read was not changed.)
        if keys.len() <= write_sql::EXACT_ROWS {
            self.start_keys = keys.iter().map(|key| key.to_vec()).collect();
            self.start_live.clone_from(&live);
        }
        Ok((revs, live))
    }

    async fn set_revisions(&mut self, _revs: Revisions) -> Result<()> {
        self.may_read()?;
        needs_lock("the counter is written by the final statement")
    }

    async fn live_get(&mut self, keys: &[&[u8]]) -> Result<Vec<KeyValue>> {
        self.may_read()?;
        let statements = write_sql::live_get(self.dialect(), keys);
        self.reads += statements.len();
        SqlShard::<DB>::kvs_in(&mut *self.conn, &statements).await
    }

    async fn live_in_range(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        self.may_read()?;
        let st = write_sql::live_in_range(self.dialect(), range);
        self.reads += 1;
        SqlShard::<DB>::kvs_in(&mut *self.conn, &[st]).await
    }

    async fn live_with_lease(&mut self, lease: i64) -> Result<Vec<KeyValue>> {
        self.may_read()?;
        let st = write_sql::live_with_lease(self.dialect(), lease);
        self.reads += 1;
        SqlShard::<DB>::kvs_in(&mut *self.conn, &[st]).await
    }

    async fn range(&mut self, request: &RangeRequest, revs: Revisions) -> Result<RangeResponse> {
        self.may_read()?;
        // Two statements at most (rows, count); counted as two reads.
        self.reads += 2;
        self.shard
            .range_in(&mut *self.conn, request, revs, None, None)
            .await
    }

    async fn write_history(&mut self, _rows: &[HistoryRow]) -> Result<()> {
        self.may_read()?;
        needs_lock("a request reads the batch's own writes")
    }

    async fn write_live(&mut self, _upserts: &[&KeyValue], _deletes: &[&[u8]]) -> Result<()> {
        self.may_read()?;
        needs_lock("a request reads the batch's own writes")
    }

    async fn leases_existing(&mut self, ids: &[i64]) -> Result<Vec<i64>> {
        self.may_read()?;
        let statements = write_sql::leases_existing(self.dialect(), ids);
        self.reads += statements.len();
        SqlShard::<DB>::ints_in(&mut *self.conn, &statements).await
    }

    async fn lease_insert(&mut self, _lease: LeaseRecord) -> Result<()> {
        self.may_read()?;
        needs_lock("leases are written under the lock")
    }

    async fn lease_delete(&mut self, _id: i64) -> Result<()> {
        self.may_read()?;
        needs_lock("leases are written under the lock")
    }

    async fn lease_deadline(&mut self, id: i64) -> Result<Option<i64>> {
        self.may_read()?;
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
            if self.speculative {
                // Its answers would rest on the assumption alone.
                return Err(ShardError::NotSpeculative {
                    why: "the batch writes nothing",
                    wrong: false,
                });
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
            return self.learn(seen, self.start_revs, &[], &[]);
        };
        if self.speculative {
            return self
                .write_speculative(&seen, history, upserts, deletes, revs)
                .await;
        }
        if let Some(st) =
            write_sql::guarded_final(d, self.version, &seen, history, upserts, deletes, revs)
        {
            // Its own transaction: sent, it may commit.
            crate::deadline::committing();
            let rows = SqlShard::<DB>::fetch_all_in(&mut *self.conn, &st).await?;
            return match &rows[..] {
                [row] => self.learn(row.try_get(0)?, revs, upserts, deletes),
                [] => contended(),
                _ => Err(ShardError::Corrupt(format!(
                    "{} counter rows in ks_meta",
                    rows.len()
                ))),
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
        crate::deadline::committing();
        tx.commit().await?;
        Ok(())
    }
}

impl<DB> GuardedTx<'_, '_, DB>
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
    /// The final statement of a speculative batch: written if the database
    /// is as assumed; otherwise what it saw is kept for the batch's rerun.
    async fn write_speculative(
        &mut self,
        seen: &str,
        history: &[HistoryRow],
        upserts: &[&KeyValue],
        deletes: &[&[u8]],
        revs: Revisions,
    ) -> Result<()> {
        let expected: Vec<(&[u8], Option<i64>)> = self
            .start_keys
            .iter()
            .map(|key| {
                let live = self.start_live.iter().find(|kv| &kv.key == key);
                (key.as_slice(), live.map(|kv| kv.mod_revision))
            })
            .collect();
        let Some(st) = write_sql::speculative_final(
            self.dialect(),
            self.version,
            seen,
            &expected,
            history,
            upserts,
            deletes,
            revs,
        ) else {
            return Err(ShardError::NotSpeculative {
                why: "the batch is too large for one statement",
                wrong: false,
            });
        };
        // Its own transaction: sent, it may commit.
        crate::deadline::committing();
        let rows = SqlShard::<DB>::fetch_all_in(&mut *self.conn, &st).await?;
        let written: Option<String> = match rows.first() {
            Some(row) => row.try_get(0)?,
            None => return Err(ShardError::Corrupt("ks_meta has no row".into())),
        };
        if let Some(version) = written {
            return self.learn(version, revs, upserts, deletes);
        }
        let (revs, version) = counter_columns::<DB>(&rows, 1)?;
        self.seen_instead = Some(Snapshot {
            revs,
            version,
            live: live_rows::<DB>(&rows, 5)?,
        });
        Err(ShardError::NotSpeculative {
            why: "the database was not in the assumed state",
            wrong: true,
        })
    }
}
