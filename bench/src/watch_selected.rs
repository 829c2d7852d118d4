//! Selected watches at scale (kubeshard's selector push-down): `watchers`
//! watches over one prefix on one stream (as kube-apiserver multiplexes its
//! watches), each with its own `app=a<i>` label selector, while writers put
//! Kubernetes-shaped JSON objects labelled with a random one of those
//! values. Every event concerns one watch. Reports event latency and, as
//! throughput, events delivered per second: the figure to compare between
//! 10 and 10,000 watches.
//!
//! It speaks kubeshard's extension of the etcd API (kubeshard_proto's
//! client), which etcd ignores: against etcd every watch gets every event.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use etcd_client::PutOptions;
use kubeshard_proto::etcdserverpb::watch_client::WatchClient;
use kubeshard_proto::etcdserverpb::watch_request::RequestUnion;
use kubeshard_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::report::{ClientResult, Measured};
use crate::workloads::{Run, now_us, unique_suffix};

/// How long the watches may take, after the last write, to deliver the rest.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

pub async fn run(
    run: &Run,
    endpoint: &str,
    watchers: usize,
    value_size: usize,
    prefix: &str,
) -> anyhow::Result<Measured> {
    if watchers == 0 {
        bail!("--watchers must be at least 1");
    }
    let prefix = format!("{prefix}{}/", unique_suffix());
    let mut client = WatchClient::connect(endpoint.to_string())
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))?
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(1024);
    let mut stream = client
        .watch(ReceiverStream::new(rx))
        .await
        .context("open a watch stream")?
        .into_inner();
    let mut range_end = prefix.clone().into_bytes();
    if let Some(last) = range_end.last_mut() {
        *last += 1;
    }
    // Create every watch, then wait until all are created.
    let create_started = Instant::now();
    let sender = tokio::spawn({
        let (prefix, range_end, tx) = (prefix.clone(), range_end.clone(), tx.clone());
        async move {
            for i in 0..watchers {
                let create = WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                        key: prefix.clone().into_bytes(),
                        range_end: range_end.clone(),
                        watch_id: i as i64 + 1,
                        label_selector: format!("app=a{i}"),
                        ..Default::default()
                    })),
                };
                if tx.send(create).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut created = 0;
    while created < watchers {
        let r = tokio::time::timeout(Duration::from_secs(120), stream.message())
            .await
            .context("watch creation timed out")?
            .context("watch stream")?
            .context("watch stream ended")?;
        if r.canceled {
            bail!("watch {} refused: {}", r.watch_id, r.cancel_reason);
        }
        created += usize::from(r.created);
    }
    sender.await.context("watch creation task")?;
    let created_in = create_started.elapsed();

    // The stream is read all along (a reader that waited for the writers
    // would hold the server back and measure its own delay), until every
    // watch has its events: `expected` is known once the writers are done.
    let (expected_tx, mut expected_rx) = tokio::sync::watch::channel::<Option<usize>>(None);
    let reader = tokio::spawn(async move {
        let mut seen: HashMap<i64, usize> = HashMap::new();
        let mut result = ClientResult::default();
        let mut delivered = 0usize;
        let mut deadline = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
        loop {
            let expected = *expected_rx.borrow();
            if expected.is_some_and(|e| delivered >= e) {
                break;
            }
            tokio::select! {
                changed = expected_rx.changed(), if expected.is_none() => {
                    if changed.is_err() {
                        break;
                    }
                    deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
                }
                message = tokio::time::timeout_at(deadline, stream.message()) => {
                    let Ok(Ok(Some(r))) = message else { break };
                    let now = now_us();
                    for e in &r.events {
                        delivered += 1;
                        *seen.entry(r.watch_id).or_default() += 1;
                        let sent = e
                            .kv
                            .as_ref()
                            .and_then(|kv| kv.value.get(8..28))
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(|v| v.trim().parse::<u64>().ok());
                        match sent {
                            Some(sent) => result.ok(Duration::from_micros(now.saturating_sub(sent))),
                            None => result.failed("an event without a send time"),
                        }
                    }
                }
            }
        }
        (seen, result, delivered, Instant::now())
    });

    // Writers: objects labelled app=a<some watch>, their send time first,
    // for the run's duration.
    let pad = value_size.saturating_sub(120);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..run.clients {
        let mut c = run.connection(i);
        let (prefix, until) = (prefix.clone(), started + run.duration);
        tasks.spawn(async move {
            let mut apps: Vec<usize> = Vec::new();
            let mut failed = ClientResult::default();
            let mut n: usize = 0;
            while Instant::now() < until {
                let app = (i * 7919 + n * 104_729) % watchers;
                let value = format!(
                    r#"{{"sent":{:>20},"kind":"Thing","metadata":{{"name":"o{i}-{n}","labels":{{"app":"a{app}"}}}},"pad":"{}"}}"#,
                    now_us(),
                    "p".repeat(pad)
                );
                match c.put(format!("{prefix}{i}/{n}"), value, Some(PutOptions::new())).await {
                    Ok(_) => apps.push(app),
                    Err(e) => failed.failed(e),
                }
                n += 1;
            }
            (apps, failed)
        });
    }
    let mut per_watch: HashMap<usize, usize> = HashMap::new();
    let mut write_errors = ClientResult::default();
    let mut puts = 0usize;
    while let Some(done) = tasks.join_next().await {
        let (apps, failed) = done.context("a writer task failed")?;
        puts += apps.len();
        for app in apps {
            *per_watch.entry(app).or_default() += 1;
        }
        write_errors.errors += failed.errors;
        if write_errors.first_error.is_none() {
            write_errors.first_error = failed.first_error;
        }
    }
    let writing = started.elapsed();
    let expected: usize = per_watch.values().sum();
    let _ = expected_tx.send(Some(expected));
    let (seen, result, delivered, last_event) = reader.await.context("the watch reader failed")?;

    let elapsed = last_event.duration_since(started);
    drop(tx);
    let mut measured = Measured {
        workload: "watch-selected",
        unit: format!(
            "event, {watchers} selected watches on one stream (created in {:.1} s), {} puts/s",
            created_in.as_secs_f64(),
            (puts as f64 / writing.as_secs_f64().max(1e-9)) as u64
        ),
        ..Default::default()
    };
    measured.absorb(result);
    measured.absorb(write_errors);
    // Each event belongs to exactly one watch: more is a server that does
    // not filter (etcd), fewer lost or late events.
    if delivered != expected {
        measured.errors += expected.abs_diff(delivered) as u64;
        measured.first_error.get_or_insert_with(|| {
            format!("{delivered} events delivered for {expected} matching puts")
        });
    }
    for (watch, want) in &per_watch {
        let got = seen.get(&(*watch as i64 + 1)).copied().unwrap_or(0);
        if got != *want {
            measured
                .first_error
                .get_or_insert_with(|| format!("watch app=a{watch}: {got} events for {want} puts"));
            measured.errors += 1;
            break;
        }
    }
    // Events per second from the first write to the last event received.
    measured.elapsed = elapsed;
    Ok(measured)
}
