"""Task, result and message records, and how they are turned into bytes.

Nothing here knows about sockets, threads or Pyro5.  Records are plain tuples so that Pyro5's *marshal*
serializer carries them natively (bytes stay bytes: no base64, see ``shared/notes/pyro5.md`` §3):

``Task``   ``(task_id, fn_key, payload, bundle, hops, path, kind, client)``
    ``task_id``   str, unique in the cluster: ``"<client id>.<seq>"``
    ``fn_key``    str, names a function blob carried in the same batch (``fns`` dict: key -> cloudpickle)
    ``payload``   bytes, the pickled ``(args, kwargs)`` (``KIND_CHUNK``: a pickled list of argument tuples)
    ``bundle``    str or None, the sha256 of the code bundle the task runs with
    ``hops``      int, node-to-node forwards so far; ``path`` list of node names it visited (cycle guard)
    ``kind``      ``KIND_CALL`` or ``KIND_CHUNK`` (a ``map`` chunk: one task, many calls, a list result)
    ``client``    str, the client id (for the per-client worker initializer)

``Result`` ``(task_id, status, blob, node, worker, runtime)``
    ``status``    one of ``OK``, ``ERROR`` (blob = pickled exception + traceback text), ``LOST`` (worker died),
                  ``INIT_FAILED`` (the client's initializer raised), ``CANCELLED``
    ``node``/``worker`` where it ran; ``runtime`` seconds spent in the function

Between a node and its own worker processes, frames are ``4-byte length + pickle`` over a pipe
(both ends are our own code: the payload bytes inside stay opaque to the node).
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import traceback
from typing import Any, Optional

import cloudpickle

from .errors import RemoteError, SerializationError

# -- record layout --------------------------------------------------------------------------------------
T_ID, T_FN, T_PAYLOAD, T_BUNDLE, T_HOPS, T_PATH, T_KIND, T_CLIENT = range(8)
R_ID, R_STATUS, R_BLOB, R_NODE, R_WORKER, R_RUNTIME = range(6)

KIND_CALL = 0
KIND_CHUNK = 1

OK, ERROR, LOST, INIT_FAILED, CANCELLED = range(5)
STATUS_NAMES = {OK: "ok", ERROR: "error", LOST: "lost", INIT_FAILED: "init-failed", CANCELLED: "cancelled"}

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})


def make_task(task_id: str, fn_key: str, payload: bytes, bundle: Optional[str] = None, hops: int = 0,
              path: Optional[list] = None, kind: int = KIND_CALL, client: str = "") -> tuple:
    """Build a task record (see the module docstring)."""
    return (task_id, fn_key, payload, bundle, hops, path or [], kind, client)


# -- pickling ---------------------------------------------------------------------------------------------
def _is_plain(obj: Any, depth: int = 0) -> bool:
    t = type(obj)
    if t in _PLAIN:
        return True
    if depth < 2 and t in (tuple, list):
        return all(_is_plain(x, depth + 1) for x in obj)
    if depth < 2 and t is dict:
        return all(type(k) in _PLAIN and _is_plain(v, depth + 1) for k, v in obj.items())
    return False


def dumps(obj: Any, what: str = "object") -> bytes:
    """Pickle ``obj``: plain data with the C pickler, anything else (lambdas, ``__main__``) with cloudpickle.

    Raises SerializationError naming ``what`` and the object's type when it cannot be pickled.
    """
    try:
        if _is_plain(obj):
            return pickle.dumps(obj, PICKLE_PROTOCOL)
        return cloudpickle.dumps(obj, PICKLE_PROTOCOL)
    except Exception as exc:  # pickling raises many types: PicklingError, TypeError, AttributeError...
        raise SerializationError(f"cannot pickle {what} ({_short_repr(obj)}): {type(exc).__name__}: {exc}") from exc


def dumps_call(args: tuple, kwargs: dict) -> bytes:
    """Pickle the arguments of one call."""
    if not kwargs and _is_plain(args):
        try:
            return pickle.dumps((args, None), PICKLE_PROTOCOL)
        except Exception:
            pass
    return dumps((args, kwargs or None), "task arguments")


def loads(data: bytes) -> Any:
    """Unpickle (cloudpickle output is ordinary pickle data)."""
    return pickle.loads(data)


def _short_repr(obj: Any) -> str:
    try:
        r = repr(obj)
    except Exception:
        r = object.__repr__(obj)
    return r if len(r) <= 120 else r[:117] + "..."


def dumps_exception(exc: BaseException) -> bytes:
    """Pickle an exception with its formatted traceback; never fails.

    The exception is checked to rebuild from its pickle (an ``__init__`` with extra required arguments
    does not); if it cannot, a ``TaskError`` with the same text stands in.  The type name and message
    travel beside it, so the client can still say what happened if it lacks the class.
    """
    from .errors import TaskError

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable>"
    try:
        blob = cloudpickle.dumps(exc, PICKLE_PROTOCOL)
        pickle.loads(blob)
    except Exception as err:
        blob = pickle.dumps(TaskError(f"{name}: {message} (the original exception cannot be pickled: {err})"),
                            PICKLE_PROTOCOL)
    return pickle.dumps((blob, tb, name, message), PICKLE_PROTOCOL)


def loads_exception(data: bytes) -> BaseException:
    """Rebuild a task's exception with the remote traceback attached as ``__cause__``."""
    from .errors import TaskError

    try:
        blob, tb, name, message = pickle.loads(data)
    except Exception as err:
        return SerializationError(f"the task failed and its error report could not be read: {err}")
    try:
        exc = pickle.loads(blob)
        if not isinstance(exc, BaseException):
            raise TypeError(f"not an exception: {type(exc).__name__}")
    except Exception as err:   # e.g. the exception's class does not exist here
        exc = TaskError(f"{name}: {message} (the exception could not be rebuilt here: {err})")
    exc.__cause__ = RemoteError(tb)
    return exc


# -- frames over a pipe (node <-> its own workers) -----------------------------------------------------
_LEN = struct.Struct("!I")
MAX_FRAME = 2 ** 32 - 1


def frame(obj: Any) -> bytes:
    """One length-prefixed pickle frame."""
    data = pickle.dumps(obj, PICKLE_PROTOCOL)
    return _LEN.pack(len(data)) + data


def write_frame(fd: int, obj: Any) -> None:
    """Write one length-prefixed pickle frame to a file descriptor (blocking, complete)."""
    buf = memoryview(frame(obj))
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


def read_frame(fd: int) -> Any:
    """Read one frame; raises EOFError when the other end closed."""
    header = _read_exact(fd, _LEN.size)
    (n,) = _LEN.unpack(header)
    return pickle.loads(_read_exact(fd, n))


def _read_exact(fd: int, n: int) -> bytes:
    if n == 0:
        return b""
    first = os.read(fd, n)
    if not first:
        raise EOFError("pipe closed")
    if len(first) == n:
        return first
    buf = io.BytesIO()
    buf.write(first)
    got = len(first)
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("pipe closed mid-frame")
        buf.write(chunk)
        got += len(chunk)
    return buf.getvalue()
