"""The future a ``ClusterExecutor`` returns, and how the client resolves it.

::

    ClientCore._deliver ──▶ _resolve(f, value | exc) ──▶ PydistFuture (done callbacks: never end the thread)
    user: f.cancel() ──▶ ClientCore._cancel_remote ──▶ node (asks the worker / node it was sent ahead to)

``PydistFuture`` is a ``concurrent.futures.Future``; what it adds: ``cancel()`` reaches the task wherever
it waits, looking at a lone task's outcome tells the client the caller waits task by task
(``Node.submit_wait``), and a done callback raising ``SystemExit`` cannot end the collector thread.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import PENDING as _PENDING
from concurrent.futures._base import RUNNING as _RUNNING
from typing import Any, Callable, Optional

from .errors import DeserializationError, RemoteError

log = logging.getLogger("pydist.executor")

__all__ = ["PydistFuture"]


class PydistFuture(Future):
    """A ``concurrent.futures.Future`` for a pydist task.

    ``cancel()`` asks the node (one round trip; the node asks the worker or node the task was sent
    ahead to, see ``pydist.cancelling``) and succeeds only if the task has not started anywhere, so a
    cancelled task never runs; otherwise the future is marked running and ``cancel()`` returns False,
    as ``ProcessPoolExecutor`` does for started work.  A future marked running by the node's "started"
    note is asked about too (the note says what its worker runs next, or a task was forwarded): if the
    task is withdrawn after all, the future is cancelled.
    """

    _pydist_tid: str = ""
    _pydist_exec: Any = None
    _pydist_seen: Optional[list] = None   # a lone task's cell: set once the caller looks at its outcome

    # Looking at a lone task's outcome (result, exception, done, a callback) before the next submit is
    # what a caller waiting for one task at a time does; only then does the next lone submit wait in
    # the node for its result (``ClientCore._enqueue``): a burst of submits (a map, a loop that keeps
    # the futures for later) never waits, or each short task would be sent only after the last one
    # finished.
    def result(self, timeout: Optional[float] = None) -> Any:
        """As ``Future.result`` (and notes that the caller looked at the outcome)."""
        if self._pydist_seen is not None:
            self._pydist_seen[0] = True
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """As ``Future.exception`` (and notes that the caller looked at the outcome)."""
        if self._pydist_seen is not None:
            self._pydist_seen[0] = True
        return super().exception(timeout)

    def done(self) -> bool:
        """As ``Future.done`` (and notes that the caller looked at the outcome)."""
        if self._pydist_seen is not None:
            self._pydist_seen[0] = True
        return super().done()

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        """As ``Future.add_done_callback`` (and notes that the caller looked at the outcome)."""
        if self._pydist_seen is not None:
            self._pydist_seen[0] = True
        super().add_done_callback(fn)

    def cancel(self) -> bool:
        """Withdraw the task if no worker has started it (True, as ``Future.cancel``); False once it runs."""
        with self._condition:
            if self._state not in (_PENDING, _RUNNING):
                return super().cancel()
        ex = self._pydist_exec() if self._pydist_exec is not None else None
        if ex is None:
            return super().cancel()
        with ex._cancel_lock:   # two threads cancelling one future agree on the answer
            with self._condition:
                if self._state not in (_PENDING, _RUNNING):
                    return super().cancel()
            if self._pydist_tid not in ex._cancel_remote([self._pydist_tid]):
                self._mark_running()
                return False
            return self._withdrawn()

    def _withdrawn(self) -> bool:
        """The task will never run: the future is cancelled (even if a "started" note marked it
        running), and waiters (``concurrent.futures.wait``) are told at once."""
        with self._condition:
            if self._state == _RUNNING:
                self._state = _PENDING
        ok = super().cancel()
        if ok:
            self.set_running_or_notify_cancel()
        return ok

    def _invoke_callbacks(self) -> None:
        # concurrent.futures catches only Exception here: a callback raising SystemExit or
        # KeyboardInterrupt would end the thread that resolved the future (our collector) for good
        for callback in self._done_callbacks:  # type: ignore[attr-defined]
            try:
                callback(self)
            except BaseException:
                log.exception("exception calling callback for %r", self)

    def _mark_running(self) -> None:
        with self._condition:
            if self._state == _PENDING:
                self.set_running_or_notify_cancel()


def _unpickling_error(what: str, exc: BaseException) -> DeserializationError:
    import traceback

    err = DeserializationError(f"{what} could not be unpickled here: {type(exc).__name__}: {exc}")
    err.__cause__ = RemoteError("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return err


def _resolve(f: Future, value: Any = None, exc: Optional[BaseException] = None) -> None:
    """Set a future's outcome; a future cancelled meanwhile keeps its state."""
    try:
        if exc is not None:
            f.set_exception(exc)
        else:
            f.set_result(value)
    except InvalidStateError:
        pass
    except BaseException:   # only from a foreign Future subclass's callbacks: never end our thread
        log.exception("setting the outcome of %r raised", f)
