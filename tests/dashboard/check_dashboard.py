#!/usr/bin/env python3
"""Checks the shipped Grafana dashboard against a live Prometheus.

Two kubeshard routers serve one topology of three shards (SQLite,
PostgreSQL, MariaDB) with automatic compaction; a Prometheus (Debian's
package) scrapes both every second while kubeshard-bench writes, watches and
lists with selectors and etcdctl makes leases that expire. Then every query
of every panel of dashboards/kubeshard.json is run, with Grafana's variables
filled in, and must return at least one series with a finite value.

Usage: check_dashboard.py WORKDIR (environment: KUBESHARD_BIN, BENCH_BIN,
ETCDCTL, PROMETHEUS, KUBESHARD_TEST_POSTGRES_URL, KUBESHARD_TEST_MYSQL_URL).
Only 127.0.0.1 is used; every process started is stopped, within a bounded
time.
"""

import json
import math
import shutil
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "dashboards", "kubeshard.json")
LOAD_SECONDS = 25
# Grafana's variables: every shard, and a rate window that covers the load.
VARIABLES = {"$__rate_interval": "30s", "$shard": ".*"}
DATABASE = "ks_dashboard_check"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def database_url(url, name):
    """URL with its database replaced by NAME (TLS off: not what is tested)."""
    parts = urllib.parse.urlsplit(url)
    query = "sslmode=disable" if parts.scheme.startswith("postgres") else ""
    return urllib.parse.urlunsplit(parts._replace(path="/" + name, query=query))


def drop_databases():
    pg = database_url(os.environ["KUBESHARD_TEST_POSTGRES_URL"], "postgres")
    subprocess.run(["psql", pg, "-qc", f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=60)
    my = urllib.parse.urlsplit(os.environ["KUBESHARD_TEST_MYSQL_URL"])
    subprocess.run(["mysql", "-h", my.hostname, "-P", str(my.port or 3306), "-u", my.username,
                    f"-p{my.password}", "-e", f"DROP DATABASE IF EXISTS `{DATABASE}`"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=60)


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_for(what, check, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"dashboard check FAILED: {what} not ready within {seconds} s")


def etcdctl_run(etcdctl, endpoint, *args, check=True):
    return subprocess.run([etcdctl, "--endpoints", endpoint, *args], capture_output=True,
                          text=True, timeout=30, check=check)


def panel_queries(dashboard):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unknown variable in {expr}"
            yield panel["title"], target.get("legendFormat", ""), expr


def main():
    work = sys.argv[1]
    os.makedirs(work, exist_ok=True)
    kubeshard = os.environ["KUBESHARD_BIN"]
    bench = os.environ["BENCH_BIN"]
    etcdctl = os.environ.get("ETCDCTL", "etcdctl")
    prometheus = os.environ.get("PROMETHEUS", "prometheus")
    topology = os.path.join(work, "topology.toml")
    with open(topology, "w") as f:
        f.write(f'''default_shard = "core"

[[shards]]
name = "core"
endpoint = "sqlite://{work}/core.db"

[[shards]]
name = "txn-pg"
endpoint = "{database_url(os.environ["KUBESHARD_TEST_POSTGRES_URL"], DATABASE)}"

[[shards]]
name = "watch-mariadb"
endpoint = "{database_url(os.environ["KUBESHARD_TEST_MYSQL_URL"], DATABASE)}"

[[routes]]
prefix = "/kubeshard-bench/txn/"
shard = "txn-pg"

[[routes]]
prefix = "/kubeshard-bench/watch/"
shard = "watch-mariadb"
''')
    for name in os.listdir(work):
        path = os.path.join(work, name)
        if name.startswith("core.db"):
            os.remove(path)
        elif name == "prometheus-data":
            shutil.rmtree(path)
    drop_databases()
    processes = []

    def start(name, argv):
        log = open(os.path.join(work, name + ".log"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        processes.append((name, p))
        return p

    routers = []
    try:
        for name in ("router-a", "router-b"):
            port, metrics = free_port(), free_port()
            start(name, [kubeshard, "--config", topology,
                         "--listen-address", f"127.0.0.1:{port}",
                         "--metrics-bind-address", f"127.0.0.1:{metrics}",
                         "--compact-interval", "5s", "--compact-min-retain", "1000",
                         "--lease-check-interval-ms", "500"])
            routers.append((name, port, metrics))
            # One at a time: the first creates the databases.
            wait_for(name, lambda: http_get(f"http://127.0.0.1:{metrics}/readyz").endswith(b"ok\n"), 60)
        prom_port = free_port()
        targets = ", ".join(f'"127.0.0.1:{m}"' for _, _, m in routers)
        prom_config = os.path.join(work, "prometheus.yml")
        with open(prom_config, "w") as f:
            f.write(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    f"scrape_configs:\n  - job_name: kubeshard\n"
                    f"    static_configs:\n      - targets: [{targets}]\n")
        start("prometheus", [prometheus, f"--config.file={prom_config}",
                             f"--storage.tsdb.path={work}/prometheus-data",
                             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"])
        api = f"http://127.0.0.1:{prom_port}/api/v1"
        wait_for("prometheus", lambda: http_get(f"http://127.0.0.1:{prom_port}/-/ready") != b"", 60)

        (_, a, _), (_, b, _) = routers
        ep_a, ep_b = f"http://127.0.0.1:{a}", f"http://127.0.0.1:{b}"
        load = [
            start("load-txn", [bench, "--endpoint", ep_a, "--conns", "4", "--clients", "16",
                               "--seconds", str(LOAD_SECONDS), "txn", "--value-size", "512"]),
            start("load-watch", [bench, "--endpoint", ep_b, "--conns", "4", "--clients", "8",
                                 "--seconds", str(LOAD_SECONDS), "watch", "--watchers", "20"]),
            start("load-list-selected", [bench, "--endpoint", ep_a, "--conns", "2", "--clients", "2",
                                         "--seconds", str(LOAD_SECONDS), "list-selected",
                                         "--objects", "300", "--matches", "30", "--page", "50",
                                         "--value-size", "256"]),
        ]
        load_started = time.time()
        time.sleep(8)
        # Leases: some live through the check, some expire during the load.
        for i, ttl in enumerate([600, 600, 600, 2, 2, 2, 2, 2]):
            out = etcdctl_run(etcdctl, ep_a, "lease", "grant", str(ttl)).stdout
            etcdctl_run(etcdctl, ep_b, "put", "--lease", out.split()[1],
                        f"/kubeshard-bench/leased/{i}", "v")
        # Errors as clients meet them: a lease that does not exist, and a
        # revision compacted away.
        for args in (["put", "--lease", "7b", "/kubeshard-bench/x", "v"],
                     ["get", "/kubeshard-bench/x", "--rev", "1"]):
            failed = etcdctl_run(etcdctl, ep_a, *args, check=False)
            if failed.returncode == 0:
                raise SystemExit(f"dashboard check FAILED: etcdctl {args} succeeded")
        for p in load:
            if p.wait(timeout=LOAD_SECONDS + 120) != 0:
                raise SystemExit(f"dashboard check FAILED: load {p.args[:6]} exited {p.returncode}")
        # Queries are evaluated near the end of the load, whose rates they
        # show, after the scrapes that cover it.
        at = load_started + LOAD_SECONDS - 2
        time.sleep(max(0.0, at + 3 - time.time()))

        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        failures, checked = [], 0
        for title, legend, expr in panel_queries(dashboard):
            url = f"{api}/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
            answer = json.loads(http_get(url, timeout=30))
            series = answer["data"]["result"] if answer.get("status") == "success" else []
            finite = [s for s in series if math.isfinite(float(s["value"][1]))]
            checked += 1
            shown = ", ".join(f'{s["metric"].get("shard") or s["metric"].get("method") or s["metric"].get("instance") or ""}={float(s["value"][1]):.4g}'
                              for s in finite[:3])
            print(f"{len(finite):3d}/{len(series):3d} series  {title} [{legend}]  {shown}")
            if not finite:
                failures.append(f"{title} [{legend}]: {expr} -> {answer.get('error') or series}")
        if failures:
            raise SystemExit("dashboard check FAILED: queries without a finite series:\n  " +
                             "\n  ".join(failures))
        print(f"dashboard check passed: {checked} queries of "
              f"{sum(1 for p in dashboard['panels'] if p.get('targets'))} panels, each with a finite series")
    finally:
        for name, p in reversed(processes):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for name, p in reversed(processes):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        drop_databases()


if __name__ == "__main__":
    main()
