//! Moving data into kubeshard: `kubeshard import` copies an etcd cluster
//! into a topology keeping every revision (`import.rs`), follows its later
//! changes (`follow.rs`) and compares both sides (`verify.rs`). The source
//! is etcd's gRPC API (`etcd.rs`); the target is every shard of the
//! topology, written through the shards' bulk sinks (`target.rs`).
#![forbid(unsafe_code)]

mod cli;
mod error;
mod etcd;
mod follow;
mod import;
mod target;
mod verify;

pub use cli::ImportCli;
pub use error::{Result, TransferError};
pub use etcd::SourceTls;
pub use import::{ImportOptions, ImportReport, run as run_import};
