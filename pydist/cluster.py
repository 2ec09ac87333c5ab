"""``LocalCluster``: a Pyro5 name server and pydist nodes as subprocesses on loopback.

It is the embedded default behind ``ClusterExecutor()`` and the fixture behind the tests.  Every
process it starts reads a pipe on its stdin and exits when that pipe closes, so nothing outlives the
process that started the cluster, even after ``kill -9``.  Each node gets its own loopback address
(127.0.0.(k+2) on Linux) so that nodes look like distinct hosts, its own code cache, and the cluster's
random secret.
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, List, Optional

from . import security
from .procstate import Running as _Running   # the process-wide state, in one place
from .errors import ClusterUnavailable

log = logging.getLogger(__name__)

TOPOLOGIES = ("tree", "chain", "star")


def local_secret(address: str) -> Optional[bytes]:
    """The secret of a LocalCluster running in this process at ``address`` (node or name server)."""
    with _Running.lock:
        return _Running.secrets.get(address)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def read_ready(proc: subprocess.Popen, timeout: float) -> Optional[str]:
    """Wait for a ``pydist-node`` started with ``stdout=PIPE`` to print ``READY <name> <host>:<port>``;
    returns ``host:port``, or None if it did not within ``timeout`` s (or exited)."""
    box: List[str] = []

    def read():
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").strip() if isinstance(raw, bytes) else raw.strip()
            if line.startswith("READY "):
                box.append(line.split()[2])
                return

    t = threading.Thread(target=read, daemon=True, name="pydist-ready-reader")
    t.start()
    t.join(timeout)
    return box[0] if box else None


def _node_host(k: int) -> str:
    if sys.platform.startswith("linux"):
        return f"127.0.0.{k + 2}"
    return "127.0.0.1"


def parent_index(k: int, topology: str) -> Optional[int]:
    """Index of node ``k``'s parent in a topology (None for the root)."""
    if k == 0:
        return None
    if topology == "tree":
        return (k - 1) // 2
    if topology == "chain":
        return k - 1
    return 0


class LocalCluster:
    """A name server plus ``nodes`` pydist nodes (``workers_per_node`` workers each, or a list with one
    count per node; None: the CPU count) on loopback.

    Use as a context manager; ``.address`` is the root node's ``host:port``, ``.ns_address`` the name
    server's, ``.secret`` the cluster secret (random unless given), ``.pids`` every process started.
    ``topology``: ``"tree"`` (binary), ``"chain"`` or ``"star"``.  The secret is ``PYDIST_SECRET`` if set,
    else random; clients in this process find it by address (``ClusterExecutor(address=cluster.address)``).
    ``tls_cert``/``tls_key``/``tls_ca``
    turn TLS on for the nodes, the name server and this process (see ``pydist make-certs``).  ``dashboard``
    (default True): the root serves the live web dashboard on a free port of its address; its URL, token
    included, is ``.dashboard_url``.

    Start-up (the embedded cluster behind ``ClusterExecutor()`` uses both): ``ns_in_process=True`` runs
    the name server as a thread of this process instead of a subprocess (one interpreter less to start
    on a small machine: about 0.1 s of CPU; not with TLS, whose settings are per process), and
    ``wait_workers=False`` returns as soon as the nodes accept work, while their worker processes are
    still starting (tasks wait in the node's queue until a worker is up, so the client's connect
    overlaps the workers' start).
    """

    def __init__(self, nodes: int = 1, workers_per_node: Optional[int] = None, topology: str = "tree", *,
                 secret: Optional[bytes] = None, log_level: str = "WARNING", start_timeout: float = 30.0,
                 node_args: Optional[List[str]] = None, env: Optional[dict] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None, tls_ca: Optional[str] = None,
                 dashboard: bool = True, ns_in_process: bool = False, wait_workers: bool = True):
        if nodes < 1:
            raise ValueError("a LocalCluster needs at least one node")
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
        per_node = list(workers_per_node) if isinstance(workers_per_node, (list, tuple)) else None
        if per_node is not None and (len(per_node) != nodes or any(w is not None and w < 0 for w in per_node)):
            raise ValueError(f"workers_per_node as a list needs {nodes} counts >= 0, got {per_node}")
        if per_node is None and workers_per_node is not None and workers_per_node < 0:
            raise ValueError("workers_per_node must be >= 0")
        self.n = nodes
        self.workers_per_node = workers_per_node
        self.ns_in_process = bool(ns_in_process)
        self.wait_workers = bool(wait_workers)
        self._ns_thread: Optional[_ThreadNameServer] = None
        self._janitor: Optional[subprocess.Popen] = None   # removes the temp folder if we are killed
        self.topology = topology
        if secret is None:
            env_secret = os.environ.get("PYDIST_SECRET")
            secret = env_secret.encode() if env_secret else security.new_secret()
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.node_args = list(node_args or [])
        # TLS: given as arguments, or found among node_args
        for flag, val in (("--tls-cert", tls_cert), ("--tls-key", tls_key), ("--tls-ca", tls_ca)):
            if val is not None and flag not in self.node_args:
                self.node_args += [flag, val]
        tls_opts = {f: self.node_args[i + 1] for i, f in enumerate(self.node_args[:-1])
                    if f in ("--tls-cert", "--tls-key", "--tls-ca")}
        self.tls = None
        if tls_opts:
            self.tls = security.TLSSettings(cert=tls_opts.get("--tls-cert"), key=tls_opts.get("--tls-key"),
                                            ca=tls_opts.get("--tls-ca"))
        self.extra_env = dict(env or {})
        self.dashboard = dashboard
        self._dashboard_url: Optional[str] = None
        self.ns_address = ""
        self.address = ""
        self.addresses: List[str] = []
        self.names: List[str] = [f"node{k}" for k in range(nodes)]
        self.procs: List[subprocess.Popen] = []
        self.ns_proc: Optional[subprocess.Popen] = None
        self._tmp: Optional[str] = None
        self._started = False

    # ------------------------------------------------------------------------------------------------
    @property
    def pids(self) -> List[int]:
        """Process ids of the name server and the nodes (not their workers)."""
        ps = ([self.ns_proc] if self.ns_proc else []) + self.procs
        return [p.pid for p in ps]

    def _env(self) -> dict:
        env = dict(os.environ)
        path = [p if p else os.getcwd() for p in sys.path]
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        # the nodes read the secret from a 0600 file (--secret-file), not from their environment, so it is
        # not in /proc/<node>/environ for their tasks to read
        env.pop("PYDIST_SECRET", None)
        env.pop("PYDIST_SECRET_FILE", None)
        env.update(self.extra_env)
        return env

    def _secret_file(self) -> str:
        path = os.path.join(self._tmp or ".", "secret")
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.secret if isinstance(self.secret, bytes) else self.secret.encode())
        return path

    def start(self) -> "LocalCluster":
        """Start the name server and every node; return once the root sees the whole cluster."""
        if self._started:
            return self
        self._started = True
        self._tmp = tempfile.mkdtemp(prefix="pydist-cluster-")
        env = self._env()
        ns_env = dict(env)
        # Pyro5's TLS switch is process-wide: set it to this cluster's (a plain cluster started after a
        # TLS one in this process would speak TLS to its own nodes); the nodes speak TLS to the name
        # server too
        security.configure_pyro(tls=self.tls)
        if self.tls is not None:
            ns_env.update({"PYRO_SSL": "true", "PYRO_SSL_SERVERCERT": self.tls.cert or "",
                           "PYRO_SSL_SERVERKEY": self.tls.key or "", "PYRO_SSL_CACERTS": self.tls.ca or "",
                           "PYRO_SSL_REQUIRECLIENTCERT": "true" if self.tls.ca else "false"})
        try:
            in_process = self.ns_in_process and self.tls is None
            ns_port = _free_port("127.0.0.1")
            self.ns_address = f"127.0.0.1:{ns_port}"
            if not in_process:
                self.ns_proc = subprocess.Popen(
                    [sys.executable, "-m", "pydist.cluster", "ns", "127.0.0.1", str(ns_port), self._tmp],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ns_env)
            for k in range(self.n):
                self.procs.append(self._start_node(k, env))
            if in_process:   # while the nodes' interpreters start
                self._ns_thread = _ThreadNameServer("127.0.0.1", ns_port)
                # no name server process to remove the temp folder if this process is killed: a tiny one
                self._janitor = subprocess.Popen(_janitor_command(self._tmp), stdin=subprocess.PIPE,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.addresses = [self._read_ready(k, p) for k, p in enumerate(self.procs)]
            self.address = self.addresses[0]
            if self.n > 1:
                self.wait_for_nodes(self.n, self.start_timeout)
            if self.wait_workers:
                total = self.wait_for_workers(self.start_timeout)
                if self.n > 1:
                    self.wait_for_tree_workers(total, self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self._register()
        if self.dashboard and log.isEnabledFor(logging.INFO):
            log.info("LocalCluster dashboard: %s", self.dashboard_url)
        return self

    def _register(self) -> None:
        with _Running.lock:
            for a in self.addresses + [self.ns_address]:
                _Running.secrets[a] = self.secret
            if "PYDIST_SECRET" not in os.environ:
                os.environ["PYDIST_SECRET"] = self.secret.decode()
            if os.environ.get("PYDIST_SECRET") == self.secret.decode():
                _Running.exported_by.append(self)

    def _unregister(self) -> None:
        with _Running.lock:
            for a in self.addresses + [self.ns_address]:
                if _Running.secrets.get(a) == self.secret:
                    del _Running.secrets[a]
            if self in _Running.exported_by:
                _Running.exported_by.remove(self)
                still = any(c.secret == self.secret for c in _Running.exported_by)
                if not still and os.environ.get("PYDIST_SECRET") == self.secret.decode():
                    del os.environ["PYDIST_SECRET"]

    def _start_node(self, k: int, env: dict) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pydist.cli", "node", "--host", _node_host(k), "--port", "0",
               "--name", self.names[k], "--ns", self.ns_address, "--watch-stdin",
               "--code-cache", os.path.join(self._tmp or ".", self.names[k], "code"),
               "--log-level", self.log_level, "--secret-file", self._secret_file()]
        w = self.workers_per_node
        if isinstance(w, (list, tuple)):
            w = w[k]
        if w is not None:
            cmd += ["--workers", str(w)]
        parent = parent_index(k, self.topology)
        if parent is not None:
            cmd += ["--parent", self.names[parent]]
        elif self.dashboard and "--dashboard" not in self.node_args:
            cmd += ["--dashboard", "0"]   # the root serves the dashboard on a free port of its address
        cmd += self.node_args
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def _read_ready(self, k: int, p: subprocess.Popen) -> str:
        address = read_ready(p, self.start_timeout)
        if address is None:
            raise ClusterUnavailable(f"LocalCluster node {self.names[k]} did not start within "
                                     f"{self.start_timeout:g} s (exit code {p.poll()}); see its log above")
        return address

    @property
    def dashboard_url(self) -> Optional[str]:
        """The URL of the root node's live dashboard (its token included; None if off)."""
        if self._dashboard_url is None and self.address:
            p = security.connect(self.address, secret=self.secret, timeout=5.0, tls=self.tls)
            try:
                self._dashboard_url = p.status().get("dashboard")
            finally:
                p._pyroRelease()
        return self._dashboard_url

    def wait_for_nodes(self, count: int, timeout: float = 30.0) -> None:
        """Wait until the root node reaches ``count`` nodes through its links."""
        self._wait_root(lambda st: len(st["reachable"]), count, "nodes", timeout)

    def wait_for_workers(self, timeout: float = 30.0) -> int:
        """Wait until every node's worker processes are up (so the first tasks spread evenly); returns
        how many workers the nodes have in all."""
        deadline = time.monotonic() + timeout
        total = 0
        for addr in self.addresses:
            p = security.connect(addr, secret=self.secret, timeout=max(1.0, deadline - time.monotonic()),
                                 tls=self.tls)
            try:
                while True:
                    st = p.status()
                    if st["workers_up"] >= st["workers"]:
                        total += st["workers"]
                        break
                    if time.monotonic() > deadline:
                        raise ClusterUnavailable(f"LocalCluster: node {st['name']} has {st['workers_up']} of "
                                                 f"{st['workers']} workers up after {timeout:g} s")
                    time.sleep(0.01)
            finally:
                p._pyroRelease()
        return total

    def wait_for_tree_workers(self, count: int, timeout: float = 30.0) -> None:
        """Wait until the root counts ``count`` workers on itself and behind its links.  The root learns
        a child's workers from the child's heartbeats, a moment after the child itself has them up: a task
        group spawned in that moment was refused ("the cluster has 3 workers" for a group of 4 on 2+1+1)."""
        self._wait_root(lambda st: st["workers"] + sum(l["workers"] for l in st["links"]
                                                       if l["role"] != "parent" and l["alive"]),
                        count, "workers in the tree", timeout)

    def _wait_root(self, measure: Callable[[dict], int], count: int, what: str, timeout: float) -> None:
        """Poll the root's status until ``measure(status) >= count`` (ClusterUnavailable after ``timeout``)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            try:
                p = security.connect(self.address, secret=self.secret, timeout=2.0, tls=self.tls)
                try:
                    seen = measure(p.status())
                finally:
                    p._pyroRelease()
            except Exception as exc:
                log.debug("status: %s", exc)
            if seen >= count:
                return
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"LocalCluster: the root reaches {seen} of {count} {what} after "
                                         f"{timeout:g} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop every process this cluster started (nodes, then the name server) and remove its files."""
        self._unregister()
        procs = self.procs + [p for p in (self.ns_proc, self._janitor) if p is not None]
        for p in procs:
            _terminate(p)
        for p in procs:
            _reap(p)
        if self._ns_thread is not None:
            self._ns_thread.stop()
            self._ns_thread = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def kill_node(self, k: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to node ``k`` (tests: simulate a crash)."""
        self.procs[k].send_signal(sig)

    def restart_node(self, k: int) -> str:
        """Start node ``k`` again under the same name (after it died, e.g. ``kill_node``); returns its
        new address.  Its children re-join it through the name server."""
        old = self.procs[k]
        if old.poll() is None:
            raise RuntimeError(f"node {self.names[k]} (pid {old.pid}) is still running")
        _reap(old)
        p = self._start_node(k, self._env())
        self.procs[k] = p
        address = self._read_ready(k, p)
        with _Running.lock:
            if _Running.secrets.get(self.addresses[k]) == self.secret:
                del _Running.secrets[self.addresses[k]]
            _Running.secrets[address] = self.secret
        self.addresses[k] = address
        if k == 0:
            self.address = address
        return address

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _ThreadNameServer:
    """A Pyro5 name server served by a daemon thread of this process (``ns_in_process=True``)."""

    def __init__(self, host: str, port: int):
        import Pyro5.nameserver

        _uri, self.daemon, _bc = Pyro5.nameserver.start_ns(host=host, port=port, enableBroadcast=False)
        self.thread = threading.Thread(target=self.daemon.requestLoop, daemon=True, name="pydist-ns")
        self.thread.start()

    def stop(self) -> None:
        """Stop serving, in the background: Pyro5's daemon shutdown sleeps about 0.15 s (its thread
        pool's close), which ``LocalCluster.stop`` (and so ``ClusterExecutor.shutdown``) need not wait
        for; the listening socket is closed within that time."""
        def stop() -> None:
            self.daemon.shutdown()
            self.thread.join(5.0)
            self.daemon.close()

        threading.Thread(target=stop, daemon=True, name="pydist-ns-stop").start()


def _terminate(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
        except OSError:
            pass
    for f in (p.stdin,):
        try:
            if f:
                f.close()
        except OSError:
            pass


def _wait_exit(p: subprocess.Popen, timeout: float) -> None:
    """``p.wait(timeout)``, woken the moment ``p`` exits where Linux offers a pidfd (``Popen.wait``
    with a timeout polls with sleeps of up to 50 ms: that was most of a node's stop time)."""
    try:
        fd = os.pidfd_open(p.pid)
    except (AttributeError, OSError):
        p.wait(timeout=timeout)
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    p.wait(timeout=0.5)


def _reap(p: subprocess.Popen) -> None:
    try:
        _wait_exit(p, 5.0)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if p.stdout:
        try:
            p.stdout.close()
        except OSError:
            pass


def watch_stdin() -> None:
    """Exit this process as soon as its stdin pipe closes (the parent died or stopped us)."""
    def watch():
        try:   # the raw fd, not sys.stdin: a daemon thread inside a buffered read aborts interpreter exit
            while os.read(0, 1 << 12):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="pydist-stdin-watch").start()


# The janitor removes DIR (a LocalCluster's temp folder) once its stdin pipe closes (the LocalCluster
# stopped, or its process died, even by SIGKILL) or on SIGTERM; Ctrl-C in the terminal does not stop it
# (the pipe still tells it when to clean up).  A POSIX shell where there is one: 1.7 MB resident, where a
# Python interpreter holds 11 MB for as long as the cluster runs (issue #15's idle-memory figure).
_JANITOR_SH = """
d=$1
bye() { for i in 1 2 3 4 5; do rm -rf -- "$d"; [ -e "$d" ] || break; sleep 0.3; done; exit 0; }
trap bye TERM
trap '' INT
while read -r _; do :; done
bye
"""


def _janitor_command(folder: str) -> List[str]:
    if os.path.exists("/bin/sh"):
        return ["/bin/sh", "-c", _JANITOR_SH, "pydist-janitor", folder]
    return [sys.executable, "-c", _JANITOR, folder]


# the same in Python, where there is no /bin/sh.  No pydist import: it costs the start-up nothing.
_JANITOR = """
import os, shutil, signal, sys, time
d = sys.argv[1]
def bye(*_a):
    for _ in range(5):
        shutil.rmtree(d, ignore_errors=True)
        if not os.path.exists(d):
            break
        time.sleep(0.3)
    os._exit(0)
signal.signal(signal.SIGTERM, bye)
try:
    while os.read(0, 4096):
        pass
except OSError:
    pass
bye()
"""


def _ns_main(host: str, port: int, cleanup_dir: Optional[str] = None) -> None:
    """A Pyro5 name server that exits with its parent (``python -m pydist.cluster ns HOST PORT [DIR]``).
    ``DIR``, the LocalCluster's temp folder, is removed when it exits: after ``stop()`` that is done
    already, but a parent killed with SIGKILL (or gone without stopping its cluster) leaves it to us."""
    import Pyro5.nameserver

    def bye(*_a):
        if cleanup_dir:
            for _ in range(3):   # the nodes, told by the same closed pipe, may still be writing in it
                shutil.rmtree(cleanup_dir, ignore_errors=True)
                if not os.path.exists(cleanup_dir):
                    break
                time.sleep(0.3)
        os._exit(0)

    watch_stdin()
    signal.signal(signal.SIGTERM, bye)
    Pyro5.nameserver.start_ns_loop(host=host, port=port, enableBroadcast=False)


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "ns":
        _ns_main(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) == 5 else None)
    else:
        sys.exit("usage: python -m pydist.cluster ns HOST PORT [CLEANUP_DIR]")
