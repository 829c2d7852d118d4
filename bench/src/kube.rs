//! The Kubernetes custom-resource workload (`shared/bench/README.md`),
//! driven over kube-apiserver's HTTPS API instead of k6.
//!
//! Each virtual user loops until the deadline: create one object of every
//! kind in the payload file in parallel (POST, expect 201), then list every
//! kind with `labelSelector=name=<name>` in parallel (expect 200 and exactly
//! the object just created). Every HTTP request is one sample; a request
//! fails on a wrong status, a transport error, or a list that does not hold
//! exactly the created object (the public runs checked status codes only).
//!
//! For runs at scale, `--report-every` prints one JSON line per interval
//! (requests, failures, percentiles, objects created so far, memory of
//! kube-apiserver and of the storage now), and `--max-objects` ends the run
//! once that many objects exist.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;
use tokio::task::JoinSet;

use crate::report::{peak_rss_mib, percentile_ms, pids_named, pss_mib};

#[derive(Debug, Args)]
pub struct KubeArgs {
    /// kube-apiserver's URL, e.g. https://127.0.0.1:6443.
    #[arg(long)]
    api_server: String,
    /// Client certificate (PEM) of the user the workload runs as; RBAC must
    /// let it create and list the kinds.
    #[arg(long)]
    cert: PathBuf,
    /// The certificate's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The object bodies, one per plural resource name
    /// (`shared/bench/payloads.json`).
    #[arg(long)]
    payloads: PathBuf,
    /// Concurrent virtual users, each with its own connection.
    #[arg(long, default_value_t = 20)]
    vus: usize,
    /// kube-apiserver's process id: its peak RSS is reported.
    #[arg(long)]
    apiserver_pid: Option<u32>,
    /// Print a JSON line of the last interval every this many seconds
    /// (0: only the summary at the end).
    #[arg(long, default_value_t = 0)]
    report_every: u64,
    /// End the run once this many objects were created (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_objects: u64,
    /// Count every PostgreSQL process into the storage's memory in the
    /// interval reports.
    #[arg(long)]
    storage_postgres: bool,
}

/// What the virtual users share: the samples of the current interval and
/// the objects created so far.
#[derive(Debug, Default)]
struct Shared {
    interval: Mutex<Samples>,
    created: AtomicU64,
    max_objects: u64,
}

impl Shared {
    fn record(&self, took: Duration, outcome: &Result<(), String>) {
        if let Ok(mut interval) = self.interval.lock() {
            interval.record(took, outcome.clone());
        }
    }

    fn full(&self) -> bool {
        self.max_objects > 0 && self.created.load(Ordering::Relaxed) >= self.max_objects
    }
}

/// One custom resource kind: where to POST and LIST it, and its body.
#[derive(Debug, Clone)]
struct Kind {
    plural: String,
    collection_url: String,
    body: Value,
}

/// Reads the payload file: `{ "<plural>": { "apiVersion": "g/v", ... } }`.
fn kinds(api_server: &str, text: &str) -> anyhow::Result<Vec<Kind>> {
    let Value::Object(map) = serde_json::from_str(text).context("payloads are not JSON")? else {
        bail!("payloads must be a JSON object keyed by plural resource name");
    };
    let mut kinds = Vec::new();
    for (plural, body) in map {
        let api_version = body
            .get("apiVersion")
            .and_then(Value::as_str)
            .with_context(|| format!("payload {plural} has no apiVersion"))?;
        if !api_version.contains('/') {
            bail!("payload {plural}: apiVersion {api_version} is not group/version");
        }
        kinds.push(Kind {
            collection_url: format!(
                "{}/apis/{api_version}/{plural}",
                api_server.trim_end_matches('/')
            ),
            plural,
            body,
        });
    }
    if kinds.is_empty() {
        bail!("payloads name no kind");
    }
    Ok(kinds)
}

/// The object of `kind` named `name`, labelled as the public workload does.
fn object(kind: &Kind, name: &str, created_ms: u128) -> Value {
    let mut body = kind.body.clone();
    if let Some(obj) = body.as_object_mut() {
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(meta) = meta.as_object_mut() {
            meta.insert("name".into(), Value::String(name.into()));
            meta.insert(
                "labels".into(),
                serde_json::json!({
                    "name": name,
                    "created": created_ms.to_string(),
                    "created-by": "bench",
                }),
            );
        }
    }
    body
}

/// Every request's latency and whether it failed.
#[derive(Debug, Default)]
struct Samples {
    latencies_us: Vec<u32>,
    failed: u64,
    first_failure: Option<String>,
}

impl Samples {
    fn record(&mut self, took: Duration, outcome: Result<(), String>) {
        self.latencies_us
            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        if let Err(e) = outcome {
            self.failed += 1;
            if self.first_failure.is_none() {
                self.first_failure = Some(e);
            }
        }
    }

    fn absorb(&mut self, other: Samples) {
        self.latencies_us.extend(other.latencies_us);
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }
}

async fn create(client: &reqwest::Client, kind: &Kind, body: &Value) -> Result<(), String> {
    let response = client
        .post(&kind.collection_url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("POST {}: {e}", kind.plural))?;
    let status = response.status();
    if status.as_u16() != 201 {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("POST {}: status {status}: {text}", kind.plural));
    }
    // Read the body so the connection is reusable at once.
    response
        .bytes()
        .await
        .map(|_| ())
        .map_err(|e| format!("POST {}: reading the answer: {e}", kind.plural))
}

async fn list(client: &reqwest::Client, kind: &Kind, name: &str) -> Result<(), String> {
    let response = client
        .get(&kind.collection_url)
        .query(&[("labelSelector", format!("name={name}"))])
        .send()
        .await
        .map_err(|e| format!("LIST {}: {e}", kind.plural))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| format!("LIST {}: reading the answer: {e}", kind.plural))?;
    if status.as_u16() != 200 {
        return Err(format!(
            "LIST {}: status {status}: {}",
            kind.plural,
            String::from_utf8_lossy(&bytes)
        ));
    }
    let list: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("LIST {}: not JSON: {e}", kind.plural))?;
    let names: Vec<&str> = list
        .get("items")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.pointer("/metadata/name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    if names != [name] {
        return Err(format!(
            "LIST {} name={name}: expected exactly that object, got {names:?}",
            kind.plural
        ));
    }
    Ok(())
}

/// One virtual user's loop.
async fn virtual_user(
    vu: usize,
    client: reqwest::Client,
    kinds: Arc<Vec<Kind>>,
    deadline: Instant,
    shared: Arc<Shared>,
) -> Samples {
    let mut samples = Samples::default();
    let mut iteration = 0u64;
    while Instant::now() < deadline && !shared.full() {
        let created_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let name = format!("kb-{vu}-{iteration}-{:x}", created_ms % 0xffff_ffff);
        iteration += 1;
        let creates = kinds.iter().map(|kind| {
            let body = object(kind, &name, created_ms);
            let client = &client;
            async move {
                let start = Instant::now();
                let outcome = create(client, kind, &body).await;
                (start.elapsed(), outcome)
            }
        });
        for (took, outcome) in futures::future::join_all(creates).await {
            if outcome.is_ok() {
                shared.created.fetch_add(1, Ordering::Relaxed);
            }
            shared.record(took, &outcome);
            samples.record(took, outcome);
        }
        let lists = kinds.iter().map(|kind| {
            let client = &client;
            let name = &name;
            async move {
                let start = Instant::now();
                let outcome = list(client, kind, name).await;
                (start.elapsed(), outcome)
            }
        });
        for (took, outcome) in futures::future::join_all(lists).await {
            shared.record(took, &outcome);
            samples.record(took, outcome);
        }
    }
    samples
}

/// Prints one JSON line per `every`: the interval's requests, failures,
/// rate and percentiles, the objects created so far, and the memory
/// (proportional set size) of kube-apiserver and of the storage now.
async fn report_intervals(
    shared: Arc<Shared>,
    every: Duration,
    apiserver_pid: Option<u32>,
    storage_pid: Option<u32>,
    storage_postgres: bool,
    started: Instant,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut last = Instant::now();
    for interval in 1.. {
        ticks.tick().await;
        let now = Instant::now();
        let samples = match shared.interval.lock() {
            Ok(mut s) => std::mem::take(&mut *s),
            Err(_) => return,
        };
        let secs = now.duration_since(last).as_secs_f64().max(1e-9);
        last = now;
        let mut sorted = samples.latencies_us;
        sorted.sort_unstable();
        let p = |q| percentile_ms(&sorted, q);
        let mib = |pids: &[u32]| -> u64 { pids.iter().filter_map(|p| pss_mib(*p)).sum() };
        let mut storage: Vec<u32> = storage_pid.into_iter().collect();
        if storage_postgres {
            storage.extend(pids_named("postgres"));
        }
        let apiserver = apiserver_pid.map_or(0, |p| mib(&[p]));
        println!(
            "{{\"interval\":{interval},\"elapsed_s\":{:.0},\"objects\":{},\"requests\":{},\"failed\":{},\"per_second\":{:.1},\"p50_ms\":{:.2},\"p90_ms\":{:.2},\"p95_ms\":{:.2},\"p99_ms\":{:.2},\"apiserver_mib\":{apiserver},\"storage_mib\":{}}}",
            now.duration_since(started).as_secs_f64(),
            shared.created.load(Ordering::Relaxed),
            sorted.len(),
            samples.failed,
            sorted.len() as f64 / secs,
            p(0.5),
            p(0.9),
            p(0.95),
            p(0.99),
            mib(&storage),
        );
    }
}

/// The public score: `floor(requests / (0.2*p50 + 0.3*p90 + 0.5*p95) *
/// (1 - failed/requests)^2)`, latencies in milliseconds.
fn score(requests: u64, failed: u64, p50: f64, p90: f64, p95: f64) -> u64 {
    let weighted = 0.2 * p50 + 0.3 * p90 + 0.5 * p95;
    if requests == 0 || weighted <= 0.0 {
        return 0;
    }
    let ok_share = 1.0 - failed as f64 / requests as f64;
    (requests as f64 / weighted * ok_share * ok_share).floor() as u64
}

pub async fn run(
    args: &KubeArgs,
    seconds: u64,
    storage_pid: Option<u32>,
    json: bool,
) -> anyhow::Result<()> {
    if args.vus == 0 {
        bail!("--vus must be at least 1");
    }
    let payloads = std::fs::read_to_string(&args.payloads)
        .with_context(|| format!("cannot read {}", args.payloads.display()))?;
    let kinds = Arc::new(kinds(&args.api_server, &payloads)?);
    let mut pem = std::fs::read(&args.cert)
        .with_context(|| format!("cannot read {}", args.cert.display()))?;
    pem.extend(
        std::fs::read(&args.key).with_context(|| format!("cannot read {}", args.key.display()))?,
    );
    let identity = reqwest::Identity::from_pem(&pem).context("client certificate or key")?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let shared = Arc::new(Shared {
        max_objects: args.max_objects,
        ..Default::default()
    });
    let reporter = (args.report_every > 0).then(|| {
        tokio::spawn(report_intervals(
            shared.clone(),
            Duration::from_secs(args.report_every),
            args.apiserver_pid,
            storage_pid,
            args.storage_postgres,
            started,
        ))
    });
    let mut users = JoinSet::new();
    for vu in 0..args.vus {
        // kube-apiserver serves a self-signed certificate of its own
        // making, so the workload does not verify it (as kubectl with
        // insecure-skip-tls-verify); the client certificate still
        // authenticates the user RBAC checks.
        let client = reqwest::Client::builder()
            .identity(identity.clone())
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| anyhow::anyhow!("HTTP client: {e:?}"))?;
        users.spawn(virtual_user(
            vu,
            client,
            kinds.clone(),
            deadline,
            shared.clone(),
        ));
    }
    let mut samples = Samples::default();
    while let Some(done) = users.join_next().await {
        samples.absorb(done.context("a virtual user panicked")?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    let objects = shared.created.load(Ordering::Relaxed);
    let mut sorted = samples.latencies_us.clone();
    sorted.sort_unstable();
    let requests = sorted.len() as u64;
    let (p50, p90, p95, p99) = (
        percentile_ms(&sorted, 0.5),
        percentile_ms(&sorted, 0.9),
        percentile_ms(&sorted, 0.95),
        percentile_ms(&sorted, 0.99),
    );
    let per_second = if elapsed > 0.0 {
        requests as f64 / elapsed
    } else {
        0.0
    };
    let score = score(requests, samples.failed, p50, p90, p95);
    let rss = |pid: Option<u32>| {
        pid.and_then(peak_rss_mib)
            .map_or("null".to_string(), |r| r.to_string())
    };
    let (apiserver_rss, storage_rss) = (rss(args.apiserver_pid), rss(storage_pid));
    if json {
        println!(
            "{{\"workload\":\"kube-crs\",\"vus\":{},\"seconds\":{seconds},\"elapsed_s\":{elapsed:.1},\"objects\":{objects},\"requests\":{requests},\"failed\":{},\"per_second\":{per_second:.1},\"p50_ms\":{p50:.2},\"p90_ms\":{p90:.2},\"p95_ms\":{p95:.2},\"p99_ms\":{p99:.2},\"score\":{score},\"apiserver_peak_rss_mib\":{apiserver_rss},\"server_peak_rss_mib\":{storage_rss}}}",
            args.vus, samples.failed
        );
    } else {
        println!(
            "kube-crs  {} VUs  requests {requests}  failed {}  {per_second:.1}/s  p50 {p50:.2} ms  p90 {p90:.2} ms  p95 {p95:.2} ms  p99 {p99:.2} ms  score {score}  kube-apiserver peak RSS {apiserver_rss} MiB  storage peak RSS {storage_rss} MiB",
            args.vus, samples.failed
        );
    }
    if let Some(e) = &samples.first_failure {
        eprintln!("first failure: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_follows_the_public_formula() {
        // 1000 requests, weighted latency 0.2*10 + 0.3*20 + 0.5*40 = 28 ms.
        assert_eq!(score(1000, 0, 10.0, 20.0, 40.0), 35);
        // 10% failed: (0.9)^2 = 0.81 of it.
        assert_eq!(score(1000, 100, 10.0, 20.0, 40.0), 28);
        assert_eq!(score(0, 0, 1.0, 1.0, 1.0), 0);
    }

    #[test]
    fn payloads_become_named_labelled_objects() {
        let text = r#"{"networks": {"apiVersion": "compute.example.io/v1beta1",
            "kind": "Network", "metadata": {"name": "NAME"}, "spec": {"a": 1}}}"#;
        let parsed = kinds("https://127.0.0.1:6443/", text).unwrap_or_default();
        assert_eq!(parsed.len(), 1);
        assert_eq!(
            parsed[0].collection_url,
            "https://127.0.0.1:6443/apis/compute.example.io/v1beta1/networks"
        );
        let obj = object(&parsed[0], "kb-1-2-ab", 1234);
        assert_eq!(obj["metadata"]["name"], "kb-1-2-ab");
        assert_eq!(obj["metadata"]["labels"]["name"], "kb-1-2-ab");
        assert_eq!(obj["metadata"]["labels"]["created"], "1234");
        assert_eq!(obj["metadata"]["labels"]["created-by"], "bench");
        assert_eq!(obj["spec"]["a"], 1);
        assert!(kinds("x", r#"{"a": {"apiVersion": "v1"}}"#).is_err());
        assert!(kinds("x", "[]").is_err());
    }
}
