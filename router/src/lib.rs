//! The kubeshard router: serves the etcd v3 gRPC API over SQL shards.
//!
//! A request's route: `server/<service>.rs` validates it (`validate.rs`),
//! then reads go to the shard's store and writes to the shard's writer actor
//! (crate `kubeshard-shard-worker`); errors become etcd's answers in `error.rs`.
#![forbid(unsafe_code)]

mod background;
pub mod error;
pub mod metrics;
pub mod server;
pub mod validate;

pub use server::{ETCD_VERSION, RunningServer, ServeError, start};
