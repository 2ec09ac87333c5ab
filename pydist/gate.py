"""The gate: where every new connection of a node waits until its hello is read, on one thread, without blocking.

::

    Pyro5 accept loop ──accept()──▶ Gate.submit(sock)        (never reads from a peer, never waits on one)
                                        │
                 one selector thread:   ▼   TLS handshake (non-blocking), then the 40-byte Pyro5 header,
                                            then a body of at most auth.HELLO_MAX bytes, all before the
                                            connection's deadline; at most ``max_pending`` connections wait
                                            here (when full, the oldest is dropped)
                                        │
                                 on_frame(sock, header, body) ──▶ a refusal frame: sent, connection closed
                                        │                     └─▶ None: the callback took the socket
                                        ▼                          (handed to a Pyro5 worker thread)

A peer that has not proved the secret therefore holds no thread at all: only one descriptor, a few hundred
bytes of buffer, for at most ``timeout`` seconds.
"""
from __future__ import annotations

import collections
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from typing import Callable, Optional

from Pyro5 import protocol

log = logging.getLogger("pydist.security")

HEADER = struct.Struct(protocol._header_format)     # Pyro5's 40-byte message header
assert HEADER.size == protocol._header_size


class _Pending:
    __slots__ = ("sock", "peer", "deadline", "stage", "buf", "need", "header")

    def __init__(self, sock, peer: str, deadline: float):
        self.sock, self.peer, self.deadline = sock, peer, deadline
        self.stage = "tls" if isinstance(sock, ssl.SSLSocket) else "header"
        self.buf = bytearray()
        self.need = HEADER.size
        self.header: Optional[tuple] = None


class Gate(threading.Thread):
    """Reads hellos of new connections (see the module docstring).

    ``on_frame(sock, peer, header_fields, body) -> Optional[bytes]``: the header has been checked to be a
    Pyro5 header whose body fits ``max_body(header)``; return a reply frame to send before closing, or None
    after taking the socket over.  ``on_drop(reason, peer)`` is told about every connection dropped here.
    """

    def __init__(self, on_frame: Callable, on_drop: Callable, *, timeout: float, max_pending: int,
                 max_body: Callable[[tuple], Optional[int]], name: str = "pydist-gate"):
        super().__init__(name=name, daemon=True)
        self._on_frame, self._on_drop, self._max_body = on_frame, on_drop, max_body
        self.timeout = float(timeout)
        self.max_pending = int(max_pending)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._inbox: "collections.deque" = collections.deque()
        self._lock = threading.Lock()
        self._pending: "collections.OrderedDict[object, _Pending]" = collections.OrderedDict()
        self._stopping = False
        self.dropped = 0
        self.ticks: Callable[[], None] = lambda: None    # called about twice a second (log summaries)

    # ---------------------------------------------------------------------------------------- other threads
    def submit(self, sock, addr) -> None:
        """Hand a freshly accepted socket to the gate (any thread; never blocks)."""
        peer = "%s:%s" % tuple(addr[:2]) if isinstance(addr, tuple) else (str(addr) or "unix-socket")
        with self._lock:
            if self._stopping:
                _close(sock)
                return
            self._inbox.append((sock, peer, time.monotonic() + self.timeout))
        self._wake()

    def shed(self) -> None:
        """Drop the oldest waiting connection (the node ran out of descriptors)."""
        with self._lock:
            self._shed = True
        self._wake()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5)

    def pending(self) -> int:
        return len(self._pending) + len(self._inbox)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass     # already awake (buffer full) or closing

    # ---------------------------------------------------------------------------------------- gate thread
    _shed = False

    def run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        break
                    new = list(self._inbox)
                    self._inbox.clear()
                    shed, self._shed = self._shed, False
                for sock, peer, deadline in new:
                    self._add(sock, peer, deadline)
                if shed and self._pending:
                    self._drop(next(iter(self._pending.values())), "out of file descriptors")
                now = time.monotonic()
                while self._pending:
                    first = next(iter(self._pending.values()))
                    if first.deadline > now:
                        break
                    self._drop(first, "handshake deadline passed")
                wait = 0.5
                if self._pending:
                    wait = min(wait, max(0.0, next(iter(self._pending.values())).deadline - now))
                for key, _ in self._sel.select(wait):
                    if key.data is None:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                    else:
                        self._advance(key.data)
                self.ticks()
        except Exception:       # pragma: no cover - a bug here must not go unnoticed
            log.exception("the handshake gate failed")
        finally:
            for p in list(self._pending.values()):
                self._forget(p)
                _close(p.sock)
            with self._lock:
                self._stopping = True
                for sock, _, _ in self._inbox:
                    _close(sock)
                self._inbox.clear()
            self._sel.close()
            _close(self._wake_r)
            _close(self._wake_w)

    def _add(self, sock, peer: str, deadline: float) -> None:
        if len(self._pending) >= self.max_pending:
            self._drop(next(iter(self._pending.values())), "too many connections in handshake")
        try:
            sock.setblocking(False)
        except OSError:
            _close(sock)
            return
        p = _Pending(sock, peer, deadline)
        self._pending[sock] = p
        try:
            self._sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE
                               if p.stage == "tls" else selectors.EVENT_READ, p)
        except (ValueError, OSError):
            self._pending.pop(sock, None)
            _close(sock)
            return
        self._advance(p)

    def _want(self, p: _Pending, events: int) -> None:
        try:
            self._sel.modify(p.sock, events, p)
        except (ValueError, OSError, KeyError):
            self._drop(p, "socket error")

    def _advance(self, p: _Pending) -> None:
        try:
            if p.stage == "tls":
                try:
                    p.sock.do_handshake()
                except ssl.SSLWantReadError:
                    return self._want(p, selectors.EVENT_READ)
                except ssl.SSLWantWriteError:
                    return self._want(p, selectors.EVENT_WRITE)
                p.stage = "header"
                self._want(p, selectors.EVENT_READ)
            while True:
                while len(p.buf) < p.need:
                    try:
                        chunk = p.sock.recv(p.need - len(p.buf))
                    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                        return
                    except ssl.SSLWantWriteError:
                        return self._want(p, selectors.EVENT_WRITE)
                    if not chunk:
                        return self._drop(p, "closed during the handshake", quiet=True)
                    p.buf += chunk
                if p.stage == "header":
                    fields = HEADER.unpack(bytes(p.buf))
                    body = self._max_body(fields)
                    if body is None:
                        return self._drop(p, "not a pydist hello")
                    p.header, p.stage, p.need = fields, "body", HEADER.size + body
                    if body:
                        continue
                break
        except ssl.SSLError as exc:
            return self._drop(p, f"TLS handshake failed ({exc.reason or exc})")
        except OSError:
            return self._drop(p, "socket error", quiet=True)
        self._forget(p)
        sock = p.sock
        try:
            answer = self._on_frame(sock, p.peer, p.header, bytes(p.buf[HEADER.size:]), p.deadline)
        except Exception:     # pragma: no cover - defensive: a bug in a check must not kill the gate
            log.exception("hello check failed")
            answer = b""
        if answer is not None:
            if answer:
                try:
                    sock.send(answer)      # small, and the socket's send buffer is empty: never blocks
                except (OSError, ssl.SSLError):
                    pass
            _close(sock)

    def _forget(self, p: _Pending) -> None:
        self._pending.pop(p.sock, None)
        try:
            self._sel.unregister(p.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, p: _Pending, reason: str, quiet: bool = False) -> None:
        self._forget(p)
        _close(p.sock)
        self.dropped += 1
        self._on_drop(reason, p.peer, quiet)


def _close(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass
