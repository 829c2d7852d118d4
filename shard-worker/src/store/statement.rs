//! Statements assembled at run time with their parameters, in the
//! placeholder syntax of the shard's dialect. A leaf: every other store
//! file may use it.

use std::fmt;

use crate::dialect::Dialect;
use crate::keys::KeyRange;

/// A parameter of a dynamically assembled statement.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    Int(i64),
    Bytes(&'a [u8]),
    Text(&'a str),
}

/// A statement being assembled together with its parameters, in binding order.
pub(crate) struct Statement<'a> {
    pub(crate) dialect: &'static dyn Dialect,
    pub(crate) text: String,
    pub(crate) args: Vec<Arg<'a>>,
}

impl<'a> Statement<'a> {
    pub(crate) fn new(dialect: &'static dyn Dialect, text: impl Into<String>) -> Self {
        Statement {
            dialect,
            text: text.into(),
            args: Vec::new(),
        }
    }

    pub(crate) fn sql(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    pub(crate) fn arg(&mut self, arg: Arg<'a>) -> &mut Self {
        self.args.push(arg);
        let placeholder = self.dialect.param(self.args.len());
        self.text.push_str(&placeholder);
        self
    }

    pub(crate) fn int(&mut self, v: i64) -> &mut Self {
        self.arg(Arg::Int(v))
    }

    pub(crate) fn bytes(&mut self, v: &'a [u8]) -> &mut Self {
        self.arg(Arg::Bytes(v))
    }

    /// Appends a condition on column `col` that selects the keys of `range`.
    pub(crate) fn key_in(&mut self, col: &str, range: &'a KeyRange) -> &mut Self {
        match range {
            KeyRange::Single(key) => self.sql(col).sql(" = ").bytes(key),
            KeyRange::Span { start, end } => {
                self.sql(col).sql(" >= ").bytes(start);
                if let Some(end) = end {
                    self.sql(" AND ").sql(col).sql(" < ").bytes(end);
                }
                self
            }
        }
    }
}

impl fmt::Debug for Statement<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Statement")
            .field("text", &self.text)
            .field("args", &self.args.len())
            .finish()
    }
}
