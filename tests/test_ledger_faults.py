"""Issue #10: every future resolves exactly once, under every fault.

One deterministic reproduction per bug found by the chaos soak (real nodes on loopback, no mocks):

1. a task re-sent to a node that still holds a cancelled copy of it (a child that lost its parent);
2. a crashed client whose tasks leak link credit and shrink the cluster for good;
3. a client whose entry node is frozen (SIGSTOP) waits forever; and one whose entry dies does not fail
   over to another node it knows through the name server;
4. one NaN runtime stops the scheduler;
5. a colliding task id is dropped silently;
6. a SIGKILLed node leaves its worker slot folder in the temp directory.

No sleeps for synchronisation: gates (files) and ``wait_for`` with deadlines.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pydist import BrokenCluster, ClusterExecutor, LocalCluster, PydistError, security, wire
from conftest import descendants, gated, wait_for as _wait_for, wait_gone

pytestmark = [pytest.mark.timeout(120), pytest.mark.one_python]

HB = ["--heartbeat", "0.3", "--heartbeat-timeout", "1.5"]


def wait_for(cond, timeout=30.0, what="condition", interval=0.02):
    return _wait_for(cond, timeout, what, interval, retry_on=(Exception,))


def status(address, secret) -> dict:
    p = security.connect(address, secret=secret, timeout=2.0, call_timeout=5.0)
    try:
        return p.status()
    finally:
        p._pyroRelease()


def links(address, secret) -> dict:
    return {l["name"]: l for l in status(address, secret)["links"]}


def echo(x):
    return x


def barrier(directory, me, n, timeout=20.0):
    """A task that returns only once ``n`` tasks of this barrier run at the same time (else raises)."""
    import threading

    open(os.path.join(directory, f"b-{me}"), "w").close()
    deadline = time.monotonic() + timeout
    ev = threading.Event()
    while len([f for f in os.listdir(directory) if f.startswith("b-")]) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(directory))} of {n} tasks ran at once")
        ev.wait(0.01)
    return me


# ================================================================ 1. re-sent id, cancelled copy
def test_task_resent_to_child_holding_cancelled_copy_resolves(tmp_path):
    """Head with 0 workers, child with 1: the child freezes longer than the heartbeat timeout while its
    one task runs; the head re-places the task, the child thaws, drops the task (marked cancelled: its
    worker keeps running it) and re-joins; the head sends the same id again.  The future must resolve,
    and the child must get work afterwards (no credit stuck on the link)."""
    gate = str(tmp_path / "gate")
    started = str(tmp_path / "started")
    with LocalCluster(nodes=2, workers_per_node=[0, 1], node_args=HB) as c:
        child = c.procs[1]
        with ClusterExecutor(c.address, secret=c.secret) as ex:
            f = ex.submit(gated, gate, "done", started)
            wait_for(lambda: os.path.exists(started), 20, "the task to start on the child")
            child.send_signal(signal.SIGSTOP)
            try:
                wait_for(lambda: "node1" not in {n for n, l in links(c.address, c.secret).items() if l["alive"]},
                         20, "the head to declare the frozen child lost")
            finally:
                child.send_signal(signal.SIGCONT)
            wait_for(lambda: links(c.address, c.secret).get("node1", {}).get("alive"), 20,
                     "the child to re-join")
            # the head re-sends the task over the new link (it has nowhere else to run)
            wait_for(lambda: status(c.address, c.secret)["forwarded"] == 1, 20, "the task to be re-sent")
            open(gate, "w").close()
            assert f.result(30) == "done"
            # credit is not stuck: more work reaches the child's only worker
            assert list(ex.map(echo, range(20))) == list(range(20))
            wait_for(lambda: status(c.address, c.secret)["forwarded"] == 0, 10, "no task left at the link")


# ================================================================ 2. crashed client, credit leak
CLIENT = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, sys.argv[3])
    from pydist import ClusterExecutor
    from conftest import gated
    ex = ClusterExecutor(sys.argv[1], secret=sys.argv[2].encode())
    fs = [ex.submit(gated, sys.argv[4], i, None, 60) for i in range(30)]
    print("SUBMITTED", flush=True)
    threading.Event().wait(600)   # until the test kills us
""")


def test_crashed_client_does_not_shrink_the_cluster(tmp_path):
    """A client with tasks running all over a 3-level tree is SIGKILLed; after its lease the nodes drop
    its tasks.  Later work must use every worker of the tree again (no link keeps counting the dead
    client's tasks)."""
    gate = str(tmp_path / "gate")
    here = os.path.dirname(os.path.abspath(__file__))
    with LocalCluster(nodes=3, workers_per_node=1, topology="chain",
                      node_args=HB + ["--client-lease", "1.5"]) as c:
        p = subprocess.Popen([sys.executable, "-c", CLIENT, c.address, c.secret.decode(), here, gate],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            assert p.stdout.readline().strip() == b"SUBMITTED"
            wait_for(lambda: all(status(a, c.secret)["running"] == 1 for a in c.addresses), 20,
                     "every worker of the tree to run a task of the client")
            p.kill()
            p.wait(10)
            wait_for(lambda: status(c.address, c.secret)["clients"] == 0, 20, "the lease to expire")
            open(gate, "w").close()   # the orphaned tasks finish; nobody wants their results
            wait_for(lambda: all(status(a, c.secret)["running"] == 0 and status(a, c.secret)["queued"] == 0
                                 for a in c.addresses), 20, "the tree to be idle")
            wait_for(lambda: all(l["inflight"] == 0 for a in c.addresses
                                 for l in status(a, c.secret)["links"]), 20, "every link to be empty")
            bdir = tmp_path / "barrier"
            bdir.mkdir()
            with ClusterExecutor(c.address, secret=c.secret) as ex:
                fs = [ex.submit(barrier, str(bdir), i, 3) for i in range(3)]
                assert sorted(f.result(40) for f in fs) == [0, 1, 2]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


# ================================================================ 3. frozen entry node, failover
def test_client_of_a_frozen_entry_node_gets_broken_cluster(tmp_path):
    gate = str(tmp_path / "gate")
    with LocalCluster(nodes=1, workers_per_node=1) as c:
        node = c.procs[0]
        ex = ClusterExecutor(c.address, secret=c.secret, node_timeout=2.0)
        try:
            f = ex.submit(gated, gate, 1)
            wait_for(lambda: f.running(), 20, "the task to start")
            node.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                exc = f.exception(15)
                took = time.monotonic() - t0
                assert isinstance(exc, BrokenCluster), exc
                assert "node0" in str(exc) and "silent" in str(exc), str(exc)
                assert took < 10
                with pytest.raises(BrokenCluster):
                    ex.submit(echo, 1)
            finally:
                node.send_signal(signal.SIGCONT)
        finally:
            open(gate, "w").close()
            ex.shutdown(wait=True)


def test_client_fails_over_when_its_entry_node_dies(tmp_path):
    gate = str(tmp_path / "gate")
    with LocalCluster(nodes=2, workers_per_node=1, node_args=HB) as c:
        root_workers = descendants(c.procs[0].pid)
        with ClusterExecutor(ns=c.ns_address, secret=c.secret, node_timeout=2.0) as ex:
            assert ex.node_name == "node0"
            fs = [ex.submit(gated, gate, i, None, 60) for i in range(6)]
            wait_for(lambda: sum(f.running() for f in fs) >= 2, 20, "tasks to start")
            c.kill_node(0)
            wait_gone([c.procs[0].pid], 10, "the root")
            open(gate, "w").close()
            assert [f.result(40) for f in fs] == list(range(6))
            assert ex.node_name == "node1"
            assert list(ex.map(echo, range(10))) == list(range(10))
        wait_gone(root_workers, 20, "the dead root's workers")


# ================================================================ 4. NaN runtime
def poison_clock():
    import time as _t

    _t.perf_counter = lambda: float("nan")
    return "poisoned"


def test_nan_runtime_does_not_stop_the_scheduler(fresh_cluster):
    c = fresh_cluster(workers_per_node=1)
    with ClusterExecutor(c.address, secret=c.secret) as ex:
        assert ex.submit(poison_clock).result(20) == "poisoned"
        assert list(ex.map(echo, range(50))) == list(range(50))     # each of these reports NaN
        assert ex.submit(echo, "after").result(20) == "after"
        st = ex.status()
        assert st["avg_task_s"] is None or st["avg_task_s"] >= 0


# ================================================================ 5. colliding task id
def test_colliding_task_id_is_an_error_to_its_submitter(fresh_cluster, gate):
    c = fresh_cluster(workers_per_node=1)
    import cloudpickle

    fn = cloudpickle.dumps(gated)
    p = security.connect(c.address, secret=c.secret, call_timeout=10)
    try:
        p.open_client("clientA")
        p.open_client("clientB")
        payload_a = wire.dumps_call((gate.path, "A"), {})
        payload_b = wire.dumps_call((gate.path, "B"), {})
        assert p.submit("clientA", {"fA": fn}, [("same.0", "fA", payload_a, None, 0, [], 0, "clientA")]) == 1
        p.submit("clientB", {"fB": fn}, [("same.0", "fB", payload_b, None, 0, [], 0, "clientB")])
        res = []
        deadline = time.monotonic() + 10
        while not res and time.monotonic() < deadline:
            res, _ = p.collect("clientB", 1.0)
        assert res, "the colliding task was dropped silently"
        (tid, st, blob, *_), = res
        assert tid == "same.0" and st == wire.ERROR
        err = wire.loads_exception(blob)
        assert isinstance(err, PydistError) and "collides" in str(err)
        gate.open()
        res = []
        deadline = time.monotonic() + 10
        while not res and time.monotonic() < deadline:
            res, _ = p.collect("clientA", 1.0)
        assert res and res[0][0] == "same.0" and wire.loads(res[0][2]) == "A"
    finally:
        p._pyroRelease()


def test_executor_used_in_a_forked_child_says_so(cluster):
    with ClusterExecutor(cluster.address, secret=cluster.secret) as ex:
        assert ex.submit(echo, 1).result(10) == 1
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child: must raise at once, never hang nor collide with the parent's ids
            try:
                ex.submit(echo, 2)
                os.write(w, b"no error")
            except RuntimeError as exc:
                os.write(w, b"ok " + str(exc).encode()[:200])
            except BaseException as exc:
                os.write(w, repr(exc).encode()[:200])
            os._exit(0)
        os.close(w)
        msg = os.read(r, 300).decode()
        os.close(r)
        os.waitpid(pid, 0)
        assert msg.startswith("ok ") and "fork" in msg, msg
        assert ex.submit(echo, 3).result(10) == 3


# ================================================================ 6. slot folder of a killed node
def test_sigkilled_node_leaves_no_slot_folder(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with LocalCluster(nodes=1, workers_per_node=2, env={"TMPDIR": str(tmp)}) as c:
        workers = descendants(c.procs[0].pid)
        with ClusterExecutor(c.address, secret=c.secret) as ex:
            assert list(ex.map(echo, range(4))) == list(range(4))
        c.kill_node(0)
        wait_gone([c.procs[0].pid] + workers, 20, "the node and its workers")
    left = [p.name for p in tmp.iterdir() if p.name.startswith("pydist-slots")]
    assert not left, f"left behind in TMPDIR: {left}"


def test_client_with_a_list_of_addresses_fails_over(tmp_path):
    gate = str(tmp_path / "gate")
    with LocalCluster(nodes=2, workers_per_node=1, topology="star", node_args=HB) as c:
        root_workers = descendants(c.procs[0].pid)
        with ClusterExecutor(list(c.addresses), secret=c.secret, node_timeout=2.0) as ex:
            assert ex.node_name == "node0"
            fs = [ex.submit(gated, gate, i, None, 60) for i in range(4)]
            wait_for(lambda: sum(f.running() for f in fs) >= 2, 20, "tasks to start")
            c.kill_node(0)
            open(gate, "w").close()
            assert [f.result(40) for f in fs] == list(range(4))
            assert ex.node_name == "node1"
        wait_gone(root_workers, 20, "the dead root's workers")


def test_failover_false_breaks_instead(tmp_path):
    gate = str(tmp_path / "gate")
    with LocalCluster(nodes=2, workers_per_node=1, node_args=HB) as c:
        root_workers = descendants(c.procs[0].pid)
        ex = ClusterExecutor(ns=c.ns_address, secret=c.secret, node_timeout=2.0, failover=False)
        try:
            f = ex.submit(gated, gate, 1, None, 60)
            wait_for(lambda: f.running(), 20, "the task to start")
            c.kill_node(0)
            exc = f.exception(20)
            assert isinstance(exc, BrokenCluster) and "node0" in str(exc)
        finally:
            open(gate, "w").close()
            ex.shutdown(wait=True)
        wait_gone(root_workers, 20, "the dead root's workers")


def test_client_fails_over_from_a_frozen_entry_node_and_the_tree_heals_after_it_thaws(tmp_path):
    """The entry node is frozen (SIGSTOP), not killed, with tasks running under it: the client moves to
    another node within node_timeout and every future resolves once with its own value; once the old
    entry thaws (it still holds copies of those tasks) the tree works again."""
    import collections

    gate = str(tmp_path / "gate")
    with LocalCluster(nodes=3, workers_per_node=1, topology="star", node_args=HB) as c:
        root = c.procs[0]
        with ClusterExecutor(ns=c.ns_address, secret=c.secret, node_timeout=2.0) as ex:
            assert ex.node_name == "node0"
            done = collections.Counter()
            fs = [ex.submit(gated, gate, i, None, 60) for i in range(8)]
            for f in fs:
                f.add_done_callback(lambda f: done.update([id(f)]))
            wait_for(lambda: sum(f.running() for f in fs) >= 2, 20, "tasks to start")
            root.send_signal(signal.SIGSTOP)
            try:
                wait_for(lambda: ex.node_name != "node0", 20, "the client to fail over")
                open(gate, "w").close()
                assert [f.result(60) for f in fs] == list(range(8))
            finally:
                root.send_signal(signal.SIGCONT)
            assert len(done) == 8 and set(done.values()) == {1}, done
            wait_for(lambda: {"node1", "node2"} <= {n for n, l in links(c.address, c.secret).items() if l["alive"]}, 30,
                     "the children to rejoin the thawed root")
            assert list(ex.map(echo, range(30))) == list(range(30))
