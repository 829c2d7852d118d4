//! The `kubeshard` command line. Flag names follow kine's so that kine users can switch.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

use crate::endpoint::{DatabaseTls, Endpoint, EndpointError};
use crate::kine::{parse_go_bool, parse_go_duration};
use crate::topology::{Topology, TopologyError};

/// The database used when neither --endpoint nor --config is given.
pub const DEFAULT_ENDPOINT: &str = "sqlite://./db/state.db";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `plain` is kine's name for it.
    #[value(alias = "plain")]
    Text,
    Json,
}

/// kubeshard: the etcd v3 API over SQL databases (SQLite, PostgreSQL, MySQL/MariaDB).
///
/// With no flags it serves 127.0.0.1:2379 from the SQLite file ./db/state.db,
/// creating it when missing. Point kube-apiserver at it with
/// --etcd-servers=http://127.0.0.1:2379.
#[derive(Debug, Clone, Parser)]
#[command(name = "kubeshard", version, about, long_about)]
pub struct Cli {
    /// Address to serve the etcd gRPC API on: HOST:PORT, or unix://PATH for
    /// a Unix socket (TLS too, when configured; clients then use unixs://).
    #[arg(
        long,
        env = "KUBESHARD_LISTEN_ADDRESS",
        default_value = "127.0.0.1:2379"
    )]
    pub listen_address: String,

    /// Database of the single shard: sqlite://PATH (relative) or sqlite:///ABS/PATH,
    /// postgres://USER:PASS@HOST:PORT/DB, mysql://USER:PASS@tcp(HOST:PORT)/DB
    /// (kine's form) or mysql://USER:PASS@HOST:PORT/DB; over Unix sockets
    /// postgres://USER:PASS@/DB?host=/var/run/postgresql and
    /// mysql://USER:PASS@unix(/run/mysqld/mysqld.sock)/DB. The database and the
    /// schema are created when missing. Default (without --config):
    /// sqlite://./db/state.db.
    #[arg(long, env = "KUBESHARD_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,

    /// Topology file (TOML): several shards and the rules routing keys to
    /// them (see docs/topology.md). Replaces --endpoint, which it conflicts with.
    #[arg(
        long,
        env = "KUBESHARD_CONFIG",
        value_name = "FILE",
        conflicts_with = "endpoint"
    )]
    pub config: Option<PathBuf>,

    /// Address (HOST:PORT) of the Prometheus /metrics endpoint; empty turns it off.
    #[arg(
        long,
        env = "KUBESHARD_METRICS_BIND_ADDRESS",
        default_value = "127.0.0.1:2381"
    )]
    pub metrics_bind_address: String,

    /// CA certificates (PEM) the databases' certificates must chain to; turns
    /// on verified TLS to PostgreSQL (sslmode=verify-full) and MySQL/MariaDB
    /// (ssl-mode=VERIFY_IDENTITY) unless an endpoint's own parameters say
    /// otherwise.
    #[arg(
        long,
        env = "KUBESHARD_CA_FILE",
        value_name = "FILE",
        help_heading = "TLS to the databases"
    )]
    pub ca_file: Option<PathBuf>,

    /// Client certificate (PEM) presented to the databases; needs --key-file.
    #[arg(
        long,
        env = "KUBESHARD_CERT_FILE",
        value_name = "FILE",
        requires = "key_file",
        help_heading = "TLS to the databases"
    )]
    pub cert_file: Option<PathBuf>,

    /// Private key (PEM) of --cert-file.
    #[arg(
        long,
        env = "KUBESHARD_KEY_FILE",
        value_name = "FILE",
        requires = "cert_file",
        help_heading = "TLS to the databases"
    )]
    pub key_file: Option<PathBuf>,

    /// MySQL/MariaDB: encrypt without verifying the server's certificate
    /// (kine's flag; PostgreSQL's sslmode=require is the equivalent there).
    #[arg(long, env = "KUBESHARD_SKIP_VERIFY", value_name = "BOOL", action = ArgAction::Set,
          num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_go_bool, help_heading = "TLS to the databases")]
    pub skip_verify: bool,

    /// Certificate (PEM, leaf first, then its chain) served to etcd clients;
    /// with --server-key-file it turns on TLS. Both files are read again
    /// when they change (certificate rotation needs no restart).
    #[arg(
        long,
        env = "KUBESHARD_SERVER_CERT_FILE",
        value_name = "FILE",
        requires = "server_key_file"
    )]
    pub server_cert_file: Option<PathBuf>,

    /// Private key (PEM) of --server-cert-file.
    #[arg(
        long,
        env = "KUBESHARD_SERVER_KEY_FILE",
        value_name = "FILE",
        requires = "server_cert_file"
    )]
    pub server_key_file: Option<PathBuf>,

    /// CA certificates (PEM) that clients' certificates must chain to: with
    /// it every client must present one (mutual TLS, as kube-apiserver's
    /// --etcd-certfile does). Needs --server-cert-file.
    #[arg(
        long,
        env = "KUBESHARD_TRUSTED_CA_FILE",
        value_name = "FILE",
        requires = "server_cert_file"
    )]
    pub trusted_ca_file: Option<PathBuf>,

    /// Serve /metrics and the health paths in plain HTTP even when TLS is on.
    #[arg(long, env = "KUBESHARD_METRICS_IGNORE_TLS_CONFIG", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub metrics_ignore_tls_config: bool,

    /// Log format; the level comes from RUST_LOG (default "info").
    #[arg(long, env = "KUBESHARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How often (ms) each shard looks for writes made by other kubeshard
    /// processes sharing its database. Writes through this process are seen at once.
    #[arg(
        long,
        default_value_t = 100,
        conflicts_with = "datastore_poll_interval"
    )]
    pub watch_poll_interval_ms: u64,

    /// How often (ms) expired leases are looked for.
    #[arg(long, default_value_t = 500)]
    pub lease_check_interval_ms: u64,

    /// Interval (s) of the progress notifications sent to watches that asked
    /// for them (etcd's default is 10 minutes).
    #[arg(
        long,
        default_value_t = 600,
        conflicts_with = "watch_progress_notify_interval"
    )]
    pub progress_notify_interval_secs: u64,

    /// Largest request accepted, in bytes (etcd's --max-request-bytes).
    #[arg(long, default_value_t = 1_572_864)]
    pub max_request_bytes: usize,

    /// Most operations in one Txn branch (etcd's --max-txn-ops).
    #[arg(long, default_value_t = 128)]
    pub max_txn_ops: usize,

    /// Revisions removed per statement when compaction deletes history.
    #[arg(
        long,
        env = "KUBESHARD_COMPACT_BATCH_SIZE",
        default_value_t = 1000,
        alias = "compaction-batch-revisions"
    )]
    pub compact_batch_size: i64,

    /// Interval of kubeshard's own compaction, in Go's form (5m, 1h); 0
    /// (the default) leaves compaction to kube-apiserver, as etcd does.
    #[arg(long, env = "KUBESHARD_COMPACT_INTERVAL", value_name = "DURATION",
          default_value = "0", value_parser = parse_go_duration, help_heading = "Compaction")]
    pub compact_interval: Duration,

    /// Spreads the compaction interval by up to this percentage either way
    /// (0 to 99), so that several routers do not compact at once.
    #[arg(long, env = "KUBESHARD_COMPACT_INTERVAL_JITTER", value_name = "PERCENT",
          default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..100),
          help_heading = "Compaction")]
    pub compact_interval_jitter: u8,

    /// Longest one automatic compaction may take.
    #[arg(long, env = "KUBESHARD_COMPACT_TIMEOUT", value_name = "DURATION",
          default_value = "5s", value_parser = parse_go_duration, help_heading = "Compaction")]
    pub compact_timeout: Duration,

    /// Revisions automatic compaction always keeps below the current one.
    #[arg(
        long,
        env = "KUBESHARD_COMPACT_MIN_RETAIN",
        value_name = "REVISIONS",
        default_value_t = 1000,
        help_heading = "Compaction"
    )]
    pub compact_min_retain: i64,

    /// kine's name for the progress-notify interval, in Go's form (5s,
    /// 10m); give it or --progress-notify-interval-secs.
    #[arg(long, env = "KUBESHARD_WATCH_PROGRESS_NOTIFY_INTERVAL", value_name = "DURATION",
          value_parser = parse_go_duration)]
    pub watch_progress_notify_interval: Option<Duration>,

    /// kine's name for the watch poll interval, in Go's form (100ms, 1s);
    /// give it or --watch-poll-interval-ms.
    #[arg(long, env = "KUBESHARD_DATASTORE_POLL_INTERVAL", value_name = "DURATION",
          value_parser = parse_go_duration)]
    pub datastore_poll_interval: Option<Duration>,

    /// Events each shard's watch poller reads per query (default 1000).
    #[arg(long, env = "KUBESHARD_POLL_BATCH_SIZE", value_name = "EVENTS")]
    pub poll_batch_size: Option<i64>,

    /// The etcd version Maintenance.Status reports (default 3.6.0).
    /// kube-apiserver uses watch progress requests and WatchList only from
    /// 3.5.13 on.
    #[arg(long, env = "KUBESHARD_EMULATED_ETCD_VERSION", value_name = "VERSION",
          value_parser = parse_etcd_version)]
    pub emulated_etcd_version: Option<String>,

    /// Connections of each shard's pool (a shard's `max_connections` in the
    /// topology file wins); 0 or less: the default, 16.
    #[arg(
        long,
        env = "KUBESHARD_DATASTORE_MAX_OPEN_CONNECTIONS",
        value_name = "N",
        allow_negative_numbers = true,
        help_heading = "Database connections"
    )]
    pub datastore_max_open_connections: Option<i64>,

    /// Idle connections each shard's pool keeps: one released when this many
    /// are idle is closed (Go's database/sql rule, which kine's flag sets).
    /// 0 or unset: half the pool; less than 0: none kept.
    #[arg(
        long,
        env = "KUBESHARD_DATASTORE_MAX_IDLE_CONNECTIONS",
        value_name = "N",
        allow_negative_numbers = true,
        help_heading = "Database connections"
    )]
    pub datastore_max_idle_connections: Option<i64>,

    /// A connection is closed and replaced after this long; 0: never.
    #[arg(long, env = "KUBESHARD_DATASTORE_CONNECTION_MAX_LIFETIME", value_name = "DURATION",
          default_value = "0", value_parser = parse_go_duration,
          help_heading = "Database connections")]
    pub datastore_connection_max_lifetime: Duration,

    /// An idle connection is closed after this long; 0: never.
    #[arg(long, env = "KUBESHARD_DATASTORE_CONNECTION_MAX_IDLE_TIME", value_name = "DURATION",
          default_value = "2m", value_parser = parse_go_duration,
          help_heading = "Database connections")]
    pub datastore_connection_max_idle_time: Duration,

    /// Longest a database call may take (connect, acquire, statement,
    /// commit): a request to a shard whose database does not answer in
    /// time fails with etcd's "request timed out", and the connections it
    /// held are closed. At least 100ms.
    #[arg(long, env = "KUBESHARD_DATASTORE_TIMEOUT", value_name = "DURATION",
          default_value = "15s", value_parser = parse_go_duration,
          help_heading = "Database connections")]
    pub datastore_timeout: Duration,

    /// A database call of a shard that takes at least this long is logged
    /// (with the shard and the call); 0 turns this off.
    #[arg(long, env = "KUBESHARD_SLOW_SQL_THRESHOLD", value_name = "DURATION",
          default_value = "1s", value_parser = parse_go_duration)]
    pub slow_sql_threshold: Duration,

    /// A slow call that takes at least this long is logged as a warning.
    #[arg(long, env = "KUBESHARD_SLOW_SQL_WARNING_THRESHOLD", value_name = "DURATION",
          default_value = "5s", value_parser = parse_go_duration)]
    pub slow_sql_warning_threshold: Duration,

    /// Debug logging (RUST_LOG, when set, wins).
    #[arg(long, env = "KUBESHARD_DEBUG", value_name = "BOOL", action = ArgAction::Set,
          num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub debug: bool,

    /// Accepted for kine's command line and ignored: kubeshard has no
    /// profiler endpoint (Go's pprof).
    #[arg(long, env = "KUBESHARD_METRICS_ENABLE_PROFILING", value_name = "BOOL",
          action = ArgAction::Set, num_args = 0..=1, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool,
          help_heading = "Accepted for kine's command line, ignored")]
    pub metrics_enable_profiling: bool,

    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "ADDRESS",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub peer_bind_address: Option<String>,
    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "ADDRESS",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub peer_advertise_address: Option<String>,
    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "BUCKET",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub s3_bucket: Option<String>,
    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "FOLDER",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub s3_folder: Option<String>,
    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "URL",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub s3_endpoint: Option<String>,
    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "REGION",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub s3_region: Option<String>,
    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "KEY",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub s3_access_key: Option<String>,
    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "KEY",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub s3_secret_key: Option<String>,
    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "TOKEN",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub s3_session_token: Option<String>,
    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "PROFILE",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub s3_profile: Option<String>,
    /// kine's t4 driver only (ignored).
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Accepted for kine's command line, ignored"
    )]
    pub s3_ca_bundle: Option<String>,
}

/// `MAJOR.MINOR.PATCH`, as Maintenance.Status reports it.
fn parse_etcd_version(text: &str) -> Result<String, String> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        Ok(text.to_string())
    } else {
        Err(format!(
            "invalid etcd version {text:?} (MAJOR.MINOR.PATCH, such as 3.6.0)"
        ))
    }
}

/// The connection pool of each shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// None: the default size.
    pub max_connections: Option<u32>,
    /// Idle connections kept; one released beyond them is closed. None:
    /// half the pool.
    pub max_idle: Option<u32>,
    /// None: no limit.
    pub max_lifetime: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    /// Longest one database call may take (`--datastore-timeout`).
    pub call_timeout: Duration,
}

/// The command line's defaults (kine's): no lifetime limit, idle
/// connections closed after 2 minutes.
impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: None,
            max_idle: None,
            max_lifetime: None,
            idle_timeout: Some(Duration::from_secs(120)),
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// Which database calls are logged as slow (`--slow-sql-*`, kine's rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowSql {
    /// None: none is.
    pub info: Option<Duration>,
    pub warn: Duration,
}

impl Default for SlowSql {
    fn default() -> Self {
        Self {
            info: Some(Duration::from_secs(1)),
            warn: Duration::from_secs(5),
        }
    }
}

impl SlowSql {
    /// None: not slow; Some(true): a warning; Some(false): information.
    pub fn level(&self, elapsed: Duration) -> Option<bool> {
        let info = self.info?;
        (elapsed >= info).then_some(elapsed >= self.warn)
    }
}

/// kubeshard's own compaction (`--compact-interval`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoCompaction {
    pub interval: Duration,
    pub jitter_percent: u8,
    pub timeout: Duration,
    pub min_retain: i64,
}

/// Why the command line was refused.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(
        "--config and --endpoint (or KUBESHARD_CONFIG and KUBESHARD_ENDPOINT) are both given: \
         the topology file names every shard's endpoint; give one of them"
    )]
    ConfigAndEndpoint,
    #[error(
        "--listen-address {0}: unixs:// is what clients say for TLS over a Unix socket; \
         serve unix://PATH with --server-cert-file and --server-key-file"
    )]
    UnixsListen(String),
}

/// TLS of the etcd API (and of the metrics address unless told otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client certificates are required and verified against these CAs.
    pub trusted_ca_file: Option<PathBuf>,
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen_address: String,
    /// The default shard's endpoint: the only shard without --config. The
    /// router serves this one until it routes by `topology`.
    pub endpoint: Endpoint,
    /// The shards and routing rules (--config FILE), or the single shard of
    /// --endpoint ([`Topology::single`]).
    pub topology: Topology,
    /// How the shards' databases are reached over TLS (--ca-file ...),
    /// for a topology file read again ([`ServerOptions::reload_topology`]).
    pub database_tls: DatabaseTls,
    /// Where to serve /metrics; None turns it off.
    pub metrics_address: Option<String>,
    /// None serves plain text.
    pub tls: Option<ServerTls>,
    /// The metrics address uses `tls` too (without client certificates).
    pub metrics_tls: bool,
    pub watch_poll_interval: Duration,
    pub lease_check_interval: Duration,
    pub progress_notify_interval: Duration,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub compaction_batch_revisions: i64,
    /// None: compaction is left to clients (kube-apiserver).
    pub auto_compaction: Option<AutoCompaction>,
    /// Events per watch poll of each shard.
    pub poll_batch: usize,
    pub pool: PoolSettings,
    pub slow_sql: SlowSql,
    /// What Maintenance.Status reports.
    pub etcd_version: String,
}

/// The etcd version kubeshard reports by default. kube-apiserver turns on
/// watch progress requests and WatchList only for etcd >= 3.5.13, and
/// kubeshard implements what those need.
pub const DEFAULT_ETCD_VERSION: &str = "3.6.0";

/// Events read per watch poll unless --poll-batch-size says otherwise.
pub const DEFAULT_POLL_BATCH: usize = 1000;

/// `--datastore-timeout`'s default: well under kube-apiserver's request
/// timeout (60 s), and a little above etcd's own bound on a proposal.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);

impl Cli {
    /// Parses the process's command line, with kine's `KINE_*` variables
    /// for flags neither it nor a `KUBESHARD_*` variable set.
    pub fn parse_with_kine_env() -> Cli {
        crate::kine::parse_with_kine_env(std::env::args_os(), |name| std::env::var(name).ok())
            .unwrap_or_else(|e| e.exit())
    }

    /// The flags given that have no effect here, each with the reason, to
    /// be logged once at start-up.
    pub fn ignored_flags(&self) -> Vec<(&'static str, &'static str)> {
        let t4 = "it configures kine's t4 driver, which kubeshard does not have";
        let mut ignored = Vec::new();
        if self.metrics_enable_profiling {
            ignored.push((
                "--metrics-enable-profiling",
                "kubeshard has no profiler endpoint (Go's pprof)",
            ));
        }
        for (flag, given) in [
            ("--peer-bind-address", self.peer_bind_address.is_some()),
            (
                "--peer-advertise-address",
                self.peer_advertise_address.is_some(),
            ),
            ("--s3-bucket", self.s3_bucket.is_some()),
            ("--s3-folder", self.s3_folder.is_some()),
            ("--s3-endpoint", self.s3_endpoint.is_some()),
            ("--s3-region", self.s3_region.is_some()),
            ("--s3-access-key", self.s3_access_key.is_some()),
            ("--s3-secret-key", self.s3_secret_key.is_some()),
            ("--s3-session-token", self.s3_session_token.is_some()),
            ("--s3-profile", self.s3_profile.is_some()),
            ("--s3-ca-bundle", self.s3_ca_bundle.is_some()),
        ] {
            if given {
                ignored.push((flag, t4));
            }
        }
        ignored
    }

    /// kine's listen forms: a TCP address, one with tcp://, http:// or
    /// https:// in front, or unix://PATH.
    fn listen_address(&self) -> Result<String, OptionsError> {
        let address = self.listen_address.as_str();
        if address.starts_with("unixs://") {
            return Err(OptionsError::UnixsListen(address.to_string()));
        }
        Ok(["tcp://", "http://", "https://"]
            .iter()
            .find_map(|scheme| address.strip_prefix(scheme))
            .unwrap_or(address)
            .to_string())
    }

    /// None turns the endpoint off: empty, or kine's "0". Go's ":PORT" is
    /// every interface.
    fn metrics_address(&self) -> Option<String> {
        match self.metrics_bind_address.as_str() {
            "" | "0" => None,
            address if address.starts_with(':') => Some(format!("0.0.0.0{address}")),
            address => Some(address.to_string()),
        }
    }

    /// Validates the flags into server options.
    pub fn server_options(&self) -> Result<ServerOptions, OptionsError> {
        let topology = match (&self.config, &self.endpoint) {
            (Some(_), Some(_)) => return Err(OptionsError::ConfigAndEndpoint),
            (Some(path), None) => Topology::from_file(path)?,
            (None, endpoint) => Topology::single(Endpoint::parse(
                endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT),
            )?),
        };
        let database_tls = DatabaseTls {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            skip_verify: self.skip_verify,
        };
        let topology = topology.map_endpoints(|e| e.with_database_tls(&database_tls));
        let listen_address = self.listen_address()?;
        let database_tls_kept = database_tls.clone();
        let nonzero = |d: Duration| Some(d).filter(|d| !d.is_zero());
        Ok(ServerOptions {
            listen_address,
            endpoint: topology.shard(topology.default_shard()).endpoint.clone(),
            topology,
            database_tls: database_tls_kept,
            metrics_address: self.metrics_address(),
            tls: match (&self.server_cert_file, &self.server_key_file) {
                (Some(cert), Some(key)) => Some(ServerTls {
                    cert_file: cert.clone(),
                    key_file: key.clone(),
                    trusted_ca_file: self.trusted_ca_file.clone(),
                }),
                // clap requires both or neither.
                _ => None,
            },
            metrics_tls: !self.metrics_ignore_tls_config,
            watch_poll_interval: self
                .datastore_poll_interval
                .unwrap_or(Duration::from_millis(self.watch_poll_interval_ms))
                .max(Duration::from_millis(1)),
            lease_check_interval: Duration::from_millis(self.lease_check_interval_ms.max(10)),
            progress_notify_interval: self
                .watch_progress_notify_interval
                .unwrap_or(Duration::from_secs(self.progress_notify_interval_secs))
                .max(Duration::from_secs(1)),
            max_request_bytes: self.max_request_bytes,
            max_txn_ops: self.max_txn_ops,
            compaction_batch_revisions: self.compact_batch_size.max(1),
            auto_compaction: nonzero(self.compact_interval).map(|interval| AutoCompaction {
                interval,
                jitter_percent: self.compact_interval_jitter,
                timeout: self.compact_timeout.max(Duration::from_millis(100)),
                min_retain: self.compact_min_retain.max(0),
            }),
            poll_batch: self
                .poll_batch_size
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n > 0)
                .unwrap_or(DEFAULT_POLL_BATCH),
            pool: PoolSettings {
                max_connections: self
                    .datastore_max_open_connections
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| *n > 0),
                max_idle: match self.datastore_max_idle_connections {
                    None | Some(0) => None,
                    Some(n) => Some(u32::try_from(n.max(0)).unwrap_or(u32::MAX)),
                },
                max_lifetime: nonzero(self.datastore_connection_max_lifetime),
                idle_timeout: nonzero(self.datastore_connection_max_idle_time),
                call_timeout: self.datastore_timeout.max(Duration::from_millis(100)),
            },
            slow_sql: SlowSql {
                info: nonzero(self.slow_sql_threshold),
                warn: self.slow_sql_warning_threshold,
            },
            etcd_version: self
                .emulated_etcd_version
                .clone()
                .unwrap_or_else(|| DEFAULT_ETCD_VERSION.to_string()),
        })
    }
}

impl ServerOptions {
    /// The topology file read again, as at the start (an online topology
    /// change: the operator updates the file, then moves the data). None
    /// for a topology given by --endpoint.
    pub fn reload_topology(&self) -> Option<Result<Topology, TopologyError>> {
        let path = self.topology.source()?;
        Some(
            Topology::from_file(path)
                .map(|t| t.map_endpoints(|e| e.with_database_tls(&self.database_tls))),
        )
    }

    /// Defaults for one endpoint, as `kubeshard --endpoint URL` would use.
    pub fn for_endpoint(endpoint: Endpoint, listen_address: impl Into<String>) -> Self {
        ServerOptions {
            listen_address: listen_address.into(),
            topology: Topology::single(endpoint.clone()),
            database_tls: DatabaseTls::default(),
            endpoint,
            metrics_address: None,
            tls: None,
            metrics_tls: true,
            watch_poll_interval: Duration::from_millis(100),
            lease_check_interval: Duration::from_millis(500),
            progress_notify_interval: Duration::from_secs(600),
            max_request_bytes: 1_572_864,
            max_txn_ops: 128,
            compaction_batch_revisions: 1000,
            auto_compaction: None,
            poll_batch: DEFAULT_POLL_BATCH,
            pool: PoolSettings::default(),
            slow_sql: SlowSql::default(),
            etcd_version: DEFAULT_ETCD_VERSION.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_serve_loopback_on_sqlite() {
        let Ok(cli) = Cli::try_parse_from(["kubeshard"]) else {
            panic!("default flags rejected");
        };
        let Ok(options) = cli.server_options() else {
            panic!("default endpoint rejected");
        };
        assert_eq!(options.listen_address, "127.0.0.1:2379");
        assert_eq!(
            options.endpoint,
            Endpoint::Sqlite {
                path: "./db/state.db".into()
            }
        );
    }

    #[test]
    fn kine_flags_are_accepted() {
        let Ok(cli) = Cli::try_parse_from([
            "kubeshard",
            "--listen-address",
            "0.0.0.0:12379",
            "--endpoint",
            "mysql://root:pw@tcp(127.0.0.1:3306)/k8s",
        ]) else {
            panic!("kine flags rejected");
        };
        assert!(cli.server_options().is_ok());
    }

    #[test]
    fn no_flags_is_a_single_shard_topology() {
        let Ok(cli) = Cli::try_parse_from(["kubeshard"]) else {
            panic!("default flags rejected");
        };
        let Ok(options) = cli.server_options() else {
            panic!("default endpoint rejected");
        };
        let topology = &options.topology;
        assert_eq!(topology.shards().len(), 1);
        assert_eq!(topology.shards()[0].name, "default");
        assert_eq!(topology.shards()[0].endpoint, options.endpoint);
        assert!(topology.routes().is_empty());
        assert!(topology.source().is_none());
    }

    #[test]
    fn config_file_gives_the_topology_and_the_default_endpoint() {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("no temporary directory");
        };
        let path = dir.path().join("topology.toml");
        let text = "default_shard = \"core\"\n\
            [[shards]]\nname = \"pods\"\nendpoint = \"sqlite://./pods.db\"\n\
            [[shards]]\nname = \"core\"\nendpoint = \"postgres://u@h:5432/core\"\n\
            [[routes]]\nprefix = \"/registry/pods/\"\nshard = \"pods\"\n";
        let Ok(()) = std::fs::write(&path, text) else {
            panic!("cannot write {}", path.display());
        };
        let Ok(cli) = Cli::try_parse_from(["kubeshard", "--config", &path.display().to_string()])
        else {
            panic!("--config rejected");
        };
        let options = match cli.server_options() {
            Ok(options) => options,
            Err(e) => panic!("topology refused: {e}"),
        };
        assert_eq!(options.topology.shards().len(), 2);
        let Ok(core) = Endpoint::parse("postgres://u@h:5432/core") else {
            panic!("endpoint");
        };
        assert_eq!(options.endpoint, core);
        assert_eq!(
            options.topology.route(b"/registry/pods/ns/p").index(),
            0,
            "pods shard"
        );

        let Ok(()) = std::fs::write(&path, text.replace("shard = \"pods\"", "shard = \"pod\""))
        else {
            panic!("cannot write {}", path.display());
        };
        let Err(e) = cli.server_options() else {
            panic!("unknown shard accepted");
        };
        assert_eq!(
            e.to_string(),
            format!(
                "{}:10:9: unknown shard \"pod\"; the shards are \"pods\", \"core\"",
                path.display()
            )
        );
    }

    #[test]
    fn config_conflicts_with_endpoint() {
        assert!(
            Cli::try_parse_from([
                "kubeshard",
                "--config",
                "t.toml",
                "--endpoint",
                "sqlite://x.db"
            ])
            .is_err()
        );
        // KUBESHARD_ENDPOINT in the environment with --config on the command line.
        let Ok(mut cli) = Cli::try_parse_from(["kubeshard", "--config", "t.toml"]) else {
            panic!("--config rejected");
        };
        cli.endpoint = Some("sqlite://x.db".into());
        assert!(matches!(
            cli.server_options(),
            Err(OptionsError::ConfigAndEndpoint)
        ));
    }

    #[test]
    fn for_endpoint_is_a_single_shard_topology() {
        let Ok(endpoint) = Endpoint::parse("sqlite://./x.db") else {
            panic!("endpoint");
        };
        let options = ServerOptions::for_endpoint(endpoint.clone(), "127.0.0.1:0");
        assert_eq!(options.endpoint, endpoint);
        assert_eq!(options.topology.shards().len(), 1);
        assert_eq!(options.topology.shards()[0].endpoint, endpoint);
    }

    #[test]
    fn tls_flags_go_together() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["kubeshard"].iter().chain(args))
                .map_err(|e| e.to_string())
                .map(|cli| {
                    cli.server_options()
                        .map(|o| o.tls)
                        .map_err(|e| e.to_string())
                })
        };
        let Ok(Ok(Some(tls))) =
            parse(&["--server-cert-file", "c.pem", "--server-key-file", "k.pem"])
        else {
            panic!("TLS flags rejected");
        };
        assert_eq!(tls.cert_file, PathBuf::from("c.pem"));
        assert_eq!(tls.trusted_ca_file, None);
        for lonely in [
            &["--server-cert-file", "c.pem"][..],
            &["--server-key-file", "k.pem"],
            &["--trusted-ca-file", "ca.pem"],
        ] {
            let Err(e) = parse(lonely) else {
                panic!("{lonely:?} accepted");
            };
            assert!(e.contains("required arguments were not provided"), "{e}");
        }
        assert!(matches!(parse(&[]), Ok(Ok(None))));
    }

    fn kine(args: &[&str], env: &[(&str, &str)]) -> Result<ServerOptions, String> {
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cli = crate::kine::parse_with_kine_env(["kubeshard"].iter().chain(args), |name| {
            env.get(name).cloned()
        })
        .map_err(|e| e.to_string())?;
        cli.server_options().map_err(|e| e.to_string())
    }

    #[test]
    fn kine_command_lines_start() {
        // Every flag of kine v0.16 kubeshard takes, in kine's forms.
        let o = kine(
            &[
                "--listen-address=tcp://0.0.0.0:2379",
                "--endpoint=postgres://kine:pw@db:5432/kubernetes?sslmode=disable",
                "--log-format=plain",
                "--metrics-bind-address=:8080",
                "--datastore-max-idle-connections=20",
                "--datastore-max-open-connections=0",
                "--datastore-connection-max-lifetime=1h",
                "--datastore-connection-max-idle-time=2m0s",
                "--metrics-enable-profiling",
                "--metrics-ignore-tls-config=false",
                "--watch-progress-notify-interval=5s",
                "--emulated-etcd-version=3.6.11",
                "--compact-interval=5m",
                "--compact-interval-jitter=10",
                "--compact-timeout=5s",
                "--compact-min-retain=1000",
                "--compact-batch-size=1000",
                "--poll-batch-size=500",
                "--datastore-poll-interval=1s",
                "--slow-sql-threshold=0",
                "--slow-sql-warning-threshold=10s",
                "--peer-bind-address=",
                "--s3-bucket=b",
                "--debug",
            ],
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.listen_address, "0.0.0.0:2379");
        assert_eq!(o.metrics_address.as_deref(), Some("0.0.0.0:8080"));
        assert_eq!(o.progress_notify_interval, Duration::from_secs(5));
        assert_eq!(o.etcd_version, "3.6.11");
        assert_eq!(o.poll_batch, 500);
        assert_eq!(o.watch_poll_interval, Duration::from_secs(1));
        assert_eq!(o.slow_sql.info, None);
        assert_eq!(o.slow_sql.level(Duration::from_secs(20)), None);
        assert_eq!(
            o.auto_compaction,
            Some(AutoCompaction {
                interval: Duration::from_secs(300),
                jitter_percent: 10,
                timeout: Duration::from_secs(5),
                min_retain: 1000,
            })
        );
        assert_eq!(
            o.pool,
            PoolSettings {
                max_connections: None,
                max_idle: Some(20),
                max_lifetime: Some(Duration::from_secs(3600)),
                idle_timeout: Some(Duration::from_secs(120)),
                call_timeout: DEFAULT_CALL_TIMEOUT,
            }
        );
        // kine's defaults where kine's differ from kubeshard's are not taken.
        let o = kine(&[], &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.progress_notify_interval, Duration::from_secs(600));
        assert_eq!(o.auto_compaction, None);
        assert_eq!(o.etcd_version, DEFAULT_ETCD_VERSION);
        assert_eq!(o.metrics_address, Some("127.0.0.1:2381".into()));
        assert_eq!(
            kine(&["--metrics-bind-address", "0"], &[]).map(|o| o.metrics_address),
            Ok(None)
        );
    }

    #[test]
    fn slow_calls_follow_kines_rule() {
        let slow = SlowSql::default();
        assert_eq!(slow.level(Duration::from_millis(999)), None);
        assert_eq!(slow.level(Duration::from_secs(1)), Some(false));
        assert_eq!(slow.level(Duration::from_secs(5)), Some(true));
    }

    #[test]
    fn kine_and_k3s_documented_command_lines() {
        // kine's examples/minimal.md: MySQL with TLS to the database.
        let o = kine(
            &[
                "--endpoint",
                "mysql://root:pw@tcp(localhost:3306)/kine",
                "--ca-file",
                "ca.crt",
                "--cert-file",
                "server.crt",
                "--key-file",
                "server.key",
            ],
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            o.endpoint.to_string(),
            "mysql://root:***@localhost:3306/kine?ssl-ca=ca.crt&ssl-cert=server.crt&ssl-key=server.key&ssl-mode=VERIFY_IDENTITY"
        );
        // Kamaji: kine behind a Unix socket, PostgreSQL with a CA and client certificate.
        let o = kine(
            &[
                "--listen-address",
                "unix:///uds/kine.sock",
                "--ca-file",
                "/certs/ca.crt",
                "--cert-file",
                "/certs/server.crt",
                "--key-file",
                "/certs/server.key",
                "--endpoint",
                "postgres://kamaji:pw@db.example:5432/tenant",
            ],
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.listen_address, "unix:///uds/kine.sock");
        assert!(
            o.endpoint.to_string().ends_with(
                "/tenant?sslrootcert=%2Fcerts%2Fca.crt&sslcert=%2Fcerts%2Fserver.crt&sslkey=%2Fcerts%2Fserver.key&sslmode=verify-full"
            ),
            "{}",
            o.endpoint
        );
        // kine's scripts/test-run-postgres.
        assert!(
            kine(
                &[
                    "--endpoint",
                    "postgres://postgres:pw@127.0.0.1:5432/postgres?sslmode=disable"
                ],
                &[]
            )
            .is_ok()
        );
        // A client certificate without its key is refused.
        let e = kine(&["--cert-file", "c.crt"], &[])
            .err()
            .unwrap_or_default();
        assert!(e.contains("--key-file"), "{e}");
    }

    #[test]
    fn kine_variables_fill_what_the_command_line_left() {
        let env = [
            ("KINE_ENDPOINT", "mysql://root:pw@tcp(127.0.0.1:3306)/k8s"),
            ("KINE_LISTEN_ADDRESS", "0.0.0.0:1111"),
            ("KINE_COMPACT_INTERVAL", "1m"),
            ("KINE_METRICS_IGNORE_TLS_CONFIG", "True"),
            ("KINE_SERVER_CERT_FILE", "/pki/server.crt"),
            ("KINE_SERVER_KEY_FILE", "/pki/server.key"),
        ];
        let o =
            kine(&["--listen-address", "127.0.0.1:2222"], &env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.listen_address, "127.0.0.1:2222", "the command line wins");
        assert!(matches!(o.endpoint, Endpoint::Mysql { .. }));
        assert_eq!(
            o.auto_compaction.map(|c| c.interval),
            Some(Duration::from_secs(60))
        );
        assert!(!o.metrics_tls);
        assert_eq!(
            o.tls.map(|t| t.cert_file),
            Some(PathBuf::from("/pki/server.crt"))
        );
        let Err(e) = kine(&[], &[("KINE_DEBUG", "yes")]) else {
            panic!("KINE_DEBUG=yes accepted");
        };
        assert!(e.contains("invalid boolean \"yes\""), "{e}");
    }

    #[test]
    fn a_kine_variable_does_not_beat_the_command_line() {
        let env = [
            ("KINE_DATASTORE_POLL_INTERVAL", "1s"),
            ("KINE_WATCH_PROGRESS_NOTIFY_INTERVAL", "5s"),
            ("KINE_ENDPOINT", "postgres://u:p@db:5432/k"),
        ];
        let Ok(cli) = crate::kine::parse_with_kine_env(
            [
                "kubeshard",
                "--watch-poll-interval-ms=250",
                "--progress-notify-interval-secs=60",
                "--config=t.toml",
            ],
            |name| {
                env.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            },
        ) else {
            panic!("refused");
        };
        assert_eq!(cli.datastore_poll_interval, None);
        assert_eq!(cli.watch_progress_notify_interval, None);
        assert_eq!(cli.endpoint, None);
        assert!(
            Cli::try_parse_from([
                "kubeshard",
                "--watch-poll-interval-ms=5",
                "--datastore-poll-interval=1s"
            ])
            .is_err(),
            "both forms of one setting accepted"
        );
    }

    #[test]
    fn kine_forms_refused_with_the_reason() {
        let e = kine(&["--listen-address", "unixs://kine.sock"], &[])
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("serve unix://PATH with --server-cert-file"),
            "{e}"
        );
        assert_eq!(
            kine(&["--listen-address", "unix:///run/kine.sock"], &[]).map(|o| o.listen_address),
            Ok("unix:///run/kine.sock".into())
        );
        let e = kine(&["--compact-interval", "5"], &[])
            .err()
            .unwrap_or_default();
        assert!(e.contains("invalid duration \"5\""), "{e}");
        let e = kine(&["--compact-interval-jitter", "100"], &[])
            .err()
            .unwrap_or_default();
        assert!(e.contains("100"), "{e}");
        let e = kine(&["--emulated-etcd-version", "3.6"], &[])
            .err()
            .unwrap_or_default();
        assert!(e.contains("MAJOR.MINOR.PATCH"), "{e}");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
