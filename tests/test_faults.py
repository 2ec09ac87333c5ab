"""Faults: bad input, unpicklable things, tasks that exit, workers and nodes that die.

Tests that only send bad input share the session ``cluster``; tests that kill a worker or a node start
their own (``fresh_cluster``) and check, through ``proc_guard``, that every process they started (the
orphaned workers of a killed node included) is gone at the end.  No sleeps: conditions with deadlines.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import sys
import threading
import time

import pytest

from pydist import (BrokenCluster, ClusterExecutor, ClusterUnavailable, PydistError, RemoteError,
                    SerializationError, WorkerLost)
from conftest import descendants, gated, wait_for

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------ tasks
def echo(x):
    return x


def pid():
    return os.getpid()


def exit_now(code):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def call_sys_exit(code):
    sys.exit(code)


def unpicklable_result():
    return threading.Lock()


def _refuse(msg):
    raise RuntimeError(msg)


class BreaksOnUnpickle:
    """Pickles fine; rebuilding it raises."""

    def __reduce__(self):
        return (_refuse, ("this argument refuses to be rebuilt",))


def append_and_exit(path, code):
    with open(path, "a") as f:
        f.write("x")
    os._exit(code)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ bad input
def test_no_node_at_address():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ClusterUnavailable, match=f"127.0.0.1:{port}"):
        ClusterExecutor(address=f"127.0.0.1:{port}", secret=b"s" * 32, connect_timeout=1)
    assert time.monotonic() - t0 < 5


def test_no_name_server_at_address():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ClusterUnavailable, match=f"127.0.0.1:{port}"):
        ClusterExecutor(ns=f"127.0.0.1:{port}", secret=b"s" * 32, connect_timeout=1)
    assert time.monotonic() - t0 < 5


def test_unpicklable_argument(executor):
    # as with ProcessPoolExecutor the future fails (SerializationError is a pickle.PicklingError)
    with pytest.raises(SerializationError, match="lock"):
        executor.submit(echo, threading.Lock()).result(10)
    with pytest.raises(SerializationError):
        executor.submit(echo, x=threading.Lock()).result(10)
    assert len(executor._pending) == 0
    assert executor.submit(echo, 5).result(10) == 5      # the executor stays usable


def test_unpicklable_result(executor):
    f = executor.submit(unpicklable_result)
    with pytest.raises(SerializationError, match="result"):
        f.result(10)
    assert executor.submit(echo, "next").result(10) == "next"


def test_argument_that_fails_to_unpickle(executor):
    with pytest.raises(SerializationError) as info:
        executor.submit(echo, BreaksOnUnpickle()).result(10)
    msg = str(info.value)
    assert "unpickle" in msg and "refuses to be rebuilt" in msg
    assert isinstance(info.value.__cause__, RemoteError)
    assert executor.submit(echo, 1).result(10) == 1


def test_task_calling_sys_exit(executor):
    restarts = executor.status()["worker_restarts"]
    bad = executor.submit(call_sys_exit, 3)
    good = [executor.submit(echo, i) for i in range(10)]
    with pytest.raises(SystemExit) as info:     # re-raised as itself, as ProcessPoolExecutor does
        bad.result(10)
    assert info.value.code == 3
    assert [f.result(10) for f in good] == list(range(10))
    assert executor.status()["worker_restarts"] == restarts     # sys.exit did not kill the worker


# ------------------------------------------------------------------------------------------ dead workers
@pytest.mark.parametrize("killer,args", [(exit_now, (13,)), (kill_self, ())], ids=["os._exit", "SIGKILL"])
def test_worker_dies_mid_task(fresh_cluster, killer, args):
    c = fresh_cluster(workers_per_node=2)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        assert ex.submit(echo, 0).result(20) == 0
        f = ex.submit(killer, *args)
        with pytest.raises(WorkerLost) as info:
            f.result(20)
        assert "node0" in str(info.value)
        # the node keeps serving, with a replacement worker
        assert list(ex.map(echo, range(20))) == list(range(20))
        st = ex.status()
        assert st["worker_restarts"] >= 1
        wait_for(lambda: ex.status()["workers_up"] == 2, 15, "the replacement worker")


def test_a_node_holds_no_more_descriptors_after_many_worker_deaths(fresh_cluster):
    """Each worker has three pipes and a slot file; a replaced worker's must all be closed (a node that
    lost a descriptor per death would run out after a few hundred)."""
    import psutil

    c = fresh_cluster(workers_per_node=1)
    node = psutil.Process(c.procs[0].pid)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        assert ex.submit(echo, 0).result(20) == 0
        before = node.num_fds()
        for i in range(12):
            with pytest.raises(WorkerLost):
                ex.submit(exit_now, 3).result(30)
            wait_for(lambda: ex.status()["workers_up"] == 1, 15, "the replacement worker")
            assert ex.submit(echo, i).result(20) == i
        wait_for(lambda: node.num_fds() <= before + 2, 10,
                 f"the node's descriptors to come back to {before} (+2) after 12 worker deaths")


def test_worker_killed_from_outside(fresh_cluster, gate):
    c = fresh_cluster(workers_per_node=1)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        victim = ex.submit(gated, gate.path, "never", gate.started("victim"))
        queued = [ex.submit(echo, i) for i in range(5)]
        wait_for(lambda: os.path.exists(gate.started("victim")) and open(gate.started("victim")).read(), 15,
                 "the task to start")
        worker_pid = int(open(gate.started("victim")).read())
        assert worker_pid in descendants(c.procs[0].pid)
        os.kill(worker_pid, signal.SIGKILL)
        with pytest.raises(WorkerLost):
            victim.result(20)
        assert [f.result(20) for f in queued] == list(range(5))   # re-placed on the replacement
        assert ex.status()["worker_restarts"] == 1
        assert ex.submit(pid).result(10) != worker_pid


def test_worker_death_blames_only_the_killer(fresh_cluster, tmp_path):
    c = fresh_cluster(workers_per_node=1)
    count = tmp_path / "killer-runs"
    count.write_text("")
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        assert list(ex.map(echo, range(300))) == list(range(300))   # short tasks: the node batches them
        before = [ex.submit(echo, i) for i in range(5)]
        killer = ex.submit(append_and_exit, str(count), 7)
        after = [ex.submit(echo, i) for i in range(5, 10)]
        outcomes = []
        for f in before + after:
            try:
                outcomes.append(f.result(20))
            except WorkerLost:
                outcomes.append("lost")
        with pytest.raises(WorkerLost):
            killer.result(20)
        assert outcomes == list(range(10))
        assert count.read_text() == "x", "the killing task ran more than once"
        assert ex.status()["worker_restarts"] == 1


# ------------------------------------------------------------------------------------------ dead node
def test_node_killed_with_pending_futures(fresh_cluster, gate, proc_guard):
    c = fresh_cluster(workers_per_node=2)
    node_pid = c.procs[0].pid
    workers = descendants(node_pid)
    assert len(workers) == 2
    proc_guard.watch(workers)
    ex = ClusterExecutor(address=c.address, secret=c.secret)
    try:
        fs = [ex.submit(gated, gate.path, i) for i in range(8)]
        wait_for(lambda: fs[0].running(), 15, "a task to start")
        t0 = time.monotonic()
        os.kill(node_pid, signal.SIGKILL)
        done, not_done = cf.wait(fs, timeout=10)
        assert not not_done, "pending futures hang after the node died"
        assert time.monotonic() - t0 < 10
        for f in fs:
            exc = f.exception(0)
            assert isinstance(exc, BrokenCluster) and isinstance(exc, cf.BrokenExecutor)
            assert c.address in str(exc)
        with pytest.raises(BrokenCluster):
            ex.submit(echo, 1)
        gate.open()   # let the orphaned workers finish their task and see the closed pipe
    finally:
        t0 = time.monotonic()
        ex.shutdown(wait=True)
        assert time.monotonic() - t0 < 10


def test_executor_keeps_working_after_bad_input_burst(executor):
    """Interleave failures of every kind with good tasks: each future gets its own outcome."""
    fs = []
    for i in range(10):
        fs.append(("ok", executor.submit(echo, i)))
        fs.append(("exit", executor.submit(call_sys_exit, i)))
        fs.append(("arg", executor.submit(echo, BreaksOnUnpickle())))
        fs.append(("res", executor.submit(unpicklable_result)))
    for kind, f in fs:
        exc = f.exception(20)
        if kind == "ok":
            assert exc is None
        elif kind == "exit":
            assert isinstance(exc, SystemExit), (kind, exc)
        else:
            assert isinstance(exc, PydistError), (kind, exc)
