//! etcd's Lease service: real leases with deadlines stored in the database.

use std::sync::Arc;

use futures::StreamExt;
use kubeshard_proto::etcdserverpb::lease_server::Lease;
use kubeshard_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use kubeshard_shard_worker::{ShardError, WriteRequest, WriteResponse};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::stopping::UntilStopped;
use super::{Core, now_ms};
use crate::error::{EtcdError, shard_status};
use crate::shards::Shards;
use crate::topology_change::on_topology;

/// etcd's MaxLeaseTTL.
const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// etcd's smallest TTL with its default election timeout (1.5 s, rounded up).
const MIN_LEASE_TTL: i64 = 2;

#[derive(Debug)]
pub struct LeaseService {
    core: Arc<Core>,
}

impl LeaseService {
    pub fn new(core: Arc<Core>) -> Self {
        LeaseService { core }
    }

    /// Grants the lease on the default shard, then copies it to the others.
    async fn grant(shards: &Shards, grant: &WriteRequest) -> Result<(i64, i64, i64), Status> {
        // The default shard holds the lease and decides; every other shard
        // gets a copy so that a Put there can attach keys to it inside its
        // own transaction (docs/architecture.md, "Leases across shards").
        let response = shards
            .write(shards.default_id(), grant.clone())
            .await
            .map_err(shard_status)?;
        let WriteResponse::LeaseGrant { id, ttl, revision } = response else {
            return Err(unexpected());
        };
        let others: Vec<_> = shards
            .ids()
            .into_iter()
            .filter(|other| *other != shards.default_id())
            .collect();
        let copies = others
            .iter()
            .map(|other| copy_lease(shards, *other, grant, id));
        for copied in futures::future::join_all(copies).await {
            if let Err(e) = copied {
                // Undo what was granted: the lease first, so that it is not
                // alive while the client was told it does not exist; copies
                // left behind are orphans the expirer removes.
                let _ = shards
                    .write(shards.default_id(), WriteRequest::LeaseRevoke { id })
                    .await;
                let _ = revoke_copies(shards, id).await;
                return Err(shard_status(e));
            }
        }
        Ok((id, ttl, revision.max(shards.floor())))
    }
}

/// Revokes lease `id`: first the copies on the other shards (with their
/// keys), then the lease itself on the default shard, so that a revoke that
/// fails half-way leaves the lease alive and can simply be retried. Returns
/// the revision after the revoke; LeaseNotFound if the lease does not exist.
/// Its keys may be on any shard: it waits while keys are arriving (an
/// online move).
pub async fn revoke_everywhere(shards: &Shards, id: i64) -> Result<i64, ShardError> {
    shards.hold_off(&shards.ids()).await?;
    let copies = revoke_copies(shards, id).await?;
    let revoked = shards
        .write(shards.default_id(), WriteRequest::LeaseRevoke { id })
        .await?;
    Ok(copies.max(revoked.revision()).max(shards.floor()))
}

/// Writes the copy of a lease just granted on the default shard to shard
/// `other`. A copy already there is left over from an earlier lease with
/// this id (its removal failed or is pending): it goes first, with its keys,
/// so the new lease does not adopt them.
async fn copy_lease(
    shards: &Shards,
    other: kubeshard_config::ShardId,
    grant: &WriteRequest,
    id: i64,
) -> Result<(), ShardError> {
    match shards.write(other, grant.clone()).await {
        Ok(_) => Ok(()),
        Err(ShardError::LeaseExists) => {
            match shards.write(other, WriteRequest::LeaseRevoke { id }).await {
                Ok(_) | Err(ShardError::LeaseNotFound) => {}
                Err(e) => return Err(e),
            }
            shards.write(other, grant.clone()).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Removes the copies of lease `id` and their keys from every shard but the
/// default one (a copy already gone is fine). Returns the highest revision
/// they answered.
pub async fn revoke_copies(shards: &Shards, id: i64) -> Result<i64, ShardError> {
    let default = shards.default_id();
    let copies = shards
        .ids()
        .into_iter()
        .filter(|other| *other != default)
        .map(|other| shards.write(other, WriteRequest::LeaseRevoke { id }));
    let mut revision = 0;
    for revoked in futures::future::join_all(copies).await {
        match revoked {
            Ok(r) => revision = revision.max(r.revision()),
            Err(ShardError::LeaseNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(revision)
}

fn unexpected() -> Status {
    Status::internal("kubeshard: shard answered a lease request with another response type")
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let request = request.into_inner();
        if request.ttl > MAX_LEASE_TTL {
            return Err(EtcdError::LeaseTtlTooLarge.into());
        }
        let ttl = request.ttl.max(MIN_LEASE_TTL);
        let (id, ttl, revision) = on_topology!(self.core, |shards| async {
            // etcd picks a random positive ID when the client leaves it
            // 0; a new one if a topology change cut an attempt short.
            let id = if request.id == 0 {
                rand::rng().random_range(1..i64::MAX)
            } else {
                request.id
            };
            let grant = WriteRequest::LeaseGrant {
                id,
                ttl,
                now_ms: now_ms(),
            };
            Self::grant(shards, &grant).await
        })?;
        Ok(Response::new(LeaseGrantResponse {
            header: self.core.header(revision),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let id = request.into_inner().id;
        let revision = on_topology!(self.core, |shards| async {
            revoke_everywhere(shards, id).await.map_err(shard_status)
        })?;
        Ok(Response::new(LeaseRevokeResponse {
            header: self.core.header(revision),
        }))
    }

    type LeaseKeepAliveStream =
        UntilStopped<ReceiverStream<Result<LeaseKeepAliveResponse, Status>>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let core = self.core.clone();
        let stream = core.stop.end_on_stop(ReceiverStream::new(rx));
        tokio::spawn(async move {
            loop {
                // The response stream is gone when the router stops: drop
                // the request stream too, or the connection stays open.
                let message = tokio::select! {
                    message = inbound.next() => message,
                    _ = tx.closed() => break,
                };
                let Some(Ok(message)) = message else { break };
                let answer = async {
                    // An unknown or expired lease answers TTL 0, as in etcd.
                    let ttl = on_topology!(core, |shards| async {
                        shards
                            .default_shard()
                            .store
                            .lease_renew(message.id, now_ms())
                            .await
                            .map_err(shard_status)
                    })?
                    .unwrap_or(0);
                    let revision = core.current_revision().await?;
                    Ok::<_, Status>(LeaseKeepAliveResponse {
                        header: core.header(revision),
                        id: message.id,
                        ttl,
                    })
                }
                .await;
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let request = request.into_inner();
        let revision = self.core.current_revision().await?;
        let found = on_topology!(self.core, |shards| async {
            let store = &shards.default_shard().store;
            let Some(lease) = store.lease_get(request.id).await.map_err(shard_status)? else {
                return Ok(None);
            };
            // The lease's keys may live on any shard.
            let mut keys = Vec::new();
            if request.keys {
                shards.hold_off(&shards.ids()).await.map_err(shard_status)?;
                let lookups = shards
                    .all()
                    .map(|(_, shard)| shard.store.lease_keys(request.id));
                for found in futures::future::join_all(lookups).await {
                    keys.extend(found.map_err(shard_status)?);
                }
                keys.sort();
            }
            Ok(Some((lease, keys)))
        })?;
        let Some((lease, keys)) = found else {
            // Not an error in etcd: TTL -1 says the lease does not exist.
            return Ok(Response::new(LeaseTimeToLiveResponse {
                header: self.core.header(revision),
                id: request.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            }));
        };
        let remaining = ((lease.expires_at_ms - now_ms()) / 1000).max(0);
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: self.core.header(revision),
            id: lease.id,
            ttl: remaining,
            granted_ttl: lease.ttl,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let revision = self.core.current_revision().await?;
        let leases = on_topology!(self.core, |shards| async {
            shards
                .default_shard()
                .store
                .lease_list()
                .await
                .map_err(shard_status)
        })?
        .into_iter()
        .map(|id| LeaseStatus { id })
        .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: self.core.header(revision),
            leases,
        }))
    }
}
