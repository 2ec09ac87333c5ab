"""Sending a code bundle to every node of a cluster (the client's side of ``upload_code`` and
``pydist sync-code``).

::

    _upload_bundle(root uri) ──▶ _walk_nodes: status() of every node reachable through child/peer links
                             ──▶ for each node lacking the bundle: code_begin, code_chunk ... code_finish

Nodes that join later fetch a bundle from their parent when a task needs it (``pydist.codeserve``).
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List

from . import security

log = logging.getLogger("pydist.executor")


def _walk_nodes(uri: str, secret, tls) -> List[dict]:
    """Statuses of every node reachable from ``uri`` through child/peer links (breadth first)."""
    seen: Dict[str, dict] = {}
    todo = [uri]
    while todo:
        u = todo.pop(0)
        try:
            p = security.connect(u, secret=secret, timeout=2.0, tls=tls, call_timeout=10.0)
            try:
                st = p.status()
            finally:
                p._pyroRelease()
        except Exception as exc:
            log.debug("status of %s failed: %s", u, exc)
            continue
        if st["name"] in seen:
            continue
        seen[st["name"]] = st
        for l in st["links"]:
            if l["alive"] and l["name"] not in seen:
                todo.append(l["uri"])
    return list(seen.values())


def _send_bundle(proxy, info, data: bytes, timeout: float, progress=None) -> None:
    from .codesync import CHUNK_SIZE

    proxy._pyroTimeout = max(60.0, timeout)
    t0 = time.monotonic()
    proxy.code_begin(info.digest, len(data))
    for off in range(0, len(data), CHUNK_SIZE):
        proxy.code_chunk(info.digest, off, data[off:off + CHUNK_SIZE])
        done = min(off + CHUNK_SIZE, len(data))
        if progress is not None:
            progress(done, len(data))
        elif time.monotonic() - t0 > 2.0:
            log.info("uploading %s: %d%%", info, 100 * done // max(1, len(data)))
    proxy.code_finish(info.digest, False)


def _upload_bundle(uri: str, secret, tls, info, data: bytes, timeout: float, progress=None) -> List[str]:
    """Send a bundle to every node reachable from ``uri`` that lacks it (in chunks).  Nodes that join
    later fetch it from their parent when a task needs it.  Returns the names of the nodes."""
    names = []
    for st in _walk_nodes(uri, secret, tls):
        p = security.connect(st["uri"], secret=secret, timeout=5.0, tls=tls, call_timeout=60.0)
        try:
            if not p.code_has([info.digest]):
                _send_bundle(p, info, data, timeout, progress)
        finally:
            p._pyroRelease()
        names.append(st["name"])
    return names
