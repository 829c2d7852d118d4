//! Follows an online topology change (`kubeshard reshard --online`,
//! `transfer/src/online.rs`) as the default shard records it, so that
//! every router switches to the new topology at the same revision
//! (docs/topology.md, "Changing the topology while routers serve").
//!
//! While the move copies, the router reads its topology file again (it
//! must place keys as the move does) and builds the next [`Shards`],
//! sharing the shards of databases in both versions and opening the new
//! ones, which are held (requests that may touch them wait) until the move
//! is `done`. The move then fences every database at the next topology
//! version (`shard-worker/src/store/fence.rs`): this router's reads and
//! writes fail with TopologyChanged until it serves that version. Once the
//! move is `fenced` (every database fenced and raised to the switch
//! revision), the router switches:
//!
//! 1. requests take the new version from now on;
//! 2. the old one is retired: its watch streams end before they send
//!    anything read after step 3 (clients resume their watches, on the new
//!    version), and the switch waits until no request runs on it;
//! 3. the shared shards serve the new version, with its revision classes.
//!
//! Requests that failed with TopologyChanged wait here for the switch and
//! run again (`topology_change::on_topology`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kubeshard_shard_worker::bulk::{Bulk, ReshardPhase};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::server::Core;
use crate::shards::Shards;

/// How often the router looks for a topology change by itself (a request
/// refused by a fenced database makes it look at once).
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// How long a request refused by a fenced database waits for the switch
/// before it fails (Unavailable: clients retry).
pub const SWITCH_WAIT: Duration = Duration::from_secs(30);

/// Runs `$body`, an async block using `$shards: &Shards`, on the topology
/// served now (`Core::shards`). When a database refuses it because the
/// topology changed (`store/fence.rs`; nothing was written), waits until
/// this router serves the new topology and runs it again. A macro, not a
/// function taking an async closure: the handlers' futures must be Send
/// for every lifetime of the borrowed shards, which async closures cannot
/// yet promise.
macro_rules! on_topology {
    ($core:expr, |$shards:ident| $body:expr) => {{
        let core: &$crate::server::Core = &$core;
        loop {
            let entered = core.shards();
            let version = entered.version();
            let result = {
                let $shards: &$crate::shards::Shards = &entered;
                $body.await
            };
            drop(entered);
            match result {
                Err(status) if $crate::error::is_topology_changed(&status) => {
                    if !core
                        .views
                        .after_refusal(version, $crate::topology_change::SWITCH_WAIT)
                        .await
                    {
                        break Err(status);
                    }
                }
                result => break result,
            }
        }
    }};
}
pub(crate) use on_topology;

/// The topology version served now, and the wake-up of the follower.
#[derive(Debug)]
pub struct Views {
    state: watch::Sender<ViewState>,
    look: Notify,
    /// The next topology, opened while the move copies.
    next: std::sync::Mutex<Option<Arc<Shards>>>,
}

#[derive(Debug, Clone)]
struct ViewState {
    current: Arc<Shards>,
    /// The version the shards serve: `current`'s, once the switch to it
    /// has told them (step 3).
    serving: i64,
}

impl Views {
    pub fn new(shards: Arc<Shards>) -> Self {
        let serving = shards.version();
        Views {
            state: watch::Sender::new(ViewState {
                current: shards,
                serving,
            }),
            look: Notify::new(),
            next: std::sync::Mutex::new(None),
        }
    }

    /// The next topology opened beforehand, if it is `version` with
    /// `placement`.
    fn prepared(&self, version: i64, placement: &str) -> Option<Arc<Shards>> {
        let next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        next.as_ref()
            .filter(|n| n.version() == version && n.topology().placement() == placement)
            .cloned()
    }

    /// Keeps `next` for the switch, in place of one opened before (whose
    /// new shards stop).
    fn prepare(&self, next: Arc<Shards>) {
        let old = self
            .next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(next.clone());
        if let Some(old) = old {
            for shard in old
                .left_in(&self.current())
                .into_iter()
                .filter(|s| !next.has(s))
            {
                shard.stop();
            }
        }
    }

    /// The shards of the topology served now, for what holds them long
    /// (a watch stream) and checks [`Shards::is_retired`] itself.
    pub fn current(&self) -> Arc<Shards> {
        self.state.borrow().current.clone()
    }

    /// The shards of the topology served now, for one request: a switch
    /// waits until every request that entered the version before has
    /// left it (a request of the old version must not run once the
    /// shards serve the new one).
    pub fn enter(&self) -> Entered {
        loop {
            let shards = self.current();
            if let Some(entered) = Entered::new(shards) {
                return entered;
            }
        }
    }

    /// After a request on version `version` was refused because a database
    /// is fenced ahead of what the shards serve: waits (at most `within`)
    /// until running it again may succeed. False if that did not come.
    pub async fn after_refusal(&self, version: i64, within: Duration) -> bool {
        self.look.notify_one();
        let serving = self.state.borrow().serving;
        let mut state = self.state.subscribe();
        let ready = tokio::time::timeout(
            within,
            state.wait_for(|s| {
                if serving < version {
                    // The switch to `version` is telling the shards.
                    s.serving >= version
                } else {
                    // A newer version is needed, and served.
                    s.current.version() > version && s.serving >= s.current.version()
                }
            }),
        )
        .await;
        matches!(ready, Ok(Ok(_)))
    }

    fn install(&self, shards: Arc<Shards>) {
        self.next.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.state.send_modify(|s| s.current = shards);
    }

    fn served(&self, version: i64) {
        self.state
            .send_modify(|s| s.serving = s.serving.max(version));
    }
}

/// One request's hold on a topology version (see [`Views::enter`]).
#[derive(Debug)]
pub struct Entered {
    shards: Arc<Shards>,
}

impl Entered {
    fn new(shards: Arc<Shards>) -> Option<Self> {
        shards.enter_request();
        // Checked after entering: either this sees the version retired, or
        // the switch sees this request and waits for it.
        if shards.is_retired() {
            shards.leave_request();
            return None;
        }
        Some(Entered { shards })
    }
}

impl std::ops::Deref for Entered {
    type Target = Arc<Shards>;

    fn deref(&self) -> &Arc<Shards> {
        &self.shards
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.shards.leave_request();
    }
}

/// Follows the default shard's record of topology changes until aborted.
pub fn spawn(core: Arc<Core>, default: Arc<dyn Bulk>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = core.views.look.notified() => {}
                _ = tokio::time::sleep(FOLLOW_INTERVAL) => {}
            }
            match follow(&core, default.as_ref()).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(20) {
                        warn!(error = %e, "cannot follow the topology change");
                    }
                }
            }
        }
    })
}

/// One look at the default shard: opens the next topology's new shards
/// while the move copies, switches once it is fenced, and releases held
/// keys once it is done.
async fn follow(core: &Core, default: &dyn Bulk) -> Result<(), String> {
    let current = core.views.current();
    let stored = default
        .revisions()
        .await
        .map_err(|e| format!("default shard: {e}"))?
        .epoch;
    let reshard = default
        .reshard()
        .await
        .map_err(|e| format!("default shard: {e}"))?;
    if stored > current.version() {
        let moving = reshard.as_ref().filter(|r| r.version == stored);
        let held = match moving.map(|r| r.phase) {
            // Not every database is fenced and raised yet.
            Some(ReshardPhase::Copying | ReshardPhase::Fencing) => return Ok(()),
            Some(ReshardPhase::Fenced) => moving.map(|r| r.held.clone()).unwrap_or_default(),
            _ => Vec::new(),
        };
        let placement = default
            .placement()
            .await
            .map_err(|e| format!("default shard: {e}"))?
            .unwrap_or_default();
        return switch(core, &current, stored, &placement, &held).await;
    }
    if let Some(r) = reshard
        .as_ref()
        .filter(|r| r.version == current.version() + 1 && r.phase < ReshardPhase::Fenced)
    {
        // Ready before the switch, so that requests wait for nothing then.
        let prepared = core.views.prepared(r.version, &r.placement);
        if prepared.is_none() {
            let next = open_next(core, &current, r.version, &r.placement, &r.held).await?;
            info!(version = r.version, "the next topology is open");
            core.views.prepare(next);
        }
        return Ok(());
    }
    let done = reshard
        .as_ref()
        .is_none_or(|r| r.version != current.version() || r.phase == ReshardPhase::Done);
    if done && current.holds_any() {
        info!(
            version = current.version(),
            "the moved keys are whole: serving them"
        );
        current.release();
    }
    Ok(())
}

/// The shards of topology `version` as this router's file describes it,
/// which must be `placement`; the shards named in `held` wait.
async fn open_next(
    core: &Core,
    current: &Shards,
    version: i64,
    placement: &str,
    held: &[String],
) -> Result<Arc<Shards>, String> {
    let topology = match core.options.reload_topology() {
        Some(Ok(topology)) => topology,
        Some(Err(e)) => return Err(format!("the topology file: {e}")),
        None => {
            return Err(format!(
                "the data moves to topology version {version}; a router started with \
                 --endpoint cannot follow: restart it with --config"
            ));
        }
    };
    if topology.placement() != placement {
        return Err(format!(
            "the data moves to topology version {version}, which {} does not describe: update \
             the file to the new topology (once the move is fenced, this router refuses \
             requests until then)",
            topology.source().unwrap_or("the topology file")
        ));
    }
    let held: BTreeSet<String> = held.iter().cloned().collect();
    current
        .next(
            topology,
            version,
            &held,
            &crate::server::shard_settings(&core.options),
            |shard| core.metrics.shard_observer(shard),
        )
        .await
        .map_err(|e| format!("shard {} ({}): {}", e.shard, e.endpoint, e.error))
}

async fn switch(
    core: &Core,
    current: &Arc<Shards>,
    version: i64,
    placement: &str,
    held: &[String],
) -> Result<(), String> {
    let next = match core.views.prepared(version, placement) {
        Some(next) => next,
        None => open_next(core, current, version, placement, held).await?,
    };
    if held.is_empty() {
        // The move was done before this router switched.
        next.release();
    }
    next.raise_floor(current.floor());
    core.views.install(next.clone());
    // Before the shared shards serve the new version: watch streams of the
    // old one send nothing read after this, and its requests are over
    // (they fail on the fenced databases, quickly).
    current.retire();
    current.requests_left().await;
    next.serve_all();
    core.views.served(version);
    for shard in current.left_in(&next) {
        shard.stop();
    }
    info!(
        version,
        shards = next.len(),
        held = next.holds_any(),
        "serving the new topology"
    );
    Ok(())
}
