//! Ranges of an SQLite shard, run on the calling thread.
//!
//! sqlx drives every SQLite connection from a worker thread of its own and
//! passes each statement, each row and each pool check across threads. For
//! a Get answered from SQLite's page cache in microseconds, those hand-offs
//! cost more than the read: perf on a server doing linearizable gets put
//! 42% of its time in context switches. Ranges (the path every Get and list
//! takes) therefore run here, synchronously, on connections of our own;
//! write batches have their own thread (`sqlite_writes.rs`); the watch
//! poller, leases and maintenance stay on sqlx.
//!
//! The SQL is the same as on the sqlx path (`range.rs` plans it for both),
//! so both paths answer alike. Only reads bounded by their limit run inline
//! (one key; a list page whose count is already known); the rest run under
//! `block_in_place` on a multi-threaded runtime, so a long read does not
//! hold up the other tasks of its worker thread.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse};
use kubeshard_proto::mvccpb::KeyValue;
use rusqlite::types::{ToSql, ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params_from_iter};

use super::Revisions;
use super::fence::Fence;
use super::label_index::Narrowing;
use super::page_counts::{PageCounts, is_page};
use super::range::{
    PLAIN_GET_EPOCH, PreparedRange, is_plain_get, plain_get_answer, plain_get_statement,
};
use super::statement::{Arg, Statement};
use crate::dialect;
use crate::error::{Result, ShardError};
use crate::keys::KeyRange;

/// Idle read connections kept per shard; more are opened on demand.
const MAX_IDLE: usize = 16;
/// Largest list page that may run inline when its count is known.
const INLINE_LIMIT: i64 = 1000;
/// Prepared statements kept per connection (the range shapes are few).
const STATEMENT_CACHE: usize = 64;

/// Read connections to one SQLite shard file.
pub(crate) struct SqliteReads {
    path: PathBuf,
    /// Shared with the store and its writer.
    fence: Arc<Fence>,
    idle: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for SqliteReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReads")
            .field("path", &self.path)
            .finish()
    }
}

/// A statement parameter, bound without copying.
pub(super) struct Param<'a>(Arg<'a>);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Arg::Int(v) => ToSqlOutput::Owned(Value::Integer(v)),
            Arg::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Arg::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        })
    }
}

pub(super) fn params<'s, 'a>(st: &'s Statement<'a>) -> impl Iterator<Item = Param<'a>> + 's {
    st.args.iter().map(|a| Param(*a))
}

/// (key, create, mod, version, lease, value) from column `at` on.
pub(super) fn kv_at(row: &Row<'_>, at: usize) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: row.get(at)?,
        create_revision: row.get(at + 1)?,
        mod_revision: row.get(at + 2)?,
        version: row.get(at + 3)?,
        lease: row.get(at + 4)?,
        value: row.get(at + 5)?,
    })
}

pub(super) fn kvs(conn: &Connection, st: &Statement<'_>) -> Result<Vec<KeyValue>> {
    let mut prepared = conn.prepare_cached(&st.text)?;
    let rows = prepared.query_map(params_from_iter(params(st)), |row| kv_at(row, 0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn revisions(conn: &Connection) -> Result<Revisions> {
    let mut st =
        conn.prepare_cached("SELECT revision, compact_revision, epoch FROM ks_meta WHERE id = 1")?;
    Ok(st.query_row([], |row| {
        Ok(Revisions {
            current: row.get(0)?,
            compacted: row.get(1)?,
            epoch: row.get(2)?,
        })
    })?)
}

/// Range inside an open transaction, against the given revisions (as
/// `SqlShard::range_in` on the sqlx path). `page_counts`: reads only.
pub(super) fn range_in(
    conn: &Connection,
    request: &RangeRequest,
    range: &KeyRange,
    revs: Revisions,
    page_counts: Option<&PageCounts>,
    narrowing: Option<&Narrowing>,
) -> Result<RangeResponse> {
    let prepared = PreparedRange::new(
        &dialect::Sqlite,
        request,
        revs,
        range,
        page_counts,
        narrowing,
    )?;
    let rows = match prepared.rows() {
        Some(st) => kvs(conn, st)?,
        None => Vec::new(),
    };
    let counted = match prepared.count() {
        Some(st) => {
            let mut count = conn.prepare_cached(&st.text)?;
            Some(count.query_row(params_from_iter(params(st)), |row| row.get::<_, i64>(0))?)
        }
        None => None,
    };
    Ok(prepared.answer(request, range, rows, counted, page_counts))
}

impl SqliteReads {
    /// Reads of the database file at `path`, which the sqlx pool has
    /// already created, migrated and put in WAL mode.
    pub(crate) fn new(path: PathBuf, fence: Arc<Fence>) -> Self {
        SqliteReads {
            path,
            fence,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn open(&self) -> Result<Connection> {
        // Read-write flags because a WAL reader updates the shared-memory
        // index; query_only keeps this connection from writing anything.
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "cache_size", -16384)?;
        conn.pragma_update(None, "query_only", true)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }

    /// Runs `read` on an idle connection (or a new one). A connection on
    /// which SQLite failed, or that is still inside a transaction (a
    /// rollback on drop that failed), is dropped: a reused one must never
    /// read an old snapshot.
    fn with_connection<T>(&self, read: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => self.open()?,
        };
        let result = read(&conn);
        if !matches!(result, Err(ShardError::Sqlite(_)))
            && conn.is_autocommit()
            && let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(conn);
        }
        result
    }

    /// Answers a Range, as `SqlShard::range` does on the sqlx path.
    pub(crate) fn range(
        &self,
        request: &RangeRequest,
        page_counts: &PageCounts,
        narrowing: Option<&Narrowing>,
    ) -> Result<RangeResponse> {
        // Inline only what is bounded by its limit: one key, or a list page
        // whose count is already known (no COUNT over the rest). A first
        // page's COUNT, other sort orders, filters and unlimited ranges may
        // scan the whole range.
        let range = KeyRange::new(&request.key, &request.range_end);
        let small = (matches!(range, KeyRange::Single(_)) && narrowing.is_none())
            || (is_page(request, &range)
                && request.limit <= INLINE_LIMIT
                && request.revision > 0
                && page_counts.get(&range, request.revision).is_some());
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if small || !multi_thread {
            self.range_now(request, &range, page_counts, narrowing)
        } else {
            tokio::task::block_in_place(|| self.range_now(request, &range, page_counts, narrowing))
        }
    }

    fn range_now(
        &self,
        request: &RangeRequest,
        range: &KeyRange,
        page_counts: &PageCounts,
        narrowing: Option<&Narrowing>,
    ) -> Result<RangeResponse> {
        if is_plain_get(request) && narrowing.is_none() {
            return self.plain_get(request);
        }
        self.with_connection(|conn| {
            // One deferred read transaction: one WAL snapshot for the
            // counter and every statement.
            let tx = conn.unchecked_transaction()?;
            let revs = revisions(&tx)?;
            self.fence.check(revs.epoch)?;
            let marked = match narrowing {
                Some(n) => {
                    let mark = tx
                        .query_row(super::label_index::READ_MARK, [], |row| row.get(0))
                        .optional()?;
                    Some(n.at(mark.unwrap_or(0)))
                }
                None => None,
            };
            let response = range_in(
                &tx,
                request,
                range,
                revs,
                Some(page_counts),
                marked.as_ref(),
            )?;
            tx.commit()?;
            Ok(response)
        })
    }

    /// A Get of one key at the current revision: one statement.
    fn plain_get(&self, request: &RangeRequest) -> Result<RangeResponse> {
        let st = plain_get_statement(&dialect::Sqlite, request);
        self.with_connection(|conn| {
            let mut prepared = conn.prepare_cached(&st.text)?;
            let (revision, epoch, kv) = prepared
                .query_row(params_from_iter(params(&st)), |row| {
                    let revision: i64 = row.get(0)?;
                    let epoch: i64 = row.get(PLAIN_GET_EPOCH)?;
                    let key: Option<Vec<u8>> = row.get(1)?;
                    let kv = match key {
                        Some(_) => Some(kv_at(row, 1)?),
                        None => None,
                    };
                    Ok((revision, epoch, kv))
                })
                .map_err(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => {
                        ShardError::Corrupt("ks_meta has no row".into())
                    }
                    other => other.into(),
                })?;
            self.fence.check(epoch)?;
            Ok(plain_get_answer(request, revision, kv))
        })
    }
}
