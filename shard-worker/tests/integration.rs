//! The shard store against a model of etcd's MVCC: random operation
//! sequences on every configured backend (SQLite always; PostgreSQL and
//! MySQL from KUBESHARD_TEST_POSTGRES_URL / KUBESHARD_TEST_MYSQL_URL), plus
//! deterministic regression tests.
//!
//! Cases per backend: 128 on SQLite, 48 on PostgreSQL and MySQL, or
//! PROPTEST_CASES. A failure prints what ran, with the model's answers.
//!
//! Generated txns include the put-then-delete of one key across nested txns
//! that etcd accepts (`ops::AVOID_PUT_THEN_DELETE_IN_ONE_TXN`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "integration/backends.rs"]
mod backends;
#[path = "integration/bulk.rs"]
mod bulk;
#[path = "integration/model.rs"]
mod model;
#[path = "integration/ops.rs"]
mod ops;
#[path = "integration/run.rs"]
mod run;
#[path = "integration/show.rs"]
mod show;

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;

use kubeshard_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kubeshard_proto::etcdserverpb::request_op::Request;
use kubeshard_proto::etcdserverpb::response_op::Response;
use kubeshard_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use kubeshard_proto::mvccpb::KeyValue;
use kubeshard_shard_worker::{
    KeyRange, RevisionClass, ShardError, ShardStore, WritePath, WriteRequest, WriteResponse,
};
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use backends::Kind;
use model::{Fail, Resp};
use run::Runner;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Random sequences on fresh stores of `kind`, each compared with the model.
fn property(kind: Kind, default_cases: u32) {
    let test = format!("model_matches_store on {kind:?}");
    let Some(server) = backends::server(kind, "model_matches_store") else {
        return;
    };
    let rt = runtime();
    // Shard 1 of 3: revisions with gaps, as in a multi-shard topology; the
    // deterministic tests below cover the dense revisions of one shard.
    let class = RevisionClass::of_shard(1, 3).expect("1 < 3");
    let db = tokio::sync::Mutex::new(rt.block_on(server.create_in(class)));
    let cases = cases(default_cases);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    let result = runner.run(&ops::case(), |case| {
        rt.block_on(async {
            let mut db = db.lock().await;
            db.fresh().await;
            let run = run::run_case(&*db.store, class, &case);
            match tokio::time::timeout(Duration::from_secs(120), run).await {
                Ok(outcome) => outcome,
                Err(_) => Err("case timed out after 120 s".to_string()),
            }
        })
        .map_err(TestCaseError::fail)
    });
    rt.block_on(db.into_inner().drop_db());
    eprintln!("{test}: {cases} cases in {:.1?}", started.elapsed());
    if let Err(e) = result {
        panic!("{test}: {e}");
    }
}

#[test]
fn model_matches_store_sqlite() {
    property(Kind::Sqlite, 128);
}

#[test]
fn model_matches_store_postgres() {
    property(Kind::Postgres, 48);
}

#[test]
fn model_matches_store_mysql() {
    property(Kind::Mysql, 48);
}

// ---- deterministic regression tests, on every configured backend ----

/// Runs `test` on a fresh database of every configured backend.
fn on_every_backend<F>(name: &str, test: F)
where
    F: for<'a> Fn(&'a dyn ShardStore, Kind) -> futures::future::BoxFuture<'a, ()>,
{
    let rt = runtime();
    let test = &test;
    for server in backends::servers(name) {
        let kind = server.kind;
        rt.block_on(server.with_db(|store| async move { test(&*store, kind).await }));
    }
}

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

fn delete(key: &str, end: &str, prev_kv: bool) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: key.into(),
        range_end: end.into(),
        prev_kv,
    }
}

fn get(key: &str, end: &str, revision: i64) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        range_end: end.into(),
        revision,
        ..Default::default()
    }
}

fn op(request: Request) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

fn cmp(key: &str, target: CompareTarget, result: CompareResult, union: TargetUnion) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        range_end: Vec::new(),
        target_union: Some(union),
    }
}

fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare,
        success,
        failure,
    }
}

fn kv(key: &str, value: &str, create: i64, modified: i64, version: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        create_revision: create,
        mod_revision: modified,
        version,
        value: value.into(),
        lease: 0,
    }
}

fn txn_resp(r: &Result<Resp, Fail>) -> &TxnResponse {
    match r {
        Ok(Resp::Txn(t)) => t,
        other => panic!("not a txn answer: {}", show::answer(other)),
    }
}

/// Runs the pending writes as one batch; panics with the trace on a mismatch.
async fn flush(r: &mut Runner<'_>) -> Vec<Result<Resp, Fail>> {
    match r.flush().await {
        Ok(answers) => answers,
        Err(e) => panic!("{e}\n--- what ran:\n{}", r.steps.join("\n")),
    }
}

async fn check_all(r: &mut Runner<'_>) {
    for page in [1, 100] {
        if let Err(e) = r.check_all(page).await {
            panic!("{e}\n--- what ran:\n{}", r.steps.join("\n"));
        }
    }
}

#[test]
fn nested_txn() {
    on_every_backend("nested_txn", |store, _| {
        Box::pin(async move {
            use CompareResult::{Equal, Greater};
            use CompareTarget::{Mod, Value, Version};
            let mut r = Runner::new(store);
            r.write(WriteRequest::Put(put("a", "1")));
            r.write(WriteRequest::Put(put("b", "1")));
            flush(&mut r).await;

            // Nested compares see the state before the txn: "c" is missing
            // there, so its version compares as 0 although the outer branch
            // has already put it.
            let inner = txn(
                vec![cmp("b", Mod, Greater, TargetUnion::ModRevision(100))],
                vec![],
                vec![op(Request::RequestDeleteRange(delete("b", "", true)))],
            );
            let middle = txn(
                vec![cmp("c", Version, Equal, TargetUnion::Version(0))],
                vec![
                    op(Request::RequestRange(get("a", "\0", 0))),
                    op(Request::RequestPut(put("d/1", "y"))),
                    op(Request::RequestTxn(inner)),
                ],
                vec![op(Request::RequestPut(put("e", "no")))],
            );
            let outer = txn(
                vec![cmp("a", Value, Equal, TargetUnion::Value("1".into()))],
                vec![
                    op(Request::RequestPut(put("c", "x"))),
                    op(Request::RequestTxn(middle)),
                    op(Request::RequestRange(get("b", "e", 0))),
                ],
                vec![],
            );
            r.write(WriteRequest::Txn(outer));
            // A nested put with an unknown lease fails the whole txn before
            // anything is written.
            let mut leased = put("b", "2");
            leased.lease = 77;
            r.write(WriteRequest::Txn(txn(
                vec![],
                vec![
                    op(Request::RequestPut(put("a", "2"))),
                    op(Request::RequestTxn(txn(
                        vec![],
                        vec![op(Request::RequestPut(leased))],
                        vec![],
                    ))),
                ],
                vec![],
            )));
            // etcd checks every put of a txn (nested ones too) before any
            // range: the unknown lease is reported, not the future revision
            // that comes first in the request.
            let mut leased = put("c", "3");
            leased.lease = 78;
            r.write(WriteRequest::Txn(txn(
                vec![],
                vec![
                    op(Request::RequestTxn(txn(
                        vec![],
                        vec![op(Request::RequestRange(get("a", "", 100)))],
                        vec![],
                    ))),
                    op(Request::RequestPut(leased)),
                ],
                vec![],
            )));
            let answers = flush(&mut r).await;

            let t = txn_resp(&answers[0]);
            assert_eq!(t.header.as_ref().map(|h| h.revision), Some(4));
            assert!(t.succeeded);
            let Some(Response::ResponseTxn(middle)) = &t.responses[1].response else {
                panic!("no nested txn answer");
            };
            // etcd leaves the header of a nested txn answer empty.
            assert_eq!(middle.header.as_ref().map(|h| h.revision), Some(0));
            assert!(middle.succeeded);
            let Some(Response::ResponseRange(seen)) = &middle.responses[0].response else {
                panic!("no range answer");
            };
            // The read inside the txn sees the txn's own earlier put of "c".
            assert_eq!(
                seen.kvs,
                vec![
                    kv("a", "1", 2, 2, 1),
                    kv("b", "1", 3, 3, 1),
                    kv("c", "x", 4, 4, 1)
                ]
            );
            let Some(Response::ResponseTxn(inner)) = &middle.responses[2].response else {
                panic!("no inner txn answer");
            };
            assert!(!inner.succeeded);
            let Some(Response::ResponseRange(last)) = &t.responses[2].response else {
                panic!("no range answer");
            };
            // b was deleted by the inner txn: [b, e) holds c and d/1 at 4.
            assert_eq!(
                last.kvs,
                vec![kv("c", "x", 4, 4, 1), kv("d/1", "y", 4, 4, 1)]
            );
            assert_eq!(answers[1], Err(Fail::LeaseNotFound));
            assert_eq!(answers[2], Err(Fail::LeaseNotFound));
            assert_eq!(r.model.rev, 4);
            check_all(&mut r).await;
        })
    });
}

/// One increment of `/counter` by compare-and-swap on its mod_revision
/// (kube-apiserver's update), batched with a put of a key of its own;
/// retried until the swap succeeds. Returns every revision it was given
/// and how each batch was committed.
async fn increment(store: &dyn ShardStore, own_key: &str) -> (Vec<i64>, Vec<WritePath>) {
    use CompareResult::Equal;
    use CompareTarget::Mod;
    let mut revisions = Vec::new();
    let mut paths = Vec::new();
    loop {
        let got = store
            .range(&get("/counter", "", 0))
            .await
            .expect("get /counter");
        let current = &got.kvs[0];
        let value: i64 = std::str::from_utf8(&current.value)
            .expect("utf-8")
            .parse()
            .expect("a number");
        let swap = txn(
            vec![cmp(
                "/counter",
                Mod,
                Equal,
                TargetUnion::ModRevision(current.mod_revision),
            )],
            vec![op(Request::RequestPut(put(
                "/counter",
                &(value + 1).to_string(),
            )))],
            vec![],
        );
        let batch = [
            WriteRequest::Txn(swap),
            WriteRequest::Put(put(own_key, "x")),
        ];
        let committed = store.commit_batch(&batch, true).await.expect("batch");
        paths.push(committed.path);
        let events = committed.events.expect("events were asked for");
        assert!(
            events.iter().all(|e| {
                let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                rev > committed.before && rev <= committed.last
            }),
            "events outside ({}, {}]",
            committed.before,
            committed.last
        );
        let [Ok(WriteResponse::Txn(swapped)), Ok(WriteResponse::Put(own))] =
            &committed.responses[..]
        else {
            panic!("answers: {:?}", committed.responses);
        };
        revisions.push(own.header.as_ref().expect("header").revision);
        if swapped.succeeded {
            revisions.push(swapped.header.as_ref().expect("header").revision);
            return (revisions, paths);
        }
    }
}

/// Two stores on one database (two routers behind a load balancer), eight
/// writers incrementing one counter by compare-and-swap: no increment is
/// lost or doubled, no revision is given twice, and the counter's history
/// counts up by one per revision. On PostgreSQL batches run guarded (no lock
/// while reading, `guarded_writes.rs`), so this is where a guard that let a
/// stale batch commit would lose an increment.
#[test]
fn two_stores_on_one_database_lose_no_update() {
    const WRITERS: usize = 8;
    const INCREMENTS: usize = 25;
    let rt = runtime();
    for server in backends::servers("two_stores_on_one_database_lose_no_update") {
        rt.block_on(async {
            let db = server.create().await;
            let stores = [db.store.clone(), db.open_another().await];
            let outcome = AssertUnwindSafe(async {
                stores[0]
                    .apply_batch(&[WriteRequest::Put(put("/counter", "0"))])
                    .await
                    .expect("seed");
                let writers = (0..WRITERS).map(|w| {
                    let store = stores[w % 2].clone();
                    async move {
                        let mut revisions = Vec::new();
                        let mut paths = Vec::new();
                        for i in 0..INCREMENTS {
                            let (r, p) = increment(&*store, &format!("/own/{w}/{i}")).await;
                            revisions.extend(r);
                            paths.extend(p);
                        }
                        (revisions, paths)
                    }
                });
                let results = futures::future::join_all(writers).await;
                let mut revisions: Vec<i64> = results
                    .iter()
                    .flat_map(|(r, _)| r.iter().copied())
                    .collect();
                let given = revisions.len();
                revisions.sort_unstable();
                revisions.dedup();
                assert_eq!(revisions.len(), given, "a revision was given twice");
                let paths: Vec<WritePath> = results
                    .iter()
                    .flat_map(|(_, p)| p.iter().copied())
                    .collect();
                let count = |path| paths.iter().filter(|p| **p == path).count();
                let guarded = count(WritePath::Guarded);
                let speculative = count(WritePath::Speculative);
                let reruns = count(WritePath::RerunLocked);
                eprintln!(
                    "{:?}: {} batches, {speculative} speculative, {guarded} guarded, \
                     {reruns} run again under the lock",
                    server.kind,
                    paths.len()
                );
                if server.kind == Kind::Postgres {
                    assert!(guarded > 0, "no batch ran guarded on PostgreSQL");
                    assert!(speculative > 0, "no batch ran speculative on PostgreSQL");
                    assert!(reruns > 0, "no guard failed although two stores raced");
                }

                let total = (WRITERS * INCREMENTS) as i64;
                let got = stores[1].range(&get("/counter", "", 0)).await.expect("get");
                assert_eq!(got.kvs[0].value, total.to_string().into_bytes());
                let now = stores[0].revisions().await.expect("revisions").current;
                let history = stores[0]
                    .history(&KeyRange::new(b"/counter", b""), 1, now, 100_000)
                    .await
                    .expect("history");
                let values: Vec<Vec<u8>> = history
                    .events
                    .iter()
                    .map(|e| e.kv.as_ref().expect("kv").value.clone())
                    .collect();
                let expected: Vec<Vec<u8>> =
                    (0..=total).map(|v| v.to_string().into_bytes()).collect();
                assert_eq!(values, expected, "the counter's history");
            })
            .catch_unwind()
            .await;
            drop(stores);
            db.drop_db().await;
            if let Err(panic) = outcome {
                std::panic::resume_unwind(panic);
            }
        });
    }
}

/// Unix-socket endpoints (`?host=/folder` for PostgreSQL, kine's `unix(...)`
/// for MySQL) reach the same database as TCP: what one store writes, the
/// other reads.
#[test]
fn unix_socket_endpoints_reach_the_same_database() {
    const TEST: &str = "unix_socket_endpoints_reach_the_same_database";
    let rt = runtime();
    for server in backends::servers(TEST) {
        rt.block_on(async {
            let db = server.create().await;
            let Some(endpoint) = db.socket_endpoint(TEST) else {
                db.drop_db().await;
                return;
            };
            let outcome = AssertUnwindSafe(async {
                let server_of = endpoint.server().unwrap_or_default();
                assert!(server_of.starts_with("unix:/"), "{endpoint}: {server_of}");
                let over_socket = kubeshard_shard_worker::open_store(&endpoint, RevisionClass::ALL)
                    .await
                    .unwrap_or_else(|e| panic!("open {endpoint}: {e}"));
                db.store
                    .apply_batch(&[WriteRequest::Put(put("/tcp", "1"))])
                    .await
                    .expect("put over TCP");
                over_socket
                    .apply_batch(&[WriteRequest::Put(put("/socket", "2"))])
                    .await
                    .expect("put over the socket");
                for store in [&db.store, &over_socket] {
                    let got = store.range(&get("/", "0", 0)).await.expect("range");
                    let keys: Vec<&[u8]> = got.kvs.iter().map(|kv| kv.key.as_slice()).collect();
                    assert_eq!(keys, [b"/socket".as_slice(), b"/tcp"], "{:?}", server.kind);
                }
                // The socket is really used: at a path where none exists,
                // opening fails instead of falling back to TCP.
                let nowhere = match server.kind {
                    Kind::Postgres => "postgres://kubeshard:kubeshard@/x?host=/nonexistent-ks",
                    _ => "mysql://kubeshard:kubeshard@unix(/nonexistent-ks/mysqld.sock)/x",
                };
                let nowhere = kubeshard_config::Endpoint::parse(nowhere).expect("endpoint");
                let opened = tokio::time::timeout(
                    Duration::from_secs(30),
                    kubeshard_shard_worker::open_store(&nowhere, RevisionClass::ALL),
                )
                .await
                .expect("a missing socket is refused in time");
                assert!(opened.is_err(), "{nowhere} opened without its socket");
            })
            .catch_unwind()
            .await;
            db.drop_db().await;
            if let Err(panic) = outcome {
                std::panic::resume_unwind(panic);
            }
        });
    }
}

/// A speculative batch (PostgreSQL) assumes that keys its writer does not
/// know are absent. When one exists after all, the statement must write
/// nothing, and the batch must be answered from the key's real state.
#[test]
fn speculative_batch_on_an_unknown_existing_key_answers_from_the_database() {
    let Some(server) = backends::server(Kind::Postgres, "speculative_batch_on_an_unknown_key")
    else {
        return;
    };
    let rt = runtime();
    rt.block_on(server.with_db(|store| async move {
        let commit = |request: WriteRequest| {
            let store = store.clone();
            async move { store.commit_batch(&[request], false).await.expect("batch") }
        };
        commit(WriteRequest::Put(put("/x", "v1"))).await;
        // A lease grant runs under the lock, after which the writer knows
        // nothing; the next batch reads and knows only its own key.
        commit(WriteRequest::LeaseGrant {
            id: 7,
            ttl: 60,
            now_ms: 0,
        })
        .await;
        let read = commit(WriteRequest::Put(put("/y", "1"))).await;
        assert_eq!(read.path, WritePath::Guarded);
        // "/x" is unknown, so assumed absent: wrong.
        let mut with_prev = put("/x", "v2");
        with_prev.prev_kv = true;
        let corrected = commit(WriteRequest::Put(with_prev.clone())).await;
        assert_eq!(corrected.path, WritePath::Guarded, "the assumption failed");
        let [Ok(WriteResponse::Put(answer))] = &corrected.responses[..] else {
            panic!("answers: {:?}", corrected.responses);
        };
        let prev = answer.prev_kv.as_ref().expect("/x existed");
        assert_eq!((prev.value.as_slice(), prev.version), (&b"v1"[..], 1));
        // Now "/x" is known: after a pause of a few ordinary batches (a
        // wrong guess costs a statement), puts are speculative, and right.
        let mut last = corrected;
        for version in 2..=8 {
            let next = commit(WriteRequest::Put(with_prev.clone())).await;
            let [Ok(WriteResponse::Put(answer))] = &next.responses[..] else {
                panic!("answers: {:?}", next.responses);
            };
            let prev = answer.prev_kv.as_ref().expect("/x existed");
            assert_eq!((prev.version, prev.mod_revision), (version, last.last));
            last = next;
        }
        assert_eq!(last.path, WritePath::Speculative);
        let got = store.range(&get("/x", "", 0)).await.expect("get");
        assert_eq!(got.kvs[0].version, 9);
        assert_eq!(got.kvs[0].mod_revision, last.last);
    }));
}

/// The plan PostgreSQL keeps for a lookup by key prepared on an empty,
/// vacuumed table, on a new connection, set up as a shard's if `as_shard`.
async fn generic_plan_on_empty_table(
    options: sqlx::postgres::PgConnectOptions,
    as_shard: bool,
) -> String {
    use sqlx::{ConnectOptions, Executor, Row};
    let mut conn = options.connect().await.expect("connect");
    if as_shard {
        kubeshard_shard_worker::connect::set_postgres_session(&mut conn)
            .await
            .expect("session settings");
    }
    conn.execute("CREATE TEMP TABLE plan_probe (k bytea PRIMARY KEY, v bytea NOT NULL)")
        .await
        .expect("create");
    conn.execute("VACUUM plan_probe").await.expect("vacuum");
    // What PostgreSQL settles on after five executions of a prepared statement.
    conn.execute("SET plan_cache_mode = force_generic_plan")
        .await
        .expect("set");
    let rows = sqlx::query("EXPLAIN SELECT v FROM plan_probe WHERE k = $1")
        .bind(b"key".as_slice())
        .fetch_all(&mut conn)
        .await
        .expect("explain");
    rows.iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How many times PostgreSQL planned a statement prepared and run ten
/// times on a table emptied and vacuumed (as after load m and a
/// Defragment), on a new connection, set up as the shard writer's if
/// `as_writer`: (custom plans, generic plans).
async fn plans_after_vacuum(
    options: sqlx::postgres::PgConnectOptions,
    as_writer: bool,
) -> (i64, i64) {
    use sqlx::{ConnectOptions, Executor, Row};
    let mut conn = options.connect().await.expect("connect");
    if as_writer {
        kubeshard_shard_worker::connect::set_postgres_writer_session(&mut conn)
            .await
            .expect("session settings");
    }
    conn.execute("CREATE TEMP TABLE plan_probe (k bytea PRIMARY KEY, v bytea NOT NULL)")
        .await
        .expect("create");
    conn.execute(
        "INSERT INTO plan_probe SELECT int8send(i), int8send(i) FROM generate_series(1, 1000) i",
    )
    .await
    .expect("fill");
    conn.execute("DELETE FROM plan_probe").await.expect("empty");
    conn.execute("VACUUM plan_probe").await.expect("vacuum");
    for i in 0..10_i64 {
        sqlx::query("SELECT v FROM plan_probe WHERE k = $1")
            .bind(i.to_be_bytes().to_vec())
            .fetch_all(&mut conn)
            .await
            .expect("lookup");
    }
    let row = sqlx::query(
        "SELECT custom_plans, generic_plans FROM pg_prepared_statements \
         WHERE statement LIKE 'SELECT v FROM plan_probe%'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("plan counts");
    (row.get(0), row.get(1))
}

/// The shard writer's statements are planned once, not at every
/// execution (`connect::set_postgres_writer_session`).
#[test]
fn postgres_writer_plans_its_statements_once() {
    let Some(server) = backends::server(Kind::Postgres, "postgres_writer_plans_once") else {
        return;
    };
    let Some(options) = server.postgres_options() else {
        panic!("a PostgreSQL server has connect options");
    };
    let rt = runtime();
    let (custom, generic) = rt.block_on(plans_after_vacuum(options.clone(), false));
    eprintln!("default session: {custom} custom plans, {generic} generic plans");
    assert!(
        custom >= 5,
        "by default the first executions are planned one by one: {custom}, {generic}"
    );
    let (custom, generic) = rt.block_on(plans_after_vacuum(options, true));
    assert_eq!((custom, generic), (0, 10));
}

/// A statement prepared while a shard's table is empty (after a Defragment
/// of an emptied shard) must still find rows by index once the table has
/// grown: PostgreSQL connections run without sequential scans
/// (`connect::set_postgres_session`).
#[test]
fn postgres_plans_lookups_by_index_on_an_empty_table() {
    let Some(server) = backends::server(Kind::Postgres, "postgres_plans_lookups_by_index") else {
        return;
    };
    let Some(options) = server.postgres_options() else {
        panic!("a PostgreSQL server has connect options");
    };
    let rt = runtime();
    let plain = rt.block_on(generic_plan_on_empty_table(options.clone(), false));
    assert!(
        plain.contains("Seq Scan"),
        "the default planner scans an empty table (the case guarded against): {plain}"
    );
    let plan = rt.block_on(generic_plan_on_empty_table(options, true));
    assert!(plan.contains("Index Scan"), "{plan}");
}

#[test]
fn range_delete_and_put_in_one_batch() {
    on_every_backend("range_delete_and_put_in_one_batch", |store, _| {
        Box::pin(async move {
            let mut r = Runner::new(store);
            for k in ["a", "b", "c"] {
                r.write(WriteRequest::Put(put(k, "1")));
            }
            flush(&mut r).await;
            // revisions 5..=9, each request of the batch its own revision
            r.write(WriteRequest::DeleteRange(delete("a", "c", true)));
            r.write(WriteRequest::Put(put("b", "2")));
            r.write(WriteRequest::Put(put("d/1", "1")));
            r.write(WriteRequest::DeleteRange(delete("a", "\0", false)));
            r.write(WriteRequest::Put(put("a", "3")));
            // a put and then a range delete covering it, in one batch
            r.write(WriteRequest::Put(put("e", "1")));
            r.write(WriteRequest::DeleteRange(delete("d", "f", true)));
            r.write(WriteRequest::Txn(txn(
                vec![cmp(
                    "e",
                    CompareTarget::Version,
                    CompareResult::Equal,
                    TargetUnion::Version(0),
                )],
                vec![op(Request::RequestRange(get("\0", "\0", 0)))],
                vec![],
            )));
            let answers = flush(&mut r).await;
            let deleted = |a: &Result<Resp, Fail>| match a {
                Ok(Resp::DeleteRange(d)) => d.deleted,
                other => panic!("not a delete answer: {}", show::answer(other)),
            };
            assert_eq!(deleted(&answers[0]), 2);
            assert_eq!(deleted(&answers[3]), 3);
            assert_eq!(deleted(&answers[6]), 1);
            assert!(txn_resp(&answers[7]).succeeded);
            assert_eq!(r.model.rev, 11);
            // b came back in a new generation at 6.
            let at6 = store.range(&get("b", "", 6)).await.expect("range at 6");
            assert_eq!(at6.kvs, vec![kv("b", "2", 6, 6, 1)]);
            let now = store.range(&get("\0", "\0", 0)).await.expect("range");
            assert_eq!(now.kvs, vec![kv("a", "3", 9, 9, 1)]);
            check_all(&mut r).await;
        })
    });
}

#[test]
fn compaction_then_history() {
    on_every_backend("compaction_then_history", |store, _| {
        Box::pin(async move {
            let mut r = Runner::new(store);
            r.write(WriteRequest::Put(put("a", "1"))); // 2
            r.write(WriteRequest::Put(put("b", "1"))); // 3
            flush(&mut r).await;
            r.write(WriteRequest::Put(put("a", "2"))); // 4
            r.write(WriteRequest::DeleteRange(delete("b", "", false))); // 5
            r.write(WriteRequest::Put(put("c", "1"))); // 6
            flush(&mut r).await;
            r.write(WriteRequest::Put(put("a", "3"))); // 7
            r.write(WriteRequest::Compact { revision: 5 });
            r.write(WriteRequest::Compact { revision: 5 });
            r.write(WriteRequest::Compact { revision: 8 });
            let answers = flush(&mut r).await;
            assert_eq!(answers[1], Ok(Resp::Compact { revision: 7 }));
            assert_eq!(answers[2], Err(Fail::Compacted(5)));
            assert_eq!(answers[3], Err(Fail::FutureRevision));

            assert!(matches!(
                store.range(&get("a", "", 4)).await,
                Err(ShardError::Compacted {
                    compact_revision: 5
                })
            ));
            let at5 = store.range(&get("\0", "\0", 5)).await.expect("range at 5");
            assert_eq!(at5.kvs, vec![kv("a", "2", 2, 4, 2)]);
            let whole = KeyRange::new(b"\0", b"\0");
            assert!(matches!(
                store.history(&whole, 4, 7, 100).await,
                Err(ShardError::Compacted {
                    compact_revision: 5
                })
            ));
            let events = store.history(&whole, 5, 7, 100).await.expect("history");
            let revs: Vec<i64> = events
                .events
                .iter()
                .map(|e| e.kv.as_ref().map_or(0, |k| k.mod_revision))
                .collect();
            assert_eq!(revs, vec![5, 6, 7]);
            check_all(&mut r).await;

            // After the rows are removed, the delete at 5 is gone (as in
            // etcd) and the put at 7 still has its prev_kv from 4.
            r.purge(1).await.expect("purge");
            let events = store.history(&whole, 5, 7, 100).await.expect("history");
            let revs: Vec<i64> = events
                .events
                .iter()
                .map(|e| e.kv.as_ref().map_or(0, |k| k.mod_revision))
                .collect();
            assert_eq!(revs, vec![6, 7]);
            assert_eq!(events.events[1].prev_kv, Some(kv("a", "2", 2, 4, 2)));
            let at5 = store.range(&get("\0", "\0", 5)).await.expect("range at 5");
            assert_eq!(at5.kvs, vec![kv("a", "2", 2, 4, 2)]);
            check_all(&mut r).await;
        })
    });
}

/// Bytes that do not compress, so that an index limit is really reached.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = b"long/".to_vec();
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(b'a' + (x % 26) as u8);
    }
    out
}

#[test]
fn very_long_keys() {
    on_every_backend("very_long_keys", |store, kind| {
        Box::pin(async move {
            let too_long = noise(3001);
            let batch = vec![
                WriteRequest::Put(put("k1", "1")),
                WriteRequest::Put(PutRequest {
                    key: too_long.clone(),
                    value: b"v".to_vec(),
                    ..Default::default()
                }),
                WriteRequest::Put(put("k2", "2")),
                WriteRequest::Txn(txn(
                    vec![],
                    vec![op(Request::RequestPut(PutRequest {
                        key: too_long.clone(),
                        ..Default::default()
                    }))],
                    vec![],
                )),
                WriteRequest::DeleteRange(DeleteRangeRequest {
                    key: too_long.clone(),
                    ..Default::default()
                }),
            ];
            let answers = store.apply_batch(&batch).await.expect("batch commits");
            let revision = |a: &Result<WriteResponse, ShardError>| match a {
                Ok(WriteResponse::Put(p)) => p.header.as_ref().map_or(0, |h| h.revision),
                other => panic!("not a put answer: {other:?}"),
            };
            assert_eq!(revision(&answers[0]), 2);
            if kind == Kind::Sqlite {
                // SQLite has no key limit.
                assert_eq!(revision(&answers[1]), 3);
                assert_eq!(revision(&answers[2]), 4);
                assert!(answers.iter().all(Result::is_ok), "{answers:?}");
                return;
            }
            assert_eq!(revision(&answers[2]), 3);
            let max: usize = match &answers[1] {
                Err(ShardError::KeyTooLong { len: 3001, max, .. }) => *max,
                other => panic!("{kind:?}: 3001-byte key: {other:?}"),
            };
            assert!(matches!(answers[3], Err(ShardError::KeyTooLong { .. })));
            assert!(matches!(&answers[4], Ok(WriteResponse::DeleteRange(d)) if d.deleted == 0));
            // The rest of the batch committed; the refused put consumed no revision.
            let all = store.range(&get("\0", "\0", 0)).await.expect("range");
            assert_eq!(all.header.as_ref().map(|h| h.revision), Some(3));
            assert_eq!(
                all.kvs,
                vec![kv("k1", "1", 2, 2, 1), kv("k2", "2", 3, 3, 1)]
            );
            // A key of exactly the limit is stored, read and deleted.
            let longest = noise(max);
            let key = String::from_utf8(longest.clone()).expect("ascii");
            let answers = store
                .apply_batch(&[
                    WriteRequest::Put(put(&key, "v")),
                    WriteRequest::Put(put(&key, "w")),
                ])
                .await
                .expect("batch commits");
            assert!(answers.iter().all(Result::is_ok), "{kind:?}: {answers:?}");
            let got = store.range(&get(&key, "", 0)).await.expect("range");
            assert_eq!(got.kvs, vec![kv(&key, "w", 4, 5, 2)]);
            let answers = store
                .apply_batch(&[WriteRequest::DeleteRange(delete(&key, "", false))])
                .await
                .expect("batch commits");
            assert!(matches!(&answers[0], Ok(WriteResponse::DeleteRange(d)) if d.deleted == 1));
            let events = store
                .history(&KeyRange::new(&longest, b""), 1, 10, 100)
                .await
                .expect("history");
            assert_eq!(events.events.len(), 3);
        })
    });
}

/// etcd accepts a txn that puts a key in one nested txn and deletes it in a
/// later one, and applies both at one revision (checked against etcd 3.4.23):
/// the delete sees the put, the watch sees PUT then DELETE, both with the
/// value before the txn as prev_kv. (kubeshard once failed the whole write
/// batch here: its history index was unique on (key, revision).)
#[test]
fn put_then_delete_of_a_key_in_one_txn() {
    on_every_backend("put_then_delete_of_a_key_in_one_txn", |store, _| {
        Box::pin(async move {
            let mut r = Runner::new(store);
            r.write(WriteRequest::Put(put("d/1", "old")));
            flush(&mut r).await;
            let mut with_prev = put("d/1", "v");
            with_prev.prev_kv = true;
            r.write(WriteRequest::Put(put("a", "1")));
            r.write(WriteRequest::Txn(txn(
                vec![],
                vec![
                    op(Request::RequestTxn(txn(
                        vec![],
                        vec![op(Request::RequestPut(with_prev))],
                        vec![],
                    ))),
                    op(Request::RequestTxn(txn(
                        vec![],
                        vec![op(Request::RequestDeleteRange(delete("d/", "d0", true)))],
                        vec![],
                    ))),
                ],
                vec![],
            )));
            let answers = flush(&mut r).await;
            assert_eq!(r.model.rev, 4);
            let t = txn_resp(&answers[1]);
            let Some(Response::ResponseTxn(second)) = &t.responses[1].response else {
                panic!("no nested txn answer");
            };
            let Some(Response::ResponseDeleteRange(d)) = &second.responses[0].response else {
                panic!("no delete answer");
            };
            assert_eq!(d.prev_kvs, vec![kv("d/1", "v", 2, 4, 2)]);
            check_all(&mut r).await;
        })
    });
}

/// A database of schema version 2 (history indexed by key, no fence
/// column) is upgraded in place when a store opens it: the index is
/// dropped (version 3), `ks_meta.epoch` is added at 0 (version 4), and its
/// data reads as before, at the current and at older revisions. A version
/// this kubeshard does not know is refused with a message naming it.
#[test]
fn schema_version_2_is_upgraded_in_place() {
    let name = "schema_version_2_is_upgraded_in_place";
    let rt = runtime();
    for server in backends::servers(name) {
        rt.block_on(async {
            let mut db = server.create().await;
            let mut r = Runner::new(&*db.store);
            r.write(WriteRequest::Put(put("a", "1"))); // 2
            r.write(WriteRequest::Put(put("a", "2"))); // 3
            r.write(WriteRequest::Put(put("b", "x"))); // 4
            r.write(WriteRequest::DeleteRange(delete("b", "", false))); // 5
            flush(&mut r).await;
            drop(r);
            let (index_count, add_index) = match server.kind {
                Kind::Sqlite => (
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' \
                     AND name = 'ks_history_key'",
                    "CREATE UNIQUE INDEX ks_history_key ON ks_history (key_bytes, revision, sub)",
                ),
                Kind::Postgres => (
                    "SELECT COUNT(*) FROM pg_indexes WHERE tablename = 'ks_history' \
                     AND indexname = 'ks_history_key'",
                    "CREATE UNIQUE INDEX ks_history_key ON ks_history (key_bytes, revision, sub)",
                ),
                Kind::Mysql => (
                    "SELECT COUNT(DISTINCT index_name) FROM information_schema.statistics \
                     WHERE table_schema = DATABASE() AND table_name = 'ks_history' \
                     AND index_name = 'ks_history_key'",
                    "ALTER TABLE ks_history ADD UNIQUE KEY ks_history_key (key_bytes, revision, sub)",
                ),
            };
            assert_eq!(db.sql(index_count).await, Some(0), "{:?}: a new database has no key index", server.kind);
            db.sql(add_index).await;
            db.sql("UPDATE ks_meta SET schema_version = 2 WHERE id = 1").await;
            db.sql("ALTER TABLE ks_meta DROP COLUMN epoch").await;
            assert_eq!(db.sql(index_count).await, Some(1), "{:?}: index added", server.kind);

            let upgraded = db.open_another().await;
            assert_eq!(db.sql(index_count).await, Some(0), "{:?}: index dropped", server.kind);
            assert_eq!(
                db.sql("SELECT schema_version FROM ks_meta WHERE id = 1").await,
                Some(4)
            );
            assert_eq!(db.sql("SELECT epoch FROM ks_meta WHERE id = 1").await, Some(0));
            let now = upgraded.range(&get("a", "\0", 0)).await.expect("range");
            assert_eq!(now.kvs, vec![kv("a", "2", 2, 3, 2)]);
            let old = upgraded.range(&get("a", "\0", 4)).await.expect("range at 4");
            assert_eq!(old.kvs, vec![kv("a", "2", 2, 3, 2), kv("b", "x", 4, 4, 1)]);
            let older = upgraded.range(&get("a", "\0", 2)).await.expect("range at 2");
            assert_eq!(older.kvs, vec![kv("a", "1", 2, 2, 1)]);
            // Opening it again finds version 4 and changes nothing.
            drop(db.open_another().await);

            db.sql("UPDATE ks_meta SET schema_version = 5 WHERE id = 1").await;
            match db.try_open_another().await {
                Err(e) => assert!(
                    e.to_string().contains("schema version 5"),
                    "{:?}: {e}",
                    server.kind
                ),
                Ok(_) => panic!("{:?}: a store opened a database of schema version 5", server.kind),
            }
            drop(upgraded);
            db.drop_db().await;
        });
    }
}

/// The purge after a compaction at C keeps exactly the rows that reads and
/// watches at or after C need: each key's newest row at or below C, if it
/// is not a tombstone, and everything newer than C. Reads cannot tell a
/// row left behind, so this counts the rows.
#[test]
fn purge_keeps_only_what_reads_after_compaction_need() {
    let name = "purge_keeps_only_what_reads_after_compaction_need";
    let rt = runtime();
    for server in backends::servers(name) {
        for batch in [1, 3, 100] {
            rt.block_on(async {
                let mut db = server.create().await;
                let store = db.store.clone();
                let mut r = Runner::new(&*store);
                r.write(WriteRequest::Put(put("a", "1"))); // 2
                r.write(WriteRequest::Put(put("a", "2"))); // 3: a's row at C
                r.write(WriteRequest::Put(put("b", "x"))); // 4
                r.write(WriteRequest::DeleteRange(delete("b", "", false))); // 5
                r.write(WriteRequest::Put(put("c", "1"))); // 6: c's row at C
                r.write(WriteRequest::Txn(txn(
                    vec![],
                    vec![
                        op(Request::RequestTxn(txn(
                            vec![],
                            vec![op(Request::RequestPut(put("d", "1")))],
                            vec![],
                        ))),
                        op(Request::RequestTxn(txn(
                            vec![],
                            vec![op(Request::RequestDeleteRange(delete("d", "", false)))],
                            vec![],
                        ))),
                    ],
                    vec![],
                ))); // 7: d put and deleted
                r.write(WriteRequest::Put(put("e", "1"))); // 8
                r.write(WriteRequest::Put(put("e", "2"))); // 9: e's row at C
                r.write(WriteRequest::Put(put("c", "2"))); // 10, after C
                r.write(WriteRequest::Put(put("e", "3"))); // 11, after C
                r.write(WriteRequest::Compact { revision: 9 });
                flush(&mut r).await;
                assert_eq!(r.model.rev, 11);
                r.purge(batch).await.expect("purge");
                assert_eq!(
                    db.sql("SELECT COUNT(*) FROM ks_history").await,
                    Some(5),
                    "{:?}, windows of {batch}: rows a@3, c@6, e@9, c@10, e@11",
                    server.kind
                );
                check_all(&mut r).await;
                drop(r);
                drop(store);
                db.drop_db().await;
            });
        }
    }
}

/// Compaction at the revision of a txn that put a key and then deleted it
/// removes both rows, as etcd drops the key's whole generation when its
/// tombstone is at or below the compaction revision (a fresh CI run of the
/// property test found the model keeping the put).
#[test]
fn compaction_at_a_put_then_delete_revision() {
    on_every_backend("compaction_at_a_put_then_delete_revision", |store, _| {
        Box::pin(async move {
            let mut r = Runner::new(store);
            r.write(WriteRequest::Put(put("d/1", "old"))); // 2
            flush(&mut r).await;
            r.write(WriteRequest::Txn(txn(
                vec![],
                vec![
                    op(Request::RequestTxn(txn(
                        vec![],
                        vec![op(Request::RequestPut(put("a", "x")))],
                        vec![],
                    ))),
                    op(Request::RequestTxn(txn(
                        vec![],
                        vec![op(Request::RequestDeleteRange(delete("a", "\0", false)))],
                        vec![],
                    ))),
                ],
                vec![],
            ))); // 3: put a, then delete a and d/1
            r.write(WriteRequest::Put(put("a", "y"))); // 4
            r.write(WriteRequest::Compact { revision: 3 });
            flush(&mut r).await;
            assert_eq!(r.model.rev, 4);
            store.purge_compacted(3, 2).await.expect("purge");
            let whole = KeyRange::new(b"\0", b"\0");
            let events = store.history(&whole, 3, 4, 100).await.expect("history");
            let seen: Vec<(i32, Vec<u8>, i64)> = events
                .events
                .iter()
                .map(|e| {
                    let kv = e.kv.clone().unwrap_or_default();
                    (e.r#type, kv.key, kv.mod_revision)
                })
                .collect();
            assert_eq!(
                seen,
                vec![(0, b"a".to_vec(), 4)],
                "only the put at 4 is left"
            );
        })
    });
}

/// keys_only with sort by VALUE at an older revision must still sort by the
/// values (the store once blanked them before sorting and answered in key
/// order).
#[test]
fn keys_only_sorted_by_value_at_an_old_revision() {
    use kubeshard_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
    on_every_backend(
        "keys_only_sorted_by_value_at_an_old_revision",
        |store, _| {
            Box::pin(async move {
                let mut r = Runner::new(store);
                r.write(WriteRequest::Put(put("b", "zz"))); // 2
                r.write(WriteRequest::Put(put("a", ""))); // 3
                r.write(WriteRequest::Put(put("c", "y"))); // 4
                r.write(WriteRequest::Put(put("c", "x"))); // 5
                flush(&mut r).await;
                for (revision, order, want) in [
                    (4, SortOrder::Ascend, ["a", "c", "b"]),
                    (4, SortOrder::Descend, ["b", "c", "a"]),
                    (4, SortOrder::None, ["a", "c", "b"]),
                    (5, SortOrder::Descend, ["b", "c", "a"]),
                    (0, SortOrder::Ascend, ["a", "c", "b"]),
                ] {
                    let req = RangeRequest {
                        key: b"a".to_vec(),
                        range_end: vec![0],
                        revision,
                        sort_target: SortTarget::Value as i32,
                        sort_order: order as i32,
                        keys_only: true,
                        ..Default::default()
                    };
                    if let Err(e) = r.range(&req).await {
                        panic!("{e}");
                    }
                    let got = store.range(&req).await.expect("range");
                    let keys: Vec<&[u8]> = got.kvs.iter().map(|kv| kv.key.as_slice()).collect();
                    let want: Vec<&[u8]> = want.iter().map(|k| k.as_bytes()).collect();
                    assert_eq!(keys, want, "revision {revision}, order {order:?}");
                    assert!(got.kvs.iter().all(|kv| kv.value.is_empty()));
                }
            })
        },
    );
}

/// kube-apiserver's pagination: every page after the first asks for the
/// rest of the range at the first page's revision, and its `count` (the
/// keys left) may come from the page before it instead of a COUNT. Pages
/// at a fixed revision while keys are written and deleted, and pages at
/// the current revision with nothing written between them, must keep
/// etcd's count and rows; every page is checked against the model.
#[test]
fn paginated_lists_keep_exact_counts() {
    on_every_backend("paginated_lists_keep_exact_counts", |store, _| {
        Box::pin(async move {
            let mut r = Runner::new(store);
            for i in 0..30 {
                r.write(WriteRequest::Put(put(&format!("k{i:02}"), "v")));
            }
            flush(&mut r).await;
            let fixed = store.revisions().await.expect("revisions").current;
            for (revision, write_between) in [(fixed, true), (0, false), (0, true)] {
                let mut start = b"k".to_vec();
                let mut pages = 0;
                let mut seen = 0;
                loop {
                    let req = RangeRequest {
                        key: start.clone(),
                        range_end: b"l".to_vec(),
                        revision,
                        limit: 4,
                        ..Default::default()
                    };
                    // The same page twice: the second may use what the
                    // first taught; both must match the model.
                    for _ in 0..2 {
                        if let Err(e) = r.range(&req).await {
                            panic!("{e}\n--- what ran:\n{}", r.steps.join("\n"));
                        }
                    }
                    let got = store.range(&req).await.expect("range");
                    pages += 1;
                    seen += got.kvs.len();
                    let Some(last) = got.kvs.last() else { break };
                    if !got.more {
                        break;
                    }
                    start = last.key.clone();
                    start.push(0);
                    if write_between {
                        // A key inside the rest, one deleted from it, and
                        // one before the page: none is at `fixed`.
                        r.write(WriteRequest::Put(put(&format!("k{pages:02}x"), "n")));
                        r.write(WriteRequest::DeleteRange(delete(
                            &format!("k{:02}", 29 - pages),
                            "",
                            false,
                        )));
                        r.write(WriteRequest::Put(put("k", "before")));
                        flush(&mut r).await;
                    }
                }
                assert!(pages > 3, "revision {revision}: {pages} pages");
                if revision == fixed {
                    assert_eq!(seen, 30, "a list at a fixed revision sees its snapshot");
                }
            }
        })
    });
}
