//! One shard of kubeshard: its SQL schema and dialects, the writer actor that
//! owns the shard's write path (group commit), and the watch stream that
//! polls the shard's history.
#![forbid(unsafe_code)]

pub mod bulk;
pub mod connect;
pub mod deadline;
pub mod dialect;
pub mod error;
pub mod keys;
pub mod labels;
pub mod observe;
pub mod store;
pub mod watch;
pub mod writer;

pub use connect::{open_bulk, open_store, open_store_with};
pub use error::{Result, ShardError};
pub use keys::KeyRange;
pub use observe::{DATABASE_CALLS, ShardObserver};
pub use store::fence::Serving;
pub use store::{
    CommittedBatch, Connections, EventPage, LeaseRecord, RevisionClass, Revisions, ShardStore,
    WritePath, WriteRequest, WriteResponse,
};
pub use watch::{EventBatch, WatchHub};
pub use writer::ShardWriter;

mod shard;
pub use shard::{Shard, ShardSettings};
