//! Background duties of a router: expiring leases (one router at a time,
//! through a lock held in the database) and finishing compactions.

use std::sync::Arc;
use std::time::Duration;

use kubeshard_shard_worker::WriteRequest;
use rand::Rng;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::server::{Core, now_ms};

/// How long the lease-expiry lock is held before it must be renewed.
const EXPIRER_LOCK_MS: i64 = 5_000;
/// Leases expired per round.
const EXPIRE_BATCH: i64 = 256;
/// How often leftover history of an earlier compaction is looked for.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);

pub fn spawn(core: Arc<Core>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let owner = format!(
            "{}-{:016x}",
            std::process::id(),
            rand::rng().random::<u64>()
        );
        let mut leases = tokio::time::interval(core.options.lease_check_interval);
        let mut purge = tokio::time::interval(PURGE_INTERVAL);
        let mut purged_to = 0;
        loop {
            tokio::select! {
                _ = leases.tick() => expire_leases(&core, &owner).await,
                _ = purge.tick() => purged_to = purge_history(&core, purged_to).await,
            }
        }
    })
}

async fn expire_leases(core: &Core, owner: &str) {
    let store = &core.shard.store;
    if let Ok(revs) = store.revisions().await {
        core.metrics
            .set_shard_revisions(&core.shard.name, revs.current, revs.compacted);
    }
    let now = now_ms();
    match store
        .try_lock("lease-expirer", owner, now, EXPIRER_LOCK_MS)
        .await
    {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            warn!(error = %e, "lease expiry: cannot take the expirer lock");
            return;
        }
    }
    let expired = match store.expired_leases(now, EXPIRE_BATCH).await {
        Ok(ids) => ids,
        Err(e) => {
            warn!(error = %e, "lease expiry: cannot list expired leases");
            return;
        }
    };
    for id in expired {
        match core
            .shard
            .writer
            .write(WriteRequest::LeaseExpire { id, now_ms: now })
            .await
        {
            Ok(_) => {
                core.metrics.leases_expired.inc();
                info!(lease = id, "lease expired")
            }
            Err(e) => warn!(lease = id, error = %e, "lease expiry failed; will retry"),
        }
    }
}

async fn purge_history(core: &Core, purged_to: i64) -> i64 {
    let compacted = match core.shard.store.revisions().await {
        Ok(revs) => revs.compacted,
        Err(_) => return purged_to,
    };
    if compacted <= purged_to {
        return purged_to;
    }
    match core
        .shard
        .store
        .purge_compacted(compacted, core.options.compaction_batch_revisions)
        .await
    {
        Ok(_) => compacted,
        Err(e) => {
            warn!(error = %e, "compaction: history purge failed; will retry");
            purged_to
        }
    }
}
