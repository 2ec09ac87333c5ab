"""Shipped functions keep their file names and bring their source lines, for tracebacks and warnings.

cloudpickle pickles a function defined in ``__main__`` (or a notebook cell) by value and renames its code's
file to ``<dynamic-code>``, so a remote traceback said ``File "<dynamic-code>", line 8`` with no source
line, and ``warnings.warn`` in a task said ``<dynamic-code>:8``.  ``dumps_function`` pickles with the real
file name kept and adds the source text of the files whose code travels by value; ``_load`` puts those
lines into the worker's ``linecache`` before handing back the function, so ``traceback`` and ``warnings``
show the client's file name and source lines.  Files over ``MAX_SOURCE`` bytes are not sent.
"""
from __future__ import annotations

import linecache
import threading
import types
from collections import ChainMap
from typing import Any, Callable, Dict

import cloudpickle

MAX_SOURCE = 1 << 20      # bytes of one source file shipped with a function
MAX_TOTAL = 4 << 20       # bytes of source per function

_seen = threading.local()
_cp_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)


def _code_reduce(code: types.CodeType):
    rv = _cp_code_reduce(code)   # type: ignore[misc]
    try:
        ctor, args = rv[0], list(rv[1])
        i = args.index("<dynamic-code>")
    except (ValueError, TypeError, IndexError):
        return rv
    args[i] = code.co_filename
    files = getattr(_seen, "files", None)
    if files is not None:
        files.add(code.co_filename)
    return (ctor, tuple(args)) + tuple(rv[2:])


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)


def dumps_function(fn: Callable, protocol: int) -> bytes:
    """Pickle ``fn`` with cloudpickle, keeping the file names of code pickled by value and adding the
    source lines of those files (see the module docstring)."""
    import io

    if _cp_code_reduce is None:   # a cloudpickle without the reducer we wrap: plain pickling
        return cloudpickle.dumps(fn, protocol)
    _seen.files = set()
    try:
        buf = io.BytesIO()
        _Pickler(buf, protocol=protocol).dump(fn)
        files = _seen.files
    finally:
        _seen.files = None
    blob = buf.getvalue()
    sources: Dict[str, list] = {}
    total = 0
    for name in sorted(files):
        lines = linecache.getlines(name)
        size = sum(len(ln) for ln in lines)
        if not lines or size > MAX_SOURCE or total + size > MAX_TOTAL:
            continue
        sources[name] = lines
        total += size
    if not sources:
        return blob
    return cloudpickle.dumps(_WithSources(sources, blob), protocol)


class _WithSources:
    def __init__(self, sources: Dict[str, list], blob: bytes):
        self.sources, self.blob = sources, blob

    def __reduce__(self):
        return (_load, (self.sources, self.blob))


def register(sources: Dict[str, list]) -> None:
    """Worker side: put shipped source lines into ``linecache`` (never over a file on disk)."""
    for name, lines in sources.items():
        cached: Any = linecache.cache.get(name)
        if cached is None or len(cached) < 2 or cached[1] is None:   # never shadow a file the worker has on disk
            linecache.cache[name] = (sum(len(ln) for ln in lines), None, list(lines), name)


def _load(sources: Dict[str, list], blob: bytes):
    """Worker side: register the shipped source lines, then unpickle the function.  (A worker's
    ``pydist.globalspace.ClientUnpickler`` takes this over, to unpickle ``blob`` its own way.)"""
    import pickle

    register(sources)
    return pickle.loads(blob)
