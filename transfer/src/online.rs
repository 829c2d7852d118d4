//! `kubeshard reshard --online`: moves the keys whose database changes
//! while routers keep serving (docs/topology.md, "Online").
//!
//! The default shard's database records the move (`ks_reshard`), which
//! routers read; each phase can be run again after a crash:
//!
//! 1. **copying**: the history of the moving keys is copied to their new
//!    databases, and copied again from where the last pass ended until a
//!    pass finds nothing new, while routers write on in the old topology.
//!    Keys may only move to databases the old topology does not use, so
//!    no router reads what is copied before the switch.
//! 2. **fencing**: the placement becomes the new one and every database of
//!    both topologies is fenced at the next topology version
//!    (`shard-worker/src/store/fence.rs`): routers of the old topology can
//!    no longer read or write any of them, and a write under way has
//!    committed. Then every counter is raised to the switch revision W,
//!    the highest of all, so every revision of the new topology is above
//!    every revision of the old; the new databases get the leases.
//! 3. **fenced**: routers serve the new topology at W, except keys that
//!    change database (and what may touch them: ranges, lease revocation),
//!    which wait. The command copies what the last pass missed (nothing
//!    can be written to a moving key any more), makes the new databases'
//!    live rows equal the old ones', and removes the moved rows from where
//!    they were.
//! 4. **done**: routers serve everything.

use std::collections::{BTreeMap, HashMap};

use kubeshard_proto::mvccpb::KeyValue;
use kubeshard_shard_worker::Revisions;
use kubeshard_shard_worker::bulk::{HistoryRow, Reshard, ReshardPhase};
use tracing::info;

use crate::error::{Result, TransferError};
use crate::reshard::{Database, Databases, ReshardOptions, ReshardReport};

/// Live rows compared or written per statement.
const PAGE: usize = 1000;

/// A copy pass that moved fewer history rows than this is the last one
/// before the switch: what is left is copied while moving keys wait.
const CAUGHT_UP_ROWS: u64 = 100;

/// Copy passes before the switch, at most: under a write rate the copy
/// cannot keep up with, the switch comes anyway and moving keys wait for
/// the rest.
const MAX_PASSES: usize = 20;

pub async fn run(options: ReshardOptions) -> Result<ReshardReport> {
    let dbs = crate::reshard::open(&options).await?;
    let plan = Plan::new(&options, &dbs)?;
    let default = &dbs.all[dbs.old_default];
    let to_placement = options.to.placement();
    let recorded = default.bulk.reshard().await.map_err(|e| default.fail(e))?;
    let stored = default
        .bulk
        .placement()
        .await
        .map_err(|e| default.fail(e))?;
    let mut reshard = match recorded {
        Some(r) if r.placement == to_placement && r.phase != ReshardPhase::Done => {
            info!(
                phase = r.phase.as_str(),
                version = r.version,
                "resuming the move"
            );
            r
        }
        Some(r) if r.placement == to_placement && stored.as_deref() == Some(&to_placement) => {
            info!("the data is arranged for --to already");
            return Ok(ReshardReport::default());
        }
        Some(r) if r.phase != ReshardPhase::Done => {
            return Err(TransferError::Config(format!(
                "another move is under way (to topology version {}, {}): run it again to \
                 finish it first",
                r.version,
                r.phase.as_str()
            )));
        }
        _ => {
            if stored.as_deref() != Some(&options.from.placement()) {
                return Err(TransferError::Config(format!(
                    "the data is not arranged for --from; it is arranged for:\n{}",
                    stored
                        .as_deref()
                        .unwrap_or("(nothing recorded yet: start a router first)")
                )));
            }
            let current = default
                .bulk
                .revisions()
                .await
                .map_err(|e| default.fail(e))?;
            Reshard {
                version: current.epoch + 1,
                placement: to_placement.clone(),
                phase: ReshardPhase::Copying,
                held: options
                    .to
                    .shards()
                    .iter()
                    .zip(&dbs.new)
                    .filter(|(_, db)| plan.fresh.contains(db))
                    .map(|(spec, _)| spec.name.clone())
                    .collect(),
                switch_revision: 0,
            }
        }
    };
    let mut report = ReshardReport::default();
    // Where the copy passes ended, per source: the last step copies what
    // came after. Unknown to a command that resumes later than copying.
    let mut copied_to = None;
    if reshard.phase == ReshardPhase::Copying {
        record(default, &reshard).await?;
        copied_to = Some(copy_until_caught_up(&dbs, &plan, &mut report).await?);
        reshard.phase = ReshardPhase::Fencing;
        record(default, &reshard).await?;
    }
    if reshard.phase == ReshardPhase::Fencing {
        reshard.switch_revision = fence(&dbs, &plan, &to_placement, reshard.version).await?;
        reshard.phase = ReshardPhase::Fenced;
        record(default, &reshard).await?;
        info!(
            version = reshard.version,
            switch_revision = reshard.switch_revision,
            "fenced: routers serve the new topology; moving keys wait"
        );
    }
    if reshard.phase == ReshardPhase::Fenced {
        finish(&dbs, &plan, copied_to.as_ref(), &mut report).await?;
        reshard.phase = ReshardPhase::Done;
        record(default, &reshard).await?;
    }
    report.revisions = Some(Revisions {
        current: reshard.switch_revision,
        compacted: 0,
        epoch: reshard.version,
    });
    info!(
        history_rows = report.history_rows_moved,
        live_keys = report.live_keys_moved,
        version = reshard.version,
        switch_revision = reshard.switch_revision,
        "online reshard done"
    );
    if options.verify {
        report.verified_keys = Some(crate::reshard::verify(&dbs, &|key| plan.home(key)).await?);
    }
    Ok(report)
}

/// Records how far the move got, in the default shard (routers follow it).
async fn record(default: &Database, reshard: &Reshard) -> Result<()> {
    default
        .bulk
        .set_reshard(reshard)
        .await
        .map_err(|e| default.fail(e))
}

/// Where keys go: the databases of both topologies, by index in
/// [`Databases::all`].
struct Plan<'t> {
    options: &'t ReshardOptions,
    new: Vec<usize>,
    /// Databases the old topology does not use: the only ones keys may
    /// move to while routers serve.
    fresh: Vec<usize>,
    /// Databases that may hold keys now.
    sources: Vec<usize>,
}

impl<'t> Plan<'t> {
    fn new(options: &'t ReshardOptions, dbs: &Databases) -> Result<Self> {
        let old_default = dbs.old_default;
        let new_default = dbs.new[options.to.default_shard().index()];
        if old_default != new_default {
            return Err(TransferError::Config(format!(
                "online, the default shard's database must stay the same ({} in --from, {} in \
                 --to): it holds leases and the record of the move routers follow; move it \
                 with routers stopped",
                dbs.all[old_default].names.join("/"),
                dbs.all[new_default].names.join("/")
            )));
        }
        let mut sources = dbs.old.clone();
        sources.sort_unstable();
        sources.dedup();
        let mut fresh: Vec<usize> = dbs
            .new
            .iter()
            .copied()
            .filter(|i| !dbs.old.contains(i))
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        Ok(Plan {
            options,
            new: dbs.new.clone(),
            fresh,
            sources,
        })
    }

    /// The database the new topology puts `key` on.
    fn home(&self, key: &[u8]) -> usize {
        self.new[self.options.to.route(key).index()]
    }

    /// Where `key`, now on database `here`, goes: None if it stays. An
    /// error if it would go to a database the old topology uses (routers
    /// would read it there before the switch).
    fn destination(&self, dbs: &Databases, here: usize, key: &[u8]) -> Result<Option<usize>> {
        let home = self.home(key);
        if home == here {
            return Ok(None);
        }
        if !self.fresh.contains(&home) {
            return Err(TransferError::Config(format!(
                "online, keys may only move to databases --from does not use; {} would move \
                 from {} to {}: move it with routers stopped (without --online)",
                key.escape_ascii(),
                dbs.all[here].names.join("/"),
                dbs.all[home].names.join("/")
            )));
        }
        Ok(Some(home))
    }
}

fn live_of(row: &HistoryRow) -> KeyValue {
    KeyValue {
        key: row.key.clone(),
        create_revision: row.create_revision,
        mod_revision: row.revision,
        version: row.version,
        value: row.value.clone(),
        lease: row.lease,
    }
}

/// Copies the history rows of moving keys on `source` after `after` to
/// their new databases, applying each to the live rows there too; returns
/// where it ended and the rows copied.
async fn copy_history(
    dbs: &Databases,
    plan: &Plan<'_>,
    source: usize,
    after: (i64, i64),
) -> Result<((i64, i64), u64)> {
    let mut copied = 0u64;
    let end = dbs.all[source]
        .each_history_page_after(after, async |page| {
            let mut per_home: BTreeMap<usize, Vec<HistoryRow>> = BTreeMap::new();
            for row in page {
                if let Some(to) = plan.destination(dbs, source, &row.key)? {
                    per_home.entry(to).or_default().push(row);
                }
            }
            for (to, rows) in per_home {
                let target = &dbs.all[to];
                copied += target
                    .bulk
                    .append_history(&rows)
                    .await
                    .map_err(|e| target.fail(e))?;
                // The rows in revision order: the last one of a key wins.
                let mut live: BTreeMap<&[u8], Option<KeyValue>> = BTreeMap::new();
                for row in &rows {
                    live.insert(&row.key, (!row.deleted).then(|| live_of(row)));
                }
                let (puts, deletes): (Vec<_>, Vec<_>) =
                    live.into_iter().partition(|(_, kv)| kv.is_some());
                let puts: Vec<KeyValue> = puts.into_iter().filter_map(|(_, kv)| kv).collect();
                let deletes: Vec<Vec<u8>> = deletes.into_iter().map(|(k, _)| k.to_vec()).collect();
                let (mut puts, mut deletes) = (puts, deletes);
                write_live(target, &mut puts, &mut deletes).await?;
            }
            Ok(())
        })
        .await?;
    Ok((end, copied))
}

/// Where each source's history was copied up to: (revision, sub).
type Positions = HashMap<usize, (i64, i64)>;

/// Copy passes over every source until one finds little new; returns
/// where they ended.
async fn copy_until_caught_up(
    dbs: &Databases,
    plan: &Plan<'_>,
    report: &mut ReshardReport,
) -> Result<Positions> {
    let mut positions: Positions = plan
        .sources
        .iter()
        .map(|s| (*s, (i64::MIN, i64::MIN)))
        .collect();
    for pass in 1..=MAX_PASSES {
        let mut copied = 0;
        for &source in &plan.sources {
            let after = positions
                .get(&source)
                .copied()
                .unwrap_or((i64::MIN, i64::MIN));
            let (end, rows) = copy_history(dbs, plan, source, after).await?;
            positions.insert(source, end);
            copied += rows;
        }
        report.history_rows_moved += copied;
        info!(pass, history_rows = copied, "copied");
        if copied < CAUGHT_UP_ROWS {
            break;
        }
    }
    Ok(positions)
}

/// Fences every database at `version`, then raises each to the highest
/// counter of all, which it returns; records the new placement first and
/// gives the new databases every lease and the compaction revision.
async fn fence(dbs: &Databases, plan: &Plan<'_>, to_placement: &str, version: i64) -> Result<i64> {
    // A router starting from now on must have the new file.
    for db in &dbs.all {
        db.bulk
            .set_placement(to_placement, true)
            .await
            .map_err(|e| db.fail(e))?;
    }
    let mut highest = Revisions {
        current: 0,
        compacted: 0,
        epoch: version,
    };
    for db in &dbs.all {
        let fenced = db.bulk.fence(version, 0).await.map_err(|e| db.fail(e))?;
        info!(shard = %db.names.join("/"), revision = fenced.current, "fenced");
        highest.current = highest.current.max(fenced.current);
        highest.compacted = highest.compacted.max(fenced.compacted);
    }
    // Nothing is written anywhere now: W is above every revision of the
    // old topology.
    for db in &dbs.all {
        db.bulk
            .fence(version, highest.current)
            .await
            .map_err(|e| db.fail(e))?;
    }
    let default = &dbs.all[dbs.old_default];
    let leases = default.bulk.leases().await.map_err(|e| default.fail(e))?;
    for &i in &plan.fresh {
        let db = &dbs.all[i];
        let stale: Vec<i64> = db
            .bulk
            .leases()
            .await
            .map_err(|e| db.fail(e))?
            .iter()
            .map(|l| l.id)
            .filter(|id| !leases.iter().any(|l| l.id == *id))
            .collect();
        db.bulk
            .delete_leases(&stale)
            .await
            .map_err(|e| db.fail(e))?;
        db.bulk.put_leases(&leases).await.map_err(|e| db.fail(e))?;
        db.bulk.raise(highest).await.map_err(|e| db.fail(e))?;
    }
    Ok(highest.current)
}

/// After the switch: the last history rows (after `copied_to`, or all of
/// them for a command that resumed: rows already there are skipped), the
/// live rows made equal, the moved rows removed from the old databases,
/// the label indexes rebuilt. Moving keys wait for this.
async fn finish(
    dbs: &Databases,
    plan: &Plan<'_>,
    copied_to: Option<&Positions>,
    report: &mut ReshardReport,
) -> Result<()> {
    for &source in &plan.sources {
        let after = copied_to
            .and_then(|p| p.get(&source).copied())
            .unwrap_or((i64::MIN, i64::MIN));
        let (_, rows) = copy_history(dbs, plan, source, after).await?;
        report.history_rows_moved += rows;
    }
    for &dest in &plan.fresh {
        let mut keys = 0;
        for &source in &plan.sources {
            keys += sync_live(dbs, plan, source, dest).await?;
        }
        info!(shard = %dbs.all[dest].names.join("/"), live_keys = keys, "moved in");
        report.live_keys_moved += keys;
    }
    for &source in &plan.sources {
        remove_moved(dbs, plan, source).await?;
    }
    for &i in plan.sources.iter().chain(&plan.fresh) {
        let db = &dbs.all[i];
        db.bulk.reset_label_index().await.map_err(|e| db.fail(e))?;
    }
    Ok(())
}

/// Makes the live rows on `dest` of keys that were on `source` equal to
/// those on `source` (a compaction's purge may have removed a tombstone
/// before a pass copied it); returns the live keys there.
async fn sync_live(dbs: &Databases, plan: &Plan<'_>, source: usize, dest: usize) -> Result<u64> {
    let old_home = |kv: &KeyValue| dbs.old[plan.options.from.route(&kv.key).index()] == source;
    let new_home = |kv: &KeyValue| plan.home(&kv.key) == dest;
    let mut ours = LiveCursor::new(&dbs.all[source], &new_home);
    let mut theirs = LiveCursor::new(&dbs.all[dest], &old_home);
    let to = &dbs.all[dest];
    let (mut put, mut gone) = (Vec::new(), Vec::new());
    let mut keys = 0u64;
    // Both in key order: a merge.
    loop {
        let order = match (ours.peek().await?, theirs.peek().await?) {
            (None, None) => break,
            (Some(a), Some(b)) => a.key.cmp(&b.key),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                keys += 1;
                put.extend(ours.pop());
            }
            std::cmp::Ordering::Greater => gone.extend(theirs.pop().map(|kv| kv.key)),
            std::cmp::Ordering::Equal => {
                keys += 1;
                let (a, b) = (ours.pop(), theirs.pop());
                if a != b {
                    put.extend(a);
                }
            }
        }
        if put.len() + gone.len() >= PAGE {
            write_live(to, &mut put, &mut gone).await?;
        }
    }
    write_live(to, &mut put, &mut gone).await?;
    Ok(keys)
}

async fn write_live(db: &Database, put: &mut Vec<KeyValue>, gone: &mut Vec<Vec<u8>>) -> Result<()> {
    if !put.is_empty() {
        db.bulk.upsert_live(put).await.map_err(|e| db.fail(e))?;
        put.clear();
    }
    if !gone.is_empty() {
        db.bulk.delete_live(gone).await.map_err(|e| db.fail(e))?;
        gone.clear();
    }
    Ok(())
}

/// The live rows of a database that `keep` keeps, in key order, a page
/// at a time.
struct LiveCursor<'d> {
    db: &'d Database,
    keep: &'d dyn Fn(&KeyValue) -> bool,
    after: Option<Vec<u8>>,
    /// The rest of the page, last row first.
    page: Vec<KeyValue>,
    end: bool,
}

impl<'d> LiveCursor<'d> {
    fn new(db: &'d Database, keep: &'d dyn Fn(&KeyValue) -> bool) -> Self {
        LiveCursor {
            db,
            keep,
            after: None,
            page: Vec::new(),
            end: false,
        }
    }

    async fn peek(&mut self) -> Result<Option<&KeyValue>> {
        while self.page.is_empty() && !self.end {
            let page = self
                .db
                .bulk
                .live_page(self.after.as_deref(), PAGE)
                .await
                .map_err(|e| self.db.fail(e))?;
            match page.last() {
                Some(last) => self.after = Some(last.key.clone()),
                None => self.end = true,
            }
            self.page = page
                .into_iter()
                .rev()
                .filter(|kv| (self.keep)(kv))
                .collect();
        }
        Ok(self.page.last())
    }

    fn pop(&mut self) -> Option<KeyValue> {
        self.page.pop()
    }
}

/// Removes from `source` the history and live rows of keys that live
/// elsewhere now.
async fn remove_moved(dbs: &Databases, plan: &Plan<'_>, source: usize) -> Result<()> {
    let db: &Database = &dbs.all[source];
    db.each_history_page(async |page| {
        let gone: Vec<(i64, i64)> = page
            .iter()
            .filter(|r| plan.home(&r.key) != source)
            .map(|r| (r.revision, r.sub))
            .collect();
        db.bulk.delete_history(&gone).await.map_err(|e| db.fail(e))
    })
    .await?;
    db.each_live_page(async |page| {
        let gone: Vec<Vec<u8>> = page
            .into_iter()
            .filter(|kv| plan.home(&kv.key) != source)
            .map(|kv| kv.key)
            .collect();
        db.bulk.delete_live(&gone).await.map_err(|e| db.fail(e))
    })
    .await
}
