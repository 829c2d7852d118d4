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

#[derive(Debug, Default)]
pub struct Peers {
    /// Other routers were seen serving the same databases.
    present: AtomicBool,
    /// Counter reads begun and finished, numbered.
    begun: AtomicU64,
    finished: AtomicU64,
    /// One counter read at a time; the others wait for it or the next.
    reading: tokio::sync::Mutex<()>,
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

    /// When other routers serve: returns once `shards`' floor is at least
    /// every revision any router acknowledged before this call.
    pub async fn catch_up(&self, shards: &Shards) -> Result<(), ShardError> {
        if !self.present() {
            return Ok(());
        }
        // A read numbered above this began after the call.
        let arrived = self.begun.load(Ordering::Acquire);
        let _turn = self.reading.lock().await;
        if self.finished.load(Ordering::Acquire) > arrived {
            return Ok(());
        }
        let number = self.begun.fetch_add(1, Ordering::AcqRel) + 1;
        shards.refresh().await?;
        self.finished.fetch_max(number, Ordering::AcqRel);
        Ok(())
    }
}
