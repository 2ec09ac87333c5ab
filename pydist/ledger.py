"""The task ledger of a node: one record per task, one state, one transition table (pure).

No threads, no sockets, no Pyro5: the node calls it under its one lock.  For every task the node holds
the ledger knows

* ``state``    one of ``State``; every change goes through ``TRANSITIONS`` (``Task.move``);
* ``origin``   where it came from and where its result goes: ``("c", client_id)`` or
               ``("l", link_name, epoch)``;
* ``location`` where it is now: ``None`` (queued here), ``("w", index, generation)`` (a local worker
               process) or ``("l", link_name, epoch)`` (another node, over one epoch of a link).

::

                 place                      result from the task's location
    QUEUED ───────────────▶ PLACED ─────────────────────────────────────▶ DONE | FAILED (record leaves)
      ▲ │                   │  ▲ │ │
      │ │ cancel            │  │ │ └─ withdrawn: its location confirms the copy never started
      │ ▼                   │  │ │    ─▶ CANCELLED (record leaves; ``withdraw``)
      │ CANCELLED (leaves)  │  │ │ cancel (origin gone: the copy runs on, its result is kept aside)
      │                     │  │ ▼
      │                     │  CANCELLED ── result ──▶ kept in ``orphans`` for a re-send (record leaves)
      └── location lost ────┘      │ └── re-sent id: revived, the running copy's result will be used
          or its copy dropped      └── location lost, or its copy dropped: record leaves
          while still wanted

What the ledger guarantees:

* A result is accepted only from the task's current location (``finish``); anything else is counted
  in ``stale`` and reported back to the caller, never silently dropped.
* A re-sent id never hits a stale record (``add``): a cancelled record is revived, a finished copy's
  result is reused, a live copy from the same origin is a duplicate (idempotent), and the same id from
  another client (or with other contents) is a collision: an error to the submitter.
* Credit is derived: how many tasks are at a link or a worker is the size of an index kept by the
  same transitions (``count_at``), never a separate counter.  Each index also keeps a digest (XOR of a
  64-bit hash per id), so reconciliation compares two numbers before it compares two id lists.
"""
from __future__ import annotations

import collections
import enum
import hashlib
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from . import wire


class State(enum.Enum):
    """Life of a task inside one node."""

    QUEUED = "queued"        # waiting here for a slot
    PLACED = "placed"        # handed to a local worker or a linked node (its location)
    DONE = "done"            # a result came back from its location (the record leaves the ledger)
    FAILED = "failed"        # it failed here: worker lost, bundle missing, id collision (record leaves)
    CANCELLED = "cancelled"  # nobody wants its result any more (a copy may still run at its location)


TRANSITIONS: Dict[State, frozenset] = {
    State.QUEUED: frozenset({State.PLACED, State.CANCELLED, State.DONE, State.FAILED}),
    State.PLACED: frozenset({State.QUEUED, State.DONE, State.FAILED, State.CANCELLED}),
    State.CANCELLED: frozenset({State.PLACED, State.DONE, State.FAILED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A task was asked to move between states that are not linked in TRANSITIONS."""


def advance(current: State, new: State) -> State:
    """Return ``new`` if ``current -> new`` is a legal transition, else raise InvalidTransition."""
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"task cannot go from {current.value} to {new.value}")
    return new


def id_hash(tid: str) -> int:
    """A 64-bit hash of a task id, the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(tid.encode(), digest_size=8).digest(), "little")


def valid_runtime(x) -> Optional[float]:
    """A runtime as reported by a worker or a linked node: a finite non-negative float, else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        return None
    return float(x)


class Task:
    """One task held by a node (see the module docstring)."""

    __slots__ = ("id", "h", "rec", "state", "origin", "location", "retries", "attempts")

    def __init__(self, rec: tuple, origin: tuple, retries: int = 0):
        self.id: str = rec[wire.T_ID]
        self.h = 0                     # its id_hash, computed when a digest first needs it (#15)
        self.rec = rec
        self.state = State.QUEUED
        self.origin = origin
        self.location: Optional[tuple] = None
        self.retries = retries        # re-runs left after a worker death
        self.attempts: List[str] = []  # "node N worker W exit code C" for each lost attempt

    def move(self, new: State) -> None:
        """Change state through the one transition table."""
        self.state = advance(self.state, new)

    @property
    def cancelled(self) -> bool:
        """Nobody wants its result any more."""
        return self.state is State.CANCELLED

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.state.value} from {self.origin} at {self.location}>"


class _Index:
    """Ids of one origin or location, in insertion order (their XOR digest is computed when asked for:
    hashing every id on its way in and out cost more than the rare digests, #15)."""

    __slots__ = ("ids",)

    def __init__(self) -> None:
        self.ids: Dict[str, None] = {}   # (a dict keeps insertion order)

    def add(self, tid: str) -> None:
        self.ids[tid] = None

    def remove(self, tid: str) -> None:
        self.ids.pop(tid, None)


def _key(where: tuple) -> tuple:
    """Index key of an origin or location: a link's epoch is part of it, a worker's generation too."""
    return tuple(where)


class Ledger:
    """Every task of one node, its queue, its indexes by origin and location, and results kept aside."""

    ORPHANS_MAX = 4096            # finished results nobody wanted yet, kept for a re-send
    ORPHAN_BYTES_MAX = 64 << 20

    def __init__(self) -> None:
        self.tasks: Dict[str, Task] = {}
        self.queue: "collections.deque[str]" = collections.deque()
        self._by_origin: Dict[tuple, _Index] = {}
        self._by_location: Dict[tuple, _Index] = {}
        self.orphans: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()
        self._orphan_bytes = 0
        self.stale = 0            # results that came from somewhere other than the task's location
        self.counts: "collections.Counter[str]" = collections.Counter()
        self.on_leave: Optional[Callable[[Task], None]] = None   # called with each Task whose record leaves
                                                                 # (the node unpins its code)

    # ------------------------------------------------------------------------------------ indexes
    def _index(self, table: Dict[tuple, _Index], key: tuple) -> _Index:
        ix = table.get(key)
        if ix is None:
            ix = table[key] = _Index()
        return ix

    def _unindex(self, table: Dict[tuple, _Index], key: Optional[tuple], t: Task) -> None:
        if key is None:
            return
        ix = table.get(_key(key))
        if ix is not None:
            ix.remove(t.id)
            if not ix.ids:
                del table[_key(key)]

    def _set_location(self, t: Task, loc: Optional[tuple]) -> None:
        self._unindex(self._by_location, t.location, t)
        t.location = loc
        if loc is not None:
            self._index(self._by_location, _key(loc)).add(t.id)

    def _set_origin(self, t: Task, origin: tuple) -> None:
        self._unindex(self._by_origin, t.origin, t)
        t.origin = origin
        self._index(self._by_origin, _key(origin)).add(t.id)

    def _remove(self, t: Task) -> None:
        self._unindex(self._by_location, t.location, t)
        self._unindex(self._by_origin, t.origin, t)
        if self.tasks.pop(t.id, None) is not None and self.on_leave is not None:
            self.on_leave(t)

    def count_at(self, location: tuple) -> int:
        """Tasks at a location (credit used): ``("w", i, gen)`` or ``("l", name, epoch)``."""
        ix = self._by_location.get(_key(location))
        return len(ix.ids) if ix is not None else 0

    def ids_at(self, location: tuple) -> List[str]:
        ix = self._by_location.get(_key(location))
        return list(ix.ids) if ix is not None else []

    def first_at(self, location: tuple) -> Optional[str]:
        """The id placed at a location first (of those still there): what a worker runs now."""
        ix = self._by_location.get(_key(location))
        return next(iter(ix.ids), None) if ix is not None else None

    def _digest(self, ix: Optional[_Index]) -> Tuple[int, int]:
        """``(count, XOR of id_hash)`` of an index's ids (each task's hash computed once, then kept)."""
        if ix is None:
            return 0, 0
        d = 0
        tasks = self.tasks
        for tid in ix.ids:
            t = tasks.get(tid)
            if t is None:
                d ^= id_hash(tid)
                continue
            h = t.h
            if not h:
                h = t.h = id_hash(tid)
            d ^= h
        return len(ix.ids), d

    def digest_at(self, location: tuple) -> Tuple[int, int]:
        """``(count, digest)`` of the ids at a location."""
        return self._digest(self._by_location.get(_key(location)))

    def ids_from(self, origin: tuple) -> List[str]:
        ix = self._by_origin.get(_key(origin))
        return list(ix.ids) if ix is not None else []

    def digest_from(self, origin: tuple) -> Tuple[int, int]:
        """``(count, digest)`` of the ids that came from an origin."""
        return self._digest(self._by_origin.get(_key(origin)))

    def locations(self) -> List[tuple]:
        return list(self._by_location)

    def origins(self) -> List[tuple]:
        return list(self._by_origin)

    # ------------------------------------------------------------------------------------ arrival
    def add(self, rec: tuple, origin: tuple, retries: int = 0) -> Tuple[str, Any]:
        """A task arrives from ``origin``.  Returns ``(verdict, detail)``:

        ``("new", task)``         queue it (the caller checks its bundle and calls ``enqueue``);
        ``("duplicate", task)``   the same task from the same origin: already held, nothing to do;
        ``("adopted", task)``     held, from an older epoch of the same link (or a revived cancelled copy):
                                  its result now goes to ``origin``; nothing else to do;
        ``("reuse", result)``     a copy finished while nobody wanted it: send this result to ``origin``;
        ``("collision", text)``   the id is taken by another task: fail it at the submitter.
        """
        tid = rec[wire.T_ID]
        t = self.tasks.get(tid)
        if t is None:
            kept = self.orphans.pop(tid, None)
            if kept is not None:
                self._orphan_bytes -= len(kept[wire.R_BLOB])
                self.counts["reused"] += 1
                return "reuse", kept
            t = Task(rec, origin, retries)
            self.tasks[tid] = t
            self._index(self._by_origin, _key(origin)).add(tid)
            return "new", t
        same_contents = t.rec[wire.T_FN] == rec[wire.T_FN] and t.rec[wire.T_PAYLOAD] == rec[wire.T_PAYLOAD]
        if not same_contents or (t.origin[0] == origin[0] == "c" and t.origin[1] != origin[1]):
            self.counts["collisions"] += 1
            return "collision", (f"task id {tid} collides with another task this node holds "
                                 f"(from {_describe(t.origin)}); task ids must be unique per client")
        if t.origin[0] == "c" and origin[0] == "l" and t.state is not State.CANCELLED:
            # a client that failed over to us resubmitted it, and its old entry node forwards its own
            # copy too: the client keeps it (the old entry drops its copy when the client's lease ends)
            self.counts["duplicates"] += 1
            return "duplicate", t
        if t.state is State.CANCELLED:
            self._set_origin(t, origin)
            t.move(State.PLACED)
            self.counts["revived"] += 1
            return "adopted", t
        if tuple(t.origin) != tuple(origin):
            self._set_origin(t, origin)
            self.counts["adopted"] += 1
            return "adopted", t
        return "duplicate", t

    def enqueue(self, t: Task, front: bool = False) -> None:
        """Put a QUEUED task in the queue (after its bundle is here)."""
        if front:
            self.queue.appendleft(t.id)
        else:
            self.queue.append(t.id)

    # ------------------------------------------------------------------------------------ placement
    def take_queued(self, limit: int) -> List[Task]:
        """Up to ``limit`` queued tasks in queue order, removed from the queue (skips cancelled ids)."""
        out: List[Task] = []
        seen = set()
        q = self.queue
        while q and len(out) < limit:
            tid = q.popleft()
            t = self.tasks.get(tid)
            if t is not None and t.state is State.QUEUED and t.location is None and tid not in seen:
                seen.add(tid)   # (an id queued twice, e.g. re-sent after a cancel, is taken once)
                out.append(t)
        return out

    def requeue_front(self, tasks: List[Task]) -> None:
        """Tasks taken but not placed go back to the head of the queue, in order."""
        self.queue.extendleft(reversed([t.id for t in tasks]))

    def place(self, t: Task, location: tuple) -> None:
        """QUEUED -> PLACED at ``location``."""
        t.move(State.PLACED)
        self._set_location(t, location)

    # ------------------------------------------------------------------------------------ results
    def finish(self, result: tuple, source: Optional[tuple]) -> Tuple[Optional[Task], str]:
        """A result for a task arrives from ``source`` (a location, or None: decided here).  Returns
        ``(task, verdict)``: ``"deliver"`` (send ``result`` to ``task.origin``), ``"orphan"`` (the task
        was cancelled: kept aside for a re-send), ``"stale"`` (not from its location: ignored, counted),
        ``"unknown"`` (no such task here), ``"requeued"`` (its location dropped a copy we still want)."""
        tid = result[wire.R_ID]
        t = self.tasks.get(tid)
        if t is None:
            if source is not None:
                self.stale += 1
            return None, "unknown"
        if source is not None and (t.location is None or tuple(t.location) != tuple(source)):
            self.stale += 1
            return t, "stale"
        if result[wire.R_STATUS] == wire.CANCELLED and t.state is not State.CANCELLED:
            # the other side dropped a copy we still want (a cancel crossed a re-send): run it again
            self.unplace_one(t)
            return t, "requeued"
        ok = result[wire.R_STATUS] == wire.OK
        was_cancelled = t.state is State.CANCELLED
        t.move(State.DONE if ok else State.FAILED)
        self._remove(t)
        if was_cancelled:
            if ok:
                self._keep_orphan(tid, tuple(result))
            return t, "orphan"
        return t, "deliver"

    def _keep_orphan(self, tid: str, result: tuple) -> None:
        self.orphans[tid] = result
        self._orphan_bytes += len(result[wire.R_BLOB])
        while self.orphans and (len(self.orphans) > self.ORPHANS_MAX or self._orphan_bytes > self.ORPHAN_BYTES_MAX):
            _, old = self.orphans.popitem(last=False)
            self._orphan_bytes -= len(old[wire.R_BLOB])

    def keep_result(self, result: tuple) -> None:
        """A result that could not be delivered (its link went down): kept for a re-send of its id."""
        if result[wire.R_STATUS] == wire.OK:
            self._keep_orphan(result[wire.R_ID], tuple(result))

    # ------------------------------------------------------------------------------------ cancel / loss
    def cancel(self, t: Task) -> Optional[tuple]:
        """Nobody wants ``t``'s result.  Queued: it leaves (returns None).  Placed: it stays at its
        location, CANCELLED, until its result (or the loss of its location); returns the location."""
        if t.state is State.QUEUED:
            t.move(State.CANCELLED)
            self._remove(t)
            return None
        if t.state is State.PLACED:
            t.move(State.CANCELLED)
            return t.location
        return None

    def withdraw(self, t: Task, location: tuple) -> bool:
        """``t``'s location says it dropped the copy before it started (a cancel reached it there):
        PLACED (or already CANCELLED) -> CANCELLED, and the record leaves.  Returns False (nothing
        changes) if ``t`` is not at ``location`` any more."""
        if t.location is None or tuple(t.location) != tuple(location) or t.id not in self.tasks:
            return False
        if t.state is State.PLACED:
            t.move(State.CANCELLED)
        self._remove(t)
        self.counts["withdrawn"] += 1
        return True

    def unplace(self, location: tuple) -> Tuple[List[Task], List[Task]]:
        """The location is gone (worker died, link lost or re-joined).  Live tasks there go back to
        QUEUED at the head of the queue, in order; cancelled ones leave.  Returns ``(requeued, gone)``."""
        requeued, gone = [], []
        for tid in self.ids_at(location):
            t = self.tasks[tid]
            self._set_location(t, None)
            if t.state is State.CANCELLED:
                self._remove(t)
                gone.append(t)
            else:
                t.move(State.QUEUED)
                requeued.append(t)
        self.requeue_front(requeued)
        return requeued, gone

    def unplace_one(self, t: Task, front: bool = True) -> bool:
        """One task's location is gone (reconciliation found it missing there).  Returns True if it was
        queued again, False if it left (it was cancelled)."""
        self._set_location(t, None)
        if t.state is State.CANCELLED:
            self._remove(t)
            return False
        t.move(State.QUEUED)
        self.enqueue(t, front)
        return True

    def fail_here(self, t: Task) -> None:
        """``t`` fails on this node (a FAILED result is made by the caller); the record leaves."""
        t.move(State.FAILED)
        self._remove(t)

    def drop_origin(self, origin: tuple) -> List[Tuple[Task, Optional[tuple]]]:
        """The origin is gone (client dropped, link lost): cancel all its tasks.  Returns
        ``[(task, location)]`` for those still placed somewhere (a link must be told)."""
        out = []
        for tid in self.ids_from(origin):
            t = self.tasks.get(tid)
            if t is not None and t.state is not State.CANCELLED:
                out.append((t, self.cancel(t)))
        return out

    def links_of(self, name: str) -> List[tuple]:
        """Every location key of link ``name`` (any epoch)."""
        return [k for k in self._by_location if k[0] == "l" and k[1] == name]

    def origins_of_link(self, name: str) -> List[tuple]:
        return [k for k in self._by_origin if k[0] == "l" and k[1] == name]

    def __len__(self) -> int:
        return len(self.tasks)


def _describe(origin: tuple) -> str:
    if origin[0] == "c":
        return f"client {origin[1]}"
    return f"node {origin[1]}"


def describe_ids(ids: Iterable[str], limit: int = 5) -> str:
    ids = list(ids)
    s = ", ".join(ids[:limit])
    return s + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
