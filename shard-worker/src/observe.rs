//! What a shard reports about its work, for metrics: the router implements
//! [`ShardObserver`] with Prometheus; this crate only calls it, and needs no
//! metrics library.

use std::fmt::Debug;

/// Every database call a shard makes, by the name its observer and its
/// slow-call log give it (see `store/observed.rs`). A fixed list, so the
/// router can start each call's error count at zero.
pub const DATABASE_CALLS: &[&str] = &[
    "revisions",
    "range",
    "commit_batch",
    "poll_events",
    "history",
    "index_labels",
    "purge_compacted",
    "lease_renew",
    "lease_get",
    "lease_keys",
    "lease_list",
    "expired_leases",
    "lock",
    "size",
    "defragment",
];

/// Told about one shard's work as it happens.
pub trait ShardObserver: Send + Sync + Debug + 'static {
    /// A database call (one of [`DATABASE_CALLS`]) ended after `seconds`.
    fn database_call(&self, call: &'static str, seconds: f64, ok: bool);

    /// The writer ended a batch of `requests` writes (one transaction) after
    /// `seconds`, from its start to its events being published.
    fn write_batch(&self, requests: usize, seconds: f64, ok: bool);
}
