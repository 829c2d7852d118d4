//! Prometheus metrics: per-RPC counts and latencies (a tower layer around the
//! gRPC services), watch and lease gauges, shard revisions, served on /metrics (`http.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tracing::warn;

/// The RPCs kubeshard serves; anything else is counted as "other", so a
/// client cannot create new time series at will.
const KNOWN_METHODS: &[&str] = &[
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.KV/Put",
    "/etcdserverpb.KV/DeleteRange",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.KV/Compact",
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseGrant",
    "/etcdserverpb.Lease/LeaseRevoke",
    "/etcdserverpb.Lease/LeaseKeepAlive",
    "/etcdserverpb.Lease/LeaseTimeToLive",
    "/etcdserverpb.Lease/LeaseLeases",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Alarm",
    "/etcdserverpb.Maintenance/Defragment",
    "/etcdserverpb.Cluster/MemberList",
];

/// All metrics of one router process.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    grpc_requests: IntCounterVec,
    grpc_seconds: HistogramVec,
    pub watch_streams: IntGauge,
    pub watches: IntGauge,
    pub watch_events: IntCounter,
    pub leases_expired: IntCounter,
    /// Ranges and watches carrying selectors (kubeshard's push-down).
    pub selected_requests: IntCounterVec,
    shard_revision: IntGaugeVec,
    shard_compact_revision: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("kubeshard".into()), None)?;
        let grpc_requests = IntCounterVec::new(
            Opts::new(
                "grpc_requests_total",
                "gRPC requests by method and status code",
            ),
            &["method", "code"],
        )?;
        let grpc_seconds = HistogramVec::new(
            HistogramOpts::new(
                "grpc_request_duration_seconds",
                "Time to answer a gRPC request (to the first response for streams)",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 2.5, 14)?),
            &["method"],
        )?;
        let watch_streams = IntGauge::new("watch_streams", "Open watch streams")?;
        let watches = IntGauge::new("watches", "Active watches over all streams")?;
        let watch_events = IntCounter::new("watch_events_sent_total", "Events sent to watches")?;
        let leases_expired =
            IntCounter::new("leases_expired_total", "Leases expired by this router")?;
        let selected_requests = IntCounterVec::new(
            Opts::new(
                "selected_requests_total",
                "Ranges and watches with label or field selectors, by kind",
            ),
            &["kind"],
        )?;
        let shard_revision = IntGaugeVec::new(
            Opts::new(
                "shard_revision",
                "Highest revision published by the shard's watch stream",
            ),
            &["shard"],
        )?;
        let shard_compact_revision = IntGaugeVec::new(
            Opts::new("shard_compact_revision", "Compaction revision of the shard"),
            &["shard"],
        )?;
        registry.register(Box::new(grpc_requests.clone()))?;
        registry.register(Box::new(grpc_seconds.clone()))?;
        registry.register(Box::new(watch_streams.clone()))?;
        registry.register(Box::new(watches.clone()))?;
        registry.register(Box::new(watch_events.clone()))?;
        registry.register(Box::new(leases_expired.clone()))?;
        registry.register(Box::new(selected_requests.clone()))?;
        registry.register(Box::new(shard_revision.clone()))?;
        registry.register(Box::new(shard_compact_revision.clone()))?;
        Ok(Metrics {
            registry,
            grpc_requests,
            grpc_seconds,
            watch_streams,
            watches,
            watch_events,
            leases_expired,
            selected_requests,
            shard_revision,
            shard_compact_revision,
        })
    }

    pub fn set_shard_revisions(&self, shard: &str, revision: i64, compacted: i64) {
        self.shard_revision
            .with_label_values(&[shard])
            .set(revision);
        self.shard_compact_revision
            .with_label_values(&[shard])
            .set(compacted);
    }

    /// `record` for a request path (tests use it; the layer labels first).
    #[cfg(test)]
    fn observe(&self, path: &str, code: &str, seconds: f64) {
        self.record(method_label(path), code, seconds);
    }

    fn record(&self, method: &'static str, code: &str, seconds: f64) {
        self.grpc_requests.with_label_values(&[method, code]).inc();
        self.grpc_seconds
            .with_label_values(&[method])
            .observe(seconds);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The label of a request path: a known RPC, or "other".
fn method_label(path: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|m| **m == path)
        .copied()
        .unwrap_or("other")
}

/// Tower layer that counts and times every gRPC call.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    pub metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // A static label: no allocation per request.
        let method = method_label(request.uri().path());
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            // Errors come back "trailers-only", with grpc-status in the
            // headers; a successful call sends it in the trailers.
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0"),
                Err(_) => "transport",
            };
            metrics.record(method, code, start.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_share_one_series() {
        let Ok(m) = Metrics::new() else {
            panic!("metrics not created");
        };
        m.observe("/etcdserverpb.KV/Range", "0", 0.001);
        m.observe("/made.up/Path1", "12", 0.001);
        m.observe("/made.up/Path2", "12", 0.001);
        let text = String::from_utf8(m.render()).unwrap_or_default();
        assert!(text.contains(
            "kubeshard_grpc_requests_total{code=\"0\",method=\"/etcdserverpb.KV/Range\"} 1"
        ));
        assert!(text.contains("kubeshard_grpc_requests_total{code=\"12\",method=\"other\"} 2"));
        assert!(!text.contains("made.up"));
    }
}

#[cfg(test)]
mod dashboard_tests {
    use super::*;

    /// The shipped dashboard must not query a metric this code does not export.
    #[test]
    fn dashboard_uses_only_exported_metrics() {
        let dashboard = include_str!("../../dashboards/kubeshard.json");
        let Ok(m) = Metrics::new() else {
            panic!("metrics not created");
        };
        m.observe("/etcdserverpb.KV/Range", "0", 0.001);
        m.set_shard_revisions("default", 1, 0);
        let exported = String::from_utf8(m.render()).unwrap_or_default();
        let mut checked = 0;
        for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(name) = word.strip_prefix("kubeshard_") {
                let name = format!("kubeshard_{name}");
                assert!(
                    exported.contains(&name),
                    "dashboard queries {name}, which is not exported"
                );
                checked += 1;
            }
        }
        assert!(checked >= 8, "dashboard queries too few metrics: {checked}");
    }
}
