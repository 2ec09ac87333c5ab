"""Measure the inputs of the scale model (``benchmarks/simulate.py``) on this machine.

Small real runs on loopback, with CPU time (not wall time) for the per-task and per-batch costs, so
the figures survive a loaded machine better than wall-clock throughput does:

* **hop latency**: a lone no-op task through chains of 1, 2, 4 and 8 nodes with workers only on the
  last node (``LocalCluster(workers_per_node=[0, ..., 0, 1], topology="chain")``, as bench.py does);
  the least-squares slope is the wall-clock cost of one extra hop (there and back).
* **forwarding node CPU**: on a chain of 2 with workers only on the last node, the root forwards
  everything.  CPU seconds the root spends per task in a bulk ``map`` (per-task cost) and per lone
  task (per-task + per-batch cost, both directions), minus its idle CPU over the same time.
* **leaf node CPU**: the same for the node that hands the tasks to its workers.
* **client CPU** per task in bulk and per lone task, and the worker's CPU per no-op task.

``python benchmarks/sim_measure.py [--out benchmarks/sim_inputs.json]``
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import psutil  # noqa: E402

import _tasks  # noqa: E402
import pydist  # noqa: E402


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _children_cpu(pid: int) -> float:
    tot = 0.0
    for c in psutil.Process(pid).children(recursive=True):
        try:
            tot += _cpu(c.pid)
        except psutil.Error:
            pass
    return tot


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def chain_latency(k: int, n: int) -> float:
    """Median wall ms of a lone no-op task through a chain of ``k`` nodes."""
    per = [0] * (k - 1) + [1]
    with pydist.LocalCluster(nodes=k, workers_per_node=per, topology="chain") as c:
        with pydist.ClusterExecutor(c.address, secret=c.secret) as ex:
            for i in range(20):
                ex.submit(_tasks.noop, i).result(timeout=30)
            xs = []
            for i in range(n):
                t = time.perf_counter()
                ex.submit(_tasks.noop, i).result(timeout=30)
                xs.append((time.perf_counter() - t) * 1e3)
    return statistics.median(xs)


def slope(xs, ys):
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def cpu_costs(bulk_n: int, lone_n: int, workers: int = 2) -> dict:
    """CPU per task of each role on a chain of 2 (root forwards, leaf runs)."""
    with pydist.LocalCluster(nodes=2, workers_per_node=[0, workers], topology="chain") as c:
        root, leaf = c.pids[1], c.pids[2]
        with pydist.ClusterExecutor(c.address, secret=c.secret) as ex:
            list(ex.map(_tasks.noop, range(2000), chunksize=1))
            # idle CPU per second of each process (heartbeats, timers)
            a = (_cpu(root), _cpu(leaf), _children_cpu(leaf), _self_cpu())
            t = time.perf_counter()
            time.sleep(1.0)
            idle_s = time.perf_counter() - t
            b = (_cpu(root), _cpu(leaf), _children_cpu(leaf), _self_cpu())
            idle = [(y - x) / idle_s for x, y in zip(a, b)]

            def measure(run):
                a = (_cpu(root), _cpu(leaf), _children_cpu(leaf), _self_cpu())
                t = time.perf_counter()
                count = run()
                wall = time.perf_counter() - t
                b = (_cpu(root), _cpu(leaf), _children_cpu(leaf), _self_cpu())
                return [max(0.0, (y - x) - i * wall) / count for x, y, i in zip(a, b, idle)], wall

            bulk, bulk_wall = measure(lambda: len(list(ex.map(_tasks.noop, range(bulk_n), chunksize=1))))

            def lone():
                for i in range(lone_n):
                    ex.submit(_tasks.noop, i).result(timeout=30)
                return lone_n
            single, lone_wall = measure(lone)
    roles = ["root", "leaf", "workers", "client"]
    out = {f"{r}_task_us": bulk[i] * 1e6 for i, r in enumerate(roles)}
    out.update({f"{r}_lone_us": single[i] * 1e6 for i, r in enumerate(roles)})
    out["bulk_tasks_s"] = bulk_n / bulk_wall
    out["lone_ms"] = lone_wall / lone_n * 1e3
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "sim_inputs.json"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    chains = [1, 2, 4] if a.quick else [1, 2, 4, 8]
    lat_n, bulk_n, lone_n = (50, 5000, 100) if a.quick else (200, 20000, 300)
    runs = []
    for r in range(a.reps):
        lat = {k: chain_latency(k, lat_n) for k in chains}
        cpu = cpu_costs(bulk_n, lone_n)
        runs.append({"chain_ms": lat, "hop_ms": slope(list(lat), [lat[k] for k in chains]), **cpu})
        print(f"rep {r}: hop {runs[-1]['hop_ms']:.3f} ms, chain {lat}, cpu {cpu}", flush=True)
    med = {k: statistics.median(x[k] for x in runs) for k in runs[0] if k != "chain_ms"}
    med["chain_ms"] = {k: statistics.median(x["chain_ms"][k] for x in runs) for k in chains}
    doc = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_avg": os.getloadavg(), "cpus": os.cpu_count(), "median": med, "runs": runs}
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(json.dumps(med, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
