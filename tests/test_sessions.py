"""Client sessions of a node (pydist.sessions): a lone short task's result riding back in the reply
to its own ``submit_wait`` (issue #15), and every result reaching the client exactly once, whichever way
it travels (the reply, or the long poll when the task took longer than the linger).

Real nodes on loopback; no sleeps for synchronisation (gates and bounded polls).
"""
from __future__ import annotations

import threading
import time

import cloudpickle
import pytest

from pydist import ClusterExecutor, security, wire
from conftest import gated

pytestmark = pytest.mark.timeout(90)


def echo(x):
    return x


def nap(s):
    time.sleep(s)   # the task's own work (it sets the node's average task time)
    return s


def _task(cid, seq, key, *args):
    return (f"{cid}.{seq}", key, wire.dumps_call(args, {}), None, 0, [], wire.KIND_CALL, cid)


def _collect_all(p, cid, want, timeout=20.0):
    """Poll until results for every id in ``want`` came; returns ``{id: [results...]}`` (duplicates kept)."""
    got: dict = {}
    deadline = time.monotonic() + timeout
    while not want <= set(got) and time.monotonic() < deadline:
        res, _ = p.collect(cid, 0.5)
        for r in res:
            got.setdefault(r[0], []).append(r)
    return got


def test_lone_short_task_result_rides_in_the_submit_reply_exactly_once(fresh_cluster):
    c = fresh_cluster(workers_per_node=1)
    p = security.connect(c.address, secret=c.secret, call_timeout=10)
    cid = "client-linger"
    fn = cloudpickle.dumps(echo)
    try:
        p.open_client(cid)
        # the first task: the node knows no average task time yet, so it does not wait
        n, res = p.submit_wait(cid, {"e": fn}, [_task(cid, 0, "e", "first")], 0.005)
        assert n == 1
        got = {r[0]: [r] for r in res}
        got.update(_collect_all(p, cid, {f"{cid}.0"}))
        in_reply = 0
        for i in range(1, 41):
            n, res = p.submit_wait(cid, {"e": fn}, [_task(cid, i, "e", i)], 0.005)
            assert n == 1 and len(res) <= 1
            for r in res:
                assert r[0] == f"{cid}.{i}" and r[1] == wire.OK and wire.loads(r[2]) == i
                got.setdefault(r[0], []).append(r)
                in_reply += 1
            if not res:   # slower than the linger (a loaded machine): it comes through the long poll
                for tid, rs in _collect_all(p, cid, {f"{cid}.{i}"}).items():
                    got.setdefault(tid, []).extend(rs)
        assert in_reply > 0, "no lone no-op task's result came back in its submit reply"
        # nothing arrives twice: the long poll has nothing left for any of them
        res, started = p.collect(cid, 0.3)
        for r in res:
            got.setdefault(r[0], []).append(r)
        assert sorted(got) == sorted(f"{cid}.{i}" for i in range(41))
        assert all(len(rs) == 1 for rs in got.values()), {t: len(rs) for t, rs in got.items() if len(rs) != 1}
        assert p.status()["held"] == 0
    finally:
        p._pyroRelease()


def test_task_longer_than_the_linger_is_not_held_and_comes_through_collect(fresh_cluster, gate):
    c = fresh_cluster(workers_per_node=1)
    p = security.connect(c.address, secret=c.secret, call_timeout=10)
    cid = "client-long"
    try:
        p.open_client(cid)
        fn = cloudpickle.dumps(nap)
        for i in range(3):   # the node's average task time becomes ~50 ms, over the linger
            p.submit(cid, {"n": fn}, [_task(cid, i, "n", 0.05)])
        assert len(_collect_all(p, cid, {f"{cid}.{i}" for i in range(3)})) == 3
        g = cloudpickle.dumps(gated)
        n, res = p.submit_wait(cid, {"g": g}, [_task(cid, 9, "g", gate.path, "late")], 0.005)
        assert (n, res) == (1, [])
        gate.open()
        got = _collect_all(p, cid, {f"{cid}.9"})
        assert [wire.loads(r[2]) for r in got[f"{cid}.9"]] == ["late"]
    finally:
        p._pyroRelease()


def test_executor_lone_tasks_resolve_once_with_callbacks_once(fresh_cluster):
    """Through the executor: lone tasks (some back in the submit reply, some through the long poll),
    then a burst: every future resolves once, its done-callback runs once."""
    c = fresh_cluster(workers_per_node=2)
    calls: dict = {}
    lock = threading.Lock()

    def cb(f):
        with lock:
            calls[id(f)] = calls.get(id(f), 0) + 1

    with ClusterExecutor(c.address, secret=c.secret) as ex:
        futs = []
        for i in range(60):
            f = ex.submit(echo, i)
            f.add_done_callback(cb)
            assert f.result(20) == i
            futs.append(f)
        burst = [ex.submit(echo, i) for i in range(200)]
        for f in burst:
            f.add_done_callback(cb)
        assert [f.result(20) for f in burst] == list(range(200))
        futs += burst
    assert all(calls.get(id(f)) == 1 for f in futs)


def test_a_burst_of_submits_does_not_wait_in_the_node_one_task_at_a_time(fresh_cluster):
    """The result-in-the-reply path is for a caller waiting on one task at a time.  In a burst (the
    futures kept for later, as map does) a submit must not wait for the previous short task's result,
    or a loop of short tasks would be sent one after the other (a 1,000,000-task chunked map ran at a
    third of its speed).  Counted, not timed: the client counts the results that came in a reply."""
    c = fresh_cluster(workers_per_node=2)
    with ClusterExecutor(c.address, secret=c.secret) as ex:
        assert [ex.submit(echo, i).result(20) for i in range(30)] == list(range(30))   # the node's average
        core = ex._core
        for _ in range(3):
            before = core._in_reply
            futs = [ex.submit(echo, i) for i in range(200)]
            assert core._in_reply - before <= 1, f"{core._in_reply - before} of a burst's submits waited"
            assert [f.result(20) for f in futs] == list(range(200))
        before = core._in_reply
        assert [ex.submit(echo, i).result(20) for i in range(40)] == list(range(40))
        assert core._in_reply > before, "one task at a time never got its result in the submit reply"
        before = core._in_reply
        assert list(ex.map(echo, range(5000), chunksize=100)) == list(range(5000))   # a burst too
        assert core._in_reply - before <= 1


def test_a_started_note_waits_its_full_delay_even_after_an_earlier_task_left():
    """Back-to-back lone tasks: task 1's "started" timer must not wake the long poll for task 2 when
    task 1's result already went back in its submit reply.  (It did: 45 % of 3,000 lone tasks cost an
    extra collect round trip for a note nobody needed, #15's latency.)"""
    from pydist.sessions import STARTED_DELAY, Sessions

    lock, stopping = threading.RLock(), threading.Event()
    s = Sessions(lock, stopping, lease=60.0)
    try:
        with lock:
            c = s.get("c1")
            s.note_started("c1", "t1")
            c.started.remove("t1")        # its result rode back in the submit reply (Session.linger)
        first = time.monotonic()
        while time.monotonic() < first + STARTED_DELAY / 2:   # the next lone task comes half a delay later
            pass
        with lock:
            s.note_started("c1", "t2")
            since = time.monotonic()
        deadline = since + 5.0
        while time.monotonic() < deadline:
            with lock:
                if c.started_due:
                    break
                c.cond.wait(0.05)
        woke = time.monotonic()
        assert c.started_due, "the note for t2 never came"
        assert woke - since >= STARTED_DELAY * 0.9, \
            f"t2's note came {1000 * (woke - since):.1f} ms after it started (t1's timer)"
    finally:
        stopping.set()


def _note_due(c, lock, since, within):
    """Wait (bounded) for the StartedTimer to mark ``c``'s "started" notes due; returns when (or None)."""
    deadline = since + within
    while time.monotonic() < deadline:
        with lock:
            if c.started_due:
                return time.monotonic()
            c.cond.wait(0.02)
    return None


def test_a_lingering_lone_task_arms_the_started_timer_only_when_its_linger_ends_without_the_result():
    """A lone short task's result rides back in its submit reply: its "started" note must not wake the
    node's timer thread (it cost ~10 % of a lone task's node CPU, #15).  A task slower than the linger
    still gets its note, STARTED_DELAY after it started."""
    from pydist.sessions import STARTED_DELAY, Sessions

    lock, stopping = threading.RLock(), threading.Event()
    s = Sessions(lock, stopping, lease=60.0)
    try:
        with lock:
            c = s.get("c1")
            slot = c.reserve("t1")
            assert c.reserve("t1") is None, "one id, two lingering calls"
            s.note_started("c1", "t1")          # placed on a worker while its submit_wait lingers
            assert not s.timer.due, "the timer was armed for a task whose linger is still open"
            c.deliver([("t1", wire.OK, b"r")])   # its result arrives: to the slot, not the inbox
            assert c.linger("t1", slot, time.monotonic() + 1.0, stopping) == [("t1", wire.OK, b"r")]
            assert not c.results and not c.started and not s.timer.due and "t1" not in c.lingers
            # the next lone task is slower than its linger: its note is due STARTED_DELAY after it started
            slot = c.reserve("t2")
            s.note_started("c1", "t2")
            since = time.monotonic()
            assert not s.timer.due
            assert c.linger("t2", slot, time.monotonic() + 0.002, stopping) == []
            assert c.started == ["t2"] and len(s.timer.due) == 1, "the linger ended: the timer is owed"
        woke = _note_due(c, lock, since, 5.0)
        assert woke is not None, "the started note of a task slower than its linger never came"
        assert woke - since >= STARTED_DELAY * 0.9
        with lock:
            assert c.wait(time.monotonic(), stopping) == ([], ["t2"])
    finally:
        stopping.set()

