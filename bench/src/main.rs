//! `kubeshard-bench`: a closed-loop load generator over the etcd gRPC API.
//!
//! Unlike `etcdctl check perf`, whose single producer sends behind a rate
//! limiter, every client here sends its next request as soon as the
//! previous one is answered, so the figure is the server's throughput at
//! saturation. Run it against each system in turn, in one session, and
//! compare ratios only.
//!
//! Workloads (`workloads.rs`): put, range (linearizable or serializable),
//! k8s-style txn (create, then updates guarded by mod_revision), paginated
//! list over N keys, and watch fan-out (event latency). Output
//! (`report.rs`): throughput, p50/p90/p95/p99, errors and the server's peak
//! RSS, as a table line or one JSON line.
#![forbid(unsafe_code)]

mod kube;
mod list_selected;
mod report;
mod watch_selected;
mod workloads;

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// The longest any one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(name = "kubeshard-bench", about)]
struct Cli {
    /// etcd endpoint, e.g. http://127.0.0.1:2379.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    endpoint: String,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 50)]
    conns: usize,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 500)]
    clients: usize,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Stop after this many operations in all (or after --seconds, if
    /// that comes first).
    #[arg(long)]
    total: Option<u64>,
    /// Pad every key to at least this many bytes (0: keys as they come).
    #[arg(long, default_value_t = 0)]
    key_size: usize,
    /// The server's process id: its peak RSS (VmHWM) is reported.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON line instead of a table line.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
pub enum Workload {
    /// Puts of distinct keys under a prefix.
    Put {
        #[arg(long, default_value_t = 1024)]
        value_size: usize,
        #[arg(long, default_value = "/kubeshard-bench/")]
        prefix: String,
        /// Spread the clients over this many resource prefixes,
        /// `<prefix>res<j>/` (client i writes to j = i mod N), as writes to
        /// several Kubernetes resource types would be.
        #[arg(long, default_value_t = 1)]
        resources: usize,
        /// Put this text between the resource prefix and the client's
        /// keys, `<prefix>[res<j>/]<tag><i>/<n>`, so that runs adding data
        /// to a store do not overwrite the keys of earlier runs.
        #[arg(long, default_value = "")]
        tag: String,
        /// Values of pseudo-random bytes instead of one repeated byte, so
        /// that storage that compresses (PostgreSQL's TOAST) stores as much
        /// as storage that does not.
        #[arg(long)]
        random_values: bool,
    },
    /// Gets of random keys among `keys` written first.
    Range {
        #[arg(long, default_value_t = 10_000)]
        keys: usize,
        #[arg(long, default_value_t = 1024)]
        value_size: usize,
        /// Serializable reads (etcd may answer from a follower's state).
        #[arg(long)]
        serializable: bool,
        #[arg(long, default_value = "/kubeshard-bench/range/")]
        prefix: String,
    },
    /// kube-apiserver's writes: each client creates its own keys with a
    /// Txn guarded by mod_revision == 0, then updates them with Txns
    /// guarded by the mod_revision it last saw.
    Txn {
        #[arg(long, default_value_t = 1024)]
        value_size: usize,
        /// Keys per client, updated in turn.
        #[arg(long, default_value_t = 10)]
        keys_per_client: usize,
        #[arg(long, default_value = "/kubeshard-bench/txn/")]
        prefix: String,
    },
    /// Whole lists of `keys` keys (written first, then each updated
    /// `updates` times) in pages of `page`, all pages at the first page's
    /// revision, as kube-apiserver lists.
    List {
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        #[arg(long, default_value_t = 500)]
        page: i64,
        #[arg(long, default_value_t = 0)]
        updates: usize,
        #[arg(long, default_value_t = 256)]
        value_size: usize,
        #[arg(long, default_value = "/kubeshard-bench/list/")]
        prefix: String,
        /// List the `keys` keys already under the prefix instead of writing
        /// them first.
        #[arg(long)]
        existing: bool,
    },
    /// `watchers` watches over a prefix while `clients` writers put into
    /// it; reports event latency (put sent to event received).
    Watch {
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        #[arg(long, default_value_t = 256)]
        value_size: usize,
        #[arg(long, default_value = "/kubeshard-bench/watch/")]
        prefix: String,
    },
    /// `watchers` watches over a prefix on one stream, each with its own
    /// label selector `app=a<i>` (kubeshard's push-down extension), while
    /// `clients` writers put objects each labelled for one of them;
    /// reports event latency and events delivered per second.
    WatchSelected {
        #[arg(long, default_value_t = 10)]
        watchers: usize,
        #[arg(long, default_value_t = 256)]
        value_size: usize,
        #[arg(long, default_value = "/kubeshard-bench/watch-selected/")]
        prefix: String,
    },
    /// Lists of the `matches` objects carrying one label value among
    /// `objects` objects labelled `app=a<n / matches>` (written first, from
    /// `from`), selected by the server (kubeshard's push-down extension)
    /// or by this client after listing everything.
    ListSelected {
        #[arg(long, default_value_t = 100_000)]
        objects: usize,
        /// Write objects `from..objects` first: `--from <objects>` writes
        /// none, a smaller one grows a store measured before.
        #[arg(long, default_value_t = 0)]
        from: usize,
        #[arg(long, default_value_t = 100)]
        matches: usize,
        #[arg(long, default_value_t = 500)]
        page: i64,
        #[arg(long, default_value_t = 1024)]
        value_size: usize,
        #[arg(long, default_value = "/kubeshard-bench/list-selected/")]
        prefix: String,
        #[arg(long, value_enum, default_value = "server")]
        filter: list_selected::Filter,
    },
    /// The Kubernetes custom-resource workload through kube-apiserver
    /// (HTTPS, not etcd): `--endpoint` and `--conns` do not apply.
    Kube(kube::KubeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Workload::Kube(args) = &cli.workload {
        return kube::run(args, cli.seconds, cli.server_pid, cli.json).await;
    }
    if cli.conns == 0 || cli.clients == 0 {
        bail!("--conns and --clients must be at least 1");
    }
    let mut connections = Vec::with_capacity(cli.conns);
    for _ in 0..cli.conns {
        connections.push(
            // A request timeout: a server that stops answering (kine's pool
            // deadlocked under 1000 clients) must end the run with errors,
            // not hang it.
            etcd_client::Client::connect(
                [cli.endpoint.clone()],
                Some(etcd_client::ConnectOptions::new().with_timeout(REQUEST_TIMEOUT)),
            )
            .await
            .with_context(|| format!("cannot connect to {}", cli.endpoint))?,
        );
    }
    let run = workloads::Run {
        connections,
        clients: cli.clients,
        duration: Duration::from_secs(cli.seconds),
        total: cli.total,
        key_size: cli.key_size,
    };
    let measured = match &cli.workload {
        Workload::WatchSelected {
            watchers,
            value_size,
            prefix,
        } => watch_selected::run(&run, &cli.endpoint, *watchers, *value_size, prefix).await?,
        Workload::ListSelected {
            objects,
            from,
            matches,
            page,
            value_size,
            prefix,
            filter,
        } => {
            let shape = list_selected::Shape {
                objects: *objects,
                from: *from,
                matches: *matches,
                page: *page,
                value_size: *value_size,
                prefix: prefix.clone(),
                filter: *filter,
            };
            list_selected::run(&run, &cli.endpoint, &shape).await?
        }
        other => workloads::run(&run, other).await?,
    };
    let rss = cli.server_pid.and_then(report::peak_rss_mib);
    let line = if cli.json {
        measured.json(&cli.endpoint, cli.clients, cli.conns, rss)
    } else {
        measured.table(rss)
    };
    println!("{line}");
    if let Some(e) = &measured.first_error {
        eprintln!("first error: {e}");
    }
    Ok(())
}
