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
use std::sync::mpsc;
use std::time::Duration;

use async_trait::async_trait;
use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse};
use kubeshard_proto::mvccpb::KeyValue;
use rusqlite::{Connection, OpenFlags, params_from_iter};
use tokio::sync::oneshot;
use tracing::warn;

use super::sql::Statement;
use super::sqlite_reads::{kvs, params, range_in, revisions};
use super::write::{self, HistoryRow, TxOps};
use super::{CommittedBatch, LeaseRecord, RevisionClass, Revisions, WriteRequest, write_sql};
use crate::dialect::{self, Dialect};
use crate::error::{Result, ShardError};
use crate::keys::KeyRange;

/// Prepared statements kept by the writer connection (few shapes, see
/// `write_sql::shaped_chunks`).
const STATEMENT_CACHE: usize = 128;

const SQLITE: &dyn Dialect = &dialect::Sqlite;

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
    /// mode) and starts the thread that applies batches for revisions of
    /// `class`.
    pub(crate) fn start(path: &Path, class: RevisionClass) -> Result<Self> {
        let conn = open(path)?;
        let (jobs, queue) = mpsc::channel();
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || serve(conn, &path, class, &queue))
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
/// persistent in the file), a large page cache since it always writes, and
/// the statement journal of a multi-row INSERT in memory rather than in a
/// temporary file. The WAL is checkpointed by a background task (see
/// `connect.rs`); the writer's own checkpoint is only a safety net.
fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -131_072)?;
    conn.pragma_update(None, "wal_autocheckpoint", 20_000)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

fn serve(conn: Connection, path: &Path, class: RevisionClass, queue: &mpsc::Receiver<Job>) {
    let mut conn = Some(conn);
    while let Ok(job) = queue.recv() {
        let mut current = match conn.take() {
            Some(c) => c,
            None => match open(path) {
                Ok(c) => c,
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
            commit_on(&mut current, &job.batch, class, job.collect_events)
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
    class: RevisionClass,
    collect_events: bool,
) -> Result<CommittedBatch> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let mut ops = SqliteTx { conn: &mut *conn };
    // Every TxOps call below completes without waiting, so this future
    // finishes in one poll, on this thread.
    let applied =
        futures::executor::block_on(write::apply_batch(&mut ops, batch, class, collect_events));
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
        range_in(self.conn, request, &range, revs, None)
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
