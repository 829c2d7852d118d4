//! The etcd gRPC services, one module per etcd service (as in Xline).

mod auth;
mod cluster;
mod kv;
mod lease;
mod maintenance;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kubeshard_config::ServerOptions;
use kubeshard_proto::etcdserverpb::ResponseHeader;
use kubeshard_proto::etcdserverpb::auth_server::AuthServer;
use kubeshard_proto::etcdserverpb::cluster_server::ClusterServer;
use kubeshard_proto::etcdserverpb::kv_server::KvServer;
use kubeshard_proto::etcdserverpb::lease_server::LeaseServer;
use kubeshard_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use kubeshard_proto::etcdserverpb::watch_server::WatchServer;
use kubeshard_shard_worker::{Shard, ShardError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tracing::info;

use crate::background;
use crate::metrics::{GrpcMetricsLayer, Metrics};
use crate::validate::Limits;

/// The etcd version kubeshard reports. kube-apiserver turns on watch progress
/// requests and WatchList only for etcd >= 3.5.13, and kubeshard implements
/// what those need.
pub const ETCD_VERSION: &str = "3.6.0";

/// gRPC's own bound on a message, above the etcd request limit so that an
/// oversized request gets etcd's "request is too large", as etcd does.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// State shared by all services of one router process.
#[derive(Debug)]
pub struct Core {
    pub shard: Shard,
    pub options: ServerOptions,
    pub limits: Limits,
    pub cluster_id: u64,
    pub member_id: u64,
    pub client_url: String,
    pub started_ms: i64,
    pub metrics: Arc<Metrics>,
}

impl Core {
    /// A response header at `revision`, with this router's identity.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: 1,
        })
    }

    /// The shard's current revision, for headers of answers that read no keys.
    pub async fn current_revision(&self) -> Result<i64, tonic::Status> {
        self.shard
            .store
            .revisions()
            .await
            .map(|revs| revs.current)
            .map_err(crate::error::shard_status)
    }

    /// Fills the identity fields of a header a shard returned.
    pub fn fill(&self, header: &mut Option<ResponseHeader>) {
        let revision = header.as_ref().map_or(0, |h| h.revision);
        *header = self.header(revision);
    }
}

/// Wall-clock milliseconds: lease deadlines are absolute so they survive restarts.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// FNV-1a, a hash with a fixed specification: identities stay stable across
/// builds and Rust versions.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address}: {error}")]
    Bind {
        address: String,
        error: std::io::Error,
    },
    #[error("shard {shard} ({endpoint}): {error}")]
    Shard {
        shard: String,
        endpoint: String,
        error: ShardError,
    },
    #[error("{0}")]
    Topology(String),
    #[error("cannot create metrics: {0}")]
    Metrics(prometheus::Error),
    #[error("grpc server failed: {0}")]
    Transport(tonic::transport::Error),
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<JoinHandle<()>>,
    shutdown: Option<oneshot::Sender<()>>,
    join: JoinHandle<Result<(), ServeError>>,
    core: Arc<Core>,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where /metrics is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops accepting requests, waits for the server to end and stops the shard.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = match (&mut self.join).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "server task failed");
                Ok(())
            }
        };
        if let Some(task) = self.metrics_task.take() {
            task.abort();
        }
        self.core.shard.stop();
        result
    }

    /// Waits until the server ends by itself (it normally does not).
    pub async fn wait(&mut self) -> Result<(), ServeError> {
        match (&mut self.join).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }
}

/// Opens the shard, binds the listener and serves the etcd API.
pub async fn start(options: ServerOptions) -> Result<RunningServer, ServeError> {
    // Routing over several shards is being built (merged ranges, watches and
    // one revision space across shards); until then a topology with more
    // than one shard or with routes is refused rather than half-served.
    let topology = &options.topology;
    if topology.shards().len() > 1 || !topology.routes().is_empty() {
        return Err(ServeError::Topology(format!(
            "{}: this kubeshard serves one shard; routing over {} shards with {} routes is not available yet",
            topology.source().unwrap_or("topology"),
            topology.shards().len(),
            topology.routes().len()
        )));
    }
    let endpoint = options.endpoint.clone();
    info!(listen_address = %options.listen_address, backend = %endpoint.backend(), endpoint = %endpoint, "starting kubeshard");
    let shard = Shard::open("default", &endpoint, options.watch_poll_interval)
        .await
        .map_err(|error| ServeError::Shard {
            shard: "default".into(),
            endpoint: endpoint.to_string(),
            error,
        })?;
    let listener = TcpListener::bind(&options.listen_address)
        .await
        .map_err(|error| ServeError::Bind {
            address: options.listen_address.clone(),
            error,
        })?;
    let local_addr = listener.local_addr().map_err(|error| ServeError::Bind {
        address: options.listen_address.clone(),
        error,
    })?;
    let metrics = Arc::new(Metrics::new().map_err(ServeError::Metrics)?);
    let (metrics_addr, metrics_task) = match &options.metrics_address {
        Some(address) => {
            let (addr, task) = crate::metrics::serve(address, metrics.clone())
                .await
                .map_err(|error| ServeError::Bind {
                    address: address.clone(),
                    error,
                })?;
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let core = Arc::new(Core {
        shard,
        limits: Limits {
            max_request_bytes: options.max_request_bytes,
            max_txn_ops: options.max_txn_ops,
        },
        cluster_id: fnv1a(endpoint.to_string().as_bytes()),
        member_id: fnv1a(local_addr.to_string().as_bytes()),
        client_url: format!("http://{local_addr}"),
        started_ms: now_ms(),
        metrics: metrics.clone(),
        options,
    });
    info!(%local_addr, "serving the etcd v3 API");

    let max_message = core.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let background = background::spawn(core.clone());
    let router = tonic::transport::Server::builder()
        .layer(GrpcMetricsLayer { metrics })
        .add_service(
            KvServer::new(kv::KvService::new(core.clone())).max_decoding_message_size(max_message),
        )
        .add_service(
            WatchServer::new(watch::WatchService::new(core.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            LeaseServer::new(lease::LeaseService::new(core.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(MaintenanceServer::new(
            maintenance::MaintenanceService::new(core.clone()),
        ))
        .add_service(ClusterServer::new(cluster::ClusterService::new(
            core.clone(),
        )))
        .add_service(AuthServer::new(auth::AuthService));
    // tonic ignores its own TCP_NODELAY default for a caller's listener; without
    // it Nagle's algorithm holds small responses back on a busy HTTP/2
    // connection (many ms per request under concurrency).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let join = tokio::spawn(async move {
        let served = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            })
            .await;
        background.abort();
        served.map_err(ServeError::Transport)
    });
    Ok(RunningServer {
        local_addr,
        metrics_addr,
        metrics_task,
        shutdown: Some(shutdown_tx),
        join,
        core,
    })
}
