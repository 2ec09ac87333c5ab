"""Links between nodes: join, epochs, the pump thread, heartbeats, reconciliation, loss.

::

    Node A (parent)                                             Node B (child)
      ledger: task at ("l", "B", e) ── Link(B).post(tasks) ─▶ pump ─▶ B.run_task(A, ..., epoch=e)
      ledger ◀── A.receive_results(B, results, epoch=e, started) ◀── pump ◀── Link(A).post(results, started)
      pump ─▶ B.heartbeat(A, map, {"e": e, "n": count, "d": digest})  (what A believes is at B)
               └─ counts differ ─▶ B.reconcile(A, e, ids at B) ─▶ B's ids from A: each side re-places /
                                                                 drops what only it knew (twice seen)

Each (re)join starts a new *epoch*, chosen by the node that accepts the join and carried by every
message over the link; a message with another epoch is refused (its sender re-joins and re-places), a
result with another epoch is not from the task's location (the ledger counts it, never delivers it).

A ``Link`` has one thread (``LinkManager.loop``) that owns its Pyro5 proxy (proxies belong to a thread:
notes/pyro5.md §2), coalesces everything queued into one call per kind, heartbeats, reconciles, and on
failure hands the link to the node (``Node.link_lost``), which re-places the link's tasks.  The link we
opened ourselves (to a parent or a peer) re-joins with backoff; a link opened by the other side is
dropped and waits for it to re-join.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Dict, List, Optional

from . import diagnose, security
from .checks import check_map
from .errors import AuthenticationError, NodeLost, VersionMismatch
from .sessions import STARTED_DELAY

if TYPE_CHECKING:   # pragma: no cover
    from .node import Node

log = logging.getLogger("pydist.node")
JOIN_GRACE = 3.0      # s a node may fail to join quietly (its parent may be starting too); then it says why
#: s a link stays "hot" after tasks came over it: its pump ticks every STARTED_DELAY meanwhile, so a
#: "started" note (one per task that begins) waits for the tick instead of waking the pump (#15)
HOT_FOR = 1.0


def new_epoch() -> int:
    """A fresh link epoch (random: a restarted node never reuses one)."""
    return secrets.randbits(62) | 1


class Link:
    """Another node: its proxy lives in this link's own thread; queued messages wait here."""

    def __init__(self, name: str, uri: str, may_send: bool, initiated: bool,
                 join_target: Optional[str] = None, role: str = "child", epoch: int = 0):
        self.name = name
        self.uri = uri
        self.may_send = may_send        # we may send it tasks
        self.initiated = initiated      # we opened it (re-join on failure)
        self.join_target = join_target  # what to resolve when re-joining
        self.role = role                # "child" (we are its parent), "parent", "peer"
        self.epoch = epoch              # changes with every (re)join
        self.remote_map: Dict[str, list] = {}
        self.known_clients: set = set()
        self.has_code: set = set()
        self.alive = False
        self.last_heard = time.monotonic()
        self.cond = threading.Condition()
        self.out_tasks: List[tuple] = []
        self.out_fns: Dict[str, bytes] = {}
        self.out_inits: Dict[str, bytes] = {}
        self.out_results: List[tuple] = []
        self.sending_results: List[tuple] = []   # taken by the pump, call in flight
        self.out_cancel: List[str] = []
        self.out_withdraw: List[tuple] = []     # (request, ids, wait): "drop these if not started"
        self.out_code: List[str] = []
        self.out_started: List[str] = []        # ids of tasks it sent us that started here (or further on)
        self.started_due = 0.0                  # when the oldest of them must go, if no result takes it
        self.last_tasks_in = -HOT_FOR           # when it last sent us tasks (see HOT_FOR)
        self.stopping = False
        self.left = False               # it told us it is stopping (a clean stop, not a fault)
        self.suspects: Dict[str, int] = {}      # reconciliation of what we sent: id -> round first seen
        self.rounds = 0
        self.suspects_in: Dict[str, int] = {}   # ... of what it sent us
        self.rounds_in = 0

    @property
    def location(self) -> tuple:
        """Where tasks we send over this link are, in the ledger."""
        return ("l", self.name, self.epoch)

    @property
    def workers(self) -> int:
        return sum(v[0] for v in self.remote_map.values())

    def tasks_came(self) -> None:
        """It sent us tasks: the link is hot for ``HOT_FOR`` s (wakes the pump if it was not)."""
        now = time.monotonic()
        cold = now - self.last_tasks_in >= HOT_FOR
        self.last_tasks_in = now
        if cold:
            with self.cond:
                self.cond.notify()   # the pump waits for the heartbeat: it must start ticking

    def post(self, *, tasks=(), fns=None, inits=None, results=(), cancel=(), code=(), withdraw=(),
             started=()) -> None:
        """Queue messages for the link thread (never blocks on the network).  ``started`` notes wait up to
        ``STARTED_DELAY`` for results to ride with (a short task's note then costs no call of its own);
        on a hot link they wake nobody: the pump's next tick finds them."""
        with self.cond:
            if started:
                now = time.monotonic()
                first = not self.out_started   # the pump must learn the due time; later notes wait with it
                if first:
                    self.started_due = now + STARTED_DELAY
                self.out_started.extend(started)
                if not (tasks or results or cancel or code or withdraw) and (
                        not first or now - self.last_tasks_in < HOT_FOR):
                    return
            if tasks:
                self.out_tasks.extend(tasks)
            if fns:
                self.out_fns.update(fns)
            if inits:
                self.out_inits.update(inits)
            if results:
                self.out_results.extend(results)
            if cancel:
                self.out_cancel.extend(cancel)
            if code:
                self.out_code.extend(code)
            if withdraw:
                self.out_withdraw.extend(withdraw)
            self.cond.notify()

    def unsent_task_ids(self) -> set:
        with self.cond:
            return {t[0] for t in self.out_tasks}

    def withdraw(self, ids: set) -> set:
        """Take tasks not yet sent out of the outbox; returns the ids withdrawn."""
        with self.cond:
            keep, gone = [], set()
            for t in self.out_tasks:
                (gone.add(t[0]) if t[0] in ids else keep.append(t))
            self.out_tasks = keep
            return gone

    def pending_result_ids(self) -> set:
        """Results for the other side not yet delivered (queued or in the call in flight)."""
        with self.cond:
            return {r[0] for r in self.out_results} | {r[0] for r in self.sending_results}

    def take_unsent_results(self) -> List[tuple]:
        with self.cond:
            out = self.out_results + self.sending_results
            self.out_results, self.sending_results = [], []
            self.out_tasks, self.out_fns, self.out_inits = [], {}, {}
            self.out_withdraw = []   # (their askers stop waiting: Node.withdrawals_lost)
            return out

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()


class LinkManager:
    """The threads and calls of a node's links; the ledger consequences are the node's (``Node``)."""

    def __init__(self, node: "Node"):
        self.node = node
        self.cfg = node.cfg
        self.links: Dict[str, Link] = {}

    # a read-only mapping of the links by name (what pydist.groups and the dashboard look at)
    def get(self, name: str, default=None) -> Optional[Link]:
        return self.links.get(name, default)

    def values(self):
        return self.links.values()

    def items(self):
        return self.links.items()

    def __contains__(self, name: object) -> bool:
        return name in self.links

    def __getitem__(self, name: str) -> Link:
        return self.links[name]

    def __iter__(self):
        return iter(self.links)

    def __len__(self) -> int:
        return len(self.links)

    # ------------------------------------------------------------------------------------ opening
    def open(self, target: str, role: str) -> None:
        """Open (and keep re-joining) a link to a parent or a peer."""
        self.start(Link(name=f"?{target}", uri="", may_send=(role == "peer"), initiated=True,
                        join_target=target, role=role))

    def start(self, link: Link) -> None:
        threading.Thread(target=self.loop, args=(link,), daemon=True,
                         name=f"pydist-link-{link.join_target or link.name}").start()

    def accept(self, name: str, uri: str, role: str, remote_map: Dict[str, list]) -> Link:
        """Another node joins us (caller holds the node lock).  Returns the link (its epoch is new,
        unless we had opened a link to it ourselves: mutual links share ours)."""
        node = self.node
        old = self.links.get(name)
        if old is not None and old.initiated:
            # we also opened a link to it (mutual parents / peers): keep ours, allow sending
            old.may_send = True
            old.role = "peer"
            old.remote_map = remote_map
            old.last_heard = time.monotonic()
            old.alive = True
            return old
        if old is not None:
            node.link_lost(old, "it joined again")
            old.stop()
        link = Link(name, uri, may_send=True, initiated=False, role="child" if role == "child" else "peer",
                    epoch=new_epoch())
        link.remote_map = remote_map
        link.alive = True
        self.links[name] = link
        log.info("node %s joined as %s (%d workers)", name, link.role, link.workers)
        self.start(link)
        return link

    def _join(self, link: Link):
        """Connect to the node a link we initiated points to, and join it.  Returns the proxy."""
        node = self.node
        uri = node.resolve(link.join_target)  # type: ignore[arg-type]
        proxy = security.connect(uri, secret=self.cfg.secret, timeout=self.cfg.heartbeat_timeout,
                                 call_timeout=self.cfg.heartbeat_timeout)
        name = proxy.pydist_peer_name
        role = "peer" if link.role == "peer" else "child"
        with node.lock:
            if name == node.name:
                raise ValueError(f"--{link.role} {link.join_target} is this node itself")
            old = self.links.get(name)
            if old is not None and old is not link:
                if old.initiated:
                    raise ValueError(f"already linked to {name} (listed twice?)")
                # it had joined us first (mutual links): take its place, keep sending rights
                node.link_lost(old, "replaced by our own link")
                old.stop()
                link.may_send = True
                link.role = "peer"
            if link.alive or link.epoch:
                node.link_lost(link, "re-joining")
            # known under its name before we join, so its first heartbeat to us finds the link
            link.name = name
            link.uri = str(proxy._pyroUri)
            link.last_heard = time.monotonic()
            link.epoch = 0
            self.links[name] = link
            report = self.report_for(name)
        reply = proxy.join({"name": node.name, "uri": node.uri, "role": role, "map": report})
        with node.lock:
            link.uri = reply["uri"]
            link.remote_map = check_map(reply.get("map", {}))
            epoch = reply.get("epoch", 0)
            link.epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0
            link.alive = True
            link.last_heard = time.monotonic()
            link.suspects.clear()
            log.info("linked to %s %s at %s (epoch %x)", link.role, name, link.uri, link.epoch)
            node.schedule()
        return proxy

    # ------------------------------------------------------------------------------------ the thread
    def loop(self, link: Link) -> None:
        node = self.node
        delay = 0.05
        first_try = time.monotonic()
        join_log = diagnose.RateLimited(log)   # why joining fails: said once, then at most every 30 s
        while not node.stopping.is_set() and not link.stopping:
            proxy = None
            try:
                if link.initiated:
                    proxy = self._join(link)
                    join_log.ok("join", f"joined {link.role} {link.name} ({link.join_target})")
                else:
                    proxy = security.connect(link.uri, secret=self.cfg.secret,
                                             timeout=self.cfg.heartbeat_timeout,
                                             call_timeout=self.cfg.heartbeat_timeout)
                delay = 0.05
                first_try = time.monotonic()
                self._pump(link, proxy)
            except Exception as exc:
                if node.stopping.is_set() or link.stopping:
                    break
                if link.left:
                    log.info("link to %s %s closed: it stopped%s", link.role, link.name,
                             "; waiting for it to come back" if link.initiated else "")
                    link.left = False
                    join_log.hold("join", 30.0)   # it said it stops: failing to re-join is no news
                elif link.alive or not link.initiated:
                    log.warning("link to %s %s lost: %s", link.role, link.name, short(exc))
                elif time.monotonic() - first_try < JOIN_GRACE and not isinstance(
                        exc, (AuthenticationError, VersionMismatch)):
                    log.debug("joining %s failed: %s", link.join_target, short(exc))   # it may be starting too
                else:
                    join_log.fail("join", diagnose.join_failure(exc, link.role, link.join_target, self.cfg.ns,
                                                                   self.cfg.secret))
                with node.lock:
                    node.link_lost(link, short(exc))
                if not link.initiated:
                    break
                node.stopping.wait(delay)
                # a parent that is starting too: retry briskly for a few seconds, then back off
                delay = 0.1 if time.monotonic() - first_try < 5 else min(delay * 2, 2.0)
                if isinstance(exc, (AuthenticationError, VersionMismatch)):
                    delay = 2.0   # refused: retrying fast will not change the secret
            finally:
                security.release(proxy)

    def _pump(self, link: Link, proxy) -> None:
        """Send what is queued for ``link``, heartbeat and reconcile, until the link fails or stops."""
        node = self.node
        hb = self.cfg.heartbeat
        next_hb = 0.0
        while True:
            with link.cond:
                while not (link.out_tasks or link.out_results or link.out_cancel or link.out_code
                           or link.out_withdraw or link.stopping) and time.monotonic() < next_hb:
                    now = time.monotonic()
                    if link.out_started and now >= link.started_due:
                        break
                    wake = min(next_hb, link.started_due) if link.out_started else next_hb
                    if now - link.last_tasks_in < HOT_FOR:   # hot: tick for "started" notes (post)
                        wake = min(wake, now + STARTED_DELAY)
                    link.cond.wait(max(0.0, wake - now))
                if link.stopping:
                    return
                if not link.alive:
                    # declared lost (missed heartbeats) while we were busy: start over (re-join if we
                    # opened it), so both sides re-place what the other dropped
                    raise NodeLost(f"{link.name} was declared lost")
                tasks, fns, inits = link.out_tasks, link.out_fns, link.out_inits
                results, cancel, code = link.out_results, link.out_cancel, link.out_code
                withdraw, link.out_withdraw = link.out_withdraw, []
                link.out_tasks, link.out_fns, link.out_inits = [], {}, {}
                link.out_results, link.out_cancel, link.out_code = [], [], []
                link.sending_results = results
                started: List[str] = []
                if link.out_started and (results or time.monotonic() >= link.started_due):
                    done = {r[0] for r in results}   # no note for a task whose result goes with it
                    started = [t for t in link.out_started if t not in done]
                    link.out_started = []
                epoch = link.epoch
            if node.stopping.is_set():
                return
            if results or started:
                proxy.receive_results(node.name, results, epoch, started)
                with link.cond:
                    link.sending_results = []
            if cancel:   # before tasks: a cancel and a re-send of the same id keep their order
                proxy.cancel_forwarded(node.name, cancel)
            if tasks:
                try:
                    proxy.run_task(node.name, fns, tasks, inits, epoch)
                except Exception:
                    with link.cond:   # not delivered: keep them for the failure handler
                        link.out_tasks[:0] = tasks
                    raise
            for req, ids, wait in withdraw:   # after tasks: it asks about tasks sent before it
                # (if the call fails the link is lost: link_lost re-queues the tasks, then wakes the asker)
                gone = proxy.withdraw_forwarded(node.name, epoch, ids, wait)
                gone = [t for t in gone if isinstance(t, str)] if isinstance(gone, list) else []
                node.withdraw_answer(("l", link.name, epoch), req, gone)
            for digest in code:
                self._push_code(proxy, link, digest)
            now = time.monotonic()
            if now >= next_hb:
                self._heartbeat(link, proxy)
                next_hb = now + hb

    def _heartbeat(self, link: Link, proxy) -> None:
        node = self.node
        with node.lock:
            report = self.report_for(link.name)
            recon = None
            if link.may_send and link.epoch:
                unsent = link.unsent_task_ids()
                n, d = node.ledger.digest_at(link.location)
                if not unsent:
                    recon = {"e": link.epoch, "n": n, "d": d}
        reply = proxy.heartbeat(node.name, report, recon)
        if reply.get("unknown"):
            raise NodeLost(f"{link.name} no longer knows us (it restarted or dropped the link)")
        with node.lock:
            new_map = check_map(reply.get("map", {}))
            link.last_heard = time.monotonic()
            if new_map != link.remote_map:
                link.remote_map = new_map
                node.schedule()
        if recon is not None and "n" in reply and (reply["n"], reply["d"]) != (recon["n"], recon["d"]):
            with node.lock:
                unsent = link.unsent_task_ids()
                mine = [t for t in node.ledger.ids_at(link.location) if t not in unsent]
            theirs = proxy.reconcile(node.name, link.epoch, mine)
            if not isinstance(theirs, (list, tuple)) or not all(isinstance(t, str) for t in theirs):
                raise NodeLost(f"{link.name} answered reconcile with {type(theirs).__name__}")
            with node.lock:
                node.reconcile_sent(link, mine, set(theirs))
        elif recon is not None:
            link.suspects.clear()

    def _push_code(self, proxy, link: Link, digest: str) -> None:
        from .codesync import CHUNK_SIZE

        if digest in link.has_code:
            return
        if proxy.code_has([digest]):
            link.has_code.add(digest)
            return
        data = self.node.store.read(digest)
        old_timeout = proxy._pyroTimeout
        proxy._pyroTimeout = max(old_timeout or 0, 60.0)
        try:
            proxy.code_begin(digest, len(data))
            for off in range(0, len(data), CHUNK_SIZE):
                proxy.code_chunk(digest, off, data[off:off + CHUNK_SIZE])
            proxy.code_finish(digest, True)
        finally:
            proxy._pyroTimeout = old_timeout
        link.has_code.add(digest)

    # ------------------------------------------------------------------------------------ helpers
    def report_for(self, link_name: str) -> Dict[str, list]:
        """Workers reachable through us, as seen by ``link_name`` (split horizon, bounded distance)."""
        node = self.node
        out: Dict[str, list] = {node.name: [node.worker_count, 0]}
        for l in self.links.values():
            if l.name == link_name or not l.may_send or not l.alive:
                continue
            for n, (w, d) in l.remote_map.items():
                if n == link_name or d + 1 >= self.cfg.max_hops:
                    continue
                if n not in out or out[n][1] > d + 1:
                    out[n] = [w, d + 1]
        return out

    def check_silent(self, now: float) -> None:
        """Declare links lost whose heartbeats stopped (caller holds the node lock)."""
        for link in list(self.links.values()):
            if link.alive and now - link.last_heard > self.cfg.heartbeat_timeout:
                log.warning("no heartbeat from %s for %.1f s: declaring it lost", link.name, now - link.last_heard)
                self.node.link_lost(link, "missed heartbeats")
                if not link.initiated:
                    link.stop()

    def stop_all(self) -> None:
        for l in list(self.links.values()):
            l.stop()


def short(exc: BaseException) -> str:
    s = f"{type(exc).__name__}: {exc}"
    return s if len(s) < 300 else s[:297] + "..."
