"""Fuzz of the hello format (issue #11): random and mutated hellos against a real node, and the parsers alone.

The node test sends at least 10,000 hellos, each on its own TCP connection, while a legitimate client keeps
running tasks; it checks that none is accepted, that the client is served throughout (its slowest task
round trip is reported), and that the node's RSS, peak RSS and CPU stay bounded.  Run with ``-s`` for the
numbers.
"""
from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections import Counter

import pytest
from Pyro5 import protocol

from pydist import ClusterExecutor, auth
from pydist import security as S
from test_hardening import MIB, SECRET, report, start_node, usage  # noqa: F401  (fixture)
from test_hostile import mutated_hello

pytestmark = [pytest.mark.timeout(240), pytest.mark.one_python]

N_HELLOS = int(os.environ.get("PYDIST_FUZZ_HELLOS", "10000"))


def pyro_header(size: int, ser: int = auth.HELLO_SERIALIZER, flags: int = 0, msgtype=protocol.MSG_CONNECT) -> bytes:
    return struct.pack(protocol._header_format, b"PYRO", protocol.PROTOCOL_VERSION, msgtype, ser, flags, 0, size, 0,
                       b"\0" * 16, 0, 0x4DC5)


def random_hello(rng: random.Random, address: str) -> tuple:
    """(kind, bytes of a whole frame) that must never be accepted."""
    r = rng.random()
    if r < 0.35:
        kind, body = mutated_hello(rng, address, SECRET)
    elif r < 0.55:                                   # the right structure, random field contents and MAC
        lv, ld, lo, ls = (rng.randint(0, n) for n in (32, 255, 64, 64))
        head = struct.pack("!4sHBBHBB16sdBBB", b"PDH1", rng.getrandbits(16), rng.getrandbits(8), rng.getrandbits(8),
                           rng.getrandbits(16), rng.getrandbits(8), lv, rng.randbytes(16),
                           struct.unpack("!d", rng.randbytes(8))[0], ld, lo, ls)
        kind, body = "structured random", head + rng.randbytes(lv + ld + lo + ls + 32)
    elif r < 0.75:
        kind, body = "random bytes", rng.randbytes(rng.randint(0, 600))
    elif r < 0.85:                                   # a valid hello of another cluster, then tampered
        body = bytearray(auth.encode_hello(b"other-" + rng.randbytes(8), address, S.NODE_OBJECT_ID)[0])
        kind = "other cluster"
        if rng.random() < 0.5:
            body[rng.randrange(len(body))] ^= 0xFF
            kind = "other cluster, tampered"
        body = bytes(body)
    else:                                            # lying frame headers
        size = rng.choice([0, 1, 511, 512, 513, 4096, 1 << 20, 2 ** 32 - 1])
        flags = rng.choice([0, protocol.FLAGS_COMPRESSED, protocol.FLAGS_CORR_ID, 0xFFFF])
        payload = rng.randbytes(min(size, rng.randint(0, 600)))
        return "lying header", pyro_header(size, flags=flags) + payload
    return kind, pyro_header(len(body)) + body


def exchange(address: tuple, data: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, socket.timeout, OSError):
            pass
        return out


def test_ten_thousand_hellos_against_a_real_node(start_node):
    node = start_node("--host", "127.0.0.2", "--log-level", "ERROR", "--workers", "1")
    host, port = node.address.rsplit(":", 1)
    addr = (host, int(port))
    rng = random.Random(11)
    stop = threading.Event()
    lat: list = []
    errors: list = []

    def legit():
        try:
            with ClusterExecutor(node.address, secret=SECRET, connect_timeout=10) as ex:
                i = 0
                while not stop.is_set():
                    t0 = time.monotonic()
                    assert ex.submit(pow, i, 2).result(timeout=30) == i * i
                    lat.append(time.monotonic() - t0)
                    i += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    client = threading.Thread(target=legit, daemon=True)
    client.start()
    before = usage(node.pid)
    kinds, outcomes = Counter(), Counter()
    t0 = time.monotonic()
    try:
        for i in range(N_HELLOS):
            kind, data = random_hello(rng, node.address)
            reply = exchange(addr, data)
            kinds[kind] += 1
            typ = protocol.ReceivingMessage(reply[:protocol._header_size]).type if len(reply) >= 40 else None
            assert typ != protocol.MSG_CONNECTOK, f"hello #{i} ({kind}) was accepted: {data[:100]!r}"
            outcomes["refused" if typ == protocol.MSG_CONNECTFAIL else "closed"] += 1
            if len(reply) >= 40:
                assert len(reply) <= 40 + auth.REFUSAL_MAX
    finally:
        took = time.monotonic() - t0
        stop.set()
        client.join(60)
    after = usage(node.pid)
    assert not errors, errors
    assert lat, "the legitimate client got nothing done"
    lat.sort()
    line = report(f"{N_HELLOS} fuzzed hellos", before, after,
                  f"; {took:.1f} s; legit client: {len(lat)} tasks, median {lat[len(lat) // 2] * 1e3:.1f} ms, "
                  f"max {lat[-1] * 1e3:.0f} ms")
    print("  kinds:", dict(kinds), "outcomes:", dict(outcomes))
    assert sum(kinds.values()) >= 10_000 or N_HELLOS < 10_000
    assert node.alive(), line
    assert after["rss"] - before["rss"] < 16 * MIB, line
    assert after["hwm"] - before["hwm"] < 32 * MIB, line
    assert after["cpu"] - before["cpu"] < 2.0 + N_HELLOS * 0.0015, line      # ~ a millisecond per hello at most
    assert lat[-1] < 5.0, line


def test_parsers_raise_only_hello_error_on_any_input():
    """The parsers alone, 60,000 random and mutated inputs: HelloError or a result, nothing else, O(size)."""
    rng = random.Random(3)
    good_h = auth.encode_hello(auth.capability(SECRET, "g"), "127.0.0.1:1", S.NODE_OBJECT_ID, scope="g")[0]
    good_r = auth.encode_reply(SECRET, b"\0" * 16, "n", auth.encode_meta(["a", "b"], ["b"], []), idle=5)
    outcomes = Counter()
    for i in range(20_000):
        for parse, good in ((auth.parse_hello, good_h), (auth.parse_reply, good_r), (auth.parse_meta, None)):
            if good is None or rng.random() < 0.3:
                data = rng.randbytes(rng.randint(0, 700))
            else:
                b = bytearray(good)
                for _ in range(rng.randint(1, 6)):
                    b[rng.randrange(len(b))] = rng.getrandbits(8)
                data = bytes(b[:rng.randint(0, len(b) + 5)]) if rng.random() < 0.3 else bytes(b)
            try:
                parse(data)
                outcomes[parse.__name__ + " ok"] += 1
            except auth.HelloError:
                outcomes[parse.__name__ + " refused"] += 1
    print("\n[parsers]", dict(outcomes))
    assert auth.parse_hello(good_h).scope == "g" and auth.hello_mac_ok(auth.parse_hello(good_h), SECRET)
    assert auth.reply_mac_ok(auth.parse_reply(good_r), SECRET, b"\0" * 16)
