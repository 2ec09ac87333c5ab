"""What loky's executor tests check of any process-pool executor, restated in our words for
``ProcessPoolExecutor`` and ``ClusterExecutor``: the crash matrix (where a task breaks x how), remote
tracebacks, thread safety, submitting from callbacks, interactively defined functions.

The matrix's verdicts are PPE's (and loky's): a pydist error is also the standard type, so the same
``pytest.raises`` holds.  After each cell the executor must still run a task (pydist heals; PPE does
not, so for PPE the follow-up uses a fresh executor).
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import ctypes.util
import math
import pickle
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict
from concurrent.futures.process import BrokenProcessPool

import pytest

from conftest import wait_for

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------------------ bad objects
def crash():
    import faulthandler

    faulthandler.disable()
    faulthandler._sigsegv()


def sys_exit(code=0):
    sys.exit(code)


def c_exit(code=0):
    ctypes.CDLL(ctypes.util.find_library("c")).exit(code)


def raise_error(etype=pickle.UnpicklingError, message=None):
    raise etype(message)


def return_instance(cls):
    return cls()


class CrashAtPickle:
    def __reduce__(self):
        crash()


class CrashAtUnpickle:
    def __reduce__(self):
        return crash, ()


class ExitAtPickle:
    def __reduce__(self):
        sys_exit()


class ExitAtUnpickle:
    def __reduce__(self):
        return sys_exit, ()


class CExitAtUnpickle:
    def __reduce__(self):
        return c_exit, ()


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("Error in pickle")


class ErrorAtUnpickle:
    def __reduce__(self):
        return raise_error, (pickle.UnpicklingError, "the error message")


PPE_FEEDER_HANG = ("a SystemExit raised while ProcessPoolExecutor pickles a task ends its queue feeder thread: "
                   "the future never resolves and shutdown hangs (loky and pydist fail the future)")

# (function, arguments, what result() raises, text the remote traceback must show or None)
CASES = [
    pytest.param("task-pickle-exit", id, (ExitAtPickle(),), pickle.PicklingError, None,
                 marks=pytest.mark.differs("ppe", PPE_FEEDER_HANG), id="task-pickle-exit"),
    ("task-pickle-error", id, (ErrorAtPickle(),), pickle.PicklingError, None),
    ("task-unpickle-exit", id, (ExitAtUnpickle(),), BrokenProcessPool, None),
    ("task-unpickle-c-exit", id, (CExitAtUnpickle(),), BrokenProcessPool, None),
    ("task-unpickle-error", id, (ErrorAtUnpickle(),), BrokenProcessPool, None),
    ("task-unpickle-crash", id, (CrashAtUnpickle(),), BrokenProcessPool, None),
    ("run-crash", crash, (), BrokenProcessPool, None),
    ("run-exit", sys_exit, (), SystemExit, None),
    ("run-c-exit", c_exit, (), BrokenProcessPool, None),
    ("run-error", raise_error, (RuntimeError,), RuntimeError, None),
    ("result-pickle-crash", return_instance, (CrashAtPickle,), BrokenProcessPool, None),
    ("result-pickle-exit", return_instance, (ExitAtPickle,), SystemExit, None),
    ("result-pickle-error", return_instance, (ErrorAtPickle,), pickle.PicklingError, None),
    ("result-unpickle-exit", return_instance, (ExitAtUnpickle,), BrokenProcessPool, "SystemExit"),
    ("result-unpickle-error", return_instance, (ErrorAtUnpickle,), BrokenProcessPool, "UnpicklingError"),
]


@pytest.mark.parametrize("name,fn,args,expected,shows", CASES,
                         ids=[c[0] if isinstance(c, tuple) else c.id for c in CASES])
def test_crash_matrix(make, name, fn, args, expected, shows):
    ex = make(2)
    fut = ex.submit(fn, *args)
    with pytest.raises(expected) as info:
        fut.result(timeout=60)
    if shows is not None:
        cause = info.value.__cause__
        assert cause is not None and shows in getattr(cause, "tb", str(cause))
    if make.kind == "ppe" and isinstance(info.value, BrokenProcessPool):
        ex = make(2)   # a broken process pool stays broken
    assert ex.submit(pow, 2, 5).result(timeout=60) == 32


def test_shutdown_after_pickling_errors_in_a_loop(make):
    for _ in range(3):
        with make(2) as ex:
            with pytest.raises(pickle.PicklingError):
                ex.submit(id, ErrorAtPickle()).result(30)


@pytest.mark.differs("ppe", PPE_FEEDER_HANG)
def test_shutdown_after_exit_at_pickling_in_a_loop(make):
    for _ in range(3):
        with make(2) as ex:
            with pytest.raises(pickle.PicklingError):
                ex.submit(id, ExitAtPickle()).result(30)


# ------------------------------------------------------------------------------------------ traceback
def _fails():
    raise RuntimeError(123)  # the comment shows in the remote traceback


def test_remote_traceback_is_the_cause_with_source_lines(executor):
    with pytest.raises(RuntimeError) as info:
        executor.submit(_fails).result(30)
    assert type(info.value) is RuntimeError and info.value.args == (123,)
    cause = info.value.__cause__
    assert "raise RuntimeError(123)  # the comment shows in the remote traceback" in cause.tb


# ------------------------------------------------------------------------------------------ threads, callbacks
def test_thread_safety(executor):
    results = [None] * 8

    def use(i):
        try:
            m1 = executor.map(math.sqrt, range(40), timeout=60)
            fs = [executor.submit(pow, 2, k) for k in range(20)]
            for k, f in enumerate(fs):
                if k % 2 == 0:
                    f.cancel()
            m2 = executor.map(math.sqrt, range(40), timeout=60)
            assert list(m1) == [math.sqrt(x) for x in range(40)]
            assert list(m2) == [math.sqrt(x) for x in range(40)]
            for k, f in enumerate(fs):
                if not f.cancelled():
                    assert f.result(60) == 2 ** k
            results[i] = "ok"
        except Exception as exc:   # reported below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=use, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for r in results:
        if isinstance(r, Exception):
            raise r
    assert results == ["ok"] * len(results)


def echo(*args):
    return args


def test_submit_from_callbacks(executor):
    collected = defaultdict(list)

    def collect_and_submit_next(fut):
        name, count = fut.result()
        collected[name].append(count)
        if count > 0:
            executor.submit(echo, name, count - 1).add_done_callback(collect_and_submit_next)

    for name, n in (("a", 40), ("b", 20), ("c", 30)):
        executor.submit(echo, name, n).add_done_callback(collect_and_submit_next)
    wait_for(lambda: all(collected[k] == list(range(n, -1, -1)) for k, n in (("a", 40), ("b", 20), ("c", 30))),
             60, "the callback chains to complete")


def test_submit_from_a_callback_after_a_crash(make):
    ex = make(2)
    done = threading.Event()
    holder = {}

    def again(fut):
        try:
            holder["f"] = ex.submit(crash)
        except cf.BrokenExecutor as exc:   # PPE may already know it is broken
            holder["err"] = exc
        done.set()

    f = ex.submit(pow, 2, 2)
    f.add_done_callback(again)
    assert f.result(30) == 4
    assert done.wait(30)
    if "f" in holder:
        with pytest.raises(BrokenProcessPool):
            holder["f"].result(60)


def test_large_argument(executor):
    data = b"\x00" * (64 << 20)
    assert executor.submit(len, data).result(120) == len(data)


# ------------------------------------------------------------------------------------------ __main__
NESTED = """
import sys
from {module} import {name}

def inner(x):
    return -x

def outer(x):
    return inner(x)

if __name__ == "__main__":
    with {name}(1) as e:
        e.submit(id, 42).result()
        assert e.submit(outer, 1).result() == outer(1) == -1
        def inner(x):            # changed interactively: the worker must use the new one
            return x
        assert e.submit(outer, 1).result() == outer(1) == 1
        def fact(n):             # recursive, interactively defined
            return 1 if n <= 1 else n * fact(n - 1)
        assert e.submit(fact, 5).result() == 120
    print("ok")
"""

GLOBALS = """
import sys
from {module} import {name}

STATE = None

def setup(v):
    global STATE
    STATE = v

def read():
    return STATE

if __name__ == "__main__":
    with {name}(1, initializer=setup, initargs=("set by the initializer",)) as e:
        print(e.submit(read).result())
"""


def _script(kind, template, tmp_path):
    module, name = ("concurrent.futures", "ProcessPoolExecutor") if kind == "ppe" else ("pydist", "ClusterExecutor")
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(template.format(module=module, name=name)))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=90,
                          cwd=str(tmp_path))


@pytest.mark.differs("ppe", "a process pool's worker imports the main module once: a function "
                            "redefined later in the parent is not seen (pydist sends it anew)")
def test_interactively_defined_nested_functions(kind, tmp_path):
    p = _script(kind, NESTED, tmp_path)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr


def test_initializer_global_seen_by_tasks(kind, tmp_path):
    p = _script(kind, GLOBALS, tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "set by the initializer"
