"""Issue #11: what a peer can make a node (or a client) spend, and who on the machine can get in.

One test per finding of the red-team pass, each against REAL ``pydist-node`` processes on loopback (or a
rogue server socket in this process), measuring the node with psutil before and after the hostile run:
RSS, peak RSS (``VmHWM``), CPU seconds and open descriptors.  Run with ``-s`` to see the numbers.  Every
test failed on the code before the fix (the commit that added them says how).
"""
from __future__ import annotations

import hashlib
import io
import marshal
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time

import psutil
import pytest
from Pyro5 import protocol

from pydist import ClusterExecutor, LocalCluster
from pydist import security as S
from pydist.codesync import CodeStore
from pydist.errors import (AuthenticationError, BundleTooLarge, ClusterUnavailable, CodeSyncError, ResourceLimit,
                           UnsafeArchive)
from conftest import wait_for
from test_hostile import NodeProc, node_env, read_reply, reply_type

pytestmark = [pytest.mark.timeout(180), pytest.mark.one_python]

SECRET = b"hardening-test-secret-" + b"y" * 24
MIB = 1 << 20
HDR = protocol._header_size


def usage(pid: int) -> dict:
    """RSS, peak RSS (VmHWM), CPU seconds (user+system) and open descriptors of a process."""
    p = psutil.Process(pid)
    t = p.cpu_times()
    hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return {"rss": p.memory_info().rss, "hwm": hwm, "cpu": t.user + t.system, "fds": p.num_fds()}


def report(name: str, before: dict, after: dict, extra: str = "") -> str:
    line = (f"[hostile:{name}] node RSS {before['rss'] / MIB:.1f} -> {after['rss'] / MIB:.1f} MiB, peak "
            f"{before['hwm'] / MIB:.1f} -> {after['hwm'] / MIB:.1f} MiB, CPU +{after['cpu'] - before['cpu']:.2f} s, "
            f"fds {before['fds']} -> {after['fds']}{extra}")
    print("\n" + line)
    out = os.environ.get("PYDIST_HARDENING_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    return line


@pytest.fixture
def start_node(tmp_path, monkeypatch):
    monkeypatch.delenv("PYDIST_SECRET", raising=False)
    monkeypatch.delenv("PYDIST_INSECURE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    S.configure_pyro(tls=None)
    started = []

    def start(*args, secret=SECRET, env=None):
        e = node_env(secret)
        e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
        e.update(env or {})
        n = NodeProc(list(args), e, tmp_path / f"node{len(started)}.log")
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()


def frame(payload: bytes, ser: int = 2, msgtype: int = protocol.MSG_CONNECT) -> bytes:
    return struct.pack(protocol._header_format, b"PYRO", protocol.PROTOCOL_VERSION, msgtype, ser, 0, 0,
                       len(payload), 0, b"\0" * 16, 0, 0x4DC5) + payload


def send_raw(address: str, data: bytes, timeout: float = 8.0) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return read_reply(s, timeout)


def square(x):
    return x * x


def served(address: str, secret=SECRET, n: int = 20) -> None:
    with ClusterExecutor(address, secret=secret, connect_timeout=10) as ex:
        assert list(ex.map(square, range(n), timeout=60)) == [x * x for x in range(n)]


# ------------------------------------------------------------------------------------------ 1. memory bomb
def marshal_tuple_bomb(depth: int, n: int = 1 << 24) -> bytes:
    """``depth`` nested marshal tuple headers announcing ``n`` items each, and nothing after: marshal
    allocates 8*n bytes per level before it finds out that the data ends."""
    return (b"(" + struct.pack("<i", n)) * depth


def test_marshal_bomb_in_the_hello_costs_the_node_nothing(start_node):
    node = start_node("--host", "127.0.0.2", "--log-level", "ERROR")
    before = usage(node.pid)
    for depth in (1, 2, 3) * 4:                       # each one: 128, 256, 384 MiB on a marshal decoder
        for bomb in (marshal_tuple_bomb(depth), b"\xa9" + marshal_tuple_bomb(depth)[1:]):
            assert reply_type(send_raw(node.address, frame(bomb))) != protocol.MSG_CONNECTOK
    after = usage(node.pid)
    report("marshal bomb x24", before, after)
    assert after["hwm"] - before["hwm"] < 16 * MIB, "a pre-auth frame made the node allocate"
    assert after["cpu"] - before["cpu"] < 1.0
    served(node.address)


ROGUE_CLIENT = r"""
import resource, sys
from pydist import security as S
addr = sys.argv[1]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    S.connect(addr, secret=b"whatever-secret", timeout=2)
    print("CONNECTED")
except Exception as exc:
    print(type(exc).__name__, str(exc)[:200].replace("\n", " "))
print("GREW", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


class RogueServer:
    """A TCP server in this process that answers every connection with the given bytes (a rogue 'node')."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                try:
                    c.settimeout(2)
                    c.recv(65536)
                    c.sendall(self.answer)
                    c.shutdown(socket.SHUT_WR)
                    c.recv(1)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("msgtype", [protocol.MSG_CONNECTOK, protocol.MSG_CONNECTFAIL])
def test_a_rogue_server_cannot_memory_bomb_a_client(msgtype):
    rogue = RogueServer(frame(marshal_tuple_bomb(3), ser=2, msgtype=msgtype))
    try:
        r = subprocess.run([sys.executable, "-c", ROGUE_CLIENT, rogue.address], capture_output=True, text=True,
                           timeout=60, env=node_env(None))
    finally:
        rogue.close()
    out = r.stdout.splitlines()
    assert out and out[-1].startswith("GREW"), r.stdout + r.stderr
    grew = int(out[-1].split()[1])
    print(f"\n[hostile:rogue server bomb, type {msgtype}] client peak RSS grew {grew} MiB; client saw: {out[0]}")
    assert "CONNECTED" not in out
    assert out[0].startswith("AuthenticationError") and "not a pydist node" in out[0]
    assert grew < 16, f"the client allocated {grew} MiB decoding a rogue reply"


# ------------------------------------------------------------------------------------------ 2. CPU burn
def test_integer_nonce_does_not_burn_cpu(start_node):
    node = start_node("--host", "127.0.0.2", "--log-level", "ERROR")
    hello = {"pydist": 1, "ver": "0", "py": "%d.%d" % sys.version_info[:2], "cp": "3.1", "nonce": 1 << 28,
             "ts": time.time(), "dst": node.address, "mac": b"\0" * 32}
    bomb = frame(marshal.dumps({"handshake": hello, "object": S.NODE_OBJECT_ID}))
    before = usage(node.pid)
    for _ in range(6):
        assert reply_type(send_raw(node.address, bomb)) != protocol.MSG_CONNECTOK
    after = usage(node.pid)
    report("integer nonce 2^28 x6", before, after)
    assert after["cpu"] - before["cpu"] < 0.5
    assert after["hwm"] - before["hwm"] < 16 * MIB
    served(node.address)


# ------------------------------------------------------------------------------------------ 3. accept thread
def test_full_pool_and_silent_peers_do_not_stall_accept_or_look_like_a_wrong_secret(start_node):
    node = start_node("--host", "127.0.0.2", "--threadpool", "4", "--log-level", "ERROR")
    held = [S.connect(node.address, secret=SECRET) for _ in range(4)]      # every server thread in use
    host, port = node.address.rsplit(":", 1)
    silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(20)]
    before = usage(node.pid)
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterUnavailable) as ei:        # busy: retried, then unavailable, never "auth"
            S.connect(node.address, secret=SECRET, timeout=1.5)
        refused_in = time.monotonic() - t0
        assert "busy" in str(ei.value) and "--threadpool" in str(ei.value)
        assert refused_in < 3.0
        S.release(held.pop())                                 # one thread free again
        t0 = time.monotonic()
        p = wait_for(lambda: S.connect(node.address, secret=SECRET, timeout=1.0), 10, "a free thread",
                     retry_on=(ClusterUnavailable,))
        got_in = time.monotonic() - t0
        assert p.describe()["name"]
        S.release(p)
        after = usage(node.pid)
        report("full pool + 20 silent peers", before, after,
               f"; busy refusal after {refused_in:.2f} s, legit client in {got_in:.2f} s")
        assert got_in < 2.0, f"a client waited {got_in:.1f} s behind 20 silent peers"
    finally:
        for s in silent:
            s.close()
        for p in held:
            S.release(p)


# ------------------------------------------------------------------------------------------ 5. log flood, leaks
def test_refusals_are_rate_limited_and_reveal_nothing_before_the_mac(start_node):
    node = start_node("--host", "127.0.0.2", "--name", "secret-name-of-node")
    before = usage(node.pid)
    replies = []
    for i in range(200):
        with pytest.raises(AuthenticationError):
            S.connect(node.address, secret=b"wrong-secret-%d" % i, timeout=2)
    # old-format hellos with a wrong protocol version and no valid MAC
    hello = {"pydist": 99, "ver": "0", "py": "2.7", "cp": "0.1", "nonce": b"\1" * 16, "ts": time.time(),
             "dst": node.address, "mac": b"\0" * 32}
    replies.append(send_raw(node.address, frame(marshal.dumps({"handshake": hello, "object": S.NODE_OBJECT_ID}))))
    from pydist import auth
    for versions in ({"pydist": 99, "ver": "9.9", "py": "2.7", "cp": "1"}, None):
        h, _ = auth.encode_hello(b"not-the-secret", node.address, S.NODE_OBJECT_ID, versions=versions)
        replies.append(send_raw(node.address, frame(h, ser=auth.HELLO_SERIALIZER)))
    after = usage(node.pid)
    report("200 wrong secrets + version probes", before, after)
    mine = S.local_versions()
    for r in replies:
        assert b"secret-name-of-node" not in r and mine["ver"].encode() not in r and b"Python" not in r, r
    lines = [l for l in node.log().splitlines() if "refused" in l]
    assert 1 <= len(lines) <= 3, lines                   # one line, then a count per interval
    served(node.address)


# ------------------------------------------------------------------------------------------ 6. sparse bundle
def sparse_bundle(tmp_path, apparent: int = 256 * MIB) -> bytes:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is needed to write a sparse archive member")
    src = tmp_path / "sparse-src"
    src.mkdir()
    with open(src / "big.bin", "wb") as f:
        f.truncate(apparent)
        f.seek(apparent - 1)
        f.write(b"x")
    out = tmp_path / "sparse.tar"
    r = subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(out), "-C", str(src), "big.bin"],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"tar could not write a sparse member: {r.stderr.decode()[:200]}")
    data = out.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        if not t.getmembers()[0].issparse():
            pytest.skip("tar did not write a sparse member")
    return data


def test_sparse_member_is_refused_before_anything_is_written(tmp_path):
    data = sparse_bundle(tmp_path)
    assert len(data) < 64 * 1024
    store = CodeStore(tmp_path / "cache", max_bytes=64 * MIB)
    with pytest.raises(UnsafeArchive, match="sparse"):
        store.install(hashlib.sha256(data).hexdigest(), data)
    used = sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(tmp_path / "cache") for f in fs)
    print(f"\n[hostile:sparse bundle] {len(data)} archive bytes for a 256 MiB member: {used} bytes on disk after")
    assert used < MIB


def test_extracted_size_and_file_count_are_bounded(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for i in range(50):
            info = tarfile.TarInfo(f"f{i}.txt")
            info.size = 1000
            t.addfile(info, io.BytesIO(b"a" * 1000))
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(BundleTooLarge, match="members"):
        CodeStore(tmp_path / "a", max_files=20).install(digest, data)
    with pytest.raises(BundleTooLarge, match="extracts to more than"):
        CodeStore(tmp_path / "b", max_bytes=len(data) + 1000).install(digest, data[:len(data)]) \
            if False else _extract_only(data, tmp_path / "c", max_bytes=20_000)


def _extract_only(data, dest, max_bytes):
    from pydist.codesync import safe_extract
    return safe_extract(data, str(dest), max_bytes=max_bytes)


# ------------------------------------------------------------------------------------------ 7. uploads, fds
def test_unfinished_uploads_are_bounded_and_hold_no_descriptor(start_node):
    node = start_node("--host", "127.0.0.2", "--log-level", "ERROR")
    p = S.connect(node.address, secret=SECRET)
    before = usage(node.pid)
    refused = 0
    for i in range(300):
        digest = hashlib.sha256(b"%d" % i).hexdigest()
        try:
            p.code_begin(digest, 1000)
        except CodeSyncError as exc:
            refused += 1
            assert "in progress" in str(exc)
    after = usage(node.pid)
    report("300 unfinished uploads", before, after, f"; {refused} refused at the bound")
    assert refused >= 250
    assert after["fds"] - before["fds"] < 8
    S.release(p)
    served(node.address)


# ------------------------------------------------------------------------------------------ 7, 8. uploads, code_read
def test_uploads_a_connection_left_unfinished_are_freed_when_it_ends(start_node, tmp_path):
    node = start_node("--host", "127.0.0.2", "--log-level", "ERROR", "--max-uploads-per-client", "3")
    cache = str(node.log_path) + ".code"
    parts = lambda: [n for n in os.listdir(cache) if n.startswith(".upload-")]      # noqa: E731
    p = S.connect(node.address, secret=SECRET)
    for i in range(3):
        p.code_begin(hashlib.sha256(b"u%d" % i).hexdigest(), 5000)
    with pytest.raises(CodeSyncError, match="this connection already has 3"):
        p.code_begin(hashlib.sha256(b"u9").hexdigest(), 5000)
    assert len(parts()) == 3
    S.release(p)
    wait_for(lambda: not parts(), 10, "the node to drop the uploads of the connection that ended")


def _bundle_of(size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("blob.bin")
        info.size = size
        t.addfile(info, io.BytesIO(os.urandom(size)))
    return buf.getvalue()


def test_code_read_and_code_size_read_only_what_they_return(start_node):
    node = start_node("--host", "127.0.0.2", "--log-level", "ERROR")
    data = _bundle_of(16 * MIB)
    digest = hashlib.sha256(data).hexdigest()
    p = S.connect(node.address, secret=SECRET)
    p.code_begin(digest, len(data))
    for off in range(0, len(data), 4 * MIB):
        p.code_chunk(digest, off, data[off:off + 4 * MIB])
    p.code_finish(digest, False)
    io0 = psutil.Process(node.pid).io_counters().read_chars
    before = usage(node.pid)
    assert p.code_size(digest) == len(data)
    got = b"".join(p.code_read(digest, off, MIB) for off in range(0, len(data), MIB))
    assert got == data
    for _ in range(20):
        p.code_size(digest)
    read = psutil.Process(node.pid).io_counters().read_chars - io0
    after = usage(node.pid)
    report("fetch a 16 MiB bundle in 1 MiB chunks + 21 code_size", before, after,
           f"; node read {read / MIB:.0f} MiB from disk")
    S.release(p)
    assert read < 3 * len(data), f"the node read {read / MIB:.0f} MiB to serve {len(data) / MIB:.0f} MiB"


# ------------------------------------------------------------------------------------------ 10. queued tasks, blobs
def _task(cid: str, i: int, fn: str, payload: bytes = b"\x80\x05N.") -> tuple:
    from pydist import wire
    return wire.make_task(f"{cid}.{i}", fn, payload, client=cid)


def _error_of(result: tuple) -> BaseException:
    from pydist import wire
    loads = getattr(wire, "loads_exception", wire.loads)
    return loads(result[wire.R_BLOB])


def _collect(p, cid: str, n: int, timeout: float = 30.0) -> dict:
    got: dict = {}
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        results, _ = p.collect(cid, 0.5)
        for r in results:
            got[r[0]] = r
    return got


def test_queued_tasks_are_bounded_per_client_with_a_clear_error(start_node, tmp_path):
    import cloudpickle
    from pydist import wire
    node = start_node("--host", "127.0.0.2", "--log-level", "ERROR", "--workers", "0",
                      "--max-client-tasks", "50", "--max-client-bytes", "1M")
    p = S.connect(node.address, secret=SECRET, call_timeout=15)
    cid = "quota-client"
    p.open_client(cid, None)
    fn = cloudpickle.dumps(square)
    before = usage(node.pid)
    assert p.submit(cid, {"f": fn}, [_task(cid, i, "f") for i in range(80)]) == 50   # no workers: they wait
    got = _collect(p, cid, 30)
    assert len(got) == 30 and all(r[wire.R_STATUS] != wire.OK for r in got.values())
    err = _error_of(next(iter(got.values())))
    assert isinstance(err, ResourceLimit) and "--max-client-tasks 50" in str(err), err
    # bytes: one task with a 2 MiB argument is refused by --max-client-bytes, the node keeps serving
    other = "quota-bytes"
    p.open_client(other, None)
    assert p.submit(other, {"f": fn}, [_task(other, 0, "f", b"x" * (2 * MIB))]) == 0
    err = _error_of(_collect(p, other, 1)[f"{other}.0"])
    assert isinstance(err, ResourceLimit) and "--max-client-bytes" in str(err), err
    st = p.status()
    assert st["held"] == 50 and st["refused_limit"] == 31
    p.close_client(cid)
    p.close_client(other)
    wait_for(lambda: p.status()["held"] == 0 and p.status()["fns"] == 0, 10, "the closed clients' tasks to go")
    after = usage(node.pid)
    report("81 tasks over --max-client-tasks 50 / --max-client-bytes 1M", before, after)
    S.release(p)


def test_executor_holds_back_at_the_nodes_client_limits(start_node, monkeypatch):
    """A ClusterExecutor that is given more than the node's per-client limits allow keeps the rest on
    the client and sends them as results come back (as a process pool takes any number of submits);
    only a single task over --max-client-bytes by itself fails, naming the limit.  (Shared memory off:
    with it, a large argument stays in the client's memfd and the node never holds its bytes.)"""
    from pydist import ClusterExecutor
    monkeypatch.setenv("PYDIST_SHARED_MEMORY", "0")
    node = start_node("--host", "127.0.0.2", "--log-level", "ERROR", "--workers", "2",
                      "--max-client-tasks", "20", "--max-client-bytes", "1M")
    with ClusterExecutor(address=node.address, secret=SECRET) as ex:
        fs = [ex.submit(square, i) for i in range(300)]
        assert [f.result(60) for f in fs] == [i * i for i in range(300)]
        big = [ex.submit(len, b"x" * (300 << 10)) for _ in range(12)]     # 3.6 MiB in all, 1 MiB at once
        assert [f.result(60) for f in big] == [300 << 10] * 12
        assert list(ex.map(square, range(100), chunksize=3)) == [i * i for i in range(100)]
        err = ex.submit(len, b"x" * (2 * MIB)).exception(30)
        assert isinstance(err, ResourceLimit) and "--max-client-bytes" in str(err), err
        assert ex.submit(square, 7).result(30) == 49
        p = S.connect(node.address, secret=SECRET, call_timeout=15)
        try:
            assert p.status()["refused_limit"] == 1
        finally:
            S.release(p)


def test_function_blobs_no_task_keeps_are_not_kept(start_node):
    import cloudpickle
    node = start_node("--host", "127.0.0.2", "--log-level", "ERROR", "--workers", "1")
    p = S.connect(node.address, secret=SECRET, call_timeout=15)
    cid = "blob-client"
    p.open_client(cid, None)
    big = cloudpickle.dumps(square)
    before = usage(node.pid)
    p.submit(cid, {f"unused-{i}": b"\0" * MIB for i in range(20)}, [])          # blobs no task names
    with pytest.raises(Exception):
        p.submit(cid, {f"bad-{i}": b"\0" * MIB for i in range(20)}, [("not", "a", "task")])   # fails validation
    assert p.submit(cid, {"f": big}, [_task(cid, 0, "f")]) == 1
    for i in range(20):                                                          # the same id again, new blob
        p.submit(cid, {f"again-{i}": b"\0" * MIB}, [_task(cid, 0, f"again-{i}")])
    _collect(p, cid, 1)
    st = p.status()
    after = usage(node.pid)
    report("60 stray 1 MiB function blobs", before, after, f"; node keeps {st['fns']} blobs")
    assert st["fns"] <= 1, st
    p.close_client(cid)
    wait_for(lambda: p.status()["fns"] == 0, 10, "the client's blobs to go")
    S.release(p)


# ------------------------------------------------------------------------------------------ 11. dropped executors
def _client_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("pydist-client") and t.is_alive())


def _node_connections(pid: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED)


def test_executors_dropped_without_shutdown_let_go_of_threads_and_connections(start_node):
    import gc
    node = start_node("--host", "127.0.0.2", "--log-level", "ERROR", "--threadpool", "16")
    threads0, conns0 = _client_threads(), _node_connections(node.pid)
    for _ in range(10):                     # more than a --threadpool 16 node could hold at 2-3 each
        ex = ClusterExecutor(node.address, secret=SECRET, connect_timeout=10)
        assert ex.submit(square, 3).result(timeout=30) == 9
        del ex
        gc.collect()
    wait_for(lambda: _client_threads() <= threads0, 20, "the dropped executors' threads to end")
    wait_for(lambda: _node_connections(node.pid) <= conns0, 20, "the node to see their connections close")
    served(node.address)
# ------------------------------------------------------------------------------------------ 4. joining
def test_a_child_that_cannot_join_says_why_at_warning_once_per_interval(start_node):
    parent = start_node("--host", "127.0.0.2", "--log-level", "WARNING", "--refusal-log-interval", "1")
    child = start_node("--host", "127.0.0.3", "--log-level", "WARNING", "--parent", parent.address,
                       secret=b"another-cluster-secret-0123456789")
    wait_for(lambda: "cannot join" in child.log(), 15, "the child's warning")
    line = next(l for l in child.log().splitlines() if "cannot join" in l)
    assert "WARNING" in line and parent.address in line and "wrong cluster secret" in line, line
    # the parent counts many more refused attempts meanwhile; the child has still said it once
    import re
    def refused() -> int:
        log = parent.log()
        return log.count("refused connection from") + sum(int(n) for n in re.findall(r"refused (\d+) more", log))

    wait_for(lambda: refused() >= 5, 30, "the child to retry")
    assert sum("cannot join" in l for l in child.log().splitlines()) == 1, child.log()
    assert child.alive() and parent.alive()


# ------------------------------------------------------------------------------------------ 12. local users
def _make_user():
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second local user (useradd)")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel are not installed")
    name = f"pdt{os.getpid() % 100000}"
    r = subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", name],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"useradd failed: {r.stderr.strip()}")
    return name


def _as_user(name: str, fn) -> str:
    """Run ``fn()`` in a forked child that has become user ``name``; return what it returned (a str)."""
    pw = pwd.getpwnam(name)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                               # child: drop to the other user, then only use loaded modules
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.environ.pop("XDG_CONFIG_HOME", None)
            os.environ.pop("PYDIST_SECRET", None)
            os.environ["HOME"] = pw.pw_dir
            try:
                out = fn()
            except BaseException as exc:  # noqa: BLE001
                out = f"{type(exc).__name__}: {exc}"
            os.write(w, out.encode()[:4000])
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


def test_another_local_user_is_refused_by_a_node_without_a_secret(start_node, tmp_path):
    user = _make_user()
    try:
        node = start_node("--host", "127.0.0.1", secret=None)     # the default: no secret given
        served(node.address, secret=None)                          # this user's client finds the secret file
        path = tmp_path / "config" / "pydist" / "secret"
        assert path.exists() and (path.stat().st_mode & 0o777) == 0o600

        def intrude() -> str:
            secret = S.load_secret()
            p = S.connect(node.address, secret=secret, timeout=3)
            return f"GOT IN as uid {os.getuid()}: node {p.describe()['name']}"

        got = _as_user(user, intrude)
        print(f"\n[hostile:other local user] {got}")
        assert got.startswith("AuthenticationError") and "requires the cluster secret" in got, got
    finally:
        subprocess.run(["userdel", user], capture_output=True)


# ------------------------------------------------------------------------------------------ 13. secret in tasks
def _what_a_task_sees(secret: bytes) -> dict:
    import os as _os
    seen = {"env": any(secret.decode() in v for v in _os.environ.values())}
    for who, pid in (("own /proc environ", _os.getpid()), ("node /proc environ", _os.getppid())):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                seen[who] = secret in f.read()
        except OSError:
            seen[who] = False
    return seen


def test_tasks_never_see_the_cluster_secret():
    with LocalCluster(nodes=1, workers_per_node=1) as c:
        with ClusterExecutor(c.address, secret=c.secret) as ex:
            seen = ex.submit(_what_a_task_sees, c.secret).result(timeout=60)
    print(f"\n[secret] what a task finds: {seen}")
    assert not any(seen.values()), seen


# ------------------------------------------------------------------------------------------ 14. TLS trust
def test_tls_client_trusts_only_the_given_ca(tmp_path):
    certs = S.make_certs(tmp_path / "certs", names=("client",))
    try:
        S.configure_pyro(tls=S.TLSSettings(cert=certs["client"], key=certs["client_key"], ca=certs["ca"]))
        import Pyro5.socketutil
        ctx = Pyro5.socketutil.get_ssl_context(clientcert=certs["client"], clientkey=certs["client_key"],
                                               cacerts=certs["ca"])
        stats = ctx.cert_store_stats()
        print(f"\n[tls] client trust store: {stats}")
        assert stats["x509_ca"] == 1, stats
        assert ctx.check_hostname and ctx.verify_mode.name == "CERT_REQUIRED"
    finally:
        S.configure_pyro(tls=None)


# ------------------------------------------------------------------------------------------ 4. impostors
def test_discovery_skips_an_impostor_registered_in_the_name_server():
    import Pyro5.api
    with LocalCluster(nodes=1, workers_per_node=1) as c:
        impostor = S.SecureDaemon("127.0.0.1", 0, secret=b"another cluster", name="impostor")
        t = threading.Thread(target=impostor.requestLoop, daemon=True)
        t.start()
        try:
            host, port = c.ns_address.rsplit(":", 1)
            with Pyro5.api.locate_ns(host, int(port)) as ns:
                uri = f"PYRO:{S.NODE_OBJECT_ID}@{impostor.locationStr}"
                ns.register("pydist.node.0-impostor", uri, metadata={"pydist.root"})
            with ClusterExecutor(ns=c.ns_address, secret=c.secret, connect_timeout=10) as ex:
                assert ex.submit(square, 7).result(timeout=30) == 49
        finally:
            impostor.shutdown()
            t.join(5)


class _LatencyProxy:
    """A TCP relay on loopback that holds every chunk ``delay`` seconds each way: a node on a slow or loaded
    path, whose every handshake takes at least ``2 * delay`` (a network condition, not a stand-in for pydist)."""

    def __init__(self, delay: float):
        self.target: tuple = ()   # set before the first connection
        self.delay = delay
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.socks: list = [self.lsock]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            self.socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                time.sleep(self.delay)      # the path's latency (not a synchronisation)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in self.socks:
            s.close()


def test_discovery_waits_for_an_entry_whose_handshake_takes_longer_than_half_a_second():
    """Under load a node's hello can take over 0.5 s; ``Entries.find_first`` gave each listed entry 0.5 s,
    so a live but slow cluster (or a loaded test machine) looked like no node at all."""
    import Pyro5.api
    import Pyro5.nameserver

    from pydist.client import Entries
    from pydist.config import ClientConfig

    @Pyro5.api.expose
    class Up:
        def ping(self) -> str:
            return "pong"

    S.configure_pyro()
    proxy = _LatencyProxy(0.4)
    d = S.SecureDaemon("127.0.0.1", 0, secret=SECRET, name="slow", aliases=[proxy.address])
    d.register(Up(), S.NODE_OBJECT_ID)
    host, port = d.locationStr.rsplit(":", 1)
    proxy.target = (host, int(port))
    _uri, ns_daemon, _bc = Pyro5.nameserver.start_ns(host="127.0.0.1", port=0, enableBroadcast=False)
    threads = [threading.Thread(target=t.requestLoop, daemon=True) for t in (d, ns_daemon)]
    for t in threads:
        t.start()
    try:
        ns_addr = ns_daemon.locationStr
        uri = f"PYRO:{S.NODE_OBJECT_ID}@{proxy.address}"
        ns_host, ns_port = ns_addr.rsplit(":", 1)
        with Pyro5.api.locate_ns(ns_host, int(ns_port)) as ns:
            ns.register("pydist.node.slow", uri, metadata={"pydist", "pydist.root"})
        entries = Entries(ClientConfig(secret=SECRET, connect_timeout=8.0), None, ns=ns_addr)
        t0 = time.monotonic()
        assert entries.find_first() == uri
        took = time.monotonic() - t0
        print(f"\n[discovery] entry with a {2 * proxy.delay:.1f} s handshake found in {took:.2f} s")
        assert took < 8.0
    finally:
        proxy.close()
        for x in (d, ns_daemon):
            x.shutdown()
        for t in threads:
            t.join(5)
