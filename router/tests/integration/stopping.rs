//! The health endpoints, and a router stopping under load.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use kubeshard::SHUTDOWN_GRACE;
use tokio::time::Instant;

use crate::support::{Ctx, Node, expect_created, http, psql};

/// What the health paths answer on a healthy router, as etcd's would.
pub async fn health_endpoints_answer_as_etcd(ctx: Ctx) {
    let node = ctx.start().await;
    let addr = node.server.metrics_addr().expect("HTTP endpoint");

    let r = http(addr, "GET", "/health").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let r = http(addr, "GET", "/livez").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    let r = http(addr, "GET", "/livez?verbose").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "[+]shards_running ok\nok\n")
    );
    let r = http(addr, "GET", "/readyz?verbose").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            200,
            "[+]shards_running ok\n[+]serving ok\n[+]database_default ok\nok\n"
        )
    );
    let r = http(addr, "GET", "/readyz?verbose&exclude=serving").await;
    assert_eq!(
        r.body, "[+]shards_running ok\n[+]database_default ok\nok\n",
        "?exclude"
    );
    let r = http(addr, "GET", "/readyz/database_default").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    for path in ["/readyz/nope", "/livez/", "/healthz", "/health/"] {
        assert_eq!(http(addr, "GET", path).await.status, 404, "{path}");
    }
    for path in ["/health", "/readyz"] {
        let r = http(addr, "POST", path).await;
        assert_eq!(
            (r.status, r.body.as_str(), r.header("allow")),
            (405, "Method Not Allowed\n", Some("GET")),
            "POST {path}"
        );
    }
    node.stop().await;
}

/// A database that refuses connections: not ready and not healthy, naming
/// the shard; still live (a restart would not help); ready again after.
pub async fn unreachable_database_fails_readiness(ctx: Ctx) {
    let url = ctx.admin_url.clone().expect("postgres URL");
    let database = ctx.database.clone().expect("database name");
    let node = ctx.start().await;
    let addr = node.server.metrics_addr().expect("HTTP endpoint");
    assert_eq!(http(addr, "GET", "/readyz").await.status, 200);

    psql(
        &url,
        &format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false; \
             SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        ),
    )
    .await;
    // pg_terminate_backend only signals: wait until the router's
    // connections are gone, or a read may still find one alive.
    let gone = Instant::now() + Duration::from_secs(10);
    let count = format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'");
    while psql(&url, &count).await != "0" && Instant::now() < gone {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = http(addr, "GET", "/readyz").await;
    assert_eq!(
        r.status, 503,
        "readyz with the database refusing: {}",
        r.body
    );
    assert!(
        r.body.starts_with(
            "[+]shards_running ok\n[+]serving ok\n[-]database_default failed: shard default: "
        ) && r.body.ends_with("\n\n"),
        "readyz body: {:?}",
        r.body
    );
    let r = http(addr, "GET", "/health").await;
    assert_eq!(r.status, 503);
    assert!(
        r.body
            .starts_with(r#"{"health":"false","reason":"RANGE ERROR:shard default: "#),
        "health body: {:?}",
        r.body
    );
    assert_eq!(http(addr, "GET", "/livez").await.status, 200, "livez");

    psql(
        &url,
        &format!("ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http(addr, "GET", "/readyz").await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not ready again: {}", r.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.stop().await;
}

/// Each writer's Txns: (number, acknowledged).
type Attempts = Vec<(u32, bool)>;

/// The router stops while four clients write three-key Txns and a watch and
/// a lease keep-alive are open: the streams end with etcd's "server
/// stopped", the router is done within its grace period, and after a
/// restart every acknowledged Txn is there whole and every other one is
/// there whole or not at all.
pub async fn shutdown_under_write_load_keeps_every_acknowledged_write(ctx: Ctx) {
    let node = ctx.start().await;
    let mut client = node.client.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (_watch_tx, mut watch) = client
        .watch("/g/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch")
        .split();
    expect_created(&mut watch, deadline).await;
    let lease = client.lease_grant(60, None).await.expect("grant").id();
    let (mut keeper, mut keep_alive) = client.lease_keep_alive(lease).await.expect("keep-alive");
    keeper.keep_alive().await.expect("keep-alive request");
    let first = keep_alive.message().await.expect("keep-alive answer");
    assert!(first.is_some_and(|r| r.ttl() > 0), "keep-alive answered");

    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut attempts = Attempts::new();
                for n in 0u32.. {
                    let keys: Vec<String> = ["a", "b", "c"]
                        .iter()
                        .map(|k| format!("/g/{w}/{n:05}/{k}"))
                        .collect();
                    let txn = Txn::new()
                        .when([Compare::version(keys[0].clone(), CompareOp::Equal, 0)])
                        .and_then(
                            keys.iter()
                                .map(|k| TxnOp::put(k.clone(), n.to_string(), None))
                                .collect::<Vec<_>>(),
                        );
                    let answer =
                        tokio::time::timeout(Duration::from_secs(10), client.txn(txn)).await;
                    match answer {
                        Ok(Ok(r)) => {
                            assert!(r.succeeded(), "txn {w}/{n} compare failed");
                            attempts.push((n, true));
                        }
                        // The router is going: whatever it did is checked below.
                        Ok(Err(_)) | Err(_) => {
                            attempts.push((n, false));
                            break;
                        }
                    }
                }
                attempts
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let Node { server, client: _ } = node;
    let started = Instant::now();
    server.shutdown().await.expect("shutdown");
    let took = started.elapsed();
    assert!(
        took < SHUTDOWN_GRACE + Duration::from_secs(2),
        "shutdown took {took:?}"
    );
    let stopped = |what: &str, e: etcd_client::Error| match e {
        etcd_client::Error::GRpcStatus(s) => assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::Unavailable, "etcdserver: server stopped"),
            "{what} ended with"
        ),
        e => panic!("{what} ended with {e:?}, not etcd's status"),
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(5), watch.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the watch stream ended without a status"),
            Ok(Err(e)) => break stopped("the watch stream", e),
            Err(_) => panic!("the watch stream is still open after the shutdown"),
        }
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(5), keep_alive.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the keep-alive stream ended without a status"),
            Ok(Err(e)) => break stopped("the keep-alive stream", e),
            Err(_) => panic!("the keep-alive stream is still open after the shutdown"),
        }
    }
    let mut attempts = Vec::new();
    for (w, writer) in writers.into_iter().enumerate() {
        attempts.push((w, writer.await.expect("writer task")));
    }

    let node = ctx.start().await;
    let mut client = node.client.clone();
    let r = client
        .get("/g/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get after the restart");
    let stored: BTreeMap<String, String> = r
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect();
    let mut acknowledged = 0;
    let mut unacknowledged_stored = 0;
    for (w, attempts) in &attempts {
        for (n, acked) in attempts {
            let present: Vec<bool> = ["a", "b", "c"]
                .iter()
                .map(|k| stored.get(&format!("/g/{w}/{n:05}/{k}")) == Some(&n.to_string()))
                .collect();
            let whole = present.iter().all(|p| *p);
            if *acked {
                acknowledged += 1;
                assert!(
                    whole,
                    "acknowledged txn {w}/{n} after the restart: {present:?}"
                );
            } else {
                assert!(
                    whole || present.iter().all(|p| !p),
                    "txn {w}/{n} half there after the restart: {present:?}"
                );
                unacknowledged_stored += usize::from(whole);
            }
        }
    }
    let attempted: usize = attempts.iter().map(|(_, a)| a.len()).sum();
    assert_eq!(
        stored.len(),
        3 * (acknowledged + unacknowledged_stored),
        "keys nobody wrote"
    );
    assert!(acknowledged > 0, "no txn acknowledged before the shutdown");
    eprintln!(
        "shutdown under load: {acknowledged} txns acknowledged, {} not ({unacknowledged_stored} of them stored), \
         shutdown took {took:?}",
        attempted - acknowledged
    );
    node.stop().await;
}
