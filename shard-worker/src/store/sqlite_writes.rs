//! Write batches of an SQLite shard, run on a thread that owns the writer
//! connection.
//!
//! On sqlx every statement of a batch crossed from the batch's task to
//! sqlx's SQLite thread and back: about eight round trips per batch, each
//! a pair of thread wake-ups. Under load those took longer than SQLite's
//! own work: 1.9 ms per batch of six puts in the server, against 0.6 ms for
//! the same statements run directly. Here the whole batch (BEGIN IMMEDIATE,
//! the statements of `write_sql.rs`, COMMIT) runs on this thread: one
//! hand-off per batch. The SQL and the batch logic (`write.rs`) are the
//! ones every backend uses; only the driver differs.

use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse};
use kubeshard_proto::mvccpb::KeyValue;
use rusqlite::{Connection, OpenFlags, params_from_iter};
use tokio::sync::oneshot;
use tracing::warn;

use super::fence::{Fence, Serving};
use super::sqlite_reads::{kvs, params, range_in, revisions};
use super::statement::Statement;
use super::write::{self, HistoryRow, TxOps};
use super::{CommittedBatch, LeaseRecord, Revisions, WriteRequest, write_sql};
use crate::dialect::{self, Dialect};
use crate::error::{Result, ShardError};
use crate::keys::KeyRange;

/// Prepared statements kept by the writer connection (few shapes, see
/// `write_sql::shaped_chunks`).
const STATEMENT_CACHE: usize = 128;

const SQLITE: &dyn Dialect = &dialect::Sqlite;

/// The writer's page cache (KiB) while the database is smaller than 1 GiB.
/// Below that size a B-tree split renumbers pages through the number of
/// SQLite's lock page (the page at byte offset 1 GiB), which leaves the
/// cache's highest page number above the database size, and the commit
/// after it scans the whole cache (`pcache1TruncateUnsafe`). With 128 MiB
/// of cache that scan took 8-25% of the writer thread under etcdctl's load
/// l, and a 4 MiB cache gave 12% more writes/s (docs/benchmarks.md). A
/// database that small stays in the OS page cache, so misses cost a copy.
const SMALL_DB_CACHE_KIB: i64 = 4 << 10;
/// The writer's page cache (KiB) once the database is larger: no more
/// scans, and a large database's B-tree interiors stay in the cache.
const LARGE_DB_CACHE_KIB: i64 = 128 << 10;
/// Where the lock page is, and so where the scans stop.
const LOCK_PAGE_OFFSET: i64 = 1 << 30;
/// The writer's auto-checkpoint threshold in WAL frames (pages). Under
/// etcdctl's load l, 100,000 instead of 20,000 cut the commits stalled over
/// 20 ms from about 118 to 37 per minute and gave 5596/5572 instead of
/// 5161/5387 writes/s (docs/benchmarks.md).
const WAL_FRAMES_BEFORE_RESTART: i64 = 100_000;
/// Batches between checks of the database size.
const CACHE_CHECK_EVERY: u32 = 64;

/// Sizes the writer's page cache to the database (see [`SMALL_DB_CACHE_KIB`]).
struct CacheSizer {
    batches: u32,
    /// What the connection's cache is set to.
    kib: i64,
}

impl CacheSizer {
    fn new() -> Self {
        CacheSizer {
            batches: 0,
            kib: SMALL_DB_CACHE_KIB,
        }
    }

    fn cache_kib(db_bytes: i64) -> i64 {
        if db_bytes < LOCK_PAGE_OFFSET {
            SMALL_DB_CACHE_KIB
        } else {
            LARGE_DB_CACHE_KIB
        }
    }

    /// After a batch: every [`CACHE_CHECK_EVERY`] batches, resizes the
    /// cache if the database crossed 1 GiB (either way: VACUUM shrinks it).
    fn after_batch(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        self.batches = self.batches.wrapping_add(1);
        if self.batches % CACHE_CHECK_EVERY != 1 {
            return Ok(());
        }
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let kib = Self::cache_kib(pages.saturating_mul(page_size));
        if kib != self.kib {
            conn.pragma_update(None, "cache_size", -kib)?;
            self.kib = kib;
        }
        Ok(())
    }
}

/// A batch for the writer thread and where its result goes.
struct Job {
    batch: Vec<WriteRequest>,
    collect_events: bool,
    reply: oneshot::Sender<Result<CommittedBatch>>,
}

/// The writer thread of one SQLite shard file. The thread ends when this
/// handle is dropped (its queue closes).
pub(crate) struct SqliteWriter {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for SqliteWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteWriter").finish_non_exhaustive()
    }
}

impl SqliteWriter {
    /// Opens the writer connection to `path` (already created and in WAL
    /// mode) and starts the thread that applies batches as `fence` says
    /// (topology version and revision class, taken per batch).
    pub(crate) fn start(path: &Path, fence: Arc<Fence>) -> Result<Self> {
        let conn = open(path)?;
        let (jobs, queue) = mpsc::channel();
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || serve(conn, &path, &fence, &queue))
            .map_err(|e| ShardError::Stopped(format!("sqlite writer thread did not start: {e}")))?;
        Ok(SqliteWriter { jobs })
    }

    /// Applies `batch` in one transaction and returns what it did.
    pub(crate) async fn commit(
        &self,
        batch: &[WriteRequest],
        collect_events: bool,
    ) -> Result<CommittedBatch> {
        let (reply, answer) = oneshot::channel();
        let stopped = || ShardError::Stopped("sqlite writer thread".into());
        // The thread runs the batch to its end, whether or not the caller
        // still waits: once handed over, it may commit.
        crate::deadline::committing();
        self.jobs
            .send(Job {
                batch: batch.to_vec(),
                collect_events,
                reply,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The writer connection: durable commits (synchronous=FULL; WAL mode is
/// persistent in the file), a page cache sized by [`CacheSizer`], and
/// the statement journal of a multi-row INSERT in memory rather than in a
/// temporary file. The WAL is checkpointed by a background task (see
/// `connect.rs`). The writer's own checkpoint is what lets the WAL start
/// over (SQLite restarts it only after a checkpoint that leaves nothing to
/// copy, which the background one never manages while the writer writes),
/// and it stalls the commit it runs in for tens of milliseconds; at
/// [`WAL_FRAMES_BEFORE_RESTART`] frames it runs a fifth as often as at
/// 20,000, for a WAL file of up to about 400 MiB under steady writes.
fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -SMALL_DB_CACHE_KIB)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_FRAMES_BEFORE_RESTART)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

fn serve(conn: Connection, path: &Path, fence: &Fence, queue: &mpsc::Receiver<Job>) {
    let mut conn = Some(conn);
    let mut cache = CacheSizer::new();
    while let Ok(job) = queue.recv() {
        let mut current = match conn.take() {
            Some(c) => c,
            None => match open(path) {
                Ok(c) => {
                    cache = CacheSizer::new();
                    c
                }
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                    continue;
                }
            },
        };
        // A panic in one batch (a bug) fails that batch and replaces the
        // connection, instead of ending the thread and with it every later
        // write of the shard.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            commit_on(
                &mut current,
                &job.batch,
                fence.serving(),
                job.collect_events,
            )
        }))
        .unwrap_or_else(|_| {
            // Rolled back when the connection is dropped below.
            Err(ShardError::Corrupt(
                "the sqlite writer panicked on this batch".into(),
            ))
        });
        // A connection that SQLite failed on, or that is still inside a
        // transaction, is replaced: the next batch starts clean.
        if matches!(result, Err(ShardError::Sqlite(_) | ShardError::Corrupt(_)))
            || !current.is_autocommit()
        {
            warn!(path = %path.display(), "sqlite writer connection replaced after an error");
        } else {
            if let Err(e) = cache.after_batch(&current) {
                // The cache size is only about speed; the next check retries.
                warn!(error = %e, "sqlite writer could not size its page cache");
            }
            conn = Some(current);
        }
        // The batch's task may be gone (its request cancelled); nothing to do.
        let _ = job.reply.send(result);
    }
}

/// One transaction: all of the batch or, on an error, none of it.
fn commit_on(
    conn: &mut Connection,
    batch: &[WriteRequest],
    serving: Serving,
    collect_events: bool,
) -> Result<CommittedBatch> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let mut ops = SqliteTx { conn: &mut *conn };
    // Every TxOps call below completes without waiting, so this future
    // finishes in one poll, on this thread.
    let applied =
        futures::executor::block_on(write::apply_batch(&mut ops, batch, serving, collect_events));
    let committed = applied.and_then(|c| {
        conn.execute_batch("COMMIT")?;
        Ok(c)
    });
    if committed.is_err() && !conn.is_autocommit() {
        // A failed rollback leaves the connection in a transaction, which
        // the caller notices and replaces.
        let _ = conn.execute_batch("ROLLBACK");
    }
    committed
}

/// A write transaction on the writer connection.
struct SqliteTx<'c> {
    conn: &'c mut Connection,
}

impl SqliteTx<'_> {
    fn execute(&self, st: &Statement<'_>) -> Result<usize> {
        let mut prepared = self.conn.prepare_cached(&st.text)?;
        Ok(prepared.execute(params_from_iter(params(st)))?)
    }

    fn ints(&self, st: &Statement<'_>) -> Result<Vec<i64>> {
        let mut prepared = self.conn.prepare_cached(&st.text)?;
        let rows = prepared.query_map(params_from_iter(params(st)), |row| row.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<i64>>>()?)
    }
}

#[async_trait]
impl TxOps for SqliteTx<'_> {
    fn max_key_len(&self) -> Option<usize> {
        SQLITE.max_key_len()
    }

    fn backend(&self) -> &'static str {
        SQLITE.name()
    }

    async fn lock_meta(&mut self) -> Result<Revisions> {
        // BEGIN IMMEDIATE already holds SQLite's write lock.
        revisions(self.conn)
    }

    async fn set_revisions(&mut self, revs: Revisions) -> Result<()> {
        self.execute(&write_sql::set_revisions(SQLITE, revs))?;
        Ok(())
    }

    async fn live_get(&mut self, keys: &[&[u8]]) -> Result<Vec<KeyValue>> {
        let mut out = Vec::with_capacity(keys.len());
        for st in write_sql::live_get(SQLITE, keys) {
            out.extend(kvs(self.conn, &st)?);
        }
        Ok(out)
    }

    async fn live_in_range(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        kvs(self.conn, &write_sql::live_in_range(SQLITE, range))
    }

    async fn live_with_lease(&mut self, lease: i64) -> Result<Vec<KeyValue>> {
        kvs(self.conn, &write_sql::live_with_lease(SQLITE, lease))
    }

    async fn range(&mut self, request: &RangeRequest, revs: Revisions) -> Result<RangeResponse> {
        let range = KeyRange::new(&request.key, &request.range_end);
        range_in(self.conn, request, &range, revs, None, None)
    }

    async fn write_history(&mut self, rows: &[HistoryRow]) -> Result<()> {
        for st in write_sql::write_history(SQLITE, rows) {
            self.execute(&st)?;
        }
        Ok(())
    }

    async fn write_live(&mut self, upserts: &[&KeyValue], deletes: &[&[u8]]) -> Result<()> {
        for st in write_sql::write_live(SQLITE, upserts, deletes) {
            self.execute(&st)?;
        }
        Ok(())
    }

    async fn leases_existing(&mut self, ids: &[i64]) -> Result<Vec<i64>> {
        let mut out = Vec::new();
        for st in write_sql::leases_existing(SQLITE, ids) {
            out.extend(self.ints(&st)?);
        }
        Ok(out)
    }

    async fn lease_insert(&mut self, lease: LeaseRecord) -> Result<()> {
        self.execute(&write_sql::lease_insert(SQLITE, lease))?;
        Ok(())
    }

    async fn lease_delete(&mut self, id: i64) -> Result<()> {
        self.execute(&write_sql::lease_delete(SQLITE, id))?;
        Ok(())
    }

    async fn lease_deadline(&mut self, id: i64) -> Result<Option<i64>> {
        Ok(self
            .ints(&write_sql::lease_deadline(SQLITE, id))?
            .into_iter()
            .next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_small_until_the_lock_page() {
        assert_eq!(CacheSizer::cache_kib(0), SMALL_DB_CACHE_KIB);
        assert_eq!(
            CacheSizer::cache_kib(LOCK_PAGE_OFFSET - 4096),
            SMALL_DB_CACHE_KIB
        );
        assert_eq!(CacheSizer::cache_kib(LOCK_PAGE_OFFSET), LARGE_DB_CACHE_KIB);
        // SQLite's lock page is at 1 GiB whatever the page size.
        assert_eq!(LOCK_PAGE_OFFSET, 0x4000_0000);
    }

    #[test]
    fn sizer_sets_the_connection_cache() {
        let Ok(conn) = Connection::open_in_memory() else {
            panic!("in-memory sqlite");
        };
        let Ok(()) = conn.pragma_update(None, "cache_size", -LARGE_DB_CACHE_KIB) else {
            panic!("set cache_size");
        };
        let mut sizer = CacheSizer {
            batches: 0,
            kib: LARGE_DB_CACHE_KIB,
        };
        let Ok(()) = sizer.after_batch(&conn) else {
            panic!("size the cache");
        };
        let Ok(kib) = conn.query_row("PRAGMA cache_size", [], |r| r.get::<_, i64>(0)) else {
            panic!("read cache_size");
        };
        assert_eq!(
            kib, -SMALL_DB_CACHE_KIB,
            "a small database gets the small cache"
        );
        assert_eq!(sizer.kib, SMALL_DB_CACHE_KIB);
    }
}
