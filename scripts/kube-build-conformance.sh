#!/usr/bin/env bash
# Builds what scripts/kube-conformance.sh runs, from the Go module proxy,
# into a cache outside the repository (${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}):
#   kubernetes-<version>/kube-scheduler         beside kube-build.sh's binaries
#   conformance-<version>-<hash>/e2e.test        Kubernetes' e2e suites (go test -c)
#   conformance-<version>-<hash>/ginkgo          the ginkgo CLI the release requires
#   kwok-<version>/kwok                          fake nodes and pod life cycles
# (<hash>: of tests/kubernetes/conformance/go.mod and go.sum). Prints three
# lines: the kubernetes folder, the conformance folder and the kwok folder.
# Cold: about 7 minutes for e2e.test, 2 for kwok, 3 for kube-scheduler.
set -euo pipefail
cd "$(dirname "$0")/.."
# kwok's release; it needs Go 1.26 (go.mod's toolchain line).
kwok_version=v0.8.0
cache=${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}
kube=$(scripts/kube-build.sh)
cd tests/kubernetes/conformance
version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' go.mod | head -1)
[[ -n $version ]] || { echo "kube-build-conformance: no k8s.io/kubernetes version in go.mod" >&2; exit 1; }
key=$(cat go.mod go.sum | sha256sum | cut -c1-12)
suite=$cache/conformance-$version-$key
kwok=$cache/kwok-$kwok_version
mkdir -p "$suite" "$kwok"
minor=$(cut -d. -f2 <<<"$version")
# Without these the binaries report v0.0.0, and e2e specs fail in set-up
# with "Unable to parse server version".
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version \
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
  -X k8s.io/client-go/pkg/version.gitVersion=$version \
  -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
timed() { # WHAT OUT COMMAND...
  local what=$1 out=$2 started=$SECONDS
  shift 2
  [[ -x $out ]] && return 0
  echo "==> building $what into $out" >&2
  "$@"
  echo "    built in $((SECONDS - started)) s" >&2
}
build_scheduler() {
  GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$kube/kube-scheduler.tmp" k8s.io/kubernetes/cmd/kube-scheduler
  mv "$kube/kube-scheduler.tmp" "$kube/kube-scheduler"
}
build_e2e() {
  GOFLAGS=-mod=mod go test -c -trimpath -ldflags "$ldflags" -o "$suite/e2e.test.tmp" k8s.io/kubernetes/test/e2e
  mv "$suite/e2e.test.tmp" "$suite/e2e.test"
}
build_ginkgo() {
  GOFLAGS=-mod=mod go build -trimpath -o "$suite/ginkgo.tmp" github.com/onsi/ginkgo/v2/ginkgo
  mv "$suite/ginkgo.tmp" "$suite/ginkgo"
}
build_kwok() {
  # `go install pkg@version` builds in kwok's own module graph.
  GOFLAGS= GOBIN="$kwok/bin.tmp" go install "sigs.k8s.io/kwok/cmd/kwok@$kwok_version"
  mv "$kwok/bin.tmp/kwok" "$kwok/kwok"
  rmdir "$kwok/bin.tmp"
}
timed "kube-scheduler $version" "$kube/kube-scheduler" build_scheduler
timed "e2e.test $version" "$suite/e2e.test" build_e2e
timed "ginkgo" "$suite/ginkgo" build_ginkgo
timed "kwok $kwok_version" "$kwok/kwok" build_kwok
printf '%s\n' "$kube" "$suite" "$kwok"
