//! `kubeshard reshard --online`: keys move while two routers serve under
//! load, one of them killed during the move and started again on the new
//! topology. The move covers the three cases of docs/topology.md: a
//! resource leaving the default shard for a new database, a shard added to
//! a hashed route, a resource split by namespace; on SQLite, PostgreSQL and
//! MariaDB databases. Checked as the concurrency tests do:
//! - every acknowledged write is there, with its revision, once;
//! - a watch of everything, resumed after each stream end from the
//!   revision after its last event, sees every change once, in order;
//! - reads at past revisions equal the state the watch's events give;
//! - every revision written after the switch is above the switch revision.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use kubeshard_tests::env::skip;
use kubeshard_tests::server::{
    Backend, KubeshardServer, Server, connect, drop_database, kubeshard_binary,
};
use tokio::sync::Mutex;

struct Databases(Vec<String>);

impl Drop for Databases {
    fn drop(&mut self) {
        for url in &self.0 {
            drop_database(url);
        }
    }
}

fn topology(shards: &[(&str, &str)], routes: &str) -> String {
    let mut toml = String::from("default_shard = \"core\"\n");
    for (shard, url) in shards {
        toml.push_str(&format!(
            "\n[[shards]]\nname = \"{shard}\"\nendpoint = \"{url}\"\n"
        ));
    }
    toml.push_str(routes);
    toml
}

async fn serve(config: &Path) -> KubeshardServer {
    let args = vec!["--config".to_string(), config.display().to_string()];
    KubeshardServer::start_with(Backend::Sqlite, args, Vec::new(), Vec::new()).await
}

/// One write's outcome: acknowledged at a revision, or unknown (the router
/// died or the request failed; it may or may not have been applied).
#[derive(Debug, Clone)]
struct Attempt {
    value: String,
    revision: Option<i64>,
    /// False for an acknowledged delete that found nothing to delete.
    changed: bool,
}

/// Every write attempted, per key, in the order they were sent (a key is
/// written by one task only).
type Attempts = Arc<Mutex<HashMap<String, Vec<Attempt>>>>;

/// The keys of writer `task`: pods in namespaces the hashed route spreads,
/// configmaps (which leave the default shard), secrets in the namespace
/// that is split off and in one that stays.
fn keys_of(task: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for ns in 0..8 {
        keys.push(format!("/registry/pods/ns{ns}/t{task}"));
    }
    for i in 0..3 {
        keys.push(format!("/registry/configmaps/default/t{task}-{i}"));
        keys.push(format!("/registry/secrets/team-a/t{task}-{i}"));
        keys.push(format!("/registry/secrets/team-b/t{task}-{i}"));
    }
    keys
}

/// Writes the task's keys in turn through whichever router is up, until
/// `stop`; every fifth write deletes.
async fn writer(
    task: usize,
    routers: Arc<Mutex<Vec<String>>>,
    attempts: Attempts,
    stop: Arc<AtomicBool>,
) {
    let keys = keys_of(task);
    let mut clients: HashMap<String, Client> = HashMap::new();
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let key = &keys[n % keys.len()];
        let value = format!("t{task}-w{n}");
        let endpoints = routers.lock().await.clone();
        let endpoint = &endpoints[n % endpoints.len()];
        n += 1;
        let client = match clients.get_mut(endpoint) {
            Some(c) => c,
            None => match connect(endpoint).await {
                Ok(c) => clients.entry(endpoint.clone()).or_insert(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let delete = n.is_multiple_of(5);
        let sent = if delete {
            tokio::time::timeout(Duration::from_secs(60), client.delete(key.as_str(), None))
                .await
                .map(|r| r.map(|d| (d.header().map_or(0, |h| h.revision()), d.deleted() > 0)))
        } else {
            tokio::time::timeout(
                Duration::from_secs(60),
                client.put(key.as_str(), value.as_str(), None),
            )
            .await
            .map(|r| r.map(|p| (p.header().map_or(0, |h| h.revision()), true)))
        };
        let (revision, changed) = match sent {
            Ok(Ok((revision, changed))) => (Some(revision), changed),
            _ => {
                clients.remove(endpoint);
                (None, true)
            }
        };
        attempts
            .lock()
            .await
            .entry(key.clone())
            .or_default()
            .push(Attempt {
                value: if delete { String::new() } else { value },
                revision,
                changed,
            });
    }
}

/// Reads of one key now: (key, header revision, the key's mod revision and
/// value if it exists).
type Reads = Vec<(String, i64, Option<(i64, String)>)>;

/// Reads the writers' keys in turn through `endpoint` until `stop`.
async fn reader(endpoint: String, reads: Arc<Mutex<Reads>>, stop: Arc<AtomicBool>) {
    let keys: Vec<String> = (0..WRITERS).flat_map(keys_of).collect();
    let mut client = connect(&endpoint).await.expect("connect");
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let key = &keys[n % keys.len()];
        n += 1;
        let Ok(Ok(answer)) =
            tokio::time::timeout(Duration::from_secs(60), client.get(key.as_str(), None)).await
        else {
            continue;
        };
        let header = answer.header().map_or(0, |h| h.revision());
        let found = answer.kvs().first().map(|kv| {
            (
                kv.mod_revision(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        });
        reads.lock().await.push((key.clone(), header, found));
    }
}

const WRITERS: usize = 4;

/// Keys written before the load, per moving resource.
const PRELOAD: usize = 1600;

/// (revision, key, value; empty for a delete) of every event.
type Events = Vec<(i64, String, String)>;

/// Watches everything from `from`, through `endpoint`, until `stop`, then
/// until it has seen `until.load()`; a stream that ends is watched again
/// from the revision after the last event (as etcd's Go client does).
async fn watcher(
    endpoint: String,
    from: i64,
    events: Arc<Mutex<Events>>,
    until: Arc<std::sync::atomic::AtomicI64>,
    restarts: Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut next = from;
    loop {
        let target = until.load(Ordering::SeqCst);
        if target > 0 && next > target {
            return;
        }
        let Ok(mut client) = connect(&endpoint).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let options = WatchOptions::new().with_prefix().with_start_revision(next);
        let Ok(mut stream) = client.watch("/registry/", Some(options)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let target = until.load(Ordering::SeqCst);
            if target > 0 && next > target {
                return;
            }
            let message = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
            let response = match message {
                Err(_) => continue,
                Ok(Ok(Some(r))) => r,
                Ok(_) => break,
            };
            assert!(
                !response.canceled() || response.compact_revision() == 0,
                "the watch was compacted: {response:?}"
            );
            if response.canceled() {
                break;
            }
            let mut seen = events.lock().await;
            for e in response.events() {
                let Some(kv) = e.kv() else { continue };
                let value = if e.event_type() == EventType::Delete {
                    String::new()
                } else {
                    String::from_utf8_lossy(kv.value()).into_owned()
                };
                seen.push((
                    kv.mod_revision(),
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    value,
                ));
                next = next.max(kv.mod_revision() + 1);
            }
        }
        restarts.fetch_add(1, Ordering::SeqCst);
    }
}

/// Everything under /registry/ at `revision` (0: now).
async fn state_at(c: &mut Client, revision: i64) -> BTreeMap<String, String> {
    let mut options = GetOptions::new().with_prefix();
    if revision > 0 {
        options = options.with_revision(revision);
    }
    let answer = c
        .get("/registry/", Some(options))
        .await
        .unwrap_or_else(|e| panic!("get at {revision}: {e}"));
    answer
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect()
}

/// Writers, a reader and a watcher through the routers, and what they saw.
struct Load {
    routers: Arc<Mutex<Vec<String>>>,
    attempts: Attempts,
    stop: Arc<AtomicBool>,
    events: Arc<Mutex<Events>>,
    until: Arc<std::sync::atomic::AtomicI64>,
    restarts: Arc<std::sync::atomic::AtomicUsize>,
    reads: Arc<Mutex<Reads>>,
    watching: tokio::task::JoinHandle<()>,
    reading: tokio::task::JoinHandle<()>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

/// What a [`Load`] saw.
struct Seen {
    attempts: HashMap<String, Vec<Attempt>>,
    events: Events,
    reads: Reads,
    restarts: usize,
}

impl Load {
    /// Writes through `routers` (a router that dies is left out by the
    /// test), reads and watches everything from `start + 1` through the
    /// first one.
    fn start(routers: Vec<String>, start: i64) -> Load {
        let watch_through = routers[0].clone();
        let routers = Arc::new(Mutex::new(routers));
        let attempts: Attempts = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let events: Arc<Mutex<Events>> = Arc::default();
        let until = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let restarts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reads: Arc<Mutex<Reads>> = Arc::default();
        let watching = tokio::spawn(watcher(
            watch_through.clone(),
            start + 1,
            events.clone(),
            until.clone(),
            restarts.clone(),
        ));
        let reading = tokio::spawn(reader(watch_through, reads.clone(), stop.clone()));
        let writers = (0..WRITERS)
            .map(|task| {
                tokio::spawn(writer(
                    task,
                    routers.clone(),
                    attempts.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Load {
            routers,
            attempts,
            stop,
            events,
            until,
            restarts,
            reads,
            watching,
            reading,
            writers,
        }
    }

    async fn without(&self, router: &str) {
        self.routers.lock().await.retain(|e| e != router);
    }

    /// Stops writing and reading.
    async fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.writers.drain(..) {
            w.await.expect("writer");
        }
        (&mut self.reading).await.expect("reader");
    }

    /// A write made by the test itself, through `client`.
    async fn put(&self, client: &mut Client, key: &str, value: &str) {
        let put = client.put(key, value, None).await.expect("put");
        self.attempts
            .lock()
            .await
            .entry(key.to_string())
            .or_default()
            .push(Attempt {
                value: value.to_string(),
                revision: put.header().map(|h| h.revision()),
                changed: true,
            });
    }

    /// Once the watch has every event up to `head`: what was seen.
    async fn finish(self, head: i64) -> Seen {
        self.until.store(head, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(60), self.watching)
            .await
            .expect("the watch reaches the last revision")
            .expect("watcher");
        Seen {
            attempts: self.attempts.lock().await.clone(),
            events: self.events.lock().await.clone(),
            reads: self.reads.lock().await.clone(),
            restarts: self.restarts.load(Ordering::SeqCst),
        }
    }
}

impl Seen {
    /// The checks of the module comment, reading through `c`; `start` is
    /// the revision the load started after. Returns the acknowledged writes
    /// above `switch_revision`.
    async fn check(&self, c: &mut Client, start: i64, switch_revision: i64) -> usize {
        let (attempts, events, reads) = (&self.attempts, &self.events, &self.reads);
        let acknowledged: usize = attempts
            .values()
            .map(|a| a.iter().filter(|a| a.revision.is_some()).count())
            .sum();
        assert!(acknowledged > 100, "too few writes: {acknowledged}");
        // The watch: every change once, in revision order.
        for pair in events.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "watch events out of order or repeated: {pair:?}"
            );
        }
        let by_revision: HashMap<i64, (String, String)> = events
            .iter()
            .map(|(r, k, v)| (*r, (k.clone(), v.clone())))
            .collect();
        let mut after_switch = 0;
        for (key, tried) in attempts {
            for attempt in tried {
                let Some(revision) = attempt.revision else {
                    continue;
                };
                if !attempt.changed {
                    // A delete of a key already gone changes nothing.
                    continue;
                }
                assert_eq!(
                    by_revision.get(&revision),
                    Some(&(key.clone(), attempt.value.clone())),
                    "acknowledged write of {key} at {revision} not in the watch"
                );
                if revision > switch_revision {
                    after_switch += 1;
                }
            }
            // The key ends as its last acknowledged write left it, or as a
            // later write whose answer was lost.
            let last_acked = tried.iter().rposition(|a| a.revision.is_some());
            let allowed: Vec<&str> = match last_acked {
                Some(i) => tried[i..].iter().map(|a| a.value.as_str()).collect(),
                None => tried.iter().map(|a| a.value.as_str()).collect(),
            };
            let now = c.get(key.as_str(), None).await.expect("get");
            let value = now
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                .unwrap_or_default();
            assert!(
                allowed.contains(&value.as_str()) || (last_acked.is_none() && value.is_empty()),
                "{key} is {value:?}; acknowledged then tried: {allowed:?}"
            );
        }
        // Reads of one key now: what the history says the key was at the
        // read's revision.
        let mut per_key: HashMap<&str, Vec<(i64, &str)>> = HashMap::new();
        for (revision, key, value) in events {
            per_key.entry(key).or_default().push((*revision, value));
        }
        assert!(reads.len() > 100, "too few reads: {}", reads.len());
        for (key, header, found) in reads {
            let then = per_key
                .get(key.as_str())
                .and_then(|changes| changes.iter().rev().find(|(r, _)| r <= header))
                .filter(|(_, value)| !value.is_empty())
                .map(|(r, value)| (*r, value.to_string()));
            assert_eq!(
                found, &then,
                "a read of {key} at {header} against the history"
            );
        }
        // Now: the state all the events give (live rows agree with history).
        let mut replayed = state_at(c, start).await;
        for (_, key, value) in events {
            if value.is_empty() {
                replayed.remove(key);
            } else {
                replayed.insert(key.clone(), value.clone());
            }
        }
        same_state(
            &state_at(c, 0).await,
            &replayed,
            "the state now against the watch's events",
        );
        // Reads at past revisions: the state the events give.
        let mut state = state_at(c, start).await;
        let checkpoints: Vec<i64> = events
            .iter()
            .map(|e| e.0)
            .step_by((events.len() / 12).max(1))
            .collect();
        let mut applied = 0;
        for at in checkpoints {
            while applied < events.len() && events[applied].0 <= at {
                let (_, key, value) = &events[applied];
                if value.is_empty() {
                    state.remove(key);
                } else {
                    state.insert(key.clone(), value.clone());
                }
                applied += 1;
            }
            same_state(&state_at(c, at).await, &state, &format!("the read at {at}"));
        }
        after_switch
    }
}

/// A fresh database per shard, of its backend; None (the test is skipped)
/// when a backend is not there.
fn fresh_databases(test: &str, dir: &Path, shards: &[(&str, Backend)]) -> Option<Vec<String>> {
    let mut urls = Vec::new();
    for (name, backend) in shards {
        match backend.fresh_endpoint(&dir.join(name)) {
            Ok(url) => urls.push(url),
            Err(why) => return skip(test, &format!("backend {}: {why}", backend.name())),
        }
        std::fs::create_dir_all(dir.join(name)).expect("dir");
    }
    Some(urls)
}

/// Writes the files of `kubeshard reshard --from` and `--to`, and the
/// routers' file, which says `old` until the operator updates it.
fn topology_files(dir: &Path, old: &str, new: &str) -> (PathBuf, PathBuf, PathBuf) {
    let files = (
        dir.join("old.toml"),
        dir.join("new.toml"),
        dir.join("config.toml"),
    );
    std::fs::write(&files.0, old).expect("write");
    std::fs::write(&files.1, new).expect("write");
    std::fs::write(&files.2, old).expect("write");
    files
}

/// Writes [`PRELOAD`] configmaps and secrets of namespace team-a.
async fn preload(endpoint: &str) {
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let endpoint = endpoint.to_string();
            tokio::spawn(async move {
                let mut c = connect(&endpoint).await.expect("connect");
                for i in 0..PRELOAD / 8 {
                    for prefix in ["configmaps/bulk", "secrets/team-a"] {
                        let key = format!("/registry/{prefix}/k{task}-{i}");
                        c.put(key, "preloaded", None).await.expect("preload");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("preload");
    }
}

/// Starts `kubeshard reshard --online --verify`, its output in `log`.
async fn reshard_online(from: &Path, to: &Path, log: &Path) -> std::process::Child {
    let bin = kubeshard_binary().await;
    let out = std::fs::File::create(log).expect("log");
    Command::new(bin)
        .args(["reshard", "--online", "--verify", "--from"])
        .arg(from)
        .arg("--to")
        .arg(to)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("run kubeshard reshard --online")
}

/// The switch revision the move logged.
fn switch_revision_in(log: &str) -> i64 {
    log.rsplit("switch_revision=")
        .next()
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no switch revision in:\n{log}"))
}

/// Fails naming the first keys on which `got` and `want` differ.
fn same_state(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>, what: &str) {
    let keys: std::collections::BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| got.get(*k) != want.get(*k))
        .take(10)
        .map(|k| format!("{k}: {:?} instead of {:?}", got.get(k), want.get(k)))
        .collect();
    assert!(differ.is_empty(), "{what}:\n{}", differ.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_reshard_under_load() {
    let test = "online_reshard_under_load";
    let dir = tempfile::tempdir().expect("temporary directory");
    let Some(urls) = fresh_databases(
        test,
        dir.path(),
        &[
            ("core", Backend::Sqlite),
            ("p1", Backend::Postgres),
            ("cm", Backend::Mysql),
            ("p2", Backend::Sqlite),
            ("sec", Backend::Postgres),
        ],
    ) else {
        return;
    };
    let _drop = Databases(urls.clone());
    let old = topology(
        &[("core", &urls[0]), ("p1", &urls[1])],
        "\n[[routes]]\nresource = \"pods\"\nshards = [\"core\", \"p1\"]\nhash = \"resource-namespace\"\n",
    );
    // Configmaps leave the default shard; pods get a third shard; the
    // secrets of namespace team-a go to a database of their own.
    let new = topology(
        &[
            ("core", &urls[0]),
            ("p1", &urls[1]),
            ("cm", &urls[2]),
            ("p2", &urls[3]),
            ("sec", &urls[4]),
        ],
        "\n[[routes]]\nresource = \"pods\"\nshards = [\"core\", \"p1\", \"p2\"]\nhash = \"resource-namespace\"\n\
         \n[[routes]]\nresource = \"configmaps\"\nshard = \"cm\"\n\
         \n[[routes]]\nprefix = \"/registry/secrets/team-a/\"\nshard = \"sec\"\n",
    );
    let (old_file, new_file, config) = topology_files(dir.path(), &old, &new);

    let r1 = serve(&config).await;
    let r2 = serve(&config).await;
    let mut c = connect(&r1.endpoint()).await.expect("connect");
    // Keys that move and that nobody writes during the move: the longer
    // the move's last step, the longer writes to moving keys must wait.
    preload(&r1.endpoint()).await;
    let start = c
        .get("/", None)
        .await
        .expect("get")
        .header()
        .map_or(0, |h| h.revision());
    // A read of everything through the second router too: a router's
    // writes come after what it has seen (revisions.md, invariant 4), so
    // none of them can land below the watch's start.
    connect(&r2.endpoint())
        .await
        .expect("connect")
        .get(
            "/registry/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count");
    let mut load = Load::start(vec![r1.endpoint(), r2.endpoint()], start);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The operator updates the routers' file, then moves the data.
    std::fs::write(&config, &new).expect("write");
    let log = dir.path().join("reshard.log");
    let mut command = reshard_online(&old_file, &new_file, &log).await;
    // A router dies during the move.
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.without(&r2.endpoint()).await;
    drop(r2);
    let moving = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || command.wait())
        .await
        .expect("join")
        .expect("wait for the reshard");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("{test}: the move took {:?}", moving.elapsed());
    assert!(status.success(), "reshard --online failed:\n{text}");
    assert!(text.contains("every key is on its shard"), "{text}");
    let switch_revision = switch_revision_in(&text);
    // Writes stop with the move, so that the state it left is not written
    // over before it is checked.
    load.stop().await;
    // The killed router comes back, on the new file, and writes there.
    let r3 = serve(&config).await;
    let mut c3 = connect(&r3.endpoint()).await.expect("connect");
    for i in 0..5 {
        let key = format!("/registry/configmaps/default/r3-{i}");
        load.put(&mut c3, &key, &format!("r3-{i}")).await;
    }
    let head = c3
        .get("/", None)
        .await
        .expect("get")
        .header()
        .map_or(0, |h| h.revision());
    let seen = load.finish(head).await;
    let after_switch = seen.check(&mut c3, start, switch_revision).await;
    eprintln!(
        "{test}: {} writes, {after_switch} acknowledged after the switch at \
         {switch_revision}; {} reads; {} watch events, the watch resumed {} times; move:\n{}",
        seen.attempts.values().map(Vec::len).sum::<usize>(),
        seen.reads.len(),
        seen.events.len(),
        seen.restarts,
        text.lines()
            .filter(|l| ["copied", "fenced", "done", "moved in"]
                .iter()
                .any(|w| l.contains(w)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        after_switch > 5,
        "too few writes after the switch: {after_switch}"
    );
    // The watch was ended at the switch and resumed.
    assert!(seen.restarts >= 1);
    // Every new database got keys.
    for shard in ["cm", "p2", "sec"] {
        let line = text
            .lines()
            .find(|l| l.contains("moved in") && l.contains(&format!("shard={shard} ")))
            .unwrap_or_else(|| panic!("nothing moved into {shard}:\n{text}"));
        assert!(!line.contains("live_keys=0"), "{line}");
    }
    drop(r1);
    drop(r3);
}

/// A move killed at several points while a router serves under load is
/// finished by running it again, and the same checks hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_reshard_killed_then_run_again() {
    let test = "online_reshard_killed_then_run_again";
    let dir = tempfile::tempdir().expect("temporary directory");
    let Some(urls) = fresh_databases(
        test,
        dir.path(),
        &[
            ("core", Backend::Postgres),
            ("cm", Backend::Sqlite),
            ("sec", Backend::Mysql),
        ],
    ) else {
        return;
    };
    let _drop = Databases(urls.clone());
    let old = topology(&[("core", &urls[0])], "");
    let new = topology(
        &[("core", &urls[0]), ("cm", &urls[1]), ("sec", &urls[2])],
        "\n[[routes]]\nresource = \"configmaps\"\nshard = \"cm\"\n\
         \n[[routes]]\nprefix = \"/registry/secrets/team-a/\"\nshard = \"sec\"\n",
    );
    let (old_file, new_file, config) = topology_files(dir.path(), &old, &new);
    let r1 = serve(&config).await;
    preload(&r1.endpoint()).await;
    let mut c = connect(&r1.endpoint()).await.expect("connect");
    let start = c
        .get("/", None)
        .await
        .expect("get")
        .header()
        .map_or(0, |h| h.revision());
    let mut load = Load::start(vec![r1.endpoint()], start);
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(&config, &new).expect("write");
    let log = dir.path().join("reshard.log");
    // Killed once in each phase: as soon as its log shows it copying,
    // fencing databases, and fenced (finishing).
    let mut cut_short = Vec::new();
    for marker in [
        "copied",
        "INFO kubeshard_transfer::online: fenced shard=",
        "fenced: routers",
    ] {
        let mut command = reshard_online(&old_file, &new_file, &log).await;
        let waited = std::time::Instant::now();
        let mut exited = None;
        while waited.elapsed() < Duration::from_secs(60) {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(marker)
            {
                break;
            }
            if let Ok(Some(status)) = command.try_wait() {
                exited = Some(status);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = command.kill();
        let status = command.wait().expect("wait for the reshard");
        if exited.is_none() && !status.success() {
            cut_short.push(marker);
        }
        eprintln!("{test}: killed at {marker:?} after {:?}", waited.elapsed());
        if waited.elapsed() > Duration::from_secs(30) {
            eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
    }
    let mut command = reshard_online(&old_file, &new_file, &log).await;
    let status = tokio::task::spawn_blocking(move || command.wait())
        .await
        .expect("join")
        .expect("wait for the reshard");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "the last reshard --online failed:\n{text}"
    );
    assert!(text.contains("every key is on its shard"), "{text}");
    assert_eq!(cut_short.len(), 3, "runs cut short: {cut_short:?}");
    let switch_revision = switch_revision_in(&text);
    eprintln!("{test}: the last run is done");
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop().await;
    eprintln!("{test}: the load stopped");
    let head = c
        .get("/", None)
        .await
        .expect("get")
        .header()
        .map_or(0, |h| h.revision());
    let seen = load.finish(head).await;
    let after_switch = seen.check(&mut c, start, switch_revision).await;
    eprintln!(
        "{test}: runs cut short at {:?}; {} writes, {after_switch} acknowledged after the switch at \
         {switch_revision}; {} reads; {} watch events",
        cut_short,
        seen.attempts.values().map(Vec::len).sum::<usize>(),
        seen.reads.len(),
        seen.events.len(),
    );
    assert!(after_switch > 0, "no write after the switch");
    drop(r1);
}
