//! One SQL template set per database dialect.
//!
//! Every statement kubeshard runs is either written here or assembled by
//! `store::sql` from the column lists below and the dialect's placeholders.
//! Statements are written so that their parameters appear in binding order,
//! because MySQL only has positional `?` placeholders.

mod mysql;
mod postgres;
mod sqlite;

pub use mysql::Mysql;
pub use postgres::Postgres;
pub use sqlite::Sqlite;

/// Schema version written to `ks_meta`; bumped with every incompatible change.
/// 2: a key may have two history rows in one revision (put, then delete by a
/// later nested txn), so the history index is (key, revision, sub).
/// 3: no history index by key; old-revision reads and compaction follow
/// `prev_revision` through the primary key instead. A version-2 database
/// is upgraded in place by dropping the index (`SqlShard::migrate`).
/// The label index's tables (`ks_label`, `ks_label_mark`) came later
/// without a new version: they are created when missing, routers that do
/// not know them leave them alone, and the index is right whatever it missed
/// (see `store/label_index.rs`). So did `ks_import` (`crate::bulk`): an
/// older router does not see an unfinished import, so finish imports
/// before starting older routers. And `ks_placement`: the placement
/// (`Topology::placement`) the data is arranged for, which routers check.
/// And `ks_identity`: a random token telling one database from another
/// whatever URL reaches it. And `ks_router`: the routers serving, as they
/// last said (`crate::bulk`). And `ks_reshard`: an online topology change
/// under way (`crate::bulk::Reshard`).
/// 4: `ks_meta.epoch`, the topology version the database is fenced at
/// (`store/fence.rs`), which every read and write checks; added in place
/// to a version-3 database.
pub const SCHEMA_VERSION: i64 = 4;

/// The SQL differences between the supported databases.
pub trait Dialect: Send + Sync + std::fmt::Debug + 'static {
    /// Short name for logs and errors.
    fn name(&self) -> &'static str;

    /// The n-th (1-based) parameter placeholder.
    fn param(&self, n: usize) -> String;

    /// Statements that create the schema when missing; safe to run on every start.
    fn schema(&self) -> &'static [&'static str];

    /// Opens a write transaction. SQLite takes its write lock here (IMMEDIATE)
    /// so that a second process waits on busy_timeout instead of failing.
    fn begin_write(&self) -> &'static str;

    /// Opens a read-only transaction in which every statement sees one snapshot.
    fn begin_read(&self) -> &'static str;

    /// Locks the revision row for the rest of the write transaction and reads
    /// `(revision, compact_revision, epoch)`. This lock is what makes commit order
    /// equal revision order, also across several kubeshard processes.
    fn lock_meta(&self) -> &'static str;

    /// An empty byte-string literal (values of keys_only reads).
    fn empty_bytes(&self) -> &'static str;

    /// Tail of `INSERT INTO ks_live ... VALUES ...` that turns it into an upsert.
    fn upsert_live_tail(&self) -> &'static str;

    /// Whether one statement may carry several data-modifying parts
    /// (`WITH h AS (INSERT ...), m AS (UPDATE ...) SELECT 1`), so that the
    /// end of a small write batch costs one round trip instead of several.
    fn writes_in_one_statement(&self) -> bool {
        false
    }

    /// An expression over `ks_meta` whose value changes whenever its row is
    /// written (PostgreSQL: the row version's `xmin`). With it a write batch
    /// may read without the revision lock and commit in one guarded
    /// statement that writes only if that value is still the one it read
    /// (`store/guarded_writes.rs`): two round trips instead of five.
    fn meta_version(&self) -> Option<&'static str> {
        None
    }

    /// The longest key this backend can index, if it has a limit.
    fn max_key_len(&self) -> Option<usize>;

    /// One statement returning the database size in bytes.
    fn db_size(&self) -> &'static str;

    /// Compaction's purge of the revisions [lo, hi), all at or below the
    /// compaction revision, as two statements run in this order, each
    /// binding (lo, hi): first delete the rows that the window's rows
    /// replaced (found by `prev_revision` through the primary key), then
    /// the window's rows that are tombstones or that a later row of the
    /// same key in the same revision replaced. In the other order a
    /// tombstone would be gone before the row it replaced.
    fn purge_window(&self) -> [String; 2];

    /// Whether the `(key_bytes, revision, sub)` history index of schema
    /// version 2 is still there: a query returning a count.
    fn history_key_index_count(&self) -> &'static str;

    /// Drops that index.
    fn drop_history_key_index(&self) -> &'static str;

    /// Statements run by Maintenance.Defragment to give space back.
    fn defragment(&self) -> &'static [&'static str];

    /// Tail of an `INSERT` that updates `columns` of the row with the same
    /// `key` instead of failing (PostgreSQL and SQLite; MySQL has its own).
    fn upsert_tail(&self, key: &str, columns: &[&str]) -> String {
        let set: Vec<String> = columns
            .iter()
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        format!(" ON CONFLICT ({key}) DO UPDATE SET {}", set.join(", "))
    }

    /// An expression for the database server's clock in Unix milliseconds,
    /// so that records several processes compare use one clock.
    fn now_ms(&self) -> &'static str;

    /// Inside a write transaction: locks the label index's mark row
    /// (`store/label_index.rs`) and reads the revision it is at.
    fn lock_label_mark(&self) -> &'static str {
        "SELECT revision FROM ks_label_mark WHERE id = 1 FOR UPDATE"
    }
}

/// [`Dialect::purge_window`] for dialects whose placeholders can carry
/// their number, given as (lo, hi). (The row-value `IN` of the first
/// statement is planned as primary-key lookups; with a `UNION` of both
/// parts inside, SQLite scanned the whole table instead.)
pub(crate) fn purge_window_numbered([lo, hi]: [&str; 2]) -> [String; 2] {
    [
        format!(
            "DELETE FROM ks_history WHERE (revision, sub) IN (SELECT p.revision, p.sub \
             FROM ks_history n JOIN ks_history p ON p.revision = n.prev_revision \
             AND p.key_bytes = n.key_bytes WHERE n.revision >= {lo} AND n.revision < {hi} \
             AND n.prev_revision > 0)"
        ),
        format!(
            "DELETE FROM ks_history WHERE revision >= {lo} AND revision < {hi} AND (deleted = 1 \
             OR EXISTS (SELECT 1 FROM ks_history s WHERE s.revision = ks_history.revision \
             AND s.key_bytes = ks_history.key_bytes AND s.sub > ks_history.sub))"
        ),
    ]
}
