"""The pydist node: the one Pyro5-exposed object of a machine.

::

    clients ──submit(batch)──▶ ┌─────────────────────────── Node ────────────────────────────┐
            ◀─collect (poll)── │ sessions.py: inbox per client   ledger.py: every task, one     │
                               │                                 record: state, origin, location│
    parent ──run_task(batch)─▶ │        │ schedule(): scheduler.place over slots (credit =       │
           ◀─receive_results─  │        │   capacity - ledger.count_at(slot location))           │
                               │        ├──▶ WorkerPool.send(i, batch) ──▶ worker procs ─────────┼─┐
                               │        └──▶ Link(child).post ──▶ links.py pump ─────────────────┼─┼─▶ child.run_task
                               │  ledger.finish(result, source) ◀── reader threads ◀─────────────┘ │
                               │  ledger.finish(result, source) ◀── child.receive_results ◀────────┘
                               └────────────────────────────────────────────────────────────────┘

What arrives: task batches from clients (``submit``) and from other nodes (``run_task``, with the
link's epoch); result batches from linked nodes (``receive_results``) and from the node's own workers
(reader threads).  Each task gets one record in the ``Ledger`` (``ledger.py``, pure): a re-sent id is
recognised there (revived, adopted, reused or refused as a collision), never skipped.  Where it waits:
the ledger's queue, under ``lock``.  Where it goes: ``schedule`` asks the pure ``scheduler.place`` for
placements over *slots* (local workers, links with credit) and records each placement as the task's
location (``("w", i, generation)`` or ``("l", name, epoch)``); credit is derived from those locations,
so it cannot leak.  What comes back: a result is accepted only from its task's current location
(``Ledger.finish``) and goes to the task's origin: a client's inbox (``sessions.py``, drained by its
``collect`` long poll) or the link it came from; so do "started" notes (``running()``).

Links (``links.py``) carry tasks, results, cancels, code and heartbeats; heartbeats carry a count and
digest of the ids each side believes are at the child, and a mismatch is reconciled id by id
(``reconcile``).  Task groups (``groups.py``: gang reservation, the ranks' control lines, abort) and the
code-store endpoints (``codeserve.py``) sit beside.  No exposed method holds a server thread for the
length of a task: ``submit``/``run_task`` queue and return; ``collect`` waits at most ``timeout`` (a few
seconds).  This module validates at the boundary (``checks.py``) and dispatches; it keeps no task state
of its own.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from typing import Any, Dict, List, Optional

import Pyro5.api

from . import diagnose, security, wire
from .checks import (check_fns, check_ids, check_int, check_map, check_recon, check_results, check_str,
                     check_tasks, check_timeout)
from .codeserve import CodeEndpoints
from .config import NodeConfig
from .cancelling import WITHDRAW_WAIT, Cancelling
from .dispatch import Dispatch
from .errors import NodeLost, ProtocolError
from .ledger import State, id_hash
from .links import Link, LinkManager
from .groups import GroupTable
from .sessions import LINGER_MAX, Sessions
from .workers import WorkerPool

log = logging.getLogger(__name__)

NODE_OBJECT_ID = security.NODE_OBJECT_ID
NS_PREFIX = "pydist.node."

__all__ = ["Node", "serve", "check_map", "NS_PREFIX", "NODE_OBJECT_ID"]


@Pyro5.api.expose
@Pyro5.api.behavior(instance_mode="single")
class Node(Dispatch, Cancelling, CodeEndpoints):
    """A pydist node (see the module docstring).  Methods exposed to Pyro5 take and return batches."""

    def __init__(self, config: NodeConfig):
        self.cfg = config
        self.name: str = config.name  # type: ignore[assignment]
        self.uri = ""
        self.address = ""
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.started_at = time.time()
        self.counts: "collections.Counter[str]" = collections.Counter()
        self.sessions = Sessions(self.lock, self.stopping, config.client_lease)
        self.links = LinkManager(self)
        self.waiting_code: Dict[str, List[str]] = {}   # bundle digest -> task ids waiting for it
        self.fetching: set = set()
        from .codesync import CodeStore

        self.store = CodeStore.for_node(config)
        self.pinned: List[str] = []          # bundles on every task's sys.path (pydist sync-code --pin)
        from .codesync import write_pins

        write_pins(config.code_cache, self.name, ())
        env = dict(os.environ)
        env.pop("PYDIST_SECRET", None)   # tasks never hold the cluster secret (ranks use a group token)
        self.pool = WorkerPool(config.workers or 0, self.name, config.code_cache,
                               self._on_worker_results, self._on_worker_exit, env=env,
                               on_dropped=self._on_worker_dropped)
        self.init_dispatch()
        self.init_cancelling()
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
            threading.Thread(target=self._register_ns, args=(self.cfg.ns,), daemon=True, name="pydist-ns").start()
        if self.cfg.parent:
            self.links.open(self.cfg.parent, role="parent")
        for peer in self.cfg.peers:
            self.links.open(peer, role="peer")

    def stop(self) -> None:
        """Stop links, workers and the name-server entry (the daemon is stopped by the caller)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        with self.lock:
            self.sessions.wake_all()
            links = list(self.links.values())
        # tell linked nodes we are stopping, so they log a stop, not a fault (1 s at most)
        byes = [threading.Thread(target=self._say_goodbye, args=(l.uri,), daemon=True)
                for l in links if l.alive and l.uri]
        for t in byes:
            t.start()
        deadline = time.monotonic() + 1.0
        for t in byes:
            t.join(max(0.0, deadline - time.monotonic()))
        self.links.stop_all()
        self.pool.stop()
        if self.cfg.ns:
            try:
                with diagnose.ns_proxy(self.cfg.ns) as ns:
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

    def _register_ns(self, ns_address: str) -> None:
        delay = 0.05
        meta = {"pydist", "pydist.root" if not self.cfg.parent else "pydist.child"}
        while not self.stopping.is_set():
            try:
                with diagnose.ns_proxy(ns_address) as ns:
                    ns.register(NS_PREFIX + self.name, self.uri, metadata=meta)
                log.info("registered as %s in name server %s", NS_PREFIX + self.name, self.cfg.ns)
                return
            except Exception as exc:
                log.debug("name server %s not reachable yet: %s", self.cfg.ns, exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, 2.0)

    def resolve(self, target: str) -> str:
        """A node's URI from a name, ``host:port`` or URI (names through the name server)."""
        if target.startswith("PYRO:") or target.startswith("PYRONAME:"):
            return target
        if ":" in target and not target.startswith(NS_PREFIX):
            return f"PYRO:{NODE_OBJECT_ID}@{target}"
        if not self.cfg.ns:
            raise ValueError(f"cannot resolve node name {target!r} without --ns")
        name = target if target.startswith(NS_PREFIX) else NS_PREFIX + target
        with diagnose.ns_proxy(self.cfg.ns) as ns:
            return str(ns.lookup(name))

    # ======================================================================================== clients
    def submit(self, client_id: str, fns: dict, tasks: list) -> int:
        """Accept a batch of tasks from a client; returns how many were accepted.  A task whose id
        collides with another task held here fails at once (its error comes back through ``collect``)."""
        check_str(client_id, "client_id")
        check_fns(fns)
        check_tasks(tasks, allow_retries=True)
        return self.accept_client_batch(client_id, fns, tasks)

    def submit_wait(self, client_id: str, fns: dict, tasks: list, linger: float) -> tuple:
        """``submit``, then, for a lone task known to be short (the node's average task time is under
        ``linger``), wait up to ``linger`` s (at most ``sessions.LINGER_MAX``) for its result: it rides
        back in this reply instead of waking the client's long poll.  Returns ``(accepted, results)``;
        a result not back in time comes through ``collect`` as usual."""
        linger = min(check_timeout(linger), LINGER_MAX)
        avg = self.avg.value
        if not isinstance(tasks, list) or len(tasks) != 1 or linger <= 0 or avg is None or avg > linger:
            return self.submit(client_id, fns, tasks), []
        check_str(client_id, "client_id")
        check_fns(fns)
        check_tasks(tasks, allow_retries=True)
        tid = tasks[0][wire.T_ID]
        with self.lock:
            c = self.sessions.touch(client_id)
            slot = c.reserve(tid)   # before it is placed: see Session.reserve
            if slot is None:
                return self.accept_client_batch(client_id, fns, tasks), []
            try:
                n = self.accept_client_batch(client_id, fns, tasks)
            except BaseException:
                c.deliver(c.linger(tid, slot, None, self.stopping))   # what came meanwhile: to the inbox
                raise
            t = self.ledger.tasks.get(tid)
            live = t is not None and t.origin == ("c", client_id) and t.state is State.PLACED \
                and self.sessions.clients.get(client_id) is c
            return n, c.linger(tid, slot, time.monotonic() + linger if live else None, self.stopping)

    def open_client(self, client_id: str, init_blob: Optional[bytes] = None) -> dict:
        """Register a client (and its worker initializer); returns this node's description."""
        check_str(client_id, "client_id")
        if init_blob is not None and not isinstance(init_blob, bytes):
            raise TypeError("init_blob must be bytes or None")
        with self.lock:
            c = self.sessions.touch(client_id)
            c.init_blob = init_blob
            if init_blob is not None:
                self.pool.broadcast(("init", client_id, init_blob))
        return self.describe()

    def collect(self, client_id: str, timeout: float, recon: Optional[dict] = None) -> tuple:
        """Long poll: wait up to ``timeout`` s for finished results; returns ``(results, started_ids)``.
        With ``recon`` (``{"n": count, "d": digest}`` of the ids the client waits for and has sent) the
        answer has a third item: this node's count and digest of the same, ``{"n", "d"}``."""
        check_str(client_id, "client_id")
        deadline = time.monotonic() + check_timeout(timeout)
        if recon is not None and not (isinstance(recon, dict) and set(recon) == {"n", "d"} and all(
                isinstance(recon[k], int) and not isinstance(recon[k], bool) for k in "nd")):
            raise TypeError('recon must be {"n": count, "d": digest} of ints')
        with self.lock:
            if self.sessions.is_closed(client_id):
                return ([], []) if recon is None else ([], [], {"n": 0, "d": 0})
            c = self.sessions.touch(client_id)
            mine = self.client_digest(client_id) if recon is not None else None   # as the call arrived
            # "started" notes ride along with results; alone they wait STARTED_DELAY (waking the client
            # for each would cost a lone short task a second round trip)
            res, started = c.wait(deadline, self.stopping)
            if mine is None:
                return res, started
            return res, started, {"n": mine[0], "d": mine[1]}

    def client_tasks(self, client_id: str, task_ids: list) -> list:
        """Reconciliation with a client: ``task_ids`` are the ids it waits for; returns those of them
        this node holds.  Tasks held here for the client that it no longer waits for are dropped."""
        check_str(client_id, "client_id")
        check_ids(task_ids)
        with self.lock:
            return self.reconcile_client(client_id, task_ids)

    def cancel(self, client_id: str, task_ids: list) -> list:
        """Withdraw a client's tasks that have not started anywhere: queued here, or sent ahead to a
        worker or another node and still waiting there (asked, with a short bounded wait:
        ``pydist.cancelling``); returns the ids withdrawn (they never run).  The others run to the end."""
        check_str(client_id, "client_id")
        check_ids(task_ids)
        with self.lock:
            ts = [t for t in (self.ledger.tasks.get(tid) for tid in task_ids)
                  if t is not None and t.origin == ("c", client_id)]
        return sorted(self.withdraw(ts))

    def close_client(self, client_id: str) -> None:
        """Forget a client: its queued tasks are dropped, its initializer forgotten."""
        check_str(client_id, "client_id")
        with self.lock:
            self.drop_client(client_id)
            self.sessions.close(client_id)

    def describe(self) -> dict:
        """Name, address, versions and worker count of this node."""
        return {"name": self.name, "address": self.address, "uri": self.uri,
                "workers": self.worker_count, "versions": security.local_versions(),
                "max_hops": self.cfg.max_hops,
                "host": wire.host_identity(),   # a client on this machine may pass large arguments in memfds
                # a client keeps what is over these and sends it as results come back (pydist.clientcore)
                "limits": {"client_tasks": self.cfg.max_client_tasks, "client_bytes": self.cfg.max_client_bytes}}

    # ======================================================================================== nodes
    def join(self, info: dict) -> dict:
        """A node links to this one: as our child (``role="child"``) or as a peer.  Returns our map and
        the link's epoch."""
        if not isinstance(info, dict):
            raise TypeError("join info must be a dict")
        name, uri, role = info.get("name"), info.get("uri"), info.get("role", "child")
        check_str(name, "name")
        check_str(uri, "uri")
        if role not in ("child", "peer"):
            raise ValueError(f"join role must be 'child' or 'peer', got {role!r}")
        if name == self.name:
            raise ValueError(f"a node named {name!r} cannot join itself (two nodes with one name?)")
        remote_map = check_map(info.get("map", {}))
        with self.lock:
            link = self.links.accept(str(name), str(uri), role, remote_map)
            self.schedule()
            return {"name": self.name, "uri": self.uri, "map": self.links.report_for(str(name)), "epoch": link.epoch}

    def leave(self, sender: str) -> None:
        """A linked node says it is stopping cleanly: its link goes now, logged as a stop, not a fault."""
        check_str(sender, "sender")
        with self.lock:
            link = self.links.get(sender)
            if link is None:
                return
            link.left = True
            log.info("%s %s stopped (a clean stop)", link.role, sender)
            self.link_lost(link, "it stopped")
            if not link.initiated:
                link.stop()

    def _link_of(self, sender: str, epoch) -> Link:
        """The live link ``sender`` talks to us over, at ``epoch`` (None: any); else NodeLost."""
        link = self.links.links.get(sender)
        if link is None:
            raise ProtocolError(f"node {sender!r} sent a message to {self.name} without joining first")
        if epoch is not None:
            check_int(epoch, "epoch")
            if epoch != link.epoch or not link.alive:
                now = f"at {link.epoch:x}" if epoch != link.epoch else "declared lost (silent too long)"
                raise NodeLost(f"node {sender!r} used epoch {epoch:x} of its link to {self.name}, which is {now}: "
                               "re-join")
        link.last_heard = time.monotonic()
        return link

    def run_task(self, sender: str, fns: dict, tasks: list, inits: Optional[dict] = None,
                 epoch: Optional[int] = None) -> int:
        """Accept a batch of tasks forwarded by a linked node over epoch ``epoch`` of its link."""
        check_str(sender, "sender")
        check_fns(fns)
        check_tasks(tasks)
        if inits is not None and not (isinstance(inits, dict) and all(
                isinstance(k, str) and isinstance(v, bytes) for k, v in inits.items())):
            raise TypeError("inits must map client ids to bytes")
        with self.lock:
            link = self._link_of(sender, epoch)
            self.check_fns_known(fns, tasks)
            for cid, blob in (inits or {}).items():
                c = self.sessions.get(cid)
                if c.init_blob is None:
                    c.init_blob = blob
                    self.pool.broadcast(("init", cid, blob))
            n = self.accept_tasks(fns, tasks, ("l", sender, link.epoch), link)
            self.counts["forwarded_in"] += len(tasks)
            self.schedule()
        return n

    def receive_results(self, sender: str, results: list, epoch: Optional[int] = None,
                        started: Optional[list] = None) -> int:
        """Results from a linked node we sent tasks to (over ``epoch``); ``started``: ids of them begun there."""
        check_str(sender, "sender")
        check_results(results)
        if started is not None:
            check_ids(started, "started")
        with self.lock:
            link = self.links.links.get(sender)
            if link is not None:
                link.last_heard = time.monotonic()
            if epoch is None:
                epoch = link.epoch if link is not None else -1
            check_int(epoch, "epoch")
            n = self.finish_results(results, ("l", sender, epoch))
            if started:
                self.started_at_link(("l", sender, epoch), started)
            self.schedule()
        return n

    def heartbeat(self, sender: str, remote_map: dict, recon: Optional[dict] = None) -> dict:
        """A linked node says it is alive and how many workers are behind it; we answer the same.
        ``recon``: count and digest of the task ids it believes it gave us; we answer ours."""
        check_str(sender, "sender")
        remote_map = check_map(remote_map)
        check_recon(recon)
        with self.lock:
            link = self.links.links.get(sender)
            joining = link is not None and link.initiated and not link.epoch   # our join's reply is on its way
            if link is None or recon is not None and recon["e"] != link.epoch and not joining:
                return {"unknown": True}
            recon = None if joining else recon   # (the epoch is checked, and reconciled, from the next one)
            link.last_heard = time.monotonic()
            changed = link.remote_map != remote_map
            link.remote_map = remote_map
            if changed:
                self.schedule()
            reply: Dict[str, Any] = {"map": self.links.report_for(sender)}
            if recon is not None:
                n, d = self.ledger.digest_from(("l", sender, link.epoch))
                for tid in link.pending_result_ids():
                    n, d = n + 1, d ^ id_hash(tid)
                reply["n"], reply["d"] = n, d
            return reply

    def reconcile(self, sender: str, epoch: int, task_ids: list) -> list:
        """Reconciliation: ``task_ids`` are the ids ``sender`` believes it gave us over ``epoch``;
        returns the ids we hold from it (results not yet delivered included).  What we hold and it
        does not know is dropped once seen twice in a row."""
        check_str(sender, "sender")
        check_ids(task_ids)
        with self.lock:
            link = self._link_of(sender, epoch)
            return self.reconcile_received(link, set(task_ids))

    def withdraw_forwarded(self, sender: str, epoch: int, task_ids: list, wait: float) -> list:
        """A linked node withdraws tasks it had forwarded to us over ``epoch`` that have not started
        (here, at our workers or further down, waiting at most ``wait`` s); returns the ids withdrawn."""
        check_str(sender, "sender")
        check_ids(task_ids)
        wait = min(check_timeout(wait), WITHDRAW_WAIT)
        with self.lock:
            link = self._link_of(sender, epoch)
            origin = ("l", sender, link.epoch)
            ts = [t for t in (self.ledger.tasks.get(tid) for tid in task_ids)
                  if t is not None and tuple(t.origin) == origin]
        return sorted(self.withdraw(ts, wait))

    def cancel_forwarded(self, sender: str, task_ids: list) -> int:
        """A linked node cancels tasks it had forwarded to us."""
        check_str(sender, "sender")
        check_ids(task_ids)
        with self.lock:
            ts = [t for t in (self.ledger.tasks.get(tid) for tid in task_ids)
                  if t is not None and t.origin[0] == "l" and t.origin[1] == sender]
            return self.cancel_tasks(ts)

    def status(self) -> dict:
        """This node's figures and its links, for ``pydist status``."""
        import psutil

        with self.lock:
            lg = self.ledger
            at_workers = [sum(lg.count_at(k) for k in lg.locations() if k[0] == "w" and k[1] == i)
                          for i in range(self.worker_count)]
            links: List[Dict[str, Any]] = [{"name": l.name, "uri": l.uri, "role": l.role, "alive": l.alive,
                      "inflight": sum(lg.count_at(k) for k in lg.links_of(l.name)), "workers": l.workers,
                      "epoch": l.epoch} for l in self.links.links.values()]
            parent = next((l.name for l in self.links.links.values() if l.role == "parent"), None)
            st = {
                "name": self.name, "address": self.address, "uri": self.uri, "parent": parent,
                "workers": self.worker_count, "workers_up": sum(self.worker_up),
                "busy": sum(1 for n in at_workers if n), "running": sum(at_workers),
                "queued": sum(1 for t in lg.tasks.values() if t.state is State.QUEUED),
                "forwarded": sum(l["inflight"] for l in links),
                "held": len(lg), "stale_results": lg.stale, "ledger": dict(lg.counts),
                "held_bytes": self.quota.bytes, "fns": len(self.fns), "refused_limit": self.counts["refused_limit"],
                "done": self.counts["done"], "failed": self.counts["failed"],
                "submitted": self.counts["submitted"], "worker_restarts": self.pool.restarts,
                "clients": len(self.sessions), "links": links, "max_hops": self.cfg.max_hops,
                "uptime": time.time() - self.started_at, "pid": os.getpid(),
                "avg_task_s": self.avg.value, "bundles": len(self.store.list()),
                "task_groups": self.groups.summary(),
                "reachable": sorted({self.name}.union(*(l.remote_map for l in self.links.links.values()
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
        check_str(client_id, "client_id")
        check_str(group, "group")
        with self.lock:
            self.sessions.touch(client_id)
            return self.groups.open(client_id, group, size)

    def group_submit(self, client_id: str, group: str, fns: dict, tasks: list) -> int:
        """The rank tasks of an opened group, as one unit: held until the whole group can start."""
        check_str(client_id, "client_id")
        check_str(group, "group")
        check_fns(fns)
        check_tasks(tasks)
        with self.lock:
            self.check_fns_known(fns, tasks)
            self.groups.submit(client_id, group, tasks)
            self.hold_tasks(fns, tasks, ("c", client_id))
            self.schedule()
        return len(tasks)

    def group_abort(self, client_id: str, group: str, reason: str) -> None:
        """The client aborts one of its groups."""
        check_str(client_id, "client_id")
        check_str(group, "group")
        with self.lock:
            self.groups.abort_by_client(client_id, group, str(reason)[:500])

    def group_state(self, client_id: str, group: str) -> str:
        """``waiting: ...`` (and why), ``running``, ``aborted: ...``, or ``unknown`` (ended)."""
        check_str(client_id, "client_id")
        check_str(group, "group")
        with self.lock:
            return self.groups.state(client_id, group)

    def group_reserve(self, sender: str, group: str, want: int, ttl: float) -> int:
        """A linked node reserves up to ``want`` of our workers for ranks of ``group``."""
        check_str(sender, "sender")
        check_str(group, "group")
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
        check_str(sender, "sender")
        check_str(group, "group")
        self.groups.release_tree(group)

    # ======================================================================================== threads
    def _watch_workers_ready(self) -> None:
        pending = set(range(len(self.pool.handles)))
        while pending and not self.stopping.is_set():
            for i in list(pending):
                if self.pool.handles[i].ready.wait(0.01):
                    pending.discard(i)
                    with self.lock:
                        self.worker_up[i] = True
                        self.schedule()

    def _janitor(self) -> None:
        """Drop silent links (missed heartbeats) and clients (expired lease); watch worker memory."""
        period = min(1.0, self.cfg.heartbeat)
        if self.cfg.memory_limit:
            period = min(period, 0.25)
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
            if self.cfg.memory_limit:
                self.check_memory()
            with self.lock:
                self.links.check_silent(now)
                for cid in self.sessions.expired(now):
                    log.info("client %s silent for %.0f s: dropping its tasks", cid,
                             now - self.sessions.clients[cid].last_seen)
                    self.drop_client(cid)


# ============================================================================================ helpers
def serve(config: NodeConfig, on_ready=None) -> None:
    """Run a node until it is shut down (``pydist-node`` calls this).  ``on_ready(node)`` is called
    once it accepts work."""
    tls = None
    if config.tls_cert or config.tls_ca:
        tls = security.TLSSettings(cert=config.tls_cert, key=config.tls_key, ca=config.tls_ca)
    security.configure_pyro(max_message_size=config.max_message_size, threadpool=config.threadpool,
                            tls=tls, server=True)
    node = Node(config)
    daemon = security.SecureDaemon(config.host, config.port, secret=config.secret, name=node.name,
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

