#!/usr/bin/env python3
"""A cluster moved from etcd to kubeshard with `kubeshard import --follow`,
as an operator would cut it over.

Usage: import_e2e.py --kube-bin DIR --kubeshard BIN --etcd BIN
                     (--endpoint URL | --config FILE) [--work DIR]

Steps:
 1. etcd, kube-apiserver (events live EVENT_TTL_SECONDS) and
    kube-controller-manager; a namespace, Deployments (their ReplicaSets,
    Pods and Events come from the controllers), ConfigMaps, Secrets, a
    CustomResourceDefinition and hundreds of custom resources.
 2. `kubeshard import --follow --verify` into the target; while it
    follows, kubectl keeps writing (creates, updates, deletes).
 3. kube-controller-manager and kube-apiserver stop; the import is stopped
    (SIGTERM): it catches up with etcd, compares, exits 0.
 4. kubeshard serves the target; kube-apiserver and the controller manager
    start on it. Every object is there with its resourceVersion and
    content; an update with an object's current resourceVersion succeeds
    and one with a stale resourceVersion conflicts; a watch from the last
    resourceVersion seen on etcd sees what changes next; the Events made on
    etcd expire through their leases; the Deployments are still reconciled.
Exits non-zero on the first failed check, with the tails of the logs.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from e2e import GROUP, crd  # the custom resource the e2e topology routes
from kube_cluster import Cluster, Failure, check, free_port

CUSTOM_RESOURCES = 300
CONFIGMAPS = 60
SECRETS = 20
DEPLOYMENTS = 3
EVENT_TTL_SECONDS = 60
NS = "moved"
# What is compared before and after the move: (kubectl resource, namespaced).
KINDS = [("configmaps", True), ("secrets", True), (f"widgets.{GROUP}", True),
         ("deployments", True), ("replicasets", True), ("pods", True),
         ("serviceaccounts", True), ("namespaces", False),
         ("customresourcedefinitions", False), ("clusterroles", False)]


def widget(i):
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget",
            "metadata": {"name": f"w-{i:04d}", "namespace": NS,
                         "labels": {"parity": "even" if i % 2 == 0 else "odd"}},
            "spec": {"size": i}}


def configmap(i, payload="initial"):
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"cm-{i:03d}", "namespace": NS},
            "data": {"index": str(i), "payload": payload}}


def deployment(i):
    labels = {"app": f"web-{i}"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": f"web-{i}", "namespace": NS},
            "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                         {"name": "c", "image": "registry.invalid/none:1"}]}}}}


def snapshot(k):
    """name -> (resourceVersion, content without managedFields) of every
    object of KINDS."""
    out = {}
    for kind, namespaced in KINDS:
        argv = ["get", kind] + (["-n", NS] if namespaced else [])
        for item in k.kubectl_json(*argv)["items"]:
            meta = item["metadata"]
            meta.pop("managedFields", None)
            key = f"{kind}/{meta.get('namespace', '')}/{meta['name']}"
            out[key] = (meta["resourceVersion"], json.dumps(item, sort_keys=True))
    return out


class Move(Cluster):
    def __init__(self, args, work):
        super().__init__(args.kube_bin, work)
        self.args = args
        self.import_proc = None

    def start_etcd(self):
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self.etcd_proc = self.spawn("etcd", [
            self.args.etcd, "--name", "moved", "--data-dir", str(self.work / "etcd"),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"moved=http://127.0.0.1:{peer}"])

    def target_args(self):
        if self.args.config:
            return ["--config", self.args.config]
        return ["--endpoint", self.args.endpoint]

    def stop_named(self, name, sig=signal.SIGTERM, timeout=60):
        """Stops process NAME; it no longer counts as one that must run."""
        for entry in list(self.procs):
            n, proc = entry
            if n == name:
                self.procs.remove(entry)
                if proc.poll() is None:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=timeout)
                return proc.returncode
        return None


def run(k, args):
    def step(name):
        print(f"--> {name}", flush=True)

    step("etcd, kube-apiserver and kube-controller-manager")
    k.make_certs()
    k.start_etcd()
    k.start_apiserver(k.etcd_url, extra_args=[f"--event-ttl={EVENT_TTL_SECONDS}s"])
    k.start_controller_manager()

    step("objects on etcd")
    k.kubectl_raw("create", "namespace", NS)
    k.create([configmap(i) for i in range(CONFIGMAPS)])
    k.create([{"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": f"secret-{i:02d}", "namespace": NS},
               "stringData": {"token": f"t-{i}"}} for i in range(SECRETS)])
    k.create([deployment(i) for i in range(DEPLOYMENTS)])
    k.apply(crd())
    k.wait_for("widgets to be served", lambda: k.kubectl_raw(
        "get", "widgets", "-n", NS, check_ok=False).returncode == 0)
    for start in range(0, CUSTOM_RESOURCES, 100):
        k.create([widget(i) for i in range(start, min(start + 100, CUSTOM_RESOURCES))])
    k.wait_for("the Deployments' pods", lambda: len(
        k.kubectl_json("get", "pods", "-n", NS)["items"]) == 2 * DEPLOYMENTS)
    k.wait_for("events from the controllers", lambda: len(
        k.kubectl_json("get", "events", "-n", NS)["items"]) > 0)
    stale = k.kubectl_json("get", "configmap", "cm-001", "-n", NS)

    step("kubeshard import --follow --verify")
    log = open(k.work / "import.log", "w")
    k.import_proc = subprocess.Popen(
        [args.kubeshard, "import", "--from-etcd", k.etcd_url, *k.target_args(),
         "--follow", "--verify"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    k.procs.append(("import", k.import_proc))
    k.logs["import"] = k.work / "import.log"
    k.wait_for("the import to follow etcd", lambda: "following the source" in
               (k.work / "import.log").read_text(), timeout=120)

    step("writes while the import follows")
    k.create([configmap(i, "created while following") for i in range(CONFIGMAPS, CONFIGMAPS + 20)])
    for i in range(1, 11):
        cm = k.kubectl_json("get", "configmap", f"cm-{i:03d}", "-n", NS)
        cm["data"]["payload"] = "updated while following"
        k.kubectl_raw("replace", "-f", "-", stdin=json.dumps(cm))
    for i in range(5):
        k.kubectl_raw("delete", "secret", f"secret-{i:02d}", "-n", NS)
    k.kubectl_raw("scale", "deployment", "web-0", "-n", NS, "--replicas=3")
    k.wait_for("web-0's third pod", lambda: len(
        k.kubectl_json("get", "pods", "-n", NS, "-l", "app=web-0")["items"]) == 3)

    step("cut-over: stop the control plane, then the import")
    # The controllers first, so that nothing changes the objects compared.
    k.stop_named("kube-controller-manager")
    before = snapshot(k)
    # The server's list (kubectl's own List has no resourceVersion).
    last_rv = json.loads(k.kubectl_raw(
        "get", "--raw", f"/api/v1/namespaces/{NS}/configmaps"))["metadata"]["resourceVersion"]
    check(last_rv, "the list has no resourceVersion")
    events_before = {e["metadata"]["name"] for e in
                     k.kubectl_json("get", "events", "-n", NS)["items"]}
    k.stop_named("kube-apiserver")
    # Writes of the last seconds (the apiserver's own, at shutdown) are in
    # etcd; the import catches up with them before it stops.
    rc = k.stop_named("import", timeout=120)
    text = (k.work / "import.log").read_text()
    check(rc == 0, f"kubeshard import exited {rc}")
    check("source and target agree" in text, "the import did not verify")
    k.stop_named("etcd")

    step("kube-apiserver on kubeshard")
    port = free_port()
    k.spawn("kubeshard", [args.kubeshard, "--listen-address", f"127.0.0.1:{port}",
                          "--metrics-bind-address", "", *k.target_args()])
    # Watch cache off: a watch from a resourceVersion older than a restarted
    # apiserver's cache gets 410 Gone from the cache, on etcd as well; off,
    # it is served by the storage, which is what is checked here.
    k.start_apiserver(f"http://127.0.0.1:{port}", watch_cache=False,
                      extra_args=[f"--event-ttl={EVENT_TTL_SECONDS}s"])
    after = snapshot(k)
    missing = sorted(set(before) - set(after))
    check(not missing, f"objects missing after the move: {missing[:10]}")
    changed = sorted(key for key in before if before[key] != after.get(key))
    check(not changed, f"objects with another resourceVersion or content: {changed[:10]}")
    print(f"    {len(before)} objects with the same resourceVersion and content", flush=True)

    step("a watch from the last resourceVersion seen on etcd")
    watch_out = k.work / "watch.json"
    watcher = subprocess.Popen(
        [str(k.kube_bin / "kubectl"), f"--kubeconfig={k.kubeconfig}", "get", "--raw",
         f"/api/v1/namespaces/{NS}/configmaps?watch=1&resourceVersion={last_rv}"
         f"&timeoutSeconds=15&allowWatchBookmarks=false"],
        stdout=open(watch_out, "w"), stderr=subprocess.STDOUT)
    time.sleep(2)
    k.create([configmap(999, "after the move")])
    watcher.wait(timeout=60)
    seen = [json.loads(line) for line in watch_out.read_text().splitlines() if line.strip()]
    names = [(e["type"], e["object"]["metadata"]["name"]) for e in seen]
    check(names == [("ADDED", "cm-999")], f"watch from {last_rv}: {names}")

    step("updates: the current resourceVersion succeeds, a stale one conflicts")
    current = k.kubectl_json("get", "configmap", "cm-002", "-n", NS)
    current["data"]["payload"] = "updated on kubeshard"
    k.kubectl_raw("replace", "-f", "-", stdin=json.dumps(current))
    conflicting = dict(stale, data={"index": "1", "payload": "stale write"})
    p = k.kubectl_raw("replace", "-f", "-", stdin=json.dumps(conflicting), check_ok=False)
    check(p.returncode != 0 and "the object has been modified" in p.stderr,
          f"a stale replace must conflict: rc={p.returncode} {p.stderr.strip()}")

    step("the controllers go on")
    k.start_controller_manager()
    k.kubectl_raw("scale", "deployment", "web-1", "-n", NS, "--replicas=3")
    k.wait_for("web-1's third pod", lambda: len(
        k.kubectl_json("get", "pods", "-n", NS, "-l", "app=web-1")["items"]) == 3)

    step("the Events made on etcd expire through their leases")
    check(events_before, "no events before the move")
    k.wait_for("the events from before the move to expire", lambda: not (events_before & {
        e["metadata"]["name"] for e in k.kubectl_json("get", "events", "-n", NS)["items"]}),
        timeout=EVENT_TTL_SECONDS + 120, interval=2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kube-bin", required=True)
    p.add_argument("--kubeshard", required=True)
    p.add_argument("--etcd", required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint")
    target.add_argument("--config")
    p.add_argument("--work")
    args = p.parse_args()
    work = Path(args.work) if args.work else Path(os.getcwd()) / "import-e2e"
    work.mkdir(parents=True, exist_ok=True)
    k = Move(args, work)
    try:
        run(k, args)
        print("import end to end: passed", flush=True)
        return 0
    except (Failure, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"FAILED: {e}\n{k.log_tails()}", file=sys.stderr, flush=True)
        return 1
    finally:
        k.stop()


if __name__ == "__main__":
    sys.exit(main())
