"""What the node's mixins (``Dispatch``, ``Cancelling``, ``CodeEndpoints``) use of ``Node`` and of each
other, declared once for the type checker.

::

    Node(Dispatch, Cancelling, CodeEndpoints)      node.py sets the attributes below in __init__;
           └──────────┴───────────┴─▶ NodeParts     each mixin defines its own methods

Nothing here runs: the class has annotations only, and the method signatures exist under
``TYPE_CHECKING`` (so a mixin can call a method another mixin defines).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, List

if TYPE_CHECKING:   # pragma: no cover
    import collections

    from .codestore import CodeStore
    from .config import NodeConfig
    from .groups import GroupTable
    from .ledger import Ledger, Task
    from .links import LinkManager
    from .sessions import Sessions
    from .workers import WorkerPool

__all__ = ["NodeParts"]


class NodeParts:
    """Attributes and methods a node's mixins share (see the module docstring)."""

    cfg: "NodeConfig"
    name: str
    lock: "threading.RLock"
    stopping: threading.Event
    counts: "collections.Counter[str]"
    ledger: "Ledger"
    links: "LinkManager"
    sessions: "Sessions"
    groups: "GroupTable"
    pool: "WorkerPool"
    store: "CodeStore"
    pinned: List[str]

    if TYPE_CHECKING:   # pragma: no cover
        def schedule(self) -> None: ...

        def fail_task(self, t: Task, exc: BaseException) -> None: ...

        def cancel_tasks(self, ts: List[Task]) -> int: ...

        def note_head(self, loc: tuple) -> None: ...

        def tell_started(self, t: Task) -> None: ...

        def withdrawals_lost(self, loc_kind: str, name: Any) -> None: ...

        def _deliver(self, origin: tuple, rs: List[tuple], keep: bool = True) -> None: ...

        def _needs_code(self, t: Task) -> bool: ...
