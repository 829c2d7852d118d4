//! Prometheus metrics of one router, served on /metrics (`http.rs`), and
//! what the shipped Grafana dashboard (`dashboards/kubeshard.json`) shows:
//!
//! - per router: gRPC calls by method and code, with latency (`grpc.rs`, a
//!   tower layer), watch streams, watches, events sent and slow watchers;
//! - per shard: write batches (count, size, time), database calls (time and
//!   errors, `shard.rs`, told by the shard itself), and what is sampled
//!   every few seconds (`sampler.rs`): pool connections, database size,
//!   revisions, how far the watch hub trails the shard, live leases.

mod grpc;
mod sampler;
mod shard;

use std::sync::Arc;

use kubeshard_shard_worker::ShardObserver;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tracing::warn;

pub use grpc::GrpcMetricsLayer;
pub use sampler::spawn as spawn_sampler;
use shard::ShardMetrics;

/// Seconds buckets from 0.1 ms to about 15 s.
fn latency_buckets() -> Result<Vec<f64>, prometheus::Error> {
    prometheus::exponential_buckets(0.0001, 2.5, 14)
}

/// All metrics of one router process.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    grpc_requests: IntCounterVec,
    grpc_seconds: HistogramVec,
    pub watch_streams: IntGauge,
    pub watches: IntGauge,
    pub watch_events: IntCounter,
    /// Streams waiting for their client to read (etcd's slow watchers).
    pub slow_watch_streams: IntGauge,
    /// Streams that fell behind a shard's events and re-read them.
    watch_lagged: IntCounterVec,
    pub leases_expired: IntCounter,
    leases: IntGauge,
    /// Ranges and watches carrying selectors (kubeshard's push-down).
    pub selected_requests: IntCounterVec,
    shard_revision: IntGaugeVec,
    shard_compact_revision: IntGaugeVec,
    shard_watch_lag: IntGaugeVec,
    shard_database_size: IntGaugeVec,
    shard_pool_connections: IntGaugeVec,
    shard_pool_waiting: IntGaugeVec,
    shard_pool_max: IntGaugeVec,
    shard_call_seconds: HistogramVec,
    shard_call_errors: IntCounterVec,
    shard_batch_requests: HistogramVec,
    shard_batch_seconds: HistogramVec,
    shard_batch_errors: IntCounterVec,
}

/// What is sampled of one shard (`sampler.rs`); None where unknown.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardSample {
    pub revision: Option<i64>,
    pub compacted: Option<i64>,
    /// The shard's revision minus the highest its watch hub has published.
    pub watch_lag: Option<i64>,
    pub database_bytes: Option<i64>,
    pub connections: Option<kubeshard_shard_worker::Connections>,
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let metric = IntCounter::new(name, help)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let metric = IntGauge::new(name, help)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn counters(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn gauges(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, prometheus::Error> {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn histograms(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
    labels: &[&str],
) -> Result<HistogramVec, prometheus::Error> {
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new_custom(Some("kubeshard".into()), None)?;
        let shard = &["shard"];
        Ok(Metrics {
            grpc_requests: counters(
                &r,
                "grpc_requests_total",
                "gRPC requests by method and status code",
                &["method", "code"],
            )?,
            grpc_seconds: histograms(
                &r,
                "grpc_request_duration_seconds",
                "Time to answer a gRPC request (to the first response for streams)",
                latency_buckets()?,
                &["method"],
            )?,
            watch_streams: gauge(&r, "watch_streams", "Open watch streams")?,
            watches: gauge(&r, "watches", "Active watches over all streams")?,
            watch_events: counter(&r, "watch_events_sent_total", "Events sent to watches")?,
            slow_watch_streams: gauge(
                &r,
                "slow_watch_streams",
                "Watch streams waiting for their client to read what was sent",
            )?,
            watch_lagged: counters(
                &r,
                "watch_lagged_total",
                "Times a watch stream fell behind a shard's events and re-read them from the database",
                shard,
            )?,
            leases_expired: counter(&r, "leases_expired_total", "Leases expired by this router")?,
            leases: gauge(&r, "leases", "Live leases (sampled)")?,
            selected_requests: counters(
                &r,
                "selected_requests_total",
                "Ranges and watches with label or field selectors, by kind",
                &["kind"],
            )?,
            shard_revision: gauges(
                &r,
                "shard_revision",
                "Revision counter of the shard (sampled)",
                shard,
            )?,
            shard_compact_revision: gauges(
                &r,
                "shard_compact_revision",
                "Compaction revision of the shard (sampled)",
                shard,
            )?,
            shard_watch_lag: gauges(
                &r,
                "shard_watch_lag_revisions",
                "Shard's revision minus the highest revision its watch stream has published on this router (sampled)",
                shard,
            )?,
            shard_database_size: gauges(
                &r,
                "shard_database_size_bytes",
                "Size of the shard's database (sampled)",
                shard,
            )?,
            shard_pool_connections: gauges(
                &r,
                "shard_pool_connections",
                "Open connections of the shard's pools, by state: in_use or idle (sampled)",
                &["shard", "state"],
            )?,
            shard_pool_waiting: gauges(
                &r,
                "shard_pool_waiting",
                "Calls waiting for a connection of the shard's pools (sampled)",
                shard,
            )?,
            shard_pool_max: gauges(
                &r,
                "shard_pool_max_connections",
                "Connections the shard's pools may open",
                shard,
            )?,
            shard_call_seconds: histograms(
                &r,
                "shard_db_call_duration_seconds",
                "Time of the shard's database calls, by call (a call is one or a few statements)",
                latency_buckets()?,
                &["shard", "call"],
            )?,
            shard_call_errors: counters(
                &r,
                "shard_db_call_errors_total",
                "Failed database calls of the shard, by call",
                &["shard", "call"],
            )?,
            shard_batch_requests: histograms(
                &r,
                "shard_write_batch_requests",
                "Writes per write batch (one database transaction) of the shard",
                prometheus::exponential_buckets(1.0, 2.0, 11)?,
                shard,
            )?,
            shard_batch_seconds: histograms(
                &r,
                "shard_write_batch_duration_seconds",
                "Time to commit a write batch of the shard and publish its events",
                latency_buckets()?,
                shard,
            )?,
            shard_batch_errors: counters(
                &r,
                "shard_write_batch_errors_total",
                "Write batches of the shard that failed",
                shard,
            )?,
            registry: r,
        })
        .inspect(|m: &Metrics| {
            // Both kinds exist from the start, so their rates do too.
            for kind in ["range", "watch"] {
                m.selected_requests.with_label_values(&[kind]);
            }
        })
    }

    /// What shard `shard` tells of its work; also starts its counters at
    /// zero, so that rates over them exist before the first error.
    pub fn shard_observer(&self, shard: &str) -> Arc<dyn ShardObserver> {
        self.watch_lagged.with_label_values(&[shard]);
        Arc::new(ShardMetrics::new(self, shard))
    }

    /// Records a sample of shard `shard`.
    pub fn set_shard_sample(&self, shard: &str, sample: &ShardSample) {
        let set = |family: &IntGaugeVec, value: Option<i64>| {
            if let Some(value) = value {
                family.with_label_values(&[shard]).set(value);
            }
        };
        set(&self.shard_revision, sample.revision);
        set(&self.shard_compact_revision, sample.compacted);
        set(&self.shard_watch_lag, sample.watch_lag);
        set(&self.shard_database_size, sample.database_bytes);
        if let Some(c) = sample.connections {
            let pool = &self.shard_pool_connections;
            pool.with_label_values(&[shard, "in_use"])
                .set(i64::from(c.in_use()));
            pool.with_label_values(&[shard, "idle"])
                .set(i64::from(c.idle));
            set(&self.shard_pool_waiting, Some(i64::from(c.waiting)));
            set(&self.shard_pool_max, Some(i64::from(c.max)));
        }
    }

    /// Live leases, as last counted.
    pub fn set_leases(&self, live: usize) {
        self.leases.set(i64::try_from(live).unwrap_or(i64::MAX));
    }

    /// A watch stream fell behind shard `shard`'s events.
    pub fn watch_lagged(&self, shard: &str) {
        self.watch_lagged.with_label_values(&[shard]).inc();
    }

    /// `record` for a request path (tests use it; the layer labels first).
    #[cfg(test)]
    fn observe(&self, path: &str, code: &str, seconds: f64) {
        self.record(grpc::method_label(path), code, seconds);
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
fn full_sample() -> ShardSample {
    ShardSample {
        revision: Some(10),
        compacted: Some(4),
        watch_lag: Some(2),
        database_bytes: Some(4096),
        connections: Some(kubeshard_shard_worker::Connections {
            open: 5,
            idle: 3,
            waiting: 1,
            max: 11,
        }),
    }
}

#[cfg(test)]
mod shard_tests {
    use super::*;

    /// A shard's observer and samples land in series labelled with the
    /// shard; errors start at zero.
    #[test]
    fn shard_work_and_samples_are_exported_by_shard() {
        let Ok(m) = Metrics::new() else {
            panic!("metrics not created");
        };
        let pods = m.shard_observer("pods");
        pods.database_call("range", 0.002, true);
        pods.database_call("range", 0.002, false);
        pods.database_call("not a listed call", 0.002, false);
        pods.write_batch(5, 0.01, true);
        pods.write_batch(1, 0.01, false);
        m.set_shard_sample("pods", &full_sample());
        m.watch_lagged("pods");
        let text = String::from_utf8(m.render()).unwrap_or_default();
        for line in [
            "kubeshard_shard_db_call_duration_seconds_count{call=\"range\",shard=\"pods\"} 2",
            "kubeshard_shard_db_call_errors_total{call=\"range\",shard=\"pods\"} 1",
            "kubeshard_shard_db_call_errors_total{call=\"commit_batch\",shard=\"pods\"} 0",
            "kubeshard_shard_write_batch_requests_sum{shard=\"pods\"} 6",
            "kubeshard_shard_write_batch_requests_count{shard=\"pods\"} 2",
            "kubeshard_shard_write_batch_errors_total{shard=\"pods\"} 1",
            "kubeshard_shard_pool_connections{shard=\"pods\",state=\"in_use\"} 2",
            "kubeshard_shard_pool_connections{shard=\"pods\",state=\"idle\"} 3",
            "kubeshard_shard_pool_waiting{shard=\"pods\"} 1",
            "kubeshard_shard_pool_max_connections{shard=\"pods\"} 11",
            "kubeshard_shard_database_size_bytes{shard=\"pods\"} 4096",
            "kubeshard_shard_watch_lag_revisions{shard=\"pods\"} 2",
            "kubeshard_shard_revision{shard=\"pods\"} 10",
            "kubeshard_shard_compact_revision{shard=\"pods\"} 4",
            "kubeshard_watch_lagged_total{shard=\"pods\"} 1",
            "kubeshard_selected_requests_total{kind=\"watch\"} 0",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // A call never made has no latency series.
        assert!(!text.contains("kubeshard_shard_db_call_duration_seconds_count{call=\"lock\""));
        assert!(!text.contains("not a listed call"));
    }
}

#[cfg(test)]
mod dashboard_tests {
    use super::*;

    /// The shipped dashboard must not query a metric this code does not export.
    #[test]
    fn dashboard_uses_only_exported_metrics() {
        let dashboard = include_str!("../../../dashboards/kubeshard.json");
        let Ok(m) = Metrics::new() else {
            panic!("metrics not created");
        };
        m.observe("/etcdserverpb.KV/Range", "0", 0.001);
        let shard = m.shard_observer("default");
        shard.database_call("range", 0.001, true);
        shard.write_batch(3, 0.002, true);
        m.set_shard_sample("default", &full_sample());
        m.set_leases(1);
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
        assert!(
            checked >= 30,
            "dashboard queries too few metrics: {checked}"
        );
    }
}
