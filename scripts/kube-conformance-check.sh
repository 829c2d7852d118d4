#!/usr/bin/env bash
# CI's share of issue 18: the [Conformance] specs of the five SIGs of the
# published runs (CONFORMANCE_FOCUS, CONFORMANCE_SKIP override) that can run
# under kwok, on etcd 3.6 and on kubeshard's six
# PostgreSQL/MariaDB shards, each through scripts/kube-conformance.sh (its
# own network namespace). Every spec that passes on etcd must pass on
# kubeshard, or be listed with its cause in
# tests/kubernetes/conformance/known-differences.txt; a listed spec that
# passes fails the check too (the list is enforced both ways). A spec that
# passes on etcd and fails on kubeshard is run again on both before it
# counts. Results: target/conformance/check/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
focus=${CONFORMANCE_FOCUS:-'\[sig-(api-machinery|apps|auth|instrumentation|scheduling)\].*\[Conformance\]'}
# Left to the full runs (scripts/kube-conformance-full.sh) to keep CI under
# its time budget: [Slow] specs (a CronJob spec watches nothing happen for
# five minutes), the serial preemption specs (a minute each) and a spec
# that waits five minutes for a pod that must stay pending.
export SKIP=${CONFORMANCE_SKIP:-'\[Slow\]|SchedulerPreemption|validates that there exists conflict between pods with same hostPort and protocol but one using 0\.0\.0\.0 hostIP'}
targets=${CONFORMANCE_TARGETS:-kubeshard-6}
out=$root/target/conformance/check
rm -rf "$out" && mkdir -p "$out"
known=tests/kubernetes/conformance/known-differences.txt
compare() { # BASELINE_TSV... -- TARGET_TSV DIFFERENCES_FILE
  local baselines=()
  while [[ $1 != -- ]]; do baselines+=(--baseline "$1"); shift; done
  shift
  PYTHONPATH=tests/kubernetes python3 tests/kubernetes/conformance.py compare "${baselines[@]}" \
    --target-results "$1" --known "$known" --write-differences "$2" --write-fixed "$2.fixed"
}
started=$SECONDS
FOCUS=$focus WORK=$out/etcd scripts/kube-conformance.sh etcd
status=0
for target in $targets; do
  FOCUS=$focus WORK=$out/$target scripts/kube-conformance.sh "$target"
  echo "==> $target against etcd" >&2
  compare "$out/etcd/results.tsv" -- "$out/$target/results.tsv" "$out/$target.differences" && continue
  [[ -s $out/$target.differences.fixed ]] && status=1  # a listed spec passes: shrink the list
  if [[ -s $out/$target.differences ]]; then
    # Run the differing specs again on both, one at a time.
    again=$(PYTHONPATH=tests/kubernetes python3 tests/kubernetes/conformance.py regex "$out/$target.differences")
    echo "==> $(wc -l <"$out/$target.differences") differences: running them again on both" >&2
    FOCUS=$again PROCS=1 WORK=$out/etcd-again scripts/kube-conformance.sh etcd
    FOCUS=$again PROCS=1 WORK=$out/$target-again scripts/kube-conformance.sh "$target"
    # A difference counts when etcd passed it both times and the target
    # failed it both times.
    python3 - "$out/$target/results.tsv" "$out/$target-again/results.tsv" >"$out/$target-both.tsv" <<'PY'
import sys
sys.path.insert(0, "tests/kubernetes")
from conformance import read_results
first, again = read_results(sys.argv[1]), read_results(sys.argv[2])
for name, status in first.items():
    if status == "failed" and again.get(name) == "passed":
        status = "passed"
    print(f"{name}\t{status}")
PY
    # Only the differences ran again, so only they can count here.
    compare "$out/etcd/results.tsv" "$out/etcd-again/results.tsv" -- "$out/$target-both.tsv" "$out/$target.again" || true
    [[ -s $out/$target.again ]] && status=1
  fi
done
echo "==> conformance check done in $(((SECONDS - started) / 60)) min" >&2
exit $status
