//! The shards behind this router and the one revision space over them
//! (docs/architecture.md, "Shards"; ../shared/design/revisions.md).
//!
//! - Each shard hands out its own class of revisions (shard i of n takes
//!   i mod n), so revisions are unique across shards with no central
//!   allocator.
//! - The router's *floor* is the highest revision it has seen on any shard
//!   (a Lamport clock). A write goes to its shard behind a Bump to the floor,
//!   so it gets a revision above everything this router acknowledged; a read
//!   first raises a lagging shard to the floor, so its header never goes
//!   back.
//! - `advance` raises idle shards on demand, so merged watches and progress
//!   answers, which wait for every shard behind them, keep moving.
//!
//! A `Shards` is one topology version: when the topology changes online
//! (`topology_change.rs`) the router builds the next one, sharing the
//! shards of databases in both, and retires this one; requests take the
//! current one once and keep it (`topology_change::on_topology`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures::future::join_all;
use kubeshard_config::{ShardId, Topology};
use kubeshard_shard_worker::{
    RevisionClass, Serving, Shard, ShardError, ShardObserver, ShardSettings, WriteRequest,
    WriteResponse,
};
use tracing::{debug, info};

use crate::peers::{CatchUp, Peers};

/// Every shard of the topology, opened, with the router's revision floor.
#[derive(Debug)]
pub struct Shards {
    topology: Topology,
    /// The topology version served (`store/fence.rs`).
    version: i64,
    /// Index = [`ShardId::index`]. Shared with the next version's
    /// `Shards` for the databases in both.
    shards: Vec<Arc<Shard>>,
    /// While a move is fenced but not done: the shards whose keys are
    /// still arriving; requests that may touch them wait.
    held: tokio::sync::watch::Sender<BTreeSet<ShardId>>,
    /// Set when a newer version replaces this one: watch streams on it end.
    retired: tokio::sync::watch::Sender<bool>,
    /// The same, for [`Shards::enter_request`] (sequentially consistent
    /// with `requests`).
    retired_now: std::sync::atomic::AtomicBool,
    /// Requests running on this version (`topology_change::Entered`).
    requests: std::sync::atomic::AtomicUsize,
    requests_left: tokio::sync::Notify,
    floor: AtomicI64,
    /// Per shard: a revision its counter is known to have reached.
    known: Vec<AtomicI64>,
    /// Per shard: the highest target an `advance` is working towards.
    advancing: Vec<AtomicI64>,
    /// Other routers over the same databases (`peers.rs`); shared by every
    /// version.
    peers: Arc<Peers>,
    /// This version's counter reads for them.
    catch_up: CatchUp,
    /// `--datastore-timeout`: a request is answered within it.
    limit: std::time::Duration,
}

/// The topology version the data is at: the one the default shard's
/// database is fenced at (every move fences every database it touches).
async fn topology_version(default: &kubeshard_config::topology::Shard) -> Result<i64, ShardError> {
    let bulk = kubeshard_shard_worker::open_bulk(&default.endpoint).await?;
    Ok(bulk.revisions().await?.epoch)
}

/// A shard that could not be opened.
#[derive(Debug)]
pub struct OpenError {
    pub shard: String,
    pub endpoint: String,
    pub location: Option<String>,
    pub error: ShardError,
}

impl Shards {
    /// Opens every shard of `topology` (creating databases when missing),
    /// in parallel, and sets the floor to the highest counter among them.
    /// `observer` gives each shard, by name, what hears of its work. The
    /// topology version served is the one the default shard's database is
    /// fenced at (`store/fence.rs`; the caller checks that the data is
    /// arranged for this topology).
    pub async fn open(
        topology: Topology,
        settings: &ShardSettings,
        observer: impl Fn(&str) -> Arc<dyn ShardObserver>,
    ) -> Result<Arc<Shards>, OpenError> {
        let count = topology.shards().len();
        let fail = |spec: &kubeshard_config::topology::Shard, error| OpenError {
            shard: spec.name.clone(),
            endpoint: spec.endpoint.to_string(),
            location: spec.location.as_ref().map(ToString::to_string),
            error,
        };
        // A shard's own pool size in the topology file wins.
        let settings_of = |spec: &kubeshard_config::topology::Shard| {
            let mut settings = settings.clone();
            settings.pool.max_connections = spec.max_connections.or(settings.pool.max_connections);
            settings
        };
        let connecting = topology.shards().iter().map(|spec| {
            let settings = settings_of(spec);
            let observer = observer(&spec.name);
            async move {
                Shard::connect(&spec.name, &spec.endpoint, &settings, Some(observer))
                    .await
                    .map_err(|error| fail(spec, error))
            }
        });
        let mut stores = Vec::with_capacity(count);
        let mut failed = None;
        for connected in join_all(connecting).await {
            match connected {
                Ok(store) => stores.push(store),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let default_spec = topology.shard(topology.default_shard());
        let version = match topology_version(default_spec).await {
            Ok(version) => version,
            Err(error) => return Err(fail(default_spec, error)),
        };
        let starting =
            topology
                .shards()
                .iter()
                .zip(stores)
                .enumerate()
                .map(|(i, (spec, store))| {
                    let serving = Serving {
                        version,
                        class: RevisionClass::of_shard(i, count).unwrap_or(RevisionClass::ALL),
                    };
                    let settings = settings_of(spec);
                    let observer = observer(&spec.name);
                    async move {
                        Shard::start(&spec.name, store, serving, &settings, Some(observer))
                            .await
                            .map_err(|error| fail(spec, error))
                    }
                });
        let mut shards = Vec::with_capacity(count);
        for opened in join_all(starting).await {
            match opened {
                Ok(shard) => shards.push(Arc::new(shard)),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            for shard in &shards {
                shard.stop();
            }
            return Err(e);
        }
        let mut known = Vec::with_capacity(count);
        let mut floor = 0;
        for shard in &shards {
            let current = shard.hub.closed();
            floor = floor.max(current);
            known.push(AtomicI64::new(current));
        }
        info!(
            shards = count,
            floor,
            topology_version = version,
            "shards open"
        );
        Ok(Arc::new(Shards {
            topology,
            version,
            shards,
            held: tokio::sync::watch::Sender::new(BTreeSet::new()),
            retired: tokio::sync::watch::Sender::new(false),
            retired_now: std::sync::atomic::AtomicBool::new(false),
            requests: std::sync::atomic::AtomicUsize::new(0),
            requests_left: tokio::sync::Notify::new(),
            floor: AtomicI64::new(floor),
            known,
            advancing: (0..count).map(|_| AtomicI64::new(0)).collect(),
            peers: Arc::new(Peers::default()),
            catch_up: CatchUp::default(),
            limit: settings.pool.call_timeout,
        }))
    }

    /// The shards of `topology` at `version`, sharing this version's
    /// shards where the database is the same, opening the others; `held`
    /// names the shards whose keys are still arriving. The shared shards go on serving this
    /// version until [`Shards::serve_all`].
    pub async fn next(
        &self,
        topology: Topology,
        version: i64,
        held: &BTreeSet<String>,
        settings: &ShardSettings,
        observer: impl Fn(&str) -> Arc<dyn ShardObserver>,
    ) -> Result<Arc<Shards>, OpenError> {
        let count = topology.shards().len();
        let mine: std::collections::HashMap<String, &Arc<Shard>> = self
            .topology
            .shards()
            .iter()
            .zip(&self.shards)
            .filter_map(|(spec, shard)| spec.endpoint.identity().map(|i| (i, shard)))
            .collect();
        let mut shards: Vec<Arc<Shard>> = Vec::with_capacity(count);
        let mut opened_here: Vec<Arc<Shard>> = Vec::new();
        let mut held_ids = BTreeSet::new();
        for (i, (id, spec)) in topology.shard_ids().zip(topology.shards()).enumerate() {
            let identity = spec.endpoint.identity();
            if held.contains(&spec.name) {
                held_ids.insert(id);
            }
            if let Some(shard) = identity.as_ref().and_then(|i| mine.get(i)) {
                shards.push((*shard).clone());
                continue;
            }
            let serving = Serving {
                version,
                class: RevisionClass::of_shard(i, count).unwrap_or(RevisionClass::ALL),
            };
            let mut settings = settings.clone();
            settings.pool.max_connections = spec.max_connections.or(settings.pool.max_connections);
            // On a blocking thread of its own: the follower task that
            // switches topology must be Send, and rustc cannot prove that
            // of sqlx's futures inside Shard::open (rust-lang/rust#102211).
            let (name, endpoint) = (spec.name.clone(), spec.endpoint.clone());
            let observer = observer(&spec.name);
            let runtime = tokio::runtime::Handle::current();
            let opened = tokio::task::spawn_blocking(move || {
                runtime.block_on(Shard::open(
                    &name,
                    &endpoint,
                    serving,
                    &settings,
                    Some(observer),
                ))
            })
            .await
            .unwrap_or_else(|e| {
                Err(ShardError::Stopped(format!(
                    "opening the shard failed: {e}"
                )))
            });
            match opened {
                Ok(shard) => {
                    let shard = Arc::new(shard);
                    opened_here.push(shard.clone());
                    shards.push(shard);
                }
                Err(error) => {
                    // Only those opened here: the others serve this version.
                    for shard in &opened_here {
                        shard.stop();
                    }
                    return Err(OpenError {
                        shard: spec.name.clone(),
                        endpoint: spec.endpoint.to_string(),
                        location: spec.location.as_ref().map(ToString::to_string),
                        error,
                    });
                }
            }
        }
        let known = shards
            .iter()
            .map(|s| AtomicI64::new(s.hub.closed()))
            .collect();
        Ok(Arc::new(Shards {
            topology,
            version,
            shards,
            held: tokio::sync::watch::Sender::new(held_ids),
            retired: tokio::sync::watch::Sender::new(false),
            retired_now: std::sync::atomic::AtomicBool::new(false),
            requests: std::sync::atomic::AtomicUsize::new(0),
            requests_left: tokio::sync::Notify::new(),
            floor: AtomicI64::new(self.floor()),
            known,
            advancing: (0..count).map(|_| AtomicI64::new(0)).collect(),
            peers: self.peers.clone(),
            catch_up: CatchUp::default(),
            limit: settings.pool.call_timeout,
        }))
    }

    /// Every shard serves this version, with its revision class in it.
    /// Called once the version before is retired (`topology_change.rs`).
    pub fn serve_all(&self) {
        let count = self.shards.len();
        for (i, shard) in self.shards.iter().enumerate() {
            let class = RevisionClass::of_shard(i, count).unwrap_or(RevisionClass::ALL);
            shard.store.serve(self.version, class);
        }
    }

    /// The topology version served.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// Whether keys of any of `ids` are still arriving.
    pub fn is_held(&self, ids: &[ShardId]) -> bool {
        let held = self.held.borrow();
        ids.iter().any(|id| held.contains(id))
    }

    /// Whether keys of some shard are still arriving.
    pub fn holds_any(&self) -> bool {
        !self.held.borrow().is_empty()
    }

    /// Waits until no key of `ids` is arriving any more. If this version
    /// is retired first, TopologyChanged: the request runs again on the
    /// current one (`topology_change::on_topology`).
    pub async fn hold_off(&self, ids: &[ShardId]) -> Result<(), ShardError> {
        if !self.is_held(ids) {
            return Ok(());
        }
        let mut held = self.held.subscribe();
        let mut retired = self.retired.subscribe();
        tokio::select! {
            _ = held.wait_for(|held| ids.iter().all(|id| !held.contains(id))) => Ok(()),
            _ = retired.wait_for(|r| *r) => Err(ShardError::TopologyChanged {
                stored: self.version + 1,
                serving: self.version,
            }),
        }
    }

    /// Holds the shards named `names` (a router that starts while a move
    /// is fenced and not done).
    pub fn hold(&self, names: &[String]) {
        let ids = self
            .topology
            .shard_ids()
            .filter(|id| names.contains(&self.topology.shard(*id).name))
            .collect();
        self.held.send_replace(ids);
    }

    /// The moved keys are whole: nothing is held any more.
    pub fn release(&self) {
        self.held.send_replace(BTreeSet::new());
    }

    /// A newer version replaces this one.
    pub fn retire(&self) {
        self.retired_now.store(true, Ordering::SeqCst);
        self.retired.send_replace(true);
    }

    pub fn is_retired(&self) -> bool {
        self.retired_now.load(Ordering::SeqCst)
    }

    /// A request starts on this version (`topology_change::Entered`).
    pub fn enter_request(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
    }

    pub fn leave_request(&self) {
        if self.requests.fetch_sub(1, Ordering::SeqCst) == 1 && self.is_retired() {
            self.requests_left.notify_waiters();
        }
    }

    /// Once retired: resolves when no request runs on this version.
    pub async fn requests_left(&self) {
        loop {
            let left = self.requests_left.notified();
            if self.requests.load(Ordering::SeqCst) == 0 {
                return;
            }
            // A missed wake-up costs one tick, not a hang.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(10), left).await;
        }
    }

    /// Resolves once this version is retired.
    pub async fn retired(&self) {
        let mut retired = self.retired.subscribe();
        let _ = retired.wait_for(|r| *r).await;
    }

    /// Whether `shard` is one of this version's.
    pub fn has(&self, shard: &Arc<Shard>) -> bool {
        self.shards.iter().any(|s| Arc::ptr_eq(s, shard))
    }

    /// Raises the floor to at least `floor` (a version taking over from
    /// the one before it).
    pub fn raise_floor(&self, floor: i64) {
        self.floor.fetch_max(floor, Ordering::AcqRel);
    }

    /// The shards of this version that `newer` does not have (their
    /// databases left the topology): stopped once this version is retired.
    pub fn left_in(&self, newer: &Shards) -> Vec<Arc<Shard>> {
        self.shards
            .iter()
            .filter(|s| !newer.shards.iter().any(|n| Arc::ptr_eq(s, n)))
            .cloned()
            .collect()
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn get(&self, id: ShardId) -> &Shard {
        &self.shards[id.index()]
    }

    pub fn all(&self) -> impl Iterator<Item = (ShardId, &Shard)> {
        self.topology.shard_ids().map(|id| (id, self.get(id)))
    }

    pub fn ids(&self) -> Vec<ShardId> {
        self.topology.shard_ids().collect()
    }

    /// The shard that holds leases and answers requests that name no key.
    pub fn default_id(&self) -> ShardId {
        self.topology.default_shard()
    }

    pub fn default_shard(&self) -> &Shard {
        self.get(self.default_id())
    }

    /// The shard of one key.
    pub fn route(&self, key: &[u8]) -> ShardId {
        self.topology.route(key)
    }

    /// The shards that may hold keys of an etcd range (key, range_end); the
    /// default shard for a range that holds no key at all.
    pub fn for_range(&self, key: &[u8], range_end: &[u8]) -> Vec<ShardId> {
        let ids = self.topology.shards_for_etcd_range(key, range_end);
        if ids.is_empty() {
            vec![self.default_id()]
        } else {
            ids
        }
    }

    /// Whether other routers serve the same databases (`peers.rs`).
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// How long a request may take (`--datastore-timeout`).
    pub fn limit(&self) -> std::time::Duration {
        self.limit
    }

    /// While other routers serve: returns once the floor is at least every
    /// revision any router acknowledged before the call (`peers.rs`).
    pub async fn catch_up(&self) -> Result<(), ShardError> {
        self.catch_up.run(&self.peers, self).await
    }

    /// The highest revision this router has seen on any shard.
    pub fn floor(&self) -> i64 {
        self.floor.load(Ordering::Acquire)
    }

    /// Records that shard `id` has reached `revision`.
    pub fn observe(&self, id: ShardId, revision: i64) {
        self.known[id.index()].fetch_max(revision, Ordering::AcqRel);
        self.floor.fetch_max(revision, Ordering::AcqRel);
    }

    /// A revision shard `id` is known to have reached.
    pub fn known(&self, id: ShardId) -> i64 {
        self.known[id.index()].load(Ordering::Acquire)
    }

    /// Reads every shard's counter (other routers may have moved them) and
    /// returns the floor after that: the revision of the whole store.
    pub async fn refresh(&self) -> Result<i64, ShardError> {
        self.refresh_some(&self.ids()).await
    }

    /// [`Shards::refresh`] for some shards: afterwards the floor is at least
    /// every revision any router has acknowledged on them.
    pub async fn refresh_some(&self, ids: &[ShardId]) -> Result<i64, ShardError> {
        let reads = ids
            .iter()
            .map(|id| async move { (*id, self.get(*id).store.revisions().await) });
        for (id, revs) in join_all(reads).await {
            self.observe(id, revs?.current);
        }
        Ok(self.floor())
    }

    /// Makes shard `id`'s counter at least `target`, so that every later
    /// write of it gets a revision above `target`. Costs nothing when the
    /// shard is known to be there already.
    pub async fn raise(&self, id: ShardId, target: i64) -> Result<i64, ShardError> {
        let known = self.known(id);
        if known >= target {
            return Ok(known);
        }
        let response = self
            .get(id)
            .writer
            .write(WriteRequest::Bump { floor: target })
            .await?;
        let revision = response.revision();
        self.observe(id, revision);
        Ok(revision)
    }

    /// [`Shards::raise`] for several shards at once.
    pub async fn raise_all(&self, ids: &[ShardId], target: i64) -> Result<(), ShardError> {
        let raises = ids.iter().map(|id| self.raise(*id, target));
        for raised in join_all(raises).await {
            raised?;
        }
        Ok(())
    }

    /// Starts raising shard `id` to `target` in the background, unless that
    /// is known or already under way; its watch hub then publishes up to
    /// `target`. Used by merged watches waiting for an idle shard.
    pub fn advance(self: &Arc<Self>, id: ShardId, target: i64) {
        if self.known(id) >= target || self.get(id).hub.closed() >= target {
            return;
        }
        let previous = self.advancing[id.index()].fetch_max(target, Ordering::AcqRel);
        if previous >= target {
            return;
        }
        let shards = self.clone();
        tokio::spawn(async move {
            if let Err(e) = shards.raise(id, target).await {
                debug!(shard = %shards.get(id).name, target, error = %e, "advance failed");
            }
            // Let a later request for the same target try again.
            shards.advancing[id.index()].fetch_min(shards.known(id), Ordering::AcqRel);
        });
    }

    /// A write on shard `id` with a revision above the floor as it was when
    /// the write arrived (causality through this router), and, while other
    /// routers serve, above every revision acknowledged before it arrived
    /// (`peers.rs`).
    pub async fn write(
        &self,
        id: ShardId,
        request: WriteRequest,
    ) -> Result<WriteResponse, ShardError> {
        // One deadline for the whole request, from its arrival here.
        let due = tokio::time::Instant::now() + self.limit;
        kubeshard_shard_worker::deadline::bounded(self.limit, self.catch_up())
            .await
            .unwrap_or(Err(ShardError::TimedOut))?;
        let floor = self.floor();
        // The floor rides in the write's own transaction: the write cannot
        // commit below it.
        let floor = if self.known(id) < floor { floor } else { 0 };
        let response = self.get(id).writer.write_until(due, floor, request).await?;
        self.observe(id, response.revision());
        Ok(response)
    }

    /// The names of some shards, for messages.
    pub fn names(&self, ids: &BTreeSet<ShardId>) -> String {
        ids.iter()
            .map(|id| self.get(*id).name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Stops every shard's writer and poller.
    pub fn stop(&self) {
        for shard in &self.shards {
            shard.stop();
        }
    }
}
