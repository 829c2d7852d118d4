//! `kubeshard import --follow`: applies the source's changes after the
//! copied revision, in order and with their revisions, until stopped. When
//! stopped it first catches up to the source's revision at that moment, so
//! a cut-over (stop kube-apiserver, stop the import, start kube-apiserver on
//! kubeshard) loses nothing.
//!
//! Each watch response becomes one transaction per shard, and every shard's
//! counter moves to the response's last revision in it: after a crash the
//! smallest counter says where to go on, and each shard skips what it has.

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use kubeshard_proto::mvccpb::event::EventType;
use kubeshard_shard_worker::bulk::Change;
use tracing::info;

use crate::error::{Result, TransferError};
use crate::etcd::{Etcd, progress_request};
use crate::import::{compacted_or, lease_record, now_ms};
use crate::target::Target;

/// How often to ask for progress while catching up after the stop.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Follows from revision `from`; returns the last source revision applied
/// (at least the source's revision when `stop` came).
pub async fn run(
    etcd: &Etcd,
    target: &Target,
    from: i64,
    mut skip_to: Vec<i64>,
    stop: impl Future<Output = ()>,
) -> Result<i64> {
    let (requests, mut stream) = etcd.watch_all(from).await?;
    let mut applied = from - 1;
    let mut known: HashSet<i64> = HashSet::new();
    for shard in &target.shards {
        let ids = shard.store.lease_list().await.map_err(|e| shard.fail(e))?;
        known.extend(ids);
    }
    let mut stop = std::pin::pin!(stop);
    // The source's revision when the stop came: done once applied reaches it.
    let mut until: Option<i64> = None;
    let mut ask = tokio::time::interval(PROGRESS_EVERY);
    let mut logged = Instant::now();
    info!(from, "following the source");
    loop {
        if until.is_some_and(|u| applied >= u) {
            break;
        }
        let response = tokio::select! {
            () = &mut stop, if until.is_none() => {
                let (head, _) = etcd.head().await?;
                info!(revision = head, applied, "stopping: catching up to the source first");
                until = Some(head);
                continue;
            }
            _ = ask.tick(), if until.is_some() => {
                // Answered once every event up to the source's revision was sent.
                let _ = requests.send(progress_request()).await;
                continue;
            }
            message = stream.message() => message,
        };
        let response = match response {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(TransferError::Source(
                    "the watch of the source ended".into(),
                ));
            }
            Err(status) => {
                return Err(compacted_or(
                    TransferError::Source(format!("watch: {}", status.message())),
                    applied + 1,
                ));
            }
        };
        if response.canceled || response.compact_revision > 0 {
            return Err(TransferError::Compacted {
                needed: applied + 1,
                detail: format!(
                    "watch canceled: {} (compact revision {})",
                    response.cancel_reason, response.compact_revision
                ),
            });
        }
        let header_revision = response.header.as_ref().map_or(0, |h| h.revision);
        if response.events.is_empty() {
            // A progress report: every event up to it was sent.
            if !response.created && until.is_some() {
                applied = applied.max(header_revision);
            }
            continue;
        }
        let mut changes = Vec::with_capacity(response.events.len());
        let mut last = applied;
        for event in response.events {
            let Some(kv) = event.kv else { continue };
            last = last.max(kv.mod_revision);
            if event.r#type == EventType::Delete as i32 {
                changes.push(Change::Delete {
                    key: kv.key,
                    revision: kv.mod_revision,
                });
            } else {
                if kv.lease != 0 && known.insert(kv.lease) {
                    let lease = etcd.lease(kv.lease).await?;
                    target
                        .put_leases(&[lease_record(kv.lease, lease, now_ms())])
                        .await?;
                }
                changes.push(Change::Put(kv));
            }
        }
        target.apply(changes, last, &skip_to).await?;
        skip_to.clear();
        applied = last;
        if logged.elapsed() > Duration::from_secs(10) {
            info!(revision = applied, "following");
            logged = Instant::now();
        }
    }
    sync_leases(etcd, target, &known).await?;
    info!(revision = applied, "followed");
    Ok(applied)
}

/// Leases as the source has them now: TTLs left, and none it no longer has.
async fn sync_leases(etcd: &Etcd, target: &Target, known: &HashSet<i64>) -> Result<()> {
    let now = now_ms();
    let leases = etcd.leases().await?;
    let present: HashSet<i64> = leases.iter().map(|l| l.id).collect();
    let records: Vec<_> = leases
        .into_iter()
        .map(|l| lease_record(l.id, Some(l), now))
        .collect();
    target.put_leases(&records).await?;
    let gone: Vec<i64> = known.difference(&present).copied().collect();
    target.delete_leases(&gone).await?;
    Ok(())
}
