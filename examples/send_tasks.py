"""Send tasks to a pydist cluster started by hand, and show which node ran what.

The fourth terminal of ``examples/spawn_node.sh`` (a name server, a head and a child)::

    python examples/send_tasks.py --ns 127.0.0.1:9090 --secret-file secret
    python examples/send_tasks.py --ns 127.0.0.1:9090 --secret-file secret --tasks 200 --sleep 0.05

Every task sleeps a little, then reports where it ran (``pydist.task_context()``: node, worker, hops
travelled, path through the tree).  The head runs some of them on its own workers and passes the rest
down to its children; a child's tasks arrive with ``hops`` 1 and path ``['head']``.  The secret can also
come from ``PYDIST_SECRET``.
"""
import argparse
import collections
import sys
import time

import pydist
from pydist import ClusterExecutor, task_context


def work(i: int, seconds: float):
    """A stand-in for real work: sleep, then say where this ran."""
    t0 = time.time()
    time.sleep(seconds)
    ctx = task_context()
    return i, i * i, ctx.node, ctx.worker, ctx.hops, list(ctx.path), t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--ns", help="the name server, HOST:PORT (finds the head)")
    where.add_argument("--node", help="a node's HOST:PORT to send the tasks to")
    ap.add_argument("--secret-file", help="file with the cluster secret (else env PYDIST_SECRET)")
    ap.add_argument("--tasks", type=int, default=20, help="how many tasks (default 20)")
    ap.add_argument("--sleep", type=float, default=0.2, help="seconds each task works (default 0.2)")
    ap.add_argument("--quiet", action="store_true", help="only the summary, not one line per task")
    a = ap.parse_args(argv)

    secret = pydist.security.load_secret(None, a.secret_file)
    t0 = time.perf_counter()
    kw = {"ns": a.ns} if a.ns else {}
    with ClusterExecutor(address=a.node, secret=secret, connect_timeout=10, **kw) as ex:
        futures = [ex.submit(work, i, a.sleep) for i in range(a.tasks)]
        results = []
        for fut in futures:   # in submission order
            i, sq, node, worker, hops, path, started = fut.result()
            if sq != i * i:
                print(f"task {i}: wrong result {sq}", file=sys.stderr)
                return 1
            results.append((i, node, worker, hops, path, started))
            if not a.quiet:
                route = " -> ".join(path + [node])
                print(f"task {i:4d} ran on {node:>8s} worker {worker}  hops {hops}  route {route}")
    elapsed = time.perf_counter() - t0

    print(f"\n{a.tasks} tasks of {a.sleep:g} s in {elapsed:.2f} s "
          f"(one worker would take {a.tasks * a.sleep:.1f} s)")
    per_node = collections.Counter(r[1] for r in results)
    per_worker = collections.Counter((r[1], r[2]) for r in results)
    hops = {r[1]: r[3] for r in results}
    print("who ran what:")
    for node in sorted(per_node, key=lambda n: (hops[n], n)):
        workers = ", ".join(f"w{w}: {c}" for (n, w), c in sorted(per_worker.items()) if n == node)
        print(f"  {node:>8s} (depth {hops[node]}): {per_node[node]:4d} tasks  [{workers}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
