//! Every error kubeshard answers with, mapped to etcd's exact gRPC code and
//! text in this one place. Clients (etcd's Go client, kube-apiserver) match on
//! these strings, so they must not change.

use kubeshard_shard_worker::ShardError;
use tonic::{Code, Status};

/// Errors with etcd's own code and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdError {
    EmptyKey,
    TooManyOps,
    DuplicateKey,
    ValueProvided,
    LeaseProvided,
    RequestTooLarge,
    InvalidSortOption,
    Compacted,
    FutureRevision,
    LeaseNotFound,
    LeaseExists,
    LeaseTtlTooLarge,
    KeyNotFound,
    /// The router is stopping (SIGTERM): clients retry elsewhere.
    Stopped,
    /// A database call passed `--datastore-timeout`; nothing of it took
    /// effect.
    Timeout,
    /// A shard's database has no space left (etcd's NOSPACE alarm).
    NoSpace,
    /// A write's commit got no answer in time: it may have taken effect.
    /// etcd's text for a proposal whose outcome the server lost track of.
    TimeoutDueToConnectionLost,
}

impl EtcdError {
    pub fn code(self) -> Code {
        match self {
            EtcdError::EmptyKey
            | EtcdError::TooManyOps
            | EtcdError::DuplicateKey
            | EtcdError::ValueProvided
            | EtcdError::LeaseProvided
            | EtcdError::RequestTooLarge
            | EtcdError::InvalidSortOption
            | EtcdError::KeyNotFound => Code::InvalidArgument,
            EtcdError::Compacted | EtcdError::FutureRevision | EtcdError::LeaseTtlTooLarge => {
                Code::OutOfRange
            }
            EtcdError::LeaseNotFound => Code::NotFound,
            EtcdError::LeaseExists => Code::FailedPrecondition,
            EtcdError::NoSpace => Code::ResourceExhausted,
            EtcdError::Stopped | EtcdError::Timeout | EtcdError::TimeoutDueToConnectionLost => {
                Code::Unavailable
            }
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            EtcdError::EmptyKey => "etcdserver: key is not provided",
            EtcdError::TooManyOps => "etcdserver: too many operations in txn request",
            EtcdError::DuplicateKey => "etcdserver: duplicate key given in txn request",
            EtcdError::ValueProvided => "etcdserver: value is provided",
            EtcdError::LeaseProvided => "etcdserver: lease is provided",
            EtcdError::RequestTooLarge => "etcdserver: request is too large",
            EtcdError::InvalidSortOption => "etcdserver: invalid sort option",
            EtcdError::Compacted => "etcdserver: mvcc: required revision has been compacted",
            EtcdError::FutureRevision => "etcdserver: mvcc: required revision is a future revision",
            EtcdError::LeaseNotFound => "etcdserver: requested lease not found",
            EtcdError::LeaseExists => "etcdserver: lease already exists",
            EtcdError::LeaseTtlTooLarge => "etcdserver: too large lease TTL",
            EtcdError::KeyNotFound => "etcdserver: key not found",
            EtcdError::Stopped => "etcdserver: server stopped",
            EtcdError::Timeout => "etcdserver: request timed out",
            EtcdError::NoSpace => "etcdserver: mvcc: database space exceeded",
            EtcdError::TimeoutDueToConnectionLost => {
                "etcdserver: request timed out, possibly due to connection lost"
            }
        }
    }
}

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Self {
        Status::new(e.code(), e.message())
    }
}

/// The start of the message of a request refused by a database fenced for
/// a newer topology (`ShardError::TopologyChanged`).
const TOPOLOGY_CHANGED: &str = "kubeshard: the topology changed";

/// Whether `status` says the topology changed under the request: the
/// router then switches and runs it again (`topology_change::on_topology`).
pub fn is_topology_changed(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.message().starts_with(TOPOLOGY_CHANGED)
}

/// Maps a shard's error to what etcd would answer.
pub fn shard_status(e: ShardError) -> Status {
    match e {
        ShardError::Compacted { .. } => EtcdError::Compacted.into(),
        ShardError::FutureRevision => EtcdError::FutureRevision.into(),
        ShardError::LeaseNotFound => EtcdError::LeaseNotFound.into(),
        ShardError::LeaseExists => EtcdError::LeaseExists.into(),
        ShardError::KeyNotFound => EtcdError::KeyNotFound.into(),
        ShardError::TimedOut => EtcdError::Timeout.into(),
        ShardError::CommitUnknown => EtcdError::TimeoutDueToConnectionLost.into(),
        ShardError::NoSpace(_) => EtcdError::NoSpace.into(),
        ShardError::KeyTooLong { .. } | ShardError::InvalidSelector(_) => {
            Status::invalid_argument(format!("etcdserver: {e}"))
        }
        // Unavailable is what etcd clients retry on.
        ShardError::Database(_)
        | ShardError::Sqlite(_)
        | ShardError::BatchFailed(_)
        | ShardError::NeedsLock { .. }
        | ShardError::NotSpeculative { .. }
        | ShardError::Stopped(_)
        | ShardError::CounterUnread(_)
        | ShardError::TopologyChanged { .. } => Status::unavailable(format!("kubeshard: {e}")),
        ShardError::Corrupt(_) | ShardError::ImportUnfinished { .. } => {
            Status::internal(format!("kubeshard: {e}"))
        }
    }
}

/// A Txn whose keys live on several shards: kubeshard commits a Txn
/// atomically inside one shard's database and has no atomic commit across
/// databases, so it refuses rather than half-apply (docs/topology.md).
pub fn cross_shard_txn(shards: &str) -> Status {
    Status::invalid_argument(format!(
        "kubeshard: a transaction may not span shards; its keys live on shards {shards}"
    ))
}

/// The answer for etcd RPCs that kubeshard does not offer.
pub fn unimplemented(rpc: &str, why: &str) -> Status {
    Status::unimplemented(format!("kubeshard does not implement {rpc}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_table() {
        // The table in shared/design/etcd-contract.md.
        let cases = [
            (
                ShardError::Compacted {
                    compact_revision: 5,
                },
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
            ),
            (
                ShardError::FutureRevision,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
            (
                ShardError::LeaseNotFound,
                Code::NotFound,
                "etcdserver: requested lease not found",
            ),
            // etcd's ErrGRPCTimeout and ErrGRPCTimeoutDueToConnectionLost.
            (
                ShardError::TimedOut,
                Code::Unavailable,
                "etcdserver: request timed out",
            ),
            (
                ShardError::NoSpace("disk full".into()),
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
            ),
            (
                ShardError::CommitUnknown,
                Code::Unavailable,
                "etcdserver: request timed out, possibly due to connection lost",
            ),
        ];
        for (e, code, message) in cases {
            let s = shard_status(e);
            assert_eq!((s.code(), s.message()), (code, message));
        }
        for (e, message) in [
            (EtcdError::EmptyKey, "etcdserver: key is not provided"),
            (
                EtcdError::RequestTooLarge,
                "etcdserver: request is too large",
            ),
            (
                EtcdError::TooManyOps,
                "etcdserver: too many operations in txn request",
            ),
            (
                EtcdError::DuplicateKey,
                "etcdserver: duplicate key given in txn request",
            ),
        ] {
            let s = Status::from(e);
            assert_eq!((s.code(), s.message()), (Code::InvalidArgument, message));
        }
    }
}
