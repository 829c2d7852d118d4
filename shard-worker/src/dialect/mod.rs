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
pub const SCHEMA_VERSION: i64 = 2;

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
    /// `(revision, compact_revision)`. This lock is what makes commit order
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

    /// Deletes, for revisions in [lo, hi), history rows that compaction at
    /// `compact` made unreachable: tombstones, and rows superseded by a newer
    /// row of the same key at or below `compact`. Parameters bind in the order
    /// (compact, lo, hi).
    fn compact_window(&self) -> String;

    /// Statements run by Maintenance.Defragment to give space back.
    fn defragment(&self) -> &'static [&'static str];
}

/// The compaction delete for dialects whose placeholders can carry their
/// number, given in the order (compact, lo, hi).
pub(crate) fn compact_window_numbered([compact, lo, hi]: &[&str; 3]) -> String {
    format!(
        "DELETE FROM ks_history WHERE revision >= {lo} AND revision < {hi} AND (deleted = 1 OR EXISTS \
         (SELECT 1 FROM ks_history n WHERE n.key_bytes = ks_history.key_bytes \
         AND (n.revision > ks_history.revision OR (n.revision = ks_history.revision AND n.sub > ks_history.sub)) \
         AND n.revision <= {compact}))",
    )
}
