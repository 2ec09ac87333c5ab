"""What a rank of a task group uses: ``Comm`` (mpi4py's lowercase API), requests, ``Status``.

::

    group = ex.spawn_group(fn, 4, *args)     # rank r runs fn(comm_r, *args) once 4 workers are reserved
    comm.send(obj, dest, tag)  ─▶ straight to rank dest's process (Unix socket on one node, TCP across)
    comm.recv(source, tag)     ◀─ matched in this process's mailbox (pydist.commnet)
    any rank fails ─▶ the home node tells every rank ─▶ their blocked calls raise GroupAborted

Point to point: ``send``/``recv``, ``sendrecv``, ``isend``/``irecv`` (``Request.wait``/``test``,
``Request.waitall``), ``probe``/``iprobe``, with ``Status`` (``source``, ``tag``, ``size``).  User tags
are ints ≥ 0; ``ANY_SOURCE``/``ANY_TAG`` match anything.  Collectives (``barrier``, ``bcast``, ``reduce``,
``allreduce``, ``gather``, ``scatter``, ``allgather``, ``alltoall``, ``scan``, ``exscan``) travel on a
channel of their own, so they never match a user message; ``bcast``/``reduce`` are binomial trees.
``split(color, key)`` makes sub-communicators.  Every blocking call takes ``timeout=`` (seconds;
``CommTimeout`` when it passes).  Inside a rank, ``pydist.comm()`` returns its ``Comm``.

``Request``, ``Status``, ``CommTimeout`` and the wildcards live in :mod:`pydist.commreq` (re-exported
here); the mailbox is :mod:`pydist.commbox`, the sockets between ranks :mod:`pydist.commnet`.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import sys
import threading
import time
import types
from typing import Any, Callable, List, Optional, Sequence

from . import commbox, commnet
from .commnet import Aborted
from .commreq import (ANY_SOURCE, ANY_TAG, TAG_UB, CommTimeout, Request, Status,  # noqa: F401
                      _deadline, _nolock, waitall)
from .errors import GroupAborted

_current = threading.local()


def _op_sum(a, b):
    return a + b


SUM = _op_sum
PROD = lambda a, b: a * b   # noqa: E731
MAX = max
MIN = min



def _collective(fn: Callable) -> Callable:
    """A collective's ``CommTimeout`` names the collective and the timeout its caller gave, and the rank
    whose part never came (not the collective's internal tag and the time left for its last step)."""
    name = fn.__name__
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def call(self: "Comm", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except CommTimeout as exc:
            missing = getattr(exc, "pydist_missing", None)
            if missing is None:
                raise
            timeout = sig.bind(self, *args, **kwargs).arguments.get("timeout")
            err = CommTimeout(f"rank {self.rank} of group {self.group}: {name} did not complete within {timeout} s: "
                              f"nothing came from rank {missing} (has every rank of the group called {name}, "
                              "with the same root?)")
            err.pydist_missing = missing     # type: ignore[attr-defined]  # an enclosing collective renames it
            raise err from None
    return call

class Comm:
    """A rank's view of its group (or of a sub-group made by ``split``): ``rank``, ``size`` and the
    calls in the module docstring.  Picklable only as the description a rank starts from."""

    def __init__(self, group: str, rank: int, size: int, home: Any, token: bytes = b"",
                 _ep: Optional[commnet.Endpoint] = None, _ctx: int = 0, _world: Optional[List[int]] = None):
        self.group, self.rank, self.size, self.home, self.token = group, rank, size, home, token
        self._ep = _ep
        self._ctx = _ctx                       # user messages on _ctx, collectives on _ctx + 1
        self._world = _world                   # our rank -> world rank (None: this is the world)
        self._coll = 0
        self._splits = 0

    def __getstate__(self):
        return {"group": self.group, "rank": self.rank, "size": self.size, "home": self.home, "token": self.token}

    def __setstate__(self, st):
        self.__init__(st["group"], st["rank"], st["size"], st["home"], st.get("token", b""))

    def __repr__(self) -> str:
        return f"<Comm group={self.group} rank={self.rank}/{self.size}>"

    # mpi4py spellings
    def Get_rank(self) -> int:
        """``rank`` (mpi4py's spelling)."""
        return self.rank

    def Get_size(self) -> int:
        """``size`` (mpi4py's spelling)."""
        return self.size

    # -------------------------------------------------------------------------------- helpers
    def _w(self, r: int) -> int:
        return r if self._world is None or r < 0 else self._world[r]

    def _local(self, world_rank: int) -> int:
        return world_rank if self._world is None else self._world.index(world_rank)

    @property
    def _net(self) -> "commnet.Endpoint":
        """The rank's endpoint (RuntimeError outside a running rank)."""
        ep = self._ep
        if ep is None:
            raise RuntimeError("this Comm is not running in a rank of a task group (use ex.spawn_group)")
        return ep

    def _check_live(self) -> None:
        ep = self._ep
        if ep is None:
            raise RuntimeError("this Comm is not running in a rank of a task group (use ex.spawn_group)")
        if ep.mailbox.aborted is not None:
            raise self._translate(Aborted())

    def _translate(self, exc: BaseException) -> BaseException:
        ep = self._ep
        if ep is not None and ep.abort_info is not None:
            rank, cause, blob = ep.abort_info
            err = GroupAborted(self.group, rank, cause, blob or b"")
            from . import wire

            err._resolve_cause("", wire.loads_exception)
            return err
        if isinstance(exc, Aborted):
            return GroupAborted(self.group, -1, "this rank's communicator is closed")
        return exc

    def _check_rank(self, r: Any, what: str, any_ok: bool = False) -> int:
        if any_ok and r == ANY_SOURCE:
            return r
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < self.size:
            raise ValueError(f"{what} must be a rank in 0..{self.size - 1}"
                             f"{' or ANY_SOURCE' if any_ok else ''}, got {r!r}")
        return r

    @staticmethod
    def _check_tag(t: Any, any_ok: bool = False) -> int:
        if any_ok and t == ANY_TAG:
            return t
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= TAG_UB:
            raise ValueError(f"tag must be an int in 0..{TAG_UB}{' or ANY_TAG' if any_ok else ''}, got {t!r} "
                             "(negative tags are reserved)")
        return t

    def _dest(self, dest: Any, to: Any) -> int:
        d = to if dest is None else dest
        if d is None:
            raise TypeError("send needs a destination rank (dest=)")
        return self._check_rank(d, "dest")

    def _call(self, fn, *a):
        try:
            return fn(*a)
        except Aborted as exc:
            raise self._translate(exc) from None
        except ConnectionError as exc:
            raise self._translate(exc) from None

    # -------------------------------------------------------------------------------- point to point
    def send(self, obj: Any, dest: Optional[int] = None, tag: int = 0, *, to: Optional[int] = None,
             timeout: Optional[float] = None) -> None:
        """Send a Python object to rank ``dest`` (returns once it is on its way)."""
        d = self._dest(dest, to)
        self._check_tag(tag)
        self._check_live()
        self._call(self._net.post, self._w(d), self._ctx, tag, obj, True, _deadline(timeout))

    def isend(self, obj: Any, dest: Optional[int] = None, tag: int = 0, *, to: Optional[int] = None) -> Request:
        """Start sending; returns a ``Request`` (``wait()`` for it to be written)."""
        d = self._dest(dest, to)
        self._check_tag(tag)
        self._check_live()
        item = self._call(self._net.post, self._w(d), self._ctx, tag, obj, False)
        w = self._w(d)
        return Request(self, "send", (item, d, None if w == self._net.rank else w))

    def recv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Optional[Status] = None,
             timeout: Optional[float] = None) -> Any:
        """Receive the next object from ``source`` with ``tag`` (defaults: any).  mpi4py's order: a
        positional first argument that is an int is taken as ``source``."""
        if isinstance(buf, int) and not isinstance(buf, bool):
            if source != ANY_SOURCE and tag == ANY_TAG:
                tag = source
            source = buf
        return self._recv(self._ctx, source, tag, status, timeout)

    def recv_with_status(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
                         timeout: Optional[float] = None) -> tuple:
        """Like ``recv`` but returns ``(obj, source, tag)`` (kept from pydist's first API)."""
        st = Status()
        value = self._recv(self._ctx, source, tag, st, timeout)
        return value, st.source, st.tag

    def _recv(self, ctx: int, source: int, tag: int, status: Optional[Status], timeout: Optional[float]) -> Any:
        h = self._post_recv(ctx, source, tag)
        value, st = self._finish_recv(h, timeout)
        if status is not None:
            status.source, status.tag, status.size = st.source, st.tag, st.size
        return value

    def _post_recv(self, ctx: int, source: int, tag: int) -> list:
        self._check_rank(source, "source", any_ok=True)
        if ctx == self._ctx:
            self._check_tag(tag, any_ok=True)
        self._check_live()
        src = self._w(source)
        if self._world is not None and source == ANY_SOURCE:
            src = ANY_SOURCE   # (sub-communicator: contexts keep strangers out)
        return self._net.mailbox.post(ctx, src, tag)

    def _finish_recv(self, h: list, timeout: Optional[float]) -> tuple:
        deadline = _deadline(timeout)
        m = self._call(self._net.mailbox.wait, h, deadline)
        if m is None:
            self._net.mailbox.cancel(h)
            if h[3] is not None:   # matched just now
                m = h[3]
            else:
                src = "any rank" if h[1] == ANY_SOURCE else f"rank {self._local(h[1])}"
                tg = "any tag" if h[2] == ANY_TAG else f"tag {h[2]}"
                raise CommTimeout(f"rank {self.rank} of group {self.group}: no message from {src} "
                                  f"({tg}) within {timeout} s")
        return commbox.loads(m.flags, m.meta, m.bufs), Status(self._local(m.src), m.tag, m.size)

    def irecv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        """Post a receive; returns a ``Request`` whose ``wait()`` gives the object."""
        if isinstance(buf, int) and not isinstance(buf, bool):
            source = buf
        return Request(self, "recv", self._post_recv(self._ctx, source, tag))

    def sendrecv(self, sendobj: Any, dest: int, sendtag: int = 0, recvbuf: Any = None,
                 source: int = ANY_SOURCE, recvtag: int = ANY_TAG, status: Optional[Status] = None,
                 timeout: Optional[float] = None) -> Any:
        """Send to ``dest`` and receive from ``source`` at once (no deadlock in a ring)."""
        req = self.isend(sendobj, dest, sendtag)
        value = self.recv(None, source, recvtag, status, timeout)
        req.wait(timeout=timeout)
        return value

    def probe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Optional[Status] = None,
              timeout: Optional[float] = None) -> bool:
        """Wait until a matching message is there (without receiving it); fills ``status``."""
        m = self._probe(source, tag, True, timeout)
        if m is None:
            raise CommTimeout(f"rank {self.rank}: no message to probe within {timeout} s")
        if status is not None:
            status.source, status.tag, status.size = self._local(m.src), m.tag, m.size
        return True

    def iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Optional[Status] = None) -> bool:
        """Whether a matching message is there now (never blocks)."""
        m = self._probe(source, tag, False, None)
        if m is not None and status is not None:
            status.source, status.tag, status.size = self._local(m.src), m.tag, m.size
        return m is not None

    def _probe(self, source, tag, block, timeout):
        self._check_rank(source, "source", any_ok=True)
        self._check_tag(tag, any_ok=True)
        self._check_live()
        return self._call(self._net.mailbox.probe, self._ctx, self._w(source), tag, _deadline(timeout), block)

    def abort(self, reason: str = "comm.abort() called") -> None:
        """Abort the whole group: every rank's blocked call raises ``GroupAborted``; so does this call."""
        self._check_live()
        self._net.send_abort(str(reason))
        self._net._set_abort(self._net.rank, f"called abort: {reason}", None)
        raise self._translate(Aborted())

    # -------------------------------------------------------------------------------- collectives
    def _ctag(self) -> int:
        self._coll += 1
        return self._coll

    def _csend(self, obj, dest, tag):
        self._call(self._net.post, self._w(dest), self._ctx + 1, tag, obj, True)

    def _crecv(self, source, tag, deadline):
        t = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return self._recv(self._ctx + 1, source, tag, None, t)
        except CommTimeout as exc:
            exc.pydist_missing = source     # type: ignore[attr-defined]  # the collective's wrapper says the rest
            raise

    @_collective
    def barrier(self, timeout: Optional[float] = None) -> None:
        """Return once every rank has called ``barrier``."""
        self.allreduce(0, timeout=timeout)

    @_collective
    def bcast(self, obj: Any = None, root: int = 0, timeout: Optional[float] = None) -> Any:
        """``root``'s object, on every rank (binomial tree)."""
        self._check_rank(root, "root")
        self._check_live()
        tag, deadline = self._ctag(), _deadline(timeout)
        n, me = self.size, (self.rank - root) % self.size
        mask = 1
        while mask < n:          # receive from the parent
            if me & mask:
                obj = self._crecv((me - mask + root) % n, tag, deadline)
                break
            mask <<= 1
        mask >>= 1
        while mask > 0:          # send to the children
            if me + mask < n:
                self._csend(obj, (me + mask + root) % n, tag)
            mask >>= 1
        return obj

    @_collective
    def reduce(self, obj: Any, op: Optional[Callable[[Any, Any], Any]] = None, root: int = 0,
               timeout: Optional[float] = None) -> Any:
        """``op`` (default ``+``) folded over every rank's object in rank order, on ``root`` (None
        elsewhere); a binomial tree (``op`` must be associative, as in MPI)."""
        self._check_rank(root, "root")
        self._check_live()
        op = op or _op_sum
        tag, deadline = self._ctag(), _deadline(timeout)
        n, me = self.size, (self.rank - root) % self.size
        if root != 0 and not _commutative(op):
            # rank order matters: reduce to 0 in order, then hand the value to root
            acc = self.reduce(obj, op, 0, timeout)
            if self.rank == 0:
                self._csend(acc, root, tag)
                return None
            return self._crecv(0, tag, deadline) if self.rank == root else None
        acc = obj
        mask = 1
        while mask < n:
            if me & mask:
                self._csend(acc, (me - mask + root) % n, tag)
                return None
            if me + mask < n:
                acc = op(acc, self._crecv((me + mask + root) % n, tag, deadline))
            mask <<= 1
        return acc

    @_collective
    def allreduce(self, obj: Any, op: Optional[Callable[[Any, Any], Any]] = None,
                  timeout: Optional[float] = None) -> Any:
        """``reduce`` then ``bcast``: every rank gets the folded value."""
        return self.bcast(self.reduce(obj, op, 0, timeout), 0, timeout)

    @_collective
    def gather(self, obj: Any, root: int = 0, timeout: Optional[float] = None) -> Optional[List[Any]]:
        """The list of every rank's object, in rank order, on ``root`` (None elsewhere)."""
        self._check_rank(root, "root")
        self._check_live()
        tag, deadline = self._ctag(), _deadline(timeout)
        if self.rank != root:
            self._csend(obj, root, tag)
            return None
        out: List[Any] = [None] * self.size
        out[root] = obj
        for r in range(self.size):
            if r != root:
                out[r] = self._crecv(r, tag, deadline)
        return out

    @_collective
    def scatter(self, sendobj: Optional[Sequence[Any]] = None, root: int = 0,
                timeout: Optional[float] = None) -> Any:
        """Rank ``r`` gets ``sendobj[r]`` from ``root`` (``size`` items on the root)."""
        self._check_rank(root, "root")
        self._check_live()
        tag, deadline = self._ctag(), _deadline(timeout)
        if self.rank == root:
            if sendobj is None or len(sendobj) != self.size:
                raise ValueError(f"scatter needs a sequence of {self.size} items on the root")
            for r in range(self.size):
                if r != root:
                    self._csend(sendobj[r], r, tag)
            return sendobj[root]
        return self._crecv(root, tag, deadline)

    @_collective
    def allgather(self, obj: Any, timeout: Optional[float] = None) -> List[Any]:
        """Every rank's object, in rank order, on every rank."""
        return self.bcast(self.gather(obj, 0, timeout), 0, timeout)

    @_collective
    def alltoall(self, sendobj: Sequence[Any], timeout: Optional[float] = None) -> List[Any]:
        """Rank ``r`` sends ``sendobj[d]`` to each rank ``d``; returns what each rank sent it."""
        self._check_live()
        if sendobj is None or len(sendobj) != self.size:
            raise ValueError(f"alltoall needs a sequence of {self.size} items on every rank")
        tag, deadline = self._ctag(), _deadline(timeout)
        reqs = []
        for i in range(1, self.size):
            d = (self.rank + i) % self.size
            reqs.append(self._call(self._net.post, self._w(d), self._ctx + 1, tag, sendobj[d], False))
        out: List[Any] = [None] * self.size
        out[self.rank] = sendobj[self.rank]
        for i in range(1, self.size):
            s = (self.rank - i) % self.size
            out[s] = self._crecv(s, tag, deadline)
        for item in reqs:
            self._wait_item(item, deadline)
        return out

    def _wait_item(self, item: list, deadline: Optional[float]) -> None:
        self._net.flush()
        while not item[1]:
            self._check_live()
            if deadline is not None and time.monotonic() >= deadline:
                raise CommTimeout(f"rank {self.rank}: a send did not complete in time")
            time.sleep(0.0002)

    @_collective
    def scan(self, obj: Any, op: Optional[Callable[[Any, Any], Any]] = None,
             timeout: Optional[float] = None) -> Any:
        """Inclusive prefix: rank ``r`` gets ``op`` folded over ranks 0..r."""
        self._check_live()
        op = op or _op_sum
        tag, deadline = self._ctag(), _deadline(timeout)
        acc = obj if self.rank == 0 else op(self._crecv(self.rank - 1, tag, deadline), obj)
        if self.rank + 1 < self.size:
            self._csend(acc, self.rank + 1, tag)
        return acc

    @_collective
    def exscan(self, obj: Any, op: Optional[Callable[[Any, Any], Any]] = None,
               timeout: Optional[float] = None) -> Any:
        """Exclusive prefix: rank ``r`` gets ``op`` folded over ranks 0..r-1 (None on rank 0)."""
        self._check_live()
        op = op or _op_sum
        tag, deadline = self._ctag(), _deadline(timeout)
        prev = None if self.rank == 0 else self._crecv(self.rank - 1, tag, deadline)
        if self.rank + 1 < self.size:
            self._csend(obj if prev is None else op(prev, obj), self.rank + 1, tag)
        return prev

    def split(self, color: Optional[int] = 0, key: int = 0, timeout: Optional[float] = None) -> Optional["Comm"]:
        """A sub-communicator of the ranks that passed the same ``color``, ordered by ``(key, rank)``;
        ``color=None`` (MPI_UNDEFINED) gets None.  Collective: every rank must call it."""
        if color is not None and (isinstance(color, bool) or not isinstance(color, int) or color < 0):
            raise ValueError(f"color must be an int >= 0 or None, got {color!r}")
        self._splits += 1
        table = self.allgather((color, key), timeout)
        if color is None:
            return None
        members = sorted((k, r) for r, (c, k) in enumerate(table) if c == color)
        world = [self._w(r) for _, r in members]
        digest = hashlib.blake2b(f"{self._ctx}/{self._splits}/{color}".encode(), digest_size=4).digest()
        ctx = (int.from_bytes(digest, "big") | 2) & ~1 & 0xFFFFFFFF
        sub = Comm(self.group, world.index(self._w(self.rank)), len(world), self.home, self.token,
                   _ep=self._ep, _ctx=ctx, _world=world)
        return sub

    Split = split

    def Free(self) -> None:
        """Nothing to free (mpi4py compatibility)."""


def _commutative(op) -> bool:
    return op in (_op_sum, max, min, PROD) or op is None


# ------------------------------------------------------------------------------------- running a rank
def run_rank(fn: Callable, comm: Comm, args: tuple, kwargs: dict) -> Any:
    """What a rank's task runs inside a worker: join the group, run ``fn``, report how it ended."""
    from . import wire

    try:
        from .workers import task_context

        node = task_context().node
    except RuntimeError:
        node = ""
    ep = commnet.Endpoint(comm.group, comm.rank, comm.size, comm.token, tuple(comm.home), node)
    try:
        ep.start()
    except (OSError, EOFError) as exc:
        raise GroupAborted(comm.group, comm.rank, f"could not reach the group's home node: {exc}") from None
    comm._ep = ep
    _current.comm = comm
    try:
        comm._check_live()   # aborted before we started?
        value = fn(comm, *args, **kwargs)
    except GroupAborted:
        ep.finish(("done", comm.rank))
        raise
    except BaseException as exc:
        ep.finish(("fail", comm.rank, f"raised {type(exc).__name__}: {exc}"[:2000], wire.dumps_exception(exc)))
        raise
    else:
        ep.finish(("done", comm.rank))
        return value
    finally:
        _current.comm = None
        comm._ep = None


def current() -> Comm:
    """The ``Comm`` of the rank running in this thread (``pydist.comm()``); RuntimeError elsewhere."""
    c = getattr(_current, "comm", None)
    if c is None:
        raise RuntimeError("pydist.comm() is only available inside a rank of a task group (ex.spawn_group)")
    return c


class _CallableModule(types.ModuleType):
    """``pydist.comm`` is this module, and ``pydist.comm()`` returns the current rank's ``Comm``."""

    def __call__(self) -> Comm:
        return current()


sys.modules[__name__].__class__ = _CallableModule
