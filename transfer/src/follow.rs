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
use crate::etcd::Etcd;
use crate::import::{compacted_or, lease_record, now_ms};
use crate::target::Target;

/// How long the source's watch may send nothing while the import catches up
/// after the stop (it has events up to the stop's revision to send).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

/// Follows from revision `from`; returns the last source revision applied
/// (at least the source's revision when `stop` came).
pub async fn run(
    etcd: &Etcd,
    target: &Target,
    from: i64,
    mut skip_to: Vec<i64>,
    stop: impl Future<Output = ()>,
) -> Result<i64> {
    // The request side stays open for as long as the watch is wanted.
    let (_requests, mut stream) = etcd.watch_all(from).await?;
    let mut applied = from - 1;
    // Below these, a shard already has the changes (a resumed follow).
    let resumed_to = skip_to.iter().copied().max().unwrap_or(0);
    let mut known: HashSet<i64> = HashSet::new();
    for shard in &target.shards {
        let ids = shard.store.lease_list().await.map_err(|e| shard.fail(e))?;
        known.extend(ids);
    }
    let mut stop = std::pin::pin!(stop);
    // The source's revision when the stop came: done once applied reaches
    // it. Only events count: every etcd revision has at least one (a write
    // that changes nothing makes none), while a progress report from etcd
    // before 3.4.25 may run ahead of events still in flight.
    let mut until: Option<i64> = None;
    let mut logged = Instant::now();
    info!(from, "following the source");
    loop {
        if until.is_some_and(|u| applied >= u) {
            break;
        }
        // Before the stop the source may rightly be idle for any time.
        let limit = if until.is_some() {
            CATCH_UP_LIMIT
        } else {
            Duration::MAX
        };
        let response = tokio::select! {
            () = &mut stop, if until.is_none() => {
                let (head, _) = etcd.head().await?;
                info!(revision = head, applied, "stopping: catching up to the source first");
                until = Some(head);
                continue;
            }
            message = tokio::time::timeout(limit, stream.message()) => match message {
                Ok(message) => message,
                Err(_) => {
                    return Err(TransferError::Source(format!(
                        "the source's watch sent nothing for {} s while catching up from {applied} to {}",
                        CATCH_UP_LIMIT.as_secs(),
                        until.unwrap_or_default()
                    )));
                }
            },
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
        if response.compact_revision > 0 {
            return Err(TransferError::Compacted {
                needed: applied + 1,
                detail: format!("compact revision {}", response.compact_revision),
            });
        }
        if response.canceled {
            return Err(TransferError::Source(format!(
                "the watch was canceled: {}; run the import again with --follow to go on",
                response.cancel_reason
            )));
        }
        if response.events.is_empty() {
            // Created, or a progress report: nothing to apply.
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
        applied = last;
        if applied >= resumed_to {
            skip_to.clear();
        }
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
