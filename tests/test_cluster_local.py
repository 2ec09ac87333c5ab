"""pydist.cluster.LocalCluster: what it starts, that it stops everything, that it dies with its parent.

Every test starts its own cluster (each one is about starting or stopping) and checks through
``proc_guard`` that no process survives.  No sleeps: conditions with deadlines.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from pydist import ClusterExecutor, LocalCluster, task_context
from conftest import cluster_pids, descendants, wait_for, wait_gone

pytestmark = pytest.mark.timeout(60)


def where_all_at_once(started_dir, n, i):
    """Runs only if ``n`` of these run at the same time (each waits until all have started)."""
    open(os.path.join(started_dir, f"s{i}"), "w").close()
    deadline = time.monotonic() + 30
    while len(os.listdir(started_dir)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("the other tasks never started")
        threading.Event().wait(0.005)
    c = task_context()
    return c.node, c.hops


def test_attributes_and_cleanup(proc_guard):
    with LocalCluster(nodes=1, workers_per_node=2) as c:
        host, _, port = c.address.rpartition(":")
        assert host.startswith("127.") and int(port) > 0
        assert c.ns_address.startswith("127.0.0.1:")
        assert isinstance(c.secret, bytes) and len(c.secret) >= 16
        assert len(c.procs) == 1 and len(c.pids) == 2          # name server + node
        assert c.procs[0].pid in c.pids
        wait_for(lambda: len(descendants(c.procs[0].pid)) == 2, 15, "two workers")
        pids = cluster_pids(c)
        assert all(psutil.pid_exists(p) for p in pids)
        with ClusterExecutor(address=c.address, secret=c.secret) as ex:
            assert ex.submit(sum, [1, 2, 3]).result(20) == 6
            assert ex.status()["workers"] == 2
    wait_gone(pids, 15, "the cluster's processes")


def test_stop_is_idempotent_and_start_returns_self(proc_guard):
    c = LocalCluster(nodes=1, workers_per_node=1)
    assert c.start() is c
    pids = cluster_pids(c)
    c.stop()
    c.stop()
    wait_gone(pids, 15, "the cluster's processes")


def test_invalid_arguments():
    with pytest.raises(ValueError):
        LocalCluster(nodes=0)
    with pytest.raises(ValueError):
        LocalCluster(nodes=2, topology="ring")
    with pytest.raises(ValueError):
        LocalCluster(workers_per_node=-1)


def test_wrong_secret_is_refused(proc_guard):
    with LocalCluster(nodes=1, workers_per_node=1) as c:
        with pytest.raises(Exception) as info:
            ClusterExecutor(address=c.address, secret=b"not-the-secret-" * 3, connect_timeout=2)
        assert "secret" in str(info.value).lower() or "auth" in type(info.value).__name__.lower()


def test_processes_die_with_a_killed_parent(tmp_path, proc_guard):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import json, sys, time, psutil
        from pydist import LocalCluster
        c = LocalCluster(nodes=1, workers_per_node=2).start()
        deadline = time.monotonic() + 20
        node = psutil.Process(c.procs[0].pid)
        while len(node.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = list(c.pids) + [w.pid for w in node.children(recursive=True)]
        print(json.dumps(pids), flush=True)
        sys.stdin.read()      # until the test kills us
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        pids = json.loads(line)
        assert len(pids) == 4                                   # name server, node, two workers
        proc_guard.watch(pids)
        assert all(psutil.pid_exists(x) for x in pids)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        wait_gone(pids, 15, "the processes of a SIGKILLed parent's LocalCluster")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdin.close()
        p.stdout.close()


def test_three_nodes_share_the_work(proc_guard, tmp_path):
    with LocalCluster(nodes=3, workers_per_node=1) as c:
        assert len(c.procs) == 3 and len(c.pids) == 4
        with ClusterExecutor(address=c.address, secret=c.secret) as ex:
            fs = [ex.submit(where_all_at_once, str(tmp_path), 3, i) for i in range(3)]
            out = [f.result(40) for f in fs]
        nodes = sorted(n for n, _ in out)
        assert nodes == ["node0", "node1", "node2"]
        assert all((hops == 0) == (n == "node0") for n, hops in out)
        pids = cluster_pids(c)
    wait_gone(pids, 15, "the cluster's processes")


def _hops():
    from pydist import task_context

    c = task_context()
    return c.node, c.hops


def test_per_node_worker_counts_make_tasks_travel(proc_guard):
    with pytest.raises(ValueError, match="2 counts"):
        LocalCluster(nodes=2, workers_per_node=[1])
    with LocalCluster(nodes=2, workers_per_node=[0, 1], topology="chain") as c:
        with ClusterExecutor(address=c.address, secret=c.secret) as ex:
            assert set(ex.map(lambda _: _hops(), range(10))) == {("node1", 1)}


def test_clients_and_tools_of_this_process_need_no_secret(proc_guard, monkeypatch):
    """A LocalCluster's own process reaches it without secret=: by address, by name server, and from
    tools it starts (the secret is exported as PYDIST_SECRET while the cluster runs)."""
    monkeypatch.delenv("PYDIST_SECRET", raising=False)
    with LocalCluster(nodes=2, workers_per_node=1) as c:
        with ClusterExecutor(address=c.address) as ex:
            assert list(ex.map(abs, [-1, -2])) == [1, 2]
        with ClusterExecutor(ns=c.ns_address) as ex:
            assert ex.submit(abs, -3).result(timeout=30) == 3
        out = subprocess.run([sys.executable, "-m", "pydist.cli", "status", "--node", c.address, "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert {n["name"] for n in json.loads(out.stdout)["nodes"]} == {"node0", "node1"}
    assert "PYDIST_SECRET" not in os.environ      # removed with the cluster


def test_cli_run_and_stop(proc_guard, tmp_path):
    """`pydist run` ships a script and passes its output and exit code through; `pydist stop` stops a
    node cleanly (exit code 0)."""
    script = tmp_path / "hello.py"
    script.write_text("import sys\nprint('hello', sys.argv[1:])\nsys.exit(3)\n")
    with LocalCluster(nodes=1, workers_per_node=1) as c:
        r = subprocess.run([sys.executable, "-m", "pydist.cli", "run", "--node", c.address, str(script), "a", "b"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 3 and "hello ['a', 'b']" in r.stdout, r.stderr
        r = subprocess.run([sys.executable, "-m", "pydist.cli", "stop", "--node", c.address],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "node0" in r.stdout
        assert c.procs[0].wait(15) == 0


def _ns_names(ns_address):
    import Pyro5.api
    host, _, port = ns_address.rpartition(":")
    with Pyro5.api.locate_ns(host, int(port)) as ns:
        return ns.list(prefix="pydist.node.")


def test_embedded_start_name_server_thread_and_no_wait_for_workers(proc_guard):
    # the embedded cluster's fast start: the name server is a thread of this process (no subprocess),
    # and start() returns before the workers are up; the first tasks wait for them, none is lost
    before = {t.name for t in threading.enumerate()}
    c = LocalCluster(nodes=1, workers_per_node=2, ns_in_process=True, wait_workers=False).start()
    try:
        assert c.ns_proc is None and c.pids == [c.procs[0].pid]
        assert "pydist-ns" in {t.name for t in threading.enumerate()} - before
        with ClusterExecutor(c.address, secret=c.secret) as ex:
            assert [f.result(20) for f in [ex.submit(pow, i, 2) for i in range(20)]] == [i * i for i in range(20)]
        wait_for(lambda: "pydist.node.node0" in _ns_names(c.ns_address), 15, "the node in the name server")
        pids = cluster_pids(c)
    finally:
        c.stop()
    wait_gone(pids, 15, "the cluster's processes")
    wait_for(lambda: "pydist-ns" not in {t.name for t in threading.enumerate()}, 10, "the name server thread")


def test_embedded_executor_starts_the_fast_way(proc_guard):
    with ClusterExecutor(max_workers=1) as ex:
        c = ex._cluster
        assert c.ns_in_process and not c.wait_workers and c.ns_proc is None
        assert ex.submit(abs, -3).result(20) == 3
