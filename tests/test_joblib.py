"""The joblib backend (issue #14, item 1): ``import pydist.joblib`` registers ``"pydist"``;
``joblib.Parallel`` and scikit-learn's ``GridSearchCV`` run on a real cluster on loopback.

Modelled on joblib's own backend tests: results in order, errors (type, abort of what is queued),
nested ``Parallel``, auto batching, ``return_as="generator"``, timeouts, and the three ways to name the
cluster (``address=``, ``ns=``, nothing: a ``LocalCluster``).
"""
from __future__ import annotations

import os
import time

import pytest

joblib = pytest.importorskip("joblib")

import pydist.joblib  # noqa: E402  (registers the backend)
from pydist import ClusterExecutor, LocalCluster  # noqa: E402
from conftest import descendants, wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster2():
    with LocalCluster(nodes=2, workers_per_node=1) as c:
        wait_for(lambda: all(len(descendants(p.pid)) >= 1 for p in c.procs), 20, "every node's worker")
        wait_for(lambda: _total(c) == 2, 20, "the second node to join")
        yield c


def _total(c) -> int:
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        st = ex.status()
    return st["workers"] + sum(l["workers"] for l in st["links"] if l["alive"] and l["role"] != "parent")


def square(x):
    return x * x


def where(x):
    from pydist import task_context

    return x, task_context().node, os.getpid()


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x


def marked(x, folder, delay):
    with open(os.path.join(folder, f"ran-{x}"), "w"):
        pass
    end = time.perf_counter() + delay
    while time.perf_counter() < end:   # the task's work
        pass
    if x == 0:
        raise KeyError("first task fails")
    return x


def inner_parallel(k):
    import joblib as jl

    return sum(jl.Parallel(n_jobs=2)(jl.delayed(square)(i) for i in range(k)))


def slow(x):
    end = time.perf_counter() + x
    while time.perf_counter() < end:
        pass
    return x


def done_count(c) -> int:
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        return sum(st["done"] + st["failed"] for st in [ex.status()])


# ============================================================================================ basics
def test_import_registers_the_backend():
    from joblib.parallel import BACKENDS

    assert BACKENDS["pydist"] is pydist.joblib.PydistBackend
    pydist.joblib.register("pydist-again")
    assert BACKENDS["pydist-again"] is pydist.joblib.PydistBackend


def test_parallel_on_the_cluster_in_order(cluster2):
    with joblib.parallel_backend("pydist", address=cluster2.address, secret=cluster2.secret):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(where)(i) for i in range(40))
    assert [x for x, _, _ in out] == list(range(40))
    assert {n for _, n, _ in out} <= set(cluster2.names)
    assert os.getpid() not in {p for _, _, p in out}


def test_n_jobs_minus_one_is_the_clusters_worker_count(cluster2):
    with joblib.parallel_backend("pydist", address=cluster2.address, secret=cluster2.secret):
        assert joblib.effective_n_jobs(-1) == 2
        assert joblib.effective_n_jobs(-2) == 1
        assert joblib.effective_n_jobs(5) == 5
        with pytest.raises(ValueError):
            joblib.effective_n_jobs(0)
    with joblib.parallel_backend("pydist", address=cluster2.address, secret=cluster2.secret, max_workers=1):
        assert joblib.effective_n_jobs(-1) == 1   # this client may run one task at a time


def test_parallel_config_and_ns(cluster2):
    with joblib.parallel_config(backend="pydist", ns=cluster2.ns_address, secret=cluster2.secret):
        assert joblib.Parallel(n_jobs=-1)(joblib.delayed(square)(i) for i in range(10)) == [
            i * i for i in range(10)]


def test_no_address_starts_a_local_cluster_and_stops_it(proc_guard):
    with joblib.parallel_backend("pydist", max_workers=2):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(where)(i) for i in range(8))
        assert joblib.effective_n_jobs(-1) == 2
    assert [x for x, _, _ in out] == list(range(8))
    pydist.joblib.shutdown()   # the backend is gone already; this closes anything left behind


def test_user_executor_is_used_and_left_open(cluster2):
    with ClusterExecutor(address=cluster2.address, secret=cluster2.secret) as ex:
        with joblib.parallel_backend("pydist", executor=ex):
            assert joblib.Parallel()(joblib.delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]
        assert ex.submit(square, 3).result(timeout=30) == 9
    with pytest.raises(ValueError, match="either executor"):
        pydist.joblib.PydistBackend(address="x:1", executor=object())


# ============================================================================================ errors
def test_error_is_raised_with_its_type(cluster2):
    with joblib.parallel_backend("pydist", address=cluster2.address, secret=cluster2.secret):
        with pytest.raises(ValueError, match="bad value 7"):
            joblib.Parallel(n_jobs=-1)(joblib.delayed(fail_on)(i, 7) for i in range(20))
        # the backend stays usable after an error
        assert joblib.Parallel(n_jobs=-1)(joblib.delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


def test_error_withdraws_the_queued_batches(cluster2, tmp_path):
    n = 120
    # the nodes learn that these calls are long (else they prefetch many per worker, which no cancel
    # can withdraw any more): warm up with calls as long as the test's
    with ClusterExecutor(address=cluster2.address, secret=cluster2.secret) as ex:
        list(ex.map(slow, [0.05] * 12))
    before = done_count(cluster2)
    with joblib.parallel_backend("pydist", address=cluster2.address, secret=cluster2.secret):
        with pytest.raises(KeyError):
            joblib.Parallel(n_jobs=-1, batch_size=1, pre_dispatch="all")(
                joblib.delayed(marked)(i, str(tmp_path), 0.05) for i in range(n))

    def idle():
        with ClusterExecutor(address=cluster2.address, secret=cluster2.secret) as ex:
            st = ex.status()
        return st["queued"] == 0 and st["running"] == 0 and all(
            l["queued"] == 0 for l in st["links"] if "queued" in l)

    wait_for(idle, 60, "the cluster to be idle")
    ran = len(os.listdir(tmp_path))
    assert ran < n / 2, f"{ran} of {n} calls ran after the first one failed"
    assert done_count(cluster2) - before < n


def test_generator_output(cluster2):
    with joblib.parallel_backend("pydist", address=cluster2.address, secret=cluster2.secret):
        gen = joblib.Parallel(n_jobs=-1, return_as="generator")(joblib.delayed(square)(i) for i in range(30))
        assert not isinstance(gen, list)
        assert list(gen) == [i * i for i in range(30)]
        gen = joblib.Parallel(n_jobs=-1, return_as="generator_unordered")(
            joblib.delayed(square)(i) for i in range(30))
        assert sorted(gen) == [i * i for i in range(30)]


def test_timeout(cluster2):
    with joblib.parallel_backend("pydist", address=cluster2.address, secret=cluster2.secret):
        import multiprocessing

        with pytest.raises(multiprocessing.TimeoutError):   # what joblib raises, as with loky
            joblib.Parallel(n_jobs=-1, timeout=0.3)(joblib.delayed(slow)(x) for x in (2.0, 2.0, 2.0))


def test_nested_parallel_runs_inside_the_worker(cluster2):
    with joblib.parallel_backend("pydist", address=cluster2.address, secret=cluster2.secret):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(inner_parallel)(k) for k in range(1, 6))
    assert out == [sum(i * i for i in range(k)) for k in range(1, 6)]


def test_auto_batching_groups_tiny_calls(cluster2):
    n = 3000
    before = done_count(cluster2)
    with joblib.parallel_backend("pydist", address=cluster2.address, secret=cluster2.secret):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(square)(i) for i in range(n))
    assert out == [i * i for i in range(n)]
    tasks = done_count(cluster2) - before
    assert tasks < n / 4, f"{n} tiny calls took {tasks} pydist tasks: auto batching did not batch"


# ====================================================================================== scikit-learn
def test_gridsearchcv_same_result_as_n_jobs_1(cluster2):
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    assert sklearn
    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0], "gamma": [0.01, 0.1, 1.0]}
    ref = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(X, y)
    with joblib.parallel_backend("pydist", address=cluster2.address, secret=cluster2.secret):
        got = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)
    assert got.best_params_ == ref.best_params_
    assert got.best_score_ == ref.best_score_
    assert list(got.cv_results_["mean_test_score"]) == list(ref.cv_results_["mean_test_score"])
    assert list(got.cv_results_["params"]) == list(ref.cv_results_["params"])
