"""Task-group mailboxes of a node (the group's home): messages between ranks wait here until taken.

A small object behind the node's ``comm_*`` methods so that task groups (pydist.groups) can replace it.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Tuple


class Mailboxes:
    """Per-group lists of ``(dst, src, tag, blob)``, bounded in bytes over all groups."""

    def __init__(self, max_bytes: int, stopping: threading.Event):
        self.max_bytes = max_bytes
        self.stopping = stopping
        self.mail: Dict[str, List[tuple]] = {}
        self.cond = threading.Condition(threading.Lock())
        self.bytes = 0

    def send(self, group: str, src: int, dst: int, tag: int, blob: bytes, node_name: str) -> None:
        with self.cond:
            if self.bytes + len(blob) > self.max_bytes:
                raise MemoryError(f"node {node_name} holds {self.bytes} bytes of undelivered group "
                                  "messages; receive some before sending more")
            self.mail.setdefault(group, []).append((dst, src, tag, blob))
            self.bytes += len(blob)
            self.cond.notify_all()

    def recv(self, group: str, dst: int, src: int, tag: int, wait: float) -> Optional[Tuple[int, int, bytes]]:
        deadline = time.monotonic() + wait
        with self.cond:
            while True:
                box = self.mail.get(group, ())
                for i, (d, s_, t, b) in enumerate(box):
                    if d == dst and (src == -1 or s_ == src) and (t == tag or (tag == -1 and t > -1000)):
                        del box[i]
                        self.bytes -= len(b)
                        return (s_, t, b)
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping.is_set():
                    return None
                self.cond.wait(left)

    def close(self, group: str) -> None:
        with self.cond:
            for _, _, _, b in self.mail.pop(group, ()):
                self.bytes -= len(b)

    def drop_client(self, cid: str) -> None:
        """Drop every mailbox of the groups of a client that went away."""
        with self.cond:
            for g in [g for g in self.mail if g.startswith(cid + ".")]:
                for _, _, _, b in self.mail.pop(g):
                    self.bytes -= len(b)
