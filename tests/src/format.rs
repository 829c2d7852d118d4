//! Rendering etcd-client responses into transcript text.
//!
//! Every field of a response is rendered except those that must differ
//! between two correct servers: cluster_id, member_id and raft_term are
//! dropped, revisions become placeholders ranked later ([`rev`]), server-chosen
//! lease IDs become labels ([`Transcript::lease`]).

use std::time::Duration;

use etcd_client::{
    DeleteResponse, Error, Event, EventType, GetResponse, KeyValue, PutResponse, ResponseHeader,
    TxnOpResponse, TxnResponse,
};

use crate::transcript::{Transcript, rev};

/// Bound on every unary call and every awaited stream message.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// kube-apiserver's compaction bookkeeping key; its value is a revision.
pub const COMPACT_REV_KEY: &str = "compact_rev_key";

/// Runs one call with [`RPC_TIMEOUT`]; errors become their transcript text.
pub async fn rpc<T>(fut: impl Future<Output = Result<T, Error>>) -> Result<T, String> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(&e)),
        Err(_) => Err(format!("TIMEOUT after {RPC_TIMEOUT:?}")),
    }
}

/// gRPC errors as `ERR <code> "<message>"` (both compared exactly); other
/// client-side errors by their text.
pub fn error(e: &Error) -> String {
    match e {
        Error::GRpcStatus(s) => format!("ERR {:?} {:?}", s.code(), s.message()),
        other => format!("CLIENT-ERR {other}"),
    }
}

/// Bytes as a quoted, escaped string; long values as length and checksum.
pub fn bytes(b: &[u8]) -> String {
    if b.len() > 200 {
        format!("<{} bytes fnv1a={:016x}>", b.len(), fnv1a(b))
    } else {
        format!("\"{}\"", b.escape_ascii())
    }
}

pub fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn header(h: Option<&ResponseHeader>) -> String {
    match h {
        Some(h) => format!("hdr={}", rev(h.revision())),
        None => "hdr=none".to_string(),
    }
}

pub fn kv(t: &mut Transcript, kv: &KeyValue) -> String {
    // kube-apiserver stores a revision as the value of compact_rev_key.
    let value = match std::str::from_utf8(kv.value()).ok().map(str::parse::<i64>) {
        Some(Ok(r)) if kv.key() == COMPACT_REV_KEY.as_bytes() => format!("rev:{}", rev(r)),
        _ => bytes(kv.value()),
    };
    format!(
        "{{key={} value={} create={} mod={} version={} lease={}}}",
        bytes(kv.key()),
        value,
        rev(kv.create_revision()),
        rev(kv.mod_revision()),
        kv.version(),
        t.lease(kv.lease())
    )
}

pub fn opt_kv(t: &mut Transcript, k: Option<&KeyValue>) -> String {
    match k {
        Some(k) => kv(t, k),
        None => "none".to_string(),
    }
}

pub fn kvs(t: &mut Transcript, list: &[KeyValue]) -> String {
    let items: Vec<String> = list.iter().map(|k| kv(t, k)).collect();
    format!("[{}]", items.join(", "))
}

pub fn get(t: &mut Transcript, r: &GetResponse) -> String {
    format!(
        "{} count={} more={} kvs={}",
        header(r.header()),
        r.count(),
        r.more(),
        kvs(t, r.kvs())
    )
}

pub fn put(t: &mut Transcript, r: &PutResponse) -> String {
    format!("{} prev_kv={}", header(r.header()), opt_kv(t, r.prev_key()))
}

pub fn delete(t: &mut Transcript, r: &DeleteResponse) -> String {
    format!(
        "{} deleted={} prev_kvs={}",
        header(r.header()),
        r.deleted(),
        kvs(t, r.prev_kvs())
    )
}

pub fn txn(t: &mut Transcript, r: &TxnResponse) -> String {
    let ops: Vec<String> = r
        .op_responses()
        .iter()
        .map(|op| match op {
            TxnOpResponse::Put(p) => format!("put({})", put(t, p)),
            TxnOpResponse::Get(g) => format!("range({})", get(t, g)),
            TxnOpResponse::Delete(d) => format!("delete({})", delete(t, d)),
            TxnOpResponse::Txn(x) => format!("txn({})", txn(t, x)),
        })
        .collect();
    format!(
        "{} succeeded={} responses=[{}]",
        header(r.header()),
        r.succeeded(),
        ops.join(", ")
    )
}

pub fn event_type(e: &Event) -> &'static str {
    match e.event_type() {
        EventType::Put => "PUT",
        EventType::Delete => "DELETE",
    }
}

pub fn event(t: &mut Transcript, e: &Event) -> String {
    format!(
        "{} kv={} prev_kv={}",
        event_type(e),
        opt_kv(t, e.kv()),
        opt_kv(t, e.prev_kv())
    )
}

/// Records `r` under `step` with `f` (or its error text) and returns the value.
pub fn record<T>(
    t: &mut Transcript,
    step: &str,
    r: Result<T, String>,
    f: impl FnOnce(&mut Transcript, &T) -> String,
) -> Option<T> {
    match r {
        Ok(v) => {
            let line = f(t, &v);
            t.push(step, line);
            Some(v)
        }
        Err(e) => {
            t.push(step, e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_escaped_and_long_values_summarized() {
        assert_eq!(bytes(b"a\"b\x00\xff"), "\"a\\\"b\\x00\\xff\"");
        let long = vec![7u8; 1000];
        assert!(bytes(&long).starts_with("<1000 bytes fnv1a="));
    }
}
