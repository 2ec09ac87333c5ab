"""Scale model of a pydist tree: a discrete-event simulation around the real placement policy.

Every placement decision is made by the pure ``pydist.scheduler`` (``window``, ``link_capacity``,
``place``, ``RuntimeAverage``), called exactly as ``pydist.node`` calls it; everything around it --
node CPU, links, pipes, workers, the client -- is a model whose costs were measured on this machine
by ``benchmarks/sim_measure.py`` (``benchmarks/sim_inputs.json``)::

    client ──submit(batch)──▶ root ──run_task(batch)──▶ child ... ──pipe──▶ workers (T per task)
       ▲  collect (results)    │ ▲                        │ ▲
       └───────────────────────┘ └──receive_results───────┘ └──results (flushed per 2 ms)

* **Node CPU** is one serial resource per node (the GIL): each message a node receives or sends costs
  ``msg`` plus ``task`` per task in it (measured: CPU seconds of a forwarding node per lone task and
  per task of a bulk map, split over the four operations a task costs a node: in, out, result in,
  result out).  Work queues FIFO behind whatever the node is doing.
* **Links** are what a pydist link thread is: one synchronous call at a time per direction; whatever
  is posted while a call is in flight is coalesced into the next call (at most ``max_batch`` tasks).
  A call costs the sender's CPU, a one-way ``wire`` delay, the receiver's CPU, and the reply's delay.
* **Workers** run their pipe in order and flush results at most 2 ms late (``workers.FLUSH_EVERY``).
* **The client** pickles each task (``client_task``/2 CPU) and unpickles each result (the other half).

What it reports per run: throughput, the workers' busy share (time inside tasks / workers x time)
after warm-up, in-tree latency (leaving the root's queue to the result back at the root, minus the
task), root queue depth, fairness as the share of worker time idle while a task waited elsewhere, and
the slowest node's busy share.  Scenarios: trees of 10-1,000 nodes (fan-out 2-32, depth 1-4),
heterogeneous worker counts, a slow node, a lost node.  Results to ``benchmarks/sim_results.json``
and ``benchmarks/scale.png``; see RESULTS.md ("Scale model").

``python benchmarks/simulate.py [--quick] [--inputs benchmarks/sim_inputs.json]``
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from sim_model import Costs, Model  # noqa: E402


# -- scenarios ------------------------------------------------------------------------------------------
def worker_counts(n: int, seed: int = 7, choices=(1, 2, 4)) -> List[int]:
    """Heterogeneous worker counts, one per node (reproducible)."""
    rng = random.Random(seed)
    return [rng.choice(choices) for _ in range(n)]


def depth_of(n: int, fanout: int) -> int:
    d, level, total = 0, 1, 1
    while total < n:
        level *= fanout
        total += level
        d += 1
    return d


def steady(c: Costs, workers: List[int], fanout: int, task_time: float, **kw) -> dict:
    """A long map: more tasks than the tree can finish; busy share etc. after warm-up."""
    chunk = kw.get("chunk", 1)
    t = task_time * chunk
    warm = max(0.1, 4 * t)
    duration = warm + max(0.4, 8 * t)
    m = Model(c, workers, fanout, task_time, **kw)
    w = sum(workers)
    m.submit(int(w / t * duration * 1.2) + 4 * w)
    r = m.run(duration, warm)
    r["fanout"] = fanout
    return r


def chain_latency(c: Costs, k: int, n: int = 20) -> float:
    """Lone tasks one after another through a chain of k nodes (workers on the last only): ms each."""
    m = Model(c, [0] * (k - 1) + [1], 1, 0.0)
    done_at = []

    def one(i: int) -> None:
        if i == n:
            return
        m.submit(1, at=m.sim.now, step=1)
        done_at.append(m.sim.now)

    orig = m._client_results

    def results(rs):
        orig(rs)
        m.sim.at(m.sim.now, one, len(done_at))
    m.root_up = m.nodes[0].up.deliver = results
    m.sim.at(0.0, one, 0)
    m.sim.run(10.0)
    times = [m.t_done[i] - m.t_submit[i] for i in range(n) if i in m.t_done]
    return statistics.median(times) * 1e3


def calibrate_wire(m: dict) -> float:
    """One-way wire delay that makes the model's chain slope match the measured ms per hop."""
    c0 = Costs(m, wire=0.0)
    ks = [1, 2, 4, 8]
    ys = [chain_latency(c0, k) for k in ks]
    s0 = _slope([k - 1 for k in ks], ys)
    return max(0.0, (m["hop_ms"] - s0) / 2 * 1e-3)


def _slope(xs, ys):
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def finite_map(c: Costs, workers: List[int], fanout: int, task_time: float, n: int, **kw) -> dict:
    """A map of ``n`` tasks to the end: makespan against the ideal n*T/workers (the tail)."""
    m = Model(c, workers, fanout, task_time, **kw)
    m.submit(n)
    m.window_lo, m.window_hi = 0.0, math.inf
    m.sim.at(0.0, m._sample, 0.005)
    m.sim.run(n * task_time * 4 / max(1, sum(workers)) + 5)
    end = max(m.t_done.values()) if len(m.t_done) == n else math.inf
    ideal = n * task_time / sum(w for w in workers)
    per_node = [sum(w.busy_time for w in nd.workers) / len(nd.workers) / end
                for nd in m.nodes if nd.workers]
    return {"makespan_s": end, "ideal_s": ideal, "efficiency": ideal / end,
            "min_node_busy": min(per_node), "max_node_busy": max(per_node)}


def lost_node(c: Costs, workers: List[int], fanout: int, task_time: float, k: int, detect: float,
              at: float = 0.5, after: float = 1.5) -> dict:
    """Node ``k`` dies at ``at``; its parent notices ``detect`` s later."""
    m = Model(c, workers, fanout, task_time)
    duration = at + detect + after
    w = sum(workers)
    m.submit(int(w / task_time * duration * 1.2) + 4 * w)
    m.lose(k, at, detect)
    m.window_lo, m.window_hi = 0.0, math.inf
    m.sim.at(0.0, m._sample, 0.01)
    m.sim.run(duration)
    lost = sum(len(nd.workers) for nd in m.nodes if nd.dead)
    done = sorted(m.t_done.values())

    def rate(lo, hi):
        return sum(1 for t in done if lo <= t < hi) / (hi - lo)
    lat = [m.t_done[t] - m.t_dispatch[t] for t in m.t_done if t in m.t_dispatch]
    return {"node": k, "workers_lost": lost, "workers": w, "detect_s": detect,
            "rate_before": rate(0.2, at), "rate_during": rate(at, at + detect),
            "rate_after": rate(at + detect + 0.2, duration), "replaced": m.replaced,
            "max_latency_s": max(lat), "unfinished": len(m.t_submit) - len(m.t_done)}


# -- the study ------------------------------------------------------------------------------------------
def capacity_before(workers: int, win: int, avg: Optional[float]) -> int:
    """``scheduler.link_capacity`` before the scale model: one spare task per link."""
    return workers * win + (1 if avg is not None and avg < 0.1 else 0) if workers > 0 else 0


def capacity_spare_always(workers: int, win: int, avg: Optional[float]) -> int:
    """A spare per worker whatever the (known) task length (not the scheduler's rule: hoards long tasks)."""
    return workers * win + (workers if avg is not None else 0) if workers > 0 else 0


POLICIES: Dict[str, dict] = {
    "+1 per link (before)": {"capacity": capacity_before},
    "+1 per worker (now)": {},                      # scheduler.link_capacity
    "spare for long tasks too": {"capacity": capacity_spare_always},
    "window 1": {"prefetch": 1, "capacity": capacity_before},
    "window 3": {"prefetch": 3},
    "hold half": {"hold": True},                    # send to a link once half its spare credit is free
}


def study(c: Costs, quick: bool = False, log=print) -> dict:
    """Every scenario of RESULTS.md's "Scale model" section."""
    out: dict = {"costs": c.as_dict(), "scale": [], "search": [], "clients": [], "slow": [], "lost": [],
                 "chain": {}}
    for k in (1, 2, 4, 8):
        out["chain"][k] = chain_latency(c, k)
    log(f"chain ms (model): {out['chain']}")
    sizes = [10, 30, 100, 300] if quick else [10, 30, 100, 300, 1000]
    for chunk, pols in ((1, ("+1 per link (before)", "+1 per worker (now)")),
                        (16, ("+1 per worker (now)", "spare for long tasks too"))):
        for f in (2, 4, 8, 16, 32):
            for n in sizes:
                if depth_of(n, f) > 4 or (f > n - 1 and n > 10):
                    continue
                for pol in pols:
                    r = steady(c, worker_counts(n), f, 0.010, chunk=chunk, **POLICIES[pol])
                    r["policy"] = pol
                    out["scale"].append(r)
                    log(f"scale n={n} f={f} chunk={chunk} {pol}: busy {r['busy']:.3f} {r['items_s']:.0f} "
                        f"items/s root cpu {r['root_cpu']:.2f} client {r['client_cpu']:.2f} "
                        f"q {r['root_queue_mean']:.0f}")
    n = 300 if quick else 1000
    for chunk in ((1, 16) if quick else (1, 4, 8, 16, 32)):
        for f in ((8, 32) if quick else (8, 16, 32)):
            for pol, kw in POLICIES.items():
                r = steady(c, worker_counts(n), f, 0.010, chunk=chunk, **kw)
                r["policy"] = pol
                out["search"].append(r)
                log(f"search n={n} f={f} chunk={chunk} {pol}: busy {r['busy']:.3f} idle-while-waiting "
                    f"{r['idle_while_waiting']:.3f} lat {r['latency_ms_median']:.1f} ms")
    # as if the client cost nothing (many clients): what limits next
    free = Costs.__new__(Costs)
    free.__dict__.update(c.__dict__, client_task=0.0, client_msg=0.0, client_item=0.0)
    for f in (8, 16, 32):
        for pol in ("+1 per link (before)", "+1 per worker (now)", "spare for long tasks too"):
            r = steady(free, worker_counts(n), f, 0.010, **POLICIES[pol])
            r["policy"] = pol
            out["clients"].append(r)
            log(f"free client n={n} f={f} {pol}: busy {r['busy']:.3f} root cpu {r['root_cpu']:.2f} "
                f"lat {r['latency_ms_median']:.1f} ms")
    for pol in ("+1 per link (before)", "+1 per worker (now)", "window 1"):
        r = finite_map(c, worker_counts(20), 4, 0.010, 5000 if quick else 20000, slow={5: 4.0},
                       **POLICIES[pol])
        r["policy"] = pol
        out["slow"].append(r)
        log(f"slow node (4x, node 5 of 20) {pol}: {r}")
    for k, what in ((99, "leaf"), (3, "interior")):
        r = lost_node(c, worker_counts(100), 8, 0.010, k, detect=5.0 if not quick else 1.0)
        r["what"] = what
        out["lost"].append(r)
        log(f"lost {what}: {r}")
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = {2: "C0", 4: "C1", 8: "C2", 16: "C3", 32: "C4"}
    for ax, chunk, title, dashed in (
            (axes[0], 1, "10 ms tasks, one client", "+1 per link (before)"),
            (axes[1], 16, "10 ms items, map(chunksize=16)", "spare for long tasks too")):
        for f in colors:
            for pol in sorted({r["policy"] for r in res["scale"] if r["chunk"] == chunk}):
                rs = sorted((r for r in res["scale"] if r["fanout"] == f and r["chunk"] == chunk
                             and r["policy"] == pol), key=lambda r: r["nodes"])
                if rs:
                    ax.plot([r["nodes"] for r in rs], [r["busy"] for r in rs],
                            "o--" if pol == dashed else "o-", color=colors[f], alpha=0.6 if pol == dashed else 1,
                            label=f"fan-out {f}" + (f", {pol}" if pol == dashed else ""))
        ax.axhline(0.9, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("nodes (1, 2 or 4 workers each; depth <= 4)")
        ax.set_ylabel("workers' busy share")
        ax.set_title(title + " (solid: scheduler now)")
        ax.legend(fontsize=7)
    ax = axes[2]
    n = max(r["nodes"] for r in res["search"])
    for k, pol in enumerate(POLICIES):
        for f, mk in ((8, "o-"), (32, "s--")):
            rs = sorted((r for r in res["search"] if r["policy"] == pol and r["fanout"] == f),
                        key=lambda r: r["chunk"])
            if rs:
                ax.plot([r["chunk"] for r in rs], [r["busy"] for r in rs], mk, color=f"C{k}",
                        label=f"{pol}, f={f}")
    ax.axhline(0.9, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("chunksize (10 ms items per task)")
    ax.set_title(f"{n} nodes, one client: policy and chunk size")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def report(res: dict) -> str:
    """Markdown tables of a study (pasted into RESULTS.md's "Scale model" section)."""
    def f(x, nd=2):
        return "" if x is None else (f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}")
    out = ["| nodes | fan-out | depth | workers | chunk | policy | busy | items/s | in-tree latency ms "
           "(median) | root queue (mean) | idle while work waits | least busy node | root CPU | "
           "client CPU |", "|" + "---|" * 14]
    for r in res["scale"]:
        out.append(f"| {r['nodes']} | {r['fanout']} | {r['depth']} | {r['workers']} | {r['chunk']} | "
                   f"{r['policy']} | {f(r['busy'])} | {f(r['items_s'], 0)} | {f(r['latency_ms_median'], 1)} | "
                   f"{f(r['root_queue_mean'], 0)} | {f(r['idle_while_waiting'])} | {f(r['min_node_busy'])} | "
                   f"{f(r['root_cpu'])} | {f(r['client_cpu'])} |")
    out += ["", "| fan-out | chunk | " + " | ".join(POLICIES) + " |", "|" + "---|" * (2 + len(POLICIES))]
    keys = sorted({(r["fanout"], r["chunk"]) for r in res["search"]}, key=lambda k: (k[1], k[0]))
    for fo, ch in keys:
        cells = []
        for pol in POLICIES:
            rs = [r for r in res["search"] if r["fanout"] == fo and r["chunk"] == ch and r["policy"] == pol]
            cells.append(f"{rs[0]['busy']:.3f}" if rs else "")
        out.append(f"| {fo} | {ch} | " + " | ".join(cells) + " |")
    out += ["", "| fan-out | policy | busy | root CPU | in-tree latency ms |", "|---|---|---|---|---|"]
    for r in res["clients"]:
        out.append(f"| {r['fanout']} | {r['policy']} | {f(r['busy'])} | {f(r['root_cpu'])} | "
                   f"{f(r['latency_ms_median'], 1)} |")
    out += ["", "| policy | makespan s | ideal s | efficiency | least busy node | busiest node |",
            "|---|---|---|---|---|---|"]
    for r in res["slow"]:
        out.append(f"| {r['policy']} | {f(r['makespan_s'])} | {f(r['ideal_s'])} | {f(r['efficiency'])} | "
                   f"{f(r['min_node_busy'])} | {f(r['max_node_busy'])} |")
    out += ["", "| lost | workers lost | detect s | tasks/s before | during | after | re-placed | "
            "slowest task s |", "|---|---|---|---|---|---|---|---|"]
    for r in res["lost"]:
        out.append(f"| {r['what']} (node {r['node']}) | {r['workers_lost']} of {r['workers']} | "
                   f"{f(r['detect_s'], 1)} | {f(r['rate_before'], 0)} | {f(r['rate_during'], 0)} | "
                   f"{f(r['rate_after'], 0)} | {r['replaced']} | {f(r['max_latency_s'])} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="pydist scale model (see the module docstring)")
    ap.add_argument("--inputs", default=os.path.join(HERE, "sim_inputs.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "sim_results.json"))
    ap.add_argument("--png", default=os.path.join(HERE, "scale.png"))
    ap.add_argument("--wire-us", type=float, default=None,
                    help="one-way network delay per call (default: calibrated to the measured hop)")
    ap.add_argument("--quick", action="store_true", help="fewer and smaller trees (a smoke run)")
    ap.add_argument("--report", metavar="JSON", help="only print the tables of an earlier run")
    a = ap.parse_args(argv)
    if a.report:
        with open(a.report) as f:
            print(report(json.load(f)))
        return 0
    with open(a.inputs) as f:
        inputs = json.load(f)
    m = inputs["median"]
    wire = a.wire_us * 1e-6 if a.wire_us is not None else calibrate_wire(m)
    c = Costs(m, wire=wire)
    print(f"inputs measured {inputs.get('measured')}: hop {m['hop_ms']:.3f} ms, wire {wire * 1e6:.0f} us")
    t = time.perf_counter()
    res = study(c, quick=a.quick)
    res["inputs"] = inputs
    res["wire_us"] = wire * 1e6
    res["wall_s"] = time.perf_counter() - t
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    if a.png:
        plot(res, a.png)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(report(res))
    print(f"done in {res['wall_s']:.0f} s: {a.out}, {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
