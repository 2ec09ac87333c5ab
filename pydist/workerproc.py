"""A worker process: what runs the tasks a node sends it (the node's side is ``pydist.workers``).

::

    task pipe from the node ──▶ main thread (when nothing is queued) ──▶ local queue ──▶ run each in order
       ("run", fns, tasks), ("init" | "forget" | "stop", ...)
    control pipe from the node ──▶ intake thread: ("cancel", req, ids): take what waits in the task pipe
       into the queue, drop the queued ids, answer ("dropped", req, ids) at once (a task may be running)
    pipe to the node   ◀── ("res", [result, ...]) batched, flushed when idle or every FLUSH_EVERY s

A task taken off the local queue has started; one dropped from it never runs.  Function blobs are
unpickled once per (bundle, key) and cached (LRU, ``FN_CACHE``); each client's ``__main__`` functions
share one globals namespace (``pydist.globalspace``).  The shared "running now" slot (an mmap'd,
unlinked temp file the node passes by fd) holds the current task's id, start time, function name and
the tail of its output, for the dashboard.  The worker's own mutable state is ``procstate.WorkerState``.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import select
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:   # pragma: no cover
    pass

from . import wire
from .errors import DeserializationError, TaskError
from .globalspace import ClientSpaces
from .output import FORWARD_OUTPUT, TaskOutput, attach as attach_output
from .procstate import WorkerState as _WorkerState   # the process-wide state, in one place

log = logging.getLogger("pydist.workers")

FLUSH_EVERY = 0.002
FN_CACHE = 256
SLOT_SIZE = 1280  # bytes of the shared "task now running" slot of each worker:
SLOT_TID = 96     # [0:96] task id (NUL-padded), [96:104] start (time.time(), double), [104:256] function name,
SLOT_TAIL = 256   # [256:1280] the last lines of the running task's output (NUL-terminated)
SLOT_T = struct.Struct("d")


# ---------------------------------------------------------------------------------------------------
# Inside a task
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskContext:
    """Where the current task runs: ``node`` name, ``worker`` index, ``task_id``, ``hops`` travelled."""

    node: str
    worker: int
    task_id: str
    hops: int
    path: tuple


def task_context() -> TaskContext:
    """Inside a pydist task: where it runs (node, worker, task id, hops).  Elsewhere: RuntimeError."""
    ctx = _WorkerState.current
    if ctx is None:
        raise RuntimeError("pydist.task_context() is only available inside a task run by a pydist worker")
    return ctx


# ---------------------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, fd_in: int, fd_out: int, index: int, node: str, code_cache: str,
                 slot_path: Optional[str] = None, fd_control: Optional[int] = None):
        self.fd_in, self.fd_out, self.fd_control = fd_in, fd_out, fd_control
        self.rlock = threading.Lock()   # held while a whole frame is read from the task pipe (two readers)
        self.slot = None
        if slot_path:
            import mmap

            if slot_path.startswith("fd:"):   # an unlinked file the node passed down (nothing on disk)
                fd = int(slot_path[3:])
                self.slot = mmap.mmap(fd, SLOT_SIZE)
                os.close(fd)
            else:
                with open(slot_path, "r+b") as f:
                    self.slot = mmap.mmap(f.fileno(), SLOT_SIZE)
        self.index, self.node, self.code_cache = index, node, code_cache
        self.fns: "collections.OrderedDict[str, object]" = collections.OrderedDict()
        self.init_blobs: Dict[str, bytes] = {}
        self.spaces = ClientSpaces()   # one globals dict per client and by-value module (item 10)
        self.init_done: Dict[str, Optional[bytes]] = {}   # client -> None (ok) or exception blob
        self.slot_names: Dict[str, bytes] = {}
        self.output: Optional[TaskOutput] = None   # set by worker_main: captures the tasks' output
        # what arrived and has not started: ("run", fns, task, first of its frame) or a control frame
        self.queue: "collections.deque[tuple]" = collections.deque()
        self.cond = threading.Condition()
        self.wlock = threading.Lock()   # the pipe to the node has two writers (results, cancel answers)

    # -------------------------------------------------------------------------------- intake
    def serve(self) -> None:
        """Run what arrives, in order, until the pipe closes or the node says stop.

        The main thread reads the task pipe itself whenever nothing is queued (a lone task costs no
        hand-off between threads).  Cancels come on the control pipe, which the intake thread
        (``_intake``) reads at once, even while a task runs: it first takes every frame waiting in the
        task pipe into ``self.queue``, then drops the ids still queued (they never run) and reports
        them back as ``("dropped", request, ids)``.  Taking a task off the queue (under ``self.cond``)
        is the moment it starts: a cancel either finds it queued or not."""
        if self.fd_control is not None:
            threading.Thread(target=self._intake, daemon=True, name="pydist-intake").start()
        out: List[tuple] = []
        last = time.perf_counter()
        q, cond = self.queue, self.cond
        poll = select.poll()
        poll.register(self.fd_in, select.POLLIN)
        while True:
            with cond:
                item = q.popleft() if q else None
            if item is None:
                if out:   # nothing else to run now: what is done goes back at once
                    self._write(("res", out))
                    out = []
                self._read_tasks(poll)
                last = time.perf_counter()
                continue
            op = item[0]
            if op == "run":
                if item[3]:   # the first task of a frame: bundles pinned with `pydist sync-code --pin`
                    from .codesync import sync_pinned

                    sync_pinned(self.code_cache, self.node)
                out.append(self.run_one(item[1], item[2]))
                now = time.perf_counter()
                if now - last > FLUSH_EVERY:
                    self._write(("res", out))
                    out, last = [], now
                continue
            if out:   # control frames keep their place after the results before them
                self._write(("res", out))
                out = []
            if op == "init":
                self.init_blobs[item[1]] = item[2]
            elif op == "forget":
                for c in item[1]:
                    self.init_blobs.pop(c, None)
                    self.spaces.forget(c)
                    self.init_done.pop(c, None)
            elif op in ("stop", "eof"):
                return

    def _read_tasks(self, poll) -> None:
        """(main thread, nothing queued) Wait for the task pipe and read one frame into the queue, unless
        the intake thread took it meanwhile (a cancel came: see ``serve``)."""
        while True:
            with self.cond:
                if self.queue:
                    return
            try:
                poll.poll()
            except InterruptedError:
                continue
            with self.rlock:
                if poll.poll(0):
                    self._enqueue(self._read_frame())
                    return

    def _read_frame(self) -> tuple:
        """One frame from the task pipe (caller holds ``rlock``); a closed or unreadable pipe ends the
        worker (the node replaces it)."""
        try:
            return wire.read_frame(self.fd_in)
        except EOFError:
            return ("eof",)
        except Exception:   # noqa: BLE001 - an unreadable frame: end the worker
            log.exception("worker %d could not read its pipe", self.index)
            return ("eof",)

    def _enqueue(self, msg: tuple) -> None:
        if msg[0] == "cancel":   # (a node that sends cancels on the task pipe: answered in its turn)
            self._withdraw(msg[1], msg[2])
            return
        with self.cond:
            if msg[0] == "run":
                fns, first = msg[1], True
                for rec in msg[2]:
                    self.queue.append(("run", fns, rec, first))
                    first = False
            else:
                self.queue.append(msg)
            self.cond.notify()

    def _intake(self) -> None:
        """(control thread) Cancels from the control pipe, answered at once (see ``serve``)."""
        fd = self.fd_control
        assert fd is not None
        waiting = select.poll()
        waiting.register(self.fd_in, select.POLLIN)
        try:
            while True:
                try:
                    msg = wire.read_frame(fd)
                except EOFError:
                    return   # the node closed it (stopping, or gone: the task pipe says so too)
                if msg[0] != "cancel":
                    continue
                with self.rlock:   # what the node sent before the cancel is in the task pipe: queue it
                    while waiting.poll(0):
                        frame = self._read_frame()
                        self._enqueue(frame)
                        if frame[0] == "eof":
                            break
                self._withdraw(msg[1], msg[2])
        except BaseException:   # an unreadable control frame: end the worker (the node replaces it)
            log.exception("worker %d could not read its control pipe", self.index)
            self._enqueue(("eof",))

    def _withdraw(self, request: int, ids: List[str]) -> None:
        """Drop the queued tasks among ``ids`` (they never run) and say which they were."""
        want = set(ids)
        with self.cond:
            keep = collections.deque(i for i in self.queue if i[0] != "run" or i[2][0] not in want)
            dropped = [i[2][0] for i in self.queue if i[0] == "run" and i[2][0] in want]
            if dropped:
                self.queue.clear()
                self.queue.extend(keep)
        self._write(("dropped", request, dropped))

    def _write(self, msg: tuple) -> None:
        """One frame to the node (results from the task thread, answers from the reader thread)."""
        with self.wlock:
            wire.write_frame(self.fd_out, msg)

    def function(self, fns: Dict[str, bytes], key: str, client: str = ""):
        # keyed by (bundle, key): the same function object submitted after a new upload_code must be
        # unpickled again, against the new bundle's modules
        key = (_WorkerState.active_bundle, key)  # type: ignore[assignment]
        fn = self.fns.get(key)
        if fn is not None:
            self.fns.move_to_end(key)
            return fn
        blob = fns.get(key[1])
        if blob is None:
            raise TaskError(f"function {key[1]} was not sent with its task (node bug)")
        try:
            fn = self.spaces.loads(blob, client)
        except BaseException as exc:
            hint = ""
            if isinstance(exc, (ModuleNotFoundError, ImportError)):
                hint = " (upload the code it needs with ClusterExecutor.upload_code(...))"
            raise DeserializationError(f"cannot unpickle the task's function on node {self.node}: "
                                       f"{type(exc).__name__}: {exc}{hint}") from exc
        self.fns[key] = fn
        if len(self.fns) > FN_CACHE:
            self.fns.popitem(last=False)
        return fn

    def slot_name(self, key: str, fn) -> bytes:
        """The function's name as the slot holds it (cached per function key)."""
        b = self.slot_names.get(key)
        if b is None:
            name = getattr(fn, "__qualname__", None) or type(fn).__name__
            mod = getattr(fn, "__module__", None)
            if mod and mod not in ("__main__", "builtins"):
                name = f"{mod}.{name}"
            size = SLOT_SIZE - SLOT_TID - SLOT_T.size
            b = name.encode(errors="replace")[:size - 1].ljust(size, b"\0")
            if len(self.slot_names) > FN_CACHE:
                self.slot_names.clear()
            self.slot_names[key] = b
        return b

    def initialize(self, client: str) -> Optional[bytes]:
        if client in self.init_done:
            return self.init_done[client]
        blob = self.init_blobs.get(client)
        err = None
        if blob is not None:
            try:
                fn, args = self.spaces.loads(blob, client)
                fn(*args)
            except BaseException as exc:  # an initializer may sys.exit too
                err = wire.dumps_exception(exc)
        self.init_done[client] = err
        return err

    def activate(self, bundle: Optional[str]) -> None:
        if bundle == _WorkerState.active_bundle:
            return
        from . import codesync

        path = None if bundle is None else os.path.join(self.code_cache, bundle, "tree")
        if path is not None and not os.path.isdir(path):
            from .errors import BundleNotFound

            raise BundleNotFound(f"code bundle {bundle[:12]} is not installed on node {self.node}")  # type: ignore[index]
        codesync.activate(path)
        _WorkerState.active_bundle = bundle

    def run_one(self, fns: Dict[str, bytes], t: tuple) -> tuple:
        tid, key, payload, bundle, hops, path, kind, client = t
        slot = self.slot
        if slot is not None:   # tells the node which task was running if this process dies
            slot[:SLOT_TID + SLOT_T.size] = (tid.encode()[:SLOT_TID - 1].ljust(SLOT_TID, b"\0")
                                              + SLOT_T.pack(time.time()))
            slot[SLOT_TID + SLOT_T.size] = 0
            slot[SLOT_TAIL] = 0
        forward = bool(kind & FORWARD_OUTPUT)
        out = self.output
        if out is not None:
            out.begin(tid)
        try:
            r = self._run_one(fns, tid, key, payload, bundle, hops, path, kind & ~FORWARD_OUTPUT, client)
        finally:
            if slot is not None:
                slot[0:1] = b"\0"
        if out is not None:
            items = out.end(forward)
            if items:   # only a task that printed pays for its output
                r = r[:2] + (attach_output(r[2], items),) + r[3:]
        return r

    def write_tail(self, text: str) -> None:
        """The last lines of the running task's output, for the node to read (dashboard, status --tasks)."""
        if self.slot is not None:
            b = text.encode(errors="replace")[-(SLOT_SIZE - SLOT_TAIL - 1):]
            self.slot[SLOT_TAIL:SLOT_TAIL + len(b) + 1] = b + b"\0"

    def _run_one(self, fns, tid, key, payload, bundle, hops, path, kind, client) -> tuple:
        """Run one task and return its result record.  Every outcome is a record, as
        ``ProcessPoolExecutor`` reports it: what the function raises (``SystemExit`` and
        ``KeyboardInterrupt`` included) comes back as itself; a function or arguments that cannot be
        unpickled here as ``DeserializationError``; a result that cannot be pickled as
        ``SerializationError`` (``SystemExit`` while pickling it, as itself)."""
        if client:
            err = self.initialize(client)
            if err is not None:
                return (tid, wire.INIT_FAILED, err, self.node, self.index, 0.0)
        t0 = time.perf_counter()
        _WorkerState.current = TaskContext(self.node, self.index, tid, hops, tuple(path))
        try:
            self.activate(bundle)
            fn = self.function(fns, key, client)
            if self.slot is not None:   # what the dashboard shows as running (no message to the node)
                self.slot[SLOT_TID + SLOT_T.size:] = self.slot_name(key, fn)
            try:
                call = wire.loads_payload(payload, lambda d, b=None: self.spaces.loads(d, client, b))
            except BaseException as exc:   # a __reduce__ may call sys.exit: still the task's failure
                raise DeserializationError(f"cannot unpickle the arguments of task {tid} on node {self.node}: "
                                           f"{type(exc).__name__}: {exc}") from exc
            if kind == wire.KIND_CHUNK:
                value = [fn(*a) for a in call]
            else:
                args, kwargs = call
                value = fn(*args, **kwargs) if kwargs else fn(*args)
            del call
            runtime = time.perf_counter() - t0
            blob = wire.dumps(value, f"the result of task {tid} ({type(value).__qualname__})")
            return (tid, wire.OK, blob, self.node, self.index, runtime)
        except BaseException as exc:
            tb = exc.__traceback__   # the traceback starts in the task, not in this function
            while tb is not None and tb.tb_frame.f_code.co_filename == __file__ and tb.tb_next is not None:
                tb = tb.tb_next
            return (tid, wire.ERROR, wire.dumps_exception(exc.with_traceback(tb)), self.node, self.index,
                    time.perf_counter() - t0)
        finally:
            _WorkerState.current = None


def worker_main(argv: Optional[List[str]] = None) -> None:
    """Entry point of a worker process (``python -m pydist.workers FD_IN FD_OUT INDEX NODE CACHE``)."""
    p = argparse.ArgumentParser(prog="pydist-worker")
    p.add_argument("fd_in", type=int)
    p.add_argument("fd_out", type=int)
    p.add_argument("index", type=int)
    p.add_argument("node")
    p.add_argument("code_cache")
    p.add_argument("slot", nargs="?")
    p.add_argument("--control", type=int, default=None)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    # Ctrl-C in a terminal signals the whole process group: the node stops its workers itself (a worker
    # that exited on SIGINT first would be logged as a death and replaced while the node is stopping)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Task output goes to stderr; fd 1 is not ours to keep (the node's READY protocol lives there).
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    w = _Worker(a.fd_in, a.fd_out, a.index, a.node, a.code_cache, a.slot, a.control)
    w.output = TaskOutput(a.node, a.index, w.write_tail)   # print/logging in a task: captured (pydist.output)
    w.output.install()
    try:   # (the node may be gone before we say hello: a killed node's worker just exits)
        wire.write_frame(a.fd_out, ("hello", os.getpid()))
        w.serve()
    except (BrokenPipeError, KeyboardInterrupt):
        pass


# ---------------------------------------------------------------------------------------------------
# The node's side


if __name__ == "__main__":
    worker_main()
