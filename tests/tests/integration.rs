//! Differential tests: the same scripted session against a real etcd and
//! against kubeshard on each backend; the normalized transcripts must match.
//! Also the kubeshard process itself: what SIGTERM does.
//!
//! Environment:
//! - `ETCD_BIN`, `ETCDCTL_BIN`: etcd 3.4+ and etcdctl (default: on PATH).
//! - `KUBESHARD_BIN`: a prebuilt kubeshard (default: `cargo build -p kubeshard`).
//! - `KUBESHARD_TEST_POSTGRES_URL`, `KUBESHARD_TEST_MYSQL_URL`: database servers
//!   (each run uses a fresh database `ks_<random hex>` on them).
//! - `KUBESHARD_TEST_REQUIRE_ALL=1`: a missing tool or backend fails instead of
//!   skipping.
#![allow(clippy::expect_used)]

#[path = "integration/frozen_database.rs"]
mod frozen_database;
#[path = "integration/full_disk.rs"]
mod full_disk;
#[path = "integration/fuzz.rs"]
mod fuzz;
#[path = "integration/import.rs"]
mod import;
#[path = "integration/online_reshard.rs"]
mod online_reshard;
#[path = "integration/reshard.rs"]
mod reshard;

use std::path::Path;

use kubeshard_tests::env::EtcdTools;
use kubeshard_tests::server::{Backend, EtcdServer, KubeshardServer, Server};
use kubeshard_tests::{assert_differential, assert_differential_with};

fn out_dir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

async fn differential(test: &str, backend: Backend) {
    let Some(tools) = EtcdTools::find(test) else {
        return;
    };
    let Some(kubeshard) = KubeshardServer::start(test, backend).await else {
        return;
    };
    let etcd = EtcdServer::start(&tools).await;
    assert_differential(test, &etcd, &kubeshard, &tools, out_dir()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_sqlite() {
    differential("differential_sqlite", Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_postgres() {
    differential("differential_postgres", Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_mysql() {
    differential("differential_mysql", Backend::Mysql).await;
}

/// The steps of the session whose Txn spans the pods shard and the default
/// shard of the sharded topology.
const CROSS_SHARD_TXNS: usize = 3;

async fn differential_sharded(test: &str, backends: [Backend; 3]) {
    let Some(tools) = EtcdTools::find(test) else {
        return;
    };
    let Some(kubeshard) = KubeshardServer::start_sharded(test, backends).await else {
        return;
    };
    let etcd = EtcdServer::start(&tools).await;
    assert_differential_with(test, &etcd, &kubeshard, &tools, out_dir(), CROSS_SHARD_TXNS).await;
}

/// Three SQLite shards: pods, events, the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_sharded_sqlite() {
    differential_sharded("differential_sharded_sqlite", [Backend::Sqlite; 3]).await;
}

/// The default shard and events on PostgreSQL, pods on MariaDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_sharded_postgres_mariadb() {
    differential_sharded(
        "differential_sharded_postgres_mariadb",
        [Backend::Postgres, Backend::Mysql, Backend::Postgres],
    )
    .await;
}

/// SIGTERM while clients write and watch: the watch ends with etcd's status
/// for a stopping server (its clients retry on it), and the process exits 0
/// within its grace period (7 s). What became of the writes is checked by
/// the router's own shutdown test, which restarts on the same database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_writes_exits_zero() {
    let test = "sigterm_under_writes_exits_zero";
    let Some(mut server) = KubeshardServer::start(test, Backend::Sqlite).await else {
        return;
    };
    let mut client = kubeshard_tests::server::connect(&server.endpoint())
        .await
        .expect("connect");
    let (_tx, mut watch) = client
        .watch("/t/", Some(etcd_client::WatchOptions::new().with_prefix()))
        .await
        .expect("watch")
        .split();
    let created = watch.message().await.expect("watch created");
    assert!(created.is_some_and(|r| r.created()), "watch created");
    let writer = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut acknowledged = 0;
            for n in 0.. {
                let put = client.put(format!("/t/{n}"), "v", None);
                match tokio::time::timeout(std::time::Duration::from_secs(10), put).await {
                    Ok(Ok(_)) => acknowledged += 1,
                    _ => break,
                }
            }
            acknowledged
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let status =
        tokio::task::block_in_place(|| server.terminate(std::time::Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail()));
    assert!(
        status.success(),
        "kubeshard exited with {status}\n{}",
        server.log_tail()
    );
    let ended = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), watch.message()).await {
            Ok(Ok(Some(_))) => continue,
            other => break other,
        }
    };
    match ended {
        Ok(Err(etcd_client::Error::GRpcStatus(s))) => assert_eq!(
            (s.code() as i32, s.message()),
            (14, "etcdserver: server stopped"),
            "gRPC code and message (14 is Unavailable)"
        ),
        other => panic!("the watch ended with {other:?}, not etcd's status"),
    }
    let acknowledged = writer.await.expect("writer");
    assert!(acknowledged > 0, "no put acknowledged before SIGTERM");
}

/// Two independent real etcds must give identical transcripts: this proves
/// the normalization keeps only what a correct server must reproduce, and
/// that the session is not flaky.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_etcd_vs_etcd() {
    let test = "differential_etcd_vs_etcd";
    let Some(tools) = EtcdTools::find(test) else {
        return;
    };
    let a = EtcdServer::start(&tools).await;
    let b = EtcdServer::start(&tools).await;
    assert_differential(test, &a, &b, &tools, out_dir()).await;
}

/// kine's command lines as its and k3s's documentation write them start
/// kubeshard, which then serves: kine's examples/minimal.md (MySQL with TLS
/// to the database and a client certificate), kine's test-run-postgres
/// (`sslmode=disable` in the URL), and the `KINE_*` variable form. The TLS
/// databases are the ones scripts/test.sh sets up (a user that may only log
/// in with the test CA's client certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kine_documented_command_lines_start() {
    let test = "kine_documented_command_lines_start";
    let vars = [
        "KUBESHARD_TEST_MYSQL_TLS_URL",
        "KUBESHARD_TEST_TLS_DIR",
        "KUBESHARD_TEST_POSTGRES_URL",
        "KUBESHARD_TEST_MYSQL_URL",
    ];
    let Ok(values) = vars
        .iter()
        .map(std::env::var)
        .collect::<Result<Vec<_>, _>>()
    else {
        kubeshard_tests::env::skip::<()>(
            test,
            "the TLS databases of scripts/test.sh are not set up",
        );
        return;
    };
    let [mysql_tls, tls_dir, postgres, mysql] =
        <[String; 4]>::try_from(values).expect("four values");
    let tls_dir = Path::new(&tls_dir);
    let stamp = format!("{:08x}", std::process::id());
    let database = |base: &str, name: &str| {
        format!(
            "{}/ks_kine_{stamp}_{name}",
            base.rsplit_once('/').expect("URL with a path").0
        )
    };
    // The kine DSN form: user:pass@tcp(host:port)/db.
    let kine_mysql = {
        let db = database(&mysql_tls, "mysql");
        let (scheme, rest) = db.split_once("://").expect("URL");
        let (user, rest) = rest.split_once('@').expect("user");
        let (host, path) = rest.split_once('/').expect("path");
        format!("{scheme}://{user}@tcp({host})/{path}")
    };
    let file = |name: &str| tls_dir.join(name).display().to_string();
    // Backend, arguments, environment, the database to drop afterwards.
    type Line = (Backend, Vec<String>, Vec<(String, String)>, String);
    let lines: Vec<Line> = vec![
        (
            Backend::Mysql,
            vec![
                "--endpoint".into(),
                kine_mysql,
                "--ca-file".into(),
                file("ca.crt"),
                "--cert-file".into(),
                file("client.crt"),
                "--key-file".into(),
                file("client.key"),
            ],
            vec![],
            database(&mysql, "mysql"),
        ),
        (
            Backend::Postgres,
            vec![
                "--endpoint".into(),
                format!("{}?sslmode=disable", database(&postgres, "pg")),
            ],
            vec![],
            database(&postgres, "pg"),
        ),
        (
            Backend::Postgres,
            vec![],
            vec![
                ("KINE_ENDPOINT".into(), database(&postgres, "env")),
                ("KINE_METRICS_IGNORE_TLS_CONFIG".into(), "true".into()),
                ("KINE_COMPACT_INTERVAL".into(), "5m".into()),
                ("KINE_LOG_FORMAT".into(), "json".into()),
            ],
            database(&postgres, "env"),
        ),
    ];
    for (backend, args, env, drop_url) in lines {
        let shown = format!("{args:?} {env:?}");
        let server = KubeshardServer::start_with(backend, args, env, vec![drop_url.clone()]).await;
        let mut client = kubeshard_tests::server::connect(&server.endpoint())
            .await
            .unwrap_or_else(|e| panic!("{shown}: connect: {e}"));
        client
            .put("/kine/line", "started", None)
            .await
            .unwrap_or_else(|e| panic!("{shown}: put: {e}\n{}", server.log_tail()));
        let got = client.get("/kine/line", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"started", "{shown}");
        // Served from the database the line names (not a default one).
        let name = drop_url.rsplit('/').next().unwrap_or_default();
        assert!(
            server.log_tail().contains(name),
            "{shown}: the log does not name {name}:\n{}",
            server.log_tail()
        );
    }
}
