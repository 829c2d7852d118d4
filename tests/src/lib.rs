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
pub mod freeze;
pub mod fuzz;
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

/// What a sharded kubeshard answers to a Txn whose keys live on several
/// shards (the one answer allowed to differ from etcd's).
pub const CROSS_SHARD_TXN: &str = "a transaction may not span shards";

/// Records the session against `reference` (a real etcd) and `subject`, then
/// asserts equal normalized transcripts. On a mismatch, panics with a line
/// diff, the subject's log tail, and where the full transcripts are.
/// Replaces, in both transcripts, each line where `actual` refused a Txn as
/// spanning shards (and the line of the same step in `expected`) by a
/// marker; returns the steps.
fn set_aside_cross_shard_txns(expected: &mut Transcript, actual: &mut Transcript) -> Vec<String> {
    let step_of = |line: &str| line.split(" | ").next().unwrap_or_default().to_string();
    let reference = expected.raw();
    let mut used = vec![false; reference.len()];
    let mut steps = Vec::new();
    for (i, line) in actual.raw().iter().enumerate() {
        if !line.contains(CROSS_SHARD_TXN) {
            continue;
        }
        let step = step_of(line);
        let twin = reference
            .iter()
            .enumerate()
            .position(|(j, l)| !used[j] && step_of(l) == step);
        if let Some(j) = twin {
            used[j] = true;
            expected.replace(j, "txn across shards (etcd's answer set aside)");
        }
        actual.replace(i, "txn across shards (etcd's answer set aside)");
        steps.push(step);
    }
    steps
}

pub async fn assert_differential(
    test: &str,
    reference: &dyn Server,
    subject: &dyn Server,
    tools: &EtcdTools,
    out_dir: &Path,
) {
    assert_differential_with(test, reference, subject, tools, out_dir, 0).await;
}

/// [`assert_differential`] for a sharded subject: a Txn step the subject
/// refused with [`CROSS_SHARD_TXN`] is taken out of both transcripts; there
/// must be exactly `cross_shard_txns` of them.
pub async fn assert_differential_with(
    test: &str,
    reference: &dyn Server,
    subject: &dyn Server,
    tools: &EtcdTools,
    out_dir: &Path,
    cross_shard_txns: usize,
) {
    let mut expected = record_session(reference, tools).await;
    let mut actual = record_session(subject, tools).await;
    let refused = set_aside_cross_shard_txns(&mut expected, &mut actual);
    assert_eq!(
        refused.len(),
        cross_shard_txns,
        "{test}: txn steps refused as spanning shards: {refused:?}"
    );
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
