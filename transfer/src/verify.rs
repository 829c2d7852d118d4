//! `kubeshard import --verify`: the source and the target compared at one
//! revision, key by key (value, create and mod revision, version, lease),
//! and their leases by id. Any difference fails the import.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use kubeshard_proto::etcdserverpb::RangeRequest;
use kubeshard_proto::mvccpb::KeyValue;
use tracing::info;

use crate::error::{Result, TransferError};
use crate::etcd::Etcd;
use crate::import::{PAGE, compacted_or};
use crate::target::Target;

/// Differences listed in the error; the count covers all.
const SHOWN: usize = 20;

/// Compares at `revision`; returns the number of keys compared. Leases are
/// compared by id when `leases` (after a follow, which brings them up to
/// date); otherwise only those the target's keys name must be there.
pub async fn run(etcd: &Etcd, target: &Target, revision: i64, leases: bool) -> Result<u64> {
    let mut differences = Vec::new();
    let mut compared = 0u64;
    let mut named_leases = BTreeSet::new();
    let mut from = b"\0".to_vec();
    loop {
        let (source, more) = etcd
            .page(&from, b"\0", revision, PAGE)
            .await
            .map_err(|e| compacted_or(e, revision))?;
        // The page covers [from, end): up to its last key, or everything
        // left when it is the last page.
        let end = match (more, source.last()) {
            (true, Some(last)) => {
                let mut end = last.key.clone();
                end.push(0);
                end
            }
            _ => b"\0".to_vec(),
        };
        let mut theirs: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
        for shard in &target.shards {
            let answer = shard
                .store
                .range(&RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    revision,
                    ..Default::default()
                })
                .await
                .map_err(|e| shard.fail(e))?;
            for kv in answer.kvs {
                if let Some(other) = theirs.insert(kv.key.clone(), kv) {
                    differences.push(format!("{} is on more than one shard", show(&other.key)));
                }
            }
        }
        for kv in &source {
            compared += 1;
            if kv.lease != 0 {
                named_leases.insert(kv.lease);
            }
            match theirs.remove(&kv.key) {
                None => differences.push(format!("{} is missing", show(&kv.key))),
                Some(t) if t != *kv => differences.push(format!(
                    "{}: source (create {}, mod {}, version {}, lease {:x}, {} bytes), \
                     target (create {}, mod {}, version {}, lease {:x}, {} bytes{})",
                    show(&kv.key),
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                    kv.lease,
                    kv.value.len(),
                    t.create_revision,
                    t.mod_revision,
                    t.version,
                    t.lease,
                    t.value.len(),
                    if t.value == kv.value {
                        ""
                    } else {
                        ", another value"
                    }
                )),
                Some(_) => {}
            }
        }
        for key in theirs.keys() {
            differences.push(format!("{} is in the target only", show(key)));
        }
        if end == b"\0" {
            break;
        }
        from = end;
    }
    let source_leases: BTreeSet<i64> = etcd.leases().await?.iter().map(|l| l.id).collect();
    let default = &target.shards[target.topology.default_shard().index()];
    let target_leases: BTreeSet<i64> = default
        .store
        .lease_list()
        .await
        .map_err(|e| default.fail(e))?
        .into_iter()
        .collect();
    let named: BTreeSet<i64> = if leases {
        source_leases.clone()
    } else {
        // Leases granted since the copy are not the import's business.
        named_leases.into_iter().collect()
    };
    for id in named.difference(&target_leases) {
        differences.push(format!("lease {id:x} is missing"));
    }
    if leases {
        for id in target_leases.difference(&source_leases) {
            differences.push(format!("lease {id:x} is in the target only"));
        }
    }
    if !differences.is_empty() {
        let mut shown = String::new();
        for d in differences.iter().take(SHOWN) {
            let _ = writeln!(shown, "  {d}");
        }
        return Err(TransferError::Differences {
            revision,
            count: differences.len(),
            shown,
        });
    }
    info!(
        keys = compared,
        leases = source_leases.len(),
        revision,
        "source and target agree"
    );
    Ok(compared)
}

fn show(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}
