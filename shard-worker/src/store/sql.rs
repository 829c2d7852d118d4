//! The SQL implementation of [`ShardStore`], generic over sqlx's typed pools.
//!
//! All sqlx trait bounds live on the two impl blocks below; the dialect
//! supplies the SQL text, so SQLite, PostgreSQL and MySQL share this code.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse};
use kubeshard_proto::mvccpb::{Event, KeyValue, event::EventType};
use sqlx::{
    ColumnIndex, Connection, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type,
};

use super::fence::{Fence, Serving};
use super::guarded_writes::{self, GuardPause, GuardedTx, KnownState, SpeculationPause, Start};
use super::label_index::{self, LabelChange, LabelIndexOutcome, Narrowing};
use super::page_counts::PageCounts;
use super::pool_use::{Connections, Held, PoolUse};
use super::range::{
    PLAIN_GET_EPOCH, PreparedRange, is_plain_get, plain_get_answer, plain_get_statement,
};
use super::selection::SelectedRange;
use super::sqlite_reads::SqliteReads;
use super::sqlite_writes::SqliteWriter;
use super::sqlx_rows::{RowsAffected, bound, kv_from_row};
use super::statement::{Arg, Statement};
use super::write::{self, HistoryRow, TxOps};
use super::write_sql;
use super::{
    CommittedBatch, EventPage, LeaseRecord, RevisionClass, Revisions, ShardStore, WritePath,
    WriteRequest,
};
use crate::dialect::Dialect;
use crate::error::{Result, ShardError};
use crate::keys::KeyRange;

/// One shard's database: typed connection pools and the dialect.
pub struct SqlShard<DB: Database> {
    /// Reads and the small writes that bypass the writer (lease renewals,
    /// locks, compaction purges).
    pool: Pool<DB>,
    /// The writer actor's own connection: one batch is in flight at a time,
    /// and a connection that always writes keeps its page cache warm.
    write_pool: Pool<DB>,
    /// That connection, held between batches. sqlx pings a pooled
    /// connection when it goes back to the pool and again when it is taken:
    /// two round trips per batch, which the one-connection pool made the
    /// next batch wait for. Dropped after a database error (the pool then
    /// checks it and opens a new one if it is broken).
    /// Taken out for each batch: a batch abandoned at its deadline drops
    /// (closes) it.
    write_conn: tokio::sync::Mutex<Option<Held<DB>>>,
    dialect: &'static dyn Dialect,
    /// The topology version served and the revisions this shard hands out.
    fence: Arc<Fence>,
    /// Counts of list continuations, learnt from the pages before them.
    page_counts: PageCounts,
    /// SQLite only: ranges run on the calling thread (`sqlite_reads.rs`).
    direct_reads: Option<SqliteReads>,
    /// SQLite only: write batches run on a thread of their own
    /// (`sqlite_writes.rs`) instead of on `write_pool`.
    direct_writes: Option<SqliteWriter>,
    /// When guarded batches wait after a failed guard.
    guard_pause: GuardPause,
    /// Skips speculative batches for a while after one assumed wrong.
    speculation_pause: SpeculationPause,
    /// What the writer knows after its last guarded batch, for the next
    /// one to speculate from (`guarded_writes.rs`). Only the writer, under
    /// `write_conn`, uses it.
    known: std::sync::Mutex<Option<KnownState>>,
    /// Calls waiting for a connection (the dashboard's pool panel).
    pool_use: PoolUse,
}

impl<DB: Database> fmt::Debug for SqlShard<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlShard")
            .field("dialect", &self.dialect.name())
            .finish()
    }
}

impl<DB: Database> SqlShard<DB> {
    pub(super) fn dialect(&self) -> &'static dyn Dialect {
        self.dialect
    }

    /// A connection of the read pool, counted while it is waited for.
    async fn acquire(&self) -> std::result::Result<Held<DB>, sqlx::Error> {
        self.pool_use.acquire(&self.pool).await
    }
}

/// A write transaction holding the shard's revision lock.
struct SqlTx<'t, 'k, DB: Database> {
    shard: &'t SqlShard<DB>,
    tx: sqlx::Transaction<'k, DB>,
}

impl<DB> SqlShard<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB>,
    i64: Type<DB> + for<'r> Decode<'r, DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    Vec<u8>: Type<DB> + for<'r> Decode<'r, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
    DB::QueryResult: RowsAffected,
{
    /// Wraps the pools; call [`SqlShard::migrate`] before use.
    pub fn new(
        pool: Pool<DB>,
        write_pool: Pool<DB>,
        dialect: &'static dyn Dialect,
        fence: Arc<Fence>,
    ) -> Self {
        SqlShard {
            pool,
            write_pool,
            write_conn: tokio::sync::Mutex::new(None),
            dialect,
            fence,
            page_counts: PageCounts::default(),
            direct_reads: None,
            direct_writes: None,
            guard_pause: GuardPause::default(),
            speculation_pause: SpeculationPause::default(),
            known: std::sync::Mutex::new(None),
            pool_use: PoolUse::default(),
        }
    }

    /// Keeps at most `max_idle` idle connections in the pools
    /// (`--datastore-max-idle-connections`), and none that was not needed
    /// over `max_idle_time` (`--datastore-connection-max-idle-time`;
    /// `pool_use.rs`).
    pub fn with_idle_limits(
        mut self,
        max_idle: usize,
        max_idle_time: Option<std::time::Duration>,
    ) -> Self {
        self.pool_use = PoolUse::new(max_idle, max_idle_time);
        self
    }

    /// Runs ranges through `reads` instead of the pool (SQLite: no thread
    /// hand-off per statement and per row).
    pub(crate) fn with_direct_reads(mut self, reads: SqliteReads) -> Self {
        self.direct_reads = Some(reads);
        self
    }

    /// Runs write batches through `writes` instead of `write_pool` (SQLite:
    /// one thread hand-off per batch instead of one per statement).
    pub(crate) fn with_direct_writes(mut self, writes: SqliteWriter) -> Self {
        self.direct_writes = Some(writes);
        self
    }

    /// Creates the schema when missing and checks its version.
    pub async fn migrate(&self) -> Result<i64> {
        let mut conn = self.acquire().await?;
        for ddl in self.dialect.schema() {
            sqlx::query(ddl).execute(&mut *conn).await?;
        }
        let row = sqlx::query("SELECT schema_version FROM ks_meta WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
        let mut version: i64 = row.try_get(0)?;
        if version == 2 {
            version = self.upgrade_from_2(&mut conn).await?;
        }
        if version == 3 {
            version = self.upgrade_from_3(&mut conn).await?;
        }
        if version != crate::dialect::SCHEMA_VERSION {
            return Err(ShardError::Corrupt(format!(
                "schema version {version} in the database, this kubeshard knows {}",
                crate::dialect::SCHEMA_VERSION
            )));
        }
        Ok(version)
    }

    /// Version 2 to 3: drops the history index by key, which nothing reads
    /// any more (every write paid a random index page for it). Routers that
    /// start together may race here: the drop is skipped once the index is
    /// gone, and the version only moves from 2 to 3.
    async fn upgrade_from_2(&self, conn: &mut DB::Connection) -> Result<i64> {
        let row = sqlx::query(self.dialect.history_key_index_count())
            .fetch_one(&mut *conn)
            .await?;
        let present: i64 = row.try_get(0)?;
        if present > 0 {
            tracing::info!("schema version 2: dropping the history index ks_history_key");
            if let Err(e) = sqlx::query(self.dialect.drop_history_key_index())
                .execute(&mut *conn)
                .await
            {
                // Another router may have dropped it first.
                let row = sqlx::query(self.dialect.history_key_index_count())
                    .fetch_one(&mut *conn)
                    .await?;
                if row.try_get::<i64, _>(0)? > 0 {
                    return Err(e.into());
                }
            }
        }
        Self::upgraded(conn, 2).await
    }

    /// Version 3 to 4: `ks_meta.epoch`, the topology version the database
    /// is fenced at (`fence.rs`). Routers that start together may race: the
    /// column is added once, and the version only moves from 3 to 4.
    async fn upgrade_from_3(&self, conn: &mut DB::Connection) -> Result<i64> {
        let present = sqlx::query("SELECT epoch FROM ks_meta WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await
            .is_ok();
        if !present {
            tracing::info!("schema version 3: adding ks_meta.epoch");
            if let Err(e) =
                sqlx::query("ALTER TABLE ks_meta ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0")
                    .execute(&mut *conn)
                    .await
            {
                // Another router may have added it first.
                if sqlx::query("SELECT epoch FROM ks_meta WHERE id = 1")
                    .fetch_optional(&mut *conn)
                    .await
                    .is_err()
                {
                    return Err(e.into());
                }
            }
        }
        Self::upgraded(conn, 3).await
    }

    /// Moves the schema version from `from` to the next, only from there
    /// (routers that start together may upgrade at once), and reads the
    /// version that stands.
    async fn upgraded(conn: &mut DB::Connection, from: i64) -> Result<i64> {
        let update = format!(
            "UPDATE ks_meta SET schema_version = {} WHERE id = 1 AND schema_version = {from}",
            from + 1
        );
        sqlx::query(&update).execute(&mut *conn).await?;
        let row = sqlx::query("SELECT schema_version FROM ks_meta WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
        Ok(row.try_get(0)?)
    }

    fn statement<'a>(&self, text: impl Into<String>) -> Statement<'a> {
        Statement::new(self.dialect, text)
    }

    /// The statement as a sqlx query with its parameters bound.
    fn query<'q>(st: &'q Statement<'q>) -> sqlx::query::Query<'q, DB, DB::Arguments<'q>> {
        bound(st)
    }

    pub(super) async fn fetch_all_in(
        conn: &mut DB::Connection,
        st: &Statement<'_>,
    ) -> Result<Vec<DB::Row>> {
        Ok(Self::query(st).fetch_all(&mut *conn).await?)
    }

    /// Key-values (from column 0 on) of every statement, in order.
    pub(super) async fn kvs_in(
        conn: &mut DB::Connection,
        statements: &[Statement<'_>],
    ) -> Result<Vec<KeyValue>> {
        let mut out = Vec::new();
        for st in statements {
            for row in Self::fetch_all_in(conn, st).await? {
                out.push(kv_from_row::<DB>(&row, 0)?);
            }
        }
        Ok(out)
    }

    /// The first column of every row of every statement, in order.
    pub(super) async fn ints_in(
        conn: &mut DB::Connection,
        statements: &[Statement<'_>],
    ) -> Result<Vec<i64>> {
        let mut out = Vec::new();
        for st in statements {
            for row in Self::fetch_all_in(conn, st).await? {
                out.push(row.try_get(0)?);
            }
        }
        Ok(out)
    }

    pub(super) async fn execute_in(conn: &mut DB::Connection, st: &Statement<'_>) -> Result<u64> {
        Ok(Self::query(st).execute(&mut *conn).await?.rows())
    }

    /// The counter row, refused if the database is fenced ahead of us.
    async fn read_revisions(&self, conn: &mut DB::Connection) -> Result<Revisions> {
        let row = sqlx::query("SELECT revision, compact_revision, epoch FROM ks_meta WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
        let revs = Revisions {
            current: row.try_get(0)?,
            compacted: row.try_get(1)?,
            epoch: row.try_get(2)?,
        };
        self.fence.check(revs.epoch)?;
        Ok(revs)
    }

    /// A Get of one key at the current revision without filters, the most
    /// common read (kube-apiserver's Get): one statement reads the key's
    /// live row and the counter together. A single statement sees one
    /// snapshot on every backend, so the header is the counter of the
    /// snapshot the row comes from, as in a transaction, in one round trip
    /// instead of four (BEGIN, counter, row, COMMIT).
    async fn plain_get(&self, request: &RangeRequest) -> Result<RangeResponse> {
        let st = plain_get_statement(self.dialect, request);
        let mut conn = self.acquire().await?;
        let rows = Self::fetch_all_in(&mut conn, &st).await?;
        let row = rows
            .first()
            .ok_or_else(|| ShardError::Corrupt("ks_meta has no row".into()))?;
        let revision: i64 = row.try_get(0)?;
        self.fence.check(row.try_get(PLAIN_GET_EPOCH)?)?;
        let key: Option<Vec<u8>> = row.try_get(1)?;
        let kv = match key {
            Some(_) => Some(kv_from_row::<DB>(row, 1)?),
            None => None,
        };
        Ok(plain_get_answer(request, revision, kv))
    }

    /// Range inside an open transaction, against the given revisions.
    /// `page_counts` (reads only, not inside a write's transaction) may
    /// supply and learn the counts of list continuations.
    pub(super) async fn range_in(
        &self,
        conn: &mut DB::Connection,
        request: &RangeRequest,
        revs: Revisions,
        page_counts: Option<&PageCounts>,
        narrowing: Option<&Narrowing>,
    ) -> Result<RangeResponse> {
        let range = KeyRange::new(&request.key, &request.range_end);
        let prepared =
            PreparedRange::new(self.dialect, request, revs, &range, page_counts, narrowing)?;
        let mut kvs = Vec::new();
        if let Some(st) = prepared.rows() {
            for row in Self::fetch_all_in(conn, st).await? {
                kvs.push(kv_from_row::<DB>(&row, 0)?);
            }
        }
        let mut counted = None;
        if let Some(st) = prepared.count() {
            let rows = Self::fetch_all_in(conn, st).await?;
            if let Some(row) = rows.first() {
                counted = Some(row.try_get(0)?);
            }
        }
        Ok(prepared.answer(request, &range, kvs, counted, page_counts))
    }

    async fn events_in(
        conn: &mut DB::Connection,
        st: &Statement<'_>,
    ) -> Result<Vec<(i64, i64, Event)>> {
        let rows = Self::fetch_all_in(conn, st).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let revision: i64 = row.try_get(0)?;
            let sub: i64 = row.try_get(1)?;
            let key: Vec<u8> = row.try_get(2)?;
            let deleted: i64 = row.try_get(3)?;
            let kv = if deleted != 0 {
                KeyValue {
                    key,
                    mod_revision: revision,
                    ..Default::default()
                }
            } else {
                KeyValue {
                    key,
                    create_revision: row.try_get(4)?,
                    mod_revision: revision,
                    version: row.try_get(5)?,
                    lease: row.try_get(6)?,
                    value: row.try_get(7)?,
                }
            };
            let prev_revision: Option<i64> = row.try_get(8)?;
            let prev_deleted: Option<i64> = row.try_get(9)?;
            let prev_kv = match (prev_revision, prev_deleted) {
                (Some(prev_rev), Some(0)) => Some(KeyValue {
                    key: kv.key.clone(),
                    create_revision: row.try_get::<Option<i64>, _>(10)?.unwrap_or_default(),
                    mod_revision: prev_rev,
                    version: row.try_get::<Option<i64>, _>(11)?.unwrap_or_default(),
                    lease: row.try_get::<Option<i64>, _>(12)?.unwrap_or_default(),
                    value: row.try_get::<Option<Vec<u8>>, _>(13)?.unwrap_or_default(),
                }),
                _ => None,
            };
            let r#type = if deleted != 0 {
                EventType::Delete
            } else {
                EventType::Put
            };
            out.push((
                revision,
                sub,
                Event {
                    r#type: r#type as i32,
                    kv: Some(kv),
                    prev_kv,
                },
            ));
        }
        Ok(out)
    }

    /// Events of revisions [first, to] (of `range`, if given) in revision
    /// order, and the revision up to which they are complete: at most about
    /// `max_events`, never splitting a revision (a single revision larger
    /// than that is read whole).
    async fn events_page(
        &self,
        conn: &mut DB::Connection,
        first: i64,
        to: i64,
        range: Option<&KeyRange>,
        max_events: usize,
    ) -> Result<(Vec<Event>, i64)> {
        let mut st = self.events_select();
        st.sql("h.revision >= ")
            .int(first)
            .sql(" AND h.revision <= ")
            .int(to);
        if let Some(range) = range {
            st.sql(" AND ");
            st.key_in("h.key_bytes", range);
        }
        st.sql(" ORDER BY h.revision, h.sub LIMIT ")
            .int(max_events as i64 + 1);
        let mut rows = Self::events_in(conn, &st).await?;
        let mut closed = to;
        if rows.len() > max_events {
            // The last revision may be cut short: close below it, unless it
            // is the only one, in which case read that revision whole.
            let last = rows.last().map_or(first, |r| r.0);
            let only = rows.first().map_or(first, |r| r.0) == last;
            if only {
                let mut st = self.events_select();
                st.sql("h.revision = ").int(last);
                if let Some(range) = range {
                    st.sql(" AND ");
                    st.key_in("h.key_bytes", range);
                }
                st.sql(" ORDER BY h.sub");
                rows = Self::events_in(conn, &st).await?;
                closed = last;
            } else {
                rows.retain(|r| r.0 < last);
                closed = last - 1;
            }
        }
        Ok((rows.into_iter().map(|r| r.2).collect(), closed))
    }

    /// The SELECT of history events joined with each event's previous row.
    fn events_select(&self) -> Statement<'static> {
        self.statement(
            "SELECT h.revision, h.sub, h.key_bytes, h.deleted, h.create_revision, h.version, \
             h.lease, h.value_bytes, p.revision, p.deleted, p.create_revision, p.version, \
             p.lease, p.value_bytes \
             FROM ks_history h LEFT JOIN ks_history p \
             ON p.key_bytes = h.key_bytes AND p.revision = h.prev_revision AND p.deleted = 0 WHERE ",
        )
    }
}

#[async_trait]
impl<'t, 'k, DB> TxOps for SqlTx<'t, 'k, DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB>,
    i64: Type<DB> + for<'r> Decode<'r, DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    Vec<u8>: Type<DB> + for<'r> Decode<'r, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
    DB::QueryResult: RowsAffected,
{
    fn max_key_len(&self) -> Option<usize> {
        self.shard.dialect.max_key_len()
    }

    fn backend(&self) -> &'static str {
        self.shard.dialect.name()
    }

    async fn lock_meta(&mut self) -> Result<Revisions> {
        let row = sqlx::query(self.shard.dialect.lock_meta())
            .fetch_one(&mut *self.tx)
            .await?;
        Ok(Revisions {
            current: row.try_get(0)?,
            compacted: row.try_get(1)?,
            epoch: row.try_get(2)?,
        })
    }

    async fn set_revisions(&mut self, revs: Revisions) -> Result<()> {
        let st = write_sql::set_revisions(self.shard.dialect, revs);
        SqlShard::<DB>::execute_in(&mut self.tx, &st).await?;
        Ok(())
    }

    async fn live_get(&mut self, keys: &[&[u8]]) -> Result<Vec<KeyValue>> {
        let statements = write_sql::live_get(self.shard.dialect, keys);
        SqlShard::<DB>::kvs_in(&mut self.tx, &statements).await
    }

    async fn live_in_range(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        let st = write_sql::live_in_range(self.shard.dialect, range);
        SqlShard::<DB>::kvs_in(&mut self.tx, &[st]).await
    }

    async fn live_with_lease(&mut self, lease: i64) -> Result<Vec<KeyValue>> {
        let st = write_sql::live_with_lease(self.shard.dialect, lease);
        SqlShard::<DB>::kvs_in(&mut self.tx, &[st]).await
    }

    async fn range(&mut self, request: &RangeRequest, revs: Revisions) -> Result<RangeResponse> {
        self.shard
            .range_in(&mut self.tx, request, revs, None, None)
            .await
    }

    async fn write_history(&mut self, rows: &[HistoryRow]) -> Result<()> {
        for st in write_sql::write_history(self.shard.dialect, rows) {
            SqlShard::<DB>::execute_in(&mut self.tx, &st).await?;
        }
        Ok(())
    }

    async fn write_live(&mut self, upserts: &[&KeyValue], deletes: &[&[u8]]) -> Result<()> {
        for st in write_sql::write_live(self.shard.dialect, upserts, deletes) {
            SqlShard::<DB>::execute_in(&mut self.tx, &st).await?;
        }
        Ok(())
    }

    async fn leases_existing(&mut self, ids: &[i64]) -> Result<Vec<i64>> {
        let statements = write_sql::leases_existing(self.shard.dialect, ids);
        SqlShard::<DB>::ints_in(&mut self.tx, &statements).await
    }

    async fn lease_insert(&mut self, lease: LeaseRecord) -> Result<()> {
        let st = write_sql::lease_insert(self.shard.dialect, lease);
        SqlShard::<DB>::execute_in(&mut self.tx, &st).await?;
        Ok(())
    }

    async fn lease_delete(&mut self, id: i64) -> Result<()> {
        let st = write_sql::lease_delete(self.shard.dialect, id);
        SqlShard::<DB>::execute_in(&mut self.tx, &st).await?;
        Ok(())
    }

    async fn write_final(
        &mut self,
        history: &[HistoryRow],
        upserts: &[&KeyValue],
        deletes: &[&[u8]],
        revs: Option<Revisions>,
    ) -> Result<()> {
        match write_sql::combined_final(self.shard.dialect, history, upserts, deletes, revs) {
            Some(st) => {
                SqlShard::<DB>::execute_in(&mut self.tx, &st).await?;
                Ok(())
            }
            None => write::write_final_separately(self, history, upserts, deletes, revs).await,
        }
    }

    async fn lease_deadline(&mut self, id: i64) -> Result<Option<i64>> {
        let st = write_sql::lease_deadline(self.shard.dialect, id);
        Ok(SqlShard::<DB>::ints_in(&mut self.tx, &[st])
            .await?
            .first()
            .copied())
    }
}

impl<DB> SqlShard<DB>
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
    /// A Range without selectors (see `selection.rs` for those), of only
    /// the candidates of a narrowing if there is one.
    async fn range_unfiltered(
        &self,
        request: &RangeRequest,
        narrowing: Option<&Narrowing>,
    ) -> Result<RangeResponse> {
        if let Some(reads) = &self.direct_reads {
            return reads.range(request, &self.page_counts, narrowing);
        }
        if is_plain_get(request) && narrowing.is_none() {
            return self.plain_get(request).await;
        }
        let mut conn = self.acquire().await?;
        let mut tx = conn.begin_with(self.dialect.begin_read()).await?;
        let revs = self.read_revisions(&mut tx).await?;
        let marked = match narrowing {
            Some(n) => {
                let row = sqlx::query(label_index::READ_MARK)
                    .fetch_optional(&mut *tx)
                    .await?;
                let mark = match row {
                    Some(row) => row.try_get(0)?,
                    None => 0,
                };
                Some(n.at(mark))
            }
            None => None,
        };
        let response = self
            .range_in(
                &mut tx,
                request,
                revs,
                Some(&self.page_counts),
                marked.as_ref(),
            )
            .await?;
        tx.commit().await?;
        Ok(response)
    }

    /// One batch on the writer's connection: guarded where the dialect and
    /// the batch allow it (`guarded_writes.rs`), else, or if the guard
    /// fails, in a transaction under the revision lock.
    async fn commit_on(
        &self,
        conn: &mut DB::Connection,
        batch: &[WriteRequest],
        collect_events: bool,
    ) -> Result<CommittedBatch> {
        let mut rerun = false;
        // Whatever happens, only a batch that commits guarded knows more.
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(version) = self.dialect.meta_version()
            && guarded_writes::suits_guarded(batch)
            && self.guard_pause.take_turn()
        {
            let mut start = Start::Read;
            if known.is_some()
                && guarded_writes::suits_speculation(batch)
                && self.speculation_pause.take_turn()
            {
                let mut ops = GuardedTx::new(self, &mut *conn, version, Start::Assume, known);
                let result =
                    write::apply_batch(&mut ops, batch, self.fence.serving(), collect_events).await;
                known = ops.take_prior();
                match result {
                    Err(ShardError::NotSpeculative { why, wrong }) => {
                        tracing::debug!(why, "write batch runs again from what it reads");
                        if wrong {
                            self.speculation_pause.wrong();
                        }
                        if let Some(seen) = ops.seen_instead() {
                            start = Start::Seen(seen);
                        }
                    }
                    result => {
                        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = ops.learned();
                        return result.map(|committed| CommittedBatch {
                            path: WritePath::Speculative,
                            ..committed
                        });
                    }
                }
            }
            let mut ops = GuardedTx::new(self, &mut *conn, version, start, known);
            match write::apply_batch(&mut ops, batch, self.fence.serving(), collect_events).await {
                Err(ShardError::NeedsLock { why, contended }) => {
                    tracing::debug!(why, "write batch runs again under the revision lock");
                    if contended {
                        self.guard_pause.contended();
                    }
                    rerun = true;
                }
                result => {
                    *self.known.lock().unwrap_or_else(|p| p.into_inner()) = ops.learned();
                    return result.map(|committed| CommittedBatch {
                        path: WritePath::Guarded,
                        ..committed
                    });
                }
            }
        }
        let tx = conn.begin_with(self.dialect.begin_write()).await?;
        let mut ops = SqlTx { shard: self, tx };
        let mut committed =
            match write::apply_batch(&mut ops, batch, self.fence.serving(), collect_events).await {
                Ok(committed) => committed,
                Err(e) => {
                    // Now, not when the connection is next used (sqlx's
                    // rollback on drop): until then the transaction would
                    // hold the revision lock, and a fence (or a writer of
                    // another process) would wait for it.
                    let _ = ops.tx.rollback().await;
                    return Err(e);
                }
            };
        crate::deadline::committing();
        ops.tx.commit().await?;
        if rerun {
            committed.path = WritePath::RerunLocked;
        }
        Ok(committed)
    }
}

#[async_trait]
impl<DB> ShardStore for SqlShard<DB>
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
    fn backend(&self) -> &'static str {
        self.dialect.name()
    }

    fn serving(&self) -> Serving {
        self.fence.serving()
    }

    fn serve(&self, version: i64, class: RevisionClass) {
        self.fence.serve(version, class);
    }

    fn connections(&self) -> Option<Connections> {
        let connections = Connections {
            waiting: self.pool_use.waiting(),
            ..Connections::default()
        };
        Some(
            connections
                .with_pool(&self.pool)
                .with_pool(&self.write_pool),
        )
    }

    async fn revisions(&self) -> Result<Revisions> {
        let mut conn = self.acquire().await?;
        self.read_revisions(&mut conn).await
    }

    async fn range(&self, request: &RangeRequest) -> Result<RangeResponse> {
        if let Some(selected) = SelectedRange::of(request)? {
            let read = self
                .range_unfiltered(&selected.unfiltered, selected.narrowing())
                .await?;
            return Ok(selected.answer(request, read));
        }
        self.range_unfiltered(request, None).await
    }

    async fn commit_batch(
        &self,
        batch: &[WriteRequest],
        collect_events: bool,
    ) -> Result<CommittedBatch> {
        if let Some(writes) = &self.direct_writes {
            return writes.commit(batch, collect_events).await;
        }
        let mut held = self.write_conn.lock().await;
        let mut conn = match held.take() {
            Some(mut conn) => {
                conn.rebind();
                conn
            }
            None => self.pool_use.acquire(&self.write_pool).await?,
        };
        let committed = self.commit_on(&mut conn, batch, collect_events).await;
        // After a database error the connection may be broken or inside a
        // failed transaction.
        if !matches!(committed, Err(ShardError::Database(_))) {
            *held = Some(conn);
        }
        committed
    }

    async fn poll_events(&self, after: i64, max_events: usize) -> Result<EventPage> {
        let mut conn = self.acquire().await?;
        let mut tx = conn.begin_with(self.dialect.begin_read()).await?;
        let revs = self.read_revisions(&mut tx).await?;
        if revs.current <= after {
            tx.commit().await?;
            return Ok(EventPage {
                events: Vec::new(),
                closed: revs.current.max(after),
                more: false,
            });
        }
        let (events, closed) = self
            .events_page(&mut tx, after + 1, revs.current, None, max_events)
            .await?;
        tx.commit().await?;
        Ok(EventPage {
            events,
            closed,
            more: closed < revs.current,
        })
    }

    async fn history(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        max_events: usize,
    ) -> Result<EventPage> {
        let mut conn = self.acquire().await?;
        let mut tx = conn.begin_with(self.dialect.begin_read()).await?;
        let revs = self.read_revisions(&mut tx).await?;
        if from < revs.compacted {
            tx.commit().await?;
            return Err(ShardError::Compacted {
                compact_revision: revs.compacted,
            });
        }
        let to = to.min(revs.current);
        let (events, closed) = self
            .events_page(&mut tx, from, to, Some(range), max_events)
            .await?;
        tx.commit().await?;
        Ok(EventPage {
            events,
            closed,
            more: closed < to,
        })
    }

    async fn index_labels(
        &self,
        from: i64,
        to: i64,
        changes: &[LabelChange],
    ) -> Result<LabelIndexOutcome> {
        let mut conn = self.acquire().await?;
        let mut tx = conn.begin_with(self.dialect.begin_write()).await?;
        let rows = sqlx::query(self.dialect.lock_label_mark())
            .fetch_all(&mut *tx)
            .await?;
        let mark: i64 = match rows.first() {
            Some(row) => row.try_get(0)?,
            None => {
                return Err(ShardError::Corrupt("ks_label_mark has no row".to_string()));
            }
        };
        if mark >= to {
            tx.rollback().await?;
            return Ok(LabelIndexOutcome::Ahead { mark });
        }
        if mark < from {
            tx.rollback().await?;
            return Ok(LabelIndexOutcome::Gap { mark });
        }
        let terms = label_index::term_rows(changes);
        for st in label_index::apply_statements(self.dialect, changes, &terms, to) {
            Self::execute_in(&mut tx, &st).await?;
        }
        tx.commit().await?;
        Ok(LabelIndexOutcome::Applied)
    }

    async fn purge_compacted(&self, upto: i64, batch: i64) -> Result<u64> {
        let mut conn = self.acquire().await?;
        let row = sqlx::query("SELECT MIN(revision) FROM ks_history")
            .fetch_one(&mut *conn)
            .await?;
        let Some(mut lo) = row.try_get::<Option<i64>, _>(0)? else {
            return Ok(0);
        };
        // Windows run in revision order from the oldest row, so a row is
        // gone only after what it replaced is.
        let texts = self.dialect.purge_window();
        let mut removed = 0;
        while lo <= upto {
            let hi = (lo + batch).min(upto + 1);
            for text in &texts {
                let st = Statement {
                    dialect: self.dialect,
                    text: text.clone(),
                    args: vec![Arg::Int(lo), Arg::Int(hi)],
                };
                removed += Self::execute_in(&mut conn, &st).await?;
            }
            lo = hi;
        }
        Ok(removed)
    }

    async fn lease_renew(&self, id: i64, now_ms: i64) -> Result<Option<i64>> {
        let mut conn = self.acquire().await?;
        let mut st = self.statement("UPDATE ks_lease SET expires_at_ms = ");
        st.int(now_ms)
            .sql(" + ttl * 1000 WHERE id = ")
            .int(id)
            .sql(" AND expires_at_ms > ")
            .int(now_ms);
        if Self::execute_in(&mut conn, &st).await? == 0 {
            return Ok(None);
        }
        Ok(self.lease_get(id).await?.map(|l| l.ttl))
    }

    async fn lease_get(&self, id: i64) -> Result<Option<LeaseRecord>> {
        let mut conn = self.acquire().await?;
        let mut st = self.statement("SELECT id, ttl, expires_at_ms FROM ks_lease WHERE id = ");
        st.int(id);
        let rows = Self::fetch_all_in(&mut conn, &st).await?;
        match rows.first() {
            Some(row) => Ok(Some(LeaseRecord {
                id: row.try_get(0)?,
                ttl: row.try_get(1)?,
                expires_at_ms: row.try_get(2)?,
            })),
            None => Ok(None),
        }
    }

    async fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        let mut conn = self.acquire().await?;
        let mut st = self.statement("SELECT key_bytes FROM ks_live WHERE lease = ");
        st.int(id).sql(" ORDER BY key_bytes");
        let mut keys = Vec::new();
        for row in Self::fetch_all_in(&mut conn, &st).await? {
            keys.push(row.try_get(0)?);
        }
        Ok(keys)
    }

    async fn lease_list(&self) -> Result<Vec<i64>> {
        let mut conn = self.acquire().await?;
        let rows = sqlx::query("SELECT id FROM ks_lease ORDER BY id")
            .fetch_all(&mut *conn)
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    async fn expired_leases(&self, now_ms: i64, limit: i64) -> Result<Vec<i64>> {
        let mut conn = self.acquire().await?;
        let mut st = self.statement("SELECT id FROM ks_lease WHERE expires_at_ms <= ");
        st.int(now_ms)
            .sql(" ORDER BY expires_at_ms LIMIT ")
            .int(limit);
        let rows = Self::fetch_all_in(&mut conn, &st).await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    async fn try_lock(&self, name: &str, owner: &str, now_ms: i64, hold_ms: i64) -> Result<bool> {
        let mut conn = self.acquire().await?;
        let mut st = self.statement("UPDATE ks_lock SET owner = ");
        st.arg(Arg::Text(owner))
            .sql(", until_ms = ")
            .int(now_ms + hold_ms);
        st.sql(" WHERE name = ")
            .arg(Arg::Text(name))
            .sql(" AND (owner = ");
        st.arg(Arg::Text(owner))
            .sql(" OR until_ms < ")
            .int(now_ms)
            .sql(")");
        Self::execute_in(&mut conn, &st).await?;
        // Read back rather than trusting the affected-row count, which MySQL
        // reports as 0 when the row already held these values.
        let mut st = self.statement("SELECT owner FROM ks_lock WHERE name = ");
        st.arg(Arg::Text(name));
        let rows = Self::fetch_all_in(&mut conn, &st).await?;
        match rows.first() {
            Some(row) => Ok(row.try_get::<String, _>(0)? == owner),
            None => Ok(false),
        }
    }

    async fn db_size(&self) -> Result<i64> {
        let mut conn = self.acquire().await?;
        let row = sqlx::query(self.dialect.db_size())
            .fetch_one(&mut *conn)
            .await?;
        Ok(row.try_get(0)?)
    }

    async fn defragment(&self) -> Result<()> {
        let mut conn = self.acquire().await?;
        for statement in self.dialect.defragment() {
            sqlx::query(statement).execute(&mut *conn).await?;
        }
        Ok(())
    }
}
