//! Each router records itself in its default shard every few seconds
//! (`ks_router`), and removes itself when it stops, so that the tools that
//! must not run beside a serving router (`kubeshard reshard`, `kubeshard
//! import`) can tell that one is there. Each time, it also looks for other
//! routers: while there are, requests keep real-time order across them
//! (`peers.rs`).

use std::sync::Arc;
use std::time::Duration;

use kubeshard_shard_worker::bulk::{Bulk, ROUTER_SEEN_WITHIN_MS};
use rand::Rng;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::peers::Peers;

/// How often a router says it is there. The tools treat a router seen in
/// the last [`kubeshard_shard_worker::bulk::ROUTER_SEEN_WITHIN_MS`] as
/// serving.
pub const INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Presence {
    bulk: Arc<dyn Bulk>,
    id: String,
    address: String,
    peers: Arc<Peers>,
}

impl Presence {
    /// Records this router at once (a tool started right after sees it),
    /// and tells `peers` whether other routers serve.
    pub async fn start(
        bulk: Arc<dyn Bulk>,
        address: &str,
        peers: Arc<Peers>,
    ) -> Result<Arc<Self>, kubeshard_shard_worker::ShardError> {
        let presence = Presence {
            peers,
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

    /// Records this router and looks for others.
    async fn say(&self) -> Result<(), kubeshard_shard_worker::ShardError> {
        self.bulk.router_seen(&self.id, &self.address).await?;
        let seen = self.bulk.routers_seen(ROUTER_SEEN_WITHIN_MS).await?;
        self.peers.set_present(seen.iter().any(|r| r.id != self.id));
        Ok(())
    }

    /// A router that starts beside others waits this long before it serves:
    /// by then each of them saw it and keeps real-time order with it.
    pub const JOIN_WAIT: Duration = Duration::from_secs(2 * INTERVAL.as_secs() + 1);

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
