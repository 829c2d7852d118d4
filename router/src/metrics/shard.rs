//! The router's [`ShardObserver`]: a shard's write batches and database
//! calls as Prometheus series labelled with the shard's name. The series are
//! resolved once, so that a call costs two atomic additions, not a lookup.

use std::sync::OnceLock;

use kubeshard_shard_worker::{DATABASE_CALLS, ShardObserver};
use prometheus::{Histogram, HistogramVec, IntCounter};

use super::Metrics;

#[derive(Debug)]
pub(super) struct ShardMetrics {
    batch_requests: Histogram,
    batch_seconds: Histogram,
    batch_errors: IntCounter,
    calls: Vec<Call>,
}

#[derive(Debug)]
struct Call {
    name: &'static str,
    /// Made on the first call: a call never made shows no latency series.
    seconds: OnceLock<Histogram>,
    family: HistogramVec,
    shard: String,
    errors: IntCounter,
}

impl ShardMetrics {
    pub(super) fn new(metrics: &Metrics, shard: &str) -> Self {
        ShardMetrics {
            batch_requests: metrics.shard_batch_requests.with_label_values(&[shard]),
            batch_seconds: metrics.shard_batch_seconds.with_label_values(&[shard]),
            batch_errors: metrics.shard_batch_errors.with_label_values(&[shard]),
            calls: DATABASE_CALLS
                .iter()
                .map(|name| Call {
                    name,
                    seconds: OnceLock::new(),
                    family: metrics.shard_call_seconds.clone(),
                    shard: shard.to_string(),
                    errors: metrics.shard_call_errors.with_label_values(&[shard, name]),
                })
                .collect(),
        }
    }
}

impl ShardObserver for ShardMetrics {
    fn database_call(&self, call: &'static str, seconds: f64, ok: bool) {
        let Some(c) = self.calls.iter().find(|c| c.name == call) else {
            // Not in DATABASE_CALLS: a unit test in shard-worker forbids it.
            return;
        };
        c.seconds
            .get_or_init(|| c.family.with_label_values(&[&c.shard, c.name]))
            .observe(seconds);
        if !ok {
            c.errors.inc();
        }
    }

    fn write_batch(&self, requests: usize, seconds: f64, ok: bool) {
        self.batch_requests.observe(requests as f64);
        self.batch_seconds.observe(seconds);
        if !ok {
            self.batch_errors.inc();
        }
    }
}
