"""pydist.security: the secret handshake (both directions), replay and clock checks, versions, hostile input, TLS.

Real Pyro5 daemons on 127.0.0.1 (port 0) in a thread of this process; the TLS node runs in a subprocess
(Pyro5 caches SSL contexts per process), started and stopped by pid.  No sleeps: every wait polls a condition
with a deadline.
"""
from __future__ import annotations

import logging
import marshal
import os
import selectors
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import Pyro5.core
import Pyro5.errors
import Pyro5.server
import Pyro5.serializers
from Pyro5 import protocol

from pydist import auth
from pydist import security as S
from pydist.errors import AuthenticationError, ClusterUnavailable, ConfigError, VersionMismatch
from conftest import wait_for

pytestmark = pytest.mark.timeout(60)

SECRET = b"correct horse battery staple"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@Pyro5.server.expose
class Echo:
    def echo(self, x):
        return x


@pytest.fixture(autouse=True)
def _plain_pyro():
    S.configure_pyro(tls=None)
    yield
    S.configure_pyro(tls=None)


@pytest.fixture
def node():
    """Factory: start a SecureDaemon serving Echo as pydist.node in a thread; all stopped at teardown."""
    started = []

    def start(secret=SECRET, name="n1", **kw):
        d = S.SecureDaemon("127.0.0.1", 0, secret=secret, name=name, **kw)
        d.register(Echo, S.NODE_OBJECT_ID)
        t = threading.Thread(target=d.requestLoop, daemon=True)
        t.start()
        started.append((d, t))
        return d

    yield start
    for d, t in started:
        for oid in [o for o in d.objectsById if o != Pyro5.core.DAEMON_NAME]:
            d.unregister(oid)      # else the class keeps a dead weakref.proxy to the daemon (breaks gc walks)
        d.shutdown()
        t.join(5)
        assert not t.is_alive()


def client_hello(secret, dst, obj=S.NODE_OBJECT_ID, **kw) -> bytes:
    return auth.encode_hello(secret, dst, obj, **kw)[0]


def raw_connect_message(hello: bytes, serializer_id=auth.HELLO_SERIALIZER) -> bytes:
    return protocol.SendingMessage(protocol.MSG_CONNECT, 0, 0, serializer_id, hello).data


def raw_handshake(address: str, frame: bytes):
    """Send one CONNECT frame on a raw socket; return (msgtype, auth.Reply or the refusal text)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(frame)
        from Pyro5.socketutil import SocketConnection
        conn = SocketConnection(s, keep_open=True)
        msg = protocol.recv_stub(conn, [protocol.MSG_CONNECTOK, protocol.MSG_CONNECTFAIL])
        assert msg.serializer_id == auth.HELLO_SERIALIZER
        if msg.type == protocol.MSG_CONNECTOK:
            return msg.type, auth.parse_reply(bytes(msg.data))
        return msg.type, auth.parse_refusal(bytes(msg.data))


def closed_by_server(s: socket.socket, timeout=5.0) -> bool:
    """True if the server closes s (EOF or reset) within timeout; reads and discards any reply."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


# ------------------------------------------------------------------------------------------------------
# the secret, both directions
# ------------------------------------------------------------------------------------------------------

def test_right_secret_works_and_names_the_peer(node):
    d = node(name="head")
    p = S.connect(d.locationStr, secret=SECRET)
    assert p.echo(b"\x00payload") == b"\x00payload"     # marshal: bytes arrive as bytes
    assert p.pydist_peer_name == "head"
    assert p.pydist_peer_versions["py"] == "%d.%d" % sys.version_info[:2]
    # a dropped connection reconnects with a fresh nonce (a reused one would be refused as a replay)
    p._pyroRelease()
    assert p.echo(2) == 2
    p._pyroRelease()


def test_wrong_secret_is_refused_fast_logged_once_and_server_keeps_serving(node, caplog):
    d = node()
    caplog.set_level(logging.WARNING, logger="pydist.security")
    t0 = time.monotonic()
    with pytest.raises(AuthenticationError) as ei:
        S.connect(d.locationStr, secret=b"not the secret")
    assert time.monotonic() - t0 < 2.0
    assert "wrong cluster secret" in str(ei.value) and d.locationStr in str(ei.value)
    lines = [r.getMessage() for r in caplog.records if r.name == "pydist.security"]
    assert len(lines) == 1 and "127.0.0.1:" in lines[0]
    assert SECRET.decode() not in lines[0] and "not the secret" not in lines[0]
    assert S.connect(d.locationStr, secret=SECRET).echo("ok") == "ok"


def test_client_without_secret_is_refused(node):
    d = node()
    with pytest.raises(AuthenticationError, match="requires the cluster secret"):
        S.connect(d.locationStr, secret=None)


def test_client_with_secret_refuses_a_node_without_one(node):
    d = node(secret=None, name="rogue")
    with pytest.raises(AuthenticationError, match="has no cluster secret"):
        S.connect(d.locationStr, secret=SECRET)
    # ... while a loopback-only setup without any secret works
    assert S.connect(d.locationStr, secret=None).echo(3) == 3


def test_client_refuses_a_node_that_cannot_prove_the_secret():
    """A rogue server that answers every hello with a well-formed reply MAC'd with another secret."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        address = "127.0.0.1:%d" % srv.getsockname()[1]

        def rogue():
            c, _ = srv.accept()
            with c:
                c.recv(4096)
                c.sendall(protocol.SendingMessage(protocol.MSG_CONNECTOK, 0, 0, auth.HELLO_SERIALIZER,
                                                  auth.encode_reply(b"other cluster", b"\0" * 16, "impostor",
                                                                    auth.encode_meta(["echo"], [], []))).data)
        t = threading.Thread(target=rogue, daemon=True)
        t.start()
        p = S.SecureProxy(f"PYRO:{S.NODE_OBJECT_ID}@{address}", secret=SECRET)
        with pytest.raises(AuthenticationError, match="failed to prove"):
            p._pyroBind()
        assert p._pyroConnection is None          # a failed proof leaves no usable connection on the proxy
        t.join(5)


# ------------------------------------------------------------------------------------------------------
# replay, clock, versions, destination
# ------------------------------------------------------------------------------------------------------

def test_replayed_handshake_is_refused(node):
    d = node()
    frame = raw_connect_message(client_hello(SECRET, d.locationStr))
    kind, reply = raw_handshake(d.locationStr, frame)
    assert kind == protocol.MSG_CONNECTOK and reply.name == "n1"
    kind, reply = raw_handshake(d.locationStr, frame)           # the very same bytes again
    assert kind == protocol.MSG_CONNECTFAIL and "replayed" in reply and reply.startswith(S.TAG_AUTH)
    assert S.connect(d.locationStr, secret=SECRET).echo(1) == 1


def test_replay_cache_is_bounded_and_never_readmits_an_evicted_nonce():
    cache = auth.ReplayCache(window=300, maxsize=3)
    now = 1000.0
    for i in range(3):
        assert cache.check_and_add(bytes([i]) * 16, now - 10 + i, now) is None
    assert cache.check_and_add(bytes([9]) * 16, now, now) is None       # evicts the oldest (ts = now-10)
    assert len(cache) == 3
    assert cache.check_and_add(bytes([0]) * 16, now - 10, now) is not None   # evicted one: still refused
    assert cache.check_and_add(bytes([1]) * 16, now - 9, now) is not None    # remembered one: refused


def test_timestamp_outside_the_window_says_check_the_clocks(node):
    d = node(clock_window=300)
    frame = raw_connect_message(client_hello(SECRET, d.locationStr, ts=time.time() - 1000))
    kind, reply = raw_handshake(d.locationStr, frame)
    assert kind == protocol.MSG_CONNECTFAIL
    err = S.translate_connect_error(Pyro5.errors.CommunicationError("rejected: " + reply), d.locationStr)
    assert isinstance(err, AuthenticationError) and "check the clocks" in str(err)
    ok = raw_connect_message(client_hello(SECRET, d.locationStr, ts=time.time() + 200))   # inside the window
    assert raw_handshake(d.locationStr, ok)[0] == protocol.MSG_CONNECTOK


def test_version_mismatch_names_both_sides(node):
    d = node()
    theirs = dict(S.local_versions(), py="2.7", cp="1")
    frame = raw_connect_message(client_hello(SECRET, d.locationStr, versions=theirs))
    kind, reply = raw_handshake(d.locationStr, frame)
    assert kind == protocol.MSG_CONNECTFAIL
    err = S.translate_connect_error(Pyro5.errors.CommunicationError("rejected: " + reply), d.locationStr)
    assert isinstance(err, VersionMismatch)
    text = str(err)
    assert "Python 2.7" in text and "Python %d.%d" % sys.version_info[:2] in text and d.locationStr in text
    # protocol version differs: refused before anything else
    frame = raw_connect_message(client_hello(SECRET, d.locationStr, versions=dict(S.local_versions(), pydist=99)))
    assert "protocol" in raw_handshake(d.locationStr, frame)[1]


def test_handshake_made_for_another_node_is_refused(node):
    a, b = node(name="a"), node(name="b")
    frame = raw_connect_message(client_hello(SECRET, a.locationStr))   # sniffed on its way to a ...
    kind, reply = raw_handshake(b.locationStr, frame)                    # ... replayed against b
    assert kind == protocol.MSG_CONNECTFAIL and "not an address of node b" in reply
    port = b.locationStr.rsplit(":", 1)[1]
    assert raw_handshake(b.locationStr, raw_connect_message(
        client_hello(SECRET, f"localhost:{port}")))[0] == protocol.MSG_CONNECTOK   # a name resolving to it


# ------------------------------------------------------------------------------------------------------
# hostile input
# ------------------------------------------------------------------------------------------------------

def test_silent_connections_do_not_block_and_are_released(node):
    d = node(handshake_timeout=1.0)
    host, port = d.locationStr.rsplit(":", 1)
    silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(50)]
    try:
        t0 = time.monotonic()
        p = S.connect(d.locationStr, secret=SECRET)
        assert p.echo("alive") == "alive"
        assert time.monotonic() - t0 < 1.0           # did not wait for the silent ones
        assert all(closed_by_server(s, timeout=5) for s in silent)
        pool = d.transportServer.pool
        wait_for(lambda: len(pool.busy) == 1, what="handshake threads released")
        # the good connection has been idle longer than the handshake deadline and is still open
        assert p.echo("still here") == "still here"
    finally:
        for s in silent:
            s.close()


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.0\r\n\r\n",                                  # garbage
    b"PYRO\x01\xf6\x01\x02",                                     # truncated header, then EOF
    struct.pack(protocol._header_format, b"PYRO", protocol.PROTOCOL_VERSION, protocol.MSG_CONNECT, 2, 0, 0,
                200 << 20, 0, b"\0" * 16, 0, 0x4dc5),                  # header claims 200 MiB, then EOF
    protocol.SendingMessage(protocol.MSG_CONNECT, 0, 0, 2, b"\x00\x01garbage").data,  # not marshal
    protocol.SendingMessage(protocol.MSG_INVOKE, 0, 0, 2, marshal.dumps(("pydist.node", "echo", [1], {}))).data,
], ids=["garbage", "truncated", "oversized", "bad-payload", "invoke-before-connect"])
def test_junk_closes_only_that_connection(node, junk):
    d = node(handshake_timeout=2.0)
    host, port = d.locationStr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(junk)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # the node was quicker: it already closed the connection
        assert closed_by_server(s, timeout=3)
    assert S.connect(d.locationStr, secret=SECRET).echo("fine") == "fine"


def test_message_size_limit_closes_the_connection(node):
    S.configure_pyro(max_message_size=1 << 20)
    try:
        d = node()
        p = S.connect(d.locationStr, secret=SECRET)
        assert p.echo(b"x" * 1000) == b"x" * 1000
        with pytest.raises(Pyro5.errors.ProtocolError):      # refused before sending
            p.echo(b"x" * (2 << 20))
    finally:
        S.configure_pyro(max_message_size=1 << 30)


def test_plain_pyro_proxy_is_refused(node):
    d = node()
    plain = Pyro5.client.Proxy(f"PYRO:{S.NODE_OBJECT_ID}@{d.locationStr}")
    with pytest.raises(Pyro5.errors.CommunicationError, match="pydist-refused"):
        plain._pyroBind()


# ------------------------------------------------------------------------------------------------------
# connect() errors, secrets
# ------------------------------------------------------------------------------------------------------

def test_unreachable_address_is_cluster_unavailable_after_retrying():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # closed again when the block ends: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ClusterUnavailable, match=f"127.0.0.1:{port}"):
        S.connect(f"127.0.0.1:{port}", secret=SECRET, timeout=0.5)
    assert 0.3 < time.monotonic() - t0 < 3


def test_load_secret_precedence(tmp_path):
    f = tmp_path / "s"
    f.write_text("from-file\n")
    env = {"PYDIST_SECRET": "from-env"}
    assert S.load_secret("explicit", str(f), env) == b"explicit"
    assert S.load_secret(None, str(f), env) == b"from-file"
    assert S.load_secret(None, None, env) == b"from-env"
    assert S.load_secret(None, None, {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}) is None
    with pytest.raises(ConfigError):
        S.load_secret(None, None, {"PYDIST_SECRET": ""})
    a, b = S.new_secret(), S.new_secret()
    assert a != b and len(a) >= 32


# ------------------------------------------------------------------------------------------------------
# TLS
# ------------------------------------------------------------------------------------------------------

TLS_NODE = textwrap.dedent("""
    import sys, Pyro5.server
    from pydist import security as S
    certs, secret = sys.argv[1], sys.argv[2].encode()
    S.configure_pyro(tls=S.TLSSettings(cert=certs + "/node.pem", key=certs + "/node.key", ca=certs + "/ca.pem"),
                     server=True)

    @Pyro5.server.expose
    class Echo:
        def echo(self, x):
            return x

    d = S.SecureDaemon("127.0.0.1", 0, secret=secret, name="tls-node", handshake_timeout=2.0)
    d.register(Echo, S.NODE_OBJECT_ID)
    print("READY", d.locationStr, flush=True)
    d.requestLoop()
""")


def test_tls_two_way_with_make_certs(tmp_path):
    certs = S.make_certs(tmp_path / "certs", names=("node", "client"))
    other = S.make_certs(tmp_path / "other", names=("client",))      # a different CA
    assert set(certs) >= {"ca", "ca_key", "node", "node_key", "client", "client_key"}
    assert oct(os.stat(certs["node_key"]).st_mode & 0o777) == "0o600"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", TLS_NODE, str(tmp_path / "certs"), SECRET.decode()],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=20), "TLS node did not start"
        line = proc.stdout.readline().split()
        assert line[0] == "READY"
        address = line[1]

        good = S.TLSSettings(cert=certs["client"], key=certs["client_key"], ca=certs["ca"])
        p = S.connect(address, secret=SECRET, tls=good)
        assert p.echo(b"over tls") == b"over tls" and p.pydist_peer_name == "tls-node"
        assert p._pyroConnection.sock.version().startswith("TLS")
        p._pyroRelease()

        # a client that does not trust the cluster CA refuses the node's certificate
        with pytest.raises(AuthenticationError, match="TLS"):
            S.connect(address, secret=SECRET, timeout=1,
                      tls=S.TLSSettings(cert=other["client"], key=other["client_key"], ca=other["ca"]))
        # a client with no certificate is refused by the node (2-way TLS)
        with pytest.raises(AuthenticationError, match="TLS"):
            S.connect(address, secret=SECRET, timeout=1, tls=S.TLSSettings(ca=certs["ca"]))
        # a client without the CA cannot even be configured
        with pytest.raises(ConfigError, match="CA"):
            S.configure_pyro(tls=S.TLSSettings(cert=certs["client"], key=certs["client_key"]))
        # a silent TCP peer does not block the TLS node's accept loop
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):
            assert S.connect(address, secret=SECRET, tls=good).echo(1) == 1
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)



def test_a_tls_refusal_that_lands_before_the_hello_is_sent_is_still_named_tls(tmp_path, monkeypatch):
    """The worst moment of a 2-way TLS refusal (CI, Python 3.13): the node checks the client's empty
    certificate, sends its alert and closes *before* the client's hello goes out.  The send then fails
    (reset / EOF) but the alert is waiting in the client's receive buffer: the client must read it and
    say TLS, not "no pydist node answers" after retrying for its whole timeout."""
    import ssl
    certs = S.make_certs(tmp_path / "certs", names=("node", "client"))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(certs["node"], certs["node_key"])
    sctx.load_verify_locations(certs["ca"])
    sctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    closed, stop = threading.Event(), threading.Event()
    failures: list = []

    def node_stand_in():      # a TLS endpoint that refuses clients without certificates, closing at once
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except socket.timeout:
                continue
            raw.settimeout(5)
            tls = sctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()
                tls.recv(1)
            except (ssl.SSLError, OSError) as exc:
                failures.append(exc)
            # closed with unread bytes from the client, the kernel resets the connection (SO_LINGER 0 makes
            # that certain): the client's send can fail with ECONNRESET, not an SSL error
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tls.close()
            closed.set()

    server = threading.Thread(target=node_stand_in, daemon=True)
    server.start()
    real_sendall = ssl.SSLSocket.sendall

    def sendall_after_the_refusal(self, data, *a):     # the OS's timing at its worst, made certain
        assert closed.wait(10), "the stand-in never refused"
        closed.clear()
        return real_sendall(self, data, *a)

    monkeypatch.setattr(ssl.SSLSocket, "sendall", sendall_after_the_refusal)
    address = "127.0.0.1:%d" % listener.getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError, match="TLS"):
            S.connect(address, secret=SECRET, timeout=4, tls=S.TLSSettings(ca=certs["ca"]))
        assert time.monotonic() - t0 < 3, "a TLS refusal is final: the client must not retry until its timeout"
        assert failures and "CERTIFICATE" in str(failures[0]).upper()
    finally:
        stop.set()
        server.join(5)
        listener.close()
        assert not server.is_alive()
        S.configure_pyro(tls=None)

# ------------------------------------------------------------------------------------------------------
# idle connections, busy pool, gate bounds (issue #11)
# ------------------------------------------------------------------------------------------------------

def test_idle_authenticated_connections_time_out_and_proxies_reopen_before_it(node):
    d = node(idle_timeout=0.6)
    host, port = d.locationStr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:       # a raw, authenticated, idle peer
        s.sendall(raw_connect_message(client_hello(SECRET, d.locationStr)))
        from Pyro5.socketutil import SocketConnection
        msg = protocol.recv_stub(SocketConnection(s, keep_open=True), [protocol.MSG_CONNECTOK])
        assert auth.parse_reply(bytes(msg.data)).idle == 1                  # rounded up to whole seconds
        t0 = time.monotonic()
        assert closed_by_server(s, timeout=5)
        assert 0.4 < time.monotonic() - t0 < 3
    p = S.connect(d.locationStr, secret=SECRET)
    assert p.echo(1) == 1
    first = p._pyroConnection
    wait_for(lambda: time.monotonic() - p._pydist_used > 0.7, 5, "the proxy to idle past the node's timeout")
    assert p.echo(2) == 2                          # reopened before the call: no ConnectionClosedError
    assert p._pyroConnection is not first
    wait_for(lambda: len(d.transportServer.pool.busy) <= 1, 5, "the idle connection's thread to be freed")
    S.release(p)


def test_gate_drops_the_oldest_when_too_many_hellos_wait(node):
    d = node(max_pending_handshakes=8, handshake_timeout=30)
    host, port = d.locationStr.rsplit(":", 1)
    silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(30)]
    try:
        wait_for(lambda: d.pending_handshakes() <= 8 and sum(closed_by_server(s, 0.01) for s in silent[:5]) == 5,
                 10, "the oldest silent peers to be dropped")
        t0 = time.monotonic()
        assert S.connect(d.locationStr, secret=SECRET).echo("in") == "in"
        assert time.monotonic() - t0 < 1.0
        assert d.pending_handshakes() <= 8
    finally:
        for s in silent:
            s.close()


def test_scoped_hello_sees_only_its_scope(node):
    @Pyro5.server.expose
    class View:
        def __init__(self, scope):
            self.scope = scope

        def whoami(self):
            return self.scope

    d = node(scoped=lambda scope: View(scope))
    cap = S.capability(SECRET, "group:g1")
    p = S.connect(d.locationStr, secret=cap, scope="group:g1")
    assert p.whoami() == "group:g1"
    assert not hasattr(p, "echo") or "echo" not in p._pyroMethods
    with pytest.raises(AuthenticationError):                     # the capability is not the secret
        S.connect(d.locationStr, secret=cap)
    with pytest.raises(AuthenticationError):                     # nor another scope's
        S.connect(d.locationStr, secret=cap, scope="group:g2")
    S.release(p)
    plain = node(name="plain")
    with pytest.raises(AuthenticationError, match="no scoped"):
        S.connect(plain.locationStr, secret=cap, scope="group:g1")


def test_disconnect_hooks_see_the_connection_that_ended(node):
    @Pyro5.server.expose
    class Who:
        def me(self):
            return S.connection_id()

    d = S.SecureDaemon("127.0.0.1", 0, secret=SECRET, name="who")
    d.register(Who, S.NODE_OBJECT_ID)
    ended = []
    d.on_disconnect(ended.append)
    t = threading.Thread(target=d.requestLoop, daemon=True)
    t.start()
    try:
        p = S.connect(d.locationStr, secret=SECRET)
        cid = p.me()
        assert isinstance(cid, int) and not ended
        S.release(p)
        wait_for(lambda: ended == [cid], 5, "the disconnect hook")
    finally:
        d.unregister(S.NODE_OBJECT_ID)
        d.shutdown()
        t.join(5)



# ------------------------------------------------------------------------------------------------------
# idle timeout of authenticated connections (kernel timeouts on a blocking socket, #15)
# ------------------------------------------------------------------------------------------------------
def test_large_message_arrives_whole_and_an_idle_connection_is_closed(node):
    d = node(idle_timeout=0.5)
    p = S.connect(d.locationStr, secret=SECRET)
    big = os.urandom(1 << 20) * 12                      # 12 MiB: many socket buffers
    assert p.echo(big) == big
    sock = p._pyroConnection.sock
    assert closed_by_server(sock, 10), "an idle connection stays open past the idle timeout"
    p._pyroRelease()


def test_a_message_stalled_halfway_is_dropped_after_the_idle_timeout(node):
    # an authenticated peer that sends half a message cannot hold the connection's thread
    d = node(idle_timeout=0.5)
    p = S.connect(d.locationStr, secret=SECRET)
    assert p.echo(1) == 1
    sock = p._pyroConnection.sock
    marshal_id = Pyro5.serializers.serializers["marshal"].serializer_id
    msg = protocol.SendingMessage(protocol.MSG_INVOKE, 0, 7, marshal_id, b"x" * 4096).data
    sock.sendall(msg[: len(msg) // 2])
    assert closed_by_server(sock, 10), "a half-sent message held the connection open"
    p._pyroRelease()


def test_the_hello_names_the_release_of_the_running_code():
    """The release in every hello is ``pydist.__version__``, the one ``setup.py`` installs (reading the
    installed metadata instead cost each process's first connection ~30 ms, #15)."""
    import importlib.metadata

    import pydist

    assert auth.local_versions()["ver"] == pydist.__version__
    assert importlib.metadata.version("pydist") == pydist.__version__
