"""The chaos soak: ``python -m pydist.chaos --minutes N``.

::

    driver ──starts──▶ LocalCluster of 5 nodes (binary tree, depth 3: node0 ─ node1 ─ node3/node4, node2)
      │                 ▲ faults: worker SIGKILL, leaf / middle node SIGKILL + restart under the same name,
      │                 │         SIGSTOP … SIGCONT (2-8 s) of any node, client SIGKILL + restart
      └──starts──▶ client processes (ClusterExecutor(ns=...), failover on): a stream of tasks with known
                   answers; every second each prints its counts as one JSON line

At the end the driver heals the cluster (every node running, none stopped), tells the clients to stop
submitting and to wait for what they have out, adds up their counts, runs a final batch itself, and
prints ``tasks``, ``faults`` by kind, ``ok``, ``WorkerLost`` (and how many worker kills explain them),
``wrong``, ``resolved twice``, ``hung``.  It exits 1 unless wrong = twice = hung = 0 and the final
batch is all correct.  A client killed by the chaos loses the futures it had out: those are counted
as ``abandoned``, not as tasks.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Dict, List, Optional

FAULT_KINDS = ("worker_kill", "leaf_kill", "middle_kill", "freeze", "client_kill")
NODE_ARGS = ["--heartbeat", "0.3", "--heartbeat-timeout", "2", "--client-lease", "10"]
NODE_TIMEOUT = 4.0      # s: clients fail over from an entry node silent this long
LEAVES, MIDDLE = (2, 3, 4), 1


def answer(x: int) -> int:
    """The task: a known answer for every input (sometimes after a short sleep, so faults hit work
    in flight)."""
    if x % 50 == 0:
        time.sleep(0.02 + (x % 7) * 0.01)
    return (x * 7919 + 13) % 1000003


# ============================================================================================ client
def client_main(ns: str, seed: int, window: int) -> None:
    """A client process: streams tasks until its stdin says ``end`` (or closes), then waits for what it
    has out and prints its final counts."""
    from concurrent.futures import wait as cf_wait

    from . import ClusterExecutor, WorkerLost

    rng = random.Random(seed)
    counts: "collections.Counter[str]" = collections.Counter()
    lock = threading.Lock()
    outstanding: Dict[Future, int] = {}
    calls: Dict[int, int] = collections.Counter()
    stop = threading.Event()
    slots = threading.Semaphore(window)

    def done(f, x):
        with lock:
            calls[x] += 1
            if calls[x] > 1:
                counts["twice"] += 1
                return
            outstanding.pop(f, None)
            exc = f.exception()
            if exc is None:
                counts["ok" if f.result() == answer(x) else "wrong"] += 1
            elif isinstance(exc, WorkerLost):
                counts["worker_lost"] += 1
            else:
                counts["error"] += 1
                counts["error:" + type(exc).__name__] += 1
        slots.release()

    def stdin_watch():
        for line in sys.stdin:
            if line.strip() == "end":
                break
        stop.set()

    threading.Thread(target=stdin_watch, daemon=True).start()

    def report(final=False):
        with lock:
            c = dict(counts, outstanding=len(outstanding), final=final)
        sys.stdout.write(json.dumps(c) + "\n")
        sys.stdout.flush()

    ex = ClusterExecutor(ns=ns, node_timeout=NODE_TIMEOUT, connect_timeout=30)
    base = rng.randrange(1 << 40)
    i = 0
    last = time.monotonic()
    try:
        while not stop.is_set():
            if not slots.acquire(timeout=0.2):
                pass
            else:
                x = base + i
                i += 1
                try:
                    f = ex.submit(answer, x)
                except Exception as exc:   # the executor broke: count it, start a new one
                    slots.release()
                    with lock:
                        counts["error"] += 1
                        counts["error:submit:" + type(exc).__name__] += 1
                    ex.shutdown(wait=False)
                    ex = ClusterExecutor(ns=ns, node_timeout=NODE_TIMEOUT, connect_timeout=30)
                    continue
                with lock:
                    counts["tasks"] += 1
                    outstanding[f] = x
                f.add_done_callback(lambda f, x=x: done(f, x))
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                report()
        with lock:
            pending = list(outstanding)
        _, not_done = cf_wait(pending, timeout=90)
        with lock:
            counts["hung"] += len(not_done)
            for f in not_done:
                outstanding.pop(f, None)
        report(final=True)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        os._exit(0)


# ============================================================================================ driver
class Client:
    """One client process and the last counts it printed."""

    def __init__(self, ns: str, seed: int, window: int, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "pydist.chaos", "--client", ns, "--seed", str(seed),
                                      "--window", str(window)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)
        self.last: dict = {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.last = json.loads(line)
            except ValueError:
                pass

    def end(self) -> None:
        try:
            self.proc.stdin.write("end\n")   # type: ignore[union-attr]
            self.proc.stdin.flush()          # type: ignore[union-attr]
        except OSError:
            pass


class Soak:
    """The driver (see the module docstring)."""

    def __init__(self, minutes: float, seed: int, clients: int, workers: int, fault_every: float,
                 window: int, log=print):
        self.minutes = minutes
        self.rng = random.Random(seed)
        self.n_clients = clients
        self.workers = workers
        self.fault_every = fault_every
        self.window = window
        self.log = log
        self.faults: "collections.Counter[str]" = collections.Counter()
        self.clients: List[Client] = []
        self.retired: List[dict] = []
        self.frozen: Dict[int, float] = {}   # node -> when to SIGCONT
        self.dead: Dict[int, float] = {}     # node -> when to restart
        self.seed = seed

    def run(self) -> int:
        from . import LocalCluster

        with LocalCluster(nodes=5, workers_per_node=self.workers, topology="tree", node_args=NODE_ARGS,
                          log_level="ERROR") as c:
            self.cluster = c
            env = dict(os.environ, PYDIST_SECRET=c.secret.decode())
            self.env = env
            for k in range(self.n_clients):
                self.clients.append(Client(c.ns_address, self.seed * 1000 + k, self.window, env))
            t_end = time.monotonic() + self.minutes * 60
            next_fault = time.monotonic() + self.rng.uniform(0.5, 2 * self.fault_every)
            last_print = time.monotonic()
            while time.monotonic() < t_end:
                now = time.monotonic()
                self._heal_due(now)
                if now >= next_fault:
                    self._fault(now)
                    next_fault = now + self.rng.uniform(0.2, 2 * self.fault_every)
                if now - last_print > 30:
                    last_print = now
                    t = self._totals()
                    self.log(f"[chaos] {int(self.minutes * 60 - (t_end - now))} s: tasks {t['tasks']}, ok {t['ok']}, "
                             f"faults {sum(self.faults.values())}")
                time.sleep(0.05)
            self._heal_all()
            for cl in self.clients:
                cl.end()
            for cl in self.clients:
                try:
                    cl.proc.wait(timeout=150)
                except subprocess.TimeoutExpired:
                    cl.proc.kill()
                    cl.proc.wait()
                    cl.last["hung"] = cl.last.get("hung", 0) + cl.last.get("outstanding", 0)
                cl.reader.join(5)
            totals = self._totals()
            final_ok, final_n = self._final_batch(c)
        return self._report(totals, final_ok, final_n)

    # ------------------------------------------------------------------------------------ faults
    def _alive_nodes(self) -> List[int]:
        return [k for k in range(5) if k not in self.dead and k not in self.frozen]

    def _fault(self, now: float) -> None:
        import psutil

        kind = self.rng.choice(FAULT_KINDS)
        c = self.cluster
        if kind == "worker_kill":
            nodes = self._alive_nodes()
            pids = []
            for k in nodes:
                try:
                    pids += [p.pid for p in psutil.Process(c.procs[k].pid).children()]
                except psutil.Error:
                    pass
            if not pids:
                return
            try:
                os.kill(self.rng.choice(pids), signal.SIGKILL)
            except OSError:
                return
        elif kind in ("leaf_kill", "middle_kill"):
            choices = [k for k in (LEAVES if kind == "leaf_kill" else (MIDDLE,)) if k in self._alive_nodes()]
            if not choices:
                return
            k = self.rng.choice(choices)
            c.kill_node(k)
            self.dead[k] = now + self.rng.uniform(0.0, 2.0)
        elif kind == "freeze":
            choices = self._alive_nodes()
            if not choices:
                return
            k = self.rng.choice(choices)
            c.kill_node(k, signal.SIGSTOP)
            self.frozen[k] = now + self.rng.uniform(2.0, 8.0)
        else:
            cl = self.rng.choice(self.clients)
            cl.proc.kill()
            cl.proc.wait()
            cl.reader.join(5)
            self.retired.append(dict(cl.last, abandoned=cl.last.get("outstanding", 0)))
            self.clients[self.clients.index(cl)] = Client(c.ns_address, self.rng.randrange(1 << 30), self.window,
                                                          self.env)
        self.faults[kind] += 1

    def _heal_due(self, now: float) -> None:
        c = self.cluster
        for k, when in list(self.frozen.items()):
            if now >= when:
                c.kill_node(k, signal.SIGCONT)
                del self.frozen[k]
        for k, when in list(self.dead.items()):
            if now >= when:
                try:
                    c.procs[k].wait(timeout=10)
                    c.restart_node(k)
                    del self.dead[k]
                except Exception as exc:   # e.g. the port of its name still in use: try again soon
                    self.log(f"[chaos] restarting node{k} failed: {exc}")
                    self.dead[k] = now + 1.0

    def _heal_all(self) -> None:
        deadline = time.monotonic() + 60
        while (self.frozen or self.dead) and time.monotonic() < deadline:
            self._heal_due(time.monotonic() + 3600)
            time.sleep(0.1)
        self.cluster.wait_for_nodes(5, 60)

    # ------------------------------------------------------------------------------------ results
    def _totals(self) -> dict:
        t: "collections.Counter[str]" = collections.Counter()
        for d in self.retired + [cl.last for cl in self.clients]:
            for k, v in d.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    t[k] += v
        # tasks of killed clients that had no outcome yet are abandoned, not tasks
        t["tasks"] -= t["abandoned"]
        return t

    def _final_batch(self, c, n: int = 200):
        from . import ClusterExecutor

        try:
            with ClusterExecutor(ns=c.ns_address, secret=c.secret, node_timeout=NODE_TIMEOUT) as ex:
                xs = list(range(10 ** 9, 10 ** 9 + n))
                got = list(ex.map(answer, xs, timeout=120))
            return sum(1 for x, y in zip(xs, got) if y == answer(x)), n
        except Exception as exc:
            self.log(f"[chaos] final batch failed: {type(exc).__name__}: {exc}")
            return 0, n

    def _report(self, t: dict, final_ok: int, final_n: int) -> int:
        kills = self.faults["worker_kill"]
        unexplained = max(0, t["worker_lost"] - kills)
        errors = {k[6:]: v for k, v in t.items() if k.startswith("error:")}
        lines = [
            f"tasks: {t['tasks']}",
            "faults: " + " ".join(f"{k}={self.faults[k]}" for k in FAULT_KINDS)
            + f" (total {sum(self.faults.values())})",
            f"ok: {t['ok']}",
            f"WorkerLost: {t['worker_lost']} (worker kills: {kills}; unexplained: {unexplained})",
            f"other errors: {t['error']}" + (f" {errors}" if errors else ""),
            f"wrong: {t['wrong']}",
            f"resolved twice: {t['twice']}",
            f"hung: {t['hung']}",
            f"abandoned (client killed): {t['abandoned']}",
            f"final batch: {final_ok}/{final_n} correct",
        ]
        for ln in lines:
            self.log(ln)
        bad = t["wrong"] or t["twice"] or t["hung"] or unexplained or final_ok != final_n
        self.log("chaos: FAILED" if bad else "chaos: OK")
        return 1 if bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pydist.chaos", description="Chaos soak of a local 5-node cluster.")
    p.add_argument("--minutes", type=float, default=1.0, help="how long to inject faults (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    p.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--workers", type=int, default=2, help="workers per node (default 2)")
    p.add_argument("--fault-every", type=float, default=3.0, help="mean seconds between faults (default 3)")
    p.add_argument("--window", type=int, default=300, help="tasks each client keeps out (default 300)")
    p.add_argument("--client", metavar="NS", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else int(time.time())
    if a.client:
        client_main(a.client, seed, a.window)
        return 0
    if a.minutes <= 0 or a.clients < 1 or a.workers < 1 or a.fault_every <= 0 or a.window < 1:
        p.error("--minutes, --clients, --workers, --fault-every and --window must be positive")
    print(f"[chaos] seed {seed}, {a.minutes:g} min, {a.clients} clients, 5 nodes x {a.workers} workers", flush=True)
    return Soak(a.minutes, seed, a.clients, a.workers, a.fault_every, a.window,
                log=lambda s: print(s, flush=True)).run()


if __name__ == "__main__":
    sys.exit(main())
