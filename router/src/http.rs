//! The HTTP endpoint beside the etcd API (`--metrics-bind-address`):
//! Prometheus' /metrics and etcd's health paths (`health.rs`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::info;

use crate::health::Health;
use crate::metrics::Metrics;

/// A scraper that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds the endpoint; the returned task serves it.
/// With `tls`, HTTPS (no client certificate asked).
pub async fn serve(
    address: &str,
    tls: Option<TlsAcceptor>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(address = %local, scheme, "serving /metrics, /health, /livez and /readyz");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            let health = health.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    let health = health.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &metrics, &health).await) }
                });
                match tls {
                    Some(acceptor) => {
                        let accepted =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                        if let Ok(Ok(stream)) = accepted {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    Ok((local, task))
}

async fn answer<B>(
    request: &Request<B>,
    metrics: &Metrics,
    health: &Health,
) -> Response<Full<Bytes>> {
    let uri = request.uri();
    if uri.path() == "/metrics" {
        return plain(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            Bytes::from(metrics.render()),
        );
    }
    if let Some(response) = health
        .answer(request.method(), uri.path(), uri.query().unwrap_or(""))
        .await
    {
        return response;
    }
    plain(
        StatusCode::NOT_FOUND,
        "text/plain",
        Bytes::from_static(b"kubeshard serves /metrics, /health, /livez and /readyz here\n"),
    )
}

fn plain(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
