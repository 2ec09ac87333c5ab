"""Task groups on a node: gang reservation, the ranks' control lines, abort.

::

    client ─group_open/group_submit─▶ home node: GroupRec (waiting) ── place() under the node lock
        size workers free at once?   local workers  ──reserve──▶ held rank ─(worker idle)─▶ worker
                                     linked nodes   ──group_reserve (all or nothing)──▶ run_task(rank)
    ranks ──control line (token)──▶ GroupServer of the home: hello / peer addresses / done / fail / abort
    any rank fails, dies, its node is lost, the client goes ─▶ abort: "abort" to every rank's line,
        ranks not started fail with GroupAborted, late successes too; the group is forgotten at its end

* **Gang scheduling.** A group waits (FIFO, no overtaking) until ``size`` workers can be reserved at
  once: this node's own workers, then workers of directly linked nodes (``group_reserve``, released
  again if the whole group does not fit).  A reserved worker gets no new ordinary task; its rank is held
  on the node until the worker has finished what it already had, then sent alone.  So a rank never
  waits behind another rank, and two groups never hold each other's workers.
* **Never re-run alone.** A rank task that comes back to a node's queue (worker died, link lost) is not
  placed again: it fails, and that aborts its group (``claim``).
* **Capability.** Ranks hold the group's token (random, for this group only), never the cluster secret.
"""
from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from . import commnet, security, wire
from .errors import GroupAborted, NodeLost, TaskError

log = logging.getLogger(__name__)

KIND_RANK = wire.KIND_RANK
RESERVE_TTL = 10.0            # s a reservation for a group waits for its ranks
QUEUE_CAP = 64 << 20          # bytes of unreceived messages per (receiving rank, source) before the source blocks
MAX_GROUPS_PER_CLIENT = 64


def rank_tid(gid: str, rank: int) -> str:
    return f"{gid}.r{rank}"


def split_tid(tid: str) -> Tuple[str, int]:
    gid, _, r = tid.rpartition(".r")
    return gid, int(r)


class GroupRec:
    """A group whose home is this node."""

    def __init__(self, gid: str, cid: str, size: int):
        self.gid, self.cid, self.size = gid, cid, size
        self.token = os.urandom(32)
        self.tids: List[str] = [rank_tid(gid, r) for r in range(size)]
        self.submitted = False
        self.state = "open"             # open → waiting → running → done | aborted
        self.why = ""
        self.placing = False
        self.finished: set = set()
        self.aborted: Optional[tuple] = None
        self.conns: Dict[int, socket.socket] = {}
        self.addrs: Dict[int, tuple] = {}
        self.ended_ok: set = set()
        self.created = time.monotonic()


class GroupTable:
    """Every group-related piece of a node's state; all methods run under ``node.lock``."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.groups: Dict[str, GroupRec] = {}           # home groups, in arrival order
        self.reserved: Dict[int, list] = {}             # worker index -> [gid, tid or None, expiry]
        self.held: Dict[str, int] = {}                  # rank tid -> reserved worker, not sent yet
        self.running: Dict[str, int] = {}               # rank tid -> worker it was sent to
        self.seen: set = set()                          # rank tids placed here once (never again)
        self.sub: Dict[str, list] = {}                  # gid -> [{link: count}, expiry, uris]: reserved behind us
        self.server: Optional[GroupServer] = None

    # ------------------------------------------------------------------------------ client side calls
    def open(self, cid: str, gid: str, size: int) -> dict:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"a group's size must be a positive int, got {size!r}")
        if not gid.startswith(cid + ".") or ".r" in gid[len(cid):]:
            raise ValueError(f"group id {gid!r} must start with the client id")
        if gid in self.groups:
            raise ValueError(f"group {gid} exists already")
        if sum(1 for g in self.groups.values() if g.cid == cid) >= MAX_GROUPS_PER_CLIENT:
            raise ValueError(f"client {cid} has {MAX_GROUPS_PER_CLIENT} groups open: wait for some to end")
        total = self.capacity()
        if size > total:
            raise ValueError(f"a group of {size} ranks must run at once, but the cluster has {total} workers "
                             f"(on this node and the nodes behind its links)")
        if self.server is None:
            self.server = GroupServer(self, self.node.address.rsplit(":", 1)[0].strip("[]"))
        g = self.groups[gid] = GroupRec(gid, cid, size)
        return {"token": g.token, "home": list(self.server.address)}

    def submit(self, cid: str, gid: str, tasks: list) -> None:
        g = self.groups.get(gid)
        if g is None or g.cid != cid or g.submitted:
            raise ValueError(f"group {gid} is not open for client {cid} (group_open first, submit once)")
        if [t[wire.T_ID] for t in tasks] != g.tids or any(t[wire.T_KIND] != KIND_RANK for t in tasks):
            raise ValueError(f"group {gid} needs exactly its {g.size} rank tasks, in rank order")
        g.submitted = True
        g.state = "waiting"
        g.why = f"waiting for {g.size} workers to be free at once"

    def capacity(self) -> int:
        """Workers of this node and of every node behind its child/peer links."""
        return len(self.node.worker_up) + sum(self._behind(l) for l in self._links())

    def _links(self, exclude: str = "") -> list:
        return [l for l in self.node.links.values()
                if l.may_send and l.alive and l.role != "parent" and l.name != exclude]

    def _behind(self, link) -> int:
        return sum(v[0] for k, v in link.remote_map.items() if k != self.node.name)

    def state(self, cid: str, gid: str) -> str:
        g = self.groups.get(gid)
        if g is None or g.cid != cid:
            return "unknown"
        if g.state == "running":
            k = self.held_here(gid)
            if k:
                return (f"waiting: {g.size} workers reserved, {k} of them still finishing tasks they had "
                        "before (the ranks start together once they are free)")
        return f"{g.state}: {g.why}" if g.why and g.state in ("waiting", "aborted") else g.state

    def abort_by_client(self, cid: str, gid: str, reason: str) -> None:
        g = self.groups.get(gid)
        if g is not None and g.cid == cid:
            self.abort(g, -1, f"was aborted by the client: {reason}", None)

    def client_gone(self, cid: str) -> None:
        for g in [g for g in self.groups.values() if g.cid == cid]:
            self.abort(g, -1, "lost its client (it went away or its lease expired)", None)
            self._drop(g)

    # ------------------------------------------------------------------------------ scheduling
    def is_reserved(self, index: int) -> bool:
        return index in self.reserved

    def schedule(self) -> None:
        """Called first thing in the node's ``_schedule``: expire reservations, start held ranks whose
        worker is idle, place waiting groups (FIFO)."""
        n = self.node
        now = time.monotonic()
        for i, r in list(self.reserved.items()):
            if r[1] is None and r[2] < now:
                del self.reserved[i]
        for gid in [gid for gid, v in self.sub.items() if v[1] < now]:
            del self.sub[gid]
        for g in list(self.groups.values()):
            if g.state != "waiting":
                continue
            if any(n.tasks.get(t) is None or n.tasks[t].cancelled for t in g.tids):
                self.abort(g, -1, "was cancelled", None)
                continue
            if g.placing or not self._place(g):
                break   # FIFO: a waiting group is not overtaken
        self._dispatch()

    def _dispatch(self) -> None:
        """Send held ranks to their reserved workers: a group's ranks on this node all at once, when
        every one of their workers has finished what it had before."""
        n = self.node
        by_group: Dict[str, List[str]] = {}
        for tid in self.held:
            by_group.setdefault(split_tid(tid)[0], []).append(tid)
        for _gid, tids in by_group.items():
            if any(n.worker_inflight[self.held[t]] or not n.worker_up[self.held[t]] for t in tids
                   if t in n.tasks and not n.tasks[t].cancelled):
                continue
            for tid in tids:
                i = self.held.pop(tid)
                rec = n.tasks.get(tid)
                if rec is None or rec.cancelled:
                    self._release(i)
                    continue
                self.running[tid] = i
                n._send_to_worker(i, [tid])

    def held_here(self, gid: str) -> int:
        return sum(1 for t in self.held if split_tid(t)[0] == gid)

    def _free_workers(self) -> List[int]:
        n = self.node
        free = [i for i in range(len(n.worker_up)) if n.worker_up[i] and i not in self.reserved]
        free.sort(key=lambda i: len(n.worker_inflight[i]))
        return free

    def _place(self, g: GroupRec) -> bool:
        free = self._free_workers()
        if len(free) >= g.size:
            for tid, i in zip(g.tids, free):
                self._hold(tid, i, g.gid)
            self._started(g)
            return True
        links = [l for l in self._links() if self._behind(l) > 0]
        if sum(self._behind(l) for l in links) + len(free) < g.size:
            g.why = f"waiting for {g.size} workers to be free at once ({len(free)} free here)"
            return False
        g.placing = True
        threading.Thread(target=self._place_remote, args=(g, [(l.name, l.uri) for l in links]),
                         daemon=True, name="pydist-group-place").start()
        return False

    def _hold(self, tid: str, i: int, gid: str) -> None:
        self.reserved[i] = [gid, tid, 0.0]
        self.held[tid] = i
        self.seen.add(tid)

    def _started(self, g: GroupRec) -> None:
        g.state, g.why = "running", ""

    def _place_remote(self, g: GroupRec, links: List[Tuple[str, str]]) -> None:
        """All-or-nothing reservation over this node's workers and linked nodes' (own thread)."""
        n = self.node
        delay = 0.02
        while True:
            got: Dict[str, int] = {}
            with n.lock:
                if g.state != "waiting" or n.stopping.is_set():
                    g.placing = False
                    return
                want = g.size - len(self._free_workers())
            for name, uri in links:
                if want <= 0:
                    break
                k = self._remote(uri, "group_reserve", g.gid, want, RESERVE_TTL)
                if k:
                    got[name] = k
                    want -= k
            with n.lock:
                free = self._free_workers()
                if g.state == "waiting" and sum(got.values()) + len(free) >= g.size:
                    tids = list(g.tids)
                    for i in free[:max(0, g.size - sum(got.values()))]:
                        self._hold(tids.pop(0), i, g.gid)
                    for name, k in got.items():
                        link = n.links.get(name)
                        part, tids = tids[:k], tids[k:]
                        if link is None or not link.alive:
                            tids = part + tids
                            break
                        for t in part:
                            self.seen.add(t)
                        if part:
                            n._send_to_link(link, part)
                    if tids:   # a link vanished meanwhile: the group cannot start whole
                        self.abort(g, -1, "lost a node while it was being placed", None)
                    else:
                        self._started(g)
                    g.placing = False
                    n._schedule()
                    return
                g.why = (f"waiting for {g.size} workers to be free at once "
                         f"({len(free)} here, {sum(got.values())} on linked nodes)")
            for name, uri in links:
                if name in got:
                    self._remote(uri, "group_release", g.gid)
            n.stopping.wait(delay)
            delay = min(delay * 2, 0.5)

    def _remote(self, uri: str, method: str, gid: str, *args) -> int:
        """Call ``group_reserve``/``group_release`` on a linked node (no lock held); 0 on failure."""
        n = self.node
        try:
            p = security.connect(uri, secret=n.cfg.secret, timeout=2.0, call_timeout=10.0)
            try:
                return int(getattr(p, method)(n.name, gid, *args) or 0)
            finally:
                security.release(p)
        except Exception as exc:
            log.info("group %s: %s on %s failed: %s", gid, method, uri, exc)
            return 0

    # ------------------------------------------------------------------------------ linked node side
    def reserve_tree(self, sender: str, gid: str, want: int, ttl: float) -> int:
        """``group_reserve`` from a linked node: this node's workers first, then nodes behind our own
        links (their reservations are remembered: ranks that arrive beyond ours go on to them).
        Called without the node lock (it calls other nodes)."""
        n = self.node
        ttl = min(max(float(ttl), 0.1), 60.0)
        with n.lock:
            k = self.reserve(gid, want, ttl)
            links = [(l.name, l.uri) for l in self._links(exclude=sender) if self._behind(l) > 0]
        got: Dict[str, int] = {}
        for name, uri in links:
            more = want - k - sum(got.values())
            if more <= 0:
                break
            r = self._remote(uri, "group_reserve", gid, more, ttl)
            if r:
                got[name] = r
        if got:
            with n.lock:
                self.sub[gid] = [got, time.monotonic() + ttl, [u for nm, u in links if nm in got]]
        return k + sum(got.values())

    def release_tree(self, gid: str) -> None:
        """``group_release``: our reservations for ``gid`` and those we made behind our links."""
        n = self.node
        with n.lock:
            self.release(gid)
            sub = self.sub.pop(gid, None)
        for uri in (sub[2] if sub else ()):
            self._remote(uri, "group_release", gid)

    def reserve(self, gid: str, want: int, ttl: float) -> int:
        """Reserve up to ``want`` of this node's workers for ranks of ``gid`` about to arrive."""
        free = self._free_workers()[:max(0, int(want))]
        expiry = time.monotonic() + min(max(float(ttl), 0.1), 60.0)
        for i in free:
            self.reserved[i] = [gid, None, expiry]
        return len(free)

    def release(self, gid: str) -> None:
        for i, r in list(self.reserved.items()):
            if r[0] == gid and r[1] is None:
                del self.reserved[i]
        self.node._schedule()

    def claim(self, tid: str) -> None:
        """A rank task came out of this node's queue (it arrived from a link, or came back after a
        loss): hold it for its reserved worker, or fail it (a rank is never re-run alone)."""
        n = self.node
        rec = n.tasks.get(tid)
        if rec is None:
            return
        if tid in self.seen or tid in self.running:
            self._fail(tid, NodeLost(f"rank task {tid} lost its worker or node; the ranks of a group are "
                                     "never re-run on their own"))
            return
        gid, _ = split_tid(tid)
        free = [i for i, r in self.reserved.items() if r[0] == gid and r[1] is None]
        sub = self.sub.get(gid)
        if not free and sub:   # reserved behind one of our links: the rank goes on there
            for name, k in sub[0].items():
                link = n.links.get(name)
                if k > 0 and link is not None and link.alive:
                    sub[0][name] -= 1
                    self.seen.add(tid)
                    n._send_to_link(link, [tid])
                    return
        if not free:
            free = self._free_workers()[:1]
        if not free:
            self._fail(tid, TaskError(f"rank task {tid} reached node {n.name} but no worker was reserved "
                                      "for it"))
            return
        self._hold(tid, free[0], gid)
        self._dispatch()

    def _fail(self, tid: str, exc: BaseException) -> None:
        self.seen.add(tid)
        self.node._finish_results([self.node._error_result(tid, exc)], None)

    def _release(self, i: int) -> None:
        self.reserved.pop(i, None)

    # ------------------------------------------------------------------------------ results
    def on_results(self, results: list) -> list:
        """Look at results passing through the node: free reserved workers, abort groups whose rank
        failed, turn a success after an abort into GroupAborted; forget a group at its end."""
        out = None
        for k, r in enumerate(results):
            tid = r[wire.R_ID]
            if ".r" not in tid:
                continue
            self.seen.discard(tid)
            i = self.running.pop(tid, None)
            if i is not None and self.reserved.get(i, [None, None])[1] == tid:
                self._release(i)
            i = self.held.pop(tid, None)
            if i is not None:
                self._release(i)
            try:
                gid, rank = split_tid(tid)
            except ValueError:
                continue
            g = self.groups.get(gid)
            if g is None:
                continue
            status = r[wire.R_STATUS]
            if rank in g.finished:
                continue
            g.finished.add(rank)
            if status != wire.OK and g.aborted is None:
                what = "raised an exception" if status == wire.ERROR else (
                    "lost its worker process" if status == wire.LOST else f"ended with status {status}")
                self.abort(g, rank, what, r[wire.R_BLOB] if status in (wire.ERROR, wire.LOST) else None)
            elif status in (wire.OK, wire.LOST) and g.aborted is not None and g.aborted[0] != rank:
                if out is None:
                    out = list(results)
                out[k] = self.node._error_result(tid, self._exc(g))
            if len(g.finished) == g.size:
                self._drop(g)
        return results if out is None else out

    def _exc(self, g: GroupRec) -> GroupAborted:
        rank, cause, blob = g.aborted  # type: ignore[misc]
        return GroupAborted(g.gid, rank, cause, blob or b"")

    def abort(self, g: GroupRec, rank: int, cause: str, blob: Optional[bytes]) -> None:
        """Abort ``g``: tell every rank, fail the ranks not started yet."""
        if g.aborted is not None or g.state == "done":
            return
        g.aborted = (rank, cause, blob)
        g.state, g.why = "aborted", f"rank {rank} {cause}" if rank >= 0 else cause
        log.info("group %s aborted: %s", g.gid, g.why)
        for c in list(g.conns.values()):
            self._ctl(g, c, ("abort", rank, cause, blob))
        err = self._exc(g)
        for tid in g.tids:
            rec = self.node.tasks.get(tid)
            if rec is None:
                continue
            if tid in self.held or (tid not in self.seen and tid not in self.running):
                r = split_tid(tid)[1]
                if r not in g.finished:
                    self._fail(tid, err)

    def _drop(self, g: GroupRec) -> None:
        g.state = "done" if g.aborted is None else "aborted"
        self.groups.pop(g.gid, None)
        for c in g.conns.values():
            try:
                c.close()
            except OSError:
                pass
        g.conns.clear()
        for t in g.tids:
            self.seen.discard(t)

    def _ctl(self, g: GroupRec, c: socket.socket, msg: tuple) -> None:
        try:
            commnet.write_ctl(c, msg)
        except OSError:
            pass

    # ------------------------------------------------------------------------------ control lines
    def rank_hello(self, g: GroupRec, rank: int, conn: socket.socket, msg: tuple) -> None:
        _, r, tcp, unix_name, node, _pid = msg
        addr = (str(tcp[0]), int(tcp[1]), unix_name if isinstance(unix_name, str) else None, str(node))
        g.conns[rank] = conn
        self._ctl(g, conn, ("limits", self.node.cfg.max_message_size, QUEUE_CAP))
        if g.aborted is not None:
            self._ctl(g, conn, ("abort",) + g.aborted)
            return
        for other, a in g.addrs.items():
            self._ctl(g, conn, ("peer", other) + a)
        g.addrs[rank] = addr
        for other, c in g.conns.items():
            if other != rank:
                self._ctl(g, c, ("peer", rank) + addr)

    def rank_message(self, g: GroupRec, rank: int, msg: tuple) -> None:
        if msg[0] == "done":
            g.ended_ok.add(rank)
        elif msg[0] == "fail" and len(msg) >= 4:
            g.ended_ok.add(rank)
            self.abort(g, rank, str(msg[2])[:2000], msg[3] if isinstance(msg[3], bytes) else None)
        elif msg[0] == "abort" and len(msg) >= 3:
            self.abort(g, rank, f"called comm.abort({str(msg[2])[:500]!r})", None)

    def rank_gone(self, g: GroupRec, rank: int) -> None:
        if rank not in g.ended_ok and g.aborted is None and self.groups.get(g.gid) is g:
            self.abort(g, rank, "died (its worker process or its node went away)", None)

    def summary(self) -> dict:
        return {"groups": {g.gid: self.state(g.cid, g.gid) for g in self.groups.values()},
                "reserved_workers": sorted(self.reserved)}


class GroupServer:
    """The home node's listener for ranks' control lines (one thread per line)."""

    def __init__(self, table: GroupTable, host: str):
        self.table = table
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(256)
        port = self.sock.getsockname()[1]
        if host in ("0.0.0.0", "::", ""):   # a wildcard bind: advertise this machine's address
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = "127.0.0.1"
        self.address = (host, port)
        threading.Thread(target=self._accept, daemon=True, name="pydist-groups").start()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._line, args=(c,), daemon=True, name="pydist-group-line").start()

    def _line(self, c: socket.socket) -> None:
        t = self.table
        lock = t.node.lock
        g = rank = None
        try:
            c.settimeout(10.0)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = os.urandom(16)
            c.sendall(nonce)
            import struct

            n = struct.unpack("!H", commnet.read_exact(c, 2))[0]
            if n > 4096:
                return
            gid = commnet.read_exact(c, n).decode(errors="replace")
            rank = struct.unpack("!I", commnet.read_exact(c, 4))[0]
            proof = commnet.read_exact(c, 32)
            with lock:
                g = t.groups.get(gid)
            if g is None or rank >= g.size or not hmac.compare_digest(
                    proof, commnet.mac(g.token, nonce, gid, rank)):
                log.warning("refused a group control line for %r rank %s (unknown group or wrong token)", gid, rank)
                g = None
                return
            hello = commnet.read_ctl(c)
            if hello[0] != "hello" or len(hello) != 6:
                g = None
                return
            c.settimeout(None)
            with lock:
                t.rank_hello(g, rank, c, hello)
            while True:
                msg = commnet.read_ctl(c)
                with lock:
                    t.rank_message(g, rank, msg)
        except (OSError, EOFError, ValueError, TypeError, IndexError):
            pass
        finally:
            if g is not None and rank is not None:
                with lock:
                    t.rank_gone(g, rank)
            try:
                c.close()
            except OSError:
                pass
