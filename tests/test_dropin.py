"""ClusterExecutor as a drop-in for ProcessPoolExecutor: what broke correct-looking user code (issue 9).

* large arguments of every kind and size (the out-of-band frame bug), through real processes;
* PPE's positional signature and its argument checks, side by side with PPE itself;
* the exception types PPE code catches (each pydist error is also the standard type);
* SystemExit / KeyboardInterrupt at the wrong place never break the executor.
"""
from __future__ import annotations

import concurrent.futures as cf
import inspect
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
from concurrent.futures.process import BrokenProcessPool

import pytest

from pydist import ClusterExecutor, DeserializationError, SerializationError, WorkerLost, wire
from conftest import gated, wait_for

pytestmark = pytest.mark.timeout(90)


# ------------------------------------------------------------------------------------------ tasks
def size_of(x):
    return len(x)


def digest(x):
    import hashlib

    return hashlib.sha256(pickle.dumps(x, 4)).hexdigest()


def echo(x):
    return x


def sizes_kw(**kw):
    return {k: len(v) for k, v in kw.items()}


_init_value = None


def set_init(value):
    global _init_value
    _init_value = value


def get_init():
    return _init_value


def do_exit(code=1):
    sys.exit(code)


def do_interrupt():
    raise KeyboardInterrupt


def crash():
    import faulthandler

    faulthandler.disable()
    faulthandler._sigsegv()


class ExitAtPickle:
    def __reduce__(self):
        sys.exit(3)


class ExitAtUnpickle:
    def __reduce__(self):
        return do_exit, (4,)


class InterruptAtUnpickle:
    def __reduce__(self):
        return do_interrupt, ()


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("no pickling this")


def fail_unpickle(msg):
    raise pickle.UnpicklingError(msg)


class ErrorAtUnpickle:
    def __reduce__(self):
        return fail_unpickle, ("no unpickling this",)


def return_instance(cls):
    return cls()


# ------------------------------------------------------------------------------------------ 1: sizes
def _big_cases():
    yield "str-1MiB", "x" * (1 << 20)
    yield "list-range-1e6", list(range(10 ** 6))
    yield "dict-200k", {i: str(i) for i in range(200_000)}
    for n in (wire.OOB_MIN - 1, wire.OOB_MIN, wire.OOB_MIN + 1, (1 << 20) - 1, 1 << 20, (4 << 20) + 1):
        yield f"str-{n}", "y" * n
        yield f"bytes-{n}", os.urandom(n)
        yield f"bytearray-{n}", bytearray(n)
    yield "tuple-of-big-bytes", (os.urandom(wire.OOB_MIN), os.urandom(wire.OOB_MIN * 2))
    yield "nested", {"a": [b"z" * (1 << 20)], "b": ("s" * (1 << 19),)}


BIG = list(_big_cases())


@pytest.mark.parametrize("name,obj", BIG, ids=[n for n, _ in BIG])
def test_large_argument_of_any_kind_reaches_the_task(executor, name, obj):
    assert executor.submit(digest, obj).result(timeout=60) == digest(obj)


def test_large_arguments_as_keywords_and_results(executor):
    s, b = "k" * (1 << 20), os.urandom(3 << 20)
    assert executor.submit(sizes_kw, s=s, b=b).result(timeout=60) == {"s": len(s), "b": len(b)}
    big = list(range(300_000))
    assert executor.submit(echo, big).result(timeout=60) == big


def test_large_arguments_through_map_and_chunks(executor):
    items = ["m" * (wire.OOB_MIN + i) for i in range(6)]
    assert list(executor.map(size_of, items)) == [len(x) for x in items]
    assert list(executor.map(size_of, items, chunksize=3)) == [len(x) for x in items]


def test_numpy_arrays(executor):
    np = pytest.importorskip("numpy")
    for n in (10, 1 << 15, 1 << 18, 1 << 20):
        a = np.arange(n, dtype=np.float64)
        assert (executor.submit(echo, a).result(timeout=60) == a).all()
    assert executor.submit(echo, {"w": np.ones((512, 512))}).result(timeout=60)["w"].shape == (512, 512)


# ------------------------------------------------------------------------------------------ 2: signature
def test_positional_parameters_are_process_pool_executors():
    ours = list(inspect.signature(ClusterExecutor).parameters.values())
    theirs = list(inspect.signature(cf.ProcessPoolExecutor).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[:len(theirs)]] == \
        [(p.name, p.kind, p.default) for p in theirs]
    extra = {p.name: p.kind for p in ours[len(theirs):]}
    assert {"address", "ns", "secret"} <= set(extra)
    assert set(extra.values()) == {inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("args,kwargs,exc", [
    ((0,), {}, ValueError),
    ((-1,), {}, ValueError),
    ((2, None, "not callable"), {}, TypeError),
    ((2,), {"max_tasks_per_child": 0}, ValueError),
    ((2,), {"max_tasks_per_child": "3"}, TypeError),
])
@pytest.mark.parametrize("kind", ["ppe", "pydist"])
def test_argument_checks_match_process_pool_executor(kind, args, kwargs, exc):
    make = cf.ProcessPoolExecutor if kind == "ppe" else ClusterExecutor
    if kind == "ppe" and "max_tasks_per_child" in kwargs and sys.version_info < (3, 11):
        pytest.skip("ProcessPoolExecutor has max_tasks_per_child since Python 3.11")
    if kind == "ppe" and "max_tasks_per_child" in kwargs:
        kwargs = dict(kwargs, mp_context=multiprocessing.get_context("spawn"))
    with pytest.raises(exc):
        make(*args, **kwargs)


def test_positional_max_workers_mp_context_initializer_initargs(proc_guard):
    ctx = multiprocessing.get_context("spawn")
    with ClusterExecutor(2, ctx, set_init, ("positional",)) as ex:
        assert ex._max_workers == 2
        assert ex.submit(get_init).result(timeout=30) == "positional"
    with ClusterExecutor(2, initializer=set_init, initargs=("keywords",)) as ex:
        assert ex.submit(get_init).result(timeout=30) == "keywords"


def test_address_keyword_and_short_form(cluster):
    with ClusterExecutor(address=cluster.address, secret=cluster.secret) as ex:
        assert ex.submit(pow, 2, 5).result(timeout=30) == 32
        assert ex._max_workers == 2   # the cluster's workers
    with ClusterExecutor(cluster.address, secret=cluster.secret, max_tasks_per_child=3) as ex:
        assert ex.submit(pow, 2, 6).result(timeout=30) == 64
    with ClusterExecutor(max_workers=7, address=cluster.address, secret=cluster.secret) as ex:
        assert ex._max_workers == 7
    with pytest.raises(TypeError, match="address"):
        ClusterExecutor(cluster.address, 2)          # the old (address, max_workers) order: said clearly
    with pytest.raises(TypeError, match="twice"):
        ClusterExecutor(cluster.address, address=cluster.address)


# ------------------------------------------------------------------------------------------ 3: exception types
def test_error_types_are_the_standard_ones():
    assert issubclass(WorkerLost, BrokenProcessPool) and issubclass(WorkerLost, cf.BrokenExecutor)
    assert issubclass(SerializationError, pickle.PicklingError)
    assert issubclass(DeserializationError, pickle.UnpicklingError)
    assert issubclass(DeserializationError, BrokenProcessPool)
    import pydist

    assert issubclass(pydist.BrokenCluster, BrokenProcessPool)
    assert issubclass(pydist.NodeLost, BrokenProcessPool)


# (where it breaks, how) -> what PPE raises from result(); pydist raises the same type (or a subclass)
CRASHES = [
    ("arg-pickle-error", id, (ErrorAtPickle(),), pickle.PicklingError),
    ("arg-pickle-exit", id, (ExitAtPickle(),), pickle.PicklingError),
    ("arg-unpickle-exit", id, (ExitAtUnpickle(),), BrokenProcessPool),
    ("arg-unpickle-error", id, (ErrorAtUnpickle(),), BrokenProcessPool),
    ("run-exit", do_exit, (), SystemExit),
    ("run-error", fail_unpickle, ("plain",), pickle.UnpicklingError),
    ("run-crash", crash, (), BrokenProcessPool),
    ("result-pickle-exit", return_instance, (ExitAtPickle,), SystemExit),
    ("result-pickle-error", return_instance, (ErrorAtPickle,), pickle.PicklingError),
    ("result-unpickle-exit", return_instance, (ExitAtUnpickle,), BrokenProcessPool),
    ("result-unpickle-error", return_instance, (ErrorAtUnpickle,), BrokenProcessPool),
    ("result-unpickle-interrupt", return_instance, (InterruptAtUnpickle,), BrokenProcessPool),
]


@pytest.mark.parametrize("name,fn,args,expected", CRASHES, ids=[c[0] for c in CRASHES])
def test_failure_matrix_raises_what_ppe_code_catches(fresh_cluster, name, fn, args, expected):
    c = fresh_cluster(workers_per_node=1)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        fut = ex.submit(fn, *args)           # never raises: the future fails
        with pytest.raises(expected):
            fut.result(timeout=30)
        # and the executor goes on (PPE's pool would be broken for several of these)
        assert ex.submit(pow, 3, 3).result(timeout=30) == 27


def test_exit_code_travels_with_system_exit(executor):
    with pytest.raises(SystemExit) as info:
        executor.submit(do_exit, 7).result(timeout=30)
    assert info.value.code == 7


def test_unpicklable_argument_fails_the_future_not_submit(executor):
    lock = threading.Lock()
    fut = executor.submit(id, lock)
    with pytest.raises(pickle.PicklingError, match="lock") as info:
        fut.result(timeout=5)
    assert isinstance(info.value, SerializationError)
    assert list(executor.map(size_of, ["ab", "c"])) == [2, 1]
    it = executor.map(size_of, ["a", lock, "ccc"])
    assert next(it) == 1
    with pytest.raises(pickle.PicklingError):
        next(it)


# ------------------------------------------------------------------------------------------ 4: never break
def test_callback_raising_system_exit_does_not_kill_the_collector(executor, tmp_path):
    """The callbacks are added while the task waits on a gate, so the collector thread runs them."""
    hits = []

    def bad(fut):
        hits.append(fut.result())
        raise SystemExit("from a callback")

    def worse(fut):
        raise KeyboardInterrupt

    for i in range(3):
        gate = tmp_path / f"gate{i}"
        f = executor.submit(gated, str(gate), 2 ** i)
        f.add_done_callback(bad)
        f.add_done_callback(worse)
        gate.write_text("")
        assert f.result(timeout=30) == 2 ** i
    wait_for(lambda: len(hits) == 3, 10, "the callbacks")
    assert executor.submit(pow, 5, 2).result(timeout=30) == 25


def test_interrupted_direct_send_keeps_the_executor(executor):
    """A KeyboardInterrupt raised in the caller's thread in the middle of submit's own send (here from
    the argument's pickling, the last thing before the send) leaves the executor usable."""

    class InterruptAtPickle:
        def __reduce__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        executor.submit(id, InterruptAtPickle())
    assert executor.submit(pow, 2, 8).result(timeout=30) == 256


# ------------------------------------------------------------------------------------------ 7, 8, 10: __main__
MAIN_SCRIPT = r'''
import json, sys, traceback, weakref, gc
from pydist import ClusterExecutor

MODEL = None
SCALE = 2

def load_model(tag):
    global MODEL
    MODEL = {"tag": tag}

def use_model(x):
    return (MODEL["tag"] if MODEL else None, x * SCALE)

def inner(x):
    return -x

def outer(x):
    return inner(x)

def fails(x):
    y = x - x
    return 1 / y

class Holder:
    def method(self):
        return 1

if __name__ == "__main__":
    out = {}
    with ClusterExecutor(address=sys.argv[1], max_workers=1, initializer=load_model, initargs=("loaded",)) as ex:
        out["model"] = [ex.submit(use_model, i).result(30) for i in range(3)]
        SCALE = 10                                   # a changed global is sent anew
        out["scale"] = ex.submit(use_model, 1).result(30)
        out["outer1"] = ex.submit(outer, 1).result(30)
        def inner(x):                                # a redefined helper is used by the next call
            return x
        out["outer2"] = ex.submit(outer, 1).result(30)
        try:
            ex.submit(fails, 3).result(30)
        except ZeroDivisionError as e:
            out["tb"] = e.__cause__.tb
        h = Holder()
        alive = weakref.ref(h)
        assert ex.submit(h.method).result(30) == 1
        del h
        gc.collect()
        out["stale"] = alive() is not None
    print(json.dumps(out))
'''


def test_main_functions_share_globals_see_changes_and_keep_no_instance(cluster, tmp_path, proc_guard):
    """Items 7, 8 and 10: an initializer's global is seen by the task; a changed global and a redefined
    helper are sent anew; a bound method keeps no instance alive; the remote traceback names the
    script's file and shows its source line."""
    script = tmp_path / "main_globals.py"
    script.write_text(MAIN_SCRIPT)
    env = dict(os.environ, PYDIST_SECRET=cluster.secret.decode())
    p = subprocess.run([sys.executable, str(script), cluster.address], capture_output=True, text=True,
                       env=env, timeout=80, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["model"] == [["loaded", 0], ["loaded", 2], ["loaded", 4]]
    assert out["scale"] == ["loaded", 10]
    assert out["outer1"] == -1 and out["outer2"] == 1
    assert out["stale"] is False
    assert str(script) in out["tb"] and "return 1 / y" in out["tb"], out["tb"]


# ------------------------------------------------------------------------------------------ 9: odd arguments
@pytest.mark.parametrize("make", [multiprocessing.Lock, multiprocessing.Queue, multiprocessing.Event,
                                  threading.Lock], ids=["mp.Lock", "mp.Queue", "mp.Event", "threading.Lock"])
def test_multiprocessing_objects_fail_clearly(executor, cluster, make):
    obj = make()
    with pytest.raises(SerializationError, match="cannot travel to a pydist worker.*Manager") as info:
        executor.submit(id, obj).result(timeout=10)
    assert isinstance(info.value, pickle.PicklingError)
    with pytest.raises(SerializationError, match="Manager"):
        ClusterExecutor(address=cluster.address, secret=cluster.secret, initializer=id, initargs=(obj,))


def _manager_lock_roundtrip(lock):
    with lock:
        return "locked remotely"


def _use_authkey(key):
    multiprocessing.current_process().authkey = key   # a Manager proxy authenticates with this


def test_manager_proxy_with_a_reachable_address_works(cluster):
    """The documented remote alternative: a Manager listening on an address the workers reach, its
    authkey set in the workers by the initializer (proxies never carry the key)."""
    from multiprocessing.managers import SyncManager

    with SyncManager(address=("127.0.0.1", 0), authkey=b"pydist-test") as m, \
            ClusterExecutor(address=cluster.address, secret=cluster.secret, initializer=_use_authkey,
                            initargs=(b"pydist-test",)) as ex:
        lock = m.Lock()
        assert ex.submit(_manager_lock_roundtrip, lock).result(timeout=30) == "locked remotely"
