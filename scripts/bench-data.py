#!/usr/bin/env python3
"""Data beyond etcd's limits (issue 17, section 5b), one system at a time;
scripts/bench-data.sh starts each storage and calls this.

  bench-data.py run --system NAME --endpoint URL --server-pid PID --bench BIN
      --results FILE [--levels 1,2,4,8,12] [--disk-path P] [--postgres-db D ...]
      fills the store through the etcd API with 4 KiB random values over six
      resource prefixes, level by level (GB of values). At each level: the
      write throughput and p99 of the last 100,000 puts before it, the median
      time of 20 paginated lists of a fixed 10,000-key prefix written first, the peak
      memory of the server (and PostgreSQL's) while getting there, and the
      size on disk. Appends one JSON line per level, then a summary line.
  bench-data.py report RESULTS OUT.md IMG_DIR --machine TEXT --commit SHA
      writes the tables, the targets and the plots.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_proc import postgres_pids

GB = 10**9
VALUE_SIZE = 4096
RESOURCES = 6
PREFIX = "/kubeshard-bench/data/"
# The fixed list: 10,000 keys in the first resource prefix, among the data.
LIST_TAG = "fixed/"
LIST_KEYS = 10_000
# The puts a level's throughput and p99 are measured on: the last ones
# before the level (about 400 MB, 15-30 s here: 25,000 puts, 3-8 s, made
# one checkpoint more or less decide the figure), and the lists timed.
MEASURE_OPS = 100_000
LISTS = 20
# The pause between the timed puts and the lists: right after 400 MB of
# writes the store is still flushing (PostgreSQL's checkpoint and the
# autovacuum that inserts trigger), and lists timed then measured that, not
# the data's size. PostgreSQL is waited for (at most SETTLE_LIMIT_S), the
# others get SETTLE_S.
SETTLE_S = 10
SETTLE_LIMIT_S = 600
CLIENTS, CONNS = 256, 16
SYSTEMS = ["etcd", "kubeshard-sqlite", "kubeshard-postgres", "kubeshard-6-postgres"]


def status_kib(pid, field):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0




class Memory:
    """Samples the server's RSS (and its anonymous part: etcd's RSS also
    counts the pages of its memory-mapped database file, which the kernel
    may drop) and PostgreSQL's summed PSS every second; `take()` returns
    the peaks since the last call."""

    def __init__(self, server_pid, postgres):
        self.server_pid, self.postgres = server_pid, postgres
        self.lock = threading.Lock()
        self.peak = {}
        self.stopped = threading.Event()
        threading.Thread(target=self.loop, daemon=True).start()

    def sample(self):
        s = {
            "server_rss_mib": status_kib(self.server_pid, "VmRSS") // 1024,
            "server_anon_mib": status_kib(self.server_pid, "RssAnon") // 1024,
        }
        if self.postgres:
            s["postgres_pss_mib"] = sum(pss_kib(p) for p in postgres_pids()) // 1024
        with self.lock:
            for k, v in s.items():
                self.peak[k] = max(self.peak.get(k, 0), v)

    def loop(self):
        while not self.stopped.wait(1.0):
            self.sample()

    def take(self):
        self.sample()
        with self.lock:
            peak, self.peak = self.peak, {}
        return peak


def bench(args, workload, total, *extra):
    """Runs kubeshard-bench once; returns its JSON line and first error."""
    cmd = [args.bench, "--endpoint", args.endpoint, "--seconds", "86400", "--total", str(total),
           "--json", *extra[0], workload, *extra[1]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=6 * 3600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    line = json.loads(p.stdout.strip().splitlines()[-1])
    first = [l.split(": ", 1)[1] for l in p.stderr.splitlines() if l.startswith("first error: ")]
    return line, first[0] if first else None


def put(args, total, tag, prefix=PREFIX, resources=RESOURCES):
    """Puts of keys `<prefix>res<j>/<tag><client>/<n>` (without `res<j>/`
    for one resource)."""
    return bench(args, "put", total,
                 ["--clients", str(CLIENTS), "--conns", str(CONNS)],
                 ["--value-size", str(VALUE_SIZE), "--prefix", prefix, "--resources", str(resources),
                  "--tag", tag, "--random-values"])


def disk_bytes(args):
    total = 0
    if args.disk_path:
        for path in args.disk_path:
            p = Path(path)
            files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()] if p.exists() else []
            # SQLite's write-ahead log sits beside its file.
            files += [Path(str(p) + s) for s in ("-wal", "-shm") if Path(str(p) + s).exists()]
            total += sum(f.stat().st_size for f in files)
    if args.postgres_db:
        names = ",".join(f"'{d}'" for d in args.postgres_db)
        out = subprocess.run(["psql", args.postgres_url, "-Atc",
                              f"SELECT sum(pg_database_size(datname)) FROM pg_database WHERE datname IN ({names})"],
                             capture_output=True, text=True, check=True).stdout.strip()
        total += int(out or 0)
    return total


def settle(args):
    """Waits until the store is at rest; returns the seconds waited."""
    started = time.time()
    time.sleep(SETTLE_S)
    if args.postgres_db:
        names = ",".join(f"'{d}'" for d in args.postgres_db)
        psql = ["psql", args.postgres_url, "-Atc"]
        while time.time() - started < SETTLE_LIMIT_S:
            busy = subprocess.run(psql + [
                "SELECT count(*) FROM pg_stat_progress_vacuum p JOIN pg_database d ON d.oid = p.datid "
                f"WHERE d.datname IN ({names})"], capture_output=True, text=True, check=True).stdout.strip()
            if busy == "0":
                break
            time.sleep(2)
        subprocess.run(psql + ["CHECKPOINT"], capture_output=True, check=True)
    return round(time.time() - started)


def record(results, line):
    with open(results, "a") as out:
        out.write(json.dumps(line) + "\n")
    print(f"   {json.dumps(line)}", file=sys.stderr)


def run(args):
    levels = [float(x) for x in args.levels.split(",")]
    memory = Memory(args.server_pid, bool(args.postgres_db))
    tag = {"system": args.system, **({"commit": args.commit} if args.commit else {})}
    started = time.time()
    line, err = put(args, LIST_KEYS, LIST_TAG, prefix=PREFIX + "res0/", resources=1)
    if line["ok"] != LIST_KEYS:
        raise RuntimeError(f"the fixed list's keys: {line['ok']} of {LIST_KEYS} written ({err})")
    written = LIST_KEYS * VALUE_SIZE
    refused = None
    for level in levels:
        if refused:
            break
        target = int(level * GB)
        fill = (target - written) // VALUE_SIZE - MEASURE_OPS
        fill_line = None
        if fill > 0:
            fill_line, err = put(args, fill, f"f{level:g}/")
            written += fill_line["ok"] * VALUE_SIZE
            if fill_line["errors"]:
                refused = err or f"{fill_line['errors']} failed puts"
        m, m_err = put(args, MEASURE_OPS, f"m{level:g}/")
        written += m["ok"] * VALUE_SIZE
        if m["errors"]:
            refused = refused or m_err or f"{m['errors']} failed puts"
        settled = settle(args)
        lst, l_err = bench(args, "list", LISTS, ["--clients", "1", "--conns", "1"],
                           ["--existing", "--keys", str(LIST_KEYS), "--page", "500",
                            "--prefix", PREFIX + "res0/" + LIST_TAG])
        record(args.results, {
            **tag, "kind": "level", "level_gb": level, "written_gb": round(written / GB, 3),
            "elapsed_s": round(time.time() - started), "timed_puts": m["ok"] + m["errors"],
            "lists": lst["ok"] + lst["errors"], "settle_s": settled,
            "fill_per_s": fill_line and fill_line["per_second"],
            "put_per_s": m["per_second"], "put_p50_ms": m["p50_ms"], "put_p99_ms": m["p99_ms"],
            "put_errors": m["errors"] + (fill_line["errors"] if fill_line else 0),
            "list_ms": lst["p50_ms"], "list_max_ms": lst["p99_ms"], "list_errors": lst["errors"],
            **({"list_error": l_err} if l_err else {}),
            **memory.take(), "disk_gb": round(disk_bytes(args) / GB, 2),
            **({"refused": refused} if refused else {}),
        })
    memory.stopped.set()
    record(args.results, {**tag, "kind": "summary", "written_gb": round(written / GB, 3),
                          "elapsed_s": round(time.time() - started),
                          **({"refused": refused} if refused else {})})


def load(path):
    by_system = {}
    for text in Path(path).read_text().splitlines():
        if text.strip():
            r = json.loads(text)
            s = by_system.setdefault(r["system"], {"levels": [], "summary": None})
            if r["kind"] == "level":
                s["levels"].append(r)
            else:
                s["summary"] = r
    return by_system


def fmt(x, digits=0):
    return "-" if x is None else f"{x:,.{digits}f}"


def report(args):
    data = load(args.results)
    systems = [s for s in SYSTEMS if s in data] + [s for s in data if s not in SYSTEMS]
    first = next((l for s in data.values() for l in s["levels"]), {})
    # Older results did not record their windows: 25,000 puts and 5 lists.
    timed, lists = first.get("timed_puts", 25_000), first.get("lists", 5)
    lines = [
        "# Data beyond etcd's limits (issue 17, §5b)",
        "",
        "Generated by `scripts/bench-data.sh` (do not edit by hand). Through the etcd API",
        f"(`kubeshard-bench put`, {CLIENTS} clients over {CONNS} connections), each store is filled",
        f"with {VALUE_SIZE} B values of random bytes over {RESOURCES} resource prefixes, level by level",
        f"(GB = 10^9 bytes of values). At each level: put/s and p99 of the last {timed:,} puts",
        f"before it; the median of {lists} paginated lists (pages of 500, at one revision) of a fixed",
        f"{LIST_KEYS:,}-key prefix written first, in the first resource's prefix; the server's peak",
        "RSS while getting there (and its anonymous part: etcd's RSS counts the pages of its",
        "memory-mapped database), PostgreSQL's summed PSS, and the size on disk (kubeshard keeps",
        "each value in its history and in its live table). etcd 3.6.8 runs with",
        "`--quota-backend-bytes` at 8 GiB, its documented maximum. Each system's data is removed",
        "before the next.",
        f"Machine: {args.machine}. Report written at {args.commit}; each system's commit is in",
        "its table.",
        "",
    ]
    for system in systems:
        s = data[system]
        commit = s["summary"].get("commit", "?") if s["summary"] else "(unfinished)"
        lines += [f"## {system} ({commit})", "",
                  "| GB | written GB | put/s | put p99 ms | list ms | server RSS MiB | anon MiB | PostgreSQL PSS MiB | disk GB | refused |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for l in s["levels"]:
            lines.append(
                f"| {l['level_gb']:g} | {l['written_gb']:.2f} | {fmt(l['put_per_s'])} | {fmt(l['put_p99_ms'], 1)} "
                f"| {fmt(l['list_ms'], 1)} | {fmt(l.get('server_rss_mib'))} | {fmt(l.get('server_anon_mib'))} "
                f"| {fmt(l.get('postgres_pss_mib'))} | {fmt(l['disk_gb'], 2)} | {l.get('refused', '')} |")
        if s["summary"] and s["summary"].get("refused"):
            lines += ["", f"Writes refused: `{s['summary']['refused']}`."]
        lines.append("")
    lines += ["## Targets", "",
              "kubeshard's write throughput and list time at 12 GB within 1.25x of its own at 1 GB,",
              "and its RSS under 1 GiB throughout.", "",
              "| system | put/s 1 GB | put/s 12 GB | ratio | list ms 1 GB | list ms 12 GB | ratio | peak RSS MiB | met |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for system in systems:
        if not system.startswith("kubeshard"):
            continue
        by = {l["level_gb"]: l for l in data[system]["levels"]}
        if 1 not in by or 12 not in by:
            lines.append(f"| {system} | not measured at 1 and 12 GB | | | | | | | |")
            continue
        a, b = by[1], by[12]
        put_ratio = a["put_per_s"] / b["put_per_s"] if b["put_per_s"] else float("inf")
        list_ratio = b["list_ms"] / a["list_ms"] if a["list_ms"] else float("inf")
        peak = max(l.get("server_rss_mib", 0) for l in data[system]["levels"])
        met = put_ratio <= 1.25 and list_ratio <= 1.25 and peak < 1024
        lines.append(f"| {system} | {fmt(a['put_per_s'])} | {fmt(b['put_per_s'])} | {put_ratio:.2f} "
                     f"| {fmt(a['list_ms'], 1)} | {fmt(b['list_ms'], 1)} | {list_ratio:.2f} | {peak} "
                     f"| {'yes' if met else 'no'} |")
    lines += ["", "![put/s](img/data-put.png) ![list](img/data-list.png) ![memory](img/data-rss.png)", ""]
    Path(args.out).write_text("\n".join(lines))
    plots(data, systems, Path(args.img_dir))


def plots(data, systems, img):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    img.mkdir(parents=True, exist_ok=True)
    for name, field, label in [("put", "put_per_s", "puts/s (4 KiB values)"),
                               ("list", "list_ms", "list of 10,000 keys, ms"),
                               ("rss", "server_rss_mib", "server peak RSS, MiB")]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for system in systems:
            pts = [(l["written_gb"], l[field]) for l in data[system]["levels"] if l.get(field) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system)
        ax.set_xlabel("GB of values written")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(img / f"data-{name}.png", dpi=90)
        plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--system", required=True)
    r.add_argument("--endpoint", required=True)
    r.add_argument("--server-pid", type=int, required=True)
    r.add_argument("--bench", required=True)
    r.add_argument("--results", required=True)
    r.add_argument("--levels", default="1,2,4,8,12")
    r.add_argument("--disk-path", action="append")
    r.add_argument("--postgres-db", action="append")
    r.add_argument("--postgres-url", default=os.environ.get("KUBESHARD_TEST_POSTGRES_URL", ""))
    r.add_argument("--commit")
    p = sub.add_parser("report")
    p.add_argument("results")
    p.add_argument("out")
    p.add_argument("img_dir")
    p.add_argument("--machine", required=True)
    p.add_argument("--commit", required=True)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
