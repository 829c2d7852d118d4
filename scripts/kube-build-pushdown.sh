#!/usr/bin/env bash
# Builds kube-apiserver of the Kubernetes release tests/kubernetes/go.mod pins,
# patched to push label and field selectors down to kubeshard (RangeRequest
# fields 14/15, WatchCreateRequest fields 9/10: kubeshard's extension of the
# etcd API; etcd ignores them). Upstream kube-apiserver filters LIST and WATCH
# results itself after reading every object; with the patches it also sends
# the selectors, so kubeshard can leave out what does not match.
#
# The patches (tests/kubernetes/pushdown/*.patch) apply to copies of the Go
# modules etcd api/v3, etcd client/v3 and k8s.io/apiserver, made outside the
# repository in ${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}/kubernetes-<version>-pushdown/;
# a copy of tests/kubernetes/go.mod replaces the modules with them. The binary
# goes there too, built once (again when the patches change). With
# --storage-suite it also builds the apiserver storage suite
# (tests/kubernetes/storage) over the patched store, as storage-<hash>.test
# there. Prints that folder. A cold build takes 10-20 minutes on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "$0")/../tests/kubernetes" && pwd)
cd "$here"
storage_suite=0
[[ ${1:-} == --storage-suite ]] && storage_suite=1
version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3} $1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' go.mod | head -1)
[[ -n $version ]] || { echo "kube-build-pushdown: no k8s.io/kubernetes version in go.mod" >&2; exit 1; }
out=${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}/kubernetes-$version-pushdown
work=$out/work
stamp=$(cat go.mod go.sum pushdown/*.patch pushdown/*_test.go | sha256sum | cut -d' ' -f1)

# The wrapper module with the patched copies, made again when its inputs change.
if [[ $(cat "$work/stamp" 2>/dev/null) != "$stamp" ]]; then
  echo "==> patching etcd api, etcd client and k8s.io/apiserver in $work" >&2
  rm -rf "$work" "$out/kube-apiserver" "$out"/storage-*.test
  mkdir -p "$work/module/pushdown"
  cp go.mod go.sum tools.go "$work/module/"
  cp pushdown/*_test.go "$work/module/pushdown/"
  # patch file, module: each at the version go.mod resolves it to.
  for pair in etcd-api:go.etcd.io/etcd/api/v3 etcd-client:go.etcd.io/etcd/client/v3 apiserver:k8s.io/apiserver; do
    name=${pair%%:*} mod=${pair#*:}
    ver=$(GOFLAGS=-mod=mod go list -m -f '{{with .Replace}}{{.Version}}{{else}}{{.Version}}{{end}}' "$mod")
    dir=$(GOFLAGS=-mod=mod go mod download -json "$mod@$ver" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [[ -d $dir ]] || { echo "kube-build-pushdown: no module folder for $mod@$ver" >&2; exit 1; }
    cp -r "$dir" "$work/$name"
    chmod -R u+w "$work/$name"
    echo "    patching $mod@$ver" >&2
    patch -p1 --forward -s -d "$work/$name" <"pushdown/$name.patch"
    (cd "$work/module" && go mod edit -replace "$mod=$work/$name")
  done
  # The patched etcd client sends the selectors (fast: etcd and gRPC packages only).
  (cd "$work/module" && GOFLAGS=-mod=mod go test -tags pushdown -count=1 ./pushdown >&2)
  echo "$stamp" >"$work/stamp"
fi

cd "$work/module"
if [[ ! -x $out/kube-apiserver ]]; then
  echo "==> building patched kube-apiserver $version into $out" >&2
  started=$SECONDS
  minor=$(cut -d. -f2 <<<"$version")
  # Same version stamp as scripts/kube-build.sh (otherwise v0.0.0).
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/client-go/pkg/version.gitVersion=$version"
  GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$out/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
  mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
  echo "    built in $((SECONDS - started)) s" >&2
fi
if ((storage_suite)); then
  key=$(cat "$here"/storage/*.go | sha256sum | cut -c1-16)
  if [[ ! -x $out/storage-$key.test ]]; then
    echo "==> building the storage suite over the patched store ($out/storage-$key.test)" >&2
    rm -rf storage && cp -r "$here/storage" storage
    GOFLAGS=-mod=mod go test -c -o "$out/storage-$key.test.tmp" ./storage
    mv "$out/storage-$key.test.tmp" "$out/storage-$key.test"
  fi
fi
echo "$out"
