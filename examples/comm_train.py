"""Data-parallel training loop: every rank computes a gradient on its shard, allreduce averages it.

    python examples/comm_train.py [ranks]

Fits y = 3x + 2 by gradient descent; each rank holds a quarter of the data, and the model stays the
same on every rank because every rank applies the same averaged gradient (as with mpi4py/Horovod).
"""
import random
import sys

from pydist import ClusterExecutor


def add(a, b):
    return [x + y for x, y in zip(a, b)]


def train(comm, steps, lr):
    rng = random.Random(comm.rank)
    xs = [rng.uniform(-1, 1) for _ in range(250)]
    data = [(x, 3 * x + 2 + rng.gauss(0, 0.01)) for x in xs]
    w, b = comm.bcast([0.0, 0.0] if comm.rank == 0 else None)   # one initial model for all
    for _ in range(steps):
        gw = sum(2 * (w * x + b - y) * x for x, y in data) / len(data)
        gb = sum(2 * (w * x + b - y) for x, y in data) / len(data)
        gw, gb = (g / comm.size for g in comm.allreduce([gw, gb], op=add, timeout=60))
        w, b = w - lr * gw, b - lr * gb
    return round(w, 3), round(b, 3)


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    with ClusterExecutor(max_workers=size) as ex:
        models = ex.spawn_group(train, size, 300, 0.5).results(timeout=300)
    assert len(set(models)) == 1, models           # every rank holds the same model
    w, b = models[0]
    assert abs(w - 3) < 0.05 and abs(b - 2) < 0.05, models[0]
    print(f"trained on {size} ranks: w={w}, b={b}")
