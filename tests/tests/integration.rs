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
