"""Progress bars for futures: ``pydist.progress(futures)`` and ``ClusterExecutor.map(..., progress=True)``.

The bar is ``tqdm.auto`` (a text bar in a terminal, a widget in Jupyter), with rate and ETA.  It moves when
a future *finishes* (a done-callback, run by the executor's collector thread), not when the caller reads a
result, so the rate is the cluster's.  tqdm is an optional extra: ``pip install 'pydist[progress]'``.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Iterable, List, Optional

from .errors import ConfigError


def _tqdm():
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError("progress bars need tqdm: pip install 'pydist[progress]' (or pip install tqdm)") from None
    return tqdm


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
