#!/usr/bin/env bash
# Benchmark (not a test): `etcdctl check perf` at loads m and l against real
# etcd, kubeshard on SQLite and kubeshard on PostgreSQL, one after the other in
# the same run on the same machine, and writes the figures to
# docs/benchmarks.md. Compare ratios within one run only.
#
# Needs what scripts/bench-lib.sh says.
# Usage: scripts/bench-check-perf.sh [loads...]   (default: m l)
set -euo pipefail
cd "$(dirname "$0")/.."

loads=("$@")
[ ${#loads[@]} -gt 0 ] || loads=(m l)
. scripts/bench-lib.sh

echo "== building kubeshard (release)" >&2
cargo build --release --locked --bin kubeshard >&2

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
  start_etcd 23810 23811
  run_loads "etcd-$(etcd_version)" 127.0.0.1:23810 "$server_pid"
  stop_server
fi

if want sqlite; then
  start_kubeshard 23820 "sqlite://$work/sqlite/state.db"
  run_loads kubeshard-sqlite 127.0.0.1:23820 "$server_pid"
  stop_server
fi

# kubeshard on PostgreSQL, fresh database.
if want postgres; then
  db="ks_bench_$(date +%s)"
  start_kubeshard 23830 "$(pg_url "$db")"
  run_loads kubeshard-postgres 127.0.0.1:23830 "$server_pid"
  stop_server
  pg_drop "$db"
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
