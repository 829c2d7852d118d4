//! Writing a shard's rows with their revisions kept, outside the writer
//! actor: how `kubeshard import` copies an etcd cluster in and follows it,
//! and how keys move between shards. The rows keep the revisions they got
//! elsewhere, so nothing here may run while a router serves the shard: a
//! router's watch stream would never read rows below its mark. The SQL is
//! in `store/bulk_sql.rs`.

use async_trait::async_trait;
use kubeshard_proto::mvccpb::KeyValue;

use crate::error::Result;
pub use crate::store::HistoryRow;
use crate::store::{LeaseRecord, Revisions};

/// One change, at the revision it already has.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The key's new state; its `mod_revision` is the change's revision.
    Put(KeyValue),
    Delete {
        key: Vec<u8>,
        revision: i64,
    },
}

impl Change {
    pub fn revision(&self) -> i64 {
        match self {
            Change::Put(kv) => kv.mod_revision,
            Change::Delete { revision, .. } => *revision,
        }
    }

    pub fn key(&self) -> &[u8] {
        match self {
            Change::Put(kv) => &kv.key,
            Change::Delete { key, .. } => key,
        }
    }
}

/// What a shard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contents {
    pub live_keys: i64,
    pub history_rows: i64,
    pub leases: i64,
    pub revisions: Revisions,
}

impl Contents {
    /// Nothing was ever written: a new database.
    pub fn is_empty(&self) -> bool {
        self.live_keys == 0 && self.history_rows == 0 && self.leases == 0
    }
}

/// How far a move of data into the shard (an import, a reshard) got
/// (`ks_import`). Routers refuse a shard whose move is not done: its data
/// is not whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportState {
    /// What moves the data in (`import from etcd cluster ID at URL`,
    /// `reshard from FILE to FILE`).
    pub source: String,
    /// Every change of the source up to here is in the shard.
    pub revision: i64,
    pub phase: ImportPhase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportPhase {
    /// Keys are being copied; `revision` is the snapshot's.
    Copying,
    /// The snapshot is in; later changes are being applied.
    Following,
    Done,
}

impl ImportPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportPhase::Copying => "copying",
            ImportPhase::Following => "following",
            ImportPhase::Done => "done",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            ImportPhase::Copying,
            ImportPhase::Following,
            ImportPhase::Done,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

/// An online topology change (`kubeshard reshard --online`), as the
/// default shard records it (`ks_reshard`) for the routers to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reshard {
    /// The topology version being moved to; every database is fenced at it
    /// from phase `Fencing` on (`store/fence.rs`).
    pub version: i64,
    /// The placement (`Topology::placement`) being moved to.
    pub placement: String,
    pub phase: ReshardPhase,
    /// The shards of the new topology whose keys are arriving (their
    /// databases are new): requests that may touch them wait until `Done`.
    pub held: Vec<String>,
    /// Once fenced: every database's counter is at least this, so every
    /// revision written in the new topology is above every one of the old.
    pub switch_revision: i64,
}

/// How far an online topology change got. Routers serve the old topology
/// until `Fenced`, then the new one, with keys that change database held
/// back until `Done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReshardPhase {
    /// The moving keys are copied while routers serve the old topology.
    Copying,
    /// Databases are being fenced: routers wait.
    Fencing,
    /// Every database is fenced and at the switch revision: routers serve
    /// the new topology, except keys that change database.
    Fenced,
    /// The moved keys are whole in their new databases.
    Done,
}

impl ReshardPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            ReshardPhase::Copying => "copying",
            ReshardPhase::Fencing => "fencing",
            ReshardPhase::Fenced => "fenced",
            ReshardPhase::Done => "done",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            ReshardPhase::Copying,
            ReshardPhase::Fencing,
            ReshardPhase::Fenced,
            ReshardPhase::Done,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

/// A router seen this recently is taken to be serving (routers record
/// themselves every 2 s): the tools that write around routers refuse to run.
pub const ROUTER_SEEN_WITHIN_MS: i64 = 10_000;

/// A router that recorded itself (`BulkSink::router_seen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSeen {
    pub id: String,
    pub address: String,
    /// How long ago, by the database's clock.
    pub ago_ms: i64,
}

/// Writes rows of one shard as they are given.
#[async_trait]
pub trait BulkSink: Send + Sync + std::fmt::Debug {
    async fn contents(&self) -> Result<Contents>;

    /// The counter row as it is (no fence is checked: tools and a router's
    /// start read the topology version here).
    async fn revisions(&self) -> Result<Revisions>;

    /// The backend's name and the longest key it can hold, if limited.
    fn key_limit(&self) -> (&'static str, Option<usize>);

    /// Applies `changes` in order in one transaction, each keeping its
    /// revision, and raises the shard's counter to the highest of them and
    /// to `at_least`. Within a revision, changes keep their order. A delete
    /// of a key the shard does not hold is refused (Corrupt): source and
    /// shard differ.
    async fn apply(&self, changes: &[Change], at_least: i64) -> Result<()>;

    /// Inserts leases, or replaces those with the same id.
    async fn put_leases(&self, leases: &[LeaseRecord]) -> Result<()>;

    async fn delete_leases(&self, ids: &[i64]) -> Result<()>;

    /// Raises the counter and the compaction revision to at least these
    /// (`to.epoch` is not used).
    async fn raise(&self, to: Revisions) -> Result<()>;

    /// Fences the database at topology `version` (it never goes down) and
    /// raises its counter to at least `at_least`, in one transaction under
    /// the revision lock; returns the revisions after. Routers serving an
    /// older topology then neither read nor write the database
    /// (`store/fence.rs`), and a write already under way committed before.
    async fn fence(&self, version: i64, at_least: i64) -> Result<Revisions>;

    async fn import_state(&self) -> Result<Option<ImportState>>;

    async fn set_import_state(&self, state: &ImportState) -> Result<()>;

    /// A random token of this database, made on first use: two endpoints
    /// reach the same database exactly when their tokens are equal.
    async fn database_id(&self) -> Result<String>;

    /// The placement (`Topology::placement`) the data is arranged for, as
    /// the default shard records it.
    async fn placement(&self) -> Result<Option<String>>;

    /// Records `placement`: in place of the one recorded when `replace`
    /// (a reshard), else only when none is (a first start: of two routers
    /// starting at once, the first one's stands).
    async fn set_placement(&self, placement: &str, replace: bool) -> Result<()>;

    /// The online topology change recorded here (`ks_reshard`), if any.
    async fn reshard(&self) -> Result<Option<Reshard>>;

    /// Records `reshard` in place of any other.
    async fn set_reshard(&self, reshard: &Reshard) -> Result<()>;

    /// Records that router `id`, serving `address`, is alive now, by the
    /// database's clock (routers do every few seconds, in their default
    /// shard).
    async fn router_seen(&self, id: &str, address: &str) -> Result<()>;

    /// The router has stopped.
    async fn router_gone(&self, id: &str) -> Result<()>;

    /// Routers seen in the last `within_ms` by the database's clock, with
    /// how long ago.
    async fn routers_seen(&self, within_ms: i64) -> Result<Vec<RouterSeen>>;

    /// Gives the database a new random token and returns it: another
    /// endpoint that then reads the same token reaches the same database,
    /// not a copy of it.
    async fn renew_database_id(&self) -> Result<String>;

    /// Adds history rows of keys moved in from another shard, keeping their
    /// revisions. A row whose revision and key the shard already holds is
    /// skipped (a move that runs again); the others get subs above the
    /// shard's own in their revision, in the order given. Returns the rows
    /// added.
    async fn append_history(&self, rows: &[HistoryRow]) -> Result<u64>;

    /// Inserts or replaces live rows.
    async fn upsert_live(&self, kvs: &[KeyValue]) -> Result<()>;

    /// Removes the history rows at these (revision, sub).
    async fn delete_history(&self, at: &[(i64, i64)]) -> Result<()>;

    async fn delete_live(&self, keys: &[Vec<u8>]) -> Result<()>;

    /// Empties the label index, which then rebuilds itself from the history
    /// (keys moved in carry revisions below its mark).
    async fn reset_label_index(&self) -> Result<()>;
}

/// Reads a shard's rows as stored, for moving them.
#[async_trait]
pub trait RowSource: Send + Sync + std::fmt::Debug {
    /// Up to `limit` history rows after (revision, sub), in that order.
    async fn history_page(&self, after: (i64, i64), limit: usize) -> Result<Vec<HistoryRow>>;

    /// Up to `limit` live rows with keys above `after` (from the first with
    /// None), in key order.
    async fn live_page(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>>;

    async fn leases(&self) -> Result<Vec<LeaseRecord>>;
}

/// Both sides of a shard's bulk access.
pub trait Bulk: BulkSink + RowSource {}

impl<T: BulkSink + RowSource> Bulk for T {}
