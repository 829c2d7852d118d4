//! What every sqlx-based part of the store needs, and nothing else: binding
//! a [`Statement`], counting affected rows, decoding a live key. A leaf, so
//! that the parts using it need not import each other.

use kubeshard_proto::mvccpb::KeyValue;
use sqlx::{ColumnIndex, Database, Decode, Encode, IntoArguments, Row, Type};

use super::statement::{Arg, Statement};
use crate::error::Result;

/// `st` as a sqlx query with its parameters bound.
pub(crate) fn bound<'q, DB>(st: &'q Statement<'q>) -> sqlx::query::Query<'q, DB, DB::Arguments<'q>>
where
    DB: Database,
    for<'a> DB::Arguments<'a>: IntoArguments<'a, DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> &'a [u8]: Encode<'a, DB> + Type<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
{
    let mut q = sqlx::query(&st.text);
    for a in &st.args {
        q = match *a {
            Arg::Int(v) => q.bind(v),
            Arg::Bytes(v) => q.bind(v),
            Arg::Text(v) => q.bind(v),
        };
    }
    q
}

/// The affected-row count, which sqlx only offers per driver.
pub trait RowsAffected {
    fn rows(&self) -> u64;
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::mysql::MySqlQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

/// Decodes (key, create, mod, version, lease, value) starting at column `at`.
pub(crate) fn kv_from_row<DB>(row: &DB::Row, at: usize) -> Result<KeyValue>
where
    DB: Database,
    i64: Type<DB> + for<'r> Decode<'r, DB>,
    Vec<u8>: Type<DB> + for<'r> Decode<'r, DB>,
    usize: ColumnIndex<DB::Row>,
    DB::QueryResult: RowsAffected,
{
    Ok(KeyValue {
        key: row.try_get(at)?,
        create_revision: row.try_get(at + 1)?,
        mod_revision: row.try_get(at + 2)?,
        version: row.try_get(at + 3)?,
        lease: row.try_get(at + 4)?,
        value: row.try_get(at + 5)?,
    })
}
