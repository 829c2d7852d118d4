//! Moving data into kubeshard and between its shards: `kubeshard import`
//! copies an etcd cluster into a topology keeping every revision
//! (`import.rs`), follows its later changes (`follow.rs`) and compares both
//! sides (`verify.rs`); the source is etcd's gRPC API (`etcd.rs`), the
//! target every shard of the topology (`target.rs`). `kubeshard reshard`
//! moves keys whose shard changes between two topologies (`reshard.rs`).
//! Both write through the shards' bulk access (`shard-worker/src/bulk.rs`).
#![forbid(unsafe_code)]

mod cli;
mod error;
mod etcd;
mod follow;
mod import;
mod online;
mod reshard;
mod routers;
mod target;
mod verify;

pub use cli::{ImportCli, ReshardCli};
pub use error::{Result, TransferError};
pub use etcd::SourceTls;
pub use import::{ImportOptions, ImportReport, run as run_import};
pub use reshard::{ReshardOptions, ReshardReport, run as run_reshard};
