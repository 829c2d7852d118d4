//! `kubeshard import`'s command line: etcdctl's names for the source, the
//! server's for the target.

use std::path::PathBuf;

use clap::Parser;
use kubeshard_config::{DEFAULT_ENDPOINT, DatabaseTls, Endpoint, Topology};

use crate::error::{Result, TransferError};
use crate::etcd::SourceTls;
use crate::import::ImportOptions;
use crate::reshard::ReshardOptions;

/// TLS to the databases, with the server's flag names (kine's).
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseTlsArgs {
    /// CA certificate the databases' certificates must chain to.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate for the databases.
    #[arg(long, value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// Client key for the databases.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// MySQL/MariaDB: TLS without verifying the server's certificate.
    #[arg(long)]
    pub skip_verify: bool,
}

impl DatabaseTlsArgs {
    fn settings(&self) -> DatabaseTls {
        DatabaseTls {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            skip_verify: self.skip_verify,
        }
    }
}

/// Copies an etcd cluster into kubeshard's databases, keeping every key's
/// revisions, version and lease, then optionally follows its changes until
/// stopped (SIGINT or SIGTERM) and compares both sides.
#[derive(Debug, Parser)]
#[command(name = "kubeshard import", version)]
pub struct ImportCli {
    /// The etcd cluster to copy: its client URLs, comma-separated (as
    /// etcdctl's --endpoints).
    #[arg(long = "from-etcd", value_name = "URLS")]
    pub from_etcd: String,
    /// CA certificate of the source's TLS (etcdctl's --cacert).
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Client certificate for the source (etcdctl's --cert).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Client key for the source (etcdctl's --key).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The target: a topology file, as the server's --config.
    #[arg(long, value_name = "FILE", conflicts_with = "endpoint")]
    pub config: Option<PathBuf>,
    /// The target: one database, as the server's --endpoint.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    #[command(flatten)]
    pub database_tls: DatabaseTlsArgs,
    /// After the copy, apply the source's changes until stopped; then catch
    /// up to the source's revision at that moment and finish.
    #[arg(long)]
    pub follow: bool,
    /// At the end, compare source and target at the last revision imported
    /// and fail on any difference.
    #[arg(long)]
    pub verify: bool,
}

impl ImportCli {
    pub fn options(&self) -> Result<ImportOptions> {
        let config = |e: &dyn std::fmt::Display| TransferError::Config(e.to_string());
        let topology = match &self.config {
            Some(path) => Topology::from_file(path).map_err(|e| config(&e))?,
            None => Topology::single(
                Endpoint::parse(self.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT))
                    .map_err(|e| config(&e))?,
            ),
        };
        let tls = self.database_tls.settings();
        Ok(ImportOptions {
            from: self.from_etcd.clone(),
            tls: SourceTls {
                ca: self.cacert.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
            },
            topology: topology.map_endpoints(|e| e.with_database_tls(&tls)),
            follow: self.follow,
            verify: self.verify,
        })
    }
}

/// Moves the keys whose shard changes between two topologies (with their
/// retained history, revisions unchanged) while no router serves either.
/// Running it again finishes a move that stopped half-way.
#[derive(Debug, Parser)]
#[command(name = "kubeshard reshard", version)]
pub struct ReshardCli {
    /// The topology the data is arranged for now.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// The topology to arrange it for.
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
    #[command(flatten)]
    pub database_tls: DatabaseTlsArgs,
    /// Afterwards, check that every key is on the shard the new topology
    /// puts it on.
    #[arg(long)]
    pub verify: bool,
    /// Routers keep serving: they follow the move through the default
    /// shard and switch to the new topology at one revision
    /// (docs/topology.md). Keys may only move to databases the old
    /// topology does not use.
    #[arg(long)]
    pub online: bool,
}

impl ReshardCli {
    pub fn options(&self) -> Result<(ReshardOptions, String)> {
        let tls = self.database_tls.settings();
        let load = |path: &PathBuf| {
            Topology::from_file(path)
                .map(|t| t.map_endpoints(|e| e.with_database_tls(&tls)))
                .map_err(|e| TransferError::Config(e.to_string()))
        };
        let describe = format!(
            "reshard from {} to {}",
            self.from.display(),
            self.to.display()
        );
        Ok((
            ReshardOptions {
                from: load(&self.from)?,
                to: load(&self.to)?,
                verify: self.verify,
                online: self.online,
            },
            describe,
        ))
    }
}
