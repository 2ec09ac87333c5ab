"""Task groups that talk like MPI ranks, on a real 2-node cluster."""
import pytest

import pydist
from pydist import ClusterExecutor, CommTimeout, LocalCluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ex():
    with LocalCluster(nodes=2, workers_per_node=2) as c, ClusterExecutor(address=c.address, secret=c.secret) as e:
        yield e


def _ring(comm):
    comm.send({"from": comm.rank}, to=(comm.rank + 1) % comm.size, tag=3)
    got = comm.recv(source=(comm.rank - 1) % comm.size, tag=3)
    return comm.rank, got["from"], pydist.task_context().node


def test_point_to_point_ring_across_nodes(ex):
    out = [f.result(timeout=60) for f in ex.spawn_group(_ring, 4)]
    assert [(r, src) for r, src, _ in out] == [(0, 3), (1, 0), (2, 1), (3, 2)]
    assert len({node for _, _, node in out}) == 2      # ranks really on both nodes


def _collectives(comm, base):
    total = comm.allreduce(comm.rank + base)
    comm.barrier()
    part = comm.scatter([i * i for i in range(comm.size)] if comm.rank == 0 else None)
    gathered = comm.gather(part + 1)
    cfg = comm.bcast({"lr": 0.1} if comm.rank == 0 else None)
    prod = comm.reduce(comm.rank + 1, op=lambda a, b: a * b)
    return total, part, gathered, cfg, prod


def test_collectives(ex):
    out = [f.result(timeout=60) for f in ex.spawn_group(_collectives, 4, 10)]
    assert all(o[0] == 46 for o in out)
    assert [o[1] for o in out] == [0, 1, 4, 9]
    assert out[0][2] == [1, 2, 5, 10] and all(o[2] is None for o in out[1:])
    assert all(o[3] == {"lr": 0.1} for o in out)
    assert out[0][4] == 24 and out[1][4] is None


def _messages_keep_order(comm):
    if comm.rank == 0:
        for i in range(50):
            comm.send(i, to=1)
        return None
    return [comm.recv(source=0) for _ in range(50)]


def test_order_between_two_ranks_is_kept(ex):
    fs = ex.spawn_group(_messages_keep_order, 2)
    assert fs[1].result(timeout=60) == list(range(50))


def _lonely(comm):
    return comm.recv(source=0, timeout=0.3) if comm.rank == 1 else "ok"


def test_recv_timeout_is_a_clear_error(ex):
    fs = ex.spawn_group(_lonely, 2)
    assert fs[0].result(timeout=60) == "ok"
    with pytest.raises(CommTimeout, match="no message from rank 0"):
        fs[1].result(timeout=60)


def test_group_larger_than_the_cluster_is_refused(ex):
    with pytest.raises(ValueError, match="must run at once"):
        ex.spawn_group(_ring, 99)


def _digest(b):
    import hashlib

    return len(b), hashlib.sha256(b).hexdigest(), pydist.task_context().node


def test_large_arguments_cross_nodes_intact(ex):
    """16 MiB arguments, sent out of band, through the root and over a link to the child."""
    import hashlib
    import os

    blobs = [os.urandom(16 << 20) for _ in range(2)]
    out = list(ex.map(_digest, blobs * 4))
    assert [(n, h) for n, h, _ in out] == [(len(b), hashlib.sha256(b).hexdigest()) for b in blobs * 4]
