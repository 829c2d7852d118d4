//! Errors of one shard. The router maps each to etcd's exact gRPC code and text.

/// What went wrong in a shard operation.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The requested revision was removed by compaction.
    #[error("mvcc: required revision has been compacted")]
    Compacted { compact_revision: i64 },
    /// The requested revision is above the current one.
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    /// A lease named by the request does not exist.
    #[error("requested lease not found")]
    LeaseNotFound,
    /// LeaseGrant with an ID that is taken.
    #[error("lease already exists")]
    LeaseExists,
    /// Put with ignore_value or ignore_lease on a key that does not exist.
    #[error("key not found")]
    KeyNotFound,
    /// A key longer than this backend can index.
    #[error("key is {len} bytes; the {backend} backend stores keys of at most {max} bytes")]
    KeyTooLong {
        len: usize,
        max: usize,
        backend: &'static str,
    },
    /// A label or field selector (kubeshard's extension) that does not parse.
    #[error("{0}")]
    InvalidSelector(kubeshard_selector::SelectorError),
    /// The database failed or went away; the request may be retried.
    /// (Not a `source`: the text already says it, and logs would repeat it.)
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// The same from SQLite's direct read and write paths, which do not go
    /// through sqlx.
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    /// The database transaction of a whole write batch failed; this copy of
    /// the error goes to each request of the batch.
    #[error("write batch failed: {0}")]
    BatchFailed(String),
    /// A guarded write batch (read without the revision lock) found that
    /// another writer committed since it read, or it needs to read its own
    /// writes. The batch is run again under the lock; clients never see this.
    #[error("write batch must run under the revision lock: {why}")]
    NeedsLock {
        why: &'static str,
        /// Another writer committed since the batch read.
        contended: bool,
    },
    /// A speculative write batch (written without reading first, see
    /// `guarded_writes.rs`) cannot be used: the batch must read, or the
    /// state it assumed was not the database's. The batch runs again the
    /// ordinary way; clients never see this.
    #[error("write batch cannot run speculatively: {why}")]
    NotSpeculative {
        why: &'static str,
        /// The database was not in the assumed state (as opposed to a
        /// batch that must read and was never sent).
        wrong: bool,
    },
    /// The shard's writer actor is gone (shutting down).
    #[error("shard {0} is not accepting requests (shutting down)")]
    Stopped(String),
    /// A move of data into the shard (`kubeshard import`, `kubeshard
    /// reshard`) started and did not finish: its data is not whole, so it is
    /// not served.
    #[error(
        "a data move into this database is unfinished ({source_name}; {phase} at revision {revision}): \
         run it again to finish it"
    )]
    ImportUnfinished {
        source_name: String,
        phase: &'static str,
        revision: i64,
    },
    /// The database was fenced for a later topology version than the one
    /// this process serves (`store/fence.rs`): keys may have moved, so it
    /// is neither read nor written until this process serves that version.
    #[error(
        "the topology changed: this database serves topology version {stored}, this router \
         version {serving}"
    )]
    TopologyChanged { stored: i64, serving: i64 },
    /// A database call did not finish within `--datastore-timeout`
    /// (`deadline.rs`), and nothing of it took effect: a write that times
    /// out had not sent its commit, and its connection was closed.
    #[error("request timed out")]
    TimedOut,
    /// A write's commit was sent and no answer came in time: it may or may
    /// not have taken effect.
    #[error("request timed out, possibly due to connection lost")]
    CommitUnknown,
    /// The database has no space left for a write (SQLite's SQLITE_FULL,
    /// PostgreSQL's disk_full, MySQL's table or disk full): etcd's NOSPACE.
    /// Reads go on; writes are tried again as they come, so writing resumes
    /// once space is freed.
    #[error("mvcc: database space exceeded ({0})")]
    NoSpace(String),
    /// The counters of the shards could not be read, which a router with
    /// peers needs before it writes (the router's `peers.rs`).
    #[error("cannot read every shard's revision: {0}")]
    CounterUnread(String),
    /// The stored data is not what this version of kubeshard wrote.
    #[error("unexpected stored data: {0}")]
    Corrupt(String),
}

impl ShardError {
    /// Errors that say nothing about the request itself: a batch that failed
    /// with one of these is not retried request by request.
    pub fn is_connection_problem(&self) -> bool {
        match self {
            ShardError::Database(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::Tls(_)
            ),
            ShardError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::ReadOnly
            ),
            ShardError::Stopped(_)
            | ShardError::BatchFailed(_)
            | ShardError::TopologyChanged { .. }
            | ShardError::TimedOut
            | ShardError::CommitUnknown
            | ShardError::CounterUnread(_)
            | ShardError::NoSpace(_) => true,
            _ => false,
        }
    }
}

impl ShardError {
    /// The database said it has no space left for the write.
    pub fn is_disk_full(&self) -> bool {
        match self {
            ShardError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            ShardError::Database(sqlx::Error::Database(db)) => {
                if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    && matches!(my.number(), 1021 | 1114)
                {
                    // ER_DISK_FULL, ER_RECORD_FILE_FULL.
                    return true;
                }
                // PostgreSQL's disk_full; SQLite's SQLITE_FULL through sqlx
                // (the watch poller, leases); an engine passing on ENOSPC.
                matches!(db.code().as_deref(), Some("53100") | Some("13"))
                    || db.message().contains("No space left on device")
            }
            ShardError::NoSpace(_) => true,
            _ => false,
        }
    }

    /// The database answered that the batch did not commit: an error
    /// about the statement or the transaction, which rolled it back. Not
    /// so: a broken or closed connection (the server may have made the
    /// commit durable before it went), a server shutting down or crashing
    /// (PostgreSQL's classes 08, 57, 58, XX; MySQL's shutdown and killed
    /// connections), an answer that could not be read. SQLite's errors are
    /// answers: its writer thread runs every batch to its end.
    pub fn is_rolled_back(&self) -> bool {
        match self {
            ShardError::Sqlite(_) | ShardError::NoSpace(_) | ShardError::TopologyChanged { .. } => {
                true
            }
            ShardError::Database(sqlx::Error::Database(db)) => {
                if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                    // ER_SERVER_SHUTDOWN, ER_CONNECTION_KILLED, ER_QUERY_INTERRUPTED.
                    return !matches!(my.number(), 1053 | 1927 | 1317);
                }
                let code = db.code().unwrap_or_default();
                !["08", "57", "58", "XX"]
                    .iter()
                    .any(|class| code.starts_with(class))
            }
            _ => false,
        }
    }
}

impl From<rusqlite::Error> for ShardError {
    fn from(e: rusqlite::Error) -> Self {
        ShardError::Sqlite(e)
    }
}

impl From<sqlx::Error> for ShardError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            // No connection in `--datastore-timeout` (the pools wait that
            // long): nothing was sent, as for any call late before commit.
            sqlx::Error::PoolTimedOut => ShardError::TimedOut,
            e => ShardError::Database(e),
        }
    }
}

pub type Result<T, E = ShardError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(code: std::ffi::c_int) -> ShardError {
        ShardError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    #[test]
    fn sqlite_busy_and_io_errors_are_connection_problems() {
        // A batch failing with these is not retried request by request.
        assert!(sqlite(rusqlite::ffi::SQLITE_BUSY).is_connection_problem());
        assert!(sqlite(rusqlite::ffi::SQLITE_IOERR).is_connection_problem());
        assert!(sqlite(rusqlite::ffi::SQLITE_FULL).is_connection_problem());
        // A constraint says something about a request: retry one by one.
        assert!(!sqlite(rusqlite::ffi::SQLITE_CONSTRAINT).is_connection_problem());
        assert!(!sqlite(rusqlite::ffi::SQLITE_TOOBIG).is_connection_problem());
    }

    #[test]
    fn only_an_answer_of_the_database_says_a_commit_failed() {
        // A batch whose commit went out is reported failed only then.
        assert!(sqlite(rusqlite::ffi::SQLITE_CONSTRAINT).is_rolled_back());
        let broken = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!ShardError::Database(sqlx::Error::Io(broken)).is_rolled_back());
        assert!(!ShardError::Corrupt("undecodable answer".into()).is_rolled_back());
        assert!(!ShardError::TimedOut.is_rolled_back());
    }

    #[test]
    fn only_a_full_database_is_disk_full() {
        assert!(sqlite(rusqlite::ffi::SQLITE_FULL).is_disk_full());
        assert!(!sqlite(rusqlite::ffi::SQLITE_IOERR).is_disk_full());
        assert!(!sqlite(rusqlite::ffi::SQLITE_BUSY).is_disk_full());
        assert!(!ShardError::TimedOut.is_disk_full());
    }
}
