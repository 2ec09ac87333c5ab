"""pydist.executor: ClusterExecutor as a true concurrent.futures.Executor, on real processes over loopback.

Most tests share the session ``cluster`` (one node, two workers) through a per-test ``executor``; the
ones about the embedded cluster, the initializer or shutdown start their own.  In the spirit of
CPython's Lib/test/test_concurrent_futures (map, timeouts, shutdown races, cancel_futures, wait,
as_completed, free references, max_workers), rewritten for a remote executor.  No sleeps: blocked
tasks wait on a file gate that the test opens; the test waits on conditions with deadlines.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest

import pydist
from pydist import (BrokenCluster, ClusterExecutor, PydistError, RemoteError, ScriptResult, SerializationError,
                    task_context)
from conftest import cluster_pids, gated, wait_for, wait_gone

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ tasks
def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def raise_value_error(msg):
    raise ValueError(msg)


def where(x=None):
    c = task_context()
    return x, c.node, c.worker, c.task_id, c.hops, os.getpid()


class Payload:
    """A big result whose copies must be freed once the caller drops them (weakref-able)."""

    def __init__(self, n):
        self.data = bytearray(n)


def make_payload(n):
    return Payload(n)


class Adder:
    def __init__(self, k):
        self.k = k

    def add(self, x):
        return x + self.k


def apply(obj, x):
    return obj.add(x)


_init_value = None


def set_init(value):
    global _init_value
    _init_value = (value, os.getpid())


def get_init():
    return _init_value


def failing_init():
    raise ValueError("initializer says no")


class CustomArgsError(Exception):
    """An exception that pickles but cannot be rebuilt (its __init__ wants two arguments)."""

    def __init__(self, a, b):
        super().__init__(f"custom failure {a}")


def raise_custom():
    raise CustomArgsError(1, 2)


# ------------------------------------------------------------------------------------------ submit
def test_submit_returns_result(executor):
    f = executor.submit(pow, 2, 8)
    assert isinstance(f, cf.Future)
    assert f.result(timeout=10) == 256
    assert f.done() and not f.cancelled() and f.exception() is None


def _named(x):
    return ("named", x)


def test_a_cached_function_whose_name_was_rebound_is_sent_by_value(executor):
    """Functions that pickle by reference are cached by identity (#15: checking each submit cost ~17 %
    of a burst's client time).  When the module's name stops naming the function (rebound, reloaded),
    the cached by-reference pickle would make the worker run whatever the name holds there: it must be
    sent by value from then on, as cloudpickle itself decides."""
    import cloudpickle

    mod = sys.modules[__name__]
    f = mod._named
    by_ref = executor._fn_key(f)[1]
    assert executor._fn_key(f)[1] == by_ref and len(by_ref) < 100   # cached: module + name only
    mod._named = lambda x: ("the name's new holder", x)
    try:
        key, blob = executor._fn_key(f)
        assert blob != by_ref, "the stale by-reference pickle was reused after the name was rebound"
        assert cloudpickle.loads(blob)(3) == ("named", 3)
        assert executor.submit(f, 4).result(30) == ("named", 4)
    finally:
        mod._named = f
    assert executor._fn_key(f)[1] == by_ref


def test_submit_keyword(executor):
    assert executor.submit(mul, 2, y=8).result(10) == 16
    # fn and self are positional-only in submit: as keywords they reach the task
    assert executor.submit(capture, 1, self=2, fn=3).result(10) == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=capture, arg=1)


def test_submit_not_callable(executor):
    with pytest.raises(TypeError):
        executor.submit(42)
    assert executor.submit(abs, -3).result(10) == 3


def test_lambdas_closures_nested_and_instances(executor):
    k = 10

    def nested(x):
        def inner(y):
            return y * k
        return inner(x) + 1

    def make_closure(m):
        return lambda x: x * m

    assert executor.submit(lambda x: x + k, 1).result(10) == 11
    assert executor.submit(nested, 2).result(10) == 21
    assert executor.submit(make_closure(7), 6).result(10) == 42
    assert executor.submit(apply, Adder(5), 1).result(10) == 6
    assert executor.submit(Adder(3).add, 4).result(10) == 7
    local_obj = type("Local", (), {"v": 9})()
    assert executor.submit(lambda o: o.v * 2, local_obj).result(10) == 18


def test_functions_from_main_of_a_script(cluster, tmp_path, proc_guard):
    """A function, a class and a lambda defined in a true ``__main__`` run on the cluster."""
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        from pydist import ClusterExecutor

        class Box:
            def __init__(self, v):
                self.v = v

        def triple(box):
            return Box(box.v * 3)

        if __name__ == "__main__":
            with ClusterExecutor(address=sys.argv[1]) as ex:
                r = ex.submit(triple, Box(14)).result(30)
                lam = ex.submit(lambda x: x - 1, 100).result(30)
                out = list(ex.map(triple, [Box(1), Box(2)]))
            print(json.dumps({"type": type(r).__module__ + "." + type(r).__name__, "v": r.v, "lam": lam,
                              "map": [b.v for b in out]}))
    """))
    env = dict(os.environ, PYDIST_SECRET=cluster.secret.decode())
    p = subprocess.run([sys.executable, str(script), cluster.address], capture_output=True, text=True,
                       env=env, timeout=50, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"type": "__main__.Box", "v": 42, "lam": 99, "map": [3, 6]}


def test_exception_reraised_with_remote_traceback(executor):
    f = executor.submit(raise_value_error, "bad input 17")
    with pytest.raises(ValueError, match="bad input 17") as info:
        f.result(10)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteError)
    assert "raise_value_error" in cause.tb and "ValueError: bad input 17" in cause.tb
    assert isinstance(f.exception(), ValueError)


def test_unrebuildable_exception_keeps_remote_traceback(executor):
    with pytest.raises(PydistError) as info:
        executor.submit(raise_custom).result(10)
    text = str(info.value) + str(info.value.__cause__ or "")
    assert "custom failure 1" in text and "raise_custom" in text


def test_unpicklable_function_fails_its_future(executor):
    """As with ProcessPoolExecutor, the future fails (submit does not raise)."""
    lock = threading.Lock()
    fut = executor.submit(lambda: lock.locked())
    with pytest.raises(SerializationError, match="function"):
        fut.result(10)
    assert executor.submit(pow, 3, 2).result(10) == 9


def test_done_callback_and_running_state(executor, gate):
    seen = []
    called = threading.Event()
    f = executor.submit(gated, gate.path, "v")
    f.add_done_callback(lambda fut: (seen.append(fut.result()), called.set()))
    wait_for(f.running, 10, "the gated task to be reported running")
    assert not f.done() and not seen
    gate.open()
    assert called.wait(10)
    assert seen == ["v"]


def test_task_context(executor):
    results = [executor.submit(where, i).result(10) for i in range(4)]
    st = executor.status()
    for i, (x, node, worker, tid, hops, pid) in enumerate(results):
        assert x == i
        assert node == st["name"] == executor.node_name
        assert worker in (0, 1)
        assert hops == 0
        assert pid != os.getpid()
    assert len({r[3] for r in results}) == 4
    with pytest.raises(RuntimeError):
        task_context()


def test_asyncio_wrap_future(executor):
    async def main():
        futs = [asyncio.wrap_future(executor.submit(mul, i, i)) for i in range(5)]
        return await asyncio.wait_for(asyncio.gather(*futs), 20)

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]


# ------------------------------------------------------------------------------------------ map
def test_map_results_in_order(executor):
    assert list(executor.map(mul, range(50), range(50))) == [i * i for i in range(50)]
    assert list(executor.map(mul, [1, 2, 3], [10, 20])) == [10, 40]   # shortest iterable wins
    assert list(executor.map(mul, [], [])) == []


def test_map_is_lazy(executor, gate):
    t0 = time.monotonic()
    it = executor.map(gated, [gate.path] * 3, ["a", "b", "c"])
    assert time.monotonic() - t0 < 5
    assert not isinstance(it, (list, tuple))
    assert len(executor._pending) == 3      # submitted, not finished: map did not wait
    gate.open()
    assert list(it) == ["a", "b", "c"]


def test_map_exception(executor):
    it = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_map_timeout(executor, gate):
    results = []
    t0 = time.monotonic()
    with pytest.raises(cf.TimeoutError):   # the builtin TimeoutError from 3.11 on
        # "/" exists: the first two calls return at once; the third waits for the gate
        for r in executor.map(gated, ["/", "/", gate.path], [1, 2, 3], timeout=1.0):
            results.append(r)
    assert results == [1, 2]
    assert 0.9 < time.monotonic() - t0 < 8
    gate.open()
    wait_for(lambda: len(executor._pending) == 0, 10, "the timed-out map's futures to be forgotten")


def test_map_chunksize_batches(executor):
    out = list(executor.map(where, range(10), chunksize=4))
    assert [o[0] for o in out] == list(range(10))
    tids = [o[3] for o in out]
    assert len(set(tids[0:4])) == 1 and len(set(tids[4:8])) == 1 and len(set(tids[8:10])) == 1
    assert len(set(tids)) == 3
    with pytest.raises(ValueError):
        executor.map(abs, [1], chunksize=0)


def test_map_chunksize_exception(executor):
    it = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], chunksize=2)
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(it)


# ------------------------------------------------------------------------------------------ wait / as_completed
def test_wait_first_completed(executor, gate):
    slow = executor.submit(gated, gate.path, "slow")
    quick = executor.submit(mul, 2, 3)
    done, not_done = cf.wait([slow, quick], timeout=20, return_when=cf.FIRST_COMPLETED)
    assert done == {quick} and not_done == {slow}
    gate.open()
    assert slow.result(10) == "slow"


def test_wait_first_exception(executor, gate):
    slow = executor.submit(gated, gate.path, "slow")
    bad = executor.submit(raise_value_error, "first exception")
    done, not_done = cf.wait([slow, bad], timeout=20, return_when=cf.FIRST_EXCEPTION)
    assert done == {bad} and not_done == {slow}
    assert isinstance(bad.exception(), ValueError)
    gate.open()


def test_wait_all_completed(executor):
    fs = [executor.submit(mul, i, 2) for i in range(5)] + [executor.submit(raise_value_error, "x")]
    done, not_done = cf.wait(fs, timeout=20, return_when=cf.ALL_COMPLETED)
    assert done == set(fs) and not not_done


def test_wait_timeout(executor, gate):
    slow = executor.submit(gated, gate.path)
    quick = executor.submit(mul, 1, 1)
    t0 = time.monotonic()
    done, not_done = cf.wait([slow, quick], timeout=1.0, return_when=cf.ALL_COMPLETED)
    assert time.monotonic() - t0 >= 0.9
    assert done == {quick} and not_done == {slow}
    gate.open()


def test_as_completed(executor, gate):
    slow = executor.submit(gated, gate.path, "slow")
    quick = [executor.submit(mul, i, 1) for i in range(6)]
    seen = []
    with pytest.raises(cf.TimeoutError):
        for f in cf.as_completed(quick + [slow], timeout=2.0):
            seen.append(f)
    assert set(seen) == set(quick) and len(seen) == 6
    gate.open()
    assert [f.result() for f in cf.as_completed([slow], timeout=10)] == ["slow"]


def test_hang_issue12364(cluster):
    """Many short futures, then shutdown: every future finishes, nothing hangs."""
    ex = ClusterExecutor(address=cluster.address, secret=cluster.secret)
    fs = [ex.submit(time.sleep, 0.001) for _ in range(300)]
    ex.shutdown(wait=True)
    done, not_done = cf.wait(fs, timeout=0)
    assert len(done) == 300 and not not_done
    assert all(f.exception() is None for f in fs)


# ------------------------------------------------------------------------------------------ cancel
def test_cancel_not_started(fresh_cluster, gate):
    c = fresh_cluster(workers_per_node=1)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        blockers = [ex.submit(gated, gate.path, i, gate.started(i)) for i in range(3)]
        last = ex.submit(gated, gate.path, "last", gate.started("last"))
        wait_for(lambda: blockers[0].running(), 10, "the first task to run")
        assert not last.running()
        assert not blockers[0].cancel()             # a running task cannot be cancelled
        assert last.cancel()
        assert last.cancelled() and last.done()
        with pytest.raises(cf.CancelledError):
            last.result(0)
        gate.open()
        assert [f.result(20) for f in blockers] == list(range(3))
        assert len(ex._pending) == 0
        wait_for(lambda: ex.status()["queued"] == 0, 10, "the node's queue to drain")
    assert not os.path.exists(gate.started("last")), "a cancelled task ran"


def test_cancel_futures(fresh_cluster):
    """CPython's test_cancel_futures: 50 short tasks, 2 workers, shutdown(cancel_futures=True)."""
    c = fresh_cluster(workers_per_node=2)
    ex = ClusterExecutor(address=c.address, secret=c.secret)
    fs = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    assert len(cancelled) > 20
    for f in fs:
        if not f.cancelled():
            assert f.done() and f.exception() is None


def test_cancel_futures_after_some_started(fresh_cluster):
    c = fresh_cluster(workers_per_node=2)
    ex = ClusterExecutor(address=c.address, secret=c.secret)
    fs = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    wait_for(lambda: fs[0].running() or fs[0].done(), 10, "the first task to start")
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    others = [f for f in fs if not f.cancelled()]
    assert len(cancelled) > 20
    assert others, "the tasks already running should have finished"
    assert all(f.done() and f.exception() is None for f in others)


def mark_and_sleep(directory, i, seconds):
    open(os.path.join(directory, f"ran-{i}"), "w").close()
    time.sleep(seconds)
    return i


def test_cancelled_tasks_do_not_run_after_short_tasks(fresh_cluster, tmp_path):
    c = fresh_cluster(workers_per_node=2)
    ex = ClusterExecutor(address=c.address, secret=c.secret)
    try:
        assert list(ex.map(abs, range(-500, 0))) == list(range(500, 0, -1))   # the node learns "tasks are short"
        fs = [ex.submit(mark_and_sleep, str(tmp_path), i, 0.05) for i in range(40)]
        ex.shutdown(cancel_futures=True)
        not_cancelled = sum(not f.cancelled() for f in fs)
        p = security_connect(c)
        wait_for(lambda: p.status()["running"] == 0 and p.status()["queued"] == 0, 20, "the node to go idle")
        p._pyroRelease()
        ran = len([n for n in os.listdir(tmp_path) if n.startswith("ran-")])
        assert ran <= not_cancelled, f"{ran} tasks ran but only {not_cancelled} futures were not cancelled"
    finally:
        ex.shutdown()


def security_connect(c):
    from pydist import security
    return security.connect(c.address, secret=c.secret, timeout=5)


# ------------------------------------------------------------------------------------------ shutdown
def test_shutdown_race_issue12456(cluster):
    ex = ClusterExecutor(address=cluster.address, secret=cluster.secret)
    f = ex.submit(pow, 3, 3)
    ex.shutdown(wait=False)
    assert f.result(20) == 27


def test_submit_after_shutdown_raises(cluster):
    ex = ClusterExecutor(address=cluster.address, secret=cluster.secret)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 2)
    ex.shutdown()   # idempotent


def test_context_manager_shutdown(cluster):
    with ClusterExecutor(address=cluster.address, secret=cluster.secret) as ex:
        fs = [ex.submit(abs, -i) for i in range(20)]
    assert all(f.done() for f in fs)
    assert [f.result(0) for f in fs] == list(range(20))
    with pytest.raises(RuntimeError):
        ex.submit(abs, 1)


def test_shutdown_wait_waits_for_running(cluster, gate):
    ex = ClusterExecutor(address=cluster.address, secret=cluster.secret)
    f = ex.submit(gated, gate.path, "finished")
    wait_for(f.running, 10, "the task to start")
    returned = threading.Event()
    t = threading.Thread(target=lambda: (ex.shutdown(wait=True), returned.set()))
    t.start()
    assert not returned.wait(0.5), "shutdown(wait=True) returned while a task was running"
    gate.open()
    t.join(20)
    assert returned.is_set() and f.result(0) == "finished"


# ------------------------------------------------------------------------------------------ references
def test_no_reference_to_finished_results(executor):
    f = executor.submit(make_payload, 20_000_000)
    obj = f.result(30)
    assert isinstance(obj, Payload) and len(obj.data) == 20_000_000
    assert len(executor._pending) == 0
    wr = weakref.ref(obj)
    del f, obj
    gc.collect()
    assert wr() is None, "the executor (or something) still holds the result"


def test_free_reference_map(executor):
    for obj in executor.map(make_payload, [1000] * 10):
        wr = weakref.ref(obj)
        del obj
        gc.collect()
        assert wr() is None
    assert len(executor._pending) == 0


# ------------------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("n", [0, -1])
def test_max_workers_must_be_positive(n):
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        ClusterExecutor(max_workers=n)
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        ClusterExecutor(n)          # ProcessPoolExecutor's positional form


def test_embedded_cluster(proc_guard):
    with ClusterExecutor(max_workers=2) as ex:
        cl = ex.cluster
        assert cl is not None and cl.address
        pids = cluster_pids(cl)
        assert ex.status()["workers"] == 2
        out = list(ex.map(where, range(20)))
        assert [o[0] for o in out] == list(range(20))
    proc_guard.watch(pids)
    wait_gone(pids, 15, "the embedded cluster")


def test_connect_by_uri_and_name_server(cluster):
    with ClusterExecutor(address=f"PYRO:pydist.node@{cluster.address}", secret=cluster.secret) as ex:
        assert ex.submit(mul, 6, 7).result(10) == 42
    with ClusterExecutor(ns=cluster.ns_address, secret=cluster.secret) as ex:
        assert ex.submit(mul, 6, 7).result(10) == 42
        assert ex.node_name == "node0"


def test_initializer_runs_in_every_worker(cluster, gate):
    with ClusterExecutor(address=cluster.address, secret=cluster.secret, initializer=set_init,
                         initargs=("ready",)) as ex:
        # two tasks that must run at the same time: one per worker
        fs = [ex.submit(gated, gate.path, None, gate.started(i)) for i in range(2)]
        wait_for(lambda: all(os.path.exists(gate.started(i)) for i in range(2)), 15, "both workers busy")
        gate.open()
        for f in fs:
            f.result(10)
        inits = [ex.submit(get_init).result(10) for _ in range(6)]
    assert all(v is not None and v[0] == "ready" for v in inits)


def test_initializer_failure_breaks_executor(proc_guard):
    ex = ClusterExecutor(max_workers=1, initializer=failing_init)
    cl = ex.cluster
    proc_guard.watch(cluster_pids(cl))
    try:
        f = ex.submit(mul, 1, 2)
        with pytest.raises(cf.BrokenExecutor) as info:
            f.result(20)
        assert "initializer" in str(info.value)
        assert isinstance(info.value.__cause__, ValueError)
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(mul, 1, 2)
    finally:
        ex.shutdown()
        cl.stop()   # see test_broken_embedded_executor_stops_its_cluster


def test_broken_embedded_executor_stops_its_cluster(proc_guard):
    ex = ClusterExecutor(max_workers=1, initializer=failing_init)
    cl = ex.cluster
    pids = cluster_pids(cl)
    proc_guard.watch(pids)
    try:
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(mul, 1, 2).result(20)
        ex.shutdown(wait=True)
        wait_gone(pids, 5, "the broken executor's embedded cluster")
    finally:
        cl.stop()


# ------------------------------------------------------------------------------------------ scripts
def test_submit_script(executor, tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import os, sys\nprint('args', sys.argv[1:], os.environ.get('JOB_FLAVOUR'), os.getcwd())\n"
                      "print('to stderr', file=sys.stderr)\nsys.exit(4)\n")
    r = executor.submit_script(str(script), ["a", 1], env={"JOB_FLAVOUR": "mint"}, cwd=str(tmp_path)).result(30)
    assert isinstance(r, ScriptResult)
    assert r.returncode == 4
    assert r.stdout == f"args ['a', '1'] mint {tmp_path}\n"
    assert r.stderr == "to stderr\n"
    assert r.node == executor.node_name


def test_submit_script_timeout(executor, tmp_path):
    script = tmp_path / "forever.py"
    script.write_text("import sys, threading\nprint('started', flush=True)\nthreading.Event().wait(60)\n")
    t0 = time.monotonic()
    with pytest.raises(pydist.ScriptTimeout) as info:
        executor.submit_script(str(script), timeout=1.0).result(30)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - t0 < 15
    assert "forever.py" in str(info.value)


def test_submit_script_missing_file(executor, tmp_path):
    with pytest.raises(FileNotFoundError):
        executor.submit_script(str(tmp_path / "nope.py"))


def test_quickstart_example(proc_guard):
    path = os.path.join(REPO, "examples", "quickstart.py")
    if not os.path.exists(path):
        pytest.skip("examples/quickstart.py does not exist yet")
    p = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=50, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
