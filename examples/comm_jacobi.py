"""Jacobi iteration on a 1-D rod split over ranks: halo exchange with sendrecv, convergence with allreduce.

    python examples/comm_jacobi.py [ranks]

Solves u'' = 0 on [0, 1] with u(0) = 0, u(1) = 1 (the answer is u(x) = x).  Each rank owns a slice of
the grid plus one ghost cell on each side, swaps edge values with its neighbours every sweep (a halo
exchange) and stops when the largest change anywhere (an allreduce with max) is small.
"""
import sys

from pydist import ClusterExecutor


def jacobi(comm, n_total, tol, max_iter):
    r, p = comm.rank, comm.size
    lo, hi = r * n_total // p, (r + 1) * n_total // p          # my interior points: lo..hi-1
    h = 1.0 / (n_total + 1)
    u = [0.0] * (hi - lo + 2)                                    # u[0], u[-1]: ghost cells
    if r == p - 1:
        u[-1] = 1.0                                              # boundary condition u(1) = 1
    left = r - 1 if r > 0 else None
    right = r + 1 if r < p - 1 else None
    for it in range(max_iter):
        # halo exchange: send my edge values, receive my neighbours' into the ghost cells
        if right is not None:
            u[-1] = comm.sendrecv(u[-2], dest=right, sendtag=0, source=right, recvtag=1, timeout=60)
        if left is not None:
            u[0] = comm.sendrecv(u[1], dest=left, sendtag=1, source=left, recvtag=0, timeout=60)
        new = [u[0]] + [(u[i - 1] + u[i + 1]) / 2 for i in range(1, len(u) - 1)] + [u[-1]]
        change = max(abs(a - b) for a, b in zip(new, u))
        u = new
        if comm.allreduce(change, op=max, timeout=60) < tol:
            break
    err = max(abs(u[i] - (lo + i) * h) for i in range(1, len(u) - 1))
    return it + 1, comm.allreduce(err, op=max, timeout=60)


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    with ClusterExecutor(max_workers=size) as ex:
        out = ex.spawn_group(jacobi, size, 24, 1e-9, 20000).results(timeout=300)
    iters, err = out[0]
    assert all(o == out[0] for o in out), out
    assert err < 1e-5, err
    print(f"jacobi on {size} ranks: converged in {iters} sweeps, max error {err:.2e}")
