//! SQLite: the embedded default. WAL mode, one writer at a time.

use super::Dialect;

#[derive(Debug, Clone, Copy, Default)]
pub struct Sqlite;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS ks_meta (
        id INTEGER PRIMARY KEY,
        revision INTEGER NOT NULL,
        compact_revision INTEGER NOT NULL,
        schema_version INTEGER NOT NULL,
        epoch INTEGER NOT NULL DEFAULT 0)",
    "INSERT OR IGNORE INTO ks_meta (id, revision, compact_revision, schema_version) VALUES (1, 1, 0, 4)",
    "CREATE TABLE IF NOT EXISTS ks_history (
        revision INTEGER NOT NULL,
        sub INTEGER NOT NULL,
        key_bytes BLOB NOT NULL,
        deleted INTEGER NOT NULL,
        create_revision INTEGER NOT NULL,
        prev_revision INTEGER NOT NULL,
        version INTEGER NOT NULL,
        lease INTEGER NOT NULL,
        value_bytes BLOB NOT NULL,
        PRIMARY KEY (revision, sub))",
    "CREATE TABLE IF NOT EXISTS ks_live (
        key_bytes BLOB NOT NULL PRIMARY KEY,
        create_revision INTEGER NOT NULL,
        mod_revision INTEGER NOT NULL,
        version INTEGER NOT NULL,
        lease INTEGER NOT NULL,
        value_bytes BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ks_live_lease ON ks_live (lease) WHERE lease <> 0",
    "CREATE TABLE IF NOT EXISTS ks_lease (
        id INTEGER PRIMARY KEY,
        ttl INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ks_lease_expiry ON ks_lease (expires_at_ms)",
    "CREATE TABLE IF NOT EXISTS ks_lock (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        until_ms INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO ks_lock (name, owner, until_ms) VALUES ('lease-expirer', '', 0)",
    "CREATE TABLE IF NOT EXISTS ks_label (
        key_bytes BLOB NOT NULL,
        term INTEGER NOT NULL,
        PRIMARY KEY (key_bytes, term)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS ks_label_term ON ks_label (term, key_bytes)",
    "CREATE TABLE IF NOT EXISTS ks_label_mark (
        id INTEGER PRIMARY KEY,
        revision INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO ks_label_mark (id, revision) VALUES (1, 0)",
    "CREATE TABLE IF NOT EXISTS ks_import (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        revision INTEGER NOT NULL,
        phase TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ks_placement (
        id INTEGER PRIMARY KEY,
        placement TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ks_reshard (
        id INTEGER PRIMARY KEY,
        version INTEGER NOT NULL,
        placement TEXT NOT NULL,
        held TEXT NOT NULL,
        phase TEXT NOT NULL,
        switch_revision INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ks_identity (
        id INTEGER PRIMARY KEY,
        token TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ks_router (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        seen_ms INTEGER NOT NULL)",
];

impl Dialect for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    fn param(&self, _n: usize) -> String {
        // Anonymous placeholders: SQLite finds the name of a numbered one
        // (`?NNN`) by a linear scan, and sqlx asks for every parameter's
        // name, so a 2000-parameter batch insert cost O(n²) in binding.
        "?".to_string()
    }
    fn schema(&self) -> &'static [&'static str] {
        SCHEMA
    }
    fn begin_write(&self) -> &'static str {
        "BEGIN IMMEDIATE"
    }
    fn lock_label_mark(&self) -> &'static str {
        // BEGIN IMMEDIATE already holds the database's write lock.
        "SELECT revision FROM ks_label_mark WHERE id = 1"
    }
    fn begin_read(&self) -> &'static str {
        // A deferred transaction pins its WAL snapshot at the first read.
        "BEGIN DEFERRED"
    }
    fn lock_meta(&self) -> &'static str {
        "SELECT revision, compact_revision, epoch FROM ks_meta WHERE id = 1"
    }
    fn empty_bytes(&self) -> &'static str {
        "X''"
    }
    fn upsert_live_tail(&self) -> &'static str {
        " ON CONFLICT (key_bytes) DO UPDATE SET create_revision = excluded.create_revision, \
         mod_revision = excluded.mod_revision, version = excluded.version, \
         lease = excluded.lease, value_bytes = excluded.value_bytes"
    }
    fn now_ms(&self) -> &'static str {
        "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
    }
    fn max_key_len(&self) -> Option<usize> {
        None
    }
    fn db_size(&self) -> &'static str {
        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
    }
    fn purge_window(&self) -> [String; 2] {
        super::purge_window_numbered(["?1", "?2"])
    }
    fn history_key_index_count(&self) -> &'static str {
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'ks_history_key'"
    }
    fn drop_history_key_index(&self) -> &'static str {
        "DROP INDEX IF EXISTS ks_history_key"
    }
    fn defragment(&self) -> &'static [&'static str] {
        &["PRAGMA wal_checkpoint(TRUNCATE)", "VACUUM"]
    }
}
