//! A router over three shards: many writers on every shard while merged
//! ranges (paginated at one revision) and merged watches run, checked
//! against the invariants of shared/design/revisions.md.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseTimeToLiveOptions, PutOptions, Txn,
    TxnOp, WatchOptions, WatchRequestSender, WatchResponseStream as WatchStream,
};
use kubeshard::RunningServer;
use kubeshard_config::{Endpoint, ServerOptions, Topology};
use tokio::time::Instant;
use tonic::Code;

use crate::support::{
    Collected, Ctx, Ev, Kind, assert_status, collect, connect, drop_database, expect_created,
    header_revision, is_progress, next_response, with_database,
};

const WRITERS: usize = 6;
const WRITES_PER_WRITER: usize = 60;
const PAGE: i64 = 7;

/// The shard of each writer's keys: /k/0/ on the default shard, /k/1/ and
/// /k/2/ on the others.
pub(crate) fn topology(endpoints: &[String; 3]) -> Topology {
    let toml = format!(
        r#"
default_shard = "zero"

[[shards]]
name = "zero"
endpoint = "{}"

[[shards]]
name = "one"
endpoint = "{}"

[[shards]]
name = "two"
endpoint = "{}"

[[routes]]
prefix = "/k/1/"
shard = "one"

[[routes]]
prefix = "/k/2/"
shard = "two"
"#,
        endpoints[0], endpoints[1], endpoints[2]
    );
    Topology::from_toml_str(&toml, "sharded-test.toml").expect("valid topology")
}

/// Three databases next to the test's own: the test's endpoint with the
/// database (or file) name suffixed.
pub(crate) fn shard_endpoints(ctx: &Ctx) -> [String; 3] {
    std::array::from_fn(|i| match (&ctx.endpoint, &ctx.admin_url, &ctx.database) {
        (Endpoint::Sqlite { path }, _, _) => {
            format!(
                "sqlite://{}",
                path.with_file_name(format!("shard{i}.db")).display()
            )
        }
        (_, Some(url), Some(database)) => with_database(url, &shard_database(database, i)),
        _ => panic!("a server database without its URL"),
    })
}

fn shard_database(database: &str, i: usize) -> String {
    format!("{database}_s{i}")
}

/// A router over the test's three shards.
pub(crate) async fn start_router(ctx: &Ctx, endpoints: &[String; 3]) -> RunningServer {
    let mut options = ServerOptions::for_endpoint(ctx.endpoint.clone(), "127.0.0.1:0");
    options.topology = topology(endpoints);
    kubeshard::start(options)
        .await
        .unwrap_or_else(|e| panic!("sharded server did not start: {e}"))
}

pub(crate) async fn stop_router(server: RunningServer) {
    tokio::time::timeout(Duration::from_secs(20), server.shutdown())
        .await
        .expect("server shutdown hung")
        .expect("server shutdown failed");
}

pub(crate) fn drop_shard_databases(ctx: &Ctx) {
    if let (Some(url), Some(database)) = (&ctx.admin_url, &ctx.database) {
        for i in 0..3 {
            drop_database(ctx.backend, url, &shard_database(database, i));
        }
    }
}

/// One acknowledged write: its revision, key and kind.
type Write = (i64, String, Kind);

pub async fn writers_ranges_and_watches_across_shards(ctx: Ctx) {
    let endpoints = shard_endpoints(&ctx);
    let server = start_router(&ctx, &endpoints).await;
    let mut client = connect(&server).await;
    let deadline = Instant::now() + Duration::from_secs(120);

    // kube-apiserver's pattern: list, then watch from the list's revision + 1.
    let start = list_revision(&mut client).await;
    let (mut watcher, live) =
        watch_from(&mut client, start + 1, deadline, "live merged watch").await;

    // Writers: puts and deletes on their shard; each checks that its own
    // revisions only go up (causality through one router).
    let acknowledged = Arc::new(AtomicI64::new(start));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = client.clone();
        let acknowledged = acknowledged.clone();
        tasks.push(tokio::spawn(async move {
            let mut done: Vec<Write> = Vec::new();
            let mut last = 0;
            for n in 0..WRITES_PER_WRITER {
                let key = format!("/k/{}/w{w}-{}", w % 3, n % 5);
                let (revision, kind) = if n % 4 == 3 {
                    let r = c.delete(key.as_str(), None).await.expect("delete");
                    if r.deleted() == 0 {
                        continue;
                    }
                    (header_revision(r.header()), Kind::Delete)
                } else {
                    let r = c
                        .put(key.as_str(), format!("v{n}"), Some(PutOptions::new()))
                        .await
                        .expect("put");
                    (header_revision(r.header()), Kind::Put)
                };
                assert!(
                    revision > last,
                    "writer {w}: revision {revision} after {last}"
                );
                last = revision;
                acknowledged.fetch_max(revision, Ordering::AcqRel);
                done.push((revision, key, kind));
            }
            done
        }));
    }

    // Meanwhile: paginated lists over all three shards. Each must be a
    // snapshot at its revision, which is at least every revision
    // acknowledged before the list began.
    let mut lists: Vec<(i64, BTreeMap<String, i64>)> = Vec::new();
    let mut lister = client.clone();
    while tasks.iter().any(|t| !t.is_finished()) || lists.len() < 3 {
        let floor = acknowledged.load(Ordering::Acquire);
        let (at, list) = paginated_list(&mut lister, "/k/").await;
        assert!(
            at >= floor,
            "a list answered at {at}, below the acknowledged revision {floor}"
        );
        lists.push((at, list));
    }

    let mut writes: Vec<Write> = Vec::new();
    for task in tasks {
        writes.extend(task.await.expect("writer task"));
    }
    writes.sort_by_key(|w| w.0);
    let revisions: BTreeSet<i64> = writes.iter().map(|w| w.0).collect();
    assert_eq!(
        revisions.len(),
        writes.len(),
        "two writes got the same revision"
    );
    let last = writes.last().map_or(start, |w| w.0);

    // A progress answer comes after every event at or below it, from
    // every shard.
    watcher.request_progress().await.expect("progress request");
    let got = live.await.expect("live watch task");
    assert!(
        got.progress >= last,
        "progress at {} below the last write {last}",
        got.progress
    );
    let seen = writes_seen(&got);
    assert_eq!(
        seen.len(),
        writes.len(),
        "the merged watch saw {} events for {} writes",
        seen.len(),
        writes.len()
    );
    assert_eq!(seen, writes, "the merged watch differs from the writes");

    // A watch from the start replays the same history, merged from all
    // three shards' databases.
    let (mut replay_watcher, replay) =
        watch_from(&mut client, start + 1, deadline, "replayed merged watch").await;
    replay_watcher
        .request_progress()
        .await
        .expect("progress request");
    let replayed = replay.await.expect("replay task");
    let replayed: Vec<Write> = events_of(
        &replayed
            .events
            .values()
            .flatten()
            .cloned()
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        replayed, writes,
        "the replayed history differs from the writes"
    );

    // Every list equals the state the write history gives at its revision.
    for (at, list) in &lists {
        let mut state: BTreeMap<String, i64> = BTreeMap::new();
        for (revision, key, kind) in writes.iter().filter(|w| w.0 <= *at) {
            match kind {
                Kind::Put => {
                    state.insert(key.clone(), *revision);
                }
                Kind::Delete => {
                    state.remove(key);
                }
            }
        }
        assert_eq!(
            list, &state,
            "the list at {at} is not the snapshot the history gives"
        );
    }
    eprintln!(
        "{} writes on 3 shards, {} paginated lists, revisions {}..{last}",
        writes.len(),
        lists.len(),
        start + 1
    );
    // Open watch streams would hold the graceful shutdown.
    drop((client, lister, watcher, replay_watcher));
    stop_router(server).await;
    drop_shard_databases(&ctx);
}

/// The keys of one name on the three shards.
fn on_every_shard(name: &str) -> [String; 3] {
    std::array::from_fn(|i| format!("/k/{i}/{name}"))
}

/// Leases with keys on every shard (TimeToLive, revoke, expiry), idle
/// shards under a merged watch and a progress request, Compact on every
/// shard, and the answer to a Txn that spans shards.
pub async fn leases_compaction_and_idle_shards(ctx: Ctx) {
    let endpoints = shard_endpoints(&ctx);
    let server = start_router(&ctx, &endpoints).await;
    let mut client = connect(&server).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut watch_tx, mut watch_rx) = client
        .watch("/k/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch /k/")
        .split();
    expect_created(&mut watch_rx, deadline).await;

    // A lease with a key on each shard.
    let lease = client.lease_grant(600, None).await.expect("grant").id();
    let keys = on_every_shard("leased");
    for key in &keys {
        client
            .put(key.as_str(), "v", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap_or_else(|e| panic!("put {key} with the lease: {e}"));
    }
    let ttl = client
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .expect("time to live");
    let mut want: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
    want.sort();
    assert_eq!(ttl.keys(), want, "the lease's keys on all shards");
    let (mut keeper, mut kept) = client.lease_keep_alive(lease).await.expect("keep alive");
    keeper.keep_alive().await.expect("send keep alive");
    let answer = kept
        .message()
        .await
        .expect("keep-alive answer")
        .expect("an answer");
    assert_eq!(
        (answer.id(), answer.ttl()),
        (lease, 600),
        "keep-alive answer"
    );
    drop((keeper, kept));

    // Revoke: the keys go on every shard, and the merged watch sees them go.
    client.lease_revoke(lease).await.expect("revoke");
    let left = client
        .get(
            "/k/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count after revoke");
    assert_eq!(left.count(), 0, "keys left after the revoke");
    let seen = deletes_until(&mut watch_rx, &keys, deadline, "revoked lease").await;
    assert_eq!(seen, 3, "DELETE events of the revoked lease's keys");

    // Expiry (TTL 2 s): the same, done by the router's expirer.
    let short = client.lease_grant(2, None).await.expect("grant").id();
    let keys = on_every_shard("expiring");
    for key in &keys {
        client
            .put(key.as_str(), "v", Some(PutOptions::new().with_lease(short)))
            .await
            .unwrap_or_else(|e| panic!("put {key} with the short lease: {e}"));
    }
    let seen = deletes_until(
        &mut watch_rx,
        &keys,
        Instant::now() + Duration::from_secs(20),
        "expired lease",
    )
    .await;
    assert_eq!(seen, 3, "DELETE events of the expired lease's keys");
    let ttl = client
        .lease_time_to_live(short, None)
        .await
        .expect("time to live of the expired lease");
    assert_eq!(ttl.ttl(), -1, "the expired lease is gone");
    let leases = client.leases().await.expect("leases");
    assert!(
        leases.leases().is_empty(),
        "leases left: {:?}",
        leases.leases()
    );

    // Idle shards: a write on shard 1 only reaches the merged watch (which
    // waits for shards 0 and 2 to pass its revision) without other writes.
    let put = client.put("/k/1/alone", "v", None).await.expect("put");
    let revision = header_revision(put.header());
    let r = tokio::time::timeout(Duration::from_secs(5), watch_rx.message())
        .await
        .expect("the merged watch stalled on idle shards")
        .expect("watch stream")
        .expect("a response");
    let got: Vec<i64> = r
        .events()
        .iter()
        .filter_map(|e| e.kv().map(|kv| kv.mod_revision()))
        .collect();
    assert_eq!(got, [revision], "the event of the lone write");
    watch_tx.request_progress().await.expect("progress request");
    let r = tokio::time::timeout(Duration::from_secs(5), watch_rx.message())
        .await
        .expect("the progress answer stalled on idle shards")
        .expect("watch stream")
        .expect("a response");
    assert!(is_progress(&r), "expected a progress answer, got {r:?}");
    assert!(
        header_revision(r.header()) >= revision,
        "progress {} below the last write {revision}",
        header_revision(r.header())
    );

    // Compact reaches every shard.
    let keys = on_every_shard("compacted");
    let mut first = Vec::new();
    for key in &keys {
        let r = client.put(key.as_str(), "v1", None).await.expect("put v1");
        first.push(header_revision(r.header()));
    }
    let mut at = 0;
    for key in &keys {
        let r = client.put(key.as_str(), "v2", None).await.expect("put v2");
        at = header_revision(r.header());
    }
    client.compact(at, None).await.expect("compact");
    for (key, old) in keys.iter().zip(&first) {
        let below = client
            .get(key.as_str(), Some(GetOptions::new().with_revision(*old)))
            .await;
        assert_status(
            &format!("get {key} below the compaction"),
            below,
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        );
        let kept = client
            .get(key.as_str(), Some(GetOptions::new().with_revision(at)))
            .await
            .expect("get at the compaction revision");
        assert_eq!(kept.kvs().len(), 1, "{key} at the compaction revision");
    }
    let again = client.compact(at, None).await;
    assert_status(
        "compact again at the same revision",
        again,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );

    // A Txn over two shards is refused, naming them; one inside a shard runs.
    let across = client
        .txn(
            Txn::new()
                .when([Compare::version("/k/0/x", CompareOp::Equal, 0)])
                .and_then([TxnOp::put("/k/1/x", "v", None)]),
        )
        .await;
    assert_status(
        "txn across shards",
        across,
        Code::InvalidArgument,
        "kubeshard: a transaction may not span shards; its keys live on shards zero, one",
    );
    let inside = client
        .txn(
            Txn::new()
                .when([Compare::version("/k/2/x", CompareOp::Equal, 0)])
                .and_then([TxnOp::put("/k/2/x", "v", None)]),
        )
        .await
        .expect("txn inside one shard");
    assert!(inside.succeeded(), "the txn inside one shard");

    drop((client, watch_tx, watch_rx));
    stop_router(server).await;
    drop_shard_databases(&ctx);
}

/// Reads watch responses until a DELETE of each of `keys` arrived; returns
/// how many of them did.
async fn deletes_until(
    stream: &mut WatchStream,
    keys: &[String],
    deadline: Instant,
    what: &str,
) -> usize {
    let mut gone = BTreeSet::new();
    while gone.len() < keys.len() {
        let r = next_response(stream, deadline, what).await;
        for e in r.events() {
            if e.event_type() == EventType::Delete
                && let Some(kv) = e.kv()
            {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if keys.contains(&key) {
                    gone.insert(key);
                }
            }
        }
    }
    gone.len()
}

/// Two routers over the same three shards, as behind a load balancer:
/// unique revisions, a write acknowledged by one is in the next list of the
/// other, and a watch on one sees the other's writes in order.
pub async fn two_routers_over_the_same_shards(ctx: Ctx) {
    let endpoints = shard_endpoints(&ctx);
    let a = start_router(&ctx, &endpoints).await;
    let b = start_router(&ctx, &endpoints).await;
    let mut client_a = connect(&a).await;
    let mut client_b = connect(&b).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let start = list_revision(&mut client_b).await;
    let (mut watch_b, live) =
        watch_from(&mut client_b, start + 1, deadline, "watch on router b").await;

    let mut writes: Vec<Write> = Vec::new();
    for n in 0..45 {
        let (writer, reader) = if n % 2 == 0 {
            (&mut client_a, &mut client_b)
        } else {
            (&mut client_b, &mut client_a)
        };
        let key = format!("/k/{}/two-{n}", n % 3);
        let put = writer.put(key.as_str(), "v", None).await.expect("put");
        let revision = header_revision(put.header());
        writes.push((revision, key.clone(), Kind::Put));
        // The other router's next linearizable list shows it.
        let list = reader
            .get(
                "/k/",
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .expect("list on the other router");
        assert!(
            header_revision(list.header()) >= revision,
            "list at {} after a write at {revision} on the other router",
            header_revision(list.header())
        );
        assert!(
            list.kvs().iter().any(|kv| kv.key() == key.as_bytes()),
            "{key} (written at {revision}) missing from the other router's list"
        );
    }
    let revisions: BTreeSet<i64> = writes.iter().map(|w| w.0).collect();
    assert_eq!(revisions.len(), writes.len(), "a revision was given twice");
    writes.sort_by_key(|w| w.0);
    watch_b.request_progress().await.expect("progress request");
    let got = live.await.expect("watch task");
    let seen = writes_seen(&got);
    assert_eq!(
        seen, writes,
        "router b's watch vs the writes of both routers"
    );
    drop((client_a, client_b, watch_b));
    stop_router(a).await;
    stop_router(b).await;
    drop_shard_databases(&ctx);
}

fn events_of(events: &[Ev]) -> Vec<Write> {
    events
        .iter()
        .map(|e| (e.kv.modified, e.kv.key.clone(), e.kind))
        .collect()
}

/// Every event a stream collected, as writes.
fn writes_seen(got: &Collected) -> Vec<Write> {
    events_of(&got.events.values().flatten().cloned().collect::<Vec<_>>())
}

/// The revision of a list of /k/ (kube-apiserver lists, then watches from
/// the list's revision + 1).
async fn list_revision(client: &mut Client) -> i64 {
    let listed = client
        .get("/k/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("list /k/");
    header_revision(listed.header())
}

/// Watches /k/ from `from`, waits for the watch's creation and drains the
/// stream in a task until the answer to a progress request the caller
/// sends through the returned sender.
async fn watch_from(
    client: &mut Client,
    from: i64,
    deadline: Instant,
    what: &str,
) -> (WatchRequestSender, tokio::task::JoinHandle<Collected>) {
    let (sender, mut stream) = client
        .watch(
            "/k/",
            Some(WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: watch /k/: {e}"))
        .split();
    expect_created(&mut stream, deadline).await;
    (sender, collect(stream, deadline, what))
}

/// Lists `prefix` in pages of [`PAGE`], all at the revision of the first
/// page; checks `count` and `more` on every page.
async fn paginated_list(client: &mut Client, prefix: &str) -> (i64, BTreeMap<String, i64>) {
    let end = format!("{}0", prefix.trim_end_matches('/'));
    let mut key = prefix.to_string();
    let mut at = 0;
    let mut out = BTreeMap::new();
    let mut expected_total = None;
    loop {
        let mut opts = GetOptions::new().with_range(end.as_str()).with_limit(PAGE);
        if at != 0 {
            opts = opts.with_revision(at);
        }
        let page = client
            .get(key.as_str(), Some(opts))
            .await
            .expect("list page");
        if at == 0 {
            at = header_revision(page.header());
            expected_total = Some(page.count());
        }
        let kvs = page.kvs();
        assert!(kvs.len() as i64 <= PAGE);
        for kv in kvs {
            out.insert(
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.mod_revision(),
            );
        }
        if !page.more() {
            break;
        }
        let last = kvs.last().expect("a page with more has keys");
        key = format!("{}\0", String::from_utf8_lossy(last.key()));
    }
    assert_eq!(
        Some(out.len() as i64),
        expected_total,
        "count of the first page vs keys listed at {at}"
    );
    (at, out)
}

/// A watch over three shards from an old revision, where one shard has more
/// history than a page (1000 events) and the other two are idle: the
/// catch-up reads the busy shard to its end, waits for the idle ones to be
/// raised, and delivers everything in order (it once spun forever here).
pub async fn long_history_beside_idle_shards(ctx: Ctx) {
    let endpoints = shard_endpoints(&ctx);
    let server = start_router(&ctx, &endpoints).await;
    let mut client = connect(&server).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let start = list_revision(&mut client).await;
    let mut writes: Vec<Write> = Vec::new();
    for n in 0..1500 {
        let key = format!("/k/1/busy-{n:04}");
        let put = client.put(key.as_str(), "v", None).await.expect("put");
        writes.push((header_revision(put.header()), key, Kind::Put));
    }
    // A fresh router: its hubs start at each shard's counter, so the idle
    // shards' marks are far below the busy one's.
    drop(client);
    stop_router(server).await;
    let server = start_router(&ctx, &endpoints).await;
    let mut client = connect(&server).await;
    let (mut watcher, replay) = watch_from(
        &mut client,
        start + 1,
        deadline,
        "catch-up beside idle shards",
    )
    .await;
    watcher.request_progress().await.expect("progress request");
    let got = tokio::time::timeout(Duration::from_secs(60), replay)
        .await
        .expect("the catch-up never finished")
        .expect("watch task");
    let seen = writes_seen(&got);
    assert_eq!(seen, writes, "the replayed history");
    drop((client, watcher));
    stop_router(server).await;
    drop_shard_databases(&ctx);
}

/// A shard that cannot be reached stops the start-up with an error naming
/// the topology file's line of that shard; nothing is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_shard_names_its_line() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let toml = format!(
        r#"default_shard = "zero"

[[shards]]
name = "zero"
endpoint = "sqlite://{}/zero.db"

[[shards]]
name = "down"
endpoint = "postgres://nobody:secret@127.0.0.1:1/nothing"
"#,
        dir.path().display()
    );
    let mut options = ServerOptions::for_endpoint(
        Endpoint::parse("sqlite:///unused.db").expect("endpoint"),
        "127.0.0.1:0",
    );
    options.topology = Topology::from_toml_str(&toml, "down.toml").expect("valid topology");
    let error = match kubeshard::start(options).await {
        Ok(_) => panic!("a topology with an unreachable shard started"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.starts_with("down.toml:8:8: shard down (postgres://nobody:"),
        "{error}"
    );
    assert!(!error.contains("secret"), "the password leaked: {error}");
}

/// A shard whose import from etcd did not finish is not served: the start
/// fails naming the shard, the source and how to go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_import_is_not_served() {
    use kubeshard_shard_worker::bulk::{ImportPhase, ImportState};
    let dir = tempfile::tempdir().expect("temporary directory");
    let toml = format!(
        r#"default_shard = "zero"

[[shards]]
name = "zero"
endpoint = "sqlite://{dir}/zero.db"

[[shards]]
name = "half"
endpoint = "sqlite://{dir}/half.db"
"#,
        dir = dir.path().display()
    );
    let topology = Topology::from_toml_str(&toml, "half.toml").expect("valid topology");
    for phase in [
        ImportPhase::Copying,
        ImportPhase::Following,
        ImportPhase::Done,
    ] {
        let endpoint = &topology.shards()[1].endpoint;
        kubeshard_shard_worker::open_store(endpoint, kubeshard_shard_worker::RevisionClass::ALL)
            .await
            .expect("create the shard");
        let bulk = kubeshard_shard_worker::open_bulk(endpoint)
            .await
            .expect("bulk sink");
        let state = ImportState {
            source: "import from etcd cluster 1f at http://127.0.0.1:2379".into(),
            revision: 42,
            phase,
        };
        bulk.set_import_state(&state).await.expect("set the state");
        let mut options = ServerOptions::for_endpoint(
            Endpoint::parse("sqlite:///unused.db").expect("endpoint"),
            "127.0.0.1:0",
        );
        options.topology = topology.clone();
        match (phase, kubeshard::start(options).await) {
            (ImportPhase::Done, Ok(server)) => server.shutdown().await.expect("shutdown"),
            (ImportPhase::Done, Err(e)) => panic!("a finished import is refused: {e}"),
            (_, Ok(_)) => panic!("an unfinished import ({phase:?}) was served"),
            (_, Err(e)) => {
                let error = e.to_string();
                assert!(error.contains("shard half"), "{error}");
                assert!(
                    error.contains(&format!(
                        "a data move into this database is unfinished (import from etcd cluster 1f at http://127.0.0.1:2379; {} at revision 42)",
                        phase.as_str()
                    )),
                    "{error}"
                );
            }
        }
    }
}

/// The data is arranged for the topology of the first start; a router given
/// a topology that places keys elsewhere refuses to serve (it would look
/// for keys where they are not), one that only moves a database or changes
/// a pool size serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_placement_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = |routes: &str, pool: &str| {
        format!(
            r#"default_shard = "zero"

[[shards]]
name = "zero"
endpoint = "sqlite://{dir}/zero.db"
{pool}
[[shards]]
name = "one"
endpoint = "sqlite://{dir}/one.db"
{routes}"#,
            dir = dir.path().display()
        )
    };
    let pods = "\n[[routes]]\nresource = \"pods\"\nshard = \"one\"\n";
    let events = "\n[[routes]]\nresource = \"events\"\nshard = \"one\"\n";
    let start = |toml: String, name: &'static str| async move {
        let mut options = ServerOptions::for_endpoint(
            Endpoint::parse("sqlite:///unused.db").expect("endpoint"),
            "127.0.0.1:0",
        );
        options.topology = Topology::from_toml_str(&toml, name).expect("valid topology");
        kubeshard::start(options).await
    };
    let first = start(file(pods, ""), "pods.toml")
        .await
        .expect("first start");
    first.shutdown().await.expect("shutdown");
    let same = start(file(pods, "max_connections = 3\n"), "pods-pool.toml")
        .await
        .expect("the same placement with another pool size");
    same.shutdown().await.expect("shutdown");
    let error = match start(file(events, ""), "events.toml").await {
        Ok(_) => panic!("a topology placing keys elsewhere was served"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.starts_with("the data is arranged for another topology than events.toml's"),
        "{error}"
    );
    assert!(error.contains("route resource \"pods\""), "{error}");
    assert!(error.contains("route resource \"events\""), "{error}");
}
