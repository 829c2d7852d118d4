//! Every acquisition of a pooled connection goes through [`PoolUse::acquire`]:
//! it counts who waits for one (sqlx reports open and idle connections, but
//! not that, for the operators' dashboard), and it hands out a [`Held`]
//! connection, which is closed rather than returned to the pool when the
//! call that took it is abandoned at its deadline (`deadline.rs`).

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

/// Counts the calls waiting for a pooled connection.
#[derive(Debug, Default)]
pub struct PoolUse {
    waiting: AtomicU32,
}

impl PoolUse {
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
        if self.call.as_ref().is_some_and(|call| call.abandoned()) {
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
        let options = SqliteConnectOptions::new().filename(":memory:");
        match SqlitePoolOptions::new()
            .max_connections(1)
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
