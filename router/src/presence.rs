//! Each router records itself in its default shard every few seconds
//! (`ks_router`), and removes itself when it stops, so that the tools that
//! must not run beside a serving router (`kubeshard reshard`, `kubeshard
//! import`) can tell that one is there.

use std::sync::Arc;
use std::time::Duration;

use kubeshard_shard_worker::bulk::Bulk;
use rand::Rng;
use tokio::task::JoinHandle;
use tracing::warn;

/// How often a router says it is there. The tools treat a router seen in
/// the last [`kubeshard_shard_worker::bulk::ROUTER_SEEN_WITHIN_MS`] as
/// serving.
pub const INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Presence {
    bulk: Arc<dyn Bulk>,
    id: String,
    address: String,
}

impl Presence {
    /// Records this router at once (a tool started right after sees it).
    pub async fn start(
        bulk: Arc<dyn Bulk>,
        address: &str,
    ) -> Result<Arc<Self>, kubeshard_shard_worker::ShardError> {
        let presence = Presence {
            bulk,
            id: format!(
                "{}-{:016x}",
                std::process::id(),
                rand::rng().random::<u64>()
            ),
            address: address.to_string(),
        };
        presence.say().await?;
        Ok(Arc::new(presence))
    }

    async fn say(&self) -> Result<(), kubeshard_shard_worker::ShardError> {
        self.bulk.router_seen(&self.id, &self.address).await
    }

    /// Says it again every [`INTERVAL`].
    pub fn spawn(self: &Arc<Self>) -> JoinHandle<()> {
        let presence = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = presence.say().await {
                    warn!(error = %e, "cannot record this router in the default shard");
                }
            }
        })
    }

    /// The router stops: it is no longer there (best effort; a router that
    /// dies counts as there until its last record is old enough).
    pub async fn gone(&self) {
        let removed = tokio::time::timeout(INTERVAL, self.bulk.router_gone(&self.id)).await;
        if !matches!(removed, Ok(Ok(()))) {
            warn!("cannot remove this router's record from the default shard");
        }
    }
}
