#!/usr/bin/env bash
# Benchmark (not a test): the Kubernetes custom-resource workload of
# shared/bench/README.md through a real kube-apiserver, over each storage in
# turn, in one run: etcd 3.6 and kine on PostgreSQL (built by
# scripts/bench-peers.sh), kubeshard on SQLite, on one PostgreSQL database,
# and on 6 PostgreSQL databases with one CRD kind per database.
# Writes target/bench-kube/results.jsonl, docs/benchmarks-kube.md and PNG
# plots in docs/img/.
#
# Usage: scripts/bench-kube.sh [seconds per system] (default 60).
# Knobs (environment): SYSTEMS (space-separated subset), VUS (20),
# WATCH_CACHE ("on off": kube-apiserver's watch cache, each in turn),
# KUBE_BENCH_DIR (the workload's crds/ and payloads.json; default
# ../shared/bench beside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
vus=${VUS:-20}
watch_caches=${WATCH_CACHE:-"on off"}
systems=${SYSTEMS:-"etcd-3.6 kine-postgres kubeshard-sqlite kubeshard-postgres kubeshard-6-postgres"}
workload=${KUBE_BENCH_DIR:-$(cd .. && pwd)/shared/bench}
if [[ ! -f $workload/payloads.json || ! -d $workload/crds ]]; then
  echo "no workload at $workload (want payloads.json and crds/); set KUBE_BENCH_DIR" >&2
  exit 2
fi
. scripts/bench-lib.sh

echo "== building kubeshard and kubeshard-bench (release), Kubernetes and the peers" >&2
cargo build --release --locked --bin kubeshard --bin kubeshard-bench >&2
kube_bin=$(scripts/kube-build.sh)
peers=$(scripts/bench-peers.sh)
out=target/bench-kube
mkdir -p "$out" docs/img
results=$out/results.jsonl
: >"$results"

stamp=$(date +%s)

start_system() { # NAME PORT
  case $1 in
    etcd-3.6) start_etcd "$2" $(($2 + 1)) "$peers/etcd" ;;
    kine-postgres) newdb "ks_kube_${stamp}_kine_$2"; start_kine "$2" "$db_url" "$peers/kine" ;;
    kubeshard-sqlite) start_kubeshard "$2" "sqlite://$work/ks-$2/state.db" ;;
    kubeshard-postgres) newdb "ks_kube_${stamp}_$2"; start_kubeshard "$2" "$db_url" ;;
    kubeshard-6-postgres)
      crd_topology "$work/topology-$2.toml" "ks_kube_${stamp}_$2"
      start_kubeshard_config "$2" "$work/topology-$2.toml" ;;
    *) echo "unknown system $1" >&2; exit 2 ;;
  esac
}

port=24600
for cache in $watch_caches; do
  for system in $systems; do
    echo "== $system, watch cache $cache: $vus VUs for $seconds s" >&2
    start_system "$system" "$port"
    python3 scripts/bench-kube.py run --system "$system" --etcd-servers "http://127.0.0.1:$port" \
      --storage-pid "$server_pid" --kube-bin "$kube_bin" --bench target/release/kubeshard-bench \
      --payloads "$workload/payloads.json" --crds "$workload/crds" --vus "$vus" \
      --seconds "$seconds" --watch-cache "$cache" --results "$results" --work "$work/kube-$port" ||
      echo "   $system (watch cache $cache) failed" >&2
    stop_server
    port=$((port + 10))
  done
done
drop_dbs

python=$(plots_python)
machine="$(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
"$python" scripts/bench-kube.py report "$results" docs/benchmarks-kube.md docs/img \
  --vus "$vus" --seconds "$seconds" --machine "$machine" --commit "$(git rev-parse --short HEAD)"
cat docs/benchmarks-kube.md
