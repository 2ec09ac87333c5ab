"""A token goes around a ring of ranks: point to point messages, MPI style (issue 12's README example).

    python examples/comm_ring.py [ranks]

mpi4py: ``mpiexec -n 4 python ring.py`` with ``comm = MPI.COMM_WORLD``; here the ranks are a task group.
"""
import sys

from pydist import ClusterExecutor


def ring(comm, laps):
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    token = 0
    for _ in range(laps):
        if comm.rank == 0:
            comm.send(token + 1, dest=right, tag=1)
            token = comm.recv(source=left, tag=1, timeout=60)
        else:
            token = comm.recv(source=left, tag=1, timeout=60)
            comm.send(token + 1, dest=right, tag=1)
    # the same exchange without a deadlock risk: every rank sends and receives at once
    neighbour = comm.sendrecv(comm.rank, dest=right, source=left, timeout=60)
    return token, neighbour


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    laps = 10
    with ClusterExecutor(max_workers=size) as ex:
        out = ex.spawn_group(ring, size, laps).results(timeout=120)
    assert out[0][0] == laps * size, out
    assert [n for _, n in out] == [(r - 1) % size for r in range(size)], out
    print(f"ring of {size} ranks: token made {laps} laps, value {out[0][0]}")
