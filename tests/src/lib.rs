//! Harness for black-box tests of the kubeshard binary.
//!
//! The differential test runs one scripted session ([`session::run`]) against
//! a real etcd and against kubeshard on a backend, and asserts that the
//! normalized transcripts ([`transcript::Transcript`]) are identical.

// This crate is test support code only (never shipped): failing loudly on a
// broken test environment is the desired behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod env;
pub mod format;
pub mod server;
pub mod session;
pub mod transcript;
pub mod watcher;

use std::path::Path;

use crate::env::EtcdTools;
use crate::server::Server;
use crate::session::Target;
use crate::transcript::Transcript;

/// Runs the scripted session against one server, in a fresh scratch directory.
pub async fn record_session(server: &dyn Server, tools: &EtcdTools) -> Transcript {
    let scratch = tempfile::Builder::new()
        .prefix("kubeshard-session-")
        .tempdir()
        .expect("create a scratch directory for the session");
    let target = Target {
        endpoint: server.endpoint(),
        etcdctl: tools.etcdctl.clone(),
        scratch: scratch.path().to_path_buf(),
    };
    let started = std::time::Instant::now();
    let t = session::run(&target).await;
    eprintln!(
        "recorded {} transcript lines from {} in {:.1?}",
        t.len(),
        server.describe(),
        started.elapsed()
    );
    t
}

/// Records the session against `reference` (a real etcd) and `subject`, then
/// asserts equal normalized transcripts. On a mismatch, panics with a line
/// diff, the subject's log tail, and where the full transcripts are.
pub async fn assert_differential(
    test: &str,
    reference: &dyn Server,
    subject: &dyn Server,
    tools: &EtcdTools,
    out_dir: &Path,
) {
    let expected = record_session(reference, tools).await;
    let actual = record_session(subject, tools).await;
    let out_dir = out_dir.join("differential").join(test);
    match transcript::compare("expected", &expected, "actual", &actual, &out_dir) {
        Ok(()) => eprintln!(
            "{test}: {} normalized transcript lines identical ({} vs {}); transcripts in {}",
            expected.len(),
            reference.describe(),
            subject.describe(),
            out_dir.display()
        ),
        Err(report) => panic!(
            "{test}: {} (expected) and {} (actual) answered differently\n{report}\nlog of {}:\n{}",
            reference.describe(),
            subject.describe(),
            subject.describe(),
            subject.log_tail()
        ),
    }
}
