#!/usr/bin/env python3
"""Selector push-down end to end: the patched kube-apiserver
(scripts/kube-build-pushdown.sh) with its watch cache off over kubeshard
must answer lists and watches by label and field selector exactly as the
stock kube-apiserver (watch cache on, the default) over etcd does.

Usage: pushdown_e2e.py --kube-bin DIR --pushdown-apiserver BIN --etcd BIN
                       --kubeshard BIN (--endpoint URL | --config FILE) --work DIR

Both clusters get the same objects (custom resources with a selectable
field, ConfigMaps, Pods bound to nodes that do not exist, so nothing runs),
then the same lists (namespaced and across namespaces, whole and in chunks)
and the same changes under the same watches (objects entering, leaving,
changing inside and outside the selection, deleted, created). Every answer
is compared by namespace, name and event type, and kubeshard's metrics must
show that the selectors reached it. Exits non-zero on the first difference.
"""

import argparse
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from kube_cluster import Cluster, Failure, check, free_port

GROUP = "pushdown.e2e.io"
NAMESPACES = ["pd-a", "pd-b"]
APPS = ["web", "db", None]
TIERS = ["a", "b", None]
COLORS = ["red", "blue", "green"]

# (resource, label selector, field selector)
LISTS = [
    ("widgets", "app=web", ""),
    ("widgets", "app!=web", ""),
    ("widgets", "app in (web,db),tier", ""),
    ("widgets", "!app", ""),
    ("widgets", "tier notin (a)", ""),
    ("widgets", "app=db,tier=b", ""),
    ("widgets", "", "spec.color=red"),
    ("widgets", "app=web", "spec.color!=blue"),
    ("widgets", "", "metadata.name=w-7"),
    ("widgets", "", "metadata.namespace=pd-b"),
    ("configmaps", "app=web", ""),
    ("configmaps", "tier", "metadata.name!=cm-3"),
    ("pods", "app=web", ""),
    ("pods", "", "spec.nodeName=node-1"),
    ("pods", "app=db", "status.phase=Pending"),
]


def crd():
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{GROUP}"},
        "spec": {
            "group": GROUP, "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "selectableFields": [{"jsonPath": ".spec.color"}],
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {
                        "size": {"type": "integer"}, "color": {"type": "string"}}}}}},
            }],
        },
    }


def labels(i):
    out = {}
    if APPS[i % 3]:
        out["app"] = APPS[i % 3]
    if TIERS[(i // 3) % 3]:
        out["tier"] = TIERS[(i // 3) % 3]
    return out


def widget(ns, i):
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget",
            "metadata": {"name": f"w-{i}", "namespace": ns, "labels": labels(i)},
            "spec": {"size": i, "color": COLORS[(i // 2) % 3]}}


def configmap(i):
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"cm-{i}", "namespace": "pd-a", "labels": labels(i + 1)},
            "data": {"i": str(i)}}


def pod(i):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"p-{i}", "namespace": "pd-a", "labels": labels(i + 2)},
            "spec": {"nodeName": f"node-{i % 2 + 1}", "automountServiceAccountToken": False,
                     "containers": [{"name": "c", "image": "registry.invalid/none:1"}]}}


def populate(c):
    for ns in NAMESPACES:
        c.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        c.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": "default", "namespace": ns}})
    c.apply(crd())
    c.wait_for("the Widget CRD", lambda: "widgets" in c.kubectl_raw(
        "api-resources", "--api-group", GROUP, "-o", "name"))
    c.create([widget("pd-a", i) for i in range(45)] + [widget("pd-b", i) for i in range(15)])
    c.create([configmap(i) for i in range(20)])
    c.create([pod(i) for i in range(16)])


def names(items):
    return sorted((o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in items)


def list_all(c, resource, label, field, namespace, chunk):
    argv = ["get", resource, f"--chunk-size={chunk}"]
    argv += ["-n", namespace] if namespace else ["--all-namespaces"]
    if label:
        argv += ["-l", label]
    if field:
        argv += ["--field-selector", field]
    return names(c.kubectl_json(*argv)["items"])


def compare_lists(ref, pd):
    nonempty = 0
    for resource, label, field in LISTS:
        for namespace in ["pd-a", None]:
            for chunk in [0, 4]:
                what = f"{resource} -l {label!r} --field-selector {field!r} " \
                       f"{'-n ' + namespace if namespace else '-A'} --chunk-size={chunk}"
                want = list_all(ref, resource, label, field, namespace, chunk)
                got = list_all(pd, resource, label, field, namespace, chunk)
                check(got == want, f"{what}: push-down {got}, reference {want}")
                nonempty += bool(want)
    # The selectors select something, and not everything.
    check(nonempty >= len(LISTS), f"only {nonempty} lists had items")


# (resource, selectors, from the list's resourceVersion (or, without one,
# starting with the objects that exist: ADDED events))
WATCHES = [
    ("widgets", {"labelSelector": "app=web"}, True),
    ("widgets", {"fieldSelector": "spec.color=red"}, True),
    ("widgets", {"labelSelector": "tier=b", "fieldSelector": "spec.color!=green"}, False),
    ("configmaps", {"labelSelector": "app in (web,db)"}, True),
    ("pods", {"fieldSelector": "spec.nodeName=node-1"}, False),
]
WATCH_SECONDS = 12


def path_of(resource, namespace):
    if resource == "widgets":
        return f"/apis/{GROUP}/v1/namespaces/{namespace}/widgets"
    return f"/api/v1/namespaces/{namespace}/{resource}"


def start_watches(c):
    """Watches from the current resourceVersion or from now; each ends by itself."""
    procs = []
    for resource, params, from_list in WATCHES:
        listed = json.loads(c.kubectl_raw("get", "--raw", path_of(resource, "pd-a") + "?limit=1"))
        rv = listed["metadata"]["resourceVersion"] if from_list else ""
        check(rv or not from_list, f"no resourceVersion in the list of {resource}")
        query = dict(params, watch="true", resourceVersion=rv,
                     timeoutSeconds=str(WATCH_SECONDS), allowWatchBookmarks="false")
        url = f"{path_of(resource, 'pd-a')}?{urllib.parse.urlencode(query)}"
        argv = [str(c.kube_bin / "kubectl"), f"--kubeconfig={c.kubeconfig}",
                "get", "--raw", url]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def change(c):
    """Objects entering, leaving and changing inside and outside the
    selections, deleted and created."""
    def patch(resource, name, body):
        c.kubectl_raw("patch", resource, name, "-n", "pd-a", "--type=merge",
                      "-p", json.dumps(body))
    patch("widgets", "w-1", {"metadata": {"labels": {"app": "web"}}})      # db -> web
    patch("widgets", "w-0", {"metadata": {"labels": {"app": "db"}}})       # web -> db
    patch("widgets", "w-3", {"spec": {"color": "red"}})                    # web, enters red
    patch("widgets", "w-4", {"spec": {"size": 400}})                       # db, unrelated
    patch("widgets", "w-9", {"metadata": {"labels": {"tier": "b"}}})
    patch("configmaps", "cm-2", {"metadata": {"labels": {"app": None}}})   # leaves
    c.kubectl_raw("delete", "widgets", "w-6", "w-7", "-n", "pd-a")
    c.kubectl_raw("delete", "configmap", "cm-5", "-n", "pd-a")
    c.kubectl_raw("delete", "pod", "p-0", "p-1", "-n", "pd-a", "--grace-period=0", "--force")
    c.create([widget("pd-a", 100), widget("pd-a", 101), configmap(100)])


def collect(procs):
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=WATCH_SECONDS + 60)
        check(p.returncode == 0, f"watch failed: {stderr.strip()}")
        events = []
        decoder = json.JSONDecoder()
        text, at = stdout.strip(), 0
        while at < len(text):
            obj, end = decoder.raw_decode(text, at)
            at = end
            while at < len(text) and text[at].isspace():
                at += 1
            events.append((obj["type"], obj["object"]["metadata"]["name"]))
        out.append(events)
    return out


def metric(url, name):
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kube-bin", required=True)
    ap.add_argument("--pushdown-apiserver", required=True)
    ap.add_argument("--etcd", required=True)
    ap.add_argument("--kubeshard", required=True)
    ap.add_argument("--endpoint")
    ap.add_argument("--config")
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    work = Path(args.work).resolve()
    (work / "reference").mkdir(parents=True, exist_ok=True)
    (work / "pushdown").mkdir(parents=True, exist_ok=True)
    ref = Cluster(args.kube_bin, work / "reference")
    pd = Cluster(args.kube_bin, work / "pushdown", apiserver=args.pushdown_apiserver)
    try:
        ref.make_certs()
        client, peer = free_port(), free_port()
        ref.spawn("etcd", [args.etcd, "--name", "reference",
                           "--data-dir", str(work / "reference" / "etcd"),
                           "--listen-client-urls", f"http://127.0.0.1:{client}",
                           "--advertise-client-urls", f"http://127.0.0.1:{client}",
                           "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                           "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                           "--initial-cluster", f"reference=http://127.0.0.1:{peer}"])
        ref.start_apiserver(f"http://127.0.0.1:{client}", watch_cache=True)

        pd.make_certs()
        port, metrics_port = free_port(), free_port()
        ks = [args.kubeshard, "--listen-address", f"127.0.0.1:{port}",
              "--metrics-bind-address", f"127.0.0.1:{metrics_port}"]
        ks += ["--config", args.config] if args.config else ["--endpoint", args.endpoint]
        pd.spawn("kubeshard", ks)
        pd.start_apiserver(f"http://127.0.0.1:{port}", watch_cache=False)

        for c in (ref, pd):
            populate(c)
        compare_lists(ref, pd)
        print(f"  lists: {len(LISTS) * 4} equal", flush=True)

        procs = [start_watches(c) for c in (ref, pd)]
        time.sleep(3)  # the watches are open before anything changes
        for c in (ref, pd):
            change(c)
        want, got = (collect(p) for p in procs)
        for (resource, params, _), w, g in zip(WATCHES, want, got):
            check(g == w, f"watch {resource} {params}: push-down {g}, reference {w}")
            check(w, f"watch {resource} {params} saw nothing on the reference")
        print(f"  watches: {len(WATCHES)} equal", flush=True)
        compare_lists(ref, pd)

        url = f"http://127.0.0.1:{metrics_port}/metrics"
        ranges = metric(url, 'kubeshard_selected_requests_total{kind="range"}')
        watches = metric(url, 'kubeshard_selected_requests_total{kind="watch"}')
        check(ranges >= len(LISTS), f"only {ranges} selected ranges reached kubeshard")
        check(watches >= len(WATCHES), f"only {watches} selected watches reached kubeshard")
        print(f"  kubeshard received {ranges:.0f} selected ranges, {watches:.0f} watches")
        return 0
    except (Failure, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        print(ref.log_tails(), file=sys.stderr)
        print(pd.log_tails(), file=sys.stderr)
        return 1
    finally:
        pd.stop()
        ref.stop()


if __name__ == "__main__":
    sys.exit(main())
