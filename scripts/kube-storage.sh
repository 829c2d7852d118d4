#!/usr/bin/env bash
# The apiserver storage suite (tests/kubernetes/storage: Kubernetes' own
# RunTest* functions over kube-apiserver's etcd3 store) against a real etcd
# and against kubeshard: one SQLite shard; three SQLite shards (pods hashed
# over two by namespace); six shards on PostgreSQL + MariaDB (the same, plus
# events, leases and custom resources on their own shards). Every test that passes on etcd must pass on
# each kubeshard target. The *-pushdown targets run the suite built over the
# store patched to send label and field selectors (scripts/kube-build-pushdown.sh),
# so the suite's selected lists and watches are filtered by kubeshard too. Prints a table of pass counts (also written to
# $KUBE_RESULTS, default target/kube-storage.md).
#
# Needs: go, etcd (ETCD_BIN), target/debug/kubeshard (or KUBESHARD_BIN), and
# for the PostgreSQL + MariaDB target the URLs scripts/test.sh exports.
# The test binary is cached outside the repository, keyed by the Go sources'
# hash: ${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cache=${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}
results=${KUBE_RESULTS:-$root/target/kube-storage/results.md}
mkdir -p "$cache" "$(dirname "$results")"
export ETCD_BIN=${ETCD_BIN:-$(command -v etcd)}
export KUBESHARD_BIN=${KUBESHARD_BIN:-$root/target/debug/kubeshard}
[[ -x $KUBESHARD_BIN ]] || { echo "kube-storage: $KUBESHARD_BIN is missing (cargo build -p kubeshard)" >&2; exit 1; }

key=$(cd tests/kubernetes && cat go.mod go.sum storage/*.go | sha256sum | cut -c1-16)
bin=$cache/storage-$key.test
if [[ ! -x $bin ]]; then
  echo "==> building the storage suite (cached as $bin)" >&2
  (cd tests/kubernetes && GOFLAGS=-mod=mod go test -c -o "$bin.tmp" ./storage)
  mv "$bin.tmp" "$bin"
fi

# Logs of each run stay here for reading after a failure.
work=$root/target/kube-storage
rm -rf "$work" && mkdir -p "$work"
pushdown_bin=$(scripts/kube-build-pushdown.sh --storage-suite)/storage-$(cat tests/kubernetes/storage/*.go | sha256sum | cut -c1-16).test
[[ -x $pushdown_bin ]] || { echo "kube-storage: $pushdown_bin was not built" >&2; exit 1; }
run() { # name target shards [suite binary]
  echo "==> storage suite on $1" >&2
  local started=$SECONDS suite=${4:-$bin}
  # -test.v prints one "--- PASS/FAIL/SKIP: TestX" line per top-level test.
  STORAGE_TARGET=$2 STORAGE_SHARDS=$3 "$suite" -test.v -test.count=1 -test.timeout=30m \
    -test.run "${KUBE_STORAGE_RUN:-.}" \
    >"$work/$1.log" 2>&1 || true
  grep -aE '^--- (PASS|FAIL|SKIP): ' "$work/$1.log" | awk '{print $3, $2}' | tr -d ':' | sort >"$work/$1.results"
  echo "    $(grep -c ' PASS$' "$work/$1.results" || true) passed, $(grep -c ' FAIL$' "$work/$1.results" || true) failed in $((SECONDS - started)) s" >&2
}
run etcd etcd ""
run kubeshard-sqlite kubeshard ""
run kubeshard-3-sqlite kubeshard-sharded sqlite
run kubeshard-sqlite-pushdown kubeshard "" "$pushdown_bin"
run kubeshard-3-sqlite-pushdown kubeshard-sharded sqlite "$pushdown_bin"
targets=(kubeshard-sqlite kubeshard-3-sqlite kubeshard-sqlite-pushdown kubeshard-3-sqlite-pushdown)
if [[ -n ${KUBESHARD_TEST_POSTGRES_URL:-} && -n ${KUBESHARD_TEST_MYSQL_URL:-} ]]; then
  run kubeshard-6-postgres-mariadb kubeshard-sharded postgres-mariadb
  targets+=(kubeshard-6-postgres-mariadb)
fi

status=0
{
  echo "| target | passed | failed | of tests |"
  echo "| --- | --- | --- | --- |"
  for t in etcd "${targets[@]}"; do
    echo "| $t | $(grep -c ' PASS$' "$work/$t.results" || true) | $(grep -c ' FAIL$' "$work/$t.results" || true) | $(wc -l <"$work/$t.results") |"
  done
} | tee "$results"
known=tests/kubernetes/storage/known-differences.txt
for t in "${targets[@]}"; do
  # Tests that pass on etcd but not on this target.
  differing=$(comm -23 <(grep ' PASS$' "$work/etcd.results" | cut -d' ' -f1) \
    <(grep ' PASS$' "$work/$t.results" | cut -d' ' -f1))
  # Those expected to differ on this target (known-differences.txt).
  expected=$(grep -v '^#' "$known" | while read -r glob name _; do
    [[ -n $glob ]] || continue
    # shellcheck disable=SC2053 # the first field is a glob
    if [[ $t == $glob ]]; then echo "$name"; fi
  done | sort -u)
  unexpected=$(comm -23 <(tr ' ' '\n' <<<"$differing" | sed '/^$/d' | sort) <(sed '/^$/d' <<<"$expected"))
  stale=$(comm -13 <(tr ' ' '\n' <<<"$differing" | sed '/^$/d' | sort) <(sed '/^$/d' <<<"$expected"))
  for name in $expected; do
    grep -q "^$name FAIL$" "$work/$t.results" && echo "    $t: $name fails as listed in $known" >&2
  done
  if [[ -n $unexpected ]]; then
    status=1
    echo "kube-storage: on $t, these pass on etcd but not here:" >&2
    for name in $unexpected; do
      echo "  $name" >&2
      awk -v n="$name" '$0 ~ "^=== RUN   "n"$" {p=1} p {print "    " $0} $0 ~ "^--- (PASS|FAIL|SKIP): "n" " {p=0}' "$work/$t.log" \
        | grep -a -E 'store_tests|watcher_tests|Error|expected|actual|^    --- FAIL' | head -40 >&2
    done
  fi
  if [[ -n $stale ]]; then
    status=1
    echo "kube-storage: on $t, these are listed in $known but did not fail; update the list: $stale" >&2
  fi
done
if ! grep -q ' PASS$' "$work/etcd.results"; then
  echo "kube-storage: nothing passed on etcd; the reference run is broken:" >&2
  tail -30 "$work/etcd.log" >&2
  status=1
fi
exit $status
