"""The code-store endpoints of a node: receiving bundles in chunks, serving them to children, fetching a
bundle a task needs from the node that sent the task.  Mixed into ``Node`` (its exposed ``code_*``
methods); the bundles themselves live in ``codesync.CodeStore``."""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Dict, List

import Pyro5.api

from . import security
from .checks import check_str
from .errors import BundleNotFound, BundleTooLarge
from .nodeparts import NodeParts

log = logging.getLogger("pydist.node")

if TYPE_CHECKING:   # pragma: no cover
    from .ledger import Task


@Pyro5.api.expose
class CodeEndpoints(NodeParts):
    """``code_*`` methods of the node, and the waiting room of tasks whose bundle is not here yet."""

    waiting_code: Dict[str, List[str]]
    fetching: set

    def code_has(self, digests: list) -> list:
        """Which of these bundle digests this node holds."""
        if not isinstance(digests, (list, tuple)) or not all(isinstance(d, str) for d in digests):
            raise TypeError("digests must be a list of str")
        return [d for d in digests if self.store.has(d)]

    def code_begin(self, digest: str, size: int) -> None:
        """Start receiving a bundle in chunks."""
        check_str(digest, "digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TypeError("size must be a non-negative int")
        if size > self.cfg.code_cache_max:
            raise BundleTooLarge(f"bundle {digest[:12]} is {size} bytes, over node {self.name}'s cache "
                                 f"limit of {self.cfg.code_cache_max} bytes (--code-cache-max)")
        self.store.begin(digest, size, owner=security.connection_id())

    def code_chunk(self, digest: str, offset: int, data: bytes) -> None:
        """One chunk of a bundle being received."""
        check_str(digest, "digest")
        if not isinstance(offset, int) or not isinstance(data, bytes):
            raise TypeError("offset must be int and data bytes")
        self.store.write_chunk(digest, offset, data)

    def code_finish(self, digest: str, push: bool = True) -> int:
        """Verify and install a received bundle; with ``push`` send it on to every child.  Returns the
        number of links it is being pushed to."""
        check_str(digest, "digest")
        self.store.finish(digest)
        return self._code_installed(digest, push)

    def code_read(self, digest: str, offset: int, size: int) -> bytes:
        """Part of a bundle's archive (a child fetching a bundle it lacks)."""
        check_str(digest, "digest")
        if not isinstance(offset, int) or not isinstance(size, int) or size < 0 or offset < 0:
            raise TypeError("offset and size must be non-negative ints")
        return self.store.read_chunk(digest, offset, min(size, 16 << 20))   # only these bytes are read

    def code_pin(self, digest: str, pinned: bool = True) -> list:
        """Pin (``pinned=True``) or unpin a bundle this node holds: a pinned bundle is on the
        ``sys.path`` of every task run here and is never evicted.  Returns the pinned digests."""
        from .codesync import CodeStore, write_pins
        from .errors import CodeSyncError

        CodeStore._check_digest(digest)
        with self.lock:
            if pinned and digest not in self.pinned:
                if not self.store.has(digest):
                    raise BundleNotFound(f"code bundle {digest[:12]} is not on node {self.name}: upload it "
                                         "before pinning it")
                self.store.pin(digest)
                self.pinned.append(digest)
            elif not pinned:
                if digest not in self.pinned:
                    raise CodeSyncError(f"code bundle {digest[:12]} is not pinned on node {self.name}")
                self.pinned.remove(digest)
                self.store.unpin(digest)
            write_pins(self.cfg.code_cache, self.name, self.pinned)
            return list(self.pinned)

    def code_size(self, digest: str) -> int:
        """Size of a bundle's archive, or -1 if absent."""
        check_str(digest, "digest")
        return self.store.size(digest) if self.store.has(digest) else -1

    # ------------------------------------------------------------------------------------ internals
    def _code_installed(self, digest: str, push: bool) -> int:
        from .ledger import State

        with self.lock:
            waiting = self.waiting_code.pop(digest, [])
            self.fetching.discard(digest)
            for tid in waiting:
                t = self.ledger.tasks.get(tid)
                if t is not None and t.state is State.QUEUED and t.location is None:
                    self.ledger.enqueue(t)
            targets = [l for l in self.links.links.values() if l.may_send] if push else []
            for l in targets:
                l.post(code=[digest])
            self.schedule()
        return len(targets)

    def _needs_code(self, t: "Task") -> bool:
        """Hold ``t`` until its bundle is here (fetching it from the task's sender).  Caller holds lock."""
        bundle = t.rec[3]
        if bundle is None or self.store.has(bundle):
            return False
        self.waiting_code.setdefault(bundle, []).append(t.id)
        if bundle in self.fetching:
            return True
        origin = t.origin
        link = self.links.links.get(origin[1]) if origin[0] == "l" else None
        if link is not None:
            self.fetching.add(bundle)
            threading.Thread(target=self._fetch_code_from, args=(bundle, link.uri),
                             daemon=True, name="pydist-fetch").start()
        else:
            self._fail_waiting(bundle, BundleNotFound(
                f"code bundle {bundle[:12]} is not on node {self.name}: upload it first "
                f"(ClusterExecutor.upload_code)"))
        return True

    def _fetch_code_from(self, digest: str, uri: str) -> None:
        from .codesync import CHUNK_SIZE

        try:
            proxy = security.connect(uri, secret=self.cfg.secret, timeout=self.cfg.heartbeat_timeout,
                                     call_timeout=60.0)
            with proxy:
                size = proxy.code_size(digest)
                if size < 0:
                    raise BundleNotFound(f"code bundle {digest[:12]} is on neither node {self.name} nor "
                                         f"its sender: upload it first (ClusterExecutor.upload_code)")
                self.store.begin(digest, size, owner=security.connection_id())
                off = 0
                while off < size:
                    data = proxy.code_read(digest, off, CHUNK_SIZE)
                    if not data:
                        raise BundleNotFound(f"code bundle {digest[:12]} vanished while being fetched")
                    self.store.write_chunk(digest, off, data)
                    off += len(data)
                self.store.finish(digest)
            self._code_installed(digest, push=False)
        except Exception as exc:
            log.warning("fetching code bundle %s failed: %s", digest[:12], exc)
            try:
                self.store.abort(digest)
            except Exception:
                pass
            with self.lock:
                self.fetching.discard(digest)
                err = exc if isinstance(exc, BundleNotFound) else BundleNotFound(
                    f"code bundle {digest[:12]} could not be fetched by node {self.name}: {exc}")
                self._fail_waiting(digest, err)

    def _fail_waiting(self, digest: str, exc: Exception) -> None:
        for tid in self.waiting_code.pop(digest, []):
            t = self.ledger.tasks.get(tid)
            if t is not None:
                self.fail_task(t, exc)
