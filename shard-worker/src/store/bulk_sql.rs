//! [`BulkSink`] over a sqlx pool of any backend: each call is one write
//! transaction under the revision lock, built from the same statements as
//! the write path (`write_sql.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};

use async_trait::async_trait;
use kubeshard_proto::mvccpb::KeyValue;
use sqlx::{
    ColumnIndex, Connection, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type,
};

use super::sqlx_rows::{RowsAffected, bound, kv_from_row};
use super::statement::{Arg, Statement};
use super::write::HistoryRow;
use super::write_sql;
use super::{LeaseRecord, Revisions};
use crate::bulk::{
    BulkSink, Change, Contents, ImportPhase, ImportState, Reshard, ReshardPhase, RouterSeen,
    RowSource,
};
use crate::dialect::Dialect;
use crate::error::{Result, ShardError};

pub struct SqlBulk<DB: Database> {
    pool: Pool<DB>,
    dialect: &'static dyn Dialect,
    /// Subs handed out: unique within any revision this sink writes, and in
    /// the order of the changes.
    next_sub: AtomicI64,
}

impl<DB: Database> std::fmt::Debug for SqlBulk<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlBulk")
            .field("dialect", &self.dialect.name())
            .finish()
    }
}

impl<DB: Database> SqlBulk<DB> {
    /// Over `pool`, whose schema is in place (`SqlShard::migrate`).
    pub fn new(pool: Pool<DB>, dialect: &'static dyn Dialect) -> Self {
        SqlBulk {
            pool,
            dialect,
            next_sub: AtomicI64::new(0),
        }
    }
}

async fn run<DB>(conn: &mut DB::Connection, st: &Statement<'_>) -> Result<u64>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    DB::QueryResult: RowsAffected,
{
    Ok(bound::<DB>(st).execute(&mut *conn).await?.rows())
}

async fn fetch<DB>(conn: &mut DB::Connection, st: &Statement<'_>) -> Result<Vec<DB::Row>>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    Ok(bound::<DB>(st).fetch_all(&mut *conn).await?)
}

impl<DB> SqlBulk<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    DB::QueryResult: RowsAffected,
{
    /// The row with id 1 of a one-row record table (`ks_import`,
    /// `ks_placement`, `ks_reshard`), if there is one.
    async fn record(&self, select: &'static str) -> Result<Option<DB::Row>> {
        let mut conn = self.pool.acquire().await?;
        let rows = fetch::<DB>(&mut conn, &Statement::new(self.dialect, select)).await?;
        Ok(rows.into_iter().next())
    }

    /// Replaces the row with id 1 of `table` by what `insert` inserts, in
    /// one transaction.
    async fn replace_record(&self, table: &str, insert: &Statement<'_>) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        let delete = Statement::new(d, format!("DELETE FROM {table} WHERE id = 1"));
        run::<DB>(&mut tx, &delete).await?;
        run::<DB>(&mut tx, insert).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl<DB> BulkSink for SqlBulk<DB>
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
    fn key_limit(&self) -> (&'static str, Option<usize>) {
        (self.dialect.name(), self.dialect.max_key_len())
    }

    async fn contents(&self) -> Result<Contents> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(self.dialect.begin_read()).await?;
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM ks_live), (SELECT COUNT(*) FROM ks_history), \
             (SELECT COUNT(*) FROM ks_lease), revision, compact_revision, epoch FROM ks_meta \
             WHERE id = 1",
        )
        .fetch_one(&mut *tx)
        .await?;
        let contents = Contents {
            live_keys: row.try_get(0)?,
            history_rows: row.try_get(1)?,
            leases: row.try_get(2)?,
            revisions: Revisions {
                current: row.try_get(3)?,
                compacted: row.try_get(4)?,
                epoch: row.try_get(5)?,
            },
        };
        tx.commit().await?;
        Ok(contents)
    }

    async fn revisions(&self) -> Result<Revisions> {
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query("SELECT revision, compact_revision, epoch FROM ks_meta WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
        Ok(Revisions {
            current: row.try_get(0)?,
            compacted: row.try_get(1)?,
            epoch: row.try_get(2)?,
        })
    }

    async fn apply(&self, changes: &[Change], at_least: i64) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        let locked = fetch::<DB>(&mut tx, &Statement::new(d, d.lock_meta())).await?;
        let Some(meta) = locked.first() else {
            return Err(ShardError::Corrupt("ks_meta has no row".into()));
        };
        let revs = Revisions {
            current: meta.try_get(0)?,
            compacted: meta.try_get(1)?,
            epoch: meta.try_get(2)?,
        };
        // The keys' live rows, then their state as the changes go.
        let mut keys: Vec<&[u8]> = changes.iter().map(Change::key).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut live: HashMap<Vec<u8>, Option<KeyValue>> = HashMap::new();
        for st in write_sql::live_get(d, &keys) {
            for row in fetch::<DB>(&mut tx, &st).await? {
                let kv = kv_from_row::<DB>(&row, 0)?;
                live.insert(kv.key.clone(), Some(kv));
            }
        }
        let mut history = Vec::with_capacity(changes.len());
        let mut highest = revs.current.max(at_least);
        for change in changes {
            let revision = change.revision();
            let before = live.get(change.key()).cloned().flatten();
            let prev_revision = before.as_ref().map_or(0, |kv| kv.mod_revision);
            if revision <= prev_revision {
                return Err(ShardError::Corrupt(format!(
                    "a change at revision {revision} of {} is not above its last change ({prev_revision})",
                    change.key().escape_ascii()
                )));
            }
            let sub = self.next_sub.fetch_add(1, Ordering::Relaxed);
            let row = match change {
                Change::Put(kv) => HistoryRow {
                    revision,
                    sub,
                    key: kv.key.clone(),
                    deleted: false,
                    create_revision: kv.create_revision,
                    prev_revision,
                    version: kv.version,
                    lease: kv.lease,
                    value: kv.value.clone(),
                },
                Change::Delete { key, .. } => {
                    if before.is_none() {
                        return Err(ShardError::Corrupt(format!(
                            "a delete at revision {revision} of {}, which the shard does not hold",
                            key.escape_ascii()
                        )));
                    }
                    HistoryRow {
                        revision,
                        sub,
                        key: key.clone(),
                        deleted: true,
                        create_revision: 0,
                        prev_revision,
                        version: 0,
                        lease: 0,
                        value: Vec::new(),
                    }
                }
            };
            live.insert(
                change.key().to_vec(),
                match change {
                    Change::Put(kv) => Some(kv.clone()),
                    Change::Delete { .. } => None,
                },
            );
            history.push(row);
            highest = highest.max(revision);
        }
        if history.is_empty() && highest == revs.current {
            tx.commit().await?;
            return Ok(());
        }
        for st in write_sql::write_history(d, &history) {
            run::<DB>(&mut tx, &st).await?;
        }
        let changed: Vec<(&[u8], Option<&KeyValue>)> = keys
            .iter()
            .map(|k| (*k, live.get(*k).and_then(Option::as_ref)))
            .collect();
        let upserts: Vec<&KeyValue> = changed.iter().filter_map(|(_, kv)| *kv).collect();
        let deletes: Vec<&[u8]> = changed
            .iter()
            .filter(|(_, kv)| kv.is_none())
            .map(|(k, _)| *k)
            .collect();
        for st in write_sql::write_live(d, &upserts, &deletes) {
            run::<DB>(&mut tx, &st).await?;
        }
        let revs = Revisions {
            current: highest,
            ..revs
        };
        run::<DB>(&mut tx, &write_sql::set_revisions(d, revs)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put_leases(&self, leases: &[LeaseRecord]) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        for lease in leases {
            run::<DB>(&mut tx, &write_sql::lease_delete(d, lease.id)).await?;
            run::<DB>(&mut tx, &write_sql::lease_insert(d, *lease)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn delete_leases(&self, ids: &[i64]) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        for id in ids {
            run::<DB>(&mut tx, &write_sql::lease_delete(d, *id)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn raise(&self, to: Revisions) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        let locked = fetch::<DB>(&mut tx, &Statement::new(d, d.lock_meta())).await?;
        let Some(meta) = locked.first() else {
            return Err(ShardError::Corrupt("ks_meta has no row".into()));
        };
        let current: i64 = meta.try_get(0)?;
        let compacted: i64 = meta.try_get(1)?;
        let revs = Revisions {
            current: current.max(to.current),
            compacted: compacted.max(to.compacted),
            epoch: meta.try_get(2)?,
        };
        run::<DB>(&mut tx, &write_sql::set_revisions(d, revs)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn fence(&self, version: i64, at_least: i64) -> Result<Revisions> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        let locked = fetch::<DB>(&mut tx, &Statement::new(d, d.lock_meta())).await?;
        let Some(meta) = locked.first() else {
            return Err(ShardError::Corrupt("ks_meta has no row".into()));
        };
        let current: i64 = meta.try_get(0)?;
        let epoch: i64 = meta.try_get(2)?;
        let revs = Revisions {
            current: current.max(at_least),
            compacted: meta.try_get(1)?,
            epoch: epoch.max(version),
        };
        let mut st = Statement::new(d, "UPDATE ks_meta SET epoch = ");
        st.int(revs.epoch)
            .sql(", revision = ")
            .int(revs.current)
            .sql(" WHERE id = 1");
        run::<DB>(&mut tx, &st).await?;
        tx.commit().await?;
        Ok(revs)
    }

    async fn import_state(&self) -> Result<Option<ImportState>> {
        let Some(row) = self
            .record("SELECT source, revision, phase FROM ks_import WHERE id = 1")
            .await?
        else {
            return Ok(None);
        };
        let phase: String = row.try_get(2)?;
        Ok(Some(ImportState {
            source: row.try_get(0)?,
            revision: row.try_get(1)?,
            phase: ImportPhase::parse(&phase)
                .ok_or_else(|| ShardError::Corrupt(format!("ks_import has phase {phase:?}")))?,
        }))
    }

    async fn set_import_state(&self, state: &ImportState) -> Result<()> {
        let mut st = Statement::new(
            self.dialect,
            "INSERT INTO ks_import (id, source, revision, phase) VALUES (1, ",
        );
        st.arg(Arg::Text(&state.source))
            .sql(", ")
            .int(state.revision)
            .sql(", ")
            .arg(Arg::Text(state.phase.as_str()))
            .sql(")");
        self.replace_record("ks_import", &st).await
    }

    async fn database_id(&self) -> Result<String> {
        let read = || async {
            let mut conn = self.pool.acquire().await?;
            let rows = sqlx::query("SELECT token FROM ks_identity WHERE id = 1")
                .fetch_all(&mut *conn)
                .await?;
            match rows.first() {
                Some(row) => Ok::<_, ShardError>(Some(row.try_get::<String, _>(0)?)),
                None => Ok(None),
            }
        };
        if let Some(token) = read().await? {
            return Ok(token);
        }
        let token = random_token();
        let mut st = Statement::new(
            self.dialect,
            "INSERT INTO ks_identity (id, token) VALUES (1, ",
        );
        st.arg(Arg::Text(&token)).sql(")");
        let mut conn = self.pool.acquire().await?;
        // Another process may have made it first: then its token stands.
        let _ = run::<DB>(&mut conn, &st).await;
        read()
            .await?
            .ok_or_else(|| ShardError::Corrupt("ks_identity has no row".into()))
    }

    async fn placement(&self) -> Result<Option<String>> {
        match self
            .record("SELECT placement FROM ks_placement WHERE id = 1")
            .await?
        {
            Some(row) => Ok(Some(row.try_get(0)?)),
            None => Ok(None),
        }
    }

    async fn set_placement(&self, placement: &str, replace: bool) -> Result<()> {
        let mut st = Statement::new(
            self.dialect,
            "INSERT INTO ks_placement (id, placement) VALUES (1, ",
        );
        st.arg(Arg::Text(placement)).sql(")");
        if replace {
            return self.replace_record("ks_placement", &st).await;
        }
        // A row written meanwhile by another router makes this fail; the
        // caller reads back what stands.
        let mut conn = self.pool.acquire().await?;
        let _ = run::<DB>(&mut conn, &st).await;
        Ok(())
    }

    async fn reshard(&self) -> Result<Option<Reshard>> {
        let Some(row) = self
            .record(
                "SELECT version, placement, phase, switch_revision, held FROM ks_reshard \
                 WHERE id = 1",
            )
            .await?
        else {
            return Ok(None);
        };
        let phase: String = row.try_get(2)?;
        Ok(Some(Reshard {
            version: row.try_get(0)?,
            placement: row.try_get(1)?,
            phase: ReshardPhase::parse(&phase)
                .ok_or_else(|| ShardError::Corrupt(format!("ks_reshard has phase {phase:?}")))?,
            switch_revision: row.try_get(3)?,
            held: row
                .try_get::<String, _>(4)?
                .lines()
                .map(str::to_string)
                .collect(),
        }))
    }

    async fn set_reshard(&self, reshard: &Reshard) -> Result<()> {
        let mut st = Statement::new(
            self.dialect,
            "INSERT INTO ks_reshard (id, version, placement, held, phase, switch_revision) \
             VALUES (1, ",
        );
        let held = reshard.held.join("\n");
        st.int(reshard.version)
            .sql(", ")
            .arg(Arg::Text(&reshard.placement))
            .sql(", ")
            .arg(Arg::Text(&held))
            .sql(", ")
            .arg(Arg::Text(reshard.phase.as_str()))
            .sql(", ")
            .int(reshard.switch_revision)
            .sql(")");
        self.replace_record("ks_reshard", &st).await
    }

    async fn router_seen(&self, id: &str, address: &str) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        // One statement: no gap locks to deadlock on when routers start
        // together, and a record a stop removes stays removed.
        let mut st = Statement::new(d, "INSERT INTO ks_router (id, address, seen_ms) VALUES (");
        st.arg(Arg::Text(id)).sql(", ").arg(Arg::Text(address));
        st.sql(", ").sql(d.now_ms()).sql(")");
        st.sql(&d.upsert_tail("id", &["address", "seen_ms"]));
        run::<DB>(&mut conn, &st).await?;
        Ok(())
    }

    async fn router_gone(&self, id: &str) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        let mut st = Statement::new(self.dialect, "DELETE FROM ks_router WHERE id = ");
        st.arg(Arg::Text(id));
        run::<DB>(&mut conn, &st).await?;
        Ok(())
    }

    async fn routers_seen(&self, within_ms: i64) -> Result<Vec<RouterSeen>> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let now = d.now_ms();
        let mut st = Statement::new(
            d,
            format!("SELECT id, address, {now} - seen_ms FROM ks_router WHERE seen_ms >= {now} - "),
        );
        st.int(within_ms).sql(" ORDER BY id");
        let mut out = Vec::new();
        for row in fetch::<DB>(&mut conn, &st).await? {
            out.push(RouterSeen {
                id: row.try_get(0)?,
                address: row.try_get(1)?,
                ago_ms: row.try_get(2)?,
            });
        }
        Ok(out)
    }

    async fn renew_database_id(&self) -> Result<String> {
        let token = random_token();
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut st = Statement::new(d, "UPDATE ks_identity SET token = ");
        st.arg(Arg::Text(&token)).sql(" WHERE id = 1");
        run::<DB>(&mut conn, &st).await?;
        Ok(token)
    }

    async fn append_history(&self, rows: &[HistoryRow]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        let mut revisions: Vec<i64> = rows.iter().map(|r| r.revision).collect();
        revisions.sort_unstable();
        revisions.dedup();
        // A key has at most one row per revision and kind (a put and then a
        // delete of it may share a revision).
        let mut present: HashSet<(i64, Vec<u8>, bool)> = HashSet::new();
        let mut top_sub: HashMap<i64, i64> = HashMap::new();
        let head = "SELECT revision, sub, key_bytes, deleted FROM ks_history WHERE revision IN (";
        for chunk in write_sql::shaped_chunks(&revisions) {
            let st = write_sql::in_list(d, head, chunk, Arg::Int);
            for row in fetch::<DB>(&mut tx, &st).await? {
                let revision: i64 = row.try_get(0)?;
                let sub: i64 = row.try_get(1)?;
                let deleted: i64 = row.try_get(3)?;
                present.insert((revision, row.try_get(2)?, deleted != 0));
                let top = top_sub.entry(revision).or_insert(sub);
                *top = (*top).max(sub);
            }
        }
        let mut added = Vec::new();
        for r in rows {
            if present.contains(&(r.revision, r.key.clone(), r.deleted)) {
                continue;
            }
            let top = top_sub.entry(r.revision).or_insert(-1);
            *top += 1;
            added.push(HistoryRow {
                sub: *top,
                ..r.clone()
            });
        }
        for st in write_sql::write_history(d, &added) {
            run::<DB>(&mut tx, &st).await?;
        }
        tx.commit().await?;
        Ok(added.len() as u64)
    }

    async fn upsert_live(&self, kvs: &[KeyValue]) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        let upserts: Vec<&KeyValue> = kvs.iter().collect();
        for st in write_sql::write_live(d, &upserts, &[]) {
            run::<DB>(&mut tx, &st).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn delete_history(&self, at: &[(i64, i64)]) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        for chunk in write_sql::shaped_chunks(at) {
            let mut st = Statement::new(d, "DELETE FROM ks_history WHERE (revision, sub) IN (");
            for (i, (revision, sub)) in chunk.iter().enumerate() {
                st.sql(if i == 0 { "(" } else { ", (" });
                st.int(*revision).sql(", ").int(*sub).sql(")");
            }
            st.sql(")");
            run::<DB>(&mut tx, &st).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn delete_live(&self, keys: &[Vec<u8>]) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        for st in write_sql::write_live(d, &[], &keys) {
            run::<DB>(&mut tx, &st).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn reset_label_index(&self) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        run::<DB>(&mut tx, &Statement::new(d, "DELETE FROM ks_label")).await?;
        let reset = "UPDATE ks_label_mark SET revision = 0 WHERE id = 1";
        run::<DB>(&mut tx, &Statement::new(d, reset)).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl<DB> RowSource for SqlBulk<DB>
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
    async fn history_page(&self, after: (i64, i64), limit: usize) -> Result<Vec<HistoryRow>> {
        let d = self.dialect;
        let mut st = Statement::new(
            d,
            "SELECT revision, sub, key_bytes, deleted, create_revision, prev_revision, version, \
             lease, value_bytes FROM ks_history WHERE revision > ",
        );
        st.int(after.0).sql(" OR (revision = ").int(after.0);
        st.sql(" AND sub > ")
            .int(after.1)
            .sql(") ORDER BY revision, sub LIMIT ");
        st.int(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut conn = self.pool.acquire().await?;
        let mut out = Vec::new();
        for row in fetch::<DB>(&mut conn, &st).await? {
            let deleted: i64 = row.try_get(3)?;
            out.push(HistoryRow {
                revision: row.try_get(0)?,
                sub: row.try_get(1)?,
                key: row.try_get(2)?,
                deleted: deleted != 0,
                create_revision: row.try_get(4)?,
                prev_revision: row.try_get(5)?,
                version: row.try_get(6)?,
                lease: row.try_get(7)?,
                value: row.try_get(8)?,
            });
        }
        Ok(out)
    }

    async fn live_page(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>> {
        let d = self.dialect;
        let mut st = Statement::new(d, format!("SELECT {} FROM ks_live", write_sql::KV_COLUMNS));
        if let Some(after) = after {
            st.sql(" WHERE key_bytes > ").bytes(after);
        }
        st.sql(" ORDER BY key_bytes LIMIT ")
            .int(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut conn = self.pool.acquire().await?;
        let mut out = Vec::new();
        for row in fetch::<DB>(&mut conn, &st).await? {
            out.push(kv_from_row::<DB>(&row, 0)?);
        }
        Ok(out)
    }

    async fn leases(&self) -> Result<Vec<LeaseRecord>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query("SELECT id, ttl, expires_at_ms FROM ks_lease ORDER BY id")
            .fetch_all(&mut *conn)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(LeaseRecord {
                id: row.try_get(0)?,
                ttl: row.try_get(1)?,
                expires_at_ms: row.try_get(2)?,
            });
        }
        Ok(out)
    }
}

/// 128 random bits as hex, from the standard library's per-process random
/// hash keys and the clock.
fn random_token() -> String {
    use std::hash::BuildHasher;
    let seed = (std::time::SystemTime::now(), std::process::id());
    let a = std::collections::hash_map::RandomState::new().hash_one(seed);
    let b = std::collections::hash_map::RandomState::new().hash_one((seed, a));
    format!("{a:016x}{b:016x}")
}
