#!/usr/bin/env python3
"""Turns scripts/bench-suite.sh's results (JSON lines from kubeshard-bench,
one per system and workload) into a Markdown report with a table per
workload (ratios against etcd 3.6 of the same run) and PNG plots of
throughput and latency."""

import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WORKLOADS = [
    ("put", "Put, 6 resource prefixes, 1 KiB values"),
    ("range", "Range, linearizable get of one of 10,000 keys"),
    ("range-serializable", "Range, serializable get of one of 10,000 keys"),
    ("txn", "Txn: create, then update guarded by mod_revision (kube-apiserver's writes)"),
    ("list", "List of all keys in pages of 500 at one revision"),
    ("watch", "Watch fan-out: event latency, put to delivery"),
]
REFERENCE = "etcd-3.6"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("markdown")
    ap.add_argument("img_dir")
    ap.add_argument("--seconds", type=int)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--conns", type=int)
    ap.add_argument("--list-keys", type=int)
    ap.add_argument("--list-updates", type=int)
    ap.add_argument("--watchers", type=int)
    ap.add_argument("--commit")
    a = ap.parse_args()

    rows = defaultdict(dict)
    systems = []
    with open(a.results) as f:
        for line in f:
            r = json.loads(line)
            rows[r["workload"]][r["system"]] = r
            if r["system"] not in systems:
                systems.append(r["system"])

    out = ["# Benchmark suite: the etcd API side by side", ""]
    out.append(f"One run of `scripts/bench-suite.sh {a.seconds}` on one machine "
               f"({os.cpu_count()} cores), kubeshard {a.commit} (release), every system "
               "started fresh for each workload, one at a time. Closed loop: each client "
               f"sends its next request when the previous one is answered; {a.clients} clients "
               f"over {a.conns} connections for put, range and txn; 4 clients for list "
               f"({a.list_keys} keys, {a.list_updates} updates per key first); 50 writers and "
               f"{a.watchers} watchers for watch. Ratios are against {REFERENCE} in the same run; "
               "compare nothing across runs.")
    out.append("")
    for workload, title in WORKLOADS:
        if workload not in rows:
            continue
        per = rows[workload]
        ref = per.get(REFERENCE, {}).get("per_second") or None
        unit = "events/s" if workload == "watch" else ("lists/s" if workload == "list" else "req/s")
        out += [f"## {title}", "",
                f"| system | {unit} | vs {REFERENCE} | p50 (ms) | p90 (ms) | p95 (ms) | p99 (ms) | errors | peak RSS (MiB) |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in systems:
            r = per.get(s)
            if not r:
                continue
            ratio = f"{r['per_second'] / ref:.2f}x" if ref else ""
            out.append(f"| {s} | {r['per_second']} | {ratio} | {r['p50_ms']} | {r['p90_ms']} | "
                       f"{r['p95_ms']} | {r['p99_ms']} | {r['errors']} | {r.get('server_peak_rss_mib')} |")
        out.append("")
        plot(workload, title, per, systems, a.img_dir, unit)
        out += [f"![{title}](img/bench-{workload}.png)", ""]
    with open(a.markdown, "w") as f:
        f.write("\n".join(out) + "\n")


def plot(workload, title, per, systems, img_dir, unit):
    names = [s for s in systems if s in per]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    left.bar(names, [per[s]["per_second"] for s in names], color="#4a78b5")
    left.set_title(f"throughput ({unit})")
    left.tick_params(axis="x", rotation=30, labelsize=8)
    width = 0.27
    xs = range(len(names))
    for i, (key, label) in enumerate([("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")]):
        right.bar([x + (i - 1) * width for x in xs], [per[s][key] for s in names], width, label=label)
    right.set_xticks(list(xs))
    right.set_xticklabels(names, rotation=30, fontsize=8)
    right.set_title("latency (ms)")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(img_dir, f"bench-{workload}.png"), dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
