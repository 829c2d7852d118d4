//! A database that hangs rather than refuses (a frozen host, a black-holed
//! path), made by a freezing TCP proxy in front of a PostgreSQL shard and
//! then a MariaDB shard, while clients write to every shard and watch each
//! one. kubeshard runs with `--datastore-timeout 3s`. Checked:
//! - the frozen shard's requests (writes and a read) fail in time, with
//!   etcd's answer for a timed-out request, and nothing else goes wrong;
//! - the other shards keep taking writes, and their watches keep going;
//! - after the thaw the frozen shard serves again by itself;
//! - every acknowledged write is there at its revision, no write answered
//!   "request timed out" is, and each shard's watch saw exactly the final
//!   keys, once each, in revision order (no gap across the freeze).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, GetOptions, WatchOptions};
use kubeshard_tests::env::skip;
use kubeshard_tests::freeze::FreezingProxy;
use kubeshard_tests::server::{Backend, KubeshardServer, Server, connect};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// `--datastore-timeout` of the server under test.
const LIMIT: Duration = Duration::from_secs(3);
/// Every answer comes within LIMIT and this (a loaded two-core machine).
const SLACK: Duration = Duration::from_millis(2500);
/// How long each database stays frozen.
const FROZEN: Duration = Duration::from_secs(9);
/// The thawed shard must take writes again within this.
const RECOVERY: Duration = Duration::from_secs(15);

const TIMED_OUT: &str = "etcdserver: request timed out";
/// gRPC's code, as etcd gives both.
const UNAVAILABLE: i32 = 14;
const MAYBE: &str = "etcdserver: request timed out, possibly due to connection lost";

/// The three shards: name, the prefix routed to it, its database.
const SHARDS: [(&str, &str); 3] = [
    ("core", "/registry/secrets/"),
    ("pg", "/registry/pods/"),
    ("my", "/registry/configmaps/"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acked(i64),
    /// "request timed out": must never appear.
    TimedOut,
    /// "...possibly due to connection lost": may or may not appear.
    Unknown,
}

#[derive(Debug, Clone)]
struct Put {
    shard: usize,
    key: String,
    started: Instant,
    took: Duration,
    outcome: Outcome,
}

/// `url` with its host and port replaced by the proxy's.
fn through(url: &str, proxy: &FreezingProxy) -> String {
    let mut url = url::Url::parse(url).expect("a database URL");
    let _ = url.set_host(Some("127.0.0.1"));
    let _ = url.set_port(Some(proxy.port()));
    url.to_string()
}

fn address(url: &str) -> SocketAddr {
    let url = url::Url::parse(url).expect("a database URL");
    let host = url.host_str().expect("a host");
    let port = url.port_or_known_default().expect("a port");
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .expect("resolve the database host")
        .next()
        .expect("an address")
}

/// The etcd status of a failed request: Unavailable with one of the two
/// timeout texts, or the test fails.
fn outcome_of(e: &etcd_client::Error, what: &str) -> Outcome {
    match e {
        etcd_client::Error::GRpcStatus(s)
            if s.code() as i32 == UNAVAILABLE && s.message() == TIMED_OUT =>
        {
            Outcome::TimedOut
        }
        etcd_client::Error::GRpcStatus(s)
            if s.code() as i32 == UNAVAILABLE && s.message() == MAYBE =>
        {
            Outcome::Unknown
        }
        other => panic!("{what}: {other}, not etcd's answer for a timed-out request"),
    }
}

async fn writer(
    endpoint: String,
    shard: usize,
    task: usize,
    puts: Arc<Mutex<Vec<Put>>>,
    stop: Arc<AtomicBool>,
) {
    let mut client = connect(&endpoint).await.expect("connect");
    for n in 0.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let key = format!("{}ns/k-{task}-{n}", SHARDS[shard].1);
        let started = Instant::now();
        let answer = tokio::time::timeout(LIMIT * 4, client.put(key.as_str(), "v", None)).await;
        let took = started.elapsed();
        let outcome = match answer {
            Err(_) => panic!("put {key} had no answer after {:?}", LIMIT * 4),
            Ok(Ok(r)) => Outcome::Acked(r.header().map(|h| h.revision()).unwrap_or(0)),
            Ok(Err(e)) => outcome_of(&e, &format!("put {key}")),
        };
        puts.lock().await.push(Put {
            shard,
            key,
            started,
            took,
            outcome,
        });
        if !matches!(outcome, Outcome::Acked(_)) {
            // A failed put is not retried at once: the next one is new.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Watches `prefix` from `from`, watching again after the last event
/// should the stream end, until it has seen `until` (once that is set);
/// (revision, key) of every event.
async fn watcher(
    endpoint: String,
    prefix: &'static str,
    from: i64,
    events: Arc<Mutex<Vec<(i64, String)>>>,
    until: Arc<AtomicI64>,
) -> usize {
    let mut next = from;
    let mut restarts: usize = 0;
    let done = |next: i64| {
        let until = until.load(Ordering::SeqCst);
        until > 0 && next > until
    };
    while !done(next) {
        let Ok(mut client) = connect(&endpoint).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let options = WatchOptions::new().with_prefix().with_start_revision(next);
        let Ok(mut stream) = client.watch(prefix, Some(options)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while !done(next) {
            let message = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
            let response = match message {
                Err(_) => continue,
                Ok(Ok(Some(r))) if !r.canceled() => r,
                Ok(_) => break,
            };
            let mut seen = events.lock().await;
            for e in response.events() {
                let Some(kv) = e.kv() else { continue };
                seen.push((
                    kv.mod_revision(),
                    String::from_utf8_lossy(kv.key()).into_owned(),
                ));
                next = next.max(kv.mod_revision() + 1);
            }
        }
        restarts += 1;
    }
    restarts.saturating_sub(1)
}

/// Waits until `shard` took a write started after `thawed` (at most
/// [`RECOVERY`]), then lets the load run two seconds more.
async fn recovered(puts: &Mutex<Vec<Put>>, shard: usize, thawed: Instant) {
    loop {
        let back = puts.lock().await.iter().any(|p| {
            p.shard == shard && p.started >= thawed && matches!(p.outcome, Outcome::Acked(_))
        });
        if back || thawed.elapsed() > RECOVERY {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Freezes `proxy` for [`FROZEN`]; checks a read of the frozen shard on
/// the way; returns when the freeze began and ended.
async fn freeze(client: &mut Client, proxy: &FreezingProxy, shard: usize) -> (Instant, Instant) {
    let began = Instant::now();
    proxy.freeze();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let read = client
        .get(SHARDS[shard].1, Some(GetOptions::new().with_prefix()))
        .await;
    let took = started.elapsed();
    match read {
        Ok(_) => panic!("a read of the frozen shard {} succeeded", SHARDS[shard].0),
        Err(e) => assert_eq!(
            outcome_of(&e, "a read of the frozen shard"),
            Outcome::TimedOut,
            "a read is never of unknown outcome"
        ),
    }
    // Sooner when it waited on a call of the shard made before it (the
    // raise of the shard to the router's revision, shared by all reads).
    assert!(
        took <= LIMIT + SLACK,
        "a read of the frozen shard failed after {took:?}, not within {LIMIT:?}"
    );
    let rest = FROZEN.saturating_sub(began.elapsed());
    tokio::time::sleep(rest).await;
    proxy.thaw();
    (began, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_database_fails_its_requests_in_time() {
    let test = "a_frozen_database_fails_its_requests_in_time";
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut urls = Vec::new();
    for backend in [Backend::Postgres, Backend::Mysql] {
        match backend.fresh_endpoint(dir.path()) {
            Ok(url) => urls.push(url),
            Err(why) => {
                skip::<()>(test, &format!("{}: {why}", backend.name()));
                return;
            }
        }
    }
    let pg_proxy = FreezingProxy::start(address(&urls[0]))
        .await
        .expect("a proxy");
    let my_proxy = FreezingProxy::start(address(&urls[1]))
        .await
        .expect("a proxy");
    let endpoints = [
        format!("sqlite://{}", dir.path().join("core.db").display()),
        through(&urls[0], &pg_proxy),
        through(&urls[1], &my_proxy),
    ];
    let mut toml = String::from("default_shard = \"core\"\n");
    for ((name, _), url) in SHARDS.iter().zip(&endpoints) {
        toml.push_str(&format!(
            "\n[[shards]]\nname = \"{name}\"\nendpoint = \"{url}\"\n"
        ));
    }
    for (name, prefix) in &SHARDS[1..] {
        toml.push_str(&format!(
            "\n[[routes]]\nprefix = \"{prefix}\"\nshard = \"{name}\"\n"
        ));
    }
    let config = dir.path().join("topology.toml");
    std::fs::write(&config, toml).expect("write the topology");
    let args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--datastore-timeout".to_string(),
        "3s".to_string(),
    ];
    let server = KubeshardServer::start_with(Backend::Sqlite, args, Vec::new(), urls).await;
    let endpoint = server.endpoint();
    let mut client = connect(&endpoint).await.expect("connect");
    let start = client
        .put("/registry/start", "", None)
        .await
        .expect("put")
        .header()
        .map(|h| h.revision())
        .expect("a header");

    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for shard in 0..SHARDS.len() {
        for task in 0..2 {
            let (endpoint, puts, stop) = (endpoint.clone(), puts.clone(), stop.clone());
            writers.push(tokio::spawn(writer(endpoint, shard, task, puts, stop)));
        }
    }
    let mut watches = Vec::new();
    let mut seen = Vec::new();
    let mut untils = Vec::new();
    for (_, prefix) in SHARDS {
        let events = Arc::new(Mutex::new(Vec::new()));
        seen.push(events.clone());
        let until = Arc::new(AtomicI64::new(0));
        untils.push(until.clone());
        let endpoint = endpoint.clone();
        watches.push(tokio::spawn(watcher(
            endpoint,
            prefix,
            start + 1,
            events,
            until,
        )));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let pg_window = freeze(&mut client, &pg_proxy, 1).await;
    recovered(&puts, 1, pg_window.1).await;
    let my_window = freeze(&mut client, &my_proxy, 2).await;
    recovered(&puts, 2, my_window.1).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await
            .unwrap_or_else(|e| panic!("a writer failed: {e}\n{}", server.log_tail()));
    }
    let puts = puts.lock().await.clone();

    // Every answer in time, and only the two timeout answers as errors.
    for p in &puts {
        assert!(
            p.took <= LIMIT + SLACK,
            "put {} answered after {:?}\n{}",
            p.key,
            p.took,
            server.log_tail()
        );
    }
    for (frozen, window) in [(1, pg_window), (2, my_window)] {
        let (began, ended) = window;
        let during = |p: &&&Put| p.started >= began + SLACK && p.started + p.took <= ended;
        for (shard, (name, _)) in SHARDS.iter().enumerate() {
            let puts: Vec<&Put> = puts.iter().filter(|p| p.shard == shard).collect();
            let acked = puts
                .iter()
                .filter(during)
                .filter(|p| matches!(p.outcome, Outcome::Acked(_)))
                .count();
            let failed = puts
                .iter()
                .filter(|p| p.started >= began && p.started <= ended)
                .filter(|p| !matches!(p.outcome, Outcome::Acked(_)))
                .count();
            if shard == frozen {
                assert_eq!(acked, 0, "shard {name} took writes while frozen");
                assert!(failed > 0, "no write to the frozen shard {name} failed");
                let back = puts.iter().any(|p| {
                    p.started >= ended
                        && p.started <= ended + RECOVERY
                        && matches!(p.outcome, Outcome::Acked(_))
                });
                assert!(
                    back,
                    "shard {name} took no write within {RECOVERY:?} of the thaw"
                );
            } else {
                assert!(
                    acked >= 10,
                    "shard {name} took {acked} writes while shard {} was frozen",
                    SHARDS[frozen].0
                );
                assert_eq!(
                    failed, 0,
                    "shard {name} failed writes while shard {} was frozen",
                    SHARDS[frozen].0
                );
            }
        }
    }

    // The state: acknowledged writes there at their revisions, writes
    // refused in time absent.
    let mut states = Vec::new();
    for (shard, (_, prefix)) in SHARDS.iter().enumerate() {
        let got = client
            .get(*prefix, Some(GetOptions::new().with_prefix()))
            .await
            .unwrap_or_else(|e| panic!("get {prefix}: {e}"));
        let state: BTreeMap<String, i64> = got
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.mod_revision(),
                )
            })
            .collect();
        // The watch runs until it saw the last of them.
        let last = state.values().max().copied().unwrap_or(start + 1);
        untils[shard].store(last, Ordering::SeqCst);
        states.push(state);
    }
    let mut restarts = Vec::new();
    for w in watches {
        let watched = tokio::time::timeout(Duration::from_secs(30), w).await;
        restarts.push(watched.expect("the watches end").expect("a watcher"));
    }
    for (shard, (name, _)) in SHARDS.iter().enumerate() {
        let state = &states[shard];
        let (mut unknown, mut unknown_applied) = (0, 0);
        for p in puts.iter().filter(|p| p.shard == shard) {
            match p.outcome {
                Outcome::Acked(revision) => assert_eq!(
                    state.get(&p.key),
                    Some(&revision),
                    "acknowledged put {} at {revision}",
                    p.key
                ),
                Outcome::TimedOut => assert!(
                    !state.contains_key(&p.key),
                    "put {} was answered 'request timed out' and was applied",
                    p.key
                ),
                Outcome::Unknown => {
                    unknown += 1;
                    unknown_applied += usize::from(state.contains_key(&p.key));
                }
            }
        }
        // The watch: each final key once, at its revision, in order.
        let events = seen[shard].lock().await.clone();
        let mut keys = HashSet::new();
        for pair in events.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "shard {name}'s watch: revision {} after {}",
                pair[1].0,
                pair[0].0
            );
        }
        for (revision, key) in &events {
            assert!(
                keys.insert(key.clone()),
                "shard {name}'s watch saw {key} twice"
            );
            assert_eq!(
                state.get(key),
                Some(revision),
                "shard {name}'s watch saw {key} at {revision}"
            );
        }
        assert_eq!(keys.len(), state.len(), "shard {name}'s watch missed keys");
        let timed_out = puts
            .iter()
            .filter(|p| p.shard == shard && p.outcome == Outcome::TimedOut)
            .count();
        eprintln!(
            "{test}: shard {name}: {} keys; {timed_out} writes timed out, {unknown} of \
             unknown outcome ({unknown_applied} applied); watch restarted {} times",
            state.len(),
            restarts[shard]
        );
    }
    // The connections that hung were closed by kubeshard, not kept.
    for (name, proxy) in [("pg", &pg_proxy), ("my", &my_proxy)] {
        let counts = proxy.counts();
        let closed = counts.closed_by_client.load(Ordering::Relaxed);
        let accepted = counts.accepted.load(Ordering::Relaxed);
        eprintln!("{test}: proxy of {name}: {accepted} connections, {closed} closed by kubeshard");
        assert!(
            closed > 0,
            "kubeshard closed none of {name}'s hung connections"
        );
    }
}
