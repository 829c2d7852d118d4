#!/usr/bin/env bash
# Benchmark (not a test): closed-loop puts to 6 resource prefixes in
# parallel (kubeshard-bench put --resources 6) against etcd and against
# kubeshard with 1, 3 and 6 PostgreSQL databases (prefix j on shard j mod n),
# one after the other in the same run; writes docs/benchmarks-shards.md.
# Usage: scripts/bench-shards.sh [seconds] (default 15). Needs what
# scripts/bench-lib.sh says.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
clients=${CLIENTS:-600}
conns=${CONNS:-60}
resources=6
. scripts/bench-lib.sh

echo "== building kubeshard and kubeshard-bench (release)" >&2
cargo build --release --locked --bin kubeshard --bin kubeshard-bench >&2
bench=target/release/kubeshard-bench
prefix=/registry/bench/

rows=()
measure() { # name endpoint pid
  echo "== $1" >&2
  local line
  line=$("$bench" --endpoint "http://$2" --clients "$clients" --conns "$conns" --seconds "$seconds" --json \
    put --prefix "$prefix" --resources "$resources")
  echo "$line" >&2
  local rss
  rss=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$3/status" 2>/dev/null || echo "?")
  rows+=("$1|$line|$rss")
}

# topology SHARDS: writes $work/topology-SHARDS.toml with SHARDS fresh
# PostgreSQL databases (added to dbs), resource prefix j routed to shard
# j mod SHARDS.
topology() {
  local n=$1 file="$work/topology-$1.toml" stamp
  stamp=$(date +%s)
  echo 'default_shard = "s0"' >"$file"
  for i in $(seq 0 $((n - 1))); do
    printf '\n[[shards]]\nname = "s%d"\nendpoint = "%s"\n' "$i" "$(pg_url "ks_benchshards_${stamp}_${n}_$i")" >>"$file"
    dbs+=("ks_benchshards_${stamp}_${n}_$i")
  done
  for j in $(seq 0 $((resources - 1))); do
    printf '\n[[routes]]\nprefix = "%sres%d/"\nshard = "s%d"\n' "$prefix" "$j" $((j % n)) >>"$file"
  done
}

start_etcd 23960 23961
measure "etcd-$(etcd_version)" 127.0.0.1:23960 "$server_pid"
stop_server

dbs=()
port=23970
for n in 1 3 6; do
  topology "$n"
  start_kubeshard_config "$port" "$work/topology-$n.toml"
  measure "kubeshard-postgres-$n-db" "127.0.0.1:$port" "$server_pid"
  stop_server
  port=$((port + 1))
done
for db in "${dbs[@]}"; do pg_drop "$db"; done

field() { sed -E "s/.*\"$2\":\"?([^,\"}]*)\"?.*/\1/" <<<"$1"; }
base=""
{
  echo "# Puts to 6 resource prefixes over 1, 3 and 6 databases"
  echo
  echo "One run of \`scripts/bench-shards.sh $seconds\` on one machine: $clients clients over"
  echo "$conns gRPC connections, client i putting distinct keys (1 KiB values) under"
  echo "\`${prefix}res<i mod 6>/\`, each with one put in flight, for $seconds s per system,"
  echo "systems one after the other. kubeshard routes prefix j to shard j mod n, every"
  echo "shard a database on the same PostgreSQL server. Compare ratios within the run only."
  echo
  echo "- Date: $(date -u +%Y-%m-%dT%H:%MZ); machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
  echo "- kubeshard $(git rev-parse --short HEAD) (release); PostgreSQL $(psql "$KUBESHARD_TEST_POSTGRES_URL" -Atc 'show server_version' 2>/dev/null || echo '?') with default durability; etcd from Debian, default flags"
  echo
  echo "| system | puts/s | vs 1 db | p50 (ms) | p95 (ms) | p99 (ms) | errors | server peak RSS (MiB) |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  for r in "${rows[@]}"; do
    name=${r%%|*}; rest=${r#*|}; json=${rest%|*}; rss=${rest##*|}
    rate=$(field "$json" per_second)
    ratio=""
    if [[ $name == kubeshard-postgres-1-db ]]; then base=$rate; fi
    if [[ $name == kubeshard-* && -n $base ]]; then ratio=$(awk -v a="$rate" -v b="$base" 'BEGIN {printf "%.2fx", a / b}'); fi
    echo "| $name | $rate | $ratio | $(field "$json" p50_ms) | $(field "$json" p95_ms) | $(field "$json" p99_ms) | $(field "$json" errors) | $rss |"
  done
} >docs/benchmarks-shards.md
cat docs/benchmarks-shards.md
