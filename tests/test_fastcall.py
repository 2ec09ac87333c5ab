"""pydist.fastcall: the common Pyro5 call without Pyro5's generic machinery (#15) must answer exactly as
Pyro5 does, for good calls and bad: results, remote errors with their traceback, private and unexposed
names, unknown objects, arguments marshal cannot carry, iterators, reply annotations, sizes over the
limit, a connection broken mid-reply.  Each case runs through the fast path and through Pyro5's own
(a call with annotations goes there on both sides), and the answers are compared.

Real SecureDaemons on 127.0.0.1 in a thread of this process, as in test_security.  No sleeps.
"""
from __future__ import annotations

import socket
import threading

import pytest
import Pyro5.core
import Pyro5.errors
import Pyro5.server
from Pyro5 import config as pyro_config
from Pyro5 import protocol
from Pyro5.callcontext import current_context

from pydist import fastcall
from pydist import security as S

pytestmark = pytest.mark.timeout(60)

SECRET = b"fast path secret"


class Thing:
    """Not marshallable: Pyro5 turns it into a class dict on the way."""

    def __init__(self, v):
        self.v = v


@Pyro5.server.expose
class Target:
    def __init__(self):
        self.calls = 0

    def echo(self, *args, **kwargs):
        self.calls += 1
        return [list(args), kwargs]

    def boom(self, text):
        raise ValueError(f"boom {text}")

    def numbers(self, n):
        return (i for i in range(n))

    def annotated(self):
        current_context.response_annotations = {"XTRA": b"yes"}
        return "annotated"

    def big(self, n):
        return b"x" * n

    def peer(self):
        return [S.connection_id() is not None, current_context.client_sock_addr is not None]

    def _private(self):
        return "never"

    @Pyro5.server.expose
    @property
    def prop(self):
        return "property"


class Hidden:
    def visible_only_if_exposed(self):
        return "hidden"


@pytest.fixture
def served():
    S.configure_pyro(tls=None)
    d = S.SecureDaemon("127.0.0.1", 0, secret=SECRET, name="fast")
    target = Target()
    d.register(target, S.NODE_OBJECT_ID)
    d.register(Hidden(), "hidden")
    t = threading.Thread(target=d.requestLoop, daemon=True)
    t.start()
    p = S.connect(d.locationStr, secret=SECRET)
    yield d, p, target
    S.release(p)
    for oid in [o for o in d.objectsById if o != Pyro5.core.DAEMON_NAME]:
        d.unregister(oid)
    d.shutdown()
    t.join(5)
    assert not t.is_alive()


def both(p, call):
    """``call(p)`` through the fast path, then through Pyro5's (annotations on the request): both
    outcomes, as ("ok", value) or ("err", type, message, has a remote traceback)."""
    out = []
    for slow in (False, True):
        current_context.annotations = {"SLOW": b"1"} if slow else {}
        try:
            out.append(("ok", call(p)))
        except Exception as exc:   # noqa: BLE001 - compared below
            tb = "".join(getattr(exc, "_pyroTraceback", []))
            out.append(("err", type(exc), str(exc), bool(tb)))
        finally:
            current_context.annotations = {}
    return out


def test_results_and_errors_are_the_same_through_both_paths(served):
    d, p, target = served
    fast, slow = both(p, lambda p: p.echo(1, "a", b"b", [1, (2, 3)], {"k": {1: 2.5}}, None, x=True))
    assert fast == slow == ("ok", [[1, "a", b"b", [1, (2, 3)], {"k": {1: 2.5}}, None], {"x": True}])
    fast, slow = both(p, lambda p: p.boom("42"))
    assert fast == slow and fast[:3] == ("err", ValueError, "boom 42") and fast[3], fast
    fast, slow = both(p, lambda p: p.echo(Thing(5)))   # not marshallable: Pyro5 converts it, both ways
    assert fast == slow and fast[0] == "ok" and fast[1][0][0]["v"] == 5, fast
    assert both(p, lambda p: list(p.numbers(4))) == [("ok", [0, 1, 2, 3])] * 2
    fast, slow = both(p, lambda p: (p.annotated(), dict(current_context.response_annotations)))
    assert fast == slow and fast[1][0] == "annotated" and bytes(fast[1][1]["XTRA"]) == b"yes", fast
    assert p.prop == "property"   # (Pyro5's own marshal proxy cannot read properties: kwargs None)
    assert both(p, lambda p: p.peer()) == [("ok", [True, True])] * 2
    assert both(p, lambda p: len(p.big(3 << 20))) == [("ok", 3 << 20)] * 2
    assert p.echo("still") == [["still"], {}]


def test_private_unexposed_and_unknown_names_are_refused_as_pyro5_refuses_them(served):
    d, p, target = served
    for name in ("_private", "__init__", "_Target__x", "no_such_method"):
        fast, slow = both(p, lambda p, name=name: p._pyroInvoke(name, (), {}))
        assert fast == slow and fast[0] == "err" and fast[1] is AttributeError, (name, fast)
    fast, slow = both(p, lambda p: p._pyroInvoke("visible_only_if_exposed", (), {}, objectId="hidden"))
    assert fast == slow and fast[1] is AttributeError and "unexposed" in fast[2], fast
    fast, slow = both(p, lambda p: p._pyroInvoke("echo", (), {}, objectId="nobody"))
    assert fast == slow and fast[1] is Pyro5.errors.DaemonError, fast
    assert p.echo("after") == [["after"], {}], "the connection stopped serving after a refused name"


def test_a_call_over_the_message_size_fails_before_it_is_sent_and_the_connection_goes_on(served):
    d, p, target = served
    before = target.calls
    old = pyro_config.MAX_MESSAGE_SIZE
    pyro_config.MAX_MESSAGE_SIZE = 1 << 20
    try:
        fast, slow = both(p, lambda p: p.echo(b"y" * (2 << 20)))
        for out in (fast, slow):   # (the sizes differ by the slow call's annotation)
            assert out[1] is Pyro5.errors.ProtocolError and "message too large" in out[2], out
        assert target.calls == before, "an oversized call reached the method"
        fast, slow = both(p, lambda p: p.big(2 << 20))   # the reply is over it: Pyro5 closes the connection
        assert fast[0] == slow[0] == "err" and issubclass(fast[1], Pyro5.errors.CommunicationError), (fast, slow)
    finally:
        pyro_config.MAX_MESSAGE_SIZE = old
    assert p.echo("reconnected") == [["reconnected"], {}]


def test_a_reply_cut_off_midway_fails_the_call_and_the_next_call_reconnects():
    """A stand-in node answers the hello, then half a reply, then closes: the call raises a
    CommunicationError (never returns half a result), and the proxy opens a fresh connection."""
    S.configure_pyro(tls=None)
    d = S.SecureDaemon("127.0.0.1", 0, secret=SECRET, name="cut")
    target = Target()
    d.register(target, S.NODE_OBJECT_ID)
    t = threading.Thread(target=d.requestLoop, daemon=True)
    t.start()
    p = S.connect(d.locationStr, secret=SECRET)
    try:
        assert p.echo(1) == [[1], {}]
        first = p._pyroConnection
        sock = first.sock
        real_recv = type(first).recv
        cut = {"done": False}

        def recv_then_cut(self, size):
            if not cut["done"] and size > protocol._header_size:   # the payload of the reply
                cut["done"] = True
                data = real_recv(self, size // 2)
                sock.shutdown(socket.SHUT_RDWR)
                raise Pyro5.errors.ConnectionClosedError(f"receiving: connection lost after {len(data)} bytes")
            return real_recv(self, size)

        type(first).recv = recv_then_cut
        try:
            with pytest.raises(Pyro5.errors.CommunicationError):
                p.big(100_000)
        finally:
            type(first).recv = real_recv
        assert cut["done"]
        assert p._pyroConnection is None, "a connection with half a reply on it was kept"
        assert p.echo(2) == [[2], {}]
    finally:
        S.release(p)
        d.unregister(S.NODE_OBJECT_ID)
        d.shutdown()
        t.join(5)


def test_the_fast_path_carries_the_calls_of_a_real_node(fresh_cluster):
    """Through a real node: the calls of lone tasks take the fast path on both sides (counted), and
    every result is right."""
    from pydist import ClusterExecutor

    c = fresh_cluster(workers_per_node=1)
    seen = {"fast": 0}
    real = fastcall.invoke

    def counting(*a, **kw):
        r = real(*a, **kw)
        if r is not fastcall.NOT_FAST:
            seen["fast"] += 1
        return r

    fastcall.invoke = counting
    try:
        with ClusterExecutor(c.address, secret=c.secret) as ex:
            assert [ex.submit(pow, i, 2).result(30) for i in range(50)] == [i * i for i in range(50)]
    finally:
        fastcall.invoke = real
    assert seen["fast"] >= 50, seen
