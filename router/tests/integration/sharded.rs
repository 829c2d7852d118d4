//! A router over three shards: many writers on every shard while merged
//! ranges (paginated at one revision) and merged watches run, checked
//! against the invariants of shared/design/revisions.md.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, WatchOptions};
use kubeshard_config::{Endpoint, ServerOptions, Topology};
use tokio::time::Instant;

use crate::support::{
    Ctx, Ev, Kind, collect, connect, drop_database, expect_created, header_revision, with_database,
};

const WRITERS: usize = 6;
const WRITES_PER_WRITER: usize = 60;
const PAGE: i64 = 7;

/// The shard of each writer's keys: /k/0/ on the default shard, /k/1/ and
/// /k/2/ on the others.
fn topology(endpoints: &[String; 3]) -> Topology {
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
fn shard_endpoints(ctx: &Ctx) -> [String; 3] {
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

/// One acknowledged write: its revision, key and kind.
type Write = (i64, String, Kind);

pub async fn writers_ranges_and_watches_across_shards(ctx: Ctx) {
    let endpoints = shard_endpoints(&ctx);
    let mut options = ServerOptions::for_endpoint(ctx.endpoint.clone(), "127.0.0.1:0");
    options.topology = topology(&endpoints);
    let server = kubeshard::start(options)
        .await
        .unwrap_or_else(|e| panic!("sharded server did not start: {e}"));
    let mut client = connect(&server).await;
    let deadline = Instant::now() + Duration::from_secs(120);

    // kube-apiserver's pattern: list, then watch from the list's revision + 1.
    let listed = client
        .get("/k/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("initial list");
    let start = header_revision(listed.header());
    let (mut watcher, mut stream) = client
        .watch(
            "/k/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start + 1),
            ),
        )
        .await
        .expect("watch /k/")
        .split();
    expect_created(&mut stream, deadline).await;
    let live = collect(stream, deadline, "live merged watch");

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
    let seen: Vec<Write> = events_of(&got.events.values().flatten().cloned().collect::<Vec<_>>());
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
    let (mut replay_watcher, mut replay_stream) = client
        .watch(
            "/k/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start + 1),
            ),
        )
        .await
        .expect("replay watch")
        .split();
    expect_created(&mut replay_stream, deadline).await;
    let replay = collect(replay_stream, deadline, "replayed merged watch");
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
    tokio::time::timeout(Duration::from_secs(20), server.shutdown())
        .await
        .expect("server shutdown hung")
        .expect("server shutdown failed");
    if let (Some(url), Some(database)) = (&ctx.admin_url, &ctx.database) {
        for i in 0..3 {
            drop_database(ctx.backend, url, &shard_database(database, i));
        }
    }
}

fn events_of(events: &[Ev]) -> Vec<Write> {
    events
        .iter()
        .map(|e| (e.kv.modified, e.kv.key.clone(), e.kind))
        .collect()
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
