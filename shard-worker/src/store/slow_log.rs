//! Logs the shard's database calls that take long (`--slow-sql-threshold`
//! and `--slow-sql-warning-threshold`, kine's flags): a decorator around any
//! [`ShardStore`], so every backend and every read and write path is timed
//! the same way, with the shard's name and what the call was.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use kubeshard_config::SlowSql;
use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse};
use tracing::{info, warn};

use super::{
    CommittedBatch, EventPage, LabelChange, LabelIndexOutcome, LeaseRecord, Revisions, ShardStore,
    WriteRequest,
};
use crate::error::Result;
use crate::keys::KeyRange;

#[derive(Debug)]
pub struct SlowLog {
    inner: Arc<dyn ShardStore>,
    shard: Arc<str>,
    settings: SlowSql,
}

impl SlowLog {
    /// `store` itself when slow calls are not logged (threshold 0).
    pub fn wrap(store: Arc<dyn ShardStore>, shard: &str, settings: SlowSql) -> Arc<dyn ShardStore> {
        if settings.info.is_none() {
            return store;
        }
        Arc::new(SlowLog {
            inner: store,
            shard: shard.into(),
            settings,
        })
    }

    async fn timed<T>(
        &self,
        operation: &'static str,
        detail: impl FnOnce() -> String,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = call.await;
        let elapsed = started.elapsed();
        if let Some(warning) = self.settings.level(elapsed) {
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
impl ShardStore for SlowLog {
    fn backend(&self) -> &'static str {
        self.inner.backend()
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
        self.timed("commit batch", || describe_batch(batch), call)
            .await
    }

    async fn poll_events(&self, after: i64, max_events: usize) -> Result<EventPage> {
        let detail = || format!("after={after} max={max_events}");
        self.timed(
            "poll events",
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
        self.timed("index labels", detail, call).await
    }

    async fn purge_compacted(&self, upto: i64, batch: i64) -> Result<u64> {
        let detail = || format!("upto={upto} batch={batch}");
        let call = self.inner.purge_compacted(upto, batch);
        self.timed("purge compacted", detail, call).await
    }

    async fn lease_renew(&self, id: i64, now_ms: i64) -> Result<Option<i64>> {
        let call = self.inner.lease_renew(id, now_ms);
        self.timed("lease renew", || format!("id={id}"), call).await
    }

    async fn lease_get(&self, id: i64) -> Result<Option<LeaseRecord>> {
        let call = self.inner.lease_get(id);
        self.timed("lease get", || format!("id={id}"), call).await
    }

    async fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        let call = self.inner.lease_keys(id);
        self.timed("lease keys", || format!("id={id}"), call).await
    }

    async fn lease_list(&self) -> Result<Vec<i64>> {
        self.timed("lease list", String::new, self.inner.lease_list())
            .await
    }

    async fn expired_leases(&self, now_ms: i64, limit: i64) -> Result<Vec<i64>> {
        let call = self.inner.expired_leases(now_ms, limit);
        self.timed("expired leases", || format!("limit={limit}"), call)
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
        let store = SlowLog::wrap(store, "pods", settings);
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
