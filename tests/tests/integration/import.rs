//! `kubeshard import`: an etcd cluster copied into a sharded topology
//! (SQLite, PostgreSQL and MariaDB shards), then served by kubeshard as etcd
//! served it: same keys with the same revisions and versions, compaction at
//! the copied revision, leases with their time left; and with `--follow`,
//! every later change with its revision, up to the moment of the stop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use kubeshard_tests::env::EtcdTools;
use kubeshard_tests::server::{
    Backend, EtcdServer, KubeshardServer, Server, connect, drop_database, kubeshard_binary,
    serves_or_refuses, sharded_topology,
};

const BACKENDS: [Backend; 3] = [Backend::Sqlite, Backend::Postgres, Backend::Mysql];

/// Drops the topology's databases, also when the test fails before a
/// server took them over.
struct Databases(Vec<String>);

impl Drop for Databases {
    fn drop(&mut self) {
        for url in &self.0 {
            drop_database(url);
        }
    }
}

/// (key, create, mod, version, lease, value) of every key.
type Keys = Vec<(String, i64, i64, i64, i64, Vec<u8>)>;

fn rows(kvs: &[KeyValue]) -> Keys {
    kvs.iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

/// Every key now, and the answer's header revision.
async fn everything(c: &mut Client) -> (Keys, i64) {
    let answer = c
        .get("\0", Some(GetOptions::new().with_from_key()))
        .await
        .expect("get everything");
    let header = answer.header().map_or(0, |h| h.revision());
    (rows(answer.kvs()), header)
}

async fn put(c: &mut Client, key: &str, value: &str, lease: Option<i64>) {
    let options = lease.map(|l| PutOptions::new().with_lease(l));
    c.put(key, value, options).await.expect("put");
}

/// Writes a small cluster's worth of keys; returns the long lease's id.
async fn seed(c: &mut Client) -> i64 {
    let long = c.lease_grant(600, None).await.expect("grant").id();
    let short = c.lease_grant(15, None).await.expect("grant").id();
    for i in 0..120 {
        put(
            c,
            &format!("/registry/pods/ns/p{i:03}"),
            &format!("pod {i}"),
            None,
        )
        .await;
    }
    for i in 0..40 {
        let value = format!("pod {i} v2");
        put(c, &format!("/registry/pods/ns/p{i:03}"), &value, None).await;
    }
    for i in 0..20 {
        let key = format!("/registry/events/ns/e{i:02}");
        put(c, &key, "event", Some(long)).await;
    }
    put(c, "/registry/events/ns/short", "event", Some(short)).await;
    for i in 0..30 {
        put(c, &format!("/registry/configmaps/ns/c{i:02}"), "cm", None).await;
    }
    c.delete("/registry/configmaps/ns/c00", None)
        .await
        .expect("delete");
    // One revision on two shards.
    let both = Txn::new().and_then(vec![
        TxnOp::put("/registry/pods/ns/t", "pod t", None),
        TxnOp::put("/registry/configmaps/ns/t", "cm t", None),
    ]);
    c.txn(both).await.expect("txn");
    long
}

fn output(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    databases: Databases,
    etcd: EtcdServer,
    source: Client,
    log: PathBuf,
}

async fn setup(test: &str) -> Option<Setup> {
    let tools = EtcdTools::find(test)?;
    let dir = tempfile::Builder::new()
        .prefix("kubeshard-import-")
        .tempdir()
        .expect("temporary directory");
    let (config, urls) = sharded_topology(test, BACKENDS, dir.path())?;
    let etcd = EtcdServer::start(&tools).await;
    let source = connect(&etcd.endpoint()).await.expect("connect to etcd");
    let log = dir.path().join("import.log");
    Some(Setup {
        config,
        databases: Databases(urls),
        etcd,
        source,
        log,
        _dir: dir,
    })
}

impl Setup {
    /// `kubeshard import --from-etcd SOURCE --config TOPOLOGY EXTRA...`,
    /// its output in the log file.
    async fn import(&self, extra: &[&str]) -> Command {
        let mut command = Command::new(kubeshard_binary().await);
        let log = std::fs::File::create(&self.log).expect("log file");
        command
            .arg("import")
            .arg("--from-etcd")
            .arg(self.etcd.endpoint())
            .arg("--config")
            .arg(&self.config)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        command
    }

    async fn serve(&self) -> KubeshardServer {
        let args = vec!["--config".to_string(), self.config.display().to_string()];
        KubeshardServer::start_with(Backend::Sqlite, args, Vec::new(), self.databases.0.clone())
            .await
    }
}

async fn next(stream: &mut etcd_client::WatchStream) -> etcd_client::WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch answer in time")
        .expect("watch")
        .expect("a response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_then_serve() {
    let Some(mut s) = setup("import_then_serve").await else {
        return;
    };
    let long = seed(&mut s.source).await;
    let (before, copied) = everything(&mut s.source).await;

    let status = s
        .import(&["--verify"])
        .await
        .status()
        .expect("run kubeshard import");
    assert!(status.success(), "import failed:\n{}", output(&s.log));
    assert!(
        output(&s.log).contains("source and target agree"),
        "{}",
        output(&s.log)
    );
    // Never into databases that hold data.
    let again = s.import(&[]).await.status().expect("run kubeshard import");
    assert!(!again.success());
    assert!(
        output(&s.log).contains("is not empty"),
        "{}",
        output(&s.log)
    );

    let server = s.serve().await;
    let mut k = connect(&server.endpoint())
        .await
        .expect("connect to kubeshard");
    let (after, header) = everything(&mut k).await;
    assert_eq!(header, copied, "kubeshard's revision after the import");
    assert_eq!(after, before, "keys as etcd had them");

    // kube-apiserver's update: guarded by the mod_revision it read.
    let key = "/registry/pods/ns/p005";
    let read = before.iter().find(|r| r.0 == key).expect("p005").2;
    let update = |m: i64| {
        Txn::new()
            .when(vec![Compare::mod_revision(key, CompareOp::Equal, m)])
            .and_then(vec![TxnOp::put(key, "pod 5 v3", None)])
    };
    assert!(k.txn(update(read)).await.expect("txn").succeeded());
    assert!(!k.txn(update(read)).await.expect("txn").succeeded());
    let written = k.get(key, None).await.expect("get");
    let kv = written.kvs().first().expect("p005");
    assert!(kv.mod_revision() > copied);
    assert_eq!(kv.version(), 3);

    // A watch from the copied revision sees its two events (one per
    // shard); one from before it is compacted.
    let from_copied = WatchOptions::new()
        .with_prefix()
        .with_start_revision(copied);
    let mut stream = k
        .watch("/registry/", Some(from_copied))
        .await
        .expect("watch");
    let mut at_copied = Vec::new();
    while at_copied.len() < 2 {
        for e in next(&mut stream).await.events() {
            let kv = e.kv().expect("kv");
            if kv.mod_revision() == copied {
                at_copied.push(String::from_utf8_lossy(kv.key()).into_owned());
            }
        }
    }
    at_copied.sort();
    assert_eq!(
        at_copied,
        ["/registry/configmaps/ns/t", "/registry/pods/ns/t"]
    );
    let too_old = WatchOptions::new()
        .with_prefix()
        .with_start_revision(copied - 1);
    let mut old = k.watch("/registry/", Some(too_old)).await.expect("watch");
    let mut r = next(&mut old).await;
    if r.created() && !r.canceled() {
        r = next(&mut old).await;
    }
    assert!(r.canceled() && r.compact_revision() == copied, "{r:?}");

    // Leases keep their TTL and time left; the short one expires with its key.
    let ttl = k
        .lease_time_to_live(long, None)
        .await
        .expect("time to live");
    assert_eq!(ttl.granted_ttl(), 600);
    assert!(ttl.ttl() > 500 && ttl.ttl() <= 600, "{}", ttl.ttl());
    let started = Instant::now();
    loop {
        let left = k.get("/registry/events/ns/short", None).await.expect("get");
        if left.kvs().is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the short lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_follows_until_stopped() {
    let Some(mut s) = setup("import_follows_until_stopped").await else {
        return;
    };
    seed(&mut s.source).await;
    let (_, copied) = everything(&mut s.source).await;
    let mut follower = s
        .import(&["--follow", "--verify"])
        .await
        .spawn()
        .expect("start kubeshard import --follow");
    let started = Instant::now();
    while !output(&s.log).contains("following the source") {
        if let Ok(Some(status)) = follower.try_wait() {
            panic!("import ended ({status}):\n{}", output(&s.log));
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}",
            output(&s.log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Changes while it follows: updates, deletes, a txn over two shards,
    // a lease granted and one revoked with its keys.
    let c = &mut s.source;
    for i in 0..60 {
        put(c, &format!("/registry/pods/ns/p{i:03}"), "pod after", None).await;
    }
    for i in 100..110 {
        c.delete(format!("/registry/pods/ns/p{i:03}"), None)
            .await
            .expect("delete");
    }
    let fresh = c.lease_grant(300, None).await.expect("grant").id();
    put(c, "/registry/events/ns/fresh", "event", Some(fresh)).await;
    let doomed = c.lease_grant(300, None).await.expect("grant").id();
    put(c, "/registry/events/ns/doomed", "event", Some(doomed)).await;
    c.lease_revoke(doomed).await.expect("revoke");
    let both = Txn::new().and_then(vec![
        TxnOp::put("/registry/pods/ns/u", "pod u", None),
        TxnOp::put("/registry/configmaps/ns/u", "cm u", None),
    ]);
    c.txn(both).await.expect("txn");
    // The stop comes right after the last write: the import catches up.
    put(c, "/registry/configmaps/ns/last", "last", None).await;
    let sent = Command::new("kill")
        .args(["-TERM", &follower.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = follower.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "import still running:\n{}",
            output(&s.log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "import failed:\n{}", output(&s.log));
    assert!(
        output(&s.log).contains("source and target agree"),
        "{}",
        output(&s.log)
    );

    let (source_keys, head) = everything(&mut s.source).await;
    // etcd's events after the copy, to compare with kubeshard's history.
    let expected = events_between(&mut s.source, copied + 1, head).await;
    let server = s.serve().await;
    let mut k = connect(&server.endpoint())
        .await
        .expect("connect to kubeshard");
    let (target_keys, header) = everything(&mut k).await;
    assert_eq!(header, head);
    assert_eq!(target_keys, source_keys);
    let seen = events_between(&mut k, copied + 1, head).await;
    assert_eq!(seen, expected, "events after the copied revision");
    let ttl = k
        .lease_time_to_live(fresh, None)
        .await
        .expect("time to live");
    assert_eq!(ttl.granted_ttl(), 300);
    let leases = k.leases().await.expect("leases");
    assert!(
        leases.leases().iter().all(|l| l.id() != doomed),
        "the revoked lease came back"
    );
    drop(server);
}

type Seen = Vec<(i64, bool, String, i64, Vec<u8>)>;

/// Every event with a revision in [from, to], as (revision, deleted, key,
/// version, value), each revision's events sorted by key (shards publish a
/// revision's events in their own order).
async fn events_between(c: &mut Client, from: i64, to: i64) -> Seen {
    let options = WatchOptions::new()
        .with_from_key()
        .with_start_revision(from);
    let mut stream = c.watch("\0", Some(options)).await.expect("watch");
    let mut out = Vec::new();
    let mut last = from - 1;
    while last < to {
        let r = next(&mut stream).await;
        assert!(!r.canceled(), "{r:?}");
        for e in r.events() {
            let kv = e.kv().expect("kv");
            last = last.max(kv.mod_revision());
            out.push((
                kv.mod_revision(),
                e.event_type() == EventType::Delete,
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.version(),
                kv.value().to_vec(),
            ));
        }
    }
    let mut by_revision: BTreeMap<i64, Seen> = BTreeMap::new();
    for e in out {
        by_revision.entry(e.0).or_default().push(e);
    }
    by_revision
        .into_values()
        .flat_map(|mut v| {
            v.sort_by(|a, b| a.2.cmp(&b.2));
            v
        })
        .collect()
}

/// Bad input is a clear error: a source that does not answer, and a key the
/// target's database cannot hold (named, and the target not served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_refuses_bad_input() {
    let test = "import_refuses_bad_input";
    let Some(tools) = EtcdTools::find(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = match Backend::Postgres.fresh_endpoint(dir.path()) {
        Ok(url) => url,
        Err(why) => return kubeshard_tests::env::skip(test, &why).unwrap_or(()),
    };
    let _drop = Databases(vec![url.clone()]);
    let bin = kubeshard_binary().await;
    let run = |args: Vec<String>| {
        let out = Command::new(&bin)
            .arg("import")
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run kubeshard import");
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), text)
    };
    let (ok, said) = run(vec![
        "--from-etcd".into(),
        "http://127.0.0.1:1".into(),
        "--endpoint".into(),
        url.clone(),
    ]);
    assert!(!ok);
    assert!(
        said.contains("source: 127.0.0.1:1") || said.contains("http://127.0.0.1:1"),
        "{said}"
    );
    assert!(said.contains("cannot connect"), "{said}");

    let etcd = EtcdServer::start(&tools).await;
    // Not into databases a router serves.
    let mut server = KubeshardServer::start_with(
        Backend::Postgres,
        vec!["--endpoint".into(), url.clone()],
        Vec::new(),
        Vec::new(),
    )
    .await;
    let (ok, said) = run(vec![
        "--from-etcd".into(),
        etcd.endpoint(),
        "--endpoint".into(),
        url.clone(),
    ]);
    assert!(!ok);
    assert!(said.contains("routers serve shard default"), "{said}");
    let stopped = server
        .terminate(Duration::from_secs(20))
        .expect("stop the router");
    assert!(stopped.success());
    drop(server);
    let mut c = connect(&etcd.endpoint()).await.expect("connect to etcd");
    put(&mut c, "/registry/configmaps/ns/fine", "v", None).await;
    let long = format!("/registry/configmaps/ns/{}", "x".repeat(2700));
    put(&mut c, &long, "v", None).await;
    let (ok, said) = run(vec![
        "--from-etcd".into(),
        etcd.endpoint(),
        "--endpoint".into(),
        url.clone(),
    ]);
    assert!(!ok);
    assert!(
        said.contains("target shard default cannot hold key /registry/configmaps/ns/xxx"),
        "{said}"
    );
    assert!(
        said.contains("the postgres backend stores keys of at most 2600 bytes"),
        "{said}"
    );
    // The half-copied target is not served.
    let said = match serves_or_refuses(&["--endpoint", &url]).await {
        Ok(()) => panic!("the half-copied target was served"),
        Err(said) => said,
    };
    assert!(
        said.contains("a data move into this database is unfinished"),
        "{said}"
    );
}
