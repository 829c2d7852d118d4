//! `kubeshard reshard`: keys moved between shards with their history, while
//! no router serves, then served by the new topology as before: same keys,
//! same reads at a retained revision, same watch history, same leases, and
//! writes going on above every moved revision. The move covers a resource
//! leaving the default shard for a new database, a shard added to a route
//! hashed by namespace, and SQLite, PostgreSQL and MariaDB databases.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use kubeshard_tests::env::skip;
use kubeshard_tests::server::{
    Backend, KubeshardServer, Server, connect, drop_database, kubeshard_binary, serves_or_refuses,
};

struct Databases(Vec<String>);

impl Drop for Databases {
    fn drop(&mut self) {
        for url in &self.0 {
            drop_database(url);
        }
    }
}

type Keys = Vec<(Vec<u8>, i64, i64, i64, i64, Vec<u8>)>;

async fn everything(c: &mut Client, revision: i64) -> (Keys, i64) {
    let mut options = GetOptions::new().with_from_key();
    if revision > 0 {
        options = options.with_revision(revision);
    }
    let answer = c.get("\0", Some(options)).await.expect("get everything");
    let keys = answer
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
                kv.value().to_vec(),
            )
        })
        .collect();
    (keys, answer.header().map_or(0, |h| h.revision()))
}

type Seen = Vec<(i64, bool, Vec<u8>, i64, Vec<u8>)>;

/// Events with revisions in [from, to], each revision's sorted by key.
async fn history(c: &mut Client, from: i64, to: i64) -> Seen {
    let options = WatchOptions::new()
        .with_from_key()
        .with_start_revision(from);
    let mut stream = c.watch("\0", Some(options)).await.expect("watch");
    let mut by_revision: BTreeMap<i64, Seen> = BTreeMap::new();
    let mut last = from - 1;
    while last < to {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("events up to {to} in time; at {last}"))
            .expect("watch")
            .expect("a response");
        assert!(!r.canceled(), "{r:?}");
        for e in r.events() {
            let kv = e.kv().expect("kv");
            last = last.max(kv.mod_revision());
            by_revision.entry(kv.mod_revision()).or_default().push((
                kv.mod_revision(),
                e.event_type() == EventType::Delete,
                kv.key().to_vec(),
                kv.version(),
                kv.value().to_vec(),
            ));
        }
    }
    by_revision
        .into_values()
        .flat_map(|mut v| {
            v.sort_by(|a, b| a.2.cmp(&b.2));
            v
        })
        .collect()
}

fn topology(dir: &Path, name: &str, shards: &[(&str, &str)], routes: &str) -> String {
    let mut toml = String::from("default_shard = \"core\"\n");
    for (shard, url) in shards {
        toml.push_str(&format!(
            "\n[[shards]]\nname = \"{shard}\"\nendpoint = \"{url}\"\n"
        ));
    }
    toml.push_str(routes);
    let path = dir.join(name);
    std::fs::write(&path, toml).expect("write a topology");
    path.display().to_string()
}

/// A router on `config`; the databases stay (the test drops them).
async fn serve(config: &str) -> KubeshardServer {
    let args = vec!["--config".to_string(), config.to_string()];
    KubeshardServer::start_with(Backend::Sqlite, args, Vec::new(), Vec::new()).await
}

fn reshard(from: &str, to: &str, log: &Path) -> std::process::ExitStatus {
    let bin = futures::executor::block_on(kubeshard_binary());
    let out = std::fs::File::create(log).expect("log");
    Command::new(bin)
        .args(["reshard", "--from", from, "--to", to, "--verify"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .status()
        .expect("run kubeshard reshard")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_moves_keys_with_their_history() {
    let test = "reshard_moves_keys_with_their_history";
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut urls = Vec::new();
    for (name, backend) in [
        ("core", Backend::Sqlite),
        ("pods", Backend::Postgres),
        ("cm", Backend::Mysql),
        ("ev", Backend::Sqlite),
    ] {
        match backend.fresh_endpoint(&dir.path().join(name)) {
            Ok(url) => urls.push(url),
            Err(why) => {
                return skip(test, &format!("backend {}: {why}", backend.name())).unwrap_or(());
            }
        }
    }
    std::fs::create_dir_all(dir.path().join("core")).expect("dir");
    std::fs::create_dir_all(dir.path().join("ev")).expect("dir");
    let _drop = Databases(urls.clone());
    let old = topology(
        dir.path(),
        "old.toml",
        &[("core", &urls[0]), ("pods", &urls[1])],
        "\n[[routes]]\nresource = \"pods\"\nshard = \"pods\"\n\
         \n[[routes]]\nresource = \"events\"\nshards = [\"core\", \"pods\"]\nhash = \"resource-namespace\"\n",
    );
    // Configmaps leave the default shard for a new database; events get a
    // third shard. The new file reaches the default shard's SQLite file by
    // another path (a link): still the same database.
    let alias = dir.path().join("alias");
    std::os::unix::fs::symlink(dir.path().join("core"), &alias).expect("link");
    let core_again = format!("sqlite://{}", alias.join("state.db").display());
    let new = topology(
        dir.path(),
        "new.toml",
        &[
            ("core", &core_again),
            ("pods", &urls[1]),
            ("cm", &urls[2]),
            ("ev", &urls[3]),
        ],
        "\n[[routes]]\nresource = \"pods\"\nshard = \"pods\"\n\
         \n[[routes]]\nresource = \"configmaps\"\nshard = \"cm\"\n\
         \n[[routes]]\nresource = \"events\"\nshards = [\"core\", \"pods\", \"ev\"]\nhash = \"resource-namespace\"\n",
    );

    let mut server = serve(&old).await;
    let mut c = connect(&server.endpoint()).await.expect("connect");
    let lease = c.lease_grant(600, None).await.expect("grant").id();
    for i in 0..40 {
        c.put(format!("/registry/configmaps/ns/c{i:02}"), "v1", None)
            .await
            .expect("put");
        c.put(format!("/registry/pods/ns/p{i:02}"), "v1", None)
            .await
            .expect("put");
    }
    for ns in 0..12 {
        for i in 0..5 {
            let key = format!("/registry/events/ns{ns}/e{i}");
            c.put(key, "event", Some(PutOptions::new().with_lease(lease)))
                .await
                .expect("put");
        }
    }
    let (_, compact_at) = everything(&mut c, 0).await;
    for i in 0..20 {
        c.put(format!("/registry/configmaps/ns/c{i:02}"), "v2", None)
            .await
            .expect("put");
    }
    c.compact(compact_at, None).await.expect("compact");
    for i in 0..10 {
        c.delete(format!("/registry/configmaps/ns/c{i:02}"), None)
            .await
            .expect("delete");
        c.put(
            format!("/registry/events/ns{i}/e0"),
            "event v2",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("put");
    }
    let (before, head) = everything(&mut c, 0).await;
    let (at_compaction, _) = everything(&mut c, compact_at).await;
    let events = history(&mut c, compact_at, head).await;
    drop(c);
    // Not while a router serves.
    let log = dir.path().join("reshard.log");
    let status = reshard(&old, &new, &log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "a reshard ran beside a router:\n{text}");
    assert!(
        text.contains("routers serve shard core: http://127.0.0.1:"),
        "{text}"
    );
    let stopped = server
        .terminate(Duration::from_secs(20))
        .expect("stop the router");
    assert!(stopped.success());
    drop(server);

    let status = reshard(&old, &new, &log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "reshard failed:\n{text}");
    assert!(text.contains("every key is on its shard"), "{text}");
    let moved = |name: &str| -> u64 {
        let tail = text.rsplit(&format!("{name}=")).next().unwrap_or_default();
        tail.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap_or_default()
            .parse()
            .unwrap_or(0)
    };
    // The 30 configmaps left, and the events of the namespaces the new
    // shard takes, with their history.
    assert!(
        moved("live_keys") > 30 && moved("history_rows") > moved("live_keys"),
        "{text}"
    );
    // Again: nothing left to move.
    let status = reshard(&old, &new, &log);
    let again = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "reshard again failed:\n{again}");
    assert!(again.contains("history_rows=0 live_keys=0"), "{again}");

    // The old file is refused now: it would look for keys where they were.
    let said = match serves_or_refuses(&["--config", &old]).await {
        Ok(()) => panic!("served the old topology"),
        Err(said) => said,
    };
    assert!(
        said.contains("the data is arranged for another topology"),
        "{said}"
    );

    let server = serve(&new).await;
    let mut k = connect(&server.endpoint()).await.expect("connect");
    let (after, header) = everything(&mut k, 0).await;
    assert_eq!(header, head, "the revision after the move");
    assert_eq!(after, before, "the keys after the move");
    assert_eq!(
        everything(&mut k, compact_at).await.0,
        at_compaction,
        "a read at a retained revision"
    );
    assert_eq!(
        history(&mut k, compact_at, head).await,
        events,
        "the retained history"
    );
    let ttl = k
        .lease_time_to_live(lease, None)
        .await
        .expect("time to live");
    assert_eq!(ttl.granted_ttl(), 600);
    // Writes go on above every moved revision, on a moved key too.
    let key = "/registry/configmaps/ns/c30";
    let m = before
        .iter()
        .find(|r| r.0 == key.as_bytes())
        .expect("c30")
        .2;
    let update = Txn::new()
        .when(vec![Compare::mod_revision(key, CompareOp::Equal, m)])
        .and_then(vec![TxnOp::put(key, "v3", None)]);
    let answer = k.txn(update).await.expect("txn");
    assert!(answer.succeeded());
    assert!(answer.header().map_or(0, |h| h.revision()) > head);
    drop(server);
}

/// A reshard killed at any point is finished by running it again: the
/// routers refuse the databases in between, and afterwards every key,
/// revision and history event is as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_killed_then_run_again() {
    let test = "reshard_killed_then_run_again";
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut urls = Vec::new();
    for (name, backend) in [("core", Backend::Sqlite), ("cm", Backend::Mysql)] {
        match backend.fresh_endpoint(&dir.path().join(name)) {
            Ok(url) => urls.push(url),
            Err(why) => {
                return skip(test, &format!("backend {}: {why}", backend.name())).unwrap_or(());
            }
        }
    }
    std::fs::create_dir_all(dir.path().join("core")).expect("dir");
    let _drop = Databases(urls.clone());
    let old = topology(dir.path(), "old.toml", &[("core", &urls[0])], "");
    let new = topology(
        dir.path(),
        "new.toml",
        &[("core", &urls[0]), ("cm", &urls[1])],
        "\n[[routes]]\nresource = \"configmaps\"\nshard = \"cm\"\n",
    );
    let server = serve(&old).await;
    let mut c = connect(&server.endpoint()).await.expect("connect");
    let value = "v".repeat(512);
    for round in 0..2 {
        for chunk in (0..1500).collect::<Vec<_>>().chunks(100) {
            let puts = chunk.iter().map(|i| {
                let mut c = c.clone();
                let value = format!("{round} {value}");
                async move {
                    c.put(format!("/registry/configmaps/ns/c{i:04}"), value, None)
                        .await
                        .expect("put");
                }
            });
            futures::future::join_all(puts).await;
        }
    }
    let (before, head) = everything(&mut c, 0).await;
    let events = history(&mut c, 1, head).await;
    drop(c);
    let mut server = server;
    let stopped = server
        .terminate(Duration::from_secs(20))
        .expect("stop the router");
    assert!(stopped.success());
    drop(server);

    let bin = kubeshard_binary().await;
    let mut cut_short = 0;
    for delay in [60u64, 120, 250, 500] {
        let mut child = Command::new(&bin)
            .args(["reshard", "--from", &old, "--to", &new])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kubeshard reshard");
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let _ = child.kill();
        let _ = child.wait();
        // Until it has finished, a router on the new file refuses to serve.
        if serves_or_refuses(&["--config", &new]).await.is_err() {
            cut_short += 1;
        }
    }
    assert!(
        cut_short > 0,
        "every reshard finished before it was killed: the test proves nothing"
    );
    let log = dir.path().join("reshard.log");
    let status = reshard(&old, &new, &log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "the reshard run again failed:\n{text}");
    assert!(text.contains("every key is on its shard"), "{text}");

    let server = serve(&new).await;
    let mut k = connect(&server.endpoint()).await.expect("connect");
    let (after, header) = everything(&mut k, 0).await;
    assert_eq!(header, head);
    assert!(
        after == before,
        "the keys after a killed and finished reshard differ"
    );
    let seen = history(&mut k, 1, head).await;
    assert!(
        seen == events,
        "the history after a killed and finished reshard differs"
    );
    drop(server);
}
