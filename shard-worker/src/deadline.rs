//! Bounded time for database calls (`--datastore-timeout`).
//!
//! A database that hangs (a frozen host, a black-holed network path) keeps
//! its connections open and answers nothing; without a deadline every
//! request to its shard would wait until the client gives up, and the
//! client's write could still commit after it was told it failed.
//!
//! [`bounded`] runs a call until its deadline and, when the deadline comes
//! first, drops it and says whether it had started to commit. Two things
//! make that safe:
//!
//! - A connection the dropped call held must not be used again: it may sit
//!   in the middle of a statement whose answer arrives (if ever) after the
//!   thaw. [`Call::abandoned`] tells the connection guards
//!   (`store/pool_use.rs`) to close it instead of returning it to the pool,
//!   whose check of a returned connection would itself wait on the hung
//!   socket.
//! - A write path calls [`committing`] just before it sends what makes the
//!   write durable (COMMIT, or a statement that is its own transaction).
//!   A call dropped before that never commits: nothing it sent can, and
//!   its connection is closed. One dropped after it may or may not have
//!   committed, and is reported as such ([`Elapsed::committing`]).
//!
//! Bounds nest (the writer bounds a batch by its requests' deadlines, and
//! the store bounds each call): the inner ones share the outer call's state,
//! so whichever fires first abandons the connections of the whole call.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

tokio::task_local! {
    static CALL: Arc<Call>;
}

/// The state of one bounded call, shared with the connection guards it
/// takes.
#[derive(Debug, Default)]
pub struct Call {
    abandoned: AtomicBool,
    committing: AtomicBool,
}

impl Call {
    /// The call was dropped at its deadline: its connections are suspect.
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }
}

/// The call that the running code belongs to, if it is bounded.
pub fn current() -> Option<Arc<Call>> {
    CALL.try_with(Arc::clone).ok()
}

/// Marks the running call as sending its commit: if its deadline passes
/// from now on, its outcome is unknown.
pub fn committing() {
    let _ = CALL.try_with(|call| call.committing.store(true, Ordering::Release));
}

/// A call that did not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed {
    /// It had started to commit: it may have taken effect.
    pub committing: bool,
}

/// Runs `call` for at most `limit`.
pub async fn bounded<T>(limit: Duration, call: impl Future<Output = T>) -> Result<T, Elapsed> {
    bounded_marked(limit, call).await.0
}

/// [`bounded`], and whether the call began to commit: a write that then
/// lost its connection may have committed.
pub async fn bounded_marked<T>(
    limit: Duration,
    call: impl Future<Output = T>,
) -> (Result<T, Elapsed>, bool) {
    let (state, out) = match current() {
        Some(state) => (state.clone(), race(state, limit, call).await),
        None => {
            let state = Arc::new(Call::default());
            let scoped = CALL.scope(state.clone(), call);
            (state.clone(), race(state, limit, scoped).await)
        }
    };
    (out, state.committing.load(Ordering::Acquire))
}

async fn race<T>(
    state: Arc<Call>,
    limit: Duration,
    call: impl Future<Output = T>,
) -> Result<T, Elapsed> {
    tokio::pin!(call);
    tokio::select! {
        biased;
        out = &mut call => Ok(out),
        () = tokio::time::sleep(limit) => {
            // Before `call` is dropped (on return), so that its guards see it.
            state.abandoned.store(true, Ordering::Release);
            Err(Elapsed { committing: state.committing.load(Ordering::Acquire) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records, when dropped, whether its call was abandoned.
    struct Guard(Option<Arc<Call>>, Arc<AtomicBool>);
    impl Drop for Guard {
        fn drop(&mut self) {
            let abandoned = self.0.as_ref().is_some_and(|c| c.abandoned());
            self.1.store(abandoned, Ordering::Release);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_in_time_is_not_abandoned() {
        let seen = Arc::new(AtomicBool::new(true));
        let out = bounded(Duration::from_secs(1), async {
            let _guard = Guard(current(), seen.clone());
            7
        })
        .await;
        assert_eq!(out, Ok(7));
        assert!(!seen.load(Ordering::Acquire));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_call_is_abandoned_before_it_is_dropped() {
        let seen = Arc::new(AtomicBool::new(false));
        let out = bounded(Duration::from_secs(1), async {
            let _guard = Guard(current(), seen.clone());
            std::future::pending::<()>().await;
        })
        .await;
        assert_eq!(out, Err(Elapsed { committing: false }));
        assert!(seen.load(Ordering::Acquire), "the guard saw no abandonment");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_began_to_commit_says_so() {
        let out = bounded(Duration::from_secs(1), async {
            committing();
            std::future::pending::<()>().await;
        })
        .await;
        assert_eq!(out, Err(Elapsed { committing: true }));
    }

    #[tokio::test(start_paused = true)]
    async fn the_outer_bound_abandons_what_the_inner_one_took() {
        let seen = Arc::new(AtomicBool::new(false));
        let inner = async {
            bounded(Duration::from_secs(10), async {
                let _guard = Guard(current(), seen.clone());
                std::future::pending::<()>().await;
            })
            .await
        };
        let out = bounded(Duration::from_secs(1), inner).await;
        assert_eq!(out, Err(Elapsed { committing: false }));
        assert!(seen.load(Ordering::Acquire));
    }
}
