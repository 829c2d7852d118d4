//! TLS for the etcd API and the metrics address (`--server-cert-file`,
//! `--server-key-file`, `--trusted-ca-file`, as kine and etcd name them).
//!
//! The certificate and key are read again when either file changes (its
//! modification time, size or inode), at the next handshake: kubeadm and
//! cert-manager rotate them in place and expect no restart. A pair that
//! does not load (a half-written rotation) keeps the previous one serving.
//! The trusted CAs are read once. With them every client must present a
//! certificate that chains to one (mutual TLS); without them none is asked.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use kubeshard_config::ServerTls;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

/// A client that has not finished its handshake by then is dropped, so
/// that idle connections cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up at start-up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {error}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        error: String,
    },
    #[error("{} has no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("the key {} does not fit the certificate {}: {error}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        error: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The acceptors of one router: the etcd API's (client certificates as
/// configured) and the metrics address's (never asks for one).
#[derive(Clone)]
pub struct Acceptors {
    pub grpc: TlsAcceptor,
    pub http: TlsAcceptor,
}

impl std::fmt::Debug for Acceptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptors").finish_non_exhaustive()
    }
}

impl Acceptors {
    pub fn new(tls: &ServerTls) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = Arc::new(ReloadingCert::load(tls, provider.clone())?);
        let builder = || {
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Config(e.to_string()))
        };
        let grpc = match &tls.trusted_ca_file {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates("trusted CA file", ca)? {
                    roots.add(cert).map_err(|e| TlsError::Read {
                        what: "trusted CA file",
                        path: ca.clone(),
                        error: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| TlsError::Config(e.to_string()))?;
                builder()?.with_client_cert_verifier(verifier)
            }
            None => builder()?.with_no_client_auth(),
        };
        let mut grpc = grpc.with_cert_resolver(resolver.clone());
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        let mut http = builder()?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            grpc: TlsAcceptor::from(Arc::new(grpc)),
            http: TlsAcceptor::from(Arc::new(http)),
        })
    }
}

/// Hands on the accepted connections whose TLS handshake succeeds;
/// handshakes run concurrently, failures are logged and dropped. Ends when
/// the receiving side is dropped.
pub fn incoming<S, A>(
    mut accepted: A,
    acceptor: TlsAcceptor,
) -> ReceiverStream<Result<TlsStream<S>, std::io::Error>>
where
    S: AsyncRead + AsyncWrite + Peer + Unpin + Send + 'static,
    A: Stream<Item = std::io::Result<S>> + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = accepted.next() => accepted,
                _ = tx.closed() => break,
            };
            let stream = match accepted {
                Some(Ok(stream)) => stream,
                Some(Err(e)) => {
                    // Out of file descriptors, usually: wait instead of spinning.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                None => break,
            };
            let peer = stream.peer();
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    // A port probe closes before any handshake: not worth a warning.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        debug!(%peer, "connection closed before its TLS handshake")
                    }
                    Ok(Err(e)) => {
                        warn!(%peer, error = %e, "rejected connection: TLS handshake failed")
                    }
                    Err(_) => {
                        warn!(%peer, "rejected connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Who is on the other end of a connection, for logs.
pub trait Peer {
    fn peer(&self) -> String;
}

impl Peer for TcpStream {
    fn peer(&self) -> String {
        self.peer_addr()
            .map_or_else(|_| "unknown".into(), |a| a.to_string())
    }
}

impl Peer for tokio::net::UnixStream {
    fn peer(&self) -> String {
        "a Unix socket client".into()
    }
}

/// What identifies a version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

#[derive(Debug)]
struct Loaded {
    stamps: (Stamp, Stamp),
    key: Arc<CertifiedKey>,
    /// The stamps of a pair that did not load, not to be tried again.
    refused: Option<(Stamp, Stamp)>,
}

/// The served certificate, read again when its files change.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Loaded>,
}

impl ReloadingCert {
    fn load(tls: &ServerTls, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let stamps = stamps(&tls.cert_file, &tls.key_file)?;
        let key = certified_key(&tls.cert_file, &tls.key_file, &provider)?;
        Ok(Self {
            cert: tls.cert_file.clone(),
            key: tls.key_file.clone(),
            provider,
            current: Mutex::new(Loaded {
                stamps,
                key: Arc::new(key),
                refused: None,
            }),
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A file that cannot be read right now (being replaced) keeps the
        // pair in use.
        if let Ok(stamps) = stamps(&self.cert, &self.key)
            && stamps != current.stamps
            && current.refused.as_ref() != Some(&stamps)
        {
            match certified_key(&self.cert, &self.key, &self.provider) {
                Ok(key) => {
                    info!(cert = %self.cert.display(), "serving the renewed certificate");
                    *current = Loaded {
                        stamps,
                        key: Arc::new(key),
                        refused: None,
                    };
                }
                Err(e) => {
                    warn!(error = %e, "keeping the previous certificate");
                    current.refused = Some(stamps);
                }
            }
        }
        Some(current.key.clone())
    }
}

fn stamps(cert: &Path, key: &Path) -> Result<(Stamp, Stamp), TlsError> {
    let read = |what, path: &Path| {
        stamp(path).map_err(|e| TlsError::Read {
            what,
            path: path.to_path_buf(),
            error: e.to_string(),
        })
    };
    Ok((read("certificate", cert)?, read("key", key)?))
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |error: String| TlsError::Read {
        what,
        path: path.to_path_buf(),
        error,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = certificates("certificate", cert)?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Read {
        what: "key",
        path: key.to_path_buf(),
        error: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|error| TlsError::KeyMismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        error,
    })
}
