//! etcd's Lease service: real leases with deadlines stored in the database.

use std::sync::Arc;

use futures::StreamExt;
use kubeshard_proto::etcdserverpb::lease_server::Lease;
use kubeshard_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use kubeshard_shard_worker::{WriteRequest, WriteResponse};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Core, now_ms};
use crate::error::{EtcdError, shard_status};

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
        // etcd picks a random positive ID when the client leaves it 0.
        let id = if request.id == 0 {
            rand::rng().random_range(1..i64::MAX)
        } else {
            request.id
        };
        let response = self
            .core
            .shard
            .writer
            .write(WriteRequest::LeaseGrant {
                id,
                ttl,
                now_ms: now_ms(),
            })
            .await
            .map_err(shard_status)?;
        match response {
            WriteResponse::LeaseGrant { id, ttl, revision } => {
                Ok(Response::new(LeaseGrantResponse {
                    header: self.core.header(revision),
                    id,
                    ttl,
                    error: String::new(),
                }))
            }
            _ => Err(unexpected()),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let id = request.into_inner().id;
        match self
            .core
            .shard
            .writer
            .write(WriteRequest::LeaseRevoke { id })
            .await
            .map_err(shard_status)?
        {
            WriteResponse::LeaseRevoke { revision } => Ok(Response::new(LeaseRevokeResponse {
                header: self.core.header(revision),
            })),
            _ => Err(unexpected()),
        }
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let core = self.core.clone();
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                let Ok(message) = message else { break };
                let store = &core.shard.store;
                let answer = async {
                    // An unknown or expired lease answers TTL 0, as in etcd.
                    let ttl = store.lease_renew(message.id, now_ms()).await?.unwrap_or(0);
                    let revision = store.revisions().await?.current;
                    Ok::<_, kubeshard_shard_worker::ShardError>(LeaseKeepAliveResponse {
                        header: core.header(revision),
                        id: message.id,
                        ttl,
                    })
                }
                .await
                .map_err(shard_status);
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let request = request.into_inner();
        let store = &self.core.shard.store;
        let revision = self.core.current_revision().await?;
        let Some(lease) = store.lease_get(request.id).await.map_err(shard_status)? else {
            // Not an error in etcd: TTL -1 says the lease does not exist.
            return Ok(Response::new(LeaseTimeToLiveResponse {
                header: self.core.header(revision),
                id: request.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            }));
        };
        let keys = if request.keys {
            store.lease_keys(request.id).await.map_err(shard_status)?
        } else {
            Vec::new()
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
        let leases = self
            .core
            .shard
            .store
            .lease_list()
            .await
            .map_err(shard_status)?
            .into_iter()
            .map(|id| LeaseStatus { id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: self.core.header(revision),
            leases,
        }))
    }
}
