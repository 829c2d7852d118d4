//! kubeshard's configuration: the command line, database endpoint URLs and
//! the topology (shards and routing rules).
#![forbid(unsafe_code)]

mod cli;
mod endpoint;
pub mod topology;

pub use cli::{Cli, DEFAULT_ENDPOINT, LogFormat, OptionsError, ServerOptions, ServerTls};
pub use endpoint::{Backend, Endpoint, EndpointError};
pub use topology::{ShardId, Topology, TopologyError};
