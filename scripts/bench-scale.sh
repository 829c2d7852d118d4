#!/usr/bin/env bash
# Benchmark (not a test), issue 17 §5a: the custom-resource workload of
# shared/bench/README.md at the public challenge's scale. Objects pile up;
# each system runs until MAX_OBJECTS exist or MINUTES pass, whichever comes
# first, reporting every minute: req/s, p50/p90/p95/p99, failures, objects,
# and the memory (PSS) of kube-apiserver and of the storage (PostgreSQL's
# processes included). Systems, one after the other, each on fresh storage:
#   etcd-cache-on     etcd 3.6.8, stock kube-apiserver, watch cache on (the default)
#   etcd-cache-off    the same, watch cache off
#   kubeshard-postgres-pushdown    kubeshard on one PostgreSQL database,
#                     kube-apiserver patched to send selectors (scripts/kube-build-pushdown.sh),
#                     watch cache off
#   kubeshard-6-postgres-pushdown  the same over six databases, one CRD kind each
#
# Resumable: results are appended to docs/benchmarks-scale.jsonl (commit it
# between sessions), and a system that already has its summary line there is
# skipped, so a run can span sessions (RESULTS names another file; remove it
# to start over). Then writes docs/benchmarks-scale.md and docs/img/scale-*.png.
#
# Every kube-apiserver runs with --max-requests-inflight=2000 and
# --max-mutating-requests-inflight=1000: at the defaults (400, 200) the 720
# requests 120 users have in flight were partly refused with 429.
#
# Usage: scripts/bench-scale.sh  (knobs: SYSTEMS, VUS (120), MINUTES (30),
# MAX_OBJECTS (200000), KUBE_BENCH_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
vus=${VUS:-120}
minutes=${MINUTES:-30}
max_objects=${MAX_OBJECTS:-200000}
systems=${SYSTEMS:-"etcd-cache-on etcd-cache-off kubeshard-postgres-pushdown kubeshard-6-postgres-pushdown"}
workload=${KUBE_BENCH_DIR:-$(cd .. && pwd)/shared/bench}
[[ -f $workload/payloads.json && -d $workload/crds ]] ||
  { echo "no workload at $workload (want payloads.json and crds/); set KUBE_BENCH_DIR" >&2; exit 2; }
. scripts/bench-lib.sh

echo "== building kubeshard and kubeshard-bench (release), Kubernetes and the peers" >&2
cargo build --release --locked --bin kubeshard --bin kubeshard-bench >&2
kube_bin=$(scripts/kube-build.sh)
pushdown=$(scripts/kube-build-pushdown.sh)/kube-apiserver
peers=$(scripts/bench-peers.sh --etcd-only)
results=${RESULTS:-docs/benchmarks-scale.jsonl}
mkdir -p "$(dirname "$results")" docs/img
touch "$results"
stamp=$(date +%s)
port=24700
for system in $systems; do
  port=$((port + 10))
  done_before "$results" "$system" "\"system\": \"$system\", \"watch_cache\": \"[a-z]*\", \"commit\": \"[0-9a-f]*\", \"kind\": \"summary\"" && continue
  cache=off apiserver=$pushdown postgres=()
  case $system in
    etcd-cache-on) cache=on apiserver=$kube_bin/kube-apiserver
      start_etcd "$port" $((port + 1)) "$peers/etcd" ;;
    etcd-cache-off) apiserver=$kube_bin/kube-apiserver
      start_etcd "$port" $((port + 1)) "$peers/etcd" ;;
    kubeshard-postgres-pushdown) postgres=(--storage-postgres)
      newdb "ks_scale_${stamp}_one"; start_kubeshard "$port" "$db_url" ;;
    kubeshard-6-postgres-pushdown) postgres=(--storage-postgres)
      crd_topology "$work/topology-$port.toml" "ks_scale_${stamp}_six"
      start_kubeshard_config "$port" "$work/topology-$port.toml" ;;
    *) echo "unknown system $system" >&2; exit 2 ;;
  esac
  echo "== $system: $vus VUs until $max_objects objects or $minutes minutes (watch cache $cache)" >&2
  python3 scripts/bench-kube.py run --system "$system" --etcd-servers "http://127.0.0.1:$port" \
    --storage-pid "$server_pid" --kube-bin "$kube_bin" --apiserver "$apiserver" \
    --bench target/release/kubeshard-bench --payloads "$workload/payloads.json" \
    --crds "$workload/crds" --vus "$vus" --seconds $((minutes * 60)) --watch-cache "$cache" \
    --report-every 60 --max-objects "$max_objects" "${postgres[@]}" \
    --commit "$(git rev-parse --short HEAD)" \
    --apiserver-arg=--max-requests-inflight=2000 --apiserver-arg=--max-mutating-requests-inflight=1000 \
    --results "$results" --work "$work/kube-$port" || echo "   $system failed" >&2
  stop_server
  drop_dbs
  dbs=()
done

python=$(plots_python)
machine="$(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
"$python" scripts/bench-scale-report.py "$results" docs/benchmarks-scale.md docs/img \
  --vus "$vus" --minutes "$minutes" --max-objects "$max_objects" --machine "$machine" \
  --commit "$(git rev-parse --short HEAD)"
cat docs/benchmarks-scale.md
