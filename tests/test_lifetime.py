"""An executor's lifetime (issue 9, item 5), as ``ProcessPoolExecutor``'s: a dropped executor is
collected and closes itself once its work is done; work submitted without waiting is finished at
interpreter exit; a submit from an ``atexit`` hook is refused; the embedded cluster's temp folder goes
away after a normal exit without shutdown and after the client is killed."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import weakref

import pytest

from pydist import ClusterExecutor
from conftest import wait_for, wait_gone

pytestmark = pytest.mark.timeout(90)


def write_after_gate(path, gate, value):
    import time

    deadline = time.monotonic() + 30
    ev = threading.Event()
    while not os.path.exists(gate) and time.monotonic() < deadline:
        ev.wait(0.01)
    with open(path, "w") as f:
        f.write(value)
    return value


def _client_threads():
    return [t for t in threading.enumerate() if t.name.startswith("pydist-client-") and t.is_alive()]


def test_dropped_executor_is_collected_and_finishes_its_work(cluster, tmp_path):
    before = set(_client_threads())
    ex = ClusterExecutor(address=cluster.address, secret=cluster.secret)
    gate, out = tmp_path / "gate", tmp_path / "out"
    fut = ex.submit(write_after_gate, str(out), str(gate), "done")
    alive = weakref.ref(ex)
    del ex
    gc.collect()
    assert alive() is None, gc.get_referrers(alive()) if alive() else None
    gate.write_text("")
    assert fut.result(timeout=30) == "done"          # the pending future still resolves
    wait_for(lambda: not (set(_client_threads()) - before), 15, "the dropped executor's threads to end")


def test_dropped_embedded_executor_stops_its_cluster(proc_guard):
    ex = ClusterExecutor(1)
    assert ex.submit(pow, 2, 3).result(timeout=30) == 8
    pids = list(ex.cluster.pids) + ([ex.cluster._janitor.pid] if ex.cluster._janitor is not None else [])
    tmp = ex.cluster._tmp
    assert tmp and os.path.isdir(tmp)
    del ex
    gc.collect()
    wait_gone(pids, 20, "the dropped executor's cluster")
    wait_for(lambda: not os.path.exists(tmp), 10, "the cluster's temp folder to be removed")


def _run(script: str, tmp_path, *args, timeout=60) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(tmp_path))


def test_work_submitted_without_waiting_is_finished_at_exit(tmp_path, proc_guard):
    out = tmp_path / "out"
    p = _run("""
        import sys, time
        from pydist import ClusterExecutor

        def slow_write(path):
            time.sleep(0.5)
            with open(path, "w") as f:
                f.write("finished")

        if __name__ == "__main__":
            ex = ClusterExecutor(2)
            ex.submit(slow_write, sys.argv[1])
            print("leaving")
    """, tmp_path, out)
    assert p.returncode == 0, p.stderr
    assert out.read_text() == "finished"


def test_submit_from_an_atexit_hook_is_refused(tmp_path, proc_guard):
    p = _run("""
        import atexit
        from pydist import ClusterExecutor

        @atexit.register
        def late():
            try:
                ex.submit(id, None)
            except RuntimeError as e:
                print("refused:", e)

        if __name__ == "__main__":
            ex = ClusterExecutor(1)
            ex.submit(id, 42).result()
    """, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "refused: cannot schedule new futures after interpreter shutdown" in p.stdout


def test_temp_folder_removed_after_exit_without_shutdown(tmp_path, proc_guard):
    p = _run("""
        from pydist import ClusterExecutor
        if __name__ == "__main__":
            ex = ClusterExecutor(1)
            print(ex.cluster._tmp, flush=True)
            ex.submit(pow, 2, 2).result()
    """, tmp_path)
    assert p.returncode == 0, p.stderr
    tmp = p.stdout.split()[0]
    wait_for(lambda: not os.path.exists(tmp), 10, f"{tmp} to be removed")


def test_temp_folder_removed_after_the_client_is_killed(tmp_path, proc_guard):
    path = tmp_path / "killed.py"
    path.write_text(textwrap.dedent("""
        import sys, threading
        from pydist import ClusterExecutor
        if __name__ == "__main__":
            ex = ClusterExecutor(1)
            ex.submit(pow, 2, 2).result()
            extra = [ex.cluster._janitor.pid] if ex.cluster._janitor is not None else []
            print(ex.cluster._tmp, " ".join(map(str, ex.cluster.pids + extra)), flush=True)
            threading.Event().wait(60)
    """))
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        line = proc.stdout.readline().split()
        tmp, pids = line[0], [int(x) for x in line[1:]]
        proc_guard.watch(pids)
        assert os.path.isdir(tmp)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_gone(pids, 20, "the killed client's cluster")
        wait_for(lambda: not os.path.exists(tmp), 10, f"{tmp} to be removed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
