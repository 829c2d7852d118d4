//! Random operation sequences over a small key space, so that operations
//! collide. Revisions are drawn as picks and made concrete against the
//! model's revision when the operation runs.

use kubeshard_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kubeshard_proto::etcdserverpb::request_op::Request;
use kubeshard_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use kubeshard_shard_worker::WriteRequest;
use proptest::prelude::*;

use super::model::in_range;

pub const KEYS: [&str; 6] = ["a", "b", "c", "d/1", "d/2", "e"];
/// How many distinct values puts write (see `value`).
pub const VALUES: usize = 9;

/// Label and field selectors ranges carry (kubeshard's extension), drawn
/// by index; the first of each is none.
pub const LABEL_SELECTORS: [&str; 7] = [
    "",
    "app=web",
    "app!=web",
    "app in (web,db),tier",
    "!app",
    "tier notin (a)",
    "app=db,tier=a",
];
pub const FIELD_SELECTORS: [&str; 5] = [
    "",
    "metadata.name=b",
    "metadata.namespace!=ns1",
    "spec.x=1",
    "metadata.name=a,spec.x!=2",
];

/// Value number `i`: plain bytes, Kubernetes objects in JSON and in
/// kube-apiserver's protobuf envelope, and one encrypted at rest.
pub fn value(i: usize) -> Vec<u8> {
    match i % VALUES {
        0 => Vec::new(),
        1 => b"x".to_vec(),
        2 => b"y".to_vec(),
        3 => b"zz".to_vec(),
        4 => br#"{"kind":"Thing","metadata":{"name":"a","labels":{"app":"web"}},"spec":{"x":1}}"#
            .to_vec(),
        5 => br#"{"kind":"Thing","metadata":{"name":"b","namespace":"ns1","labels":{"app":"db","tier":"a"}},"spec":{"x":2}}"#
            .to_vec(),
        6 => kubeshard_selector::protobuf_object("a", "ns1", &[("app", "web"), ("tier", "b")]),
        7 => kubeshard_selector::protobuf_object("b", "ns2", &[]),
        _ => b"k8s:enc:aescbc:v1:key1:\x01\x02\x03".to_vec(),
    }
}

/// Which keys a request addresses.
#[derive(Debug, Clone, Copy)]
pub enum Sel {
    Key(usize),
    /// [KEYS[a], KEYS[b]); empty when b <= a.
    Span(usize, usize),
    /// "d/" .. "d0"
    Prefix,
    /// KEYS[a] .. "\0"
    From(usize),
    /// "\0" .. "\0"
    All,
    /// A key outside the key space, never written.
    Missing,
}

impl Sel {
    pub fn bytes(self) -> (Vec<u8>, Vec<u8>) {
        let k = |i: usize| KEYS[i].as_bytes().to_vec();
        match self {
            Sel::Key(a) => (k(a), Vec::new()),
            Sel::Span(a, b) => (k(a), k(b)),
            Sel::Prefix => (b"d/".to_vec(), b"d0".to_vec()),
            Sel::From(a) => (k(a), vec![0]),
            Sel::All => (vec![0], vec![0]),
            Sel::Missing => (b"zz".to_vec(), Vec::new()),
        }
    }
}

/// A revision: `Zero` (none / current), or a pick resolved to 1..=current+1
/// (current+1 is a future revision).
#[derive(Debug, Clone, Copy)]
pub enum Rev {
    Zero,
    Pick(u8),
}

impl Rev {
    pub fn at(self, cur: i64) -> i64 {
        match self {
            Rev::Zero => 0,
            Rev::Pick(p) => 1 + i64::from(p) % (cur + 1),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RangeG {
    pub sel: Sel,
    pub rev: Rev,
    pub limit: i64,
    pub count_only: bool,
    pub keys_only: bool,
    pub sort_target: i32,
    pub sort_order: i32,
    /// min_mod, max_mod, min_create, max_create
    pub filters: [Rev; 4],
    /// Indexes into LABEL_SELECTORS and FIELD_SELECTORS.
    pub selectors: (usize, usize),
}

#[derive(Debug, Clone)]
pub struct PutG {
    pub key: usize,
    pub value: usize,
    pub lease: i64,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

#[derive(Debug, Clone)]
pub struct CmpG {
    pub sel: Sel,
    pub target: i32,
    pub result: i32,
    pub operand: u8,
    /// 0: the union matches the target; 1: a union of another kind; 2: none
    /// (etcd then compares against 0 or the empty value).
    pub odd_union: u8,
}

#[derive(Debug, Clone)]
pub enum OpG {
    Range(RangeG),
    Put(PutG),
    Delete(Sel, bool),
    Txn(TxnG),
}

#[derive(Debug, Clone)]
pub struct TxnG {
    pub compare: Vec<CmpG>,
    pub success: Vec<OpG>,
    pub failure: Vec<OpG>,
}

/// One step of a test sequence.
#[derive(Debug, Clone)]
pub enum Op {
    Put(PutG),
    Delete(Sel, bool),
    Txn(TxnG),
    /// A read through `ShardStore::range`.
    Range(RangeG),
    Grant {
        id: i64,
        ttl: i64,
        now: i64,
    },
    Revoke {
        id: i64,
    },
    Expire {
        id: i64,
        now: i64,
    },
    /// KeepAlive through `ShardStore::lease_renew`.
    Renew {
        id: i64,
        now: i64,
    },
    Compact(Rev),
    /// Raise the revision counter by this much over the current revision
    /// (0: a floor at or below it, which changes nothing).
    Bump(i64),
    /// `ShardStore::purge_compacted` at the compaction revision.
    Purge {
        batch: i64,
    },
    /// The label indexer catches up to the current revision.
    IndexLabels,
}

impl Op {
    /// Whether the op goes through `apply_batch`.
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            Op::Range(_) | Op::Renew { .. } | Op::Purge { .. } | Op::IndexLabels
        )
    }
}

/// A generated test case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Each op, and whether a new write batch starts at it.
    pub ops: Vec<(Op, bool)>,
    /// Events per page when reading history back.
    pub page: usize,
}

fn sel() -> impl Strategy<Value = Sel> {
    prop_oneof![
        8 => (0..KEYS.len()).prop_map(Sel::Key),
        3 => (0..KEYS.len(), 0..KEYS.len()).prop_map(|(a, b)| Sel::Span(a, b)),
        1 => Just(Sel::Prefix),
        1 => (0..KEYS.len()).prop_map(Sel::From),
        1 => Just(Sel::All),
        1 => Just(Sel::Missing),
    ]
}

/// Ranges of reads: mostly several keys, so that limit, sort and count matter.
fn read_sel() -> impl Strategy<Value = Sel> {
    prop_oneof![
        3 => (0..KEYS.len()).prop_map(Sel::Key),
        4 => (0..KEYS.len(), 0..KEYS.len()).prop_map(|(a, b)| Sel::Span(a, b)),
        1 => Just(Sel::Prefix),
        2 => (0..KEYS.len()).prop_map(Sel::From),
        2 => Just(Sel::All),
        1 => Just(Sel::Missing),
    ]
}

fn rev(zero_weight: u32) -> impl Strategy<Value = Rev> {
    prop_oneof![zero_weight => Just(Rev::Zero), 1 => any::<u8>().prop_map(Rev::Pick)]
}

fn range_g() -> impl Strategy<Value = RangeG> {
    let shape = (
        read_sel(),
        rev(3),
        prop_oneof![1 => Just(0i64), 1 => 1..4i64],
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.2),
    );
    let order = (
        prop_oneof![2 => Just(0i32), 1 => 0..5i32],
        prop_oneof![1 => Just(0i32), 1 => 0..3i32],
        [rev(6), rev(6), rev(6), rev(6)],
    );
    let selectors = prop_oneof![
        2 => Just((0, 0)),
        3 => (0..LABEL_SELECTORS.len(), 0..FIELD_SELECTORS.len()),
    ];
    (shape, order, selectors).prop_map(
        |(
            (sel, rev, limit, count_only, keys_only),
            (sort_target, sort_order, filters),
            selectors,
        )| RangeG {
            sel,
            rev,
            limit,
            count_only,
            keys_only,
            sort_target,
            sort_order,
            filters,
            selectors,
        },
    )
}

fn put_g() -> impl Strategy<Value = PutG> {
    (
        0..KEYS.len(),
        0..VALUES,
        prop_oneof![16 => Just(0i64), 3 => 1..4i64, 1 => Just(9i64)],
        any::<bool>(),
        0..20u8,
    )
        .prop_map(|(key, value, lease, prev_kv, flags)| {
            // etcd refuses ignore_value with a value and ignore_lease with a
            // lease before they reach the store.
            let ignore_value = flags == 0 || flags == 2;
            let ignore_lease = flags == 1 || flags == 2;
            PutG {
                key,
                value: if ignore_value { 0 } else { value },
                lease: if ignore_lease { 0 } else { lease },
                prev_kv,
                ignore_value,
                ignore_lease,
            }
        })
}

fn cmp_g() -> impl Strategy<Value = CmpG> {
    (
        prop_oneof![4 => (0..KEYS.len()).prop_map(Sel::Key), 1 => sel()],
        0..5i32,
        0..4i32,
        any::<u8>(),
        prop_oneof![12 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
    )
        .prop_map(|(sel, target, result, operand, odd_union)| CmpG {
            sel,
            target,
            result,
            operand,
            odd_union,
        })
}

fn op_g(depth: u32) -> BoxedStrategy<OpG> {
    let leaf = prop_oneof![
        2 => range_g().prop_map(OpG::Range),
        3 => put_g().prop_map(OpG::Put),
        2 => (sel(), any::<bool>()).prop_map(|(s, p)| OpG::Delete(s, p)),
    ];
    if depth == 0 {
        leaf.boxed()
    } else {
        prop_oneof![6 => leaf, 1 => txn_g(depth - 1).prop_map(OpG::Txn)].boxed()
    }
}

fn txn_g(depth: u32) -> BoxedStrategy<TxnG> {
    (
        prop::collection::vec(cmp_g(), 0..3),
        prop::collection::vec(op_g(depth), 0..4),
        prop::collection::vec(op_g(depth), 0..3),
    )
        .prop_map(|(compare, success, failure)| TxnG {
            compare,
            success,
            failure,
        })
        .boxed()
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => put_g().prop_map(Op::Put),
        3 => (sel(), any::<bool>()).prop_map(|(s, p)| Op::Delete(s, p)),
        6 => txn_g(2).prop_map(Op::Txn),
        4 => range_g().prop_map(Op::Range),
        4 => (1..4i64, 1..10i64, 0..20_000i64).prop_map(|(id, ttl, now)| Op::Grant { id, ttl, now }),
        1 => (1..4i64).prop_map(|id| Op::Revoke { id }),
        1 => (1..4i64, 0..40_000i64).prop_map(|(id, now)| Op::Expire { id, now }),
        1 => (1..4i64, 0..40_000i64).prop_map(|(id, now)| Op::Renew { id, now }),
        1 => any::<u8>().prop_map(|p| Op::Compact(Rev::Pick(p))),
        1 => (0..5i64).prop_map(Op::Bump),
        1 => (1..5i64).prop_map(|batch| Op::Purge { batch }),
        2 => Just(Op::IndexLabels),
    ]
}

pub fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((op(), prop::bool::weighted(0.4)), 20..80),
        1..6usize,
    )
        .prop_map(|(ops, page)| Case { ops, page })
}

// ---- making ops concrete against the current revision ----

pub fn range_req(g: &RangeG, cur: i64) -> RangeRequest {
    let (key, range_end) = g.sel.bytes();
    RangeRequest {
        key,
        range_end,
        limit: g.limit,
        revision: g.rev.at(cur),
        sort_order: g.sort_order,
        sort_target: g.sort_target,
        serializable: false,
        keys_only: g.keys_only,
        count_only: g.count_only,
        min_mod_revision: g.filters[0].at(cur),
        max_mod_revision: g.filters[1].at(cur),
        min_create_revision: g.filters[2].at(cur),
        max_create_revision: g.filters[3].at(cur),
        label_selector: LABEL_SELECTORS[g.selectors.0 % LABEL_SELECTORS.len()].to_string(),
        field_selector: FIELD_SELECTORS[g.selectors.1 % FIELD_SELECTORS.len()].to_string(),
    }
}

pub fn put_req(g: &PutG) -> PutRequest {
    PutRequest {
        key: KEYS[g.key].as_bytes().to_vec(),
        value: value(g.value),
        lease: g.lease,
        prev_kv: g.prev_kv,
        ignore_value: g.ignore_value,
        ignore_lease: g.ignore_lease,
    }
}

pub fn delete_req(sel: Sel, prev_kv: bool) -> DeleteRangeRequest {
    let (key, range_end) = sel.bytes();
    DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    }
}

fn compare(g: &CmpG, cur: i64) -> Compare {
    let (key, range_end) = g.sel.bytes();
    let target = CompareTarget::try_from(g.target).unwrap_or(CompareTarget::Version);
    let small = i64::from(g.operand % 4);
    let union = match target {
        CompareTarget::Value => TargetUnion::Value(value(usize::from(g.operand) % 4)),
        CompareTarget::Version => TargetUnion::Version(small),
        CompareTarget::Create => TargetUnion::CreateRevision(Rev::Pick(g.operand).at(cur) - 1),
        CompareTarget::Mod => TargetUnion::ModRevision(Rev::Pick(g.operand).at(cur) - 1),
        CompareTarget::Lease => TargetUnion::Lease(small),
    };
    let target_union = match g.odd_union {
        0 => Some(union),
        1 => Some(match union {
            TargetUnion::Value(_) => TargetUnion::Version(small),
            _ => TargetUnion::Value(value(usize::from(g.operand) % 4)),
        }),
        _ => None,
    };
    Compare {
        result: CompareResult::try_from(g.result).unwrap_or(CompareResult::Equal) as i32,
        target: target as i32,
        key,
        range_end,
        target_union,
    }
}

fn request_op(g: &OpG, cur: i64) -> RequestOp {
    let request = match g {
        OpG::Range(r) => Request::RequestRange(range_req(r, cur)),
        OpG::Put(p) => Request::RequestPut(put_req(p)),
        OpG::Delete(s, p) => Request::RequestDeleteRange(delete_req(*s, *p)),
        OpG::Txn(t) => Request::RequestTxn(txn_req_raw(t, cur)),
    };
    RequestOp {
        request: Some(request),
    }
}

fn txn_req_raw(g: &TxnG, cur: i64) -> TxnRequest {
    TxnRequest {
        compare: g.compare.iter().map(|c| compare(c, cur)).collect(),
        success: g.success.iter().map(|o| request_op(o, cur)).collect(),
        failure: g.failure.iter().map(|o| request_op(o, cur)).collect(),
    }
}

/// A txn etcd (and the router) would accept: puts that collide with another
/// write of their branch are turned into reads of the same key.
pub fn txn_req(g: &TxnG, cur: i64) -> TxnRequest {
    let mut t = txn_req_raw(g, cur);
    while !(intervals_ok(&t.success) && intervals_ok(&t.failure)) {
        demote_last_put(&mut t);
    }
    t
}

pub fn write_req(op: &Op, cur: i64) -> Option<WriteRequest> {
    Some(match op {
        Op::Put(p) => WriteRequest::Put(put_req(p)),
        Op::Delete(s, p) => WriteRequest::DeleteRange(delete_req(*s, *p)),
        Op::Txn(t) => WriteRequest::Txn(txn_req(t, cur)),
        Op::Grant { id, ttl, now } => WriteRequest::LeaseGrant {
            id: *id,
            ttl: *ttl,
            now_ms: *now,
        },
        Op::Revoke { id } => WriteRequest::LeaseRevoke { id: *id },
        Op::Expire { id, now } => WriteRequest::LeaseExpire {
            id: *id,
            now_ms: *now,
        },
        Op::Compact(r) => WriteRequest::Compact {
            revision: r.at(cur).max(1),
        },
        Op::Bump(by) => WriteRequest::Bump { floor: cur + by },
        Op::Range(_) | Op::Renew { .. } | Op::Purge { .. } | Op::IndexLabels => return None,
    })
}

// ---- etcd's duplicate-key rule (v3rpc/key.go checkIntervals) ----

/// Puts and deletes of one branch, nested txns included; None if a put
/// collides with another put or a delete.
type Writes = (Vec<Vec<u8>>, Vec<(Vec<u8>, Vec<u8>)>);

fn writes(ops: &[RequestOp]) -> Option<Writes> {
    let mut dels: Vec<(Vec<u8>, Vec<u8>)> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some((d.key.clone(), d.range_end.clone())),
            _ => None,
        })
        .collect();
    let deleted =
        |dels: &[(Vec<u8>, Vec<u8>)], k: &[u8]| dels.iter().any(|(s, e)| in_range(k, s, e));
    let mut puts: Vec<Vec<u8>> = Vec::new();
    for op in ops {
        if let Some(Request::RequestTxn(t)) = &op.request {
            let (then_puts, then_dels) = writes(&t.success)?;
            let (else_puts, else_dels) = writes(&t.failure)?;
            for k in &then_puts {
                if puts.contains(k) || deleted(&dels, k) {
                    return None;
                }
                puts.push(k.clone());
            }
            for k in &else_puts {
                if (puts.contains(k) && !then_puts.contains(k)) || deleted(&dels, k) {
                    return None;
                }
                puts.push(k.clone());
            }
            dels.extend(then_dels);
            dels.extend(else_dels);
        }
    }
    for op in ops {
        if let Some(Request::RequestPut(p)) = &op.request {
            if puts.contains(&p.key) || deleted(&dels, &p.key) {
                return None;
            }
            puts.push(p.key.clone());
        }
    }
    Some((puts, dels))
}

/// etcd accepts a txn that puts a key in one nested txn and deletes it in a
/// later one (its duplicate-key check only looks back) and writes both at one
/// revision; the generator produces such txns (set this to true to leave
/// them out while hunting another bug).
pub const AVOID_PUT_THEN_DELETE_IN_ONE_TXN: bool = false;

fn intervals_ok(ops: &[RequestOp]) -> bool {
    match writes(ops) {
        None => false,
        Some((puts, dels)) => {
            !AVOID_PUT_THEN_DELETE_IN_ONE_TXN
                || !puts
                    .iter()
                    .any(|k| dels.iter().any(|(s, e)| in_range(k, s, e)))
        }
    }
}

/// Turns the last put (depth first) into a read of its key.
fn demote_last_put(t: &mut TxnRequest) -> bool {
    for op in t.failure.iter_mut().rev().chain(t.success.iter_mut().rev()) {
        if let Some(Request::RequestTxn(nested)) = &mut op.request
            && demote_last_put(nested)
        {
            return true;
        }
        if let Some(Request::RequestPut(p)) = &mut op.request {
            let key = std::mem::take(&mut p.key);
            op.request = Some(Request::RequestRange(RangeRequest {
                key,
                ..Default::default()
            }));
            return true;
        }
    }
    false
}
