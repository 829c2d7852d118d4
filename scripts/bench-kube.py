#!/usr/bin/env python3
"""The Kubernetes custom-resource benchmark (shared/bench/README.md), one
system at a time; scripts/bench-kube.sh starts each storage and calls this.

  bench-kube.py run --system NAME --etcd-servers URL --storage-pid PID ...
      starts kube-apiserver (RBAC and admission on) over the storage,
      installs the six CRDs, a user allowed only to create/get/list them,
      runs `kubeshard-bench kube` as that user and appends its JSON line,
      with the system's name, to --results.
  bench-kube.py report RESULTS OUT.md IMG_DIR ...
      writes the table, the ratios to etcd and the plots.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "kubernetes"))
from kube_cluster import Cluster, Failure  # noqa: E402
from bench_proc import postgres_pids  # noqa: E402

GROUP = "compute.gcp.crossplane.io"
BENCH_USER = "kubeshard-bench"


def run(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="kubeshard-bench-kube-"))
    work.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(args.kube_bin, work, apiserver=args.apiserver)
    plurals = sorted(json.loads(Path(args.payloads).read_text()).keys())
    try:
        cluster.make_certs()
        cert, key = cluster.user_cert(BENCH_USER, f"/CN={BENCH_USER}")
        apiserver = cluster.start_apiserver(args.etcd_servers, watch_cache=args.watch_cache == "on",
                                            extra_args=args.apiserver_arg)
        cluster.kubectl_raw("create", "-f", args.crds)
        cluster.kubectl_raw("wait", "--for=condition=Established", "crd", "--all", "--timeout=120s")
        cluster.apply({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": BENCH_USER},
            "rules": [{"apiGroups": [GROUP], "resources": plurals,
                       "verbs": ["create", "get", "list"]}],
        })
        cluster.apply({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": BENCH_USER},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": BENCH_USER},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": BENCH_USER}],
        })
        # RBAC and the CRDs' handlers reach the serving path asynchronously.
        for plural in plurals:
            cluster.wait_for(f"{BENCH_USER} may create {plural}", lambda p=plural: cluster.kubectl_raw(
                "auth", "can-i", "create", f"{p}.{GROUP}", "--as", BENCH_USER).strip() == "yes")
            cluster.wait_for(f"{plural} served", lambda p=plural: cluster.kubectl_raw(
                "get", "--raw", f"/apis/{GROUP}/{version_of(args.payloads, p)}/{p}") != "")
        cpu = CpuSplit(apiserver.pid, args.storage_pid)
        bench_err = work / "kubeshard-bench.err"
        p = subprocess.Popen([
            args.bench, "--seconds", str(args.seconds), "--json",
            *(["--server-pid", str(args.storage_pid)] if args.storage_pid else []),
            "kube", "--api-server", cluster.server, "--cert", str(cert), "--key", str(key),
            "--payloads", args.payloads, "--vus", str(args.vus),
            "--apiserver-pid", str(apiserver.pid),
            "--report-every", str(args.report_every), "--max-objects", str(args.max_objects),
            *(["--storage-postgres"] if args.storage_postgres else []),
        ], stdout=subprocess.PIPE, stderr=open(bench_err, "w"), text=True)
        # Interval lines (--report-every) are recorded as they come, so a
        # long run that dies keeps what it measured.
        tag = {"system": args.system, "watch_cache": args.watch_cache,
               **({"commit": args.commit} if args.commit else {})}
        last = None
        for text in p.stdout:
            text = text.strip()
            if not text:
                continue
            line = json.loads(text)
            if "interval" in line:
                record(args.results, {**tag, "kind": "interval", **line})
                print(f"   {text}", file=sys.stderr)
            else:
                last = line
        p.wait(timeout=300)
        sys.stderr.write(bench_err.read_text())
        if p.returncode != 0 or last is None:
            raise Failure(f"kubeshard-bench kube failed ({p.returncode})")
        failures = [l.split(": ", 1)[1] for l in bench_err.read_text().splitlines()
                    if l.startswith("first failure: ")]
        line = {**tag, **({"kind": "summary"} if args.report_every else {}), **last,
                "cpu_seconds": cpu.split(), **({"first_failure": failures[0]} if failures else {})}
        print(f"   {json.dumps(line)}", file=sys.stderr)
        record(args.results, line)
    except (Failure, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"{args.system}: {e}\n{cluster.log_tails()}", file=sys.stderr)
        cluster.stop()
        sys.exit(1)
    cluster.stop()


def record(results, line):
    with open(results, "a") as out:
        out.write(json.dumps(line) + "\n")


def cpu_seconds(pid):
    """User + system CPU seconds of process PID (all its threads), or 0."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds():
    """CPU seconds the whole machine spent outside idle and iowait."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


class CpuSplit:
    """Where the machine's CPU went during the run: kube-apiserver, the
    storage process, PostgreSQL's processes, the load generator, the rest."""

    def __init__(self, apiserver_pid, storage_pid):
        self.pids = {"apiserver": apiserver_pid, "storage": storage_pid}
        self.before = self.sample()

    def sample(self):
        pg = postgres_pids()
        return {
            **{name: cpu_seconds(pid) if pid else 0.0 for name, pid in self.pids.items()},
            "postgres": {pid: cpu_seconds(pid) for pid in pg},
            "load": resource.getrusage(resource.RUSAGE_CHILDREN),
            "machine": machine_busy_seconds(),
        }

    def split(self):
        after, before = self.sample(), self.before
        out = {name: after[name] - before[name] for name in self.pids}
        out["postgres"] = sum(t - before["postgres"].get(pid, 0.0) for pid, t in after["postgres"].items())
        out["load"] = ((after["load"].ru_utime + after["load"].ru_stime)
                       - (before["load"].ru_utime + before["load"].ru_stime))
        out["machine"] = after["machine"] - before["machine"]
        out["other"] = out["machine"] - sum(v for k, v in out.items() if k != "machine")
        return {k: round(v, 1) for k, v in out.items()}


def version_of(payloads, plural):
    return json.loads(Path(payloads).read_text())[plural]["apiVersion"].split("/", 1)[1]


def report(args):
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    if not rows:
        sys.exit(f"{args.results} holds no result")
    baseline = {r["watch_cache"]: r for r in rows if r["system"] == args.baseline}
    lines = [
        "# Kubernetes custom-resource benchmark",
        "",
        "Generated by `scripts/bench-kube.sh` (do not edit by hand). The workload of",
        "`shared/bench/README.md`: through a real kube-apiserver (v1.34.4, RBAC and the",
        "default admission plugins on, client-certificate user allowed only to create,",
        "get and list the six kinds), every virtual user creates one object of each of",
        "the six crossplane `compute.gcp.crossplane.io` kinds in parallel, then lists",
        "each kind by `labelSelector=name=<name>` in parallel; a list must hold exactly",
        "the object created. One HTTP request is one sample.",
        "",
        f"Machine: {args.machine}. Commit {args.commit}. {args.vus} virtual users, "
        f"{args.seconds} s per system, kube-apiserver, storage and load generator on the "
        "same 2 cores; a fresh storage and kube-apiserver per system.",
        "",
        "Score: `floor(requests / (0.2*p50 + 0.3*p90 + 0.5*p95) * (1 - failed/requests)^2)`",
        f"with latencies in ms, over the {args.seconds} s run (so only comparable within",
        "this table). RSS is the peak (VmHWM) of the process: for kine and kubeshard on",
        "PostgreSQL it leaves PostgreSQL's own processes out.",
        "",
        f"| system | watch cache | req/s | vs {args.baseline} | p50 ms | p90 ms | p95 ms | p99 ms "
        "| failed | score | kube-apiserver RSS MiB | storage RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = baseline.get(r["watch_cache"])
        ratio = f"{r['per_second'] / base['per_second']:.2f}x" if base and base["per_second"] else "-"
        lines.append(
            f"| {r['system']} | {r['watch_cache']} | {r['per_second']:.1f} | {ratio} | {r['p50_ms']:.1f} "
            f"| {r['p90_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['failed']} of {r['requests']} "
            f"| {r['score']} | {r['apiserver_peak_rss_mib']} | {r['server_peak_rss_mib']} |")
    lines += ["", "CPU seconds spent during each run (from /proc; the machine has "
              f"{os.cpu_count()} cores, so at most {os.cpu_count() * args.seconds} s):", "",
              "| system | watch cache | kube-apiserver | storage | PostgreSQL | load generator | other | machine |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r.get("cpu_seconds") or {}
        lines.append(f"| {r['system']} | {r['watch_cache']} | " + " | ".join(
            str(c.get(k, "-")) for k in ["apiserver", "storage", "postgres", "load", "other", "machine"]) + " |")
    lines += ["", "![throughput](img/kube-throughput.png)", "",
              "![latency](img/kube-latency.png)", ""]
    Path(args.out).write_text("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['system']}\n(cache {r['watch_cache']})" for r in rows]
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.3), 4))
    ax.bar(labels, [r["per_second"] for r in rows], color="#4c72b0")
    ax.set_ylabel("requests/s")
    ax.set_title(f"Kubernetes CR workload, {args.vus} VUs: throughput")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(img / "kube-throughput.png", dpi=100)
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.3), 4))
    width = 0.25
    for i, (key, name) in enumerate([("p50_ms", "p50"), ("p90_ms", "p90"), ("p95_ms", "p95")]):
        ax.bar([x + (i - 1) * width for x in range(len(rows))], [r[key] for r in rows], width, label=name)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms")
    ax.set_title(f"Kubernetes CR workload, {args.vus} VUs: latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(img / "kube-latency.png", dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--system", required=True)
    r.add_argument("--etcd-servers", required=True)
    r.add_argument("--storage-pid", type=int)
    r.add_argument("--kube-bin", required=True)
    r.add_argument("--bench", required=True, help="the kubeshard-bench binary")
    r.add_argument("--payloads", required=True)
    r.add_argument("--crds", required=True, help="folder of CRD manifests")
    r.add_argument("--vus", type=int, default=20)
    r.add_argument("--seconds", type=int, default=60)
    r.add_argument("--watch-cache", choices=["on", "off"], default="on")
    r.add_argument("--results", required=True)
    r.add_argument("--work")
    r.add_argument("--apiserver", help="another kube-apiserver binary (the patched one)")
    r.add_argument("--commit", help="the kubeshard commit measured, recorded with each line")
    r.add_argument("--apiserver-arg", action="append", default=[],
                   help="an extra kube-apiserver flag (repeatable)")
    r.add_argument("--report-every", type=int, default=0, help="seconds per interval line")
    r.add_argument("--max-objects", type=int, default=0)
    r.add_argument("--storage-postgres", action="store_true",
                   help="count PostgreSQL's processes into the storage's memory")
    p = sub.add_parser("report")
    p.add_argument("results")
    p.add_argument("out")
    p.add_argument("img")
    p.add_argument("--baseline", default="etcd-3.6")
    p.add_argument("--vus", type=int, required=True)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--machine", required=True)
    p.add_argument("--commit", required=True)
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
