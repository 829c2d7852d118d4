//! Short, readable renderings of requests and answers for failure messages
//! (prost's Debug prints bytes as lists of numbers).

use kubeshard_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kubeshard_proto::etcdserverpb::request_op::Request;
use kubeshard_proto::etcdserverpb::response_op::Response;
use kubeshard_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use kubeshard_proto::mvccpb::{Event, KeyValue};
use kubeshard_shard_worker::WriteRequest;

use super::model::{Fail, Resp};

pub fn bytes(b: &[u8]) -> String {
    if b.len() > 40 {
        return format!("<{} bytes>", b.len());
    }
    let mut s = String::from("\"");
    for &c in b {
        match c {
            0 => s.push_str("\\0"),
            0x20..=0x7e => s.push(char::from(c)),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s.push('"');
    s
}

fn keys(key: &[u8], end: &[u8]) -> String {
    if end.is_empty() {
        bytes(key)
    } else {
        format!("[{}, {})", bytes(key), bytes(end))
    }
}

pub fn kv(kv: &KeyValue) -> String {
    format!(
        "{}={} c{} m{} v{} l{}",
        bytes(&kv.key),
        bytes(&kv.value),
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        kv.lease
    )
}

fn kvs(list: &[KeyValue]) -> String {
    let items: Vec<String> = list.iter().map(kv).collect();
    format!("[{}]", items.join(", "))
}

fn hdr(h: &Option<ResponseHeader>) -> String {
    match h {
        Some(h) => format!("@{}", h.revision),
        None => "@none".into(),
    }
}

pub fn range_req(r: &RangeRequest) -> String {
    let mut s = format!("Range {}", keys(&r.key, &r.range_end));
    let mut flag = |cond: bool, text: String| {
        if cond {
            s.push(' ');
            s.push_str(&text);
        }
    };
    flag(r.revision != 0, format!("rev={}", r.revision));
    flag(
        !r.label_selector.is_empty(),
        format!("labels={:?}", r.label_selector),
    );
    flag(
        !r.field_selector.is_empty(),
        format!("fields={:?}", r.field_selector),
    );
    flag(r.limit != 0, format!("limit={}", r.limit));
    flag(r.count_only, "count_only".into());
    flag(r.keys_only, "keys_only".into());
    flag(
        r.sort_target != 0 || r.sort_order != 0,
        format!("sort(target={}, order={})", r.sort_target, r.sort_order),
    );
    flag(
        r.min_mod_revision != 0,
        format!("min_mod={}", r.min_mod_revision),
    );
    flag(
        r.max_mod_revision != 0,
        format!("max_mod={}", r.max_mod_revision),
    );
    flag(
        r.min_create_revision != 0,
        format!("min_create={}", r.min_create_revision),
    );
    flag(
        r.max_create_revision != 0,
        format!("max_create={}", r.max_create_revision),
    );
    s
}

fn put_req(p: &PutRequest) -> String {
    let mut s = format!("Put {}={}", bytes(&p.key), bytes(&p.value));
    if p.lease != 0 {
        s.push_str(&format!(" lease={}", p.lease));
    }
    for (on, name) in [
        (p.prev_kv, " prev_kv"),
        (p.ignore_value, " ignore_value"),
        (p.ignore_lease, " ignore_lease"),
    ] {
        if on {
            s.push_str(name);
        }
    }
    s
}

fn delete_req(d: &DeleteRangeRequest) -> String {
    let prev = if d.prev_kv { " prev_kv" } else { "" };
    format!("Delete {}{prev}", keys(&d.key, &d.range_end))
}

fn compare(c: &Compare) -> String {
    let target = CompareTarget::try_from(c.target).map_or("?".into(), |t| format!("{t:?}"));
    let op = match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => "==",
        Ok(CompareResult::NotEqual) => "!=",
        Ok(CompareResult::Greater) => ">",
        Ok(CompareResult::Less) => "<",
        Err(_) => "?",
    };
    let operand = match &c.target_union {
        Some(TargetUnion::Value(v)) => bytes(v),
        Some(
            TargetUnion::Version(n)
            | TargetUnion::CreateRevision(n)
            | TargetUnion::ModRevision(n)
            | TargetUnion::Lease(n),
        ) => n.to_string(),
        None => "none".into(),
    };
    format!("{target}({}) {op} {operand}", keys(&c.key, &c.range_end))
}

pub fn txn_req(t: &TxnRequest) -> String {
    let ops = |list: &[kubeshard_proto::etcdserverpb::RequestOp]| -> String {
        let items: Vec<String> = list
            .iter()
            .map(|op| match &op.request {
                Some(Request::RequestRange(r)) => range_req(r),
                Some(Request::RequestPut(p)) => put_req(p),
                Some(Request::RequestDeleteRange(d)) => delete_req(d),
                Some(Request::RequestTxn(t)) => txn_req(t),
                None => "empty".into(),
            })
            .collect();
        items.join("; ")
    };
    let cmps: Vec<String> = t.compare.iter().map(compare).collect();
    format!(
        "Txn{{if [{}] then [{}] else [{}]}}",
        cmps.join(" && "),
        ops(&t.success),
        ops(&t.failure)
    )
}

pub fn request(w: &WriteRequest) -> String {
    match w {
        WriteRequest::Put(p) => put_req(p),
        WriteRequest::DeleteRange(d) => delete_req(d),
        WriteRequest::Txn(t) => txn_req(t),
        other => format!("{other:?}"),
    }
}

pub fn range_resp(r: &RangeResponse) -> String {
    format!(
        "{} count={} more={} {}",
        hdr(&r.header),
        r.count,
        r.more,
        kvs(&r.kvs)
    )
}

fn put_resp(r: &PutResponse) -> String {
    let prev = r.prev_kv.as_ref().map_or("-".into(), kv);
    format!("{} prev={prev}", hdr(&r.header))
}

fn delete_resp(r: &DeleteRangeResponse) -> String {
    format!(
        "{} deleted={} prev={}",
        hdr(&r.header),
        r.deleted,
        kvs(&r.prev_kvs)
    )
}

fn txn_resp(r: &TxnResponse) -> String {
    let items: Vec<String> = r
        .responses
        .iter()
        .map(|op| match &op.response {
            Some(Response::ResponseRange(r)) => format!("range {}", range_resp(r)),
            Some(Response::ResponsePut(r)) => format!("put {}", put_resp(r)),
            Some(Response::ResponseDeleteRange(r)) => format!("delete {}", delete_resp(r)),
            Some(Response::ResponseTxn(r)) => txn_resp(r),
            None => "empty".into(),
        })
        .collect();
    format!(
        "txn {} succeeded={} [{}]",
        hdr(&r.header),
        r.succeeded,
        items.join("; ")
    )
}

pub fn answer(r: &Result<Resp, Fail>) -> String {
    match r {
        Ok(Resp::Put(p)) => format!("put {}", put_resp(p)),
        Ok(Resp::DeleteRange(d)) => format!("delete {}", delete_resp(d)),
        Ok(Resp::Txn(t)) => txn_resp(t),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("error {e:?}"),
    }
}

pub fn event(e: &Event) -> String {
    let kind = if e.r#type == 0 { "PUT" } else { "DELETE" };
    let this = e.kv.as_ref().map_or("-".into(), kv);
    let prev = e.prev_kv.as_ref().map_or("-".into(), kv);
    format!("{kind} {this} (prev {prev})")
}

pub fn events(list: &[Event]) -> String {
    let items: Vec<String> = list.iter().map(|e| format!("  {}", event(e))).collect();
    items.join("\n")
}
