"""The process-wide state pydist keeps, in one place.

::

    client process                                   worker process
    Running   LocalClusters this process runs:       WorkerState   the task running now (task_context)
              their addresses -> secrets               and the code bundle on sys.path
    Exit      interpreter exit started? the live
              client cores (drained at exit)
    Fork      how many forks away from the process
              that imported pydist (a forked child
              may not use its parent's executors)

Everything else lives in objects with an owner (an executor's ``ClientCore``, a ``Node``, a
``LocalCluster``).  These classes are namespaces, never instantiated; each attribute is read and written
as ``Running.secrets`` etc. by the one module named beside it.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Dict, List, Optional


class Running:
    """The LocalClusters this process runs (``pydist.cluster``).

    ``secrets`` maps every node and name-server address of a running LocalCluster to its secret, so
    ``ClusterExecutor(address=cluster.address)`` needs no ``secret=``.  While any LocalCluster runs, its
    secret is also exported as ``PYDIST_SECRET`` (unless that was already set) so that tools this process
    starts (``pydist status``, scripts) reach it too; it is removed when the last one stops.
    """

    lock = threading.Lock()
    secrets: Dict[str, bytes] = {}
    exported_by: List[Any] = []


class Exit:
    """Interpreter exit (``pydist.clientcore``): ``started`` once its exit hook ran; the cores still alive."""

    started = False
    live: "weakref.WeakSet" = weakref.WeakSet()


class Fork:
    """How many times this process is a forked child of the one that imported pydist
    (``pydist.clientcore``: ``os.getpid()`` per submit was a system call on the hot path; this is an
    attribute read)."""

    gen = 0


def _forked() -> None:
    Fork.gen += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class WorkerState:
    """The one place a worker process keeps mutable state (``pydist.workers``)."""

    current: Optional[Any] = None          # the TaskContext of the task running now
    active_bundle: Optional[str] = None    # the code bundle on sys.path
