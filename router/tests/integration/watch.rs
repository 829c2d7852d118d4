//! Watch scenarios: many watches on one stream, replay of history, racing
//! writers, progress requests and compaction.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Txn, TxnOp, WatchOptions};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::support::{
    Ctx, Kind, Model, Short, assert_same, collect, current_revision, expect_created,
    header_revision, is_progress, next_response,
};

const WATCHES: usize = 1000;

/// The key written for watch `i` (groups of 100).
fn w1_key(i: usize) -> String {
    format!("/w1/g{}/k{i:04}", i / 100)
}

/// What watch `i` covers: every tenth watch its group's prefix, the others one key.
fn w1_watched(i: usize) -> (String, bool) {
    if i % 10 == 9 {
        (format!("/w1/g{}/", i / 100), true)
    } else {
        (w1_key(i), false)
    }
}

fn w1_options(i: usize) -> (String, WatchOptions) {
    let (key, prefix) = w1_watched(i);
    let options = WatchOptions::new();
    (
        key,
        if prefix {
            options.with_prefix()
        } else {
            options
        },
    )
}

fn w1_matches(i: usize, key: &str) -> bool {
    let (watched, prefix) = w1_watched(i);
    if prefix {
        key.starts_with(&watched)
    } else {
        key == watched
    }
}

pub async fn thousand_watchers_one_stream(ctx: Ctx) {
    const WRITERS: usize = 10;
    let node = ctx.start().await;
    let mut client = node.client.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let rev0 = current_revision(&mut client).await;

    let (key, options) = w1_options(0);
    let (mut sender, mut stream) = client
        .watch(key, Some(options))
        .await
        .expect("open the watch stream")
        .split();
    // Creates go out while the answers are read: neither side may block the other.
    let creating = tokio::spawn(async move {
        for i in 1..WATCHES {
            let (key, options) = w1_options(i);
            sender
                .watch(key, Some(options))
                .await
                .expect("create watch");
        }
        sender
    });
    for i in 0..WATCHES {
        let r = expect_created(&mut stream, deadline).await;
        assert_eq!(
            r.watch_id(),
            i as i64,
            "watch ids are handed out in creation order from 0"
        );
        assert_eq!(header_revision(r.header()), rev0, "created header");
    }
    let mut sender = creating.await.expect("creating task");
    let reader = collect(stream, deadline, "1000 watches on one stream");

    let mut writers = Vec::new();
    for t in 0..WRITERS {
        let mut client = client.clone();
        writers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            for i in (t..WATCHES).step_by(WRITERS) {
                let key = w1_key(i);
                let mut values = vec![format!("a{i}")];
                if i % 3 == 0 {
                    values.push(format!("b{i}"));
                }
                for value in values {
                    let r = client
                        .put(key.clone(), value.clone(), None)
                        .await
                        .expect("put");
                    done.push(Short {
                        kind: Kind::Put,
                        key: key.clone(),
                        value,
                        revision: header_revision(r.header()),
                    });
                }
                if i % 7 == 0 {
                    let r = client.delete(key.clone(), None).await.expect("delete");
                    assert_eq!(r.deleted(), 1, "delete {key}");
                    done.push(Short {
                        kind: Kind::Delete,
                        key,
                        value: String::new(),
                        revision: header_revision(r.header()),
                    });
                }
            }
            done
        }));
    }
    let mut truth = Vec::new();
    for w in writers {
        truth.extend(w.await.expect("writer task"));
    }
    // Only the prefix watches of group 0 see the first; nobody the others.
    for key in ["/w1/g0/k0000x", "/w1/g1", "/w1/h"] {
        let r = client.put(key, "decoy", None).await.expect("put decoy");
        truth.push(Short {
            kind: Kind::Put,
            key: key.into(),
            value: "decoy".into(),
            revision: header_revision(r.header()),
        });
    }
    truth.sort_by_key(|s| s.revision);
    for pair in truth.windows(2) {
        assert!(
            pair[0].revision < pair[1].revision,
            "two writes got revision {}: {pair:?}",
            pair[1].revision
        );
    }
    sender.request_progress().await.expect("progress request");
    let got = reader.await.expect("reader task");
    let last = truth.last().map_or(0, |s| s.revision);
    assert!(
        got.progress >= last,
        "progress answered at {} below the last write {last}",
        got.progress
    );
    assert!(got.created.is_empty(), "late created responses");
    for i in 0..WATCHES {
        let want: Vec<Short> = truth
            .iter()
            .filter(|s| w1_matches(i, &s.key))
            .cloned()
            .collect();
        assert_same(
            &format!("watch {i} on {:?}", w1_watched(i)),
            &got.short(i as i64),
            &want,
        );
    }
    let strays: Vec<i64> = got
        .events
        .keys()
        .copied()
        .filter(|id| !(0..WATCHES as i64).contains(id))
        .collect();
    assert!(strays.is_empty(), "events for unknown watch ids {strays:?}");
    drop(sender);
    node.stop().await;
}

/// One pseudo-random change to the keys under /h/, checked against the model.
async fn random_change(
    model: &mut Model,
    client: &mut Client,
    rng: &mut StdRng,
    n: usize,
    lease: i64,
) {
    let mut keys = ["/h/a", "/h/b", "/h/c", "/h/d", "/h/e"];
    keys.shuffle(rng);
    let value = format!("v{n}");
    match rng.random_range(0..100) {
        0..55 => {
            model.put(client, keys[0], &value, 0).await;
        }
        55..65 => {
            model.put(client, keys[0], &value, lease).await;
        }
        65..82 => model.delete(client, keys[0]).await,
        82..98 => {
            let (a, b) = (format!("{value}a"), format!("{value}b"));
            model
                .txn(client, &[(keys[0], &a), (keys[1], &b)], &[keys[2]])
                .await;
        }
        _ => model.delete_prefix(client, "/h/").await,
    }
}

pub async fn watch_from_old_revision_replays_exact_history(ctx: Ctx) {
    let node = ctx.start().await;
    let mut client = node.client.clone();
    // Granting a lease changes no revision, as in etcd (the model checks it).
    let lease = client.lease_grant(600, None).await.expect("grant").id();
    let mut model = Model::new(&mut client).await;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let first = model.put(&mut client, "/h/a", "first", 0).await;
    let mut middle = 0;
    for n in 1..300 {
        random_change(&mut model, &mut client, &mut rng, n, lease).await;
        if n == 150 {
            middle = model.revision;
        }
    }
    assert!(
        model.events.len() >= 300,
        "only {} events",
        model.events.len()
    );
    assert!(
        model.events.iter().any(|e| e.kind == Kind::Delete)
            && model
                .events
                .windows(2)
                .any(|p| p[0].kv.modified == p[1].kv.modified),
        "the history must hold deletes and multi-key revisions"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let options = |id: i64, start: i64| {
        WatchOptions::new()
            .with_prefix()
            .with_watch_id(id)
            .with_start_revision(start)
    };
    // A watch from the newest revision itself, on a stream known to have
    // seen it (a progress answer came): its events, then the live ones.
    let newest = model.revision;
    let (mut newest_tx, mut newest_rx) = client
        .watch("/h-none/", Some(WatchOptions::new().with_watch_id(9)))
        .await
        .expect("second stream")
        .split();
    expect_created(&mut newest_rx, deadline).await;
    newest_tx
        .request_progress()
        .await
        .expect("progress request");
    let r = next_response(&mut newest_rx, deadline, "progress before the newest watch").await;
    assert!(
        is_progress(&r) && header_revision(r.header()) >= newest,
        "expected progress at {newest} or later, got {r:?}"
    );
    newest_tx
        .watch("/h/", Some(options(4, newest).with_prev_key()))
        .await
        .expect("watch from the newest revision");
    let newest_reader = collect(newest_rx, deadline, "watch from the newest revision");
    let (mut sender, stream) = client
        .watch("/h/", Some(options(1, first).with_prev_key()))
        .await
        .expect("watch from the first revision")
        .split();
    sender
        .watch("/h/", Some(options(2, middle).with_prev_key()))
        .await
        .expect("watch from the middle");
    sender
        .watch("/h/", Some(options(3, first)))
        .await
        .expect("watch without prev_kv");
    let reader = collect(stream, deadline, "replaying watches");
    // Live writes race with the catch-up of the new watches.
    for n in 300..340 {
        random_change(&mut model, &mut client, &mut rng, n, lease).await;
    }
    sender.request_progress().await.expect("progress request");
    newest_tx
        .request_progress()
        .await
        .expect("progress request");
    let got = reader.await.expect("reader task");
    let newest_got = newest_reader.await.expect("reader task");
    assert_eq!(got.created, vec![1, 2, 3], "created responses");
    assert_eq!(newest_got.created, vec![4], "created responses");
    assert!(
        newest_got.of(9).is_empty(),
        "events outside the watched range"
    );
    assert!(
        got.progress >= model.revision,
        "progress below the last write"
    );
    let all = model.since(first);
    assert_same(
        "watch 1 (from the first revision, prev_kv)",
        &got.of(1),
        &all,
    );
    assert_same(
        "watch 2 (from the middle, prev_kv)",
        &got.of(2),
        &model.since(middle),
    );
    let bare: Vec<_> = all.iter().map(|e| e.without_prev()).collect();
    assert_same("watch 3 (without prev_kv)", &got.of(3), &bare);
    assert_same(
        "watch 4 (from the newest revision)",
        &newest_got.of(4),
        &model.since(newest),
    );
    model.check_live(&mut client, "/h/").await;
    drop((sender, newest_tx));
    node.stop().await;
}

/// An event of a racing writer: its revision, its place in that revision,
/// the writer, the event.
type Written = (i64, usize, usize, Short);

pub async fn no_event_lost_or_repeated_under_racing_writes(ctx: Ctx) {
    const WRITERS: usize = 4;
    const OPS: usize = 250;
    const LATE: i64 = 8;
    const KEYS: usize = 8;
    let node = ctx.start().await;
    let client = node.client.clone();
    let deadline = Instant::now() + Duration::from_secs(90);
    let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
    let options = |id: i64, start: i64| {
        WatchOptions::new()
            .with_prefix()
            .with_watch_id(id)
            .with_start_revision(start)
    };

    // Stream A: watch 1 from the very beginning, then the even late ones.
    let (a_tx, a_rx) = client
        .clone()
        .watch("/r/", Some(options(1, 1)))
        .await
        .expect("stream A")
        .split();
    // Stream B: a watch that must stay silent, then the odd late ones.
    let (b_tx, b_rx) = client
        .clone()
        .watch("/r-silent/", Some(WatchOptions::new().with_watch_id(100)))
        .await
        .expect("stream B")
        .split();
    let a_reader = collect(a_rx, deadline, "stream A");
    let b_reader = collect(b_rx, deadline, "stream B");

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = client.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w as u64);
            let mut exists = [false; KEYS];
            let key = |k: usize| format!("/r/w{w}/k{k}");
            let mut out: Vec<Written> = Vec::new();
            for n in 0..OPS {
                let value = format!("w{w}-{n}");
                let revision;
                if n % 25 == 24 {
                    let a = rng.random_range(0..KEYS);
                    let b = (a + 1 + rng.random_range(0..KEYS - 1)) % KEYS;
                    let (va, vb) = (format!("{value}a"), format!("{value}b"));
                    let r = client
                        .txn(Txn::new().and_then(vec![
                            TxnOp::put(key(a), va.clone(), None),
                            TxnOp::put(key(b), vb.clone(), None),
                        ]))
                        .await
                        .expect("txn");
                    revision = header_revision(r.header());
                    for (order, (k, v)) in [(a, va), (b, vb)].into_iter().enumerate() {
                        exists[k] = true;
                        out.push((
                            revision,
                            order,
                            w,
                            Short {
                                kind: Kind::Put,
                                key: key(k),
                                value: v,
                                revision,
                            },
                        ));
                    }
                } else {
                    let k = rng.random_range(0..KEYS);
                    if exists[k] && rng.random_bool(0.3) {
                        let r = client.delete(key(k), None).await.expect("delete");
                        assert_eq!(r.deleted(), 1, "delete {}", key(k));
                        revision = header_revision(r.header());
                        exists[k] = false;
                        out.push((
                            revision,
                            0,
                            w,
                            Short {
                                kind: Kind::Delete,
                                key: key(k),
                                value: String::new(),
                                revision,
                            },
                        ));
                    } else {
                        let r = client.put(key(k), value.clone(), None).await.expect("put");
                        revision = header_revision(r.header());
                        exists[k] = true;
                        out.push((
                            revision,
                            0,
                            w,
                            Short {
                                kind: Kind::Put,
                                key: key(k),
                                value,
                                revision,
                            },
                        ));
                    }
                }
                acked.lock().expect("acked").push(revision);
            }
            out
        }));
    }

    // Late watches, spread over the writing, each from a revision some
    // write has already returned: they replay history and then go live.
    let creator = {
        let acked = acked.clone();
        let (mut a_tx, mut b_tx) = (a_tx, b_tx);
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(99);
            let mut made = Vec::new();
            let total = WRITERS * OPS;
            for (n, id) in (2..2 + LATE).enumerate() {
                let threshold = (n + 1) * total / (LATE as usize + 2);
                let start = loop {
                    let pick = {
                        let acked = acked.lock().expect("acked");
                        (acked.len() >= threshold).then(|| acked[rng.random_range(0..acked.len())])
                    };
                    if let Some(start) = pick {
                        break start;
                    }
                    tokio::time::sleep(Duration::from_millis(rng.random_range(1..5))).await;
                };
                let sender = if id % 2 == 0 { &mut a_tx } else { &mut b_tx };
                sender
                    .watch("/r/", Some(options(id, start)))
                    .await
                    .expect("late watch");
                made.push((id, start));
            }
            (a_tx, b_tx, made)
        })
    };

    let mut written: Vec<Written> = Vec::new();
    for w in writers {
        written.extend(w.await.expect("writer task"));
    }
    let (mut a_tx, mut b_tx, made) = creator.await.expect("creator task");
    written.sort_by_key(|(revision, order, _, _)| (*revision, *order));
    for pair in written.windows(2) {
        let ((r1, o1, w1, _), (r2, o2, w2, _)) = (&pair[0], &pair[1]);
        assert!(
            r1 < r2 || (r1 == r2 && w1 == w2 && o1 < o2),
            "writers {w1} and {w2} both got revision {r2} ({o1}, {o2})"
        );
    }
    let truth: Vec<Short> = written.into_iter().map(|(_, _, _, s)| s).collect();
    let last = truth.last().map_or(0, |s| s.revision);

    a_tx.request_progress().await.expect("progress A");
    b_tx.request_progress().await.expect("progress B");
    let a = a_reader.await.expect("stream A reader");
    let b = b_reader.await.expect("stream B reader");
    for (name, got) in [("A", &a), ("B", &b)] {
        assert!(
            got.progress >= last,
            "stream {name}: progress at {} below the last write {last}",
            got.progress
        );
    }
    let mut a_ids = vec![1];
    let mut b_ids = vec![100];
    for (id, _) in &made {
        if id % 2 == 0 { &mut a_ids } else { &mut b_ids }.push(*id);
    }
    assert_eq!(a.created, a_ids, "stream A created");
    assert_eq!(b.created, b_ids, "stream B created");
    assert_same("watch 1 (from the beginning)", &a.short(1), &truth);
    assert!(b.of(100).is_empty(), "the silent watch got events");
    for (id, start) in &made {
        let got = if id % 2 == 0 { &a } else { &b };
        let want: Vec<Short> = truth
            .iter()
            .filter(|s| s.revision >= *start)
            .cloned()
            .collect();
        assert_same(
            &format!("late watch {id} from {start}"),
            &got.short(*id),
            &want,
        );
    }
    drop((a_tx, b_tx));
    node.stop().await;
}

pub async fn progress_request(ctx: Ctx) {
    const PUTS: usize = 200;
    let node = ctx.start().await;
    let mut client = node.client.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut tx, mut rx) = client
        .watch("/p/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch")
        .split();
    let id = expect_created(&mut rx, deadline).await.watch_id();

    let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
    let writer = {
        let mut client = client.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            for n in 0..PUTS {
                let r = client
                    .put(format!("/p/k{}", n % 10), format!("{n}"), None)
                    .await
                    .expect("put");
                acked
                    .lock()
                    .expect("acked")
                    .push(header_revision(r.header()));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let mut received: Vec<i64> = Vec::new();
    let mut last_progress = 0;
    let mut rounds = 0;
    loop {
        let writer_done = writer.is_finished();
        let before: Vec<i64> = acked.lock().expect("acked").clone();
        tx.request_progress().await.expect("progress request");
        loop {
            let r = next_response(&mut rx, deadline, "progress while writing").await;
            if is_progress(&r) {
                let h = header_revision(r.header());
                let need = before.last().copied().unwrap_or(0);
                assert!(
                    h >= need,
                    "progress at {h} below {need}, acknowledged before the request"
                );
                assert!(
                    h >= last_progress,
                    "progress went back from {last_progress} to {h}"
                );
                assert!(
                    received.len() >= before.len() && received[..before.len()] == before[..],
                    "writes acknowledged before the progress request must arrive before its answer \
                     ({} acknowledged, {} received)",
                    before.len(),
                    received.len()
                );
                let now: Vec<i64> = acked.lock().expect("acked").clone();
                let covered = now.iter().filter(|r| **r <= h).count();
                assert!(
                    received.len() >= covered,
                    "progress at {h}: {covered} writes at or below it, only {} received",
                    received.len()
                );
                last_progress = h;
                break;
            }
            assert!(
                r.watch_id() == id && !r.created() && !r.canceled() && !r.events().is_empty(),
                "unexpected response {r:?}"
            );
            for e in r.events() {
                let revision = e.kv().expect("kv").mod_revision();
                assert!(
                    revision > last_progress,
                    "event at {revision} after a progress answer at {last_progress}"
                );
                received.push(revision);
            }
        }
        rounds += 1;
        if writer_done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await.expect("writer task");
    let all: Vec<i64> = acked.lock().expect("acked").clone();
    assert_eq!(received, all, "events received versus writes acknowledged");
    assert!(
        rounds >= 3,
        "only {rounds} progress rounds during the writes"
    );

    // A stream that sees no writes is answered at once, at the current revision.
    let (mut idle_tx, mut idle_rx) = client
        .watch("/idle/", None)
        .await
        .expect("idle watch")
        .split();
    expect_created(&mut idle_rx, deadline).await;
    let current = current_revision(&mut client).await;
    let asked = Instant::now();
    idle_tx
        .request_progress()
        .await
        .expect("idle progress request");
    let r = next_response(
        &mut idle_rx,
        asked + Duration::from_secs(3),
        "idle progress",
    )
    .await;
    let waited = asked.elapsed();
    assert!(is_progress(&r), "expected a progress answer, got {r:?}");
    assert_eq!(
        header_revision(r.header()),
        current,
        "idle progress revision"
    );
    assert!(
        waited < Duration::from_secs(2),
        "idle progress took {waited:?}"
    );
    drop((tx, rx, idle_tx, idle_rx));
    node.stop().await;
}

pub async fn compacted_watch_is_canceled(ctx: Ctx) {
    let node = ctx.start().await;
    let mut client = node.client.clone();
    let mut model = Model::new(&mut client).await;
    let mut revisions = Vec::new();
    for i in 0..10 {
        revisions.push(
            model
                .put(&mut client, &format!("/c/k{i}"), &format!("v{i}"), 0)
                .await,
        );
    }
    let r = revisions[5];
    client.compact(r, None).await.expect("compact");
    let deadline = Instant::now() + Duration::from_secs(30);
    let options = |start: i64| {
        WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(start)
    };
    let (mut tx, mut rx) = client
        .watch("/c/", Some(options(r - 1)))
        .await
        .expect("watch below the compaction")
        .split();
    let id = expect_created(&mut rx, deadline).await.watch_id();
    let canceled = next_response(&mut rx, deadline, "compacted watch").await;
    assert!(
        canceled.canceled() && canceled.events().is_empty(),
        "expected a cancellation, got {canceled:?}"
    );
    assert_eq!(canceled.watch_id(), id, "canceled watch id");
    assert_eq!(canceled.compact_revision(), r, "compact_revision");

    // From the compaction revision itself, on the same stream, it works.
    tx.watch("/c/", Some(options(r)))
        .await
        .expect("watch at the compaction");
    let id2 = expect_created(&mut rx, deadline).await.watch_id();
    let reader = collect(rx, deadline, "watch at the compaction");
    model.put(&mut client, "/c/k0", "after", 0).await;
    tx.request_progress().await.expect("progress request");
    let got = reader.await.expect("reader task");
    assert_same(
        "watch from the compaction revision",
        &got.of(id2),
        &model.since(r),
    );
    assert!(got.of(id).is_empty(), "the canceled watch got events");
    drop(tx);
    node.stop().await;
}
