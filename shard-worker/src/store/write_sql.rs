//! The statements of a write batch, assembled once for every driver: the
//! sqlx transaction (`sql.rs`) and SQLite's own writer thread
//! (`sqlite_writes.rs`) run exactly the same SQL.

use kubeshard_proto::mvccpb::KeyValue;

use super::statement::{Arg, Statement};
use super::write::HistoryRow;
use super::{LeaseRecord, Revisions};
use crate::dialect::Dialect;
use crate::keys::KeyRange;

/// Most rows in one multi-row statement: keeps it under every backend's
/// parameter limit (9 columns x 256 rows). Statements come in few shapes
/// (see `shaped_chunks`): one shape per batch size made every pooled
/// connection prepare and cache hundreds of large statements.
const ROWS_PER_INSERT: usize = 256;
/// Most payload bytes in one multi-row INSERT: keeps it under MySQL's
/// max_allowed_packet even with 1.5 MiB values.
const BYTES_PER_INSERT: usize = 4 << 20;
/// Chunks up to this many rows keep their exact length; longer ones are
/// cut to powers of two.
pub(crate) const EXACT_ROWS: usize = 16;

/// The columns of a live key, in `KeyValue` order (see `kv_from_row`).
pub(crate) const KV_COLUMNS: &str =
    "key_bytes, create_revision, mod_revision, version, lease, value_bytes";

/// Splits rows into chunks of at most [`ROWS_PER_INSERT`] with few distinct
/// shapes per kind, so prepared statements stay cached without piling up,
/// and a small batch still needs one statement.
pub(crate) fn shaped_chunks<T>(rows: &[T]) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let mut rest = rows;
    while !rest.is_empty() {
        let mut n = rest.len().min(ROWS_PER_INSERT);
        if n > EXACT_ROWS && !n.is_power_of_two() {
            n = n.next_power_of_two() / 2;
        }
        let (head, tail) = rest.split_at(n);
        chunks.push(head);
        rest = tail;
    }
    chunks
}

/// Splits rows into chunks that respect the row and byte limits of one
/// INSERT, each of power-of-two length.
fn insert_chunks<T>(rows: &[T], size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, row) in rows.iter().enumerate() {
        let s = size(row);
        if i > start && (i - start >= ROWS_PER_INSERT || bytes + s > BYTES_PER_INSERT) {
            chunks.push(&rows[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += s;
    }
    if start < rows.len() {
        chunks.push(&rows[start..]);
    }
    chunks.into_iter().flat_map(shaped_chunks).collect()
}

/// Appends `<head>a, b, ...)` with one placeholder per item.
fn push_in_list<'a, T: Copy>(
    st: &mut Statement<'a>,
    head: &str,
    items: &[T],
    arg: impl Fn(T) -> Arg<'a>,
) {
    st.sql(head);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            st.sql(", ");
        }
        st.arg(arg(*item));
    }
    st.sql(")");
}

/// `<head>a, b, ...)` with one placeholder per item.
pub(crate) fn in_list<'a, T: Copy>(
    d: &'static dyn Dialect,
    head: &str,
    items: &[T],
    arg: impl Fn(T) -> Arg<'a>,
) -> Statement<'a> {
    let mut st = Statement::new(d, "");
    push_in_list(&mut st, head, items, arg);
    st
}

fn push_set_revisions(st: &mut Statement<'_>, revs: Revisions) {
    st.sql("UPDATE ks_meta SET revision = ")
        .int(revs.current)
        .sql(", compact_revision = ")
        .int(revs.compacted)
        .sql(" WHERE id = 1");
}

/// Where the rows of a multi-row INSERT come from: a plain `VALUES` list,
/// or, inside a guarded statement, the same list joined with the guarded
/// counter update `m` (no rows when the guard failed).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rows {
    Values,
    GuardedByM,
}

impl Rows {
    fn open(self, st: &mut Statement<'_>) {
        st.sql(match self {
            Rows::Values => " VALUES ",
            Rows::GuardedByM => " SELECT v.* FROM m, (VALUES ",
        });
    }

    fn close(self, st: &mut Statement<'_>) {
        if self == Rows::GuardedByM {
            st.sql(") AS v");
        }
    }
}

fn push_history_insert<'a>(st: &mut Statement<'a>, rows: &'a [HistoryRow], from: Rows) {
    st.sql(
        "INSERT INTO ks_history (revision, sub, key_bytes, deleted, create_revision, \
         prev_revision, version, lease, value_bytes)",
    );
    from.open(st);
    for (i, r) in rows.iter().enumerate() {
        st.sql(if i == 0 { "(" } else { ", (" });
        st.int(r.revision).sql(", ").int(r.sub).sql(", ");
        st.bytes(&r.key)
            .sql(", ")
            .int(i64::from(r.deleted))
            .sql(", ");
        st.int(r.create_revision)
            .sql(", ")
            .int(r.prev_revision)
            .sql(", ");
        st.int(r.version).sql(", ").int(r.lease).sql(", ");
        st.bytes(&r.value).sql(")");
    }
    from.close(st);
}

fn push_live_upsert<'a>(
    st: &mut Statement<'a>,
    d: &'static dyn Dialect,
    rows: &[&'a KeyValue],
    from: Rows,
) {
    st.sql(&format!("INSERT INTO ks_live ({KV_COLUMNS})"));
    from.open(st);
    for (i, kv) in rows.iter().enumerate() {
        st.sql(if i == 0 { "(" } else { ", (" });
        st.bytes(&kv.key)
            .sql(", ")
            .int(kv.create_revision)
            .sql(", ");
        st.int(kv.mod_revision).sql(", ").int(kv.version).sql(", ");
        st.int(kv.lease).sql(", ").bytes(&kv.value).sql(")");
    }
    from.close(st);
    st.sql(d.upsert_live_tail());
}

const LIVE_DELETE: &str = "DELETE FROM ks_live WHERE key_bytes IN (";

pub(crate) fn set_revisions(d: &'static dyn Dialect, revs: Revisions) -> Statement<'static> {
    let mut st = Statement::new(d, "");
    push_set_revisions(&mut st, revs);
    st
}

/// Live rows of `keys`, one statement per chunk.
pub(crate) fn live_get<'a>(d: &'static dyn Dialect, keys: &[&'a [u8]]) -> Vec<Statement<'a>> {
    let head = format!("SELECT {KV_COLUMNS} FROM ks_live WHERE key_bytes IN (");
    shaped_chunks(keys)
        .into_iter()
        .map(|chunk| in_list(d, &head, chunk, Arg::Bytes))
        .collect()
}

pub(crate) fn live_in_range<'a>(d: &'static dyn Dialect, range: &'a KeyRange) -> Statement<'a> {
    let mut st = Statement::new(d, format!("SELECT {KV_COLUMNS} FROM ks_live WHERE "));
    st.key_in("key_bytes", range);
    st.sql(" ORDER BY key_bytes");
    st
}

pub(crate) fn live_with_lease(d: &'static dyn Dialect, lease: i64) -> Statement<'static> {
    let mut st = Statement::new(
        d,
        format!("SELECT {KV_COLUMNS} FROM ks_live WHERE lease = "),
    );
    st.int(lease).sql(" ORDER BY key_bytes");
    st
}

/// Multi-row INSERTs of history rows.
pub(crate) fn write_history<'a>(
    d: &'static dyn Dialect,
    rows: &'a [HistoryRow],
) -> Vec<Statement<'a>> {
    insert_chunks(rows, |r| r.key.len() + r.value.len())
        .into_iter()
        .map(|chunk| {
            let mut st = Statement::new(d, "");
            push_history_insert(&mut st, chunk, Rows::Values);
            st
        })
        .collect()
}

/// Multi-row upserts of live rows, then deletes of removed keys.
pub(crate) fn write_live<'a>(
    d: &'static dyn Dialect,
    upserts: &[&'a KeyValue],
    deletes: &[&'a [u8]],
) -> Vec<Statement<'a>> {
    let mut statements = Vec::new();
    for chunk in insert_chunks(upserts, |kv| kv.key.len() + kv.value.len()) {
        let mut st = Statement::new(d, "");
        push_live_upsert(&mut st, d, chunk, Rows::Values);
        statements.push(st);
    }
    for chunk in shaped_chunks(deletes) {
        statements.push(in_list(d, LIVE_DELETE, chunk, Arg::Bytes));
    }
    statements
}

/// The end of a small batch (history rows, live upserts and deletes, the
/// counter) as one statement of data-modifying `WITH` parts, where the
/// dialect allows it: one round trip instead of up to four. `None` when it
/// does not, when there is only one part, or when a part is larger than
/// [`EXACT_ROWS`] rows (large batches are not latency-bound, and this keeps
/// the number of statement shapes small). The parts touch different rows
/// (a key is either upserted or deleted), so their order does not matter.
pub(crate) fn combined_final<'a>(
    d: &'static dyn Dialect,
    history: &'a [HistoryRow],
    upserts: &[&'a KeyValue],
    deletes: &[&'a [u8]],
    revs: Option<Revisions>,
) -> Option<Statement<'a>> {
    let parts = usize::from(!history.is_empty())
        + usize::from(!upserts.is_empty())
        + usize::from(!deletes.is_empty())
        + usize::from(revs.is_some());
    if !d.writes_in_one_statement()
        || parts < 2
        || history.len() > EXACT_ROWS
        || upserts.len() > EXACT_ROWS
        || deletes.len() > EXACT_ROWS
    {
        return None;
    }
    // Summed only for batches that passed the cheap checks above.
    let bytes: usize = history
        .iter()
        .map(|r| r.key.len() + r.value.len())
        .chain(upserts.iter().map(|kv| kv.key.len() + kv.value.len()))
        .sum();
    if bytes > BYTES_PER_INSERT {
        return None;
    }
    let mut st = Statement::new(d, "WITH ");
    let mut first = true;
    let mut open = |st: &mut Statement<'a>, name: &str| {
        if !std::mem::take(&mut first) {
            st.sql(", ");
        }
        st.sql(name).sql(" AS (");
    };
    if !history.is_empty() {
        open(&mut st, "h");
        push_history_insert(&mut st, history, Rows::Values);
        st.sql(")");
    }
    if !upserts.is_empty() {
        open(&mut st, "l");
        push_live_upsert(&mut st, d, upserts, Rows::Values);
        st.sql(")");
    }
    if !deletes.is_empty() {
        open(&mut st, "d");
        push_in_list(&mut st, LIVE_DELETE, deletes, Arg::Bytes);
        st.sql(")");
    }
    if let Some(revs) = revs {
        open(&mut st, "m");
        push_set_revisions(&mut st, revs);
        st.sql(")");
    }
    st.sql(" SELECT 1");
    Some(st)
}

/// The counter row of a guarded batch: `(revision, compact_revision,
/// epoch, version)`, where version is the dialect's [`Dialect::meta_version`].
pub(crate) fn guarded_meta(d: &'static dyn Dialect, version: &str) -> Statement<'static> {
    Statement::new(
        d,
        format!("SELECT revision, compact_revision, epoch, {version} FROM ks_meta WHERE id = 1"),
    )
}

/// [`guarded_meta`] and the live rows of up to [`EXACT_ROWS`] keys in one
/// statement, so one snapshot: the counter row's four columns, then a
/// key's live row from column 4 on (NULLs when none of the keys exists).
/// `None` for more keys (a batch that large is not latency-bound).
pub(crate) fn guarded_start<'a>(
    d: &'static dyn Dialect,
    version: &str,
    keys: &[&'a [u8]],
) -> Option<Statement<'a>> {
    if keys.is_empty() || keys.len() > EXACT_ROWS {
        return None;
    }
    let mut st = Statement::new(
        d,
        format!(
            "SELECT m.revision, m.compact_revision, m.epoch, m.{version}, l.key_bytes, \
             l.create_revision, l.mod_revision, l.version, l.lease, l.value_bytes \
             FROM ks_meta m LEFT JOIN ks_live l ON "
        ),
    );
    push_in_list(&mut st, "l.key_bytes IN (", keys, Arg::Bytes);
    st.sql(" WHERE m.id = 1");
    Some(st)
}

/// Writes the counter only if the row's version is still `seen`, and
/// locks it; affects no row otherwise.
fn push_guarded_set_revisions<'a>(
    st: &mut Statement<'a>,
    version: &str,
    seen: &'a str,
    revs: Revisions,
) {
    push_set_revisions(st, revs);
    st.sql(" AND ").sql(version).sql(" = ").arg(Arg::Text(seen));
}

/// The counter update of a large guarded batch, at the start of its
/// transaction: one affected row means the lock is held and nothing was
/// committed since the batch read.
pub(crate) fn guarded_set_revisions<'a>(
    d: &'static dyn Dialect,
    version: &str,
    seen: &'a str,
    revs: Revisions,
) -> Statement<'a> {
    let mut st = Statement::new(d, "");
    push_guarded_set_revisions(&mut st, version, seen, revs);
    st
}

/// One row if the counter row's version is still `seen`: nothing was
/// committed since the batch read (a batch that wrote nothing but read
/// in several statements).
pub(crate) fn meta_unchanged<'a>(
    d: &'static dyn Dialect,
    version: &str,
    seen: &'a str,
) -> Statement<'a> {
    let mut st = Statement::new(
        d,
        format!("SELECT 1 FROM ks_meta WHERE id = 1 AND {version} = "),
    );
    st.arg(Arg::Text(seen));
    st
}

/// The whole write of a small guarded batch as one statement (so one
/// transaction): the counter update guarded by the version the batch read,
/// and the history rows, live upserts and deletes, each written only if
/// the guard held. Answers the counter row's new version (one row), or no
/// row when another writer committed since the batch read and nothing was
/// written. `None` where [`combined_final`] would be, except that one part
/// (the counter alone) is enough.
pub(crate) fn guarded_final<'a>(
    d: &'static dyn Dialect,
    version: &str,
    seen: &'a str,
    history: &'a [HistoryRow],
    upserts: &[&'a KeyValue],
    deletes: &[&'a [u8]],
    revs: Revisions,
) -> Option<Statement<'a>> {
    if !fits_one_guarded_statement(d, history, upserts, deletes) {
        return None;
    }
    // Each part reads `m`, so it runs after the guarded update has taken
    // the row lock and writes nothing when the update found a newer row.
    let mut st = Statement::new(d, "WITH m AS (");
    push_guarded_set_revisions(&mut st, version, seen, revs);
    st.sql(" RETURNING ").sql(version).sql(" AS v)");
    push_guarded_parts(&mut st, d, history, upserts, deletes);
    st.sql(" SELECT v FROM m");
    Some(st)
}

/// Whether the writes fit one statement behind a guarded counter update.
fn fits_one_guarded_statement(
    d: &'static dyn Dialect,
    history: &[HistoryRow],
    upserts: &[&KeyValue],
    deletes: &[&[u8]],
) -> bool {
    if !d.writes_in_one_statement()
        || history.len() > EXACT_ROWS
        || upserts.len() > EXACT_ROWS
        || deletes.len() > EXACT_ROWS
    {
        return false;
    }
    let bytes: usize = history
        .iter()
        .map(|r| r.key.len() + r.value.len())
        .chain(upserts.iter().map(|kv| kv.key.len() + kv.value.len()))
        .sum();
    bytes <= BYTES_PER_INSERT
}

/// The history rows, live upserts and deletes of a guarded statement, each
/// behind the counter update `m`.
fn push_guarded_parts<'a>(
    st: &mut Statement<'a>,
    d: &'static dyn Dialect,
    history: &'a [HistoryRow],
    upserts: &[&'a KeyValue],
    deletes: &[&'a [u8]],
) {
    if !history.is_empty() {
        st.sql(", h AS (");
        push_history_insert(st, history, Rows::GuardedByM);
        st.sql(")");
    }
    if !upserts.is_empty() {
        st.sql(", l AS (");
        push_live_upsert(st, d, upserts, Rows::GuardedByM);
        st.sql(")");
    }
    if !deletes.is_empty() {
        st.sql(", d AS (");
        push_in_list(st, LIVE_DELETE, deletes, Arg::Bytes);
        st.sql(" AND EXISTS (SELECT 1 FROM m))");
    }
}

/// The whole of a small batch computed without reading first, as one
/// statement: it reads the counter row and the live rows of `expected`'s
/// keys, and writes (as [`guarded_final`] does) only if the counter row's
/// version is still `seen` and each key's live row is the one expected
/// (`Some(mod_revision)`) or absent (`None`). Answers one row per live key
/// found (one row with NULLs if none): column 0 is the counter row's new
/// version when the batch was written, NULL otherwise; then the counter
/// row and the key's live row as [`guarded_start`] gives them (from column
/// 1 on), which are what the batch must start from when it was not
/// written. Their values are only sent back when they are needed. `None`
/// where [`guarded_final`] would be, or for more than [`EXACT_ROWS`] keys.
#[allow(clippy::too_many_arguments)]
pub(crate) fn speculative_final<'a>(
    d: &'static dyn Dialect,
    version: &str,
    seen: &'a str,
    expected: &[(&'a [u8], Option<i64>)],
    history: &'a [HistoryRow],
    upserts: &[&'a KeyValue],
    deletes: &[&'a [u8]],
    revs: Revisions,
) -> Option<Statement<'a>> {
    if expected.is_empty()
        || expected.len() > EXACT_ROWS
        || !fits_one_guarded_statement(d, history, upserts, deletes)
    {
        return None;
    }
    let keys: Vec<&[u8]> = expected.iter().map(|(key, _)| *key).collect();
    let present: Vec<(&[u8], i64)> = expected
        .iter()
        .filter_map(|(key, m)| m.map(|m| (*key, m)))
        .collect();
    let mut st = Statement::new(
        d,
        format!(
            "WITH s AS (SELECT revision, compact_revision, epoch, {version} AS v \
             FROM ks_meta WHERE id = 1), r AS (SELECT {KV_COLUMNS} FROM ks_live "
        ),
    );
    push_in_list(&mut st, "WHERE key_bytes IN (", &keys, Arg::Bytes);
    st.sql("), m AS (");
    push_guarded_set_revisions(&mut st, version, seen, revs);
    // Every expected live row is there (same key, same mod_revision, so
    // the same row) and no other: the keys are as the batch assumed.
    st.sql(" AND (SELECT count(*) FROM r) = ")
        .int(present.len() as i64);
    if !present.is_empty() {
        st.sql(" AND (SELECT count(*) FROM r WHERE (key_bytes, mod_revision) IN (");
        for (i, (key, m)) in present.iter().enumerate() {
            st.sql(if i == 0 { "(" } else { ", (" });
            st.bytes(key).sql(", ").int(*m).sql(")");
        }
        st.sql(")) = ").int(present.len() as i64);
    }
    st.sql(" RETURNING ").sql(version).sql(" AS v)");
    push_guarded_parts(&mut st, d, history, upserts, deletes);
    st.sql(
        " SELECT m.v, s.revision, s.compact_revision, s.epoch, s.v, r.key_bytes, \
         r.create_revision, \
         r.mod_revision, r.version, r.lease, r.value_bytes \
         FROM s LEFT JOIN m ON true LEFT JOIN r ON m.v IS NULL",
    );
    Some(st)
}

/// The ids among `ids` that exist, one statement per chunk.
pub(crate) fn leases_existing(d: &'static dyn Dialect, ids: &[i64]) -> Vec<Statement<'static>> {
    shaped_chunks(ids)
        .into_iter()
        .map(|chunk| in_list(d, "SELECT id FROM ks_lease WHERE id IN (", chunk, Arg::Int))
        .collect()
}

pub(crate) fn lease_insert(d: &'static dyn Dialect, lease: LeaseRecord) -> Statement<'static> {
    let mut st = Statement::new(d, "INSERT INTO ks_lease (id, ttl, expires_at_ms) VALUES (");
    st.int(lease.id).sql(", ").int(lease.ttl).sql(", ");
    st.int(lease.expires_at_ms).sql(")");
    st
}

pub(crate) fn lease_delete(d: &'static dyn Dialect, id: i64) -> Statement<'static> {
    let mut st = Statement::new(d, "DELETE FROM ks_lease WHERE id = ");
    st.int(id);
    st
}

pub(crate) fn lease_deadline(d: &'static dyn Dialect, id: i64) -> Statement<'static> {
    let mut st = Statement::new(d, "SELECT expires_at_ms FROM ks_lease WHERE id = ");
    st.int(id);
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_have_few_shapes() {
        let rows: Vec<usize> = (0..300).collect();
        let lens: Vec<usize> = shaped_chunks(&rows).iter().map(|c| c.len()).collect();
        assert_eq!(lens, vec![256, 32, 12]);
        let small: Vec<usize> = (0..7).collect();
        assert_eq!(shaped_chunks(&small).len(), 1);
        let lens: Vec<usize> = insert_chunks(&rows, |_| 1 << 20)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(lens, vec![4; 75], "4 MiB per statement: 4 rows of 1 MiB");
        assert!(shaped_chunks::<u8>(&[]).is_empty());
    }

    /// A put of "k" at revision 5: its history row, live row and counter.
    fn one_put() -> (HistoryRow, KeyValue, Revisions) {
        let row = HistoryRow {
            revision: 5,
            sub: 0,
            key: b"k".to_vec(),
            deleted: false,
            create_revision: 5,
            prev_revision: 0,
            version: 1,
            lease: 0,
            value: b"v".to_vec(),
        };
        let kv = KeyValue {
            key: b"k".to_vec(),
            create_revision: 5,
            mod_revision: 5,
            version: 1,
            lease: 0,
            value: b"v".to_vec(),
        };
        let revs = Revisions {
            current: 5,
            compacted: 0,
            epoch: 0,
        };
        (row, kv, revs)
    }

    #[test]
    fn small_batch_ends_in_one_statement_on_postgres() {
        let (row, kv, revs) = one_put();
        let history = [row];
        let pg: &'static dyn Dialect = &crate::dialect::Postgres;
        let Some(st) = combined_final(pg, &history, &[&kv], &[b"gone"], Some(revs)) else {
            panic!("four small parts combine");
        };
        assert!(st.text.starts_with("WITH h AS (INSERT INTO ks_history"));
        assert!(st.text.contains("), l AS (INSERT INTO ks_live"));
        assert!(
            st.text
                .contains("), d AS (DELETE FROM ks_live WHERE key_bytes IN ($16))")
        );
        assert!(st.text.ends_with(", m AS (UPDATE ks_meta SET revision = $17, compact_revision = $18 WHERE id = 1) SELECT 1"));
        assert_eq!(st.args.len(), 18, "9 + 6 + 1 + 2 parameters in text order");
        // One part alone, other dialects and large parts keep their statements.
        assert!(combined_final(pg, &[], &[], &[], Some(revs)).is_none());
        let mysql: &'static dyn Dialect = &crate::dialect::Mysql;
        assert!(combined_final(mysql, &history, &[&kv], &[], Some(revs)).is_none());
        let many = vec![history[0].clone(); EXACT_ROWS + 1];
        assert!(combined_final(pg, &many, &[&kv], &[], Some(revs)).is_none());
    }

    #[test]
    fn guarded_batch_writes_only_behind_its_counter_update() {
        let (row, kv, revs) = one_put();
        let history = [row];
        let pg: &'static dyn Dialect = &crate::dialect::Postgres;
        let Some(version) = pg.meta_version() else {
            panic!("PostgreSQL has a row version");
        };
        let Some(st) = guarded_final(pg, version, "731", &history, &[&kv], &[b"gone"], revs) else {
            panic!("a small batch is one guarded statement");
        };
        assert!(st.text.starts_with(
            "WITH m AS (UPDATE ks_meta SET revision = $1, compact_revision = $2 \
             WHERE id = 1 AND xmin::text = $3 RETURNING xmin::text AS v), \
             h AS (INSERT INTO ks_history"
        ));
        assert!(st.text.contains(") SELECT v.* FROM m, (VALUES ($4, "));
        assert!(st.text.contains("), l AS (INSERT INTO ks_live"));
        assert!(st.text.ends_with(
            "), d AS (DELETE FROM ks_live WHERE key_bytes IN ($19) \
             AND EXISTS (SELECT 1 FROM m)) SELECT v FROM m"
        ));
        assert_eq!(st.args.len(), 19, "3 + 9 + 6 + 1 parameters in text order");
        assert!(matches!(st.args[2], Arg::Text("731")));
        // The counter alone (a Bump) is one statement too.
        let Some(bump) = guarded_final(pg, version, "731", &[], &[], &[], revs) else {
            panic!("a counter-only batch is guarded");
        };
        assert!(
            bump.text
                .ends_with("RETURNING xmin::text AS v) SELECT v FROM m")
        );
        // MySQL has no guarded statements; large parts take the transaction.
        let mysql: &'static dyn Dialect = &crate::dialect::Mysql;
        assert!(mysql.meta_version().is_none());
        assert!(guarded_final(mysql, version, "1", &history, &[&kv], &[], revs).is_none());
        let many = vec![history[0].clone(); EXACT_ROWS + 1];
        assert!(guarded_final(pg, version, "1", &many, &[], &[], revs).is_none());
        let keys: Vec<&[u8]> = vec![b"a"; EXACT_ROWS];
        let Some(start) = guarded_start(pg, version, &keys) else {
            panic!("up to EXACT_ROWS keys are read with the counter");
        };
        assert!(
            start
                .text
                .starts_with("SELECT m.revision, m.compact_revision, m.epoch, m.xmin::text, ")
        );
        assert!(guarded_start(pg, version, &vec![&b"a"[..]; EXACT_ROWS + 1]).is_none());
    }

    #[test]
    fn speculative_batch_writes_only_if_its_keys_are_as_assumed() {
        let (row, kv, revs) = one_put();
        let history = [row];
        let pg: &'static dyn Dialect = &crate::dialect::Postgres;
        let Some(version) = pg.meta_version() else {
            panic!("PostgreSQL has a row version");
        };
        // "k" assumed absent, "j" assumed live at mod_revision 3.
        let expected: [(&[u8], Option<i64>); 2] = [(b"k", None), (b"j", Some(3))];
        let Some(st) =
            speculative_final(pg, version, "731", &expected, &history, &[&kv], &[], revs)
        else {
            panic!("a small batch is one speculative statement");
        };
        assert!(st.text.starts_with(
            "WITH s AS (SELECT revision, compact_revision, epoch, xmin::text AS v FROM ks_meta \
             WHERE id = 1), r AS (SELECT key_bytes, create_revision, mod_revision, version, \
             lease, value_bytes FROM ks_live WHERE key_bytes IN ($1, $2)), \
             m AS (UPDATE ks_meta SET revision = $3, compact_revision = $4 \
             WHERE id = 1 AND xmin::text = $5 AND (SELECT count(*) FROM r) = $6 \
             AND (SELECT count(*) FROM r WHERE (key_bytes, mod_revision) IN (($7, $8))) = $9 \
             RETURNING xmin::text AS v), h AS (INSERT INTO ks_history"
        ));
        assert!(st.text.ends_with(
            " SELECT m.v, s.revision, s.compact_revision, s.epoch, s.v, r.key_bytes, \
             r.create_revision, r.mod_revision, r.version, r.lease, r.value_bytes \
             FROM s LEFT JOIN m ON true LEFT JOIN r ON m.v IS NULL"
        ));
        assert!(matches!(st.args[5], Arg::Int(1)), "one live row expected");
        assert!(matches!(st.args[7], Arg::Int(3)));
        assert_eq!(st.args.len(), 9 + 9 + 6, "parameters in text order");
        // All keys assumed absent: only the count is checked.
        let Some(st) = speculative_final(
            pg,
            version,
            "731",
            &expected[..1],
            &history,
            &[&kv],
            &[],
            revs,
        ) else {
            panic!("a small batch is one speculative statement");
        };
        assert!(
            st.text
                .contains("AND (SELECT count(*) FROM r) = $5 RETURNING")
        );
        assert!(matches!(st.args[4], Arg::Int(0)));
        // No keys, too many keys, or MySQL: not speculative.
        assert!(speculative_final(pg, version, "1", &[], &history, &[&kv], &[], revs).is_none());
        let many = vec![expected[0]; EXACT_ROWS + 1];
        assert!(speculative_final(pg, version, "1", &many, &history, &[&kv], &[], revs).is_none());
        let mysql: &'static dyn Dialect = &crate::dialect::Mysql;
        assert!(
            speculative_final(mysql, version, "1", &expected, &history, &[&kv], &[], revs)
                .is_none()
        );
    }

    #[test]
    fn statements_bind_in_text_order() {
        let d: &'static dyn Dialect = &crate::dialect::Postgres;
        let keys: Vec<&[u8]> = vec![b"a", b"b", b"c"];
        let st = &live_get(d, &keys)[0];
        assert_eq!(
            st.text,
            "SELECT key_bytes, create_revision, mod_revision, version, lease, value_bytes \
             FROM ks_live WHERE key_bytes IN ($1, $2, $3)"
        );
        assert_eq!(st.args.len(), 3);
        let st = lease_insert(
            d,
            LeaseRecord {
                id: 7,
                ttl: 10,
                expires_at_ms: 99,
            },
        );
        assert_eq!(
            st.text,
            "INSERT INTO ks_lease (id, ttl, expires_at_ms) VALUES ($1, $2, $3)"
        );
    }
}
