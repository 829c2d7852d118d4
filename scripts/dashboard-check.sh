#!/usr/bin/env bash
# The Grafana dashboard against a live Prometheus (Debian's `prometheus`):
# two routers over SQLite, PostgreSQL and MariaDB shards under a short load,
# then every panel query must return a series with a finite value
# (tests/dashboard/check_dashboard.py). Needs the test databases
# (KUBESHARD_TEST_POSTGRES_URL, KUBESHARD_TEST_MYSQL_URL), etcdctl and
# target/debug/{kubeshard,kubeshard-bench}. About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
export KUBESHARD_BIN=${KUBESHARD_BIN:-$PWD/target/debug/kubeshard}
export BENCH_BIN=${BENCH_BIN:-$PWD/target/debug/kubeshard-bench}
export PROMETHEUS=${PROMETHEUS:-$(command -v prometheus || true)}
[[ -x $PROMETHEUS ]] || { echo "prometheus not found (apt-get install prometheus)" >&2; exit 1; }
exec timeout 600 python3 tests/dashboard/check_dashboard.py "$PWD/target/dashboard-check"
