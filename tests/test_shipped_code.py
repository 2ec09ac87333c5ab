"""Shipped code reaches everything that runs on the cluster (issue #14, item 5) and ``max_workers`` on a
running cluster caps this client's tasks running at once (item 6).

* a script run with ``submit_script`` / ``pydist run`` imports code shipped with ``upload_code``, with
  ``submit_script(..., code=[...])`` and with ``pydist run --code``;
* ``pydist sync-code --pin`` makes a bundle importable by every task of every node (executors that never
  uploaded it, scripts too) until ``pydist sync-code --unpin``;
* ``ClusterExecutor(address=..., max_workers=1)`` never has two of its tasks running at once.

Real clusters on loopback; no sleeps for synchronisation.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from pydist import ClusterExecutor
from pydist.codesync import build_bundle

pytestmark = pytest.mark.timeout(120)


def make_pkg(parent, name: str, value: int) -> str:
    pkg = os.path.join(str(parent), name)
    os.makedirs(pkg, exist_ok=True)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write(f"VALUE = {value}\n\ndef where():\n    return __file__\n")
    return pkg


def write_script(tmp_path, name: str, body: str) -> str:
    p = os.path.join(str(tmp_path), name)
    with open(p, "w") as f:
        f.write(textwrap.dedent(body))
    return p


def cli(*args, secret: bytes, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYDIST_SECRET=secret.decode())
    return subprocess.run([sys.executable, "-m", "pydist.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def import_value(name: str):
    import importlib

    mod = importlib.import_module(name)
    from pydist import task_context

    return mod.VALUE, task_context().node


def busy_interval(seconds: float) -> tuple:
    t0 = time.time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:   # the task's work, not synchronisation
        pass
    return t0, time.time()


# ========================================================================================= scripts
def test_script_imports_code_uploaded_by_its_executor(fresh_cluster, tmp_path):
    c = fresh_cluster(nodes=1, workers_per_node=1)
    pkg = make_pkg(tmp_path / "src", "sc_uploaded", 7)
    script = write_script(tmp_path, "use_it.py", """
        import sc_uploaded
        print("value", sc_uploaded.VALUE)
        """)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        ex.upload_code(pkg)
        r = ex.submit_script(script).result(timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "value 7"


def test_submit_script_code_kwarg_ships_code_for_that_script_only(fresh_cluster, tmp_path):
    c = fresh_cluster(nodes=1, workers_per_node=1)
    pkg = make_pkg(tmp_path / "src", "sc_kwarg", 11)
    script = write_script(tmp_path, "use_kwarg.py", """
        import sc_kwarg
        print(sc_kwarg.VALUE)
        """)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        r = ex.submit_script(script, code=[pkg]).result(timeout=60)
        assert (r.returncode, r.stdout.strip()) == (0, "11"), r.stderr
        # the executor's own tasks did not gain the script's code
        with pytest.raises(ModuleNotFoundError):
            ex.submit(import_value, "sc_kwarg").result(timeout=60)


def test_submit_script_code_kwarg_missing_path_names_it(fresh_cluster, tmp_path):
    c = fresh_cluster(nodes=1, workers_per_node=1)
    script = write_script(tmp_path, "s.py", "print(1)\n")
    from pydist.errors import CodeSyncError

    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        with pytest.raises(CodeSyncError, match="no-such-dir"):
            ex.submit_script(script, code=[str(tmp_path / "no-such-dir")])


def test_pydist_run_code_flag(fresh_cluster, tmp_path):
    c = fresh_cluster(nodes=1, workers_per_node=1)
    pkg = make_pkg(tmp_path / "src", "sc_runflag", 3)
    script = write_script(tmp_path, "run_me.py", """
        import sys
        import sc_runflag
        print(sc_runflag.VALUE, sys.argv[1:])
        """)
    r = cli("run", "--node", c.address, "--code", pkg, script, "a", "b", secret=c.secret)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3 ['a', 'b']"


# ============================================================================================= pins
def test_sync_code_pin_makes_a_bundle_importable_everywhere_until_unpinned(fresh_cluster, tmp_path):
    c = fresh_cluster(nodes=2, workers_per_node=1)
    pkg = make_pkg(tmp_path / "src", "sc_pinned", 42)
    digest = build_bundle(pkg)[0].digest
    r = cli("sync-code", "--pin", pkg, "--node", c.address, secret=c.secret)
    assert r.returncode == 0, r.stderr
    assert "pinned" in r.stdout and digest in r.stdout, r.stdout

    with ClusterExecutor(address=c.address, secret=c.secret) as ex:   # never uploaded anything
        got = set(ex.map(import_value, ["sc_pinned"] * 40))
        assert {v for v, _ in got} == {42}
        assert {n for _, n in got} == set(c.names), "every node sees the pinned bundle"
        # an executor with its own bundle sees both its code and the pinned code
        own = make_pkg(tmp_path / "own", "sc_own", 5)
        ex.upload_code(own)
        assert ex.submit(import_value, "sc_own").result(timeout=60)[0] == 5
        assert ex.submit(import_value, "sc_pinned").result(timeout=60)[0] == 42

    script = write_script(tmp_path, "pinned_script.py", "import sc_pinned\nprint(sc_pinned.VALUE)\n")
    r = cli("run", "--node", c.address, script, secret=c.secret)
    assert (r.returncode, r.stdout.strip()) == (0, "42"), r.stderr

    r = cli("sync-code", "--unpin", digest, "--node", c.address, secret=c.secret)
    assert r.returncode == 0, r.stderr
    assert "unpinned" in r.stdout, r.stdout
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        for f in [ex.submit(import_value, "sc_pinned") for _ in range(6)]:
            with pytest.raises(ModuleNotFoundError):
                f.result(timeout=60)


def test_unpin_by_path_and_unknown_digest(fresh_cluster, tmp_path):
    c = fresh_cluster(nodes=1, workers_per_node=1)
    pkg = make_pkg(tmp_path / "src", "sc_pin2", 1)
    assert cli("sync-code", "--pin", pkg, "--node", c.address, secret=c.secret).returncode == 0
    r = cli("sync-code", "--unpin", pkg, "--node", c.address, secret=c.secret)
    assert r.returncode == 0 and "unpinned" in r.stdout, r.stdout + r.stderr
    r = cli("sync-code", "--unpin", "ab" * 32, "--node", c.address, secret=c.secret)
    assert r.returncode != 0
    assert "not pinned" in r.stderr, r.stderr
    r = cli("sync-code", "--pin", "--unpin", pkg, "--node", c.address, secret=c.secret)
    assert r.returncode != 0


# ===================================================================================== max_workers
def _max_overlap(intervals) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_max_workers_caps_this_clients_running_tasks_on_a_running_cluster(fresh_cluster):
    c = fresh_cluster(nodes=1, workers_per_node=3)
    with ClusterExecutor(address=c.address, secret=c.secret, max_workers=1) as ex:
        intervals = list(ex.map(busy_interval, [0.1] * 6))
        assert _max_overlap(intervals) == 1, intervals
        # submit() too, and the executor stays usable
        intervals = [f.result(timeout=60) for f in [ex.submit(busy_interval, 0.05) for _ in range(4)]]
        assert _max_overlap(intervals) == 1, intervals
    with ClusterExecutor(address=c.address, secret=c.secret, max_workers=2) as ex:
        intervals = list(ex.map(busy_interval, [0.2] * 6))
        assert _max_overlap(intervals) <= 2, intervals


def test_max_workers_does_not_cap_other_clients(fresh_cluster):
    c = fresh_cluster(nodes=1, workers_per_node=2)
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        intervals = list(ex.map(busy_interval, [0.3] * 4))
        assert _max_overlap(intervals) == 2, intervals


def test_max_workers_cancel_of_held_tasks(fresh_cluster, gate):
    from conftest import gated

    c = fresh_cluster(nodes=1, workers_per_node=2)
    with ClusterExecutor(address=c.address, secret=c.secret, max_workers=1) as ex:
        first = ex.submit(gated, gate.path, 1)
        held = [ex.submit(gated, gate.path, i) for i in range(2, 5)]
        assert all(f.cancel() for f in held), "tasks held back by max_workers were never sent: cancellable"
        gate.open()
        assert first.result(timeout=60) == 1
        assert all(f.cancelled() for f in held)
