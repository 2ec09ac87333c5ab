"""Large task arguments through shared memory (pydist.wire.to_shared, issue #15).

A client whose entry node is on its machine puts each large out-of-band buffer into a memfd and sends
its name; the worker reads it.  Matrix: (where) client -> local worker, forwarded to a child node, a
client that turned it off  x  (how it ends) result, task error, cancel, executor shutdown; each ends
with the right value and no memfd left open in the client.  Plus the node's checks: a reference that
is not one, and a descriptor reused since (its inode differs) fail the task, never feed it other data.
Real nodes on loopback; no sleeps for synchronisation.
"""
from __future__ import annotations

import os

import cloudpickle
import pytest

from pydist import ClusterExecutor, LocalCluster, security, wire
from conftest import gated, wait_for

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def digest(b):
    import hashlib

    return type(b).__name__, len(b), hashlib.sha256(b).hexdigest()


def boom(b):
    raise ValueError(f"no thanks ({len(b)} bytes)")


def _sha(b):
    import hashlib

    return hashlib.sha256(b).hexdigest()


def memfds() -> int:
    """memfds this process holds open (ours are named pydist-arg)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "pydist-arg" in os.readlink(f"/proc/self/fd/{fd}"):
                n += 1
        except OSError:
            pass
    return n


needs_memfd = pytest.mark.skipif(wire.host_identity() is None, reason="no memfd / /proc here")


# ------------------------------------------------------------------------------------ pure
@needs_memfd
def test_to_shared_round_trip_and_small_buffers_stay_inline():
    big, small = os.urandom(2 * MIB), os.urandom(300 * 1024)
    payload = wire.dumps_call((big, small), {})
    assert isinstance(payload, list)
    shared, fds = wire.to_shared(payload)
    try:
        assert len(fds) == 1 and isinstance(shared[1], str) and shared[2] == small
        args, _ = wire.loads_payload(shared)
        assert args == (big, small) and type(args[0]) is bytes
        assert wire.payload_size(shared) < 400 * 1024   # the node counts the reference, not the bytes
        assert wire.from_shared(shared)[1] == big
    finally:
        for fd in fds:
            os.close(fd)


@needs_memfd
def test_a_reused_descriptor_is_refused_not_read():
    shared, fds = wire.to_shared(wire.dumps_call((os.urandom(2 * MIB),), {}))
    ref = shared[1]
    os.close(fds[0])
    other = os.memfd_create("pydist-arg")   # very likely the same number
    try:
        os.write(other, b"someone else's data")
        assert os.fstat(other).st_ino != int(ref.split("#")[1])
        with pytest.raises(OSError, match="gone|cannot open"):
            wire.read_shared(ref)   # (its number now names another memfd, or nothing)
        with pytest.raises(ValueError):
            wire.read_shared("/etc/passwd")
    finally:
        os.close(other)


# ------------------------------------------------------------------------------------ through a cluster
@needs_memfd
def test_large_arguments_reach_local_workers_and_memfds_close(fresh_cluster, gate):
    c = fresh_cluster(workers_per_node=2)
    blobs = [os.urandom(2 * MIB + i) for i in range(6)]
    with ClusterExecutor(c.address, secret=c.secret) as ex:
        assert ex._core._shm_ok
        assert [f.result(30) for f in [ex.submit(digest, b) for b in blobs]] == [digest(b) for b in blobs]
        wait_for(lambda: memfds() == 0, 10, "the client to close the memfds of finished tasks")
        with pytest.raises(ValueError, match="no thanks"):
            ex.submit(boom, blobs[0]).result(30)
        # two blockers hold both workers; a third task with a big argument waits in the node's queue
        held = [ex.submit(gated, gate.path, k, gate.started(k)) for k in ("a", "b")]
        wait_for(lambda: all(os.path.exists(gate.started(k)) for k in ("a", "b")), 20, "both workers busy")
        queued = ex.submit(digest, blobs[1])
        assert queued.cancel()
        gate.open()
        assert [f.result(30) for f in held] == ["a", "b"]
        wait_for(lambda: memfds() == 0, 10, "the client to close the memfds of failed and cancelled tasks")
        pending = ex.submit(digest, blobs[2])
    assert pending.result(0) == digest(blobs[2])   # shutdown(wait=True) waited for it
    assert memfds() == 0


@needs_memfd
def test_large_argument_forwarded_to_a_child_node_arrives_whole():
    with LocalCluster(nodes=2, workers_per_node=[0, 1]) as c:   # the head has no workers: every task hops
        with ClusterExecutor(c.address, secret=c.secret) as ex:
            b = os.urandom(3 * MIB)
            assert ex.submit(digest, b).result(30) == digest(b)
        assert memfds() == 0


def test_client_with_shared_memory_off_sends_the_bytes(fresh_cluster, monkeypatch):
    monkeypatch.setenv("PYDIST_SHARED_MEMORY", "0")
    c = fresh_cluster(workers_per_node=1)
    with ClusterExecutor(c.address, secret=c.secret) as ex:
        assert not ex._core._shm_ok
        b = os.urandom(2 * MIB)
        assert ex.submit(digest, b).result(30) == digest(b)
        assert memfds() == 0


def test_node_refuses_a_payload_part_that_is_not_a_reference(fresh_cluster):
    c = fresh_cluster(workers_per_node=1)
    p = security.connect(c.address, secret=c.secret, call_timeout=10)
    try:
        p.open_client("c-bad")
        fn = cloudpickle.dumps(digest)
        pickled = wire.dumps_call((b"x",), {})
        for part in ("/etc/passwd", "/proc/1/fd/3", "../../x#1"):
            with pytest.raises(TypeError, match="payload"):
                p.submit("c-bad", {"d": fn}, [("c-bad.0", "d", [pickled, part], None, 0, [], 0, "c-bad")])
        assert p.status()["held"] == 0
    finally:
        p._pyroRelease()


_MANY = r'''
import resource, sys
from pydist import ClusterExecutor, LocalCluster
resource.setrlimit(resource.RLIMIT_NOFILE, (400, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
def slow_len(b):
    import time
    time.sleep(0.002)
    return len(b)
with LocalCluster(nodes=1, workers_per_node=1) as c:
    with ClusterExecutor(address=c.address, secret=c.secret) as ex:
        fs = [ex.submit(slow_len, b"x" * (1 << 20)) for _ in range(600)]
        assert [f.result(120) for f in fs] == [1 << 20] * 600
print("ALL OK")
'''


def test_more_large_arguments_than_descriptors_still_run(tmp_path):
    """600 unfinished tasks with 1 MiB arguments in a client allowed 400 descriptors: memfds are capped
    (clientcore.SHM_MAX_TASKS) and the rest go in band, so submit never fails with EMFILE."""
    import subprocess
    import sys

    script = tmp_path / "many.py"
    script.write_text(_MANY)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stderr[-2000:]
