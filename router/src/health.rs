//! etcd's health endpoints, served beside /metrics: `/health` (etcd's JSON
//! answer), `/livez` and `/readyz` (etcd's check lists, with
//! `/livez/<check>`, `?exclude=<check>` and `?verbose`), for Kubernetes
//! probes and for load balancers in front of several routers.
//!
//! - live: every shard's writer and watch poller run. A database that does
//!   not answer is not a reason to restart the router; a dead writer is.
//! - ready: live, not stopping, and every shard's database answers a read.
//!   A router given SIGTERM stops accepting at once (as etcd does); its
//!   readiness turns false for whatever probes it until it is gone.
//! - /health: not stopping and every shard's database answers, with etcd's
//!   `RANGE ERROR:` reason naming the shard.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode, header};
use kubeshard_config::ShardId;

use crate::error::EtcdError;
use crate::server::Core;
use crate::shards::Shards;

/// How long a database may take to answer a health read. etcd's is its
/// request timeout (7 s by default).
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Live,
    Ready,
}

#[derive(Debug, Clone, Copy)]
enum Check {
    ShardsRunning,
    Serving,
    Database(ShardId),
}

/// Answers the health paths; `None` for any other path.
#[derive(Debug)]
pub struct Health {
    core: Arc<Core>,
}

impl Health {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    pub async fn answer(
        &self,
        method: &Method,
        path: &str,
        query: &str,
    ) -> Option<Response<Full<Bytes>>> {
        let (probe, only) = match path {
            "/health" => {
                return Some(match method {
                    &Method::GET => self.etcd_health().await,
                    _ => method_not_allowed(),
                });
            }
            "/livez" => (Probe::Live, None),
            "/readyz" => (Probe::Ready, None),
            _ => match path.split_once('/').and_then(|(_, p)| p.split_once('/')) {
                Some(("livez", name)) => (Probe::Live, Some(name)),
                Some(("readyz", name)) => (Probe::Ready, Some(name)),
                _ => return None,
            },
        };
        let shards = self.core.views.current();
        let mut checks = self.checks(probe, &shards);
        match only {
            Some(name) => checks.retain(|c| self.name(*c, &shards) == name),
            None => {
                let excluded: Vec<&str> = params(query, "exclude").collect();
                checks.retain(|c| !excluded.contains(&self.name(*c, &shards).as_str()));
            }
        }
        if only.is_some() && checks.is_empty() {
            return None;
        }
        if method != Method::GET {
            return Some(method_not_allowed());
        }
        let verbose = query
            .split('&')
            .any(|p| p.split('=').next() == Some("verbose"));
        Some(self.run(&checks, verbose, &shards).await)
    }

    fn checks(&self, probe: Probe, shards: &Shards) -> Vec<Check> {
        let mut checks = vec![Check::ShardsRunning];
        if probe == Probe::Ready {
            checks.push(Check::Serving);
            checks.extend(shards.ids().into_iter().map(Check::Database));
        }
        checks
    }

    fn name(&self, check: Check, shards: &Shards) -> String {
        match check {
            Check::ShardsRunning => "shards_running".into(),
            Check::Serving => "serving".into(),
            Check::Database(id) => format!("database_{}", shards.get(id).name),
        }
    }

    async fn check(&self, check: Check, shards: &Shards) -> Result<(), String> {
        match check {
            Check::ShardsRunning => {
                let stopped: Vec<&str> = shards
                    .all()
                    .filter(|(_, s)| !s.is_running())
                    .map(|(_, s)| s.name.as_str())
                    .collect();
                if stopped.is_empty() {
                    Ok(())
                } else {
                    Err(format!("shard workers stopped: {}", stopped.join(", ")))
                }
            }
            Check::Serving if self.core.stop.is_stopped() => {
                Err(EtcdError::Stopped.message().to_string())
            }
            Check::Serving => Ok(()),
            Check::Database(id) => read(shards, id).await,
        }
    }

    /// etcd's check list: one `[+]name ok` or `[-]name failed: why` line
    /// per check; the lines are sent on failure, or with `?verbose`.
    async fn run(&self, checks: &[Check], verbose: bool, shards: &Shards) -> Response<Full<Bytes>> {
        let results = join_all(checks.iter().map(|c| self.check(*c, shards))).await;
        let mut lines = String::new();
        let mut failed = false;
        for (check, result) in checks.iter().zip(results) {
            match result {
                Ok(()) => lines.push_str(&format!("[+]{} ok\n", self.name(*check, shards))),
                Err(why) => {
                    failed = true;
                    lines.push_str(&format!("[-]{} failed: {why}\n", self.name(*check, shards)));
                }
            }
        }
        if failed {
            tracing::warn!(reason = %lines.trim_end(), "health check failed");
            return text(StatusCode::SERVICE_UNAVAILABLE, lines + "\n");
        }
        if !verbose {
            lines.clear();
        }
        text(StatusCode::OK, lines + "ok\n")
    }

    /// etcd's `/health`: `{"health":"true","reason":""}`, or 503 with the
    /// first failure as the reason.
    async fn etcd_health(&self) -> Response<Full<Bytes>> {
        let reason = if self.core.stop.is_stopped() {
            Some(format!("RANGE ERROR:{}", EtcdError::Stopped.message()))
        } else {
            let shards = self.core.views.current();
            let ids = shards.ids();
            let reads = join_all(ids.iter().map(|id| read(&shards, *id))).await;
            reads
                .into_iter()
                .find_map(Result::err)
                .map(|e| format!("RANGE ERROR:{e}"))
        };
        let body = serde_json::json!({
            "health": if reason.is_none() { "true" } else { "false" },
            "reason": reason.as_deref().unwrap_or(""),
        })
        .to_string();
        match reason {
            // etcd writes the JSON as it is on success, and through
            // http.Error (which adds a newline) on failure.
            None => text(StatusCode::OK, body),
            Some(reason) => {
                tracing::warn!(%reason, "serving /health false");
                text(StatusCode::SERVICE_UNAVAILABLE, body + "\n")
            }
        }
    }
}

/// A read of the shard's revision counter, as a Range would start with.
async fn read(shards: &Shards, id: ShardId) -> Result<(), String> {
    let shard = shards.get(id);
    match tokio::time::timeout(READ_TIMEOUT, shard.store.revisions()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("shard {}: {e}", shard.name)),
        Err(_) => Err(format!(
            "shard {}: no answer within {READ_TIMEOUT:?}",
            shard.name
        )),
    }
}

/// The values of `name` in a query string (`exclude=a&exclude=b`).
fn params<'a>(query: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    query
        .split('&')
        .filter_map(move |p| p.split_once('=').filter(|(k, _)| *k == name))
        .map(|(_, v)| v)
}

/// Go's http.Error and etcd's handlers: plain text, not to be sniffed.
fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    response
}

fn method_not_allowed() -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed\n".into(),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        let q = "exclude=a&verbose&exclude=database_b&x=1";
        assert_eq!(
            params(q, "exclude").collect::<Vec<_>>(),
            ["a", "database_b"]
        );
        assert_eq!(params(q, "y").count(), 0);
    }
}
