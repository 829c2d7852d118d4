//! The kubeshard router: serves the etcd v3 gRPC API over SQL shards.
//!
//! A request's route: `server/<service>.rs` validates it (`validate.rs`),
//! `shards.rs` picks its shard(s) from the topology and keeps one revision
//! space over them; reads go to the shards' stores and writes to their
//! writer actors (crate `kubeshard-shard-worker`); ranges and watches that
//! span shards are merged in `server/kv.rs` and `server/watch.rs`; errors
//! become etcd's answers in `error.rs`.
#![forbid(unsafe_code)]

mod background;
mod compaction;
pub mod error;
mod health;
mod http;
mod listen;
pub mod metrics;
mod peers;
mod presence;
pub mod server;
pub mod shards;
mod tls;
mod topology_change;
pub mod validate;

pub use listen::Listening;
pub use server::{RunningServer, SHUTDOWN_GRACE, ServeError, start};
