//! The error table of shared/design/etcd-contract.md, code and text.

use etcd_client::{GetOptions, PutOptions, Txn, TxnOp};
use tonic::Code;

use crate::support::{Ctx, Model, assert_status, current_revision, header_revision};

const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const FUTURE: &str = "etcdserver: mvcc: required revision is a future revision";
const NO_KEY: &str = "etcdserver: key is not provided";
/// etcd's default --max-request-bytes.
const MAX_REQUEST_BYTES: usize = 1_572_864;

pub async fn errors_match_etcd(ctx: Ctx) {
    let node = ctx.start().await;
    let mut client = node.client.clone();
    let mut model = Model::new(&mut client).await;
    for i in 0..5 {
        model
            .put(&mut client, &format!("/e/k{i}"), &format!("v{i}"), 0)
            .await;
    }

    assert_status(
        "put of an empty key",
        client.put("", "v", None).await,
        Code::InvalidArgument,
        NO_KEY,
    );
    assert_status(
        "get of an empty key",
        client.get("", None).await,
        Code::InvalidArgument,
        NO_KEY,
    );
    assert_status(
        "delete of an empty key",
        client.delete("", None).await,
        Code::InvalidArgument,
        NO_KEY,
    );

    let unknown = 0x7eed_1234;
    assert_status(
        "put with an unknown lease",
        client
            .put(
                "/e/leased",
                "v",
                Some(PutOptions::new().with_lease(unknown)),
            )
            .await,
        Code::NotFound,
        LEASE_NOT_FOUND,
    );
    assert_status(
        "revoke of an unknown lease",
        client.lease_revoke(unknown).await,
        Code::NotFound,
        LEASE_NOT_FOUND,
    );
    let ttl = client
        .lease_time_to_live(unknown, None)
        .await
        .expect("TimeToLive of an unknown lease is not an error");
    assert_eq!(ttl.ttl(), -1, "ttl of an unknown lease");

    // Revisions: the current one reads, the next one is in the future.
    let at = |revision| Some(GetOptions::new().with_revision(revision));
    let r = client
        .get("/e/k0", at(model.revision))
        .await
        .expect("get at the current revision");
    assert_eq!(r.kvs().len(), 1, "get at the current revision");
    assert_status(
        "get at a future revision",
        client.get("/e/k0", at(model.revision + 1)).await,
        Code::OutOfRange,
        FUTURE,
    );
    assert_status(
        "compaction at a future revision",
        client.compact(model.revision + 1, None).await,
        Code::OutOfRange,
        FUTURE,
    );
    let compacted = model.revision - 2;
    client.compact(compacted, None).await.expect("compact");
    assert_status(
        "get below the compaction",
        client.get("/e/k0", at(compacted - 1)).await,
        Code::OutOfRange,
        COMPACTED,
    );
    let r = client
        .get(
            "/e/k",
            Some(GetOptions::new().with_prefix().with_revision(compacted)),
        )
        .await
        .expect("get at the compaction revision");
    assert_eq!(r.kvs().len(), 3, "keys at the compaction revision");
    assert_status(
        "compaction below the compaction",
        client.compact(compacted - 1, None).await,
        Code::OutOfRange,
        COMPACTED,
    );

    // Txn limits: 128 operations pass, 129 do not.
    let puts = |n: usize, tag: &str| -> Vec<TxnOp> {
        (0..n)
            .map(|i| TxnOp::put(format!("/e/{tag}{i:03}"), "v", None))
            .collect()
    };
    assert_status(
        "txn with 129 operations",
        client.txn(Txn::new().and_then(puts(129, "t"))).await,
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );
    let keys: Vec<String> = (0..128).map(|i| format!("/e/t{i:03}")).collect();
    let ops: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
    model.txn(&mut client, &ops, &[]).await;
    assert_status(
        "txn putting one key twice",
        client
            .txn(Txn::new().and_then(vec![
                TxnOp::put("/e/dup", "1", None),
                TxnOp::put("/e/dup", "2", None),
            ]))
            .await,
        Code::InvalidArgument,
        "etcdserver: duplicate key given in txn request",
    );

    // Request size: etcd's limit is on the encoded request.
    assert_status(
        "put larger than 1.5 MiB",
        client
            .put("/e/big", vec![b'x'; MAX_REQUEST_BYTES], None)
            .await,
        Code::InvalidArgument,
        "etcdserver: request is too large",
    );
    let large = "y".repeat(MAX_REQUEST_BYTES - 1024);
    model.put(&mut client, "/e/large", &large, 0).await;
    let r = client
        .get("/e/large", None)
        .await
        .expect("get the large value");
    assert_eq!(
        r.kvs().first().map(|kv| kv.value().len()),
        Some(large.len()),
        "large value read back"
    );

    // No failed request consumed a revision.
    assert_eq!(
        current_revision(&mut client).await,
        model.revision,
        "revision after the errors"
    );
    let r = client.put("/e/last", "v", None).await.expect("put");
    assert_eq!(
        header_revision(r.header()),
        model.revision + 1,
        "next revision"
    );
    node.stop().await;
}
