//! Compaction of every shard at one revision: the Compact RPC's work, and
//! kubeshard's own periodic compaction (`--compact-interval`, kine's flag)
//! for clusters whose kube-apiserver does not compact.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use kubeshard_config::AutoCompaction;
use kubeshard_shard_worker::{ShardError, WriteRequest, WriteResponse};
use rand::Rng;
use tokio::task::JoinHandle;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::error::{EtcdError, shard_status};
use crate::server::Core;
use crate::shards::Shards;
use crate::topology_change::on_topology;

/// Compacts every shard at `revision`; the revision for the answer's
/// header. The compaction mark is committed on return; the history below
/// it is removed then (`physical`) or in the background.
pub async fn compact(core: &Arc<Core>, revision: i64, physical: bool) -> Result<i64, Status> {
    let header = on_topology!(core, |shards| async {
        compact_marks(shards, revision).await
    })?;
    // The compaction mark is committed: reads below it already fail.
    // Removing the rows can take a while (rows below the mark, wherever
    // the topology puts their keys now).
    let shards = core.views.current();
    let batch = core.options.compaction_batch_revisions;
    let purge = async move {
        let purges = shards.all().map(|(_, shard)| async move {
            match shard.store.purge_compacted(revision, batch).await {
                Ok(rows) => info!(shard = %shard.name, revision, rows, "compaction removed history"),
                Err(e) => {
                    warn!(shard = %shard.name, revision, error = %e, "compaction could not remove history yet")
                }
            }
        });
        join_all(purges).await;
    };
    if physical {
        purge.await;
    } else {
        tokio::spawn(purge);
    }
    Ok(header)
}

/// Sets every shard's compaction mark at `revision`; the revision for the
/// answer's header. Waits while keys are arriving (an online move): their
/// history is being copied.
async fn compact_marks(shards: &Shards, revision: i64) -> Result<i64, Status> {
    let ids = shards.ids();
    shards.hold_off(&ids).await.map_err(shard_status)?;
    let current = shards.refresh().await.map_err(shard_status)?;
    if revision > current {
        return Err(EtcdError::FutureRevision.into());
    }
    // Every shard must accept `revision` as a past one.
    shards
        .raise_all(&ids, revision)
        .await
        .map_err(shard_status)?;
    let compactions = ids.iter().map(|id| async move {
        let answer = shards.write(*id, WriteRequest::Compact { revision }).await;
        (*id, answer)
    });
    // The default shard's answer is the answer; another shard may
    // already be compacted further by an earlier, partly failed Compact.
    let mut header = shards.floor();
    for (id, answer) in join_all(compactions).await {
        match answer {
            Ok(WriteResponse::Compact { revision }) => header = header.min(revision),
            Ok(_) => {
                return Err(Status::internal(
                    "kubeshard: shard answered Compact with another response type",
                ));
            }
            Err(ShardError::Compacted { .. }) if id != shards.default_id() => {}
            Err(e) => return Err(shard_status(e)),
        }
    }
    Ok(header)
}

/// Every `interval` (spread by the jitter), compacts at the current
/// revision less `min_retain`, if that is above the compaction mark. Each
/// router of a store may run it: a revision already compacted is skipped.
pub fn spawn_auto(core: Arc<Core>, settings: AutoCompaction) -> JoinHandle<()> {
    info!(
        interval = ?settings.interval,
        min_retain = settings.min_retain,
        "automatic compaction on"
    );
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(jittered(settings.interval, settings.jitter_percent)).await;
            match tokio::time::timeout(settings.timeout, compact_once(&core, settings.min_retain))
                .await
            {
                Ok(Ok(Some(revision))) => info!(revision, "automatic compaction"),
                Ok(Ok(None)) => debug!("automatic compaction: nothing to compact"),
                Ok(Err(e)) => {
                    warn!(error = %e.message(), "automatic compaction failed; will retry")
                }
                Err(_) => {
                    warn!(timeout = ?settings.timeout, "automatic compaction timed out; will retry")
                }
            }
        }
    })
}

async fn compact_once(core: &Arc<Core>, min_retain: i64) -> Result<Option<i64>, Status> {
    let (current, compacted) = on_topology!(core, |shards| async {
        let current = shards.refresh().await.map_err(shard_status)?;
        let revs = shards
            .default_shard()
            .store
            .revisions()
            .await
            .map_err(shard_status)?;
        Ok((current, revs.compacted))
    })?;
    let target = current - min_retain;
    if target <= compacted {
        return Ok(None);
    }
    // The history is removed within the round (and its timeout), so that
    // slow purges cannot pile up round after round; one cut short is
    // finished by the background task that completes compactions.
    match compact(core, target, true).await {
        Ok(_) => Ok(Some(target)),
        // Another router got there first.
        Err(status) if status.message() == EtcdError::Compacted.message() => Ok(None),
        Err(status) => Err(status),
    }
}

/// `interval` spread uniformly by up to `percent` either way.
fn jittered(interval: Duration, percent: u8) -> Duration {
    if percent == 0 {
        return interval;
    }
    let spread = f64::from(percent.min(99)) / 100.0;
    interval.mul_f64(1.0 + rand::rng().random_range(-spread..=spread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_percentage() {
        let base = Duration::from_secs(100);
        assert_eq!(jittered(base, 0), base);
        for _ in 0..1000 {
            let d = jittered(base, 10);
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
    }
}
