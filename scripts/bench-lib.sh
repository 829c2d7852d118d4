# Shared by the benchmark scripts (sourced, not run): tools, a work folder
# removed on exit, and starting/stopping the systems under test one at a time.
# Needs: etcd + etcdctl (Debian's etcd-server/etcd-client), a PostgreSQL
# reachable at KUBESHARD_TEST_POSTGRES_URL (scripts/test.sh --setup-only
# starts one), and target/release/kubeshard built by the caller.

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

# wait_ready HOST:PORT: until the server answers etcd's health check.
wait_ready() {
  for _ in $(seq 1 100); do
    "$ETCDCTL_BIN" --endpoints="$1" --dial-timeout=1s endpoint health >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server at $1 did not come up" >&2
  return 1
}

# launch PORT LOG COMMAND...: runs a server in the background with its
# output in $work/LOG, waits until it answers on PORT; sets server_pid.
launch() {
  local port=$1 log=$2
  shift 2
  "$@" >"$work/$log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  wait_ready "127.0.0.1:$port"
}

# start_etcd CLIENT_PORT PEER_PORT [BINARY [FLAGS...]]: etcd (default
# $ETCD_BIN) on a fresh data dir, $work/etcd-CLIENT_PORT.
start_etcd() {
  local client=$1 peer=$2 binary=${3:-$ETCD_BIN}
  shift $(($# < 3 ? $# : 3))
  launch "$client" "etcd-$client.log" "$binary" --name bench --data-dir "$work/etcd-$client" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "bench=http://127.0.0.1:$peer" "$@"
}

# start_kine PORT ENDPOINT BINARY: kine, metrics on the next port. Its pool
# stays unlimited (kine's default; KINE_MAX_CONNS overrides): capped at 100
# it deadlocked under 1000 clients, every connection idle in a transaction
# waiting for another. Unlimited, it needs a PostgreSQL that allows more
# connections than there are clients (scripts/test.sh sets 1200).
start_kine() {
  launch "$1" "kine-$1.log" "$3" --listen-address "127.0.0.1:$1" --endpoint "$2" \
    --metrics-bind-address "127.0.0.1:$(($1 + 1))" \
    --datastore-max-open-connections "${KINE_MAX_CONNS:-0}"
}

# start_kubeshard PORT ENDPOINT: the release build, metrics off.
start_kubeshard() {
  launch "$1" "kubeshard-$1.log" target/release/kubeshard --listen-address "127.0.0.1:$1" \
    --metrics-bind-address '' --endpoint "$2"
}

# start_kubeshard_config PORT FILE: the same with a topology file.
start_kubeshard_config() {
  launch "$1" "kubeshard-$1.log" target/release/kubeshard --listen-address "127.0.0.1:$1" \
    --metrics-bind-address '' --config "$2"
}

# done_before RESULTS SYSTEM PATTERN: for resumable runs. True when a line
# of RESULTS (JSON lines) matches PATTERN, the mark of SYSTEM's finished
# measurement; otherwise drops SYSTEM's lines (a system cut short is
# measured again from scratch) and returns false.
done_before() {
  if grep -q "$3" "$1"; then
    echo "== $2: done in an earlier run, skipped" >&2
    return 0
  fi
  python3 - "$1" "$2" <<'PY'
import json, sys
path, system = sys.argv[1], sys.argv[2]
keep = [l for l in open(path) if l.strip() and json.loads(l)["system"] != system]
open(path, "w").writelines(keep)
PY
  return 1
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}

etcd_version() {
  "$ETCD_BIN" --version | awk '/etcd Version/ {print $3}'
}

# pg_url DB: KUBESHARD_TEST_POSTGRES_URL with its database replaced by DB,
# without TLS: the test server offers TLS, and libpq's and sqlx's default
# (prefer) would take it for some systems and not others; benchmarks
# compare the systems, not TLS.
pg_url() {
  echo "${KUBESHARD_TEST_POSTGRES_URL%/*}/$1?sslmode=disable"
}

# newdb NAME: a PostgreSQL database for one system under test; sets db_url
# and remembers NAME in dbs for drop_dbs.
dbs=()
newdb() { dbs+=("$1"); db_url=$(pg_url "$1"); }
drop_dbs() { for db in "${dbs[@]}"; do pg_drop "$db"; done; }

# crd_topology FILE DB_PREFIX: six new PostgreSQL databases, one per kind
# of the custom-resource workload; everything else (core, RBAC, the CRDs
# themselves) with the first kind on s0.
crd_topology() {
  local file=$1 i=0 plural
  echo 'default_shard = "s0"' >"$file"
  for i in 0 1 2 3 4 5; do
    newdb "$2_$i"
    printf '\n[[shards]]\nname = "s%d"\nendpoint = "%s"\n' "$i" "$db_url" >>"$file"
  done
  i=0
  for plural in addresses firewalls globaladdresses networks routers subnetworks; do
    printf '\n[[routes]]\ngroup = "compute.gcp.crossplane.io"\nresource = "%s"\nshard = "s%d"\n' \
      "$plural" "$i" >>"$file"
    i=$((i + 1))
  done
}

# plots_python: a Python with matplotlib, from a venv cached outside the repo.
plots_python() {
  local venv=${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}/venv-plots
  if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q matplotlib==3.9.2 >&2
  fi
  echo "$venv/bin/python"
}

pg_drop() {
  psql "$KUBESHARD_TEST_POSTGRES_URL" -qc "DROP DATABASE IF EXISTS \"$1\" WITH (FORCE)" >/dev/null 2>&1 || true
}
