//! The tools write around the routers, so they refuse to run while a
//! router serves any of the databases (routers record themselves in
//! `ks_router`; `router/src/presence.rs`).

use kubeshard_shard_worker::bulk::{Bulk, ROUTER_SEEN_WITHIN_MS};

use crate::error::{Result, TransferError};

/// Fails if a router recorded itself in `bulk`'s database recently.
pub async fn none_serving(shard: &str, bulk: &dyn Bulk) -> Result<()> {
    let seen = bulk
        .routers_seen(ROUTER_SEEN_WITHIN_MS)
        .await
        .map_err(|error| TransferError::Target {
            shard: shard.to_string(),
            error,
        })?;
    if seen.is_empty() {
        return Ok(());
    }
    let routers: Vec<String> = seen
        .iter()
        .map(|r| format!("{} ({} ms ago)", r.address, r.ago_ms))
        .collect();
    Err(TransferError::RoutersServing {
        shard: shard.to_string(),
        routers: routers.join(", "),
    })
}
