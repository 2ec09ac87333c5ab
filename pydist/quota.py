"""What the tasks a node holds cost, per client and in total, against the node's limits (pure: no threads,
no sockets; the node calls it under its lock).

::

    submit(client, batch) ──▶ Quota.admit(owner, sizes) ──▶ how many of the batch fit (the rest come back
                                 │                          at once as ResourceLimit errors naming the limit)
    a task enters the ledger ──▶ Quota.add(tid, owner, size)
    a task's record leaves   ──▶ Quota.remove(tid)           (done, failed, cancelled, its client gone)

Only tasks from clients are refused (``owner`` is the client id); tasks that arrive over links are counted
in the node's totals but never refused here: a link only sends what its credit allows.
"""
from __future__ import annotations

from typing import Dict, Hashable, Optional, Sequence, Tuple

from .errors import ResourceLimit


def _size(n: int) -> str:
    for unit, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m:
            return f"{n / m:.1f} {unit}"
    return f"{n} bytes"


class Quota:
    """Tasks and payload bytes held, per owner and in total (see the module docstring)."""

    def __init__(self, per_owner_tasks: int, per_owner_bytes: int, total_tasks: int, total_bytes: int,
                 node: str = "this node"):
        self.per_owner_tasks, self.per_owner_bytes = int(per_owner_tasks), int(per_owner_bytes)
        self.total_tasks, self.total_bytes = int(total_tasks), int(total_bytes)
        self.node = node
        self._held: Dict[str, Tuple[Optional[Hashable], int]] = {}     # task id -> (owner, bytes)
        self._owners: Dict[Hashable, list] = {}                        # owner -> [tasks, bytes]
        self.tasks = 0
        self.bytes = 0

    def admit(self, owner: Hashable, sizes: Sequence[int]) -> Tuple[int, Optional[ResourceLimit]]:
        """How many of a batch with these payload sizes fit, from the start; and the error for the rest."""
        mine = self._owners.get(owner, [0, 0])
        t, b, T, B = mine[0], mine[1], self.tasks, self.bytes
        for i, s in enumerate(sizes):
            why = None
            if t + 1 > self.per_owner_tasks:
                why = (f"this client already has {t} tasks queued or running on {self.node} (the limit, "
                       f"--max-client-tasks {self.per_owner_tasks})")
            elif b + s > self.per_owner_bytes:
                why = (f"this client's tasks on {self.node} would hold {_size(b + s)} of arguments (limit "
                       f"--max-client-bytes {_size(self.per_owner_bytes)})")
            elif T + 1 > self.total_tasks:
                why = f"{self.node} already holds {T} tasks (the limit, --max-queued-tasks {self.total_tasks})"
            elif B + s > self.total_bytes:
                why = (f"{self.node}'s tasks would hold {_size(B + s)} of arguments (limit --max-queued-bytes "
                       f"{_size(self.total_bytes)})")
            if why is not None:
                return i, ResourceLimit(f"task refused: {why}; wait for results before submitting more, or "
                                        "raise the limit")
            t, b, T, B = t + 1, b + s, T + 1, B + s
        return len(sizes), None

    def add(self, tid: str, owner: Optional[Hashable], size: int) -> None:
        if tid in self._held:
            return
        self._held[tid] = (owner, size)
        self.tasks += 1
        self.bytes += size
        if owner is not None:
            o = self._owners.setdefault(owner, [0, 0])
            o[0] += 1
            o[1] += size

    def remove(self, tid: str) -> None:
        entry = self._held.pop(tid, None)
        if entry is None:
            return
        owner, size = entry
        self.tasks -= 1
        self.bytes -= size
        if owner is not None:
            o = self._owners.get(owner)
            if o is not None:
                o[0] -= 1
                o[1] -= size
                if o[0] <= 0:
                    del self._owners[owner]

    def held(self, owner: Hashable) -> Tuple[int, int]:
        """(tasks, bytes) an owner holds."""
        o = self._owners.get(owner)
        return (o[0], o[1]) if o else (0, 0)
