#!/usr/bin/env bash
# Benchmark (not a test): closed-loop puts with kubeshard-bench against real
# etcd, kubeshard on SQLite and kubeshard on PostgreSQL, one after the other
# in the same run, written to docs/benchmarks-put.md. Every client sends its
# next put as soon as the previous one is answered: throughput at saturation.
# Usage: scripts/bench-put.sh [seconds] (default 15). Needs what
# scripts/bench-lib.sh says.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
clients=${CLIENTS:-500}
conns=${CONNS:-50}
. scripts/bench-lib.sh

echo "== building kubeshard and kubeshard-bench (release)" >&2
cargo build --release --locked --bin kubeshard --bin kubeshard-bench >&2
bench=target/release/kubeshard-bench

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

start_etcd 23860 23861
measure "etcd-$(etcd_version)" 127.0.0.1:23860 "$server_pid"
stop_server

start_kubeshard 23870 "sqlite://$work/sqlite/state.db"
measure kubeshard-sqlite 127.0.0.1:23870 "$server_pid"
stop_server

db="ks_benchput_$(date +%s)"
start_kubeshard 23880 "$(pg_url "$db")"
measure kubeshard-postgres 127.0.0.1:23880 "$server_pid"
stop_server
pg_drop "$db"

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
