"""Conformance: the same tests against ``ProcessPoolExecutor`` and ``ClusterExecutor``.

Every test here takes ``kind`` ("ppe" or "pydist") through the ``make`` fixture, so a regression in
either shows, side by side.  They restate, in our own words, the executor-generic parts of CPython's
``Lib/test/test_concurrent_futures`` and of loky's executor tests.

* ``make(max_workers, ...)`` builds an executor of the test's kind and shuts it down at teardown.
  For pydist it connects to one module-wide ``LocalCluster`` (4 workers), ``max_workers`` capping the
  executor's running tasks as a pool's size would, unless ``embedded=True`` (a private cluster, for the
  tests about construction, initializers and crashes).
* ``differs(kind, reason)`` marks a documented difference by design (README, "Differences from
  ProcessPoolExecutor"): the test is skipped for that kind, and the skip says why.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing

import pytest

from pydist import ClusterExecutor, LocalCluster

KINDS = ["ppe", "pydist"]
CTX = multiprocessing.get_context("spawn")


@pytest.fixture(scope="module", autouse=True)
def _stop_resource_tracker():
    """A spawn-context process pool starts multiprocessing's resource tracker, which outlives it: stop
    it after each module, so the session's no-child-left check holds."""
    yield
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()


@pytest.fixture(scope="module")
def shared_cluster():
    with LocalCluster(nodes=1, workers_per_node=4) as c:
        yield c


@pytest.fixture(params=KINDS)
def kind(request):
    mark = request.node.get_closest_marker("differs")
    if mark is not None and mark.args[0] == request.param:
        pytest.skip(f"difference by design: {mark.args[1]}")
    return request.param


@pytest.fixture
def make(kind, request):
    made = []

    def factory(max_workers=2, *args, embedded=False, **kw):
        if kind == "ppe":
            if not args and "mp_context" not in kw:
                kw["mp_context"] = CTX
            ex = cf.ProcessPoolExecutor(max_workers, *args, **kw)
        elif embedded:
            ex = ClusterExecutor(max_workers, *args, **kw)
        else:
            c = request.getfixturevalue("shared_cluster")
            ex = ClusterExecutor(max_workers, *args, address=c.address, secret=c.secret, **kw)
        made.append(ex)
        return ex

    factory.kind = kind
    yield factory
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def executor(make):
    """A 2-worker executor of the test's kind."""
    return make(2)


def executor_type(kind):
    return cf.ProcessPoolExecutor if kind == "ppe" else ClusterExecutor


def pytest_configure(config):
    config.addinivalue_line("markers", "differs(kind, reason): a documented difference by design")
