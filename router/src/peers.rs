//! Several routers over the same databases, and real-time order.
//!
//! A router's floor (`shards.rs`) holds every revision it has seen, so a
//! write through it gets a revision above everything it acknowledged. With
//! several routers that is not enough: router B could acknowledge a write
//! at revision 500 on one shard, and router A, whose floor is at 450, then
//! give a later write on another shard revision 451. etcd never does that
//! (its revisions follow real time), and the linearizability check finds
//! it (`tests/linearizability`).
//!
//! So while other routers serve (`presence.rs` says so), a write, and a
//! read at the current revision, first waits for a read of every shard's
//! counter that began after it arrived: every revision acknowledged before
//! then, by any router, is at or below some shard's counter, and the floor
//! rises above it. Concurrent requests share one such read (as a write
//! batch shares a commit), so it costs one parallel round trip per request
//! wave, and nothing while the router is alone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kubeshard_shard_worker::ShardError;

use crate::shards::Shards;

/// Whether other routers serve: shared by every topology version.
#[derive(Debug, Default)]
pub struct Peers {
    present: AtomicBool,
}

impl Peers {
    pub fn set_present(&self, present: bool) {
        if self.present.swap(present, Ordering::AcqRel) != present {
            tracing::info!(
                other_routers = present,
                "writes and reads {} every shard's counter first",
                if present {
                    "now read"
                } else {
                    "no longer read"
                }
            );
        }
    }

    pub fn present(&self) -> bool {
        self.present.load(Ordering::Acquire)
    }
}

/// The counter reads of one topology version (each has its own floor),
/// shared by the requests that arrive while one is under way.
#[derive(Debug, Default)]
pub struct CatchUp {
    /// Reads begun, numbered from 1.
    begun: AtomicU64,
    /// The last read finished: its number and how it ended. Requests that
    /// waited for it take its outcome, a failure included, rather than
    /// each trying again in turn (which, with a database that hangs,
    /// would make the k-th of them wait k times the timeout).
    finished: std::sync::Mutex<(u64, Outcome)>,
    /// One read at a time; the others wait for it or the next.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone, Default)]
enum Outcome {
    #[default]
    Read,
    TimedOut,
    TopologyChanged {
        stored: i64,
        serving: i64,
    },
    Failed(String),
}

impl Outcome {
    fn of(result: &Result<i64, ShardError>) -> Self {
        match result {
            Ok(_) => Outcome::Read,
            Err(ShardError::TimedOut) => Outcome::TimedOut,
            Err(ShardError::TopologyChanged { stored, serving }) => Outcome::TopologyChanged {
                stored: *stored,
                serving: *serving,
            },
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    fn result(self) -> Result<(), ShardError> {
        match self {
            Outcome::Read => Ok(()),
            Outcome::TimedOut => Err(ShardError::TimedOut),
            Outcome::TopologyChanged { stored, serving } => {
                Err(ShardError::TopologyChanged { stored, serving })
            }
            Outcome::Failed(why) => Err(ShardError::CounterUnread(why)),
        }
    }
}

impl CatchUp {
    /// When other routers serve: returns once `shards`' floor is at least
    /// every revision any router acknowledged before this call.
    pub async fn run(&self, peers: &Peers, shards: &Shards) -> Result<(), ShardError> {
        if !peers.present() {
            return Ok(());
        }
        // A read numbered above this began after the call.
        let arrived = self.begun.load(Ordering::Acquire);
        let _turn = self.reading.lock().await;
        {
            let finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
            if finished.0 > arrived {
                return finished.1.clone().result();
            }
        }
        let number = self.begun.fetch_add(1, Ordering::AcqRel) + 1;
        let read = shards.refresh().await;
        let outcome = Outcome::of(&read);
        *self.finished.lock().unwrap_or_else(|p| p.into_inner()) = (number, outcome.clone());
        outcome.result()
    }
}
