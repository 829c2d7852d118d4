//! Every acquisition of a pooled connection goes through [`PoolUse::acquire`]:
//! it counts who waits for one (sqlx reports open and idle connections, but
//! not that, for the operators' dashboard), and it hands out a [`Held`]
//! connection, which is closed rather than returned to the pool when the
//! call that took it is abandoned at its deadline (`deadline.rs`), when the
//! pool already keeps as many idle connections as it may, or when the pool
//! has more connections than it needed over the last idle time.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

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
/// the pool's size. Two rules let it shrink back, as Go's database/sql
/// pools (kine's) do: at most `max_idle` idle connections, and no more
/// connections than were in use at once over the last idle time
/// ([`Demand`]).
#[derive(Debug)]
pub struct PoolUse {
    waiting: AtomicU32,
    max_idle: usize,
    demand: Option<Arc<Demand>>,
}

impl Default for PoolUse {
    fn default() -> Self {
        Self::new(usize::MAX, None)
    }
}

impl PoolUse {
    /// At most `max_idle` idle connections kept, and, with a `max_idle_time`,
    /// none that was not needed over that time (within twice that time).
    pub fn new(max_idle: usize, max_idle_time: Option<Duration>) -> Self {
        Self {
            waiting: AtomicU32::new(0),
            max_idle,
            demand: max_idle_time
                .filter(|t| !t.is_zero())
                .map(|t| Arc::new(Demand::new(t))),
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
        let conn = pool.acquire().await?;
        if let Some(demand) = &self.demand {
            demand.note(Connections::default().with_pool(pool).in_use());
        }
        let limited = self.max_idle < usize::MAX || self.demand.is_some();
        Ok(Held {
            conn,
            call: deadline::current(),
            limits: limited.then(|| Limits {
                pool: pool.clone(),
                max_idle: self.max_idle,
                demand: self.demand.clone(),
            }),
        })
    }

    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// The most connections of a pool in use at once over the last one to two
/// idle times: the connections a pool that hands out its most recently
/// used idle connection first (Go's) would still have after closing those
/// idle for longer than that. sqlx hands out the least recently used, so
/// under steady load none is ever idle that long; counting demand instead
/// closes the same spare connections. A shard's read and write pools share
/// one: the write pool's single connection can only raise a peak to one,
/// which keeps a connection more at worst, and is never spare itself.
#[derive(Debug)]
struct Demand {
    epoch: Instant,
    window: Duration,
    /// Spare connections are closed one at a time, this far apart: closes
    /// take a moment to show in the pool's size, and several releases
    /// seeing the same surplus would otherwise close more than it.
    gap: Duration,
    peaks: Mutex<Peaks>,
}

#[derive(Debug, Default)]
struct Peaks {
    /// Since the epoch.
    started: Duration,
    current: u32,
    previous: u32,
    last_close: Option<Duration>,
}

impl Demand {
    fn new(window: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            window,
            gap: (window / 10).min(Duration::from_secs(1)),
            peaks: Mutex::new(Peaks::default()),
        }
    }

    fn peaks(&self, now: Duration) -> std::sync::MutexGuard<'_, Peaks> {
        let mut peaks = self.peaks.lock().unwrap_or_else(PoisonError::into_inner);
        let age = now.saturating_sub(peaks.started);
        if age >= self.window {
            peaks.previous = if age >= 2 * self.window {
                0
            } else {
                peaks.current
            };
            peaks.current = 0;
            peaks.started = now;
        }
        peaks
    }

    /// `in_use` connections are in use just after an acquire.
    fn note(&self, in_use: u32) {
        let mut peaks = self.peaks(self.epoch.elapsed());
        peaks.current = peaks.current.max(in_use);
    }

    /// Whether a connection released to a pool of `open` connections is
    /// one more than the pool needed lately, and its turn to be closed.
    fn spare(&self, open: u32) -> bool {
        let now = self.epoch.elapsed();
        let mut peaks = self.peaks(now);
        // The released connection itself was in use.
        let needed = peaks.current.max(peaks.previous).max(1);
        let due = peaks
            .last_close
            .is_none_or(|last| now.saturating_sub(last) >= self.gap);
        if open > needed && due {
            peaks.last_close = Some(now);
            return true;
        }
        false
    }
}

/// What a connection's release is checked against.
struct Limits<DB: Database> {
    pool: Pool<DB>,
    max_idle: usize,
    demand: Option<Arc<Demand>>,
}

impl<DB: Database> Limits<DB> {
    fn spare(&self) -> bool {
        // Releases at the same moment may each see room: the idle limit is
        // overshot by at most the connections released together.
        self.pool.num_idle() >= self.max_idle
            || self
                .demand
                .as_ref()
                .is_some_and(|demand| demand.spare(self.pool.size()))
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
    /// How many connections its pool may keep.
    limits: Option<Limits<DB>>,
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
        if abandoned || self.limits.as_ref().is_some_and(Limits::spare) {
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
        let uses = PoolUse::new(2, None);
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
        let none = PoolUse::new(0, None);
        drop(none.acquire(&pool).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            (pool.size(), pool.num_idle()),
            (1, 1),
            "(open, idle) after a use with no idle kept"
        );
    }

    #[tokio::test]
    async fn a_pool_closes_the_connections_it_did_not_need_over_its_idle_time() {
        let pool = pool_of(4).await;
        let uses = PoolUse::new(usize::MAX, Some(Duration::from_millis(200)));
        let take = |n| {
            let (pool, uses) = (&pool, &uses);
            async move {
                let mut held = Vec::new();
                for _ in 0..n {
                    match uses.acquire(pool).await {
                        Ok(conn) => held.push(conn),
                        Err(e) => panic!("a connection: {e}"),
                    }
                }
                held
            }
        };
        drop(take(4).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!((pool.size(), pool.num_idle()), (4, 4), "after a burst");
        // Steady load that needs two at once: within two idle times the two
        // spare connections are closed, and no more.
        for _ in 0..60 {
            drop(take(2).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            (pool.size(), pool.num_idle()),
            (2, 2),
            "(open, idle) after steady use of two"
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
