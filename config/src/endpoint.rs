//! Database endpoint URLs, in kine's forms and the plain ones.

use std::fmt;
use std::path::PathBuf;

use url::Url;

/// Which SQL dialect a shard speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Mysql,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
        })
    }
}

/// A parsed `--endpoint`: where one shard's database lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An embedded SQLite file (created with its folder when missing).
    Sqlite { path: PathBuf },
    /// A PostgreSQL database; `database` is created when missing.
    Postgres { url: Url, database: String },
    /// A MySQL or MariaDB database; `database` is created when missing.
    Mysql { url: Url, database: String },
}

/// Why an endpoint URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error("endpoint {0:?}: unknown scheme; use sqlite://PATH, postgres://... or mysql://...")]
    UnknownScheme(String),
    #[error(
        "endpoint {0:?}: sqlite needs a file path, e.g. sqlite://./db/state.db or sqlite:///abs/state.db"
    )]
    MissingPath(String),
    #[error("endpoint {endpoint:?}: not a valid URL: {reason}")]
    InvalidUrl { endpoint: String, reason: String },
    #[error(
        "endpoint {0:?}: no database name in the path (e.g. postgres://user@host:5432/kubernetes)"
    )]
    MissingDatabase(String),
    #[error(
        "endpoint {endpoint:?}: database name {database:?} may only use letters, digits, '_' and '-'"
    )]
    BadDatabaseName { endpoint: String, database: String },
}

/// The database names we create ourselves are interpolated into DDL, so they
/// are restricted to a safe alphabet.
fn valid_database_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Endpoint {
    /// Parses the forms kine accepts plus plain URLs:
    /// `sqlite://./rel.db`, `sqlite:///abs.db`, `postgres://u:p@h:5432/db`,
    /// `postgresql://...`, `mysql://u:p@tcp(h:3306)/db` and `mysql://u:p@h:3306/db`.
    pub fn parse(raw: &str) -> Result<Self, EndpointError> {
        let (scheme, rest) = raw
            .split_once("://")
            .ok_or_else(|| EndpointError::UnknownScheme(raw.to_string()))?;
        match scheme {
            "sqlite" | "sqlite3" => {
                // kine passes go-sqlite3 driver options as a query string; they
                // have no meaning here, the pragmas we need are set explicitly.
                let path = rest.split('?').next().unwrap_or_default();
                if path.is_empty() {
                    return Err(EndpointError::MissingPath(raw.to_string()));
                }
                Ok(Endpoint::Sqlite {
                    path: PathBuf::from(path),
                })
            }
            "postgres" | "postgresql" => {
                let url = parse_url(raw, &format!("postgres://{rest}"))?;
                let database = database_of(raw, &url)?;
                Ok(Endpoint::Postgres { url, database })
            }
            "mysql" => {
                // kine (go-sql-driver) writes the address as tcp(host:port).
                let plain = rewrite_go_mysql_address(rest);
                let url = parse_url(raw, &format!("mysql://{plain}"))?;
                let database = database_of(raw, &url)?;
                Ok(Endpoint::Mysql { url, database })
            }
            _ => Err(EndpointError::UnknownScheme(raw.to_string())),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Endpoint::Sqlite { .. } => Backend::Sqlite,
            Endpoint::Postgres { .. } => Backend::Postgres,
            Endpoint::Mysql { .. } => Backend::Mysql,
        }
    }
}

/// Shows the endpoint without its password, for logs.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Sqlite { path } => write!(f, "sqlite://{}", path.display()),
            Endpoint::Postgres { url, .. } | Endpoint::Mysql { url, .. } => {
                let mut shown = url.clone();
                if shown.password().is_some() {
                    // Only fails for URLs that cannot have a password, which
                    // these cannot be since one is present.
                    let _ = shown.set_password(Some("***"));
                }
                write!(f, "{shown}")
            }
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Endpoint({self})")
    }
}

fn parse_url(raw: &str, normalized: &str) -> Result<Url, EndpointError> {
    Url::parse(normalized).map_err(|e| EndpointError::InvalidUrl {
        endpoint: raw.to_string(),
        reason: e.to_string(),
    })
}

fn database_of(raw: &str, url: &Url) -> Result<String, EndpointError> {
    let database = url.path().trim_start_matches('/').to_string();
    if database.is_empty() {
        return Err(EndpointError::MissingDatabase(raw.to_string()));
    }
    if !valid_database_name(&database) {
        return Err(EndpointError::BadDatabaseName {
            endpoint: raw.to_string(),
            database,
        });
    }
    Ok(database)
}

/// `user:pass@tcp(host:port)/db?x` becomes `user:pass@host:port/db?x`.
fn rewrite_go_mysql_address(rest: &str) -> String {
    let (userinfo, address) = match rest.rsplit_once('@') {
        Some((user, address)) => (Some(user), address),
        None => (None, rest),
    };
    let address = match address.strip_prefix("tcp(") {
        Some(inner) => match inner.split_once(')') {
            Some((host, tail)) => format!("{host}{tail}"),
            None => address.to_string(),
        },
        None => address.to_string(),
    };
    match userinfo {
        Some(user) => format!("{user}@{address}"),
        None => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_relative_and_absolute() {
        assert_eq!(
            Endpoint::parse("sqlite://./db/state.db"),
            Ok(Endpoint::Sqlite {
                path: PathBuf::from("./db/state.db")
            })
        );
        assert_eq!(
            Endpoint::parse("sqlite:///var/lib/k/state.db?_journal=WAL&cache=shared"),
            Ok(Endpoint::Sqlite {
                path: PathBuf::from("/var/lib/k/state.db")
            })
        );
        assert_eq!(
            Endpoint::parse("sqlite://"),
            Err(EndpointError::MissingPath("sqlite://".into()))
        );
    }

    #[test]
    fn kine_mysql_form_is_rewritten() {
        let Ok(Endpoint::Mysql { url, database }) =
            Endpoint::parse("mysql://root:secret@tcp(127.0.0.1:3306)/kubernetes")
        else {
            panic!("mysql endpoint not parsed");
        };
        assert_eq!(database, "kubernetes");
        assert_eq!(url.host_str(), Some("127.0.0.1"));
        assert_eq!(url.port(), Some(3306));
        assert_eq!(url.password(), Some("secret"));
    }

    #[test]
    fn postgres_needs_a_database() {
        assert!(matches!(
            Endpoint::parse("postgres://u:p@localhost:5432/pods"),
            Ok(Endpoint::Postgres { ref database, .. }) if database == "pods"
        ));
        assert!(matches!(
            Endpoint::parse("postgresql://u@localhost/"),
            Err(EndpointError::MissingDatabase(_))
        ));
        assert!(matches!(
            Endpoint::parse("postgres://u@localhost/a;drop"),
            Err(EndpointError::BadDatabaseName { .. })
        ));
    }

    #[test]
    fn unknown_scheme_and_password_hidden() {
        assert!(matches!(
            Endpoint::parse("redis://x"),
            Err(EndpointError::UnknownScheme(_))
        ));
        let Ok(e) = Endpoint::parse("postgres://u:hunter2@h/db") else {
            panic!("not parsed");
        };
        assert!(!e.to_string().contains("hunter2"));
    }
}
