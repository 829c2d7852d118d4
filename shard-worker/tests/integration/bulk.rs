//! The bulk sink (`kubeshard import`, resharding): rows written with their
//! own revisions read back through the store as etcd would show them, and
//! the ordinary write path carries on above them.

use kubeshard_proto::etcdserverpb::{PutRequest, RangeRequest};
use kubeshard_proto::mvccpb::KeyValue;
use kubeshard_proto::mvccpb::event::EventType;
use kubeshard_shard_worker::bulk::{Change, ImportPhase, ImportState};
use kubeshard_shard_worker::{
    KeyRange, LeaseRecord, RevisionClass, Revisions, ShardError, WriteRequest, WriteResponse,
    open_bulk,
};

use crate::backends;

fn key_value(
    key: &str,
    value: &str,
    create: i64,
    modified: i64,
    version: i64,
    lease: i64,
) -> KeyValue {
    KeyValue {
        key: key.into(),
        create_revision: create,
        mod_revision: modified,
        version,
        value: value.into(),
        lease,
    }
}

fn all_at(revision: i64) -> RangeRequest {
    RangeRequest {
        key: b"\0".to_vec(),
        range_end: b"\0".to_vec(),
        revision,
        ..Default::default()
    }
}

#[test]
fn rows_keep_their_revisions() {
    let rt = crate::runtime();
    for server in backends::servers("bulk_rows_keep_their_revisions") {
        rt.block_on(async {
            let db = server.create().await;
            let store = db.store.clone();
            let sink = open_bulk(db.endpoint()).await.expect("open the bulk sink");
            assert!(sink.contents().await.expect("contents").is_empty());

            // An import at revision 10: the keys as they were then.
            let a7 = key_value("a", "a2", 3, 7, 2, 0);
            let b9 = key_value("b", "b1", 9, 9, 1, 77);
            let c9 = key_value("c", "c4", 5, 9, 4, 0);
            sink.apply(
                &[
                    Change::Put(a7.clone()),
                    Change::Put(b9.clone()),
                    Change::Put(c9.clone()),
                ],
                0,
            )
            .await
            .expect("apply the import");
            sink.raise(Revisions {
                current: 10,
                compacted: 10,
                epoch: 0,
            })
            .await
            .expect("raise");
            let contents = sink.contents().await.expect("contents");
            assert_eq!((contents.live_keys, contents.history_rows), (3, 3));
            assert!(!contents.is_empty());
            assert_eq!(
                store.revisions().await.expect("revisions"),
                Revisions {
                    current: 10,
                    compacted: 10,
                    epoch: 0
                }
            );
            let now = store.range(&all_at(0)).await.expect("range");
            assert_eq!(now.kvs, vec![a7.clone(), b9.clone(), c9.clone()]);
            assert_eq!(now.header.map(|h| h.revision), Some(10));
            assert!(matches!(
                store.range(&all_at(9)).await,
                Err(ShardError::Compacted {
                    compact_revision: 10
                })
            ));

            // Followed changes, then what a watch from 11 sees.
            let a12 = key_value("a", "a3", 3, 12, 3, 0);
            let d13 = key_value("d", "d1", 13, 13, 1, 0);
            sink.apply(
                &[
                    Change::Put(a12.clone()),
                    Change::Delete {
                        key: b"b".to_vec(),
                        revision: 13,
                    },
                    Change::Put(d13.clone()),
                ],
                0,
            )
            .await
            .expect("apply followed changes");
            let whole = KeyRange::new(b"\0", b"\0");
            let page = store.history(&whole, 11, 13, 100).await.expect("history");
            let seen: Vec<(i32, i64, Option<KeyValue>)> = page
                .events
                .iter()
                .map(|e| {
                    (
                        e.r#type,
                        e.kv.as_ref().map_or(0, |k| k.mod_revision),
                        e.prev_kv.clone(),
                    )
                })
                .collect();
            assert_eq!(
                seen,
                vec![
                    (EventType::Put as i32, 12, Some(a7.clone())),
                    (EventType::Delete as i32, 13, Some(b9.clone())),
                    (EventType::Put as i32, 13, None),
                ]
            );
            let at12 = store.range(&all_at(12)).await.expect("range at 12");
            assert_eq!(at12.kvs, vec![a12.clone(), b9.clone(), c9.clone()]);
            assert_eq!(store.revisions().await.expect("revisions").current, 13);

            // What does not fit is refused, and changes nothing.
            for bad in [
                Change::Delete {
                    key: b"zz".to_vec(),
                    revision: 20,
                },
                Change::Put(key_value("a", "x", 3, 12, 4, 0)),
            ] {
                assert!(
                    matches!(
                        sink.apply(std::slice::from_ref(&bad), 0).await,
                        Err(ShardError::Corrupt(_))
                    ),
                    "{bad:?} was applied"
                );
            }
            assert_eq!(store.revisions().await.expect("revisions").current, 13);

            // Nothing to apply still raises the counter (a followed revision
            // of other shards), never lowers it.
            sink.apply(&[], 15).await.expect("raise by apply");
            sink.apply(&[], 14).await.expect("no lowering");
            assert_eq!(store.revisions().await.expect("revisions").current, 15);

            // The import's progress, which routers check.
            assert_eq!(sink.import_state().await.expect("state"), None);
            for phase in [ImportPhase::Copying, ImportPhase::Done] {
                let state = ImportState {
                    source: "http://etcd:2379 cluster 1f".into(),
                    revision: 10,
                    phase,
                };
                sink.set_import_state(&state).await.expect("set state");
                assert_eq!(sink.import_state().await.expect("state"), Some(state));
            }

            // Leases, as imported.
            let lease = LeaseRecord {
                id: 77,
                ttl: 60,
                expires_at_ms: 4_000_000_000_000,
            };
            sink.put_leases(&[lease]).await.expect("put lease");
            sink.put_leases(&[lease]).await.expect("put it again");
            assert_eq!(store.lease_get(77).await.expect("lease"), Some(lease));
            sink.delete_leases(&[77]).await.expect("delete lease");
            assert_eq!(store.lease_get(77).await.expect("lease"), None);

            // The ordinary write path goes on above the copied rows.
            let put = WriteRequest::Put(PutRequest {
                key: b"e".to_vec(),
                value: b"e1".to_vec(),
                ..Default::default()
            });
            let committed = store.apply_batch(&[put]).await.expect("write");
            let Some(Ok(WriteResponse::Put(p))) = committed.first() else {
                panic!("no put answer: {committed:?}");
            };
            assert_eq!(p.header.as_ref().map(|h| h.revision), Some(16));
            db.drop_db().await;
        });
    }
}

/// Rows moved between two shards (resharding): read in order, appended
/// with their revisions where the target already has rows at the same
/// revision, appended twice without duplicates, then removed at the source.
#[test]
fn moved_rows_keep_revisions() {
    use kubeshard_shard_worker::bulk::HistoryRow;
    let rt = crate::runtime();
    for server in backends::servers("bulk_moved_rows_keep_revisions") {
        rt.block_on(async {
            let from = server.create().await;
            let to = server.create().await;
            let source = open_bulk(from.endpoint()).await.expect("source");
            let target = open_bulk(to.endpoint()).await.expect("target");
            // One database, one token; another database, another.
            let token = source.database_id().await.expect("token");
            let again = open_bulk(from.endpoint()).await.expect("source again");
            assert_eq!(again.database_id().await.expect("token"), token);
            assert_ne!(target.database_id().await.expect("token"), token);
            // Revision 9 on both shards (a transaction of the source etcd).
            let at9 = |key: &str| Change::Put(key_value(key, "x", 9, 9, 1, 0));
            source
                .apply(
                    &[
                        at9("m1"),
                        at9("m2"),
                        Change::Put(key_value("m1", "y", 9, 11, 2, 0)),
                    ],
                    0,
                )
                .await
                .expect("source rows");
            target.apply(&[at9("t1")], 0).await.expect("target rows");
            let rows: Vec<HistoryRow> = source
                .history_page((i64::MIN, i64::MIN), 100)
                .await
                .expect("page");
            assert_eq!(
                rows.iter()
                    .map(|r| (r.revision, r.key.clone()))
                    .collect::<Vec<_>>(),
                vec![
                    (9, b"m1".to_vec()),
                    (9, b"m2".to_vec()),
                    (11, b"m1".to_vec())
                ]
            );
            let second = source
                .history_page((rows[0].revision, rows[0].sub), 100)
                .await
                .expect("page");
            assert_eq!(second.len(), 2);
            assert_eq!(target.append_history(&rows).await.expect("append"), 3);
            assert_eq!(target.append_history(&rows).await.expect("append again"), 0);
            let live = source.live_page(None, 100).await.expect("live");
            assert_eq!(live.len(), 2);
            assert_eq!(
                source
                    .live_page(Some(b"m1"), 100)
                    .await
                    .expect("live")
                    .len(),
                1
            );
            target.upsert_live(&live).await.expect("upsert");
            target
                .raise(Revisions {
                    current: 11,
                    compacted: 0,
                    epoch: 0,
                })
                .await
                .expect("raise");
            source
                .delete_history(&rows.iter().map(|r| (r.revision, r.sub)).collect::<Vec<_>>())
                .await
                .expect("delete");
            source
                .delete_live(&live.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>())
                .await
                .expect("delete");
            assert!(
                source
                    .history_page((i64::MIN, i64::MIN), 100)
                    .await
                    .expect("page")
                    .is_empty()
            );
            let contents = source.contents().await.expect("contents");
            assert_eq!((contents.live_keys, contents.history_rows), (0, 0));
            target
                .reset_label_index()
                .await
                .expect("reset the label index");
            // The target reads like the source did, old revision included.
            let whole = KeyRange::new(b"\0", b"\0");
            let events = to.store.history(&whole, 9, 11, 100).await.expect("history");
            let seen: Vec<(i64, Vec<u8>)> = events
                .events
                .iter()
                .map(|e| {
                    e.kv.as_ref()
                        .map(|k| (k.mod_revision, k.key.clone()))
                        .unwrap_or_default()
                })
                .collect();
            assert_eq!(seen.len(), 4, "{seen:?}");
            assert_eq!(seen[3], (11, b"m1".to_vec()));
            assert_eq!(
                events.events[3].prev_kv.as_ref().map(|k| k.mod_revision),
                Some(9)
            );
            let at9_read = to.store.range(&all_at(9)).await.expect("range at 9");
            assert_eq!(
                at9_read
                    .kvs
                    .iter()
                    .map(|kv| kv.key.clone())
                    .collect::<Vec<_>>(),
                vec![b"m1".to_vec(), b"m2".to_vec(), b"t1".to_vec()]
            );
            from.drop_db().await;
            to.drop_db().await;
        });
    }
}

/// Routers' records (`ks_router`) by the database's clock, and a renewed
/// database token.
#[test]
fn routers_and_tokens() {
    let rt = crate::runtime();
    for server in backends::servers("bulk_routers_and_tokens") {
        rt.block_on(async {
            let db = server.create().await;
            let bulk = open_bulk(db.endpoint()).await.expect("bulk");
            assert!(bulk.routers_seen(10_000).await.expect("seen").is_empty());
            bulk.router_seen("r1", "http://127.0.0.1:1")
                .await
                .expect("seen");
            bulk.router_seen("r1", "http://127.0.0.1:2")
                .await
                .expect("seen again");
            bulk.router_seen("r2", "http://127.0.0.1:3")
                .await
                .expect("seen");
            let seen = bulk.routers_seen(10_000).await.expect("seen");
            let shown: Vec<(&str, &str)> = seen
                .iter()
                .map(|r| (r.id.as_str(), r.address.as_str()))
                .collect();
            assert_eq!(
                shown,
                [("r1", "http://127.0.0.1:2"), ("r2", "http://127.0.0.1:3")]
            );
            assert!(
                seen.iter().all(|r| (0..5_000).contains(&r.ago_ms)),
                "{seen:?}"
            );
            bulk.router_gone("r1").await.expect("gone");
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            assert_eq!(bulk.routers_seen(10_000).await.expect("seen").len(), 1);
            assert!(bulk.routers_seen(1).await.expect("seen").is_empty());
            let token = bulk.database_id().await.expect("token");
            let renewed = bulk.renew_database_id().await.expect("renew");
            assert_ne!(renewed, token);
            let other = open_bulk(db.endpoint()).await.expect("bulk");
            assert_eq!(other.database_id().await.expect("token"), renewed);
            db.drop_db().await;
        });
    }
}

fn put(key: &str) -> WriteRequest {
    WriteRequest::Put(PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        ..Default::default()
    })
}

fn is_fenced<T: std::fmt::Debug>(result: Result<T, ShardError>) -> bool {
    matches!(
        result,
        Err(ShardError::TopologyChanged {
            stored: 1,
            serving: 0
        })
    )
}

/// Online resharding's fence (`store/fence.rs`): once a database is fenced
/// at a later topology version, a process serving the older one neither
/// reads nor writes it, on every path (a plain get, a range, a write that
/// the writer could run guarded or speculatively from what it learnt, the
/// watch poll and catch-up), until it serves that version.
#[test]
fn a_fenced_database_refuses_an_older_topology() {
    let rt = crate::runtime();
    for server in backends::servers("bulk_fenced_database") {
        rt.block_on(async {
            let db = server.create().await;
            let store = db.store.clone();
            // Several batches: later ones may run guarded or speculatively
            // from what the writer learnt (PostgreSQL).
            for key in ["a", "b", "a", "b"] {
                for answer in store.apply_batch(&[put(key)]).await.expect("write") {
                    answer.expect("put");
                }
            }
            let before = store.revisions().await.expect("revisions");
            assert_eq!(before.epoch, 0);
            let sink = open_bulk(db.endpoint()).await.expect("open the bulk sink");
            let fenced = sink.fence(1, before.current + 100).await.expect("fence");
            assert_eq!((fenced.epoch, fenced.current), (1, before.current + 100));

            let get_a = RangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            };
            let whole = KeyRange::new(b"\0", b"\0");
            assert!(is_fenced(store.revisions().await));
            assert!(is_fenced(store.range(&get_a).await));
            assert!(is_fenced(store.range(&all_at(0)).await));
            assert!(is_fenced(store.apply_batch(&[put("a")]).await));
            assert!(is_fenced(store.apply_batch(&[put("c")]).await));
            assert!(is_fenced(store.poll_events(0, 100).await));
            assert!(is_fenced(store.history(&whole, 1, 100, 100).await));

            // Serving version 1, as shard 1 of 3: everything works again,
            // and new revisions are of that class, above the fence.
            let class = RevisionClass::of_shard(1, 3).expect("a class");
            store.serve(1, class);
            let mut revision = 0;
            for answer in store.apply_batch(&[put("c")]).await.expect("write") {
                revision = answer.expect("put").revision();
            }
            assert!(revision > before.current + 100, "{revision}");
            assert_eq!(revision % 3, 1);
            let now = store.range(&all_at(0)).await.expect("range");
            assert_eq!(now.kvs.len(), 3);
            store.range(&get_a).await.expect("get");
            store.poll_events(0, 100).await.expect("poll");

            // The fence never goes back.
            let again = sink.fence(0, 0).await.expect("fence again");
            assert_eq!(again.epoch, 1);
            store.serve(0, RevisionClass::ALL);
            assert_eq!(store.serving().version, 1);
        });
    }
}
