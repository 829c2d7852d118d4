//! `kubeshard reshard --from OLD.toml --to NEW.toml` (offline: no router
//! serves either topology while it runs): moves every key whose shard
//! changes to its new shard with its whole retained history, keeping
//! revisions, so that reads at retained revisions, watches from them and
//! leases behave as before.
//!
//! Shards are databases: a shard of both files on the same database (same
//! server and database name, or SQLite file) stays where it is. For every
//! database of either file, each history row and live row whose key the new
//! topology puts on another database is copied there, then removed here;
//! then every database of the new topology gets every lease and a revision
//! counter and compaction revision at least the highest of all, so new
//! revisions stay above every moved one (revisions.md, invariant 1). Every
//! step can run again, so a move that stopped half-way is finished by
//! running the same command again; until then routers refuse the databases
//! (`ks_import`).

use std::collections::HashMap;
use std::sync::Arc;

use kubeshard_config::Topology;
use kubeshard_proto::mvccpb::KeyValue;
use kubeshard_shard_worker::bulk::{Bulk, HistoryRow, ImportPhase, ImportState};
use kubeshard_shard_worker::{Revisions, open_bulk, open_store};
use tracing::info;

use crate::error::{Result, TransferError};

/// Rows read per page.
const PAGE: usize = 1000;

#[derive(Debug, Clone)]
pub struct ReshardOptions {
    pub from: Topology,
    pub to: Topology,
    /// Check afterwards that every key is on the database the new topology
    /// puts it.
    pub verify: bool,
    /// Routers keep serving (`online.rs`).
    pub online: bool,
}

/// What a reshard did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReshardReport {
    pub history_rows_moved: u64,
    pub live_keys_moved: u64,
    /// The revision and compaction revision every new shard is at.
    pub revisions: Option<Revisions>,
    /// Keys checked by `verify`.
    pub verified_keys: Option<u64>,
}

/// One database, with the shards naming it.
#[derive(Debug)]
pub(crate) struct Database {
    pub(crate) names: Vec<String>,
    pub(crate) bulk: Arc<dyn Bulk>,
}

impl Database {
    pub(crate) fn fail(&self, error: kubeshard_shard_worker::ShardError) -> TransferError {
        TransferError::Target {
            shard: self.names.join("/"),
            error,
        }
    }

    /// Visits every history row, a page at a time, in primary-key order
    /// (rows the visit removes do not disturb the walk).
    pub(crate) async fn each_history_page(
        &self,
        visit: impl AsyncFnMut(Vec<HistoryRow>) -> Result<()>,
    ) -> Result<()> {
        self.each_history_page_after((i64::MIN, i64::MIN), visit)
            .await
            .map(|_| ())
    }

    /// [`Database::each_history_page`] from after `after` (revision,
    /// sub); returns where it ended.
    pub(crate) async fn each_history_page_after(
        &self,
        mut after: (i64, i64),
        mut visit: impl AsyncFnMut(Vec<HistoryRow>) -> Result<()>,
    ) -> Result<(i64, i64)> {
        loop {
            let page = self
                .bulk
                .history_page(after, PAGE)
                .await
                .map_err(|e| self.fail(e))?;
            let Some(last) = page.last() else {
                return Ok(after);
            };
            after = (last.revision, last.sub);
            visit(page).await?;
        }
    }

    /// Visits every live row, a page at a time, in key order.
    pub(crate) async fn each_live_page(
        &self,
        mut visit: impl AsyncFnMut(Vec<KeyValue>) -> Result<()>,
    ) -> Result<()> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .bulk
                .live_page(after.as_deref(), PAGE)
                .await
                .map_err(|e| self.fail(e))?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = Some(last.key.clone());
            visit(page).await?;
        }
    }
}

/// The databases of both topologies, each opened once, and where the
/// shards of each topology are among them.
pub(crate) struct Databases {
    pub(crate) all: Vec<Database>,
    /// Index in `all` of each shard of the new topology.
    pub(crate) new: Vec<usize>,
    /// The same for the old topology.
    pub(crate) old: Vec<usize>,
    pub(crate) old_default: usize,
}

pub(crate) async fn open(options: &ReshardOptions) -> Result<Databases> {
    let mut all: Vec<Database> = Vec::new();
    let mut by_identity: HashMap<String, usize> = HashMap::new();
    let mut by_token: HashMap<String, usize> = HashMap::new();
    let mut new = Vec::new();
    let mut old = Vec::new();
    for (topology, is_new) in [(&options.from, false), (&options.to, true)] {
        for spec in topology.shards() {
            let identity = spec.endpoint.identity().ok_or_else(|| {
                TransferError::Config(format!(
                    "shard {}: a database in memory cannot be resharded",
                    spec.name
                ))
            })?;
            let index = match by_identity.get(&identity) {
                Some(i) => {
                    if !all[*i].names.contains(&spec.name) {
                        all[*i].names.push(spec.name.clone());
                    }
                    *i
                }
                None => {
                    let fail = |error| TransferError::Target {
                        shard: spec.name.clone(),
                        error,
                    };
                    // Creates the database and its schema when new.
                    open_store(&spec.endpoint, kubeshard_shard_worker::RevisionClass::ALL)
                        .await
                        .map_err(fail)?;
                    let bulk = open_bulk(&spec.endpoint).await.map_err(fail)?;
                    // Two URLs may reach one database (a path written two
                    // ways, a host name and its address): its token tells.
                    let mut token = bulk.database_id().await.map_err(fail)?;
                    if let Some(&i) = by_token.get(&token) {
                        // The same database, or a copy of it (which has the
                        // same token): a new token on the one seen before
                        // tells.
                        let renewed = all[i]
                            .bulk
                            .renew_database_id()
                            .await
                            .map_err(|e| all[i].fail(e))?;
                        by_token.remove(&token);
                        by_token.insert(renewed, i);
                        token = bulk.database_id().await.map_err(fail)?;
                    }
                    let index = match by_token.get(&token) {
                        Some(i) => {
                            if !all[*i].names.contains(&spec.name) {
                                all[*i].names.push(spec.name.clone());
                            }
                            *i
                        }
                        None => {
                            all.push(Database {
                                names: vec![spec.name.clone()],
                                bulk,
                            });
                            by_token.insert(token, all.len() - 1);
                            all.len() - 1
                        }
                    };
                    by_identity.insert(identity, index);
                    index
                }
            };
            if is_new {
                new.push(index);
            } else {
                old.push(index);
            }
        }
    }
    let old_default = old[options.from.default_shard().index()];
    Ok(Databases {
        all,
        new,
        old,
        old_default,
    })
}

pub async fn run(options: ReshardOptions, describe: &str) -> Result<ReshardReport> {
    if options.online {
        return crate::online::run(options).await;
    }
    let dbs = open(&options).await?;
    for db in &dbs.all {
        crate::routers::none_serving(&db.names.join("/"), db.bulk.as_ref()).await?;
    }
    let to = &options.to;
    let home = |key: &[u8]| dbs.new[to.route(key).index()];
    let mut report = ReshardReport::default();
    let mut highest = Revisions {
        current: 0,
        compacted: 0,
        epoch: 0,
    };
    for db in &dbs.all {
        let c = db.bulk.contents().await.map_err(|e| db.fail(e))?;
        highest.current = highest.current.max(c.revisions.current);
        highest.compacted = highest.compacted.max(c.revisions.compacted);
        highest.epoch = highest.epoch.max(c.revisions.epoch);
    }
    // The data must be arranged for the old topology (or already for the
    // new one: a reshard that ran before).
    let old_default = &dbs.all[dbs.old_default];
    let stored = old_default
        .bulk
        .placement()
        .await
        .map_err(|e| old_default.fail(e))?;
    let (from_placement, to_placement) = (options.from.placement(), options.to.placement());
    if let Some(stored) = stored.filter(|p| *p != from_placement && *p != to_placement) {
        return Err(TransferError::Config(format!(
            "the data is arranged for neither --from nor --to; it is arranged for:\n{stored}"
        )));
    }
    let state = |phase| ImportState {
        source: describe.to_string(),
        revision: highest.current,
        phase,
    };
    for db in &dbs.all {
        db.bulk
            .set_import_state(&state(ImportPhase::Copying))
            .await
            .map_err(|e| db.fail(e))?;
    }
    for (here, db) in dbs.all.iter().enumerate() {
        let (history, live) = move_out(&dbs, here, &home).await?;
        if history + live > 0 {
            info!(shard = %db.names.join("/"), history_rows = history, live_keys = live, "moved out");
        }
        report.history_rows_moved += history;
        report.live_keys_moved += live;
    }
    // Every lease on every shard of the new topology, as the old default
    // shard has it (KeepAlive renews the leases there, not their copies);
    // the counters and the compaction revision at least the highest of any
    // database.
    let old_default = &dbs.all[dbs.old_default];
    let leases = old_default
        .bulk
        .leases()
        .await
        .map_err(|e| old_default.fail(e))?;
    for &i in &dbs.new {
        let db = &dbs.all[i];
        db.bulk.put_leases(&leases).await.map_err(|e| db.fail(e))?;
        db.bulk.raise(highest).await.map_err(|e| db.fail(e))?;
    }
    // Every database, also those the new topology leaves out: a router
    // started with the old file on one of them must not serve, and one
    // still running with it (started after the check above) can neither
    // read nor write them (`store/fence.rs`).
    for db in &dbs.all {
        db.bulk
            .set_placement(&to_placement, true)
            .await
            .map_err(|e| db.fail(e))?;
        db.bulk
            .fence(highest.epoch + 1, highest.current)
            .await
            .map_err(|e| db.fail(e))?;
    }
    for db in &dbs.all {
        // Keys moved in carry revisions below the index's mark; a run that
        // finishes an earlier one may not know which databases got keys.
        db.bulk.reset_label_index().await.map_err(|e| db.fail(e))?;
        db.bulk
            .set_import_state(&state(ImportPhase::Done))
            .await
            .map_err(|e| db.fail(e))?;
    }
    report.revisions = Some(highest);
    info!(
        history_rows = report.history_rows_moved,
        live_keys = report.live_keys_moved,
        revision = highest.current,
        compacted = highest.compacted,
        "reshard done"
    );
    if options.verify {
        report.verified_keys = Some(verify(&dbs, &home).await?);
    }
    Ok(report)
}

/// Copies the rows of database `here` whose keys belong elsewhere to where
/// they belong, then removes them here. Returns the history rows and live
/// keys copied (0 for rows a run before already copied).
async fn move_out(
    dbs: &Databases,
    here: usize,
    home: &impl Fn(&[u8]) -> usize,
) -> Result<(u64, u64)> {
    let source = &dbs.all[here];
    // History first, in revision order, then live rows: a key's live row
    // arrives after its history.
    let mut history = 0u64;
    source
        .each_history_page(async |page| {
            let mut per_home: HashMap<usize, Vec<HistoryRow>> = HashMap::new();
            for row in page {
                let to = home(&row.key);
                if to != here {
                    per_home.entry(to).or_default().push(row);
                }
            }
            for (to, rows) in per_home {
                let target = &dbs.all[to];
                history += target
                    .bulk
                    .append_history(&rows)
                    .await
                    .map_err(|e| target.fail(e))?;
            }
            Ok(())
        })
        .await?;
    let mut live = 0u64;
    source
        .each_live_page(async |page| {
            let mut per_home: HashMap<usize, Vec<KeyValue>> = HashMap::new();
            for kv in page {
                let to = home(&kv.key);
                if to != here {
                    per_home.entry(to).or_default().push(kv);
                }
            }
            for (to, kvs) in per_home {
                let target = &dbs.all[to];
                live += kvs.len() as u64;
                target
                    .bulk
                    .upsert_live(&kvs)
                    .await
                    .map_err(|e| target.fail(e))?;
            }
            Ok(())
        })
        .await?;
    // Everything is where it belongs: remove it here (also what an earlier
    // run copied and did not get to remove).
    source
        .each_history_page(async |page| {
            let gone: Vec<(i64, i64)> = page
                .iter()
                .filter(|r| home(&r.key) != here)
                .map(|r| (r.revision, r.sub))
                .collect();
            source
                .bulk
                .delete_history(&gone)
                .await
                .map_err(|e| source.fail(e))
        })
        .await?;
    source
        .each_live_page(async |page| {
            let gone: Vec<Vec<u8>> = page
                .into_iter()
                .filter(|kv| home(&kv.key) != here)
                .map(|kv| kv.key)
                .collect();
            source
                .bulk
                .delete_live(&gone)
                .await
                .map_err(|e| source.fail(e))
        })
        .await?;
    Ok((history, live))
}

/// Every key of every database is on the database the new topology puts
/// it; returns the live keys seen.
pub(crate) async fn verify(dbs: &Databases, home: &impl Fn(&[u8]) -> usize) -> Result<u64> {
    let mut misplaced = Vec::new();
    let mut keys = 0u64;
    for (here, db) in dbs.all.iter().enumerate() {
        let place = db.names.join("/");
        db.each_live_page(async |page| {
            keys += page.len() as u64;
            misplaced.extend(
                page.iter()
                    .filter(|kv| home(&kv.key) != here)
                    .map(|kv| format!("{} is on {place}", kv.key.escape_ascii())),
            );
            Ok(())
        })
        .await?;
        db.each_history_page(async |page| {
            misplaced.extend(page.iter().filter(|r| home(&r.key) != here).map(|r| {
                format!(
                    "history of {} at {} is on {place}",
                    r.key.escape_ascii(),
                    r.revision
                )
            }));
            Ok(())
        })
        .await?;
    }
    if !misplaced.is_empty() {
        return Err(TransferError::Misplaced {
            count: misplaced.len(),
            shown: misplaced
                .iter()
                .take(20)
                .map(|m| format!("  {m}\n"))
                .collect(),
        });
    }
    info!(keys, "every key is on its shard");
    Ok(keys)
}
