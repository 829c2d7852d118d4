//! MySQL and MariaDB (InnoDB).

use super::Dialect;

#[derive(Debug, Clone, Copy, Default)]
pub struct Mysql;

/// Longest key: an InnoDB index entry is at most 3072 bytes, and `ks_live`
/// is keyed by it (the column is `VARBINARY(3000)`; databases of schema
/// version 2 also had it in a history index with the 8-byte revision).
const MAX_KEY_LEN: usize = 3000;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS ks_meta (
        id BIGINT PRIMARY KEY,
        revision BIGINT NOT NULL,
        compact_revision BIGINT NOT NULL,
        schema_version BIGINT NOT NULL,
        epoch BIGINT NOT NULL DEFAULT 0) ENGINE=InnoDB",
    "INSERT IGNORE INTO ks_meta (id, revision, compact_revision, schema_version) VALUES (1, 1, 0, 4)",
    "CREATE TABLE IF NOT EXISTS ks_history (
        revision BIGINT NOT NULL,
        sub BIGINT NOT NULL,
        key_bytes VARBINARY(3000) NOT NULL,
        deleted BIGINT NOT NULL,
        create_revision BIGINT NOT NULL,
        prev_revision BIGINT NOT NULL,
        version BIGINT NOT NULL,
        lease BIGINT NOT NULL,
        value_bytes LONGBLOB NOT NULL,
        PRIMARY KEY (revision, sub)) ENGINE=InnoDB ROW_FORMAT=DYNAMIC",
    "CREATE TABLE IF NOT EXISTS ks_live (
        key_bytes VARBINARY(3000) NOT NULL PRIMARY KEY,
        create_revision BIGINT NOT NULL,
        mod_revision BIGINT NOT NULL,
        version BIGINT NOT NULL,
        lease BIGINT NOT NULL,
        value_bytes LONGBLOB NOT NULL,
        KEY ks_live_lease (lease)) ENGINE=InnoDB ROW_FORMAT=DYNAMIC",
    "CREATE TABLE IF NOT EXISTS ks_lease (
        id BIGINT PRIMARY KEY,
        ttl BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        KEY ks_lease_expiry (expires_at_ms)) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS ks_lock (
        name VARCHAR(64) PRIMARY KEY,
        owner VARCHAR(255) NOT NULL,
        until_ms BIGINT NOT NULL) ENGINE=InnoDB",
    "INSERT IGNORE INTO ks_lock (name, owner, until_ms) VALUES ('lease-expirer', '', 0)",
    "CREATE TABLE IF NOT EXISTS ks_label (
        key_bytes VARBINARY(3000) NOT NULL,
        term BIGINT NOT NULL,
        PRIMARY KEY (key_bytes, term),
        KEY ks_label_term (term, key_bytes)) ENGINE=InnoDB ROW_FORMAT=DYNAMIC",
    "CREATE TABLE IF NOT EXISTS ks_label_mark (
        id BIGINT PRIMARY KEY,
        revision BIGINT NOT NULL) ENGINE=InnoDB",
    "INSERT IGNORE INTO ks_label_mark (id, revision) VALUES (1, 0)",
    "CREATE TABLE IF NOT EXISTS ks_import (
        id BIGINT PRIMARY KEY,
        source VARCHAR(512) NOT NULL,
        revision BIGINT NOT NULL,
        phase VARCHAR(32) NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS ks_placement (
        id BIGINT PRIMARY KEY,
        placement TEXT NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS ks_reshard (
        id BIGINT PRIMARY KEY,
        version BIGINT NOT NULL,
        placement TEXT NOT NULL,
        held TEXT NOT NULL,
        phase VARCHAR(32) NOT NULL,
        switch_revision BIGINT NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS ks_identity (
        id BIGINT PRIMARY KEY,
        token VARCHAR(64) NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS ks_router (
        id VARCHAR(64) PRIMARY KEY,
        address VARCHAR(512) NOT NULL,
        seen_ms BIGINT NOT NULL) ENGINE=InnoDB",
];

impl Dialect for Mysql {
    fn name(&self) -> &'static str {
        "mysql"
    }
    fn param(&self, _n: usize) -> String {
        "?".to_string()
    }
    fn schema(&self) -> &'static [&'static str] {
        SCHEMA
    }
    fn begin_write(&self) -> &'static str {
        "BEGIN"
    }
    fn begin_read(&self) -> &'static str {
        "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY"
    }
    fn lock_meta(&self) -> &'static str {
        "SELECT revision, compact_revision, epoch FROM ks_meta WHERE id = 1 FOR UPDATE"
    }
    fn empty_bytes(&self) -> &'static str {
        "X''"
    }
    fn upsert_live_tail(&self) -> &'static str {
        " ON DUPLICATE KEY UPDATE create_revision = VALUES(create_revision), \
         mod_revision = VALUES(mod_revision), version = VALUES(version), \
         lease = VALUES(lease), value_bytes = VALUES(value_bytes)"
    }
    fn now_ms(&self) -> &'static str {
        "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)"
    }
    fn upsert_tail(&self, _key: &str, columns: &[&str]) -> String {
        let set: Vec<String> = columns
            .iter()
            .map(|c| format!("{c} = VALUES({c})"))
            .collect();
        format!(" ON DUPLICATE KEY UPDATE {}", set.join(", "))
    }
    fn max_key_len(&self) -> Option<usize> {
        Some(MAX_KEY_LEN)
    }
    fn db_size(&self) -> &'static str {
        "SELECT CAST(COALESCE(SUM(data_length + index_length), 0) AS SIGNED) \
         FROM information_schema.tables WHERE table_schema = DATABASE()"
    }
    fn purge_window(&self) -> [String; 2] {
        // MySQL refuses a subquery on the table being deleted from; a
        // multi-table DELETE with a join says the same thing.
        [
            "DELETE p FROM ks_history n JOIN ks_history p ON p.revision = n.prev_revision \
             AND p.key_bytes = n.key_bytes \
             WHERE n.revision >= ? AND n.revision < ? AND n.prev_revision > 0"
                .to_string(),
            "DELETE w FROM ks_history w LEFT JOIN ks_history s ON s.revision = w.revision \
             AND s.key_bytes = w.key_bytes AND s.sub > w.sub \
             WHERE w.revision >= ? AND w.revision < ? AND (w.deleted = 1 OR s.revision IS NOT NULL)"
                .to_string(),
        ]
    }
    fn history_key_index_count(&self) -> &'static str {
        "SELECT COUNT(DISTINCT index_name) FROM information_schema.statistics \
         WHERE table_schema = DATABASE() \
         AND table_name = 'ks_history' AND index_name = 'ks_history_key'"
    }
    fn drop_history_key_index(&self) -> &'static str {
        // No IF EXISTS in MySQL: `history_key_index_count` asks first.
        "ALTER TABLE ks_history DROP INDEX ks_history_key"
    }
    fn defragment(&self) -> &'static [&'static str] {
        &["OPTIMIZE TABLE ks_history, ks_live, ks_lease"]
    }
}
