#!/usr/bin/env bash
# Benchmark (not a test): `etcdctl check perf` at loads m and l against real
# etcd, kubeshard on SQLite and kubeshard on PostgreSQL, one after the other in
# the same run on the same machine, and writes the figures to
# docs/benchmarks.md. Compare ratios within one run only.
#
# Needs: etcd + etcdctl (Debian's etcd-server/etcd-client), a PostgreSQL
# reachable at KUBESHARD_TEST_POSTGRES_URL (scripts/test.sh --setup-only
# starts one). Usage: scripts/bench-check-perf.sh [loads...]   (default: m l)
set -euo pipefail
cd "$(dirname "$0")/.."

loads=("$@")
[ ${#loads[@]} -gt 0 ] || loads=(m l)
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

echo "== building kubeshard (release)" >&2
cargo build --release --locked --bin kubeshard >&2
kubeshard=target/release/kubeshard

wait_ready() { # endpoint
  for _ in $(seq 1 100); do
    "$ETCDCTL_BIN" --endpoints="$1" --dial-timeout=1s endpoint health >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server at $1 did not come up" >&2
  return 1
}

results="$work/results.tsv"
: >"$results"

run_loads() { # system-name endpoint pid
  local name=$1 endpoint=$2 pid=$3
  for load in "${loads[@]}"; do
    echo "== $name: check perf --load=$load" >&2
    local out="$work/$name-$load.txt"
    local peak_rss=0
    "$ETCDCTL_BIN" --endpoints="$endpoint" check perf --load="$load" --auto-compact --auto-defrag >"$out" 2>&1 &
    local ck=$!
    while kill -0 "$ck" 2>/dev/null; do
      local rss
      rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
      [ "${rss:-0}" -gt "$peak_rss" ] && peak_rss=$rss
      sleep 1
    done
    wait "$ck" && verdict=PASS || verdict=FAIL
    cat "$out" >&2
    local tput slowest stddev
    tput=$(grep -oE '[0-9]+ writes/s' "$out" | grep -oE '[0-9]+' || echo "?")
    slowest=$(grep -oE 'Slowest request took [0-9.]+s' "$out" | grep -oE '[0-9.]+' || echo "?")
    stddev=$(grep -oE 'Stddev is [0-9.]+s' "$out" | grep -oE '[0-9.]+' || echo "?")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$load" "$verdict" "$tput" "$slowest" "$stddev" "$((peak_rss / 1024))" >>"$results"
  done
}

systems=${SYSTEMS:-etcd sqlite postgres}
want() { [[ " $systems " == *" $1 "* ]]; }

# etcd (Debian's 3.4) on a temp data dir.
if want etcd; then
"$ETCD_BIN" --name bench --data-dir "$work/etcd" \
  --listen-client-urls http://127.0.0.1:23810 --advertise-client-urls http://127.0.0.1:23810 \
  --listen-peer-urls http://127.0.0.1:23811 --initial-advertise-peer-urls http://127.0.0.1:23811 \
  --initial-cluster bench=http://127.0.0.1:23811 >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_ready 127.0.0.1:23810
run_loads etcd-$("$ETCD_BIN" --version | awk '/etcd Version/ {print $3}') 127.0.0.1:23810 "${pids[-1]}"
kill "${pids[-1]}"
fi

# kubeshard on SQLite.
if want sqlite; then
"$kubeshard" --listen-address 127.0.0.1:23820 --endpoint "sqlite://$work/sqlite/state.db" >"$work/ks-sqlite.log" 2>&1 &
pids+=($!)
wait_ready 127.0.0.1:23820
run_loads kubeshard-sqlite 127.0.0.1:23820 "${pids[-1]}"
kill "${pids[-1]}"
fi

# kubeshard on PostgreSQL, fresh database.
if want postgres; then
db="ks_bench_$(date +%s)"
pg_url="${KUBESHARD_TEST_POSTGRES_URL%/*}/$db"
"$kubeshard" --listen-address 127.0.0.1:23830 --endpoint "$pg_url" >"$work/ks-pg.log" 2>&1 &
pids+=($!)
wait_ready 127.0.0.1:23830
run_loads kubeshard-postgres 127.0.0.1:23830 "${pids[-1]}"
kill "${pids[-1]}"
psql "${KUBESHARD_TEST_POSTGRES_URL}" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true
fi

if [ "$systems" != "etcd sqlite postgres" ]; then
  column -t -s $'\t' "$results"
  exit 0
fi

{
  echo "# Benchmarks"
  echo
  echo "Figures from one run of \`scripts/bench-check-perf.sh\` on one machine; compare"
  echo "systems only within the same run (ratios), never with other machines."
  echo
  echo "## etcdctl check perf"
  echo
  echo "- Date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -sr)"
  echo "- Client: $("$ETCDCTL_BIN" version | head -1); each load runs 60 s; loads: m = 200 clients at 1000 writes/s target, l = 500 clients at 8000 writes/s target"
  echo "- kubeshard: release build of $(git rev-parse --short HEAD); SQLite in WAL mode with synchronous=FULL; PostgreSQL $(psql "$KUBESHARD_TEST_POSTGRES_URL" -Atc 'show server_version' 2>/dev/null || echo '?') with default durability"
  echo "- etcd: Debian's package, default flags, data on the same disk"
  echo
  echo "| system | load | verdict | writes/s | slowest request (s) | stddev (s) | server peak RSS (MiB) |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  while IFS=$'\t' read -r name load verdict tput slowest stddev rss; do
    echo "| $name | $load | $verdict | $tput | $slowest | $stddev | $rss |"
  done <"$results"
  echo
  echo "PostgreSQL's RSS is not in the kubeshard figure (separate processes)."
} >docs/benchmarks.md
cat docs/benchmarks.md
