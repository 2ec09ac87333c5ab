"""Progress bars for futures: ``pydist.progress(futures)`` and ``ClusterExecutor.map(..., progress=True)``.

The bar is ``tqdm.auto`` (a text bar in a terminal, a widget in Jupyter), with rate and ETA.  It moves when
a future *finishes* (a done-callback, run by the executor's collector thread), not when the caller reads a
result, so the rate is the cluster's.  tqdm is an optional extra: ``pip install 'pydist[progress]'``.

tqdm's own ``process_map`` machinery works with ``ClusterExecutor`` too:
``tqdm.contrib.concurrent._executor_map(ClusterExecutor, fn, items, lock_name="mp_lock")`` (or
``process_map`` with ``concurrent.futures.ProcessPoolExecutor`` swapped for ``ClusterExecutor``).  It
counts every call (its patched ``ex.submit`` sees each of them: ``ClusterExecutor.map`` goes through an
overridden ``submit``), and its initializer, ``tqdm_class.set_lock`` with a ``multiprocessing`` lock,
is replaced by ``portable_initializer``: each worker gets a write lock of its own (what tasks print
reaches the client line by line through pydist's output forwarding, so no lock is shared with it).
"""
from __future__ import annotations

import sys
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterable, List, Optional, Tuple

from .errors import ConfigError


def _tqdm():
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError("progress bars need tqdm: pip install 'pydist[progress]' (or pip install tqdm)") from None
    return tqdm


def portable_initializer(initializer: Callable, initargs: tuple) -> Tuple[Callable, tuple]:
    """What a ``ClusterExecutor`` ships to its workers for ``initializer(*initargs)``.

    tqdm's ``_executor_map`` (behind ``process_map``) passes ``tqdm_class.set_lock`` with a
    ``multiprocessing`` lock, which can only be inherited by a child process, never sent to one on
    another machine.  That initializer only lets bars drawn in tasks share the parent's terminal lock;
    on a cluster each worker gets its own lock instead (``_own_tqdm_lock``).  Every other initializer
    is shipped as given (a ``multiprocessing`` lock there is refused, with what to do instead)."""
    std = sys.modules.get("tqdm.std")
    owner = getattr(initializer, "__self__", None)
    if std is not None and isinstance(owner, type) and issubclass(owner, std.tqdm) \
            and getattr(initializer, "__func__", None) is std.tqdm.set_lock.__func__:
        return _own_tqdm_lock, (owner.__module__, owner.__qualname__)
    return initializer, initargs


def _own_tqdm_lock(module: str, qualname: str) -> None:
    """(worker) Give tqdm class ``module.qualname`` a write lock of this process (nothing if the worker
    has no tqdm: then no task of it draws a bar)."""
    import importlib

    try:
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError):
        return
    cls.get_lock()


class ProgressBar:
    """A tqdm bar that advances by ``n`` when each attached future finishes; closes itself once ``total``
    is reached (or on ``close()``).  Thread-safe."""

    def __init__(self, total: Optional[int] = None, *, desc: Optional[str] = None, unit: str = "task",
                 **tqdm_kwargs: Any):
        self._bar = _tqdm()(total=total, desc=desc, unit=unit, dynamic_ncols=True, **tqdm_kwargs)
        self._lock = threading.Lock()
        self._done = 0
        self._closed = False
        self.total = total

    @property
    def n(self) -> int:
        """How many have finished so far."""
        return self._done

    def attach(self, fut: Future, n: int = 1) -> Future:
        """Advance the bar by ``n`` when ``fut`` finishes (at once if it already has)."""
        fut.add_done_callback(lambda f: self.advance(n))
        return fut

    def set_total(self, total: int) -> None:
        """Known only later (e.g. a map over a generator): set it now."""
        with self._lock:
            self.total = total
            if not self._closed:
                self._bar.total = total
                self._bar.refresh()
            finish = self._done >= total
        if finish:
            self.close()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            if self._closed:
                return
            self._done += n
            self._bar.update(n)
            finish = self.total is not None and self._done >= self.total
        if finish:
            self.close()

    def close(self) -> None:
        """Stop drawing (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._bar.close()


def progress(futures: Iterable[Future], *, desc: Optional[str] = None, wait: bool = True,
             **tqdm_kwargs: Any) -> List[Future]:
    """Show a progress bar (rate and ETA) over ``futures`` as they finish; with ``wait`` (default) block
    until all are done.  Returns the futures, in the order given::

        futs = [ex.submit(simulate, s) for s in range(1000)]
        pydist.progress(futs)
    """
    fs = list(futures)
    bar = ProgressBar(len(fs), desc=desc, **tqdm_kwargs)
    if not fs:
        bar.close()
        return fs
    for f in fs:
        bar.attach(f)
    if wait:
        from concurrent.futures import wait as _wait

        try:
            _wait(fs)
        finally:
            bar.close()
    return fs


__all__ = ["progress", "ProgressBar"]
