//! Fuzzing a running kubeshard (SQLite, PostgreSQL and MariaDB shards) for a bounded time
//! (`KUBESHARD_FUZZ_SECS`, default 20; `KUBESHARD_FUZZ_SEED` repeats a run):
//! random valid requests of every RPC with extreme values, the same
//! requests' bytes mutated and sent to any method, watch streams with
//! thousands of watches, HTTP/2 streams cut in the middle of a message, and
//! garbage on the socket. Checked:
//! - no panic and no crash: the process runs on and its log has no panic;
//! - every answer is a proper gRPC status: a valid request never gets
//!   Unknown, Internal, Unavailable or DataLoss; a mutated one never gets
//!   Unknown (which is what a broken or status-less answer becomes);
//! - the store is consistent afterwards: a watch of every key from the
//!   start, folded into a model of etcd's MVCC, equals a read of every key
//!   (values, create and mod revisions, versions, leases), and its events
//!   come in revision order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut};
use kubeshard_proto::etcdserverpb::kv_client::KvClient;
use kubeshard_proto::etcdserverpb::lease_client::LeaseClient;
use kubeshard_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use kubeshard_proto::etcdserverpb::watch_client::WatchClient;
use kubeshard_proto::etcdserverpb::{
    AlarmRequest, LeaseLeasesRequest, LeaseRevokeRequest, PutRequest, RangeRequest, StatusRequest,
    WatchCreateRequest, WatchRequest, watch_request,
};
use kubeshard_proto::mvccpb::{KeyValue, event::EventType};
use kubeshard_tests::fuzz;
use kubeshard_tests::server::{Backend, KubeshardServer, Server};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Bytes in and out, for requests that are not valid protobuf.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// What went wrong: the request and the answer.
type Findings = Arc<Mutex<Vec<String>>>;

const BIG: usize = 256 << 20;

async fn note_typed(findings: &Findings, what: &str, status: &tonic::Status) {
    if matches!(
        status.code(),
        Code::Unknown | Code::Internal | Code::Unavailable | Code::DataLoss
    ) {
        findings.lock().await.push(format!(
            "{what}: {:?} {:?}",
            status.code(),
            status.message()
        ));
    }
}

async fn note_raw(findings: &Findings, what: &str, status: &tonic::Status) {
    if status.code() == Code::Unknown {
        findings.lock().await.push(format!(
            "{what} (mutated): {:?} {:?}",
            status.code(),
            status.message()
        ));
    }
}

fn short<T: std::fmt::Debug>(request: &T) -> String {
    let text = format!("{request:?}");
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

/// One fuzzing task: random requests until `until`.
async fn requests(
    channel: Channel,
    seed: u64,
    until: tokio::time::Instant,
    findings: Findings,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kv = KvClient::new(channel.clone()).max_decoding_message_size(BIG);
    let mut lease = LeaseClient::new(channel.clone()).max_decoding_message_size(BIG);
    let mut maintenance = MaintenanceClient::new(channel.clone());
    let mut leases: Vec<i64> = Vec::new();
    let mut current = 1;
    let mut sent = 0;
    while tokio::time::Instant::now() < until {
        sent += 1;
        // The encoded request and its method, for the mutated copy.
        let (method, bytes) = match rng.random_range(0..12) {
            0..=2 => {
                let r = fuzz::range(&mut rng);
                match kv.range(r.clone()).await {
                    Ok(a) => {
                        current = current.max(a.get_ref().header.as_ref().map_or(0, |h| h.revision))
                    }
                    Err(s) => note_typed(&findings, &short(&r), &s).await,
                }
                (0, r.encode_to_vec())
            }
            3..=5 => {
                let r = fuzz::put(&mut rng, &leases);
                if let Err(s) = kv.put(r.clone()).await {
                    note_typed(&findings, &short(&r), &s).await;
                }
                (1, r.encode_to_vec())
            }
            6 => {
                let r = fuzz::delete(&mut rng);
                if let Err(s) = kv.delete_range(r.clone()).await {
                    note_typed(&findings, &short(&r), &s).await;
                }
                (2, r.encode_to_vec())
            }
            7 | 8 => {
                let r = fuzz::txn(&mut rng, &leases, 3);
                if let Err(s) = kv.txn(r.clone()).await {
                    note_typed(&findings, &short(&r), &s).await;
                }
                (3, r.encode_to_vec())
            }
            9 => {
                let r = if rng.random_range(0..4) == 0 {
                    let r = fuzz::compaction(&mut rng, current);
                    if let Err(s) = kv.compact(r).await {
                        note_typed(&findings, &short(&r), &s).await;
                    }
                    r.encode_to_vec()
                } else {
                    let r = AlarmRequest {
                        action: fuzz::enum_value(&mut rng, 3),
                        member_id: fuzz::int(&mut rng) as u64,
                        alarm: fuzz::enum_value(&mut rng, 3),
                    };
                    if let Err(s) = maintenance.alarm(r).await {
                        note_typed(&findings, &short(&r), &s).await;
                    }
                    r.encode_to_vec()
                };
                (4, r)
            }
            10 => {
                let r = fuzz::lease_grant(&mut rng);
                match lease.lease_grant(r).await {
                    Ok(a) if a.get_ref().error.is_empty() => leases.push(a.get_ref().id),
                    Ok(_) => {}
                    Err(s) => note_typed(&findings, &short(&r), &s).await,
                }
                (5, r.encode_to_vec())
            }
            _ => {
                if rng.random() {
                    let r = fuzz::lease_revoke(&mut rng, &leases);
                    if let Err(s) = lease.lease_revoke(r).await {
                        note_typed(&findings, &short(&r), &s).await;
                    }
                    (6, r.encode_to_vec())
                } else {
                    let r = fuzz::lease_ttl(&mut rng, &leases);
                    if let Err(s) = lease.lease_time_to_live(r).await {
                        note_typed(&findings, &short(&r), &s).await;
                    }
                    (7, r.encode_to_vec())
                }
            }
        };
        // The same bytes, mutated, to the same or any method.
        if rng.random_range(0..3) == 0 {
            let method = if rng.random() {
                fuzz::METHODS[method]
            } else {
                fuzz::METHODS[rng.random_range(0..fuzz::METHODS.len())]
            };
            let bytes = fuzz::mutate(&mut rng, bytes);
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            if grpc.ready().await.is_ok() {
                let path = http::uri::PathAndQuery::from_static(method);
                let answer = grpc
                    .unary(tonic::Request::new(bytes.clone()), path, Raw)
                    .await;
                if let Err(s) = answer {
                    note_raw(&findings, &format!("{method} {bytes:02x?}"), &s).await;
                }
            }
        }
    }
    sent
}

/// Reads `stream` until it ends, fails or stays quiet for 2 s; its
/// failure, if any.
async fn drain<T>(stream: &mut tonic::Streaming<T>) -> Option<tonic::Status> {
    loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
            Err(_) | Ok(Ok(None)) => return None,
            Ok(Ok(Some(_))) => {}
            Ok(Err(s)) => return Some(s),
        }
    }
}

/// Thousands of watch requests on one stream, some of them mutated bytes
/// on another; both read until quiet.
async fn watches(channel: Channel, seed: u64, findings: Findings) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let messages: Vec<WatchRequest> = (0..3000).map(|_| fuzz::watch(&mut rng)).collect();
    let count = messages.len();
    let mut client = WatchClient::new(channel.clone()).max_decoding_message_size(BIG);
    match client.watch(futures::stream::iter(messages)).await {
        Err(s) => note_typed(&findings, "a stream of 3000 watch requests", &s).await,
        Ok(answer) => {
            if let Some(s) = drain(&mut answer.into_inner()).await {
                note_typed(&findings, "a stream of 3000 watch requests", &s).await;
            }
        }
    }
    let raw: Vec<Vec<u8>> = (0..300)
        .map(|_| {
            let bytes = fuzz::watch(&mut rng).encode_to_vec();
            fuzz::mutate(&mut rng, bytes)
        })
        .collect();
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_ok() {
        let path = http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
        let request = tonic::Request::new(futures::stream::iter(raw));
        match grpc.streaming(request, path, Raw).await {
            Err(s) => note_raw(&findings, "a watch stream of mutated requests", &s).await,
            Ok(answer) => {
                if let Some(s) = drain(&mut answer.into_inner()).await {
                    note_raw(&findings, "a watch stream of mutated requests", &s).await;
                }
            }
        }
    }
    count
}

/// HTTP/2 streams that end in the middle of a gRPC message, and garbage
/// instead of HTTP/2.
async fn cut_streams(addr: &str, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..40 {
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            continue;
        };
        if round % 4 == 3 {
            // Not HTTP/2 at all.
            let garbage: Vec<u8> = (0..rng.random_range(1..512))
                .map(|_| rng.random())
                .collect();
            let _ = tokio::io::AsyncWriteExt::write_all(&mut { tcp }, &garbage).await;
            continue;
        }
        let Ok((client, connection)) = h2::client::handshake(tcp).await else {
            continue;
        };
        let driver = tokio::spawn(connection);
        let method = fuzz::METHODS[rng.random_range(0..fuzz::METHODS.len())];
        let method = if round % 2 == 0 {
            "/etcdserverpb.Watch/Watch"
        } else {
            method
        };
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(());
        let Ok(request) = request else { continue };
        let Ok(mut ready) = client.ready().await else {
            continue;
        };
        if let Ok((_answer, mut send)) = ready.send_request(request, false) {
            // A message announced as 1000 bytes, of which 10 come.
            let mut frame = vec![0u8, 0, 0, 0x03, 0xe8];
            frame.extend((0..10).map(|_| rng.random::<u8>()));
            let _ = send.send_data(bytes::Bytes::from(frame), round % 3 == 0);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if round % 3 == 1 {
                send.send_reset(h2::Reason::CANCEL);
            }
        }
        // The connection goes away mid-message.
        driver.abort();
    }
}

/// Revokes every lease, so that nothing expires during the model check.
async fn revoke_all(channel: Channel) {
    let mut lease = LeaseClient::new(channel);
    let Ok(listed) = lease.lease_leases(LeaseLeasesRequest {}).await else {
        return;
    };
    for l in &listed.get_ref().leases {
        let _ = lease.lease_revoke(LeaseRevokeRequest { id: l.id }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_requests_get_statuses_and_leave_a_consistent_store() {
    let test = "fuzzed_requests_get_statuses_and_leave_a_consistent_store";
    let secs: u64 = std::env::var("KUBESHARD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("KUBESHARD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (KUBESHARD_FUZZ_SEED), {secs} s");
    let Some(mut server) =
        KubeshardServer::start_sharded(test, [Backend::Sqlite, Backend::Postgres, Backend::Mysql])
            .await
    else {
        return;
    };
    let endpoint = server.endpoint();
    let channel = Channel::from_shared(endpoint.clone())
        .expect("an endpoint")
        .connect()
        .await
        .expect("connect");
    let mut kv = KvClient::new(channel.clone()).max_decoding_message_size(BIG);
    let start = put_revision(&mut kv, b"/fuzz/start").await;

    // The model: a watch of every key from the start, `/fuzz/start`'s own put
    // included, since the fuzzers may never touch that key.
    let events = Arc::new(Mutex::new(Vec::new()));
    let model_watch = {
        let (channel, events) = (channel.clone(), events.clone());
        tokio::spawn(async move {
            let create = WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(
                    WatchCreateRequest {
                        key: vec![0],
                        range_end: vec![0],
                        start_revision: start,
                        ..Default::default()
                    },
                )),
            };
            let mut client = WatchClient::new(channel).max_decoding_message_size(BIG);
            let (keep, requests) = tokio::sync::mpsc::channel::<WatchRequest>(1);
            let _ = keep.send(create).await;
            let stream = tokio_stream_of(requests);
            let mut answers = client
                .watch(stream)
                .await
                .expect("the model's watch")
                .into_inner();
            while let Ok(Some(answer)) = answers.message().await {
                assert!(
                    !answer.canceled,
                    "the model's watch was canceled: {answer:?}"
                );
                events.lock().await.extend(answer.events);
            }
            drop(keep);
        })
    };

    let findings: Findings = Arc::new(Mutex::new(Vec::new()));
    let until = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for task in 0..3 {
        let (channel, findings) = (channel.clone(), findings.clone());
        tasks.push(tokio::spawn(requests(
            channel,
            seed + task,
            until,
            findings,
        )));
    }
    let watched = watches(channel.clone(), seed + 10, findings.clone()).await;
    let addr = endpoint.trim_start_matches("http://").to_string();
    cut_streams(&addr, seed + 20).await;
    let mut sent = 0;
    for t in tasks {
        sent += t.await.expect("a fuzzing task");
    }
    eprintln!("{test}: {sent} requests (a third also mutated), {watched} watch requests");

    assert!(
        server.is_running(),
        "kubeshard exited\n{}",
        server.log_tail()
    );
    let log = server.log_text();
    assert!(
        !log.contains("panicked"),
        "kubeshard panicked:\n{}",
        server.log_tail()
    );
    let findings = findings.lock().await.clone();
    assert!(
        findings.is_empty(),
        "{} improper answers (seed {seed}), the first:\n{}",
        findings.len(),
        findings
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The model check.
    revoke_all(channel.clone()).await;
    let status = MaintenanceClient::new(channel.clone())
        .status(StatusRequest {})
        .await
        .expect("Status after fuzzing");
    assert!(status.get_ref().errors.is_empty(), "{:?}", status.get_ref());
    let end = put_revision(&mut kv, b"/fuzz/zz-end").await;
    for _ in 0..200 {
        let seen = events
            .lock()
            .await
            .last()
            .and_then(|e| e.kv.as_ref())
            .map(|kv| kv.mod_revision);
        if seen.is_some_and(|r| r >= end) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    model_watch.abort();
    let events = events.lock().await.clone();
    let mut model: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
    let mut last = start;
    for e in &events {
        let Some(kv) = &e.kv else {
            panic!("an event without its key-value: {e:?}");
        };
        assert!(
            kv.mod_revision >= last,
            "the watch went from revision {last} back to {}",
            kv.mod_revision
        );
        last = kv.mod_revision;
        if kv.mod_revision > end {
            break;
        }
        if e.r#type == EventType::Delete as i32 {
            model.remove(&kv.key);
        } else {
            model.insert(kv.key.clone(), kv.clone());
        }
    }
    assert!(
        last >= end,
        "the model's watch stopped at {last}, before {end}"
    );
    let read = kv
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision: end,
            ..Default::default()
        })
        .await
        .expect("a read of every key")
        .into_inner();
    let stored: BTreeMap<Vec<u8>, KeyValue> = read
        .kvs
        .into_iter()
        .map(|kv| (kv.key.clone(), kv))
        .collect();
    let only = |a: &BTreeMap<Vec<u8>, KeyValue>, b: &BTreeMap<Vec<u8>, KeyValue>| {
        a.iter()
            .filter(|(k, _)| !b.contains_key(*k))
            .map(|(k, kv)| format!("{}: {kv:?}", String::from_utf8_lossy(k)))
            .collect::<Vec<_>>()
    };
    let (stored_only, model_only) = (only(&stored, &model), only(&model, &stored));
    assert!(
        stored_only.is_empty() && model_only.is_empty(),
        "keys stored but not in the watch's model: {stored_only:?}\n\
         keys in the model but not stored: {model_only:?}"
    );
    for (key, kv) in &stored {
        assert_eq!(Some(kv), model.get(key), "{}", String::from_utf8_lossy(key));
    }
    eprintln!(
        "{test}: model check: {} events, {} keys at revision {end}",
        events.len(),
        stored.len()
    );
}

/// Puts an empty value at `key`; the revision it got.
async fn put_revision(kv: &mut KvClient<Channel>, key: &[u8]) -> i64 {
    kv.put(PutRequest {
        key: key.to_vec(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("put {}: {e}", String::from_utf8_lossy(key)))
    .into_inner()
    .header
    .map(|h| h.revision)
    .expect("a header")
}

/// The requests of a watch stream, from a channel that stays open.
fn tokio_stream_of(
    mut requests: tokio::sync::mpsc::Receiver<WatchRequest>,
) -> impl futures::Stream<Item = WatchRequest> {
    futures::stream::poll_fn(move |cx| requests.poll_recv(cx))
}
