"""Task, result and message records, and how they are turned into bytes.

Nothing here knows about sockets, threads or Pyro5.  Records are plain tuples so that Pyro5's *marshal*
serializer carries them natively (bytes stay bytes: no base64, see ``shared/notes/pyro5.md`` §3):

``Task``   ``(task_id, fn_key, payload, bundle, hops, path, kind, client)``
    ``task_id``   str, unique in the cluster: ``"<client id>.<seq>"``
    ``fn_key``    str, names a function blob carried in the same batch (``fns`` dict: key -> cloudpickle)
    ``payload``   bytes, the pickled ``(args, kwargs)`` (``KIND_CHUNK``: a pickled list of argument tuples);
                  with large buffers (bytes over ``OOB_MIN``, numpy arrays) a list ``[pickle, buf, ...]``:
                  pickle protocol 5 with the buffers out of band, so they are never copied into a pickle
    ``bundle``    str or None, the sha256 of the code bundle the task runs with
    ``hops``      int, node-to-node forwards so far; ``path`` list of node names it visited (cycle guard)
    ``kind``      ``KIND_CALL`` or ``KIND_CHUNK`` (a ``map`` chunk: one task, many calls, a list result)
    ``client``    str, the client id (for the per-client worker initializer)

``Result`` ``(task_id, status, blob, node, worker, runtime)``
    ``status``    one of ``OK``, ``ERROR`` (blob = pickled exception + traceback text), ``LOST`` (worker died),
                  ``INIT_FAILED`` (the client's initializer raised), ``CANCELLED``
    ``node``/``worker`` where it ran; ``runtime`` seconds spent in the function

Between a node and its own worker processes, frames are ``header + pickle + raw buffers`` over a pipe
(both ends are our own code: the payload bytes inside stay opaque to the node); large buffers travel
out of band (written with ``writev``, read into place), never copied into the pickle stream.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import traceback
from typing import Any, Callable, Optional

import cloudpickle

from .errors import RemoteError, SerializationError

# -- record layout --------------------------------------------------------------------------------------
T_ID, T_FN, T_PAYLOAD, T_BUNDLE, T_HOPS, T_PATH, T_KIND, T_CLIENT = range(8)
R_ID, R_STATUS, R_BLOB, R_NODE, R_WORKER, R_RUNTIME = range(6)

KIND_CALL = 0
KIND_CHUNK = 1
KIND_RANK = 2    # a rank of a task group (runs like KIND_CALL; nodes never re-place it on its own)

OK, ERROR, LOST, INIT_FAILED, CANCELLED = range(5)
STATUS_NAMES = {OK: "ok", ERROR: "error", LOST: "lost", INIT_FAILED: "init-failed", CANCELLED: "cancelled"}

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})


def make_task(task_id: str, fn_key: str, payload: bytes, bundle: Optional[str] = None, hops: int = 0,
              path: Optional[list] = None, kind: int = KIND_CALL, client: str = "") -> tuple:
    """Build a task record (see the module docstring)."""
    return (task_id, fn_key, payload, bundle, hops, path or [], kind, client)


# -- pickling ---------------------------------------------------------------------------------------------
def cp_dumps(obj: Any, protocol: int = PICKLE_PROTOCOL, buffer_callback=None) -> bytes:
    """``cloudpickle.dumps`` whose code objects keep their file name (``pydist.sources``): a lambda in
    the arguments or a task's exception still names its file in tracebacks."""
    from .sources import _Pickler

    f = io.BytesIO()
    _Pickler(f, protocol=protocol, buffer_callback=buffer_callback).dump(obj)
    return f.getvalue()


#: argument types that pickle with the C pickler and never go out of band (bytes may: see OOB_MIN)
_SCALARS = frozenset({int, float, str, bool, type(None), complex})


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
        if type(obj) in (list, tuple) and len(obj) > 16:
            # a map chunk or its results: walking 1,000 items in Python (_is_plain) took 660 us, more
            # than cloudpickle's C pickler needs for all of it (57 us), and cloudpickle is always right
            return cloudpickle.dumps(obj, PICKLE_PROTOCOL)
        if _is_plain(obj):
            return pickle.dumps(obj, PICKLE_PROTOCOL)
        return cp_dumps(obj, PICKLE_PROTOCOL)
    except Exception as exc:  # pickling raises many types: PicklingError, TypeError, AttributeError...
        raise SerializationError(f"cannot pickle {what} ({_short_repr(obj)}): {type(exc).__name__}: {exc}"
                                 f"{mp_hint(exc)}") from exc


def mp_hint(exc: BaseException) -> str:
    """What to do instead, when pickling failed on a ``multiprocessing`` lock, queue or pipe (they work
    only between a process and the children it starts itself, never on another machine)."""
    text = str(exc)
    if "through inheritance" in text or "multiprocessing" in text or "SemLock" in text \
            or "_thread.lock" in text or "_thread.RLock" in text:
        return ("; a lock, queue, pipe or event of multiprocessing (or threading) cannot travel to a pydist "
                "worker, which may be on another machine: pass data as arguments and results instead, use "
                "a multiprocessing.Manager() proxy (start the manager with address=(host, port) the workers can "
                "reach, and set multiprocessing.current_process().authkey to its authkey in the executor's "
                "initializer), or exchange messages between tasks with ClusterExecutor.spawn_group "
                "(pydist.Comm)")
    return ""


OOB_MIN = 1 << 18   # bytes: buffers at least this big travel out of band (pickle protocol 5)


class _OutOfBand:
    """Stands in for a large ``bytes`` while pickling: it travels out of band and unpickles as bytes.
    (Picklers never offer exact ``bytes`` to ``reducer_override``, hence the wrapper.)"""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __reduce_ex__(self, protocol):
        return bytes, (pickle.PickleBuffer(self.data),)


def _wrap_big(v: Any, depth: int = 0) -> Any:
    if type(v) is bytes and len(v) >= OOB_MIN:
        return _OutOfBand(v)
    if depth < 1 and type(v) in (list, tuple) and len(v) <= 1024:
        return type(v)(_wrap_big(x, depth + 1) for x in v)
    return v


def _has_big(args: tuple, kwargs: Optional[dict]) -> bool:
    for v in list(args) + (list(kwargs.values()) if kwargs else []):
        if isinstance(v, (bytes, bytearray, memoryview)) and len(v) >= OOB_MIN:
            return True
        if hasattr(v, "__array_interface__"):
            return True
        if type(v) in (list, tuple) and len(v) <= 1024 and any(
                type(x) is bytes and len(x) >= OOB_MIN or hasattr(x, "__array_interface__") for x in v):
            return True
    return False


def dumps_call(args: tuple, kwargs: dict):
    """Pickle the arguments of one call: bytes, or ``[pickle, buffer, ...]`` when large buffers (big
    bytes, numpy arrays) go out of band (pickle protocol 5: no copy until the wire)."""
    if not kwargs and _SCALARS.issuperset(map(type, args)):   # the common call: one C-level pass
        return pickle.dumps((args, None), PICKLE_PROTOCOL)
    if not _has_big(args, kwargs):
        if not kwargs and _is_plain(args):
            try:
                return pickle.dumps((args, None), PICKLE_PROTOCOL)
            except Exception:
                pass
        return dumps((args, kwargs or None), "task arguments")
    bufs: list = []
    obj = (tuple(_wrap_big(a) for a in args), {k: _wrap_big(v) for k, v in kwargs.items()} if kwargs else None)
    try:
        data = cp_dumps(obj, 5, buffer_callback=bufs.append)
    except Exception as exc:
        raise SerializationError(f"cannot pickle task arguments ({_short_repr(args)}): "
                                 f"{type(exc).__name__}: {exc}{mp_hint(exc)}") from exc
    if not bufs:
        return data
    return [data] + [b.raw() for b in bufs]


def loads_payload(payload, loads: Optional[Callable] = None) -> Any:
    """Unpickle a task payload: one buffer (bytes, or the bytearray / read-only memoryview a frame's
    out-of-band part arrives as), or the list form ``[pickle, buffer, ...]`` whose buffers may be
    shared-memory references (``to_shared``: read here, in place of the bytes).  ``loads(data, buffers)``
    replaces ``pickle.loads`` (the worker's per-client namespaces)."""
    if isinstance(payload, (list, tuple)):
        bufs = [read_shared(p) if isinstance(p, str) else p for p in payload[1:]]
        if loads is None:
            return pickle.loads(payload[0], buffers=bufs)
        return loads(payload[0], bufs)
    if loads is None:
        return pickle.loads(payload)
    return loads(payload)


def payload_size(payload) -> int:
    """Bytes in a payload of either form (a shared-memory reference counts its own length: the node
    never holds the bytes it names)."""
    if type(payload) is bytes:   # the common case, without a memoryview (twice per task on the node)
        return len(payload)
    if isinstance(payload, (list, tuple)):
        return sum(len(p) if isinstance(p, str) else memoryview(p).nbytes for p in payload)
    return memoryview(payload).nbytes


# -- large arguments through shared memory (client and node on one machine) -----------------------------
# A client whose entry node runs on its machine, as its user, in its pid namespace (``same_host``) puts
# each out-of-band buffer of at least SHM_MIN bytes into a memfd of its own and sends its name instead,
# ``/proc/<client pid>/fd/<fd>#<inode>``; the worker reads it straight into the bytes the task gets (one
# copy there, one here), instead of the bytes crossing the client's socket, the node and the worker's
# pipe (eight copies of 16 MiB, #15).  The memfd lives until the client has the task's result (or gives
# the task up); it vanishes with the client.  The inode guards against a reused descriptor number.
SHM_MIN = 1 << 20
_SHM_REF = None


def host_identity() -> Optional[dict]:
    """What ``same_host`` compares: boot id, pid namespace and user (None where there is no /proc or
    memfd: then shared memory is never used)."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return {"boot": boot, "pidns": os.readlink("/proc/self/ns/pid"), "uid": os.getuid()}
    except OSError:
        return None


def same_host(other: Any) -> bool:
    """True when a node that described itself with ``other`` (its ``host_identity``) can read our memfds."""
    mine = host_identity()
    return mine is not None and isinstance(other, dict) and other == mine


def to_shared(payload) -> tuple:
    """``(payload, fds)``: the payload with its large out-of-band buffers moved into memfds (see above),
    and the descriptors to close once the task is finished."""
    if not isinstance(payload, list):
        return payload, []
    out, fds = [payload[0]], []
    try:
        for p in payload[1:]:
            view = memoryview(p).cast("B")
            if view.nbytes < SHM_MIN:
                out.append(p)
                continue
            fd = os.memfd_create("pydist-arg", getattr(os, "MFD_CLOEXEC", 1))
            fds.append(fd)
            done = 0
            while done < view.nbytes:
                done += os.write(fd, view[done:])
            out.append(f"/proc/{os.getpid()}/fd/{fd}#{os.fstat(fd).st_ino}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return out, fds


def read_shared(ref: str) -> bytes:
    """The bytes a ``to_shared`` reference names (read in one go)."""
    import re

    global _SHM_REF
    if _SHM_REF is None:
        _SHM_REF = re.compile(r"/proc/(\d+)/fd/(\d+)#(\d+)")
    m = _SHM_REF.fullmatch(ref)
    if m is None:
        raise ValueError(f"not a shared-memory reference: {ref[:80]!r}")
    try:
        fd = os.open(ref.split("#", 1)[0], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise OSError(f"cannot open the task argument the client put in shared memory ({ref}): {exc} "
                      "(the client is gone, or may not be read by this process: set "
                      "PYDIST_SHARED_MEMORY=0 in the client)") from None
    try:
        st = os.fstat(fd)
        if st.st_ino != int(m.group(3)):
            raise OSError(f"the shared-memory argument {ref} is gone (its descriptor was reused)")
        chunks = []
        left = st.st_size
        while left > 0:
            b = os.read(fd, left)
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def from_shared(payload):
    """A payload whose shared-memory references are read back into bytes (a task forwarded to another
    node, which may be on another machine)."""
    if isinstance(payload, list) and any(isinstance(p, str) for p in payload):
        return [read_shared(p) if isinstance(p, str) else p for p in payload]
    return payload


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

    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException as err:
        tb = f"(the traceback could not be formatted: {type(err).__name__})\n"
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except BaseException:
        message = "<unprintable>"
    try:
        blob = cp_dumps(exc, PICKLE_PROTOCOL)
        pickle.loads(blob)
    except BaseException as err:   # a __reduce__ may raise anything, SystemExit included
        blob = pickle.dumps(TaskError(f"{name}: {message} (the original exception cannot be pickled: {err})"),
                            PICKLE_PROTOCOL)
    return pickle.dumps((blob, tb, name, message), PICKLE_PROTOCOL)


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):   # an error report is a tuple of bytes and str: no class needed
        raise pickle.UnpicklingError(f"error reports hold no objects ({module}.{name})")


def error_report(data: bytes) -> tuple:
    """``(exception blob, traceback text, type name, message)`` of an ERROR result, read without
    unpickling the exception (a node shows failures it cannot, and should not, rebuild)."""
    import io

    blob, tb, name, message = _PlainUnpickler(io.BytesIO(data)).load()
    return blob, str(tb), str(name), str(message)


def loads_exception(data: bytes) -> BaseException:
    """Rebuild a task's exception with the remote traceback attached as ``__cause__``."""
    from .errors import TaskError

    try:
        blob, tb, name, message = pickle.loads(data)
    except BaseException as err:
        return SerializationError(f"the task failed and its error report could not be read: {err}")
    try:
        exc = pickle.loads(blob)
        if not isinstance(exc, BaseException):
            raise TypeError(f"not an exception: {type(exc).__name__}")
    except BaseException as err:   # e.g. the exception's class does not exist here
        exc = TaskError(f"{name}: {message} (the exception could not be rebuilt here: {err})")
    exc.__cause__ = RemoteError(with_source_lines(tb))
    resolve = getattr(exc, "_resolve_cause", None)   # GroupAborted: the failing rank's error as cause
    if resolve is not None:
        resolve(tb, loads_exception)
    return exc


_FRAME_LINE = None


def with_source_lines(tb: str) -> str:
    """A formatted remote traceback with the source lines the remote side lacked (a ``__main__``
    function's file exists on the client only) filled in from this machine's files, where it has them."""
    import linecache
    import re

    global _FRAME_LINE
    if _FRAME_LINE is None:
        _FRAME_LINE = re.compile(r'^(\s*)File "([^"]+)", line (\d+), in ')
    lines = tb.splitlines(keepends=True)
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        m = _FRAME_LINE.match(line)
        if not m:
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        indent = m.group(1)
        if nxt.startswith(indent + "    ") and not _FRAME_LINE.match(nxt):
            continue   # the remote side had the source line
        try:
            src = linecache.getline(m.group(2), int(m.group(3))).strip()
        except Exception:
            src = ""
        if src:
            out.append(f"{indent}    {src}\n")
    return "".join(out)


# -- frames over a pipe (node <-> its own workers) -----------------------------------------------------
# header: pickle length (4 bytes), number of out-of-band buffers (2), then each buffer's length (8)
_HEAD = struct.Struct("!IH")
_BUFLEN = struct.Struct("!Q")


class _RawOutOfBand(_OutOfBand):
    """Like ``_OutOfBand`` but arrives as whatever buffer the reader filled (a bytearray): no copy."""

    __slots__ = ()

    def __reduce_ex__(self, protocol):
        return _same, (pickle.PickleBuffer(self.data),)


def _same(x):
    return x


def frame_payload(payload):
    """A task payload prepared for a frame to a worker: its large parts go out of band."""
    if isinstance(payload, list):
        return [_RawOutOfBand(p) if len(p) >= OOB_MIN else p for p in payload]
    return _RawOutOfBand(payload) if len(payload) >= OOB_MIN else payload


def frame(obj: Any, big: bool = False) -> list:
    """One frame as a list of buffers for ``writev`` (no concatenation).  ``big``: the object holds
    ``frame_payload`` wrappers, whose buffers are sent out of band instead of copied into the pickle."""
    bufs: list = []
    if big:
        data = pickle.dumps(obj, 5, buffer_callback=bufs.append)
    else:
        data = pickle.dumps(obj, PICKLE_PROTOCOL)
    raws = [b.raw() for b in bufs]
    head = _HEAD.pack(len(data), len(raws)) + b"".join(_BUFLEN.pack(len(r)) for r in raws)
    return [head, data] + raws


def skip(parts: list, n: int) -> list:
    """``parts`` (a list of buffers) without its first ``n`` bytes, as memoryviews (no copy)."""
    out = []
    for p in parts:
        if n >= len(p):
            n -= len(p)
            continue
        out.append(memoryview(p)[n:])
        n = 0
    return out


def write_frame(fd: int, obj: Any) -> None:
    """Write one frame to a file descriptor (blocking, complete)."""
    parts = frame(obj)
    while parts:
        parts = skip(parts, os.writev(fd, parts))


def read_frame(fd: int) -> Any:
    """Read one frame; raises EOFError when the other end closed."""
    n, nbufs = _HEAD.unpack(_read_exact(fd, _HEAD.size))
    lens = [_BUFLEN.unpack(_read_exact(fd, _BUFLEN.size))[0] for _ in range(nbufs)]
    data = _read_exact(fd, n)
    if not nbufs:
        return pickle.loads(data)
    return pickle.loads(data, buffers=[_read_exact(fd, k) for k in lens])


def _read_exact(fd: int, n: int):
    """Exactly ``n`` bytes (bytes, or a bytearray filled in place for large frames: no extra copy)."""
    if n == 0:
        return b""
    first = os.read(fd, n)
    if not first:
        raise EOFError("pipe closed")
    if len(first) == n:
        return first
    buf = bytearray(n)
    view = memoryview(buf)
    view[:len(first)] = first
    got = len(first)
    while got < n:
        k = os.readv(fd, [view[got:]])
        if not k:
            raise EOFError("pipe closed mid-frame")
        got += k
    return buf
