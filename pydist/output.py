"""Task output: what a task prints or logs, captured in its worker and printed at the client.

::

    worker process                                             client (ClusterExecutor(forward_output=True))
      sys.stdout / sys.stderr / root logging handler            _deliver(result)
        └─▶ TaskOutput.items [(stream, text), ...] in order       split(blob) ─▶ emit(): "[node/w1 task-id] line"
            (at most MAX_BYTES per task)                              stdout lines ─▶ sys.stdout
      result blob = attach(blob, items)  ──(nodes pass it on)──▶     stderr lines ─▶ sys.stderr
            (only if the task printed something)                     log records ─▶ the client's logging

A task that prints nothing pays nothing: its result is sent unchanged.  The output rides with the result,
so it arrives, in order, just before the task's future resolves; the nodes in between never look at it.
The last lines of a running task's output are also written into the worker's shared slot, where the node
reads them for ``pydist status --tasks`` and the dashboard (no message to the node).  A task whose client
did not ask for its output (the ``FORWARD_OUTPUT`` bit of the task's kind) has it written to the node's
log, one prefixed line per line.  Output written to file descriptors 1/2 directly (C code, subprocesses)
is not captured: it goes to the node's stderr as before.
"""
from __future__ import annotations

import io
import logging
import pickle
import struct
import sys
import time
from typing import Callable, List, Optional, Tuple

MAGIC = b"\x00PYDOUT1"          # cannot start a pickle (those start with b"\x80")
_LEN = struct.Struct("!I")
FORWARD_OUTPUT = 0x100           # bit in a task's ``kind``: send its output to the client
MAX_BYTES = 1 << 20              # output kept per task; beyond it, a note of how much was dropped
TAIL_LINES = 5                   # lines of a running task shown by the dashboard / status --tasks


def attach(blob: bytes, items: List[tuple]) -> bytes:
    """A result blob carrying the task's output in front of it."""
    head = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
    return MAGIC + _LEN.pack(len(head)) + head + blob


def split(blob: bytes) -> Tuple[Optional[List[tuple]], bytes]:
    """``(output items or None, the original blob)``."""
    if not blob.startswith(MAGIC):
        return None, blob
    n = _LEN.unpack_from(blob, len(MAGIC))[0]
    start = len(MAGIC) + _LEN.size
    try:
        items = _PlainUnpickler(io.BytesIO(blob[start:start + n])).load()
    except Exception:
        items = [("err", "(pydist: this task's output could not be read)\n")]
    return items, blob[start + n:]


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):   # output is lists of tuples of str and numbers
        raise pickle.UnpicklingError("task output holds no objects")


def prefix(node: str, worker: int, task_id: str) -> str:
    """The prefix of each forwarded line: ``[node/w1 task-id]``."""
    return f"[{node}/w{worker} {task_id}]"


def emit(items: List[tuple], node: str, worker: int, task_id: str, out=None, err=None) -> None:
    """Print a task's output at the client: stdout lines to ``out`` (default ``sys.stdout``), stderr lines
    to ``err``, log records through the client's ``logging`` (same logger name and level)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    pre = prefix(node, worker, task_id)
    for item in items:
        kind = item[0]
        if kind == "log":
            _, level, name, text = item[:4]
            logging.getLogger(name).log(level, "%s %s", pre, text)
            continue
        stream = out if kind == "out" else err
        text = item[1]
        lines = text.splitlines()
        if not lines:
            continue
        stream.write("".join(f"{pre} {ln}\n" for ln in lines))
    for s in (out, err):
        try:
            s.flush()
        except Exception:
            pass


class _Stream(io.TextIOBase):
    """sys.stdout / sys.stderr inside a worker: text goes to the running task's capture."""

    def __init__(self, capture: "TaskOutput", kind: str, real):
        self._capture, self._kind, self._real = capture, kind, real

    def write(self, s) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self._capture.write(self._kind, s)
        return len(s)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    @property
    def buffer(self) -> "_Bytes":
        """For code that writes bytes (``sys.stdout.buffer.write``): decoded as UTF-8, then captured."""
        return _Bytes(self)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:   # libraries that write to the fd directly reach the node's stderr
        return self._real.fileno()

    @property
    def encoding(self) -> str:   # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:   # type: ignore[override]
        return "replace"


class _Bytes(io.RawIOBase):
    def __init__(self, text: _Stream):
        self._text = text

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        self._text.write(data.decode("utf-8", "replace"))
        return len(data)


class _Handler(logging.Handler):
    def __init__(self, capture: "TaskOutput"):
        super().__init__(logging.NOTSET)
        self._capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:
            msg = str(record.msg)
        self._capture.log(record.levelno, record.name, msg)


class TaskOutput:
    """A worker's capture of its tasks' output (one per worker process; see the module docstring).

    ``tail(text)``, if given, is called with the last lines of the running task's output whenever it
    grows (the worker writes them into its shared slot)."""

    def __init__(self, node: str, worker: int, tail: Optional[Callable[[str], None]] = None):
        self.node, self.worker = node, worker
        self.tail_cb = tail
        self.task: Optional[str] = None
        self.items: List[list] = []
        self.size = 0
        self.dropped = 0
        self._tail = ""
        self._real_err = sys.__stderr__

    def install(self) -> None:
        """Route sys.stdout, sys.stderr and the root logger of this process into the capture."""
        real = self._real_err
        sys.stdout = _Stream(self, "out", real)
        sys.stderr = _Stream(self, "err", real)
        root = logging.getLogger()
        root.addHandler(_Handler(self))
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)   # INFO records reach the client, whose logging decides

    def begin(self, task_id: str) -> None:
        self.task, self.items, self.size, self.dropped, self._tail = task_id, [], 0, 0, ""

    def end(self, forward: bool) -> Optional[List[tuple]]:
        """The task finished: its output items if it printed anything and ``forward``; else the output goes
        to the node's log (and None is returned)."""
        items, task = self.items, self.task
        if self.dropped:
            items.append(["err", f"(pydist: {self.dropped} more bytes of output dropped: over {MAX_BYTES})\n"])
        self.task, self.items, self.size, self.dropped, self._tail = None, [], 0, 0, ""
        if not items:
            return None
        if forward:
            return [tuple(i) for i in items]
        self._to_log(items, task or "?")
        return None

    def write(self, kind: str, text: str) -> None:
        if not text:
            return
        if self.task is None:   # between tasks (an initializer, a module import): the node's log
            self._real_write(text)
            return
        room = MAX_BYTES - self.size
        if len(text) > room:
            self.dropped += len(text) - max(0, room)
            if room <= 0:
                return
            text = text[:room]
        self.size += len(text)
        if self.items and self.items[-1][0] == kind:
            self.items[-1][1] += text
        else:
            self.items.append([kind, text])
        self._grow_tail(text)

    def log(self, level: int, name: str, text: str) -> None:
        if self.task is None:
            self._real_write(f"{logging.getLevelName(level)} {name}: {text}\n")
            return
        if self.size + len(text) > MAX_BYTES:
            self.dropped += len(text)
            return
        self.size += len(text)
        self.items.append(["log", level, name, text])
        self._grow_tail(f"{logging.getLevelName(level)} {name}: {text}\n")

    def _grow_tail(self, text: str) -> None:
        if self.tail_cb is None:
            return
        t = (self._tail + text)[-2048:]
        self._tail = "\n".join(t.splitlines()[-TAIL_LINES:]) + ("\n" if t.endswith("\n") else "")
        try:
            self.tail_cb(self._tail)
        except Exception:
            pass

    def _to_log(self, items: List[list], task: str) -> None:
        pre = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {prefix(self.node, self.worker, task)}"
        lines = []
        for i in items:
            if i[0] == "log":
                lines.append(f"{pre} {logging.getLevelName(i[1])} {i[2]}: {i[3]}")
            else:
                tag = "" if i[0] == "err" else " (stdout)"
                lines += [f"{pre}{tag} {ln}" for ln in i[1].splitlines()]
        self._real_write("".join(ln + "\n" for ln in lines))

    def _real_write(self, text: str) -> None:
        try:
            err = self._real_err
            if err is None:
                return
            err.write(text)
            err.flush()
        except Exception:
            pass
