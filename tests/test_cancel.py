"""Cancellation reaches queued work wherever it waits (issue #9, item 6).

After short tasks a worker's prefetch window grows (up to ``scheduler.MAX_WINDOW``), so the tasks queued
behind a running one already sit at the worker, in its pipe or its local queue.  Wherever a task waits
(the client's outbox, the node's queue, a worker's queue, a child node's queue or worker) each way of
cancelling it (``Future.cancel()``, ``shutdown(cancel_futures=True)``, cancelling the asyncio task that
awaits it) must withdraw it, and ``cancel()`` keeps its meaning: True only if the task will never run;
False, with the future running, if it started.  Real clusters on loopback; the tasks leave marker files,
so "never ran" is checked on disk.
"""
from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import pytest

from pydist import AsyncClusterExecutor, ClusterExecutor, LocalCluster
from conftest import gated, wait_for

pytestmark = pytest.mark.timeout(120)


def noop(x):
    return x


def touch(path, value):
    with open(path, "w"):
        pass
    return value


def touch_and_spin(path, seconds):
    with open(path, "w"):
        pass
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:   # the task's work
        pass
    return path


def _warm(ex, n=3000):
    """Many tiny tasks: the node measures short runtimes and opens each worker's window wide."""
    assert list(ex.map(noop, range(n), chunksize=1)) == list(range(n))
    st = ex.status()
    assert st["avg_task_s"] is not None and st["avg_task_s"] < 0.001, st["avg_task_s"]


def _start_first(ex, gate):
    """Submit the gated task "first" and return its future once a worker runs it."""
    first = ex.submit(gated, gate.path, "first", gate.started("first"))
    wait_for(lambda: os.path.exists(gate.started("first")), 30, "the first task to start")
    return first


def _running_at_workers(ex):
    return ex.status()["running"]


# ================================================================== a task waiting at a worker (window)
def test_cancel_withdraws_tasks_already_sent_to_a_worker(fresh_cluster, gate, tmp_path):
    c = fresh_cluster(nodes=1, workers_per_node=1)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        _warm(ex)
        first = _start_first(ex, gate)
        marks = [str(tmp_path / f"m{i}") for i in range(20)]
        futs = [ex.submit(touch, m, i) for i, m in enumerate(marks)]
        # the point of the test: they wait at the worker (its window), not in the node's queue
        wait_for(lambda: _running_at_workers(ex) == 21, 30, "the 20 tasks to reach the worker")
        assert [f.cancel() for f in futs] == [True] * 20
        assert all(f.cancelled() for f in futs)
        assert ex.status()["running"] == 1, "the withdrawn tasks still count against the worker"
        gate.open()
        assert first.result(timeout=30) == "first"
        assert ex.submit(noop, 5).result(timeout=30) == 5   # the worker is free: the others never ran
        assert [m for m in marks if os.path.exists(m)] == [], "cancelled tasks ran"
        st = ex.status()
        assert st["held"] == 0 and st["running"] == 0, st


def test_shutdown_cancel_futures_withdraws_tasks_at_the_worker(fresh_cluster, gate, tmp_path):
    c = fresh_cluster(nodes=1, workers_per_node=1)
    ex = ClusterExecutor(address=c.address, secret=c.secret)
    try:
        _warm(ex)
        first = _start_first(ex, gate)
        marks = [str(tmp_path / f"m{i}") for i in range(30)]
        futs = [ex.submit(touch, m, i) for i, m in enumerate(marks)]
        wait_for(lambda: _running_at_workers(ex) == 31, 30, "the 30 tasks to reach the worker")
        ex.shutdown(wait=False, cancel_futures=True)
        assert [f.cancelled() for f in futs] == [True] * 30
        assert first.running() and not first.cancelled()
        gate.open()
        assert first.result(timeout=30) == "first"
    finally:
        gate.open()
        ex.shutdown(wait=True)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex2:   # the node ran nothing else
        assert ex2.submit(noop, 1).result(timeout=30) == 1
    assert [m for m in marks if os.path.exists(m)] == [], "tasks cancelled by shutdown(cancel_futures=True) ran"


def test_cancelling_asyncio_tasks_withdraws_them_from_the_worker(fresh_cluster, gate, tmp_path):
    c = fresh_cluster(nodes=1, workers_per_node=1)
    marks = [str(tmp_path / f"a{i}") for i in range(20)]

    async def main():
        async with AsyncClusterExecutor(address=c.address, secret=c.secret) as ex:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _warm, ex.executor)
            first = ex.submit(gated, gate.path, "first", gate.started("first"))
            await loop.run_in_executor(
                None, lambda: wait_for(lambda: os.path.exists(gate.started("first")), 30, "the first task"))
            tasks = [ex.submit(touch, m, i) for i, m in enumerate(marks)]

            async def awaiting(t):
                return await t

            waiters = [asyncio.ensure_future(awaiting(t)) for t in tasks[10:]]
            await loop.run_in_executor(
                None, lambda: wait_for(lambda: _running_at_workers(ex.executor) == 21, 30, "tasks at the worker"))
            for t in tasks[:10]:
                t.cancel()   # the Task submit() returned
            for w in waiters:
                w.cancel()   # a coroutine awaiting it
            for t in tasks[:10] + waiters:
                with pytest.raises(asyncio.CancelledError):
                    await t
            # the pydist futures are cancelled from a helper thread: wait until the worker is empty
            await loop.run_in_executor(
                None, lambda: wait_for(lambda: _running_at_workers(ex.executor) == 1, 30, "withdrawals"))
            gate.open()
            assert await first == "first"
            assert await ex.submit(noop, 3) == 3
    asyncio.run(asyncio.wait_for(main(), 90))
    assert [m for m in marks if os.path.exists(m)] == [], "cancelled asyncio tasks ran"


def test_cancel_of_a_started_task_returns_false_and_its_result_arrives(fresh_cluster, gate, tmp_path):
    c = fresh_cluster(nodes=1, workers_per_node=1)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        _warm(ex, 500)
        first = _start_first(ex, gate)
        assert first.cancel() is False
        assert first.running() and not first.cancelled()
        assert first.cancel() is False   # again: still running, still False
        gate.open()
        assert first.result(timeout=30) == "first"
        assert first.cancel() is False   # done


# ============================================================================ a task at a child node
def test_cancel_withdraws_a_task_queued_at_a_child_node(proc_guard, gate, tmp_path):
    """node0 has no worker: everything is forwarded to node1, where it waits at the worker's window."""
    with LocalCluster(nodes=2, workers_per_node=[0, 1]) as c, \
            ClusterExecutor(address=c.address, secret=c.secret) as ex:
        wait_for(lambda: ex.status()["reachable"] == ["node0", "node1"], 30, "node1 to join")
        _warm(ex, 2000)
        first = _start_first(ex, gate)
        marks = [str(tmp_path / f"c{i}") for i in range(20)]
        futs = [ex.submit(touch, m, i) for i, m in enumerate(marks)]
        wait_for(lambda: ex.status()["forwarded"] == 21, 30, "the tasks to be forwarded to node1")
        assert [f.cancel() for f in futs] == [True] * 20
        wait_for(lambda: ex.status()["forwarded"] == 1, 30, "node0 to free the credit of the withdrawn tasks")
        assert first.cancel() is False and first.running()
        gate.open()
        assert first.result(timeout=30) == "first"
        assert ex.submit(noop, 2).result(timeout=30) == 2
        assert [m for m in marks if os.path.exists(m)] == [], "tasks cancelled at the child ran"



def test_running_is_true_only_for_the_task_a_child_nodes_worker_runs(proc_guard, gate, tmp_path):
    """``running()`` of tasks forwarded to a child node is what the child's worker does: the task it
    runs (even two hops away) is running, those queued behind it at the child are not (they were
    all "running" from the moment they were forwarded)."""
    with LocalCluster(nodes=3, workers_per_node=[0, 0, 1], topology="chain") as c, \
            ClusterExecutor(address=c.address, secret=c.secret) as ex:
        wait_for(lambda: ex.status()["reachable"] == ["node0", "node1", "node2"], 30, "the chain to join")
        _warm(ex, 2000)
        first = _start_first(ex, gate)
        futs = [ex.submit(noop, i) for i in range(10)]
        wait_for(lambda: ex.status()["forwarded"] == 11, 30, "the tasks to be forwarded")
        wait_for(first.running, 10, "the task node2's worker runs to be running")
        assert [f.running() for f in futs] == [False] * 10, "queued behind the running task, at node2"
        gate.open()
        assert first.result(timeout=30) == "first"
        assert [f.result(timeout=30) for f in futs] == list(range(10))

# ================================================================== races: cancel while tasks start
def test_cancel_keeps_its_meaning_while_the_worker_races_through_the_queue(fresh_cluster, tmp_path):
    """Tasks start while another thread cancels them (in random order): every cancel() that returned
    True is a task that never ran, every False one delivers its result; nothing hangs."""
    c = fresh_cluster(nodes=1, workers_per_node=2)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        _warm(ex, 2000)
        marks = [str(tmp_path / f"r{i}") for i in range(400)]
        futs = [ex.submit(touch_and_spin, m, 0.002) for m in marks]
        order = list(range(len(futs)))
        random.Random(9).shuffle(order)
        verdict = {}

        def canceller(part):
            for i in part:
                verdict[i] = futs[i].cancel()

        threads = [threading.Thread(target=canceller, args=(order[k::3],)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(verdict) == len(futs)
        for i, f in enumerate(futs):
            if verdict[i]:
                assert f.cancelled()
            else:
                assert f.result(timeout=30) == marks[i]
        assert ex.submit(noop, 1).result(timeout=30) == 1   # drains the workers: what was kept ran
        ran = {i for i, m in enumerate(marks) if os.path.exists(m)}
        wrongly = sorted(i for i in ran if verdict[i])
        assert not wrongly, f"{len(wrongly)} tasks ran although cancel() returned True"
        assert ran == {i for i in verdict if not verdict[i]}
        assert sum(verdict.values()) > 0, "nothing was withdrawn: the test did not exercise the worker queue"
        st = ex.status()
        assert st["held"] == 0 and st["running"] == 0, st


def test_cancel_while_the_worker_dies(fresh_cluster, gate, tmp_path):
    """The worker holding the window is killed while its tasks are being cancelled: withdrawn tasks
    never run, the others run on the replacement; nothing hangs."""
    import psutil

    c = fresh_cluster(nodes=1, workers_per_node=1)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        _warm(ex, 1000)
        first = _start_first(ex, gate)
        marks = [str(tmp_path / f"d{i}") for i in range(20)]
        futs = [ex.submit(touch, m, i) for i, m in enumerate(marks)]
        wait_for(lambda: _running_at_workers(ex) == 21, 30, "the tasks to reach the worker")
        pid = int(wait_for(lambda: open(gate.started("first")).read().strip(), 30, "the task's pid"))
        verdict = [f.cancel() for f in futs[:10]]
        psutil.Process(pid).kill()
        verdict += [f.cancel() for f in futs[10:]]
        gate.open()
        with pytest.raises(Exception):
            first.result(timeout=30)   # its worker died (WorkerLost)
        for i, f in enumerate(futs):
            if verdict[i]:
                assert f.cancelled()
            else:
                assert f.result(timeout=30) == i
        assert ex.submit(noop, 1).result(timeout=30) == 1
        assert not [i for i, m in enumerate(marks) if os.path.exists(m) and verdict[i]]


# ======================================================================== many at once: one question
def test_leaving_a_map_early_withdraws_the_rest_at_once(fresh_cluster, gate, tmp_path):
    """Breaking out of ``map`` cancels the calls not yet returned (as Executor.map does): thousands of
    them, sent ahead to the workers, are withdrawn in one round trip, not one per future."""
    c = fresh_cluster(nodes=1, workers_per_node=2)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        _warm(ex, 2000)
        marks = [str(tmp_path / "first")] + [str(tmp_path / f"x{i}") for i in range(3000)]
        it = ex.map(touch_and_spin, marks, [0.0] + [0.0005] * 3000)
        assert next(it) == marks[0]
        t0 = time.monotonic()
        it.close()   # what leaving a for loop early does to the generator
        took = time.monotonic() - t0
        assert ex.submit(noop, 1).result(timeout=30) == 1
        ran = sum(os.path.exists(m) for m in marks[1:])
        assert ran < 3000 - 500, f"only {3000 - ran} of 3000 calls were withdrawn"
        assert took < 3.0, f"cancelling the rest of the map took {took:.1f} s"
        st = ex.status()
        assert st["held"] == 0 and st["running"] == 0, st


def test_cancel_while_the_child_node_holding_the_tasks_dies(proc_guard, gate, tmp_path):
    """The child holding forwarded tasks is killed as they are cancelled: the parent takes them back
    (its link is lost), so the cancel withdraws them there; none runs, nothing hangs."""
    from conftest import cluster_pids

    with LocalCluster(nodes=2, workers_per_node=[0, 1]) as c:
        ex = ClusterExecutor(address=c.address, secret=c.secret)
        try:
            _cancel_as_the_child_dies(c, ex, proc_guard, gate, tmp_path, cluster_pids)
        finally:   # (node0 has no worker: a task that was not withdrawn would wait there for ever)
            gate.open()
            ex.shutdown(wait=False, cancel_futures=True)


def _cancel_as_the_child_dies(c, ex, proc_guard, gate, tmp_path, cluster_pids):
    if True:
        proc_guard.watch(cluster_pids(c))
        wait_for(lambda: ex.status()["reachable"] == ["node0", "node1"], 30, "node1 to join")
        _warm(ex, 1000)
        first = _start_first(ex, gate)
        marks = [str(tmp_path / f"k{i}") for i in range(20)]
        futs = [ex.submit(touch, m, i) for i, m in enumerate(marks)]
        wait_for(lambda: ex.status()["forwarded"] == 21, 30, "the tasks to be forwarded to node1")
        c.kill_node(1)
        t0 = time.monotonic()
        assert [f.cancel() for f in futs] == [True] * 20
        assert time.monotonic() - t0 < 10
        assert first.cancel() is True   # its node died: queued again at node0 (no workers), withdrawn
        gate.open()
        assert [m for m in marks if os.path.exists(m)] == []
        st = ex.status()
        assert st["held"] == 0, st
