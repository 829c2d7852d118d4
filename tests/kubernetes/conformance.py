#!/usr/bin/env python3
"""Kubernetes' own e2e suites (e2e.test under ginkgo) against one storage
target, on a control plane without kubelets: kube-apiserver,
kube-controller-manager, kube-scheduler, and kwok playing a few fake nodes.

Run by scripts/kube-conformance.sh, inside a private network namespace
(`unshare -n`): the tests create pods, services and webhooks that point at
addresses which exist nowhere, and their traffic must not leave the machine.
This script refuses to start where any interface but the loopback exists.

Usage: conformance.py regex LIST_FILE
       conformance.py run --target NAME --work DIR --kube-bin DIR --suite DIR
           --kwok BIN [--etcd BIN] [--kubeshard BIN] [--pushdown-apiserver BIN]
           [--focus RE] [--skip RE] [--procs N] [--timeout DURATION]
       conformance.py compare --baseline A.tsv [--baseline A2.tsv ...]
           --target-results B.tsv [--known FILE] [--write-differences FILE]
           [--write-fixed FILE]
       conformance.py split --work DIR --sigs SIG[,SIG...] --out DIR

Targets: etcd (3.6, the baseline); kubeshard-sqlite (one SQLite shard);
kubeshard-6 (six shards on PostgreSQL and MariaDB over their Unix sockets:
pods hashed by namespace over two, events, leases, custom resources, and
the rest); kubeshard-pushdown (kubeshard-6 with the patched kube-apiserver,
watch cache off).

`run` writes DIR/results.tsv (spec, then passed/failed/skipped) from the
suite's JUnit report, and DIR/summary.json. `compare` prints the specs that
pass on every baseline run and fail on the target, and fails unless they
are exactly those listed in the known-differences file. `split` files a
run's results by SIG (scripts/kube-conformance-full.sh).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from kube_cluster import Cluster, Failure, check, free_port

HERE = Path(__file__).resolve().parent
STAGES = HERE / "conformance" / "kwok-stages.yaml"

# The address kube-apiserver advertises (the `kubernetes` service's
# endpoint) and the fake nodes' InternalIP: it exists only on this
# namespace's loopback.
NODE_ADDRESS = "10.200.0.1"
SERVICE_RANGE = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
NODES = 3
KUBE_VERSION = "v1.34.4"

PG_SOCKET_DIR = "/var/run/postgresql"
MYSQL_SOCKET = "/run/mysqld/mysqld.sock"
DB_USER = "kubeshard"
DB_PASSWORD = "kubeshard"

# Feature gates of the published runs that 1.34 still has; MutatingAdmission
# Policy also needs its API versions served.
FEATURE_GATES = ("WatchList=true,WatchListClient=true,OrderedNamespaceDeletion=true,"
                 "CustomResourceFieldSelectors=true,MutatingAdmissionPolicy=true")
RUNTIME_CONFIG = "admissionregistration.k8s.io/v1alpha1=true,admissionregistration.k8s.io/v1beta1=true"


def interfaces():
    """This process's network interfaces (/proc follows the namespace;
    /sys/class/net shows the one /sys was mounted in)."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


def in_private_namespace():
    """True when the loopback is this namespace's only interface."""
    return interfaces() == ["lo"]


def sh(*argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


# ---- storage targets ---------------------------------------------------------


def sharded_topology(stamp):
    """Six shards over PostgreSQL and MariaDB, reached over their sockets.
    Returns the topology file's text and {shard: (backend, database)}."""
    shards = {
        "core": ("postgres", f"ks_conf_{stamp}_core"),
        "pods-a": ("postgres", f"ks_conf_{stamp}_pods_a"),
        "pods-b": ("mysql", f"ks_conf_{stamp}_pods_b"),
        "events": ("mysql", f"ks_conf_{stamp}_events"),
        "leases": ("postgres", f"ks_conf_{stamp}_leases"),
        "custom": ("mysql", f"ks_conf_{stamp}_custom"),
    }
    text = ["# Written by tests/kubernetes/conformance.py", 'default_shard = "core"']
    for name, (backend, db) in shards.items():
        endpoint = (f"postgres://{DB_USER}:{DB_PASSWORD}@/{db}?host={PG_SOCKET_DIR}"
                    if backend == "postgres" else
                    f"mysql://{DB_USER}:{DB_PASSWORD}@unix({MYSQL_SOCKET})/{db}")
        text += ["", "[[shards]]", f'name = "{name}"', f'endpoint = "{endpoint}"']
    routes = [
        ('resource = "pods"', 'shards = ["pods-a", "pods-b"]\nhash = "resource-namespace"'),
        ('resource = "events"', 'shard = "events"'),
        ('resource = "leases"', 'shard = "leases"'),
        # CRDs and APIServices are stored under their group like custom
        # resources, and stay with the rest.
        ('prefix = "/registry/apiextensions.k8s.io/"', 'shard = "core"'),
        ('prefix = "/registry/apiregistration.k8s.io/"', 'shard = "core"'),
        # A group with a dot: a custom resource.
        ("regex = '^/registry/[^/]+\\.[^/]+/'", 'shard = "custom"'),
    ]
    for matcher, target in routes:
        text += ["", "[[routes]]", matcher, target]
    return "\n".join(text) + "\n", shards


def drop_databases(shards):
    """Drops the sharded target's databases (best effort), over the sockets."""
    for backend, db in shards.values():
        if backend == "postgres":
            cmd = ["psql", f"host={PG_SOCKET_DIR} user={DB_USER} password={DB_PASSWORD} dbname=postgres",
                   "-qc", f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)']
        else:
            cmd = ["mariadb", f"--socket={MYSQL_SOCKET}", f"-u{DB_USER}", f"-p{DB_PASSWORD}",
                   "-e", f"DROP DATABASE IF EXISTS `{db}`"]
        subprocess.run(cmd, capture_output=True)


class ConformanceCluster(Cluster):
    def __init__(self, args, work):
        apiserver = args.pushdown_apiserver if args.target == "kubeshard-pushdown" else None
        super().__init__(args.kube_bin, work, apiserver=apiserver)
        self.args = args
        self.shards = {}

    def start_storage(self):
        """Starts the target's storage; returns the etcd endpoint."""
        port = free_port()
        target = self.args.target
        if target == "etcd":
            peer = free_port()
            self.spawn("etcd", [
                self.args.etcd, "--data-dir", str(self.work / "etcd"),
                "--listen-client-urls", f"http://127.0.0.1:{port}",
                "--advertise-client-urls", f"http://127.0.0.1:{port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer}",
                "--quota-backend-bytes", str(8 << 30)])
        else:
            argv = [self.args.kubeshard, "--listen-address", f"127.0.0.1:{port}",
                    "--metrics-bind-address", f"127.0.0.1:{free_port()}"]
            if target == "kubeshard-sqlite":
                argv += ["--endpoint", f"sqlite://{self.work / 'state.db'}"]
            elif target in ("kubeshard-6", "kubeshard-pushdown"):
                text, self.shards = sharded_topology(f"{int(time.time())}_{os.getpid()}")
                (self.work / "topology.toml").write_text(text)
                argv += ["--config", str(self.work / "topology.toml")]
            else:
                raise Failure(f"unknown target {target}")
            self.spawn("kubeshard", argv)
        return f"http://127.0.0.1:{port}"

    def start(self):
        self.make_certs()
        etcd = self.start_storage()
        pushdown = self.args.target == "kubeshard-pushdown"
        self.start_apiserver(
            etcd, watch_cache=not pushdown,
            advertise_address=NODE_ADDRESS, bind_address="0.0.0.0",
            service_range=SERVICE_RANGE,
            extra_args=[
                f"--feature-gates={FEATURE_GATES}",
                f"--runtime-config={RUNTIME_CONFIG}",
                # Real clusters run with these; the e2e suites test them.
                "--enable-priority-and-fairness=true",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=lease",
                # kubeadm's clusters run with it; a sig-auth spec checks it.
                "--enable-admission-plugins=NodeRestriction",
                *(["--storage-media-type=application/json"] if pushdown else []),
            ])
        self.start_controller_manager(extra_args=[
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={self.work / 'ca.crt'}",
            f"--cluster-signing-key-file={self.work / 'ca.key'}",
            f"--cluster-cidr={POD_CIDR}",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            f"--feature-gates={FEATURE_GATES}",
            # A ResourceQuota spec waits for a full resync otherwise.
            "--resource-quota-sync-period=10s",
        ])
        self.spawn("kube-scheduler", [
            str(self.kube_bin / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}", "--v=1"])
        self.spawn("kwok", [
            self.args.kwok, f"--kubeconfig={self.kubeconfig}",
            "--manage-all-nodes=true", f"--config={STAGES}",
            f"--cidr={POD_CIDR}", f"--node-ip={NODE_ADDRESS}",
            "--node-lease-duration-seconds=40", "--v=INFO"])
        self.create_nodes()

    def create_nodes(self):
        nodes = []
        for i in range(NODES):
            name = f"kwok-node-{i}"
            nodes.append({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64", "type": "kwok"},
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
                "spec": {"podCIDR": f"10.244.{i}.0/24"},
                "status": {
                    "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110",
                                    "ephemeral-storage": "100Gi"},
                    "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110",
                                 "ephemeral-storage": "100Gi"},
                    "nodeInfo": {"kubeletVersion": KUBE_VERSION, "kubeProxyVersion": KUBE_VERSION,
                                 "architecture": "amd64", "operatingSystem": "linux",
                                 "machineID": f"kwok-{i}", "systemUUID": f"kwok-{i}",
                                 "bootID": f"kwok-{i}", "kernelVersion": "kwok",
                                 "osImage": "kwok", "containerRuntimeVersion": "kwok://v0.8.0"},
                },
            })
        self.create(nodes)

        def ready():
            got = self.kubectl_json("get", "nodes")
            ready = [n for n in got["items"]
                     if any(c["type"] == "Ready" and c["status"] == "True"
                            for c in n.get("status", {}).get("conditions", []))]
            return len(ready) == NODES
        self.wait_for(f"{NODES} kwok nodes Ready", ready, timeout=120)
        self.wait_for("the default service account",
                      lambda: self.kubectl_raw("get", "serviceaccount", "default", "-o", "name"),
                      timeout=120)


# ---- the suite -----------------------------------------------------------------


def run_suite(args, cluster, work):
    report = work / "report"
    report.mkdir(exist_ok=True)
    suite = Path(args.suite)
    argv = [str(suite / "ginkgo"), f"--procs={args.procs}", f"--timeout={args.timeout}",
            "--no-color", "--poll-progress-after=10m", f"--output-dir={report}",
            *([f"--focus={args.focus}"] if args.focus else []),
            *([f"--skip={args.skip}"] if args.skip else []),
            str(suite / "e2e.test"), "--",
            f"--kubeconfig={cluster.kubeconfig}", "--provider=skeleton",
            f"--kubectl-path={cluster.kube_bin / 'kubectl'}", f"--report-dir={report}",
            "--non-blocking-taints=node-role.kubernetes.io/control-plane",
            "--allowed-not-ready-nodes=0", "--minStartupPods=0"]
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig))
    started = time.time()
    with open(work / "ginkgo.log", "w") as log:
        rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work).returncode
    return rc, time.time() - started


def failure_reason(case):
    """The first line of a failed spec's message that says something."""
    node = case.find("failure")
    if node is None:
        node = case.find("error")
    if node is None:
        return ""
    text = (node.get("message") or "") + "\n" + (node.text or "")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[FAILED]") or line.startswith("[PANICKED]") or line.startswith("[TIMEDOUT]"):
            line = line.split("]", 1)[1].strip()
            if line and not line.startswith("in [") and not line.startswith("A suite timeout"):
                return line[:200]
    return ""


def parse_junit(report):
    """[(spec, passed|failed|skipped, reason)] from the suite's JUnit files,
    and the names of the suite-level nodes that failed ([SynchronizedBeforeSuite]...).
    A name can occur twice: a few specs share theirs (one per API version)."""
    results, suite_failures = [], []
    files = sorted(report.glob("junit*.xml"))
    check(files, f"no JUnit report in {report}")
    for path in files:
        for case in ET.parse(path).getroot().iter("testcase"):
            name = case.get("name", "")
            status = case.get("status") or (
                "failed" if case.find("failure") is not None or case.find("error") is not None
                else "skipped" if case.find("skipped") is not None else "passed")
            if status not in ("passed", "failed", "skipped"):
                status = "failed"  # ginkgo's "panicked", "interrupted", "timedout"
            if not name.startswith("[It] "):
                if status == "failed":
                    suite_failures.append(name)
                continue
            # As --focus and --skip see it, without the node type.
            results.append((name.removeprefix("[It] "), status,
                            failure_reason(case) if status == "failed" else ""))
    return results, suite_failures


def write_results(work, results):
    """WORK/results.tsv: each spec that ran, its status, and for a failure
    the first line of its message (skipped specs are left out)."""
    lines = [f"{name}\t{status}" + (f"\t{reason}" if reason else "")
             for name, status, reason in sorted(results) if status != "skipped"]
    (work / "results.tsv").write_text("\n".join(lines) + "\n")


def cmd_run(args):
    check(in_private_namespace(),
          "conformance.py must run in a private network namespace (scripts/kube-conformance.sh "
          f"starts it under unshare -n); interfaces here: {interfaces()}")
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "addr", "add", f"{NODE_ADDRESS}/32", "dev", "lo")
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cluster = ConformanceCluster(args, work)
    started = time.time()
    try:
        cluster.start()
        print(f"    cluster up in {time.time() - started:.0f} s; running the suite", file=sys.stderr)
        rc, elapsed = run_suite(args, cluster, work)
        results, suite_failures = parse_junit(work / "report")
    except (Failure, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"CONFORMANCE RUN FAILED: {e}\n{cluster.log_tails(15)}", file=sys.stderr)
        return 2
    finally:
        cluster.stop()
        drop_databases(cluster.shards)
    write_results(work, results)
    counts = {s: sum(1 for _, v, _ in results if v == s) for s in ("passed", "failed", "skipped")}
    ran = counts["passed"] + counts["failed"]
    summary = {"target": args.target, "focus": args.focus, "skip": args.skip, "procs": args.procs,
               "ran": ran, **counts, "suite_failures": suite_failures,
               "ginkgo_exit": rc, "suite_s": round(elapsed),
               "date": time.strftime("%Y-%m-%d")}
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"    {args.target}: ran {ran}, passed {counts['passed']}, failed {counts['failed']} "
          f"in {elapsed / 60:.1f} min", file=sys.stderr)
    for name, status, reason in sorted(results):
        if status == "failed":
            print(f"      FAILED {name}: {reason}", file=sys.stderr)
    for name in suite_failures:
        print(f"      SUITE NODE FAILED {name}", file=sys.stderr)
    # A failed suite node fails the specs it guards; the comparison sees
    # those. No spec at all means the run itself broke.
    return 0 if ran else 3


# ---- comparison ----------------------------------------------------------------


def read_result_lines(path):
    """[(spec, status, reason)] from a results.tsv, one per spec that ran."""
    out = []
    for line in Path(path).read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            out.append((fields[0], fields[1], fields[2] if len(fields) > 2 else ""))
    return out


def by_name(lines):
    """{spec: (status, reason)}: a name that occurs twice (specs sharing a
    name, one per API version) has failed if either failed."""
    out = {}
    for name, status, reason in lines:
        if out.get(name, ("",))[0] != "failed":
            out[name] = (status, reason)
    return out


def read_results(path):
    """{spec: status} from a results.tsv (see by_name)."""
    return {n: status for n, (status, _) in by_name(read_result_lines(path)).items()}


def read_listed(path):
    """{spec name: reason} from a list (kwok-skips.txt, known-differences.txt,
    a differences file): one name per line, '#' starts a comment line, and
    '  # reason' may follow a name."""
    names = {}
    if path and Path(path).exists():
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, reason = line.partition("  #")
                names[name.strip()] = reason.strip()
    return names


def cmd_regex(args):
    """Prints a regular expression (Go's syntax) matching the listed names
    as literal text, for ginkgo's --focus and --skip."""
    print("|".join(re.escape(n) for n in read_listed(args.file)))
    return 0


def cmd_compare(args):
    baselines = [read_results(p) for p in args.baseline]
    target = read_results(args.target_results)
    stable = set.intersection(*(
        {n for n, s in b.items() if s == "passed"} for b in baselines))
    # A spec that passes on the baseline must pass on the target: failing
    # there, or not running at all, is a difference.
    differences = {n for n in stable if target.get(n) != "passed"}
    known = set(read_listed(args.known))
    unexpected = sorted(differences - known)
    fixed = sorted(n for n in known - differences if target.get(n) == "passed")
    print(f"    {len(stable)} specs pass on the baseline; {len(stable) - len(differences)} pass on "
          f"the target too, {len(differences)} do not ({len(differences & known)} of them "
          f"known differences)", file=sys.stderr)
    for n in unexpected:
        how = "fails" if target.get(n) == "failed" else "did not run"
        print(f"      NEW DIFFERENCE (passes on the baseline, {how} here): {n}", file=sys.stderr)
    for n in fixed:
        print(f"      LISTED BUT PASSES (remove it from {args.known}): {n}", file=sys.stderr)
    if args.write_differences:
        Path(args.write_differences).write_text("".join(f"{n}\n" for n in unexpected))
    if args.write_fixed:
        Path(args.write_fixed).write_text("".join(f"{n}\n" for n in fixed))
    return 1 if unexpected or fixed else 0


def cmd_split(args):
    """Copies one run's results.tsv and summary.json into OUT/SIG.tsv and
    OUT/SIG.json for each SIG it covered (a run may focus on several)."""
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = json.loads((work / "summary.json").read_text())
    lines = (work / "results.tsv").read_text().splitlines()
    sigs = args.sigs.split(",")
    for sig in sigs:
        mine = [line for line in lines if line.startswith(f"[{sig}]")]
        counts = {s: sum(1 for line in mine if line.split("\t")[1:2] == [s])
                  for s in ("passed", "failed")}
        part = dict(summary, **counts, ran=counts["passed"] + counts["failed"])
        if len(sigs) > 1:
            part["run_with"] = sigs  # suite_s and skipped are the whole run's
        (out / f"{sig}.tsv").write_text("".join(f"{line}\n" for line in mine))
        (out / f"{sig}.json").write_text(json.dumps(part, indent=1) + "\n")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--target", required=True,
                   choices=["etcd", "kubeshard-sqlite", "kubeshard-6", "kubeshard-pushdown"])
    r.add_argument("--work", required=True)
    r.add_argument("--kube-bin", required=True)
    r.add_argument("--suite", required=True, help="folder with e2e.test and ginkgo")
    r.add_argument("--kwok", required=True)
    r.add_argument("--etcd")
    r.add_argument("--kubeshard")
    r.add_argument("--pushdown-apiserver")
    r.add_argument("--focus", default="")
    r.add_argument("--skip", default="")
    r.add_argument("--procs", type=int, default=4)
    r.add_argument("--timeout", default="4h")
    c = sub.add_parser("compare")
    c.add_argument("--baseline", action="append", required=True)
    c.add_argument("--target-results", required=True)
    c.add_argument("--known")
    c.add_argument("--write-differences", metavar="FILE",
                   help="write the unlisted differences there, one spec per line")
    c.add_argument("--write-fixed", metavar="FILE",
                   help="write the listed specs that passed there, one per line")
    g = sub.add_parser("regex")
    g.add_argument("file")
    sp = sub.add_parser("split")
    sp.add_argument("--work", required=True)
    sp.add_argument("--sigs", required=True, help="comma-separated, as in the run's focus")
    sp.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.exit({"run": cmd_run, "compare": cmd_compare, "regex": cmd_regex,
              "split": cmd_split}[args.command](args))


if __name__ == "__main__":
    main()
