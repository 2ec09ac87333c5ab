"""TLS against REAL pydist-node processes (issue #5): ``pydist make-certs``, 2-way TLS between nodes and to the
client, clients without TLS or without a client certificate refused with a clear error, silent peers not
blocking the TLS accept path.

Pyro5 caches SSL contexts per process, so every TLS client here runs in a SUBPROCESS (``CLIENT`` below) that
prints one JSON line; nodes are ``pydist-node`` subprocesses.  Everything is stopped by pid.  No sleeps.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from conftest import wait_for

pytestmark = pytest.mark.timeout(120)

SECRET = "tls-test-secret-0123456789abcdef0123456789"
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")

CLIENT = textwrap.dedent(r'''
    import json, sys, threading, time, traceback
    import pydist
    from pydist import ClusterExecutor, task_context

    mode, address, d, secret = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].encode()
    want = int(sys.argv[5]) if len(sys.argv) > 5 else 1

    def where(i):
        threading.Event().wait(0.02)   # task workload, so that tasks spread over both nodes' single workers
        return task_context().node, i * i

    tls = {"run": dict(tls_cert=d + "/client.pem", tls_key=d + "/client.key", tls_ca=d + "/ca.pem"),
           "notls": {},
           "nocert": dict(tls_ca=d + "/ca.pem"),
           "badsecret": dict(tls_cert=d + "/client.pem", tls_key=d + "/client.key", tls_ca=d + "/ca.pem")}[mode]
    if mode == "badsecret":
        secret = b"not-the-secret"
    t0 = time.monotonic()
    out = {}
    try:
        with ClusterExecutor(address=address, secret=secret, connect_timeout=4, **tls) as ex:
            out["connect_s"] = time.monotonic() - t0
            nodes, ok = set(), True
            deadline = time.monotonic() + 30
            while len(nodes) < want and time.monotonic() < deadline:
                res = list(ex.map(where, range(40), timeout=30))
                ok = ok and [r[1] for r in res] == [i * i for i in range(40)]
                nodes.update(r[0] for r in res)
            out.update(ok=ok, nodes=sorted(nodes))
    except Exception as exc:
        out.update(error=type(exc).__name__, module=type(exc).__module__, message=str(exc),
                   elapsed=time.monotonic() - t0)
    print(json.dumps(out))
''')

CLUSTER = textwrap.dedent(r'''
    import json, sys, threading, time
    from pydist import LocalCluster, ClusterExecutor, task_context, security
    d, secret = sys.argv[1], sys.argv[2].encode()
    tls = security.TLSSettings(cert=d + "/client.pem", key=d + "/client.key", ca=d + "/ca.pem")
    security.configure_pyro(tls=tls)      # LocalCluster.wait_for_nodes connects from this process

    def where(i):
        threading.Event().wait(0.02)   # task workload
        return task_context().node

    out = {}
    try:
        with LocalCluster(nodes=2, workers_per_node=1, secret=secret, start_timeout=8,
                          node_args=["--tls-cert", d + "/node.pem", "--tls-key", d + "/node.key",
                                     "--tls-ca", d + "/ca.pem"]) as c:
            with ClusterExecutor(address=c.address, secret=secret, tls_cert=tls.cert, tls_key=tls.key, tls_ca=tls.ca) as ex:
                out["nodes"] = sorted(set(ex.map(where, range(40), timeout=30)))
    except Exception as exc:
        out.update(error=type(exc).__name__, message=str(exc))
    print(json.dumps(out))
''')


# ---------------------------------------------------------------------------------------------------- helpers


def _env():
    env = dict(os.environ)
    for k in ("PYDIST_SECRET", "PYDIST_SECRET_FILE", "PYDIST_TLS_CERT", "PYDIST_TLS_KEY", "PYDIST_TLS_CA"):
        env.pop(k, None)
    path = [p if p else os.getcwd() for p in sys.path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    return env


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop a process we started (by pid) and any process it left behind."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if proc.stdin:
        try:
            proc.stdin.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(kids, timeout=5)
    for k in alive:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    if proc.stdout:
        proc.stdout.close()


class TLSNode:
    def __init__(self, certs, host, log_path, extra=()):
        d = certs
        env = _env()
        env["PYDIST_SECRET"] = SECRET
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "pydist.cli", "node", "--host", host, "--port", "0", "--workers", "1",
               "--watch-stdin", "--log-level", "INFO", "--code-cache", str(log_path) + ".code",
               "--tls-cert", f"{d}/node.pem", "--tls-key", f"{d}/node.key", "--tls-ca", f"{d}/ca.pem", *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)
        box = []

        def read():
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("READY "):
                    box.append((line.split()[1], line.split()[2]))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(30)
        if not box:
            self.stop()
            raise AssertionError(f"TLS node on {host} did not start:\n{self.log()}")
        self.name, self.address = box[0]

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        _kill_tree(self.proc)
        self._log.close()


def run_client(certs, address, mode="run", want=1, timeout=60):
    """Run CLIENT in a subprocess; return its JSON answer."""
    p = subprocess.Popen([sys.executable, "-c", CLIENT, mode, address, str(certs), SECRET, str(want)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_env())
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        _kill_tree(p)
    lines = [l for l in out.decode().splitlines() if l.startswith("{")]
    assert lines, f"client printed nothing; rc={p.returncode}; stderr:\n{err.decode()[-3000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    args = [a for h in HOSTS for a in ("--host", h)] + ["--name", "node", "--name", "client"]
    r = subprocess.run([sys.executable, "-m", "pydist.cli", "make-certs", str(d), *args], capture_output=True,
                       timeout=60, env=_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr.decode()
    return d


@pytest.fixture(scope="module")
def tls_pair(certs, tmp_path_factory):
    """Two TLS nodes: a root on 127.0.0.2 and its child on 127.0.0.3 (linked by address, no name server)."""
    logs = tmp_path_factory.mktemp("tlslogs")
    root = TLSNode(certs, "127.0.0.2", logs / "root.log")
    child = None
    try:
        child = TLSNode(certs, "127.0.0.3", logs / "child.log", extra=("--parent", root.address))
        wait_for(lambda: f"joined as child" in root.log(), 20, "the child to join the root over TLS")
        yield root, child
    finally:
        if child is not None:
            child.stop()
        root.stop()


# ---------------------------------------------------------------------------------------------------- tests
def test_make_certs_cli_writes_the_files(certs):
    from cryptography import x509

    for name in ("ca.pem", "ca.key", "node.pem", "node.key", "client.pem", "client.key"):
        assert (certs / name).is_file(), name
    for key in ("ca.key", "node.key", "client.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    for name in ("node", "client"):
        cert = x509.load_pem_x509_certificate((certs / f"{name}.pem").read_bytes())
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        ips = {str(ip) for ip in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
               .value.get_values_for_type(x509.IPAddress)}
        assert ips == set(HOSTS)


def test_two_tls_nodes_link_and_a_tls_client_runs_tasks_on_both(tls_pair, certs):
    root, child = tls_pair
    out = run_client(certs, root.address, "run", want=2)
    assert "error" not in out, out
    assert out["ok"] is True
    assert out["nodes"] == sorted([root.name, child.name])
    assert root.alive() and child.alive()


@pytest.mark.parametrize("mode", ["notls", "nocert"])
def test_client_without_tls_or_without_client_cert_is_refused_clearly(tls_pair, certs, mode):
    root, child = tls_pair
    out = run_client(certs, root.address, mode)
    assert "error" in out, f"a client in mode {mode} was served: {out}"
    assert out["error"] in ("AuthenticationError", "ClusterUnavailable"), out
    assert out["module"] == "pydist.errors"
    assert root.address in out["message"], out
    assert out["elapsed"] < 10, out
    # the cluster keeps serving a proper client
    ok = run_client(certs, root.address, "run")
    assert ok.get("ok") is True, ok
    assert root.alive() and child.alive()


def test_tls_client_with_wrong_secret_is_refused(tls_pair, certs):
    root, _ = tls_pair
    out = run_client(certs, root.address, "badsecret")
    assert out.get("error") == "AuthenticationError", out
    assert root.address in out["message"] and out["elapsed"] < 3, out


def test_silent_tcp_peers_do_not_block_tls_accepts(tls_pair, certs):
    """SECURITY.md: the TLS handshake runs in the connection's thread under the deadline, so silent peers (no
    ClientHello) do not block other clients."""
    root, _ = tls_pair
    host, port = root.address.rsplit(":", 1)
    socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(40)]
    try:
        out = run_client(certs, root.address, "run")
        assert out.get("ok") is True, out
        assert out["connect_s"] < 3.0, out       # well under the 5 s handshake deadline
    finally:
        for s in socks:
            s.close()
    assert root.alive()


def test_local_cluster_with_tls_links_its_nodes(certs):
    p = subprocess.Popen([sys.executable, "-c", CLUSTER, str(certs), SECRET], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=_env())
    try:
        out, _ = p.communicate(timeout=60)
    finally:
        _kill_tree(p)
    lines = [l for l in out.decode().splitlines() if l.startswith("{")]
    assert lines, f"no answer (rc {p.returncode})"
    res = json.loads(lines[-1])
    assert "error" not in res, res
    assert res["nodes"] == ["node0", "node1"], res


def test_a_plain_local_cluster_starts_after_a_tls_one_in_the_same_process(certs):
    """Pyro5's TLS switch is process-wide: a LocalCluster without TLS started after a TLS one (in one
    process, nothing else in between) must not speak TLS to its own nodes (it did: every connect was
    reset and start() failed with 'the root reaches 0 of 2 nodes')."""
    from pydist import ClusterExecutor, LocalCluster, security

    c = str(certs)
    with LocalCluster(nodes=1, workers_per_node=0, tls_cert=f"{c}/node.pem", tls_key=f"{c}/node.key",
                      tls_ca=f"{c}/ca.pem"):
        pass
    try:
        with LocalCluster(nodes=2, workers_per_node=1) as plain:
            with ClusterExecutor(address=plain.address, secret=plain.secret) as ex:
                assert ex.submit(pow, 2, 5).result(30) == 32
    finally:
        security.configure_pyro(tls=None)
