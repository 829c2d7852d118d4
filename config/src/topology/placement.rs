//! Rendezvous (highest random weight) placement over a fixed-spec hash.
//!
//! The score of shard `s` for placement key `k` is
//! `XXH3_64bits(s.name || 0x00 || k)` (seed 0; the XXH3 64-bit output is
//! frozen by its specification since xxHash 0.8.0, independent of Rust's
//! `Hash`). The shard with the highest score wins; a tie, which practically
//! never happens, goes to the greater name, so placement does not depend on
//! the order in which a route lists its shards. Adding a shard to a route
//! only moves keys onto the new shard; removing one only moves that shard's
//! keys.

use xxhash_rust::xxh3::Xxh3;

/// `XXH3_64bits(name || 0x00 || placement_key)`.
pub(crate) fn score(name: &str, placement_key: &[u8]) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(name.as_bytes());
    hasher.update(&[0]);
    hasher.update(placement_key);
    hasher.digest()
}

/// The candidate with the highest score; `None` when there is none.
pub(crate) fn rendezvous<'n, T: Copy>(
    candidates: impl IntoIterator<Item = (T, &'n str)>,
    placement_key: &[u8],
) -> Option<T> {
    candidates
        .into_iter()
        .max_by_key(|&(_, name)| (score(name, placement_key), name))
        .map(|(candidate, _)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxh3_is_the_specified_function() {
        // Reference values of XXH3_64bits (seed 0) from the xxHash project.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        // Streaming equals one-shot over the concatenation.
        assert_eq!(
            score("pods-a", b"/registry/pods/"),
            xxhash_rust::xxh3::xxh3_64(b"pods-a\0/registry/pods/")
        );
    }

    #[test]
    fn order_of_candidates_does_not_matter() {
        let names = ["a", "b", "c", "d"];
        for i in 0..200 {
            let key = format!("/registry/events/ns-{i}/");
            let forward = rendezvous(names.iter().map(|n| (*n, *n)), key.as_bytes());
            let backward = rendezvous(names.iter().rev().map(|n| (*n, *n)), key.as_bytes());
            assert_eq!(forward, backward);
        }
        assert_eq!(rendezvous(Vec::<(u8, &str)>::new(), b"x"), None);
    }
}
