#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kubectl of one
# Kubernetes release from the Go module proxy (tests/kubernetes/go.mod pins
# it) into a cache outside the repository, once per release:
# ${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}/kubernetes-<version>/.
# Prints that folder. A cold build takes 10-20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../tests/kubernetes"
version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3} $1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' go.mod | head -1)
[[ -n $version ]] || { echo "kube-build: no k8s.io/kubernetes version in go.mod" >&2; exit 1; }
out=${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}/kubernetes-$version
mkdir -p "$out"
minor=$(cut -d. -f2 <<<"$version")
# Without these, the binaries report v0.0.0 and kubectl warns about skew.
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version \
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
  -X k8s.io/client-go/pkg/version.gitVersion=$version"
for cmd in kube-apiserver kube-controller-manager kubectl; do
  if [[ ! -x $out/$cmd ]]; then
    echo "==> building $cmd $version into $out" >&2
    started=$SECONDS
    GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$out/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
    mv "$out/$cmd.tmp" "$out/$cmd"
    echo "    built in $((SECONDS - started)) s" >&2
  fi
done
echo "$out"
