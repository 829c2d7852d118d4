//! Differential tests: the same scripted session against a real etcd and
//! against kubeshard on each backend; the normalized transcripts must match.
//!
//! Environment:
//! - `ETCD_BIN`, `ETCDCTL_BIN`: etcd 3.4+ and etcdctl (default: on PATH).
//! - `KUBESHARD_BIN`: a prebuilt kubeshard (default: `cargo build -p kubeshard`).
//! - `KUBESHARD_TEST_POSTGRES_URL`, `KUBESHARD_TEST_MYSQL_URL`: database servers
//!   (each run uses a fresh database `ks_<random hex>` on them).
//! - `KUBESHARD_TEST_REQUIRE_ALL=1`: a missing tool or backend fails instead of
//!   skipping.

use std::path::Path;

use kubeshard_tests::env::EtcdTools;
use kubeshard_tests::server::{Backend, EtcdServer, KubeshardServer};
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
