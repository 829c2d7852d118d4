#!/usr/bin/env python3
"""End-to-end run of a real kube-apiserver (and kube-controller-manager) on
kubeshard, driven with kubectl, checking counts and contents.

Usage: e2e.py --kube-bin DIR --kubeshard BIN (--endpoint URL | --config FILE)
              [--watch-cache on|off] [--work DIR]

Steps: start kubeshard, kube-apiserver (its own compactor every few seconds,
events with a short TTL) and kube-controller-manager; then create a
namespace, Deployments (whose ReplicaSets and Pods the controllers create),
ConfigMaps, Secrets, a CustomResourceDefinition and hundreds of custom
resources; list with label selectors and pagination; watch and see events;
update with a conflict; delete; see Events expire through their lease; check
that the compactor ran without errors. Exits non-zero on the first failed
check, printing the tails of the server logs.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CUSTOM_RESOURCES = 300
CONFIGMAPS = 60
SECRETS = 20
DEPLOYMENTS = 3
EVENT_TTL_SECONDS = 10
COMPACTION_INTERVAL = "5s"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


class Cluster:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.procs = []
        self.logs = {}
        self.kubeconfig = work / "admin.kubeconfig"

    # ---- processes --------------------------------------------------------

    def spawn(self, name, argv):
        log = open(self.work / f"{name}.log", "w")
        self.logs[name] = self.work / f"{name}.log"
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self):
        for _, proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def log_tails(self, lines=40):
        out = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines()
            out.append(f"---- {name} ({path}), last {lines} lines ----")
            out.extend(text[-lines:])
        return "\n".join(out)

    def wait_for(self, what, predicate, timeout=120, interval=0.5):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                result = predicate()
                if result:
                    return result
            except (Failure, subprocess.CalledProcessError, ValueError) as e:
                last = e
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise Failure(f"{name} exited with {proc.returncode} while waiting for {what}")
            time.sleep(interval)
        raise Failure(f"timed out after {timeout}s waiting for {what} (last: {last})")

    # ---- certificates -----------------------------------------------------

    def openssl(self, *argv):
        subprocess.run(["openssl", *argv], cwd=self.work, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def make_certs(self):
        self.openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                     "-out", "ca.crt", "-days", "2", "-subj", "/CN=kubeshard-e2e-ca")
        self.openssl("genrsa", "-out", "sa.key", "2048")
        self.openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "admin.key",
                     "-out", "admin.csr", "-subj", "/O=system:masters/CN=kubeshard-e2e-admin")
        self.openssl("x509", "-req", "-in", "admin.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                     "-CAcreateserial", "-out", "admin.crt", "-days", "2")

    def write_kubeconfig(self, port):
        self.server = f"https://127.0.0.1:{port}"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {
                "server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {
                "client-certificate": str(self.work / "admin.crt"),
                "client-key": str(self.work / "admin.key")}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "admin"}}],
            "current-context": "e2e",
        }))

    # ---- start ------------------------------------------------------------

    def start(self):
        self.make_certs()
        etcd_port = free_port()
        ks = [self.args.kubeshard, "--listen-address", f"127.0.0.1:{etcd_port}",
              "--metrics-bind-address", ""]
        if self.args.config:
            ks += ["--config", self.args.config]
        else:
            ks += ["--endpoint", self.args.endpoint]
        self.spawn("kubeshard", ks)
        api_port = free_port()
        self.write_kubeconfig(api_port)
        bin_dir = Path(self.args.kube_bin)
        self.spawn("kube-apiserver", [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--etcd-compaction-interval={COMPACTION_INTERVAL}",
            f"--event-ttl={EVENT_TTL_SECONDS}s",
            f"--watch-cache={'true' if self.args.watch_cache == 'on' else 'false'}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}", f"--cert-dir={self.work / 'serving'}",
            f"--client-ca-file={self.work / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={self.work / 'sa.key'}",
            f"--service-account-signing-key-file={self.work / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--enable-priority-and-fairness=false",
            "--v=1",
        ])
        self.wait_for("kube-apiserver /readyz",
                      lambda: self.kubectl_raw("get", "--raw", "/readyz").strip() == "ok",
                      timeout=180)
        self.spawn("kube-controller-manager", [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            f"--service-account-private-key-file={self.work / 'sa.key'}",
            f"--root-ca-file={self.work / 'ca.crt'}",
            "--use-service-account-credentials=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--v=1",
        ])

    # ---- kubectl ----------------------------------------------------------

    def kubectl_raw(self, *argv, stdin=None, check_ok=True):
        argv = [str(Path(self.args.kube_bin) / "kubectl"), f"--kubeconfig={self.kubeconfig}", *argv]
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
        if check_ok and p.returncode != 0:
            raise Failure(f"kubectl {' '.join(argv[2:])} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout if check_ok else p

    def kubectl_json(self, *argv):
        return json.loads(self.kubectl_raw(*argv, "-o", "json"))

    def apply(self, obj):
        return self.kubectl_raw("apply", "-f", "-", stdin=json.dumps(obj))

    def create(self, objs):
        """Creates many objects in one kubectl call (a List)."""
        return self.kubectl_raw("create", "-f", "-",
                                stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))


NS = "e2e"
GROUP = "kubeshard.e2e.io"


def crd():
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{GROUP}"},
        "spec": {
            "group": GROUP, "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {
                        "size": {"type": "integer"}, "color": {"type": "string"}}}}}},
            }],
        },
    }


def widget(i):
    return {
        "apiVersion": f"{GROUP}/v1", "kind": "Widget",
        "metadata": {"name": f"w-{i:04d}", "namespace": NS,
                     "labels": {"parity": "even" if i % 2 == 0 else "odd",
                                "decade": str(i // 10)}},
        "spec": {"size": i, "color": ["red", "green", "blue"][i % 3]},
    }


def deployment(i):
    labels = {"app": f"web-{i}"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"web-{i}", "namespace": NS, "labels": {"tier": "web"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "c", "image": "registry.invalid/none:1"}]}}},
    }


def run(cluster):
    k = cluster
    results = []

    def step(name):
        results.append(name)
        print(f"--> {name}", flush=True)

    step("namespace")
    k.kubectl_raw("create", "namespace", NS)
    ns = k.kubectl_json("get", "namespace", NS)
    check(ns["status"]["phase"] == "Active", f"namespace phase {ns['status']}")

    step("watch ConfigMaps while writing")
    watch_out = k.work / "watch.jsonl"
    watcher = subprocess.Popen(
        [str(Path(k.args.kube_bin) / "kubectl"), f"--kubeconfig={k.kubeconfig}",
         "get", "configmaps", "-n", NS, "-l", "e2e=watched", "--watch", "--output-watch-events",
         "-o", "json"], stdout=open(watch_out, "w"), stderr=subprocess.DEVNULL)
    time.sleep(2)

    step(f"{CONFIGMAPS} ConfigMaps and {SECRETS} Secrets")
    cms = [{"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"cm-{i:03d}", "namespace": NS,
                         "labels": {"e2e": "watched" if i < 10 else "bulk", "group": str(i % 4)}},
            "data": {"index": str(i), "payload": "x" * (i * 10)}} for i in range(CONFIGMAPS)]
    k.create(cms)
    secrets = [{"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": f"secret-{i:02d}", "namespace": NS},
                "stringData": {"token": f"t-{i}"}} for i in range(SECRETS)]
    k.create(secrets)
    got = k.kubectl_json("get", "configmaps", "-n", NS, "-l", "group=1")
    names = sorted(i["metadata"]["name"] for i in got["items"])
    check(names == sorted(f"cm-{i:03d}" for i in range(CONFIGMAPS) if i % 4 == 1),
          f"configmaps with group=1: {names}")
    one = k.kubectl_json("get", "configmap", "cm-042", "-n", NS)
    check(one["data"] == {"index": "42", "payload": "x" * 420}, "cm-042 data")
    secret = k.kubectl_json("get", "secret", "secret-07", "-n", NS)
    check(secret["data"]["token"] == "dC03", f"secret-07 data {secret['data']}")  # base64("t-7")

    step("update with a conflict")
    stale = k.kubectl_json("get", "configmap", "cm-001", "-n", NS)
    fresh = dict(stale, data={"index": "1", "payload": "updated"})
    k.kubectl_raw("replace", "-f", "-", stdin=json.dumps(fresh))
    conflicting = dict(stale, data={"index": "1", "payload": "stale write"})
    p = k.kubectl_raw("replace", "-f", "-", stdin=json.dumps(conflicting), check_ok=False)
    check(p.returncode != 0 and "the object has been modified" in p.stderr,
          f"a stale replace must conflict: rc={p.returncode} {p.stderr.strip()}")
    now = k.kubectl_json("get", "configmap", "cm-001", "-n", NS)
    check(now["data"]["payload"] == "updated", "the conflicting write changed cm-001")

    step("delete watched ConfigMaps")
    for i in range(5):
        k.kubectl_raw("delete", "configmap", f"cm-{i:03d}", "-n", NS)
    k.wait_for("the watch to see 10 ADDED, 1 MODIFIED, 5 DELETED", lambda: watch_counts(watch_out) ==
               {"ADDED": 10, "MODIFIED": 1, "DELETED": 5}, timeout=60)
    watcher.terminate()

    step("CustomResourceDefinition")
    k.apply(crd())
    k.wait_for("the CRD to be established", lambda: any(
        c["type"] == "Established" and c["status"] == "True"
        for c in k.kubectl_json("get", "crd", f"widgets.{GROUP}")["status"].get("conditions", [])))
    k.wait_for("widgets to be served", lambda: k.kubectl_raw(
        "get", "widgets", "-n", NS, check_ok=False).returncode == 0)

    step(f"{CUSTOM_RESOURCES} custom resources")
    for start in range(0, CUSTOM_RESOURCES, 100):
        k.create([widget(i) for i in range(start, min(start + 100, CUSTOM_RESOURCES))])
    all_widgets = k.kubectl_json("get", "widgets", "-n", NS)
    check(len(all_widgets["items"]) == CUSTOM_RESOURCES, f"{len(all_widgets['items'])} widgets listed")
    sizes = sorted(w["spec"]["size"] for w in all_widgets["items"])
    check(sizes == list(range(CUSTOM_RESOURCES)), "widget contents")

    step("label selectors and pagination")
    even = k.kubectl_json("get", "widgets", "-n", NS, "-l", "parity=even", "--chunk-size=7")
    check(len(even["items"]) == CUSTOM_RESOURCES // 2, f"{len(even['items'])} even widgets")
    check(all(w["spec"]["size"] % 2 == 0 for w in even["items"]), "odd widget in the even list")
    decade = k.kubectl_json("get", "widgets", "-n", NS, "-l", "decade=12,parity=odd")
    check(sorted(w["metadata"]["name"] for w in decade["items"]) ==
          [f"w-{i:04d}" for i in range(121, 130, 2)], "widgets of decade 12, odd")
    pages, total, token = 0, 0, None
    while True:
        path = f"/apis/{GROUP}/v1/namespaces/{NS}/widgets?limit=50"
        if token:
            path += f"&continue={token}"
        page = json.loads(k.kubectl_raw("get", "--raw", path))
        pages += 1
        total += len(page["items"])
        token = page["metadata"].get("continue")
        if not token:
            break
    check((pages, total) == (CUSTOM_RESOURCES // 50, CUSTOM_RESOURCES),
          f"raw pagination: {pages} pages, {total} items")

    step("update and delete custom resources")
    k.kubectl_raw("label", "widgets", "-n", NS, "-l", "decade=0", "touched=yes")
    touched = k.kubectl_json("get", "widgets", "-n", NS, "-l", "touched=yes")
    check(len(touched["items"]) == 10, f"{len(touched['items'])} widgets labelled")
    k.kubectl_raw("delete", "widgets", "-n", NS, "-l", "parity=odd", "--wait=false")
    left = k.kubectl_json("get", "widgets", "-n", NS)
    check(len(left["items"]) == CUSTOM_RESOURCES // 2, f"{len(left['items'])} widgets left after delete")

    step("Deployments: ReplicaSets and Pods by the controllers")
    k.create([deployment(i) for i in range(DEPLOYMENTS)])
    k.wait_for(f"{DEPLOYMENTS * 2} pods", lambda: len(
        k.kubectl_json("get", "pods", "-n", NS)["items"]) == DEPLOYMENTS * 2, timeout=120)
    rs = k.kubectl_json("get", "replicasets", "-n", NS)
    check(len(rs["items"]) == DEPLOYMENTS, f"{len(rs['items'])} replicasets")
    pods = k.kubectl_json("get", "pods", "-n", NS, "-l", "app=web-1")
    check(len(pods["items"]) == 2, f"{len(pods['items'])} pods of web-1")
    k.kubectl_raw("scale", "deployment", "web-0", "-n", NS, "--replicas=4")
    k.wait_for("web-0 to have 4 pods", lambda: len(
        k.kubectl_json("get", "pods", "-n", NS, "-l", "app=web-0")["items"]) == 4, timeout=120)
    k.kubectl_raw("delete", "deployment", "web-2", "-n", NS)
    k.wait_for("web-2's pods to go", lambda: len(
        k.kubectl_json("get", "pods", "-n", NS, "-l", "app=web-2")["items"]) == 0, timeout=120)

    if k.args.expect_keys or k.args.expect_no_keys:
        step("objects live on the shards the topology names")
        check_placement([(u, p, True) for u, p in (e.split("=", 1) for e in k.args.expect_keys)] +
                        [(u, p, False) for u, p in (e.split("=", 1) for e in k.args.expect_no_keys)])

    step("Events expire through their lease")
    events = k.kubectl_json("get", "events", "-n", NS)
    check(len(events["items"]) > 0, "the controllers recorded no events")
    first = {e["metadata"]["name"] for e in events["items"]}
    # Events live EVENT_TTL_SECONDS; then their lease expires and kubeshard
    # deletes them. Those recorded before now must all be gone.
    k.wait_for("the first events to expire", lambda: not (first & {
        e["metadata"]["name"] for e in k.kubectl_json("get", "events", "-n", NS)["items"]}),
        timeout=EVENT_TTL_SECONDS + 60)

    step("compaction by kube-apiserver's compactor")
    log = cluster.logs["kube-apiserver"]
    k.wait_for("a compaction in kubeshard's log", lambda: "compaction removed history" in
               cluster.logs["kubeshard"].read_text(errors="replace"), timeout=60)
    api_log = log.read_text(errors="replace")
    check("compact failed" not in api_log,
          "kube-apiserver reported a failed compaction")

    step("cleanup: delete the namespace")
    k.kubectl_raw("delete", "namespace", NS, "--wait=false")
    k.wait_for("the namespace to be gone", lambda: k.kubectl_raw(
        "get", "namespace", NS, check_ok=False).returncode != 0, timeout=180)
    left = k.kubectl_raw("get", "--raw", f"/apis/{GROUP}/v1/widgets")
    check(json.loads(left)["items"] == [], "widgets left after the namespace was deleted")
    return results


def live_keys(database_url, prefix):
    """Keys under `prefix` in a shard database's table of live keys, read
    with the database's own client: where kubeshard put them."""
    from urllib.parse import urlparse
    u = urlparse(database_url)
    if u.scheme.startswith("postgres"):
        sql = f"SELECT COUNT(*) FROM ks_live WHERE key_bytes LIKE '{prefix}%'::bytea"
        p = subprocess.run(["psql", database_url, "-Atc", sql], capture_output=True, text=True)
    elif u.scheme == "mysql":
        sql = f"SELECT COUNT(*) FROM ks_live WHERE key_bytes LIKE '{prefix}%'"
        p = subprocess.run(["mysql", "-h", u.hostname, "-P", str(u.port or 3306), "-u", u.username,
                            "-N", "-B", "-e", sql, u.path.lstrip("/")],
                           capture_output=True, text=True, env={**os.environ, "MYSQL_PWD": u.password or ""})
    else:
        raise Failure(f"cannot read keys of {database_url}")
    if p.returncode != 0:
        raise Failure(f"counting {prefix} keys in {u.path}: {p.stderr.strip()}")
    return int(p.stdout.strip())


def check_placement(expectations):
    """Each expectation is (database URL, key prefix, whether keys must be there)."""
    for url, prefix, present in expectations:
        n = live_keys(url, prefix)
        where = url.rsplit("/", 1)[-1]
        if present:
            check(n > 0, f"no {prefix} keys in shard database {where}")
        else:
            check(n == 0, f"{n} {prefix} keys in shard database {where}, which should hold none")
        print(f"    {where}: {n} keys under {prefix}", flush=True)


def watch_counts(path):
    """Counts watch event types in kubectl's --output-watch-events JSON stream."""
    text = path.read_text()
    decoder = json.JSONDecoder()
    counts, pos = {}, 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError:
            break
        counts[obj["type"]] = counts.get(obj["type"], 0) + 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kube-bin", required=True)
    parser.add_argument("--kubeshard", required=True)
    parser.add_argument("--endpoint")
    parser.add_argument("--config")
    parser.add_argument("--watch-cache", choices=["on", "off"], default="on")
    parser.add_argument("--work")
    parser.add_argument("--expect-keys", action="append", default=[], metavar="DB_URL=PREFIX",
                        help="after the Deployments step, the shard database must hold keys under PREFIX")
    parser.add_argument("--expect-no-keys", action="append", default=[], metavar="DB_URL=PREFIX",
                        help="... must hold no key under PREFIX")
    args = parser.parse_args()
    if bool(args.endpoint) == bool(args.config):
        parser.error("give exactly one of --endpoint and --config")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kubeshard-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(args, work)
    started = time.time()
    try:
        cluster.start()
        steps = run(cluster)
    except (Failure, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"E2E FAILED: {e}\n{cluster.log_tails()}", file=sys.stderr)
        cluster.stop()
        sys.exit(1)
    cluster.stop()
    print(f"E2E PASSED: {len(steps)} steps in {time.time() - started:.0f} s "
          f"(watch cache {args.watch_cache}, {'--config' if args.config else '--endpoint'})")


if __name__ == "__main__":
    main()
