"""Run CPython's own ``Lib/test/test_concurrent_futures`` against ``ClusterExecutor`` and against
``ProcessPoolExecutor``, side by side, and print pass/fail counts per part.

Usage (with a CPython whose standard library ships its ``test`` package, e.g. a pyenv build, and
pydist installed)::

    python tests/conformance/cpython_suite.py [-v] [--only pydist|ppe] [--part deadlock ...]

Nothing of CPython's is copied here: its test classes are imported from the interpreter's own ``test``
package and combined with an executor mixin, exactly as its ``create_executor_tests`` does for its own
executors.  The executor-generic parts are run (executor, wait, as_completed, init, shutdown,
deadlock); tests of process-pool internals (``_processes``, ``_call_queue``, ...) are left out.

A few tests check what differs by design (README, "Differences from ProcessPoolExecutor"); for
``ClusterExecutor`` they are reported as skipped with the reason (``DIFFERENCES``), and
``tests/conformance/`` checks the behaviour they stand for in a form both executors share.

CPython's interpreter-exit tests start a child that does ``from concurrent.futures import
<executor_type.__name__>``; while this script runs, a ``.pth`` file in site-packages makes
``concurrent.futures.ClusterExecutor`` name ``pydist.ClusterExecutor`` (removed on exit).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import sysconfig
import time
import unittest

PTH = "_pydist_cpython_suite_alias.pth"

#: test name -> why ClusterExecutor differs there by design (skipped for pydist only)
DIFFERENCES = {
    "test_interpreter_shutdown": "what a task prints reaches the client prefixed with node, worker and task "
                                 "('[node0/w1 ...] apple'); test_interpreter_exit_finishes_submitted_work "
                                 "checks the line",
    "test_initializer": "(FailingInitializerMixin) its initargs hold a multiprocessing.Queue, which cannot "
                        "travel to a cluster worker; test_failing_initializer_breaks_the_executor checks "
                        "the rest",
    "test_hang_gh83386": "skipped by CPython for ProcessPoolExecutor (it hangs there); with a process "
                         "pool's mp context its script calls multiprocessing.set_start_method without "
                         "importing multiprocessing; test_shutdown_without_wait_at_exit_with_a_running_task "
                         "checks it",
}


def _parts():
    from test.test_concurrent_futures import (executor, test_as_completed, test_deadlock, test_init,
                                              test_shutdown, test_wait)

    return {
        "executor": (executor, executor.ExecutorTest),
        "wait": (test_wait, test_wait.WaitTests),
        "as_completed": (test_as_completed, test_as_completed.AsCompletedTests),
        "init": (test_init, test_init.InitializerMixin),
        "init_failing": (test_init, test_init.FailingInitializerMixin),
        "shutdown": (test_shutdown, test_shutdown.ExecutorShutdownTest),
        "deadlock": (test_deadlock, test_deadlock.ExecutorDeadlockTest),
    }


def _mixins():
    import pydist
    from test.test_concurrent_futures.util import ProcessPoolSpawnMixin

    class ClusterSpawnMixin(ProcessPoolSpawnMixin):
        executor_type = pydist.ClusterExecutor

    return {"ppe": ProcessPoolSpawnMixin, "pydist": ClusterSpawnMixin}


def _install_alias() -> str:
    path = os.path.join(sysconfig.get_paths()["purelib"], PTH)
    with open(path, "w") as f:
        f.write("import sys; exec('try:\\n import concurrent.futures as _c, pydist\\n"
                " _c.ClusterExecutor = pydist.ClusterExecutor\\nexcept Exception:\\n pass')\n")
    return path


def run(parts, which, verbosity=1) -> dict:
    from test.test_concurrent_futures.util import BaseTestCase

    counts = {}
    mixins = _mixins()
    table = _parts()
    for part in parts:
        module, mixin = table[part]
        for name in which:
            ns = {"__module__": module.__name__}
            if name == "pydist":
                for test, why in DIFFERENCES.items():
                    if hasattr(mixin, test) and (test != "test_initializer" or part == "init_failing"):
                        ns[test] = unittest.skip(f"difference by design: {why}")(getattr(mixin, test))
            cls = type(f"{name}_{mixin.__name__}", (mixin, mixins[name], BaseTestCase), ns)
            suite = unittest.defaultTestLoader.loadTestsFromTestCase(cls)
            stream = sys.stderr if verbosity > 1 else io.StringIO()
            t0 = time.monotonic()
            res = unittest.TextTestRunner(stream=stream, verbosity=verbosity).run(suite)
            bad = [t.id().rsplit(".", 1)[-1] for t, _ in res.failures + res.errors]
            counts[(part, name)] = dict(run=res.testsRun, failed=len(bad), skipped=len(res.skipped),
                                        passed=res.testsRun - len(bad) - len(res.skipped),
                                        names=bad, seconds=time.monotonic() - t0,
                                        details=[(t.id(), tb) for t, tb in res.failures + res.errors])
            print(f"{part:>13} {name:>6}: {counts[(part, name)]['passed']} passed, {len(bad)} failed, "
                  f"{len(res.skipped)} skipped ({counts[(part, name)]['seconds']:.0f} s) {' '.join(bad)}",
                  flush=True)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["ppe", "pydist"])
    p.add_argument("--part", action="append", choices=list(_parts()))
    p.add_argument("-v", action="count", default=1)
    p.add_argument("--tracebacks", action="store_true", help="print the failures' tracebacks")
    a = p.parse_args(argv)
    which = [a.only] if a.only else ["ppe", "pydist"]
    alias = _install_alias()
    try:
        counts = run(a.part or list(_parts()), which, a.v)
    finally:
        os.unlink(alias)
    for name in which:
        tot = [c for (part, n), c in counts.items() if n == name]
        print(f"TOTAL {name}: {sum(c['passed'] for c in tot)} passed, {sum(c['failed'] for c in tot)} failed, "
              f"{sum(c['skipped'] for c in tot)} skipped")
    if a.tracebacks:
        for c in counts.values():
            for tid, tb in c["details"]:
                print(f"\n===== {tid}\n{tb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
