//! Label and field selectors (kubeshard's push-down extension of Range and
//! WatchCreateRequest), through the gRPC API on one shard and on three.
//!
//! Objects with random labels, in JSON, in kube-apiserver's protobuf
//! envelope and encrypted (undecodable), are written and deleted at random;
//! then every selector of a list is checked against a model: the unfiltered
//! range at the same revision, filtered by the selector. Lists run at the
//! current and at an older revision, paginated as kube-apiserver pages them
//! (limit, then the rest from the last key at the first page's revision),
//! with count and count_only. Watches with selectors must get exactly the
//! events whose object or previous object matches.

use std::time::Duration;

use kubeshard::RunningServer;
use kubeshard_proto::etcdserverpb::kv_client::KvClient;
use kubeshard_proto::etcdserverpb::watch_client::WatchClient;
use kubeshard_proto::etcdserverpb::watch_request::RequestUnion;
use kubeshard_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use kubeshard_proto::mvccpb::Event;
use kubeshard_proto::mvccpb::event::EventType;
use kubeshard_selector::{Object, Selector, protobuf_object};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::sharded::{drop_shard_databases, shard_endpoints, start_router, stop_router};
use crate::support::Ctx;

const KEYS_PER_SHARD: usize = 8;
const WRITES: usize = 150;

/// (label selector, field selector) pairs the lists and watches use.
const SELECTORS: [(&str, &str); 10] = [
    ("app=web", ""),
    ("app!=web", ""),
    ("app in (web,db),tier", ""),
    ("!app", ""),
    ("tier notin (a)", ""),
    ("app=db,tier=b", ""),
    ("", "metadata.name=obj3"),
    ("", "metadata.namespace!=ns1"),
    ("app=web", "spec.replicas=2"),
    ("", "metadata.name=obj1,spec.replicas!=1"),
];

pub async fn selectors_on_one_shard(ctx: Ctx) {
    let node = ctx.start().await;
    exercise(&node.server, 1).await;
    node.stop().await;
}

pub async fn selectors_across_shards(ctx: Ctx) {
    let endpoints = shard_endpoints(&ctx);
    let server = start_router(&ctx, &endpoints).await;
    exercise(&server, 3).await;
    stop_router(server).await;
    drop_shard_databases(&ctx);
}

async fn exercise(server: &RunningServer, shards: usize) {
    let url = format!("http://{}", server.local_addr().expect("a TCP address"));
    let channel = Channel::from_shared(url)
        .expect("server URL")
        .connect()
        .await
        .expect("connect");
    let mut kv = KvClient::new(channel.clone());
    let mut watch = WatchClient::new(channel);

    // One stream: a watch of everything (with prev_kv, the model's source),
    // one per selector with and without prev_kv, and a malformed one.
    let (tx, rx) = mpsc::channel(64);
    let mut stream = watch
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch stream")
        .into_inner();
    let create = |id: i64, labels: &str, fields: &str, prev_kv: bool| WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"/k/".to_vec(),
            range_end: b"/k0".to_vec(),
            prev_kv,
            watch_id: id,
            label_selector: labels.to_string(),
            field_selector: fields.to_string(),
            ..Default::default()
        })),
    };
    let mut requests = vec![create(1000, "", "", true)];
    for (i, (labels, fields)) in SELECTORS.iter().enumerate() {
        let i = i as i64;
        requests.push(create(2 * i + 1, labels, fields, false));
        requests.push(create(2 * i + 2, labels, fields, true));
    }
    requests.push(create(999, "app in (", "", false));
    for r in requests {
        tx.send(r).await.expect("send watch create");
    }
    let mut created = 0;
    let mut refused = None;
    while created < 2 * SELECTORS.len() + 2 {
        let r = next(&mut stream).await;
        assert!(r.created, "unexpected response before creation: {r:?}");
        created += 1;
        if r.canceled {
            refused = Some(r);
        }
    }
    let refused = refused.expect("the malformed selector's watch was not refused");
    assert_eq!(refused.watch_id, 999);
    assert!(
        refused.cancel_reason.contains("invalid label selector"),
        "reason: {}",
        refused.cancel_reason
    );

    // Random objects, changed and deleted, in two rounds: the first list
    // starts the label index, which has caught up with the first round
    // and not with all of the second when the lists run again.
    let mut rng = StdRng::seed_from_u64(17 + shards as u64);
    let mut last = 0;
    let mut old = Vec::new();
    for round in 0..2 {
        let (middle, end) = write_round(&mut kv, &mut rng, shards).await;
        old.push(middle);
        last = last.max(end);
        let mut revisions = vec![0];
        revisions.extend(&old);
        check_lists(&mut kv, &revisions, shards).await;
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    // Watches: every event whose object or previous object matches.
    let mut seen: std::collections::BTreeMap<i64, Vec<Event>> = Default::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.get(&1000).and_then(|e| e.last()).map_or(0, revision) < last {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watch events up to {last} did not arrive"
        );
        let r = next(&mut stream).await;
        seen.entry(r.watch_id).or_default().extend(r.events);
    }
    // Whatever else is on its way by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(Some(Ok(r))) = tokio::time::timeout(Duration::from_millis(200), stream.message())
        .await
        .map(|m| m.transpose())
    {
        seen.entry(r.watch_id).or_default().extend(r.events);
    }
    let everything = seen.get(&1000).cloned().unwrap_or_default();
    assert!(
        everything.len() >= 2 * WRITES * 5 / 6 - 40,
        "too few events"
    );
    for (i, (labels, fields)) in SELECTORS.iter().enumerate() {
        let selector = Selector::parse(labels, fields).expect("valid selector");
        let want: Vec<Event> = everything
            .iter()
            .filter(|e| event_matches(&selector, e))
            .cloned()
            .collect();
        let what = format!("watch {labels:?} {fields:?} on {shards} shard(s)");
        let with_prev = seen.get(&(2 * i as i64 + 2)).cloned().unwrap_or_default();
        assert_eq!(summary(&with_prev), summary(&want), "{what} with prev_kv");
        assert_eq!(with_prev, want, "{what} with prev_kv");
        let without: Vec<Event> = want
            .into_iter()
            .map(|mut e| {
                e.prev_kv = None;
                e
            })
            .collect();
        let got = seen.get(&(2 * i as i64 + 1)).cloned().unwrap_or_default();
        assert_eq!(summary(&got), summary(&without), "{what}");
        assert_eq!(got, without, "{what}");
    }
    assert!(!seen.contains_key(&999), "the refused watch got events");

    // A malformed selector on a Range: InvalidArgument naming it.
    let status = kv
        .range(RangeRequest {
            key: b"/k/".to_vec(),
            range_end: b"/k0".to_vec(),
            field_selector: "metadata.name".into(),
            ..Default::default()
        })
        .await
        .expect_err("a malformed field selector was accepted");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("invalid field selector \"metadata.name\""),
        "{}",
        status.message()
    );
    drop(tx);
}

/// Random puts and deletes of objects over the keys; returns the revision
/// half-way and the last.
async fn write_round(kv: &mut KvClient<Channel>, rng: &mut StdRng, shards: usize) -> (i64, i64) {
    let key = |i: usize| format!("/k/{}/obj{}", i % shards, i / shards);
    let total = KEYS_PER_SHARD * shards;
    let (mut middle, mut last) = (0, 0);
    for n in 0..WRITES {
        let i = rng.random_range(0..total);
        let revision = if rng.random_range(0..6) == 0 {
            let r = kv
                .delete_range(DeleteRangeRequest {
                    key: key(i).into_bytes(),
                    ..Default::default()
                })
                .await
                .expect("delete");
            r.into_inner().header.map_or(0, |h| h.revision)
        } else {
            let r = kv
                .put(PutRequest {
                    key: key(i).into_bytes(),
                    value: random_object(rng, i / shards),
                    ..Default::default()
                })
                .await
                .expect("put");
            r.into_inner().header.map_or(0, |h| h.revision)
        };
        last = last.max(revision);
        if n == WRITES / 2 {
            middle = revision;
        }
    }
    (middle, last)
}

/// Every selector's list at each revision (0: the current one) against
/// the model: the unfiltered list at that revision, filtered.
async fn check_lists(kv: &mut KvClient<Channel>, revisions: &[i64], shards: usize) {
    for (labels, fields) in SELECTORS {
        let selector = Selector::parse(labels, fields).expect("valid selector");
        for &revision in revisions {
            let all = range(kv, revision, 0, "", "", None).await;
            // The header is the current revision, whatever was read.
            let at = if revision > 0 {
                revision
            } else {
                all.header.as_ref().map_or(0, |h| h.revision)
            };
            let want: Vec<_> = all
                .kvs
                .iter()
                .filter(|kv| selector.matches_value(&kv.value))
                .cloned()
                .collect();
            let what = format!("{labels:?} {fields:?} at {revision} on {shards} shard(s)");
            let counted = range(kv, at, 0, labels, fields, Some(true)).await;
            assert_eq!(counted.count, want.len() as i64, "count_only of {what}");
            assert!(counted.kvs.is_empty());
            for limit in [0, 1, 3] {
                let mut got = Vec::new();
                let mut from = b"/k/".to_vec();
                loop {
                    let page = range_from(kv, &from, at, limit, labels, fields).await;
                    if got.is_empty() {
                        assert_eq!(page.count, want.len() as i64, "count of {what}");
                    }
                    if limit > 0 {
                        assert!(page.kvs.len() as i64 <= limit, "page over limit: {what}");
                    }
                    let Some(last_key) = page.kvs.last().map(|kv| kv.key.clone()) else {
                        assert!(!page.more, "an empty page with more: {what}");
                        break;
                    };
                    got.extend(page.kvs);
                    if !page.more {
                        break;
                    }
                    from = last_key;
                    from.push(0);
                }
                assert_eq!(got, want, "list of {what} with limit {limit}");
            }
            let keys = range(kv, at, 0, labels, fields, Some(false)).await;
            assert!(keys.kvs.iter().all(|kv| kv.value.is_empty()));
            assert_eq!(keys.kvs.len(), want.len(), "keys_only of {what}");
        }
    }
}

/// The model of a selected watch: the object after a put, or the one
/// before the event, matches.
fn event_matches(selector: &Selector, e: &Event) -> bool {
    let now =
        e.kv.as_ref()
            .filter(|_| e.r#type == EventType::Put as i32)
            .is_some_and(|kv| selector.matches(&Object::decode(&kv.value)));
    let before = e
        .prev_kv
        .as_ref()
        .is_some_and(|kv| selector.matches(&Object::decode(&kv.value)));
    now || before
}

/// Revision, kind, key and whether prev_kv came: what a failure shows.
fn summary(events: &[Event]) -> Vec<(i64, i32, String, bool)> {
    events
        .iter()
        .map(|e| {
            let key =
                e.kv.as_ref()
                    .map(|kv| String::from_utf8_lossy(&kv.key).into_owned());
            (
                revision(e),
                e.r#type,
                key.unwrap_or_default(),
                e.prev_kv.is_some(),
            )
        })
        .collect()
}

fn revision(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

async fn next(stream: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
        Ok(Ok(Some(r))) => r,
        other => panic!("watch stream: {other:?}"),
    }
}

/// A range over /k/; `only`: Some(true) count_only, Some(false) keys_only.
async fn range(
    kv: &mut KvClient<Channel>,
    revision: i64,
    limit: i64,
    labels: &str,
    fields: &str,
    only: Option<bool>,
) -> RangeResponse {
    kv.range(RangeRequest {
        key: b"/k/".to_vec(),
        range_end: b"/k0".to_vec(),
        revision,
        limit,
        count_only: only == Some(true),
        keys_only: only == Some(false),
        label_selector: labels.to_string(),
        field_selector: fields.to_string(),
        ..Default::default()
    })
    .await
    .expect("range")
    .into_inner()
}

async fn range_from(
    kv: &mut KvClient<Channel>,
    from: &[u8],
    revision: i64,
    limit: i64,
    labels: &str,
    fields: &str,
) -> RangeResponse {
    kv.range(RangeRequest {
        key: from.to_vec(),
        range_end: b"/k0".to_vec(),
        revision,
        limit,
        label_selector: labels.to_string(),
        field_selector: fields.to_string(),
        ..Default::default()
    })
    .await
    .expect("range page")
    .into_inner()
}

/// A random object: labels app and tier (or neither), in JSON or in
/// kube-apiserver's protobuf envelope, or encrypted (undecodable).
fn random_object(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let pick = |rng: &mut StdRng, options: &[&'static str]| {
        let i = rng.random_range(0..=options.len());
        options.get(i).copied()
    };
    let app = pick(rng, &["web", "db"]);
    let tier = pick(rng, &["a", "b"]);
    let namespace = if rng.random_bool(0.5) { "ns1" } else { "ns2" };
    let replicas = rng.random_range(1..=3);
    let labels: Vec<(&str, &str)> = [("app", app), ("tier", tier)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    match rng.random_range(0..10) {
        0 => b"k8s:enc:aescbc:v1:key1:\x00\x01secret".to_vec(),
        1..=5 => {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("\"{k}\":\"{v}\""))
                .collect();
            format!(
                r#"{{"apiVersion":"v1","kind":"Thing","metadata":{{"name":"obj{n}","namespace":"{namespace}","labels":{{{}}}}},"spec":{{"replicas":{replicas}}}}}"#,
                labels.join(",")
            )
            .into_bytes()
        }
        _ => protobuf_object(&format!("obj{n}"), namespace, &labels),
    }
}
