#!/usr/bin/env bash
# Benchmark (not a test), issue 17 §5b: data beyond etcd's limits. Through
# the etcd API, fill 12 GB of 4 KiB values over six resource prefixes into
# each system in turn; at 1, 2, 4, 8 and 12 GB measure write throughput and
# p99, the time of a paginated list of a fixed 10,000-key prefix, memory and
# disk (scripts/bench-data.py says exactly what). Systems:
#   etcd                   etcd 3.6.8, --quota-backend-bytes 8 GiB (its documented ceiling)
#   kubeshard-sqlite       kubeshard on one SQLite file
#   kubeshard-postgres     kubeshard on one PostgreSQL database
#   kubeshard-6-postgres   kubeshard on six, one resource prefix each
# Each system's data is removed before the next (the disk holds one).
#
# Resumable: results are appended to docs/benchmarks-data.jsonl (commit it
# between sessions); a system with a summary line there is skipped, one cut
# short is measured again from scratch. Then writes docs/benchmarks-data.md
# and docs/img/data-*.png.
#
# Usage: scripts/bench-data.sh  (knobs: SYSTEMS, LEVELS (1,2,4,8,12), RESULTS,
# MIN_FREE_GB (40): the free disk a system needs to start)
set -euo pipefail
cd "$(dirname "$0")/.."
systems=${SYSTEMS:-"etcd kubeshard-sqlite kubeshard-postgres kubeshard-6-postgres"}
levels=${LEVELS:-1,2,4,8,12}
. scripts/bench-lib.sh

echo "== building kubeshard and kubeshard-bench (release), and etcd" >&2
cargo build --release --locked --bin kubeshard --bin kubeshard-bench >&2
peers=$(scripts/bench-peers.sh --etcd-only)
results=${RESULTS:-docs/benchmarks-data.jsonl}
mkdir -p "$(dirname "$results")" docs/img
touch "$results"
stamp=$(date +%s)
port=24800
for system in $systems; do
  port=$((port + 10))
  done_before "$results" "$system" "\"system\": \"$system\", \"commit\": \"[0-9a-f]*\", \"kind\": \"summary\"" && continue
  # 12 GB of values take 34 GB in PostgreSQL (each value twice, plus
  # TOAST), 28 GB in SQLite: refuse to start a system that would fill the disk.
  free_gb=$(df --output=avail -BG "$work" | tail -1 | tr -dc 0-9)
  if ((free_gb < ${MIN_FREE_GB:-40})); then
    echo "== $system: only $free_gb GB free on $(df --output=target "$work" | tail -1); need ${MIN_FREE_GB:-40} (MIN_FREE_GB)" >&2
    exit 1
  fi
  where=()
  case $system in
    etcd)
      start_etcd "$port" $((port + 1)) "$peers/etcd" --quota-backend-bytes=$((8 << 30))
      where=(--disk-path "$work/etcd-$port") ;;
    kubeshard-sqlite)
      start_kubeshard "$port" "sqlite://$work/data-$port.db"
      where=(--disk-path "$work/data-$port.db") ;;
    kubeshard-postgres)
      newdb "ks_data_${stamp}_one"; start_kubeshard "$port" "$db_url"
      where=(--postgres-db "ks_data_${stamp}_one") ;;
    kubeshard-6-postgres)
      file=$work/topology-$port.toml
      echo 'default_shard = "s0"' >"$file"
      for i in 0 1 2 3 4 5; do
        newdb "ks_data_${stamp}_six_$i"; where+=(--postgres-db "ks_data_${stamp}_six_$i")
        printf '\n[[shards]]\nname = "s%d"\nendpoint = "%s"\n' "$i" "$db_url" >>"$file"
      done
      for i in 0 1 2 3 4 5; do
        printf '\n[[routes]]\nprefix = "/kubeshard-bench/data/res%d/"\nshard = "s%d"\n' "$i" "$i" >>"$file"
      done
      start_kubeshard_config "$port" "$file" ;;
    *) echo "unknown system $system" >&2; exit 2 ;;
  esac
  echo "== $system: filling to $levels GB" >&2
  python3 scripts/bench-data.py run --system "$system" --endpoint "http://127.0.0.1:$port" \
    --server-pid "$server_pid" --bench target/release/kubeshard-bench --results "$results" \
    --levels "$levels" --commit "$(git rev-parse --short HEAD)" "${where[@]}" ||
    echo "   $system failed" >&2
  stop_server
  drop_dbs
  dbs=()
  rm -rf "$work/etcd-$port" "$work/data-$port.db"*
done

python=$(plots_python)
machine="$(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
"$python" scripts/bench-data.py report "$results" docs/benchmarks-data.md docs/img \
  --machine "$machine" --commit "$(git rev-parse --short HEAD)"
cat docs/benchmarks-data.md
