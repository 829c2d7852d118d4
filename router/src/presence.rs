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

    /// For a router that starts beside others: returns once each of them
    /// has recorded itself twice since this one did. Each record is followed
    /// by a look for others, so by then each has seen this router and keeps
    /// real-time order with it (`peers.rs`). Times are the database's; this
    /// router's own record stays put meanwhile (its task starts after).
    /// Routers that stop recording drop out of the list after
    /// [`ROUTER_SEEN_WITHIN_MS`]; after a minute it gives up waiting.
    pub async fn join(&self) -> Result<(), kubeshard_shard_worker::ShardError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // Per other router: when (after this one's record) it first recorded itself.
        let mut first: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
        while tokio::time::Instant::now() < deadline {
            let seen = self.bulk.routers_seen(ROUTER_SEEN_WITHIN_MS).await?;
            let Some(mine) = seen.iter().find(|r| r.id == self.id).map(|r| r.ago_ms) else {
                return Ok(());
            };
            let mut waiting = false;
            for other in seen.iter().filter(|r| r.id != self.id) {
                // How long after this router's record its last one came.
                let after = mine - other.ago_ms;
                if after <= 0 {
                    waiting = true;
                    continue;
                }
                let first_after = *first.entry(other.id.clone()).or_insert(after);
                if after <= first_after {
                    waiting = true;
                }
            }
            if !waiting {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        warn!("other routers did not record themselves for a minute; serving anyway");
        Ok(())
    }

    /// Says it again every [`INTERVAL`].
    pub fn spawn(self: &Arc<Self>) -> JoinHandle<()> {
        let presence = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match tokio::time::timeout(INTERVAL, presence.say()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot record this router in the default shard")
                    }
                    Err(_) => warn!("recording this router in the default shard took over 2 s"),
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
