#!/usr/bin/env bash
# Experiment (not a test) for issue 17 §5b: does keeping 4 KiB values in
# the row (STORAGE MAIN) instead of out of line (TOAST, PostgreSQL's
# default) make the 10,000-key list of scripts/bench-data.sh cheaper? Two
# fresh databases, 10,000 random 4 KiB values each, 2 x 20 lists.
# Usage: scripts/bench-data-toast.sh (needs a release build and
# scripts/test.sh --setup-only's PostgreSQL).
set -euo pipefail
cd /work/main
eval "$(scripts/test.sh --setup-only 2>/dev/null)"
. scripts/bench-lib.sh
B=target/release/kubeshard-bench
for variant in extended main; do
  db=ks_toast_$variant; pg_drop $db; newdb $db
  start_kubeshard 24990 "$db_url"
  if [[ $variant == main ]]; then
    psql "$db_url" -qc "ALTER TABLE ks_live ALTER value_bytes SET STORAGE MAIN; ALTER TABLE ks_history ALTER value_bytes SET STORAGE MAIN"
  fi
  $B --endpoint http://127.0.0.1:24990 --clients 64 --conns 8 --seconds 600 --total 10000 put --value-size 4096 --prefix /d/res0/ --tag fixed/ --random-values >/dev/null
  for i in 1 2; do
    echo "$variant run $i: $($B --endpoint http://127.0.0.1:24990 --clients 1 --conns 1 --seconds 600 --total 20 list --existing --keys 10000 --page 500 --prefix /d/res0/fixed/)"
  done
  psql "$db_url" -Atc "SELECT 'heap ' || pg_size_pretty(pg_relation_size('ks_live')) || ', toast ' || pg_size_pretty(pg_total_relation_size(reltoastrelid)) FROM pg_class WHERE relname = 'ks_live'"
  stop_server; drop_dbs; dbs=()
done
