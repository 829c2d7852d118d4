//! Watches every database call of a shard: a decorator around any
//! [`ShardStore`], so every backend and every read and write path is seen
//! the same way. It times each call for the shard's [`ShardObserver`] (the
//! router's metrics) and logs the calls that take long
//! (`--slow-sql-threshold` and `--slow-sql-warning-threshold`, kine's flags)
//! with the shard's name and what the call was.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use kubeshard_config::SlowSql;
use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse};
use tracing::{info, warn};

use super::{
    CommittedBatch, Connections, EventPage, LabelChange, LabelIndexOutcome, LeaseRecord, Revisions,
    ShardStore, WriteRequest,
};
use crate::error::Result;
use crate::keys::KeyRange;
use crate::observe::ShardObserver;

#[derive(Debug)]
pub struct Observed {
    inner: Arc<dyn ShardStore>,
    shard: Arc<str>,
    slow: SlowSql,
    observer: Option<Arc<dyn ShardObserver>>,
}

impl Observed {
    /// `store` itself when there is nothing to observe for (no observer and
    /// slow calls not logged).
    pub fn wrap(
        store: Arc<dyn ShardStore>,
        shard: &str,
        slow: SlowSql,
        observer: Option<Arc<dyn ShardObserver>>,
    ) -> Arc<dyn ShardStore> {
        if slow.info.is_none() && observer.is_none() {
            return store;
        }
        Arc::new(Observed {
            inner: store,
            shard: shard.into(),
            slow,
            observer,
        })
    }

    /// Runs `call`, named `operation` (one of [`crate::observe::DATABASE_CALLS`]).
    async fn timed<T>(
        &self,
        operation: &'static str,
        detail: impl FnOnce() -> String,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = call.await;
        let elapsed = started.elapsed();
        if let Some(observer) = &self.observer {
            observer.database_call(operation, elapsed.as_secs_f64(), result.is_ok());
        }
        if let Some(warning) = self.slow.level(elapsed) {
            let (shard, backend, ok) = (&*self.shard, self.inner.backend(), result.is_ok());
            let detail = detail();
            if warning {
                warn!(shard, backend, operation, %detail, ?elapsed, ok, "slow database call");
            } else {
                info!(shard, backend, operation, %detail, ?elapsed, ok, "slow database call");
            }
        }
        result
    }
}

/// What a batch holds, in a few words (`3 txn, 1 put`).
fn describe_batch(batch: &[WriteRequest]) -> String {
    let mut kinds: Vec<(&str, usize)> = Vec::new();
    for write in batch {
        let kind = match write {
            WriteRequest::Put(_) => "put",
            WriteRequest::DeleteRange(_) => "delete",
            WriteRequest::Txn(_) => "txn",
            WriteRequest::LeaseGrant { .. } => "lease grant",
            WriteRequest::LeaseRevoke { .. } => "lease revoke",
            WriteRequest::LeaseExpire { .. } => "lease expiry",
            WriteRequest::Compact { .. } => "compact",
            _ => "other",
        };
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    kinds
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A key for a log line: text when it is, escaped bytes otherwise, cut short.
fn key(bytes: &[u8]) -> String {
    let text = bytes.escape_ascii().to_string();
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

#[async_trait]
impl ShardStore for Observed {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn connections(&self) -> Option<Connections> {
        self.inner.connections()
    }

    fn serving(&self) -> super::fence::Serving {
        self.inner.serving()
    }

    fn serve(&self, version: i64, class: super::RevisionClass) {
        self.inner.serve(version, class);
    }

    async fn revisions(&self) -> Result<Revisions> {
        self.timed("revisions", String::new, self.inner.revisions())
            .await
    }

    async fn range(&self, request: &RangeRequest) -> Result<RangeResponse> {
        let detail = || {
            format!(
                "key={} range_end={} revision={} limit={}",
                key(&request.key),
                key(&request.range_end),
                request.revision,
                request.limit
            )
        };
        self.timed("range", detail, self.inner.range(request)).await
    }

    async fn commit_batch(
        &self,
        batch: &[WriteRequest],
        collect_events: bool,
    ) -> Result<CommittedBatch> {
        let call = self.inner.commit_batch(batch, collect_events);
        self.timed("commit_batch", || describe_batch(batch), call)
            .await
    }

    async fn poll_events(&self, after: i64, max_events: usize) -> Result<EventPage> {
        let detail = || format!("after={after} max={max_events}");
        self.timed(
            "poll_events",
            detail,
            self.inner.poll_events(after, max_events),
        )
        .await
    }

    async fn history(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        max_events: usize,
    ) -> Result<EventPage> {
        let detail = || format!("{range:?} from={from} to={to} max={max_events}");
        let call = self.inner.history(range, from, to, max_events);
        self.timed("history", detail, call).await
    }

    async fn index_labels(
        &self,
        from: i64,
        to: i64,
        changes: &[LabelChange],
    ) -> Result<LabelIndexOutcome> {
        let detail = || format!("from={from} to={to} changes={}", changes.len());
        let call = self.inner.index_labels(from, to, changes);
        self.timed("index_labels", detail, call).await
    }

    async fn purge_compacted(&self, upto: i64, batch: i64) -> Result<u64> {
        let detail = || format!("upto={upto} batch={batch}");
        let call = self.inner.purge_compacted(upto, batch);
        self.timed("purge_compacted", detail, call).await
    }

    async fn lease_renew(&self, id: i64, now_ms: i64) -> Result<Option<i64>> {
        let call = self.inner.lease_renew(id, now_ms);
        self.timed("lease_renew", || format!("id={id}"), call).await
    }

    async fn lease_get(&self, id: i64) -> Result<Option<LeaseRecord>> {
        let call = self.inner.lease_get(id);
        self.timed("lease_get", || format!("id={id}"), call).await
    }

    async fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        let call = self.inner.lease_keys(id);
        self.timed("lease_keys", || format!("id={id}"), call).await
    }

    async fn lease_list(&self) -> Result<Vec<i64>> {
        self.timed("lease_list", String::new, self.inner.lease_list())
            .await
    }

    async fn expired_leases(&self, now_ms: i64, limit: i64) -> Result<Vec<i64>> {
        let call = self.inner.expired_leases(now_ms, limit);
        self.timed("expired_leases", || format!("limit={limit}"), call)
            .await
    }

    async fn try_lock(&self, name: &str, owner: &str, now_ms: i64, hold_ms: i64) -> Result<bool> {
        let call = self.inner.try_lock(name, owner, now_ms, hold_ms);
        self.timed("lock", || format!("name={name}"), call).await
    }

    async fn db_size(&self) -> Result<i64> {
        self.timed("size", String::new, self.inner.db_size()).await
    }

    async fn defragment(&self) -> Result<()> {
        self.timed("defragment", String::new, self.inner.defragment())
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;
    use std::time::Duration;

    use kubeshard_config::Endpoint;

    use super::*;
    use crate::store::RevisionClass;

    /// Log lines written by the test's subscriber.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    async fn logged(settings: SlowSql) -> String {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let dir = tempfile::tempdir().unwrap();
        let endpoint = Endpoint::parse(&format!("sqlite://{}/s.db", dir.path().display())).unwrap();
        let store = crate::connect::open_store(&endpoint, RevisionClass::ALL)
            .await
            .unwrap();
        let store = Observed::wrap(store, "pods", settings, None);
        let request = RangeRequest {
            key: b"/registry/pods/".to_vec(),
            range_end: b"/registry/pods0".to_vec(),
            ..Default::default()
        };
        store.range(&request).await.unwrap();
        String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn slow_calls_are_logged_with_the_shard_and_the_call() {
        let every = SlowSql {
            info: Some(Duration::ZERO),
            warn: Duration::from_secs(3600),
        };
        let text = logged(every).await;
        let line = text
            .lines()
            .find(|l| l.contains("slow database call"))
            .unwrap_or_else(|| panic!("no slow-call line in:\n{text}"));
        for part in [
            " INFO ",
            "shard=\"pods\"",
            "backend=\"sqlite\"",
            "operation=\"range\"",
            "key=/registry/pods/ range_end=/registry/pods0",
        ] {
            assert!(line.contains(part), "{part:?} not in {line}");
        }
        let warned = logged(SlowSql {
            info: Some(Duration::ZERO),
            warn: Duration::ZERO,
        })
        .await;
        assert!(warned.contains(" WARN "), "{warned}");
        let quiet = logged(SlowSql::default()).await;
        assert!(!quiet.contains("slow database call"), "{quiet}");
    }

    #[test]
    fn keys_are_escaped_and_cut() {
        assert_eq!(key(b"/registry/pods/a"), "/registry/pods/a");
        assert_eq!(key(b"\xff\x00"), "\\xff\\x00");
        assert_eq!(key(&[b'a'; 300]).len(), 203);
    }
}

#[cfg(test)]
mod observer_tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use kubeshard_config::Endpoint;
    use kubeshard_proto::etcdserverpb::PutRequest;

    use super::*;
    use crate::observe::DATABASE_CALLS;
    use crate::store::RevisionClass;

    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<(&'static str, bool)>>,
    }

    impl ShardObserver for Recorder {
        fn database_call(&self, call: &'static str, seconds: f64, ok: bool) {
            assert!(seconds >= 0.0);
            self.calls.lock().unwrap().push((call, ok));
        }
        fn write_batch(&self, _requests: usize, _seconds: f64, _ok: bool) {}
    }

    /// Every call of the store reaches the observer under a name of
    /// DATABASE_CALLS (the router starts each one's error count at zero),
    /// and every name there is used.
    #[tokio::test(flavor = "current_thread")]
    async fn every_call_is_observed_under_a_listed_name() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = Endpoint::parse(&format!("sqlite://{}/s.db", dir.path().display())).unwrap();
        let store = crate::connect::open_store(&endpoint, RevisionClass::ALL)
            .await
            .unwrap();
        let recorder = Arc::new(Recorder::default());
        let store = Observed::wrap(store, "s", SlowSql::default(), Some(recorder.clone()));
        let put = WriteRequest::Put(PutRequest {
            key: b"a".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        });
        let _ = store.revisions().await;
        let _ = store.range(&RangeRequest::default()).await;
        let _ = store.commit_batch(&[put], true).await;
        let _ = store.poll_events(0, 10).await;
        let _ = store.history(&KeyRange::new(b"a", b"b"), 1, 10, 10).await;
        let _ = store.index_labels(0, 1, &[]).await;
        let _ = store.purge_compacted(0, 10).await;
        let _ = store.lease_renew(1, 0).await;
        let _ = store.lease_get(1).await;
        let _ = store.lease_keys(1).await;
        let _ = store.lease_list().await;
        let _ = store.expired_leases(0, 10).await;
        let _ = store.try_lock("l", "me", 0, 10).await;
        let _ = store.db_size().await;
        let _ = store.defragment().await;
        let calls = recorder.calls.lock().unwrap().clone();
        let seen: BTreeSet<&str> = calls.iter().map(|(name, _)| *name).collect();
        let listed: BTreeSet<&str> = DATABASE_CALLS.iter().copied().collect();
        assert_eq!(seen, listed);
        assert!(
            calls
                .iter()
                .any(|(name, ok)| *name == "commit_batch" && *ok)
        );
    }
}
