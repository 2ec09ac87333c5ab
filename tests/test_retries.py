"""Retries users control (``submit(..., retries=N)``, ``ClusterExecutor(retries=N)``) and the per-worker
memory limit (``--memory-limit``): real nodes on loopback, tasks that kill their own worker."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pydist import ClusterExecutor, LocalCluster, WorkerLost
from pydist.errors import MemoryLimitExceeded

pytestmark = [pytest.mark.timeout(120), pytest.mark.one_python]


def die_first(counter, times, code=9):
    """Kill this worker the first ``times`` runs (counted in a file), then return the run number."""
    with open(counter, "a") as f:
        f.write("x")
    n = len(open(counter).read())
    if n <= times:
        os._exit(code)
    return n


def hog(mb, hold=20.0):
    """Allocate ``mb`` MiB (touched) and hold it."""
    block = bytearray(mb << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    threading.Event().wait(hold)
    return len(block)


def echo(x):
    return x


def test_retries_rerun_a_task_whose_worker_died(fresh_cluster, tmp_path):
    c = fresh_cluster(workers_per_node=1)
    counter = str(tmp_path / "runs")
    with ClusterExecutor(c.address, secret=c.secret) as ex:
        assert ex.submit(die_first, counter, 2, retries=2).result(60) == 3
        assert open(counter).read() == "xxx"
        # default 0: the first death fails the future, as before
        other = str(tmp_path / "other")
        with pytest.raises(WorkerLost):
            ex.submit(die_first, other, 1).result(30)
        assert open(other).read() == "x"


def test_poison_task_names_every_attempt(fresh_cluster, tmp_path):
    c = fresh_cluster(workers_per_node=1)
    with ClusterExecutor(c.address, secret=c.secret, retries=2) as ex:
        f = ex.submit(die_first, str(tmp_path / "runs"), 99, 7)
        with pytest.raises(WorkerLost) as info:
            f.result(60)
        msg = str(info.value)
        assert "3 attempts" in msg and msg.count("exit code 7") == 3 and msg.count("node0") >= 3, msg
        assert open(tmp_path / "runs").read() == "xxx"
        assert list(ex.map(echo, range(10))) == list(range(10))       # the node serves on


def test_retries_of_a_task_run_on_a_child(tmp_path):
    with LocalCluster(nodes=2, workers_per_node=[0, 1]) as c:
        with ClusterExecutor(c.address, secret=c.secret) as ex:
            with pytest.raises(WorkerLost) as info:
                ex.submit(die_first, str(tmp_path / "runs"), 99, 5, retries=1).result(60)
            msg = str(info.value)
            assert "2 attempts" in msg and msg.count("node1") >= 2 and "exit code 5" in msg, msg
            assert ex.submit(die_first, str(tmp_path / "ok"), 1, retries=1).result(60) == 2


@pytest.mark.parametrize("bad", [-1, 101, 1.5, True, "2"])
def test_bad_retries_are_refused(executor, bad):
    with pytest.raises(ValueError, match="retries"):
        executor.submit(echo, 1, retries=bad)


def test_memory_limit_restarts_the_worker_and_fails_its_task(fresh_cluster):
    c = fresh_cluster(workers_per_node=1, node_args=["--memory-limit", "120M"])
    with ClusterExecutor(c.address, secret=c.secret) as ex:
        t0 = time.monotonic()
        with pytest.raises(MemoryLimitExceeded) as info:
            ex.submit(hog, 300).result(60)
        assert time.monotonic() - t0 < 20
        assert isinstance(info.value, WorkerLost)
        msg = str(info.value)
        assert "memory limit" in msg and "120 MiB" in msg and "node0" in msg, msg
        assert ex.submit(hog, 10, 0.0).result(30) == 10 << 20         # a task within the limit runs
        assert ex.status()["worker_restarts"] == 1
