//! `kubeshard-bench`: a closed-loop load generator over the etcd gRPC API.
//!
//! Unlike `etcdctl check perf`, whose single producer sends behind a rate
//! limiter, every client here sends its next request as soon as the
//! previous one is answered, so the figure is the server's throughput at
//! saturation. Run it against each system in turn, in one session, and
//! compare ratios only.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

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
    /// Print one JSON line instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
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
    },
}

/// What one client measured.
#[derive(Debug, Default)]
struct ClientResult {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.conns == 0 || cli.clients == 0 {
        bail!("--conns and --clients must be at least 1");
    }
    let mut connections = Vec::with_capacity(cli.conns);
    for _ in 0..cli.conns {
        connections.push(
            etcd_client::Client::connect([cli.endpoint.clone()], None)
                .await
                .with_context(|| format!("cannot connect to {}", cli.endpoint))?,
        );
    }
    let Workload::Put {
        value_size,
        prefix,
        resources,
    } = &cli.workload;
    if *resources == 0 {
        bail!("--resources must be at least 1");
    }
    let value = vec![b'x'; *value_size];
    let deadline = Instant::now() + Duration::from_secs(cli.seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(cli.clients);
    for i in 0..cli.clients {
        let mut client = connections[i % cli.conns].clone();
        let value = value.clone();
        let prefix = if *resources > 1 {
            format!("{prefix}res{}/", i % resources)
        } else {
            prefix.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut result = ClientResult::default();
            let mut n: u64 = 0;
            while Instant::now() < deadline {
                let key = format!("{prefix}{i}/{n}");
                let sent = Instant::now();
                match client.put(key, value.clone(), None).await {
                    Ok(_) => result
                        .latencies_us
                        .push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX)),
                    Err(e) => {
                        result.errors += 1;
                        result.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                n += 1;
            }
            result
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let r = task.await.context("a client task failed")?;
        latencies.extend(r.latencies_us);
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        f64::from(latencies[i.min(latencies.len() - 1)]) / 1000.0
    };
    let ok = latencies.len();
    let rate = ok as f64 / elapsed;
    if cli.json {
        println!(
            "{{\"workload\":\"put\",\"endpoint\":\"{}\",\"clients\":{},\"conns\":{},\"ok\":{ok},\"errors\":{errors},\"per_second\":{rate:.0},\"p50_ms\":{:.2},\"p90_ms\":{:.2},\"p95_ms\":{:.2},\"p99_ms\":{:.2}}}",
            cli.endpoint,
            cli.clients,
            cli.conns,
            pct(0.5),
            pct(0.9),
            pct(0.95),
            pct(0.99)
        );
    } else {
        println!(
            "put  ok {ok}  errors {errors}  {rate:.0}/s  p50 {:.2} ms  p90 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms",
            pct(0.5),
            pct(0.9),
            pct(0.95),
            pct(0.99)
        );
    }
    if let Some(e) = first_error {
        eprintln!("first error: {e}");
    }
    Ok(())
}
