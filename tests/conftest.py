"""Shared fixtures: real pydist clusters on loopback, and the checks that no process outlives its test.

* ``cluster`` (session): one ``LocalCluster(nodes=1, workers_per_node=2)`` shared by every test that
  does not kill anything.  ``executor`` (function): a ``ClusterExecutor`` connected to it, shut down
  after the test.
* ``fresh_cluster`` (function): a factory for private clusters, for tests that kill workers or nodes.
* ``proc_guard`` (function): at teardown, waits (with a deadline) until every child process started
  during the test is gone, and every pid handed to ``proc_guard.watch`` (orphaned workers of a killed
  node, processes of a subprocess) has exited.
* A session-level check: once every other fixture is torn down, the pytest process has no child left.

No sleeps: ``wait_for`` polls a condition with a deadline.
"""
from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

# A client long poll returns after this many seconds at most; shutdown() waits for the poll in
# flight, so the default (1 s) would add up to a second to every executor's teardown.
os.environ.setdefault("PYDIST_POLL_INTERVAL", "0.2")

from pydist import ClusterExecutor, LocalCluster  # noqa: E402


def wait_for(cond, timeout=20.0, what="condition", interval=0.01, retry_on=()):
    """Poll ``cond()`` until it returns something truthy (returned), or fail after ``timeout`` s.
    Exceptions of the types in ``retry_on`` (e.g. a node not answering yet) count as "not yet"."""
    deadline = time.monotonic() + timeout
    ev = threading.Event()
    last_exc = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except retry_on as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        ev.wait(interval)   # a poll interval, not a synchronisation sleep


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def live_children() -> dict:
    """pid -> command line of every live (non-zombie) descendant of this process."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = " ".join(p.cmdline())[:160]
        except psutil.NoSuchProcess:
            pass
    return out


def descendants(pid: int) -> list:
    """Pids of every live descendant of ``pid`` (e.g. a node's workers)."""
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cluster_pids(cluster: LocalCluster) -> list:
    """Every process of a LocalCluster: name server, nodes and the nodes' workers."""
    pids = list(cluster.pids)
    for p in cluster.procs:
        pids += descendants(p.pid)
    return pids


def wait_gone(pids, timeout=20.0, what="processes"):
    pids = list(pids)
    wait_for(lambda: not [p for p in pids if _alive(p)], timeout,
             f"{what} to exit (still alive: {[p for p in pids if _alive(p)]})")


class ProcGuard:
    def __init__(self, baseline=None):
        self.baseline = set(live_children()) if baseline is None else set(baseline)
        self.watched: list = []

    def watch(self, pids) -> None:
        self.watched.extend(pids)

    def check(self, timeout=15.0) -> None:
        def clean():
            extra = {p: c for p, c in live_children().items() if p not in self.baseline}
            alive = [p for p in self.watched if _alive(p)]
            return (not extra and not alive), extra, alive

        deadline = time.monotonic() + timeout
        ev = threading.Event()
        while True:
            ok, extra, alive = clean()
            if ok:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"processes left behind by the test: children {extra}, watched {alive}")
            ev.wait(0.02)


@pytest.fixture
def proc_guard():
    """Function-level leak check (see the module docstring)."""
    g = ProcGuard()
    yield g
    g.check()


@pytest.fixture(scope="session", autouse=True)
def _no_children_left_at_session_end():
    """After every other fixture is torn down, the pytest process has no child process left."""
    yield
    ProcGuard(baseline=()).check(timeout=20.0)


@pytest.fixture(scope="session")
def cluster(_no_children_left_at_session_end):
    with LocalCluster(nodes=1, workers_per_node=2) as c:
        yield c


@pytest.fixture
def executor(cluster):
    ex = ClusterExecutor(address=cluster.address, secret=cluster.secret)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def fresh_cluster(proc_guard):
    """Factory: ``fresh_cluster(nodes=1, workers_per_node=1)`` starts a private LocalCluster, stopped
    (and checked for leftovers, orphaned workers included) at teardown."""
    started = []

    def make(**kw):
        kw.setdefault("nodes", 1)
        kw.setdefault("workers_per_node", 1)
        c = LocalCluster(**kw).start()
        started.append(c)
        wait_for(lambda: all(len(descendants(p.pid)) >= (kw["workers_per_node"] or 0) for p in c.procs),
                 10, "the cluster's workers to start")
        proc_guard.watch(cluster_pids(c))
        return c

    yield make
    for c in started:
        c.stop()


def gated(gate_path, value=None, started_path=None, timeout=30.0):
    """A task that blocks until ``gate_path`` exists (the test opens the gate), then returns ``value``.
    Writes ``started_path`` first, so a test can see that it runs."""
    if started_path:
        with open(started_path, "w") as f:
            f.write(str(os.getpid()))
    deadline = time.monotonic() + timeout
    ev = threading.Event()
    while not os.path.exists(gate_path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate_path} never opened")
        ev.wait(0.005)
    return value


class Gate:
    def __init__(self, directory):
        self.dir = str(directory)
        self.path = os.path.join(self.dir, "gate-open")

    def started(self, name) -> str:
        return os.path.join(self.dir, f"started-{name}")

    def open(self) -> None:
        with open(self.path, "w"):
            pass


@pytest.fixture
def gate(tmp_path):
    """A file gate for ``gated`` tasks; opened at teardown so that no task stays blocked."""
    g = Gate(tmp_path)
    yield g
    g.open()
