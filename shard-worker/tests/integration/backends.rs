//! Test databases: SQLite in a temporary folder, PostgreSQL and MySQL from
//! `KUBESHARD_TEST_POSTGRES_URL` / `KUBESHARD_TEST_MYSQL_URL`, each in a
//! database of its own that is dropped afterwards.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::FutureExt;
use kubeshard_config::Endpoint;
use kubeshard_shard_worker::{RevisionClass, ShardStore, open_store};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use tempfile::TempDir;
use url::Url;

pub const POSTGRES_ENV: &str = "KUBESHARD_TEST_POSTGRES_URL";
pub const MYSQL_ENV: &str = "KUBESHARD_TEST_MYSQL_URL";
pub const REQUIRE_ALL_ENV: &str = "KUBESHARD_TEST_REQUIRE_ALL";
/// The same servers through their Unix sockets, in the endpoint forms
/// users write (scripts/test.sh sets them).
pub const POSTGRES_SOCKET_ENV: &str = "KUBESHARD_TEST_POSTGRES_SOCKET_URL";
pub const MYSQL_SOCKET_ENV: &str = "KUBESHARD_TEST_MYSQL_SOCKET_URL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
    Mysql,
}

/// A database server to create test databases on (none for SQLite).
#[derive(Debug, Clone)]
pub struct Server {
    pub kind: Kind,
    url: Option<Url>,
}

/// The server of `kind`, or None (with a loud message) when its variable is
/// not set; under `KUBESHARD_TEST_REQUIRE_ALL=1` a missing server fails.
pub fn server(kind: Kind, test: &str) -> Option<Server> {
    let var = match kind {
        Kind::Sqlite => return Some(Server { kind, url: None }),
        Kind::Postgres => POSTGRES_ENV,
        Kind::Mysql => MYSQL_ENV,
    };
    match std::env::var(var).ok().filter(|v| !v.is_empty()) {
        Some(raw) => {
            let url = Url::parse(&raw).unwrap_or_else(|e| panic!("{var}={raw:?}: {e}"));
            Some(Server {
                kind,
                url: Some(url),
            })
        }
        None => {
            if std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| v == "1") {
                panic!("{test}: {var} is not set, and {REQUIRE_ALL_ENV}=1 forbids skipping");
            }
            eprintln!();
            eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
            eprintln!("!!! SKIPPED {test} on {kind:?}: {var} is not set");
            eprintln!("!!! (source scripts/dev-env.sh; {REQUIRE_ALL_ENV}=1 makes this fail)");
            eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
            eprintln!();
            None
        }
    }
}

/// Every backend that is configured, SQLite first.
pub fn servers(test: &str) -> Vec<Server> {
    [Kind::Sqlite, Kind::Postgres, Kind::Mysql]
        .into_iter()
        .filter_map(|k| server(k, test))
        .collect()
}

fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = (
        std::process::id(),
        std::time::SystemTime::now(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
    );
    format!("ks_prop_{:016x}", RandomState::new().hash_one(seed))
}

enum Conn {
    Pg(PgConnection),
    My(MySqlConnection),
}

/// One test database and the store opened on it.
pub struct TestDb {
    pub kind: Kind,
    class: RevisionClass,
    endpoint: Endpoint,
    pub store: Arc<dyn ShardStore>,
    server: Server,
    dir: Option<TempDir>,
    name: String,
    /// A direct connection, to empty the tables between cases.
    conn: Option<Conn>,
}

const RESET: [&str; 6] = [
    "DELETE FROM ks_history",
    "DELETE FROM ks_live",
    "DELETE FROM ks_lease",
    "DELETE FROM ks_label",
    "UPDATE ks_label_mark SET revision = 0 WHERE id = 1",
    "UPDATE ks_meta SET revision = 1, compact_revision = 0 WHERE id = 1",
];

impl Server {
    /// The PostgreSQL server's connect options (PostgreSQL only).
    pub fn postgres_options(&self) -> Option<PgConnectOptions> {
        (self.kind == Kind::Postgres)
            .then_some(self.url.as_ref())
            .flatten()
            .map(pg_options)
    }
}

fn pg_options(url: &Url) -> PgConnectOptions {
    PgConnectOptions::from_str(url.as_str()).expect("postgres url")
}

fn mysql_options(url: &Url) -> MySqlConnectOptions {
    let mut server = url.clone();
    server.set_path("");
    MySqlConnectOptions::from_str(server.as_str()).expect("mysql url")
}

impl Server {
    /// Creates a fresh database with the schema and opens a store on it.
    pub async fn create(&self) -> TestDb {
        self.create_in(RevisionClass::ALL).await
    }

    /// [`Server::create`] for a shard handing out the revisions of `class`.
    pub async fn create_in(&self, class: RevisionClass) -> TestDb {
        let name = unique_name();
        let (endpoint, dir) = match (self.kind, &self.url) {
            (Kind::Sqlite, _) => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("shard.db");
                (Endpoint::Sqlite { path }, Some(dir))
            }
            (Kind::Postgres, Some(url)) => (
                Endpoint::Postgres {
                    url: url.clone(),
                    database: name.clone(),
                },
                None,
            ),
            (Kind::Mysql, Some(url)) => (
                Endpoint::Mysql {
                    url: url.clone(),
                    database: name.clone(),
                },
                None,
            ),
            _ => unreachable!("servers have URLs"),
        };
        let store = open_store(&endpoint, class)
            .await
            .unwrap_or_else(|e| panic!("open {endpoint}: {e}"));
        let endpoint_kept = endpoint.clone();
        let conn = match (self.kind, &self.url) {
            (Kind::Postgres, Some(url)) => Some(Conn::Pg(
                pg_options(url)
                    .database(&name)
                    .connect()
                    .await
                    .expect("connect to the test database"),
            )),
            (Kind::Mysql, Some(url)) => Some(Conn::My(
                mysql_options(url)
                    .database(&name)
                    .connect()
                    .await
                    .expect("connect to the test database"),
            )),
            _ => None,
        };
        TestDb {
            kind: self.kind,
            class,
            endpoint: endpoint_kept,
            store,
            server: self.clone(),
            dir,
            name,
            conn,
        }
    }

    /// Runs `test` against a fresh database of this server, then drops the
    /// database, also when the test panics.
    pub async fn with_db<F, Fut>(&self, test: F)
    where
        F: FnOnce(Arc<dyn ShardStore>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let db = self.create().await;
        let outcome = AssertUnwindSafe(test(db.store.clone()))
            .catch_unwind()
            .await;
        db.drop_db().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

impl TestDb {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// A second store on the same database, as a second router would open.
    pub async fn open_another(&self) -> Arc<dyn ShardStore> {
        open_store(&self.endpoint, self.class)
            .await
            .unwrap_or_else(|e| panic!("open {} again: {e}", self.endpoint))
    }

    /// [`TestDb::open_another`], returning the error instead of panicking.
    pub async fn try_open_another(
        &self,
    ) -> Result<Arc<dyn ShardStore>, kubeshard_shard_worker::ShardError> {
        open_store(&self.endpoint, self.class).await
    }

    /// Runs `sql` on the database directly; returns the first column of the
    /// first row as an integer if it returns rows.
    pub async fn sql(&mut self, sql: &str) -> Option<i64> {
        use sqlx::Row;
        let rows = match (&mut self.conn, &self.endpoint) {
            (Some(Conn::Pg(c)), _) => sqlx::query(sql)
                .fetch_all(&mut *c)
                .await
                .map(|rows| rows.first().map(|r| r.get::<i64, _>(0))),
            (Some(Conn::My(c)), _) => sqlx::query(sql)
                .fetch_all(&mut *c)
                .await
                .map(|rows| rows.first().map(|r| r.get::<i64, _>(0))),
            (None, Endpoint::Sqlite { path }) => {
                let mut c = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .connect()
                    .await
                    .expect("open the SQLite file");
                let r = sqlx::query(sql)
                    .fetch_all(&mut c)
                    .await
                    .map(|rows| rows.first().map(|r| r.get::<i64, _>(0)));
                let _ = c.close().await;
                r
            }
            _ => unreachable!("PostgreSQL and MySQL test databases have a connection"),
        };
        rows.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Makes the store fresh: a new SQLite file, or emptied tables.
    pub async fn fresh(&mut self) {
        match &mut self.conn {
            None => {
                let new = self.server.create_in(self.class).await;
                self.store = new.store;
                self.dir = new.dir;
            }
            Some(Conn::Pg(c)) => {
                for st in RESET {
                    sqlx::query(st).execute(&mut *c).await.expect(st);
                }
            }
            Some(Conn::My(c)) => {
                for st in RESET {
                    sqlx::query(st).execute(&mut *c).await.expect(st);
                }
            }
        }
    }

    /// This database through its server's Unix socket, from
    /// `KUBESHARD_TEST_*_SOCKET_URL` (whose own database name is replaced);
    /// None for SQLite or when the variable is not set, which fails under
    /// `KUBESHARD_TEST_REQUIRE_ALL=1`.
    pub fn socket_endpoint(&self, test: &str) -> Option<Endpoint> {
        let var = match self.kind {
            Kind::Sqlite => return None,
            Kind::Postgres => POSTGRES_SOCKET_ENV,
            Kind::Mysql => MYSQL_SOCKET_ENV,
        };
        let Some(raw) = std::env::var(var).ok().filter(|v| !v.is_empty()) else {
            if std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| v == "1") {
                panic!("{test}: {var} is not set, and {REQUIRE_ALL_ENV}=1 forbids skipping");
            }
            eprintln!("!!! SKIPPED {test} on {:?}: {var} is not set", self.kind);
            return None;
        };
        let database = self.name.clone();
        match Endpoint::parse(&raw).unwrap_or_else(|e| panic!("{var}: {e}")) {
            Endpoint::Postgres { url, .. } => Some(Endpoint::Postgres { url, database }),
            Endpoint::Mysql { url, .. } => Some(Endpoint::Mysql { url, database }),
            Endpoint::Sqlite { .. } => panic!("{var}={raw:?} is not a server's URL"),
        }
    }

    /// Drops the database (best effort).
    pub async fn drop_db(self) {
        let TestDb {
            kind,
            class: _,
            endpoint: _,
            store,
            server,
            dir,
            name,
            conn,
        } = self;
        drop(store);
        drop(dir);
        let result = match (conn, &server.url) {
            (Some(Conn::Pg(c)), Some(url)) => {
                let _ = c.close().await;
                match pg_options(url).database("postgres").connect().await {
                    Ok(mut admin) => {
                        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                        let r = sqlx::raw_sql(&sql).execute(&mut admin).await.map(|_| ());
                        let _ = admin.close().await;
                        r
                    }
                    Err(e) => Err(e),
                }
            }
            (Some(Conn::My(c)), Some(url)) => {
                let _ = c.close().await;
                match mysql_options(url).connect().await {
                    Ok(mut admin) => {
                        let sql = format!("DROP DATABASE IF EXISTS `{name}`");
                        let r = sqlx::raw_sql(&sql).execute(&mut admin).await.map(|_| ());
                        let _ = admin.close().await;
                        r
                    }
                    Err(e) => Err(e),
                }
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            eprintln!("warning: could not drop {kind:?} test database {name}: {e}");
        }
    }
}
