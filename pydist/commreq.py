"""A rank's pending operations and what they found: ``Request`` (``isend``/``irecv``), ``Status``,
``CommTimeout`` and the tag/source wildcards.  ``pydist.comm`` re-exports every name here.

::

    comm.isend(obj, dest) ──▶ Request(kind="send", handle=(item, dest, peer))   wait(): until the peer's
                                                                               writer sent the item
    comm.irecv(source, tag) ─▶ Request(kind="recv", handle=posted receive)      wait(): until the mailbox
                                                                               matched it (Status filled in)
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from . import commnet

if TYPE_CHECKING:
    from .comm import Comm

__all__ = ["ANY_SOURCE", "ANY_TAG", "TAG_UB", "CommTimeout", "Status", "Request", "waitall"]

ANY_SOURCE = -1
ANY_TAG = -1
TAG_UB = (1 << 62) - 1   # largest user tag

class CommTimeout(TimeoutError):
    """A blocking call of a ``Comm`` waited longer than its ``timeout``."""


class Status:
    """What a receive or probe found: ``source``, ``tag`` and ``size`` (bytes of the pickled message)."""

    __slots__ = ("source", "tag", "size")

    def __init__(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, size: int = 0):
        self.source, self.tag, self.size = source, tag, size

    @property
    def count(self) -> int:
        """Same as ``size`` (mpi4py's name)."""
        return self.size

    def Get_source(self) -> int:
        """``source`` (mpi4py's spelling)."""
        return self.source

    def Get_tag(self) -> int:
        """``tag`` (mpi4py's spelling)."""
        return self.tag

    def Get_count(self) -> int:
        """``size``: bytes of the pickled message (mpi4py's spelling)."""
        return self.size

    def __repr__(self) -> str:
        return f"Status(source={self.source}, tag={self.tag}, size={self.size})"


class Request:
    """A pending ``isend`` or ``irecv``: ``wait()`` for it, ``test()`` whether it is done."""

    def __init__(self, comm: "Comm", kind: str, handle: Any, status_src: Any = None):
        self._comm, self._kind, self._h = comm, kind, handle
        self._done = False
        self._value: Any = None
        self._status: Optional[Status] = None

    def wait(self, status: Optional[Status] = None, timeout: Optional[float] = None) -> Any:
        """Block until done; an ``irecv`` returns the object received (``status`` filled in)."""
        if not self._done:
            c = self._comm
            if self._kind == "send":
                deadline = _deadline(timeout)
                with c._net.peer(self._h[2]).cond if self._h[2] is not None else _nolock:
                    while not self._h[0][1]:
                        c._check_live()
                        p = c._net.peers.get(self._h[2])
                        if p is not None and p.error is not None:
                            raise c._translate(p.error)
                        if deadline is not None and time.monotonic() >= deadline:
                            raise CommTimeout(f"rank {c.rank}: isend to rank {self._h[1]} not done "
                                              f"within {timeout} s")
                        if p is not None:
                            p.cond.wait(commnet.POLL)
            else:
                self._value, self._status = c._finish_recv(self._h, timeout)
            self._done = True
        if status is not None and self._status is not None:
            status.source, status.tag, status.size = self._status.source, self._status.tag, self._status.size
        return self._value

    def test(self, status: Optional[Status] = None) -> tuple:
        """``(True, value)`` if done (completing it), else ``(False, None)``; never blocks."""
        if not self._done:
            if self._comm._ep is not None:
                self._comm._net.flush()
            if self._kind == "send":
                if not self._h[0][1]:
                    self._comm._check_live()
                    return False, None
            elif self._h[3] is None:
                self._comm._check_live()
                return False, None
        return True, self.wait(status)

    def cancel(self) -> None:
        """Withdraw a receive that has not matched yet."""
        if self._kind == "recv" and not self._done and self._h[3] is None:
            self._comm._net.mailbox.cancel(self._h)
            self._done = True

    @staticmethod
    def waitall(requests: Sequence["Request"], timeout: Optional[float] = None) -> list:
        """Wait for every request; returns their values in order."""
        deadline = _deadline(timeout)
        return [r.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                for r in requests]

    @staticmethod
    def testall(requests: Sequence["Request"]) -> tuple:
        """``(True, values)`` once every request is done, else ``(False, None)``."""
        if all(r._done or (r._h[0][1] if r._kind == "send" else r._h[3] is not None) for r in requests):
            return True, [r.wait() for r in requests]
        return False, None

    @staticmethod
    def waitany(requests: Sequence["Request"], timeout: Optional[float] = None) -> tuple:
        """``(index, value)`` of the first request that is done."""
        deadline = _deadline(timeout)
        while True:
            for i, r in enumerate(requests):
                ok, v = r.test()
                if ok:
                    return i, v
            if deadline is not None and time.monotonic() >= deadline:
                raise CommTimeout(f"no request completed within {timeout} s")
            time.sleep(0.0002)


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


_nolock = _NoLock()


def waitall(requests: Sequence[Request], timeout: Optional[float] = None) -> list:
    """``Request.waitall``."""
    return Request.waitall(requests, timeout)


def _deadline(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
    return time.monotonic() + timeout
