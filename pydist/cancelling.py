"""Cancellation that reaches a task wherever it waits (mixed into ``Node``, beside ``Dispatch``).

::

    client ── cancel(ids) ──▶ Node.cancel ──▶ withdraw(tasks, wait)
                                 │  QUEUED here ───────────────────────────▶ leaves at once: withdrawn
                                 │  in a link's outbox (not yet sent) ─────▶ taken back: withdrawn
                                 │  PLACED at worker i ── ("cancel", req, ids) ──▶ worker's intake thread
                                 │        ◀── ("dropped", req, ids it dropped) ◀── (drops what it queues)
                                 │  PLACED at child node ── withdraw_forwarded(ids, wait/2) ──▶ the same,
                                 │        ◀── ids it withdrew ◀─────────────── one level down
                                 └─ waits at most ``wait`` s for the answers (lock released meanwhile)

A node sends work ahead of need (the scheduler's window for short tasks, a link's credit), so a task
"placed" is often still waiting: in a pipe, in a worker's local queue, in a child's queue.  ``withdraw``
asks each location, with a short bounded wait, to drop the tasks that have not started; the location
decides (a worker under its queue's lock, so a task either started or never will), the answer decides
the ledger:

* dropped while the asker still waits: ``Ledger.withdraw`` (the record leaves; the caller reports the
  id as withdrawn, so the client's ``cancel()`` returns True);
* dropped after the asker stopped waiting (it already answered "not withdrawn": the client marked the
  future running): the task is still wanted, so it goes back to the queue and runs (``unplace_one``);
* not dropped (it started, or finished): it runs to the end, its result is delivered as usual.

The first task at a worker (``Ledger.first_at``) is never asked about: it is what the worker runs now
or next, and its client was told it started (``note_head``).  So a future the client saw running
stays running, and ``shutdown(cancel_futures=True)`` leaves each worker's current task alone, as
``ProcessPoolExecutor`` leaves the calls it has handed to its processes.

``cancel_tasks`` is the other kind: nobody wants the results any more (a client went away, a link
was lost, reconciliation found tasks nobody waits for).  It answers nobody, so it does not wait: queued
tasks leave, placed ones are marked cancelled where they are, and the locations are asked to drop them
anyway (a worker or child then frees the slot instead of running work nobody wants).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Dict, List, Optional, Set, Tuple

from . import wire
from .ledger import State, Task
from .nodeparts import NodeParts

log = logging.getLogger("pydist.node")

#: s a cancel waits for a worker or a child node to say whether it dropped a task it had been sent
#: (answers take well under a millisecond on a worker: its intake thread does not wait for tasks)
WITHDRAW_WAIT = 1.0


class Withdrawal:
    """One question to one location: "drop these tasks if they have not started"."""

    __slots__ = ("req", "loc", "ids", "gone", "answered")

    def __init__(self, req: int, loc: tuple, ids: List[str]):
        self.req = req
        self.loc = loc
        self.ids = set(ids)
        self.gone: Set[str] = set()
        self.answered = threading.Event()


class Cancelling(NodeParts):
    """The node's cancel path (see the module docstring).  Caller holds ``lock`` unless noted."""

    def init_cancelling(self) -> None:
        self._withdrawals: Dict[int, Withdrawal] = {}
        self._withdraw_seq = itertools.count(1)

    # ------------------------------------------------------------------------- with an answer
    def withdraw(self, ts: List[Task], wait: float = WITHDRAW_WAIT) -> Set[str]:
        """Withdraw the tasks among ``ts`` that have not started anywhere; returns their ids (they
        never run).  Waits at most ``wait`` s for workers and child nodes.  Caller does NOT hold
        ``lock`` (it is released while waiting)."""
        with self.lock:
            gone, asked = self._withdraw_begin(ts, wait)
        deadline = time.monotonic() + wait
        for w in asked:
            w.answered.wait(max(0.0, deadline - time.monotonic()))
        if not asked:
            return gone
        with self.lock:
            lg = self.ledger
            for w in asked:
                self._withdrawals.pop(w.req, None)
                gone |= w.gone
                for tid in w.ids - w.gone:
                    t = lg.tasks.get(tid)
                    if t is not None and t.state is State.QUEUED:   # its location was lost meanwhile
                        self.cancel_tasks([t])
                        gone.add(tid)
            self.schedule()
        return gone

    def _withdraw_begin(self, ts: List[Task], wait: float) -> Tuple[Set[str], List[Withdrawal]]:
        lg = self.ledger
        gone: Set[str] = set()
        at: Dict[tuple, List[Task]] = {}
        heads: Dict[tuple, Optional[str]] = {}
        for t in ts:
            if lg.tasks.get(t.id) is not t:
                continue
            if t.state is State.QUEUED:
                self.cancel_tasks([t])
                gone.add(t.id)
            elif t.state is State.PLACED and t.location is not None and t.rec[wire.T_KIND] != wire.KIND_RANK:
                # (a group's placed ranks start together and are aborted together: pydist.groups)
                loc = tuple(t.location)
                if loc[0] == "w" and heads.setdefault(loc, lg.first_at(loc)) == t.id:
                    continue   # what a worker runs now (its client was told it started): never withdrawn
                at.setdefault(loc, []).append(t)
        asked: List[Withdrawal] = []
        for loc, tl in at.items():
            if loc[0] == "w":
                w = self._new_withdrawal(loc, [t.id for t in tl])
                self.pool.send(loc[1], ("cancel", w.req, [t.id for t in tl]))
                asked.append(w)
                continue
            link = self.links.links.get(loc[1])
            if link is None or link.location != loc or not link.alive:
                continue   # its loss re-queues them (withdraw then finds them queued, if it waits)
            unsent = link.withdraw({t.id for t in tl})
            for t in tl:
                if t.id in unsent and lg.withdraw(t, loc):
                    gone.add(t.id)
            rest = [t.id for t in tl if t.id not in unsent]
            if rest:
                w = self._new_withdrawal(loc, rest)
                link.post(withdraw=[(w.req, rest, wait / 2)])
                asked.append(w)
        return gone, asked

    def _new_withdrawal(self, loc: tuple, ids: List[str]) -> Withdrawal:
        w = Withdrawal(next(self._withdraw_seq), loc, ids)
        self._withdrawals[w.req] = w
        return w

    def withdrawn(self, loc: tuple, req: int, ids: List[str]) -> None:
        """``loc`` (a worker, or a link's epoch) dropped ``ids`` in answer to question ``req`` (0: a
        ``cancel_tasks`` notice nobody waits for).  See the module docstring for what each becomes."""
        lg = self.ledger
        w = self._withdrawals.get(req) if req else None
        for tid in ids:
            t = lg.tasks.get(tid)
            if t is None or t.location is None or tuple(t.location) != tuple(loc):
                continue
            if t.state is State.CANCELLED:   # nobody wants it: it leaves, its origin link is told
                lg.withdraw(t, loc)
                if t.origin[0] == "l":
                    self._deliver(t.origin, [(tid, wire.CANCELLED, b"", self.name, -1, 0.0)], keep=False)
                if w is not None and tid in w.ids:
                    w.gone.add(tid)
            elif w is not None and tid in w.ids:
                lg.withdraw(t, loc)
                w.gone.add(tid)
            else:   # dropped, but whoever asked stopped waiting: still wanted, so it runs after all
                lg.unplace_one(t)
        if loc[0] == "w":
            self.note_head(loc)
        if w is not None:
            w.answered.set()

    def withdrawals_lost(self, loc_kind: str, name) -> None:
        """A worker (``"w", index``) or a link (``"l", name``) is gone: whoever waits for its answers
        stops waiting (its tasks were queued again; ``withdraw`` then cancels them here)."""
        for w in list(self._withdrawals.values()):
            if w.loc[0] == loc_kind and w.loc[1] == name:
                w.answered.set()

    def _on_worker_dropped(self, index: int, req: int, ids: List[str]) -> None:
        """(worker reader thread) Worker ``index`` answered a cancel."""
        with self.lock:
            self.withdrawn(("w", index, self.pool.handles[index].generation), req, ids)
            self.schedule()

    # ---------------------------------------------------------------------- without an answer
    def cancel_tasks(self, ts: List[Task]) -> int:
        """Nobody wants these tasks' results: queued ones leave, placed ones are cancelled where they
        are and their locations are asked to drop them (a link is told; what is still in its outbox is
        taken back)."""
        lg = self.ledger
        by_link: Dict[tuple, List[Task]] = {}
        by_worker: Dict[tuple, List[str]] = {}
        n = 0
        for t in ts:
            if t.state is State.CANCELLED or t.id not in lg.tasks:
                continue
            loc = lg.cancel(t)
            n += 1
            if loc is None:
                continue
            if loc[0] == "l":
                by_link.setdefault(tuple(loc), []).append(t)
            elif t.rec[wire.T_KIND] != wire.KIND_RANK:
                by_worker.setdefault(tuple(loc), []).append(t.id)
        for loc, ids in by_worker.items():
            self.pool.send(loc[1], ("cancel", 0, ids))
        for loc, tl in by_link.items():
            link = self.links.links.get(loc[1])
            wanted = {t.id for t in tl}
            if link is None or link.location != loc or not link.alive:
                gone = wanted
            else:
                gone = link.withdraw(wanted)
                rest = [t.id for t in tl if t.id not in gone]
                if rest:
                    link.post(cancel=rest)
            for t in tl:
                if t.id in gone:
                    lg.unplace_one(t)   # never sent (or its link is gone): it leaves
        return n

    # ------------------------------------------------------------------------ who runs now
    def note_head(self, loc: tuple) -> None:
        """The first task at worker location ``loc`` is the one it runs (a worker runs what it is sent
        in order): tell its client it started.  Tasks behind it wait at the worker and stay pending
        (cancellable) for their client."""
        tid = self.ledger.first_at(loc)
        if tid is not None:
            t = self.ledger.tasks[tid]
            if t.state is State.PLACED:
                self.tell_started(t)

    def tell_started(self, t: "Task") -> None:
        """A worker began ``t`` (here, or at a node we sent it to): tell where it came from, its client
        (``running()``) or the node that sent it (which tells its own origin, up to the client)."""
        if t.origin[0] == "c":
            self.sessions.note_started(t.origin[1], t.id)
        elif t.origin[0] == "l":
            link = self.links.links.get(t.origin[1])
            if link is not None and link.epoch == t.origin[2]:
                link.post(started=[t.id])

    def started_at_link(self, loc: tuple, ids: List[str]) -> None:
        """(under the lock) The node at link location ``loc`` says these tasks of ours started there."""
        for tid in ids:
            t = self.ledger.tasks.get(tid)
            if t is not None and t.location == loc and t.state is State.PLACED:
                self.tell_started(t)

    def withdraw_answer(self, loc: tuple, req: int, ids: List[str]) -> None:
        """(link thread) A child answered ``withdraw_forwarded`` with the ids it withdrew."""
        with self.lock:
            self.withdrawn(loc, req, ids)
            self.schedule()
