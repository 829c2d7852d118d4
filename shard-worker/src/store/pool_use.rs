//! Every acquisition of a pooled connection goes through [`PoolUse::acquire`]:
//! it counts who waits for one (sqlx reports open and idle connections, but
//! not that, for the operators' dashboard), and it hands out a [`Held`]
//! connection, which is closed rather than returned to the pool when the
//! call that took it is abandoned at its deadline (`deadline.rs`), or when
//! the pool already keeps as many idle connections as it may.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool};

use crate::deadline::{self, Call};

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

/// Counts the calls waiting for a pooled connection, and keeps the pool's
/// idle connections to a limit.
///
/// sqlx hands idle connections out in turn (first in, first out), so under
/// steady load each is used every few milliseconds and none is ever idle
/// for `--datastore-connection-max-idle-time`: without a limit a pool keeps
/// every connection a burst made it open, and the count only climbs toward
/// the pool's size. The limit (Go's database/sql rule) lets it shrink back.
#[derive(Debug)]
pub struct PoolUse {
    waiting: AtomicU32,
    max_idle: usize,
}

impl Default for PoolUse {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl PoolUse {
    /// At most `max_idle` idle connections kept.
    pub fn new(max_idle: usize) -> Self {
        Self {
            waiting: AtomicU32::new(0),
            max_idle,
        }
    }

    pub async fn acquire<DB: Database>(&self, pool: &Pool<DB>) -> Result<Held<DB>, sqlx::Error> {
        // A guard, so a call dropped while it waits is no longer counted.
        struct Waiting<'a>(&'a AtomicU32);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        Ok(Held {
            conn: pool.acquire().await?,
            call: deadline::current(),
            idle_limit: (self.max_idle < usize::MAX).then(|| (pool.clone(), self.max_idle)),
        })
    }

    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// A pooled connection taken by a bounded call. When that call is
/// abandoned at its deadline, the connection may be in the middle of a
/// statement on a database that hangs: it is closed (sqlx gives up on a
/// graceful close after 5 s and drops the socket), never reused. Returned
/// to the pool, sqlx would first ping it, and wait on the hung socket.
pub struct Held<DB: Database> {
    conn: PoolConnection<DB>,
    call: Option<Arc<Call>>,
    /// The pool and how many idle connections it may keep.
    idle_limit: Option<(Pool<DB>, usize)>,
}

impl<DB: Database> Held<DB> {
    /// Ties a connection kept between calls (the writer's) to the call now
    /// running.
    pub fn rebind(&mut self) {
        self.call = deadline::current();
    }
}

impl<DB: Database> Deref for Held<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl<DB: Database> DerefMut for Held<DB> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

impl<DB: Database> Drop for Held<DB> {
    fn drop(&mut self) {
        let abandoned = self.call.as_ref().is_some_and(|call| call.abandoned());
        // Releases at the same moment may each see room: the limit is
        // overshot by at most the connections released together.
        let spare = self
            .idle_limit
            .as_ref()
            .is_some_and(|(pool, max_idle)| pool.num_idle() >= *max_idle);
        if abandoned || spare {
            self.conn.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

    use super::*;
    use crate::deadline;

    async fn pool() -> Pool<sqlx::Sqlite> {
        pool_of(1).await
    }

    async fn pool_of(size: u32) -> Pool<sqlx::Sqlite> {
        let options = SqliteConnectOptions::new().filename(":memory:");
        match SqlitePoolOptions::new()
            .max_connections(size)
            .min_connections(0)
            .connect_with(options)
            .await
        {
            Ok(pool) => pool,
            Err(e) => panic!("an in-memory SQLite pool: {e}"),
        }
    }

    /// Waits for sqlx's background return or close of a dropped connection.
    async fn settled(pool: &Pool<sqlx::Sqlite>) -> (u32, usize) {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if pool.size() == 0 || pool.num_idle() == 1 {
                break;
            }
        }
        (pool.size(), pool.num_idle())
    }

    #[tokio::test]
    async fn a_connection_of_an_abandoned_call_is_closed() {
        let (pool, uses) = (pool().await, PoolUse::default());
        let late = deadline::bounded(Duration::from_millis(50), async {
            let _conn = uses.acquire(&pool).await;
            std::future::pending::<()>().await;
        })
        .await;
        assert!(late.is_err());
        assert_eq!(settled(&pool).await, (0, 0), "(open, idle) after the call");
    }

    #[tokio::test]
    async fn a_pool_keeps_no_more_idle_connections_than_its_limit() {
        let pool = pool_of(4).await;
        let uses = PoolUse::new(2);
        let mut held = Vec::new();
        for _ in 0..4 {
            match uses.acquire(&pool).await {
                Ok(conn) => held.push(conn),
                Err(e) => panic!("a connection: {e}"),
            }
        }
        assert_eq!(pool.size(), 4);
        // One at a time, as releases after a burst usually come.
        while let Some(conn) = held.pop() {
            drop(conn);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            (pool.size(), pool.num_idle()),
            (2, 2),
            "(open, idle) after the burst"
        );
        // Kine's negative limit: none kept.
        let none = PoolUse::new(0);
        drop(none.acquire(&pool).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            (pool.size(), pool.num_idle()),
            (1, 1),
            "(open, idle) after a use with no idle kept"
        );
    }

    #[tokio::test]
    async fn a_connection_of_a_finished_call_goes_back_to_the_pool() {
        let (pool, uses) = (pool().await, PoolUse::default());
        let done = deadline::bounded(Duration::from_secs(5), async {
            uses.acquire(&pool).await.map(drop)
        })
        .await;
        assert!(matches!(done, Ok(Ok(()))));
        assert_eq!(settled(&pool).await, (1, 1), "(open, idle) after the call");
    }
}
