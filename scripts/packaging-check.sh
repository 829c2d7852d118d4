#!/usr/bin/env bash
# Checks what operators deploy kubeshard with (deploy/):
#   - the systemd unit passes `systemd-analyze verify` with no complaint, and
#     the binary starts from the variables of its environment file;
#   - the Helm chart passes `helm lint --strict`, and what `helm template`
#     renders (default values; TLS both ways) and the static-pod manifest
#     validate with kubeconform -strict against Kubernetes 1.34.4's schemas
#     (tests/packaging/k8s_schemas.py, from the API's OpenAPI document);
#   - kubeconform rejects a misspelt field, so the check can fail.
# helm and kubeconform are built from the Go module proxy and cached in
# ${KUBESHARD_CACHE:-~/.cache/kubeshard}. Needs: go, python3,
# target/debug/kubeshard (or KUBESHARD_BIN).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
helm_version=v4.3.2
kubeconform_version=v0.8.0
kube_version=v1.34.4
cache=${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}
tools=$cache/tools-helm-$helm_version-kubeconform-$kubeconform_version
kubeshard=${KUBESHARD_BIN:-$root/target/debug/kubeshard}
work=$root/target/packaging-check
rm -rf "$work" && mkdir -p "$work"
step() { echo "==> packaging: $*" >&2; }
fail() { echo "packaging check FAILED: $*" >&2; exit 1; }

if [[ ! -x $tools/helm || ! -x $tools/kubeconform ]]; then
  step "building helm $helm_version and kubeconform $kubeconform_version into $tools"
  mkdir -p "$tools"
  (cd "$work" && GOBIN=$tools go install "github.com/yannh/kubeconform/cmd/kubeconform@$kubeconform_version")
  (cd "$work" && GOBIN=$tools go install "helm.sh/helm/v4/cmd/helm@$helm_version")
fi
schemas=$cache/k8s-schemas-$kube_version
if [[ ! -s $schemas/deployment-apps-v1.json ]]; then
  step "schemas of Kubernetes $kube_version"
  swagger=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$kube_version" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')/api/openapi-spec/swagger.json
  python3 tests/packaging/k8s_schemas.py "$swagger" "$schemas.tmp" && rm -rf "$schemas" && mv "$schemas.tmp" "$schemas"
fi
validate() { # FILES...: kubeconform -strict against the local schemas
  "$tools/kubeconform" -strict -summary -schema-location "$schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json" "$@"
}

step "systemd unit"
[[ -x $kubeshard ]] || fail "$kubeshard is missing (cargo build -p kubeshard)"
sed "s|^ExecStart=/usr/local/bin/kubeshard|ExecStart=$kubeshard|" deploy/systemd/kubeshard.service >"$work/kubeshard.service"
out=$(systemd-analyze verify "$work/kubeshard.service" 2>&1) || fail "systemd-analyze verify: $out"
[[ -z $out ]] || fail "systemd-analyze verify complained: $out"
# The environment file's variables start the binary (paths moved to $work).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
(
  set -a
  # shellcheck disable=SC1091
  source deploy/systemd/kubeshard.default
  set +a
  KUBESHARD_LISTEN_ADDRESS=127.0.0.1:$port KUBESHARD_METRICS_BIND_ADDRESS=127.0.0.1:$mport \
    KUBESHARD_ENDPOINT=sqlite://$work/state.db exec timeout 30 "$kubeshard"
) >"$work/kubeshard.log" 2>&1 &
pid=$!
ready=""
for _ in $(seq 100); do
  ready=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode().strip())' \
    "http://127.0.0.1:$mport/readyz" 2>/dev/null || true)
  [[ $ready == ok ]] && break
  sleep 0.1
done
kill -TERM "$pid" 2>/dev/null || true
wait "$pid" || fail "kubeshard with kubeshard.default did not exit 0 on SIGTERM: $(tail -5 "$work/kubeshard.log")"
[[ $ready == ok ]] || fail "kubeshard with kubeshard.default never became ready: $(tail -20 "$work/kubeshard.log")"
grep -q '"message":"serving the etcd v3 API"\|serving the etcd v3 API' "$work/kubeshard.log" || fail "no start line in the log"

step "Helm chart: lint and render"
chart=deploy/helm/kubeshard
"$tools/helm" lint --strict "$chart" >"$work/lint.txt" 2>&1 || { cat "$work/lint.txt" >&2; fail "helm lint"; }
"$tools/helm" template demo "$chart" --namespace kube-system >"$work/default.yaml"
"$tools/helm" template demo "$chart" --namespace kube-system \
  --set tls.enabled=true --set tls.secretName=kubeshard-tls \
  --set databaseTls.enabled=true --set databaseTls.secretName=db-ca \
  --set databaseTls.clientCertificate=true >"$work/tls.yaml"
grep -q -- '--trusted-ca-file=/etc/kubeshard/tls/ca.crt' "$work/tls.yaml" || fail "TLS values not rendered"
grep -q -- '--cert-file=/etc/kubeshard/database-tls/tls.crt' "$work/tls.yaml" || fail "database TLS values not rendered"
if "$tools/helm" template demo "$chart" --set tls.enabled=true >/dev/null 2>"$work/missing.txt"; then
  fail "tls.enabled without a secret rendered"
fi

step "kubeconform -strict (Kubernetes $kube_version)"
validate "$work/default.yaml" "$work/tls.yaml" deploy/kubernetes/kubeshard-static-pod.yaml
sed 's/^  replicas:/  replica:/' "$work/default.yaml" >"$work/broken.yaml"
if validate "$work/broken.yaml" >"$work/broken.txt" 2>&1; then
  fail "kubeconform accepted a misspelt field (replica:)"
fi
step "passed"
