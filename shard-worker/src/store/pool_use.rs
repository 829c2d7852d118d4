//! How busy a shard's connection pools are, for the operators' dashboard:
//! sqlx reports open and idle connections, but not who waits for one, so
//! every acquisition goes through [`PoolUse::acquire`], which counts it.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool};

/// Connections of a shard's pools at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connections {
    /// Open connections, busy or idle.
    pub open: u32,
    pub idle: u32,
    /// Calls waiting for a connection.
    pub waiting: u32,
    /// The most the pools may open.
    pub max: u32,
}

impl Connections {
    pub fn in_use(&self) -> u32 {
        self.open.saturating_sub(self.idle)
    }

    /// Adds the connections of `pool`.
    pub fn with_pool<DB: Database>(mut self, pool: &Pool<DB>) -> Self {
        self.open += pool.size();
        self.idle += u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
        self.max += pool.options().get_max_connections();
        self
    }
}

/// Counts the calls waiting for a pooled connection.
#[derive(Debug, Default)]
pub struct PoolUse {
    waiting: AtomicU32,
}

impl PoolUse {
    pub async fn acquire<DB: Database>(
        &self,
        pool: &Pool<DB>,
    ) -> Result<PoolConnection<DB>, sqlx::Error> {
        // A guard, so a call dropped while it waits is no longer counted.
        struct Waiting<'a>(&'a AtomicU32);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        pool.acquire().await
    }

    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }
}
