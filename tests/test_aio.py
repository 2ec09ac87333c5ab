"""asyncio (issue #14, item 2): ``AsyncClusterExecutor`` / ``ClusterExecutor(...).asyncio()``.

``await ex.submit``, ``await ex.map``, ``async for fut in ex.as_completed``, ``async with``; cancelling
the awaiting task cancels the pydist task; the running loop is never blocked (a ticker coroutine keeps
ticking while executors open, tasks are sent and results awaited); ``loop.run_in_executor`` with a
plain ``ClusterExecutor`` keeps working.  Real clusters on loopback.
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from pydist import AsyncClusterExecutor, ClusterExecutor
from conftest import gated, wait_for

pytestmark = pytest.mark.timeout(120)


def square(x):
    return x * x


def boom(x):
    raise ValueError(f"boom {x}")


def slow(x, seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:   # the task's work
        pass
    return x


def touch(path, value):
    with open(path, "w"):
        pass
    return value


class Ticker:
    """Counts loop iterations every ``interval`` s and records the longest gap (a blocked loop)."""

    def __init__(self, interval=0.01):
        self.interval = interval
        self.ticks = 0
        self.max_gap = 0.0
        self._task = None

    async def _run(self):
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)   # the ticker's own pace, not synchronisation
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    def __enter__(self):
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc):
        self._task.cancel()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


# ============================================================================================ basics
def test_submit_map_as_completed(cluster):
    async def main():
        async with AsyncClusterExecutor(address=cluster.address, secret=cluster.secret) as ex:
            assert await ex.submit(square, 7) == 49
            assert await ex.map(square, range(20)) == [i * i for i in range(20)]
            assert await ex.map(square, range(20), chunksize=6) == [i * i for i in range(20)]
            assert await asyncio.gather(*(ex.submit(square, i) for i in range(10))) == [i * i for i in range(10)]
            got = []
            async for fut in ex.as_completed([ex.submit(slow, i, 0.05 * (3 - i)) for i in range(3)]):
                assert fut.done()
                got.append(fut.result())
            assert sorted(got) == [0, 1, 2]
            pf = ex.executor.submit(square, 5)   # a concurrent.futures future works too
            async for fut in ex.as_completed([pf]):
                assert await fut == 25
            with pytest.raises(ValueError, match="boom 3"):
                await ex.submit(boom, 3)
            with pytest.raises(ValueError, match="boom"):
                await ex.map(boom, range(3))
            assert await ex.submit(square, 2) == 4   # still usable
    run(main())


def test_asyncio_method_of_cluster_executor(cluster):
    ex = ClusterExecutor(address=cluster.address, secret=cluster.secret)

    async def main():
        async with ex.asyncio() as aex:
            assert isinstance(aex, AsyncClusterExecutor)
            assert aex.executor is ex
            assert await aex.submit(square, 3) == 9
    run(main())
    with pytest.raises(RuntimeError):   # leaving 'async with' shut the wrapped executor down
        ex.submit(square, 1)


def test_submit_returns_a_task_and_timeouts(cluster):
    async def main():
        async with AsyncClusterExecutor(address=cluster.address, secret=cluster.secret) as ex:
            f = ex.submit(square, 4)
            assert isinstance(f, asyncio.Future) and not f.done()
            assert await f == 16 and f.result() == 16
            with pytest.raises(TypeError):
                ex.submit(42)
            with pytest.raises((asyncio.TimeoutError, TimeoutError)):
                await ex.map(slow, [1, 2], [3.0, 3.0], timeout=0.2)
            with pytest.raises(TimeoutError):
                async for _ in ex.as_completed([ex.submit(slow, 1, 3.0)], timeout=0.2):
                    pass
    run(main())


def test_after_shutdown_submit_raises(cluster):
    async def main():
        ex = AsyncClusterExecutor(address=cluster.address, secret=cluster.secret)
        assert await ex.submit(square, 2) == 4     # opened on first use
        await ex.shutdown()
        with pytest.raises(RuntimeError):
            await ex.submit(square, 2)
    run(main())


# ====================================================================================== cancellation
def test_cancelling_the_awaiting_task_cancels_the_queued_pydist_task(fresh_cluster, gate, tmp_path):
    """Both ways: cancelling the Task submit() returned, and cancelling a coroutine that awaits it."""
    c = fresh_cluster(nodes=1, workers_per_node=1)
    marker = str(tmp_path / "second-ran")

    async def main():
        async with AsyncClusterExecutor(address=c.address, secret=c.secret) as ex:
            first = ex.submit(gated, gate.path, "first", gate.started("first"))
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_for(lambda: os.path.exists(gate.started("first")), 30, "the first task"))
            second = ex.submit(touch, marker, "second")

            def queued():
                st = ex.executor.status()
                return st["queued"] >= 1 or st.get("pending", 0) >= 1

            await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(queued, 30, "queued"))
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
            assert second.cancelled()
            async def waiter():
                return await ex.submit(touch, marker + "-3", "third")

            third = asyncio.ensure_future(waiter())
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_for(lambda: ex.executor.status()["queued"] >= 1, 30, "queued"))
            third.cancel()
            with pytest.raises(asyncio.CancelledError):
                await third
            gate.open()
            assert await first == "first"
            assert await ex.submit(square, 3) == 9   # the worker is free again: the others never ran
        assert not os.path.exists(marker), "the cancelled task ran"
        assert not os.path.exists(marker + "-3"), "the task whose awaiting coroutine was cancelled ran"
    run(main())


def test_cancel_during_map_cancels_the_rest(fresh_cluster, gate, tmp_path):
    c = fresh_cluster(nodes=1, workers_per_node=1)

    async def main():
        async with AsyncClusterExecutor(address=c.address, secret=c.secret) as ex:
            t = asyncio.ensure_future(ex.map(touch, [str(tmp_path / f"m{i}") for i in range(20)], range(20)))
            blocker = ex.submit(gated, gate.path, 0)
            await asyncio.sleep(0)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            gate.open()
            await blocker
            await ex.submit(square, 1)
            st = await ex.status()
            assert st["queued"] == 0
    run(main())


# ================================================================================ never blocks the loop
def test_the_loop_keeps_running_while_a_local_cluster_starts_and_tasks_run(proc_guard):
    async def main():
        with Ticker() as tick:
            t0 = time.monotonic()
            async with AsyncClusterExecutor(max_workers=1) as ex:   # starts a LocalCluster
                opened = time.monotonic() - t0
                ticks_at_open = tick.ticks
                assert await ex.submit(slow, 1, 0.5) == 1
                assert await ex.map(slow, range(3), [0.1] * 3) == [0, 1, 2]
            total = time.monotonic() - t0
        assert ticks_at_open >= 3, f"the loop ticked {ticks_at_open} times while the cluster started ({opened:.2f} s)"
        assert tick.max_gap < max(0.5, total / 3), f"the loop was blocked for {tick.max_gap:.2f} s of {total:.2f} s"
    run(main())


def test_run_in_executor_with_a_plain_cluster_executor(cluster):
    async def main():
        loop = asyncio.get_running_loop()
        with ClusterExecutor(address=cluster.address, secret=cluster.secret) as ex:
            assert await loop.run_in_executor(ex, square, 6) == 36
            assert await asyncio.gather(*(loop.run_in_executor(ex, square, i) for i in range(5))) == [
                0, 1, 4, 9, 16]
    run(main())


def test_bad_arguments():
    with pytest.raises(ValueError):
        AsyncClusterExecutor("x:1", executor=object())

    async def main():
        ex = AsyncClusterExecutor(address="127.0.0.1:1", connect_timeout=0.5)
        from pydist import ClusterUnavailable

        with pytest.raises(ClusterUnavailable):
            await ex.submit(square, 1)
        await ex.shutdown()
    run(main())


def _wait_for_a_message_never_sent(comm):
    comm.recv(source=(comm.rank + 1) % comm.size, tag=5)     # no timeout: only an abort ends it


def test_leaving_async_with_by_an_exception_aborts_its_groups(cluster):
    """``async with`` left by an exception aborts the task groups still running, as ``with`` does:
    otherwise its shutdown waits forever for ranks that no one will ever wake."""
    from pydist.errors import GroupAborted

    seen: dict = {}

    async def main():
        with pytest.raises(RuntimeError, match="gives up"):
            async with AsyncClusterExecutor(address=cluster.address, secret=cluster.secret) as aex:
                g = seen["group"] = aex.executor.spawn_group(_wait_for_a_message_never_sent, 2)
                wait_for(lambda: g.state == "running", 30, "the group to start")
                raise RuntimeError("the caller gives up")

    t0 = time.monotonic()
    run(main())
    assert time.monotonic() - t0 < 30
    for f in seen["group"]:
        assert isinstance(f.exception(timeout=10), GroupAborted), f.exception(timeout=0)
