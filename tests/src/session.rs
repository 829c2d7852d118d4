//! The scripted session: the same operations against any etcd-compatible
//! server, every result recorded into a [`Transcript`].
//!
//! Rules the script follows so that two correct servers give equal
//! normalized transcripts:
//! - revisions given as input (get at a revision, watch from a revision,
//!   compact) are taken from earlier responses of the same run;
//! - sorts never have ties in the sort target (etcd's sort is not stable);
//! - nothing is timed: waits are for an awaited event with a bound, and what is
//!   recorded is the fact (keys gone, events seen), never a duration;
//! - responses whose order etcd does not define (lease lists, a lease's keys)
//!   are sorted before recording; everything else is recorded as returned.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, GetResponse, KeyValue,
    LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions, ResponseHeader, SortOrder, SortTarget,
    Txn, TxnOp, TxnResponse, WatchFilterType, WatchOptions,
};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::format::{self, COMPACT_REV_KEY, header, record, rpc};
use crate::server::connect;
use crate::transcript::Transcript;
use crate::watcher::Watcher;

/// Bound on waiting for a lease to expire (its TTL is 2 s in etcd).
const EXPIRY_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on one etcdctl process.
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(30);
/// The lease ID the client chooses.
const EXPLICIT_LEASE: i64 = 0x1234;
/// A lease ID that is never granted.
const UNKNOWN_LEASE: i64 = 0x7777;
/// TTL of leases that must not expire during the session.
const LONG_TTL: i64 = 600;

/// Where and with what the session runs.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub etcdctl: PathBuf,
    /// A private directory for files the session's subprocesses write.
    pub scratch: PathBuf,
}

/// Bound on the whole session (etcd needs about 5 s): a server that hangs
/// still ends the test, with what was recorded so far.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the whole session against `target` and returns its transcript. If
/// the session does not finish within [`SESSION_TIMEOUT`], the transcript so
/// far ends with a `SESSION TIMEOUT` line.
pub async fn run(target: &Target) -> Transcript {
    let mut transcript = Transcript::new();
    let task = tokio::spawn(run_steps(target.clone(), transcript.clone()));
    let abort = task.abort_handle();
    match tokio::time::timeout(SESSION_TIMEOUT, task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(e)) => panic!("session task failed: {e}"),
        Err(_) => {
            abort.abort();
            transcript.push(
                "SESSION TIMEOUT",
                format!("the session did not finish within {SESSION_TIMEOUT:?}"),
            );
        }
    }
    transcript
}

async fn run_steps(target: Target, transcript: Transcript) {
    let client = connect(&target.endpoint)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", target.endpoint));
    let mut s = Session {
        c: client,
        t: transcript,
        target,
        revs: Revs::default(),
    };
    s.t.explicit_lease(EXPLICIT_LEASE);
    s.t.explicit_lease(UNKNOWN_LEASE);
    s.puts().await;
    s.gets().await;
    s.txns().await;
    s.deletes().await;
    s.leases().await;
    s.lease_expiry().await;
    s.watches().await;
    s.compaction().await;
    s.etcdctl_lock().await;
    s.maintenance().await;
}

/// Revisions taken from responses, used as input later.
#[derive(Debug, Default)]
struct Revs {
    /// After the first puts of the initial keys.
    initial: i64,
    /// The put of /registry/pods/ns1/b.
    pod_b: i64,
    /// After the Txn section.
    after_txns: i64,
    /// The last response before the first delete.
    before_delete: i64,
}

struct Session {
    c: Client,
    t: Transcript,
    target: Target,
    revs: Revs,
}

fn hdr_rev(h: Option<&ResponseHeader>) -> i64 {
    h.map(|h| h.revision()).unwrap_or(0)
}

fn kv_of<'a>(r: &'a Option<GetResponse>, key: &str) -> Option<&'a KeyValue> {
    r.as_ref()?.kvs().iter().find(|k| k.key() == key.as_bytes())
}

fn mod_of(r: &Option<GetResponse>, key: &str) -> i64 {
    kv_of(r, key).map(|k| k.mod_revision()).unwrap_or(0)
}

fn create_of(r: &Option<GetResponse>, key: &str) -> i64 {
    kv_of(r, key).map(|k| k.create_revision()).unwrap_or(0)
}

fn txn_rev(r: &Option<TxnResponse>) -> i64 {
    r.as_ref().map(|r| hdr_rev(r.header())).unwrap_or(0)
}

impl Session {
    // ------------------------------------------------------------ helpers ---

    async fn put(
        &mut self,
        step: &str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        opts: Option<PutOptions>,
    ) -> i64 {
        let r = rpc(self.c.put(key, value, opts)).await;
        record(&mut self.t, step, r, format::put)
            .map(|p| hdr_rev(p.header()))
            .unwrap_or(0)
    }

    async fn get(
        &mut self,
        step: &str,
        key: impl Into<Vec<u8>>,
        opts: Option<GetOptions>,
    ) -> Option<GetResponse> {
        let r = rpc(self.c.get(key, opts)).await;
        record(&mut self.t, step, r, format::get)
    }

    async fn delete(
        &mut self,
        step: &str,
        key: impl Into<Vec<u8>>,
        opts: Option<DeleteOptions>,
    ) -> i64 {
        let r = rpc(self.c.delete(key, opts)).await;
        record(&mut self.t, step, r, format::delete)
            .map(|d| hdr_rev(d.header()))
            .unwrap_or(0)
    }

    async fn txn(&mut self, step: &str, txn: Txn) -> Option<TxnResponse> {
        let r = rpc(self.c.txn(txn)).await;
        record(&mut self.t, step, r, format::txn)
    }

    async fn compact(&mut self, step: &str, revision: i64, physical: bool) {
        let opts = physical.then(|| etcd_client::CompactionOptions::new().with_physical());
        let r = rpc(self.c.compact(revision, opts)).await;
        record(&mut self.t, step, r, |_, c| header(c.header()));
    }

    /// The current revision, from a read-only Range (recorded).
    async fn current(&mut self, step: &str) -> i64 {
        self.get(step, "/registry/health", None)
            .await
            .map(|r| hdr_rev(r.header()))
            .unwrap_or(0)
    }

    // ------------------------------------------------------------- 1. put ---

    async fn puts(&mut self) {
        let initial = [
            ("/registry/pods/ns1/a", "pod-a-v1"),
            ("/registry/pods/ns1/b", "pod-b-v1"),
            ("/registry/pods/ns2/c", "pod-c-v1"),
            ("/registry/events/ns1/e1", "event-1"),
            ("/registry/events/ns1/e2", "event-2"),
            ("/registry/events/ns2/e3", "event-3"),
            ("/other/x", "x-v1"),
        ];
        for (k, v) in initial {
            let r = self.put(&format!("1 put {k}"), k, v, None).await;
            if k == "/registry/pods/ns1/b" {
                self.revs.pod_b = r;
            }
            self.revs.initial = r;
        }
        self.put(
            "1 overwrite a (version 2)",
            "/registry/pods/ns1/a",
            "pod-a-v2",
            None,
        )
        .await;
        self.put(
            "1 overwrite a with prev_kv (version 3)",
            "/registry/pods/ns1/a",
            "pod-a-v3",
            Some(PutOptions::new().with_prev_key()),
        )
        .await;
        self.put(
            "1 put new key with prev_kv",
            "/registry/pods/ns2/d",
            "pod-d-v1",
            Some(PutOptions::new().with_prev_key()),
        )
        .await;
        self.put(
            "1 put ignore_value on existing key, prev_kv",
            "/registry/pods/ns1/b",
            "",
            Some(PutOptions::new().with_ignore_value().with_prev_key()),
        )
        .await;
        self.get("1 get b after ignore_value", "/registry/pods/ns1/b", None)
            .await;
        self.put(
            "1 put ignore_value on missing key",
            "/registry/pods/ns9/missing",
            "",
            Some(PutOptions::new().with_ignore_value()),
        )
        .await;
        self.put(
            "1 put ignore_lease on missing key",
            "/registry/pods/ns9/missing",
            "v",
            Some(PutOptions::new().with_ignore_lease()),
        )
        .await;
        self.put(
            "1 put ignore_value with a value",
            "/registry/pods/ns1/b",
            "not-allowed",
            Some(PutOptions::new().with_ignore_value()),
        )
        .await;
        self.put(
            "1 put ignore_lease with a lease",
            "/registry/pods/ns1/b",
            "v",
            Some(
                PutOptions::new()
                    .with_ignore_lease()
                    .with_lease(UNKNOWN_LEASE),
            ),
        )
        .await;
        self.put("1 put empty key", "", "v", None).await;
        self.put(
            "1 put binary value",
            "/other/bin",
            vec![0u8, 255, 1, b'\n'],
            None,
        )
        .await;
        self.put("1 put empty value", "/other/empty", "", None)
            .await;
        self.put(
            "1 put non-utf8 key",
            vec![b'/', b'o', b't', 0xfe, 0x01],
            "k",
            None,
        )
        .await;
        let big: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        self.put("1 put 200 KiB value", "/other/big", big, None)
            .await;
        self.get("1 get 200 KiB value", "/other/big", None).await;
        let too_big = vec![b'x'; 1600 * 1024];
        self.put(
            "1 put 1.6 MiB value (too large)",
            "/other/huge",
            too_big,
            None,
        )
        .await;
    }

    // ------------------------------------------------------------- 2. get ---

    async fn gets(&mut self) {
        self.get("2 get single key", "/registry/pods/ns1/a", None)
            .await;
        self.get("2 get missing key", "/registry/pods/ns1/zzz", None)
            .await;
        self.get(
            "2 get range [ns1/a, ns2/c)",
            "/registry/pods/ns1/a",
            Some(GetOptions::new().with_range("/registry/pods/ns2/c")),
        )
        .await;
        self.get(
            "2 get prefix /registry/pods/",
            "/registry/pods/",
            Some(GetOptions::new().with_prefix()),
        )
        .await;
        self.get(
            "2 get from key /registry/events/",
            "/registry/events/",
            Some(GetOptions::new().with_from_key()),
        )
        .await;
        self.get(
            "2 get all keys",
            "",
            Some(GetOptions::new().with_all_keys()),
        )
        .await;
        for limit in [1, 2, 4, 5] {
            self.get(
                &format!("2 get prefix /registry/ limit {limit}"),
                "/registry/",
                Some(GetOptions::new().with_prefix().with_limit(limit)),
            )
            .await;
        }
        self.get(
            "2 get prefix count_only",
            "/registry/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await;
        self.get(
            "2 get prefix count_only limit 1",
            "/registry/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_count_only()
                    .with_limit(1),
            ),
        )
        .await;
        self.get(
            "2 get prefix keys_only",
            "/registry/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await;
        self.get(
            "2 get prefix keys_only limit 2",
            "/registry/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_limit(2),
            ),
        )
        .await;
        self.get(
            "2 get empty range [b, a)",
            "/registry/pods/ns1/b",
            Some(GetOptions::new().with_range("/registry/pods/ns1/a")),
        )
        .await;
        self.get("2 get empty key", "", None).await;

        // Sort fixture, designed so that every sort target gives a different,
        // tie-free order:
        //   key:     k1 k2 k3 k4
        //   create:  k3 k1 k4 k2
        //   mod:     k4 k1 k2 k3
        //   version: k4(1) k3(2) k2(3) k1(4)
        //   value:   k4(a) k2(b) k3(c) k1(d)
        for (k, v) in [
            ("/sort/k3", "v-c"),
            ("/sort/k1", "v-d"),
            ("/sort/k4", "v-a"),
            ("/sort/k2", "v-b"),
        ] {
            self.put(&format!("2 sort fixture create {k}"), k, v, None)
                .await;
        }
        for (k, v, n) in [
            ("/sort/k1", "v-d", 3),
            ("/sort/k2", "v-b", 2),
            ("/sort/k3", "v-c", 1),
        ] {
            for i in 0..n {
                self.put(&format!("2 sort fixture update {k} #{i}"), k, v, None)
                    .await;
            }
        }
        let fixture = self
            .get(
                "2 sort fixture",
                "/sort/",
                Some(GetOptions::new().with_prefix()),
            )
            .await;
        let targets = [
            ("KEY", SortTarget::Key),
            ("VERSION", SortTarget::Version),
            ("CREATE", SortTarget::Create),
            ("MOD", SortTarget::Mod),
            ("VALUE", SortTarget::Value),
        ];
        for (name, target) in targets {
            for (oname, order) in [
                ("ASCEND", SortOrder::Ascend),
                ("DESCEND", SortOrder::Descend),
            ] {
                // etcd-client sends KEY/ASCEND as "no sort" (the default order).
                self.get(
                    &format!("2 sort {name} {oname}"),
                    "/sort/",
                    Some(GetOptions::new().with_prefix().with_sort(target, order)),
                )
                .await;
            }
        }
        self.get(
            "2 sort CREATE DESCEND limit 2",
            "/sort/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Descend)
                    .with_limit(2),
            ),
        )
        .await;
        self.get(
            "2 sort VALUE ASCEND keys_only limit 3",
            "/sort/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Value, SortOrder::Ascend)
                    .with_keys_only()
                    .with_limit(3),
            ),
        )
        .await;
        let filters = [
            (
                "min_mod_revision = mod(k1)",
                GetOptions::new().with_min_mod_revision(mod_of(&fixture, "/sort/k1")),
            ),
            (
                "max_mod_revision = mod(k1)",
                GetOptions::new().with_max_mod_revision(mod_of(&fixture, "/sort/k1")),
            ),
            (
                "min_create_revision = create(k4)",
                GetOptions::new().with_min_create_revision(create_of(&fixture, "/sort/k4")),
            ),
            (
                "max_create_revision = create(k1)",
                GetOptions::new().with_max_create_revision(create_of(&fixture, "/sort/k1")),
            ),
        ];
        for (name, opts) in filters {
            self.get(
                &format!("2 filter {name}"),
                "/sort/",
                Some(opts.clone().with_prefix()),
            )
            .await;
            self.get(
                &format!("2 filter {name} limit 1"),
                "/sort/",
                Some(opts.with_prefix().with_limit(1)),
            )
            .await;
        }
        self.get(
            "2 filter min_mod_revision = mod(k2), max_mod_revision = mod(k2)",
            "/sort/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_min_mod_revision(mod_of(&fixture, "/sort/k2"))
                    .with_max_mod_revision(mod_of(&fixture, "/sort/k2")),
            ),
        )
        .await;

        let initial = self.revs.initial;
        self.get(
            "2 get a at the revision after the initial puts (version 1)",
            "/registry/pods/ns1/a",
            Some(GetOptions::new().with_revision(initial)),
        )
        .await;
        self.get(
            "2 get prefix /registry/ at the revision after the initial puts",
            "/registry/",
            Some(GetOptions::new().with_prefix().with_revision(initial)),
        )
        .await;
        self.get(
            "2 get b at the revision of its first put",
            "/registry/pods/ns1/b",
            Some(GetOptions::new().with_revision(self.revs.pod_b)),
        )
        .await;
        let now = self.current("2 current revision").await;
        self.get(
            "2 get a at the current revision",
            "/registry/pods/ns1/a",
            Some(GetOptions::new().with_revision(now)),
        )
        .await;
        self.get(
            "2 get a at current revision + 1 (future)",
            "/registry/pods/ns1/a",
            Some(GetOptions::new().with_revision(now + 1)),
        )
        .await;
        self.get(
            "2 serializable get prefix",
            "/registry/pods/",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await;
        self.get(
            "2 serializable get at the initial revision",
            "/registry/pods/ns1/a",
            Some(GetOptions::new().with_serializable().with_revision(initial)),
        )
        .await;
    }

    // ------------------------------------------------------------- 3. txn ---

    async fn txns(&mut self) {
        let k = "/registry/pods/ns3/t";
        // Kubernetes create: If mod_revision(k) == 0 Then Put(k).
        let create = || {
            Txn::new()
                .when([Compare::mod_revision(k, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(k, "t-v1", None)])
        };
        let created = self.txn("3 k8s create", create()).await;
        let rev1 = txn_rev(&created);
        self.txn("3 k8s create again (exists)", create()).await;
        // Kubernetes update: If mod_revision(k) == rev Then Put Else Range.
        let update = |rev: i64, value: &str| {
            Txn::new()
                .when([Compare::mod_revision(k, CompareOp::Equal, rev)])
                .and_then([TxnOp::put(k, value, None)])
                .or_else([TxnOp::get(k, None)])
        };
        let updated = self
            .txn("3 k8s update, current mod_revision", update(rev1, "t-v2"))
            .await;
        let rev2 = txn_rev(&updated);
        self.txn("3 k8s update, stale mod_revision", update(rev1, "t-v3"))
            .await;
        // Kubernetes delete: If mod_revision(k) == rev Then Delete Else Range.
        let delete = |rev: i64| {
            Txn::new()
                .when([Compare::mod_revision(k, CompareOp::Equal, rev)])
                .and_then([TxnOp::delete(k, None)])
                .or_else([TxnOp::get(k, None)])
        };
        self.txn("3 k8s delete, stale mod_revision", delete(rev1))
            .await;
        self.txn("3 k8s delete, current mod_revision", delete(rev2))
            .await;
        self.txn("3 k8s update of a deleted key", update(rev2, "t-v4"))
            .await;

        // Compares on each target with each operator; a is at version 3,
        // value "pod-a-v3".
        let a = "/registry/pods/ns1/a";
        let a_now = self.get("3 get a", a, None).await;
        let a_create = create_of(&a_now, a);
        let a_mod = mod_of(&a_now, a);
        let compares: Vec<(&str, Compare)> = vec![
            (
                "value == pod-a-v3",
                Compare::value(a, CompareOp::Equal, "pod-a-v3"),
            ),
            (
                "value == pod-a-v1",
                Compare::value(a, CompareOp::Equal, "pod-a-v1"),
            ),
            (
                "value != pod-a-v1",
                Compare::value(a, CompareOp::NotEqual, "pod-a-v1"),
            ),
            (
                "value > pod-a-v2",
                Compare::value(a, CompareOp::Greater, "pod-a-v2"),
            ),
            (
                "value > pod-a-v3",
                Compare::value(a, CompareOp::Greater, "pod-a-v3"),
            ),
            (
                "value < pod-a-v4",
                Compare::value(a, CompareOp::Less, "pod-a-v4"),
            ),
            ("value < pod-a", Compare::value(a, CompareOp::Less, "pod-a")),
            ("version == 3", Compare::version(a, CompareOp::Equal, 3)),
            ("version != 3", Compare::version(a, CompareOp::NotEqual, 3)),
            ("version > 2", Compare::version(a, CompareOp::Greater, 2)),
            ("version < 3", Compare::version(a, CompareOp::Less, 3)),
            (
                "create_revision == create(a)",
                Compare::create_revision(a, CompareOp::Equal, a_create),
            ),
            (
                "create_revision > create(a)",
                Compare::create_revision(a, CompareOp::Greater, a_create),
            ),
            (
                "create_revision < mod(a)",
                Compare::create_revision(a, CompareOp::Less, a_mod),
            ),
            (
                "mod_revision != mod(a)",
                Compare::mod_revision(a, CompareOp::NotEqual, a_mod),
            ),
            (
                "mod_revision > create(a)",
                Compare::mod_revision(a, CompareOp::Greater, a_create),
            ),
            ("lease == 0", Compare::lease(a, CompareOp::Equal, 0)),
            ("lease != 0", Compare::lease(a, CompareOp::NotEqual, 0)),
            (
                "missing key: value == \"\"",
                Compare::value("/registry/pods/nope", CompareOp::Equal, ""),
            ),
            (
                "missing key: version == 0",
                Compare::version("/registry/pods/nope", CompareOp::Equal, 0),
            ),
            (
                "missing key: create_revision == 0",
                Compare::create_revision("/registry/pods/nope", CompareOp::Equal, 0),
            ),
            (
                "missing key: lease == 0",
                Compare::lease("/registry/pods/nope", CompareOp::Equal, 0),
            ),
            (
                "prefix /registry/pods/: version > 0",
                Compare::version("/registry/pods/", CompareOp::Greater, 0).with_prefix(),
            ),
            (
                "prefix /registry/pods/: version > 1",
                Compare::version("/registry/pods/", CompareOp::Greater, 1).with_prefix(),
            ),
            (
                "prefix /registry/pods/: value != x",
                Compare::value("/registry/pods/", CompareOp::NotEqual, "x").with_prefix(),
            ),
            (
                "range [ns1/a, ns1/c): mod_revision < mod(a)+1",
                Compare::mod_revision(a, CompareOp::Less, a_mod + 1)
                    .with_range("/registry/pods/ns1/c"),
            ),
            (
                "empty prefix /registry/pods/nope/: version == 7",
                Compare::version("/registry/pods/nope/", CompareOp::Equal, 7).with_prefix(),
            ),
        ];
        // Every key of these txns lives under /registry/pods/, so they stay
        // inside one shard of the sharded runs' topology too.
        for (name, cmp) in compares {
            self.txn(
                &format!("3 compare {name}"),
                Txn::new()
                    .when([cmp])
                    .and_then([TxnOp::get("/registry/pods/ns2/c", None)])
                    .or_else([TxnOp::get(a, Some(GetOptions::new().with_keys_only()))]),
            )
            .await;
        }
        self.txn(
            "3 two compares, one false",
            Txn::new()
                .when([
                    Compare::version(a, CompareOp::Equal, 3),
                    Compare::value(a, CompareOp::Equal, "wrong"),
                ])
                .and_then([TxnOp::put("/txn/never", "x", None)])
                .or_else([TxnOp::get("/txn/never", None)]),
        )
        .await;

        // Keys of two shards in the sharded runs (pods and the default
        // shard): etcd answers, a sharded kubeshard refuses it by name.
        self.txn(
            "3 cross-shard txn reading pods and /other/x",
            Txn::new()
                .when([Compare::version(a, CompareOp::Greater, 0)])
                .and_then([TxnOp::get("/other/x", None)])
                .or_else([TxnOp::get(a, None)]),
        )
        .await;

        // A txn that reads its own writes.
        self.put("3 put /txn/gone", "/txn/gone", "to-be-deleted", None)
            .await;
        self.txn(
            "3 txn reads its own writes",
            Txn::new().and_then([
                TxnOp::get("/txn/row", None),
                TxnOp::put(
                    "/txn/row",
                    "row-v1",
                    Some(PutOptions::new().with_prev_key()),
                ),
                TxnOp::get("/txn/row", None),
                TxnOp::delete("/txn/gone", Some(DeleteOptions::new().with_prev_key())),
                TxnOp::get("/txn/", Some(GetOptions::new().with_prefix())),
            ]),
        )
        .await;
        // Nested txns.
        let inner_true = Txn::new()
            .when([Compare::value("/txn/row", CompareOp::Equal, "row-v1")])
            .and_then([
                TxnOp::put("/txn/nested-1", "n1", None),
                TxnOp::get("/txn/nested-1", None),
            ])
            .or_else([TxnOp::get("/txn/row", None)]);
        let inner_false = Txn::new()
            .when([Compare::value("/txn/row", CompareOp::Equal, "wrong")])
            .and_then([TxnOp::put("/txn/nested-x", "nx", None)])
            .or_else([TxnOp::get("/txn/row", None)]);
        self.txn(
            "3 nested txns",
            Txn::new()
                .when([Compare::version("/txn/row", CompareOp::Equal, 1)])
                .and_then([
                    TxnOp::txn(inner_true),
                    TxnOp::txn(inner_false),
                    TxnOp::put("/txn/nested-2", "n2", None),
                ]),
        )
        .await;
        self.txn(
            "3 nested txn with a duplicate key across levels",
            Txn::new().and_then([
                TxnOp::put("/txn/dup", "a", None),
                TxnOp::txn(Txn::new().and_then([TxnOp::put("/txn/dup", "b", None)])),
            ]),
        )
        .await;

        // Limits and duplicates.
        let many_puts: Vec<TxnOp> = (0..129)
            .map(|i| TxnOp::put(format!("/many/{i:03}"), "v", None))
            .collect();
        self.txn("3 txn with 129 puts", Txn::new().and_then(many_puts))
            .await;
        let many_gets: Vec<TxnOp> = (0..128).map(|_| TxnOp::get("/other/x", None)).collect();
        self.txn("3 txn with 128 gets", Txn::new().and_then(many_gets))
            .await;
        self.txn(
            "3 txn with a duplicate put",
            Txn::new().and_then([
                TxnOp::put("/txn/dup", "a", None),
                TxnOp::put("/txn/dup", "b", None),
            ]),
        )
        .await;
        self.txn(
            "3 txn with put and delete of one key",
            Txn::new().and_then([
                TxnOp::put("/txn/dup", "a", None),
                TxnOp::delete("/txn/dup", None),
            ]),
        )
        .await;
        self.txn(
            "3 txn with put inside a deleted prefix",
            Txn::new().and_then([
                TxnOp::delete("/txn/", Some(DeleteOptions::new().with_prefix())),
                TxnOp::put("/txn/row", "b", None),
            ]),
        )
        .await;
        self.txn(
            "3 txn with the same key in then and else",
            Txn::new()
                .when([Compare::version("/txn/dup", CompareOp::Equal, 0)])
                .and_then([TxnOp::put("/txn/dup", "then", None)])
                .or_else([TxnOp::put("/txn/dup", "else", None)]),
        )
        .await;
        self.txn(
            "3 txn put with empty key",
            Txn::new().and_then([TxnOp::put("", "v", None)]),
        )
        .await;
        self.txn(
            "3 txn get at a future revision",
            Txn::new().and_then([TxnOp::get(
                "/other/x",
                Some(GetOptions::new().with_revision(rev2 + 1_000_000)),
            )]),
        )
        .await;
        self.current("3 revision before read-only txns").await;
        self.txn(
            "3 read-only txn (revision must not move)",
            Txn::new()
                .when([Compare::version("/other/x", CompareOp::Greater, 0)])
                .and_then([
                    TxnOp::get("/other/x", None),
                    TxnOp::get(
                        "/registry/",
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    ),
                ]),
        )
        .await;
        self.txn("3 empty txn", Txn::new()).await;
        self.txn(
            "3 txn deleting a missing key",
            Txn::new().and_then([TxnOp::delete("/txn/missing", None)]),
        )
        .await;
        self.revs.after_txns = self.current("3 revision after txns").await;
    }

    // ---------------------------------------------------------- 4. delete ---

    async fn deletes(&mut self) {
        self.revs.before_delete = self.current("4 revision before deletes").await;
        self.delete(
            "4 delete single key with prev_kv",
            "/registry/pods/ns2/d",
            Some(DeleteOptions::new().with_prev_key()),
        )
        .await;
        self.delete(
            "4 delete range [e1, e2)",
            "/registry/events/ns1/e1",
            Some(DeleteOptions::new().with_range("/registry/events/ns1/e2")),
        )
        .await;
        self.delete(
            "4 delete prefix /registry/events/ with prev_kv",
            "/registry/events/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await;
        self.delete("4 delete missing key", "/registry/pods/ns2/d", None)
            .await;
        self.delete(
            "4 delete missing prefix",
            "/nothing/",
            Some(DeleteOptions::new().with_prefix()),
        )
        .await;
        self.delete("4 delete empty key", "", None).await;
        self.current("4 revision after deletes").await;
        self.get("4 get deleted key now", "/registry/pods/ns2/d", None)
            .await;
        self.get(
            "4 get deleted key at the revision before the delete",
            "/registry/pods/ns2/d",
            Some(GetOptions::new().with_revision(self.revs.before_delete)),
        )
        .await;
        self.get(
            "4 get deleted prefix at the revision before the deletes",
            "/registry/events/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_revision(self.revs.before_delete),
            ),
        )
        .await;
        self.get(
            "4 count /registry/ now",
            "/registry/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await;
    }

    // ----------------------------------------------------------- 5. lease ---

    async fn grant(&mut self, step: &str, ttl: i64, opts: Option<LeaseGrantOptions>) -> i64 {
        let r = rpc(self.c.lease_grant(ttl, opts)).await;
        record(&mut self.t, step, r, |t, g| {
            format!(
                "{} id={} ttl={} error={:?}",
                header(g.header()),
                t.lease(g.id()),
                g.ttl(),
                g.error()
            )
        })
        .map(|g| g.id())
        .unwrap_or(0)
    }

    async fn time_to_live(&mut self, step: &str, id: i64, keys: bool, granted: i64) {
        let opts = keys.then_some(LeaseTimeToLiveOptions::new().with_keys());
        let r = rpc(self.c.lease_time_to_live(id, opts)).await;
        record(&mut self.t, step, r, |t, r| {
            let mut ks: Vec<String> = r.keys().iter().map(|k| format::bytes(k)).collect();
            ks.sort();
            let ttl = if r.ttl() == -1 {
                "-1".to_string()
            } else {
                format!(
                    "in[granted-2,granted]={}",
                    (granted - 2..=granted).contains(&r.ttl())
                )
            };
            format!(
                "{} id={} ttl {} granted_ttl={} keys(sorted)=[{}]",
                header(r.header()),
                t.lease(r.id()),
                ttl,
                r.granted_ttl(),
                ks.join(", ")
            )
        });
    }

    async fn revoke(&mut self, step: &str, id: i64) {
        let r = rpc(self.c.lease_revoke(id)).await;
        record(&mut self.t, step, r, |_, r| header(r.header()));
    }

    async fn leases(&mut self) {
        let l1 = self
            .grant("5 grant ttl 600 (server-chosen id)", LONG_TTL, None)
            .await;
        let explicit = self
            .grant(
                "5 grant ttl 600 with id 0x1234",
                LONG_TTL,
                Some(LeaseGrantOptions::new().with_id(EXPLICIT_LEASE)),
            )
            .await;
        self.grant(
            "5 grant duplicate id 0x1234",
            LONG_TTL,
            Some(LeaseGrantOptions::new().with_id(EXPLICIT_LEASE)),
        )
        .await;
        let l2 = self
            .grant("5 grant ttl 600 (second server-chosen id)", LONG_TTL, None)
            .await;

        let with = |id| Some(PutOptions::new().with_lease(id));
        self.put("5 put k1 with L1", "/lease/k1", "k1-v1", with(l1))
            .await;
        self.put("5 put k2 with L1", "/lease/k2", "k2-v1", with(l1))
            .await;
        self.put("5 put k3 with 0x1234", "/lease/k3", "k3-v1", with(explicit))
            .await;
        self.put("5 put k4 with L2", "/lease/k4", "k4-v1", with(l2))
            .await;
        self.put(
            "5 put with unknown lease",
            "/lease/bad",
            "v",
            with(UNKNOWN_LEASE),
        )
        .await;
        self.put(
            "5 put k1 ignore_lease (lease kept)",
            "/lease/k1",
            "k1-v2",
            Some(PutOptions::new().with_ignore_lease().with_prev_key()),
        )
        .await;
        self.put(
            "5 put k4 ignore_value with lease 0x1234 (value kept, lease moved)",
            "/lease/k4",
            "",
            Some(
                PutOptions::new()
                    .with_ignore_value()
                    .with_lease(explicit)
                    .with_prev_key(),
            ),
        )
        .await;
        self.put(
            "5 put k4 without lease (detaches)",
            "/lease/k4",
            "k4-v2",
            Some(PutOptions::new().with_prev_key()),
        )
        .await;
        self.get(
            "5 get /lease/",
            "/lease/",
            Some(GetOptions::new().with_prefix()),
        )
        .await;
        self.txn(
            "5 compare lease(k1) == L1",
            Txn::new()
                .when([Compare::lease("/lease/k1", CompareOp::Equal, l1)])
                .and_then([TxnOp::get("/lease/k1", None)]),
        )
        .await;
        self.txn(
            "5 compare lease(k3) == L1",
            Txn::new()
                .when([Compare::lease("/lease/k3", CompareOp::Equal, l1)])
                .and_then([TxnOp::get("/lease/k3", None)]),
        )
        .await;
        self.txn(
            "5 txn put with unknown lease",
            Txn::new().and_then([TxnOp::put(
                "/lease/bad",
                "v",
                Some(PutOptions::new().with_lease(UNKNOWN_LEASE)),
            )]),
        )
        .await;

        self.time_to_live("5 ttl L1 with keys", l1, true, LONG_TTL)
            .await;
        self.time_to_live("5 ttl L1 without keys", l1, false, LONG_TTL)
            .await;
        self.time_to_live("5 ttl 0x1234 with keys", explicit, true, LONG_TTL)
            .await;
        self.time_to_live("5 ttl L2 with keys (none left)", l2, true, LONG_TTL)
            .await;
        self.time_to_live("5 ttl unknown lease", UNKNOWN_LEASE, true, LONG_TTL)
            .await;

        let r = rpc(self.c.leases()).await;
        record(&mut self.t, "5 leases list (sorted)", r, |t, r| {
            let mut ids: Vec<String> = r.leases().iter().map(|l| t.lease(l.id())).collect();
            ids.sort();
            format!("{} leases=[{}]", header(r.header()), ids.join(", "))
        });

        // KeepAlive once: etcd-client consumes the first response itself (and
        // fails if its TTL is not positive), so send one more and record it.
        let ka = async {
            let (mut keeper, mut stream) = self.c.lease_keep_alive(l1).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        let r = rpc(ka).await;
        record(&mut self.t, "5 keepalive L1", r, |t, r| match r {
            Some(r) => format!(
                "{} id={} ttl==granted={} ttl in[granted-2,granted]={}",
                header(r.header()),
                t.lease(r.id()),
                r.ttl() == LONG_TTL,
                (LONG_TTL - 2..=LONG_TTL).contains(&r.ttl())
            ),
            None => "stream ended".to_string(),
        });
        let r = rpc(async { self.c.lease_keep_alive(UNKNOWN_LEASE).await.map(|_| ()) }).await;
        record(&mut self.t, "5 keepalive unknown lease", r, |_, _| {
            "ok".into()
        });

        self.revoke("5 revoke L1", l1).await;
        self.get(
            "5 get /lease/ after revoke",
            "/lease/",
            Some(GetOptions::new().with_prefix()),
        )
        .await;
        self.time_to_live("5 ttl L1 after revoke", l1, true, LONG_TTL)
            .await;
        self.revoke("5 revoke L1 again", l1).await;
        self.revoke("5 revoke unknown lease", UNKNOWN_LEASE).await;
        self.revoke("5 revoke 0x1234", explicit).await;
        self.revoke("5 revoke L2 (no keys)", l2).await;
        self.get(
            "5 get /lease/ after all revokes",
            "/lease/",
            Some(GetOptions::new().with_prefix()),
        )
        .await;
        let r = rpc(self.c.leases()).await;
        record(&mut self.t, "5 leases list after revokes", r, |t, r| {
            let mut ids: Vec<String> = r.leases().iter().map(|l| t.lease(l.id())).collect();
            ids.sort();
            format!("{} leases=[{}]", header(r.header()), ids.join(", "))
        });
    }

    async fn lease_expiry(&mut self) {
        // TTL 1 is below etcd's minimum; the granted TTL is recorded.
        let id = self
            .grant("5x grant ttl 1 (below the minimum)", 1, None)
            .await;
        let with = Some(PutOptions::new().with_lease(id));
        self.put("5x put /expire/a with it", "/expire/a", "a", with.clone())
            .await;
        self.put("5x put /expire/b with it", "/expire/b", "b", with)
            .await;
        self.put("5x put /expire/c without lease", "/expire/c", "c", None)
            .await;
        let opened = Watcher::open(
            &mut self.c,
            &mut self.t,
            "/expire/",
            WatchOptions::new().with_prefix().with_prev_key(),
            false,
        )
        .await;
        let (mut w, wid) = match opened {
            Ok(x) => x,
            Err(e) => {
                self.t.push("5x watch /expire/", e);
                return;
            }
        };
        let deletes = |w: &Watcher| {
            w.seen()
                .iter()
                .filter(|s| s.watch_id == wid && s.kind == EventType::Delete)
                .count()
        };
        let expired = w
            .pump_until(&mut self.t, EXPIRY_TIMEOUT, |w| deletes(w) >= 2)
            .await;
        self.t.push(
            "5x lease expired and watch saw 2 DELETE events",
            format!("{expired}"),
        );
        w.flush(&mut self.t, "5x watch /expire/");
        self.get(
            "5x get /expire/ after expiry",
            "/expire/",
            Some(GetOptions::new().with_prefix()),
        )
        .await;
        self.time_to_live("5x ttl of the expired lease", id, true, 2)
            .await;
    }

    // ----------------------------------------------------------- 6. watch ---

    async fn watches(&mut self) {
        let from = self.revs.pod_b + 1;
        let step = "6 watch stream 1";
        let opened = Watcher::open(
            &mut self.c,
            &mut self.t,
            "/registry/pods/",
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(from)
                .with_prev_key(),
            false,
        )
        .await;
        let (mut w, history) = match opened {
            Ok(x) => x,
            Err(e) => {
                self.t.push(step, format!("open: {e}"));
                return;
            }
        };
        let t = &mut self.t;
        let live = w
            .create(t, "/watch/", WatchOptions::new().with_prefix(), false)
            .await;
        let noput = w
            .create(
                t,
                "/watch/",
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_filters([WatchFilterType::NoPut]),
                false,
            )
            .await;
        let nodelete = w
            .create(
                t,
                "/watch/",
                WatchOptions::new()
                    .with_prefix()
                    .with_filters([WatchFilterType::NoDelete]),
                false,
            )
            .await;
        let single = w
            .create(t, "/watch/k1", WatchOptions::new().with_prev_key(), true)
            .await;
        // The whole registry from the first puts on: pods, events and
        // other keys, which live on three shards in the sharded runs.
        let registry = w
            .create(
                t,
                "/registry/",
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(self.revs.initial)
                    .with_prev_key(),
                false,
            )
            .await;
        // kube-apiserver style: list, then watch from the list's revision + 1.
        let list = self
            .get(
                "6 list /registry/pods/",
                "/registry/pods/",
                Some(GetOptions::new().with_prefix()),
            )
            .await;
        let list_rev = list.as_ref().map(|l| hdr_rev(l.header())).unwrap_or(0);
        let t = &mut self.t;
        let after_list = w
            .create(
                t,
                "/registry/pods/",
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(list_rev + 1)
                    .with_prev_key(),
                true,
            )
            .await;
        let ids = [
            ("live", &live),
            ("noput", &noput),
            ("nodelete", &nodelete),
            ("single", &single),
            ("after_list", &after_list),
            ("registry", &registry),
        ];
        for (name, id) in ids {
            if let Err(e) = id {
                self.t.push(step, format!("create {name}: {e}"));
            }
        }
        let (live, noput, nodelete, single, after_list, registry) = (
            live.unwrap_or(-100),
            noput.unwrap_or(-101),
            nodelete.unwrap_or(-102),
            single.unwrap_or(-103),
            after_list.unwrap_or(-104),
            registry.unwrap_or(-105),
        );
        // Not flushed yet: the history watch's replay may arrive at any point
        // while the other watches are created; everything up to the
        // sentinels is recorded together, per watch.

        self.put("6 put /watch/k1", "/watch/k1", "w1-v1", None)
            .await;
        self.put("6 put /watch/k2", "/watch/k2", "w2-v1", None)
            .await;
        self.put("6 put /watch/k1 again", "/watch/k1", "w1-v2", None)
            .await;
        let k1_deleted = self.delete("6 delete /watch/k1", "/watch/k1", None).await;
        self.txn(
            "6 txn: put /watch/k3, delete /watch/k2, put /watch/k4",
            Txn::new().and_then([
                TxnOp::put("/watch/k3", "w3-v1", None),
                TxnOp::delete("/watch/k2", None),
                TxnOp::put("/watch/k4", "w4-v1", None),
            ]),
        )
        .await;
        self.delete(
            "6 delete prefix /watch/",
            "/watch/",
            Some(DeleteOptions::new().with_prefix()),
        )
        .await;
        let sentinel_put = self
            .put("6 put /watch/zz-sentinel", "/watch/zz-sentinel", "s", None)
            .await;
        let sentinel_del = self
            .delete("6 delete /watch/zz-sentinel", "/watch/zz-sentinel", None)
            .await;
        let pods_sentinel = self
            .put(
                "6 put /registry/pods/zz-sentinel",
                "/registry/pods/zz-sentinel",
                "s",
                None,
            )
            .await;
        let all_seen = w
            .pump_until(&mut self.t, format::RPC_TIMEOUT, |w| {
                w.saw(history, EventType::Put, pods_sentinel)
                    && w.saw(after_list, EventType::Put, pods_sentinel)
                    && w.saw(registry, EventType::Put, pods_sentinel)
                    && w.saw(live, EventType::Delete, sentinel_del)
                    && w.saw(noput, EventType::Delete, sentinel_del)
                    && w.saw(nodelete, EventType::Put, sentinel_put)
                    && w.saw(single, EventType::Delete, k1_deleted)
            })
            .await;
        self.t.push(
            "6 all watches reached their sentinels",
            format!("{all_seen}"),
        );
        w.flush(&mut self.t, "6 events");

        let progressed = w.request_progress(&mut self.t).await;
        self.t
            .push("6 progress response arrived", format!("{progressed}"));
        w.flush(&mut self.t, "6 progress");

        let canceled = w.cancel(&mut self.t, live).await;
        self.t
            .push("6 cancel of the live watch answered", format!("{canceled}"));
        w.flush(&mut self.t, "6 cancel");
        let after_cancel = self
            .put(
                "6 put /watch/after-cancel",
                "/watch/after-cancel",
                "x",
                None,
            )
            .await;
        let seen = w
            .pump_until(&mut self.t, format::RPC_TIMEOUT, |w| {
                w.saw(nodelete, EventType::Put, after_cancel)
            })
            .await;
        self.t.push(
            "6 nodelete watch saw the put after cancel",
            format!("{seen}"),
        );
        self.t.push(
            "6 canceled watch is still canceled",
            format!("{}", w.is_canceled(live)),
        );
        // A progress response promises that everything at or below its
        // revision was delivered: anything sent to the canceled watch (or to
        // a watch filtering it out) shows up before it.
        let progressed = w.request_progress(&mut self.t).await;
        self.t.push(
            "6 second progress response arrived",
            format!("{progressed}"),
        );
        w.flush(&mut self.t, "6 after cancel");
    }

    // ------------------------------------------------------ 7. compaction ---

    async fn compaction(&mut self) {
        let compact_at = self.revs.after_txns;
        let old = self.revs.initial;
        // kube-apiserver's compaction: If version(compact_rev_key) == n Then
        // Put(compact_rev_key, rev) Else Range(compact_rev_key), then Compact.
        let kube_txn = |version: i64, rev: i64| {
            Txn::new()
                .when([Compare::version(COMPACT_REV_KEY, CompareOp::Equal, version)])
                .and_then([TxnOp::put(COMPACT_REV_KEY, rev.to_string(), None)])
                .or_else([TxnOp::get(COMPACT_REV_KEY, None)])
        };
        self.txn("7 kube compaction txn, version 0", kube_txn(0, compact_at))
            .await;
        self.txn(
            "7 kube compaction txn, stale version 0",
            kube_txn(0, compact_at),
        )
        .await;
        self.compact("7 compact at the revision after txns", compact_at, false)
            .await;
        self.get(
            "7 get a below the compaction",
            "/registry/pods/ns1/a",
            Some(GetOptions::new().with_revision(old)),
        )
        .await;
        self.get(
            "7 get prefix at exactly the compaction revision",
            "/registry/pods/",
            Some(GetOptions::new().with_prefix().with_revision(compact_at)),
        )
        .await;
        self.get(
            "7 serializable get below the compaction",
            "/registry/pods/ns1/a",
            Some(GetOptions::new().with_serializable().with_revision(old)),
        )
        .await;
        self.txn(
            "7 txn range below the compaction",
            Txn::new().and_then([TxnOp::get(
                "/registry/pods/ns1/a",
                Some(GetOptions::new().with_revision(old)),
            )]),
        )
        .await;

        // A watch from below the compaction is created, then canceled with
        // compact_revision; one from exactly the compaction revision works.
        let step = "7 watch below the compaction";
        match Watcher::open(
            &mut self.c,
            &mut self.t,
            "/registry/pods/",
            WatchOptions::new().with_prefix().with_start_revision(old),
            false,
        )
        .await
        {
            Ok((mut w, id)) => {
                let canceled = w
                    .pump_until(&mut self.t, format::RPC_TIMEOUT, |w| w.is_canceled(id))
                    .await;
                self.t.push(
                    "7 watch below the compaction was canceled",
                    format!("{canceled}"),
                );
                w.flush(&mut self.t, step);
            }
            Err(e) => self.t.push(step, format!("open: {e}")),
        }
        let step = "7 watch from the compaction revision";
        match Watcher::open(
            &mut self.c,
            &mut self.t,
            "/registry/pods/",
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(compact_at)
                .with_prev_key(),
            false,
        )
        .await
        {
            Ok((mut w, id)) => {
                let sentinel = self
                    .put(
                        "7 put /registry/pods/zz-sentinel2",
                        "/registry/pods/zz-sentinel2",
                        "s",
                        None,
                    )
                    .await;
                let seen = w
                    .pump_until(&mut self.t, format::RPC_TIMEOUT, |w| {
                        w.saw(id, EventType::Put, sentinel) || w.is_canceled(id)
                    })
                    .await;
                self.t.push(
                    "7 watch from the compaction revision reached the sentinel",
                    format!("{seen}"),
                );
                w.flush(&mut self.t, step);
            }
            Err(e) => self.t.push(step, format!("open: {e}")),
        }

        self.compact("7 compact again at the same revision", compact_at, false)
            .await;
        self.compact("7 compact at a lower revision", old, false)
            .await;
        let now = self.current("7 current revision").await;
        self.compact(
            "7 compact at current revision + 100 (future)",
            now + 100,
            false,
        )
        .await;
        self.compact("7 compact at current revision + 1 (future)", now + 1, false)
            .await;
        self.txn("7 kube compaction txn, version 1", kube_txn(1, now))
            .await;
        self.get("7 get compact_rev_key", COMPACT_REV_KEY, None)
            .await;
        self.compact("7 physical compact at the current revision", now, true)
            .await;
        self.get(
            "7 get at the new compaction revision",
            "/registry/pods/",
            Some(GetOptions::new().with_prefix().with_revision(now)),
        )
        .await;
        self.get(
            "7 get at the old compaction revision",
            "/registry/pods/",
            Some(GetOptions::new().with_prefix().with_revision(compact_at)),
        )
        .await;
        self.get(
            "7 get all keys after compaction",
            "",
            Some(GetOptions::new().with_all_keys().with_keys_only()),
        )
        .await;
    }

    // ------------------------------------------------------- 8. etcdctl ---

    fn etcdctl(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.target.etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.target.endpoint))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    async fn run_etcdctl(&mut self, step: &str, args: &[&str]) {
        let out = tokio::time::timeout(ETCDCTL_TIMEOUT, self.etcdctl(args).output()).await;
        match out {
            Ok(Ok(out)) => {
                self.t.push(
                    step,
                    format!(
                        "exit={:?} stdout={:?}",
                        out.status.code(),
                        String::from_utf8_lossy(&out.stdout)
                    ),
                );
                if !out.stderr.is_empty() {
                    self.t.note(
                        step,
                        format!("stderr={:?}", String::from_utf8_lossy(&out.stderr)),
                    );
                }
            }
            Ok(Err(e)) => self.t.push(step, format!("cannot run etcdctl: {e}")),
            Err(_) => self
                .t
                .push(step, format!("TIMEOUT after {ETCDCTL_TIMEOUT:?}")),
        }
    }

    async fn etcdctl_lock(&mut self) {
        self.run_etcdctl(
            "8 etcdctl lock mylock -- echo held",
            &["lock", "mylock", "--", "echo", "held"],
        )
        .await;
        self.get(
            "8 lock keys after release",
            "mylock/",
            Some(GetOptions::new().with_prefix()),
        )
        .await;

        // Contention: A holds the lock for 2 s and marks a file while holding
        // it; B is started while A holds it and prints the mark when it gets
        // the lock, so B prints "released" only if it waited for A.
        let mark = self.target.scratch.join("lock-mark");
        let mark_s = mark.display().to_string();
        let _ = std::fs::remove_file(&mark);
        let script_a = format!(
            "echo holding > '{mark_s}'; echo A-start; sleep 2; echo released > '{mark_s}'; echo A-end"
        );
        let script_b = format!("echo B-got-lock; cat '{mark_s}'");
        let result = self.contended_lock(&script_a, &script_b).await;
        match result {
            Ok(lines) => {
                for l in lines {
                    self.t.push("8 contended lock", l);
                }
            }
            Err(e) => self.t.push("8 contended lock", e),
        }
        self.get(
            "8 lock keys after contention",
            "mylock/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await;
    }

    async fn contended_lock(
        &mut self,
        script_a: &str,
        script_b: &str,
    ) -> Result<Vec<String>, String> {
        let mut a = self
            .etcdctl(&["lock", "mylock", "--", "sh", "-c", script_a])
            .spawn()
            .map_err(|e| format!("cannot run etcdctl: {e}"))?;
        let a_out = a.stdout.take().ok_or("no stdout of A")?;
        let a_err = a.stderr.take().ok_or("no stderr of A")?;
        let a_stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut BufReader::new(a_err), &mut text)
                .await;
            text
        });
        let mut a_lines = BufReader::new(a_out).lines();
        let mut recorded = Vec::new();
        // Wait (bounded) until A holds the lock.
        let first = tokio::time::timeout(ETCDCTL_TIMEOUT, a_lines.next_line()).await;
        match first {
            Ok(Ok(Some(line))) => recorded.push(format!("A stdout: {line}")),
            other => {
                let _ = a.kill().await;
                let stderr = a_stderr.await.unwrap_or_default();
                return Err(format!(
                    "A did not report holding the lock: {other:?}; A stderr={stderr:?}"
                ));
            }
        }
        let b = self
            .etcdctl(&["lock", "mylock", "--", "sh", "-c", script_b])
            .spawn()
            .map_err(|e| format!("cannot run etcdctl: {e}"))?;
        let rest_a = async {
            let mut lines = Vec::new();
            while let Ok(Some(l)) = a_lines.next_line().await {
                lines.push(l);
            }
            let status = a.wait().await;
            (lines, status)
        };
        let both = tokio::time::timeout(ETCDCTL_TIMEOUT, async {
            tokio::join!(rest_a, b.wait_with_output())
        })
        .await
        .map_err(|_| format!("TIMEOUT: A and B did not finish within {ETCDCTL_TIMEOUT:?}"))?;
        let ((a_rest, a_status), b_out) = both;
        for l in a_rest {
            recorded.push(format!("A stdout: {l}"));
        }
        recorded.push(format!(
            "A exit={:?}",
            a_status.map(|s| s.code()).map_err(|e| e.to_string())
        ));
        let stderr = a_stderr.await.unwrap_or_default();
        if !stderr.is_empty() {
            self.t
                .note("8 contended lock", format!("A stderr={stderr:?}"));
        }
        match b_out {
            Ok(out) => {
                recorded.push(format!(
                    "B exit={:?} stdout={:?}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout)
                ));
                if !out.stderr.is_empty() {
                    self.t.note(
                        "8 contended lock",
                        format!("B stderr={:?}", String::from_utf8_lossy(&out.stderr)),
                    );
                }
            }
            Err(e) => recorded.push(format!("B failed: {e}")),
        }
        Ok(recorded)
    }

    // --------------------------------------------------- 9. maintenance ---

    async fn maintenance(&mut self) {
        let r = rpc(self.c.status()).await;
        record(&mut self.t, "9 status", r, |t, s| {
            t.note("9 status", format!("version={:?}", s.version()));
            let parts: Vec<u64> = s
                .version()
                .split('.')
                .take(2)
                .filter_map(|p| p.parse().ok())
                .collect();
            let at_least_3_4 = parts.len() == 2 && (parts[0], parts[1]) >= (3, 4);
            format!("ok version>=3.4={at_least_3_4}")
        });
        let r = rpc(self.c.member_list()).await;
        record(&mut self.t, "9 member list", r, |_, m| {
            let members = m.members();
            format!(
                "members={} first_has_client_url={}",
                members.len(),
                members
                    .first()
                    .is_some_and(|m| m.client_urls().iter().any(|u| !u.is_empty()))
            )
        });
    }
}
