//! The target of an import: every shard of a topology, opened for reads
//! (the shard's store, as a router reads it) and for bulk writes.

use std::sync::Arc;

use futures::future::try_join_all;
use kubeshard_config::Topology;
use kubeshard_shard_worker::bulk::{Bulk, Change, Contents, ImportState};
use kubeshard_shard_worker::{
    LeaseRecord, RevisionClass, Revisions, ShardError, ShardStore, open_bulk, open_store,
};

use crate::error::{Result, TransferError};

#[derive(Debug)]
pub struct TargetShard {
    pub name: String,
    pub store: Arc<dyn ShardStore>,
    pub bulk: Arc<dyn Bulk>,
}

#[derive(Debug)]
pub struct Target {
    pub topology: Topology,
    pub shards: Vec<TargetShard>,
}

impl TargetShard {
    pub fn fail(&self, error: ShardError) -> TransferError {
        TransferError::Target {
            shard: self.name.clone(),
            error,
        }
    }
}

impl Target {
    /// Opens every shard, creating databases and schemas when missing.
    pub async fn open(topology: Topology) -> Result<Self> {
        let count = topology.shards().len();
        let mut shards = Vec::with_capacity(count);
        for (i, spec) in topology.shards().iter().enumerate() {
            let fail = |error| TransferError::Target {
                shard: spec.name.clone(),
                error,
            };
            let class = RevisionClass::of_shard(i, count).unwrap_or(RevisionClass::ALL);
            let store = open_store(&spec.endpoint, class).await.map_err(fail)?;
            let bulk = open_bulk(&spec.endpoint).await.map_err(fail)?;
            shards.push(TargetShard {
                name: spec.name.clone(),
                store,
                bulk,
            });
        }
        Ok(Target { topology, shards })
    }

    /// The index of the shard holding `key`.
    pub fn route(&self, key: &[u8]) -> usize {
        self.topology.route(key).index()
    }

    pub async fn contents(&self) -> Result<Vec<Contents>> {
        try_join_all(
            self.shards
                .iter()
                .map(|s| async move { s.bulk.contents().await.map_err(|e| s.fail(e)) }),
        )
        .await
    }

    pub async fn import_states(&self) -> Result<Vec<Option<ImportState>>> {
        try_join_all(
            self.shards
                .iter()
                .map(|s| async move { s.bulk.import_state().await.map_err(|e| s.fail(e)) }),
        )
        .await
    }

    pub async fn set_import_state(&self, state: &ImportState) -> Result<()> {
        try_join_all(
            self.shards.iter().map(|s| async move {
                s.bulk.set_import_state(state).await.map_err(|e| s.fail(e))
            }),
        )
        .await?;
        Ok(())
    }

    /// Applies `changes` (in source order) on their shards, each shard in
    /// one transaction; every shard's counter reaches at least `at_least`.
    /// `skip_to[i]`: changes at or below it are already on shard i.
    pub async fn apply(&self, changes: Vec<Change>, at_least: i64, skip_to: &[i64]) -> Result<()> {
        let mut per_shard: Vec<Vec<Change>> = vec![Vec::new(); self.shards.len()];
        for change in changes {
            let i = self.route(change.key());
            let shard = &self.shards[i];
            if let (backend, Some(max)) = shard.bulk.key_limit()
                && change.key().len() > max
            {
                let shown: String = change
                    .key()
                    .escape_ascii()
                    .to_string()
                    .chars()
                    .take(120)
                    .collect();
                return Err(TransferError::Refused {
                    shard: shard.name.clone(),
                    key: format!("{shown}..."),
                    why: format!(
                        "it is {} bytes, and the {backend} backend stores keys of at most {max} bytes",
                        change.key().len()
                    ),
                });
            }
            if change.revision() > skip_to.get(i).copied().unwrap_or(0) {
                per_shard[i].push(change);
            }
        }
        try_join_all(
            self.shards
                .iter()
                .zip(per_shard)
                .map(|(s, changes)| async move {
                    s.bulk
                        .apply(&changes, at_least)
                        .await
                        .map_err(|e| s.fail(e))
                }),
        )
        .await?;
        Ok(())
    }

    /// Puts `leases` on every shard: the default one holds them, the others
    /// keep copies their keys attach to (docs/architecture.md).
    pub async fn put_leases(&self, leases: &[LeaseRecord]) -> Result<()> {
        try_join_all(
            self.shards
                .iter()
                .map(|s| async move { s.bulk.put_leases(leases).await.map_err(|e| s.fail(e)) }),
        )
        .await?;
        Ok(())
    }

    pub async fn delete_leases(&self, ids: &[i64]) -> Result<()> {
        try_join_all(
            self.shards
                .iter()
                .map(|s| async move { s.bulk.delete_leases(ids).await.map_err(|e| s.fail(e)) }),
        )
        .await?;
        Ok(())
    }

    /// Records on every shard that the data is arranged for this topology.
    pub async fn set_placement(&self) -> Result<()> {
        let placement = self.topology.placement();
        let placement = &placement;
        try_join_all(self.shards.iter().map(|s| async move {
            s.bulk
                .set_placement(placement, true)
                .await
                .map_err(|e| s.fail(e))
        }))
        .await?;
        Ok(())
    }

    pub async fn raise(&self, to: Revisions) -> Result<()> {
        try_join_all(
            self.shards
                .iter()
                .map(|s| async move { s.bulk.raise(to).await.map_err(|e| s.fail(e)) }),
        )
        .await?;
        Ok(())
    }
}
