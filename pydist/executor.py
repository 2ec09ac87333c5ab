"""The client side: a ``concurrent.futures.Executor`` whose workers are the nodes of a pydist cluster.

::

    user thread                 sender thread                 node                 collector thread
    submit(fn, *a) ─▶ pickle ─▶ outbox ─▶ one submit(batch) ─▶ queue ─▶ workers ─▶ results
      returns Future (pending)    (everything queued since                           │
                                   the last call, ≤ max_batch)   collect(long poll) ◀┘
                                                                   ─▶ set_running / set_result

``submit`` pickles the arguments in the caller's thread (so an unpicklable argument raises there and
the executor stays usable) and the *function* once per executor (cached by identity; mutate a
closure's captured state and submit again: the first pickle is reused).  A sender thread coalesces
everything submitted while its previous call was in flight into one call: a lone task costs one
round trip, 10,000 tasks cost a handful.  A collector thread keeps one long poll open; the node
answers it as soon as anything finished, with every result ready by then.  Finished futures are
forgotten at once: the executor holds no reference to results.

If the node goes away, every pending future fails with ``BrokenCluster`` (a ``BrokenExecutor``) and
later ``submit`` raises it: nothing hangs.
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
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures._base import PENDING as _PENDING
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import cloudpickle

from . import security, wire
from .config import ClientConfig
from .errors import (AuthenticationError, BrokenCluster, ClusterUnavailable, DeserializationError, RemoteError,
                     SerializationError, VersionMismatch)
from .scripts import run_script

if TYPE_CHECKING:
    from .aio import AsyncClusterExecutor

log = logging.getLogger(__name__)

FN_CACHE = 256
BATCH_BYTES = 4 << 20   # bytes of task arguments per submit call (more tasks wait for the next call)


class PydistFuture(Future):
    """A ``concurrent.futures.Future`` for a pydist task.

    ``cancel()`` asks the node (one round trip) and succeeds only if the task had not yet been handed to
    a worker or another node, so a cancelled task never runs; otherwise the future is marked running and
    ``cancel()`` returns False, as ``ProcessPoolExecutor`` does for started work.
    """

    _pydist_tid: str = ""
    _pydist_exec: Any = None

    def cancel(self) -> bool:
        with self._condition:
            if self._state != _PENDING:
                return super().cancel()
        ex = self._pydist_exec() if self._pydist_exec is not None else None
        if ex is not None and self._pydist_tid not in ex._cancel_remote([self._pydist_tid]):
            self._mark_running()
            return False
        return super().cancel()

    def _invoke_callbacks(self) -> None:
        # concurrent.futures catches only Exception here: a callback raising SystemExit or
        # KeyboardInterrupt would end the thread that resolved the future (our collector) for good
        for callback in self._done_callbacks:
            try:
                callback(self)
            except BaseException:
                log.exception("exception calling callback for %r", self)

    def _mark_running(self) -> None:
        with self._condition:
            if self._state == _PENDING:
                self.set_running_or_notify_cancel()


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
    ``upload_code``), TLS files and ``connect_timeout`` (seconds before ``ClusterUnavailable``).
    ``_max_workers`` is ``max_workers`` if given, else the cluster's worker count at connection time.
    """

    def __init__(self, max_workers: Optional[int] = None, mp_context: Any = None,
                 initializer: Optional[Callable] = None, initargs: tuple = (), *,
                 max_tasks_per_child: Optional[int] = None, address: Optional[str] = None,
                 ns: Optional[str] = None, secret: Optional[bytes] = None, code: Optional[Sequence[str]] = None,
                 connect_timeout: Optional[float] = None, tls_cert: Optional[str] = None,
                 tls_key: Optional[str] = None, tls_ca: Optional[str] = None):
        if isinstance(max_workers, (str, os.PathLike)):
            # ClusterExecutor("host:port"): the short form of pydist's first release (and its brief)
            if address is not None or ns is not None:
                raise TypeError(f"ClusterExecutor got an address twice ({max_workers!r} and "
                                f"{'address' if address is not None else 'ns'}=...)")
            address, max_workers = os.fspath(max_workers), None
        _check_pool_args(max_workers, mp_context, initializer, initargs, max_tasks_per_child)
        self._cfg = ClientConfig.from_env(secret=secret, connect_timeout=connect_timeout,
                                          tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca)
        self._cluster = None
        # on a running cluster max_workers caps this client's tasks sent and unfinished (so running at
        # once); the rest wait in the outbox, where cancel() withdraws them at no cost
        self._max_inflight: Optional[int] = max_workers if (address is not None or ns is not None) else None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: Dict[str, PydistFuture] = {}
        self._outbox: List[tuple] = []
        self._fns: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()   # by-reference only
        self._fn_seq = itertools.count()
        self._seq = itertools.count()
        self._cid = uuid.uuid4().hex[:16]
        self._shutdown = False
        self._broken: Optional[BaseException] = None
        self._bundle: Optional[str] = None
        self._code_paths: "collections.OrderedDict[str, str]" = collections.OrderedDict()
        self._code_exclude: tuple = ()
        self._threads: List[threading.Thread] = []
        self._closed = threading.Event()
        self._finalized = False
        tls = None
        if self._cfg.tls_ca or self._cfg.tls_cert:
            tls = security.TLSSettings(cert=self._cfg.tls_cert, key=self._cfg.tls_key, ca=self._cfg.tls_ca)
        self._tls = tls
        security.configure_pyro(tls=tls)

        if address is None and ns is None:
            from .cluster import LocalCluster

            self._cluster = LocalCluster(nodes=1, workers_per_node=max_workers)
            self._cluster.start()
            address = self._cluster.address
            self._cfg.secret = self._cluster.secret
        if self._cfg.secret is None:   # a LocalCluster of this process? it knows its secret
            from .cluster import local_secret

            key = _parse_address(ns) if ns is not None else (_parse_address(str(address)) if address else "")
            self._cfg.secret = local_secret(key)
        if self._cfg.secret is None:   # this user's secret file (what a pydist-node without a secret uses)
            self._cfg.secret = security.load_secret()
        try:
            if ns is not None:
                self._uri = self._find_root(ns)
            else:
                self._uri = _parse_address(str(address))
            self._address = self._uri
            proxy = self._connect()
            init_blob = None
            if initializer is not None:
                init_blob = wire.dumps((initializer, tuple(initargs)), "the initializer")
            self._node_info = proxy.open_client(self._cid, init_blob)
            self._node_name = self._node_info["name"]
            # dask's compute(scheduler=ex) and others size their concurrency by _max_workers
            self._max_workers = max_workers if max_workers is not None else max(1, _total_workers(proxy.status()))
            proxy._pyroRelease()
        except BaseException:
            if self._cluster is not None:
                self._cluster.stop()
            raise
        self._wref = weakref.ref(self)
        self._send_lock = threading.Lock()
        self._submit_proxy = self._connect()
        for target, name in ((self._sender, "sender"), (self._collector, "collector")):
            t = threading.Thread(target=target, name=f"pydist-client-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if code:
            try:
                for p in ([code] if isinstance(code, (str, os.PathLike)) else code):
                    self.upload_code(p)
            except BaseException:
                self.shutdown(wait=True)   # leave nothing behind: client threads, embedded cluster
                raise

    # ------------------------------------------------------------------------------------ connecting
    def _connect(self, timeout: Optional[float] = None):
        return security.connect(self._uri, secret=self._cfg.secret,
                                timeout=self._cfg.connect_timeout if timeout is None else timeout, tls=self._tls)

    def _find_root(self, ns: str) -> str:
        import Pyro5.api
        import Pyro5.errors

        host, _, port = _parse_address(ns).rpartition(":")
        deadline = time.monotonic() + self._cfg.connect_timeout
        last: Optional[BaseException] = None
        refused: Dict[str, BaseException] = {}
        while True:
            try:
                with Pyro5.api.locate_ns(host, int(port)) as nsp:
                    entries = nsp.list(prefix="pydist.node.", return_metadata=True)
                roots = [str(uri) for name, (uri, meta) in sorted(entries.items()) if "pydist.root" in meta]
                others = [str(uri) for name, (uri, meta) in sorted(entries.items()) if "pydist.root" not in meta]
                for uri in roots + others:
                    try:
                        security.connect(uri, secret=self._cfg.secret, timeout=0.5, tls=self._tls)._pyroRelease()
                        return uri
                    except ClusterUnavailable as exc:
                        last = exc   # a stale entry
                    except (AuthenticationError, VersionMismatch) as exc:
                        # anyone can register in a name server: skip an entry that cannot prove the secret
                        if uri not in refused:
                            log.warning("skipping %s listed in name server %s: %s", uri, ns, exc)
                        refused[uri] = exc
                if refused and len(refused) == len(roots + others):
                    raise next(iter(refused.values()))   # no listed node accepts us: our secret is wrong
                last = last or ClusterUnavailable(f"name server {ns} lists no pydist node yet")
            except (Pyro5.errors.NamingError, Pyro5.errors.CommunicationError, OSError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"no pydist node found through name server {ns} within "
                                         f"{self._cfg.connect_timeout:g} s: {last}") from None
            time.sleep(0.1)

    # ------------------------------------------------------------------------------------ Executor API
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> PydistFuture:
        """Schedule ``fn(*args, **kwargs)`` on the cluster; returns a Future.

        As with ``ProcessPoolExecutor``, a function or argument that cannot be pickled fails the
        returned future (with ``SerializationError``, a ``pickle.PicklingError``); ``submit`` itself
        raises only ``RuntimeError`` after shutdown and ``BrokenCluster`` once the cluster is gone."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        try:
            key, blob = self._fn_key(fn)
            payload = wire.dumps_call(args, kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:   # a __reduce__ may even raise SystemExit: the future fails
            return self._failed_future(exc)
        return self._enqueue(key, blob, payload, wire.KIND_CALL)

    def _failed_future(self, exc: BaseException) -> PydistFuture:
        with self._lock:
            self._check_open()
        if not isinstance(exc, SerializationError):
            err = SerializationError(f"cannot pickle the task: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            exc = err
        fut = PydistFuture()
        fut.set_exception(exc)
        return fut

    def _enqueue(self, key: str, blob: bytes, payload: bytes, kind: int, bundle: Any = False) -> PydistFuture:
        fut = PydistFuture()
        with self._lock:
            self._check_open()
            tid = f"{self._cid}.{next(self._seq)}"
            fut._pydist_tid = tid
            fut._pydist_exec = self._wref
            self._pending[tid] = fut
            code = self._bundle if bundle is False else bundle
            self._outbox.append(((tid, key, payload, code, 0, [], kind, self._cid), blob))
            # A lone submit (no other task of this executor outstanding) is sent from this thread: no
            # hand-off to the sender thread.  Submits while others are in flight go through the sender,
            # which batches everything queued meanwhile into one call.
            direct = len(self._pending) == 1 and len(self._outbox) == 1 and self._room() > 0
            if len(self._outbox) == 1 and not direct:
                self._cond.notify_all()
        if direct and self._send_lock.acquire(blocking=False):
            try:
                self._send_outbox()
            except Exception as exc:
                self._break(exc)
            finally:
                self._send_lock.release()
        elif direct:
            with self._cond:
                self._cond.notify_all()
        return fut

    def _room(self) -> int:
        """How many more tasks may be sent now (caller holds ``_lock``)."""
        if self._max_inflight is None:
            return len(self._outbox)
        return self._max_inflight - (len(self._pending) - len(self._outbox))

    def _check_open(self) -> None:
        if self._broken is not None:
            raise BrokenCluster(str(self._broken))
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _fn_key(self, fn: Callable) -> tuple:
        """``(key, blob)`` for a function: its pickle, named by the pickle's digest.

        Functions are not cached by identity: a bound method must not keep its instance alive, and a
        ``__main__`` function whose globals changed must be sent anew.  Only what pickles by reference
        (an importable module-level function, class or builtin: its pickle is its name) is kept, in a
        small LRU keyed by identity; holding it costs nothing (its module holds it anyway)."""
        stable = _pickles_by_reference(fn)
        if stable:
            entry = self._fns.get(id(fn))
            if entry is not None and entry[0] is fn:
                self._fns.move_to_end(id(fn))
                return entry[1], entry[2]
        try:
            blob = wire.dumps_function(fn)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise SerializationError(f"cannot pickle the function {wire._short_repr(fn)}: "
                                     f"{type(exc).__name__}: {exc}") from exc
        key = f"{self._cid}.f{hashlib.blake2b(blob, digest_size=12).hexdigest()}"
        if stable:
            self._fns[id(fn)] = (fn, key, blob)
            if len(self._fns) > FN_CACHE:
                self._fns.popitem(last=False)
        return key, blob

    def map(self, fn: Callable, *iterables: Iterable, timeout: Optional[float] = None, chunksize: int = 1,
            buffersize: Optional[int] = None) -> Iterator:
        """Like ``Executor.map``: results lazily, in order.  ``chunksize > 1`` sends that many calls as
        one task (one pickle, one result message); ``buffersize`` bounds tasks in flight (Python 3.14)."""
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
        calls = zip(*iterables)
        kind = wire.KIND_CALL if chunksize == 1 else wire.KIND_CHUNK

        def make(group):
            # as submit: what cannot be pickled fails its own future (raised when iteration reaches it)
            if key is None:
                return self._failed_future(fn_error)
            try:
                if kind == wire.KIND_CALL:
                    payload = wire.dumps_call(group, {})
                else:
                    payload = wire.dumps(list(group), "map arguments")
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                return self._failed_future(exc)
            return self._enqueue(key, blob, payload, kind)

        groups = calls if chunksize == 1 else _chunks(calls, chunksize)
        if buffersize is None:
            fs = collections.deque(make(g) for g in groups)
            more = iter(())
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
                for f in fs:
                    f.cancel()

        return result_iterator()

    def spawn_group(self, fn: Callable, size: int, *args: Any, **kwargs: Any) -> List[PydistFuture]:
        """Start ``size`` tasks that can talk to each other: rank ``r`` runs ``fn(comm, *args, **kwargs)``
        where ``comm`` (a ``pydist.comm.Comm``) has ``rank``, ``size``, ``send(obj, to, tag=0)``,
        ``recv(source=ANY, tag=ANY)``, ``bcast``, ``scatter``, ``gather``, ``reduce``, ``allreduce`` and
        ``barrier``.  Returns the ranks' futures, in rank order.  All ranks must run at once, so
        ``size`` may not exceed the cluster's worker count (ValueError)."""
        from .comm import Comm, run_rank

        if not isinstance(size, int) or size < 1:
            raise ValueError("size must be a positive int")
        total = _total_workers(self.status())
        if size > total:
            raise ValueError(f"a group of {size} ranks must run at once, but the cluster has {total} workers")
        if self._max_inflight is not None and size > self._max_inflight:
            raise ValueError(f"a group of {size} ranks must run at once, but this executor's max_workers="
                             f"{self._max_inflight} lets only {self._max_inflight} of its tasks run at once")
        gid = f"{self._cid}.g{next(self._fn_seq)}"
        return [self.submit(run_rank, fn, Comm(gid, r, size, self._uri), args, kwargs) for r in range(size)]

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

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; optionally cancel pending ones; with ``wait`` block until all are done.
        Stops the embedded cluster, if any, once nothing is pending."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending.values())
        if cancel_futures:
            waiting = [f for f in pending if not f.running() and not f.done()]
            gone = self._cancel_remote([f._pydist_tid for f in waiting])
            for f in waiting:
                if f._pydist_tid in gone:
                    Future.cancel(f)
                else:
                    f._mark_running()
        if wait:
            self._drain_and_close()
        else:
            threading.Thread(target=self._drain_and_close, daemon=True, name="pydist-client-close").start()

    def _drain_and_close(self) -> None:
        while True:
            with self._lock:
                pending = list(self._pending.values())
            if not pending:
                break
            for f in pending:
                try:
                    f.exception()
                except BaseException:
                    pass
        with self._lock:
            if self._finalized:
                return
            self._finalized = True
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        if self._broken is None:
            try:   # also ends the collector's long poll at once
                p = self._connect(timeout=1.0)
                p._pyroTimeout = 2.0
                p.close_client(self._cid)
                p._pyroRelease()
            except Exception as exc:
                log.debug("close_client failed: %s", exc)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=10)
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None

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
    def cluster(self):
        """The embedded ``LocalCluster`` (None when connected to a running cluster)."""
        return self._cluster

    def status(self) -> dict:
        """The status of the node this executor talks to (see ``pydist status``)."""
        p = self._connect()
        try:
            return p.status()
        finally:
            p._pyroRelease()

    def upload_code(self, path, exclude: Sequence[str] = (), timeout: float = 300.0, progress=None):
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

    # ------------------------------------------------------------------------------------ threads
    def _cancel_remote(self, tids: List[str]) -> set:
        """Withdraw tasks that no worker has started: those still in our outbox, and those the node
        still holds in its queue (one round trip).  Returns the ids withdrawn."""
        gone = set()
        with self._lock:
            if self._broken is not None or self._finalized:
                return set(tids)
            want = set(tids)
            keep = []
            for item in self._outbox:
                if item[0][0] in want:
                    gone.add(item[0][0])
                else:
                    keep.append(item)
            self._outbox[:] = keep
            ask = [t for t in tids if t not in gone and t in self._pending]
            gone.update(t for t in tids if t not in self._pending)
        if ask:
            with self._send_lock:
                try:
                    self._submit_proxy._pyroClaimOwnership()
                    gone.update(self._submit_proxy.cancel(self._cid, ask))
                except Exception as exc:   # the node is gone: nothing will run
                    self._break(exc)
                    return set(tids)
        with self._lock:
            for t in gone:
                self._pending.pop(t, None)
        return gone

    def _send_outbox(self) -> None:
        """Send everything queued (caller holds ``_send_lock``); the submit proxy moves between the
        sender thread and direct callers, so each use claims it (Pyro5 proxies belong to a thread)."""
        proxy = self._submit_proxy
        proxy._pyroClaimOwnership()
        while True:
            with self._lock:
                # at most max_batch tasks and about BATCH_BYTES per call, so large arguments stream to
                # the node (its workers start on the first while the next are on the wire)
                n = size = 0
                for rec, _ in self._outbox[:min(self._cfg.max_batch, self._room())]:
                    n += 1
                    size += wire.payload_size(rec[2])
                    if size >= BATCH_BYTES:
                        break
                batch = self._outbox[:n]
                del self._outbox[:n]
            if not batch:
                return
            fns = {}
            recs = []
            for rec, blob in batch:
                fns[rec[1]] = blob
                recs.append(rec)
            try:
                proxy.submit(self._cid, fns, recs)
            except Exception:
                raise   # the node is gone: the caller breaks the executor
            except BaseException:
                # KeyboardInterrupt / SystemExit (a signal handler) in the caller's thread mid-call: the
                # batch goes back (a resent task id is ignored by the node), the connection is dropped
                # (half a message may be on it; the next call reconnects), the executor stays usable
                with self._lock:
                    self._outbox[:0] = batch
                    self._cond.notify_all()
                try:
                    proxy._pyroRelease()
                except Exception:
                    pass
                raise

    def _sender(self) -> None:
        try:
            while True:
                with self._cond:
                    while (not self._outbox or self._room() <= 0) and not self._closed.is_set():
                        self._cond.wait()
                    if self._closed.is_set() and not self._outbox:
                        return
                with self._send_lock:
                    self._send_outbox()
        except BaseException as exc:  # the node is gone
            if not self._closed.is_set():
                self._break(exc)
        finally:
            with self._send_lock:
                try:
                    self._submit_proxy._pyroClaimOwnership()
                    self._submit_proxy._pyroRelease()
                except Exception:
                    pass

    def _collector(self) -> None:
        proxy = None
        try:
            proxy = self._connect()
            poll = self._cfg.poll_interval
            while not self._closed.is_set():
                results, started = proxy.collect(self._cid, poll)
                if started:
                    self._mark_started(started)
                if results:
                    self._deliver(results)
        except BaseException as exc:
            if not self._closed.is_set():
                self._break(exc)
        finally:
            security.release(proxy)

    def _mark_started(self, ids: List[str]) -> None:
        pending = self._pending
        for tid in ids:
            f = pending.get(tid)
            if f is not None and not f.running() and not f.done():
                try:
                    f.set_running_or_notify_cancel()
                except (InvalidStateError, RuntimeError):
                    pass

    def _deliver(self, results: List[tuple]) -> None:
        """Resolve the futures of finished tasks.  Nothing a result or a callback does may end the
        collector thread: a result whose unpickling raises (even ``SystemExit``) fails its own future
        with ``DeserializationError``; callbacks run under ``PydistFuture._invoke_callbacks``."""
        broken = None
        with self._lock:
            futs = [(self._pending.pop(r[0], None), r) for r in results]
            if self._outbox and self._max_inflight is not None:
                self._cond.notify_all()   # room for tasks held back by max_workers
        for f, r in futs:
            if f is None:
                continue
            status = r[wire.R_STATUS]
            if status == wire.OK:
                try:
                    value = wire.loads(r[wire.R_BLOB])
                except BaseException as exc:
                    _resolve(f, exc=_unpickling_error(f"the result of task {r[0]}", exc))
                    continue
                _resolve(f, value)
                del value
            elif status == wire.INIT_FAILED:
                cause = wire.loads_exception(r[wire.R_BLOB])
                broken = BrokenCluster(f"the executor's initializer failed on node {r[wire.R_NODE]}: "
                                       f"{type(cause).__name__}: {cause}")
                broken.__cause__ = cause
                _resolve(f, exc=broken)
            else:
                _resolve(f, exc=wire.loads_exception(r[wire.R_BLOB]))
        if broken is not None:
            self._break(broken, already=True)

    def _break(self, exc: BaseException, already: bool = False) -> None:
        if already:
            err = exc
        else:
            err = BrokenCluster(f"lost the connection to pydist node {getattr(self, '_node_name', '?')} at "
                                f"{self._address}: {type(exc).__name__}: {exc}")
        with self._lock:
            if self._broken is None:
                self._broken = err
            pending = list(self._pending.values())
            self._pending.clear()
            self._outbox.clear()
            self._cond.notify_all()
        for f in pending:
            try:
                f.set_exception(BrokenCluster(str(err)))
            except InvalidStateError:
                pass
        self._closed.set()
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> "ClusterExecutor":
        return self

    def __exit__(self, *exc) -> bool:
        self.shutdown(wait=True)
        return False

    def __del__(self):
        try:
            if self._cluster is not None and not self._closed.is_set():
                self._cluster.stop()
        except Exception:
            pass


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


def _BY_VALUE_MODULES() -> set:
    try:
        from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES
        return _PICKLE_BY_VALUE_MODULES
    except ImportError:
        return set()


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


def _walk_nodes(uri: str, secret, tls) -> List[dict]:
    """Statuses of every node reachable from ``uri`` through child/peer links (breadth first)."""
    seen: Dict[str, dict] = {}
    todo = [uri]
    while todo:
        u = todo.pop(0)
        try:
            p = security.connect(u, secret=secret, timeout=2.0, tls=tls)
            try:
                st = p.status()
            finally:
                p._pyroRelease()
        except Exception as exc:
            log.debug("status of %s failed: %s", u, exc)
            continue
        if st["name"] in seen:
            continue
        seen[st["name"]] = st
        for l in st["links"]:
            if l["alive"] and l["name"] not in seen:
                todo.append(l["uri"])
    return list(seen.values())


def _send_bundle(proxy, info, data: bytes, timeout: float, progress=None) -> None:
    from .codesync import CHUNK_SIZE

    proxy._pyroTimeout = max(60.0, timeout)
    t0 = time.monotonic()
    proxy.code_begin(info.digest, len(data))
    for off in range(0, len(data), CHUNK_SIZE):
        proxy.code_chunk(info.digest, off, data[off:off + CHUNK_SIZE])
        done = min(off + CHUNK_SIZE, len(data))
        if progress is not None:
            progress(done, len(data))
        elif time.monotonic() - t0 > 2.0:
            log.info("uploading %s: %d%%", info, 100 * done // max(1, len(data)))
    proxy.code_finish(info.digest, False)


def _upload_bundle(uri: str, secret, tls, info, data: bytes, timeout: float, progress=None) -> List[str]:
    """Send a bundle to every node reachable from ``uri`` that lacks it (in chunks).  Nodes that join
    later fetch it from their parent when a task needs it.  Returns the names of the nodes."""
    names = []
    for st in _walk_nodes(uri, secret, tls):
        p = security.connect(st["uri"], secret=secret, timeout=5.0, tls=tls)
        try:
            if not p.code_has([info.digest]):
                _send_bundle(p, info, data, timeout, progress)
        finally:
            p._pyroRelease()
        names.append(st["name"])
    return names
