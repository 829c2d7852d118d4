//! Test environment: required tools and backends, free ports, log tails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `KUBESHARD_TEST_REQUIRE_ALL=1` turns every "skip" into a failure (CI sets it).
pub const REQUIRE_ALL_ENV: &str = "KUBESHARD_TEST_REQUIRE_ALL";

pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| v == "1")
}

/// Skips (loud eprintln, returns `None`) or, under `KUBESHARD_TEST_REQUIRE_ALL=1`,
/// panics with `why`.
pub fn skip<T>(test: &str, why: &str) -> Option<T> {
    if require_all() {
        panic!("{test}: {why}, and {REQUIRE_ALL_ENV}=1 forbids skipping");
    }
    eprintln!();
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED {test}: {why}");
    eprintln!("!!! (set {REQUIRE_ALL_ENV}=1 to make this a failure)");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!();
    None
}

/// A free loopback port: bind 127.0.0.1:0 and release it. Callers that start a
/// server on it retry with a new port if the server fails to bind.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// The etcd and etcdctl binaries used by the tests.
#[derive(Debug, Clone)]
pub struct EtcdTools {
    pub etcd: PathBuf,
    pub etcdctl: PathBuf,
}

impl EtcdTools {
    /// `ETCD_BIN` (default `etcd` on PATH) and `ETCDCTL_BIN` (default `etcdctl`),
    /// each checked by running it with `--version` / `version`.
    /// Missing tools skip the test (or fail it under REQUIRE_ALL).
    pub fn find(test: &str) -> Option<EtcdTools> {
        let etcd = PathBuf::from(std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into()));
        let etcdctl =
            PathBuf::from(std::env::var("ETCDCTL_BIN").unwrap_or_else(|_| "etcdctl".into()));
        if !runs(&etcd, &["--version"]) {
            return skip(
                test,
                &format!(
                    "etcd binary {:?} not found or not runnable (set ETCD_BIN)",
                    etcd.display()
                ),
            );
        }
        if !runs(&etcdctl, &["version"]) {
            return skip(
                test,
                &format!(
                    "etcdctl binary {:?} not found or not runnable (set ETCDCTL_BIN)",
                    etcdctl.display()
                ),
            );
        }
        Some(EtcdTools { etcd, etcdctl })
    }
}

fn runs(bin: &Path, args: &[&str]) -> bool {
    Command::new(bin)
        .args(args)
        .env("ETCDCTL_API", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The last `lines` lines of a log file (or a note that it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            format!(
                "--- last {} lines of {} ---\n{}\n--- end of log ---",
                all.len() - start,
                path.display(),
                all[start..].join("\n")
            )
        }
        Err(e) => format!("(cannot read log {}: {e})", path.display()),
    }
}
