//! The source of an import: an etcd cluster, through etcd's own gRPC API
//! (the clients generated in kubeshard-proto), over TLS when asked.

use std::path::PathBuf;
use std::time::Duration;

use kubeshard_proto::etcdserverpb::kv_client::KvClient;
use kubeshard_proto::etcdserverpb::lease_client::LeaseClient;
use kubeshard_proto::etcdserverpb::watch_client::WatchClient;
use kubeshard_proto::etcdserverpb::watch_request::RequestUnion;
use kubeshard_proto::etcdserverpb::{
    LeaseLeasesRequest, LeaseTimeToLiveRequest, RangeRequest, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use kubeshard_proto::mvccpb::KeyValue;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Result, TransferError};

/// etcdctl's TLS flags for the source.
#[derive(Debug, Clone, Default)]
pub struct SourceTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A lease of the source, as TimeToLive reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLease {
    pub id: i64,
    /// The TTL it was granted with.
    pub granted_ttl: i64,
    /// Seconds left; -1 when it expired between the listing and the ask.
    pub remaining_ttl: i64,
}

/// One etcd cluster.
#[derive(Debug, Clone)]
pub struct Etcd {
    url: String,
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
}

/// The most bytes one answer of the source may carry (a page of big values).
const MAX_MESSAGE: usize = 256 << 20;

fn source_error(url: &str, what: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::Source(format!("{url}: {what}: {e}"))
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        TransferError::Source(format!("cannot read the {what} {}: {e}", path.display()))
    })
}

impl Etcd {
    /// Connects to the first of `urls` (comma-separated, as etcdctl's
    /// `--endpoints`) that answers.
    pub async fn connect(urls: &str, tls: &SourceTls) -> Result<Self> {
        let mut last = None;
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            match Self::connect_one(url, tls).await {
                Ok(etcd) => return Ok(etcd),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| TransferError::Source("no etcd endpoint given".into())))
    }

    async fn connect_one(url: &str, tls: &SourceTls) -> Result<Self> {
        let with_scheme = if url.contains("://") {
            url.to_string()
        } else if tls.ca.is_some() || tls.cert.is_some() {
            format!("https://{url}")
        } else {
            format!("http://{url}")
        };
        let mut endpoint = Endpoint::from_shared(with_scheme.clone())
            .map_err(|e| source_error(url, "not an endpoint URL", e))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_keepalive(Some(Duration::from_secs(30)));
        if with_scheme.starts_with("https://") || tls.ca.is_some() || tls.cert.is_some() {
            let mut config = ClientTlsConfig::new();
            if let Some(ca) = &tls.ca {
                config = config.ca_certificate(Certificate::from_pem(read(ca, "CA file")?));
            }
            match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => {
                    config = config.identity(Identity::from_pem(
                        read(cert, "certificate")?,
                        read(key, "key")?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(TransferError::Source("--cert and --key go together".into()));
                }
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| source_error(url, "TLS settings", e))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| source_error(url, "cannot connect", e))?;
        Ok(Etcd {
            url: url.to_string(),
            kv: KvClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            lease: LeaseClient::new(channel.clone()),
            watch: WatchClient::new(channel).max_decoding_message_size(MAX_MESSAGE),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The source's current revision and its cluster id.
    pub async fn head(&self) -> Result<(i64, u64)> {
        let answer = self
            .kv
            .clone()
            .range(RangeRequest {
                key: b"\0".to_vec(),
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(|e| source_error(&self.url, "range", e.message()))?
            .into_inner();
        let header = answer
            .header
            .ok_or_else(|| source_error(&self.url, "range", "no header in the answer"))?;
        Ok((header.revision, header.cluster_id))
    }

    /// Up to `limit` keys from `from` on (`\0` for the first) up to `end`,
    /// in key order, as they were at `revision`; and whether more follow.
    /// A page too big for one message (large values) is asked again in
    /// halves.
    pub async fn page(
        &self,
        from: &[u8],
        end: &[u8],
        revision: i64,
        limit: i64,
    ) -> Result<(Vec<KeyValue>, bool)> {
        let mut limit = limit.max(1);
        loop {
            let asked = self
                .kv
                .clone()
                .range(RangeRequest {
                    key: from.to_vec(),
                    range_end: end.to_vec(),
                    revision,
                    limit,
                    ..Default::default()
                })
                .await;
            match asked {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    return Ok((answer.kvs, answer.more));
                }
                Err(status)
                    if limit > 1
                        && matches!(
                            status.code(),
                            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
                        )
                        && status.message().contains("message") =>
                {
                    limit /= 2;
                }
                Err(status) => {
                    return Err(source_error(
                        &self.url,
                        &format!("range at revision {revision}"),
                        status.message(),
                    ));
                }
            }
        }
    }

    /// Every lease with its TTLs.
    pub async fn leases(&self) -> Result<Vec<SourceLease>> {
        let ids = self
            .lease
            .clone()
            .lease_leases(LeaseLeasesRequest {})
            .await
            .map_err(|e| source_error(&self.url, "lease list", e.message()))?
            .into_inner()
            .leases;
        let mut leases = Vec::with_capacity(ids.len());
        for status in ids {
            if let Some(lease) = self.lease(status.id).await? {
                leases.push(lease);
            }
        }
        Ok(leases)
    }

    /// Lease `id`, or None if the source does not have it (any more).
    pub async fn lease(&self, id: i64) -> Result<Option<SourceLease>> {
        let answer = self
            .lease
            .clone()
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false })
            .await
            .map_err(|e| source_error(&self.url, &format!("lease {id:x}"), e.message()))?
            .into_inner();
        // etcd answers an unknown lease with TTL -1 (older versions with
        // NotFound, which is the error above).
        if answer.ttl < 0 && answer.granted_ttl == 0 {
            return Ok(None);
        }
        Ok(Some(SourceLease {
            id,
            granted_ttl: answer.granted_ttl,
            remaining_ttl: answer.ttl,
        }))
    }

    /// A watch of every key from `revision` on; the sender keeps the
    /// request side open.
    pub async fn watch_all(
        &self,
        revision: i64,
    ) -> Result<(mpsc::Sender<WatchRequest>, Streaming<WatchResponse>)> {
        let (requests, outbound) = mpsc::channel(8);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: b"\0".to_vec(),
                range_end: b"\0".to_vec(),
                start_revision: revision,
                ..Default::default()
            })),
        };
        requests
            .send(create)
            .await
            .map_err(|_| source_error(&self.url, "watch", "request stream closed"))?;
        let stream = self
            .watch
            .clone()
            .watch(ReceiverStream::new(outbound))
            .await
            .map_err(|e| source_error(&self.url, "watch", e.message()))?
            .into_inner();
        Ok((requests, stream))
    }
}
