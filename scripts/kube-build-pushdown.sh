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
# goes there too, built once (again when the patches change). Prints that
# folder. A cold build takes 10-20 minutes on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "$0")/../tests/kubernetes" && pwd)
cd "$here"
version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3} $1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' go.mod | head -1)
[[ -n $version ]] || { echo "kube-build-pushdown: no k8s.io/kubernetes version in go.mod" >&2; exit 1; }
out=${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}/kubernetes-$version-pushdown
stamp=$(cat pushdown/*.patch pushdown/*_test.go | sha256sum | cut -d' ' -f1)
if [[ -x $out/kube-apiserver && $(cat "$out/patches.sha256" 2>/dev/null) == "$stamp" ]]; then
  echo "$out"
  exit 0
fi
echo "==> patching and building kube-apiserver $version into $out" >&2
started=$SECONDS
work=$out/work
rm -rf "$work" "$out/kube-apiserver"
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
cd "$work/module"
# The patched etcd client sends the selectors (fast: etcd and gRPC packages only).
GOFLAGS=-mod=mod go test -tags pushdown -count=1 ./pushdown >&2
minor=$(cut -d. -f2 <<<"$version")
# Same version stamp as scripts/kube-build.sh (otherwise v0.0.0).
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version \
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
  -X k8s.io/client-go/pkg/version.gitVersion=$version"
GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$out/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
echo "$stamp" >"$out/patches.sha256"
echo "    built in $((SECONDS - started)) s" >&2
echo "$out"
