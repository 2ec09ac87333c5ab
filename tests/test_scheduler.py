"""The placement policy, on plain data: no sockets, no processes."""
import pytest
from hypothesis import given, settings, strategies as st

from pydist import scheduler
from pydist.scheduler import InvalidTransition, Slot, TaskState, advance, eligible, place, window

pytestmark = pytest.mark.timeout(60)


def test_lone_task_runs_locally_when_a_worker_is_free():
    slots = [Slot(("l", "child"), 4, 4, "child"), Slot(("w", 0), 2, 2)]
    assert place([(0, [])], slots, 8) == {("w", 0): [0]}


def test_never_exceeds_credit_and_spreads_in_proportion():
    slots = [Slot(("w", 0), 10, 10), Slot(("w", 1), 10, 10), Slot(("l", "a"), 20, 20, "a")]
    out = place([(0, [])] * 100, slots, 8)
    assert len(out[("w", 0)]) == 10 and len(out[("w", 1)]) == 10 and len(out[("l", "a")]) == 20
    small = place([(0, [])] * 8, slots, 8)
    counts = {k: len(v) for k, v in small.items()}
    assert counts[("l", "a")] == 4 and counts[("w", 0)] == 2 and counts[("w", 1)] == 2


def test_path_and_hops_are_respected():
    slots = [Slot(("l", "a"), 5, 5, "a"), Slot(("l", "b"), 5, 5, "b")]
    out = place([(1, ["x", "a"]), (8, []), (0, ["b"])], slots, 8)
    assert out == {("l", "b"): [0], ("l", "a"): [2]}   # task 1 is at max hops: it stays queued


def test_no_credit_places_nothing():
    assert place([(0, [])] * 3, [Slot(("w", 0), 0, 2)], 8) == {}


def test_window_follows_task_length():
    assert window(None) == 1
    assert window(0.5) == 1 and window(scheduler.LONG_TASK) == 1
    assert window(1e-5) == scheduler.MAX_WINDOW
    assert 2 <= window(0.001) <= 10


def test_state_machine_allows_only_listed_transitions():
    assert advance(TaskState.QUEUED, TaskState.SENT) is TaskState.SENT
    assert advance(TaskState.LOST, TaskState.QUEUED) is TaskState.QUEUED
    with pytest.raises(InvalidTransition):
        advance(TaskState.DONE, TaskState.QUEUED)
    with pytest.raises(InvalidTransition):
        advance(TaskState.QUEUED, TaskState.LOST)
    for state, targets in scheduler.TRANSITIONS.items():
        assert all(isinstance(t, TaskState) for t in targets)


def test_forward_path_appends_this_node_once():
    assert scheduler.forward_path(["a"], 1, "b") == (2, ["a", "b"])
    assert scheduler.forward_path(["a", "b"], 2, "b") == (3, ["a", "b"])


names = st.sampled_from(["a", "b", "c", "d", "e"])
slot_st = st.one_of(
    st.builds(lambda i, c, cap: Slot(("w", i), c, max(cap, 1)), st.integers(0, 3), st.integers(-2, 6), st.integers(1, 6)),
    st.builds(lambda n, c, cap: Slot(("l", n), c, max(cap, 1), n), names, st.integers(-2, 10), st.integers(1, 10)),
)
task_st = st.tuples(st.integers(0, 10), st.lists(names, max_size=4, unique=True))


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(task_st, max_size=40), st.lists(slot_st, max_size=6, unique_by=lambda s: s.key),
       st.integers(1, 9))
def test_property_no_placement_violates_hops_path_or_credit(tasks, slots, max_hops):
    out = place(tasks, slots, max_hops)
    by_key = {s.key: s for s in slots}
    seen = set()
    for key, idxs in out.items():
        s = by_key[key]
        assert len(idxs) <= max(0, s.credit)
        for i in idxs:
            assert i not in seen          # each task placed at most once
            seen.add(i)
            hops, path = tasks[i]
            assert eligible(s, hops, path, max_hops)
            if s.node is not None:
                assert hops < max_hops and s.node not in path


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(task_st, min_size=1, max_size=30), st.lists(slot_st, min_size=1, max_size=6, unique_by=lambda s: s.key))
def test_property_work_conserving(tasks, slots):
    """A task is left unplaced only if no eligible slot has credit left."""
    out = place(tasks, slots, 8)
    used = {k: len(v) for k, v in out.items()}
    placed = {i for v in out.values() for i in v}
    for i, (hops, path) in enumerate(tasks):
        if i in placed:
            continue
        for s in slots:
            if eligible(s, hops, path, 8):
                assert used.get(s.key, 0) >= s.credit


def test_link_capacity_never_hoards_unknown_or_long_tasks():
    assert scheduler.link_capacity(4, 1, None) == 4
    assert scheduler.link_capacity(4, 1, 0.5) == 4
    assert scheduler.link_capacity(4, 1, 0.05) == 8     # known and short: a spare per worker
    assert scheduler.link_capacity(0, 5, 0.001) == 0


def test_link_capacity_covers_a_round_trip_per_worker_for_short_tasks():
    # short tasks: every worker behind the link gets one spare beyond its window, so a subtree deep
    # in the tree is not starved while the refill travels up and down (benchmarks/simulate.py)
    win = window(0.010)
    assert scheduler.link_capacity(8, win, 0.010) == 8 * win + 8
    assert scheduler.link_capacity(1, win, 0.010) == win + 1


def test_link_capacities_add_up_level_by_level():
    # what a node is granted covers what it grants its children plus its own workers' windows, at
    # every depth, so no subtree is starved by the proportional share (the old spare per link did not)
    for avg in (None, 0.001, 0.010, 0.050, 0.5):
        win = window(avg)
        children = [1, 2, 4, 4, 1, 2, 8, 1]
        own = 2
        granted = scheduler.link_capacity(own + sum(children), win, avg)
        needed = own * win + sum(scheduler.link_capacity(w, win, avg) for w in children)
        assert granted >= needed, avg
