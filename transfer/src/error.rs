//! What can stop an import, each naming what to do about it.

use kubeshard_shard_worker::ShardError;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The command line or the topology file.
    #[error("{0}")]
    Config(String),
    /// The source etcd refused or failed.
    #[error("source: {0}")]
    Source(String),
    /// A shard of the target failed.
    #[error("target shard {shard}: {error}")]
    Target { shard: String, error: ShardError },
    /// A key of the source that a shard of the target cannot hold.
    #[error("target shard {shard} cannot hold key {key}: {why}; nothing of the import is served")]
    Refused {
        shard: String,
        key: String,
        why: String,
    },
    /// A router serves a database the tool would write around.
    #[error(
        "routers serve shard {shard}: {routers}; stop every router first (one that died counts \
         as serving for 10 s after its last record)"
    )]
    RoutersServing { shard: String, routers: String },
    /// The target already holds data.
    #[error("target shard {shard} is not empty ({what}); import into new, empty databases")]
    NotEmpty { shard: String, what: String },
    /// The source compacted past what the import still needed.
    #[error(
        "the source compacted its history past revision {needed} while it was being read ({detail}); \
         start over on empty databases"
    )]
    Compacted { needed: i64, detail: String },
    /// Keys on another shard than the topology puts them (reshard's verify).
    #[error("{count} row(s) not on the shard the new topology puts them on:\n{shown}")]
    Misplaced { count: usize, shown: String },
    /// Source and target differ (`--verify`).
    #[error("{count} difference(s) between source and target at revision {revision}:\n{shown}")]
    Differences {
        revision: i64,
        count: usize,
        shown: String,
    },
}

pub type Result<T, E = TransferError> = std::result::Result<T, E>;
