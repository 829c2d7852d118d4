//! Integration tests of the kubeshard router, focused on Watch and
//! concurrency: a server started in-process on SQLite (always), PostgreSQL
//! (`KUBESHARD_TEST_POSTGRES_URL`) and MySQL (`KUBESHARD_TEST_MYSQL_URL`),
//! driven through the etcd client. A missing variable skips that backend
//! loudly, or fails with `KUBESHARD_TEST_REQUIRE_ALL=1`
//! (`. scripts/dev-env.sh` sets all three).
//!
//! Every scenario is one async fn; the macros below run it on each backend as
//! `<scenario>::sqlite`, `<scenario>::postgres` and `<scenario>::mysql`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "integration/errors.rs"]
mod errors;
#[path = "integration/lifecycle.rs"]
mod lifecycle;
#[path = "integration/selectors.rs"]
mod selectors;
#[path = "integration/sharded.rs"]
mod sharded;
#[path = "integration/stopping.rs"]
mod stopping;
#[path = "integration/support.rs"]
mod support;
#[path = "integration/tls.rs"]
mod tls;
#[path = "integration/watch.rs"]
mod watch;

on_all_backends!(
    watch::thousand_watchers_one_stream,
    watch::watch_from_old_revision_replays_exact_history,
    watch::no_event_lost_or_repeated_under_racing_writes,
    watch::progress_request,
    watch::compacted_watch_is_canceled,
    lifecycle::lease_expiry_deletes_keys_and_emits_delete_events,
    lifecycle::restart_keeps_data_and_lease_deadlines,
    lifecycle::automatic_compaction_keeps_the_newest_revisions,
    errors::errors_match_etcd,
    sharded::writers_ranges_and_watches_across_shards,
    sharded::leases_compaction_and_idle_shards,
    sharded::two_routers_over_the_same_shards,
    sharded::long_history_beside_idle_shards,
    selectors::selectors_on_one_shard,
    selectors::selectors_across_shards,
    stopping::health_endpoints_answer_as_etcd,
    stopping::shutdown_under_write_load_keeps_every_acknowledged_write,
);

on_sqlite!(
    tls::mutual_tls_refuses_other_clients,
    tls::metrics_can_stay_plain,
    tls::rotated_certificates_need_no_restart,
    tls::bad_tls_files_stop_the_start,
    tls::unix_socket_serves_the_etcd_api,
);

on_postgres!(
    lifecycle::database_outage_is_unavailable_then_recovers,
    stopping::unreachable_database_fails_readiness,
);

/// TLS to databases that require it (scripts/test.sh sets them up).
mod database_requiring_tls {
    use crate::support::Backend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        crate::tls::database_requiring_tls(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql() {
        crate::tls::database_requiring_tls(Backend::Mysql).await;
    }
}
