//! [`BulkSink`] over a sqlx pool of any backend: each call is one write
//! transaction under the revision lock, built from the same statements as
//! the write path (`write_sql.rs`).

use std::collections::HashMap;
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
use crate::bulk::{BulkSink, Change, Contents, ImportPhase, ImportState};
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

async fn rows<DB>(conn: &mut DB::Connection, st: &Statement<'_>) -> Result<Vec<DB::Row>>
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
    async fn contents(&self) -> Result<Contents> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(self.dialect.begin_read()).await?;
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM ks_live), (SELECT COUNT(*) FROM ks_history), \
             (SELECT COUNT(*) FROM ks_lease), revision, compact_revision FROM ks_meta WHERE id = 1",
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
            },
        };
        tx.commit().await?;
        Ok(contents)
    }

    async fn apply(&self, changes: &[Change], at_least: i64) -> Result<()> {
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        let locked = rows::<DB>(&mut tx, &Statement::new(d, d.lock_meta())).await?;
        let Some(meta) = locked.first() else {
            return Err(ShardError::Corrupt("ks_meta has no row".into()));
        };
        let revs = Revisions {
            current: meta.try_get(0)?,
            compacted: meta.try_get(1)?,
        };
        // The keys' live rows, then their state as the changes go.
        let mut keys: Vec<&[u8]> = changes.iter().map(Change::key).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut live: HashMap<Vec<u8>, Option<KeyValue>> = HashMap::new();
        for st in write_sql::live_get(d, &keys) {
            for row in rows::<DB>(&mut tx, &st).await? {
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
            compacted: revs.compacted,
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
        let locked = rows::<DB>(&mut tx, &Statement::new(d, d.lock_meta())).await?;
        let Some(meta) = locked.first() else {
            return Err(ShardError::Corrupt("ks_meta has no row".into()));
        };
        let current: i64 = meta.try_get(0)?;
        let compacted: i64 = meta.try_get(1)?;
        let revs = Revisions {
            current: current.max(to.current),
            compacted: compacted.max(to.compacted),
        };
        run::<DB>(&mut tx, &write_sql::set_revisions(d, revs)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn import_state(&self) -> Result<Option<ImportState>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query("SELECT source, revision, phase FROM ks_import WHERE id = 1")
            .fetch_all(&mut *conn)
            .await?;
        let Some(row) = rows.first() else {
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
        let d = self.dialect;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(d.begin_write()).await?;
        run::<DB>(
            &mut tx,
            &Statement::new(d, "DELETE FROM ks_import WHERE id = 1"),
        )
        .await?;
        let mut st = Statement::new(
            d,
            "INSERT INTO ks_import (id, source, revision, phase) VALUES (1, ",
        );
        st.arg(Arg::Text(&state.source))
            .sql(", ")
            .int(state.revision)
            .sql(", ")
            .arg(Arg::Text(state.phase.as_str()))
            .sql(")");
        run::<DB>(&mut tx, &st).await?;
        tx.commit().await?;
        Ok(())
    }
}
