"""The node's side of the handshake: ``SecureDaemon``, a Pyro5 thread-server daemon that serves only
connections which proved the secret.

::

    accept thread ──sock──▶ Gate (pydist.gate: TLS handshake, bounded hello, mac, clock, nonce)
                              │ hello checked
                              ▼
                            _Serve on a Pyro5 pool thread: dst/versions checked, CONNECTOK with the reply
                              mac ──▶ handleRequest loop (idle timeout in the kernel) ──▶ on_disconnect
                                        └─ each request: pydist.fastcall.serve_one (the common call),
                                           Pyro5's own handleRequest for anything else
    a scoped hello (a group's ranks) sees only ``scoped(scope)`` in place of ``pydist.node``

The whole exchange is drawn in :mod:`pydist.security`, which re-exports every public name here.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from typing import Callable, Iterable, Optional

import Pyro5.core
import Pyro5.errors
import Pyro5.server
import Pyro5.socketutil
import Pyro5.svr_threads
from Pyro5 import config as pyro_config
from Pyro5 import protocol, serializers
from Pyro5.callcontext import current_context

from . import auth, fastcall
from .auth import TAG_AUTH, TAG_BUSY, TAG_REFUSED, TAG_VERSION, local_versions
from .errors import ConfigError
from .gate import HEADER, Gate
from .proxy import HANDSHAKE_TIMEOUT
from .transport import NODE_OBJECT_ID, _resolve, _split_location

log = logging.getLogger("pydist.security")

__all__ = ["SecureDaemon", "daemon_options", "connection_id", "refusal_frame"]

#: accepted difference between the client's and the node's clocks, seconds
CLOCK_WINDOW = 300.0
#: nonces remembered for replay detection (memory ~ 150 bytes each)
REPLAY_CACHE_SIZE = 65536
#: connections that may wait in the gate for their hello at once (when full, the oldest is dropped)
MAX_PENDING_HANDSHAKES = 256
#: seconds an authenticated connection may stay idle before the node closes it (0: never)
IDLE_TIMEOUT = 600.0
#: seconds between two refusal summary lines in the log
REFUSAL_LOG_INTERVAL = 10.0
#: the largest CONNECT of a plain Pyro5 proxy a node reads, to tell it clearly that this is a pydist node
_PLAIN_CONNECT_MAX = 4096
#: kept for callers of the previous API: no hello is bigger than this
HANDSHAKE_MAX_BYTES = auth.HELLO_MAX

_now = time.time        # one indirection so tests can move the clock of one side


def _frame(msgtype: int, seq: int, serializer_id: int, payload: bytes) -> bytes:
    return HEADER.pack(b"PYRO", protocol.PROTOCOL_VERSION, msgtype, serializer_id, 0, seq, len(payload), 0,
                       b"\0" * 16, 0, protocol._magic_number) + payload


def refusal_frame(text: str, seq: int = 0) -> bytes:
    """A CONNECTFAIL frame in pydist's format carrying ``text``."""
    return _frame(protocol.MSG_CONNECTFAIL, seq, auth.HELLO_SERIALIZER, auth.encode_refusal(text))


_PRE_AUTH_REFUSAL = f"{TAG_AUTH} refused"

_scope = threading.local()      # the scope of the connection this Pyro5 worker thread serves (None: full)


class _ScopedObjects(dict):
    """``Daemon.objectsById`` that shows a scoped connection only what its scope may reach."""

    daemon: "SecureDaemon"

    def get(self, key, default=None):
        scope = getattr(_scope, "value", None)
        if scope is None:
            return dict.get(self, key, default)
        if key != NODE_OBJECT_ID or self.daemon.scoped is None:
            return default
        return self.daemon.scoped(scope)


def daemon_options(cfg) -> dict:
    """``SecureDaemon`` keywords from a ``NodeConfig`` (its handshake and connection limits)."""
    return {"handshake_timeout": cfg.handshake_timeout, "max_pending_handshakes": cfg.max_pending_handshakes,
            "idle_timeout": cfg.idle_timeout, "refusal_log_interval": cfg.refusal_log_interval}


def connection_id(conn=None) -> Optional[int]:
    """An id of the connection (default: the one whose call this thread is serving), e.g. to own what a
    client's calls make the node hold and free it in a ``SecureDaemon.on_disconnect`` hook."""
    if conn is None:
        conn = getattr(current_context, "client", None)
    return None if conn is None else id(conn)


class _ServedConnection(Pyro5.socketutil.SocketConnection):
    """A served connection whose idle timeout is the kernel's (``SO_RCVTIMEO``/``SO_SNDTIMEO``) on a
    blocking socket, where the platform allows it (not TLS).  A Python socket timeout makes the socket
    non-blocking inside Python, so ``recv(n, MSG_WAITALL)`` returned part of a large message and Pyro5
    read the rest in 60,000-byte chunks into a bytearray that it then copied again: 20 task arguments of
    16 MiB went at 174 MB/s instead of 430 (#15).  Every read and write still gives up after the idle
    timeout, so a peer cannot hold the connection's thread with a message it never finishes."""

    kernel_timeouts = False
    unread = b""      # bytes read by the fast path (pydist.fastcall) and put back for Pyro5's handleRequest
    peer = None       # getpeername(), once (Pyro5 asks the kernel on every request)

    def use_idle_timeout(self, idle: Optional[float]) -> None:
        """Apply the idle timeout (None/0: none) to every read and write of this connection."""
        sock = self.sock
        if not idle:
            sock.settimeout(None)
            return
        if not isinstance(sock, ssl.SSLSocket):
            try:
                tv = struct.pack("@ll", int(idle), int((idle % 1) * 1_000_000))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
                sock.settimeout(None)
                self.kernel_timeouts = True
                return
            except (OSError, AttributeError, struct.error):
                pass
        sock.settimeout(idle)

    def recv(self, size: int) -> bytes:
        if self.unread:
            head, self.unread = self.unread[:size], self.unread[size:]
            return head if len(head) == size else head + self.recv(size - len(head))
        if not self.kernel_timeouts:
            return super().recv(size)
        sock, parts, got = self.sock, [], 0
        while got < size:
            try:
                chunk = sock.recv(size - got, socket.MSG_WAITALL)
            except InterruptedError:
                continue
            except BlockingIOError:   # SO_RCVTIMEO expired
                raise Pyro5.errors.TimeoutError("receiving: timeout") from None
            except OSError as exc:
                raise Pyro5.errors.ConnectionClosedError(f"receiving: connection lost: {exc}") from None
            if not chunk:
                raise Pyro5.errors.ConnectionClosedError("receiving: connection lost")
            if len(chunk) == size:
                return chunk
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)


class _Serve:
    """A Pyro5 pool job: finish the handshake of a connection whose mac the gate has checked, then serve it
    (one worker thread for the connection's life, as Pyro5's thread server does)."""

    def __init__(self, daemon: "SecureDaemon", sock, peer: str, hello: auth.Hello, seq: int, deadline: float):
        self.daemon, self.sock, self.peer, self.hello, self.seq, self.deadline = \
            daemon, sock, peer, hello, seq, deadline

    def __call__(self) -> None:
        d = self.daemon
        conn = _ServedConnection(self.sock)
        conn.pydist_scope = self.hello.scope or None
        _scope.value = conn.pydist_scope
        ok = False
        try:
            self.sock.setblocking(True)
            ok = d._finish_handshake(conn, self.hello, self.peer, self.seq, self.deadline)
            if not ok:
                return
            conn.use_idle_timeout(d.idle_timeout or None)
            try:
                conn.peer = self.sock.getpeername()
            except OSError:
                pass
            while True:
                try:
                    d.handleRequest(conn)
                except Pyro5.errors.TimeoutError:
                    log.debug("closed connection from %s: idle for %.0f s", self.peer, d.idle_timeout)
                    break
                except (OSError, Pyro5.errors.ConnectionClosedError, Pyro5.errors.SecurityError):
                    break
                except Exception:  # noqa: BLE001 - one broken connection must not take the thread down
                    log.warning("error serving %s; closing its connection", self.peer, exc_info=True)
                    break
        finally:
            _scope.value = None
            if ok:
                try:
                    d._clientDisconnect(conn)
                except Exception:  # noqa: BLE001
                    log.debug("clientDisconnect failed", exc_info=True)
            conn.close()


class SecureDaemon(Pyro5.server.Daemon):
    """A Pyro5 daemon (thread server) whose connections must pass the pydist hello.

    Extra keywords: ``handshake_timeout`` (s, default 5), ``clock_window`` (s, default 300),
    ``replay_cache_size``, ``aliases`` (extra "host:port" strings clients may dial to reach this node, e.g. a
    port mapped by Docker), ``max_pending_handshakes`` (connections waiting for their hello, default 256),
    ``idle_timeout`` (s an authenticated connection may stay idle, default 600; 0: never),
    ``refusal_log_interval`` (s between refusal summaries), ``scoped`` (``scope -> object`` shown to scoped
    connections in place of ``pydist.node``; None: scoped hellos are refused); everything else goes to
    ``Pyro5.server.Daemon``.
    """

    def __init__(self, host=None, port=0, *, secret: Optional[bytes], name: str,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, clock_window: float = CLOCK_WINDOW,
                 replay_cache_size: int = REPLAY_CACHE_SIZE, aliases: Iterable[str] = (),
                 max_pending_handshakes: int = MAX_PENDING_HANDSHAKES, idle_timeout: float = IDLE_TIMEOUT,
                 refusal_log_interval: float = REFUSAL_LOG_INTERVAL,
                 scoped: Optional[Callable[[str], object]] = None, **kw):
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and not secret:
            raise ConfigError("the cluster secret is empty; give a long random one or none at all")
        if pyro_config.SERVERTYPE != "thread":
            raise ConfigError("pydist needs Pyro5's thread server (SERVERTYPE=thread)")
        if handshake_timeout <= 0 or max_pending_handshakes < 1 or idle_timeout < 0:
            raise ConfigError("handshake_timeout must be > 0, max_pending_handshakes >= 1, idle_timeout >= 0")
        self._pydist_secret = secret
        self._pydist_name = str(name)
        self._pydist_handshake_timeout = float(handshake_timeout)
        self._pydist_window = float(clock_window)
        self._pydist_replays = auth.ReplayCache(self._pydist_window, replay_cache_size)
        self._pydist_aliases = {a.lower() for a in aliases}
        self.idle_timeout = float(idle_timeout)
        self.scoped = scoped
        self.refusals = auth.RefusalLog(log, refusal_log_interval)
        self._gate: Optional[Gate] = None
        self._accept_pause = threading.Event()
        self._pydist_hooks: list = []
        super().__init__(host, port, **kw)
        objects = _ScopedObjects(self.objectsById)   # type: ignore[has-type]
        objects.daemon = self
        self.objectsById = objects
        ts = self.transportServer
        sock = ts.sock
        if isinstance(sock, ssl.SSLSocket):
            sock.do_handshake_on_connect = False  # type: ignore[attr-defined]  # the gate runs it, without blocking, under the deadline
        sock.setblocking(False)
        self._gate = Gate(self._on_frame, self._on_drop, timeout=self._pydist_handshake_timeout,
                          max_pending=max_pending_handshakes, max_body=self._max_body,
                          name=f"pydist-gate-{self._pydist_name}")
        self._gate.ticks = self.refusals.flush
        self._gate.start()
        ts.events = self._events        # Pyro5's accept loop calls this; ours never reads from a peer

    # -- the accept thread ---------------------------------------------------------------------------------
    def _events(self, eventsockets) -> None:
        ts = self.transportServer
        if ts is None or ts.sock is None:
            return
        if not ts._selector.select(pyro_config.POLLTIMEOUT):
            return
        for _ in range(64):        # drain the backlog, then let the loop check for shutdown
            try:
                csock, caddr = ts.sock.accept()
            except (BlockingIOError, InterruptedError, socket.timeout):
                return
            except ssl.SSLError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors: free the oldest waiting hello, and do not spin on the backlog
                    self.refusals.refused("out of file descriptors", "?")
                    if self._gate is not None:
                        self._gate.shed()
                    self._accept_pause.wait(0.05)
                    return
                raise
            if ts.shutting_down or self._gate is None:
                csock.close()
                return
            self._gate.submit(csock, caddr)

    # -- the gate thread: cheap checks only (O(frame size), no DNS, no waiting) ------------------------------
    @staticmethod
    def _max_body(fields: tuple) -> Optional[int]:
        tag, ver, msgtype, ser, flags, _seq, size, ann, _corr, _res, magic = fields
        if tag != b"PYRO" or ver != protocol.PROTOCOL_VERSION or magic != protocol._magic_number \
                or msgtype != protocol.MSG_CONNECT or ann:
            return None
        if ser == auth.HELLO_SERIALIZER:
            return size if size <= auth.HELLO_MAX and not flags & ~protocol.FLAGS_CORR_ID else None
        if ser in serializers.serializers_by_id and size <= _PLAIN_CONNECT_MAX:
            return size       # a plain Pyro5 proxy: read it (never decode it) to answer it clearly
        return None

    def _on_drop(self, reason: str, peer: str, quiet: bool) -> None:
        if quiet:
            log.debug("closed connection from %s: %s", peer, reason)
        else:
            self.refusals.refused(reason, peer)

    def _on_frame(self, sock, peer: str, fields: tuple, body: bytes, deadline: float) -> Optional[bytes]:
        ser, seq = fields[3], fields[5]
        if ser != auth.HELLO_SERIALIZER:
            self.refusals.refused("not a pydist client (plain Pyro5 proxy?)", peer)
            text = f"{TAG_REFUSED} this is a pydist node: connect with pydist (SecureProxy)"
            return _frame(protocol.MSG_CONNECTFAIL, seq, ser, serializers.serializers_by_id[ser].dumps(text))
        try:
            hello = auth.parse_hello(body)
        except auth.HelloError as exc:
            self.refusals.refused(f"malformed hello ({exc})", peer)
            return refusal_frame(_PRE_AUTH_REFUSAL, seq)
        secret = self._pydist_secret
        if secret is not None:
            if not auth.hello_mac_ok(hello, secret):
                self.refusals.refused("no cluster secret" if hello.mac is None else "wrong cluster secret", peer)
                return refusal_frame(_PRE_AUTH_REFUSAL, seq)
            # the peer has proved the secret (or a scope's capability): from here refusals may say why
            now = _now()
            skew = hello.ts - now
            if abs(skew) > self._pydist_window:
                self.refusals.refused("clocks differ", peer)
                return refusal_frame(
                    f"{TAG_AUTH} handshake timestamp is {skew:+.0f} s off the clock of node {self._pydist_name} "
                    f"(allowed ±{self._pydist_window:.0f} s): check the clocks of both machines (NTP)", seq)
            problem = self._pydist_replays.check_and_add(hello.nonce, hello.ts, now)
            if problem:
                self.refusals.refused(problem, peer)
                return refusal_frame(f"{TAG_AUTH} {problem}", seq)
        if hello.scope and self.scoped is None:
            self.refusals.refused("scoped hello", peer)
            return refusal_frame(f"{TAG_REFUSED} this node serves no scoped connections", seq)
        pool = self.transportServer.pool if self.transportServer else None
        if pool is None:
            return b""
        try:
            pool.process(_Serve(self, sock, peer, hello, seq, deadline))
        except Pyro5.svr_threads.NoFreeWorkersError:
            self.refusals.refused("no free connection thread", peer)
            return refusal_frame(f"{TAG_BUSY} node {self._pydist_name} has no free connection thread (all "
                                 f"{pyro_config.THREADPOOL_SIZE} in use, see --threadpool); retry later", seq)
        except Pyro5.svr_threads.PoolError:
            return b""
        return None

    # -- a Pyro5 worker thread: the rest of the checks (may resolve a host name), then the reply --------------
    def _finish_handshake(self, conn, hello: auth.Hello, peer: str, seq: int, deadline: float) -> bool:
        sock = conn.sock
        secret = self._pydist_secret
        text = None
        if secret is not None and not self._destination_ok(conn, hello.dst):
            self.refusals.refused(f"hello made for {hello.dst}", peer)
            text = (f"{TAG_AUTH} the handshake was made for {hello.dst}, which is not an address of node "
                    f"{self._pydist_name} ({self.locationStr}); behind NAT or port mapping, start the node "
                    "with that address as an alias")
        else:
            problem = auth.version_problem(local_versions(), hello.versions())
            if problem:
                self.refusals.refused(problem, peer)
                text = (f"{TAG_VERSION} {problem}: node {self._pydist_name} runs {auth.describe(local_versions())}; "
                        f"the client runs {auth.describe(hello.versions())}")
        if text is None:
            try:
                m = self.objectsById[Pyro5.core.DAEMON_NAME].get_metadata(hello.object)
                meta = auth.encode_meta(m["methods"], m["oneway"], m["attrs"])
            except (Pyro5.errors.DaemonError, ValueError):
                text = f"{TAG_REFUSED} unknown object {hello.object!r}"
        if text is None:
            key = auth.key_for(secret, hello.scope) if secret is not None else None
            body = auth.encode_reply(key, hello.nonce, self._pydist_name, meta, idle=self.idle_timeout)
            frame = _frame(protocol.MSG_CONNECTOK, seq, auth.HELLO_SERIALIZER, body)
        else:
            frame = refusal_frame(text, seq)
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            conn.send(frame)
        except (OSError, Pyro5.errors.CommunicationError) as exc:
            log.debug("could not answer the hello of %s: %s", peer, exc)
            return False
        return text is None

    def handleRequest(self, conn) -> None:
        """One request of an authenticated connection: the common call through ``pydist.fastcall``,
        anything else through Pyro5's own ``handleRequest``."""
        if isinstance(conn, _ServedConnection) and not pyro_config.COMPRESSION and not pyro_config.LOGWIRE:
            fastcall.serve_one(self, conn, super().handleRequest)
        else:
            super().handleRequest(conn)

    def validateHandshake(self, conn, data):       # pragma: no cover - the gate replaces Pyro5's handshake
        raise Pyro5.errors.SecurityError("pydist nodes check hellos in the gate")

    # -- connections ---------------------------------------------------------------------------------------
    def on_disconnect(self, hook: Callable[[object], object]) -> None:
        """Call ``hook(connection_id)`` whenever an authenticated connection ends (free what it held)."""
        self._pydist_hooks.append(hook)

    def clientDisconnect(self, conn) -> None:
        for hook in list(self._pydist_hooks):
            try:
                hook(connection_id(conn))
            except Exception:  # noqa: BLE001 - one hook's bug must not keep the others from running
                log.exception("disconnect hook %r failed", hook)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def pending_handshakes(self) -> int:
        """Connections waiting in the gate for their hello."""
        return self._gate.pending() if self._gate else 0

    def close(self) -> None:
        gate, self._gate = self._gate, None
        self._accept_pause.set()
        if gate is not None:
            gate.stop()
        super().close()

    def _destination_ok(self, conn, dst: str) -> bool:
        """Is ``dst`` (the 'host:port' the client dialed) this node?  Stops replaying a hello sniffed on its
        way to node A against node B of the same cluster within the clock window."""
        dst = dst.lower()
        if dst in self._pydist_aliases:
            return True
        locations = {self.locationStr.lower()}
        if self.natLocationStr:
            locations.add(self.natLocationStr.lower())
        if dst in locations or dst.startswith("./u:"):
            return dst in locations
        host, port = _split_location(dst)
        try:
            local = conn.sock.getsockname()
        except OSError:
            return False
        if not isinstance(local, tuple):
            return False
        ports = {str(local[1])} | {_split_location(loc)[1] for loc in locations}
        if port not in ports:
            return False
        try:
            local_ip = ipaddress.ip_address(str(local[0]).split("%")[0])
        except ValueError:
            return False
        if isinstance(local_ip, ipaddress.IPv6Address) and local_ip.ipv4_mapped:
            local_ip = local_ip.ipv4_mapped
        try:
            return ipaddress.ip_address(host) == local_ip
        except ValueError:
            return local_ip in _resolve(host)
