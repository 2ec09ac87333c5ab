"""pydist quickstart: estimate pi on an embedded local cluster, and show who ran what.

    python -m pip install -e . && python examples/quickstart.py

``ClusterExecutor()`` with no address starts a private cluster on this machine (a Pyro5 name server
and one pydist node with a worker per CPU, on loopback, with a random secret) and stops it on exit.
Give it an address (``ClusterExecutor(address="head-host:9000", secret=...)``) to use a real cluster instead:
the code below does not change.
"""
import collections
import random
import sys
import time

from pydist import ClusterExecutor, task_context


def throw_darts(seed: int, n: int = 50_000):
    """Count darts landing inside the unit quarter circle; report where this chunk ran."""
    rng = random.Random(seed)
    inside = sum(1 for _ in range(n) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    ctx = task_context()
    return inside, n, ctx.node, ctx.worker


def main() -> int:
    chunks = 64
    t0 = time.perf_counter()
    with ClusterExecutor() as ex:
        results = list(ex.map(throw_darts, range(chunks)))
    elapsed = time.perf_counter() - t0
    inside = sum(r[0] for r in results)
    total = sum(r[1] for r in results)
    pi = 4 * inside / total
    print(f"pi ~= {pi:.5f} from {total:,} darts in {chunks} tasks ({elapsed:.2f} s, cluster start and stop included)")
    tally = collections.Counter((node, worker) for _, _, node, worker in results)
    print("who ran what:")
    for (node, worker), count in sorted(tally.items()):
        print(f"  node {node:10s} worker {worker}: {count} tasks")
    return 0 if abs(pi - 3.14159) < 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
