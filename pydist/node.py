"""The pydist node: the one Pyro5-exposed object of a machine.

::

    clients ──submit(batch)──▶ ┌──────────────────────── Node ────────────────────────┐
            ◀─collect (long poll)│ tasks{id: TaskRec}   queue[ids]   clients{id: inbox}  │
                                │        │ schedule(): scheduler.place over slots       │
    parent ──run_task(batch)──▶ │        ├──▶ WorkerPool.send(i, batch) ─▶ worker procs ─┼─┐
            ◀─receive_results── │        └──▶ Link(child).outbox ─▶ link thread ─────────┼─┼─▶ child.run_task
                                │  results ◀── reader threads ◀── worker procs ◀──────────┘ │
                                │  results ◀── child.receive_results ◀──────────────────────┘
                                └───────────────────────────────────────────────────────┘

What arrives: task batches from clients (``submit``) and from other nodes (``run_task``); result
batches from linked nodes (``receive_results``) and from the node's own workers (reader threads).
Where it waits: ``queue`` (task ids in arrival order), under ``lock``.  Where it goes: ``schedule``
asks the pure ``scheduler.place`` for placements over *slots* (local workers and links with credit)
and hands batches to the worker pool or to a link's outbox; nothing here blocks on I/O while holding
``lock``.  What comes back: each result goes to the task's origin — a client's inbox (drained by its
``collect`` long poll) or the link it came from — exactly once: results from anywhere but a task's
current target are dropped.

A ``Link`` is another node this one talks to: a child (we send it tasks), a parent (we send it
results), or a peer (both).  Each link has one thread that owns its Pyro5 proxy (proxies belong to a
thread: notes/pyro5.md §2), coalesces everything queued into one call per kind, heartbeats, and on
failure re-places the link's tasks.  The link we opened ourselves (to a parent or a peer) re-joins
with backoff; a link opened by the other side is dropped and waits for it to re-join.

No exposed method holds a server thread for the length of a task: ``submit``/``run_task`` queue and
return; ``collect`` waits at most ``timeout`` (a few seconds).
"""
from __future__ import annotations

import collections
import logging
import math
import os
import re
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import Pyro5.api
import Pyro5.errors

from . import diagnose, scheduler, security, wire
from .config import NodeConfig
from .errors import AuthenticationError, BundleNotFound, NodeLost, ProtocolError, VersionMismatch, WorkerLost
from .quota import Quota
from .scheduler import TaskState, advance
from .groups import GroupTable
from .workers import WorkerPool

log = logging.getLogger(__name__)

NODE_OBJECT_ID = security.NODE_OBJECT_ID
NS_PREFIX = "pydist.node."
COLLECT_MAX_WAIT = 5.0
JOIN_GRACE = 3.0      # s a node may fail to join quietly (its parent may be starting too); then it says why
STARTED_DELAY = 0.01   # s a collect waits for a result before answering with "started" notes alone


class TaskRec:
    """A task held by this node: its record, state, where it came from and where it went."""

    __slots__ = ("rec", "state", "origin", "target", "cancelled")

    def __init__(self, rec: tuple, origin: Tuple[str, str]):
        self.rec = rec
        self.state = TaskState.QUEUED
        self.origin = origin          # ("c", client_id) or ("l", link name)
        self.target: Optional[tuple] = None   # ("w", index, generation) or ("l", link name)
        self.cancelled = False

    def move(self, new: TaskState) -> None:
        """Change state through the one transition table."""
        self.state = advance(self.state, new)


class ClientRec:
    """A connected client: its inbox of finished results and started task ids."""

    def __init__(self, cid: str, lock: threading.RLock):
        self.id = cid
        self.results: List[tuple] = []
        self.started: List[str] = []
        self.cond = threading.Condition(lock)
        self.last_seen = time.monotonic()
        self.init_blob: Optional[bytes] = None
        self.closed = False
        self.started_due = False   # set by the StartedTimer: answer the long poll with "started" notes


class StartedTimer:
    """Wakes a client's long poll STARTED_DELAY after a task of it started if no result came first, so
    ``Future.running()`` is timely for long tasks while a short task costs no extra wake-up."""

    def __init__(self, lock: threading.RLock, stopping: threading.Event):
        self.lock = lock
        self.stopping = stopping
        self.due: "collections.deque[tuple]" = collections.deque()
        self.cond = threading.Condition(threading.Lock())
        threading.Thread(target=self._run, daemon=True, name="pydist-started").start()

    def add(self, client: "ClientRec") -> None:
        with self.cond:
            self.due.append((time.monotonic() + STARTED_DELAY, client))
            if len(self.due) == 1:
                self.cond.notify()

    def _run(self) -> None:
        while not self.stopping.is_set():
            with self.cond:
                while not self.due and not self.stopping.is_set():
                    self.cond.wait(1.0)
                if not self.due:
                    continue
                when, client = self.due[0]
                left = when - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                self.due.popleft()
            with self.lock:
                if client.started and not client.results:
                    client.started_due = True
                    client.cond.notify()


class Link:
    """Another node: its proxy lives in this link's own thread."""

    def __init__(self, node: "Node", name: str, uri: str, may_send: bool, initiated: bool,
                 join_target: Optional[str] = None, role: str = "child"):
        self.node = node
        self.name = name
        self.uri = uri
        self.may_send = may_send        # we may send it tasks
        self.initiated = initiated      # we opened it (re-join on failure)
        self.join_target = join_target  # what to resolve when re-joining
        self.role = role                # "child" (we are its parent), "parent", "peer"
        self.inflight: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self.remote_map: Dict[str, list] = {}
        self.known_clients: set = set()
        self.alive = False
        self.last_heard = time.monotonic()
        self.cond = threading.Condition()
        self.out_tasks: List[tuple] = []
        self.out_fns: Dict[str, bytes] = {}
        self.out_inits: Dict[str, bytes] = {}
        self.out_results: List[tuple] = []
        self.out_cancel: List[str] = []
        self.out_code: List[str] = []
        self.stopping = False
        self.left = False               # it told us it is stopping (a clean stop, not a fault)

    @property
    def workers(self) -> int:
        return sum(v[0] for v in self.remote_map.values())

    def post(self, *, tasks=(), fns=None, inits=None, results=(), cancel=(), code=()) -> None:
        """Queue messages for the link thread (never blocks on the network)."""
        with self.cond:
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
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()


@Pyro5.api.expose
@Pyro5.api.behavior(instance_mode="single")
class Node:
    """A pydist node (see the module docstring).  Methods exposed to Pyro5 take and return batches."""

    def __init__(self, config: NodeConfig):
        self.cfg = config
        self.name: str = config.name  # type: ignore[assignment]
        self.uri = ""
        self.address = ""
        self.lock = threading.RLock()
        self.tasks: Dict[str, TaskRec] = {}
        self.queue: "collections.deque[str]" = collections.deque()
        self.fns: Dict[str, list] = {}            # key -> [blob, refcount]
        self.quota = Quota(config.max_client_tasks, config.max_client_bytes, config.max_queued_tasks,
                           config.max_queued_bytes, f"node {config.name}")
        self.clients: Dict[str, ClientRec] = {}
        self.links: Dict[str, Link] = {}
        self.avg = scheduler.RuntimeAverage()
        self.counts = collections.Counter()
        self.stopping = threading.Event()
        self._started_timer = StartedTimer(self.lock, self.stopping)
        self.started_at = time.time()
        self.worker_inflight: List["collections.OrderedDict[str, int]"] = [
            collections.OrderedDict() for _ in range(config.workers or 0)]
        self.worker_up = [False] * (config.workers or 0)
        self.waiting_code: Dict[str, List[str]] = {}   # bundle digest -> task ids waiting for it
        self.fetching: set = set()
        self._last_touched: Optional[str] = None
        from .codesync import CodeStore

        self.store = CodeStore.for_node(config)
        self.pinned: List[str] = []          # bundles on every task's sys.path (pydist sync-code --pin)
        from .codesync import write_pins

        write_pins(config.code_cache, self.name, ())
        env = dict(os.environ)
        env.pop("PYDIST_SECRET", None)   # tasks never hold the cluster secret (ranks use a group token)
        self.pool = WorkerPool(config.workers or 0, self.name, config.code_cache,
                               self._on_worker_results, self._on_worker_exit, env=env)
        self.daemon: Optional[Pyro5.api.Daemon] = None
        self.groups = GroupTable(self)               # task groups: reservations, control lines, abort
        self.dashboard_url: Optional[str] = None   # set when this node serves the dashboard (--dashboard)

    # ======================================================================================== lifecycle
    def start(self, daemon: Pyro5.api.Daemon) -> None:
        """Register with the daemon, start workers and background threads (not the request loop)."""
        self.daemon = daemon
        self.uri = str(daemon.register(self, NODE_OBJECT_ID))
        host, port = (daemon.natLocationStr or daemon.locationStr).rsplit(":", 1)   # the advertised one
        self.address = f"{host}:{port}"
        self.pool.start()
        threading.Thread(target=self._watch_workers_ready, daemon=True, name="pydist-ready").start()
        threading.Thread(target=self._janitor, daemon=True, name="pydist-janitor").start()
        if self.cfg.ns:
            threading.Thread(target=self._register_ns, daemon=True, name="pydist-ns").start()
        if self.cfg.parent:
            self._open_link(self.cfg.parent, role="parent")
        for peer in self.cfg.peers:
            self._open_link(peer, role="peer")

    def stop(self) -> None:
        """Stop links, workers and the name-server entry (the daemon is stopped by the caller)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        with self.lock:
            links = list(self.links.values())
            for c in self.clients.values():
                c.cond.notify_all()
        # tell linked nodes we are stopping, so they log a stop, not a fault (1 s at most)
        byes = [threading.Thread(target=self._say_goodbye, args=(l.uri,), daemon=True)
                for l in links if l.alive and l.uri]
        for t in byes:
            t.start()
        deadline = time.monotonic() + 1.0
        for t in byes:
            t.join(max(0.0, deadline - time.monotonic()))
        for l in links:
            l.stop()
        self.pool.stop()
        if self.cfg.ns:
            try:
                with _ns_proxy(self.cfg.ns) as ns:
                    ns.remove(NS_PREFIX + self.name)
            except Exception as exc:  # the name server may be gone already
                log.info("could not remove %s from the name server: %s", NS_PREFIX + self.name, exc)

    def _say_goodbye(self, uri: str) -> None:
        proxy = None
        try:
            proxy = security.connect(uri, secret=self.cfg.secret, timeout=0.5, call_timeout=1.0)
            proxy.leave(self.name)
        except Exception as exc:   # it may be gone already
            log.debug("could not tell %s that we stop: %s", uri, exc)
        finally:
            security.release(proxy)

    def _watch_workers_ready(self) -> None:
        pending = set(range(len(self.pool.handles)))
        while pending and not self.stopping.is_set():
            for i in list(pending):
                if self.pool.handles[i].ready.wait(0.01):
                    pending.discard(i)
                    with self.lock:
                        self.worker_up[i] = True
                        self._schedule()

    def _register_ns(self) -> None:
        delay = 0.05
        meta = {"pydist", "pydist.root" if not self.cfg.parent else "pydist.child"}
        while not self.stopping.is_set():
            try:
                with _ns_proxy(self.cfg.ns) as ns:
                    ns.register(NS_PREFIX + self.name, self.uri, metadata=meta)
                log.info("registered as %s in name server %s", NS_PREFIX + self.name, self.cfg.ns)
                return
            except Exception as exc:
                log.debug("name server %s not reachable yet: %s", self.cfg.ns, exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, 2.0)

    # ======================================================================================== clients
    def submit(self, client_id: str, fns: dict, tasks: list) -> int:
        """Accept a batch of tasks from a client; returns how many were taken (tasks over one of the node's
        limits come back at once as ``ResourceLimit`` errors naming it)."""
        _check_str(client_id, "client_id")
        _check_fns(fns)
        _check_tasks(tasks)
        with self.lock:
            client = self._client(client_id)
            client.last_seen = time.monotonic()
            new = list({t[wire.T_ID]: t for t in tasks if t[wire.T_ID] not in self.tasks}.values())
            fit, err = self.quota.admit(client_id, [wire.payload_size(t[wire.T_PAYLOAD]) for t in new])
            added = self._add_fns(fns, new[:fit])      # resends hold no new reference (they leaked one)
            origin = ("c", client_id)
            for t in new[:fit]:
                self._new_task(t, origin)
            self._drop_unused_fns(added)
            if err is not None:   # over a limit: those tasks fail at once, naming it; the client goes on
                self.counts["refused_limit"] += len(new) - fit
                client.results.extend(self._error_result(t[wire.T_ID], err) for t in new[fit:])
                client.cond.notify()
            self.counts["submitted"] += len(tasks)
            self._schedule()
        return len(tasks) - (len(new) - fit)

    def open_client(self, client_id: str, init_blob: Optional[bytes] = None) -> dict:
        """Register a client (and its worker initializer); returns this node's description."""
        _check_str(client_id, "client_id")
        if init_blob is not None and not isinstance(init_blob, bytes):
            raise TypeError("init_blob must be bytes or None")
        with self.lock:
            c = self._client(client_id)
            c.init_blob = init_blob
            if init_blob is not None:
                self.pool.broadcast(("init", client_id, init_blob))
        return self.describe()

    def collect(self, client_id: str, timeout: float) -> tuple:
        """Long poll: wait up to ``timeout`` s for finished results; returns ``(results, started_ids)``."""
        _check_str(client_id, "client_id")
        deadline = time.monotonic() + _check_timeout(timeout)
        with self.lock:
            c = self._client(client_id)
            # "started" notes ride along with results; alone they wait STARTED_DELAY (waking the client
            # for each would cost a lone short task a second round trip)
            while not c.results and not c.started_due and not self.stopping.is_set() and not c.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                c.cond.wait(left)
            c.started_due = False
            res, started = c.results, c.started
            c.results, c.started = [], []
            c.last_seen = time.monotonic()
        return res, started

    def cancel(self, client_id: str, task_ids: list) -> list:
        """Withdraw a client's tasks that are still queued here (not yet given to a worker or another
        node); returns the ids withdrawn.  Tasks already sent run to the end."""
        _check_str(client_id, "client_id")
        if not isinstance(task_ids, (list, tuple)) or not all(isinstance(t, str) for t in task_ids):
            raise TypeError("task_ids must be a list of str")
        out = []
        with self.lock:
            for tid in task_ids:
                rec = self.tasks.get(tid)
                if rec is not None and rec.origin == ("c", client_id) and rec.state is TaskState.QUEUED:
                    self._cancel_rec(tid, rec, {})
                    out.append(tid)
        return out

    def close_client(self, client_id: str) -> None:
        """Forget a client: its queued tasks are dropped, its initializer forgotten."""
        _check_str(client_id, "client_id")
        with self.lock:
            self._drop_client(client_id)

    def describe(self) -> dict:
        """Name, address, versions and worker count of this node."""
        return {"name": self.name, "address": self.address, "uri": self.uri,
                "workers": len(self.worker_up), "versions": security.local_versions(),
                "max_hops": self.cfg.max_hops}

    # ======================================================================================== nodes
    def join(self, info: dict) -> dict:
        """A node links to this one: as our child (``role="child"``) or as a peer.  Returns our map."""
        if not isinstance(info, dict):
            raise TypeError("join info must be a dict")
        name, uri, role = info.get("name"), info.get("uri"), info.get("role", "child")
        _check_str(name, "name")
        _check_str(uri, "uri")
        if role not in ("child", "peer"):
            raise ValueError(f"join role must be 'child' or 'peer', got {role!r}")
        if name == self.name:
            raise ValueError(f"a node named {name!r} cannot join itself (two nodes with one name?)")
        remote_map = _check_map(info.get("map", {}))
        with self.lock:
            old = self.links.get(name)
            if old is not None and old.initiated:
                # we also opened a link to it (mutual parents / peers): keep ours, allow sending
                old.may_send = True
                old.role = "peer"
                old.remote_map = remote_map
                old.last_heard = time.monotonic()
                old.alive = True
                self._schedule()
                return {"name": self.name, "uri": self.uri, "map": self._report_for(name)}
            if old is not None:
                self._lose_link(old, "it joined again")
            link = Link(self, name, uri, may_send=True, initiated=False,
                        role="child" if role == "child" else "peer")
            link.remote_map = remote_map
            link.alive = True
            self.links[name] = link
            log.info("node %s joined as %s (%d workers)", name, link.role, link.workers)
            self._start_link(link)
            self._schedule()
            return {"name": self.name, "uri": self.uri, "map": self._report_for(name)}

    def leave(self, sender: str) -> None:
        """A linked node says it is stopping cleanly: its link goes now, logged as a stop, not a fault."""
        _check_str(sender, "sender")
        with self.lock:
            link = self.links.get(sender)
            if link is None:
                return
            link.left = True
            log.info("%s %s stopped (a clean stop)", link.role, sender)
            self._lose_link(link, "it stopped")
            if not link.initiated:
                link.stop()

    def run_task(self, sender: str, fns: dict, tasks: list, inits: Optional[dict] = None) -> int:
        """Accept a batch of tasks forwarded by a linked node (the design card's ``run_task``)."""
        _check_str(sender, "sender")
        _check_fns(fns)
        _check_tasks(tasks)
        if inits is not None and not (isinstance(inits, dict) and all(
                isinstance(k, str) and isinstance(v, bytes) for k, v in inits.items())):
            raise TypeError("inits must map client ids to bytes")
        rejected = []
        with self.lock:
            link = self.links.get(sender)
            if link is None:
                raise ProtocolError(f"node {sender!r} sent tasks to {self.name} without joining first")
            link.last_heard = time.monotonic()
            for cid, blob in (inits or {}).items():
                c = self._client(cid)
                if c.init_blob is None:
                    c.init_blob = blob
                    self.pool.broadcast(("init", cid, blob))
            new = list({t[wire.T_ID]: t for t in tasks if t[wire.T_ID] not in self.tasks}.values())
            added = self._add_fns(fns, new)
            for t in new:
                tid = t[wire.T_ID]
                if self.name in t[wire.T_PATH]:
                    # (a task past our own max_hops is fine: it runs here and goes no further)
                    rejected.append(self._error_result(tid, ProtocolError(
                        f"task {tid} reached {self.name} twice (path {t[wire.T_PATH]}): two nodes share "
                        f"the name {self.name!r}?")))
                    self._unref_fn(t[wire.T_FN])
                    continue
                self._new_task(t, ("l", sender))
            self._drop_unused_fns(added)
            self.counts["forwarded_in"] += len(tasks)
            if rejected:
                link.post(results=rejected)
            self._schedule()
        return len(tasks) - len(rejected)

    def receive_results(self, sender: str, results: list) -> int:
        """Results coming back from a linked node we had sent tasks to."""
        _check_str(sender, "sender")
        _check_results(results)
        with self.lock:
            link = self.links.get(sender)
            if link is not None:
                link.last_heard = time.monotonic()
            n = self._finish_results(results, ("l", sender))
            self._schedule()
        return n

    def heartbeat(self, sender: str, remote_map: dict) -> dict:
        """A linked node says it is alive and how many workers are behind it; we answer the same."""
        _check_str(sender, "sender")
        remote_map = _check_map(remote_map)
        with self.lock:
            link = self.links.get(sender)
            if link is None:
                return {"unknown": True}
            link.last_heard = time.monotonic()
            changed = link.remote_map != remote_map
            link.remote_map = remote_map
            if changed:
                self._schedule()
            return {"map": self._report_for(sender)}

    def cancel_forwarded(self, sender: str, task_ids: list) -> int:
        """A linked node cancels tasks it had forwarded to us."""
        _check_str(sender, "sender")
        if not isinstance(task_ids, (list, tuple)):
            raise TypeError("task_ids must be a list")
        n = 0
        with self.lock:
            by_link: Dict[str, List[str]] = {}
            for tid in task_ids:
                rec = self.tasks.get(tid)
                if rec is not None and rec.origin == ("l", sender):
                    n += self._cancel_rec(tid, rec, by_link)
            for name, ids in by_link.items():
                if name in self.links:
                    self.links[name].post(cancel=ids)
        return n

    def status(self) -> dict:
        """This node's figures and its links, for ``pydist status``."""
        import psutil

        with self.lock:
            running = sum(len(q) for q in self.worker_inflight)   # on this node's workers
            busy = sum(1 for q in self.worker_inflight if q)
            links = [{"name": l.name, "uri": l.uri, "role": l.role, "alive": l.alive,
                      "inflight": len(l.inflight), "workers": l.workers} for l in self.links.values()]
            parent = next((l.name for l in self.links.values() if l.role == "parent"), None)
            st = {
                "name": self.name, "address": self.address, "uri": self.uri, "parent": parent,
                "workers": len(self.worker_up), "workers_up": sum(self.worker_up), "busy": busy,
                "queued": len(self.queue), "running": running, "held": len(self.tasks),
                "held_bytes": self.quota.bytes, "fns": len(self.fns), "refused_limit": self.counts["refused_limit"],
                "forwarded": sum(len(l.inflight) for l in self.links.values()),
                "done": self.counts["done"], "failed": self.counts["failed"],
                "submitted": self.counts["submitted"], "worker_restarts": self.pool.restarts,
                "clients": len(self.clients), "links": links, "max_hops": self.cfg.max_hops,
                "uptime": time.time() - self.started_at, "pid": os.getpid(),
                "avg_task_s": self.avg.value, "bundles": len(self.store.list()),
                "task_groups": self.groups.summary(),
                "reachable": sorted({self.name}.union(*(l.remote_map for l in self.links.values()
                                                       if l.may_send and l.alive))),
            }
        # what the dashboard and `pydist status --tasks` show: running tasks, recent failures, code, groups
        st["tasks"] = self.pool.running()
        st["failures"] = list(self.pool.failures)
        st["code"] = [{k: b[k] for k in ("digest", "size", "files", "pinned") if k in b} for b in self.store.list()]
        with self.lock:
            st["groups"] = sorted(self.groups.groups)
        st["dashboard"] = self.dashboard_url
        st["cpu_percent"] = psutil.cpu_percent(interval=None)
        st["mem_percent"] = psutil.virtual_memory().percent
        st["rss"] = psutil.Process().memory_info().rss
        return st

    def shutdown(self) -> None:
        """Stop this node (returns at once; the node stops in the background)."""
        if not self.stopping.is_set():
            log.info("stopping node %s", self.name)
        threading.Thread(target=self._shutdown_soon, daemon=True).start()

    def _shutdown_soon(self) -> None:
        time.sleep(0.05)   # let the reply to shutdown() leave first
        self.stop()
        if self.daemon is not None:
            self.daemon.shutdown()

    # ======================================================================================== groups
    def group_open(self, client_id: str, group: str, size: int) -> dict:
        """A client opens a task group of ``size`` ranks with this node as its home; returns the
        group's token and the address of the ranks' control lines (pydist.groups)."""
        _check_str(client_id, "client_id")
        _check_str(group, "group")
        with self.lock:
            self._client(client_id).last_seen = time.monotonic()
            return self.groups.open(client_id, group, size)

    def group_submit(self, client_id: str, group: str, fns: dict, tasks: list) -> int:
        """The rank tasks of an opened group, as one unit: held until the whole group can start."""
        _check_str(client_id, "client_id")
        _check_str(group, "group")
        _check_fns(fns)
        _check_tasks(tasks)
        with self.lock:
            self.groups.submit(client_id, group, tasks)
            self._add_fns(fns, tasks)
            for t in tasks:
                self.tasks[t[wire.T_ID]] = TaskRec(tuple(t[:5]) + (list(t[5]),) + tuple(t[6:8]),
                                                   ("c", client_id))
            self._schedule()
        return len(tasks)

    def group_abort(self, client_id: str, group: str, reason: str) -> None:
        """The client aborts one of its groups."""
        _check_str(client_id, "client_id")
        _check_str(group, "group")
        with self.lock:
            self.groups.abort_by_client(client_id, group, str(reason)[:500])

    def group_state(self, client_id: str, group: str) -> str:
        """``waiting: ...`` (and why), ``running``, ``aborted: ...``, or ``unknown`` (ended)."""
        _check_str(client_id, "client_id")
        _check_str(group, "group")
        with self.lock:
            return self.groups.state(client_id, group)

    def group_reserve(self, sender: str, group: str, want: int, ttl: float) -> int:
        """A linked node reserves up to ``want`` of our workers for ranks of ``group``."""
        _check_str(sender, "sender")
        _check_str(group, "group")
        if not isinstance(want, int) or isinstance(want, bool):
            raise TypeError("want must be an int")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
            raise TypeError("ttl must be a number of seconds")
        with self.lock:
            if sender not in self.links:
                raise ProtocolError(f"node {sender!r} reserves workers on {self.name} without joining first")
        return self.groups.reserve_tree(sender, group, want, ttl)   # (may ask the nodes behind us)

    def group_release(self, sender: str, group: str) -> None:
        """A linked node gives back the workers it had reserved for ``group``."""
        _check_str(sender, "sender")
        _check_str(group, "group")
        self.groups.release_tree(group)

    # ======================================================================================== code
    def code_has(self, digests: list) -> list:
        """Which of these bundle digests this node holds."""
        if not isinstance(digests, (list, tuple)) or not all(isinstance(d, str) for d in digests):
            raise TypeError("digests must be a list of str")
        return [d for d in digests if self.store.has(d)]

    def code_begin(self, digest: str, size: int) -> None:
        """Start receiving a bundle in chunks."""
        _check_str(digest, "digest")
        if not isinstance(size, int) or size < 0:
            raise TypeError("size must be a non-negative int")
        if size > self.cfg.code_cache_max:
            from .errors import BundleTooLarge

            raise BundleTooLarge(f"bundle {digest[:12]} is {size} bytes, over node {self.name}'s cache "
                                 f"limit of {self.cfg.code_cache_max} bytes (--code-cache-max)")
        self.store.begin(digest, size, owner=security.connection_id())

    def code_chunk(self, digest: str, offset: int, data: bytes) -> None:
        """One chunk of a bundle being received."""
        _check_str(digest, "digest")
        if not isinstance(offset, int) or not isinstance(data, bytes):
            raise TypeError("offset must be int and data bytes")
        self.store.write_chunk(digest, offset, data)

    def code_finish(self, digest: str, push: bool = True) -> int:
        """Verify and install a received bundle; with ``push`` send it on to every child.  Returns the
        number of links it is being pushed to."""
        _check_str(digest, "digest")
        self.store.finish(digest)
        return self._code_installed(digest, push)

    def code_read(self, digest: str, offset: int, size: int) -> bytes:
        """Part of a bundle's archive (a child fetching a bundle it lacks)."""
        _check_str(digest, "digest")
        if not isinstance(offset, int) or not isinstance(size, int) or size < 0 or offset < 0:
            raise TypeError("offset and size must be non-negative ints")
        return self.store.read_chunk(digest, offset, min(size, 16 << 20))   # only these bytes are read

    def code_pin(self, digest: str, pinned: bool = True) -> list:
        """Pin (``pinned=True``) or unpin a bundle this node holds: a pinned bundle is on the
        ``sys.path`` of every task run here and is never evicted.  Returns the pinned digests."""
        from .codesync import CodeStore, write_pins
        from .errors import BundleNotFound, CodeSyncError

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
        _check_str(digest, "digest")
        return self.store.size(digest) if self.store.has(digest) else -1

    def _code_installed(self, digest: str, push: bool) -> int:
        with self.lock:
            waiting = self.waiting_code.pop(digest, [])
            self.fetching.discard(digest)
            for tid in waiting:
                rec = self.tasks.get(tid)
                if rec is not None and rec.state is TaskState.QUEUED and not rec.cancelled:
                    self.queue.append(tid)
            targets = [l for l in self.links.values() if l.may_send] if push else []
            for l in targets:
                l.post(code=[digest])
            self._schedule()
        return len(targets)

    # ======================================================================================== internals
    def _client(self, cid: str) -> ClientRec:
        c = self.clients.get(cid)
        if c is None:
            c = self.clients[cid] = ClientRec(cid, self.lock)
        return c

    def _drop_client(self, cid: str) -> None:
        c = self.clients.pop(cid, None)
        if c is None:
            return
        c.closed = True
        c.cond.notify_all()
        by_link: Dict[str, List[str]] = {}
        for tid, rec in list(self.tasks.items()):
            if rec.origin == ("c", cid):
                self._cancel_rec(tid, rec, by_link)
        for name, ids in by_link.items():
            if name in self.links:
                self.links[name].post(cancel=ids)
        self.pool.broadcast(("forget", [cid]))
        self.groups.client_gone(cid)

    def _add_fns(self, fns: dict, tasks: list) -> list:
        """Keep the blobs, count one reference per task; returns the keys that were new here."""
        for t in tasks:
            if t[wire.T_FN] not in fns and t[wire.T_FN] not in self.fns:
                raise ProtocolError(f"task {t[wire.T_ID]} names function {t[wire.T_FN]} that was not sent")
        added = [k for k in fns if k not in self.fns]
        for k in added:
            self.fns[k] = [fns[k], 0]
        for t in tasks:
            self.fns[t[wire.T_FN]][1] += 1
        return added

    def _drop_unused_fns(self, keys: list) -> None:
        """A blob that no task took (names no task uses, re-sent ids) is not kept."""
        for k in keys:
            entry = self.fns.get(k)
            if entry is not None and entry[1] <= 0:
                del self.fns[k]

    def _unref_fn(self, key: str) -> None:
        entry = self.fns.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self.fns[key]

    def _new_task(self, t: tuple, origin: Tuple[str, str]) -> None:
        tid = t[wire.T_ID]
        rec = self.tasks[tid] = TaskRec(tuple(t[:5]) + (list(t[5]),) + tuple(t[6:8]), origin)
        self.quota.add(tid, origin[1] if origin[0] == "c" else None, wire.payload_size(t[wire.T_PAYLOAD]))
        if rec.rec[wire.T_BUNDLE] is not None:
            self.store.pin(rec.rec[wire.T_BUNDLE])   # never evicted while a task needs it
        self._enqueue_new(tid)

    def _forget(self, tid: str, rec: TaskRec) -> None:
        """The task leaves this node: drop its record, its function reference and its bundle pin."""
        self.tasks.pop(tid, None)
        self.quota.remove(tid)
        self._unref_fn(rec.rec[wire.T_FN])
        if rec.rec[wire.T_BUNDLE] is not None:
            self.store.unpin(rec.rec[wire.T_BUNDLE])

    def _enqueue_new(self, tid: str) -> None:
        rec = self.tasks[tid]
        bundle = rec.rec[wire.T_BUNDLE]
        if bundle is not None:
            if not self.store.has(bundle):
                self.waiting_code.setdefault(bundle, []).append(tid)
                self._fetch_code(bundle, rec.origin)
                return
            if bundle != self._last_touched:
                self.store.path(bundle)          # marks it recently used (LRU eviction)
                self._last_touched = bundle
        if rec.rec[wire.T_KIND] == wire.KIND_RANK:
            self.queue.appendleft(tid)   # a rank is claimed for its reserved worker at once
        else:
            self.queue.append(tid)

    def _fetch_code(self, digest: str, origin: Tuple[str, str]) -> None:
        if digest in self.fetching:
            return
        if origin[0] == "l" and origin[1] in self.links:
            self.fetching.add(digest)
            threading.Thread(target=self._fetch_code_from, args=(digest, self.links[origin[1]].uri),
                             daemon=True, name="pydist-fetch").start()
        else:
            self._fail_waiting(digest, BundleNotFound(
                f"code bundle {digest[:12]} is not on node {self.name}: upload it first "
                f"(ClusterExecutor.upload_code)"))

    def _fetch_code_from(self, digest: str, uri: str) -> None:
        try:
            proxy = security.connect(uri, secret=self.cfg.secret, timeout=self.cfg.heartbeat_timeout)
            with proxy:
                size = proxy.code_size(digest)
                if size < 0:
                    raise BundleNotFound(f"code bundle {digest[:12]} is on neither node {self.name} nor "
                                         f"its sender: upload it first (ClusterExecutor.upload_code)")
                self.store.begin(digest, size)
                off = 0
                from .codesync import CHUNK_SIZE

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
            rec = self.tasks.get(tid)
            if rec is not None:
                self._finish_results([self._error_result(tid, exc)], None)

    def _error_result(self, tid: str, exc: BaseException) -> tuple:
        return (tid, wire.ERROR, wire.dumps_exception(exc), self.name, -1, 0.0)

    def _cancel_rec(self, tid: str, rec: TaskRec, by_link: Dict[str, List[str]]) -> int:
        if rec.cancelled or rec.state in (TaskState.DONE, TaskState.CANCELLED):
            return 0
        rec.cancelled = True
        if rec.state is TaskState.QUEUED:
            rec.move(TaskState.CANCELLED)
            self._forget(tid, rec)
            # lazily skipped in the queue
            return 1
        if rec.target is not None and rec.target[0] == "l":
            by_link.setdefault(rec.target[1], []).append(tid)
        return 1

    # ---------------------------------------------------------------------------------- scheduling
    def _slots(self) -> List[scheduler.Slot]:
        win = scheduler.window(self.avg.value)
        slots = []
        for i, q in enumerate(self.worker_inflight):
            if self.worker_up[i] and not self.groups.is_reserved(i):
                slots.append(scheduler.Slot(("w", i), win - len(q), win))
        for l in self.links.values():
            if l.may_send and l.alive:
                cap = scheduler.link_capacity(l.workers, win, self.avg.value)
                if cap > 0:
                    slots.append(scheduler.Slot(("l", l.name), cap - len(l.inflight), cap, l.name))
        return slots

    def _schedule(self) -> None:
        """Place queued tasks on slots with credit.  Caller holds ``lock``."""
        if self.stopping.is_set():
            return
        self.groups.schedule()   # held ranks first, then waiting groups
        if not self.queue:
            return
        slots = self._slots()
        credit = sum(max(0, s.credit) for s in slots)
        if credit <= 0 and not self.groups.reserved:
            return
        examined: List[str] = []
        views = []
        limit = credit + 64
        while self.queue and len(examined) < limit:
            tid = self.queue.popleft()
            rec = self.tasks.get(tid)
            if rec is None or rec.state is not TaskState.QUEUED:
                continue   # cancelled while queued
            if rec.rec[wire.T_KIND] == wire.KIND_RANK:
                self.groups.claim(tid)   # a rank: held for its reserved worker (or failed: never re-run)
                continue
            examined.append(tid)
            views.append((rec.rec[wire.T_HOPS], rec.rec[wire.T_PATH]))
        placement = scheduler.place(views, slots, self.cfg.max_hops)
        placed = set()
        for key, idxs in placement.items():
            ids = [examined[i] for i in idxs]
            placed.update(idxs)
            if key[0] == "w":
                self._send_to_worker(key[1], ids)
            else:
                self._send_to_link(self.links[key[1]], ids)
        leftover = [examined[i] for i in range(len(examined)) if i not in placed]
        self.queue.extendleft(reversed(leftover))

    def _send_to_worker(self, index: int, ids: List[str]) -> None:
        fns: Dict[str, bytes] = {}
        recs = []
        big = False
        gen = self.pool.handles[index].generation
        inflight = self.worker_inflight[index]
        for tid in ids:
            rec = self.tasks[tid]
            rec.move(TaskState.SENT)
            rec.target = ("w", index, gen)
            inflight[tid] = gen
            key = rec.rec[wire.T_FN]
            if key not in fns:
                fns[key] = self.fns[key][0]
            r = rec.rec
            if isinstance(r[wire.T_PAYLOAD], list) or len(r[wire.T_PAYLOAD]) >= wire.OOB_MIN:
                big = True   # large arguments go to the worker out of band, not copied into the frame
                r = r[:wire.T_PAYLOAD] + (wire.frame_payload(r[wire.T_PAYLOAD]),) + r[wire.T_PAYLOAD + 1:]
            recs.append(r)
            self._note_started(rec, tid)
        self.pool.send(index, ("run", fns, recs), big)

    def _send_to_link(self, link: Link, ids: List[str]) -> None:
        fns: Dict[str, bytes] = {}
        inits: Dict[str, bytes] = {}
        recs = []
        for tid in ids:
            rec = self.tasks[tid]
            rec.move(TaskState.SENT)
            rec.target = ("l", link.name)
            link.inflight[tid] = None
            r = rec.rec
            key = r[wire.T_FN]
            if key not in fns:
                fns[key] = self.fns[key][0]
            cid = r[wire.T_CLIENT]
            if cid and cid not in link.known_clients:
                c = self.clients.get(cid)
                if c is not None and c.init_blob is not None:
                    inits[cid] = c.init_blob
                link.known_clients.add(cid)
            hops, path = scheduler.forward_path(r[wire.T_PATH], r[wire.T_HOPS], self.name)
            recs.append((r[0], r[1], r[2], r[3], hops, path, r[6], r[7]))
            self._note_started(rec, tid)
        self.counts["forwarded_out"] += len(recs)
        link.post(tasks=recs, fns=fns, inits=inits)

    def _note_started(self, rec: TaskRec, tid: str) -> None:
        if rec.origin[0] == "c":
            c = self.clients.get(rec.origin[1])
            if c is not None:
                c.started.append(tid)
                if len(c.started) == 1:
                    self._started_timer.add(c)

    # ---------------------------------------------------------------------------------- results
    def _finish_results(self, results: list, source: Optional[tuple]) -> int:
        """Deliver results to their origins.  ``source``: ("w", index) / ("l", name) / None (local
        failure).  Caller holds ``lock``."""
        n = 0
        notify: Dict[str, ClientRec] = {}
        to_links: Dict[str, List[tuple]] = {}
        results = self.groups.on_results(results)
        for r in results:
            tid = r[wire.R_ID]
            rec = self.tasks.get(tid)
            if rec is None:
                continue
            if source is not None:
                t = rec.target
                if t is None or t[0] != source[0] or t[1] != source[1]:
                    continue   # a late result from a target we gave up on: already re-placed
            if source is not None and source[0] == "l":
                self.links[source[1]].inflight.pop(tid, None) if source[1] in self.links else None
            if r[wire.R_RUNTIME] and r[wire.R_STATUS] == wire.OK:
                self.avg.add(r[wire.R_RUNTIME])
            rec.state = TaskState.DONE
            self._forget(tid, rec)
            if source is None or source[0] == "w":
                self.counts["done" if r[wire.R_STATUS] == wire.OK else "failed"] += 1
            n += 1
            if rec.cancelled:
                continue
            kind, who = rec.origin
            if kind == "c":
                c = self.clients.get(who)
                if c is not None:
                    c.results.append(tuple(r))
                    notify[who] = c
            else:
                to_links.setdefault(who, []).append(tuple(r))
        for c in notify.values():
            c.cond.notify()
        for name, rs in to_links.items():
            link = self.links.get(name)
            if link is not None:
                link.post(results=rs)
        return n

    def _on_worker_results(self, index: int, results: list) -> None:
        with self.lock:
            q = self.worker_inflight[index]
            for r in results:
                q.pop(r[wire.R_ID], None)
            self._finish_results(results, ("w", index))
            self._schedule()

    def _on_worker_exit(self, index: int, returncode: Optional[int], culprit: Optional[str]) -> None:
        """A worker died: the task it was running fails with WorkerLost; the others it held (queued
        in it, or finished but not yet reported) are placed again."""
        with self.lock:
            q = self.worker_inflight[index]
            dead_gen = self.pool.handles[index].generation - 1
            dead = [tid for tid, gen in q.items() if gen == dead_gen]
            for tid in dead:
                del q[tid]
            self.worker_up[index] = False
            if culprit in dead:
                err = WorkerLost(f"the worker process running task {culprit} on node {self.name} died "
                                 f"(exit code {returncode}); the node replaced it")
                rec = self.tasks.get(culprit)
                if rec is not None:
                    rec.target = None
                    self._finish_results([(culprit, wire.LOST, wire.dumps_exception(err), self.name,
                                           index, 0.0)], None)
            for tid in reversed(dead):
                rec = self.tasks.get(tid)
                if tid != culprit and rec is not None and rec.state is TaskState.SENT:
                    rec.move(TaskState.LOST)
                    rec.move(TaskState.QUEUED)
                    rec.target = None
                    self.queue.appendleft(tid)
        threading.Thread(target=self._wait_ready, args=(index,), daemon=True).start()

    def _wait_ready(self, index: int) -> None:
        h = self.pool.handles[index]
        while not self.stopping.is_set():
            if h.ready.wait(0.1):
                with self.lock:
                    self.worker_up[index] = True
                    self._schedule()
                return

    # ---------------------------------------------------------------------------------- links
    def _report_for(self, link_name: str) -> Dict[str, list]:
        """Workers reachable through us, as seen by ``link_name`` (split horizon, bounded distance)."""
        out: Dict[str, list] = {self.name: [len(self.worker_up), 0]}
        for l in self.links.values():
            if l.name == link_name or not l.may_send or not l.alive:
                continue
            for n, (w, d) in l.remote_map.items():
                if n == link_name or d + 1 >= self.cfg.max_hops:
                    continue
                if n not in out or out[n][1] > d + 1:
                    out[n] = [w, d + 1]
        return out

    def _open_link(self, target: str, role: str) -> None:
        self._start_link(Link(self, name=f"?{target}", uri="", may_send=(role == "peer"), initiated=True,
                              join_target=target, role=role))

    def _start_link(self, link: Link) -> None:
        threading.Thread(target=self._link_loop, args=(link,), daemon=True,
                         name=f"pydist-link-{link.join_target or link.name}").start()

    def _resolve(self, target: str) -> str:
        if target.startswith("PYRO:") or target.startswith("PYRONAME:"):
            return target
        if ":" in target and not target.startswith(NS_PREFIX):
            return f"PYRO:{NODE_OBJECT_ID}@{target}"
        if not self.cfg.ns:
            raise ValueError(f"cannot resolve node name {target!r} without --ns")
        name = target if target.startswith(NS_PREFIX) else NS_PREFIX + target
        with _ns_proxy(self.cfg.ns) as ns:
            return str(ns.lookup(name))

    def _join(self, link: Link):
        """Connect to the node a link we initiated points to, and join it.  Returns the proxy."""
        uri = self._resolve(link.join_target)  # type: ignore[arg-type]
        proxy = security.connect(uri, secret=self.cfg.secret, timeout=self.cfg.heartbeat_timeout,
                                 call_timeout=self.cfg.heartbeat_timeout)
        name = proxy.pydist_peer_name
        role = "peer" if link.role == "peer" else "child"
        with self.lock:
            if name == self.name:
                raise ValueError(f"--{link.role} {link.join_target} is this node itself")
            old = self.links.get(name)
            if old is not None and old is not link:
                if old.initiated:
                    raise ValueError(f"already linked to {name} (listed twice?)")
                # it had joined us first (mutual links): take its place, keep sending rights
                self._lose_link(old, "replaced by our own link")
                old.stop()
                link.may_send = True
                link.role = "peer"
            # known under its name before we join, so its first heartbeat to us finds the link
            link.name = name
            link.uri = str(proxy._pyroUri)
            link.last_heard = time.monotonic()
            self.links[name] = link
            report = self._report_for(name)
        reply = proxy.join({"name": self.name, "uri": self.uri, "role": role, "map": report})
        with self.lock:
            link.uri = reply["uri"]
            link.remote_map = _check_map(reply.get("map", {}))
            link.alive = True
            link.last_heard = time.monotonic()
            log.info("linked to %s %s at %s", link.role, name, link.uri)
            self._schedule()
        return proxy

    def _link_loop(self, link: Link) -> None:
        delay = 0.05
        first_try = time.monotonic()
        join_log = diagnose.RateLimited(log)   # why joining fails: said once, then at most every 30 s
        while not self.stopping.is_set() and not link.stopping:
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
                if self.stopping.is_set() or link.stopping:
                    break
                if link.left:
                    log.info("link to %s %s closed: it stopped%s", link.role, link.name,
                             "; waiting for it to come back" if link.initiated else "")
                    link.left = False
                    join_log.hold("join", 30.0)   # it said it stops: failing to re-join is no news
                elif link.alive or not link.initiated:
                    log.warning("link to %s %s lost: %s", link.role, link.name, _short(exc))
                elif time.monotonic() - first_try < JOIN_GRACE and not isinstance(
                        exc, (AuthenticationError, VersionMismatch)):
                    log.debug("joining %s failed: %s", link.join_target, _short(exc))   # it may be starting too
                else:
                    join_log.fail("join", diagnose.join_failure(exc, link.role, link.join_target, self.cfg.ns,
                                                                   self.cfg.secret))
                with self.lock:
                    self._lose_link(link, _short(exc))
                if not link.initiated:
                    break
                self.stopping.wait(delay)
                # a parent that is starting too: retry briskly for a few seconds, then back off
                delay = 0.1 if time.monotonic() - first_try < 5 else min(delay * 2, 2.0)
                if isinstance(exc, (AuthenticationError, VersionMismatch)):
                    delay = 2.0   # refused: retrying fast will not change the secret
            finally:
                security.release(proxy)

    def _pump(self, link: Link, proxy) -> None:
        """Send what is queued for ``link``, heartbeat, until the link fails or stops."""
        hb = self.cfg.heartbeat
        next_hb = 0.0
        while True:
            with link.cond:
                while not (link.out_tasks or link.out_results or link.out_cancel or link.out_code
                           or link.stopping) and time.monotonic() < next_hb:
                    link.cond.wait(max(0.0, next_hb - time.monotonic()))
                if link.stopping:
                    return
                if not link.alive:
                    # the janitor declared it lost (missed heartbeats) while we were busy: start over
                    # (re-join if we opened it), so both sides re-place what the other dropped
                    raise NodeLost(f"{link.name} was declared lost")
                tasks, fns, inits = link.out_tasks, link.out_fns, link.out_inits
                results, cancel, code = link.out_results, link.out_cancel, link.out_code
                link.out_tasks, link.out_fns, link.out_inits = [], {}, {}
                link.out_results, link.out_cancel, link.out_code = [], [], []
            if self.stopping.is_set():
                return
            if results:
                proxy.receive_results(self.name, results)
            if tasks:
                try:
                    proxy.run_task(self.name, fns, tasks, inits)
                except Exception:
                    with link.cond:   # not delivered: keep them for the failure handler
                        link.out_tasks[:0] = tasks
                    raise
            if cancel:
                proxy.cancel_forwarded(self.name, cancel)
            for digest in code:
                self._push_code(proxy, link, digest)
            now = time.monotonic()
            if now >= next_hb:
                with self.lock:
                    report = self._report_for(link.name)
                reply = proxy.heartbeat(self.name, report)
                if reply.get("unknown"):
                    raise NodeLost(f"{link.name} no longer knows us (it restarted)")
                with self.lock:
                    new_map = _check_map(reply.get("map", {}))
                    link.last_heard = time.monotonic()
                    if new_map != link.remote_map:
                        link.remote_map = new_map
                        self._schedule()
                next_hb = now + hb

    def _push_code(self, proxy, link: Link, digest: str) -> None:
        from .codesync import CHUNK_SIZE

        has = getattr(link, "has_code", None)
        if has is None:
            has = link.has_code = set()   # type: ignore[attr-defined]
        if digest in has:
            return
        if proxy.code_has([digest]):
            has.add(digest)
            return
        data = self.store.read(digest)
        old_timeout = proxy._pyroTimeout
        proxy._pyroTimeout = max(old_timeout or 0, 60.0)
        try:
            proxy.code_begin(digest, len(data))
            for off in range(0, len(data), CHUNK_SIZE):
                proxy.code_chunk(digest, off, data[off:off + CHUNK_SIZE])
            proxy.code_finish(digest, True)
        finally:
            proxy._pyroTimeout = old_timeout
        has.add(digest)

    def _lose_link(self, link: Link, why: str) -> None:
        """A link failed: re-place tasks we had sent it, drop tasks it had sent us.  Holds ``lock``."""
        was_alive = link.alive
        link.alive = False
        if self.links.get(link.name) is link:
            if not link.initiated:
                del self.links[link.name]
        with link.cond:   # what was not sent yet: tasks are re-placed below (they are in inflight)
            link.out_tasks, link.out_fns, link.out_inits, link.out_results = [], {}, {}, []
        ids = list(link.inflight)
        link.inflight.clear()
        link.known_clients.clear()
        if hasattr(link, "has_code"):
            link.has_code = set()   # type: ignore[attr-defined]
        n = 0
        for tid in reversed(ids):
            rec = self.tasks.get(tid)
            if rec is None or rec.target != ("l", link.name):
                continue
            rec.target = None
            if rec.cancelled:
                rec.move(TaskState.CANCELLED)
                self._forget(tid, rec)
                continue
            rec.move(TaskState.LOST)
            rec.move(TaskState.QUEUED)
            self.queue.appendleft(tid)
            n += 1
        # tasks that link had sent us: their results have nowhere to go; its sender re-places them
        dropped = 0
        for tid, rec in list(self.tasks.items()):
            if rec.origin == ("l", link.name):
                dropped += self._cancel_rec(tid, rec, {})
        if was_alive and (n or dropped):
            log.log(logging.INFO if link.left else logging.WARNING,
                    "link %s lost (%s): %d tasks placed again, %d of its tasks dropped", link.name, why, n, dropped)
        self._schedule()

    def _janitor(self) -> None:
        """Drop silent links (missed heartbeats) and clients (expired lease)."""
        period = min(1.0, self.cfg.heartbeat)
        next_stale_check = time.monotonic() + 60
        while not self.stopping.wait(period):
            now = time.monotonic()
            if now > next_stale_check:
                next_stale_check = now + 60
                try:
                    for d in self.store.abort_stale(older_than=300.0):
                        log.info("dropped a code upload that stalled: %s", d[:12])
                except Exception as exc:   # never let housekeeping kill the janitor
                    log.warning("code cache housekeeping failed: %s", exc)
            with self.lock:
                for link in list(self.links.values()):
                    if link.alive and now - link.last_heard > self.cfg.heartbeat_timeout:
                        log.warning("no heartbeat from %s for %.1f s: declaring it lost",
                                    link.name, now - link.last_heard)
                        self._lose_link(link, "missed heartbeats")
                        if not link.initiated:
                            link.stop()
                for cid, c in list(self.clients.items()):
                    if now - c.last_seen > self.cfg.client_lease and not c.cond._waiters:  # type: ignore
                        log.info("client %s silent for %.0f s: dropping its tasks", cid, now - c.last_seen)
                        self._drop_client(cid)


# ============================================================================================ helpers
def _short(exc: BaseException) -> str:
    s = f"{type(exc).__name__}: {exc}"
    return s if len(s) < 300 else s[:297] + "..."


def _ns_proxy(ns: str):
    host, _, port = ns.rpartition(":")
    return Pyro5.api.locate_ns(host or ns, int(port) if port else None)


def _check_str(v: Any, what: str) -> None:
    if not isinstance(v, str) or not v or len(v) > 4096:
        raise TypeError(f"{what} must be a non-empty str, got {type(v).__name__}")


def _check_timeout(t: Any) -> float:
    """A wait in seconds: a finite number, clamped to [0, COLLECT_MAX_WAIT]."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise TypeError(f"timeout must be a finite number of seconds, got {t!r:.40}")
    return min(max(float(t), 0.0), COLLECT_MAX_WAIT)


def _check_fns(fns: Any) -> None:
    if not isinstance(fns, dict) or not all(isinstance(k, str) and isinstance(v, bytes) for k, v in fns.items()):
        raise TypeError("fns must map str keys to bytes")


_DIGEST = re.compile(r"[0-9a-f]{64}")
_TASK_TYPES = (str, str, (bytes, list), (str, type(None)), int, (list, tuple), int, str)


def _check_tasks(tasks: Any) -> None:
    if not isinstance(tasks, (list, tuple)):
        raise TypeError("tasks must be a list of task records")
    for t in tasks:
        if not isinstance(t, (list, tuple)) or len(t) != 8:
            raise TypeError("a task record must be a tuple of 8 fields (see pydist.wire)")
        for v, typ in zip(t, _TASK_TYPES):
            if not isinstance(v, typ) or isinstance(v, bool) and typ is int:
                raise TypeError(f"malformed task record field {v!r:.40}: expected {typ}")
        if not all(isinstance(p, str) for p in t[5]):
            raise TypeError("a task's path must be a list of node names")
        if isinstance(t[2], list) and (not t[2] or not all(isinstance(b, bytes) for b in t[2])):
            raise TypeError("a task's payload must be bytes or a non-empty list of bytes")
        if t[3] is not None and not _DIGEST.fullmatch(t[3]):
            raise TypeError("a task's bundle must be None or a sha256 hex digest")


def _check_results(results: Any) -> None:
    if not isinstance(results, (list, tuple)):
        raise TypeError("results must be a list")
    for r in results:
        if not isinstance(r, (list, tuple)) or len(r) != 6 or not isinstance(r[0], str) \
                or not isinstance(r[1], int) or not isinstance(r[2], bytes):
            raise TypeError("a result record must be (id, status, blob, node, worker, runtime)")


def _check_map(m: Any) -> Dict[str, list]:
    if not isinstance(m, dict):
        raise TypeError("a capacity map must be a dict")
    out = {}
    for k, v in m.items():
        if not isinstance(k, str) or not isinstance(v, (list, tuple)) or len(v) != 2 \
                or not all(isinstance(x, int) for x in v):
            raise TypeError("a capacity map maps node names to [workers, distance]")
        out[k] = [int(v[0]), int(v[1])]
    return out


def serve(config: NodeConfig, on_ready=None) -> None:
    """Run a node until it is shut down (``pydist-node`` calls this).  ``on_ready(node)`` is called
    once it accepts work."""
    tls = None
    if config.tls_cert or config.tls_ca:
        tls = security.TLSSettings(cert=config.tls_cert, key=config.tls_key, ca=config.tls_ca)
    security.configure_pyro(max_message_size=config.max_message_size, threadpool=config.threadpool,
                            tls=tls, server=True)
    node = Node(config)
    daemon = security.SecureDaemon(config.host, config.port, secret=config.secret, name=config.name,
                                   **security.daemon_options(config),
                                   nathost=diagnose.advertise_host(config.host, config.advertise))
    try:
        daemon.on_disconnect(node.store.abort_owner)   # uploads a connection left unfinished
        node.start(daemon)
        if on_ready is not None:
            on_ready(node)
        daemon.requestLoop(lambda: not node.stopping.is_set())
    finally:
        node.stop()
        daemon.close()
