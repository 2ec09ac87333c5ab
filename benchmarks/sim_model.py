"""The model behind ``benchmarks/simulate.py``: node CPUs, links, pipes, workers, a client.

Placement is the real ``pydist.scheduler``; see simulate.py's docstring for what is modelled how.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import math
import os
import random
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pydist import scheduler  # noqa: E402

FLUSH_EVERY = 0.002     # workers.FLUSH_EVERY
PIPE_DELAY = 30e-6      # s: node -> worker pipe hand-off (writer thread wake-up)
MAX_BATCH = 2000        # ClientConfig.max_batch: most tasks per call


class Costs:
    """Per-operation costs (seconds), derived from sim_inputs.json (see the module docstring)."""

    def __init__(self, m: dict, wire: float = 100e-6, scale_msg: float = 1.0, scale_task: float = 1.0):
        self.task = m["root_task_us"] / 4 * 1e-6 * scale_task           # per task, per operation
        self.msg = max(0.0, m["root_lone_us"] - m["root_task_us"]) / 4 * 1e-6 * scale_msg
        self.leaf_task = m["leaf_task_us"] / 4 * 1e-6 * scale_task
        self.leaf_msg = max(0.0, m["leaf_lone_us"] - m["leaf_task_us"]) / 4 * 1e-6 * scale_msg
        self.client_task = m["client_task_us"] / 2 * 1e-6 * scale_task  # submit, and result
        self.client_msg = max(0.0, m["client_lone_us"] - m["client_task_us"]) / 2 * 1e-6 * scale_msg
        self.worker_task = m["workers_task_us"] * 1e-6
        self.client_item = 1e-6          # pickling one more item of a chunk
        self.wire = wire                 # one-way network delay of a call or its reply

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}


class Sim:
    """The event loop: (time, seq, fn, args) on a heap."""

    def __init__(self):
        self.now = 0.0
        self.heap: list = []
        self.seq = itertools.count()

    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), fn, args))

    def run(self, until: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= until:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            fn(*args)
        self.now = until


class CPU:
    """One process's CPU: work runs FIFO, one piece at a time."""

    def __init__(self, sim: Sim):
        self.sim = sim
        self.free = 0.0
        self.used = 0.0

    def do(self, cost: float, fn: Callable, *args) -> None:
        start = max(self.sim.now, self.free)
        self.free = start + cost
        self.used += cost
        self.sim.at(self.free, fn, *args)


class Channel:
    """One direction of a link thread: one call in flight, everything posted meanwhile coalesced."""

    def __init__(self, sim: Sim, src: CPU, dst: CPU, src_cost, dst_cost, wire: float,
                 deliver: Callable[[list], None]):
        self.sim, self.src, self.dst, self.wire, self.deliver = sim, src, dst, wire, deliver
        self.src_cost, self.dst_cost = src_cost, dst_cost   # (msg, per item) for each side
        self.out: list = []
        self.busy = False
        self.dead = False
        self.calls = 0
        self.delay = 0.0      # hold a first item this long so that more join its call (results up)

    def post(self, items: list) -> None:
        self.out.extend(items)
        if not self.busy and not self.dead:
            if self.delay:
                self.busy = True
                self.sim.at(self.sim.now + self.delay, self._send)
            else:
                self._send()

    def _send(self) -> None:
        items, self.out = self.out[:MAX_BATCH], self.out[MAX_BATCH:]
        self.busy = True
        self.calls += 1
        m, t = self.src_cost
        self.src.do(m + t * len(items), self.sim.at, self.sim.now, self._on_wire, items)

    def _on_wire(self, items: list) -> None:
        self.sim.at(self.sim.now + self.wire, self._arrive, items)

    def _arrive(self, items: list) -> None:
        if self.dead:
            return
        m, t = self.dst_cost
        self.dst.do(m + t * len(items), self._handled, items)

    def _handled(self, items: list) -> None:
        self.deliver(items)
        self.sim.at(self.sim.now + self.wire, self._reply)

    def _reply(self) -> None:
        self.busy = False
        if self.out and not self.dead:
            self._send()
        elif not self.out:
            pass


class Worker:
    """A worker process: its pipe (tasks in order), results flushed at most FLUSH_EVERY late."""

    def __init__(self, model: "Model", node: "Node", slow: float):
        self.model, self.node, self.slow = model, node, slow
        self.pipe: "collections.deque[int]" = collections.deque()
        self.running = False
        self.out: list = []
        self.last_flush = 0.0
        self.busy_time = 0.0
        self.dead = False
        self.reserved = 0      # placed here, pipe write still queued on the node's CPU
        self.cur_start = 0.0

    @property
    def inflight(self) -> int:
        return len(self.pipe) + self.running + self.reserved

    def give(self, tasks: List[int]) -> None:
        if self.dead:
            return
        self.pipe.extend(tasks)
        if not self.running:
            self._next()

    def _next(self) -> None:
        if not self.pipe or self.dead:
            self.running = False
            if self.out:
                self._flush()
            return
        tid = self.pipe.popleft()
        self.running = True
        m = self.model
        m.t_start[tid] = self.cur_start = m.sim.now
        dur = m.runtime(tid) * self.slow
        m.sim.at(m.sim.now + dur + m.c.worker_task, self._done, tid, dur)

    def _done(self, tid: int, dur: float) -> None:
        if self.dead:
            return
        m = self.model
        m.account(self, m.sim.now - dur, m.sim.now)
        self.out.append((tid, dur))
        if m.sim.now - self.last_flush > FLUSH_EVERY or not self.pipe:
            self._flush()
        self._next()

    def _flush(self) -> None:
        out, self.out = self.out, []
        self.last_flush = self.model.sim.now
        n = self.node
        n.cpu.do(n.msg + n.task * len(out), n.on_worker_results, self, out)


class Node:
    """A pydist node in the model: queue, workers, child links, one uplink; placement by scheduler."""

    def __init__(self, model: "Model", name: str, depth: int, path: tuple, workers: int, slow: float,
                 leafish: bool):
        self.model, self.name, self.depth, self.path = model, name, depth, path
        self.cpu = CPU(model.sim)
        c = model.c
        self.msg, self.task = (c.leaf_msg, c.leaf_task) if leafish else (c.msg, c.task)
        self.queue: "collections.deque[int]" = collections.deque()
        self.workers = [Worker(model, self, slow) for _ in range(workers)]
        self.children: List[Node] = []
        self.down: Dict[str, Channel] = {}
        self.inflight: Dict[str, set] = {}
        self.known_workers: Dict[str, int] = {}   # what the heartbeat told us about each child
        self.up: Optional[Channel] = None
        self.parent: Optional[Node] = None
        self.avg = scheduler.RuntimeAverage()
        self.dead = False

    def subtree_workers(self) -> int:
        return len(self.workers) + sum(ch.subtree_workers() for ch in self.children if not ch.dead)

    def on_tasks(self, tasks: List[int]) -> None:
        if self.dead:
            return
        self.queue.extend(tasks)
        self.schedule()

    def schedule(self) -> None:
        """``Node._schedule``: slots from windows and link capacities, then ``scheduler.place``."""
        if not self.queue or self.dead:
            return
        m = self.model
        win = m.window(self.avg.value)
        slots = [scheduler.Slot(("w", i), win - w.inflight, win) for i, w in enumerate(self.workers)]
        for ch in self.children:
            if ch.name in self.down and not self.down[ch.name].dead:
                cap = m.link_capacity(self.known_workers[ch.name], win, self.avg.value)
                if cap > 0:
                    credit = m.link_credit(cap, len(self.inflight[ch.name]), self.known_workers[ch.name])
                    slots.append(scheduler.Slot(("l", ch.name), credit, cap, ch.name))
        credit = sum(max(0, s.credit) for s in slots)
        if credit <= 0:
            return
        take = min(len(self.queue), credit + 64)
        ids = [self.queue.popleft() for _ in range(take)]
        views = [(self.depth, self.path)] * take
        placement = scheduler.place(views, slots, m.max_hops)
        placed = set()
        for key, idxs in placement.items():
            batch = [ids[i] for i in idxs]
            placed.update(idxs)
            if self.depth == 0:
                for tid in batch:
                    m.t_dispatch.setdefault(tid, m.sim.now)
            if key[0] == "w":
                w = self.workers[key[1]]
                w.reserved += len(batch)   # credit is taken now; the pipe write follows on our CPU
                self.cpu.do(self.msg + self.task * len(batch), self._to_worker, w, batch)
            else:
                self.inflight[key[1]].update(batch)
                self.down[key[1]].post(batch)
        if len(placed) < take:
            rest = [ids[i] for i in range(take) if i not in placed]
            self.queue.extendleft(reversed(rest))

    def _to_worker(self, w: Worker, batch: List[int]) -> None:
        w.reserved -= len(batch)
        self.model.sim.at(self.model.sim.now + PIPE_DELAY, w.give, batch)

    def on_worker_results(self, w: Worker, results: list) -> None:
        if self.dead:
            return
        for _, dur in results:
            self.avg.add(dur)
        self._up(results)
        self.schedule()

    def on_child_results(self, child: str, results: list) -> None:
        if self.dead:
            return
        fl = self.inflight.get(child)
        ok = []
        for r in results:
            if fl is not None and r[0] in fl:
                fl.discard(r[0])
                ok.append(r)
                self.avg.add(r[1])
        self._up(ok)
        self.schedule()

    def _up(self, results: list) -> None:
        if self.depth == 0:
            for tid, _ in results:
                self.model.t_root_back[tid] = self.model.sim.now
        if results:
            self.up.post(results)

    def lose_child(self, child: "Node") -> None:
        """The heartbeat timeout fired: re-queue what the child held, stop sending to it."""
        self.down[child.name].dead = True
        back = sorted(self.inflight.pop(child.name, set()))
        self.model.replaced += len(back)
        self.queue.extendleft(reversed(back))
        self.schedule()


class Model:
    """One simulated run: a tree, a client with ``n_tasks`` tasks, sampling every ``sample`` s."""

    def __init__(self, c: Costs, workers: List[int], fanout: int, task_time: float, *, chunk: int = 1,
                 prefetch: Optional[int] = None, slow: Optional[Dict[int, float]] = None,
                 capacity: Optional[Callable] = None, hold: bool = False, result_delay: float = 0.0,
                 max_hops: int = 8, seed: int = 1):
        self.sim = Sim()
        self.c = c
        self.task_time = task_time * chunk
        self.chunk = chunk
        self.prefetch = prefetch
        self.capacity = capacity
        self.hold = hold
        self.max_hops = max_hops
        self.rng = random.Random(seed)
        self.busy: List[float] = []
        self.t_submit: List[float] = []
        self.t_dispatch: Dict[int, float] = {}
        self.t_start: Dict[int, float] = {}
        self.t_root_back: Dict[int, float] = {}
        self.t_done: Dict[int, float] = {}
        self.replaced = 0
        self.window_lo, self.window_hi = 0.0, math.inf
        slow = slow or {}
        self.nodes: List[Node] = []
        n = len(workers)
        for k in range(n):
            parent = (k - 1) // fanout if k else None
            depth = 0 if k == 0 else self.nodes[parent].depth + 1
            path = () if k == 0 else self.nodes[parent].path + (self.nodes[parent].name,)
            has_children = k * fanout + 1 < n
            nd = Node(self, f"n{k}", depth, path, workers[k], slow.get(k, 1.0), leafish=not has_children)
            self.nodes.append(nd)
            if parent is not None:
                p = self.nodes[parent]
                nd.parent = p
                p.children.append(nd)
                p.inflight[nd.name] = set()
                p.down[nd.name] = Channel(self.sim, p.cpu, nd.cpu, (p.msg, p.task), (nd.msg, nd.task),
                                          c.wire, nd.on_tasks)
                nd.up = Channel(self.sim, nd.cpu, p.cpu, (nd.msg, nd.task), (p.msg, p.task), c.wire,
                                lambda rs, p=p, name=nd.name: p.on_child_results(name, rs))
                nd.up.delay = result_delay
        for nd in self.nodes:
            for ch in nd.children:
                nd.known_workers[ch.name] = ch.subtree_workers()
        self.depth = max(nd.depth for nd in self.nodes)
        self.all_workers = [w for nd in self.nodes for w in nd.workers]
        root = self.nodes[0]
        self.client = CPU(self.sim)
        self.submit_ch = Channel(self.sim, self.client, root.cpu, (c.client_msg, c.client_task),
                                 (root.msg, root.task), c.wire, root.on_tasks)
        root.up = Channel(self.sim, root.cpu, self.client, (root.msg, root.task),
                          (c.client_msg, c.client_task), c.wire, self._client_results)
        self.samples: List[tuple] = []

    # -- policy hooks (the real scheduler unless a prefetch is forced) -----------------------------
    def window(self, avg: Optional[float]) -> int:
        return self.prefetch if self.prefetch else scheduler.window(avg)

    def link_capacity(self, workers: int, win: int, avg: Optional[float]) -> int:
        if self.capacity is not None:
            return self.capacity(workers, win, avg)
        return scheduler.link_capacity(workers, win, avg)

    def link_credit(self, cap: int, inflight: int, workers: int) -> int:
        if self.hold and hasattr(scheduler, "link_credit"):
            return scheduler.link_credit(cap, inflight, workers)
        if self.hold:   # the rule before it moved into the scheduler
            free, spare = cap - inflight, cap - workers
            return 0 if free < spare // 2 else free
        return cap - inflight

    def runtime(self, tid: int) -> float:
        return self.task_time

    def account(self, w: Worker, t0: float, t1: float) -> None:
        lo, hi = max(t0, self.window_lo), min(t1, self.window_hi)
        if hi > lo:
            w.busy_time += hi - lo

    # -- client ---------------------------------------------------------------------------------------
    def submit(self, n: int, at: float = 0.0, step: int = 500) -> None:
        """The user submits ``n`` tasks from ``at`` on: pickled ``step`` at a time on the client's
        CPU, each step queued behind what the client's other threads asked for meanwhile (the GIL)."""
        base = len(self.t_submit)
        end = base + n
        per = self.c.client_task / 2 + self.c.client_item * (self.chunk - 1)

        def part(lo: int) -> None:
            hi = min(lo + step, end)
            self.t_submit.extend([self.sim.now] * (hi - lo))
            self.submit_ch.post(list(range(lo, hi)))
            if hi < end:
                self.client.do(per * (min(hi + step, end) - hi), part, hi)

        self.sim.at(at, self.client.do, per * (min(base + step, end) - base), part, base)

    def _client_results(self, results: list) -> None:
        for tid, _ in results:
            self.t_done[tid] = self.sim.now

    # -- faults ------------------------------------------------------------------------------------
    def lose(self, k: int, at: float, detect: float) -> None:
        """Node ``k`` (and so its subtree, which has no other way up) dies at ``at``; its parent
        notices ``detect`` s later (heartbeat timeout) and re-places what it had sent there."""
        def die():
            stack = [self.nodes[k]]
            while stack:
                nd = stack.pop()
                nd.dead = True
                for w in nd.workers:
                    w.dead = True
                if nd.up:
                    nd.up.dead = True
                stack.extend(nd.children)
            p = self.nodes[k].parent
            p.down[self.nodes[k].name].dead = True
            self.sim.at(self.sim.now + detect, p.lose_child, self.nodes[k])
        self.sim.at(at, die)

    # -- sampling and the run ------------------------------------------------------------------------
    def _sample(self, every: float) -> None:
        live = [w for w in self.all_workers if not w.dead]
        idle = sum(1 for w in live if not w.running)
        waiting = sum(len(nd.queue) for nd in self.nodes if not nd.dead) + \
            sum(max(0, len(w.pipe)) for w in live)
        self.samples.append((self.sim.now, len(self.nodes[0].queue), idle, waiting, len(live)))
        self.sim.at(self.sim.now + every, self._sample, every)

    def run(self, duration: float, warm: float, every: float = 0.005) -> dict:
        self.window_lo, self.window_hi = warm, duration
        self.sim.at(0.0, self._sample, every)
        t = time.perf_counter()
        self.sim.run(duration)
        wall = time.perf_counter() - t
        for w in self.all_workers:   # the task each worker is inside at the end counts up to the end
            if w.running and not w.dead:
                self.account(w, w.cur_start, duration)
        span = duration - warm
        live = [w for w in self.all_workers if not w.dead]
        busy = sum(w.busy_time for w in self.all_workers) / (len(self.all_workers) * span)
        done = [tid for tid, tt in self.t_done.items() if warm <= tt <= duration]
        in_tree = [self.t_root_back[t] - self.t_dispatch[t] - self.task_time for t in done
                   if t in self.t_dispatch and t in self.t_root_back]
        s = [x for x in self.samples if x[0] >= warm]
        idle_waiting = statistics.fmean(min(i, q) / max(1, n) for _, _, i, q, n in s) if s else 0.0
        per_node = []
        for nd in self.nodes:
            if nd.workers and not nd.dead:
                per_node.append(sum(w.busy_time for w in nd.workers) / (len(nd.workers) * span))
        return {
            "nodes": len(self.nodes), "workers": len(self.all_workers), "live_workers": len(live),
            "depth": self.depth, "task_ms": self.task_time * 1e3, "chunk": self.chunk,
            "tasks_s": len(done) / span, "items_s": len(done) * self.chunk / span,
            "busy": busy,
            "latency_ms_median": statistics.median(in_tree) * 1e3 if in_tree else None,
            "latency_ms_p90": sorted(in_tree)[int(0.9 * len(in_tree))] * 1e3 if in_tree else None,
            "root_queue_max": max((x[1] for x in s), default=0),
            "root_queue_mean": statistics.fmean(x[1] for x in s) if s else 0,
            "idle_while_waiting": idle_waiting,
            "min_node_busy": min(per_node) if per_node else 0.0,
            "root_cpu": self.nodes[0].cpu.used / duration,
            "client_cpu": self.client.used / duration,
            "max_node_cpu": max(nd.cpu.used for nd in self.nodes) / duration,
            "replaced": self.replaced, "sim_wall_s": wall,
        }
