"""What a node does with tasks and results, over its ledger (mixed into ``Node``; caller holds ``lock``).

Accepting tasks (``accept_tasks``: the ledger's verdict on each id), placing them (``schedule``: the
pure scheduler over slots whose credit is derived from the ledger), results (``finish_results``:
accepted only from the task's location, then sent to its origin), retries after a worker death,
cancellation (``pydist.cancelling``: a cancel reaches the task wherever it waits), the loss of a worker or a
link, and reconciliation with a linked node or a client (ids only one side knows are acted on when seen
twice in a row, so a message still in flight is never mistaken for a lost task).
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from . import scheduler, wire
from .errors import MemoryLimitExceeded, ProtocolError, WorkerLost
from .quota import Quota
from .nodeparts import NodeParts

if TYPE_CHECKING:   # pragma: no cover
    from .links import Link
from .ledger import Ledger, State, Task, describe_ids, id_hash, valid_runtime

KIND_RANK = wire.KIND_RANK

log = logging.getLogger("pydist.node")


class Dispatch(NodeParts):
    """Task flow of a node (see the module docstring)."""

    def init_dispatch(self) -> None:
        self.ledger = Ledger()
        self.ledger.on_leave = self._on_leave
        self.fns: Dict[str, list] = {}            # key -> [blob, refcount]
        cfg = self.cfg
        self.quota = Quota(cfg.max_client_tasks, cfg.max_client_bytes, cfg.max_queued_tasks, cfg.max_queued_bytes,
                           f"node {self.name}")
        self.avg = scheduler.RuntimeAverage()
        self.worker_count = len(self.pool.handles)
        self.worker_up = [False] * self.worker_count
        self.mem_killed: Dict[Tuple[int, int], int] = {}   # (worker, generation) -> rss when killed
        self._last_touched: Optional[str] = None

    # ------------------------------------------------------------------------------------ arrival
    def check_fns_known(self, fns: dict, tasks: list) -> None:
        for t in tasks:
            if t[wire.T_FN] not in fns and t[wire.T_FN] not in self.fns:
                raise ProtocolError(f"task {t[wire.T_ID]} names function {t[wire.T_FN]} that was not sent")

    def accept_tasks(self, fns: dict, tasks: list, origin: tuple, link=None) -> int:
        """Enter a batch into the ledger; returns how many were taken (new, re-sent or answered)."""
        if link is not None:
            link.tasks_came()
        added = [k for k in fns if k not in self.fns]
        for k in added:
            self.fns[k] = [fns[k], 0]
        owner = origin[1] if origin[0] == "c" else None
        lg = self.ledger
        back: List[tuple] = []       # results answered at once (reused, refused)
        resend: Dict[str, List[Task]] = {}
        fresh: List[Task] = []
        n = 0
        for t in tasks:
            tid = t[wire.T_ID]
            if origin[0] == "l" and self.name in t[wire.T_PATH]:
                # (a task past our own max_hops is fine: it runs here and goes no further)
                back.append(self.error_result(tid, ProtocolError(
                    f"task {tid} reached {self.name} twice (path {t[wire.T_PATH]}): two nodes share "
                    f"the name {self.name!r}?")))
                continue
            if type(t) is tuple and len(t) == 8 and type(t[wire.T_PATH]) is list:
                rec = t   # (as unmarshalled: already the ledger's shape, no copy)
            else:
                rec = tuple(t[:5]) + (list(t[5]),) + tuple(t[6:8])
            verdict, detail = lg.add(rec, origin, t[8] if len(t) == 9 else 0)
            n += 1
            if verdict == "new":
                self.fns[rec[wire.T_FN]][1] += 1
                self.quota.add(tid, owner, wire.payload_size(rec[wire.T_PAYLOAD]))
                if rec[wire.T_BUNDLE] is not None:
                    self.store.pin(rec[wire.T_BUNDLE])   # never evicted while a task needs it
                    if rec[wire.T_BUNDLE] != self._last_touched and self.store.has(rec[wire.T_BUNDLE]):
                        self.store.path(rec[wire.T_BUNDLE])   # marks it recently used (LRU eviction)
                        self._last_touched = rec[wire.T_BUNDLE]
                fresh.append(detail)
            elif verdict == "adopted":
                loc = detail.location
                if loc is not None and loc[0] == "l":   # its copy there may be cancelled: send it again
                    resend.setdefault(loc[1], []).append(detail)
                elif loc is not None and self.ledger.first_at(loc) == tid:   # the one its worker runs
                    self.tell_started(detail)
            elif verdict == "reuse":
                back.append(detail)
            elif verdict == "collision":
                n -= 1
                log.warning("refused task %s from %s: %s", tid, origin[1], detail)
                back.append(self.error_result(tid, ProtocolError(f"{detail} (node {self.name})")))
        for k in added:   # a blob no task took (re-sent ids, collisions, names no task uses) is not kept
            if self.fns[k][1] <= 0:
                del self.fns[k]
        for t in fresh:   # after every reference is counted: a task failing here frees only its own
            if t.id in lg.tasks and not self._needs_code(t):
                lg.enqueue(t, front=t.rec[wire.T_KIND] == KIND_RANK)   # a rank is claimed for its worker at once
        for name, ts in resend.items():
            l = self.links.links.get(name)
            if l is not None and l.alive and ts[0].location == l.location:
                self._post_to_link(l, ts)
        if back:
            self._deliver(origin, back)
        return n

    def accept_client_batch(self, client_id: str, fns: dict, tasks: list) -> int:
        """(``Node.submit``, after its checks) Queue a client's batch and place what can run; tasks over
        the client's limits fail at once, naming the limit.  Returns how many were accepted."""
        with self.lock:
            self.check_fns_known(fns, tasks)
            self.sessions.touch(client_id)
            fit, err = self.quota.admit(client_id, [wire.payload_size(t[wire.T_PAYLOAD]) for t in tasks])
            n = self.accept_tasks(fns, tasks[:fit], ("c", client_id))
            if err is not None:   # over a limit: those tasks fail at once, naming it; the client goes on
                self.counts["refused_limit"] += len(tasks) - fit
                self._deliver(("c", client_id), [self.error_result(t[wire.T_ID], err) for t in tasks[fit:]])
            self.counts["submitted"] += len(tasks)
            self.schedule()
        return n

    def hold_tasks(self, fns: dict, tasks: list, origin: tuple) -> None:
        """Enter tasks into the ledger without queueing them (a group's ranks: pydist.groups places
        them when the whole group can start)."""
        for k, blob in fns.items():
            if k not in self.fns:
                self.fns[k] = [blob, 0]
        for t in tasks:
            rec = tuple(t[:5]) + (list(t[5]),) + tuple(t[6:8])
            verdict, detail = self.ledger.add(rec, origin)
            if verdict == "new":
                self.fns[rec[wire.T_FN]][1] += 1
                if rec[wire.T_BUNDLE] is not None:
                    self.store.pin(rec[wire.T_BUNDLE])
            elif verdict == "collision":
                raise ProtocolError(f"{detail} (node {self.name})")

    # -------------------------------------------------------------------- what pydist.groups calls
    @property
    def tasks(self) -> Dict[str, Task]:
        """The ledger's records by id (read-only use)."""
        return self.ledger.tasks

    @property
    def worker_inflight(self) -> List[List[str]]:
        """Ids at each local worker (its current generation)."""
        return [self.ledger.ids_at(("w", i, self.pool.handles[i].generation)) for i in range(self.worker_count)]

    def _send_to_worker(self, index: int, ids: List[str]) -> None:
        ts = [self.ledger.tasks[t] for t in ids if t in self.ledger.tasks]
        if ts:
            self._place_on_worker(("w", index, self.pool.handles[index].generation), ts)

    def _send_to_link(self, link, ids: List[str]) -> None:
        ts = [self.ledger.tasks[t] for t in ids if t in self.ledger.tasks]
        for t in ts:
            self.ledger.place(t, link.location)   # "started" comes from the node whose worker runs it
        if ts:
            self._post_to_link(link, ts)

    def _schedule(self) -> None:
        self.schedule()

    def _finish_results(self, results: list, source: Optional[tuple]) -> int:
        return self.finish_results(results, source)

    def _error_result(self, tid: str, exc: BaseException) -> tuple:
        return self.error_result(tid, exc)

    # ------------------------------------------------------------------------------------ placing
    def _slots(self) -> List[scheduler.Slot]:
        win = scheduler.window(self.avg.value)
        lg = self.ledger
        slots = []
        for i in range(self.worker_count):
            if self.groups.is_reserved(i):
                continue
            h = self.pool.handles[i]
            # a worker still starting takes one task, which waits in its pipe (as ProcessPoolExecutor's
            # call queue holds calls for processes still starting): it runs the moment the worker is up,
            # and counts as started for shutdown(cancel_futures=True)
            cap = win if self.worker_up[i] else (1 if h.fd_w >= 0 and h.generation else 0)
            if cap:
                loc = ("w", i, h.generation)
                slots.append(scheduler.Slot(loc, cap - lg.count_at(loc), cap))
        for l in self.links.links.values():
            if l.may_send and l.alive and l.epoch:
                cap = scheduler.link_capacity(l.workers, win, self.avg.value)
                if cap > 0:
                    slots.append(scheduler.Slot(l.location, cap - lg.count_at(l.location), cap, l.name))
        return slots

    def schedule(self) -> None:
        """Place queued tasks on slots with credit.  Caller holds ``lock``."""
        if self.stopping.is_set():
            return
        self.groups.schedule()   # held ranks first, then waiting groups
        if not self.ledger.queue:
            return
        slots = self._slots()
        credit = sum(max(0, s.credit) for s in slots)
        if credit <= 0 and not self.groups.reserved:
            return
        # a few more than the credit when links or reservations are involved: a task a link cannot take
        # (its path, max_hops) must not hide the next one; local workers take anything, so with only
        # them the credit is exact (taking and putting back 64 on every result batch cost ~5 us a task)
        extra = 64 if self.groups.reserved or any(s.node is not None for s in slots) else 0
        taken = []
        for t in self.ledger.take_queued(max(credit, 0) + extra):
            if t.rec[wire.T_KIND] == KIND_RANK:
                self.groups.claim(t.id)   # a rank: held for its reserved worker (or failed: never re-run)
            else:
                taken.append(t)
        placement = scheduler.place([(t.rec[wire.T_HOPS], t.rec[wire.T_PATH]) for t in taken], slots,
                                    self.cfg.max_hops)
        placed = set()
        for key, idxs in placement.items():
            ts = [taken[i] for i in idxs]
            placed.update(idxs)
            if key[0] == "w":
                self._place_on_worker(key, ts)
            else:
                link = self.links.links[key[1]]
                for t in ts:
                    self.ledger.place(t, key)   # "started" comes from the node whose worker runs it
                self._post_to_link(link, ts)
        self.ledger.requeue_front([taken[i] for i in range(len(taken)) if i not in placed])

    def _place_on_worker(self, loc: tuple, ts: List[Task]) -> None:
        fns: Dict[str, bytes] = {}
        recs = []
        big = False
        idle = self.ledger.count_at(loc) == 0
        for t in ts:
            self.ledger.place(t, loc)
            r = t.rec
            key = r[wire.T_FN]
            if key not in fns:
                fns[key] = self.fns[key][0]
            if isinstance(r[wire.T_PAYLOAD], list) or len(r[wire.T_PAYLOAD]) >= wire.OOB_MIN:
                big = True   # large arguments go to the worker out of band, not copied into the frame
                r = r[:wire.T_PAYLOAD] + (wire.frame_payload(r[wire.T_PAYLOAD]),) + r[wire.T_PAYLOAD + 1:]
            recs.append(r)
        if idle:   # the first one starts now; those behind it wait at the worker, cancellable
            self.note_head(loc)
        self.pool.send(loc[1], ("run", fns, recs), big)

    def _post_to_link(self, link, ts: List[Task]) -> None:
        fns: Dict[str, bytes] = {}
        inits: Dict[str, bytes] = {}
        recs = []
        for t in ts:
            r = t.rec
            key = r[wire.T_FN]
            if key not in fns:
                fns[key] = self.fns[key][0]
            cid = r[wire.T_CLIENT]
            if cid and cid not in link.known_clients:
                c = self.sessions.clients.get(cid)
                if c is not None and c.init_blob is not None:
                    inits[cid] = c.init_blob
                link.known_clients.add(cid)
            hops, path = scheduler.forward_path(r[wire.T_PATH], r[wire.T_HOPS], self.name)
            payload = r[2]
            if isinstance(payload, list):
                try:   # the next node may be on another machine: it gets the bytes, not our client's memfd
                    payload = wire.from_shared(payload)
                except OSError as exc:   # (the client is gone: the task fails where it runs, saying so)
                    log.info("task %s: its shared-memory argument is unreadable here: %s", r[0], exc)
            recs.append((r[0], r[1], payload, r[3], hops, path, r[6], r[7]))
        self.counts["forwarded_out"] += len(recs)
        link.post(tasks=recs, fns=fns, inits=inits)

    # ------------------------------------------------------------------------------------ results
    def error_result(self, tid: str, exc: BaseException, status: int = wire.ERROR) -> tuple:
        return (tid, status, wire.dumps_exception(exc), self.name, -1, 0.0)

    def fail_task(self, t: Task, exc: BaseException) -> None:
        """``t`` fails here (bundle missing, ...): its error goes to its origin."""
        if t.location is not None:
            self.ledger.unplace_one(t)
            if t.id not in self.ledger.tasks:
                return
        self.finish_results([self.error_result(t.id, exc)], None)

    def finish_results(self, results: list, source: Optional[tuple]) -> int:
        """Results for tasks from ``source`` (a location, or None: decided here) go to their origins."""
        lg = self.ledger
        n = 0
        out: Dict[tuple, List[tuple]] = {}
        results = self.groups.on_results(results)
        for r in results:
            r = tuple(r)
            status = r[wire.R_STATUS]
            t = lg.tasks.get(r[wire.R_ID])
            if status == wire.LOST and t is not None and (source is None or t.location == tuple(source)):
                r = self._maybe_retry(t, r)
                if r is None:
                    continue
            t, verdict = lg.finish(r, source)
            if verdict in ("stale", "unknown"):
                log.debug("result for %s from %s ignored: %s", r[wire.R_ID], source, verdict)
                continue
            n += 1
            if verdict == "requeued":
                continue
            rt = valid_runtime(r[wire.R_RUNTIME])
            if rt is not None and status == wire.OK and rt > 0:
                self.avg.add(rt)
            if source is None or source[0] == "w":
                self.counts["done" if status == wire.OK else "failed"] += 1
            if verdict == "orphan":
                # its origin cancelled it: tell the origin link the copy is gone (frees its credit)
                if t.origin[0] == "l":  # type: ignore[union-attr]  # (a finished verdict has its task)
                    self._deliver(t.origin, [(t.id, wire.CANCELLED, b"", self.name, -1, 0.0)],  # type: ignore[union-attr]
                                  keep=False)
                continue
            out.setdefault(tuple(t.origin), []).append(r)  # type: ignore[union-attr]
        for origin, rs in out.items():
            self._deliver(origin, rs)
        return n

    def _maybe_retry(self, t: Task, r: tuple) -> Optional[tuple]:
        """A task lost its worker: run it again if it has retries left (returns None), else its final
        result, naming every attempt when there were several."""
        try:
            exc = wire.loads_exception(r[wire.R_BLOB])
        except Exception:
            exc = WorkerLost("worker lost")
        t.attempts.append(f"attempt {len(t.attempts) + 1}: {exc}")
        if t.retries > 0 and t.state is State.PLACED and t.rec[wire.T_KIND] != KIND_RANK:
            t.retries -= 1
            log.info("task %s lost its worker (%s): running it again (%d retries left)", t.id, exc, t.retries)
            self.ledger.unplace_one(t)
            return None
        if len(t.attempts) < 2:
            return r
        cls = type(exc) if isinstance(exc, WorkerLost) else WorkerLost
        err = cls(f"task {t.id} lost its worker on each of its {len(t.attempts)} attempts: "
                  + "; ".join(t.attempts))
        return (r[0], r[1], wire.dumps_exception(err), r[3], r[4], r[5])

    def _deliver(self, origin: tuple, rs: List[tuple], keep: bool = True) -> None:
        if origin[0] == "c":
            c = self.sessions.clients.get(origin[1])
            if c is not None:
                c.deliver(rs)
            return
        link = self.links.links.get(origin[1])
        if link is not None and link.alive and link.epoch == origin[2]:
            link.post(results=rs)
        elif keep:
            for r in rs:
                self.ledger.keep_result(r)

    def _on_leave(self, t: Task) -> None:
        self.quota.remove(t.id)
        entry = self.fns.get(t.rec[wire.T_FN])
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self.fns[t.rec[wire.T_FN]]
        if t.rec[wire.T_BUNDLE] is not None:
            self.store.unpin(t.rec[wire.T_BUNDLE])

    # ------------------------------------------------------------------------------------ cancelling
    # (cancel_tasks and withdraw: pydist.cancelling)
    def drop_client(self, cid: str) -> None:
        if self.sessions.pop(cid) is None:
            return
        self.cancel_tasks([self.ledger.tasks[tid] for tid in self.ledger.ids_from(("c", cid))])
        self.pool.broadcast(("forget", [cid]))
        self.groups.client_gone(cid)

    # ------------------------------------------------------------------------------------ losses
    def link_lost(self, link: "Link", why: str) -> None:
        """A link failed (or re-joins): re-place tasks we had sent it, cancel tasks it had sent us (their
        copies run on; a re-send revives them).  Holds ``lock``."""
        lg = self.ledger
        was_alive = link.alive
        link.alive = False
        if self.links.links.get(link.name) is link and not link.initiated:
            del self.links.links[link.name]
        for r in link.take_unsent_results():   # kept: a re-send of the id gets this result
            lg.keep_result(r)
        link.known_clients.clear()
        link.has_code = set()
        link.suspects.clear()
        link.suspects_in.clear()
        current = self.links.links.get(link.name)
        live_epoch = current.epoch if current is not None and current is not link and current.alive else None
        requeued = dropped = 0
        for loc in lg.links_of(link.name):
            if loc[2] != live_epoch:
                rq, _ = lg.unplace(loc)
                requeued += len(rq)
        for origin in lg.origins_of_link(link.name):
            if origin[2] != live_epoch:
                ts = [lg.tasks[tid] for tid in lg.ids_from(origin)]
                dropped += self.cancel_tasks(ts)
        self.withdrawals_lost("l", link.name)
        if was_alive and (requeued or dropped):
            log.log(logging.INFO if link.left else logging.WARNING,
                    "link %s lost (%s): %d tasks placed again, %d of its tasks cancelled",
                    link.name, why, requeued, dropped)
        self.schedule()

    def _on_worker_results(self, index: int, results: list) -> None:
        src = ("w", index, self.pool.handles[index].generation)
        clean = []
        for r in results:
            if valid_runtime(r[wire.R_RUNTIME]) is None:   # a task may have patched its clock
                log.warning("worker %d reported runtime %r for task %s: counted as 0", index,
                            r[wire.R_RUNTIME], r[wire.R_ID])
                r = tuple(r[:wire.R_RUNTIME]) + (0.0,)
            clean.append(r)
        with self.lock:
            head = self.ledger.first_at(src)
            self.finish_results(clean, src)
            if self.ledger.first_at(src) != head:
                self.note_head(src)   # the worker went on to the next task it holds
            self.schedule()

    def _on_worker_exit(self, index: int, returncode: Optional[int], culprit: Optional[str]) -> None:
        """A worker died: the task it was running fails with WorkerLost (or runs again, if it has
        retries left); the others it held are placed again."""
        with self.lock:
            h = self.pool.handles[index]
            self.worker_up[index] = False
            lg = self.ledger
            dead = [k for k in lg.locations() if k[0] == "w" and k[1] == index and k[2] != h.generation]
            rss = self.mem_killed.pop((index, h.generation - 1), None)
            err: WorkerLost
            for loc in dead:
                t = lg.tasks.get(culprit) if culprit else None
                if t is not None and t.location == loc:
                    if rss is not None:
                        err = MemoryLimitExceeded(
                            f"task {culprit} used {rss / 2**20:.0f} MiB in worker {index} of node {self.name}, "
                            f"over the per-worker memory limit of {self.cfg.memory_limit / 2**20:.0f} MiB "
                            f"(--memory-limit); the node restarted the worker")
                    else:
                        err = WorkerLost(f"the worker process running task {culprit} on node {self.name} died "
                                         f"(exit code {returncode}); the node replaced it")
                    err.node, err.exitcode = self.name, returncode   # type: ignore[attr-defined]
                    self.finish_results([(culprit, wire.LOST, wire.dumps_exception(err), self.name, index, 0.0)],
                                        loc)
                lg.unplace(loc)
            self.withdrawals_lost("w", index)
        threading.Thread(target=self._wait_ready, args=(index,), daemon=True).start()

    def _wait_ready(self, index: int) -> None:
        h = self.pool.handles[index]
        while not self.stopping.is_set():
            if h.ready.wait(0.1):
                with self.lock:
                    self.worker_up[index] = True
                    self.schedule()
                return

    def check_memory(self) -> None:
        """Restart workers whose resident memory is over ``--memory-limit`` (their task fails with
        MemoryLimitExceeded)."""
        import psutil

        limit = self.cfg.memory_limit
        for h in self.pool.handles:
            proc = h.proc
            if proc is None or proc.poll() is not None:
                continue
            try:
                rss = psutil.Process(proc.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                with self.lock:
                    if (h.index, h.generation) in self.mem_killed:
                        continue
                    self.mem_killed[(h.index, h.generation)] = rss
                log.warning("worker %d of node %s uses %d MiB, over --memory-limit %d MiB: restarting it",
                            h.index, self.name, rss >> 20, limit >> 20)
                proc.kill()

    # ------------------------------------------------------------------------------------ reconciling
    def _suspects(self, table: Dict[str, int], ids: List[str], rounds: int) -> List[str]:
        """Of ``ids`` (seen on one side only this round), those also seen last round; ``table`` keeps
        the new ones for the next."""
        act = [t for t in ids if t in table]
        table.clear()
        table.update((t, rounds) for t in ids if t not in act)
        return act

    def reconcile_sent(self, link, mine: List[str], theirs: set) -> None:
        """Tasks we placed at ``link`` that it does not hold: placed again (seen twice)."""
        lg = self.ledger
        link.rounds += 1
        missing = [tid for tid in mine if tid not in theirs and tid in lg.tasks
                   and lg.tasks[tid].location == link.location]
        act = self._suspects(link.suspects, missing, link.rounds)
        n = sum(1 for tid in act if lg.unplace_one(lg.tasks[tid]))
        if act:
            log.warning("reconciliation with %s: %d tasks it does not hold (%s): %d placed again",
                        link.name, len(act), describe_ids(act), n)
            self.counts["reconciled_lost"] += len(act)
            self.schedule()

    def reconcile_received(self, link, theirs: set) -> List[str]:
        """Tasks ``link`` gave us that it no longer counts as ours: cancelled (seen twice).  Returns the
        ids we hold from it, undelivered results included."""
        lg = self.ledger
        origin = ("l", link.name, link.epoch)
        held = lg.ids_from(origin)
        extra = [tid for tid in held if tid not in theirs]
        link.rounds_in += 1
        act = self._suspects(link.suspects_in, extra, link.rounds_in)
        if act:
            log.warning("reconciliation with %s: %d of its tasks it no longer counts here (%s): cancelled",
                        link.name, len(act), describe_ids(act))
            self.counts["reconciled_extra"] += len(act)
            self.cancel_tasks([lg.tasks[tid] for tid in act])
        return held + list(link.pending_result_ids())

    def client_digest(self, cid: str) -> Tuple[int, int]:
        """Count and digest of the ids held for a client, its undelivered results included."""
        n, d = self.ledger.digest_from(("c", cid))
        c = self.sessions.clients.get(cid)
        for r in (c.results if c is not None else ()):
            n, d = n + 1, d ^ id_hash(r[0])
        return n, d

    def reconcile_client(self, cid: str, wanted: List[str]) -> List[str]:
        """The client waits for ``wanted``: drop what we hold for it that it does not want (seen twice);
        return the ids of ``wanted`` we hold (or have results for)."""
        lg = self.ledger
        c = self.sessions.touch(cid)
        want = set(wanted)
        held = lg.ids_from(("c", cid))
        # (a group's ranks are not the client's to reconcile: pydist.groups aborts a group whose client goes)
        extra = [tid for tid in held if tid not in want and lg.tasks[tid].rec[wire.T_KIND] != KIND_RANK]
        c.rounds += 1
        act = self._suspects(c.suspects, extra, c.rounds)
        if act:
            log.warning("reconciliation with client %s: %d tasks it no longer waits for (%s): cancelled",
                        cid, len(act), describe_ids(act))
            self.cancel_tasks([lg.tasks[tid] for tid in act])
        have = {tid for tid in held if lg.tasks[tid].state is not State.CANCELLED} | {r[0] for r in c.results}
        return [tid for tid in wanted if tid in have]
