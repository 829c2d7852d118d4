#!/usr/bin/env bash
# The full run of issue 18, by hand (hours): the five SIGs of the published
# runs, one at a time, on etcd 3.6 twice (only what passes both times
# counts) and on each kubeshard target, through scripts/kube-conformance.sh
# (each run in its own network namespace). Resumable: each finished
# (target, SIG) step leaves docs/conformance/TARGET/SIG.tsv (results) and
# .json (summary), and is skipped next time; commit them between sessions.
# What passes on etcd and fails on a kubeshard target then runs again on
# both (TARGET/SIG.rerun.tsv, .rerun-etcd.tsv; empty when nothing differed).
# Then writes docs/conformance.md (scripts/kube-conformance-report.py).
#
# Usage: scripts/kube-conformance-full.sh
# Knobs: TARGETS (default: etcd etcd-again kubeshard-sqlite kubeshard-6
# kubeshard-pushdown), SIGS (default: the five), PROCS (4).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
targets=${TARGETS:-"etcd etcd-again kubeshard-sqlite kubeshard-6 kubeshard-pushdown"}
sigs=${SIGS:-"sig-api-machinery sig-apps sig-auth sig-instrumentation sig-scheduling"}
out=docs/conformance
mkdir -p "$out"
for sig in $sigs; do
  for target in $targets; do
    [[ -s $out/$target/$sig.tsv ]] && { echo "==> $target $sig: done before" >&2; continue; }
    run_target=${target%-again}
    work=$root/target/conformance/full/$target/$sig
    if FOCUS="\\[$sig\\]" WORK=$work scripts/kube-conformance.sh "$run_target"; then
      mkdir -p "$out/$target"
      cp "$work/results.tsv" "$out/$target/$sig.tsv"
      cp "$work/summary.json" "$out/$target/$sig.json"
    else
      echo "==> $target $sig: the run broke (logs in $work); not recorded" >&2
    fi
  done
  # A spec that passes on etcd and not on a kubeshard target runs again, on
  # both and one at a time, before it counts as a difference (the report
  # reads TARGET/SIG.rerun.tsv and TARGET/SIG.rerun-etcd.tsv).
  for target in $targets; do
    [[ $target == etcd* ]] && continue
    [[ -s $out/$target/$sig.tsv && -s $out/etcd/$sig.tsv && ! -e $out/$target/$sig.rerun.tsv ]] || continue
    baselines=(--baseline "$out/etcd/$sig.tsv")
    [[ -s $out/etcd-again/$sig.tsv ]] && baselines+=(--baseline "$out/etcd-again/$sig.tsv")
    list=$root/target/conformance/full/$target/$sig.differences
    PYTHONPATH=tests/kubernetes python3 tests/kubernetes/conformance.py compare "${baselines[@]}" \
      --target-results "$out/$target/$sig.tsv" --write-differences "$list" || true
    if [[ ! -s $list ]]; then : >"$out/$target/$sig.rerun.tsv"; continue; fi
    focus=$(PYTHONPATH=tests/kubernetes python3 tests/kubernetes/conformance.py regex "$list")
    for again in "$target" etcd; do
      work=$root/target/conformance/full/$target/$sig-rerun-$again
      suffix=rerun; [[ $again == etcd ]] && suffix=rerun-etcd
      if FOCUS="$focus" PROCS=1 WORK=$work scripts/kube-conformance.sh "$again"; then
        cp "$work/results.tsv" "$out/$target/$sig.$suffix.tsv"
      else
        echo "==> $target $sig: the rerun on $again broke (logs in $work)" >&2
      fi
    done
  done
done
python3 scripts/kube-conformance-report.py "$out" >docs/conformance.md
