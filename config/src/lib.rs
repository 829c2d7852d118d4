//! kubeshard's configuration: the command line and database endpoint URLs.
#![forbid(unsafe_code)]

mod cli;
mod endpoint;

pub use cli::{Cli, LogFormat, ServerOptions};
pub use endpoint::{Backend, Endpoint, EndpointError};
