//! Samples what is not counted as it happens, every few seconds: each
//! shard's revisions, how far its watch hub trails it, its pool connections
//! and database size, and the live leases (kept by the default shard).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::debug;

use super::ShardSample;
use crate::server::Core;

/// How often; a Prometheus scrape interval is rarely shorter.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

pub fn spawn(core: Arc<Core>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            sample(&core).await;
        }
    })
}

async fn sample(core: &Core) {
    let shards = core.views.current();
    for (_, shard) in shards.all() {
        // Read before the counter, so the lag is never below zero.
        let published = shard.hub.closed();
        let revisions = shard.store.revisions().await.ok();
        let database_bytes = match shard.store.db_size().await {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                debug!(shard = %shard.name, error = %e, "database size not sampled");
                None
            }
        };
        let sample = ShardSample {
            revision: revisions.map(|r| r.current),
            compacted: revisions.map(|r| r.compacted),
            watch_lag: revisions.map(|r| (r.current - published).max(0)),
            database_bytes,
            connections: shard.store.connections(),
        };
        core.metrics.set_shard_sample(&shard.name, &sample);
    }
    if let Ok(leases) = shards.default_shard().store.lease_list().await {
        core.metrics.set_leases(leases.len());
    }
}
