"""The task ledger on plain data (pydist/ledger.py): the transition table, re-sent ids, derived credit."""
import itertools

import pytest

from pydist import wire
from pydist.ledger import TRANSITIONS, InvalidTransition, Ledger, State, advance, id_hash, valid_runtime

pytestmark = pytest.mark.timeout(30)

W = ("w", 0, 1)
L1 = ("l", "child", 11)
L2 = ("l", "child", 22)


def task(tid, payload=b"p", fn="f"):
    return (tid, fn, payload, None, 0, [], 0, "c")


def ok(tid, value=b"v"):
    return (tid, wire.OK, value, "n", 0, 0.1)


def test_transition_table_is_exactly_the_documented_one():
    allowed = {(a, b) for a, bs in TRANSITIONS.items() for b in bs}
    assert allowed == {
        (State.QUEUED, State.PLACED), (State.QUEUED, State.CANCELLED), (State.QUEUED, State.DONE),
        (State.QUEUED, State.FAILED),
        (State.PLACED, State.QUEUED), (State.PLACED, State.DONE), (State.PLACED, State.FAILED),
        (State.PLACED, State.CANCELLED),
        (State.CANCELLED, State.PLACED), (State.CANCELLED, State.DONE), (State.CANCELLED, State.FAILED)}
    for a, b in itertools.product(State, State):
        if (a, b) in allowed:
            assert advance(a, b) is b
        else:
            with pytest.raises(InvalidTransition):
                advance(a, b)


def test_result_accepted_only_from_the_current_location():
    lg = Ledger()
    verdict, t = lg.add(task("a"), ("c", "c1"))
    assert verdict == "new"
    lg.enqueue(t)
    (t,) = lg.take_queued(10)
    lg.place(t, L1)
    assert lg.count_at(L1) == 1
    assert lg.finish(ok("a"), L2) == (t, "stale")            # another epoch of the same link
    assert lg.finish(ok("a"), W) == (t, "stale")
    assert lg.stale == 2 and "a" in lg.tasks
    assert lg.finish(ok("a"), L1) == (t, "deliver")
    assert t.state is State.DONE and not lg.tasks and lg.count_at(L1) == 0
    assert lg.finish(ok("a"), L1) == (None, "unknown")


def test_resent_id_revives_a_cancelled_copy():
    """Bug 1: a child holding a cancelled copy of a task gets it again over a new epoch."""
    lg = Ledger()
    _, t = lg.add(task("a"), ("l", "parent", 1))
    lg.enqueue(t)
    lg.place(lg.take_queued(1)[0], W)
    assert [x for x, _ in lg.drop_origin(("l", "parent", 1))] == [t]   # the parent link was lost
    assert t.state is State.CANCELLED and lg.count_at(W) == 1       # its worker still runs it
    verdict, t2 = lg.add(task("a"), ("l", "parent", 2))
    assert (verdict, t2) == ("adopted", t)
    assert t.state is State.PLACED and t.origin == ("l", "parent", 2) and t.location == W
    assert lg.finish(ok("a"), W) == (t, "deliver")


def test_resent_id_reuses_the_result_of_a_finished_cancelled_copy():
    lg = Ledger()
    _, t = lg.add(task("a"), ("l", "parent", 1))
    lg.enqueue(t)
    lg.place(lg.take_queued(1)[0], W)
    lg.drop_origin(("l", "parent", 1))
    assert lg.finish(ok("a", b"R"), W) == (t, "orphan")
    assert not lg.tasks and "a" in lg.orphans
    verdict, res = lg.add(task("a"), ("l", "parent", 2))
    assert verdict == "reuse" and res[wire.R_BLOB] == b"R"
    assert not lg.orphans


def test_duplicates_adoption_and_collisions():
    lg = Ledger()
    _, t = lg.add(task("a"), ("c", "c1"))
    assert lg.add(task("a"), ("c", "c1")) == ("duplicate", t)          # a resend: idempotent
    verdict, why = lg.add(task("a"), ("c", "c2"))                       # another client, same id
    assert verdict == "collision" and "collides" in why
    verdict, why = lg.add(task("a", payload=b"other"), ("c", "c1"))     # same client, other task
    assert verdict == "collision"
    # the client's old entry node forwards its copy too: the client (which failed over) keeps it
    assert lg.add(task("a"), ("l", "x", 5)) == ("duplicate", t)
    assert t.origin == ("c", "c1")
    # a copy from one link re-sent over a new epoch, or re-routed by another node: adopted
    _, u = lg.add(task("b"), ("l", "x", 1))
    assert lg.add(task("b"), ("l", "x", 2)) == ("adopted", u)
    assert lg.add(task("b"), ("l", "y", 7)) == ("adopted", u) and u.origin == ("l", "y", 7)
    # a client that failed over to us resubmits a task we hold for a lost link: it is the client's now
    assert lg.add(task("b"), ("c", "c1")) == ("adopted", u) and u.origin == ("c", "c1")
    assert lg.digest_from(("l", "y", 7)) == (0, 0)
    assert lg.digest_from(("c", "c1")) == (2, id_hash("a") ^ id_hash("b"))


def test_location_lost_requeues_in_order_and_drops_cancelled():
    lg = Ledger()
    ts = []
    for i in range(4):
        _, t = lg.add(task(f"t{i}"), ("c", "c1"))
        lg.enqueue(t)
        ts.append(t)
    taken = lg.take_queued(10)
    for t in taken:
        lg.place(t, L1)
    assert lg.cancel(ts[1]) == L1 and ts[1].state is State.CANCELLED
    assert lg.count_at(L1) == 4                                   # a cancelled copy still uses credit
    requeued, gone = lg.unplace(L1)
    assert [t.id for t in requeued] == ["t0", "t2", "t3"] and [t.id for t in gone] == ["t1"]
    assert lg.count_at(L1) == 0 and "t1" not in lg.tasks
    assert [t.id for t in lg.take_queued(10)] == ["t0", "t2", "t3"]


def test_credit_is_derived_and_cannot_leak():
    """Bug 2: whatever happens to the tasks at a link, its count is the number of records there."""
    lg = Ledger()
    for i in range(50):
        _, t = lg.add(task(f"t{i}"), ("c", "c1"))
        lg.enqueue(t)
    for t in lg.take_queued(50):
        lg.place(t, L1)
    lg.drop_origin(("c", "c1"))                                   # the client vanished
    assert lg.count_at(L1) == 50
    for i in range(0, 50, 2):                                      # the child reports what it ran
        lg.finish((f"t{i}", wire.CANCELLED, b"", "child", -1, 0.0), L1)
    assert lg.count_at(L1) == 25
    lg.unplace(L1)                                                # the rest: the link was lost
    assert lg.count_at(L1) == 0 and not lg.tasks
    assert lg.digest_at(L1) == (0, 0)


def test_cancelled_status_for_a_wanted_task_requeues_it():
    lg = Ledger()
    _, t = lg.add(task("a"), ("c", "c1"))
    lg.enqueue(t)
    lg.place(lg.take_queued(1)[0], L1)
    assert lg.finish(("a", wire.CANCELLED, b"", "child", -1, 0.0), L1) == (t, "requeued")
    assert t.state is State.QUEUED and t.location is None and lg.take_queued(1) == [t]


def test_digest_tracks_every_transition():
    lg = Ledger()
    ids = [f"x{i}" for i in range(20)]
    for tid in ids:
        _, t = lg.add(task(tid), ("c", "c1"))
        lg.enqueue(t)
    for t in lg.take_queued(20):
        lg.place(t, L1)
    d = 0
    for tid in ids:
        d ^= id_hash(tid)
    assert lg.digest_at(L1) == (20, d)
    lg.finish(ok("x3"), L1)
    assert lg.digest_at(L1) == (19, d ^ id_hash("x3"))
    assert id_hash("x3") == id_hash("x3") and id_hash("x3") != id_hash("x4")


def test_on_leave_runs_once_per_record():
    lg = Ledger()
    left = []
    lg.on_leave = left.append
    for tid in "abc":
        _, t = lg.add(task(tid), ("c", "c1"))
        lg.enqueue(t)
    a, b, c = lg.take_queued(3)
    lg.place(b, W)
    lg.place(c, W)
    lg.cancel(a)                       # queued: leaves
    lg.finish(ok("b"), W)              # done: leaves
    lg.cancel(c)
    lg.unplace(W)                      # cancelled at a lost location: leaves
    assert [t.id for t in left] == ["a", "b", "c"]


def test_valid_runtime():
    assert valid_runtime(0.5) == 0.5 and valid_runtime(0) == 0.0
    for bad in (float("nan"), float("inf"), -0.1, None, True, "1"):
        assert valid_runtime(bad) is None


def test_an_id_queued_twice_is_taken_once():
    lg = Ledger()
    _, t = lg.add(task("a"), ("c", "c1"))
    lg.enqueue(t)
    lg.enqueue(t)
    assert lg.take_queued(10) == [t]
    lg.place(t, W)
    assert lg.take_queued(10) == []


def test_withdraw_only_from_the_tasks_location_and_the_record_leaves():
    """A location that says it dropped a copy before it started: PLACED (or already CANCELLED) ->
    CANCELLED, the record leaves, its credit is freed, the head of the location moves on."""
    lg = Ledger()
    left = []
    lg.on_leave = left.append
    for tid in "abc":
        _, t = lg.add(task(tid), ("c", "c1"))
        lg.enqueue(t)
    a, b, c = lg.take_queued(3)
    for t in (a, b, c):
        lg.place(t, W)
    assert lg.first_at(W) == "a" and lg.count_at(W) == 3
    assert lg.withdraw(b, L1) is False and b.state is State.PLACED   # not its location: nothing changes
    assert lg.withdraw(b, W) is True
    assert b.state is State.CANCELLED and "b" not in lg.tasks and left == [b]
    assert lg.withdraw(b, W) is False                               # once
    assert lg.count_at(W) == 2 and lg.first_at(W) == "a"
    assert lg.cancel(a) == W and a.state is State.CANCELLED          # nobody wants it: it stays there ...
    assert lg.withdraw(a, W) is True and "a" not in lg.tasks         # ... until its location drops it
    assert lg.first_at(W) == "c" and lg.counts["withdrawn"] == 2
    assert lg.finish(ok("c"), W) == (c, "deliver")
    assert lg.first_at(W) is None and lg.digest_at(W) == (0, 0) and not lg.tasks
