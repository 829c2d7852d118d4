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
    #[error(
        "endpoint {0:?}: no host; name one, or a Unix socket folder with ?host=/var/run/postgresql"
    )]
    MissingHost(String),
    #[error(
        "endpoint {0:?}: unix( without its closing ')'; kine's form is mysql://USER:PASS@unix(/run/mysqld/mysqld.sock)/DB"
    )]
    BadSocketAddress(String),
    #[error(
        "endpoint {endpoint:?}: tls={value:?} names a TLS configuration registered in Go code; \
         use tls=true, skip-verify, preferred or false, the ssl-ca, ssl-cert and ssl-key \
         parameters, or --ca-file, --cert-file and --key-file"
    )]
    UnknownMysqlTls { endpoint: String, value: String },
}

/// TLS to the databases from kine's flags (`--ca-file`, `--cert-file`,
/// `--key-file`, `--skip-verify`), applied to every shard's endpoint that
/// does not say otherwise in its own parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseTls {
    /// CA certificates the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (both or neither).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// MySQL/MariaDB only, as in kine: TLS without verifying the server.
    pub skip_verify: bool,
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
    ///
    /// Unix sockets, in the forms each database's own clients use:
    /// `postgres://u:p@/db?host=/var/run/postgresql` (or the folder
    /// percent-encoded as the host, `postgres://u:p@%2Fvar%2Frun%2Fpostgresql/db`),
    /// `mysql://u:p@unix(/run/mysqld/mysqld.sock)/db` (kine's) and
    /// `mysql://u:p@localhost/db?socket=/run/mysqld/mysqld.sock` (sqlx's).
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
                let url = parse_url(
                    raw,
                    &format!("postgres://{}", with_postgres_host(raw, rest)?),
                )?;
                let database = database_of(raw, &url)?;
                Ok(Endpoint::Postgres { url, database })
            }
            "mysql" => {
                // kine (go-sql-driver) writes the address as tcp(host:port)
                // or unix(/path/to/socket).
                let (plain, socket) = rewrite_go_mysql_address(raw, rest)?;
                let mut url = parse_url(raw, &format!("mysql://{plain}"))?;
                if let Some(socket) = socket {
                    url.query_pairs_mut().append_pair("socket", &socket);
                }
                translate_go_mysql_tls(raw, &mut url)?;
                let database = database_of(raw, &url)?;
                Ok(Endpoint::Mysql { url, database })
            }
            _ => Err(EndpointError::UnknownScheme(raw.to_string())),
        }
    }

    /// What makes two endpoints the same database: the backend, the server
    /// and the database name, or the normalised SQLite path (so two shards
    /// cannot share one, and a topology change knows which shards stay).
    /// `None` for SQLite's `:memory:`, which is a new database every time.
    pub fn identity(&self) -> Option<String> {
        match self {
            Endpoint::Sqlite { path } => {
                let normal: std::path::PathBuf = path
                    .components()
                    .filter(|c| !matches!(c, std::path::Component::CurDir))
                    .collect();
                (normal.as_os_str() != ":memory:").then(|| format!("sqlite:{}", normal.display()))
            }
            Endpoint::Postgres { database, .. } | Endpoint::Mysql { database, .. } => {
                Some(format!(
                    "{}://{}/{database}",
                    self.backend(),
                    self.server().unwrap_or_default()
                ))
            }
        }
    }

    /// Where the database server listens: `unix:PATH` for a socket (the
    /// folder for PostgreSQL, the file for MySQL), else `host:port`, in
    /// lower case. Two endpoints with the same server and database are the
    /// same database. `None` for SQLite.
    pub fn server(&self) -> Option<String> {
        let (url, default_port, socket_key) = match self {
            Endpoint::Sqlite { .. } => return None,
            Endpoint::Postgres { url, .. } => (url, 5432, "host"),
            Endpoint::Mysql { url, .. } => (url, 3306, "socket"),
        };
        // The last occurrence wins, as in the drivers' parsers.
        let from_query = url
            .query_pairs()
            .filter(|(k, v)| k == socket_key && v.starts_with('/'))
            .last()
            .map(|(_, v)| v.into_owned());
        let host = url.host_str().unwrap_or_default();
        let decoded = percent_encoding::percent_decode_str(host).decode_utf8_lossy();
        let socket = from_query.or_else(|| {
            (matches!(self, Endpoint::Postgres { .. }) && decoded.starts_with('/'))
                .then(|| decoded.to_string())
        });
        Some(match socket {
            Some(path) => format!("unix:{}", path.trim_end_matches('/')),
            None => format!(
                "{}:{}",
                host.to_ascii_lowercase(),
                url.port().unwrap_or(default_port)
            ),
        })
    }

    /// The endpoint with kine's database TLS flags applied where its own
    /// parameters say nothing, as kine does: for PostgreSQL `sslrootcert`,
    /// `sslcert`, `sslkey`, and `sslmode=verify-full` when one of them was
    /// added (`--skip-verify` does not apply); for MySQL/MariaDB `ssl-ca`,
    /// `ssl-cert`, `ssl-key` and `ssl-mode` (`VERIFY_IDENTITY`, or
    /// `REQUIRED` with `--skip-verify`).
    pub fn with_database_tls(self, tls: &DatabaseTls) -> Endpoint {
        // Each setting under every name sqlx accepts for it; the one
        // written first is what the URL's own parameter would be called.
        const POSTGRES: [&[&str]; 4] = [
            &["sslrootcert", "ssl-root-cert", "ssl-ca"],
            &["sslcert", "ssl-cert"],
            &["sslkey", "ssl-key"],
            &["sslmode", "ssl-mode"],
        ];
        const MYSQL: [&[&str]; 4] = [
            &["ssl-ca", "sslca"],
            &["ssl-cert", "sslcert"],
            &["ssl-key", "sslkey"],
            &["ssl-mode", "sslmode"],
        ];
        let files = [&tls.ca_file, &tls.cert_file, &tls.key_file];
        // libpq and the MySQL clients use no TLS over a Unix socket.
        let over_socket = self.server().is_some_and(|s| s.starts_with("unix:"));
        if files.iter().all(|file| file.is_none()) || over_socket {
            return self;
        }
        let (mut url, database, postgres) = match self {
            Endpoint::Sqlite { .. } => return self,
            Endpoint::Postgres { url, database } => (url, database, true),
            Endpoint::Mysql { url, database } => (url, database, false),
        };
        let names = if postgres { POSTGRES } else { MYSQL };
        let has = |url: &Url, keys: &[&str]| url.query_pairs().any(|(k, _)| keys.contains(&&*k));
        let mut added = false;
        for (file, keys) in files.into_iter().zip(names) {
            if let Some(file) = file
                && !has(&url, keys)
            {
                url.query_pairs_mut()
                    .append_pair(keys[0], &file.display().to_string());
                added = true;
            }
        }
        let mode = names[3];
        if postgres {
            if added && !has(&url, mode) {
                url.query_pairs_mut().append_pair(mode[0], "verify-full");
            }
            Endpoint::Postgres { url, database }
        } else {
            if !has(&url, mode) {
                let value = if tls.skip_verify {
                    "REQUIRED"
                } else {
                    "VERIFY_IDENTITY"
                };
                url.query_pairs_mut().append_pair(mode[0], value);
            }
            Endpoint::Mysql { url, database }
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

/// go-sql-driver's `tls` parameter (kine's DSNs) as sqlx's `ssl-mode`:
/// `true` verifies the server, `skip-verify` encrypts without verifying,
/// `preferred` uses TLS when the server offers it, `false` never does.
fn translate_go_mysql_tls(raw: &str, url: &mut Url) -> Result<(), EndpointError> {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if !pairs.iter().any(|(k, _)| k == "tls") {
        return Ok(());
    }
    let mut translated = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        if key != "tls" {
            translated.push((key, value));
            continue;
        }
        let mode = match value.as_str() {
            "true" | "1" => "VERIFY_IDENTITY",
            "skip-verify" => "REQUIRED",
            "preferred" => "PREFERRED",
            "false" | "0" => "DISABLED",
            _ => {
                return Err(EndpointError::UnknownMysqlTls {
                    endpoint: raw.to_string(),
                    value,
                });
            }
        };
        translated.push(("ssl-mode".to_string(), mode.to_string()));
    }
    url.query_pairs_mut().clear().extend_pairs(translated);
    Ok(())
}

/// A URL cannot have credentials without a host (`u:p@/db`), which is how
/// libpq and pgx users name a socket folder with `?host=/path`: put
/// `localhost` in the host's place, which the driver then ignores for the
/// socket. Without a socket folder an empty host is refused, rather than
/// guessing where a socket might be.
fn with_postgres_host(raw: &str, rest: &str) -> Result<String, EndpointError> {
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((user, host)) => (Some(user), host),
        None => (None, authority),
    };
    if !host.is_empty() {
        return Ok(rest.to_string());
    }
    let query = tail.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let socket_folder = url::form_urlencoded::parse(query.as_bytes())
        .any(|(k, v)| k == "host" && v.starts_with('/'));
    if !socket_folder {
        return Err(EndpointError::MissingHost(raw.to_string()));
    }
    Ok(match userinfo {
        Some(user) => format!("{user}@localhost{tail}"),
        None => format!("localhost{tail}"),
    })
}

/// `user:pass@tcp(host:port)/db?x` becomes `user:pass@host:port/db?x`, and
/// `user:pass@unix(/path)/db?x` becomes `user:pass@localhost/db?x` with the
/// socket's path returned beside it (for sqlx's `socket` parameter).
fn rewrite_go_mysql_address(
    raw: &str,
    rest: &str,
) -> Result<(String, Option<String>), EndpointError> {
    // The socket's path holds slashes: find the address before splitting
    // off the database.
    let at = rest
        .find("@tcp(")
        .or_else(|| rest.find("@unix("))
        .or_else(|| rest.rfind('@'));
    let (userinfo, address) = match at {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let mut socket = None;
    let address = if let Some(inner) = address.strip_prefix("tcp(") {
        match inner.split_once(')') {
            Some((host, tail)) => format!("{host}{tail}"),
            None => address.to_string(),
        }
    } else if let Some(inner) = address.strip_prefix("unix(") {
        let (path, tail) = inner
            .split_once(')')
            .ok_or_else(|| EndpointError::BadSocketAddress(raw.to_string()))?;
        socket = Some(path.to_string());
        format!("localhost{tail}")
    } else {
        address.to_string()
    };
    let plain = match userinfo {
        Some(user) => format!("{user}@{address}"),
        None => address,
    };
    Ok((plain, socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(endpoint: &Endpoint) -> Vec<(String, String)> {
        match endpoint {
            Endpoint::Postgres { url, .. } | Endpoint::Mysql { url, .. } => url
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
            Endpoint::Sqlite { .. } => Vec::new(),
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn go_mysql_tls_parameter_becomes_ssl_mode() {
        for (tls, mode) in [
            ("true", "VERIFY_IDENTITY"),
            ("skip-verify", "REQUIRED"),
            ("preferred", "PREFERRED"),
            ("false", "DISABLED"),
        ] {
            let Ok(e) =
                Endpoint::parse(&format!("mysql://u:p@tcp(db:3306)/k?tls={tls}&timeout=5s"))
            else {
                panic!("tls={tls} refused");
            };
            assert_eq!(query(&e), pairs(&[("ssl-mode", mode), ("timeout", "5s")]));
        }
        assert!(matches!(
            Endpoint::parse("mysql://u:p@tcp(db:3306)/k?tls=custom"),
            Err(EndpointError::UnknownMysqlTls { .. })
        ));
    }

    #[test]
    fn kine_database_tls_flags_fill_what_the_url_leaves() {
        let tls = DatabaseTls {
            ca_file: Some("/pki/ca.crt".into()),
            cert_file: Some("/pki/client.crt".into()),
            key_file: Some("/pki/client.key".into()),
            skip_verify: false,
        };
        let parse = |raw: &str| match Endpoint::parse(raw) {
            Ok(e) => e.with_database_tls(&tls),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            query(&parse("postgres://u:p@db:5432/k")),
            pairs(&[
                ("sslrootcert", "/pki/ca.crt"),
                ("sslcert", "/pki/client.crt"),
                ("sslkey", "/pki/client.key"),
                ("sslmode", "verify-full"),
            ])
        );
        // What the URL says stays.
        assert_eq!(
            query(&parse(
                "postgres://u:p@db:5432/k?sslmode=verify-ca&sslrootcert=/other.crt"
            )),
            pairs(&[
                ("sslmode", "verify-ca"),
                ("sslrootcert", "/other.crt"),
                ("sslcert", "/pki/client.crt"),
                ("sslkey", "/pki/client.key"),
            ])
        );
        assert_eq!(
            query(&parse("mysql://u:p@tcp(db:3306)/k")),
            pairs(&[
                ("ssl-ca", "/pki/ca.crt"),
                ("ssl-cert", "/pki/client.crt"),
                ("ssl-key", "/pki/client.key"),
                ("ssl-mode", "VERIFY_IDENTITY"),
            ])
        );
        let skip = DatabaseTls {
            skip_verify: true,
            ..tls.clone()
        };
        let Ok(e) = Endpoint::parse("mysql://u:p@tcp(db:3306)/k?tls=preferred") else {
            panic!("refused");
        };
        assert_eq!(
            query(&e.with_database_tls(&skip))[0],
            ("ssl-mode".to_string(), "PREFERRED".to_string())
        );
        let Ok(e) = Endpoint::parse("mysql://u:p@tcp(db:3306)/k") else {
            panic!("refused");
        };
        assert!(
            query(&e.with_database_tls(&skip)).contains(&("ssl-mode".into(), "REQUIRED".into()))
        );
        // sqlx's other names for a setting count as the URL saying so.
        assert_eq!(
            query(&parse("postgres://u:p@db:5432/k?ssl-mode=disable")),
            pairs(&[
                ("ssl-mode", "disable"),
                ("sslrootcert", "/pki/ca.crt"),
                ("sslcert", "/pki/client.crt"),
                ("sslkey", "/pki/client.key"),
            ])
        );
        // No TLS over Unix sockets, as libpq and the MySQL clients.
        for socket in [
            "postgres://u:p@/k?host=/run/postgresql",
            "mysql://u:p@unix(/run/mysqld/mysqld.sock)/k",
        ] {
            let Ok(e) = Endpoint::parse(socket) else {
                panic!("{socket} refused");
            };
            assert_eq!(e.clone().with_database_tls(&tls), e, "{socket}");
        }
        // No file given: nothing changes (kine ignores --skip-verify alone).
        let Ok(e) = Endpoint::parse("mysql://u:p@tcp(db:3306)/k") else {
            panic!("refused");
        };
        let only_skip = DatabaseTls {
            skip_verify: true,
            ..DatabaseTls::default()
        };
        assert_eq!(e.clone().with_database_tls(&only_skip), e);
    }

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

    #[test]
    fn postgres_unix_socket_forms() {
        for raw in [
            "postgres://kubeshard:pw@/pods?host=/var/run/postgresql",
            "postgres://kubeshard:pw@%2Fvar%2Frun%2Fpostgresql/pods",
            "postgresql:///pods?host=/var/run/postgresql/&user=kubeshard",
        ] {
            let e = Endpoint::parse(raw).unwrap_or_else(|err| panic!("{raw}: {err}"));
            let Endpoint::Postgres { ref database, .. } = e else {
                panic!("{raw}: not postgres");
            };
            assert_eq!(database, "pods", "{raw}");
            assert_eq!(
                e.server().as_deref(),
                Some("unix:/var/run/postgresql"),
                "{raw}"
            );
        }
        assert_eq!(
            Endpoint::parse("postgres://u:p@/pods"),
            Err(EndpointError::MissingHost("postgres://u:p@/pods".into()))
        );
    }

    #[test]
    fn postgres_socket_reaches_the_driver() {
        let Ok(Endpoint::Postgres { url, .. }) =
            Endpoint::parse("postgres://kubeshard:pw@/pods?host=/var/run/postgresql")
        else {
            panic!("not parsed");
        };
        assert_eq!(url.password(), Some("pw"));
        assert_eq!(
            url.query_pairs()
                .find(|(k, _)| k == "host")
                .map(|(_, v)| v.into_owned()),
            Some("/var/run/postgresql".to_string())
        );
    }

    #[test]
    fn mysql_unix_socket_forms() {
        for raw in [
            "mysql://kubeshard:pw@unix(/run/mysqld/mysqld.sock)/events",
            "mysql://kubeshard:pw@unix(/run/mysqld/mysqld.sock)/events?timeout=5s",
            "mysql://kubeshard:pw@localhost/events?socket=/run/mysqld/mysqld.sock",
        ] {
            let e = Endpoint::parse(raw).unwrap_or_else(|err| panic!("{raw}: {err}"));
            let Endpoint::Mysql {
                ref url,
                ref database,
            } = e
            else {
                panic!("{raw}: not mysql");
            };
            assert_eq!(database, "events", "{raw}");
            assert_eq!(url.password(), Some("pw"), "{raw}");
            assert_eq!(
                e.server().as_deref(),
                Some("unix:/run/mysqld/mysqld.sock"),
                "{raw}"
            );
        }
        assert_eq!(
            Endpoint::parse("mysql://u:p@unix(/run/mysqld/mysqld.sock/events"),
            Err(EndpointError::BadSocketAddress(
                "mysql://u:p@unix(/run/mysqld/mysqld.sock/events".into()
            ))
        );
    }

    #[test]
    fn server_of_tcp_endpoints() {
        let server = |raw: &str| Endpoint::parse(raw).ok().and_then(|e| e.server());
        assert_eq!(
            server("postgres://u@DB.example:6000/x").as_deref(),
            Some("db.example:6000")
        );
        assert_eq!(server("postgres://u@db/x").as_deref(), Some("db:5432"));
        assert_eq!(
            server("mysql://u@tcp(db:3307)/x").as_deref(),
            Some("db:3307")
        );
        assert_eq!(server("mysql://u@db/x").as_deref(), Some("db:3306"));
        assert_eq!(server("sqlite://x.db"), None);
    }
}
