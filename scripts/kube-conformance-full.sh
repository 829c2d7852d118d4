#!/usr/bin/env bash
# The full run of issue 18, by hand (hours): the five SIGs of the published
# runs on etcd 3.6 twice (only what passes both times counts) and on each
# kubeshard target, through scripts/kube-conformance.sh (each run in its own
# network namespace). sig-api-machinery runs alone; the other four run
# together (one ginkgo run: their serial and slow specs overlap). Resumable:
# each finished (target, step) leaves docs/conformance/TARGET/SIG.tsv
# (results) and .json (summary) for each SIG of the step, and is skipped
# next time; commit them between sessions. What passes on etcd and fails
# on a kubeshard target then runs again on both, one spec at a time
# (TARGET/SIG.rerun.tsv, .rerun-etcd.tsv; empty when nothing differed).
# Then writes docs/conformance.md (scripts/kube-conformance-report.py).
#
# Usage: scripts/kube-conformance-full.sh
# Knobs: TARGETS (default: etcd etcd-again kubeshard-sqlite kubeshard-6
# kubeshard-pushdown), STEPS (default: "sig-api-machinery
# sig-apps,sig-auth,sig-instrumentation,sig-scheduling"), PROCS (4).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
targets=${TARGETS:-"etcd etcd-again kubeshard-sqlite kubeshard-6 kubeshard-pushdown"}
steps=${STEPS:-"sig-api-machinery sig-apps,sig-auth,sig-instrumentation,sig-scheduling"}
out=docs/conformance
conformance() { PYTHONPATH=tests/kubernetes python3 tests/kubernetes/conformance.py "$@"; }
for step in $steps; do
  IFS=, read -ra sigs <<<"$step"
  focus=$(printf '|\\[%s\\]' "${sigs[@]}") && focus=${focus#|}
  for target in $targets; do
    done_before=1
    for sig in "${sigs[@]}"; do [[ -s $out/$target/$sig.json ]] || done_before=0; done
    (( done_before )) && { echo "==> $target $step: done before" >&2; continue; }
    work=$root/target/conformance/full/$target/${step//,/+}
    if FOCUS=$focus WORK=$work scripts/kube-conformance.sh "${target%-again}"; then
      conformance split --work "$work" --sigs "$step" --out "$out/$target"
    else
      echo "==> $target $step: the run broke (logs in $work); not recorded" >&2
    fi
  done
  # A spec that passes on etcd and not on a kubeshard target runs again, on
  # both and one at a time, before it counts as a difference.
  for sig in "${sigs[@]}"; do
    for target in $targets; do
      [[ $target == etcd* ]] && continue
      [[ -s $out/$target/$sig.json && -s $out/etcd/$sig.json && ! -e $out/$target/$sig.rerun.tsv ]] || continue
      baselines=(--baseline "$out/etcd/$sig.tsv")
      [[ -s $out/etcd-again/$sig.json ]] && baselines+=(--baseline "$out/etcd-again/$sig.tsv")
      list=$root/target/conformance/full/$target/$sig.differences
      conformance compare "${baselines[@]}" --target-results "$out/$target/$sig.tsv" \
        --write-differences "$list" || true
      if [[ ! -s $list ]]; then : >"$out/$target/$sig.rerun.tsv"; continue; fi
      again_focus=$(conformance regex "$list")
      for again in "$target" etcd; do
        work=$root/target/conformance/full/$target/$sig-rerun-$again
        suffix=rerun && [[ $again == etcd ]] && suffix=rerun-etcd
        if FOCUS=$again_focus PROCS=1 WORK=$work scripts/kube-conformance.sh "$again"; then
          cp "$work/results.tsv" "$out/$target/$sig.$suffix.tsv"
        else
          echo "==> $target $sig: the run again on $again broke (logs in $work)" >&2
        fi
      done
    done
  done
done
python3 scripts/kube-conformance-report.py "$out" >docs/conformance.md
