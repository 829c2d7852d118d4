//! Random etcd requests for the fuzzing test: valid protobuf with extreme
//! values (empty, huge and binary keys, revisions and ids at the ends of
//! i64, enum values out of range, nested transactions at the limits), and
//! byte-level mutations of encoded requests.

use kubeshard_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCancelRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest, compare, request_op, watch_request,
};
use rand::Rng;
use rand::rngs::StdRng;

/// Where the fuzzer's keys live (the sharded topology's three shards).
pub const PREFIXES: [&str; 3] = ["/registry/pods/", "/registry/events/", "/fuzz/"];

/// Every method of etcd's API, for raw requests.
pub const METHODS: [&str; 22] = [
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.KV/Put",
    "/etcdserverpb.KV/DeleteRange",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.KV/Compact",
    "/etcdserverpb.Lease/LeaseGrant",
    "/etcdserverpb.Lease/LeaseRevoke",
    "/etcdserverpb.Lease/LeaseTimeToLive",
    "/etcdserverpb.Lease/LeaseLeases",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Alarm",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/MoveLeader",
    "/etcdserverpb.Cluster/MemberList",
    "/etcdserverpb.Cluster/MemberAdd",
    "/etcdserverpb.Cluster/MemberPromote",
    "/etcdserverpb.Auth/AuthStatus",
    "/etcdserverpb.Auth/Authenticate",
    "/etcdserverpb.Auth/UserAdd",
    "/etcdserverpb.Auth/RoleGet",
    "/etcdserverpb.KV/NoSuchMethod",
    "/nosuch.Service/Call",
];

/// An i64 from the ends, the small numbers and anywhere.
pub fn int(rng: &mut StdRng) -> i64 {
    match rng.random_range(0..10) {
        0 => 0,
        1 => -1,
        2 => i64::MIN,
        3 => i64::MAX,
        4 => rng.random_range(-5..5),
        5 => rng.random(),
        _ => rng.random_range(0..2_000),
    }
}

/// An enum's i32: mostly its values, sometimes none of them.
pub fn enum_value(rng: &mut StdRng, values: i32) -> i32 {
    match rng.random_range(0..8) {
        0 => rng.random(),
        1 => -1,
        _ => rng.random_range(0..values),
    }
}

pub fn key(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..20) {
        0 => Vec::new(),
        1 => vec![0],
        2 => vec![0xff; rng.random_range(1..4)],
        3 => (0..rng.random_range(1..64)).map(|_| rng.random()).collect(),
        // Over the request limit of 1.5 MiB, or just under it.
        4 if rng.random_range(0..20) == 0 => vec![b'k'; rng.random_range(1_000_000..1_700_000)],
        5 => {
            let prefix = PREFIXES[rng.random_range(0..PREFIXES.len())];
            let mut k = prefix.as_bytes().to_vec();
            k.extend((0..rng.random_range(0..8)).map(|_| rng.random::<u8>()));
            k
        }
        _ => {
            let prefix = PREFIXES[rng.random_range(0..PREFIXES.len())];
            format!("{prefix}k{}", rng.random_range(0..40)).into_bytes()
        }
    }
}

/// A range end for `key`: none, everything, its prefix, below it, random.
pub fn range_end(rng: &mut StdRng, key: &[u8]) -> Vec<u8> {
    match rng.random_range(0..6) {
        0 | 1 => Vec::new(),
        2 => vec![0],
        3 => {
            let mut end = key.to_vec();
            match end.last_mut() {
                Some(b) if *b < 0xff => *b += 1,
                _ => end.push(0),
            }
            end
        }
        4 => key.iter().take(key.len() / 2).copied().collect(),
        _ => self::key(rng),
    }
}

fn value(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..12) {
        0 => Vec::new(),
        1 if rng.random_range(0..10) == 0 => vec![b'v'; rng.random_range(500_000..1_600_000)],
        2 => (0..rng.random_range(0..256))
            .map(|_| rng.random())
            .collect(),
        _ => format!("v{}", rng.random::<u16>()).into_bytes(),
    }
}

fn selector(rng: &mut StdRng) -> String {
    const PIECES: [&str; 10] = [
        "",
        "a=b",
        "a in (x,y)",
        "!a",
        "a!=b,c",
        "metadata.name=x",
        "((",
        "a=",
        "x y z",
        "=",
    ];
    match rng.random_range(0..4) {
        0 => PIECES[rng.random_range(0..PIECES.len())].to_string(),
        _ => String::new(),
    }
}

pub fn range(rng: &mut StdRng) -> RangeRequest {
    let key = key(rng);
    let range_end = range_end(rng, &key);
    RangeRequest {
        key,
        range_end,
        limit: int(rng),
        revision: int(rng),
        sort_order: enum_value(rng, 3),
        sort_target: enum_value(rng, 5),
        serializable: rng.random(),
        keys_only: rng.random(),
        count_only: rng.random(),
        min_mod_revision: if rng.random() { int(rng) } else { 0 },
        max_mod_revision: if rng.random() { int(rng) } else { 0 },
        min_create_revision: if rng.random() { int(rng) } else { 0 },
        max_create_revision: if rng.random() { int(rng) } else { 0 },
        label_selector: selector(rng),
        field_selector: selector(rng),
    }
}

pub fn put(rng: &mut StdRng, leases: &[i64]) -> PutRequest {
    let lease = match rng.random_range(0..6) {
        0 => int(rng),
        1 if !leases.is_empty() => leases[rng.random_range(0..leases.len())],
        _ => 0,
    };
    PutRequest {
        key: key(rng),
        value: value(rng),
        lease,
        prev_kv: rng.random(),
        ignore_value: rng.random_range(0..8) == 0,
        ignore_lease: rng.random_range(0..8) == 0,
    }
}

pub fn delete(rng: &mut StdRng) -> DeleteRangeRequest {
    let key = key(rng);
    // Mostly one key: deleting ranges empties the store too often to check it.
    let range_end = if rng.random_range(0..5) == 0 {
        range_end(rng, &key)
    } else {
        Vec::new()
    };
    DeleteRangeRequest {
        key,
        range_end,
        prev_kv: rng.random(),
    }
}

fn compare(rng: &mut StdRng) -> Compare {
    let key = key(rng);
    let range_end = if rng.random_range(0..4) == 0 {
        range_end(rng, &key)
    } else {
        Vec::new()
    };
    let target_union = match rng.random_range(0..6) {
        0 => Some(compare::TargetUnion::Version(int(rng))),
        1 => Some(compare::TargetUnion::CreateRevision(int(rng))),
        2 => Some(compare::TargetUnion::ModRevision(int(rng))),
        3 => Some(compare::TargetUnion::Value(value(rng))),
        4 => Some(compare::TargetUnion::Lease(int(rng))),
        _ => None,
    };
    Compare {
        result: enum_value(rng, 4),
        target: enum_value(rng, 5),
        key,
        range_end,
        target_union,
    }
}

fn op(rng: &mut StdRng, leases: &[i64], depth: u32) -> RequestOp {
    let request = match rng.random_range(0..if depth > 0 { 5 } else { 4 }) {
        0 => Some(request_op::Request::RequestRange(range(rng))),
        1 => Some(request_op::Request::RequestPut(put(rng, leases))),
        2 => Some(request_op::Request::RequestDeleteRange(delete(rng))),
        3 => None,
        _ => Some(request_op::Request::RequestTxn(txn(rng, leases, depth - 1))),
    };
    RequestOp { request }
}

/// A transaction, nested `depth` levels at most (3 at the top); sometimes
/// with more operations than etcd's default limit (128).
pub fn txn(rng: &mut StdRng, leases: &[i64], depth: u32) -> TxnRequest {
    // Past the limit at the top only: nested, it would multiply.
    let most = if depth == 3 && rng.random_range(0..10) == 0 {
        140
    } else {
        6
    };
    let count = |rng: &mut StdRng| rng.random_range(0..most);
    let compares = count(rng);
    let successes = count(rng);
    let failures = count(rng);
    TxnRequest {
        compare: (0..compares).map(|_| compare(rng)).collect(),
        success: (0..successes).map(|_| op(rng, leases, depth)).collect(),
        failure: (0..failures).map(|_| op(rng, leases, depth)).collect(),
    }
}

pub fn compaction(rng: &mut StdRng, current: i64) -> CompactionRequest {
    let revision = match rng.random_range(0..4) {
        // Some history stays for the model check's watch to read.
        0 => (current - rng.random_range(1_000..5_000)).max(1),
        _ => int(rng),
    };
    CompactionRequest {
        revision,
        physical: rng.random(),
    }
}

pub fn lease_grant(rng: &mut StdRng) -> LeaseGrantRequest {
    LeaseGrantRequest {
        ttl: match rng.random_range(0..4) {
            0 => int(rng),
            _ => rng.random_range(1..30),
        },
        id: if rng.random() { 0 } else { int(rng) },
    }
}

pub fn lease_revoke(rng: &mut StdRng, leases: &[i64]) -> LeaseRevokeRequest {
    let id = match leases {
        [] => int(rng),
        _ if rng.random() => leases[rng.random_range(0..leases.len())],
        _ => int(rng),
    };
    LeaseRevokeRequest { id }
}

pub fn lease_ttl(rng: &mut StdRng, leases: &[i64]) -> LeaseTimeToLiveRequest {
    let id = match leases {
        [] => int(rng),
        _ => leases[rng.random_range(0..leases.len())],
    };
    LeaseTimeToLiveRequest {
        id,
        keys: rng.random(),
    }
}

/// A message of a watch stream: mostly creations (with explicit ids,
/// duplicates among them), some cancels and progress requests.
pub fn watch(rng: &mut StdRng) -> WatchRequest {
    let request_union = match rng.random_range(0..12) {
        0 => Some(watch_request::RequestUnion::CancelRequest(
            WatchCancelRequest {
                watch_id: if rng.random() {
                    rng.random_range(0..200)
                } else {
                    int(rng)
                },
            },
        )),
        1 => Some(watch_request::RequestUnion::ProgressRequest(
            WatchProgressRequest {},
        )),
        2 => None,
        _ => {
            let key = key(rng);
            let range_end = range_end(rng, &key);
            Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key,
                    range_end,
                    start_revision: if rng.random() { 0 } else { int(rng) },
                    progress_notify: rng.random(),
                    filters: (0..rng.random_range(0..3))
                        .map(|_| enum_value(rng, 2))
                        .collect(),
                    prev_kv: rng.random(),
                    watch_id: match rng.random_range(0..4) {
                        0 => rng.random_range(0..200),
                        1 => int(rng),
                        _ => 0,
                    },
                    fragment: rng.random(),
                    label_selector: selector(rng),
                    field_selector: selector(rng),
                },
            ))
        }
    };
    WatchRequest { request_union }
}

/// `bytes` changed at random: bits flipped, cut, grown, spliced.
pub fn mutate(rng: &mut StdRng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..5) {
        match rng.random_range(0..5) {
            0 if !bytes.is_empty() => {
                let at = rng.random_range(0..bytes.len());
                bytes[at] ^= 1 << rng.random_range(0..8);
            }
            1 if !bytes.is_empty() => {
                let at = rng.random_range(0..bytes.len());
                bytes.truncate(at);
            }
            2 => {
                let at = rng.random_range(0..=bytes.len());
                let extra: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                bytes.splice(at..at, extra);
            }
            3 if !bytes.is_empty() => {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = [0x00, 0x7f, 0x80, 0xff][rng.random_range(0..4)];
            }
            _ => bytes.extend_from_slice(&bytes.clone()),
        }
    }
    bytes
}
