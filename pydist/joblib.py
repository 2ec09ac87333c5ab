"""A joblib backend: ``joblib.Parallel`` and scikit-learn's ``n_jobs`` on a pydist cluster.

::

    import pydist.joblib                                     # registers the "pydist" backend
    with joblib.parallel_backend("pydist", ns="ns-host:9090"):       # or address="host:port",
        joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)  # or nothing: a LocalCluster
        GridSearchCV(model, grid, n_jobs=-1).fit(X, y)

How it maps onto joblib::

    Parallel ──batch of calls (BatchedCalls)──▶ PydistBackend.submit ──▶ ClusterExecutor.submit
       ▲                                                                     │ one pydist task per batch
       └── callback (joblib dispatches the next batch) ◀── future done ◀─────┘

* ``n_jobs=-1`` is the cluster's worker count (every node's workers, read from the entry node when the
  ``Parallel`` call starts; at most the executor's ``max_workers``); ``n_jobs=-k`` that count + 1 - k;
  a positive ``n_jobs`` is taken as is and only bounds how many batches joblib keeps in flight.
* Batching is joblib's auto batching (``batch_size="auto"``), tuned to hide a network round trip.
* ``return_as="generator"`` and callbacks work as with loky (``supports_retrieve_callback``).
* When a call raises, joblib aborts: every batch not yet started is withdrawn from the cluster (it never
  runs); batches already running finish and their results are dropped.  (Loky kills its workers
  instead; a pydist worker is shared with other clients and is never killed for one of them.)
* A ``Parallel`` nested inside a task runs on threads inside that worker (joblib's default for the first
  nesting level), never back on the cluster, so nested calls cannot deadlock the cluster.

Executors: with ``executor=`` the backend uses yours and never shuts it down; otherwise it opens one
(``address=``, ``ns=``, other keywords go to ``ClusterExecutor``) on first use and shuts it (and its
``LocalCluster``) down when the backend is garbage collected, at interpreter exit or on
``pydist.joblib.shutdown()``.  The module is named ``joblib`` inside the package; it imports the real
joblib by absolute import.
"""
from __future__ import annotations

import concurrent.futures
import threading
import weakref
from typing import Any, Callable, Optional, Set

try:
    import joblib as _joblib   # absolute import: the real joblib, never this module
    from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase
except ImportError as exc:   # pragma: no cover - depends on the environment
    raise ImportError(f"pydist.joblib needs joblib ({exc}): pip install 'pydist[joblib]'") from exc

from .executor import ClusterExecutor, PydistFuture

__all__ = ["PydistBackend", "register", "shutdown", "BACKEND_NAME"]

BACKEND_NAME = "pydist"

_owned_lock = threading.Lock()
_owned: "weakref.WeakSet[PydistBackend]" = weakref.WeakSet()


def _close(ex: ClusterExecutor) -> None:
    ex.shutdown(wait=True, cancel_futures=True)


class PydistBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib ``ParallelBackendBase`` running each batch of calls as one pydist task.

    ``PydistBackend(address=None, ns=None, executor=None, **executor_kwargs)``; pick it with
    ``joblib.parallel_backend("pydist", ...)`` or ``joblib.parallel_config(backend="pydist", ...)``.
    """

    supports_retrieve_callback = True
    supports_timeout = True
    default_n_jobs = -1
    # a batch crosses the network twice: aim for batches long enough to hide that
    MIN_IDEAL_BATCH_DURATION = 0.2
    MAX_IDEAL_BATCH_DURATION = 1.0

    def __init__(self, address: Optional[str] = None, *, ns: Optional[str] = None,
                 executor: Optional[ClusterExecutor] = None, nesting_level: Optional[int] = None,
                 inner_max_num_threads: Optional[int] = None, **executor_kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if executor is not None and (address is not None or ns is not None or executor_kwargs):
            raise ValueError("give either executor= or the arguments to open one (address=, ns=, ...), "
                             "not both")
        if executor is not None and not isinstance(executor, ClusterExecutor):
            raise TypeError(f"executor must be a pydist.ClusterExecutor, got {type(executor).__name__}")
        self._address = address
        self._ns = ns
        self._kwargs = executor_kwargs
        self._executor = executor
        self._owns = executor is None
        self._lock = threading.Lock()
        self._futures: Set[PydistFuture] = set()
        self._finalizer: Optional[weakref.finalize] = None
        self.parallel: Any = None

    # ------------------------------------------------------------------------------------ executor
    @property
    def executor(self) -> ClusterExecutor:
        """The ``ClusterExecutor`` batches go to (opened on first use)."""
        with self._lock:
            if self._executor is None:
                ex = ClusterExecutor(address=self._address, ns=self._ns, **self._kwargs)
                self._executor = ex
                self._finalizer = weakref.finalize(self, _close, ex)
                with _owned_lock:
                    _owned.add(self)
            return self._executor

    def close(self) -> None:
        """Shut down the executor this backend opened (no-op for one given with ``executor=``)."""
        if self._finalizer is not None:
            self._finalizer()

    def total_workers(self) -> int:
        """Worker processes of the whole cluster, as the entry node sees them."""
        ex = self.executor
        st = ex.status()
        total = st["workers"] + sum(l["workers"] for l in st.get("links", ())
                                    if l.get("alive") and l.get("role") != "parent")
        cap = getattr(ex, "_max_inflight", None)   # ClusterExecutor(..., max_workers=N) on a running cluster
        return max(1, min(int(total), cap) if cap else int(total))

    # ------------------------------------------------------------------------------------ joblib API
    def effective_n_jobs(self, n_jobs: Optional[int]) -> int:
        """``-1``: every worker of the cluster; ``-k``: that + 1 - k; a positive number as is."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if not isinstance(n_jobs, int):
            raise TypeError(f"n_jobs must be an int, got {type(n_jobs).__name__}")
        if n_jobs < 0:
            return max(self.total_workers() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: Optional[int] = 1, parallel: Any = None, prefer: Any = None,
                  require: Any = None, **backend_kwargs: Any) -> int:
        """Called by each ``Parallel`` call: open the executor and return the number of jobs."""
        if require == "sharedmem":
            raise ValueError("the pydist backend runs calls in other processes: it cannot honour "
                             "require='sharedmem' (use the threading backend)")
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Callable[[], Any], callback: Optional[Callable[[Any], Any]] = None) -> PydistFuture:
        """Run one batch of calls as a pydist task."""
        fut = self.executor.submit(func)
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        if callback is not None:
            fut.add_done_callback(callback)
        return fut

    def _forget(self, fut: "concurrent.futures.Future[Any]") -> None:
        with self._lock:
            self._futures.discard(fut)   # type: ignore[arg-type]

    def retrieve_result_callback(self, out: PydistFuture) -> Any:
        """The batch's results (or its exception, raised)."""
        return out.result()

    def retrieve_result(self, out: PydistFuture, timeout: Optional[float] = None) -> Any:
        return out.result(timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A call failed: withdraw every batch not yet started (they never run)."""
        with self._lock:
            futs = list(self._futures)
            self._futures.clear()
        for f in futs:
            f.cancel()

    def terminate(self) -> None:
        """End of a ``Parallel`` call: keep the executor for the next one, reset the batch statistics."""
        self.reset_batch_stats()

    def __reduce__(self):
        # a backend travelling to a worker (never done by joblib itself) must not carry an executor
        return (PydistBackend, ())


def register(name: str = BACKEND_NAME, make_default: bool = False) -> None:
    """Register the pydist backend with joblib under ``name`` (done on ``import pydist.joblib``)."""
    _joblib.register_parallel_backend(name, PydistBackend, make_default=make_default)


def shutdown() -> None:
    """Shut down every executor (and embedded cluster) the pydist backends of this process opened."""
    with _owned_lock:
        backends = list(_owned)
    for b in backends:
        b.close()


register()
