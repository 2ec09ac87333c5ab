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


# ------------------------------------------------------------------------------------ mpi4py's API
def _api(comm):
    from pydist.comm import Request, Status

    r, n = comm.rank, comm.size
    out = {}
    right, left = (r + 1) % n, (r - 1) % n
    out["sendrecv"] = comm.sendrecv(r, dest=right, sendtag=1, source=left, recvtag=1, timeout=30)
    reqs = [comm.isend(("i", r, k), dest=right, tag=2) for k in range(3)]
    rr = [comm.irecv(source=left, tag=2) for _ in range(3)]
    out["irecv"] = Request.waitall(rr, timeout=30)
    Request.waitall(reqs, timeout=30)
    if r == 0:
        comm.send(b"abc", dest=1, tag=7)
    if r == 1:
        st = Status()
        comm.probe(source=0, tag=7, status=st, timeout=30)
        out["probe"] = (st.source, st.tag, st.size > 0, comm.iprobe(source=0, tag=7))
        out["probed_msg"] = comm.recv(source=0, tag=7, timeout=30)
        out["iprobe_after"] = comm.iprobe(source=0, tag=7)
    out["allgather"] = comm.allgather(r * 10, timeout=30)
    out["alltoall"] = comm.alltoall([(r, d) for d in range(n)], timeout=30)
    out["scan"] = comm.scan(r + 1, timeout=30)
    out["exscan"] = comm.exscan(r + 1, timeout=30)
    out["reduce_root2"] = comm.reduce([r], op=lambda a, b: a + b, root=2, timeout=30)
    out["bcast_root3"] = comm.bcast({"k": r} if r == 3 else None, root=3, timeout=30)
    sub = comm.split(color=r % 2, key=-r)
    out["split"] = (sub.rank, sub.size, sub.allgather(r, timeout=30))
    out["self"] = comm.sendrecv(("me", r), dest=r, source=r, timeout=30)
    out["lambda"] = comm.bcast((lambda x: x * 3) if r == 0 else None)(r)
    out["comm()"] = pydist.comm() is comm
    return out


def test_mpi4py_api_against_single_process_reference(ex):
    out = ex.spawn_group(_api, 4).results(timeout=90)
    n = 4
    for r, o in enumerate(out):
        assert o["sendrecv"] == (r - 1) % n
        assert o["irecv"] == [("i", (r - 1) % n, k) for k in range(3)]
        assert o["allgather"] == [0, 10, 20, 30]
        assert o["alltoall"] == [(s, r) for s in range(n)]
        assert o["scan"] == sum(range(1, r + 2))
        assert o["exscan"] == (None if r == 0 else sum(range(1, r + 1)))
        assert o["reduce_root2"] == ([0, 1, 2, 3] if r == 2 else None)
        assert o["bcast_root3"] == {"k": 3}
        members = sorted([q for q in range(n) if q % 2 == r % 2], key=lambda q: -q)
        assert o["split"] == (members.index(r), 2, members)
        assert o["self"] == ("me", r)
        assert o["lambda"] == 3 * r
        assert o["comm()"] is True
    assert out[1]["probe"] == (0, 7, True, True)
    assert out[1]["probed_msg"] == b"abc" and out[1]["iprobe_after"] is False


def _collective_timeout(comm):
    if comm.rank == 0:
        with pytest.raises(CommTimeout):
            comm.bcast(None, root=1, timeout=0.3)
    return "ok"


def test_collectives_take_a_timeout(ex):
    assert ex.spawn_group(_collective_timeout, 2).results(timeout=60) == ["ok", "ok"]


def _collective_timeout_text(comm):
    texts = {}
    if comm.rank == 0:
        for name, call in (("bcast", lambda: comm.bcast(None, root=1, timeout=0.3)),
                           ("barrier", lambda: comm.barrier(timeout=0.3)),
                           ("allreduce", lambda: comm.allreduce(1, timeout=0.3)),
                           ("gather", lambda: comm.gather(1, root=0, timeout=0.3))):
            try:
                call()
            except CommTimeout as exc:
                texts[name] = str(exc)
    return texts


def test_a_collective_timeout_names_the_collective_and_the_timeout_given(ex):
    """Not the collective's internal tag nor the time left for its last step (what a recv said)."""
    texts = ex.spawn_group(_collective_timeout_text, 2).results(timeout=60)[0]
    assert set(texts) == {"bcast", "barrier", "allreduce", "gather"}, texts
    for name, text in texts.items():
        assert f"{name} did not complete within 0.3 s" in text, text
        assert "rank 1" in text and "tag" not in text, text


def _big_numpy(comm, n):
    import numpy as np

    if comm.rank < 2:
        a = np.arange(n, dtype=np.float64)
        comm.send(a, dest=comm.rank + 2)
        return float(a.sum()), pydist.task_context().node
    a = comm.recv(source=comm.rank - 2, timeout=60)
    a[0] += 1   # arrives writable
    return float(a.sum()) - 1, pydist.task_context().node


def test_32mib_numpy_across_nodes(ex):
    pytest.importorskip("numpy")
    out = ex.spawn_group(_big_numpy, 4, 4 << 20).results(timeout=90)
    assert out[2][0] == out[0][0] and out[3][0] == out[1][0]
    assert out[0][1] != out[2][1]      # really across nodes


def test_every_collective_with_ranks_over_three_nodes():
    with LocalCluster(nodes=3, workers_per_node=[2, 1, 1]) as c, ClusterExecutor(c.address, secret=c.secret) as e:
        out = e.spawn_group(_where_and_api, 4).results(timeout=90)   # under the module timeout: a slow group fails here
    assert len({node for node, _ in out}) == 3
    assert all(o["allgather"] == [0, 10, 20, 30] and o["bcast_root3"] == {"k": 3} for _, o in out)
    assert [o["scan"] for _, o in out] == [1, 3, 6, 10]


def _where_and_api(comm):
    return pydist.task_context().node, _api(comm)
