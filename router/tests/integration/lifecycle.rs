//! Lease expiry, restarts and a database outage.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{GetOptions, LeaseTimeToLiveOptions, WatchOptions};
use tokio::time::Instant;

use crate::support::{
    Ctx, Ev, Kind, Kv, Model, assert_same, assert_status, collect, expect_created, header_revision,
    next_response, psql,
};

pub async fn lease_expiry_deletes_keys_and_emits_delete_events(ctx: Ctx) {
    let node = ctx.start().await;
    let mut client = node.client.clone();
    let granted = Instant::now();
    let grant = client.lease_grant(2, None).await.expect("grant");
    assert_eq!(grant.ttl(), 2, "granted ttl");
    let lease = grant.id();
    let mut model = Model::new(&mut client).await;
    let keys = ["/l/a", "/l/b", "/l/c"];
    for key in keys {
        model.put(&mut client, key, "leased", lease).await;
    }
    model.put(&mut client, "/l/z", "no lease", 0).await;
    let last = model.revision;
    let deadline = granted + Duration::from_secs(10);
    let (mut tx, mut rx) = client
        .watch(
            "/l/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_start_revision(last + 1),
            ),
        )
        .await
        .expect("watch")
        .split();
    let id = expect_created(&mut rx, deadline).await.watch_id();
    let mut deletes = Vec::new();
    while deletes.len() < keys.len() {
        let r = next_response(&mut rx, deadline, "lease expiry DELETE events").await;
        assert!(
            r.watch_id() == id && !r.created() && !r.canceled(),
            "unexpected response {r:?}"
        );
        deletes.extend(r.events().iter().map(Ev::of));
    }
    let elapsed = granted.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500),
        "keys of a 2 s lease deleted after {elapsed:?}"
    );
    let revision = last + 1;
    deletes.sort_by(|a, b| a.kv.key.cmp(&b.kv.key));
    let want: Vec<Ev> = keys
        .iter()
        .map(|key| Ev {
            kind: Kind::Delete,
            kv: Kv {
                key: (*key).into(),
                value: String::new(),
                create: 0,
                modified: revision,
                version: 0,
                lease: 0,
            },
            prev: model.live.get(*key).cloned(),
        })
        .collect();
    assert_same("expiry events (one revision)", &deletes, &want);

    let r = client
        .get("/l/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get after expiry");
    let left: Vec<String> = r.kvs().iter().map(|kv| Kv::of(kv).key).collect();
    assert_eq!(left, vec!["/l/z".to_string()], "keys left after expiry");
    assert_eq!(
        header_revision(r.header()),
        revision,
        "revision after expiry"
    );
    let ttl = client
        .lease_time_to_live(lease, None)
        .await
        .expect("time to live of an expired lease");
    assert_eq!(ttl.ttl(), -1, "ttl of an expired lease");
    assert_status(
        "revoke of an expired lease",
        client.lease_revoke(lease).await,
        tonic::Code::NotFound,
        "etcdserver: requested lease not found",
    );
    // Nothing more: the expiry is not repeated.
    let reader = collect(rx, deadline + Duration::from_secs(5), "after expiry");
    tx.request_progress().await.expect("progress request");
    let rest = reader.await.expect("reader task");
    assert!(rest.events.is_empty(), "more events: {:?}", rest.events);
    assert_eq!(rest.progress, revision, "progress revision");
    drop(tx);
    node.stop().await;
}

pub async fn restart_keeps_data_and_lease_deadlines(ctx: Ctx) {
    let node = ctx.start().await;
    let mut client = node.client.clone();
    let lease = client.lease_grant(30, None).await.expect("grant").id();
    let mut model = Model::new(&mut client).await;
    let first = model.put(&mut client, "/s/a", "1", 0).await;
    model.put(&mut client, "/s/b", "1", 0).await;
    model.put(&mut client, "/s/a", "2", 0).await;
    model.delete(&mut client, "/s/b").await;
    model
        .txn(&mut client, &[("/s/c", "1"), ("/s/d", "1")], &["/s/a"])
        .await;
    model.put(&mut client, "/s/e", "leased", lease).await;
    drop(client);
    node.stop().await;

    let node = ctx.start().await;
    let mut client = node.client.clone();
    model.check_live(&mut client, "/s/").await;
    let ttl = client
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .expect("time to live after the restart");
    assert!(
        ttl.ttl() > 20 && ttl.ttl() <= 30,
        "remaining ttl {} after the restart",
        ttl.ttl()
    );
    assert_eq!(ttl.granted_ttl(), 30, "granted ttl");
    assert_eq!(ttl.keys(), [b"/s/e".to_vec()], "keys of the lease");

    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut tx, rx) = client
        .watch(
            "/s/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_start_revision(first)
                    .with_watch_id(5),
            ),
        )
        .await
        .expect("watch after the restart")
        .split();
    let reader = collect(rx, deadline, "watch after the restart");
    model.put(&mut client, "/s/f", "after the restart", 0).await;
    tx.request_progress().await.expect("progress request");
    let got = reader.await.expect("reader task");
    assert_eq!(got.created, vec![5], "created");
    assert_same(
        "history replayed after the restart",
        &got.of(5),
        &model.since(first),
    );
    drop(tx);
    node.stop().await;
}

/// How a request during the outage ended.
#[derive(Debug, Default)]
struct Outcomes {
    /// Key, value, revision of every acknowledged put.
    acked: Vec<(String, String, i64)>,
    /// Every key a put was attempted on.
    attempted: BTreeSet<String>,
    /// Messages of the Unavailable answers.
    unavailable: Vec<String>,
    succeeded: usize,
}

/// Sorts a result: success, Unavailable (its message), or a failure of the test.
fn classify<T: std::fmt::Debug>(
    what: &str,
    result: Result<Result<T, etcd_client::Error>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    match result {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() == tonic::Code::Unavailable => {
            Err(s.message().to_string())
        }
        Ok(Err(e)) => panic!("{what}: failed with {e:?}, only Unavailable is allowed"),
        Err(_) => panic!("{what}: no answer within 15 s (hung)"),
    }
}

pub async fn database_outage_is_unavailable_then_recovers(ctx: Ctx) {
    const ANSWER: Duration = Duration::from_secs(15);
    let url = ctx.admin_url.clone().expect("postgres URL");
    let database = ctx.database.clone().expect("database name");
    let node = ctx.start().await;
    let mut client = node.client.clone();
    let deadline = Instant::now() + Duration::from_secs(90);

    let mut before = Outcomes::default();
    for i in 0..50 {
        let (key, value) = (format!("/o/pre{i:02}"), format!("p{i}"));
        let r = client
            .put(key.clone(), value.clone(), None)
            .await
            .expect("put");
        before.attempted.insert(key.clone());
        before.acked.push((key, value, header_revision(r.header())));
    }
    let (mut wtx, wrx) = client
        .watch(
            "/o/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(1)
                    .with_watch_id(7),
            ),
        )
        .await
        .expect("watch")
        .split();
    let reader = collect(wrx, deadline, "watch across the outage");

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..3 {
        let mut client = client.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut out = Outcomes::default();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let (key, value) = (format!("/o/w{t}-{n:05}"), format!("v{n}"));
                n += 1;
                out.attempted.insert(key.clone());
                let put =
                    tokio::time::timeout(ANSWER, client.put(key.clone(), value.clone(), None));
                match classify("put during the outage", put.await) {
                    Ok(r) => {
                        out.succeeded += 1;
                        out.acked.push((key, value, header_revision(r.header())));
                    }
                    Err(message) => out.unavailable.push(message),
                }
            }
            out
        }));
    }
    let reader_task = {
        let mut client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut out = Outcomes::default();
            while !stop.load(Ordering::Relaxed) {
                let get = tokio::time::timeout(
                    ANSWER,
                    client.get(
                        "/o/",
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    ),
                );
                match classify("range during the outage", get.await) {
                    Ok(_) => out.succeeded += 1,
                    Err(message) => out.unavailable.push(message),
                }
            }
            out
        })
    };
    // Watches created during the outage: created, or the stream fails with
    // Unavailable.
    let churn = {
        let mut client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut out = Outcomes::default();
            while !stop.load(Ordering::Relaxed) {
                let open = tokio::time::timeout(
                    ANSWER,
                    client.watch("/o/", Some(WatchOptions::new().with_prefix())),
                );
                let mut stream = match classify("watch during the outage", open.await) {
                    Ok(stream) => stream,
                    Err(message) => {
                        out.unavailable.push(message);
                        continue;
                    }
                };
                let first = tokio::time::timeout(ANSWER, stream.message());
                match classify("watch creation during the outage", first.await) {
                    Ok(Some(r)) if r.created() && !r.canceled() => out.succeeded += 1,
                    Ok(other) => panic!("watch creation during the outage answered {other:?}"),
                    Err(message) => out.unavailable.push(message),
                }
            }
            out
        })
    };

    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let killed = psql(
            &url,
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = '{database}' AND pid <> pg_backend_pid()"
            ),
        )
        .await;
        let killed: i64 = killed.parse().expect("count of terminated backends");
        assert!(
            killed > 0,
            "round {round}: no server connection to terminate"
        );
    }
    let last_kill = Instant::now();
    let recovered_revision = loop {
        let put = tokio::time::timeout(ANSWER, client.put("/o/recovered", "yes", None));
        if let Ok(r) = classify("put after the outage", put.await) {
            break header_revision(r.header());
        }
        assert!(
            last_kill.elapsed() < Duration::from_secs(10),
            "still Unavailable {:?} after the last termination",
            last_kill.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let recovered_after = last_kill.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = Outcomes::default();
    for w in writers {
        let w = w.await.expect("writer task");
        writes.acked.extend(w.acked);
        writes.attempted.extend(w.attempted);
        writes.unavailable.extend(w.unavailable);
        writes.succeeded += w.succeeded;
    }
    let reads = reader_task.await.expect("reader task");
    let watches = churn.await.expect("watch churn task");
    eprintln!(
        "outage: puts {} ok / {} unavailable, ranges {} ok / {} unavailable, watch creations {} ok / {} unavailable, \
         recovered {recovered_after:?} after the last termination; first Unavailable: {:?}",
        writes.succeeded,
        writes.unavailable.len(),
        reads.succeeded,
        reads.unavailable.len(),
        watches.succeeded,
        watches.unavailable.len(),
        writes.unavailable.first().or(reads.unavailable.first())
    );
    assert!(writes.succeeded > 0, "no put succeeded during the test");

    // Nothing acknowledged is lost.
    let mut acked = before.acked;
    acked.extend(writes.acked);
    acked.push(("/o/recovered".into(), "yes".into(), recovered_revision));
    let r = client
        .get("/o/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get after the outage");
    let stored: BTreeMap<String, (String, i64)> = r
        .kvs()
        .iter()
        .map(Kv::of)
        .map(|kv| (kv.key, (kv.value, kv.modified)))
        .collect();
    for (key, value, revision) in &acked {
        assert_eq!(
            stored.get(key),
            Some(&(value.clone(), *revision)),
            "acknowledged put of {key} at {revision}"
        );
    }

    // The watch saw every acknowledged write once, in order, and nothing
    // that was not attempted.
    wtx.request_progress().await.expect("progress request");
    let got = reader.await.expect("watch reader").of(7);
    for pair in got.windows(2) {
        assert!(
            pair[0].kv.modified < pair[1].kv.modified,
            "watch events out of order or repeated: {pair:?}"
        );
    }
    let seen: BTreeSet<(String, i64)> = got
        .iter()
        .map(|e| (e.kv.key.clone(), e.kv.modified))
        .collect();
    for (key, _, revision) in &acked {
        assert!(
            seen.contains(&(key.clone(), *revision)),
            "the watch missed the acknowledged put of {key} at {revision}"
        );
    }
    let mut attempted = before.attempted;
    attempted.extend(writes.attempted);
    attempted.insert("/o/recovered".into());
    for e in &got {
        assert!(
            e.kind == Kind::Put && attempted.contains(&e.kv.key),
            "the watch got an event nobody wrote: {e:?}"
        );
    }
    drop(wtx);
    node.stop().await;
}

/// `--compact-interval` with `--compact-min-retain 10`: the router compacts
/// by itself, keeping exactly the newest ten revisions below the current one
/// readable.
pub async fn automatic_compaction_keeps_the_newest_revisions(ctx: Ctx) {
    let server = ctx
        .start_server(|o| {
            o.auto_compaction = Some(kubeshard_config::AutoCompaction {
                interval: Duration::from_millis(200),
                jitter_percent: 0,
                timeout: Duration::from_secs(5),
                min_retain: 10,
            })
        })
        .await;
    let mut client = crate::support::connect(&server).await;
    let mut last = 0;
    for i in 0..40 {
        let r = client
            .put(format!("/ac/{i}"), "v", None)
            .await
            .expect("put");
        last = header_revision(r.header());
    }
    let at = |revision| GetOptions::new().with_prefix().with_revision(revision);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.get("/ac/", Some(at(last - 11))).await {
            Err(etcd_client::Error::GRpcStatus(s)) => {
                assert_eq!(
                    (s.code(), s.message()),
                    (
                        tonic::Code::OutOfRange,
                        "etcdserver: mvcc: required revision has been compacted"
                    )
                );
                break;
            }
            Ok(_) => assert!(
                Instant::now() < deadline,
                "revision {} still readable 20 s after the writes",
                last - 11
            ),
            Err(e) => panic!("get below the retained revisions: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = client
        .get("/ac/", Some(at(last - 10)))
        .await
        .expect("the oldest retained revision");
    assert_eq!(kept.kvs().len(), 30, "keys at revision {}", last - 10);
    server.shutdown().await.expect("shutdown");
}
