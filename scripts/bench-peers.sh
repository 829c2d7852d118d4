#!/usr/bin/env bash
# Builds the benchmark peers from the Go module proxy into a cache outside
# the repository, once per version: etcd and etcdctl 3.6 (bench/peers/etcd)
# and kine (bench/peers/kine). Prints the folder holding etcd, etcdctl and
# kine: ${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}/peers-<etcd>-<kine>/.
# With --etcd-only, only etcd (the reference of scripts/kube-e2e.sh's
# selector push-down run, which kube-apiserver 1.34 needs at 3.5 or above).
set -euo pipefail
etcd_only=0
[[ ${1:-} == --etcd-only ]] && etcd_only=1
cd "$(dirname "$0")/../bench/peers"
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2}' etcd/go.mod)
kine_version=$(awk '$1 == "github.com/k3s-io/kine" || ($1 == "require" && $2 == "github.com/k3s-io/kine") {print $NF}' kine/go.mod | head -1)
out=${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}/peers-etcd-$etcd_version-kine-$kine_version
mkdir -p "$out"
build() { # MODULE_DIR PACKAGE NAME VERSION
  if [[ ! -x $out/$3 ]]; then
    echo "==> building $3 $4 into $out" >&2
    local started=$SECONDS
    (cd "$1" && GOFLAGS=-mod=mod go build -trimpath -o "$out/$3.tmp" "$2")
    mv "$out/$3.tmp" "$out/$3"
    echo "    built in $((SECONDS - started)) s" >&2
  fi
}
build etcd go.etcd.io/etcd/server/v3 etcd "$etcd_version"
((etcd_only)) && { echo "$out"; exit 0; }
build etcd go.etcd.io/etcd/etcdctl/v3 etcdctl "$etcd_version"
build kine github.com/k3s-io/kine kine "$kine_version"
echo "$out"
