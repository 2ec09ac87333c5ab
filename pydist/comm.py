"""Messages between the ranks of a task group: MPI's core ideas with Python objects as messages.

::

    ex.spawn_group(fn, size=4)  ─▶ 4 tasks, rank r runs fn(comm_r, *args)
    rank 1: comm.send(obj, to=3, tag=7) ──▶ home node's mailbox[group] ──▶ rank 3: comm.recv(source=1, tag=7)

Every group has a *home*: the node its client submitted to.  Ranks talk to the home node directly (a
Pyro5 connection per rank, authenticated with the cluster secret, opened on first use); the home keeps
one mailbox per group, matched by (destination, source, tag) in arrival order, so messages between two
ranks with the same tag arrive in the order they were sent.  Collectives (``bcast``, ``scatter``,
``gather``, ``reduce``, ``allreduce``, ``barrier``) are built from ``send``/``recv`` through rank 0.

All ranks of a group must be able to run at once: ``spawn_group`` refuses a group larger than the
cluster's worker count (a rank waiting for a rank that cannot start would wait forever).
"""
from __future__ import annotations

import os
import pickle
import threading
import time
from typing import Any, Callable, List, Optional

from . import wire

ANY_SOURCE = -1
ANY_TAG = -1
_COLL_TAG = -1000   # tags below this are reserved for collectives


class CommTimeout(TimeoutError):
    """``recv`` waited longer than its ``timeout``."""


class Comm:
    """A rank's view of its group: ``rank``, ``size``, ``send``, ``recv`` and the collectives."""

    def __init__(self, group: str, rank: int, size: int, home: str):
        self.group = group
        self.rank = rank
        self.size = size
        self.home = home
        self._local = threading.local()
        self._coll = 0

    def __getstate__(self):
        return {"group": self.group, "rank": self.rank, "size": self.size, "home": self.home}

    def __setstate__(self, state):
        self.__init__(state["group"], state["rank"], state["size"], state["home"])

    def __repr__(self) -> str:
        return f"<Comm group={self.group} rank={self.rank}/{self.size}>"

    def _proxy(self):
        p = getattr(self._local, "proxy", None)
        if p is None:
            from . import security

            secret = os.environ.get("PYDIST_SECRET")
            p = security.connect(self.home, secret=secret.encode() if secret else None, timeout=10.0)
            self._local.proxy = p
        return p

    def _check_rank(self, r: int, what: str) -> None:
        if not isinstance(r, int) or not 0 <= r < self.size:
            raise ValueError(f"{what} must be a rank in 0..{self.size - 1}, got {r!r}")

    # -------------------------------------------------------------------------------- point to point
    def send(self, obj: Any, to: int, tag: int = 0) -> None:
        """Send a Python object to rank ``to`` (returns once the home node holds it)."""
        self._check_rank(to, "to")
        self._send(obj, to, tag)

    def _send(self, obj: Any, to: int, tag: int) -> None:
        self._proxy().comm_send(self.group, self.rank, to, tag, wire.dumps(obj, "the message"))

    def recv(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, timeout: Optional[float] = None) -> Any:
        """Receive the next object from ``source`` (default: any rank) with ``tag`` (default: any)."""
        return self.recv_with_status(source, tag, timeout)[0]

    def recv_with_status(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
                         timeout: Optional[float] = None) -> tuple:
        """Like ``recv`` but returns ``(obj, source, tag)``."""
        if source != ANY_SOURCE:
            self._check_rank(source, "source")
        deadline = None if timeout is None else time.monotonic() + timeout
        p = self._proxy()
        while True:
            wait = 5.0 if deadline is None else max(0.0, min(5.0, deadline - time.monotonic()))
            got = p.comm_recv(self.group, self.rank, source, tag, wait)
            if got is not None:
                src, t, blob = got
                return pickle.loads(blob), src, t
            if deadline is not None and time.monotonic() >= deadline:
                raise CommTimeout(f"rank {self.rank} of group {self.group}: no message from "
                                  f"{'any rank' if source == ANY_SOURCE else f'rank {source}'} "
                                  f"(tag {tag}) within {timeout} s")

    # -------------------------------------------------------------------------------- collectives
    def _next_tag(self) -> int:
        self._coll += 1
        return _COLL_TAG - self._coll

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        """``root``'s object, on every rank."""
        self._check_rank(root, "root")
        tag = self._next_tag()
        if self.rank == root:
            for r in range(self.size):
                if r != root:
                    self._send(obj, r, tag)
            return obj
        return self.recv(root, tag)

    def scatter(self, items: Optional[List[Any]] = None, root: int = 0) -> Any:
        """Rank ``r`` gets ``items[r]`` from ``root`` (``items`` needs ``size`` entries on the root)."""
        self._check_rank(root, "root")
        tag = self._next_tag()
        if self.rank == root:
            if items is None or len(items) != self.size:
                raise ValueError(f"scatter needs a list of {self.size} items on the root")
            for r in range(self.size):
                if r != root:
                    self._send(items[r], r, tag)
            return items[root]
        return self.recv(root, tag)

    def gather(self, obj: Any, root: int = 0) -> Optional[List[Any]]:
        """The list of every rank's object, in rank order, on ``root`` (None elsewhere)."""
        self._check_rank(root, "root")
        tag = self._next_tag()
        if self.rank != root:
            self._send(obj, root, tag)
            return None
        out: List[Any] = [None] * self.size
        out[root] = obj
        for _ in range(self.size - 1):
            value, src, _t = self.recv_with_status(ANY_SOURCE, tag)
            out[src] = value
        return out

    def reduce(self, obj: Any, op: Callable[[Any, Any], Any] = None, root: int = 0) -> Any:
        """``op`` folded over every rank's object in rank order, on ``root`` (default op: ``+``)."""
        values = self.gather(obj, root)
        if values is None:
            return None
        op = op or (lambda a, b: a + b)
        acc = values[0]
        for v in values[1:]:
            acc = op(acc, v)
        return acc

    def allreduce(self, obj: Any, op: Callable[[Any, Any], Any] = None) -> Any:
        """``reduce`` then ``bcast``: every rank gets the folded value."""
        return self.bcast(self.reduce(obj, op, 0), 0)

    def barrier(self) -> None:
        """Return once every rank has called ``barrier``."""
        self.allreduce(0)


def run_rank(fn: Callable, comm: Comm, args: tuple, kwargs: dict) -> Any:
    """What a rank's task runs (inside a worker)."""
    try:
        return fn(comm, *args, **kwargs)
    finally:
        p = getattr(comm._local, "proxy", None)
        if p is not None:
            p._pyroRelease()
