"""The bytes and the mailbox of rank messages (pure: no sockets, no threads of its own).

::

    frame = header(kind, context, tag, pickle length, buffer count, flags) | buffer lengths | pickle | buffers
    Mailbox: a message goes to the first posted receive that matches it (posting order), else waits in
    the unexpected queue (arrival order); readers wait for room when a source's queue is over the cap.

Pickling: the C pickler first, cloudpickle for what it cannot do (lambdas, ``__main__`` functions);
pickle protocol 5 with numpy arrays and large ``bytes`` out of band (written straight from their memory,
read into place), small buffers in band.  Used by ``pydist.commnet`` (the sockets) and ``pydist.comm``.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import pickle
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

# kind(1) ctx(4) tag(8) meta length(4) number of buffers(2) flags(1)
HDR = struct.Struct("!BIqIHB")
BUFLEN = struct.Struct("!Q")
K_DATA, K_BYE = 1, 2
F_RAW_BYTES = 1          # the message is one bytes object, sent as its only buffer
OOB_MIN = 1 << 16        # bytes objects at least this big travel out of band
POLL = 0.2               # s between checks for an abort while a call waits


class Aborted(Exception):
    """Internal: the endpoint was aborted (comm turns it into GroupAborted)."""


def mac(token: bytes, nonce: bytes, group: str, rank: int) -> bytes:
    """The proof a connecting rank sends (see the module docstring)."""
    return hmac.new(token, nonce + group.encode() + struct.pack("!I", rank), hashlib.sha256).digest()


# ----------------------------------------------------------------------------------------- pickling
class _RawBytes:
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return bytes, (pickle.PickleBuffer(self.data),)


def _wrap(obj: Any, depth: int = 0) -> Any:
    if type(obj) is bytes and len(obj) >= OOB_MIN:
        return _RawBytes(obj)
    if depth < 1 and type(obj) in (list, tuple) and len(obj) <= 256:
        return type(obj)(_wrap(x, depth + 1) for x in obj)
    if depth < 1 and type(obj) is dict and len(obj) <= 256:
        return {k: _wrap(v, depth + 1) for k, v in obj.items()}
    return obj


def dumps(obj: Any) -> Tuple[int, bytes, list]:
    """``(flags, pickle, buffers)`` for a message: the C pickler first, cloudpickle for what it cannot
    do (lambdas, functions of ``__main__``); large buffers out of band."""
    if type(obj) is bytes and len(obj) >= OOB_MIN:
        return F_RAW_BYTES, b"", [obj]
    bufs: list = []
    wrapped = _wrap(obj)
    try:
        meta = pickle.dumps(wrapped, 5, buffer_callback=bufs.append)
    except Exception:
        import cloudpickle

        bufs = []
        try:
            meta = cloudpickle.dumps(wrapped, 5, buffer_callback=bufs.append)
        except Exception as exc:
            from .errors import SerializationError

            raise SerializationError(f"cannot pickle the message ({type(obj).__qualname__}): "
                                     f"{type(exc).__name__}: {exc}") from exc
    if bufs and sum(b.raw().nbytes for b in bufs) < OOB_MIN:
        try:   # small arrays: in band is cheaper than a buffer of their own at each end
            return 0, pickle.dumps(wrapped, 5), []
        except Exception:
            pass
    return 0, meta, [b.raw() for b in bufs]


def loads(flags: int, meta: bytes, bufs: list) -> Any:
    """The object a message carries (numpy arrays arrive backed by the received, writable buffers)."""
    if flags & F_RAW_BYTES:
        return bufs[0]
    return pickle.loads(meta, buffers=bufs) if bufs else pickle.loads(meta)


def _skip(parts: list, n: int) -> list:
    out = []
    for p in parts:
        ln = p.nbytes if isinstance(p, memoryview) else len(p)
        if n >= ln:
            n -= ln
            continue
        out.append(memoryview(p)[n:])
        n = 0
    return out


# ----------------------------------------------------------------------------------------- mailbox
class Message:
    __slots__ = ("src", "ctx", "tag", "flags", "meta", "bufs", "size")

    def __init__(self, src, ctx, tag, flags, meta, bufs, size):
        self.src, self.ctx, self.tag, self.flags, self.meta, self.bufs, self.size = (
            src, ctx, tag, flags, meta, bufs, size)


class Mailbox:
    """Messages that arrived for this rank, matched MPI style: a message goes to the first posted
    receive that matches it (in posting order), else waits in the unexpected queue (in arrival order)."""

    def __init__(self, cap: int):
        self.cond = threading.Condition(threading.Lock())
        self.unexpected: "collections.deque[Message]" = collections.deque()
        self.posted: List[list] = []          # [ctx, src, tag, Message or None]
        self.queued: Dict[int, int] = collections.Counter()   # bytes waiting, per source
        self.cap = cap
        self.aborted: Optional[BaseException] = None
        self.before_wait: Any = None           # the endpoint's flush: written before we wait

    @staticmethod
    def _match(m: Message, ctx: int, src: int, tag: int) -> bool:
        return m.ctx == ctx and (src < 0 or m.src == src) and (tag < 0 or m.tag == tag)

    def deliver(self, m: Message) -> None:
        with self.cond:
            for p in self.posted:
                if p[3] is None and self._match(m, p[0], p[1], p[2]):
                    p[3] = m
                    self.posted.remove(p)
                    self.cond.notify_all()
                    return
            self.unexpected.append(m)
            self.queued[m.src] += m.size
            self.cond.notify_all()

    def wait_room(self, src: int, stop: threading.Event) -> None:
        """Flow control: the reader of ``src`` waits while that source's unreceived bytes exceed the cap."""
        with self.cond:
            while self.queued[src] > self.cap and not stop.is_set() and self.aborted is None:
                self.cond.wait(POLL)

    def post(self, ctx: int, src: int, tag: int) -> list:
        """Post a receive: it takes the first matching unexpected message now, or the next one to come."""
        with self.cond:
            for m in self.unexpected:
                if self._match(m, ctx, src, tag):
                    self.unexpected.remove(m)
                    self.queued[m.src] -= m.size
                    self.cond.notify_all()
                    return [ctx, src, tag, m]
            p = [ctx, src, tag, None]
            self.posted.append(p)
            return p

    def cancel(self, p: list) -> None:
        with self.cond:
            if p in self.posted:
                self.posted.remove(p)

    def wait(self, p: list, deadline: Optional[float]) -> Optional[Message]:
        """The message of a posted receive, waiting until ``deadline``; None on timeout."""
        if p[3] is None and self.before_wait is not None:
            self.before_wait()
        with self.cond:
            while p[3] is None:
                if self.aborted is not None:
                    raise Aborted()
                left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
                if left <= 0:
                    return None
                self.cond.wait(left)
            return p[3]

    def probe(self, ctx: int, src: int, tag: int, deadline: Optional[float], block: bool) -> Optional[Message]:
        if self.before_wait is not None:
            self.before_wait()
        with self.cond:
            while True:
                if self.aborted is not None:
                    raise Aborted()
                for m in self.unexpected:
                    if self._match(m, ctx, src, tag):
                        return m
                if not block:
                    return None
                left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
                if left <= 0:
                    return None
                self.cond.wait(left)

    def abort(self, exc: BaseException) -> None:
        with self.cond:
            if self.aborted is None:
                self.aborted = exc
            self.cond.notify_all()
