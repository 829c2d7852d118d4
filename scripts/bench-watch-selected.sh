#!/usr/bin/env bash
# Benchmark (not a test): selected watches at scale (issue 17). kubeshard on
# a fresh SQLite file per run; one watch stream with W watches over one
# prefix, each with its own label selector app=a<i>, while 50 writers put
# objects labelled for one of them (kubeshard-bench watch-selected). Runs
# W=10 and W=10000 alternately, ROUNDS times (default 3), and prints the
# events delivered per second of each and their ratio: the target is
# 10,000 watches at no less than half the rate of 10.
#
# Usage: scripts/bench-watch-selected.sh [seconds per run] (default 20).
# Appends one JSON line per run to target/bench-watch-selected/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
rounds=${ROUNDS:-3}
cargo build --release --locked --bin kubeshard --bin kubeshard-bench >&2
out=target/bench-watch-selected
mkdir -p "$out"
port=23790
for round in $(seq 1 "$rounds"); do
  for watchers in 10 10000; do
    port=$((port + 1))
    dir=$out/run-$round-$watchers
    rm -rf "$dir" && mkdir -p "$dir"
    target/release/kubeshard --listen-address "127.0.0.1:$port" --endpoint "sqlite://$dir/state.db" \
      --metrics-bind-address "" >"$dir/server.log" 2>&1 &
    pid=$!
    sleep 1
    line=$(target/release/kubeshard-bench --endpoint "http://127.0.0.1:$port" --conns 10 --clients 50 \
      --seconds "$seconds" --server-pid "$pid" --json watch-selected --watchers "$watchers" || true)
    kill "$pid" && wait "$pid" 2>/dev/null || true
    echo "{\"round\":$round,\"watchers\":$watchers,\"result\":$line}" >>"$out/results.jsonl"
    echo "round $round, $watchers watches: $line" >&2
  done
done
python3 - "$out/results.jsonl" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by_round = {}
for r in runs:
    by_round.setdefault(r["round"], {})[r["watchers"]] = r["result"]
print("| round | 10 watches: events/s | 10,000 watches: events/s | ratio | p99 ms (10 / 10,000) | errors |")
print("| --- | --- | --- | --- | --- | --- |")
for rnd, r in sorted(by_round.items()):
    if 10 in r and 10000 in r:
        a, b = r[10], r[10000]
        print(f"| {rnd} | {a['per_second']:.0f} | {b['per_second']:.0f} | {b['per_second'] / a['per_second']:.2f} "
              f"| {a['p99_ms']:.1f} / {b['p99_ms']:.1f} | {a['errors'] + b['errors']} |")
PY
