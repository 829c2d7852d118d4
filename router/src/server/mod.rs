//! The etcd gRPC services, one module per etcd service (as in Xline).

mod auth;
mod cluster;
mod kv;
pub(crate) mod lease;
mod maintenance;
pub(crate) mod stopping;
mod watch;
mod watch_selector;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kubeshard_config::ServerOptions;
use kubeshard_proto::etcdserverpb::ResponseHeader;
use kubeshard_proto::etcdserverpb::auth_server::AuthServer;
use kubeshard_proto::etcdserverpb::cluster_server::ClusterServer;
use kubeshard_proto::etcdserverpb::kv_server::KvServer;
use kubeshard_proto::etcdserverpb::lease_server::LeaseServer;
use kubeshard_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use kubeshard_proto::etcdserverpb::watch_server::WatchServer;
use kubeshard_shard_worker::bulk::ReshardPhase;
use kubeshard_shard_worker::{ShardError, ShardSettings};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::background;
use crate::health::Health;
use crate::listen::{Bound, Listening};
use crate::metrics::{GrpcMetricsLayer, Metrics};
use crate::shards::Shards;
use crate::topology_change::on_topology;
use crate::topology_change::{Entered, Views};
use crate::validate::Limits;
use stopping::StopSignal;

/// gRPC's own bound on a message, above the etcd request limit so that an
/// oversized request gets etcd's "request is too large", as etcd does.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// How long a stopping router waits for the calls in flight (writes
/// included) before it closes what is still open: etcd's request timeout.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(7);

/// State shared by all services of one router process.
#[derive(Debug)]
pub struct Core {
    /// The shards of the topology served, which may change while the
    /// router runs (`topology_change.rs`).
    pub views: Views,
    pub options: ServerOptions,
    pub limits: Limits,
    pub cluster_id: u64,
    pub member_id: u64,
    pub client_url: String,
    pub started_ms: i64,
    pub metrics: Arc<Metrics>,
    /// Set when the router begins to stop; ends Watch and LeaseKeepAlive
    /// streams and fails readiness.
    pub stop: StopSignal,
}

impl Core {
    /// The shards for one request or one round of a background task; a
    /// topology switch waits until it is dropped (`Views::enter`).
    pub fn shards(&self) -> Entered {
        self.views.enter()
    }

    /// A response header at `revision`, with this router's identity.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: 1,
        })
    }

    /// The revision for headers of answers that read no keys (leases,
    /// maintenance): the default shard's counter, or the router's floor if
    /// that is higher, so that a header never goes back for a client of
    /// this router.
    pub async fn current_revision(&self) -> Result<i64, tonic::Status> {
        on_topology!(self, |shards| async {
            let id = shards.default_id();
            let revs = shards
                .get(id)
                .store
                .revisions()
                .await
                .map_err(crate::error::shard_status)?;
            shards.observe(id, revs.current);
            Ok(shards.floor())
        })
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
    #[error("{}shard {shard} ({endpoint}): {error}", .location.as_ref().map(|l| format!("{l}: ")).unwrap_or_default())]
    Shard {
        shard: String,
        endpoint: String,
        /// Where the shard is defined in the topology file.
        location: Option<String>,
        error: ShardError,
    },
    #[error(
        "the data is arranged for another topology than {source_name}'s; `kubeshard reshard \
         --from OLD --to NEW` moves it (routers stopped). The data's placement:\n{stored}\n\
         The placement of {source_name}:\n{ours}"
    )]
    Placement {
        source_name: String,
        stored: String,
        ours: String,
    },
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot create metrics: {0}")]
    Metrics(prometheus::Error),
    #[error("grpc server failed: {0}")]
    Transport(tonic::transport::Error),
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    listening: Listening,
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<JoinHandle<()>>,
    shutdown: Option<oneshot::Sender<()>>,
    join: JoinHandle<Result<(), ServeError>>,
    /// Lease expiry and purges; automatic compaction when configured.
    background: Vec<JoinHandle<()>>,
    core: Arc<Core>,
    presence: Arc<crate::presence::Presence>,
}

impl RunningServer {
    /// The TCP address served; None on a Unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listening {
            Listening::Tcp(addr) => Some(*addr),
            Listening::Unix(_) => None,
        }
    }

    /// What the etcd API is served on.
    pub fn listening(&self) -> &Listening {
        &self.listening
    }

    /// Where /metrics is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops the router: readiness fails, open Watch and LeaseKeepAlive
    /// streams end with etcd's "server stopped", no new call is accepted,
    /// and the calls in flight get [`SHUTDOWN_GRACE`] to finish; then the
    /// shards stop. A write either commits whole or not at all: each is one
    /// database transaction.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        self.core.stop.stop();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.join).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "server task failed");
                Ok(())
            }
            Err(_) => {
                // Their connections' tasks end with the process (the
                // binary exits next); embedded, they end with the runtime.
                warn!(grace = ?SHUTDOWN_GRACE, "calls still open after the grace period; no longer waiting for them");
                self.join.abort();
                Ok(())
            }
        };
        for task in self.background.drain(..) {
            task.abort();
        }
        if let Some(task) = self.metrics_task.take() {
            task.abort();
        }
        self.presence.gone().await;
        self.core.views.current().stop();
        crate::listen::remove_socket(&self.listening);
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

/// The data is arranged for the topology served: the default shard records
/// the placement (`Topology::placement`) at the first start, and
/// `kubeshard reshard` changes it; a router with another file refuses to
/// serve, since it would look for keys where they are not. None: a move
/// to this topology is under way and the router must wait for it.
async fn check_placement(
    shards: &Shards,
) -> Result<Option<Arc<dyn kubeshard_shard_worker::bulk::Bulk>>, ServeError> {
    let topology = shards.topology();
    let spec = topology.shard(topology.default_shard());
    let fail = |error| ServeError::Shard {
        shard: spec.name.clone(),
        endpoint: spec.endpoint.to_string(),
        location: spec.location.as_ref().map(ToString::to_string),
        error,
    };
    let bulk = kubeshard_shard_worker::open_bulk(&spec.endpoint)
        .await
        .map_err(fail)?;
    let ours = topology.placement();
    let stored = match bulk.placement().await.map_err(fail)? {
        Some(stored) => Some(stored),
        None => {
            // First start: record ours, unless a router starting at the
            // same time recorded its own first.
            bulk.set_placement(&ours, false).await.map_err(fail)?;
            bulk.placement().await.map_err(fail)?
        }
    };
    // An online move to this placement (`topology_change.rs`): serve once
    // every database is fenced, holding the shards whose keys arrive.
    let moving = bulk
        .reshard()
        .await
        .map_err(fail)?
        .filter(|r| r.placement == ours && r.phase != ReshardPhase::Done);
    if let Some(r) = &moving {
        if r.phase < ReshardPhase::Fenced {
            info!(
                phase = r.phase.as_str(),
                "a move to this topology is under way; waiting until it is fenced"
            );
            return Ok(None);
        }
        if r.version == shards.version() {
            shards.hold(&r.held);
        }
    }
    match stored {
        None => Err(fail(kubeshard_shard_worker::ShardError::Corrupt(
            "ks_placement has no row after writing it".into(),
        ))),
        Some(stored) if stored == ours => Ok(Some(bulk)),
        Some(stored) => Err(ServeError::Placement {
            source_name: topology.source().unwrap_or("--endpoint").to_string(),
            stored,
            ours,
        }),
    }
}

/// What every shard of the router is opened with.
pub(crate) fn shard_settings(options: &ServerOptions) -> ShardSettings {
    ShardSettings {
        poll_interval: options.watch_poll_interval,
        poll_batch: options.poll_batch,
        pool: options.pool.clone(),
        slow_sql: options.slow_sql,
    }
}

/// Opens the shards, binds the listener and serves the etcd API.
pub async fn start(options: ServerOptions) -> Result<RunningServer, ServeError> {
    let topology = options.topology.clone();
    info!(
        listen_address = %options.listen_address,
        shards = topology.shards().len(),
        routes = topology.routes().len(),
        topology = topology.source().unwrap_or("--endpoint"),
        "starting kubeshard"
    );
    for spec in topology.shards() {
        info!(shard = %spec.name, backend = %spec.endpoint.backend(), endpoint = %spec.endpoint, "shard");
    }
    // Before the shards: a TLS mistake is reported without opening databases.
    let acceptors = options
        .tls
        .as_ref()
        .map(crate::tls::Acceptors::new)
        .transpose()?;
    let settings = shard_settings(&options);
    let metrics = Arc::new(Metrics::new().map_err(ServeError::Metrics)?);
    let (shards, default_bulk) = loop {
        let shards = Shards::open(topology.clone(), &settings, |shard| {
            metrics.shard_observer(shard)
        })
        .await
        .map_err(|e| ServeError::Shard {
            shard: e.shard,
            endpoint: e.endpoint,
            location: e.location,
            error: e.error,
        })?;
        match check_placement(&shards).await {
            Ok(Some(bulk)) => break (shards, bulk),
            Ok(None) => {
                // A move to this topology is under way and not fenced yet.
                shards.stop();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                shards.stop();
                return Err(e);
            }
        }
    };
    let (bound, listening) = Bound::bind(&options.listen_address)
        .await
        .map_err(|error| ServeError::Bind {
            address: options.listen_address.clone(),
            error,
        })?;
    let endpoint = options.endpoint.clone();
    let core = Arc::new(Core {
        views: Views::new(shards),
        limits: Limits {
            max_request_bytes: options.max_request_bytes,
            max_txn_ops: options.max_txn_ops,
        },
        cluster_id: fnv1a(endpoint.to_string().as_bytes()),
        member_id: fnv1a(listening.url(false).as_bytes()),
        client_url: listening.url(acceptors.is_some()),
        started_ms: now_ms(),
        metrics: metrics.clone(),
        stop: StopSignal::default(),
        options,
    });
    let (metrics_addr, metrics_task) = match &core.options.metrics_address {
        Some(address) => {
            let (addr, task) = crate::http::serve(
                address,
                acceptors
                    .as_ref()
                    .filter(|_| core.options.metrics_tls)
                    .map(|a| a.http.clone()),
                metrics.clone(),
                Arc::new(Health::new(core.clone())),
            )
            .await
            .map_err(|error| ServeError::Bind {
                address: address.clone(),
                error,
            })?;
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let default_spec = topology.shard(topology.default_shard());
    let peers = core.views.current().peers().clone();
    let presence =
        crate::presence::Presence::start(default_bulk.clone(), &core.client_url, peers.clone())
            .await
            .map_err(|error| ServeError::Shard {
                shard: default_spec.name.clone(),
                endpoint: default_spec.endpoint.to_string(),
                location: default_spec.location.as_ref().map(ToString::to_string),
                error,
            })?;
    if peers.present() {
        // Until the others know of this router, their writes could take
        // revisions below the ones it acknowledges (`peers.rs`).
        info!("other routers serve these databases; waiting until they see this one");
        let started = std::time::Instant::now();
        presence.join().await.map_err(|error| ServeError::Shard {
            shard: default_spec.name.clone(),
            endpoint: default_spec.endpoint.to_string(),
            location: default_spec.location.as_ref().map(ToString::to_string),
            error,
        })?;
        info!(waited = ?started.elapsed(), "the other routers see this one");
    }
    info!(url = %core.client_url, "serving the etcd v3 API");

    let max_message = core.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let background = background::spawn(core.clone());
    let sampler = crate::metrics::spawn_sampler(core.clone());
    let follower = crate::topology_change::spawn(core.clone(), default_bulk.clone());
    let auto_compaction = core
        .options
        .auto_compaction
        .clone()
        .map(|settings| crate::compaction::spawn_auto(core.clone(), settings));
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
    let grpc_tls = acceptors.map(|a| a.grpc);
    let join = tokio::spawn(async move {
        let stopped = async {
            let _ = shutdown_rx.await;
        };
        let served = match (bound, grpc_tls) {
            (Bound::Tcp(listener), None) => {
                // tonic ignores its own TCP_NODELAY default for a caller's
                // listener; without it Nagle's algorithm holds small
                // responses back on a busy HTTP/2 connection (many ms per
                // request under concurrency).
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                router.serve_with_incoming_shutdown(incoming, stopped).await
            }
            (Bound::Tcp(listener), Some(acceptor)) => {
                let accepted = TcpListenerStream::new(listener).map(|accepted| {
                    accepted.inspect(|stream| {
                        let _ = stream.set_nodelay(true);
                    })
                });
                let incoming = crate::tls::incoming(accepted, acceptor);
                router.serve_with_incoming_shutdown(incoming, stopped).await
            }
            (Bound::Unix(listener), None) => {
                let incoming = UnixListenerStream::new(listener);
                router.serve_with_incoming_shutdown(incoming, stopped).await
            }
            (Bound::Unix(listener), Some(acceptor)) => {
                let incoming = crate::tls::incoming(UnixListenerStream::new(listener), acceptor);
                router.serve_with_incoming_shutdown(incoming, stopped).await
            }
        };
        served.map_err(ServeError::Transport)
    });
    Ok(RunningServer {
        listening,
        metrics_addr,
        metrics_task,
        shutdown: Some(shutdown_tx),
        join,
        background: [background, sampler, follower, presence.spawn()]
            .into_iter()
            .chain(auto_compaction)
            .collect(),
        core,
        presence,
    })
}
