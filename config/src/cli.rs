//! The `kubeshard` command line. Flag names follow kine's so that kine users can switch.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::endpoint::{Endpoint, EndpointError};
use crate::topology::{Topology, TopologyError};

/// The database used when neither --endpoint nor --config is given.
pub const DEFAULT_ENDPOINT: &str = "sqlite://./db/state.db";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
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
    /// Address to serve the etcd gRPC API on (HOST:PORT).
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
    #[arg(long, env = "KUBESHARD_METRICS_IGNORE_TLS_CONFIG")]
    pub metrics_ignore_tls_config: bool,

    /// Log format; the level comes from RUST_LOG (default "info").
    #[arg(long, env = "KUBESHARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How often (ms) each shard looks for writes made by other kubeshard
    /// processes sharing its database. Writes through this process are seen at once.
    #[arg(long, default_value_t = 100)]
    pub watch_poll_interval_ms: u64,

    /// How often (ms) expired leases are looked for.
    #[arg(long, default_value_t = 500)]
    pub lease_check_interval_ms: u64,

    /// Interval (s) of the progress notifications sent to watches that asked
    /// for them (etcd's default is 10 minutes).
    #[arg(long, default_value_t = 600)]
    pub progress_notify_interval_secs: u64,

    /// Largest request accepted, in bytes (etcd's --max-request-bytes).
    #[arg(long, default_value_t = 1_572_864)]
    pub max_request_bytes: usize,

    /// Most operations in one Txn branch (etcd's --max-txn-ops).
    #[arg(long, default_value_t = 128)]
    pub max_txn_ops: usize,

    /// Revisions removed per statement when compaction deletes history.
    #[arg(long, default_value_t = 1000)]
    pub compaction_batch_revisions: i64,
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
}

impl Cli {
    /// Validates the flags into server options.
    pub fn server_options(&self) -> Result<ServerOptions, OptionsError> {
        let topology = match (&self.config, &self.endpoint) {
            (Some(_), Some(_)) => return Err(OptionsError::ConfigAndEndpoint),
            (Some(path), None) => Topology::from_file(path)?,
            (None, endpoint) => Topology::single(Endpoint::parse(
                endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT),
            )?),
        };
        Ok(ServerOptions {
            listen_address: self.listen_address.clone(),
            endpoint: topology.shard(topology.default_shard()).endpoint.clone(),
            topology,
            metrics_address: Some(self.metrics_bind_address.clone()).filter(|a| !a.is_empty()),
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
            watch_poll_interval: Duration::from_millis(self.watch_poll_interval_ms.max(1)),
            lease_check_interval: Duration::from_millis(self.lease_check_interval_ms.max(10)),
            progress_notify_interval: Duration::from_secs(
                self.progress_notify_interval_secs.max(1),
            ),
            max_request_bytes: self.max_request_bytes,
            max_txn_ops: self.max_txn_ops,
            compaction_batch_revisions: self.compaction_batch_revisions.max(1),
        })
    }
}

impl ServerOptions {
    /// Defaults for one endpoint, as `kubeshard --endpoint URL` would use.
    pub fn for_endpoint(endpoint: Endpoint, listen_address: impl Into<String>) -> Self {
        ServerOptions {
            listen_address: listen_address.into(),
            topology: Topology::single(endpoint.clone()),
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

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
