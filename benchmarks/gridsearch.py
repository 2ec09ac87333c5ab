#!/usr/bin/env python3
"""GridSearchCV wall time: n_jobs=1, loky, pydist on 1 node and on a 3-node LocalCluster (issue #14).

    python benchmarks/gridsearch.py            # 3 repetitions, median wall time of fit()
    python benchmarks/gridsearch.py --reps 1 --quick

The same search (SVC on scikit-learn's digits, a C x gamma grid, 5-fold CV) with each backend; cluster
start-up is measured apart from fit().  Every run must find the same best parameters and scores as
n_jobs=1 (checked).  Needs ``pip install -e .[joblib]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")   # one thread per worker for every backend

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    a = ap.parse_args()

    import joblib
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    import pydist.joblib  # noqa: F401  (registers the backend)
    from pydist import LocalCluster

    X, y = load_digits(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0, 100.0], "gamma": [1e-4, 1e-3, 1e-2]}
    if a.quick:
        grid = {"C": [1.0, 10.0], "gamma": [1e-3, 1e-2]}
    cv = 5
    fits = len(grid["C"]) * len(grid["gamma"]) * cv

    def search(n_jobs):
        return GridSearchCV(SVC(), grid, cv=cv, n_jobs=n_jobs).fit(X, y)

    def timed(fn):
        t0 = time.perf_counter()
        r = fn()
        return time.perf_counter() - t0, r

    ref = search(1)
    rows = []

    def record(label, workers, times, start=None, result=None):
        assert result.best_params_ == ref.best_params_, (label, result.best_params_, ref.best_params_)
        assert list(result.cv_results_["mean_test_score"]) == list(ref.cv_results_["mean_test_score"]), label
        r = result.cv_results_
        work = float(sum((r["mean_fit_time"] + r["mean_score_time"]) * cv))   # seconds spent in fits (last run)
        rows.append((label, workers, statistics.median(times), min(times), start, work / times[-1]))

    import contextlib

    # Every backend stays up for the whole run and the repetitions are interleaved (rep 1 of each, then
    # rep 2 of each, ...), so that load from elsewhere on the machine falls on all of them alike.
    pydist_cfgs = (("pydist, 1 node x 2 workers", dict(nodes=1, workers_per_node=2), 2),
                   ("pydist, 3-node LocalCluster x 1 worker", dict(nodes=3, workers_per_node=1), 3),
                   ("pydist, 3-node tree, workers [0,1,1]", dict(nodes=3, workers_per_node=[0, 1, 1]), 2))
    with contextlib.ExitStack() as stack:
        backends = [("n_jobs=1 (sequential)", 1, None, lambda: contextlib.nullcontext(), 1),
                    ("loky, 2 workers", 2, None, lambda: joblib.parallel_backend("loky", n_jobs=2), -1)]
        for label, kw, workers in pydist_cfgs:
            t0 = time.perf_counter()
            c = stack.enter_context(LocalCluster(**kw))
            start = time.perf_counter() - t0
            backends.append((label, workers, start,
                             lambda c=c: joblib.parallel_backend("pydist", address=c.address, secret=c.secret), -1))
        for _, _, _, ctx, n in backends:   # warm: workers start and import scikit-learn once
            with ctx():
                search(n)
        times: dict = {b[0]: [] for b in backends}
        last: dict = {}
        for _ in range(a.reps):
            for label, _, _, ctx, n in backends:
                with ctx():
                    t, last[label] = timed(lambda: search(n))
                times[label].append(t)
        for label, workers, start, _, _ in backends:
            record(label, workers, times[label], start, last[label])

    print(f"GridSearchCV(SVC) on digits {X.shape}, {len(grid['C']) * len(grid['gamma'])} candidates x {cv} "
          f"folds = {fits} fits; {os.cpu_count()} CPUs; median of {a.reps}; best {ref.best_params_} "
          f"score {ref.best_score_:.4f} (identical for every backend)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print("| backend | workers | fit() median s | min s | vs n_jobs=1 | workers busy (fit s / wall s) "
          "| cluster start s |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0][2]
    for label, w, med, mn, start, busy in rows:
        print(f"| {label} | {w} | {med:.2f} | {mn:.2f} | {base / med:.2f}x | {busy:.2f} | "
              f"{'-' if start is None else f'{start:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
