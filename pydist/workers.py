"""A node's worker processes: long-lived, fed batches of tasks over pipes, replaced when they die.

::

    Node (scheduler decides)                    worker process i (python -m pydist.workers)
      WorkerPool.send(i, ("run", fns, tasks)) ─▶ writer thread ─pipe─▶ intake thread ─▶ local queue
      WorkerPool.send(i, ("cancel", req, ids)) ─▶        "        ─pipe─▶ intake: drops queued ids ─┐
      on_dropped(i, req, [ids never run]) ◀── reader thread ◀─pipe── ("dropped", req, ids) ◀─────────┘
      on_results(i, [result, ...])  ◀── reader thread ◀─pipe── ("res", [...]) ◀── task thread runs
                                                                 flushed when idle / every 2 ms   the queue
      on_exit(i)  ◀── reader thread sees EOF (segfault, os._exit, kill) ─▶ pool starts a replacement

The node never blocks on a pipe: sends go through a per-worker writer thread.  A worker's intake thread
reads every frame as it arrives into a local queue; its main thread runs the queued tasks in order;
results go back in batches (at most ``FLUSH_EVERY`` s late).  Because the intake never waits for a task,
the node can withdraw tasks it sent ahead (the scheduler's window) until the moment each starts: a
task taken off the local queue has started, one dropped from it never runs.
The function blobs a batch carries are unpickled once and cached (LRU) by key in the worker.
What a task prints or logs is captured (pydist.output) and rides with its result to a client that asked
for it (``forward_output``), else goes to the node's stderr, prefixed with node, worker and task.
"""
from __future__ import annotations

import argparse
import fcntl
import collections
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

if TYPE_CHECKING:   # pragma: no cover
    import mmap

from . import wire
from .procstate import WorkerState as _WorkerState   # the process-wide state, in one place
from .errors import DeserializationError, TaskError
from .globalspace import ClientSpaces
from .output import FORWARD_OUTPUT, TaskOutput, attach as attach_output, split as split_output

log = logging.getLogger(__name__)

FLUSH_EVERY = 0.002
FN_CACHE = 256
PIPE_SIZE = 1 << 20   # bytes of pipe buffer asked for (Linux caps it at /proc/sys/fs/pipe-max-size)
SLOT_SIZE = 1280  # bytes of the shared "task now running" slot of each worker:
SLOT_TID = 96     # [0:96] task id (NUL-padded), [96:104] start (time.time(), double), [104:256] function name,
SLOT_TAIL = 256   # [256:1280] the last lines of the running task's output (NUL-terminated)
SLOT_T = struct.Struct("d")
FAILURES_KEPT = 20   # recent task failures a pool remembers (for the dashboard)


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
                 slot_path: Optional[str] = None):
        self.fd_in, self.fd_out = fd_in, fd_out
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

        A reader thread (``_intake``) reads the pipe into ``self.queue`` at once, so a ``("cancel",
        request, ids)`` frame is answered while a task runs: every id still in the queue is dropped
        (it never runs) and reported back as ``("dropped", request, ids)``.  Taking a task off the
        queue (under ``self.cond``) is the moment it starts: a cancel either finds it queued or not."""
        threading.Thread(target=self._intake, daemon=True, name="pydist-intake").start()
        out: List[tuple] = []
        last = time.perf_counter()
        q, cond = self.queue, self.cond
        while True:
            with cond:
                item = q.popleft() if q else None
            if item is None:
                if out:   # nothing else to run now: what is done goes back at once
                    self._write(("res", out))
                    out = []
                with cond:
                    while not q:
                        cond.wait()
                    item = q.popleft()
                last = time.perf_counter()
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

    def _intake(self) -> None:
        """(reader thread) Pipe -> ``self.queue``; answers cancels at once (see ``serve``)."""
        q, cond = self.queue, self.cond
        try:
            while True:
                try:
                    msg = wire.read_frame(self.fd_in)
                except EOFError:
                    msg = ("eof",)
                op = msg[0]
                if op == "cancel":
                    self._withdraw(msg[1], msg[2])
                    continue
                with cond:
                    if op == "run":
                        fns, first = msg[1], True
                        for rec in msg[2]:
                            q.append(("run", fns, rec, first))
                            first = False
                    else:
                        q.append(msg)
                    cond.notify()
                if op in ("eof", "stop"):
                    return
        except BaseException:   # an unreadable frame: end the worker (the node replaces it)
            log.exception("worker %d could not read its pipe", self.index)
            with cond:
                q.append(("eof",))
                cond.notify()

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
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    # Ctrl-C in a terminal signals the whole process group: the node stops its workers itself (a worker
    # that exited on SIGINT first would be logged as a death and replaced while the node is stopping)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Task output goes to stderr; fd 1 is not ours to keep (the node's READY protocol lives there).
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    w = _Worker(a.fd_in, a.fd_out, a.index, a.node, a.code_cache, a.slot)
    w.output = TaskOutput(a.node, a.index, w.write_tail)   # print/logging in a task: captured (pydist.output)
    w.output.install()
    try:   # (the node may be gone before we say hello: a killed node's worker just exits)
        wire.write_frame(a.fd_out, ("hello", os.getpid()))
        w.serve()
    except (BrokenPipeError, KeyboardInterrupt):
        pass


# ---------------------------------------------------------------------------------------------------
# The node's side
# ---------------------------------------------------------------------------------------------------
class _Handle:
    """One worker process as the node sees it."""

    def __init__(self, index: int):
        self.index = index
        self.proc: Optional[subprocess.Popen] = None
        self.fd_w = -1
        self.fd_r = -1
        self.outbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self.ready = threading.Event()
        self.generation = 0
        self.wlock = threading.Lock()
        self.queued = 0       # frames waiting for the writer thread (keeps frames in order)
        self.slot_view: Optional["mmap.mmap"] = None  # the node's read-only view of this worker's "now running" slot


class WorkerPool:
    """N long-lived worker processes of one node.

    ``on_results(index, results)`` is called from a reader thread for every batch of results;
    ``on_dropped(index, request, ids)`` when the worker answers ``("cancel", request, ids)`` with the ids
    it dropped from its queue (they never run; ids not listed had started or were not there);
    ``on_exit(index, returncode, task_id)`` when a worker died (the pool has already started its
    replacement, unless it is stopping); ``task_id`` is the task it was running, read from a small
    shared-memory slot the worker writes before each task (None if it died between tasks).  ``send`` never blocks.
    """

    def __init__(self, size: int, node_name: str, code_cache: str,
                 on_results: Callable[[int, list], None], on_exit: Callable[[int, Optional[int], Optional[str]], None],
                 env: Optional[dict] = None,
                 on_dropped: Optional[Callable[[int, int, List[str]], None]] = None):
        self.size = size
        self.node_name = node_name
        self.code_cache = code_cache
        self.on_results = on_results
        self.on_exit = on_exit
        self.on_dropped = on_dropped
        self.env = env
        self.handles = [_Handle(i) for i in range(size)]
        self._stopping = threading.Event()
        self.restarts = 0
        # each worker's "task now running" slot is an unlinked temporary file (an fd, no name): a node
        # killed with SIGKILL leaves nothing behind in the temp directory
        self._slots: Dict[tuple, int] = {}   # (index, generation) -> fd
        self.failures: "collections.deque[dict]" = collections.deque(maxlen=FAILURES_KEPT)

    def start(self) -> None:
        """Start every worker (returns at once; each becomes ready on its own)."""
        for h in self.handles:
            self._spawn(h)

    def pids(self) -> List[int]:
        """Process ids of the live workers."""
        return [h.proc.pid for h in self.handles if h.proc is not None and h.proc.poll() is None]

    def _spawn(self, h: _Handle) -> None:
        r_in, w_in = os.pipe()     # node -> worker
        r_out, w_out = os.pipe()   # worker -> node
        # -c, not -m: the worker must run *the* pydist.workers module (task_context reads its state)
        with tempfile.TemporaryFile(prefix="pydist-slot-") as f:   # unlinked at once
            f.write(b"\0" * SLOT_SIZE)
            f.flush()
            slot_fd = os.dup(f.fileno())
        self._slots[(h.index, h.generation + 1)] = slot_fd
        import mmap

        view = mmap.mmap(slot_fd, SLOT_SIZE, access=mmap.ACCESS_READ)   # the node's view (pool.running)
        cmd = [sys.executable, "-c", "from pydist.workers import worker_main; worker_main()", str(r_in),
               str(w_out), str(h.index), self.node_name, self.code_cache, f"fd:{slot_fd}"]
        try:
            # own session: a terminal's Ctrl-C reaches the node, which stops its workers itself
            proc = subprocess.Popen(cmd, pass_fds=(r_in, w_out, slot_fd), stdin=subprocess.DEVNULL, env=self.env,
                                    start_new_session=True)
        finally:
            os.close(r_in)
            os.close(w_out)
        os.set_blocking(w_in, False)   # send() writes directly when it can, never blocking
        for fd in (w_in, r_out):       # bigger pipes: fewer wake-ups for large payloads (Linux)
            try:
                fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
            except OSError:
                pass
        h.generation += 1
        with h.wlock:
            h.proc, h.fd_w, h.fd_r = proc, w_in, r_out
            old_view, h.slot_view = h.slot_view, view
        if old_view is not None:
            old_view.close()
            h.outbox = queue.SimpleQueue()
            h.queued = 0
        h.ready.clear()
        gen = h.generation
        threading.Thread(target=self._writer, args=(h, w_in, h.outbox), daemon=True,
                         name=f"pydist-worker{h.index}-w").start()
        threading.Thread(target=self._reader, args=(h, r_out, proc, gen), daemon=True,
                         name=f"pydist-worker{h.index}-r").start()

    def send(self, index: int, msg: tuple, big: bool = False) -> None:
        """Send a frame to worker ``index``: written at once if the pipe has room, else queued for the
        worker's writer thread (never blocks; frames stay in order).  ``big``: it holds large buffers
        (sent out of band)."""
        self._send(self.handles[index], wire.frame(msg, big))

    def broadcast(self, msg: tuple) -> None:
        """Send a frame to every worker."""
        data = wire.frame(msg)
        for h in self.handles:
            self._send(h, data)

    def _send(self, h: _Handle, parts: list) -> None:
        with h.wlock:
            if h.fd_w < 0:
                return   # dead and not yet replaced
            if h.queued == 0:
                try:
                    n = os.writev(h.fd_w, parts)
                except BlockingIOError:
                    n = 0
                except OSError:
                    return   # the worker is dead: its reader reports it
                parts = wire.skip(parts, n)
                if not parts:
                    return
            h.queued += 1
            h.outbox.put(parts)

    def _writer(self, h: _Handle, fd: int, outbox: "queue.SimpleQueue") -> None:
        ok = True
        while True:
            parts = outbox.get()
            if parts is None:
                break
            while ok and parts:
                try:
                    parts = wire.skip(parts, os.writev(fd, parts))
                except BlockingIOError:
                    select.select([], [fd], [], 1.0)
                except OSError:
                    ok = False   # the reader sees the death and reports it
            with h.wlock:
                h.queued -= 1
        with h.wlock:   # never leave a closed fd number where _send could write to it
            if h.fd_w == fd:
                h.fd_w = -1
            try:
                os.close(fd)
            except OSError:
                pass

    def _reader(self, h: _Handle, fd: int, proc: subprocess.Popen, gen: int) -> None:
        try:
            while True:
                msg = wire.read_frame(fd)
                if msg[0] == "res":
                    if any(r[1] == wire.ERROR for r in msg[1]):
                        self._note_failures(h.index, msg[1])
                    self.on_results(h.index, msg[1])
                elif msg[0] == "dropped":
                    if self.on_dropped is not None:
                        self.on_dropped(h.index, msg[1], msg[2])
                elif msg[0] == "hello":
                    h.ready.set()
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("worker %d sent an unreadable frame; replacing it", h.index)
            proc.kill()
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        outbox = h.outbox
        outbox.put(None)
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        culprit = self._read_slot(h.index, gen)
        if self._stopping.is_set():
            return
        log.warning("worker %d (pid %d) of node %s died with exit code %s%s; starting a replacement",
                    h.index, proc.pid, self.node_name, rc, f" running task {culprit}" if culprit else "")
        self.restarts += 1
        if h.generation == gen:
            self._spawn(h)
        self.on_exit(h.index, rc, culprit)

    def running(self) -> List[dict]:
        """The task each worker runs now: ``worker``, ``id``, ``function``, ``age`` (s); read from the
        workers' shared slots (no message to the worker)."""
        out: List[dict] = []
        now = time.time()
        for h in self.handles:
            view = h.slot_view
            if view is None:
                continue
            try:
                raw = view[:SLOT_SIZE]
            except ValueError:   # closed meanwhile
                continue
            tid = raw[:SLOT_TID].split(b"\0", 1)[0]
            if not tid:
                continue
            (t0,) = SLOT_T.unpack_from(raw, SLOT_TID)
            fn = raw[SLOT_TID + SLOT_T.size:SLOT_TAIL].split(b"\0", 1)[0]
            tail = raw[SLOT_TAIL:].split(b"\0", 1)[0].decode(errors="replace").splitlines()
            out.append({"worker": h.index, "id": tid.decode(errors="replace"),
                        "function": fn.decode(errors="replace"), "age": max(0.0, now - t0) if t0 else 0.0,
                        "output": tail})
        return out

    def _note_failures(self, index: int, results: list) -> None:
        for r in results:
            if r[1] != wire.ERROR:
                continue
            try:
                items, blob = split_output(r[2])
                _, tb, name, message = wire.error_report(blob)
            except Exception:
                items, tb, name, message = None, "", "?", "(unreadable error report)"
            tail = [ln for i in items or () if i[0] != "log" for ln in i[1].splitlines()][-20:]
            self.failures.append({"time": time.time(), "id": r[0], "node": self.node_name, "worker": index,
                                  "error": name, "message": message[:1000], "traceback": tb[-8000:],
                                  "output": tail})

    def _read_slot(self, index: int, gen: int) -> Optional[str]:
        """The task a dead worker was running (None: it was between tasks)."""
        fd = self._slots.pop((index, gen), None)
        if fd is None:
            return None
        try:
            raw = os.pread(fd, SLOT_SIZE, 0)
        except OSError:
            return None
        finally:
            os.close(fd)
        tid = raw.split(b"\0", 1)[0]
        return tid.decode(errors="replace") or None

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every worker: ask nicely, then terminate, then kill; remove the slot files."""
        self._stopping.set()
        for h in self.handles:
            self._send(h, wire.frame(("stop",)))
            h.outbox.put(None)
        deadline = time.monotonic() + timeout
        for h in self.handles:
            if h.proc is None:
                continue
            try:
                h.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                h.proc.terminate()
                try:
                    h.proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    h.proc.kill()
                    h.proc.wait()
        for key in list(self._slots):
            fd = self._slots.pop(key, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


if __name__ == "__main__":
    worker_main()
