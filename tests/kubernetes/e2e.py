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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kube_cluster import Cluster, Failure, check, free_port

CUSTOM_RESOURCES = 300
CONFIGMAPS = 60
SECRETS = 20
DEPLOYMENTS = 3
EVENT_TTL_SECONDS = 10
COMPACTION_INTERVAL = "5s"


class E2ECluster(Cluster):
    """kubeshard, then kube-apiserver (its compactor every few seconds,
    events with a short TTL) and kube-controller-manager over it."""

    def __init__(self, args, work):
        super().__init__(args.kube_bin, work)
        self.args = args

    def start(self):
        self.make_certs()
        etcd_port = free_port()
        ks = [self.args.kubeshard, "--listen-address", f"127.0.0.1:{etcd_port}",
              "--metrics-bind-address", ""]
        if self.args.config:
            ks += ["--config", self.args.config]
        else:
            ks += ["--endpoint", self.args.endpoint]
        scheme, etcd_tls = "http", []
        if self.args.tls:
            server_tls, etcd_tls = self.etcd_tls()
            ks += server_tls
            scheme = "https"
        self.spawn("kubeshard", ks)
        self.start_apiserver(f"{scheme}://127.0.0.1:{etcd_port}",
                             watch_cache=self.args.watch_cache == "on",
                             extra_args=[f"--etcd-compaction-interval={COMPACTION_INTERVAL}",
                                         f"--event-ttl={EVENT_TTL_SECONDS}s", *etcd_tls])
        self.start_controller_manager()


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
    parser.add_argument("--tls", action="store_true",
                        help="kube-apiserver reaches kubeshard over mutual TLS")
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
    cluster = E2ECluster(args, work)
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
