//! A full disk: the pods shard's SQLite file lives on a small tmpfs (4 MiB,
//! with a 1 MiB ballast file to free later); the default shard on the
//! ordinary disk. Pods are put until the disk is full. Checked:
//! - the write that finds no space fails with etcd's answer
//!   (ResourceExhausted, "etcdserver: mvcc: database space exceeded"), and
//!   so do the next ones while the disk stays full;
//! - `Maintenance.Alarm` lists NOSPACE and `Status` reports it; DEACTIVATE
//!   lowers it, and the next write that finds no space raises it again;
//! - reads of the full shard, its watch, and writes to the other shard go on;
//! - once the ballast is removed, writes succeed and the alarm is gone;
//! - every acknowledged write is there, and the watch saw each once, in order.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{AlarmAction, AlarmType, Client, GetOptions, WatchOptions};
use kubeshard_tests::env::skip;
use kubeshard_tests::server::{Backend, KubeshardServer, Server, connect};
use tokio::sync::Mutex;

const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";
/// gRPC's ResourceExhausted, etcd's code for NOSPACE.
const RESOURCE_EXHAUSTED: i32 = 8;

/// A size-limited tmpfs, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(at).map_err(|e| format!("mkdir {}: {e}", at.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "kubeshard-full-disk"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs refused ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallDisk(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_no_space(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() as i32 == RESOURCE_EXHAUSTED && s.message() == NO_SPACE)
}

async fn alarms(client: &mut Client) -> Vec<i32> {
    let answer = client
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("Alarm GET");
    answer.alarms().iter().map(|a| a.alarm() as i32).collect()
}

async fn status_errors(client: &mut Client) -> Vec<String> {
    client.status().await.expect("Status").errors().to_vec()
}

/// Watches /registry/pods/ from `from`; (revision, key) of each event.
async fn watch_pods(endpoint: String, from: i64, events: Arc<Mutex<Vec<(i64, String)>>>) {
    let mut client = connect(&endpoint).await.expect("connect");
    let options = WatchOptions::new().with_prefix().with_start_revision(from);
    let mut stream = client
        .watch("/registry/pods/", Some(options))
        .await
        .expect("watch");
    while let Ok(Some(response)) = stream.message().await {
        let mut seen = events.lock().await;
        for e in response.events() {
            if let Some(kv) = e.kv() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                seen.push((kv.mod_revision(), key));
            }
        }
    }
}

/// Puts pods of 16 KiB (numbered from `n` on) until one finds no space,
/// at most `most`; the acknowledged ones go to `acked`. The key refused.
async fn fill(
    client: &mut Client,
    acked: &mut Vec<(String, i64)>,
    n: &mut usize,
    most: usize,
) -> String {
    let value = vec![b'x'; 16 * 1024];
    for _ in 0..most {
        *n += 1;
        let key = format!("/registry/pods/ns/p-{n}");
        match client.put(key.as_str(), value.clone(), None).await {
            Ok(r) => acked.push((key, r.header().map(|h| h.revision()).unwrap_or(0))),
            Err(e) if is_no_space(&e) => return key,
            Err(e) => panic!("put {key}: {e}, not etcd's NOSPACE answer"),
        }
    }
    panic!("{most} puts of 16 KiB found space on a full disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_raises_nospace_and_writing_resumes() {
    let test = "a_full_disk_raises_nospace_and_writing_resumes";
    let dir = tempfile::tempdir().expect("a temporary directory");
    let small = match SmallDisk::mount(&dir.path().join("small")) {
        Ok(disk) => disk,
        Err(why) => {
            skip::<()>(test, &why);
            return;
        }
    };
    let ballast = small.0.join("ballast");
    std::fs::write(&ballast, vec![1u8; 1 << 20]).expect("the ballast file");
    let config = dir.path().join("topology.toml");
    std::fs::write(
        &config,
        format!(
            "default_shard = \"core\"\n\n[[shards]]\nname = \"core\"\nendpoint = \
             \"sqlite://{}\"\n\n[[shards]]\nname = \"pods\"\nendpoint = \"sqlite://{}\"\n\n\
             [[routes]]\nprefix = \"/registry/pods/\"\nshard = \"pods\"\n",
            dir.path().join("core.db").display(),
            small.0.join("pods.db").display()
        ),
    )
    .expect("write the topology");
    let args = vec!["--config".to_string(), config.display().to_string()];
    let server = KubeshardServer::start_with(Backend::Sqlite, args, Vec::new(), Vec::new()).await;
    let endpoint = server.endpoint();
    let mut client = connect(&endpoint).await.expect("connect");
    let start = client
        .put("/registry/start", "", None)
        .await
        .expect("put")
        .header()
        .map(|h| h.revision())
        .expect("a header");
    let events = Arc::new(Mutex::new(Vec::new()));
    let watch = tokio::spawn(watch_pods(endpoint.clone(), start + 1, events.clone()));

    // Fill the disk.
    let mut acked = Vec::new();
    let mut n = 0;
    let full = fill(&mut client, &mut acked, &mut n, 2000).await;
    assert!(!acked.is_empty(), "the first put found the disk full");
    eprintln!(
        "{test}: {} puts of 16 KiB acknowledged before {full} found no space",
        acked.len()
    );
    assert_eq!(alarms(&mut client).await, vec![AlarmType::Nospace as i32]);
    let errors = status_errors(&mut client).await;
    assert!(
        errors.iter().any(|e| e.contains("NOSPACE")),
        "Status errors: {errors:?}"
    );

    // While full: the other shard writes, the full one reads and refuses.
    client
        .put("/registry/secrets/ns/s", "v", None)
        .await
        .expect("a put to the other shard while the disk is full");
    let listed = client
        .get(
            "/registry/pods/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("a read of the full shard");
    assert_eq!(listed.count(), acked.len() as i64, "pods listed while full");
    // (Space freed inside the file may take a few more.)
    fill(&mut client, &mut acked, &mut n, 50).await;

    // DEACTIVATE lowers it; the next write that finds no space raises it.
    let lowered = client
        .alarm(AlarmAction::Deactivate, AlarmType::Nospace, None)
        .await
        .expect("Alarm DEACTIVATE");
    assert_eq!(lowered.alarms().len(), 1, "the alarm lowered");
    assert!(
        alarms(&mut client).await.is_empty(),
        "alarms after DEACTIVATE"
    );
    fill(&mut client, &mut acked, &mut n, 50).await;
    assert_eq!(alarms(&mut client).await, vec![AlarmType::Nospace as i32]);

    // Space freed: writing resumes and the alarm goes.
    std::fs::remove_file(&ballast).expect("remove the ballast");
    let mut resumed = None;
    for attempt in 1..=20 {
        match client.put("/registry/pods/ns/after", "v", None).await {
            Ok(r) => {
                resumed = Some(attempt);
                acked.push((
                    "/registry/pods/ns/after".into(),
                    r.header().map(|h| h.revision()).unwrap_or(0),
                ));
                break;
            }
            Err(e) if is_no_space(&e) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("put after freeing space: {e}"),
        }
    }
    assert!(resumed.is_some(), "no put succeeded after the ballast went");
    assert!(
        alarms(&mut client).await.is_empty(),
        "alarms after a commit"
    );
    assert!(status_errors(&mut client).await.is_empty());

    // Everything acknowledged is there; the watch saw each once, in order.
    let got = client
        .get(
            "/registry/pods/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("get");
    let stored: std::collections::BTreeMap<String, i64> = got
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.mod_revision(),
            )
        })
        .collect();
    assert_eq!(stored.len(), acked.len(), "pods stored vs acknowledged");
    for (key, revision) in &acked {
        assert_eq!(stored.get(key), Some(revision), "acknowledged {key}");
    }
    let last = acked.iter().map(|(_, r)| *r).max().unwrap_or(0);
    for _ in 0..100 {
        if events.lock().await.last().is_some_and(|(r, _)| *r >= last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch.abort();
    let seen = events.lock().await.clone();
    let want: Vec<(i64, String)> = {
        let mut v: Vec<(i64, String)> = acked.iter().map(|(k, r)| (*r, k.clone())).collect();
        v.sort();
        v
    };
    assert_eq!(seen, want, "the watch of the full shard");
}
