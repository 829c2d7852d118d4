"""A local Kubernetes control plane for tests and benchmarks: certificates,
kube-apiserver (RBAC and the default admission plugins on) over a given
etcd endpoint, optionally kube-controller-manager, and kubectl.

Used by e2e.py (over kubeshard) and scripts/bench-kube.py (over every
benchmarked storage).
"""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


class Cluster:
    def __init__(self, kube_bin, work, apiserver=None):
        self.kube_bin = Path(kube_bin)
        # Another kube-apiserver binary (the patched one) instead of kube_bin's.
        self.apiserver = Path(apiserver) if apiserver else self.kube_bin / "kube-apiserver"
        self.work = Path(work)
        self.procs = []
        self.logs = {}
        self.kubeconfig = self.work / "admin.kubeconfig"
        self.server = None

    # ---- processes --------------------------------------------------------

    def spawn(self, name, argv):
        log = open(self.work / f"{name}.log", "w")
        self.logs[name] = self.work / f"{name}.log"
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self):
        for _, proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def log_tails(self, lines=40):
        out = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines()
            out.append(f"---- {name} ({path}), last {lines} lines ----")
            out.extend(text[-lines:])
        return "\n".join(out)

    def wait_for(self, what, predicate, timeout=120, interval=0.5):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                result = predicate()
                if result:
                    return result
            except (Failure, subprocess.CalledProcessError, ValueError) as e:
                last = e
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise Failure(f"{name} exited with {proc.returncode} while waiting for {what}")
            time.sleep(interval)
        raise Failure(f"timed out after {timeout}s waiting for {what} (last: {last})")

    # ---- certificates -----------------------------------------------------

    def openssl(self, *argv):
        subprocess.run(["openssl", *argv], cwd=self.work, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def make_certs(self):
        """The cluster CA, the service-account key and the admin user."""
        self.openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                     "-out", "ca.crt", "-days", "2", "-subj", "/CN=kubeshard-e2e-ca")
        self.openssl("genrsa", "-out", "sa.key", "2048")
        self.user_cert("admin", "/O=system:masters/CN=kubeshard-e2e-admin")

    def user_cert(self, name, subject):
        """A client certificate NAME.crt / NAME.key signed by the cluster CA;
        the subject's CN is the user name, each O a group."""
        self.openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                     "-out", f"{name}.csr", "-subj", subject)
        # Extensions make it an X.509 v3 certificate: rustls (the benchmark's
        # client) refuses v1, which `openssl x509 -req` issues without them.
        (self.work / "client-ext.cnf").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n")
        self.openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                     "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                     "-extfile", "client-ext.cnf")
        return self.work / f"{name}.crt", self.work / f"{name}.key"

    def etcd_tls(self):
        """Mutual TLS between kube-apiserver and its storage, as kubeadm sets
        it up: a CA of its own, a serving certificate for 127.0.0.1 and a
        client certificate for kube-apiserver. Returns the storage's flags
        (kine's names) and kube-apiserver's."""
        self.openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "etcd-ca.key",
                     "-out", "etcd-ca.crt", "-days", "2", "-subj", "/CN=kubeshard-e2e-etcd-ca")
        self.signed("etcd-server", "/CN=kubeshard", "serverAuth",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        self.signed("etcd-client", "/CN=kube-apiserver-etcd-client", "clientAuth")
        w = self.work
        server = [f"--server-cert-file={w / 'etcd-server.crt'}",
                  f"--server-key-file={w / 'etcd-server.key'}",
                  f"--trusted-ca-file={w / 'etcd-ca.crt'}"]
        apiserver = [f"--etcd-cafile={w / 'etcd-ca.crt'}",
                     f"--etcd-certfile={w / 'etcd-client.crt'}",
                     f"--etcd-keyfile={w / 'etcd-client.key'}"]
        return server, apiserver

    def signed(self, name, subject, usage, extra=""):
        """NAME.crt / NAME.key for SUBJECT, signed by etcd-ca, for USAGE
        (serverAuth or clientAuth)."""
        self.openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                     "-out", f"{name}.csr", "-subj", subject)
        (self.work / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n{extra}")
        self.openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "etcd-ca.crt",
                     "-CAkey", "etcd-ca.key", "-CAcreateserial", "-out", f"{name}.crt",
                     "-days", "2", "-extfile", f"{name}.ext")

    def write_kubeconfig(self, port):
        self.server = f"https://127.0.0.1:{port}"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {
                "server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {
                "client-certificate": str(self.work / "admin.crt"),
                "client-key": str(self.work / "admin.key")}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "admin"}}],
            "current-context": "e2e",
        }))

    # ---- start ------------------------------------------------------------

    def start_apiserver(self, etcd_servers, watch_cache=True, extra_args=(),
                        advertise_address="127.0.0.1", bind_address="127.0.0.1",
                        service_range="10.0.0.0/24"):
        """Starts kube-apiserver over ETCD_SERVERS and waits for /readyz.
        The clients of the cluster (kubectl, the controllers) reach it on
        127.0.0.1 whatever BIND_ADDRESS; ADVERTISE_ADDRESS is what the
        `kubernetes` service points at."""
        api_port = free_port()
        self.write_kubeconfig(api_port)
        proc = self.spawn("kube-apiserver", [
            str(self.apiserver),
            f"--etcd-servers={etcd_servers}",
            f"--watch-cache={'true' if watch_cache else 'false'}",
            f"--bind-address={bind_address}", f"--advertise-address={advertise_address}",
            f"--secure-port={api_port}", f"--cert-dir={self.work / 'serving'}",
            f"--client-ca-file={self.work / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={self.work / 'sa.key'}",
            f"--service-account-signing-key-file={self.work / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={service_range}",
            "--enable-priority-and-fairness=false",
            "--v=1",
            *extra_args,
        ])
        self.wait_for("kube-apiserver /readyz",
                      lambda: self.kubectl_raw("get", "--raw", "/readyz").strip() == "ok",
                      timeout=180)
        return proc

    def start_controller_manager(self, extra_args=()):
        """Later flags in EXTRA_ARGS override the defaults here."""
        return self.spawn("kube-controller-manager", [
            str(self.kube_bin / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            f"--service-account-private-key-file={self.work / 'sa.key'}",
            f"--root-ca-file={self.work / 'ca.crt'}",
            "--use-service-account-credentials=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--v=1",
            *extra_args,
        ])

    # ---- kubectl ----------------------------------------------------------

    def kubectl_raw(self, *argv, stdin=None, check_ok=True):
        argv = [str(self.kube_bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *argv]
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
        if check_ok and p.returncode != 0:
            raise Failure(f"kubectl {' '.join(argv[2:])} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout if check_ok else p

    def kubectl_json(self, *argv):
        return json.loads(self.kubectl_raw(*argv, "-o", "json"))

    def apply(self, obj):
        return self.kubectl_raw("apply", "-f", "-", stdin=json.dumps(obj))

    def create(self, objs):
        """Creates many objects in one kubectl call (a List)."""
        return self.kubectl_raw("create", "-f", "-",
                                stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
