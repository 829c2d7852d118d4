//! `regex = ...` matchers, and what one says about every key under a prefix.
//!
//! Keys are matched by the regex crate, which searches the whole key. To
//! route a watch or list of a prefix without asking every shard a regex
//! route targets, the same pattern is also compiled to a DFA and the prefix
//! is fed through it: if the DFA dies no key under the prefix can match, and
//! if it has already matched (or matches whatever byte comes next) every
//! key does. Patterns whose DFA is too large, or uses what a DFA cannot
//! (Unicode word boundaries), are not analysed: they may match some keys.

use regex_automata::dfa::{Automaton, StartKind, dense};
use regex_automata::nfa::thompson;
use regex_automata::util::{primitives::StateID, syntax};
use regex_automata::{Input, MatchKind};

use super::keys::Coverage;

/// Bounds what a pathological pattern may cost; past it the pattern is not
/// analysed. Routing patterns are small.
const DFA_SIZE_LIMIT: usize = 4 << 20;

#[derive(Debug, Clone)]
pub(crate) struct RegexMatcher {
    regex: regex::bytes::Regex,
    /// `None` when the pattern was not analysed (see the module comment).
    dfa: Option<dense::DFA<Vec<u32>>>,
}

impl RegexMatcher {
    pub(crate) fn new(pattern: &str) -> Result<Self, regex::Error> {
        let regex = regex::bytes::Regex::new(pattern)?;
        Ok(Self {
            regex,
            dfa: build_dfa(pattern),
        })
    }

    pub(crate) fn is_match(&self, key: &[u8]) -> bool {
        self.regex.is_match(key)
    }

    /// How many of the keys starting with `prefix` match.
    pub(crate) fn coverage(&self, prefix: &[u8]) -> Coverage {
        let Some(dfa) = &self.dfa else {
            return Coverage::Some;
        };
        // The start state depends on what precedes the search (`^`, `\b`):
        // the key's search starts at its first byte, as this one does.
        let Ok(mut state) = dfa.start_state_forward(&Input::new(prefix)) else {
            return Coverage::Some;
        };
        for &byte in prefix {
            state = dfa.next_state(state, byte);
            // Match states come one byte late: this one says a match ended
            // before `byte`, inside the prefix, so every key has it.
            if dfa.is_match_state(state) {
                return Coverage::All;
            }
            if dfa.is_dead_state(state) {
                return Coverage::None;
            }
            if dfa.is_quit_state(state) {
                return Coverage::Some;
            }
        }
        if matches_whatever_follows(dfa, state) {
            Coverage::All
        } else {
            Coverage::Some
        }
    }
}

/// Whether a match ends exactly at the end of the prefix: the key that is
/// the prefix itself matches, and so does every longer one.
fn matches_whatever_follows(dfa: &dense::DFA<Vec<u32>>, state: StateID) -> bool {
    dfa.is_match_state(dfa.next_eoi_state(state))
        && (0..=u8::MAX).all(|byte| dfa.is_match_state(dfa.next_state(state, byte)))
}

/// The regex crate's `bytes::Regex` syntax: Unicode on, but the pattern may
/// match bytes that are not UTF-8.
fn build_dfa(pattern: &str) -> Option<dense::DFA<Vec<u32>>> {
    dense::Builder::new()
        .syntax(syntax::Config::new().utf8(false))
        .thompson(thompson::Config::new().utf8(false))
        .configure(
            dense::DFA::config()
                .start_kind(StartKind::Unanchored)
                // Every match, no leftmost preference: only whether one
                // exists matters.
                .match_kind(MatchKind::All)
                .dfa_size_limit(Some(DFA_SIZE_LIMIT))
                .determinize_size_limit(Some(DFA_SIZE_LIMIT)),
        )
        .build(pattern)
        .ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    fn coverage(pattern: &str, prefix: &str) -> Coverage {
        RegexMatcher::new(pattern)
            .unwrap()
            .coverage(prefix.as_bytes())
    }

    #[test]
    fn custom_resource_groups() {
        let p = r"^/registry/[^/]+\.[^/]+/";
        assert_eq!(coverage(p, "/registry/configmaps/"), Coverage::None);
        assert_eq!(coverage(p, "/registry/configmaps/ns/"), Coverage::None);
        assert_eq!(coverage(p, "/registry/a.io/"), Coverage::All);
        assert_eq!(coverage(p, "/registry/a.io/widgets/ns/"), Coverage::All);
        assert_eq!(coverage(p, "/registry/a.io"), Coverage::Some);
        assert_eq!(coverage(p, "/registry/"), Coverage::Some);
        assert_eq!(coverage(p, ""), Coverage::Some);
        assert_eq!(coverage(p, "/other/a.io/"), Coverage::None);
    }

    #[test]
    fn unanchored_patterns_search_the_whole_key() {
        assert_eq!(coverage("secret", "/registry/secrets/"), Coverage::All);
        assert_eq!(coverage("secret", "/registry/configmaps/"), Coverage::Some);
        assert_eq!(coverage("", "/anything"), Coverage::All);
        assert_eq!(coverage("x$", "/registry/x"), Coverage::Some);
        assert_eq!(coverage("^$", "/"), Coverage::None);
    }

    #[test]
    fn unicode_classes_do_not_match_invalid_utf8() {
        let m = RegexMatcher::new(r"^/[^/]+\.").unwrap();
        assert_eq!(m.coverage(b"/\xff"), Coverage::None);
        assert_eq!(m.coverage("/é.".as_bytes()), Coverage::All);
    }

    #[test]
    fn patterns_a_dfa_cannot_run_are_not_analysed() {
        // A Unicode word boundary needs look-around a DFA does not have.
        let m = RegexMatcher::new(r"\bns\b").unwrap();
        assert!(m.dfa.is_none());
        assert_eq!(m.coverage(b"/registry/x/"), Coverage::Some);
        assert!(m.is_match(b"/registry/pods/ns/p"));
    }

    const PATTERNS: &[&str] = &[
        r"^/registry/[^/]+\.[^/]+/",
        r"^/registry/[^/]*\.io/x",
        "secret",
        "s.$",
        r"(?i)^/REGISTRY/(pods|events)/ns1/",
        r"(?-u:\b)ns(?-u:\b)",
        r"(?m)^a$",
        "^$",
        "",
        "x|^/other",
        r"(?-u:\xff)",
        r"\.[a-z]{2}/",
    ];

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop::sample::select(b"/.aensxiotr\xff\n".to_vec()), 0..12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// "None" and "all" are what the regex crate says of every key.
        #[test]
        fn coverage_agrees_with_the_regex(
            which in 0..PATTERNS.len(),
            registry in prop::bool::ANY,
            prefix in bytes(),
            suffixes in prop::collection::vec(bytes(), 1..8),
        ) {
            let m = RegexMatcher::new(PATTERNS[which]).unwrap();
            let mut prefix = prefix;
            if registry {
                prefix.splice(0..0, b"/registry/".iter().copied());
            }
            let answer = m.coverage(&prefix);
            for suffix in std::iter::once(Vec::new()).chain(suffixes) {
                let mut key = prefix.clone();
                key.extend_from_slice(&suffix);
                let matched = m.is_match(&key);
                prop_assert!(
                    !(answer == Coverage::None && matched || answer == Coverage::All && !matched),
                    "{:?} says {:?} for {:?}, but {:?} {}",
                    PATTERNS[which],
                    answer,
                    String::from_utf8_lossy(&prefix),
                    String::from_utf8_lossy(&key),
                    if matched { "matches" } else { "does not match" },
                );
            }
        }
    }
}
