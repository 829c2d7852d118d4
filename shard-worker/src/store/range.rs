//! Turns an etcd RangeRequest into SQL, following etcd's own rules for
//! revisions, sorting, filters, limit and count.

use kubeshard_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use kubeshard_proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use kubeshard_proto::mvccpb::KeyValue;

use super::Revisions;
use super::label_index::{Narrowing, push_candidate_live};
use super::page_counts::{PageCounts, is_page};
use super::statement::Statement;
use crate::dialect::Dialect;
use crate::error::{Result, ShardError};
use crate::keys::KeyRange;

/// The statements that answer one Range.
#[derive(Debug)]
pub(crate) enum RangePlan<'a> {
    /// Nothing can match (range end at or below its start).
    Empty { header: i64 },
    /// `count` returns one row with the number of keys in range at the
    /// revision (absent: count the rows); `rows` (absent for count_only)
    /// returns the key-values, one more than the limit so that `more` can
    /// be told.
    Query {
        header: i64,
        count: Option<Statement<'a>>,
        rows: Option<Statement<'a>>,
    },
}

impl RangePlan<'_> {
    pub(crate) fn header_revision(&self) -> i64 {
        match self {
            RangePlan::Empty { header } | RangePlan::Query { header, .. } => *header,
        }
    }
}

/// A Range ready to run on any driver: the statements to execute, and what
/// the answer needs besides their results.
#[derive(Debug)]
pub(crate) struct PreparedRange<'a> {
    plan: RangePlan<'a>,
    /// The revision read (the current one for revision 0).
    revision: i64,
    /// The count, already known from the list page before this one.
    known_count: Option<i64>,
}

impl<'a> PreparedRange<'a> {
    /// Plans `request` over `range` at `revs`. `page_counts` (reads only,
    /// never inside a write's transaction) may already know the count.
    pub(crate) fn new(
        dialect: &'static dyn Dialect,
        request: &'a RangeRequest,
        revs: Revisions,
        range: &'a KeyRange,
        page_counts: Option<&PageCounts>,
        narrowing: Option<&Narrowing>,
    ) -> Result<Self> {
        let plan = build_range(dialect, request, revs, range, narrowing)?;
        // build_range accepted it: at or below the current revision and
        // not compacted.
        let revision = if request.revision <= 0 {
            revs.current
        } else {
            request.revision
        };
        let known_count = page_counts
            .filter(|_| is_page(request, range))
            .and_then(|p| p.get(range, revision));
        Ok(PreparedRange {
            plan,
            revision,
            known_count,
        })
    }

    /// The statement returning the key-values (limit + 1 rows at most).
    pub(crate) fn rows(&self) -> Option<&Statement<'a>> {
        match &self.plan {
            RangePlan::Query { rows, .. } => rows.as_ref(),
            RangePlan::Empty { .. } => None,
        }
    }

    /// The COUNT statement, unless the count is known without it.
    pub(crate) fn count(&self) -> Option<&Statement<'a>> {
        match &self.plan {
            RangePlan::Query { count, .. } if self.known_count.is_none() => count.as_ref(),
            _ => None,
        }
    }

    /// etcd's answer from the rows and the COUNT's result (None: no COUNT
    /// ran, or it returned no row). A full list page teaches `page_counts`
    /// the count of the rest.
    pub(crate) fn answer(
        &self,
        request: &RangeRequest,
        range: &KeyRange,
        mut kvs: Vec<KeyValue>,
        counted: Option<i64>,
        page_counts: Option<&PageCounts>,
    ) -> RangeResponse {
        let count = self.known_count.or(counted).unwrap_or(kvs.len() as i64);
        if request.count_only {
            kvs.clear();
        }
        let limit = request.limit;
        let mut more = false;
        if limit > 0 && kvs.len() as i64 > limit {
            kvs.truncate(limit as usize);
            more = true;
            if let (Some(p), Some(last)) =
                (page_counts.filter(|_| is_page(request, range)), kvs.last())
            {
                p.learn(range, self.revision, &last.key, limit, count);
            }
        }
        RangeResponse {
            header: Some(ResponseHeader {
                revision: self.plan.header_revision(),
                ..Default::default()
            }),
            kvs,
            more,
            count,
        }
    }
}

/// The key-values of `range` as of revision `rev` (below the current one):
/// live rows not modified since `rev`, plus the keys changed after `rev`
/// that existed at `rev`. Such a key's first change after `rev` is its only
/// history row newer than `rev` whose `prev_revision` (the key's mod_revision
/// just before that change, 0 if it did not exist) is at or below `rev`, and
/// that `prev_revision` names the row to return. Both lookups go through the
/// `(revision, sub)` primary key, so a read at a recent revision only visits
/// history written after it, and no index by key is needed on the history
/// (one random index page less per written key).
fn push_source_at<'a>(
    st: &mut Statement<'a>,
    range: &'a KeyRange,
    rev: i64,
    value_col: &str,
    narrowing: Option<&Narrowing>,
) {
    st.sql("(SELECT key_bytes, create_revision, mod_revision, version, lease, ")
        .sql(value_col)
        .sql(" AS value_bytes FROM ");
    push_live(st, range, narrowing);
    st.key_in("key_bytes", range);
    st.sql(" AND mod_revision <= ").int(rev);
    st.sql(" UNION ALL SELECT p.key_bytes, p.create_revision, p.revision, p.version, p.lease, ");
    if value_col == "value_bytes" {
        st.sql("p.value_bytes");
    } else {
        st.sql(value_col);
    }
    st.sql(
        " FROM ks_history c JOIN ks_history p ON p.revision = c.prev_revision \
         AND p.key_bytes = c.key_bytes WHERE c.revision > ",
    )
    .int(rev)
    .sql(" AND c.prev_revision > 0 AND c.prev_revision <= ")
    .int(rev)
    .sql(" AND ");
    st.key_in("c.key_bytes", range);
    // A txn may put a key and then delete it (two rows, one revision, the
    // same prev_revision): the first of them stands for the change. In the
    // revision it names, the key's last row is the one that survived it.
    st.sql(
        " AND NOT EXISTS (SELECT 1 FROM ks_history e WHERE e.revision = c.revision \
         AND e.key_bytes = c.key_bytes AND e.sub < c.sub) \
         AND p.deleted = 0 AND NOT EXISTS (SELECT 1 FROM ks_history s \
         WHERE s.revision = p.revision AND s.key_bytes = p.key_bytes AND s.sub > p.sub)) AS src",
    );
}

/// `ks_live WHERE `, or only the live rows of a selected range's
/// candidates (`label_index.rs`).
fn push_live<'a>(st: &mut Statement<'a>, range: &'a KeyRange, narrowing: Option<&Narrowing>) {
    match narrowing {
        Some(n) => push_candidate_live(st, range, n),
        None => {
            st.sql("ks_live WHERE ");
        }
    }
}

/// Plans a Range at the revisions of the snapshot it runs in. With a
/// narrowing (a selected range) only candidates are read, and not counted:
/// the count is the selector's.
pub(crate) fn build_range<'a>(
    dialect: &'static dyn Dialect,
    request: &'a RangeRequest,
    revs: Revisions,
    range: &'a KeyRange,
    narrowing: Option<&Narrowing>,
) -> Result<RangePlan<'a>> {
    if request.revision > revs.current {
        return Err(ShardError::FutureRevision);
    }
    let rev = if request.revision <= 0 {
        revs.current
    } else {
        request.revision
    };
    if rev < revs.compacted {
        return Err(ShardError::Compacted {
            compact_revision: revs.compacted,
        });
    }
    let header = revs.current;
    if range.is_empty() {
        return Ok(RangePlan::Empty { header });
    }
    let at_current = rev == revs.current;

    let mut conditions: Vec<(&str, i64)> = Vec::new();
    if request.min_mod_revision != 0 {
        conditions.push(("mod_revision >= ", request.min_mod_revision));
    }
    if request.max_mod_revision != 0 {
        conditions.push(("mod_revision <= ", request.max_mod_revision));
    }
    if request.min_create_revision != 0 {
        conditions.push(("create_revision >= ", request.min_create_revision));
    }
    if request.max_create_revision != 0 {
        conditions.push(("create_revision <= ", request.max_create_revision));
    }
    // A single key without filters is counted by the rows themselves: one
    // statement instead of two for the most common request (a Get).
    let counted_by_rows = matches!(range, KeyRange::Single(_)) && conditions.is_empty();

    let count = if counted_by_rows || narrowing.is_some() {
        None
    } else {
        let mut count = Statement::new(dialect, "SELECT COUNT(*) FROM ");
        if at_current {
            count.sql("ks_live WHERE ");
            count.key_in("key_bytes", range);
        } else {
            push_source_at(&mut count, range, rev, dialect.empty_bytes(), None);
        }
        Some(count)
    };
    if request.count_only && !counted_by_rows && narrowing.is_none() {
        return Ok(RangePlan::Query {
            header,
            count,
            rows: None,
        });
    }

    let value_col = if request.keys_only || request.count_only {
        dialect.empty_bytes()
    } else {
        "value_bytes"
    };
    let mut rows = Statement::new(
        dialect,
        "SELECT key_bytes, create_revision, mod_revision, version, lease, ",
    );
    if at_current {
        rows.sql(value_col).sql(" FROM ");
        push_live(&mut rows, range, narrowing);
        rows.key_in("key_bytes", range);
        for (cond, v) in conditions {
            rows.sql(" AND ").sql(cond).int(v);
        }
    } else {
        // Sorting by value needs the real values in the source; keys_only
        // blanks them only in the outer select, whose blank column has no
        // name that ORDER BY could pick up instead of the source's.
        let sort_by_value = SortTarget::try_from(request.sort_target) == Ok(SortTarget::Value);
        let source_value = if sort_by_value {
            "value_bytes"
        } else {
            value_col
        };
        rows.sql(value_col).sql(" FROM ");
        push_source_at(&mut rows, range, rev, source_value, narrowing);
        for (i, (cond, v)) in conditions.into_iter().enumerate() {
            rows.sql(if i == 0 { " WHERE " } else { " AND " })
                .sql(cond)
                .int(v);
        }
    }
    rows.sql(" ORDER BY ").sql(&order_by(request));
    if request.limit > 0 {
        rows.sql(" LIMIT ").int(request.limit.saturating_add(1));
    }
    Ok(RangePlan::Query {
        header,
        count,
        rows: Some(rows),
    })
}

/// etcd sorts after reading the range in key order: no order with a non-key
/// target means ascending, and ties keep key order.
fn order_by(request: &RangeRequest) -> String {
    let target = SortTarget::try_from(request.sort_target).unwrap_or(SortTarget::Key);
    let mut order = SortOrder::try_from(request.sort_order).unwrap_or(SortOrder::None);
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    let column = match target {
        SortTarget::Key => "key_bytes",
        SortTarget::Version => "version",
        SortTarget::Create => "create_revision",
        SortTarget::Mod => "mod_revision",
        SortTarget::Value => "value_bytes",
    };
    match (order, target) {
        (SortOrder::None | SortOrder::Ascend, SortTarget::Key) => "key_bytes".to_string(),
        (SortOrder::Descend, SortTarget::Key) => "key_bytes DESC".to_string(),
        (SortOrder::Descend, _) => format!("{column} DESC, key_bytes"),
        (_, _) => format!("{column}, key_bytes"),
    }
}

// The plain get: one key at the current revision in one statement, the
// most common read (kube-apiserver's Get of one object).

/// The column of [`plain_get_statement`] with the database's fence.
pub(crate) const PLAIN_GET_EPOCH: usize = 7;

/// The statement of a shard's plain get: the counter, then the key's
/// live row (NULLs when the key does not exist) from column 1 on, then
/// the fence (`ks_meta.epoch`).
pub(crate) fn plain_get_statement<'a>(
    dialect: &'static dyn Dialect,
    request: &'a RangeRequest,
) -> Statement<'a> {
    let value = if request.keys_only || request.count_only {
        dialect.empty_bytes()
    } else {
        "l.value_bytes"
    };
    let mut st = Statement::new(
        dialect,
        "SELECT m.revision, l.key_bytes, l.create_revision, l.mod_revision, l.version, l.lease, ",
    );
    st.sql(value)
        .sql(", m.epoch FROM ks_meta m LEFT JOIN ks_live l ON l.key_bytes = ")
        .bytes(&request.key)
        .sql(" WHERE m.id = 1");
    st
}

/// etcd's answer to a plain Get from the counter and the key's row.
pub(crate) fn plain_get_answer(
    request: &RangeRequest,
    revision: i64,
    kv: Option<KeyValue>,
) -> RangeResponse {
    let mut kvs: Vec<KeyValue> = kv.into_iter().collect();
    let count = kvs.len() as i64;
    if request.count_only {
        kvs.clear();
    }
    RangeResponse {
        header: Some(ResponseHeader {
            revision,
            ..Default::default()
        }),
        kvs,
        more: false,
        count,
    }
}

/// A Range that a shard's plain get answers: one key, the current
/// revision, no revision filters (sort and limit change nothing for one key).
pub(crate) fn is_plain_get(request: &RangeRequest) -> bool {
    request.range_end.is_empty()
        && request.revision <= 0
        && request.min_mod_revision == 0
        && request.max_mod_revision == 0
        && request.min_create_revision == 0
        && request.max_create_revision == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::{Mysql, Postgres};

    fn req(key: &[u8], end: &[u8]) -> RangeRequest {
        RangeRequest {
            key: key.to_vec(),
            range_end: end.to_vec(),
            ..Default::default()
        }
    }

    const REVS: Revisions = Revisions {
        current: 10,
        compacted: 3,
        epoch: 0,
    };

    #[test]
    fn revisions_are_checked_like_etcd() {
        let r = req(b"a", b"");
        let range = KeyRange::new(&r.key, &r.range_end);
        let mut future = r.clone();
        future.revision = 11;
        assert!(matches!(
            build_range(&Postgres, &future, REVS, &range, None),
            Err(ShardError::FutureRevision)
        ));
        let mut old = r.clone();
        old.revision = 2;
        assert!(matches!(
            build_range(&Postgres, &old, REVS, &range, None),
            Err(ShardError::Compacted {
                compact_revision: 3
            })
        ));
        let mut at_compact = r;
        at_compact.revision = 3;
        assert!(build_range(&Postgres, &at_compact, REVS, &range, None).is_ok());
    }

    #[test]
    fn current_reads_use_live_rows_only() {
        let r = req(b"a", b"c");
        let range = KeyRange::new(&r.key, &r.range_end);
        let Ok(RangePlan::Query {
            count: Some(count),
            rows,
            ..
        }) = build_range(&Postgres, &r, REVS, &range, None)
        else {
            panic!("no plan");
        };
        assert_eq!(
            count.text,
            "SELECT COUNT(*) FROM ks_live WHERE key_bytes >= $1 AND key_bytes < $2"
        );
        let Some(rows) = rows else { panic!("no rows") };
        assert!(!rows.text.contains("ks_history"));
        assert!(rows.text.ends_with("ORDER BY key_bytes"));
    }

    #[test]
    fn mysql_placeholders_follow_binding_order() {
        let mut r = req(b"a", b"\0");
        r.revision = 5;
        r.limit = 2;
        let range = KeyRange::new(&r.key, &r.range_end);
        let Ok(RangePlan::Query {
            rows: Some(rows), ..
        }) = build_range(&Mysql, &r, REVS, &range, None)
        else {
            panic!("no plan");
        };
        assert_eq!(rows.text.matches('?').count(), rows.args.len());
        assert!(rows.text.ends_with("LIMIT ?"));
    }

    #[test]
    fn single_key_get_is_one_statement() {
        let r = req(b"a", b"");
        let range = KeyRange::new(&r.key, &r.range_end);
        let Ok(RangePlan::Query {
            count: None,
            rows: Some(_),
            ..
        }) = build_range(&Postgres, &r, REVS, &range, None)
        else {
            panic!("a get needs no count statement");
        };
        let mut filtered = r.clone();
        filtered.min_mod_revision = 4;
        assert!(matches!(
            build_range(&Postgres, &filtered, REVS, &range, None),
            Ok(RangePlan::Query { count: Some(_), .. })
        ));
    }

    #[test]
    fn sort_orders() {
        let mut r = req(b"a", b"");
        assert_eq!(order_by(&r), "key_bytes");
        r.sort_target = SortTarget::Value as i32;
        assert_eq!(order_by(&r), "value_bytes, key_bytes");
        r.sort_order = SortOrder::Descend as i32;
        assert_eq!(order_by(&r), "value_bytes DESC, key_bytes");
        r.sort_target = SortTarget::Key as i32;
        assert_eq!(order_by(&r), "key_bytes DESC");
    }
}
