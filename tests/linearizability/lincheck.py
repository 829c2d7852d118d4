#!/usr/bin/env python3
"""Linearizability runs of kubeshard beside real etcd, with faults (issue 21).

Each scenario starts fresh stores, runs `lincheck` (main.go: concurrent
gets, puts, deletes and compare-and-swaps on a few keys, watches of all of
them) for --seconds, injects its fault a third of the way in (or every
--fault-every seconds, for long runs), and requires lincheck to find the
history linearizable and the watches complete. The self-test scenario
corrupts reads on purpose and requires the check to fail.

    lincheck.py --kubeshard target/debug/kubeshard [--seconds 8] [SCENARIO...]
    lincheck.py --seconds 240 --fault-every 60 --results F --skip-passed
    lincheck.py --list

Results go to stdout, one JSON line per scenario, and are appended to
--results FILE when given; with --skip-passed, scenarios that FILE shows
passed with the same --seconds and --fault-every are not run again, so a
long run can be resumed. Everything it starts listens on 127.0.0.1 and is
stopped at the end; databases it creates are dropped.
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
SHARDED_KEYS = "/registry/pods/a,/registry/pods/b,/registry/events/c,/registry/events/d,/lin/e,/lin/f"


def log(*args):
    print("lincheck.py:", *args, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds}s")


class FreezingProxy:
    """TCP proxy that, frozen, keeps connections open and moves no byte
    (as tests/src/freeze.rs does for the Rust tests)."""

    def __init__(self, host, port):
        self.upstream = (host, port)
        self.loop = asyncio.new_event_loop()
        self.thawed = None
        self.port = None
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)

        async def start():
            self.thawed = asyncio.Event()
            self.thawed.set()
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _pump(self, reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                await self.thawed.wait()
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            writer.close()

    async def _handle(self, reader, writer):
        await self.thawed.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    def freeze(self):
        self.loop.call_soon_threadsafe(self.thawed.clear)

    def thaw(self):
        self.loop.call_soon_threadsafe(self.thawed.set)


class PrivatePostgres:
    """A PostgreSQL server of its own, so that restarting it disturbs
    nothing else on the machine."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "pg")
        os.makedirs(self.dir)
        shutil.chown(workdir, "postgres")
        shutil.chown(self.dir, "postgres")
        bindir = sorted(d for d in os.listdir("/usr/lib/postgresql"))[-1]
        self.bin = f"/usr/lib/postgresql/{bindir}/bin"
        self.port = free_port()
        self._as_postgres([f"{self.bin}/initdb", "-D", self.dir, "-U", "postgres", "--auth=trust"])
        self.start()

    def _as_postgres(self, argv):
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self):
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._as_postgres([f"{self.bin}/pg_ctl", "-D", self.dir, "-o", opts, "-w", "-l",
                           os.path.join(self.dir, "log"), "start"])

    def restart(self):
        # Immediate: as a crash would, with no clean shutdown of sessions.
        self._as_postgres([f"{self.bin}/pg_ctl", "-D", self.dir, "-m", "immediate", "-w", "stop"])
        time.sleep(1)
        self.start()

    def url(self, database):
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self):
        try:
            self._as_postgres([f"{self.bin}/pg_ctl", "-D", self.dir, "-m", "immediate", "stop"])
        except subprocess.CalledProcessError:
            pass


def fresh_url(var):
    base = os.environ.get(var)
    if not base:
        raise RuntimeError(f"{var} is not set (eval \"$(scripts/test.sh --setup-only)\")")
    u = urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit(u._replace(path="/ks_lin_%016x" % random.getrandbits(64)))


def drop_database(url):
    u = urllib.parse.urlsplit(url)
    name = u.path.lstrip("/")
    if not name.startswith("ks_lin_"):
        return
    if u.scheme.startswith("postgres"):
        admin = urllib.parse.urlunsplit(u._replace(path="/postgres"))
        subprocess.run(["psql", admin, "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        subprocess.run(["mariadb", f"-h{u.hostname}", f"-P{u.port or 3306}", f"-u{u.username}",
                        f"-p{u.password}", "-e", f"DROP DATABASE IF EXISTS `{name}`"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Run:
    """The processes and databases of one scenario; stops them all."""

    def __init__(self, args, name):
        self.args = args
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"lincheck-{name}-")
        self.procs = []
        self.databases = []
        self.private = []

    def spawn(self, argv, logname):
        out = open(os.path.join(self.dir, logname), "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def etcd(self):
        port, peer = free_port(), free_port()
        self.spawn([self.args.etcd, "--data-dir", os.path.join(self.dir, "etcd"),
                    "--listen-client-urls", f"http://127.0.0.1:{port}",
                    "--advertise-client-urls", f"http://127.0.0.1:{port}",
                    "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                    "--initial-cluster", f"default=http://127.0.0.1:{peer}"], "etcd.log")
        wait_port(port)
        return port

    def topology(self, shards):
        """shards: [(name, endpoint)], the first the default; pods and
        events routed to the second and third."""
        text = f'default_shard = "{shards[0][0]}"\n'
        for name, endpoint in shards:
            text += f'\n[[shards]]\nname = "{name}"\nendpoint = "{endpoint}"\n'
        for (name, _), prefix in zip(shards[1:], ["/registry/pods/", "/registry/events/"]):
            text += f'\n[[routes]]\nprefix = "{prefix}"\nshard = "{name}"\n'
        path = os.path.join(self.dir, "topology.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def kubeshard(self, source, port=None, extra=()):
        port = port or free_port()
        argv = [self.args.kubeshard, "--listen-address", f"127.0.0.1:{port}",
                "--metrics-bind-address", ""] + list(source) + list(extra)
        p = self.spawn(argv, f"kubeshard-{port}.log")
        wait_port(port)
        return port, p

    def kill(self, p):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                self.kill(p)
        for pg in self.private:
            pg.stop()
        for url in self.databases:
            drop_database(url)

    def check_seconds(self):
        return max(300.0, 10 * self.args.seconds)

    def lincheck(self, endpoints, strict, keys=None, extra=(), fault=None, kubeshard=True):
        argv = [self.args.lincheck, "--endpoints", ",".join(f"127.0.0.1:{p}" for p in endpoints),
                "--duration", f"{self.args.seconds}s", f"--strict={'true' if strict else 'false'}",
                "--visualize", os.path.join(self.dir, "history.html"),
                # porcupine's time grows faster than the history: long runs get longer.
                "--check-timeout", f"{self.check_seconds():g}s"] + list(extra)
        if kubeshard:
            # kubeshard's "request timed out" means not applied; etcd's may not.
            argv.append("--timeout-refuses")
        if keys:
            argv += ["--keys", keys]
        started = time.time()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        faults = 0
        for at in fault_times(self.args.seconds, self.args.fault_every) if fault else []:
            time.sleep(max(0.0, started + at - time.time()))
            if p.poll() is not None:
                break
            log(self.name, f"fault at {at:g} s:", fault[0])
            fault[1]()
            faults += 1
        out, err = p.communicate(timeout=self.args.seconds + self.check_seconds() + 600)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"linearizable": "no result"}
        result.update({"scenario": self.name, "seconds": self.args.seconds,
                       "fault": fault[0] if fault else None, "faults": faults,
                       "fault_every": self.args.fault_every, "exit": p.returncode,
                       "wall": round(time.time() - started, 1)})
        if err.strip():
            result["stderr"] = err.strip().splitlines()[-5:]
        return result


def fault_times(seconds, every):
    """When to inject the fault: once, a third of the way in; or every
    `every` seconds, leaving the last stretch fault-free so that the run
    ends on a store that has recovered."""
    if not every:
        return [seconds / 3]
    times, at = [], every
    while at <= seconds - min(every, seconds) / 2:
        times.append(at)
        at += every
    return times


def sharded(run, core="sqlite", pods=None, events=None):
    pods = pods or fresh_url("KUBESHARD_TEST_POSTGRES_URL")
    events = events or fresh_url("KUBESHARD_TEST_MYSQL_URL")
    run.databases += [pods, events]
    core_url = f"sqlite://{os.path.join(run.dir, 'core.db')}"
    return run.topology([("core", core_url), ("pods", pods), ("events", events)])


def scenario_etcd(run):
    return run.lincheck([run.etcd()], strict=True, kubeshard=False)


def scenario_selftest(run):
    # Stale reads recorded on purpose: the check must say no.
    result = run.lincheck([run.etcd()], strict=True, extra=["--corrupt-reads", "50"], kubeshard=False)
    result["expected"] = "no"
    return result


def scenario_one_shard_kill(run):
    db = f"sqlite://{os.path.join(run.dir, 'state.db')}"
    port, proc = run.kubeshard(["--endpoint", db])
    current = [proc]

    def fault():
        run.kill(current[0])
        current[0] = run.kubeshard(["--endpoint", db], port=port)[1]

    return run.lincheck([port], strict=True, fault=("router SIGKILL, restarted", fault))


def scenario_three_shards_kill(run):
    config = sharded(run)
    port, proc = run.kubeshard(["--config", config])
    current = [proc]

    def fault():
        run.kill(current[0])
        current[0] = run.kubeshard(["--config", config], port=port)[1]

    return run.lincheck([port], strict=False, keys=SHARDED_KEYS,
                        fault=("router SIGKILL, restarted", fault))


def scenario_two_routers_one_killed(run):
    config = sharded(run)
    first, proc = run.kubeshard(["--config", config])
    second, other = run.kubeshard(["--config", config])
    routers = {first: proc, second: other}
    turn = [first]

    def fault():
        # The first time, one router is killed. Repeated, the dead one is
        # restarted (it joins beside the live one) and then the other killed.
        port = turn[0]
        if routers[port].poll() is not None:
            routers[port] = run.kubeshard(["--config", config], port=port)[1]
            port = turn[0] = second if port == first else first
        run.kill(routers[port])

    return run.lincheck([first, second], strict=False, keys=SHARDED_KEYS,
                        fault=("one of two routers SIGKILL (repeated: the dead one restarted, the other killed)", fault))


def scenario_database_restart(run):
    pg = PrivatePostgres(run.dir)
    run.private.append(pg)
    config = sharded(run, pods=pg.url("lin"))
    port, _ = run.kubeshard(["--config", config], extra=["--datastore-timeout", "3s"])
    return run.lincheck([port], strict=False, keys=SHARDED_KEYS,
                        fault=("PostgreSQL shard restarted (immediate stop)", pg.restart))


def scenario_frozen_database(run):
    pods = fresh_url("KUBESHARD_TEST_POSTGRES_URL")
    u = urllib.parse.urlsplit(pods)
    proxy = FreezingProxy(u.hostname, u.port or 5432)
    proxied = urllib.parse.urlunsplit(u._replace(netloc=f"{u.username}:{u.password}@127.0.0.1:{proxy.port}"))
    run.databases.append(pods)
    config = sharded(run, pods=proxied)
    port, _ = run.kubeshard(["--config", config], extra=["--datastore-timeout", "2s"])
    frozen = min(6, run.args.seconds / 2)

    def fault():
        proxy.freeze()
        time.sleep(frozen)
        proxy.thaw()

    return run.lincheck([port], strict=False, keys=SHARDED_KEYS,
                        fault=(f"PostgreSQL shard frozen {frozen:g} s (--datastore-timeout 2s)", fault))


SCENARIOS = {
    "etcd": scenario_etcd,
    "selftest": scenario_selftest,
    "one-shard-kill": scenario_one_shard_kill,
    "three-shards-kill": scenario_three_shards_kill,
    "two-routers-one-killed": scenario_two_routers_one_killed,
    "database-restart": scenario_database_restart,
    "frozen-database": scenario_frozen_database,
}


def build_lincheck():
    cache = os.environ.get("KUBESHARD_CACHE", os.path.expanduser("~/.cache/kubeshard"))
    out = os.path.join(cache, "lincheck", "lincheck")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    subprocess.run(["go", "build", "-o", out, "."], cwd=HERE, check=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", help="default: all")
    p.add_argument("--kubeshard", default=os.environ.get("KUBESHARD_BIN", "target/debug/kubeshard"))
    p.add_argument("--etcd", default=os.environ.get("ETCD_BIN", "etcd"))
    p.add_argument("--lincheck", help="a built lincheck (default: go build into the cache)")
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--fault-every", type=float, default=0,
                   help="inject the fault every this many seconds (default: once, a third of the way in)")
    p.add_argument("--results", help="append each result to this JSONL file")
    p.add_argument("--skip-passed", action="store_true",
                   help="skip scenarios that --results shows passed with the same --seconds and --fault-every")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        log("unknown scenarios:", unknown, "(--list)")
        return 2
    args.kubeshard = os.path.abspath(args.kubeshard)
    args.lincheck = args.lincheck or build_lincheck()
    failed = []
    if args.skip_passed and args.results and os.path.exists(args.results):
        with open(args.results) as f:
            done = [json.loads(line) for line in f if line.startswith("{")]
        passed = {r["scenario"] for r in done if r.get("passed") and r.get("seconds") == args.seconds
                  and r.get("fault_every", 0) == args.fault_every}
        for name in [n for n in names if n in passed]:
            log(name, "passed before with these settings; skipped")
        names = [n for n in names if n not in passed]
    for name in names:
        run = Run(args, name)
        try:
            result = SCENARIOS[name](run)
        except Exception as e:  # the scenario could not run: a failure too
            result = {"scenario": name, "linearizable": f"not run: {e}"}
        finally:
            run.stop()
        expected = result.pop("expected", "yes")
        ok = result.get("linearizable") == expected and (expected == "no" or result.get("watch_problems") == 0)
        result["passed"] = ok
        print(json.dumps(result), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")
        if ok:
            shutil.rmtree(run.dir, ignore_errors=True)
        else:
            failed.append(name)
            log(name, "FAILED; logs and history in", run.dir)
    if failed:
        log("failed:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
