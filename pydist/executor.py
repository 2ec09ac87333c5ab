"""The client side: ``ClusterExecutor``, a ``concurrent.futures.Executor`` whose workers are the nodes of a
pydist cluster, with ``ProcessPoolExecutor``'s signature and behaviour (see README, "Differences from
ProcessPoolExecutor", for what differs by design).

::

    submit(fn, *a) ─▶ pickle fn (keyed by the pickle's digest) and the arguments, in the caller's thread
                  ─▶ ClientCore (pydist.clientcore): outbox ─▶ node ─▶ results ─▶ the future

What cannot be pickled fails its future (``SerializationError``, a ``pickle.PicklingError``), as with
``ProcessPoolExecutor``; ``submit`` raises only after shutdown or once the cluster is gone.  Functions are
not cached by identity (a bound method keeps no instance alive; a changed ``__main__`` function is sent
anew): only what pickles by reference is.  The executor's state and threads live in a ``ClientCore``
that never refers back to the executor, so a dropped executor is collected; its finalizer lets the
pending work finish and closes everything.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import os
import sys
import threading
import time
import types
import uuid
import weakref
from concurrent.futures import Executor, Future
from typing import (TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Optional, Sequence,
                    Union)

from . import security, wire
from .config import ClientConfig
from .clientcore import ClientCore, PydistFuture
from .client import Entries
from .upload import _upload_bundle
from .errors import SerializationError
from .progressbar import portable_initializer
from .scripts import run_script
from .sources import dumps_function

if TYPE_CHECKING:
    from .aio import AsyncClusterExecutor
    from .bundle import BundleInfo
    from .cluster import LocalCluster
    from .taskgroup import TaskGroup

log = logging.getLogger(__name__)

FN_CACHE = 256


def _check_pool_args(max_workers, mp_context, initializer, initargs, max_tasks_per_child) -> None:
    """ProcessPoolExecutor's checks of its own arguments, with its exception types and messages."""
    if isinstance(mp_context, (int, str)) and not isinstance(mp_context, bool):
        raise TypeError(f"mp_context must be a multiprocessing context or None, got {mp_context!r}: the "
                        f"positional arguments are ProcessPoolExecutor's (max_workers, mp_context, "
                        f"initializer, initargs); give the cluster as address=... or ns=...")
    if max_workers is not None:
        if not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int or None, got {type(max_workers).__name__}")
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    try:
        tuple(initargs)
    except TypeError:
        raise TypeError(f"initargs must be a tuple (or another iterable), got {type(initargs).__name__}") from None
    if max_tasks_per_child is not None:
        if not isinstance(max_tasks_per_child, int):
            raise TypeError("max_tasks_per_child must be an integer")
        if max_tasks_per_child <= 0:
            raise ValueError("max_tasks_per_child must be >= 1")


def _parse_address(address: str) -> str:
    a = address.strip()
    if a.startswith("tcp://"):
        a = a[len("tcp://"):]
    return a


class ClusterExecutor(Executor):
    """Run callables on a pydist cluster through the ``concurrent.futures`` interface.

    The positional parameters are ``ProcessPoolExecutor``'s, in its order: ``max_workers``,
    ``mp_context`` (accepted, unused: workers are the nodes' processes), ``initializer``, ``initargs``;
    ``max_tasks_per_child`` is keyword-only there and here (validated, unused).  On a running cluster
    ``max_workers`` caps how many of *this client's* tasks run at once (the rest wait on the client,
    where ``cancel()`` always succeeds); other clients are not affected.  Where to run is keyword-only:

    * ``ClusterExecutor()`` / ``ClusterExecutor(4)`` starts an embedded ``LocalCluster`` (a name server
      and one node with ``max_workers`` worker processes on loopback) and stops it on shutdown;
    * ``ClusterExecutor(address="host:port")`` (or a Pyro5 URI) connects to a running node
      (``ClusterExecutor("host:port")``, a string where ``max_workers`` goes, is taken as the address);
    * ``ClusterExecutor(ns="host:port")`` finds the cluster's root node in a Pyro5 name server.

    Also keyword-only: ``secret`` (else ``PYDIST_SECRET``), ``code`` (paths uploaded at start, see
    ``upload_code``), TLS files, ``connect_timeout`` (seconds before ``ClusterUnavailable``) and
    ``forward_output`` (print what tasks print and log here, each line prefixed ``[node/wN task-id]``;
    default: on for the embedded cluster).
    ``_max_workers`` is ``max_workers`` if given, else the cluster's worker count at connection time.

    Liveness (``pydist.client``): every call to the entry node has a deadline; a node silent for
    ``node_timeout`` s (default ``ClientConfig.node_timeout``) fails the pending futures with
    ``BrokenCluster`` naming it and how long it was silent, or, with ``failover=True`` (the default
    with ``ns=`` or a list of addresses, ``address=["h1:9000", "h2:9000"]``), the client moves to
    another node and resubmits what had not finished; each future still resolves once.  ``retries``:
    default re-runs of a task whose worker died (``submit(..., retries=N)`` per task).
    """

    def __init__(self, max_workers: Optional[int] = None, mp_context: Any = None,
                 initializer: Optional[Callable] = None, initargs: tuple = (), *,
                 max_tasks_per_child: Optional[int] = None, address: Union[None, str, Sequence[str]] = None,
                 ns: Optional[str] = None, secret: Optional[bytes] = None, code: Optional[Sequence[str]] = None,
                 connect_timeout: Optional[float] = None, tls_cert: Optional[str] = None,
                 tls_key: Optional[str] = None, tls_ca: Optional[str] = None,
                 forward_output: Optional[bool] = None, failover: Optional[bool] = None,
                 node_timeout: Optional[float] = None, retries: int = 0):
        if isinstance(max_workers, (list, tuple)) and max_workers and all(
                isinstance(a, (str, os.PathLike)) for a in max_workers):
            max_workers = [os.fspath(a) for a in max_workers]   # ClusterExecutor(["h1:9000", "h2:9000"])
        if isinstance(max_workers, (str, os.PathLike, list)):
            # ClusterExecutor("host:port"): the short form of pydist's first release (and its brief)
            if address is not None or ns is not None:
                raise TypeError(f"ClusterExecutor got an address twice ({max_workers!r} and "
                                f"{'address' if address is not None else 'ns'}=...)")
            address, max_workers = (max_workers if isinstance(max_workers, list) else os.fspath(max_workers)), None
        _check_pool_args(max_workers, mp_context, initializer, initargs, max_tasks_per_child)
        self._retries = _check_retries(retries)
        self._cfg = ClientConfig.from_env(secret=secret, connect_timeout=connect_timeout,
                                          tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
                                          node_timeout=node_timeout)
        self._cluster = None
        # on a running cluster max_workers caps this client's tasks sent and unfinished (so running at
        # once); the rest wait in the outbox, where cancel() withdraws them at no cost
        max_inflight: Optional[int] = max_workers if (address is not None or ns is not None) else None
        self._fns: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()   # by-reference only
        self._fn_seq = itertools.count()
        self._cid = uuid.uuid4().hex[:16]
        self._bundle: Optional[str] = None
        self._code_paths: "collections.OrderedDict[str, str]" = collections.OrderedDict()
        self._code_exclude: tuple = ()
        tls = None
        if self._cfg.tls_ca or self._cfg.tls_cert:
            tls = security.TLSSettings(cert=self._cfg.tls_cert, key=self._cfg.tls_key, ca=self._cfg.tls_ca)
        self._tls = tls
        security.configure_pyro(tls=tls)

        if address is None and ns is None:
            from .cluster import LocalCluster

            self._cluster = LocalCluster(nodes=1, workers_per_node=max_workers, ns_in_process=True,
                                         wait_workers=False)
            self._cluster.start()
            address = self._cluster.address
            self._cfg.secret = self._cluster.secret
        # print()/logging of tasks shown here (prefixed "[node/wN task]"): default on for the embedded cluster
        self._forward_output = (self._cluster is not None) if forward_output is None else bool(forward_output)
        if self._cfg.secret is None:   # a LocalCluster of this process? it knows its secret
            from .cluster import local_secret

            first = address[0] if isinstance(address, (list, tuple)) and address else address
            key = _parse_address(ns) if ns is not None else (_parse_address(str(first)) if first else "")
            self._cfg.secret = local_secret(key)
        if self._cfg.secret is None:   # this user's secret file (what a pydist-node without a secret uses)
            self._cfg.secret = security.load_secret()
        try:
            entry = Entries(self._cfg, self._tls, address, ns, failover)   # deadlines, failover (pydist.client)
            entry.find_first()
            proxy = entry.connect()
            init_blob = None
            if initializer is not None:   # (tqdm's set_lock with a multiprocessing lock: pydist.progressbar)
                init_blob = wire.dumps(portable_initializer(initializer, tuple(initargs)), "the initializer")
            self._node_info = proxy.open_client(self._cid, init_blob)
            entry.name = self._node_info["name"]
            # dask's compute(scheduler=ex) and others size their concurrency by _max_workers
            self._max_workers = max_workers if max_workers is not None else max(1, _total_workers(proxy.status()))
            proxy._pyroRelease()
            # print()/logging of tasks shown here (prefixed "[node/wN task]"): default on for the embedded cluster
            forward = (self._cluster is not None) if forward_output is None else bool(forward_output)
            self._core = ClientCore(self._cfg, self._tls, entry, self._cid, self._node_info["name"],
                                    self._cluster, max_inflight, forward, init_blob, self._node_info.get("limits"),
                                    self._node_info.get("host"))
        except BaseException:
            if self._cluster is not None:
                self._cluster.stop()
            raise
        del self._cluster   # the core owns it now (and stops it); reads go to the core
        self._core.start()
        # collected without shutdown: the core finishes the pending work and closes, in the background
        weakref.finalize(self, ClientCore.executor_dropped, self._core).atexit = False
        if code:
            try:
                for p in ([code] if isinstance(code, (str, os.PathLike)) else code):
                    self.upload_code(p)
            except BaseException:
                self.shutdown(wait=True)   # leave nothing behind: client threads, embedded cluster
                raise

    def __getattr__(self, name: str) -> Any:
        # the state lives in the core (self._pending, self._broken, ... read as before)
        if name.startswith("__") or name == "_core" or "_core" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__["_core"], name)

    # ------------------------------------------------------------------------------------ connecting
    def _connect_args(self) -> tuple:
        # what the finalizer of a dropped executor needs to tell the node (no reference to the executor)
        return (self._uri, {"secret": self._cfg.secret, "timeout": 1.0, "tls": self._tls})

    def _connect(self, timeout: Optional[float] = None):
        return self._core._connect(timeout)

    # ------------------------------------------------------------------------------------ Executor API
    def submit(self, fn: Callable, /, *args: Any, retries: Optional[int] = None,  # type: ignore[override]
               **kwargs: Any) -> PydistFuture:
        """Schedule ``fn(*args, **kwargs)`` on the cluster; returns a Future.

        ``retries``: re-runs if its worker dies (default: the executor's ``retries``); when every
        attempt lost its worker the future fails with ``WorkerLost`` naming each attempt's node and
        exit code.  (To pass a keyword argument named ``retries`` to ``fn`` use ``functools.partial``.)

        As with ``ProcessPoolExecutor``, a function or argument that cannot be pickled fails the
        returned future (with ``SerializationError``, a ``pickle.PicklingError``); ``submit`` itself
        raises only ``RuntimeError`` after shutdown and ``BrokenCluster`` once the cluster is gone."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        r = self._retries if retries is None else _check_retries(retries)
        try:
            key, blob = self._fn_key(fn)
            payload = wire.dumps_call(args, kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:   # a __reduce__ may even raise SystemExit: the future fails
            return self._failed_future(exc)
        return self._enqueue(key, blob, payload, wire.KIND_CALL, retries=r)

    def _failed_future(self, exc: BaseException) -> PydistFuture:
        with self._lock:
            self._check_open()
        if not isinstance(exc, SerializationError):
            err = SerializationError(f"cannot pickle the task: {type(exc).__name__}: {exc}{wire.mp_hint(exc)}")
            err.__cause__ = exc
            exc = err
        fut = PydistFuture()
        fut.set_exception(exc)
        return fut

    def _enqueue(self, key: str, blob: bytes, payload, kind: int, bundle: Any = False,
                 retries: Optional[int] = None) -> PydistFuture:
        return self._core._enqueue(key, blob, payload, kind, self._bundle if bundle is False else bundle,
                                   self._retries if retries is None else retries)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; optionally cancel pending ones; with ``wait`` block until all are done.
        Stops the embedded cluster, if any, once nothing is pending."""
        self._core.shutdown(wait, cancel_futures=cancel_futures)

    @property
    def _executor_manager_thread(self) -> threading.Thread:
        """The thread that resolves futures (it ends after shutdown), under ``ProcessPoolExecutor``'s name
        for it: code that joins PPE's after ``shutdown(wait=False)`` works here too."""
        return self._core._threads[1]

    def _fn_key(self, fn: Callable) -> tuple:
        """``(key, blob)`` for a function: its pickle, named by the pickle's digest.

        Functions are not cached by identity: a bound method must not keep its instance alive, and a
        ``__main__`` function whose globals changed must be sent anew.  Only what pickles by reference
        (an importable module-level function, class or builtin: its pickle is its name) is kept, in a
        small LRU keyed by identity; holding it costs nothing (its module holds it anyway)."""
        entry = self._fns.get(id(fn))
        if entry is not None and entry[0] is fn and _resolves_to(fn, entry[3]):
            self._fns.move_to_end(id(fn))
            return entry[1], entry[2]
        stable = _pickles_by_reference(fn)
        try:
            blob = dumps_function(fn, wire.PICKLE_PROTOCOL)   # file names and source lines kept (pydist.sources)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise SerializationError(f"cannot pickle the function {wire._short_repr(fn)}: "
                                     f"{type(exc).__name__}: {exc}{wire.mp_hint(exc)}") from exc
        key = f"{self._cid}.f{hashlib.blake2b(blob, digest_size=12).hexdigest()}"
        if stable:
            self._fns[id(fn)] = (fn, key, blob, (fn.__module__, fn.__qualname__.split(".")))
            if len(self._fns) > FN_CACHE:
                self._fns.popitem(last=False)
        return key, blob

    def map(self, fn: Callable, *iterables: Iterable, timeout: Optional[float] = None, chunksize: int = 1,
            buffersize: Optional[int] = None, progress: bool = False) -> Iterator:
        """Like ``Executor.map``: results lazily, in order.  ``chunksize > 1`` sends that many calls as
        one task (one pickle, one result message); ``buffersize`` bounds tasks in flight (Python 3.14);
        ``progress=True`` shows a tqdm bar (rate, ETA) of the calls finished (``pip install 'pydist[progress]'``)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and (not isinstance(buffersize, int) or buffersize < 1):
            raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        try:
            key, blob = self._fn_key(fn)
        except SerializationError as exc:
            key = blob = None
            fn_error = exc
        calls: Iterator[tuple] = zip(*iterables)
        kind = wire.KIND_CALL if chunksize == 1 else wire.KIND_CHUNK
        # a submit replaced on the instance (tqdm's process_map counts that way) or in a subclass sees
        # every call, as with concurrent.futures.Executor.map (one per chunk)
        submit = self.__dict__.get("submit")
        if submit is None and type(self).submit is not ClusterExecutor.submit:
            submit = self.submit

        bar = None
        if progress:
            from .progressbar import ProgressBar

            total = None
            if buffersize is None:   # everything is submitted at once: the total is known up front
                items = list(calls)
                total = len(items)
                calls = iter(items)
            bar = ProgressBar(total, desc=getattr(fn, "__name__", None), unit="call")

        def make(group):
            if submit is not None:
                f = submit(fn, *group) if kind == wire.KIND_CALL else submit(_apply_chunk, fn, list(group))
                if bar is not None:
                    bar.attach(f, 1 if kind == wire.KIND_CALL else len(group))
                return f
            # as submit: what cannot be pickled fails its own future (raised when iteration reaches it)
            if key is None:
                return self._failed_future(fn_error)
            try:
                if kind == wire.KIND_CALL:
                    payload = wire.dumps_call(group, {})
                else:
                    group = list(group)
                    payload = wire.dumps(group, "map arguments")
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                return self._failed_future(exc)
            f = self._enqueue(key, blob, payload, kind)
            if bar is not None:
                bar.attach(f, 1 if kind == wire.KIND_CALL else len(group))
            return f

        groups = calls if chunksize == 1 else _chunks(calls, chunksize)
        if buffersize is None:
            fs = collections.deque(make(g) for g in groups)
            more: Iterator[Any] = iter(())
        else:
            more = iter(groups)
            fs = collections.deque(make(g) for g in itertools.islice(more, buffersize))

        def result_iterator():
            # no local variable may hold a result or its future while suspended (see CPython's
            # test_free_reference): everything is popped and yielded inline
            try:
                while fs:
                    if buffersize is not None:
                        for g in itertools.islice(more, 1):
                            fs.append(make(g))
                    if kind == wire.KIND_CALL:
                        yield _result_or_cancel(fs.popleft(),
                                                None if end_time is None else end_time - time.monotonic())
                    else:
                        yield from _result_or_cancel(fs.popleft(),
                                                     None if end_time is None else end_time - time.monotonic())
            finally:
                if fs:   # the calls not returned yet: withdrawn with one question to the node
                    self._core.cancel_many(list(fs))
                    for f in fs:
                        if not isinstance(f, PydistFuture):
                            f.cancel()   # (what an overridden submit returned)
                if bar is not None:
                    bar.close()

        return result_iterator()

    def spawn_group(self, fn: Callable, size: int, *args: Any, restart: int = 0, **kwargs: Any) -> "TaskGroup":
        """Start ``size`` ranks that start together and fail together: rank ``r`` runs
        ``fn(comm, *args, **kwargs)`` with ``comm`` a ``pydist.comm.Comm`` (mpi4py's lowercase API).
        Returns a ``TaskGroup`` (list-like: the ranks' futures in rank order).  The group starts once
        ``size`` workers are free at once; a group the cluster can never hold raises ValueError here.
        If a rank fails the others' futures fail with ``GroupAborted``; ``restart=N`` re-runs the
        whole group up to N times.  See ``pydist.taskgroup``."""
        from .taskgroup import TaskGroup

        if isinstance(size, int) and not isinstance(size, bool) and self._max_inflight is not None \
                and size > self._max_inflight:
            raise ValueError(f"a group of {size} ranks must run at once, but this executor's max_workers="
                             f"{self._max_inflight} lets only {self._max_inflight} of its tasks run at once")
        return TaskGroup(self, fn, size, args, kwargs, restart)

    def submit_script(self, path: str, args: Sequence[str] = (), *, cwd: Optional[str] = None,
                      env: Optional[dict] = None, timeout: Optional[float] = None,
                      code: Optional[Sequence[str]] = None) -> PydistFuture:
        """Run a Python script file on the cluster; the future gives a ``ScriptResult``
        (``returncode``, ``stdout``, ``stderr``, ``node``).  The file's content is shipped.

        The script can import what this executor's tasks can (code sent with ``upload_code`` and
        bundles pinned with ``pydist sync-code --pin``); ``code=[paths]`` ships more for this script
        only (uploaded with the executor's own paths as one bundle; later tasks are unaffected)."""
        p = os.fspath(path)
        try:
            with open(p, "rb") as f:
                source = f.read()
        except OSError as exc:
            raise FileNotFoundError(f"cannot read script {p}: {exc.strerror}") from None
        call = (source, os.path.basename(p), [str(a) for a in args], cwd, dict(env) if env else None, timeout)
        if not code:
            return self.submit(run_script, *call)
        paths = self._code_paths
        for c in ([code] if isinstance(code, (str, os.PathLike)) else code):
            paths = _add_code_path(paths, c)
        info = self._ship(paths, self._code_exclude)
        key, blob = self._fn_key(run_script)
        return self._enqueue(key, blob, wire.dumps_call(call, {}), wire.KIND_CALL, bundle=info.digest)

    # ------------------------------------------------------------------------------------ extras
    def asyncio(self) -> "AsyncClusterExecutor":
        """This executor for asyncio code: ``await ex.asyncio().submit(fn, x)`` (see ``pydist.aio``)."""
        from .aio import AsyncClusterExecutor

        return AsyncClusterExecutor(executor=self)

    @property
    def node_name(self) -> str:
        """Name of the node this executor talks to."""
        return self._node_name

    @property
    def dashboard_url(self) -> Optional[str]:
        """URL of the live dashboard (token included): the embedded cluster's, else the one served by the
        node this executor talks to (None if that node serves none: start it with --dashboard PORT)."""
        if self._cluster is not None:
            return self._cluster.dashboard_url
        url = getattr(self, "_dashboard_url", None)
        if url is None:
            url = self._dashboard_url = self.status().get("dashboard")
        return url

    @property
    def cluster(self) -> Optional["LocalCluster"]:
        """The embedded ``LocalCluster`` (None when connected to a running cluster)."""
        return self._core._cluster

    def status(self) -> dict:
        """The status of the node this executor talks to (see ``pydist status``)."""
        p = self._connect()
        try:
            return p.status()
        finally:
            p._pyroRelease()

    def upload_code(self, path: Union[str, "os.PathLike[str]"], exclude: Sequence[str] = (), timeout: float = 300.0,
                    progress: Optional[Callable[[int, int], None]] = None) -> "BundleInfo":
        """Ship a code directory, package directory or ``.py`` file to every node of the cluster.

        Tasks submitted afterwards can import from it (it is first on their ``sys.path``); tasks already
        queued keep the version they were submitted with.  Uploads are content addressed: unchanged code
        is not sent again.  Returns a ``BundleInfo`` (digest, size, files).  Every path uploaded so far
        is part of the bundle (a path providing the same top-level name replaces the older one).
        """
        paths = _add_code_path(self._code_paths, path)
        excl = tuple(self._code_exclude) + tuple(exclude)
        info = self._ship(paths, excl, timeout, progress)
        with self._lock:
            self._code_paths = paths
            self._code_exclude = excl
            self._bundle = info.digest
        return info

    def _ship(self, paths: "collections.OrderedDict[str, str]", exclude: Sequence[str], timeout: float = 300.0,
              progress=None):
        from . import codesync

        info, data = codesync.build_bundle(list(paths.values()), exclude=exclude, progress=progress)
        _upload_bundle(self._uri, self._cfg.secret, self._tls, info, data, timeout, progress)
        return info

    def __enter__(self) -> "ClusterExecutor":
        return self

    def __exit__(self, exc_type: Optional[type] = None, *exc: Any) -> "Literal[False]":
        if exc_type is not None:   # left by an exception: a running group's ranks may wait on each other forever
            from .taskgroup import abort_unfinished

            abort_unfinished(self, f"the with block of its ClusterExecutor exited by {exc_type.__name__}")
        self.shutdown(wait=True)
        return False


def _pickles_by_reference(fn: Any) -> bool:
    """Whether ``fn`` pickles as a reference (module + qualified name) whose target is ``fn`` itself."""
    if not isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)):
        return False
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, types.ModuleType):
        return False   # a bound builtin method ([].append): its instance travels with it
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not isinstance(mod, str) or mod == "__main__" or "<" in qual or mod in _BY_VALUE_MODULES():
        return False
    obj: Any = sys.modules.get(mod)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    return obj is fn


def _resolves_to(fn: Any, ref: tuple) -> bool:
    """Whether the name ``ref`` (module, qualified name parts) of a function cached as pickling by
    reference still names ``fn`` (a module reloaded or a name rebound: it pickles by value now)."""
    mod, parts = ref
    if mod in _BY_VALUE_MODULES():
        return False
    obj: Any = sys.modules.get(mod)
    for part in parts:
        obj = getattr(obj, part, None)
    return obj is fn


def _BY_VALUE_MODULES() -> set:
    """cloudpickle's set of modules registered to pickle by value (the same set object all along:
    ``register_pickle_by_value`` changes it in place), looked up once: an import statement on every
    submit cost ~3 % of a lone task's client time (#15)."""
    global _by_value
    if _by_value is None:
        try:
            from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES as found
        except ImportError:
            found = set()
        _by_value = found
    return _by_value


_by_value: Optional[set] = None


def _total_workers(st: dict) -> int:
    """Workers of a node and of everything below it or beside it, from its status."""
    return st["workers"] + sum(l["workers"] for l in st["links"] if l["alive"] and l["role"] != "parent")


def _add_code_path(paths: "collections.OrderedDict[str, str]", path) -> "collections.OrderedDict[str, str]":
    """A copy of ``paths`` (top-level name -> path) with ``path`` added (replacing one of the same name)."""
    from .errors import CodeSyncError

    p = os.path.abspath(os.fspath(path))
    if not os.path.exists(p):
        raise CodeSyncError(f"code path not found: {p}")
    out = collections.OrderedDict(paths)
    name = os.path.splitext(os.path.basename(p.rstrip(os.sep)))[0]
    out.pop(name, None)
    out[name] = p
    return out


def _check_retries(r: Any) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= 100:
        raise ValueError(f"retries must be an int from 0 to 100, got {r!r}")
    return r


def _apply_chunk(fn: Callable, chunk: list) -> list:
    """(worker) One chunk of a ``map`` sent through an overridden ``submit``."""
    return [fn(*args) for args in chunk]


def _result_or_cancel(fut: Future, timeout: Optional[float] = None):
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut


def _chunks(it: Iterator, size: int) -> Iterator[tuple]:
    while True:
        chunk = tuple(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk
