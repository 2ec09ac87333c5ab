"""Task groups as one unit, on real clusters: they start together (gang reservation) and fail together.

Each test reproduces one of issue 12's findings (they hung or went wrong before groups.py):
a failing or dying rank left the others blocked; a group under a queue of short tasks deadlocked;
ranks were re-run alone after a node loss; user tags collided with internal ones; an over-size message
hung the receiver; mailboxes of finished groups were never freed.
"""
import os
import signal
import time

import pytest

import pydist
from pydist import ClusterExecutor, GroupAborted, MessageTooLarge
from conftest import descendants, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.one_python]

FAST = ["--heartbeat", "0.2", "--heartbeat-timeout", "1.5", "--client-lease", "3"]


@pytest.fixture(scope="module")
def two_nodes():
    from pydist import LocalCluster

    with LocalCluster(nodes=2, workers_per_node=2) as c:
        yield c


@pytest.fixture
def ex(two_nodes):
    e = ClusterExecutor(two_nodes.address, secret=two_nodes.secret)
    try:
        yield e
    finally:
        e.shutdown(wait=True, cancel_futures=True)


def _wait_then_fail(comm, bad_rank, how):
    if comm.rank == bad_rank:
        if how == "raise":
            raise ValueError("rank went wrong")
        if how == "exit":
            os._exit(3)
        if how == "abort":
            comm.abort("giving up")
    return comm.recv(source=bad_rank, timeout=60)    # would block forever without the abort


@pytest.mark.parametrize("how", ["raise", "exit", "abort"])
def test_a_failing_rank_aborts_every_other_rank(ex, how):
    t0 = time.monotonic()
    group = ex.spawn_group(_wait_then_fail, 4, 2, how)
    for r, f in enumerate(group):
        exc = f.exception(timeout=30)
        assert exc is not None
        if r != 2:
            assert isinstance(exc, GroupAborted), exc
            assert exc.rank == 2 and "rank 2" in str(exc)
    assert time.monotonic() - t0 < 15
    if how == "raise":
        assert isinstance(group[0].exception().__cause__, ValueError)
        assert "rank went wrong" in str(group[0].exception().__cause__)
        assert isinstance(group[2].exception(), ValueError)   # the failing rank keeps its own error
    if how == "exit":
        assert isinstance(group[2].exception(), pydist.WorkerLost)
    with pytest.raises(GroupAborted, match="rank 2"):
        group.results(timeout=5)
    assert group.done() and group.state == "failed"
    # the workers are free again: the next group runs
    assert ex.spawn_group(_ranks, 4).results(timeout=30) == [0, 1, 2, 3]


def _busy_or_fail(comm):
    if comm.rank == 0:
        raise ValueError("rank 0 fails at once")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.01)        # busy, never calling comm: it cannot see the abort
    return "finished"


def test_a_rank_busy_after_an_abort_is_ended_and_its_worker_freed(ex):
    group = ex.spawn_group(_busy_or_fail, 2)
    t0 = time.monotonic()
    exc = group[1].exception(timeout=40)
    assert isinstance(exc, GroupAborted) and exc.rank == 0
    assert time.monotonic() - t0 < 30
    assert ex.spawn_group(_ranks, 4).results(timeout=30) == [0, 1, 2, 3]


def _ranks(comm):
    comm.barrier(timeout=30)
    return comm.rank


def _short(x):
    return x


def test_a_group_under_a_queue_of_3000_short_tasks_runs(ex):
    fs = [ex.submit(_short, i) for i in range(3000)]
    group = ex.spawn_group(_ranks, 4)
    assert group.results(timeout=60) == [0, 1, 2, 3]
    assert [f.result(timeout=60) for f in fs] == list(range(3000))


def test_two_groups_at_once_both_finish(ex):
    a, b = ex.spawn_group(_ranks, 3), ex.spawn_group(_ranks, 3)
    assert a.results(timeout=60) == [0, 1, 2] and b.results(timeout=60) == [0, 1, 2]


def _gated(path):
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)   # a task holding its worker until the test opens the gate
    return True


def test_a_group_that_must_wait_says_so_and_starts_when_workers_are_free(ex, tmp_path):
    gate = str(tmp_path / "gate")
    hog = [ex.submit(_gated, gate) for _ in range(3)]
    wait_for(lambda: all(f.running() for f in hog), 20, "the hogs to run")
    group = ex.spawn_group(_ranks, 4)
    wait_for(lambda: group.state.startswith("waiting"), 10, "the group to say it waits")
    assert "4 workers" in group.state
    open(gate, "w").close()
    assert group.results(timeout=60) == [0, 1, 2, 3]
    assert all(f.result(timeout=10) for f in hog)


def test_a_group_that_can_never_fit_fails_at_once(ex):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="must run at once"):
        ex.spawn_group(_ranks, 5)
    assert time.monotonic() - t0 < 5


def _tags(comm):
    if comm.rank == 0:
        comm.send("user message", dest=1, tag=5)
        with pytest.raises(ValueError, match="tag"):
            comm.send("x", dest=1, tag=-1001)
    value = comm.bcast("from root" if comm.rank == 0 else None)
    got = comm.recv(source=0, tag=pydist.ANY_TAG, timeout=30) if comm.rank == 1 else None
    return value, got


def test_user_tags_never_match_collectives_and_negative_tags_are_refused(ex):
    out = ex.spawn_group(_tags, 2).results(timeout=60)
    assert out == [("from root", None), ("from root", "user message")]


def _oversize(comm, n):
    if comm.rank == 0:
        comm.send(b"x" * n, dest=1)
        return "sent"
    return comm.recv(source=0, timeout=60)


def test_an_oversize_message_is_a_clear_error_and_the_receiver_does_not_hang(fresh_cluster):
    c = fresh_cluster(nodes=1, workers_per_node=2, node_args=["--max-message-size", "1M"])
    with ClusterExecutor(c.address, secret=c.secret) as e:
        group = e.spawn_group(_oversize, 2, 2 << 20)
        with pytest.raises(MessageTooLarge, match="limit of 1048576 bytes"):
            group[0].result(timeout=30)
        assert isinstance(group[1].exception(timeout=30), GroupAborted)
        assert e.spawn_group(_oversize, 2, 1000).results(timeout=30) == ["sent", b"x" * 1000]


def test_finished_groups_leave_nothing_on_the_node(ex):
    for _ in range(3):
        ex.spawn_group(_ranks, 4).results(timeout=60)
    g = ex.spawn_group(_wait_then_fail, 2, 1, "raise")
    with pytest.raises(GroupAborted):
        g.results(timeout=30)

    def clean():
        st = ex.status()["task_groups"]
        return not st["groups"] and not st["reserved_workers"]
    wait_for(clean, 10, "the node to forget finished groups")


def _on_nodes(comm):
    node = pydist.task_context().node
    nodes = comm.allgather(node, timeout=30)
    if node != nodes[0]:
        return comm.recv(source=0, timeout=60)     # blocks: rank 0's node dies meanwhile... or not
    comm.barrier(timeout=60)
    return node


def _block_on_child(comm, marker_dir):
    node = pydist.task_context().node
    with open(os.path.join(marker_dir, f"rank{comm.rank}-{os.getpid()}"), "w") as f:
        f.write(node)
    return comm.recv(source=comm.size - 1 - comm.rank, tag=1, timeout=90)   # nobody ever sends


def test_a_node_lost_mid_group_aborts_it_and_no_rank_runs_twice(fresh_cluster, tmp_path):
    c = fresh_cluster(nodes=2, workers_per_node=2, node_args=FAST)
    with ClusterExecutor(c.address, secret=c.secret) as e:
        group = e.spawn_group(_block_on_child, 4, str(tmp_path))
        wait_for(lambda: len(os.listdir(tmp_path)) == 4, 30, "all ranks to start")
        child = c.procs[1]
        os.kill(child.pid, signal.SIGKILL)
        t0 = time.monotonic()
        excs = [f.exception(timeout=30) for f in group]
        assert time.monotonic() - t0 < 20
        assert all(isinstance(x, (GroupAborted, pydist.NodeLost)) for x in excs), excs
        assert any(isinstance(x, GroupAborted) for x in excs)
        assert len(os.listdir(tmp_path)) == 4, "a rank ran twice"


def _client_script(address, secret, marker):
    return f"""
import os, sys, time
sys.path.insert(0, {os.path.dirname(__file__)!r})
from pydist import ClusterExecutor
def block(comm, marker):
    open(marker + str(comm.rank), "w").close()
    return comm.recv(source=(comm.rank + 1) % comm.size, timeout=120)
ex = ClusterExecutor({address!r}, secret={secret!r})
g = ex.spawn_group(block, 2, {marker!r})
while True:
    time.sleep(1)
"""


def test_a_client_killed_mid_group_frees_its_workers(fresh_cluster, tmp_path):
    import subprocess
    import sys

    c = fresh_cluster(nodes=1, workers_per_node=2, node_args=FAST)
    marker = str(tmp_path / "m")
    p = subprocess.Popen([sys.executable, "-c", _client_script(c.address, c.secret, marker)])
    try:
        wait_for(lambda: os.path.exists(marker + "0") and os.path.exists(marker + "1"), 30, "ranks to start")
    finally:
        p.kill()
        p.wait()
    with ClusterExecutor(c.address, secret=c.secret) as e:
        assert e.spawn_group(_ranks, 2).results(timeout=60) == [0, 1]


def _flaky(comm, marker):
    if comm.rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first attempt fails")
    return comm.allreduce(comm.rank, timeout=30)


def test_restart_reruns_the_whole_group(ex, tmp_path):
    group = ex.spawn_group(_flaky, 3, str(tmp_path / "once"), restart=1)
    assert group.results(timeout=60) == [3, 3, 3]
    assert group.attempts == 2
    with pytest.raises(GroupAborted):
        ex.spawn_group(_flaky, 3, str(tmp_path / "never-" / "x"), restart=0).results(timeout=60)


def test_cancel_a_waiting_group(ex, tmp_path):
    gate = str(tmp_path / "gate")
    hog = [ex.submit(_gated, gate) for _ in range(4)]
    wait_for(lambda: all(f.running() for f in hog), 20, "the hogs to run")
    group = ex.spawn_group(_ranks, 2)
    assert group.cancel() is True
    assert all(f.cancelled() for f in group)
    open(gate, "w").close()
    assert all(f.result(timeout=10) for f in hog)
    assert ex.spawn_group(_ranks, 2).results(timeout=30) == [0, 1]


def _peek_secret(comm=None):
    return os.environ.get("PYDIST_SECRET")


def test_ranks_never_see_the_cluster_secret(ex):
    assert ex.spawn_group(_peek_secret, 2).results(timeout=30) == [None, None]
    assert ex.submit(_peek_secret).result(timeout=30) is None


def _flood(comm, gate):
    if comm.rank == 0:
        t0 = time.monotonic()
        blob = b"\x01" * (1 << 20)
        for _ in range(100):            # 100 MiB: more than the receiver's queue cap (64 MiB)
            comm.send(blob, dest=1)
        return time.monotonic() - t0
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)               # not receiving yet
    return sum(len(comm.recv(source=0, timeout=60)) for _ in range(100))


def test_a_sender_blocks_while_the_receivers_queue_is_full(ex, tmp_path):
    gate = str(tmp_path / "gate")
    group = ex.spawn_group(_flood, 2, gate)
    wait_for(lambda: group.state == "running", 20, "the group to run")
    with pytest.raises(Exception):
        group[0].result(timeout=3)      # still blocked: the receiver holds 64 MiB and reads no more
    open(gate, "w").close()
    blocked_for, received = group.results(timeout=60)
    assert received == 100 << 20 and blocked_for >= 1.5   # it waited for the receiver


def test_a_group_reaches_workers_two_hops_away(proc_guard):
    from pydist import LocalCluster

    with LocalCluster(nodes=3, workers_per_node=[1, 0, 2], topology="chain") as c, \
            ClusterExecutor(c.address, secret=c.secret) as e:
        wait_for(lambda: e.status()["task_groups"] is not None and sum(
            l["workers"] for l in e.status()["links"]) >= 2, 20, "the chain to link up")
        out = e.spawn_group(_node_of_rank, 3).results(timeout=60)
    assert sorted(out) == sorted(["node0", "node2", "node2"]), out


def _node_of_rank(comm):
    comm.barrier(timeout=30)
    return pydist.task_context().node


def _wait_for_a_message_never_sent(comm):
    comm.recv(source=(comm.rank + 1) % comm.size, tag=5)     # no timeout: only an abort ends it


def test_leaving_the_with_block_by_an_exception_aborts_its_groups(two_nodes):
    """A group still running when its ``with ClusterExecutor()`` block is left by an exception (a
    ``results(timeout=)`` that expired, pytest-timeout, Ctrl-C) is aborted: ``__exit__`` waited forever for
    ranks that no one would ever wake (test_comm's three-node test hung that way under load)."""
    import threading

    seen: dict = {}

    def body():
        try:
            with ClusterExecutor(two_nodes.address, secret=two_nodes.secret) as e:
                g = seen["group"] = e.spawn_group(_wait_for_a_message_never_sent, 2)
                with pytest.raises(Exception):
                    g.results(timeout=1.0)              # the group is stuck: results times out
                raise RuntimeError("the caller gives up")
        except RuntimeError as exc:
            seen["raised"] = exc

    t0 = time.monotonic()
    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(40)
    assert not t.is_alive(), "__exit__ still waits for the group's ranks"
    print(f"\n[groups] with-block left by an exception with a stuck group: out in {time.monotonic() - t0:.2f} s")
    assert "raised" in seen
    for f in seen["group"]:
        assert isinstance(f.exception(timeout=0), GroupAborted), f.exception(timeout=0)
