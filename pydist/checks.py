"""Validation of everything that crosses a node's boundary (pure): what the ledger and the scheduler
consume must be well formed before it touches any state.  Each check raises TypeError/ValueError
naming the field and what was expected."""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Tuple

from .sessions import COLLECT_MAX_WAIT

MAX_RETRIES = 100
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SHM_REF = re.compile(r"/proc/\d{1,10}/fd/\d{1,10}#\d{1,20}")   # pydist.wire.to_shared
_TASK_TYPES: Tuple[Any, ...] = (str, str, (bytes, list), (str, type(None)), int, (list, tuple), int, str)


def check_str(v: Any, what: str) -> None:
    if not isinstance(v, str) or not v or len(v) > 4096:
        raise TypeError(f"{what} must be a non-empty str, got {type(v).__name__}")


def check_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} must be an int, got {type(v).__name__}")
    return v


def check_timeout(t: Any) -> float:
    """A wait in seconds: a finite number, clamped to [0, COLLECT_MAX_WAIT]."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise TypeError(f"timeout must be a finite number of seconds, got {t!r:.40}")
    return min(max(float(t), 0.0), COLLECT_MAX_WAIT)


def check_fns(fns: Any) -> None:
    if not isinstance(fns, dict) or not all(isinstance(k, str) and isinstance(v, bytes) for k, v in fns.items()):
        raise TypeError("fns must map str keys to bytes")


def check_tasks(tasks: Any, allow_retries: bool = False) -> None:
    """Task records (see pydist.wire); a client's may carry a 9th field: retries after a worker death."""
    if not isinstance(tasks, (list, tuple)):
        raise TypeError("tasks must be a list of task records")
    for t in tasks:
        if not isinstance(t, (list, tuple)) or not (len(t) == 8 or allow_retries and len(t) == 9):
            raise TypeError("a task record must be a tuple of 8 fields (see pydist.wire)")
        for v, typ in zip(t, _TASK_TYPES):
            if not isinstance(v, typ) or isinstance(v, bool) and typ is int:
                raise TypeError(f"malformed task record field {v!r:.40}: expected {typ}")
        if not t[0] or len(t[0]) > 512:
            raise TypeError("a task id must be a non-empty str of at most 512 characters")
        if not all(isinstance(p, str) for p in t[5]):
            raise TypeError("a task's path must be a list of node names")
        if isinstance(t[2], list) and (not t[2] or not isinstance(t[2][0], bytes) or not all(
                isinstance(b, bytes) or isinstance(b, str) and _SHM_REF.fullmatch(b) for b in t[2])):
            raise TypeError("a task's payload must be bytes or a non-empty list of bytes (and "
                            "shared-memory references, pydist.wire.to_shared)")
        if t[3] is not None and not _DIGEST.fullmatch(t[3]):
            raise TypeError("a task's bundle must be None or a sha256 hex digest")
        if len(t) == 9:
            r = t[8]
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_RETRIES:
                raise ValueError(f"task {t[0]}: retries must be an int from 0 to {MAX_RETRIES}, got {r!r:.40}")
    ids = [t[0] for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError("a batch names the same task id twice: task ids must be unique")


def check_results(results: Any) -> None:
    """Result records; a runtime must be a finite number >= 0 (the scheduler averages them)."""
    if not isinstance(results, (list, tuple)):
        raise TypeError("results must be a list")
    for r in results:
        if not isinstance(r, (list, tuple)) or len(r) != 6 or not isinstance(r[0], str) \
                or not isinstance(r[1], int) or not isinstance(r[2], bytes):
            raise TypeError("a result record must be (id, status, blob, node, worker, runtime)")
        rt = r[5]
        if isinstance(rt, bool) or not isinstance(rt, (int, float)) or not math.isfinite(rt) or rt < 0:
            raise ValueError(f"result {r[0]!r:.60}: runtime must be a finite number of seconds >= 0, got {rt!r:.40}")


def check_ids(ids: Any, what: str = "task_ids") -> None:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, str) for t in ids):
        raise TypeError(f"{what} must be a list of str")


def check_map(m: Any) -> Dict[str, list]:
    if not isinstance(m, dict):
        raise TypeError("a capacity map must be a dict")
    out = {}
    for k, v in m.items():
        if not isinstance(k, str) or not isinstance(v, (list, tuple)) or len(v) != 2 \
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in v) or v[0] < 0 or v[1] < 0:
            raise TypeError("a capacity map maps node names to [workers, distance]")
        out[k] = [int(v[0]), int(v[1])]
    return out


def check_recon(recon: Any) -> None:
    """The reconciliation part of a heartbeat: ``{"e": epoch, "n": count, "d": digest}`` or None."""
    if recon is None:
        return
    if not isinstance(recon, dict) or set(recon) != {"e", "n", "d"} or not all(
            isinstance(recon[k], int) and not isinstance(recon[k], bool) for k in "end") or recon["n"] < 0:
        raise TypeError('reconciliation info must be {"e": epoch, "n": count, "d": digest} of ints')
