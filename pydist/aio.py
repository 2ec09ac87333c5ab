"""asyncio face of the executor: ``AsyncClusterExecutor`` (or ``ClusterExecutor(...).asyncio()``).

::

    async with AsyncClusterExecutor(ns="ns-host:9090") as ex:
        y = await ex.submit(f, x)                   # the result (submit returns an asyncio.Task)
        ys = await ex.map(f, xs)                    # results, in order
        async for fut in ex.as_completed([ex.submit(f, x) for x in xs]):
            print(fut.result())                     # done futures, as they finish

How it stays off the event loop::

    coroutine ──(one "pydist-aio-submit" thread: pickle + send)──▶ ClusterExecutor ──▶ cluster
        ▲                                                                              │
        └── asyncio future ◀── loop.call_soon_threadsafe ◀── PydistFuture done callback ◀┘

Nothing here blocks the running loop: opening the executor (which may start a ``LocalCluster``),
pickling and sending run in a helper thread, shutting down and cancelling in another; waiting for a
result holds no thread at all (the future's done callback wakes the loop).  So it works inside a loop
someone else runs (Jupyter's).  Cancelling the coroutine that awaits a result cancels its pydist task:
a task not yet started never runs (wherever it waits: ``pydist.cancelling``); one already running
finishes on its worker and its result is dropped (as ``concurrent.futures`` does).  The cancelled
coroutine ends once the cluster has answered (in a helper thread; the loop keeps running), so code
that goes on after ``await``-ing a cancelled task knows its pydist task is withdrawn or started.

``loop.run_in_executor(ClusterExecutor(...), fn, *args)`` works as well: ``ClusterExecutor`` is a
``concurrent.futures.Executor``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, Optional, TypeVar

if TYPE_CHECKING:
    from .executor import ClusterExecutor

__all__ = ["AsyncClusterExecutor"]

T = TypeVar("T")


def _apply_chunk(fn: Callable[..., Any], chunk: list) -> list:
    return [fn(*args) for args in chunk]


def _copy_outcome(src: concurrent.futures.Future, dst: asyncio.Future) -> None:
    if dst.done():
        return
    if src.cancelled():
        dst.cancel()
        return
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())


class AsyncClusterExecutor:
    """A ``ClusterExecutor`` for asyncio code.

    ``AsyncClusterExecutor(...)`` takes exactly what ``ClusterExecutor`` takes (``address=``, ``ns=``,
    ``max_workers=``, ``secret=``, ``code=``, ...) and opens it, in a helper thread, on ``async with`` or
    on first use; ``AsyncClusterExecutor(executor=ex)`` (what ``ex.asyncio()`` returns) wraps one that is
    open already.  Leaving ``async with`` (or ``await ex.shutdown()``) shuts the executor down, the
    wrapped one included.
    """

    def __init__(self, *args: Any, executor: Optional["ClusterExecutor"] = None, **kwargs: Any) -> None:
        if executor is not None and (args or kwargs):
            raise ValueError("give either executor= or ClusterExecutor's arguments, not both")
        self._args, self._kwargs = args, kwargs
        self._executor = executor
        self._opening: Optional[asyncio.Future] = None
        self._submitter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pydist-aio-submit")
        self._helper = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pydist-aio-cancel")
        self._closed = False

    # ------------------------------------------------------------------------------------ lifecycle
    @property
    def executor(self) -> "ClusterExecutor":
        """The underlying ``ClusterExecutor`` (RuntimeError before it is open)."""
        if self._executor is None:
            raise RuntimeError("the executor is not open yet: use 'async with' or 'await ex.start()'")
        return self._executor

    async def start(self) -> "AsyncClusterExecutor":
        """Open the executor (in a helper thread; idempotent)."""
        await self._ensure()
        return self

    async def _ensure(self) -> "ClusterExecutor":
        if self._executor is not None:
            return self._executor
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        loop = asyncio.get_running_loop()
        if self._opening is None:
            from .executor import ClusterExecutor

            self._opening = asyncio.ensure_future(loop.run_in_executor(
                self._submitter, lambda: ClusterExecutor(*self._args, **self._kwargs)))
        ex = await asyncio.shield(self._opening)
        self._executor = ex
        return ex

    async def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``ClusterExecutor.shutdown`` in a helper thread; the loop keeps running meanwhile."""
        self._closed = True
        ex = self._executor
        if ex is None and self._opening is not None:
            try:
                ex = await asyncio.shield(self._opening)
            except Exception:
                ex = None
        loop = asyncio.get_running_loop()
        if ex is not None:
            await loop.run_in_executor(self._helper, lambda: ex.shutdown(wait=wait, cancel_futures=cancel_futures))
        self._submitter.shutdown(wait=False)
        self._helper.shutdown(wait=False)

    async def __aenter__(self) -> "AsyncClusterExecutor":
        await self._ensure()
        return self

    async def __aexit__(self, exc_type: Optional[type] = None, *exc: Any) -> None:
        ex = self._executor
        if exc_type is not None and ex is not None:   # as ``with``: a running group's ranks may wait forever
            from .taskgroup import abort_unfinished

            why = f"the async with block of its AsyncClusterExecutor exited by {exc_type.__name__}"
            await asyncio.get_running_loop().run_in_executor(self._helper, lambda: abort_unfinished(ex, why))
        await self.shutdown(wait=True, cancel_futures=exc_type is not None)

    # ------------------------------------------------------------------------------------ tasks
    async def _send(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (pickle + send) in the submit thread; if we are cancelled meanwhile, the futures it
        returns are cancelled as soon as it finishes (nothing submitted is left running unawaited)."""
        loop = asyncio.get_running_loop()
        cf = loop.run_in_executor(self._submitter, fn)
        try:
            return await asyncio.shield(cf)
        except asyncio.CancelledError:
            def undo(c: asyncio.Future) -> None:
                if not c.cancelled() and c.exception() is None:
                    got = c.result()
                    for f in (got if isinstance(got, list) else [got]):
                        self._cancel_soon(f)
            cf.add_done_callback(undo)
            raise

    def _cancel_soon(self, fut: concurrent.futures.Future) -> None:
        if not fut.done():
            try:
                self._helper.submit(fut.cancel)
            except RuntimeError:   # helper already shut down: cancel here (a short round trip)
                fut.cancel()

    def _watch(self, fut: concurrent.futures.Future) -> asyncio.Future:
        """An asyncio future that mirrors ``fut``, woken through the loop; holds no thread."""
        loop = asyncio.get_running_loop()
        afut = loop.create_future()

        def done(f: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(_copy_outcome, f, afut)
            except RuntimeError:   # the loop is closed: nobody is waiting any more
                pass

        fut.add_done_callback(done)
        return afut

    async def _cancel_now(self, futs: list) -> None:
        """Cancel pydist futures in a helper thread and wait for the cluster's answer without blocking
        the loop; being cancelled again stops the waiting, never the cancelling."""
        futs = [f for f in futs if not f.done()]
        if not futs:
            return
        loop = asyncio.get_running_loop()
        try:
            cf = loop.run_in_executor(self._helper, self.executor._core.cancel_many, futs)
        except RuntimeError:   # helper already shut down: cancel here (one short round trip)
            self.executor._core.cancel_many(futs)
            return
        try:
            await asyncio.shield(cf)
        except asyncio.CancelledError:
            pass

    async def _wait(self, fut: concurrent.futures.Future) -> Any:
        try:
            return await self._watch(fut)
        except asyncio.CancelledError:
            await self._cancel_now([fut])
            raise

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "asyncio.Task[T]":
        """Schedule ``fn(*args, **kwargs)`` on the cluster (sent at once, from the helper thread); returns
        an ``asyncio.Task``: ``await`` it for the result (or its exception).  Cancelling it, or the task
        awaiting it, cancels the pydist task.  Call from a coroutine (a running loop)."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        asyncio.get_running_loop()   # RuntimeError here, not in a task nobody awaits
        return asyncio.ensure_future(self._submit(fn, args, kwargs))

    async def _submit(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        ex = await self._ensure()
        fut = await self._send(lambda: ex.submit(fn, *args, **kwargs))
        return await self._wait(fut)

    async def map(self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: Optional[float] = None,
                  chunksize: int = 1) -> list:
        """``list(Executor.map(fn, *iterables))`` without blocking the loop: every call is sent at once,
        the results come back in order.  On an error, a timeout (``TimeoutError``) or cancellation the
        calls not yet finished are cancelled."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        ex = await self._ensure()
        calls = list(zip(*iterables))

        def send() -> list:
            if chunksize == 1:
                return [ex.submit(fn, *a) for a in calls]
            it = iter(calls)
            chunks = iter(lambda: list(itertools.islice(it, chunksize)), [])
            return [ex.submit(_apply_chunk, fn, c) for c in chunks]

        futs = await self._send(send)
        waits = [self._watch(f) for f in futs]
        try:
            done = await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except BaseException:
            await self._cancel_now(futs)
            raise
        if chunksize == 1:
            return list(done)
        return [r for chunk in done for r in chunk]

    async def as_completed(self, aws: Iterable[Any], timeout: Optional[float] = None) -> AsyncIterator[asyncio.Future]:
        """Yield each of ``aws`` (coroutines such as ``ex.submit(...)``, asyncio futures or tasks,
        ``concurrent.futures`` futures) as a *done* asyncio future, in the order they finish.
        ``timeout`` (s, for the whole iteration) raises ``TimeoutError`` with the rest cancelled."""
        loop = asyncio.get_running_loop()
        pending = set()
        for a in aws:
            if isinstance(a, concurrent.futures.Future):
                pending.add(self._watch_cancellable(a))
            else:
                pending.add(asyncio.ensure_future(a))
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while pending:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise TimeoutError(f"{len(pending)} of the awaited calls did not finish within {timeout} s")
                for d in done:
                    yield d
        finally:
            for p in pending:
                p.cancel()

    def _watch_cancellable(self, fut: concurrent.futures.Future) -> asyncio.Future:
        return asyncio.ensure_future(self._wait(fut))

    async def upload_code(self, path: str, **kwargs: Any) -> Any:
        """``ClusterExecutor.upload_code`` in the submit thread (tasks sent after it see the code)."""
        ex = await self._ensure()
        return await self._send(lambda: ex.upload_code(path, **kwargs))

    async def status(self) -> dict:
        """``ClusterExecutor.status`` without blocking the loop."""
        ex = await self._ensure()
        return await asyncio.get_running_loop().run_in_executor(self._helper, ex.status)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._executor is not None else "not open yet")
        return f"<AsyncClusterExecutor {state}>"

