//! Opens a shard's database from its endpoint: creates the database (and the
//! SQLite folder) when missing, builds a typed pool and migrates the schema.

use std::sync::Arc;
use std::time::Duration;

use kubeshard_config::{Endpoint, PoolSettings};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Executor};
use tracing::info;

use crate::bulk::Bulk;
use crate::dialect;
use crate::error::{Result, ShardError};
use crate::store::fence::{Fence, Serving};
use crate::store::{RevisionClass, ShardStore, SqlBulk, SqlShard, SqliteReads, SqliteWriter};

/// Connections per shard pool unless configured (reads share them; the
/// writer has a pool of one of its own).
const POOL_SIZE: u32 = 16;

/// Opens the store of one shard, creating database and schema when missing.
///
/// `class` says which revisions the shard hands out ([`RevisionClass::ALL`]
/// for a topology of one shard); it serves topology version 0 (a database
/// fenced later refuses it until [`ShardStore::serve`]).
pub async fn open_store(endpoint: &Endpoint, class: RevisionClass) -> Result<Arc<dyn ShardStore>> {
    let serving = Serving { version: 0, class };
    open_store_with(endpoint, serving, &PoolSettings::default()).await
}

/// [`open_store`] with the pool sized and recycled as `settings` say.
pub async fn open_store_with(
    endpoint: &Endpoint,
    serving: Serving,
    settings: &PoolSettings,
) -> Result<Arc<dyn ShardStore>> {
    let fence = Arc::new(Fence::new(serving.version, serving.class));
    let size = settings.max_connections.unwrap_or(POOL_SIZE);
    let max_idle = settings
        .max_idle
        .unwrap_or(size.div_ceil(2))
        .try_into()
        .unwrap_or(usize::MAX);
    match endpoint {
        Endpoint::Sqlite { path } => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    ShardError::Database(sqlx::Error::Configuration(
                        format!("cannot create folder {} for sqlite: {e}", dir.display()).into(),
                    ))
                })?;
            }
            let options = sqlite_options(path);
            let pool = recycled(SqlitePoolOptions::new(), settings)
                .max_connections(size)
                .acquire_timeout(settings.call_timeout)
                .connect_with(options.clone())
                .await?;
            // Batches are written by a thread of their own
            // (`store/sqlite_writes.rs`); this pool is never connected.
            let write_pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(options);
            spawn_sqlite_checkpointer(pool.clone());
            let shard = SqlShard::new(pool, write_pool, &dialect::Sqlite, fence.clone())
                .with_idle_limits(max_idle, settings.idle_timeout)
                .with_direct_reads(SqliteReads::new(path.clone(), fence.clone()))
                .with_direct_writes(SqliteWriter::start(path, fence)?);
            let version = shard.migrate().await?;
            info!(backend = "sqlite", path = %path.display(), schema_version = version, "shard database ready");
            Ok(Arc::new(shard))
        }
        Endpoint::Postgres { url, database } => {
            let server: PgConnectOptions = url.as_str().parse()?;
            create_postgres_database(&server, database).await?;
            let options = server.database(database).disable_statement_logging();
            let pool = recycled(postgres_pool(size, settings), settings)
                .connect_with(options.clone())
                .await?;
            let write_pool = recycled(postgres_pool(1, settings), settings)
                .after_connect(|conn, _| Box::pin(set_postgres_writer_session(conn)))
                .connect_with(options)
                .await?;
            let shard = SqlShard::new(pool, write_pool, &dialect::Postgres, fence)
                .with_idle_limits(max_idle, settings.idle_timeout);
            let version = shard.migrate().await?;
            info!(backend = "postgres", %endpoint, schema_version = version, "shard database ready");
            Ok(Arc::new(shard))
        }
        Endpoint::Mysql { url, database } => {
            let mut server_url = url.clone();
            server_url.set_path("");
            let server: MySqlConnectOptions = server_url.as_str().parse()?;
            let mut conn = server.clone().connect().await?;
            // The name was checked to be [A-Za-z0-9_-] when the endpoint was parsed.
            sqlx::raw_sql(&format!(
                "CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4"
            ))
            .execute(&mut conn)
            .await?;
            drop(conn);
            let options = server.database(database).disable_statement_logging();
            let pool = recycled(MySqlPoolOptions::new(), settings)
                .max_connections(size)
                .acquire_timeout(settings.call_timeout)
                .connect_with(options.clone())
                .await?;
            let write_pool = recycled(MySqlPoolOptions::new(), settings)
                .max_connections(1)
                .acquire_timeout(settings.call_timeout)
                .connect_with(options)
                .await?;
            let shard = SqlShard::new(pool, write_pool, &dialect::Mysql, fence)
                .with_idle_limits(max_idle, settings.idle_timeout);
            let version = shard.migrate().await?;
            info!(backend = "mysql", %endpoint, schema_version = version, "shard database ready");
            Ok(Arc::new(shard))
        }
    }
}

/// How every connection to a SQLite shard is made.
fn sqlite_options(path: &std::path::Path) -> SqliteConnectOptions {
    // WAL lets readers work during a write; synchronous=FULL makes an
    // acknowledged commit survive power loss, not just a crash.
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30))
        .pragma("cache_size", "-16384")
        .disable_statement_logging()
}

/// Bulk access ([`Bulk`]) to the shard at `endpoint`, over two connections of its
/// own; [`open_store`] must have made the database and its schema.
pub async fn open_bulk(endpoint: &Endpoint) -> Result<Arc<dyn Bulk>> {
    const CONNECTIONS: u32 = 2;
    Ok(match endpoint {
        Endpoint::Sqlite { path } => {
            let pool = SqlitePoolOptions::new()
                .max_connections(CONNECTIONS)
                .connect_with(sqlite_options(path))
                .await?;
            Arc::new(SqlBulk::new(pool, &dialect::Sqlite))
        }
        Endpoint::Postgres { url, database } => {
            let server: PgConnectOptions = url.as_str().parse()?;
            let pool = PgPoolOptions::new()
                .max_connections(CONNECTIONS)
                .connect_with(server.database(database).disable_statement_logging())
                .await?;
            Arc::new(SqlBulk::new(pool, &dialect::Postgres))
        }
        Endpoint::Mysql { url, database } => {
            let mut server_url = url.clone();
            server_url.set_path("");
            let server: MySqlConnectOptions = server_url.as_str().parse()?;
            let pool = MySqlPoolOptions::new()
                .max_connections(CONNECTIONS)
                .connect_with(server.database(database).disable_statement_logging())
                .await?;
            Arc::new(SqlBulk::new(pool, &dialect::Mysql))
        }
    })
}

/// Connection lifetime and idle limits (`--datastore-connection-max-*`).
fn recycled<DB: sqlx::Database>(
    options: sqlx::pool::PoolOptions<DB>,
    settings: &PoolSettings,
) -> sqlx::pool::PoolOptions<DB> {
    options
        .max_lifetime(settings.max_lifetime)
        .idle_timeout(settings.idle_timeout)
}

/// A pool of PostgreSQL connections set up by [`set_postgres_session`].
fn postgres_pool(max_connections: u32, settings: &PoolSettings) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(settings.call_timeout)
        .after_connect(|conn, _| Box::pin(set_postgres_session(conn)))
}

/// The session settings of every PostgreSQL connection of a shard, set
/// with `SET` once connected: PgBouncer, by default, refuses a startup
/// `options` parameter that sets a setting it does not track.
///
/// `enable_seqscan = off`: every statement kubeshard runs finds its rows by
/// key, revision or lease, through an index. PostgreSQL plans a prepared
/// statement once for all its executions after the first five (a generic
/// plan), with the table's size as it is then. Prepared on a table that is
/// nearly empty, typically just after a Defragment (VACUUM) of an emptied
/// shard, that plan scans the whole table, and it stays until autovacuum
/// next analyzes the table, a minute or more during which the table may
/// grow by hundreds of thousands of rows: etcdctl's load l after load m
/// fell to about 2900 writes/s, against about 5000 with index plans
/// (docs/benchmarks.md). Without sequential scans the planner takes the
/// index whatever the size; where no index applies it still scans.
pub async fn set_postgres_session(conn: &mut PgConnection) -> sqlx::Result<()> {
    conn.execute("SET enable_seqscan = off").await?;
    Ok(())
}

/// The session settings of a shard's writer connection: those of
/// [`set_postgres_session`], and `plan_cache_mode = force_generic_plan`.
///
/// The writer runs few statements of fixed shapes (key lookups, inserts,
/// the counter update), many times a second. PostgreSQL plans a prepared
/// statement anew at each execution when its generic plan looks costlier
/// than the plans made for the first five parameter sets, which it does
/// on a table that statistics say is empty: after load m of `etcdctl check
/// perf` and its Defragment (VACUUM), the writer spent a third of its
/// PostgreSQL backend's time planning, through all of load l.
pub async fn set_postgres_writer_session(conn: &mut PgConnection) -> sqlx::Result<()> {
    set_postgres_session(conn).await?;
    conn.execute("SET plan_cache_mode = force_generic_plan")
        .await?;
    Ok(())
}

/// Copies the SQLite WAL back into the database file every quarter second,
/// without blocking readers or the writer (PASSIVE), so that commits do not
/// pay for checkpoints. Ends when the pool is closed.
fn spawn_sqlite_checkpointer(pool: sqlx::SqlitePool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                tracing::debug!(error = %e, "sqlite checkpoint failed; will retry");
            }
        }
    });
}

async fn create_postgres_database(server: &PgConnectOptions, database: &str) -> Result<()> {
    // Connect to the maintenance database to create ours.
    let mut conn = server.clone().database("postgres").connect().await?;
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(database)
        .fetch_optional(&mut conn)
        .await?;
    if exists.is_none() {
        // The name was checked to be [A-Za-z0-9_-] when the endpoint was parsed.
        let created = sqlx::raw_sql(&format!("CREATE DATABASE \"{database}\""))
            .execute(&mut conn)
            .await;
        match created {
            Ok(_) => info!(database, "created postgres database"),
            // Another router created it first.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
