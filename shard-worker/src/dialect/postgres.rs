//! PostgreSQL.

use super::Dialect;

#[derive(Debug, Clone, Copy, Default)]
pub struct Postgres;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS ks_meta (
        id BIGINT PRIMARY KEY,
        revision BIGINT NOT NULL,
        compact_revision BIGINT NOT NULL,
        schema_version BIGINT NOT NULL,
        epoch BIGINT NOT NULL DEFAULT 0)",
    "INSERT INTO ks_meta (id, revision, compact_revision, schema_version) VALUES (1, 1, 0, 4)
        ON CONFLICT (id) DO NOTHING",
    "CREATE TABLE IF NOT EXISTS ks_history (
        revision BIGINT NOT NULL,
        sub BIGINT NOT NULL,
        key_bytes BYTEA NOT NULL,
        deleted BIGINT NOT NULL,
        create_revision BIGINT NOT NULL,
        prev_revision BIGINT NOT NULL,
        version BIGINT NOT NULL,
        lease BIGINT NOT NULL,
        value_bytes BYTEA NOT NULL,
        PRIMARY KEY (revision, sub))",
    "CREATE TABLE IF NOT EXISTS ks_live (
        key_bytes BYTEA NOT NULL PRIMARY KEY,
        create_revision BIGINT NOT NULL,
        mod_revision BIGINT NOT NULL,
        version BIGINT NOT NULL,
        lease BIGINT NOT NULL,
        value_bytes BYTEA NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ks_live_lease ON ks_live (lease) WHERE lease <> 0",
    "CREATE TABLE IF NOT EXISTS ks_lease (
        id BIGINT PRIMARY KEY,
        ttl BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ks_lease_expiry ON ks_lease (expires_at_ms)",
    "CREATE TABLE IF NOT EXISTS ks_lock (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        until_ms BIGINT NOT NULL)",
    "INSERT INTO ks_lock (name, owner, until_ms) VALUES ('lease-expirer', '', 0)
        ON CONFLICT (name) DO NOTHING",
    "CREATE TABLE IF NOT EXISTS ks_label (
        key_bytes BYTEA NOT NULL,
        term BIGINT NOT NULL,
        PRIMARY KEY (key_bytes, term))",
    "CREATE INDEX IF NOT EXISTS ks_label_term ON ks_label (term, key_bytes)",
    "CREATE TABLE IF NOT EXISTS ks_label_mark (
        id BIGINT PRIMARY KEY,
        revision BIGINT NOT NULL)",
    "INSERT INTO ks_label_mark (id, revision) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    "CREATE TABLE IF NOT EXISTS ks_import (
        id BIGINT PRIMARY KEY,
        source TEXT NOT NULL,
        revision BIGINT NOT NULL,
        phase TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ks_placement (
        id BIGINT PRIMARY KEY,
        placement TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ks_reshard (
        id BIGINT PRIMARY KEY,
        version BIGINT NOT NULL,
        placement TEXT NOT NULL,
        held TEXT NOT NULL,
        phase TEXT NOT NULL,
        switch_revision BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ks_identity (
        id BIGINT PRIMARY KEY,
        token TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ks_router (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        seen_ms BIGINT NOT NULL)",
];

impl Dialect for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn param(&self, n: usize) -> String {
        format!("${n}")
    }
    fn schema(&self) -> &'static [&'static str] {
        SCHEMA
    }
    fn begin_write(&self) -> &'static str {
        "BEGIN"
    }
    fn begin_read(&self) -> &'static str {
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    }
    fn lock_meta(&self) -> &'static str {
        "SELECT revision, compact_revision, epoch FROM ks_meta WHERE id = 1 FOR UPDATE"
    }
    fn empty_bytes(&self) -> &'static str {
        "''::bytea"
    }
    fn upsert_live_tail(&self) -> &'static str {
        " ON CONFLICT (key_bytes) DO UPDATE SET create_revision = EXCLUDED.create_revision, \
         mod_revision = EXCLUDED.mod_revision, version = EXCLUDED.version, \
         lease = EXCLUDED.lease, value_bytes = EXCLUDED.value_bytes"
    }
    fn writes_in_one_statement(&self) -> bool {
        true
    }
    fn meta_version(&self) -> Option<&'static str> {
        // Every UPDATE writes a new row version with the writer's
        // transaction id; a later version never carries an earlier id.
        Some("xmin::text")
    }
    fn now_ms(&self) -> &'static str {
        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    }
    fn max_key_len(&self) -> Option<usize> {
        // A btree entry must fit in a third of a page (2704 bytes); kept
        // below that with room for a revision, as when schema version 2
        // indexed history by (key, revision).
        Some(2600)
    }
    fn db_size(&self) -> &'static str {
        "SELECT pg_database_size(current_database())"
    }
    fn purge_window(&self) -> [String; 2] {
        super::purge_window_numbered(["$1", "$2"])
    }
    fn history_key_index_count(&self) -> &'static str {
        "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = current_schema() \
         AND tablename = 'ks_history' AND indexname = 'ks_history_key'"
    }
    fn drop_history_key_index(&self) -> &'static str {
        "DROP INDEX IF EXISTS ks_history_key"
    }
    fn defragment(&self) -> &'static [&'static str] {
        &["VACUUM ks_history", "VACUUM ks_live", "VACUUM ks_lease"]
    }
}
