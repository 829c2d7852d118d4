//! `kubeshard`: the etcd v3 API over SQL databases.
#![forbid(unsafe_code)]

use anyhow::Context;
use kubeshard_config::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Subcommands come first; without one, the command line is kine's
    // (which takes no positional arguments).
    match std::env::args_os().nth(1) {
        Some(a) if a == "import" => return import().await,
        Some(a) if a == "reshard" => return reshard().await,
        _ => {}
    }
    let cli = Cli::parse_with_kine_env();
    init_logging(cli.log_format, cli.debug);
    for (flag, why) in cli.ignored_flags() {
        tracing::warn!(flag, "ignored: {why}");
    }
    let options = cli.server_options()?;
    let mut server = kubeshard::start(options)
        .await
        .context("kubeshard could not start")?;
    tokio::select! {
        result = server.wait() => result.context("kubeshard stopped")?,
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            server.shutdown().await.context("shutdown")?;
        }
    }
    Ok(())
}

/// A subcommand's arguments, named as the user typed it (for usage lines).
fn subcommand_args(name: &str) -> impl Iterator<Item = std::ffi::OsString> {
    std::iter::once(name.into()).chain(std::env::args_os().skip(2))
}

/// `kubeshard import`: copies an etcd cluster in (kubeshard-transfer).
async fn import() -> anyhow::Result<()> {
    use clap::Parser;
    let cli = kubeshard_transfer::ImportCli::parse_from(subcommand_args("kubeshard import"));
    init_logging(LogFormat::Text, false);
    let options = cli.options()?;
    // With --follow, SIGINT and SIGTERM end the follow; they are caught
    // from the start, so one that comes during the copy ends the follow
    // right after it instead of killing the import half-way.
    let stop = if options.follow {
        Some(stop_signals().context("cannot catch SIGINT and SIGTERM")?)
    } else {
        None
    };
    let stop = async move {
        match stop {
            Some(stop) => stop.await,
            None => std::future::pending().await,
        }
    };
    let report = kubeshard_transfer::run_import(options, stop)
        .await
        .context("kubeshard import failed")?;
    tracing::info!(
        copied_at = report.copied_at,
        keys = report.keys,
        leases = report.leases,
        revision = report.revision,
        verified_keys = report.verified_keys,
        "imported"
    );
    Ok(())
}

/// `kubeshard reshard`: moves keys between shards (kubeshard-transfer).
async fn reshard() -> anyhow::Result<()> {
    use clap::Parser;
    let cli = kubeshard_transfer::ReshardCli::parse_from(subcommand_args("kubeshard reshard"));
    init_logging(LogFormat::Text, false);
    let (options, describe) = cli.options()?;
    let report = kubeshard_transfer::run_reshard(options, &describe)
        .await
        .context("kubeshard reshard failed")?;
    tracing::info!(
        history_rows = report.history_rows_moved,
        live_keys = report.live_keys_moved,
        verified_keys = report.verified_keys,
        "resharded"
    );
    Ok(())
}

fn init_logging(format: LogFormat, debug: bool) {
    let level = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// SIGINT or SIGTERM, caught from the moment this is called.
#[cfg(unix)]
fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
