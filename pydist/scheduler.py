"""Pure placement policy: which task goes to which local worker or linked node.

No sockets, no threads, no Pyro5: functions over plain data, unit-tested on their own.

Vocabulary
    *slot*    a place tasks can be sent: one local worker process, or one link to another node.
    *credit*  how many more tasks a slot may hold right now (capacity - in flight).  A node never
              sends a slot more than its credit, so one node cannot hoard a queue that others could run.
    *window*  tasks kept in flight per worker: 1 for long tasks (perfect balance), more for tiny tasks
              (so pipes and round trips are hidden and batches form); derived from measured runtimes.
    *hops*    node-to-node forwards a task has made; *path* the names of the nodes it visited.  A task is
              never sent to a node on its path nor beyond ``max_hops``: any topology, cycles included,
              is safe.

Task state is one explicit machine (``TaskState`` + ``TRANSITIONS``); the node moves tasks only through
``advance`` so every transition is checked in one place.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple


class TaskState(enum.Enum):
    """Life of a task inside one node."""

    QUEUED = "queued"        # waiting in this node's queue
    SENT = "sent"            # handed to a local worker or a linked node
    DONE = "done"            # result (or error) produced and passed back toward its origin
    LOST = "lost"            # its worker or node died; it will be QUEUED again or failed
    CANCELLED = "cancelled"  # the client cancelled it before it ran


TRANSITIONS: Dict[TaskState, frozenset] = {
    TaskState.QUEUED: frozenset({TaskState.SENT, TaskState.CANCELLED, TaskState.DONE}),
    TaskState.SENT: frozenset({TaskState.DONE, TaskState.LOST, TaskState.CANCELLED}),
    TaskState.LOST: frozenset({TaskState.QUEUED, TaskState.DONE}),
    TaskState.DONE: frozenset(),
    TaskState.CANCELLED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A task was asked to move between states that are not linked in TRANSITIONS."""


def advance(current: TaskState, new: TaskState) -> TaskState:
    """Return ``new`` if ``current -> new`` is a legal transition, else raise InvalidTransition."""
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"task cannot go from {current.value} to {new.value}")
    return new


# -- windows ------------------------------------------------------------------------------------------
LONG_TASK = 0.020        # s: tasks at least this long get window 1 (no prefetch: perfect balance)
BATCH_TIME = 0.005       # s: for short tasks keep about this much work in flight per worker
MAX_WINDOW = 256


def window(avg_runtime: Optional[float]) -> int:
    """Tasks to keep in flight per worker, from the mean measured runtime (None: not yet known)."""
    if avg_runtime is None or avg_runtime >= LONG_TASK:
        return 1
    return max(2, min(MAX_WINDOW, math.ceil(BATCH_TIME / max(avg_runtime, 1e-6))))


SPARE_LIMIT = 0.1  # s: tasks shorter than this get one spare per worker behind a link


def link_capacity(workers: int, win: int, avg_runtime: Optional[float] = None) -> int:
    """Capacity granted to a linked node with ``workers`` workers behind it: their windows, plus one
    spare task per worker when tasks are known to be shorter than ``SPARE_LIMIT``, so that the refill
    of a worker deep in a tree (a result up to here, the next task down) travels while the spare runs.

    Never anything extra for unknown or long tasks (a slow node must not hoard work that others could
    run; a long task's round trip is a small share of it anyway), and the spare is per *worker*, not
    per link: capacities then add up level by level (a node's grant covers the windows and spares it
    grants its own children).  A spare per link did not: a node with 8 children received 1 spare and
    had to give out 8, so the proportional share starved whole subtrees while tasks waited beside
    them (the scale model, ``benchmarks/simulate.py``: 30-50 ms tasks on 300 nodes, fan-out 8, kept
    75 % of the workers busy; with spares per worker 99 %).  The imbalance a spare can cause at the
    end of a map is at most one task (< ``SPARE_LIMIT``) per worker."""
    if workers <= 0:
        return 0
    base = workers * win
    if avg_runtime is not None and avg_runtime < SPARE_LIMIT:
        return base + workers
    return base


# -- placement ----------------------------------------------------------------------------------------
@dataclass
class Slot:
    """A place tasks can go.  ``node`` is the linked node's name (None for a local worker)."""

    key: Tuple
    credit: int
    capacity: int
    node: Optional[str] = None


def eligible(slot: Slot, hops: int, path: Sequence[str], max_hops: int) -> bool:
    """May a task with this ``hops``/``path`` go to ``slot``?"""
    if slot.node is None:
        return True
    return hops < max_hops and slot.node not in path


def place(tasks: Sequence[Tuple[int, Sequence[str]]], slots: List[Slot], max_hops: int) -> Dict[Tuple, List[int]]:
    """Assign tasks (given as ``(hops, path)`` in queue order) to slots.

    Returns ``{slot.key: [task indexes]}``; tasks not in the answer stay queued.  A run of tasks that
    may go to the same slots (same hops and path: typically a whole client batch) is shared out in one
    step, in proportion to each eligible slot's free credit; what is left over after the proportional
    shares goes one task at a time to the slot with the largest share of free credit (ties: local
    workers first, then list order), so a lone task runs locally.  Never exceeds any slot's credit;
    never violates hops or path; leaves a task queued only if no eligible slot has credit left.
    """
    free = {s.key: s.credit for s in slots if s.credit > 0}
    out: Dict[Tuple, List[int]] = {}
    if not free:
        return out
    live = [s for s in slots if s.credit > 0]
    n = len(tasks)
    i = 0
    while i < n and any(free.values()):
        hops, path = tasks[i]
        j = i + 1
        while j < n and tasks[j][0] == hops and tasks[j][1] == path:
            j += 1
        ok = [s for s in live if free[s.key] > 0 and eligible(s, hops, path, max_hops)]
        if ok:
            _share(list(range(i, j)), ok, free, out)
        i = j
    return out


def _share(idxs: List[int], ok: List[Slot], free: Dict[Tuple, int], out: Dict[Tuple, List[int]]) -> None:
    """Give the tasks ``idxs`` to the eligible slots ``ok``: proportional shares, then the remainder by
    the largest free fraction."""
    k = len(idxs)
    total = sum(free[s.key] for s in ok)
    pos = 0
    if k >= total:   # enough work for every free credit
        for s in ok:
            c = free[s.key]
            out.setdefault(s.key, []).extend(idxs[pos:pos + c])
            pos += c
            free[s.key] = 0
        return
    for s in ok:
        c = k * free[s.key] // total
        if c:
            out.setdefault(s.key, []).extend(idxs[pos:pos + c])
            pos += c
            free[s.key] -= c
    while pos < k:
        best, best_score = None, -1.0
        for s in ok:
            c = free[s.key]
            if c <= 0:
                continue
            score = c / s.capacity if s.capacity > 0 else 0.0
            if s.node is None:
                score += 1e-9  # prefer local on ties
            if score > best_score:
                best, best_score = s, score
        if best is None:
            return
        out.setdefault(best.key, []).append(idxs[pos])
        free[best.key] -= 1
        pos += 1


def forward_path(path: Iterable[str], hops: int, here: str) -> Tuple[int, list]:
    """The hops and path a task carries when this node (``here``) forwards it."""
    p = list(path)
    if here not in p:
        p.append(here)
    return hops + 1, p


class RuntimeAverage:
    """Exponentially weighted mean of task runtimes (seconds)."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.value: Optional[float] = None

    def add(self, x: float) -> None:
        """Fold one measurement in."""
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x
