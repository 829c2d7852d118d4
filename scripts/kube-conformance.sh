#!/usr/bin/env bash
# Kubernetes' own e2e suites (e2e.test 1.34.4 under ginkgo) against one
# storage target, on a control plane whose nodes kwok fakes, inside a
# private network namespace that this script creates (unshare -n): the
# tests point pods, services and webhooks at addresses that exist nowhere,
# and nothing they send may leave the machine.
#
# Usage: scripts/kube-conformance.sh TARGET
#   TARGET: etcd | kubeshard-sqlite | kubeshard-6 | kubeshard-pushdown
#   (tests/kubernetes/conformance.py says what each is).
# Knobs: FOCUS (default: the five SIGs of the published runs), SKIP (added
# to the published skips and tests/kubernetes/conformance/kwok-skips.txt),
# PROCS (4), TIMEOUT (4h), WORK (target/conformance/TARGET).
# Writes WORK/results.tsv, WORK/summary.json and the suite's JUnit report.
#
# Needs: go, python3, openssl, root (for the namespace), etcd 3.6
# (scripts/bench-peers.sh builds it), target/debug/kubeshard (or
# KUBESHARD_BIN), and for kubeshard-6 PostgreSQL and MariaDB as
# scripts/test.sh sets them up (reached over their Unix sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${1:?usage: scripts/kube-conformance.sh etcd|kubeshard-sqlite|kubeshard-6|kubeshard-pushdown}
conf=tests/kubernetes/conformance

# The focus and skips of the published runs (issue 18).
published_focus='sig-api-machinery|sig-apps|sig-auth|sig-instrumentation|sig-scheduling'
published_skip='Alpha|Flaky|[Aa]uto[Ss]cal|mysql|zookeeper|redis|CockroachDB|ClusterTrustBundle|SchedulerAsyncPreemption|BoundServiceAccountTokenVolume|StorageVersionAPI|StatefulUpgrade|CoordinatedLeaderElection|capture the life of a ResourceClaim|should rollback without unnecessary restarts|should grab all metrics from|compacted away'
# Specs that cannot pass without real containers, one per line with its
# reason: matched as literal text.
kwok_skip=$(PYTHONPATH=tests/kubernetes python3 tests/kubernetes/conformance.py regex "$conf/kwok-skips.txt")
skip="$published_skip${kwok_skip:+|$kwok_skip}${SKIP:+|$SKIP}"

mapfile -t built < <(scripts/kube-build-conformance.sh)
kube_bin=${built[0]} suite=${built[1]} kwok=${built[2]}/kwok
etcd=$(scripts/bench-peers.sh --etcd-only)/etcd
kubeshard=${KUBESHARD_BIN:-$root/target/debug/kubeshard}
pushdown=()
if [[ $target == kubeshard-pushdown ]]; then
  pushdown=(--pushdown-apiserver "$(scripts/kube-build-pushdown.sh)/kube-apiserver")
fi
[[ $target == etcd || -x $kubeshard ]] || { echo "kube-conformance: $kubeshard is missing (cargo build -p kubeshard)" >&2; exit 1; }
work=${WORK:-$root/target/conformance/$target}

echo "==> Kubernetes e2e on $target (focus ${FOCUS:-$published_focus}), in a private network namespace" >&2
# KUBE_FEATURE_*: client-go's feature gates for e2e.test and kubectl.
KUBE_FEATURE_WatchListClient=true PYTHONPATH=tests/kubernetes unshare -n \
  python3 tests/kubernetes/conformance.py run --target "$target" --work "$work" \
  --kube-bin "$kube_bin" --suite "$suite" --kwok "$kwok" --etcd "$etcd" --kubeshard "$kubeshard" \
  "${pushdown[@]}" --focus "${FOCUS:-$published_focus}" --skip "$skip" \
  --procs "${PROCS:-4}" --timeout "${TIMEOUT:-4h}"
