//! kubeshard's configuration: the command line, database endpoint URLs and
//! the topology (shards and routing rules).
#![forbid(unsafe_code)]

mod cli;
mod endpoint;
pub mod kine;
pub mod topology;

pub use cli::{
    AutoCompaction, Cli, DEFAULT_ENDPOINT, DEFAULT_ETCD_VERSION, DEFAULT_POLL_BATCH, LogFormat,
    OptionsError, PoolSettings, ServerOptions, ServerTls, SlowSql,
};
pub use endpoint::{Backend, DatabaseTls, Endpoint, EndpointError};
pub use topology::{ShardId, Topology, TopologyError};
