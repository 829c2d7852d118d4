#!/usr/bin/env python3
"""Soak: Kubernetes-shaped traffic (traffic.go) for an hour against two
kubeshard routers over three PostgreSQL shards, sampled every minute:
throughput, p50/p99 latency, errors, the RSS of each router and of the
traffic client, PostgreSQL's total RSS, and open database connections.
At the end, the slope of each router's RSS and of the connections over the
minutes after the first ten (least squares), and whether they grow (RSS:
more than 10 % an hour; connections: more than one an hour and new highs).

    eval "$(scripts/test.sh --setup-only)"
    cargo build --release --bin kubeshard
    python3 tests/soak/soak.py --kubeshard target/release/kubeshard --minutes 60 \\
        --results docs/reliability-soak.jsonl

Everything listens on 127.0.0.1, stops by itself after --minutes, and is
stopped at the end; the databases it made are dropped.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))


def log(*args):
    print("soak.py:", *args, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def status_mib(path, field):
    """A "Field: N kB" line of a /proc file, in MiB (None if gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib(pid):
    return status_mib(f"/proc/{pid}/status", "VmRSS")


def pss_mib(pid):
    """Proportional set size: shared pages divided among the processes that
    map them, so that a sum over processes counts shared memory once."""
    return status_mib(f"/proc/{pid}/smaps_rollup", "Pss")


def postgres_mib():
    """PostgreSQL's memory: the sum of RSS (which counts shared_buffers again
    in every backend that touched them) and the sum of PSS (which does not)."""
    rss = pss = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "postgres":
                        rss += rss_mib(int(d)) or 0
                        pss += pss_mib(int(d)) or 0
            except OSError:
                pass
    return round(rss, 1), round(pss, 1)


def psql(url, sql):
    out = subprocess.run(["psql", url, "-Atqc", sql], capture_output=True, text=True)
    return out.stdout.strip()


def ports_of(pids):
    """Local TCP ports held by each of `pids` (ss -tnp), as {port: pid}."""
    out = subprocess.run(["ss", "-Htnp"], capture_output=True, text=True).stdout
    ports = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        for pid in pids:
            if f"pid={pid}," in fields[-1]:
                ports[int(fields[3].rsplit(":", 1)[1])] = pid
    return ports


def slope(points):
    """Least-squares slope of (x, y) points, per unit of x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeshard", default="target/release/kubeshard")
    p.add_argument("--minutes", type=int, default=60)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--results", help="append the minutes and the summary (JSON lines) here")
    args = p.parse_args()
    base = os.environ.get("KUBESHARD_TEST_POSTGRES_URL")
    if not base:
        log("KUBESHARD_TEST_POSTGRES_URL is not set (eval \"$(scripts/test.sh --setup-only)\")")
        return 2
    cache = os.environ.get("KUBESHARD_CACHE", os.path.expanduser("~/.cache/kubeshard"))
    traffic = os.path.join(cache, "soak", "soak-traffic")
    os.makedirs(os.path.dirname(traffic), exist_ok=True)
    subprocess.run(["go", "build", "-o", traffic, "."], cwd=HERE, check=True)

    u = urllib.parse.urlsplit(base)
    names = ["ks_soak_%012x_%s" % (random.getrandbits(48), s) for s in ("core", "pods", "events")]
    urls = [urllib.parse.urlunsplit(u._replace(path="/" + n)) for n in names]
    admin = urllib.parse.urlunsplit(u._replace(path="/postgres"))
    work = tempfile.mkdtemp(prefix="kubeshard-soak-")
    topology = os.path.join(work, "topology.toml")
    with open(topology, "w") as f:
        f.write('default_shard = "core"\n')
        for shard, url in zip(("core", "pods", "events"), urls):
            f.write(f'\n[[shards]]\nname = "{shard}"\nendpoint = "{url}"\n')
        f.write('\n[[routes]]\nprefix = "/registry/pods/"\nshard = "pods"\n')
        f.write('\n[[routes]]\nprefix = "/registry/events/"\nshard = "events"\n')
    procs = []
    run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = open(args.results, "a") if args.results else None

    def record(line):
        line = dict(line, run=run_id)
        print(json.dumps(line), flush=True)
        if out:
            out.write(json.dumps(line) + "\n")
            out.flush()

    try:
        routers = []
        for i in range(2):
            port = free_port()
            logf = open(os.path.join(work, f"router{i}.log"), "ab")
            proc = subprocess.Popen([os.path.abspath(args.kubeshard), "--listen-address", f"127.0.0.1:{port}",
                                     "--metrics-bind-address", "", "--config", topology],
                                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)
            wait_port(port)
            routers.append((port, proc))
        endpoints = ",".join(f"127.0.0.1:{port}" for port, _ in routers)
        client = subprocess.Popen([traffic, "--endpoints", endpoints, "--duration", f"{args.minutes}m",
                                   "--clients", str(args.clients)],
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(client)
        datnames = ",".join(f"'{n}'" for n in names)
        minutes = []
        seen = []
        for line in client.stdout:
            if not line.startswith("{"):
                continue
            m = json.loads(line)
            m["router_rss_mib"] = [round(rss_mib(proc.pid) or 0, 1) for _, proc in routers]
            m["client_rss_mib"] = round(rss_mib(client.pid) or 0, 1)
            m["postgres_rss_mib"], m["postgres_pss_mib"] = postgres_mib()
            # Each connection, whose router holds it, and which are new or
            # gone since the last minute: growth and churn, by router.
            rows = psql(admin, "SELECT client_port, datname, state FROM pg_stat_activity "
                               f"WHERE datname IN ({datnames})")
            conns = [r.split("|") for r in rows.splitlines() if r.count("|") == 2]
            now = {int(port) for port, _, _ in conns if port.lstrip("-").isdigit()}
            owner = ports_of([proc.pid for _, proc in routers])
            m["db_connections"] = len(now)
            m["db_connections_by_shard"] = {shard: sum(d == n for _, d, _ in conns)
                                            for shard, n in zip(("core", "pods", "events"), names)}
            m["db_connections_idle"] = sum(state == "idle" for _, _, state in conns)
            m["db_connections_by_router"] = [sum(owner.get(port) == proc.pid for port in now) for _, proc in routers]
            m["db_connections_opened"] = len(now - seen[0]) if seen else len(now)
            m["db_connections_closed"] = len(seen[0] - now) if seen else 0
            seen[:] = [now]
            m["routers_alive"] = sum(proc.poll() is None for _, proc in routers)
            minutes.append(m)
            record(dict(m, kind="minute"))
        client.wait()
        after = [m for m in minutes if m["minute"] > 10] or minutes
        summary = {"kind": "summary", "minutes": len(minutes), "clients": args.clients,
                   "kubeshard": args.kubeshard, "ops_per_s_mean": round(sum(m["ops_per_s"] for m in after) / max(1, len(after)), 1),
                   "p99_ms_max": max((m["p99_ms"] for m in after), default=0),
                   "errors": sum(sum(m["errors"].values()) for m in minutes),
                   "routers_alive_at_end": minutes[-1]["routers_alive"] if minutes else 0}
        for i in range(len(routers)):
            pts = [(m["minute"], m["router_rss_mib"][i]) for m in after]
            summary[f"router{i}_rss_mib"] = [pts[0][1], pts[-1][1]] if pts else []
            summary[f"router{i}_rss_slope_mib_per_hour"] = round(slope(pts) * 60, 2)
        per_minute = [(m["minute"], m["db_connections"]) for m in after]
        summary["db_connections_min_max"] = [min(c for _, c in per_minute), max(c for _, c in per_minute)] if per_minute else []
        summary["db_connections_slope_per_hour"] = round(slope(per_minute) * 60, 2)
        # Growth: more than 10% of the RSS per hour, or connections rising
        # (below); a run with errors or no throughput fails too.
        growing = [i for i in range(len(routers))
                   if summary[f"router{i}_rss_slope_mib_per_hour"] > 0.1 * max(1.0, summary[f"router{i}_rss_mib"][0] if summary[f"router{i}_rss_mib"] else 1.0)]
        summary["rss_grows"] = bool(growing)
        # Connections come and go with the peaks of demand (pools close
        # those not needed over the idle time), so the count moves a few
        # either way from minute to minute and an hour's slope of it is
        # noisy: growth is a slope over one per hour that also sets new
        # highs (the second half's maximum above the first half's), as a
        # pool that keeps what it opened does.
        half = len(per_minute) // 2
        highs = [max((c for _, c in per_minute[:half]), default=0), max((c for _, c in per_minute[half:]), default=0)]
        summary["db_connections_max_by_half"] = highs
        summary["connections_grow"] = summary["db_connections_slope_per_hour"] > 1.0 and highs[1] > highs[0]
        record(summary)
        ok = (not summary["rss_grows"] and not summary["connections_grow"]
              and summary["routers_alive_at_end"] == 2 and summary["errors"] == 0
              and summary["ops_per_s_mean"] > 0)
        return 0 if ok else 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        for n in names:
            subprocess.run(["psql", admin, "-qc", f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)'],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
        if out:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
