#!/usr/bin/env bash
# kube-apiserver and kube-controller-manager (built by scripts/kube-build.sh)
# on kubeshard, driven with kubectl by tests/kubernetes/e2e.py, on:
#   1. one SQLite shard, watch cache on, over mutual TLS;
#   2. one SQLite shard, watch cache off;
#   3. pods, events, leases and custom resources each on their own shard
#      (PostgreSQL and MariaDB) next to a default shard, watch cache on,
#      over mutual TLS;
#   4. the same topology, watch cache off;
# then a cluster moved from etcd 3.6 with `kubeshard import --follow`
# (tests/kubernetes/import_e2e.py), onto one SQLite shard and onto the
# topology of 3 and 4;
# and, first, the selector push-down run (tests/kubernetes/pushdown_e2e.py):
# kube-apiserver patched by scripts/kube-build-pushdown.sh, watch cache off,
# over kubeshard on one SQLite shard and on four, against the stock
# kube-apiserver over etcd 3.6 (scripts/bench-peers.sh --etcd-only).
# Needs: go, python3, openssl, target/debug/kubeshard (or KUBESHARD_BIN), and
# the database URLs scripts/test.sh exports.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
kube_bin=$(scripts/kube-build.sh)
kubeshard=${KUBESHARD_BIN:-$root/target/debug/kubeshard}
[[ -x $kubeshard ]] || { echo "kube-e2e: $kubeshard is missing (cargo build -p kubeshard)" >&2; exit 1; }
: "${KUBESHARD_TEST_POSTGRES_URL:?set by scripts/test.sh}"
: "${KUBESHARD_TEST_MYSQL_URL:?set by scripts/test.sh}"
work=$root/target/kube-e2e
rm -rf "$work" && mkdir -p "$work"

dbs=()
# db BASE NAME: sets $db_url to BASE with its database replaced by NAME and
# remembers it for dropping (no subshell, so the list survives).
db() { dbs+=("$1 $2"); db_url="${1%/*}/$2"; }
drop_all() {
  for entry in "${dbs[@]}"; do
    base=${entry% *} db=${entry#* }
    case $base in
      postgres*) psql "$base" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true ;;
      mysql*) mysql -h 127.0.0.1 -P 3306 -u kubeshard -pkubeshard -e "DROP DATABASE IF EXISTS \`$db\`" >/dev/null 2>&1 || true ;;
    esac
  done
}
trap drop_all EXIT

sharded_topology() { # FILE
  local stamp pg=$KUBESHARD_TEST_POSTGRES_URL my=$KUBESHARD_TEST_MYSQL_URL
  stamp=$(date +%s)_$RANDOM
  local core pods events leases custom
  db "$pg" "ks_e2e_${stamp}_core"; core=$db_url
  db "$my" "ks_e2e_${stamp}_pods"; pods=$db_url
  db "$pg" "ks_e2e_${stamp}_events"; events=$db_url
  db "$my" "ks_e2e_${stamp}_leases"; leases=$db_url
  db "$pg" "ks_e2e_${stamp}_custom"; custom=$db_url
  # Where the objects must be (checked while they exist).
  placement=(
    --expect-keys "$pods=/registry/pods/" --expect-no-keys "$core=/registry/pods/"
    --expect-keys "$events=/registry/events/" --expect-no-keys "$core=/registry/events/"
    --expect-keys "$leases=/registry/leases/" --expect-no-keys "$core=/registry/leases/"
    --expect-keys "$custom=/registry/kubeshard.e2e.io/widgets/"
    --expect-no-keys "$core=/registry/kubeshard.e2e.io/widgets/"
    --expect-keys "$core=/registry/configmaps/" --expect-no-keys "$pods=/registry/configmaps/"
  )
  cat >"$1" <<TOML
# Kubernetes' busiest kinds of objects each on their own database.
default_shard = "core"

[[shards]]
name = "core"
endpoint = "$core"

[[shards]]
name = "pods"
endpoint = "$pods"

[[shards]]
name = "events"
endpoint = "$events"

[[shards]]
name = "leases"
endpoint = "$leases"

[[shards]]
name = "custom"
endpoint = "$custom"

[[routes]]
resource = "pods"
shard = "pods"

[[routes]]
resource = "events"
shard = "events"

[[routes]]
resource = "leases"
shard = "leases"

[[routes]]
group = "kubeshard.e2e.io"
resource = "widgets"
shard = "custom"
TOML
}

status=0
e2e() { # NAME ARGS...
  local name=$1
  shift
  echo "==> kube-apiserver end to end: $name" >&2
  if python3 tests/kubernetes/e2e.py --kube-bin "$kube_bin" --kubeshard "$kubeshard" \
    --work "$work/$name" "$@"; then
    echo "    $name: passed" >&2
  else
    echo "    $name: FAILED (logs in $work/$name)" >&2
    status=1
  fi
}
# Selector push-down: the patched kube-apiserver, watch cache off, over
# kubeshard answers as the stock one over etcd 3.6 (tests/kubernetes/pushdown_e2e.py).
pushdown_apiserver=$(scripts/kube-build-pushdown.sh)/kube-apiserver
reference_etcd=$(scripts/bench-peers.sh --etcd-only)/etcd
pushdown() { # NAME ARGS...
  local name=$1
  shift
  echo "==> selector push-down end to end: $name" >&2
  if python3 tests/kubernetes/pushdown_e2e.py --kube-bin "$kube_bin" \
    --pushdown-apiserver "$pushdown_apiserver" --etcd "$reference_etcd" \
    --kubeshard "$kubeshard" --work "$work/$name" "$@"; then
    echo "    $name: passed" >&2
  else
    echo "    $name: FAILED (logs in $work/$name)" >&2
    status=1
  fi
}
# Widgets hashed by namespace over two shards, pods on a third: lists
# across namespaces merge selected ranges of several shards.
cat >"$work/pushdown-sharded.toml" <<TOML
default_shard = "core"

[[shards]]
name = "core"
endpoint = "sqlite://$work/pushdown-core.db"

[[shards]]
name = "widgets-1"
endpoint = "sqlite://$work/pushdown-widgets-1.db"

[[shards]]
name = "widgets-2"
endpoint = "sqlite://$work/pushdown-widgets-2.db"

[[shards]]
name = "pods"
endpoint = "sqlite://$work/pushdown-pods.db"

[[routes]]
group = "pushdown.e2e.io"
resource = "widgets"
shards = ["widgets-1", "widgets-2"]
hash = "resource-namespace"

[[routes]]
resource = "pods"
shard = "pods"
TOML
pushdown pushdown-sqlite --endpoint "sqlite://$work/pushdown.db"
pushdown pushdown-sharded --config "$work/pushdown-sharded.toml"

e2e sqlite-watch-cache-on-tls --endpoint "sqlite://$work/sqlite-on.db" --watch-cache on --tls
e2e sqlite-watch-cache-off --endpoint "sqlite://$work/sqlite-off.db" --watch-cache off
sharded_topology "$work/sharded-on.toml"
e2e sharded-watch-cache-on-tls --config "$work/sharded-on.toml" --watch-cache on --tls "${placement[@]}"
sharded_topology "$work/sharded-off.toml"
e2e sharded-watch-cache-off --config "$work/sharded-off.toml" --watch-cache off "${placement[@]}"

# A cluster on etcd moved onto kubeshard by `kubeshard import --follow`.
imported() { # NAME ARGS...
  local name=$1
  shift
  echo "==> etcd moved to kubeshard (kubeshard import --follow): $name" >&2
  if python3 tests/kubernetes/import_e2e.py --kube-bin "$kube_bin" --kubeshard "$kubeshard" \
    --etcd "$reference_etcd" --work "$work/$name" "$@"; then
    echo "    $name: passed" >&2
  else
    echo "    $name: FAILED (logs in $work/$name)" >&2
    status=1
  fi
}
imported import-sqlite --endpoint "sqlite://$work/import.db"
sharded_topology "$work/import-sharded.toml"
imported import-sharded --config "$work/import-sharded.toml"
exit $status
