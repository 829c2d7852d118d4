#!/usr/bin/env bash
# Benchmark (not a test): the raw etcd API side by side. Every workload of
# kubeshard-bench against every system, one system at a time, in one run:
#   etcd 3.4 (Debian), etcd 3.6 and kine (built by scripts/bench-peers.sh;
#   kine on PostgreSQL), kubeshard on SQLite, on one PostgreSQL database and
#   on 6 PostgreSQL databases (the six benchmark prefixes on their own).
# Writes target/bench-suite/results.jsonl, docs/benchmarks-suite.md and PNG
# plots in docs/img/ (matplotlib, installed into a cached venv).
#
# Usage: scripts/bench-suite.sh [seconds per workload] (default 15).
# Knobs (environment): SYSTEMS (space-separated subset), CLIENTS (1000),
# CONNS (100), LIST_KEYS (100000), LIST_UPDATES (10), WATCHERS (100).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
clients=${CLIENTS:-1000}
conns=${CONNS:-100}
list_keys=${LIST_KEYS:-100000}
list_updates=${LIST_UPDATES:-10}
watchers=${WATCHERS:-100}
systems=${SYSTEMS:-"etcd-3.4 etcd-3.6 kine-postgres kubeshard-sqlite kubeshard-postgres kubeshard-6-postgres"}
. scripts/bench-lib.sh

echo "== building kubeshard and kubeshard-bench (release), and the peers" >&2
cargo build --release --locked --bin kubeshard --bin kubeshard-bench >&2
bench=target/release/kubeshard-bench
peers=$(scripts/bench-peers.sh)
out=target/bench-suite
mkdir -p "$out" docs/img
results=$out/results.jsonl
: >"$results"

stamp=$(date +%s)

start_system() { # NAME PORT
  case $1 in
    etcd-3.4) start_etcd "$2" $(($2 + 1)) ;;
    etcd-3.6) start_etcd "$2" $(($2 + 1)) "$peers/etcd" ;;
    kine-postgres) newdb "ks_bench_${stamp}_kine_$2"; start_kine "$2" "$db_url" "$peers/kine" ;;
    kubeshard-sqlite) start_kubeshard "$2" "sqlite://$work/ks-$2/state.db" ;;
    kubeshard-postgres) newdb "ks_bench_${stamp}_$2"; start_kubeshard "$2" "$db_url" ;;
    kubeshard-6-postgres)
      local file=$work/topology-$2.toml
      echo 'default_shard = "s0"' >"$file"
      for i in 0 1 2 3 4 5; do
        newdb "ks_bench_${stamp}_$2_$i"
        printf '\n[[shards]]\nname = "s%d"\nendpoint = "%s"\n' "$i" "$db_url" >>"$file"
      done
      # The workloads' prefixes, one shard each (put's six resources too).
      local n=0
      for p in put/res0/ put/res1/ put/res2/ put/res3/ put/res4/ put/res5/ range/ txn/ list/ watch/; do
        printf '\n[[routes]]\nprefix = "/kubeshard-bench/%s"\nshard = "s%d"\n' "$p" $((n % 6)) >>"$file"
        n=$((n + 1))
      done
      start_kubeshard_config "$2" "$file" ;;
    *) echo "unknown system $1" >&2; exit 2 ;;
  esac
}

measure() { # SYSTEM PORT WORKLOAD-ARGS...
  local system=$1 port=$2
  shift 2
  local line
  if line=$("$bench" --endpoint "http://127.0.0.1:$port" --server-pid "$server_pid" "$@"); then
    echo "   $line" >&2
    echo "{\"system\":\"$system\",${line#\{}" >>"$results"
  else
    echo "   $system: $* failed" >&2
  fi
}

port=24300
for system in $systems; do
  # A fresh server per workload: each starts from an empty store.
  for workload in put range range-serializable txn list watch; do
    echo "== $system: $workload" >&2
    start_system "$system" "$port"
    common=(--seconds "$seconds" --json)
    case $workload in
      put) measure "$system" "$port" "${common[@]}" --clients "$clients" --conns "$conns" \
             put --prefix /kubeshard-bench/put/ --resources 6 ;;
      range) measure "$system" "$port" "${common[@]}" --clients "$clients" --conns "$conns" range ;;
      range-serializable) measure "$system" "$port" "${common[@]}" --clients "$clients" --conns "$conns" \
             range --serializable ;;
      txn) measure "$system" "$port" "${common[@]}" --clients "$clients" --conns "$conns" txn ;;
      list) measure "$system" "$port" "${common[@]}" --clients 4 --conns 4 \
             list --keys "$list_keys" --updates "$list_updates" ;;
      watch) measure "$system" "$port" "${common[@]}" --clients 50 --conns 10 watch --watchers "$watchers" ;;
    esac
    stop_server
    port=$((port + 10))
  done
done
drop_dbs

python=$(plots_python)
"$python" scripts/bench-report.py "$results" docs/benchmarks-suite.md docs/img \
  --seconds "$seconds" --clients "$clients" --conns "$conns" --list-keys "$list_keys" \
  --list-updates "$list_updates" --watchers "$watchers" --commit "$(git rev-parse --short HEAD)"
cat docs/benchmarks-suite.md
