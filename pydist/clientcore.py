"""The client's moving parts: its state, the sender and collector threads, the futures they resolve.

::

    user thread                 sender thread                 node                 collector thread
    submit(fn, *a) ─▶ pickle ─▶ outbox ─▶ one submit(batch) ─▶ queue ─▶ workers ─▶ results
      returns Future (pending)    (everything queued since                           │
                                   the last call, ≤ max_batch)   collect(long poll) ◀┘
                                                                   ─▶ set_running / set_result

``ClusterExecutor`` (``pydist.executor``) is the face; a ``ClientCore`` owns what the threads touch:
the pending futures, the outbox, the connection to the node.  The threads hold the core, never the
executor, so an executor the program drops is collected (as ``ProcessPoolExecutor``'s threads hold
only a weak reference to theirs): its finalizer shuts the core down without waiting, which finishes
the pending work, closes the session and stops an embedded ``LocalCluster``.

A lone submit is sent from the caller's thread; submits while others are in flight go through the
sender thread, which coalesces everything queued meanwhile into one call: a lone task costs one round
trip, 10,000 tasks cost a handful.  The collector keeps one long poll open; the node answers it as soon
as anything finished, with every result ready by then.  A lone short task's result comes back in the
reply to its own submit (``Node.submit_wait``): the caller's thread resolves it, no thread hand-off.
Finished futures are forgotten at once.

Liveness (``pydist.client``): every call to the entry node has a deadline (``node_timeout``); a call
that fails or times out fails the client over to another node (``Entries.fail_over``: unfinished
tasks are resubmitted under the same ids) or, when there is none, breaks it with ``BrokenCluster``
naming the node and how long it was silent.  Every ``RECONCILE_EVERY`` s the long poll carries a count
and digest of the ids we wait for; on a mismatch the client asks which the node holds and resends
what it lacks.

At interpreter exit (before ``atexit`` hooks, as ``concurrent.futures`` does) every live core waits
for its pending futures, then closes: work submitted without waiting is not lost.  A submit after that
(from an ``atexit`` hook) raises ``RuntimeError``.  If the node goes away, every pending future fails
with ``BrokenCluster`` (a ``BrokenProcessPool``) and later ``submit`` raises it: nothing hangs.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from concurrent.futures import InvalidStateError
from concurrent.futures._base import PENDING as _PENDING
from typing import Any, Dict, List, Optional

from . import security, wire
from .client import Liveness, Reconciler
from .futures import PydistFuture, _resolve, _unpickling_error
from .procstate import Exit as _Exit, Fork as _Fork
from .errors import BrokenCluster
from .output import FORWARD_OUTPUT, emit as emit_output, split as split_output

log = logging.getLogger("pydist.executor")

RECONCILE_EVERY = 2.0   # s between comparisons of our unfinished task ids with the entry node's
BATCH_BYTES = 4 << 20   # bytes of task arguments per submit call (more tasks wait for the next call)
SHM_MAX_TASKS = 256     # unfinished tasks whose large arguments sit in memfds (descriptors); more go in band
LINGER = 0.002          # s a lone short task's submit waits in the node for its result (submit_wait)


def _python_exit() -> None:
    """Before ``atexit`` hooks: let every live executor finish what it was given, then close it."""
    _Exit.started = True
    for core in list(_Exit.live):
        try:
            core.shutdown(wait=True)
        except Exception as exc:
            log.debug("closing a client at exit: %s", exc)


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]  # as concurrent.futures does


class ClientCore(Liveness):
    """Everything a client's threads touch (see the module docstring); ``ClusterExecutor`` holds one."""

    def __init__(self, cfg, tls, entry, cid: str, node_name: str, cluster=None,
                 max_inflight: Optional[int] = None, forward_output: bool = False,
                 init_blob: Optional[bytes] = None, limits: Optional[dict] = None,
                 host: Optional[dict] = None):
        self._cfg, self._tls, self._entry = cfg, tls, entry
        # large arguments go through memfds when the entry node is on this machine and no failover can
        # take the tasks to another one (pydist.wire.to_shared); the descriptors of each unfinished task
        self._shm_ok = bool(getattr(cfg, "shared_memory", True)) and not entry.failover and wire.same_host(host)
        self._shm_fds: Dict[str, List[int]] = {}
        self._lone_seen: Optional[list] = None   # the last lone task's "outcome looked at" cell
        self._in_reply = 0   # results that came back in their submit's reply (a count, for tests)
        self._init_blob = init_blob
        self._pid = os.getpid()
        self._fork_gen = _Fork.gen
        self._records: Dict[str, tuple] = {}   # unfinished tasks, for a resubmission after failover
        self._recon = Reconciler()
        self._requeue = False
        self._cid, self._node_name, self._cluster = cid, node_name, cluster
        self._max_inflight = max_inflight
        # the entry node's per-client limits (--max-client-tasks / --max-client-bytes): what is over them
        # waits here and goes out as results come back, instead of being refused by the node
        self._limits = dict(limits or {})
        self._sent_sizes: Dict[str, int] = {}   # tasks sent (or being sent) and unfinished -> payload bytes
        self._sent_bytes = 0
        self._forward_output = forward_output
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: Dict[str, PydistFuture] = {}
        self._outbox: List[tuple] = []
        self._seq = itertools.count()
        self._shutdown = False
        self._broken: Optional[BaseException] = None
        self._threads: List[threading.Thread] = []
        self._closed = threading.Event()
        self._finalized = False
        self._wref = weakref.ref(self)
        self._send_lock = threading.Lock()
        self._cancel_lock = threading.Lock()
        self._submit_gen = entry.gen
        self._submit_proxy = self._connect()

    def start(self) -> None:
        """Start the sender and collector threads."""
        for target, name in ((self._sender, "sender"), (self._collector, "collector")):
            t = threading.Thread(target=target, name=f"pydist-client-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        _Exit.live.add(self)

    @staticmethod
    def executor_dropped(core: "ClientCore") -> None:
        """The executor was collected without shutdown: finish its work in the background, then close."""
        try:
            core.shutdown(wait=False)
        except Exception as exc:
            log.debug("closing a dropped executor: %s", exc)

    @property
    def _uri(self) -> str:
        return self._entry.uri

    @property
    def _address(self) -> str:
        return self._entry.address

    def _connect(self, timeout: Optional[float] = None, call_timeout: Optional[float] = None):
        """A proxy to the entry node; each of its calls has a deadline (``node_timeout``)."""
        return self._entry.connect(timeout, call_timeout)

    def _enqueue(self, key: str, blob: bytes, payload: bytes, kind: int, bundle: Optional[str],
                 retries: int = 0) -> PydistFuture:
        fut = PydistFuture()
        fds: List[int] = []
        if self._shm_ok and isinstance(payload, list) and len(self._shm_fds) < SHM_MAX_TASKS:
            try:
                payload, fds = wire.to_shared(payload)
            except OSError as exc:   # out of descriptors or memory for memfds: the bytes go in band
                log.debug("large arguments in band (no memfd: %s)", exc)
        with self._lock:
            try:
                self._check_open()
            except BaseException:
                self._close_fds(fds)
                raise
            tid = f"{self._cid}.{next(self._seq)}"
            if fds:
                self._shm_fds[tid] = fds
            fut._pydist_tid = tid
            fut._pydist_exec = self._wref
            self._pending[tid] = fut
            if self._forward_output:
                kind |= FORWARD_OUTPUT
            rec: tuple = (tid, key, payload, bundle, 0, [], kind, self._cid) + ((retries,) if retries else ())
            self._records[tid] = (rec, blob)
            self._outbox.append((rec, blob))
            # A lone submit (no other task of this executor outstanding) is sent from this thread: no
            # hand-off to the sender thread.  Submits while others are in flight go through the sender,
            # which batches everything queued meanwhile into one call.
            direct = len(self._pending) == 1 and len(self._outbox) == 1 and self._room() > 0
            if len(self._outbox) == 1 and not direct:
                self._cond.notify_all()
            linger = False
            if direct:
                # wait in the node for the result only if the caller looked at the last lone task's
                # outcome first (one task at a time), never in a burst (see PydistFuture.result)
                linger = self._lone_seen is None or self._lone_seen[0]
                fut._pydist_seen = self._lone_seen = [False]
        if direct and self._send_lock.acquire(blocking=False):
            try:
                gen = self._entry.gen
                try:
                    self._send_outbox(lone=linger)
                except Exception as exc:
                    self._node_failed(exc, gen)
            finally:
                self._send_lock.release()
        elif direct:
            with self._cond:
                self._cond.notify_all()
        return fut

    @staticmethod
    def _close_fds(fds) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _room(self) -> int:
        """How many more tasks may be sent now (caller holds ``_lock``): ``max_workers`` on a running
        cluster and the entry node's ``--max-client-tasks`` cap the tasks sent and unfinished."""
        cap = self._limits.get("client_tasks")
        if self._max_inflight is not None:
            cap = self._max_inflight if cap is None else min(cap, self._max_inflight)
        if cap is None:
            return len(self._outbox)
        return cap - (len(self._pending) - len(self._outbox))

    def _take(self, recs) -> None:
        """These tasks leave the outbox for the node (caller holds ``_lock``): count their bytes."""
        for rec in recs:
            size = wire.payload_size(rec[2])
            self._sent_sizes[rec[0]] = size
            self._sent_bytes += size

    def _untake(self, tids) -> None:
        """These tasks finished, were withdrawn or go back to the outbox (caller holds ``_lock``)."""
        for t in tids:
            self._sent_bytes -= self._sent_sizes.pop(t, 0)

    def _check_open(self) -> None:
        if self._fork_gen != _Fork.gen:
            raise RuntimeError(f"this ClusterExecutor was created in process {self._pid}; a forked child "
                               f"(process {os.getpid()}) cannot use it (its threads and connections did not "
                               "survive the fork, and its task ids would collide): create a new "
                               "ClusterExecutor in the child")
        if self._broken is not None:
            raise BrokenCluster(str(self._broken))
        if _Exit.started:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; optionally cancel pending ones; with ``wait`` block until all are done.
        Stops the embedded cluster, if any, once nothing is pending."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending.values())
        if cancel_futures:
            # what was submitted goes out first, as ProcessPoolExecutor hands submitted calls to idle
            # workers: what an idle worker took runs, the rest is withdrawn wherever it waits
            with self._send_lock:
                gen = self._entry.gen
                try:
                    self._send_outbox()
                except Exception as exc:
                    self._node_failed(exc, gen)
            self.cancel_many(pending)
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

    def cancel_many(self, futs: List[Any]) -> None:
        """``cancel()`` for many futures of this client with one question to the node (leaving a
        ``map`` early, ``shutdown(cancel_futures=True)``): those withdrawn are cancelled, the others
        marked running."""
        waiting = [f for f in futs if isinstance(f, PydistFuture) and not f.done() and f._pydist_tid]
        if not waiting:
            return
        with self._cancel_lock:
            gone = self._cancel_remote([f._pydist_tid for f in waiting])
            for f in waiting:
                if f._pydist_tid in gone:
                    f._withdrawn()
                else:
                    f._mark_running()

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
            # (an id no longer pending is finished: its result is being delivered, never withdrawn)
            ask = [t for t in tids if t not in gone and t in self._pending]
        if ask:
            with self._send_lock:
                gen = self._entry.gen
                try:
                    gone.update(self._submit_proxy_now().cancel(self._cid, ask))
                except Exception as exc:   # the node is gone: fail over (the tasks run there) or break
                    if not self._node_failed(exc, gen):
                        return set(tids)
        with self._lock:
            for t in gone:
                self._pending.pop(t, None)
                self._records.pop(t, None)
                self._recon.discard(t)
                if self._shm_fds:
                    self._close_fds(self._shm_fds.pop(t, ()))
            self._untake(gone)
            if self._outbox:
                self._cond.notify_all()   # room for tasks held back
        return gone

    def _submit_proxy_now(self):
        """The submit proxy (caller holds ``_send_lock``), reconnected after a failover; each use claims
        it (Pyro5 proxies belong to a thread, and this one moves between the sender and callers)."""
        if self._submit_gen != self._entry.gen:
            security.release(self._submit_proxy)
            self._submit_gen = self._entry.gen
            self._submit_proxy = self._connect()
        self._submit_proxy._pyroClaimOwnership()
        return self._submit_proxy

    def _send_outbox(self, lone: bool = False) -> None:
        """Send everything queued (caller holds ``_send_lock``); the submit proxy moves between the
        sender thread and direct callers, so each use claims it (Pyro5 proxies belong to a thread).
        ``lone``: a lone task sent from the caller's thread goes with ``submit_wait``: when it is short,
        its result rides back in the reply and the caller resolves its future itself (no hand-off
        through the collector's long poll)."""
        proxy = self._submit_proxy_now()
        while True:
            with self._lock:
                # at most max_batch tasks and about BATCH_BYTES per call, so large arguments stream to
                # the node (its workers start on the first while the next are on the wire)
                # (and within the node's --max-client-bytes for what is sent and unfinished; a task over
                # it on its own still goes, for the node's ResourceLimit naming the limit)
                n = size = 0
                cap_bytes = self._limits.get("client_bytes")
                for rec, _ in self._outbox[:min(self._cfg.max_batch, self._room())]:
                    s = wire.payload_size(rec[2])
                    if cap_bytes is not None and self._sent_bytes + size + s > cap_bytes \
                            and self._sent_bytes + size > 0:
                        break
                    n += 1
                    size += s
                    if size >= BATCH_BYTES:
                        break
                batch = self._outbox[:n]
                del self._outbox[:n]
                self._take(rec for rec, _ in batch)
            if not batch:
                return
            fns = {}
            recs = []
            for rec, blob in batch:
                fns[rec[1]] = blob
                recs.append(rec)
            done: list = []
            try:
                if lone and len(recs) == 1:
                    lone = False
                    done = proxy.submit_wait(self._cid, fns, recs, LINGER)[1]
                else:
                    proxy.submit(self._cid, fns, recs)
            except Exception:
                with self._lock:   # not delivered: a failover sends them again
                    self._untake(rec[0] for rec in recs)
                    self._outbox[:0] = [b for b in batch if b[0][0] in self._pending]
                raise   # the node is gone or silent: the caller fails over or breaks the executor
            except BaseException:
                # KeyboardInterrupt / SystemExit (a signal handler) in the caller's thread mid-call: the
                # batch goes back (a resent task id is ignored by the node), the connection is dropped
                # (half a message may be on it; the next call reconnects), the executor stays usable
                with self._lock:
                    self._untake(rec[0] for rec in recs)
                    self._outbox[:0] = batch
                    self._cond.notify_all()
                try:
                    proxy._pyroRelease()
                except Exception:
                    pass
                raise
            self._entry.heard()
            if done:
                self._in_reply += len(done)
                self._deliver(done)
            with self._lock:
                for rec in recs:
                    if rec[0] in self._pending:
                        self._recon.add(rec[0])

    def _sender(self) -> None:
        try:
            while True:
                with self._cond:
                    while (not self._outbox or self._room() <= 0) and not self._closed.is_set():
                        self._cond.wait()
                    if self._closed.is_set() and not self._outbox:
                        return
                with self._send_lock:
                    gen = self._entry.gen
                    try:
                        self._send_outbox()
                    except Exception as exc:   # the node is gone or silent
                        if not self._node_failed(exc, gen):
                            return
        except BaseException as exc:
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
        poll = self._cfg.poll_interval
        next_recon = time.monotonic() + RECONCILE_EVERY
        try:
            while not self._closed.is_set():
                gen = self._entry.gen
                try:
                    if proxy is None:
                        proxy = self._connect(call_timeout=poll + self._cfg.node_timeout)
                    recon = None
                    if time.monotonic() >= next_recon:
                        with self._lock:
                            recon = self._recon.summary()
                        next_recon = time.monotonic() + RECONCILE_EVERY
                    reply = proxy.collect(self._cid, poll, recon) if recon else proxy.collect(self._cid, poll)
                    self._entry.heard()
                    results, started = reply[0], reply[1]
                    if started:
                        self._mark_started(started)
                    if results:
                        self._deliver(results)
                        # let a thread woken by those futures run before this one marshals its next
                        # poll (it held the GIL for ~0.1-0.2 ms: 5-8 % of a lone task's latency, #15)
                        time.sleep(0)
                    if recon is not None and (reply[2]["n"], reply[2]["d"]) != (recon["n"], recon["d"]):
                        self._reconcile(proxy)
                except Exception as exc:
                    security.release(proxy)
                    proxy = None
                    if self._closed.is_set() or not self._node_failed(exc, gen):
                        return
        except BaseException as exc:
            if not self._closed.is_set():
                self._break(exc)
        finally:
            security.release(proxy)

    def _mark_started(self, ids: List[str]) -> None:
        pending = self._pending
        for tid in ids:
            f = pending.get(tid)
            if f is not None and f._state == _PENDING:   # (not done(): that is the caller looking)
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
            for r in results:
                self._records.pop(r[0], None)
                self._recon.discard(r[0])
                if self._shm_fds:
                    self._close_fds(self._shm_fds.pop(r[0], ()))
            self._untake(r[0] for r in results)
            if self._outbox:
                self._cond.notify_all()   # room for tasks held back by max_workers or the node's limits
        for f, r in futs:
            if r[wire.R_BLOB][:1] == b"\x00":   # the task printed: its output rides in front (pydist.output)
                items, blob = split_output(r[wire.R_BLOB])
                r = tuple(r[:wire.R_BLOB]) + (blob,) + tuple(r[wire.R_BLOB + 1:])
                if items:
                    try:
                        emit_output(items, r[wire.R_NODE], r[wire.R_WORKER], r[0])
                    except Exception as exc:   # a closed sys.stdout must not lose the result
                        log.warning("could not print the output of task %s: %s", r[0], exc)
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
            self._records.clear()
            self._recon.clear()
            for fds in self._shm_fds.values():
                self._close_fds(fds)
            self._shm_fds.clear()
            self._untake(list(self._sent_sizes))
            self._cond.notify_all()
        for f in pending:
            try:
                f.set_exception(BrokenCluster(str(err)))
            except InvalidStateError:
                pass
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
