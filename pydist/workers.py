"""A node's worker processes: long-lived, fed batches of tasks over pipes, replaced when they die.

::

    Node (scheduler decides)                    worker process i (pydist.workerproc)
      WorkerPool.send(i, ("run", fns, tasks)) ─▶ writer thread ─pipe─▶ main thread ─▶ local queue
      WorkerPool.send(i, ("cancel", req, ids)) ─▶ "  ─control pipe─▶ intake thread: drops queued ids ─┐
      on_dropped(i, req, [ids never run]) ◀── reader thread ◀─pipe── ("dropped", req, ids) ◀─────────┘
      on_results(i, [result, ...])  ◀── reader thread ◀─pipe── ("res", [...]) ◀── task thread runs
                                                                 flushed when idle / every 2 ms   the queue
      on_exit(i)  ◀── reader thread sees EOF (segfault, os._exit, kill) ─▶ pool starts a replacement

The node never blocks on a pipe: sends go through a per-worker writer thread (frames stay in order,
cancels included).  A worker's main thread reads the task pipe itself when it has nothing to run (no
hand-off between threads for a lone task) and runs the queued tasks in order; results go back in
batches (at most ``FLUSH_EVERY`` s late).  Cancels come on a control pipe, read at once by the worker's
intake thread, which first takes what waits in the task pipe into the local queue: so the node can
withdraw tasks it sent ahead (the scheduler's window) until the moment each starts, even behind a long
task: a task taken off the local queue has started, one dropped from it never runs.
The function blobs a batch carries are unpickled once and cached (LRU) by key in the worker.
What a task prints or logs is captured (pydist.output) and rides with its result to a client that asked
for it (``forward_output``), else goes to the node's stderr, prefixed with node, worker and task.
"""
from __future__ import annotations

import fcntl
import collections
import logging
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

if TYPE_CHECKING:   # pragma: no cover
    import mmap

from . import wire
from .workerproc import (FLUSH_EVERY, FN_CACHE, SLOT_SIZE, SLOT_T, SLOT_TAIL, SLOT_TID, TaskContext,  # noqa: F401
                         task_context, worker_main)   # (the worker process's side; re-exported)
from .output import split as split_output

log = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20   # bytes of pipe buffer asked for (Linux caps it at /proc/sys/fs/pipe-max-size)
FAILURES_KEPT = 20   # recent task failures a pool remembers (for the dashboard)


# ---------------------------------------------------------------------------------------------------
class _Handle:
    """One worker process as the node sees it."""

    def __init__(self, index: int):
        self.index = index
        self.proc: Optional[subprocess.Popen] = None
        self.fd_w = -1
        self.fd_r = -1
        self.fd_c = -1        # the control pipe (cancels), read by the worker's intake thread
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
        r_in, w_in = os.pipe()     # node -> worker: tasks and the frames that keep their order
        r_c, w_c = os.pipe()       # node -> worker: cancels (answered while a task runs)
        r_out, w_out = os.pipe()   # worker -> node
        with tempfile.TemporaryFile(prefix="pydist-slot-") as f:   # unlinked at once
            f.write(b"\0" * SLOT_SIZE)
            f.flush()
            slot_fd = os.dup(f.fileno())
        self._slots[(h.index, h.generation + 1)] = slot_fd
        import mmap

        view = mmap.mmap(slot_fd, SLOT_SIZE, access=mmap.ACCESS_READ)   # the node's view (pool.running)
        cmd = [sys.executable, "-c", "from pydist.workerproc import worker_main; worker_main()", str(r_in),
               str(w_out), str(h.index), self.node_name, self.code_cache, f"fd:{slot_fd}", "--control", str(r_c)]
        try:
            # own session: a terminal's Ctrl-C reaches the node, which stops its workers itself
            proc = subprocess.Popen(cmd, pass_fds=(r_in, r_c, w_out, slot_fd), stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True)
        except BaseException:
            for fd in (w_in, w_c, r_out):
                os.close(fd)
            raise
        finally:
            os.close(r_in)
            os.close(r_c)
            os.close(w_out)
        os.set_blocking(w_in, False)   # send() writes directly when it can, never blocking
        os.set_blocking(w_c, False)
        for fd in (w_in, r_out):       # bigger pipes: fewer wake-ups for large payloads (Linux)
            try:
                fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
            except OSError:
                pass
        h.generation += 1
        with h.wlock:
            h.proc, h.fd_w, h.fd_r, h.fd_c = proc, w_in, r_out, w_c
            old_view, h.slot_view = h.slot_view, view
        if old_view is not None:
            old_view.close()
            h.outbox = queue.SimpleQueue()
            h.queued = 0
        h.ready.clear()
        gen = h.generation
        threading.Thread(target=self._writer, args=(h, w_in, w_c, h.outbox), daemon=True,
                         name=f"pydist-worker{h.index}-w").start()
        threading.Thread(target=self._reader, args=(h, r_out, proc, gen), daemon=True,
                         name=f"pydist-worker{h.index}-r").start()

    def send(self, index: int, msg: tuple, big: bool = False) -> None:
        """Send a frame to worker ``index``: written at once if the pipe has room, else queued for the
        worker's writer thread (never blocks; frames stay in order).  ``big``: it holds large buffers
        (sent out of band).  A ``("cancel", ...)`` goes on the control pipe, after every frame before it."""
        self._send(self.handles[index], wire.frame(msg, big), msg[0] == "cancel")

    def broadcast(self, msg: tuple) -> None:
        """Send a frame to every worker."""
        data = wire.frame(msg)
        for h in self.handles:
            self._send(h, data)

    def _send(self, h: _Handle, parts: list, control: bool = False) -> None:
        with h.wlock:
            fd = h.fd_c if control else h.fd_w
            if fd < 0:
                return   # dead and not yet replaced
            if h.queued == 0:
                try:
                    n = os.writev(fd, parts)
                except BlockingIOError:
                    n = 0
                except OSError:
                    return   # the worker is dead: its reader reports it
                parts = wire.skip(parts, n)
                if not parts:
                    return
            h.queued += 1
            h.outbox.put((control, parts))

    def _writer(self, h: _Handle, fd: int, fd_c: int, outbox: "queue.SimpleQueue") -> None:
        ok = True
        while True:
            item = outbox.get()
            if item is None:
                break
            control, parts = item
            target = fd_c if control else fd
            while ok and parts:
                try:
                    parts = wire.skip(parts, os.writev(target, parts))
                except BlockingIOError:
                    select.select([], [target], [], 1.0)
                except OSError:
                    ok = False   # the reader sees the death and reports it
            with h.wlock:
                h.queued -= 1
        with h.wlock:   # never leave a closed fd number where _send could write to it
            if h.fd_w == fd:
                h.fd_w = h.fd_c = -1
            for f in (fd, fd_c):
                try:
                    os.close(f)
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

