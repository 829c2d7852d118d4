//! `kubeshard import`: copies every key of an etcd cluster at one revision R
//! into a topology, keeping each key's revisions and version, recreates the
//! leases with their remaining TTL, and leaves every shard at revision R
//! with compaction at R, as etcd would be after compacting at R. Then,
//! optionally, follows the source's later changes (`follow.rs`) and
//! compares both sides (`verify.rs`).
//!
//! Every shard records how far the import got (`ks_import`); routers refuse
//! a shard whose import is not done.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kubeshard_config::Topology;
use kubeshard_shard_worker::bulk::{Change, ImportPhase, ImportState};
use kubeshard_shard_worker::{LeaseRecord, Revisions};
use tracing::info;

use crate::error::{Result, TransferError};
use crate::etcd::{Etcd, SourceLease, SourceTls};
use crate::target::Target;
use crate::{follow, verify};

/// Keys per page read from the source.
pub const PAGE: i64 = 500;

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The source's endpoints (etcdctl's `--endpoints` form).
    pub from: String,
    pub tls: SourceTls,
    pub topology: Topology,
    /// Keep applying the source's changes until stopped.
    pub follow: bool,
    /// Compare source and target at the last revision imported.
    pub verify: bool,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// The revision the keys were copied at (0 when a follow resumed).
    pub copied_at: i64,
    pub keys: u64,
    pub leases: usize,
    /// The last source revision in the target.
    pub revision: i64,
    /// Keys compared by `--verify`.
    pub verified_keys: Option<u64>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A source lease as the target stores it: same id and TTL, the same time
/// left (none when it is gone from the source: it expires at once, as it
/// did there).
pub(crate) fn lease_record(id: i64, lease: Option<SourceLease>, now_ms: i64) -> LeaseRecord {
    match lease {
        Some(l) => LeaseRecord {
            id,
            ttl: l.granted_ttl.max(1),
            expires_at_ms: now_ms.saturating_add(l.remaining_ttl.max(0).saturating_mul(1000)),
        },
        None => LeaseRecord {
            id,
            ttl: 1,
            expires_at_ms: now_ms,
        },
    }
}

/// Runs an import; `stop` ends following (the import then catches up to
/// the source's revision at that moment before it finishes).
pub async fn run(options: ImportOptions, stop: impl Future<Output = ()>) -> Result<ImportReport> {
    let etcd = Etcd::connect(&options.from, &options.tls).await?;
    let (head, cluster) = etcd.head().await?;
    let source = format!("import from etcd cluster {cluster:x} at {}", etcd.url());
    info!(%source, revision = head, "source");
    let target = Target::open(options.topology.clone()).await?;
    for shard in &target.shards {
        crate::routers::none_serving(&shard.name, shard.bulk.as_ref()).await?;
    }
    let mut report = ImportReport::default();

    let contents = target.contents().await?;
    let states = target.import_states().await?;
    let resuming = resume_point(&target, &contents, &states, cluster, options.follow)?;
    let (from, skip_to) = match resuming {
        Some((from, skip_to)) => {
            info!(from, "resuming an import that was following its source");
            (from, skip_to)
        }
        None => {
            let copied = copy(&etcd, &target, &source, head).await?;
            report.copied_at = head;
            report.keys = copied.0;
            report.leases = copied.1;
            (head + 1, vec![head; target.shards.len()])
        }
    };
    report.revision = from - 1;
    if options.follow {
        target
            .set_import_state(&ImportState {
                source: source.clone(),
                revision: from - 1,
                phase: ImportPhase::Following,
            })
            .await?;
        report.revision = follow::run(&etcd, &target, from, skip_to, stop).await?;
    }
    // Every shard's counter reaches the last source revision (compaction
    // stays where the copy put it).
    target
        .raise(Revisions {
            current: report.revision,
            compacted: 0,
            epoch: 0,
        })
        .await?;
    target.set_placement().await?;
    target
        .set_import_state(&ImportState {
            source,
            revision: report.revision,
            phase: ImportPhase::Done,
        })
        .await?;
    info!(revision = report.revision, "import done");
    if options.verify {
        // Leases only match exactly after a follow brought them up to date.
        let verified = verify::run(&etcd, &target, report.revision, options.follow).await?;
        report.verified_keys = Some(verified);
    }
    Ok(report)
}

/// Where a `--follow` import that was interrupted goes on from, with what
/// each shard already has; None for a new import. Anything else already in
/// the target is refused.
fn resume_point(
    target: &Target,
    contents: &[kubeshard_shard_worker::bulk::Contents],
    states: &[Option<ImportState>],
    cluster: u64,
    follow: bool,
) -> Result<Option<(i64, Vec<i64>)>> {
    if contents.iter().all(|c| c.is_empty()) && states.iter().all(Option::is_none) {
        return Ok(None);
    }
    let ours = format!("import from etcd cluster {cluster:x} at ");
    // Every shard following (or already done: a stop that was writing the
    // final phase when it was cut short).
    let following = states.iter().all(|s| {
        s.as_ref().is_some_and(|s| {
            matches!(s.phase, ImportPhase::Following | ImportPhase::Done)
                && s.source.starts_with(&ours)
        })
    }) && states.iter().any(|s| {
        s.as_ref()
            .is_some_and(|s| s.phase == ImportPhase::Following)
    });
    if follow && following {
        let counters: Vec<i64> = contents.iter().map(|c| c.revisions.current).collect();
        let from = counters.iter().copied().min().unwrap_or(0) + 1;
        return Ok(Some((from, counters)));
    }
    for ((shard, c), state) in target.shards.iter().zip(contents).zip(states) {
        if c.is_empty() && state.is_none() {
            continue;
        }
        let what = match state {
            Some(s) => format!(
                "an {} stopped while {} at revision {}{}",
                s.source,
                s.phase.as_str(),
                s.revision,
                if s.phase == ImportPhase::Following {
                    "; run again with --follow to go on"
                } else {
                    ""
                }
            ),
            None => format!(
                "{} keys, {} history rows, {} leases, revision {}",
                c.live_keys, c.history_rows, c.leases, c.revisions.current
            ),
        };
        return Err(TransferError::NotEmpty {
            shard: shard.name.clone(),
            what,
        });
    }
    Ok(None)
}

/// Copies keys and leases at `revision`; returns (keys, leases).
async fn copy(etcd: &Etcd, target: &Target, source: &str, revision: i64) -> Result<(u64, usize)> {
    target
        .set_import_state(&ImportState {
            source: source.to_string(),
            revision,
            phase: ImportPhase::Copying,
        })
        .await?;
    let started = Instant::now();
    let mut logged = Instant::now();
    let mut from = b"\0".to_vec();
    let mut keys = 0u64;
    let mut leased = BTreeSet::new();
    loop {
        let (kvs, more) = etcd
            .page(&from, b"\0", revision, PAGE)
            .await
            .map_err(|e| compacted_or(e, revision))?;
        let Some(last) = kvs.last() else { break };
        from = last.key.clone();
        from.push(0);
        keys += kvs.len() as u64;
        leased.extend(kvs.iter().map(|kv| kv.lease).filter(|l| *l != 0));
        target
            .apply(kvs.into_iter().map(Change::Put).collect(), 0, &[])
            .await?;
        if logged.elapsed() > Duration::from_secs(10) {
            info!(keys, "copying");
            logged = Instant::now();
        }
        if !more {
            break;
        }
    }
    // Leases: every one the source has, and those its keys name but that
    // expired since `revision` (they expire here too, with their keys).
    let now = now_ms();
    let mut records = Vec::new();
    for lease in etcd.leases().await? {
        leased.remove(&lease.id);
        records.push(lease_record(lease.id, Some(lease), now));
    }
    records.extend(leased.into_iter().map(|id| lease_record(id, None, now)));
    target.put_leases(&records).await?;
    // As etcd after compacting at `revision`: nothing older can be read.
    target
        .raise(Revisions {
            current: revision,
            compacted: revision,
            epoch: 0,
        })
        .await?;
    info!(
        keys,
        leases = records.len(),
        revision,
        seconds = started.elapsed().as_secs_f64(),
        "copied"
    );
    Ok((keys, records.len()))
}

/// A source error that says the revision was compacted becomes
/// [`TransferError::Compacted`].
pub(crate) fn compacted_or(e: TransferError, needed: i64) -> TransferError {
    match e {
        TransferError::Source(detail) if detail.contains("compacted") => {
            TransferError::Compacted { needed, detail }
        }
        other => other,
    }
}
