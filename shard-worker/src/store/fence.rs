//! What keeps a router with an old topology away from a database whose
//! keys are moving (online resharding, `docs/topology.md`).
//!
//! Every database holds the topology version it was last fenced at
//! (`ks_meta.epoch`); a move fences every database of both topologies at
//! the new version before any key changes hands. Every read and every
//! write batch reads that column in the snapshot it works on and fails
//! with [`ShardError::TopologyChanged`] when it is above the version this
//! process serves. So a router that has not switched yet can neither write
//! a moved key where it no longer lives nor read it there, however late it
//! learns of the move: no clock or heartbeat is trusted for that.
//!
//! The revision class (which revisions a shard hands out) changes with the
//! topology, so it is held here too: a batch takes version and class
//! together.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::error::{Result, ShardError};
use crate::store::RevisionClass;

/// The topology version this process serves a database for, and the
/// revisions the database hands out in that topology.
#[derive(Debug)]
pub struct Fence {
    state: Mutex<Serving>,
    /// `state.version`, for reads, which check only the version: no lock
    /// on every read.
    version: AtomicI64,
}

/// One consistent view of a [`Fence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    pub version: i64,
    pub class: RevisionClass,
}

impl Fence {
    pub fn new(version: i64, class: RevisionClass) -> Self {
        Fence {
            state: Mutex::new(Serving { version, class }),
            version: AtomicI64::new(version),
        }
    }

    pub fn serving(&self) -> Serving {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves topology `version`, in which the database hands out `class`.
    /// A version below the one served is ignored: it never goes back.
    pub fn serve(&self, version: i64, class: RevisionClass) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if version >= state.version {
            *state = Serving { version, class };
            self.version.store(version, Ordering::Release);
        }
    }

    /// Fails if the database, fenced at `stored`, is ahead of this process.
    pub fn check(&self, stored: i64) -> Result<()> {
        check(self.version.load(Ordering::Acquire), stored)
    }
}

/// Fails if a database fenced at `stored` is ahead of version `serving`.
pub fn check(serving: i64, stored: i64) -> Result<()> {
    if stored > serving {
        return Err(ShardError::TopologyChanged { stored, serving });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_ahead_is_refused_and_the_version_never_goes_back() {
        let fence = Fence::new(0, RevisionClass::ALL);
        assert!(fence.check(0).is_ok());
        assert!(matches!(
            fence.check(1),
            Err(ShardError::TopologyChanged {
                stored: 1,
                serving: 0
            })
        ));
        let two = RevisionClass::of_shard(1, 2).unwrap_or(RevisionClass::ALL);
        fence.serve(1, two);
        assert!(fence.check(1).is_ok());
        fence.serve(0, RevisionClass::ALL);
        assert_eq!(
            fence.serving(),
            Serving {
                version: 1,
                class: two
            }
        );
    }
}
