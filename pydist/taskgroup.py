"""The client's handle of a task group: ``TaskGroup`` (what ``ClusterExecutor.spawn_group`` returns).

::

    spawn_group(fn, size, *args) ─▶ group_open (home node: token, control address; refused at once if
        the cluster can never hold size ranks) ─▶ group_submit(all rank tasks, one unit) ─▶ TaskGroup
    TaskGroup.futures[r] ◀── results like any task's (the executor's collector)

A group is one unit on the node: it starts when ``size`` workers are reserved at once, and if a rank
fails every other rank's future fails with ``GroupAborted`` (its ``__cause__`` is the failing rank's
exception).  With ``restart=N`` a failed group runs again as a whole, up to N more times; the futures
then resolve when an attempt has finished.

A group not finished when its ``with ClusterExecutor()`` block is left by an exception is aborted
(``abort_unfinished``): its ranks may wait on each other forever, and ``__exit__`` waits for every future.
"""
from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional

from . import wire
from .errors import GroupAborted

if TYPE_CHECKING:   # pragma: no cover
    from .executor import ClusterExecutor

GROUP_WAIT_NOTE = "waiting"

log = logging.getLogger("pydist.executor")

#: executor -> its groups not finished yet (held strongly until done: a dropped TaskGroup still has ranks)
_unfinished: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()
_unfinished_lock = threading.Lock()


def abort_unfinished(ex: Any, reason: str) -> int:
    """Abort every group of ``ex`` not finished yet (``ClusterExecutor.__exit__`` on an exception);
    returns how many.  Errors are logged, never raised: the caller is already handling one."""
    with _unfinished_lock:
        groups = [g for g in _unfinished.get(ex, ()) if not g.done()]
    for g in groups:
        try:
            g.abort(reason)
        except Exception as exc:   # noqa: BLE001 - the cluster may be gone: its futures fail anyway
            log.warning("could not abort task group %s: %s", g.gid, exc)
    return len(groups)


class TaskGroup:
    """``size`` ranks that start together and fail together.

    Behaves like the list of the ranks' futures (iterable, indexable, ``len``), plus ``futures``,
    ``results(timeout=)``, ``done()``, ``cancel()``, ``abort(reason)`` and ``state``."""

    def __init__(self, ex: "ClusterExecutor", fn: Callable, size: int, args: tuple, kwargs: dict, restart: int = 0):
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(restart, bool) or not isinstance(restart, int) or restart < 0:
            raise ValueError(f"restart must be an int >= 0, got {restart!r}")
        self._ex, self._fn, self.size, self._args, self._kwargs = ex, fn, size, args, kwargs
        self.restarts_left = restart
        self.attempts = 0
        self._lock = threading.Lock()
        self.gid = ""
        inner = self._launch()
        if restart == 0:
            self.futures: List[Future] = inner
        else:
            self.futures = [Future() for _ in range(size)]
            self._watch(inner)
        self._track()

    # -------------------------------------------------------------------------------- list-like
    def __iter__(self) -> Iterator[Future]:
        return iter(self.futures)

    def __len__(self) -> int:
        return len(self.futures)

    def __getitem__(self, i):
        return self.futures[i]

    def __repr__(self) -> str:
        return f"<TaskGroup {self.gid} size={self.size} {self.state}>"

    # -------------------------------------------------------------------------------- API
    def results(self, timeout: Optional[float] = None) -> List[Any]:
        """Every rank's return value, in rank order.  If the group failed: raises the failing rank's
        ``GroupAborted`` (naming the rank and the cause; the rank's own exception is its ``__cause__``)."""
        done, pending = wait(self.futures, timeout, return_when=FIRST_EXCEPTION)
        failed = [f for f in self.futures if f.done() and not f.cancelled() and f.exception() is not None]
        if failed:
            wait(self.futures, timeout)
            excs = [f.exception() for f in self.futures if f.done() and not f.cancelled() and f.exception()]
            for e in excs:
                if isinstance(e, GroupAborted):
                    raise e
            e = excs[0]
            rank = next(r for r, f in enumerate(self.futures) if f.done() and not f.cancelled()
                        and f.exception() is e)
            raise GroupAborted(self.gid, rank, f"raised {type(e).__name__}: {e}") from e
        if pending:
            from concurrent.futures import TimeoutError as FTimeout

            raise FTimeout(f"task group {self.gid}: {len(pending)} of {self.size} ranks not done "
                           f"within {timeout} s ({self.state})")
        return [f.result() for f in self.futures]

    def done(self) -> bool:
        """Whether every rank has finished (successfully or not)."""
        return all(f.done() for f in self.futures)

    def cancel(self) -> bool:
        """Withdraw the group if it has not started (True); a running group is aborted instead
        (False, as ``Future.cancel`` for running work)."""
        self.restarts_left = 0
        if all(f.cancel() for f in self._inner):
            for f in self.futures:
                f.cancel()
            return True
        self.abort("cancelled by the client")
        return False

    def abort(self, reason: str = "aborted by the client") -> None:
        """Abort the group: every rank's blocked call raises ``GroupAborted``, futures fail with it."""
        self.restarts_left = 0
        p = self._ex._connect()
        try:
            p.group_abort(self._ex._cid, self.gid, str(reason))
        finally:
            p._pyroRelease()

    @property
    def state(self) -> str:
        """``waiting: <why>`` until ``size`` workers are free at once, ``running``, ``done``,
        ``failed``, ``cancelled`` (one round trip to the home node while not done)."""
        if self.done():
            if any(f.cancelled() for f in self.futures):
                return "cancelled"
            return "failed" if any(f.exception() is not None for f in self.futures) else "done"
        p = self._ex._connect()
        try:
            st = p.group_state(self._ex._cid, self.gid)
        finally:
            p._pyroRelease()
        return "running" if st == "unknown" else st

    def _track(self) -> None:
        """Be listed in ``_unfinished`` until every rank's future is done."""
        with _unfinished_lock:
            _unfinished.setdefault(self._ex, set()).add(self)
        left = [len(self.futures)]

        def one_done(_f: Future) -> None:
            with _unfinished_lock:
                left[0] -= 1
                if not left[0]:
                    _unfinished.get(self._ex, set()).discard(self)

        for f in self.futures:
            f.add_done_callback(one_done)

    # -------------------------------------------------------------------------------- attempts
    def _launch(self) -> List[Future]:
        from .comm import Comm, run_rank
        from .executor import PydistFuture
        from .groups import rank_tid

        ex = self._ex
        ex._check_open()
        gid = f"{ex._cid}.g{next(ex._fn_seq)}"
        p = ex._connect()
        try:
            info = p.group_open(ex._cid, gid, self.size)
            key, blob = ex._fn_key(run_rank)
            recs: list = []
            futs: List[Future] = []
            with ex._lock:
                ex._check_open()
                for r in range(self.size):
                    tid = rank_tid(gid, r)
                    payload = wire.dumps_call((self._fn, Comm(gid, r, self.size, info["home"], info["token"]),
                                               self._args, self._kwargs), {})
                    fut = PydistFuture()
                    fut._pydist_tid = tid
                    fut._pydist_exec = ex._wref
                    ex._pending[tid] = fut
                    futs.append(fut)
                    recs.append((tid, key, payload, ex._bundle, 0, [], wire.KIND_RANK, ex._cid))
            try:
                p.group_submit(ex._cid, gid, {key: blob}, recs)
            except BaseException:
                with ex._lock:
                    for f in futs:
                        ex._pending.pop(getattr(f, "_pydist_tid", ""), None)
                raise
        finally:
            p._pyroRelease()
        self.gid = gid
        self.attempts += 1
        self._inner = futs
        return futs

    def _watch(self, inner: List[Future]) -> None:
        left = [len(inner)]

        def one_done(_f):
            with self._lock:
                left[0] -= 1
                if left[0]:
                    return
            threading.Thread(target=self._attempt_over, args=(inner,), daemon=True,
                             name="pydist-group-restart").start()

        for f in inner:
            f.add_done_callback(one_done)

    def _attempt_over(self, inner: List[Future]) -> None:
        failed = any(f.cancelled() or f.exception() is not None for f in inner)
        if failed and self.restarts_left > 0:
            self.restarts_left -= 1
            try:
                self._watch(self._launch())
                return
            except BaseException as exc:   # could not start again: the group fails with this
                for f in self.futures:
                    if not f.done():
                        f.set_exception(exc)
                return
        for f, src in zip(self.futures, inner):
            if f.done():
                continue
            if src.cancelled():
                f.cancel()
                f.set_running_or_notify_cancel()
            elif src.exception() is not None:
                f.set_exception(src.exception())
            else:
                f.set_result(src.result())
