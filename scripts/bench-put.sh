#!/usr/bin/env bash
# Benchmark (not a test): closed-loop puts with kubeshard-bench against real
# etcd, kubeshard on SQLite and kubeshard on PostgreSQL, one after the other
# in the same run, written to docs/benchmarks-put.md. Every client sends its
# next put as soon as the previous one is answered: throughput at saturation.
# Usage: scripts/bench-put.sh [seconds] (default 15). Needs what
# scripts/bench-check-perf.sh needs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
clients=${CLIENTS:-500}
conns=${CONNS:-50}
export ETCDCTL_API=3
: "${KUBESHARD_TEST_POSTGRES_URL:=postgres://kubeshard:kubeshard@127.0.0.1:5432/postgres}"
ETCD_BIN=${ETCD_BIN:-$(command -v etcd)}
ETCDCTL_BIN=${ETCDCTL_BIN:-$(command -v etcdctl)}
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== building kubeshard and kubeshard-bench (release)" >&2
cargo build --release --locked --bin kubeshard --bin kubeshard-bench >&2
bench=target/release/kubeshard-bench

wait_ready() {
  for _ in $(seq 1 100); do
    "$ETCDCTL_BIN" --endpoints="$1" --dial-timeout=1s endpoint health >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server at $1 did not come up" >&2
  return 1
}

rows=()
measure() { # name endpoint pid
  echo "== $1" >&2
  local line
  line=$("$bench" --endpoint "http://$2" --clients "$clients" --conns "$conns" --seconds "$seconds" --json put)
  echo "$line" >&2
  local rss
  rss=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$3/status" 2>/dev/null || echo "?")
  rows+=("$1|$line|$rss")
}

"$ETCD_BIN" --name bench --data-dir "$work/etcd" \
  --listen-client-urls http://127.0.0.1:23860 --advertise-client-urls http://127.0.0.1:23860 \
  --listen-peer-urls http://127.0.0.1:23861 --initial-advertise-peer-urls http://127.0.0.1:23861 \
  --initial-cluster bench=http://127.0.0.1:23861 >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_ready 127.0.0.1:23860
measure "etcd-$("$ETCD_BIN" --version | awk '/etcd Version/ {print $3}')" 127.0.0.1:23860 "${pids[-1]}"
kill "${pids[-1]}"

target/release/kubeshard --listen-address 127.0.0.1:23870 --metrics-bind-address '' \
  --endpoint "sqlite://$work/sqlite/state.db" >"$work/ks-sqlite.log" 2>&1 &
pids+=($!)
wait_ready 127.0.0.1:23870
measure kubeshard-sqlite 127.0.0.1:23870 "${pids[-1]}"
kill "${pids[-1]}"

db="ks_benchput_$(date +%s)"
target/release/kubeshard --listen-address 127.0.0.1:23880 --metrics-bind-address '' \
  --endpoint "${KUBESHARD_TEST_POSTGRES_URL%/*}/$db" >"$work/ks-pg.log" 2>&1 &
pids+=($!)
wait_ready 127.0.0.1:23880
measure kubeshard-postgres 127.0.0.1:23880 "${pids[-1]}"
kill "${pids[-1]}"
psql "$KUBESHARD_TEST_POSTGRES_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true

field() { sed -E "s/.*\"$2\":\"?([^,\"}]*)\"?.*/\1/" <<<"$1"; }
{
  echo "# Closed-loop puts"
  echo
  echo "One run of \`scripts/bench-put.sh $seconds\` on one machine: $clients clients over"
  echo "$conns gRPC connections, each with one put of a distinct key (1 KiB value) in"
  echo "flight, for $seconds s per system, systems one after the other. Compare ratios"
  echo "within the run only."
  echo
  echo "- Date: $(date -u +%Y-%m-%dT%H:%MZ); machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
  echo "- kubeshard $(git rev-parse --short HEAD) (release); SQLite WAL with synchronous=FULL;"
  echo "  PostgreSQL $(psql "$KUBESHARD_TEST_POSTGRES_URL" -Atc 'show server_version' 2>/dev/null || echo '?') with default durability; etcd from Debian, default flags"
  echo
  echo "| system | puts/s | p50 (ms) | p90 (ms) | p99 (ms) | errors | server peak RSS (MiB) |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  for r in "${rows[@]}"; do
    name=${r%%|*}; rest=${r#*|}; json=${rest%|*}; rss=${rest##*|}
    echo "| $name | $(field "$json" per_second) | $(field "$json" p50_ms) | $(field "$json" p90_ms) | $(field "$json" p99_ms) | $(field "$json" errors) | $rss |"
  done
} >docs/benchmarks-put.md
cat docs/benchmarks-put.md
