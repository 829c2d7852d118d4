#!/usr/bin/env bash
# Profile (not a test) for issue 17 §5b: where the one-PostgreSQL list of
# scripts/bench-data.sh spends its time as data grows. Lists the same fixed
# 10,000 keys 20 times at 0.04 GB and at 4 GB of 4 KiB values, with the
# blocks each list took from PostgreSQL's shared buffers (hit) and from the
# OS (read), per relation of ks_live (pg_statio_user_tables).
# Usage: scripts/bench-data-profile.sh (needs a release build and
# scripts/test.sh --setup-only's PostgreSQL).
set -euo pipefail
cd /work/main
eval "$(scripts/test.sh --setup-only 2>/dev/null)"
. scripts/bench-lib.sh
B=target/release/kubeshard-bench
E=http://127.0.0.1:24995
db=ks_pgprof; pg_drop $db; newdb $db
start_kubeshard 24995 "$db_url"
stat() { psql "$db_url" -Atc "SELECT sum(heap_blks_read), sum(heap_blks_hit), sum(coalesce(toast_blks_read,0)), sum(coalesce(toast_blks_hit,0)), sum(coalesce(tidx_blks_read,0)), sum(coalesce(tidx_blks_hit,0)), sum(coalesce(idx_blks_read,0)), sum(coalesce(idx_blks_hit,0)) FROM pg_statio_user_tables WHERE relname='ks_live'"; }
lists() {
  local before after
  sleep 2; before=$(stat)
  echo "$1: $($B --endpoint $E --clients 1 --conns 1 --seconds 600 --total 20 list --existing --keys 10000 --page 500 --prefix /kubeshard-bench/data/res0/fixed/)"
  sleep 1; after=$(stat)
  python3 - "$before" "$after" <<'PY'
import sys
b = [int(x) for x in sys.argv[1].split("|")]; a = [int(x) for x in sys.argv[2].split("|")]
names = ["heap read", "heap hit", "toast read", "toast hit", "toast idx read", "toast idx hit", "idx read", "idx hit"]
print("   per list: " + ", ".join(f"{n} {(y - x) / 20:.0f}" for n, x, y in zip(names, b, a)))
PY
}
$B --endpoint $E --clients 64 --conns 8 --seconds 600 --total 10000 put --value-size 4096 --prefix /kubeshard-bench/data/res0/ --tag fixed/ --random-values >/dev/null
lists "at 0.04 GB"
$B --endpoint $E --clients 256 --conns 16 --seconds 900 --total 976000 put --value-size 4096 --prefix /kubeshard-bench/data/ --resources 6 --tag f/ --random-values
lists "at 4 GB"
psql "$db_url" -Atc "SELECT pg_size_pretty(pg_database_size(current_database()))"
stop_server; drop_dbs
