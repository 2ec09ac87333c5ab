"""Client sessions of a node: each client's inbox of results, its long poll, its lease.

::

    submit ──▶ Node ──▶ ledger (origin ("c", client id))
    results for the client ──▶ Session.results ──▶ collect (long poll, ≤ COLLECT_MAX_WAIT s) ──▶ client
    "started" notes ──▶ Session.started ── StartedTimer wakes the poll STARTED_DELAY later ──┘
    a lone short task's result ──▶ Session.lingers[id] ──▶ the reply of its own submit_wait ──▶ client
      (its slot is reserved before it is placed: its "started" note arms the timer only if the linger
       ends without the result)

``submit_wait`` (a lone task, known to be short) keeps its reply open for at most ``LINGER_MAX`` s:
the result rides back in it, which saves the collector's wake-up and its hand-off to the caller's
thread (the long poll is not woken for it).

A client that neither polls nor submits for ``client_lease`` seconds is dropped (``Sessions.expired``):
the node cancels its tasks.  Everything here runs under the node's lock (the condition variables share
it); the only thread of its own is the ``StartedTimer``.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Dict, List, Optional

COLLECT_MAX_WAIT = 5.0
LINGER_MAX = 0.005     # s a submit_wait may hold its reply for its task's result
STARTED_DELAY = 0.01   # s a collect waits for a result before answering with "started" notes alone


class Session:
    """A connected client: its inbox of finished results and started task ids."""

    def __init__(self, cid: str, lock: threading.RLock, timer: Optional["StartedTimer"] = None):
        self.id = cid
        self.timer = timer
        self.results: List[tuple] = []
        self.started: List[str] = []
        self.started_since = 0.0   # when ``started`` last went from empty to not: its timer is for that
        self.cond = threading.Condition(lock)
        self.last_seen = time.monotonic()
        self.init_blob: Optional[bytes] = None
        self.closed = False
        self.started_due = False   # set by the StartedTimer: answer the long poll with "started" notes
        self.polling = 0           # collect calls waiting right now (a waiting client is alive)
        self.suspects: Dict[str, int] = {}   # reconciliation: ids only this node held, and since which round
        self.rounds = 0
        self.lingers: Dict[str, List[tuple]] = {}   # task id -> its result, for a submit_wait waiting
        self.linger_cond = threading.Condition(lock)
        # the "started" list became non-empty with a lingering task's note: the timer is armed only if
        # the linger ends without the result (a lone short task costs the timer thread no wake-up)
        self.timer_owed = False

    def deliver(self, results: List[tuple]) -> None:
        """Results for the client (caller holds the node lock): to a ``submit_wait`` waiting for that
        id, else to the inbox, waking the long poll."""
        lingers = self.lingers
        posted = hit = False
        for r in results:
            slot = lingers.get(r[0]) if lingers else None
            if slot is not None:
                slot.append(r)
                hit = True
            else:
                self.results.append(r)
                posted = True
        if hit:
            self.linger_cond.notify_all()
        if posted:
            self.cond.notify()

    def reserve(self, tid: str) -> Optional[List[tuple]]:
        """Before a lone task is placed (caller holds the node lock): a slot its result goes to instead of
        the inbox, and its "started" note arms no timer while ``linger`` waits.  None: ``tid`` has a slot
        already (the same id lingering in another call)."""
        if tid in self.lingers:
            return None
        slot: List[tuple] = []
        self.lingers[tid] = slot
        return slot

    def linger(self, tid: str, slot: List[tuple], deadline: Optional[float],
               stopping: threading.Event) -> List[tuple]:
        """Wait (caller holds the node lock) until ``deadline`` for the result of ``tid`` in its reserved
        ``slot`` (``deadline`` None: do not wait); frees the slot and returns ``[result]`` or ``[]``
        (then it comes through ``collect`` as usual)."""
        try:
            while deadline is not None and not slot and not self.closed and not stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.linger_cond.wait(left)
        finally:
            if self.lingers.get(tid) is slot:
                del self.lingers[tid]
        if slot and tid in self.started:   # no "started" note for a task whose result is in hand
            self.started.remove(tid)
        if self.timer_owed:
            self.timer_owed = False
            if self.started and self.timer is not None:
                self.timer.add(self)
        return slot

    def post(self, result: tuple) -> None:
        """Queue a result for the client's next collect (caller holds the node lock and notifies)."""
        self.results.append(result)

    def wait(self, deadline: float, stopping: threading.Event) -> tuple:
        """The long poll (caller holds the node lock): until a result, a "started" note due, the
        deadline, the session closing or the node stopping.  Returns ``(results, started_ids)``."""
        self.polling += 1
        try:
            while not self.results and not self.started_due and not stopping.is_set() and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
        finally:
            self.polling -= 1
        self.started_due = False
        self.timer_owed = False
        res, started = self.results, self.started
        self.results, self.started = [], []
        self.last_seen = time.monotonic()
        return res, started


class StartedTimer:
    """Wakes a client's long poll STARTED_DELAY after a task of it started if no result came first, so
    ``Future.running()`` is timely for long tasks while a short task costs no extra wake-up."""

    def __init__(self, lock: threading.RLock, stopping: threading.Event):
        self.lock = lock
        self.stopping = stopping
        self.due: "collections.deque[tuple]" = collections.deque()
        self.cond = threading.Condition(threading.Lock())
        threading.Thread(target=self._run, daemon=True, name="pydist-started").start()

    def add(self, client: Session) -> None:
        """Arm for ``client``, whose ``started`` list just became non-empty (at ``started_since``)."""
        with self.cond:
            self.due.append((client.started_since + STARTED_DELAY, client, client.started_since))
            if len(self.due) == 1:
                self.cond.notify()

    def _run(self) -> None:
        while not self.stopping.is_set():
            with self.cond:
                while not self.due and not self.stopping.is_set():
                    self.cond.wait(1.0)
                if not self.due:
                    continue
                when, client, since = self.due[0]
                left = when - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                self.due.popleft()
            with self.lock:   # (a list emptied and filled again since has a timer of its own)
                if client.started and client.started_since == since and not client.results:
                    client.started_due = True
                    client.cond.notify()


class Sessions:
    """Every client session of a node (under the node's lock)."""

    def __init__(self, lock: threading.RLock, stopping: threading.Event, lease: float):
        self.lock = lock
        self.lease = lease
        self.clients: Dict[str, Session] = {}
        self.timer = StartedTimer(lock, stopping)
        # clients that said goodbye: a long poll of theirs still on the wire must not open a new session
        self.closed: "collections.OrderedDict[str, None]" = collections.OrderedDict()

    def get(self, cid: str) -> Session:
        """The session of ``cid``, created on first use."""
        c = self.clients.get(cid)
        if c is None:
            c = self.clients[cid] = Session(cid, self.lock, self.timer)
        return c

    def touch(self, cid: str) -> Session:
        self.closed.pop(cid, None)
        c = self.get(cid)
        c.last_seen = time.monotonic()
        return c

    def is_closed(self, cid: str) -> bool:
        return cid in self.closed and cid not in self.clients

    def note_started(self, cid: str, tid: str) -> None:
        c = self.clients.get(cid)
        if c is not None:
            c.started.append(tid)
            if len(c.started) == 1:
                c.started_since = time.monotonic()
                if tid in c.lingers:
                    c.timer_owed = True   # armed when its linger ends without the result
                else:
                    self.timer.add(c)

    def pop(self, cid: str) -> Optional[Session]:
        """Forget a session; wakes its long poll."""
        c = self.clients.pop(cid, None)
        if c is not None:
            c.closed = True
            c.cond.notify_all()
            c.linger_cond.notify_all()
        return c

    def close(self, cid: str) -> Optional[Session]:
        """The client said goodbye (``close_client``)."""
        self.closed[cid] = None
        while len(self.closed) > 4096:
            self.closed.popitem(last=False)
        return self.pop(cid)

    def expired(self, now: float) -> List[str]:
        """Clients silent for longer than the lease, and not waiting in a long poll right now."""
        return [cid for cid, c in self.clients.items() if now - c.last_seen > self.lease and not c.polling]

    def wake_all(self) -> None:
        for c in self.clients.values():
            c.cond.notify_all()
            c.linger_cond.notify_all()

    def __len__(self) -> int:
        return len(self.clients)
