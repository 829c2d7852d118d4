//! The label index: which live keys carry which label, name and namespace,
//! so that a range with selectors reads about as many rows as match, not
//! every key of the range.
//!
//! `ks_label (key_bytes, term)` holds per key one term per label (a hash of
//! its name and value), one for `metadata.name`, one for
//! `metadata.namespace`, or the single term OPAQUE for a value selectors
//! cannot read. The label indexer (`crate::labels`) keeps it from the
//! shard's events, after they commit, in transactions of its own, and
//! `ks_label_mark` says up to which revision M it has applied them. The
//! write path never touches these tables.
//!
//! A selected range reads only its **candidates**: keys having one of the
//! driving terms (the values of one requirement every match must meet, and
//! OPAQUE), plus every key with a history row above M (the index may not
//! know their state). Every match is a candidate: a key with no change
//! above M has the same value at M, now and at any revision read since its
//! last change (older rows are not read through `ks_live`), and at M the
//! index held its terms. Then the exact selector runs on the candidates'
//! values (`selection.rs`), so hash collisions and stale terms (a delete
//! the indexer never saw, its tombstone purged by compaction first) only
//! add candidates.

use kubeshard_selector::{LabelOp, Object, Selector};
use xxhash_rust::xxh3::xxh3_64;

use super::statement::Statement;
use crate::dialect::Dialect;
use crate::keys::KeyRange;

/// Rows per multi-row statement of the indexer.
const ROWS_PER_STATEMENT: usize = 256;

const LABEL: u8 = b'l';
const FIELD: u8 = b'f';

/// The term of values that cannot be decoded: they match every selector.
pub(crate) fn opaque() -> i64 {
    term(b'o', "", "")
}

fn term(kind: u8, name: &str, value: &str) -> i64 {
    let mut bytes = Vec::with_capacity(name.len() + value.len() + 2);
    bytes.push(kind);
    bytes.extend_from_slice(name.as_bytes());
    // Neither label names nor values can hold a NUL.
    bytes.push(0);
    bytes.extend_from_slice(value.as_bytes());
    xxh3_64(&bytes) as i64
}

/// The terms of a stored value, without duplicates.
pub(crate) fn terms_of(value: &[u8]) -> Vec<i64> {
    let object = Object::decode(value);
    let Some(meta) = object.meta() else {
        return vec![opaque()];
    };
    let mut terms: Vec<i64> = meta
        .labels
        .iter()
        .map(|(name, value)| term(LABEL, name, value))
        .collect();
    terms.push(term(FIELD, "metadata.name", &meta.name));
    terms.push(term(FIELD, "metadata.namespace", &meta.namespace));
    terms.sort_unstable();
    terms.dedup();
    terms
}

/// The terms one of which every match carries (OPAQUE included), from the
/// most selective requirement the index knows; None if it knows none
/// (only negations, comparisons, other fields): then every key of the
/// range is a candidate.
pub(crate) fn driving_terms(selector: &Selector) -> Option<Vec<i64>> {
    let field = selector
        .fields
        .iter()
        .find(|f| f.equal && matches!(f.field.as_str(), "metadata.name" | "metadata.namespace"));
    let mut terms = if let Some(f) = field.filter(|f| f.field == "metadata.name") {
        vec![term(FIELD, &f.field, &f.value)]
    } else if let Some(r) = selector
        .labels
        .iter()
        .filter(|r| r.op == LabelOp::In)
        .min_by_key(|r| r.values.len())
    {
        r.values.iter().map(|v| term(LABEL, &r.key, v)).collect()
    } else {
        vec![term(FIELD, &field?.field, &field?.value)]
    };
    terms.push(opaque());
    terms.sort_unstable();
    terms.dedup();
    Some(terms)
}

/// How a selected range is narrowed to its candidates.
#[derive(Debug, Clone)]
pub(crate) struct Narrowing {
    pub(crate) terms: Vec<i64>,
    /// The index's mark, read in the snapshot of the range (0 until then:
    /// every key with history is a candidate). A parameter rather than a
    /// subquery, so that PostgreSQL plans with its value: from a subquery
    /// it guessed a third of the history, and walked the range.
    pub(crate) mark: i64,
}

impl Narrowing {
    /// The same, at the index's mark read in the range's snapshot.
    pub(crate) fn at(&self, mark: i64) -> Narrowing {
        Narrowing {
            terms: self.terms.clone(),
            mark,
        }
    }
}

/// Reads the index's mark (0 if its row is missing).
pub(crate) const READ_MARK: &str = "SELECT revision FROM ks_label_mark WHERE id = 1";

/// Appends `(candidates) cand CROSS JOIN ks_live WHERE <join> AND `: the
/// live rows of the candidates of `range`, to be followed by conditions on
/// `ks_live`'s columns (unqualified names are `ks_live`'s). CROSS JOIN
/// makes SQLite loop over the candidates and look each up by key; with a
/// plain join it walked the whole range of `ks_live` instead, probing the
/// candidates (PostgreSQL and MySQL read it as an inner join).
pub(crate) fn push_candidate_live<'a>(
    st: &mut Statement<'a>,
    range: &'a KeyRange,
    narrowing: &Narrowing,
) {
    st.sql("(SELECT key_bytes AS ck FROM ks_label WHERE term IN (");
    for (i, t) in narrowing.terms.iter().enumerate() {
        if i > 0 {
            st.sql(", ");
        }
        st.int(*t);
    }
    st.sql(") AND ");
    st.key_in("key_bytes", range);
    st.sql(" UNION SELECT key_bytes FROM ks_history WHERE revision > ")
        .int(narrowing.mark)
        .sql(" AND ");
    st.key_in("key_bytes", range);
    st.sql(") cand CROSS JOIN ks_live WHERE ks_live.key_bytes = cand.ck AND ");
}

/// The state of one key after a run of events: its value, or None if it
/// was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelChange {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// What became of a run of changes given to the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelIndexOutcome {
    /// Applied; the index is at the run's end.
    Applied,
    /// The index was already at or past the run's end (another router's
    /// indexer did it): nothing written.
    Ahead { mark: i64 },
    /// The index is below the run's start: the revisions in between must
    /// be applied first. Nothing written.
    Gap { mark: i64 },
}

/// The statements that bring the index from a mark at or below `from` up
/// to `to` with `changes`: the changed keys' terms replaced, then the mark.
pub(crate) fn apply_statements<'a>(
    dialect: &'static dyn Dialect,
    changes: &'a [LabelChange],
    terms: &'a [(usize, i64)],
    to: i64,
) -> Vec<Statement<'a>> {
    let mut out = Vec::new();
    for chunk in changes.chunks(ROWS_PER_STATEMENT) {
        let mut st = Statement::new(dialect, "DELETE FROM ks_label WHERE key_bytes IN (");
        for (i, change) in chunk.iter().enumerate() {
            if i > 0 {
                st.sql(", ");
            }
            st.bytes(&change.key);
        }
        st.sql(")");
        out.push(st);
    }
    for chunk in terms.chunks(ROWS_PER_STATEMENT) {
        let mut st = Statement::new(dialect, "INSERT INTO ks_label (key_bytes, term) VALUES ");
        for (i, (change, t)) in chunk.iter().enumerate() {
            if i > 0 {
                st.sql(", ");
            }
            let key = changes.get(*change).map_or(&[][..], |c| &c.key[..]);
            st.sql("(").bytes(key).sql(", ").int(*t).sql(")");
        }
        out.push(st);
    }
    let mut st = Statement::new(dialect, "UPDATE ks_label_mark SET revision = ");
    st.int(to).sql(" WHERE id = 1");
    out.push(st);
    out
}

/// The (change index, term) rows of `changes`.
pub(crate) fn term_rows(changes: &[LabelChange]) -> Vec<(usize, i64)> {
    changes
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.value.as_ref().map(|v| (i, v)))
        .flat_map(|(i, v)| terms_of(v).into_iter().map(move |t| (i, t)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::Postgres;

    fn json(name: &str, labels: &str) -> Vec<u8> {
        format!(r#"{{"metadata":{{"name":"{name}","labels":{{{labels}}}}}}}"#).into_bytes()
    }

    fn selector(labels: &str, fields: &str) -> Selector {
        match Selector::parse(labels, fields) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn every_match_carries_a_driving_term() {
        let values = [
            json("a", r#""app":"web""#),
            json("b", r#""app":"db","tier":"x""#),
            json("c", ""),
            b"k8s:enc:aescbc:v1:k:secret".to_vec(),
            b"plain".to_vec(),
        ];
        let selectors = [
            ("app=web", ""),
            ("app in (web,db),tier", ""),
            ("tier=x,app!=web", ""),
            ("", "metadata.name=b"),
            ("app", "metadata.namespace="),
            ("app=", ""),
        ];
        for (labels, fields) in selectors {
            let s = selector(labels, fields);
            let Some(driving) = driving_terms(&s) else {
                panic!("{labels:?} {fields:?} has no driving term");
            };
            for v in &values {
                let terms = terms_of(v);
                let candidate = terms.iter().any(|t| driving.contains(t));
                if s.matches_value(v) {
                    assert!(candidate, "{labels:?} {fields:?}: a match is no candidate");
                }
            }
        }
        // Selective: a value without the label is no candidate.
        let Some(driving) = driving_terms(&selector("app=web", "")) else {
            panic!("no driving term");
        };
        assert!(!terms_of(&values[1]).iter().any(|t| driving.contains(t)));
    }

    /// SQLite plans a selected range from the label index and the live
    /// rows' primary key: no scan of the range, at the current revision
    /// and at an older one.
    #[test]
    fn sqlite_reads_candidates_through_the_indexes() -> rusqlite::Result<()> {
        use super::super::Revisions;
        use super::super::range::{RangePlan, build_range};
        use super::super::sqlite_reads::params;
        use crate::dialect::Sqlite;
        use kubeshard_proto::etcdserverpb::RangeRequest;

        let conn = rusqlite::Connection::open_in_memory()?;
        for ddl in Sqlite.schema() {
            conn.execute(ddl, [])?;
        }
        let revs = Revisions {
            current: 100,
            compacted: 0,
            epoch: 0,
        };
        for revision in [0, 50] {
            let request = RangeRequest {
                key: b"/registry/things/".to_vec(),
                range_end: b"/registry/things0".to_vec(),
                revision,
                ..Default::default()
            };
            let range = KeyRange::new(&request.key, &request.range_end);
            let narrowing = Narrowing {
                terms: vec![1, 2],
                mark: 90,
            };
            let Ok(RangePlan::Query {
                count: None,
                rows: Some(rows),
                ..
            }) = build_range(&Sqlite, &request, revs, &range, Some(&narrowing))
            else {
                panic!("no plan");
            };
            let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {}", rows.text))?;
            let plan: Vec<String> = explain
                .query_map(rusqlite::params_from_iter(params(&rows)), |row| {
                    row.get::<_, String>(3)
                })?
                .collect::<rusqlite::Result<_>>()?;
            let plan = plan.join("\n");
            assert!(plan.contains("ks_label_term"), "at {revision}:\n{plan}");
            // Each candidate looked up by key, not the range walked.
            assert!(
                plan.contains(
                    "SEARCH ks_live USING INDEX sqlite_autoindex_ks_live_1 (key_bytes=?)"
                ),
                "at {revision}:\n{plan}"
            );
            assert!(
                !plan
                    .lines()
                    .any(|l| l.starts_with("SCAN ks_live") || l.starts_with("SCAN ks_label")),
                "at {revision}, a scan:\n{plan}"
            );
        }
        Ok(())
    }

    #[test]
    fn negations_alone_drive_nothing() {
        assert_eq!(driving_terms(&selector("app!=web,!tier", "")), None);
        assert_eq!(driving_terms(&selector("", "spec.x=1")), None);
    }

    #[test]
    fn candidates_join_live_rows() {
        let range = KeyRange::new(b"/a/", b"/a0");
        let mut st = Statement::new(&Postgres, "SELECT key_bytes FROM ");
        let narrowing = Narrowing {
            terms: vec![7, 9],
            mark: 40,
        };
        push_candidate_live(&mut st, &range, &narrowing);
        st.sql("mod_revision > 0");
        assert_eq!(
            st.text,
            "SELECT key_bytes FROM (SELECT key_bytes AS ck FROM ks_label WHERE term IN ($1, $2) \
             AND key_bytes >= $3 AND key_bytes < $4 UNION SELECT key_bytes FROM ks_history \
             WHERE revision > $5 AND key_bytes >= $6 AND key_bytes < $7) cand CROSS JOIN ks_live \
             WHERE ks_live.key_bytes = cand.ck AND mod_revision > 0"
        );
    }
}
