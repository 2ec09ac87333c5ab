"""Trees of nodes (issue #6): routing by depth, concurrency over the whole tree, cycles and hop limits,
children that die / freeze / join late / start before their parent / outlive a parent restart, the
``pydist status`` table, and a 1-node vs 4-node timing.

Real processes on 127.0.0.x: ``LocalCluster`` or nodes started by hand with ``python -m pydist.cli node``
(each reads a pipe on stdin and exits when it closes, so nothing outlives the test run).  Every process a
test starts is stopped by pid in a ``finally``; a node's workers are looked up by pid before a node is
killed and waited for (then killed by pid if they linger).  No sleeps for synchronisation: every wait
polls a condition with a deadline (``wait_for``).
"""
from __future__ import annotations

import collections
import contextlib
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import tempfile
import shutil
import time

import psutil
import pytest

from pydist import ClusterExecutor, LocalCluster, security, task_context
from pydist.cluster import read_ready
from conftest import descendants, wait_for as _wait_for

pytestmark = [pytest.mark.timeout(150), pytest.mark.one_python]

os.environ.setdefault("PYDIST_POLL_INTERVAL", "0.2")

HB_ARGS = ["--heartbeat", "0.2", "--heartbeat-timeout", "1.5"]
HB_TIMEOUT = 1.5


# ============================================================================================ helpers
def wait_for(cond, timeout=20.0, what="condition", interval=0.02):
    """conftest's wait_for, counting any error (a node not answering yet) as "not yet"."""
    return _wait_for(cond, timeout, what, interval, retry_on=(Exception,))


def status(address, secret, timeout=2.0) -> dict:
    p = security.connect(address, secret=secret, timeout=timeout, call_timeout=5.0)
    try:
        return p.status()
    finally:
        p._pyroRelease()


def reachable(address, secret) -> list:
    try:
        return status(address, secret)["reachable"]
    except Exception:
        return []


def alive_links(address, secret) -> set:
    return {l["name"] for l in status(address, secret)["links"] if l["alive"]}


def pid_alive(pid) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap_pids(pids, timeout=10.0) -> list:
    """Wait for ``pids`` to exit; SIGKILL (by pid) whatever is left.  Returns the pids that had to be
    killed."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    ev = threading.Event()
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        ev.wait(0.05)
    left = [p for p in pids if pid_alive(p)]
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return left


def workers_up(cluster_or_addrs, secret):
    addrs = cluster_or_addrs
    wait_for(lambda: all(status(a, secret)["workers_up"] == status(a, secret)["workers"] for a in addrs),
             20, "every node's workers to be up")


def free_port(host) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def env_with(secret: bytes) -> dict:
    env = dict(os.environ)
    here = os.path.dirname(os.path.abspath(__file__))   # tasks are functions of this module
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.path.dirname(here), env.get("PYTHONPATH")]))
    env["PYDIST_SECRET"] = secret.decode()
    return env


class Procs:
    """Processes started by hand (name server, nodes); stopped by pid, workers included."""

    def __init__(self, secret: bytes, tmp):
        self.secret = secret
        self.tmp = str(tmp)
        self.procs: list = []
        self.extra_pids: list = []

    def ns(self) -> str:
        port = free_port("127.0.0.1")
        p = subprocess.Popen([sys.executable, "-m", "pydist.cluster", "ns", "127.0.0.1", str(port)],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env_with(self.secret))
        self.procs.append(p)
        import Pyro5.api

        def up():
            with Pyro5.api.locate_ns("127.0.0.1", port) as ns:
                ns.ping()
            return True
        wait_for(up, 15, "the name server")
        return f"127.0.0.1:{port}"

    def node(self, name, host, *args, port=0, wait_ready=True):
        cmd = [sys.executable, "-m", "pydist.cli", "node", "--host", host, "--port", str(port), "--name", name,
               "--watch-stdin", "--code-cache", os.path.join(self.tmp, f"{name}-{len(self.procs)}"),
               "--log-level", "WARNING", *args]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env_with(self.secret))
        self.procs.append(p)
        p.address = None
        if wait_ready:
            p.address = self.ready(p)
        return p

    def ready(self, p, timeout=20.0) -> str:
        address = read_ready(p, timeout)
        assert address, f"node {p.args} did not print READY within {timeout} s (exit code {p.poll()})"
        return address

    def kill(self, p, sig=signal.SIGKILL):
        """Kill a node by pid; its workers are remembered so that they are waited for at the end."""
        self.extra_pids += descendants(p.pid)
        p.send_signal(sig)
        p.wait(10)

    def stop(self) -> list:
        for p in self.procs:
            self.extra_pids += descendants(p.pid)
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.send_signal(signal.SIGTERM)
                except OSError:
                    pass
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        return reap_pids(self.extra_pids)


@pytest.fixture
def procs(tmp_path):
    pr = Procs(security.new_secret(), tmp_path)
    try:
        yield pr
    finally:
        left = pr.stop()
        assert not left, f"worker processes outlived their node: {left}"


def stop_cluster(cluster: LocalCluster, extra_pids=()) -> None:
    """Stop a LocalCluster and make sure its workers (including those of killed nodes) are gone."""
    pids = list(extra_pids)
    for p in cluster.procs:
        pids += descendants(p.pid)
    for p in cluster.procs:   # a SIGSTOPped node would not handle SIGTERM
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)
            except OSError:
                pass
    cluster.stop()
    left = reap_pids(pids)
    assert not left, f"worker processes outlived their node: {left}"


@contextlib.contextmanager
def executor(address, secret):
    """A ClusterExecutor that, when the test fails, does not wait for futures the cluster lost
    (``shutdown(wait=True)`` would block on them and outlive the test's timeout)."""
    ex = ClusterExecutor(address=address, secret=secret)
    try:
        yield ex
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


# ============================================================================================ tasks
def where(x, sleep=0.0):
    """x*x plus where the task ran and when."""
    import time as _t
    t0 = _t.time()
    if sleep:
        _t.sleep(sleep)
    c = task_context()
    return x * x, c.node, c.worker, c.hops, tuple(c.path), c.task_id, t0, _t.time()


def meet(x, folder, n, deadline_s=30.0):
    """Check in, then wait until ``n`` tasks have checked in: True only if all ``n`` ran at once."""
    import os as _os
    import time as _t
    open(_os.path.join(folder, f"{x}.in"), "w").close()
    end = _t.monotonic() + deadline_s
    met = False
    while _t.monotonic() < end:
        if len([f for f in _os.listdir(folder) if f.endswith(".in")]) >= n:
            met = True
            break
        _t.sleep(0.005)
    c = task_context()
    return x * x, c.node, c.worker, c.hops, tuple(c.path), met


def max_overlap(intervals) -> int:
    events = sorted([(s, 1) for s, e in intervals] + [(e, -1) for s, e in intervals])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


# ============================================================================================ 1. tree
def test_four_node_tree_depth_hops_and_concurrency():
    cl = LocalCluster(nodes=4, workers_per_node=2, topology="tree").start()
    try:
        workers_up(cl.addresses, cl.secret)
        st = status(cl.address, cl.secret)
        assert st["reachable"] == ["node0", "node1", "node2", "node3"]
        assert status(cl.addresses[3], cl.secret)["parent"] == "node1"
        assert status(cl.addresses[1], cl.secret)["parent"] == "node0"
        with executor(cl.address, secret=cl.secret) as ex:
            # 8 tasks that each wait until all 8 are running: they finish only if 8 run at once
            gate = tempfile.mkdtemp(prefix="pydist-meet-")
            try:
                res = list(ex.map(meet, range(8), [gate] * 8, [8] * 8, timeout=60))
            finally:
                shutil.rmtree(gate, ignore_errors=True)
            assert [r[0] for r in res] == [x * x for x in range(8)]
            depth = {"node0": 0, "node1": 1, "node2": 1, "node3": 2}
            paths = {"node0": (), "node1": ("node0",), "node2": ("node0",), "node3": ("node0", "node1")}
            assert {r[1] for r in res} == set(depth), f"not every node ran a task: {[r[1] for r in res]}"
            for r in res:
                assert r[3] == depth[r[1]], f"task on {r[1]} has hops {r[3]}"
                assert r[4] == paths[r[1]], f"task on {r[1]} has path {r[4]}"
            assert all(r[5] for r in res), "8 tasks on 8 workers did not all run at once"
            assert len({(r[1], r[2]) for r in res}) == 8
            # many small tasks: every node still takes part, results intact
            res = list(ex.map(where, range(400), timeout=60))
            assert [r[0] for r in res] == [x * x for x in range(400)]
            assert {r[1] for r in res} == set(depth)
            assert all(r[3] == depth[r[1]] for r in res)
    finally:
        stop_cluster(cl)


# ============================================================================================ 2. cycle
@pytest.mark.parametrize("links", ["peer-ring", "mutual-parents"])
def test_cycle_of_three_runs_each_task_once_within_hops(procs, links):
    ns = procs.ns()
    max_hops = 2
    common = ["--ns", ns, "--workers", "1", "--max-hops", str(max_hops)] + HB_ARGS
    if links == "peer-ring":     # a -> b -> c -> a
        extra = {"a": ["--peer", "b"], "b": ["--peer", "c"], "c": ["--peer", "a"]}
    else:                        # each one's parent is the next one: a cycle of parents
        extra = {"a": ["--parent", "b"], "b": ["--parent", "c"], "c": ["--parent", "a"]}
    nodes = {n: procs.node(n, f"127.0.0.{20 + i}", *common, *extra[n]) for i, n in enumerate("abc")}
    addr = nodes["a"].address
    wait_for(lambda: set(reachable(addr, procs.secret)) == {"a", "b", "c"}, 20, "a to reach b and c")
    workers_up([p.address for p in nodes.values()], procs.secret)
    with executor(addr, secret=procs.secret) as ex:
        futs = [ex.submit(where, x, 0.002) for x in range(300)]
        done, not_done = cf.wait(futs, timeout=90)
        assert not not_done, f"{len(not_done)} of 300 tasks never finished"
        res = [f.result() for f in futs]
    assert [r[0] for r in res] == [x * x for x in range(300)], "a result is wrong"
    ids = [r[5] for r in res]
    assert len(set(ids)) == 300, "two futures got the result of the same task"
    for r in res:
        node, hops, path = r[1], r[3], r[4]
        assert hops <= max_hops, f"task {r[5]} ran on {node} after {hops} hops (max {max_hops})"
        assert hops == len(path), f"task {r[5]}: hops {hops} but path {path}"
        assert node not in path and len(set(path)) == len(path), f"task {r[5]} visited a node twice: {path} -> {node}"
    # tasks actually travelled the ring
    assert len({r[1] for r in res}) >= 2, f"all 300 tasks ran on {res[0][1]}"
    # each task ran exactly once: the nodes' worker-done counters add up to 300 (no duplicate runs)
    total_done = sum(status(p.address, procs.secret)["done"] for p in nodes.values())
    assert total_done == 300, f"300 tasks were run {total_done} times in all"


# ============================================================================================ 3. SIGKILL
def test_child_killed_mid_batch_tasks_replaced():
    cl = LocalCluster(nodes=4, workers_per_node=2, topology="tree", node_args=HB_ARGS).start()
    doomed = []
    try:
        workers_up(cl.addresses, cl.secret)
        with executor(cl.address, secret=cl.secret) as ex:
            futs = {ex.submit(where, x, 0.05): x for x in range(200)}
            seen = collections.Counter()
            res = {}
            killed_at = None
            # node1 has node3 below it: killing it cuts a whole subtree
            for f in cf.as_completed(futs, timeout=90):
                x = futs[f]
                assert x not in res, f"future {x} came back twice"
                r = f.result()
                res[x] = r
                seen[r[1]] += 1
                if killed_at is None and seen["node1"] >= 3:
                    doomed = descendants(cl.procs[1].pid)
                    cl.kill_node(1)
                    cl.procs[1].wait(10)
                    killed_at = time.monotonic()
                    # the parent notices within the heartbeat timeout (plus one janitor period)
                    wait_for(lambda: "node1" not in alive_links(cl.address, cl.secret), HB_TIMEOUT + 1.0,
                             "node0 to declare node1 lost")
                    noticed = time.monotonic() - killed_at
                    print(f"\nnode0 noticed the death of node1 after {noticed:.2f} s")
            assert killed_at is not None, f"node1 never ran 3 tasks: {seen}"
        assert sorted(res) == list(range(200))
        assert all(res[x][0] == x * x for x in res), "a result is wrong"
        assert len({r[5] for r in res.values()}) == 200
        st = status(cl.address, cl.secret)
        assert "node1" not in st["reachable"] and "node3" not in st["reachable"]
        assert st["queued"] == 0 and st["forwarded"] == 0
    finally:
        stop_cluster(cl, doomed)


# ============================================================================================ 4. SIGSTOP
def test_frozen_child_declared_lost_and_tasks_rerun():
    cl = LocalCluster(nodes=3, workers_per_node=2, topology="tree", node_args=HB_ARGS).start()
    frozen = cl.procs[2]
    try:
        workers_up(cl.addresses, cl.secret)
        with executor(cl.address, secret=cl.secret) as ex:
            futs = {ex.submit(where, x, 0.05): x for x in range(200)}
            res = {}
            stopped_at = lost_after = None
            for f in cf.as_completed(futs, timeout=90):
                x = futs[f]
                assert x not in res
                res[x] = f.result()
                if stopped_at is None and res[x][1] == "node2":
                    os.kill(frozen.pid, signal.SIGSTOP)
                    stopped_at, stopped_wall = time.monotonic(), time.time()
                    assert "node2" in alive_links(cl.address, cl.secret), "lost before the timeout"
                    wait_for(lambda: "node2" not in alive_links(cl.address, cl.secret), HB_TIMEOUT + 3.0,
                             "node0 to declare the frozen node2 lost")
                    lost_after = time.monotonic() - stopped_at
                    print(f"\nfrozen node2 declared lost after {lost_after:.2f} s")
            assert stopped_at is not None, "node2 never ran a task"
        assert sorted(res) == list(range(200))
        assert all(res[x][0] == x * x for x in res)
        assert lost_after >= HB_TIMEOUT * 0.5, f"declared lost after {lost_after:.2f} s, before the timeout"
        # the batch finished while node2 was frozen: what it held was re-run elsewhere
        late = [r for r in res.values() if r[6] > stopped_wall + 0.1]
        assert late and all(r[1] != "node2" for r in late)
        # thaw it: it comes back into the tree and takes work again
        os.kill(frozen.pid, signal.SIGCONT)
        wait_for(lambda: "node2" in reachable(cl.address, cl.secret), 20, "node2 to rejoin after SIGCONT")
        with executor(cl.address, secret=cl.secret) as ex:
            res = list(ex.map(where, range(12), [0.2] * 12, timeout=60))
        assert "node2" in {r[1] for r in res}
    finally:
        try:
            os.kill(frozen.pid, signal.SIGCONT)
        except OSError:
            pass
        stop_cluster(cl)


# ============================================================================================ 5. late joiner
def test_late_joiner_gets_work(procs):
    cl = LocalCluster(nodes=2, workers_per_node=1, topology="tree", secret=procs.secret).start()
    try:
        workers_up(cl.addresses, cl.secret)
        with executor(cl.address, secret=cl.secret) as ex:
            # a batch is already queued on the root when the new node arrives
            futs = [ex.submit(where, x, 0.2) for x in range(40)]
            wait_for(lambda: sum(f.done() for f in futs) >= 2, 30, "the batch to be under way")
            late = procs.node("late", "127.0.0.30", "--ns", cl.ns_address, "--parent", "node0", "--workers", "2")
            wait_for(lambda: "late" in reachable(cl.address, cl.secret), 20, "node0 to reach the late joiner")
            assert status(late.address, cl.secret)["parent"] == "node0"
            res = [f.result(60) for f in futs]
            assert [r[0] for r in res] == [x * x for x in range(40)]
            ran = collections.Counter(r[1] for r in res)
            assert ran["late"] >= 1, f"the late joiner got none of the queued batch: {ran}"
            assert all(r[3] == 1 and r[4] == ("node0",) for r in res if r[1] == "late")
            # and it keeps getting work in the next batch
            res = list(ex.map(where, range(8), [0.3] * 8, timeout=60))
            assert "late" in {r[1] for r in res}
    finally:
        stop_cluster(cl)


# ============================================================================================ 6. child first
def test_child_started_before_parent_joins_when_it_comes(procs):
    ns = procs.ns()
    child = procs.node("kid", "127.0.0.31", "--ns", ns, "--parent", "mom", "--workers", "2")
    # the child runs and waits: no parent link yet
    st = status(child.address, procs.secret)
    assert not any(l["alive"] for l in st["links"])
    mom = procs.node("mom", "127.0.0.32", "--ns", ns, "--workers", "0")
    wait_for(lambda: "kid" in reachable(mom.address, procs.secret), 20, "the parent to see the waiting child")
    assert status(child.address, procs.secret)["parent"] == "mom"
    workers_up([child.address], procs.secret)
    with executor(mom.address, secret=procs.secret) as ex:
        res = list(ex.map(where, range(20), timeout=60))
    assert [r[0] for r in res] == [x * x for x in range(20)]
    assert {r[1] for r in res} == {"kid"}   # the parent has no workers
    assert all(r[3] == 1 for r in res)


def test_a_parent_heartbeating_before_the_child_read_its_join_reply_keeps_the_link(procs):
    """The parent's link thread heartbeats a child as soon as it accepted the join; the child may not
    have read the join's reply (the epoch) yet.  It answered "unknown", so the parent dropped the link
    and the child re-joined a second later, with a warning on both sides (seen in #15's chain runs, the
    faster the calls the more often).  A stand-in parent heartbeats from inside ``join``: the moment
    is certain."""
    import Pyro5.server

    epoch = 0x1234567 | 1
    seen: dict = {}

    @Pyro5.server.expose
    class StandInParent:
        def join(self, info):
            child = security.connect(info["uri"], secret=procs.secret, timeout=5, call_timeout=5)
            try:   # before this reply reaches the child: as a fast parent's first heartbeat does
                seen["early"] = child.heartbeat("mom", {"mom": [0, 0]}, {"e": epoch, "n": 0, "d": 0})
            finally:
                security.release(child)
            return {"name": "mom", "uri": uri, "map": {}, "epoch": epoch}

        def heartbeat(self, sender, remote_map, recon=None):
            seen["beats"] = seen.get("beats", 0) + 1
            return {"map": {}}

        def leave(self, sender):
            return None

    d = security.SecureDaemon("127.0.0.33", 0, secret=procs.secret, name="mom")
    uri = str(d.register(StandInParent(), security.NODE_OBJECT_ID))
    t = threading.Thread(target=d.requestLoop, daemon=True)
    t.start()
    try:
        kid = procs.node("kid", "127.0.0.34", "--parent", d.locationStr, "--workers", "0", *HB_ARGS)
        wait_for(lambda: "early" in seen and seen.get("beats", 0) >= 3, 20, "the join and three heartbeats")
        assert not seen["early"].get("unknown"), f"the child disowned a link it was joining: {seen['early']}"
        links = status(kid.address, procs.secret)["links"]
        assert [(l["name"], l["alive"]) for l in links] == [("mom", True)], links
    finally:
        d.unregister(security.NODE_OBJECT_ID)
        d.shutdown()
        t.join(5)


# ============================================================================================ 7. parent restart
def test_parent_restarted_child_rejoins(procs):
    ns = procs.ns()
    host = "127.0.0.33"
    port = free_port(host)
    head = procs.node("head", host, "--ns", ns, "--workers", "0", *HB_ARGS, port=port)
    kid = procs.node("kid2", "127.0.0.34", "--ns", ns, "--parent", "head", "--workers", "1", *HB_ARGS)
    wait_for(lambda: "kid2" in reachable(head.address, procs.secret), 20, "the child to join")
    procs.kill(head)
    wait_for(lambda: not any(l["alive"] for l in status(kid.address, procs.secret)["links"]), 10,
             "the child to notice its parent died")
    head2 = procs.node("head", host, "--ns", ns, "--workers", "0", *HB_ARGS, port=port)
    assert head2.address == f"{host}:{port}"
    wait_for(lambda: "kid2" in reachable(head2.address, procs.secret), 30,
             "the child to rejoin the restarted parent")
    workers_up([kid.address], procs.secret)
    with executor(head2.address, secret=procs.secret) as ex:
        res = list(ex.map(where, range(10), timeout=60))
    assert [r[0] for r in res] == [x * x for x in range(10)]
    assert {r[1] for r in res} == {"kid2"}


def gated(x, gate, timeout=60.0):
    """Wait until the file ``gate`` exists, then return x*x and where it ran."""
    import os as _os
    import threading as _th
    import time as _t
    deadline = _t.monotonic() + timeout
    ev = _th.Event()
    while not _os.path.exists(gate):
        if _t.monotonic() > deadline:
            raise TimeoutError("gate never opened")
        ev.wait(0.01)
    return x * x, task_context().node


def test_frozen_parent_thawed_child_rejoins_and_tasks_finish(procs, tmp_path):
    ns = procs.ns()
    # the parent tolerates a long silence, the child does not: only the child declares a loss
    head = procs.node("head3", "127.0.0.36", "--ns", ns, "--workers", "0",
                      "--heartbeat", "1", "--heartbeat-timeout", "30")
    kid = procs.node("kid3", "127.0.0.37", "--ns", ns, "--parent", "head3", "--workers", "1",
                     "--heartbeat", "1", "--heartbeat-timeout", "3")
    wait_for(lambda: "kid3" in reachable(head.address, procs.secret), 20, "the child to join")
    workers_up([kid.address], procs.secret)

    def kid_parent_alive():
        return any(l["alive"] for l in status(kid.address, procs.secret)["links"] if l["role"] == "parent")

    with executor(head.address, secret=procs.secret) as ex:
        # two trials: whether the child's pending call times out before the thaw (then it re-joins, fine)
        # or completes after it (the bug) depends on timing; with --heartbeat 1 the latter is likely
        for trial in range(2):
            gate = str(tmp_path / f"gate{trial}")
            futs = [ex.submit(gated, x, gate) for x in range(2)]
            wait_for(lambda: status(kid.address, procs.secret)["running"] > 0, 20, "the child to run a task")
            os.kill(head.pid, signal.SIGSTOP)
            try:
                wait_for(lambda: not kid_parent_alive(), 10, "the child to declare its frozen parent lost")
            finally:
                os.kill(head.pid, signal.SIGCONT)
            open(gate, "w").close()
            done, not_done = cf.wait(futs, timeout=20)
            assert not not_done, f"trial {trial}: {len(not_done)} tasks never finished after the thaw"
            assert [f.result() for f in futs] == [(0, "kid3"), (1, "kid3")]
            wait_for(lambda: kid_parent_alive() and "kid3" in reachable(head.address, procs.secret), 8,
                     f"trial {trial}: the child's parent link to come back after the thaw")


# ============================================================================================ 8. status CLI
STATUS_COLS = ["node", "address", "parent", "workers", "queued", "running", "done", "failed", "cpu%", "mem%"]


def run_status(cl, *args):
    env = env_with(cl.secret if isinstance(cl.secret, bytes) else cl.secret.encode())
    out = subprocess.run([sys.executable, "-m", "pydist.cli", "status", *args], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_status_cli_lists_every_node():
    cl = LocalCluster(nodes=4, workers_per_node=2, topology="tree").start()
    try:
        workers_up(cl.addresses, cl.secret)
        with executor(cl.address, secret=cl.secret) as ex:
            futs = [ex.submit(where, x, 0.3) for x in range(40)]
            wait_for(lambda: all(status(a, cl.secret)["busy"] > 0 for a in cl.addresses), 20,
                     "every node to be busy")
            text = run_status(cl, "--node", cl.address)
            print("\n" + text)
            lines = text.strip().splitlines()
            assert lines[0].split() == STATUS_COLS
            rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
            assert set(rows) == {"node0", "node1", "node2", "node3"}
            parents = {"node0": "-", "node1": "node0", "node2": "node0", "node3": "node1"}
            for k, name in enumerate(cl.names):
                r = rows[name]
                assert len(r) == len(STATUS_COLS), r
                assert r[1] == cl.addresses[k]
                assert r[2] == parents[name]
                busy, total = r[3].split("/")
                assert total == "2" and 0 <= int(busy) <= 2
                for v in r[4:8]:
                    assert v.isdigit()
                float(r[8]), float(r[9])
            assert sum(int(rows[n][3].split("/")[0]) for n in rows) >= 4, "under load, yet few busy workers"
            js = json.loads(run_status(cl, "--node", cl.address, "--json"))
            assert {n["name"] for n in js["nodes"]} == set(cl.names)
            text_ns = run_status(cl, "--ns", cl.ns_address)
            assert {ln.split()[0] for ln in text_ns.strip().splitlines()[1:]} == set(cl.names)
            js = json.loads(run_status(cl, "--ns", cl.ns_address, "--json"))
            assert {n["name"] for n in js["nodes"]} == set(cl.names)
            assert [f.result(60)[0] for f in futs] == [x * x for x in range(40)]
        done = json.loads(run_status(cl, "--node", cl.address, "--json"))
        assert sum(n["done"] for n in done["nodes"]) == 40
    finally:
        stop_cluster(cl)


# ============================================================================================ 9. timing
def sleep10(x):
    import time as _t
    _t.sleep(0.01)
    return x


def test_timing_one_node_vs_tree():
    timings = {}
    for label, kw in (("1 node x 4 workers", dict(nodes=1, workers_per_node=4)),
                      ("4-node tree x 1 worker", dict(nodes=4, workers_per_node=1, topology="tree"))):
        cl = LocalCluster(**kw).start()
        try:
            workers_up(cl.addresses, cl.secret)
            with executor(cl.address, secret=cl.secret) as ex:
                assert list(ex.map(sleep10, range(20))) == list(range(20))   # warm up
                t0 = time.perf_counter()
                out = list(ex.map(sleep10, range(2000), timeout=120))
                timings[label] = time.perf_counter() - t0
            assert out == list(range(2000))
        finally:
            stop_cluster(cl)
    print()
    for label, t in timings.items():
        print(f"2,000 tasks x 10 ms on {label}: {t:.2f} s (ideal {2000 * 0.01 / 4:.2f} s)")
