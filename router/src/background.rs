//! Background duties of a router: expiring leases (one router at a time,
//! through a lock held in the default shard's database), removing the
//! copies of expired leases from the other shards, and finishing
//! compactions on every shard.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kubeshard_shard_worker::{WriteRequest, WriteResponse};
use rand::Rng;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::server::lease::revoke_copies;
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
        let mut purged_to = HashMap::new();
        // Expired leases whose copies on other shards are still to remove.
        let mut orphans: BTreeSet<i64> = BTreeSet::new();
        loop {
            tokio::select! {
                _ = leases.tick() => expire_leases(&core, &owner, &mut orphans).await,
                _ = purge.tick() => {
                    finish_compactions(&core, &mut purged_to).await;
                    if core.views.current().len() > 1 {
                        find_orphan_copies(&core, &owner, &mut orphans).await;
                    }
                }
            }
        }
    })
}

async fn expire_leases(core: &Core, owner: &str, orphans: &mut BTreeSet<i64>) {
    let shards = core.shards();
    if shards.holds_any() {
        // Keys are arriving (an online move): their leases expire once
        // they are whole.
        return;
    }
    let store = &shards.default_shard().store;
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
    let default = shards.default_id();
    for id in expired {
        // The default shard decides (a KeepAlive may have renewed it).
        match shards
            .write(default, WriteRequest::LeaseExpire { id, now_ms: now })
            .await
        {
            Ok(WriteResponse::LeaseExpire { expired: true, .. }) => {
                core.metrics.leases_expired.inc();
                info!(lease = id, "lease expired");
                orphans.insert(id);
            }
            Ok(_) => {}
            Err(e) => warn!(lease = id, error = %e, "lease expiry failed; will retry"),
        }
    }
    if shards.len() > 1 {
        let pending: Vec<i64> = orphans.iter().copied().collect();
        for id in pending {
            // Granted again meanwhile (a client chose the id): its copies
            // are the new lease's now, not orphans.
            match store.lease_get(id).await {
                Ok(None) => {}
                Ok(Some(_)) => {
                    orphans.remove(&id);
                    continue;
                }
                Err(_) => continue,
            }
            match revoke_copies(&shards, id).await {
                Ok(_) => {
                    orphans.remove(&id);
                }
                Err(e) => {
                    warn!(lease = id, error = %e, "lease expiry: keys on other shards not removed yet; will retry")
                }
            }
        }
    } else {
        orphans.clear();
    }
}

/// Finds lease copies on non-default shards whose lease is gone (an expiry
/// by a router that stopped before removing them), while holding the
/// expirer lock, and queues them for removal.
async fn find_orphan_copies(core: &Core, owner: &str, orphans: &mut BTreeSet<i64>) {
    let shards = core.shards();
    if shards.holds_any() {
        return;
    }
    let default = shards.default_shard();
    match default
        .store
        .try_lock("lease-expirer", owner, now_ms(), EXPIRER_LOCK_MS)
        .await
    {
        Ok(true) => {}
        _ => return,
    }
    // Copies first, then the leases: a grant writes the lease before its
    // copies, so a copy seen here whose lease is missing afterwards really
    // lost its lease (and is not one being granted right now).
    let mut copies = Vec::new();
    for (id, shard) in shards.all() {
        if id == shards.default_id() {
            continue;
        }
        match shard.store.lease_list().await {
            Ok(ids) => copies.extend(ids),
            Err(_) => return,
        }
    }
    let Ok(live) = default.store.lease_list().await else {
        return;
    };
    let live: BTreeSet<i64> = live.into_iter().collect();
    orphans.extend(copies.into_iter().filter(|lease| !live.contains(lease)));
}

/// Brings every other shard to the default shard's compaction mark (a
/// Compact that failed on some shard) and removes compacted history. The
/// default shard's mark is the one Compact answers by, so this never moves
/// it (a client's Compact in progress keeps its answer). Not while keys
/// are arriving (an online move), and not holding up a topology switch.
async fn finish_compactions(core: &Core, purged_to: &mut HashMap<String, i64>) {
    let shards = core.views.current();
    if shards.holds_any() {
        return;
    }
    let mut marks = Vec::with_capacity(shards.len());
    for (id, shard) in shards.all() {
        match shard.store.revisions().await {
            Ok(revs) => marks.push((id, revs.compacted)),
            Err(_) => return,
        }
    }
    let highest = marks
        .iter()
        .find(|(id, _)| *id == shards.default_id())
        .map_or(0, |(_, c)| *c);
    for (id, compacted) in &marks {
        if *compacted < highest {
            let repaired = async {
                shards.raise(*id, highest).await?;
                shards
                    .write(*id, WriteRequest::Compact { revision: highest })
                    .await
            }
            .await;
            if let Err(e) = repaired {
                warn!(shard = %shards.get(*id).name, revision = highest, error = %e, "compaction: cannot bring shard to the compaction mark; will retry");
                continue;
            }
        }
        let upto = highest.max(*compacted);
        let done = purged_to.entry(shards.get(*id).name.clone()).or_insert(0);
        if upto <= *done {
            continue;
        }
        match shards
            .get(*id)
            .store
            .purge_compacted(upto, core.options.compaction_batch_revisions)
            .await
        {
            Ok(_) => *done = upto,
            Err(e) => {
                warn!(shard = %shards.get(*id).name, error = %e, "compaction: history purge failed; will retry")
            }
        }
    }
}
