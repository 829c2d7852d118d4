//! Reading a guarded batch's keys while the batch before it commits
//! (PostgreSQL).
//!
//! Why: a guarded batch costs two statements in a row, the read of the
//! counter row and the batch's keys, then the write. Under etcdctl's paced
//! load the write (with its WAL flush) is about three quarters of a batch
//! and the read the rest, and a shard's commit rate is one over their sum.
//! The writer actor therefore closes the next batch as soon as the one
//! before it is sent, and reads that batch's keys on a second connection
//! while the first commits. The next batch then starts writing as soon as
//! the first has committed.
//!
//! Why its answers are still those of the lock: the read saw one snapshot
//! (one statement), with the counter row's version in it. Every change to
//! a shard writes that row (`guarded_writes.rs`). When the batch before
//! committed guarded, its statement reported the version it wrote and the
//! one its guard required ([`LastGuarded`]). The read is used only if it
//! saw one of the two:
//! - the version written: the read saw the state after the previous batch;
//! - the version required: the read saw the state the previous batch was
//!   applied to, with nothing committed in between (else that batch's guard
//!   would have failed). Keys the previous batch wrote then read wrong, so
//!   the read is used only if it shares no key with them; every other key
//!   is unchanged, and the counter is the one the previous batch wrote.
//!
//! Either way the batch guards its own write with the version the previous
//! batch wrote, so it commits only if nothing else committed since. Reads
//! the batch makes later (leases, ranges) run on the writer connection after
//! the previous batch committed, under the same guard. Anything else (the
//! previous batch ran under the lock, failed, or was too large for one
//! statement; another router wrote) discards the read, and the batch reads
//! as usual.

use std::collections::HashSet;

use kubeshard_proto::mvccpb::KeyValue;

use super::Revisions;

/// A read of a batch's keys made before the batch before it committed.
/// Built by [`super::ShardStore::read_ahead`], for the batch it was made for.
#[derive(Debug, Clone)]
pub struct ReadAhead {
    /// The keys read, as `write::prefetch_keys` lists them for the batch.
    pub(super) keys: Vec<Vec<u8>>,
    /// What a batch needs of its first read.
    pub(super) read: StartRead,
}

/// The counter row and the live rows of a batch's keys, read in one snapshot.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StartRead {
    /// The counter row's version in that snapshot.
    pub(super) seen: String,
    pub(super) revs: Revisions,
    /// The live rows among the keys (absent keys have none).
    pub(super) live: Vec<KeyValue>,
}

/// What the last committed batch of this store did, if it was written by
/// one guarded statement.
#[derive(Debug, Clone)]
pub(super) struct LastGuarded {
    /// The counter row's version its guard required.
    pub(super) required: String,
    /// The version its statement wrote.
    pub(super) written: String,
    /// The counter it wrote.
    pub(super) revs: Revisions,
    /// Keys whose live rows it upserted or deleted.
    pub(super) keys: HashSet<Vec<u8>>,
}

impl ReadAhead {
    pub(super) fn new(keys: &[&[u8]], read: StartRead) -> Self {
        ReadAhead {
            keys: keys.iter().map(|k| k.to_vec()).collect(),
            read,
        }
    }

    /// The batch's first read, as of the state `last` left, if this read
    /// can stand for it (see the module comment); None otherwise.
    pub(super) fn usable_after(self, last: Option<&LastGuarded>) -> Option<StartRead> {
        let last = last?;
        if self.read.seen == last.written {
            return Some(self.read);
        }
        if self.read.seen == last.required && !self.keys.iter().any(|k| last.keys.contains(k)) {
            return Some(StartRead {
                seen: last.written.clone(),
                revs: last.revs,
                live: self.read.live,
            });
        }
        None
    }

    /// Whether this read was made for a batch naming exactly `keys`.
    pub(super) fn is_for(&self, keys: &[&[u8]]) -> bool {
        self.keys.len() == keys.len() && self.keys.iter().zip(keys).all(|(a, b)| a == b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &[u8], mod_revision: i64) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            create_revision: 1,
            mod_revision,
            version: 1,
            ..Default::default()
        }
    }

    fn revs(current: i64) -> Revisions {
        Revisions {
            current,
            compacted: 0,
        }
    }

    /// The previous batch required version "10", wrote "11" and revision 7,
    /// and wrote key `b`.
    fn last() -> LastGuarded {
        LastGuarded {
            required: "10".into(),
            written: "11".into(),
            revs: revs(7),
            keys: HashSet::from([b"b".to_vec()]),
        }
    }

    fn ahead(seen: &str, current: i64, keys: &[&[u8]]) -> ReadAhead {
        ReadAhead {
            keys: keys.iter().map(|k| k.to_vec()).collect(),
            read: StartRead {
                seen: seen.into(),
                revs: revs(current),
                live: vec![kv(b"a", 3)],
            },
        }
    }

    #[test]
    fn a_read_after_the_previous_batch_is_used_as_it_is() {
        let read = ahead("11", 7, &[b"a", b"b"]).usable_after(Some(&last()));
        assert_eq!(read, Some(ahead("11", 7, &[]).read));
    }

    #[test]
    fn a_read_before_the_previous_batch_takes_its_counter_if_no_key_is_shared() {
        let Some(read) = ahead("10", 5, &[b"a", b"c"]).usable_after(Some(&last())) else {
            panic!("keys the previous batch did not write read the same before it");
        };
        assert_eq!(
            read.seen, "11",
            "the batch must guard on the version written"
        );
        assert_eq!(read.revs, revs(7));
        assert_eq!(read.live, vec![kv(b"a", 3)]);
    }

    #[test]
    fn a_read_before_the_previous_batch_of_a_key_it_wrote_is_discarded() {
        assert_eq!(
            ahead("10", 5, &[b"a", b"b"]).usable_after(Some(&last())),
            None
        );
    }

    #[test]
    fn a_read_of_any_other_state_is_discarded() {
        // Another writer committed (version 12), or the read is older than
        // the previous batch's start, or nothing is known of it.
        assert_eq!(ahead("12", 9, &[b"a"]).usable_after(Some(&last())), None);
        assert_eq!(ahead("9", 4, &[b"a"]).usable_after(Some(&last())), None);
        assert_eq!(ahead("11", 7, &[b"a"]).usable_after(None), None);
    }

    #[test]
    fn a_read_serves_only_the_keys_it_was_made_for() {
        let read = ahead("11", 7, &[b"a", b"b"]);
        assert!(read.is_for(&[b"a", b"b"]));
        assert!(!read.is_for(&[b"a"]));
        assert!(!read.is_for(&[b"a", b"c"]));
    }
}
