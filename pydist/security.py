"""The cluster secret, proven in both directions before a node serves anything; TLS; the per-user secret.

Every Pyro5 connection (client -> node, node -> node, rank -> its home node) opens with one CONNECT
frame and one CONNECTOK / CONNECTFAIL frame.  pydist fills both with its own bounded, typed hello
(``pydist.auth``), read on the node by one non-blocking thread (``pydist.gate``)::

    SecureProxy (pydist.proxy)                          SecureDaemon (here)
    ──────────────────────────                          ───────────────────
    hello: versions, nonce_c, ts, dst, object, scope,   accept thread: accept(), hand to the gate, nothing else
           mac = HMAC(key, every byte)  ──────────────▶  gate thread: TLS handshake, 40-byte header, body
                                                          <= 512 bytes, before the deadline; then the mac
                                                          (compare_digest), |now - ts| <= window, nonce
                                                          never seen; then a Pyro5 worker thread (pool full:
                                                          "busy", a retryable refusal) checks dst and the
                                                          versions and answers
                         ◀── reply: versions, name, nonce_s, exposed names, idle timeout,
                                    mac = HMAC(key, nonce_c + every byte)
    checks the reply's mac (a rogue node without the
    secret gets no work), the versions; learns the
    node's name and its idle timeout.

Before the mac is checked nothing a peer sends is decoded by a general deserializer, nothing costs more
than O(frame size), and a refusal names nothing about the node.  ``key`` is the secret, or for a scoped
connection (a task group's ranks) the capability of that scope (``auth.capability``): such a connection
sees only the object ``scoped(scope)`` returns, never the node itself.

No secret given means "this user only": ``user_secret()`` is a random secret in a file only this user can
read (``$XDG_CONFIG_HOME/pydist/secret`` or ``~/.config/pydist/secret``, mode 0600), made by the first node
that needs it and found by every client of the same user.  ``--insecure`` / ``PYDIST_INSECURE=1``: no
secret at all (anyone who reaches the port runs code as the node's user).

What the handshake does NOT give (see SECURITY.md): without TLS the session after the handshake is plaintext
and has no per-message integrity, so an active man-in-the-middle can hijack an authenticated connection.
"""
from __future__ import annotations

import errno
import ipaddress
import functools
import logging
import os
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import Pyro5.core
import Pyro5.errors
import Pyro5.server
import Pyro5.socketutil
import Pyro5.svr_threads
from Pyro5 import config as pyro_config
from Pyro5 import protocol, serializers
from Pyro5.callcontext import current_context

from . import auth
from .auth import (PROTOCOL_VERSION, TAG_AUTH, TAG_BUSY, TAG_REFUSED, TAG_VERSION, UserSecret,  # noqa: F401
                   capability, load_secret, local_versions, new_secret, user_secret, user_secret_path)
from .certs import make_certs  # noqa: F401  (re-exported: pydist.security.make_certs)
from .errors import AuthenticationError, ConfigError, VersionMismatch
from .gate import HEADER, Gate
from .proxy import HANDSHAKE_TIMEOUT, SecureProxy, translate_connect_error  # noqa: F401

log = logging.getLogger("pydist.security")

NODE_OBJECT_ID = "pydist.node"

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


# ---------------------------------------------------------------------------------------------------------
# Pyro5 configuration, TLS
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TLSSettings:
    """Certificate files (PEM).  Server: cert+key required; with ca, client certificates are required
    (2-way TLS).  Client: ca required (the node's certificate must chain to it and name the host you dial);
    cert+key for 2-way TLS.  A node is both: it uses cert/key as client certificate towards other nodes.
    Only ``ca`` is trusted: never the system's certificate store."""

    cert: Optional[str] = None
    key: Optional[str] = None
    ca: Optional[str] = None


_configure_lock = threading.Lock()
_applied_tls: Optional[tuple] = None


def _register_errors() -> None:
    """Let pydist's own exceptions cross Pyro5 with their type and message (Pyro5 rebuilds only builtin
    and Pyro5 exceptions by default: ours would arrive as a bare SerializeError)."""
    from . import errors as _errors

    def make(classname, data):
        cls = getattr(_errors, classname.rsplit(".", 1)[1], None)
        if not (isinstance(cls, type) and issubclass(cls, _errors.PydistError)):
            raise Pyro5.errors.SerializeError(f"unsupported serialized class: {classname}")
        return serializers.SerializerBase.make_exception(cls, data)

    for name in dir(_errors):
        cls = getattr(_errors, name)
        if isinstance(cls, type) and issubclass(cls, _errors.PydistError) and cls.__module__ == _errors.__name__:
            serializers.SerializerBase.register_dict_to_class(f"{cls.__module__}.{cls.__name__}", make)


_register_errors()


class _FlatMarshalSerializer(serializers.MarshalSerializer):
    """Pyro5's marshal serializer without the deep walk over every received message.

    Pyro5 rebuilds objects from ``{"__class__": ...}`` dicts by walking the whole received structure
    in Python, element by element: a 10,000-task batch costs ~100,000 calls on every hop.  pydist's wire
    messages are plain data (tuples, lists, dicts, str, bytes, numbers); the only class dicts that cross
    are exceptions, and Pyro5 sends those as the whole reply.  So only the top level is looked at.
    (A nested ``__class__`` dict from a hostile peer simply stays a dict: strictly less is rebuilt.)
    """

    def recreate_classes(self, literal):
        if type(literal) is dict and "__class__" in literal:
            return self.dict_to_class(literal)
        return literal


def _install_flat_marshal() -> None:
    flat = _FlatMarshalSerializer()
    serializers.serializers["marshal"] = flat
    serializers.serializers_by_id[flat.serializer_id] = flat


_install_flat_marshal()


def configure_pyro(*, max_message_size: Optional[int] = None, threadpool: Optional[int] = None,
                   tls: Optional[TLSSettings] = None, server: bool = False) -> None:
    """Set Pyro5's process-global config.  Call it before creating any daemon or proxy.

    - ``SOCK_NODELAY=True`` (2-way TLS connects took 44 ms without it, 3 ms with it).
    - ``THREADPOOL_SIZE`` = ``threadpool`` (the thread server holds one thread per open connection).
    - ``MAX_MESSAGE_SIZE`` = ``max_message_size``; a bigger message just closes that connection.
    - Pyro5 5.x has no ``SERIALIZERS_ACCEPTED`` (that was Pyro4): a daemon answers in whatever serializer a
      request uses, all of them data-only.  The global ``SERIALIZER`` stays serpent for name-server proxies;
      ``SecureProxy`` chooses marshal per proxy, and the daemon only accepts a marshal CONNECT.
    - TLS: the client context (used by every proxy of this process, name-server proxies included) trusts
      only ``tls.ca``: Pyro5's own would also trust the system's certificate store.
    - TLS: Pyro5 builds its client and server ``SSLContext`` once per process on first use and caches it.
      When the TLS settings change, this function drops those cached contexts so the next connection (or
      daemon) uses the new ones; daemons already listening keep the context they were created with.
    """
    global _applied_tls
    with _configure_lock:
        pyro_config.SOCK_NODELAY = True
        if threadpool is not None:
            if threadpool < 1:
                raise ConfigError(f"threadpool must be >= 1, got {threadpool}")
            pyro_config.THREADPOOL_SIZE = int(threadpool)
            pyro_config.THREADPOOL_SIZE_MIN = min(pyro_config.THREADPOOL_SIZE_MIN, pyro_config.THREADPOOL_SIZE)
        if max_message_size is not None:
            if max_message_size < 64 * 1024:
                raise ConfigError(f"max_message_size must be >= {64 * 1024}, got {max_message_size}")
            pyro_config.MAX_MESSAGE_SIZE = int(max_message_size)
        if tls is None:
            wanted: tuple = ("off",)
        else:
            for what, path in (("cert", tls.cert), ("key", tls.key), ("ca", tls.ca)):
                if path and not os.path.isfile(path):
                    raise ConfigError(f"TLS {what} file {path} does not exist (make some with: pydist make-certs DIR)")
            if server and not (tls.cert and tls.key):
                raise ConfigError("a TLS server needs both a certificate and its key (--tls-cert, --tls-key)")
            if not server and not tls.ca:
                raise ConfigError("a TLS client needs the CA certificate that signed the nodes' certificates "
                                  "(--tls-ca / tls_ca)")
            if bool(tls.cert) != bool(tls.key):
                raise ConfigError("give both the TLS certificate and its key, or neither")
            wanted = ("on", server, tls.cert, tls.key, tls.ca)
        if wanted != _applied_tls:
            if tls is None:
                pyro_config.SSL = False
            else:
                pyro_config.SSL = True
                pyro_config.SSL_CACERTS = tls.ca or ""
                pyro_config.SSL_CLIENTCERT = tls.cert or ""
                pyro_config.SSL_CLIENTKEY = tls.key or ""
                if server:
                    pyro_config.SSL_SERVERCERT = tls.cert or ""
                    pyro_config.SSL_SERVERKEY = tls.key or ""
                    pyro_config.SSL_REQUIRECLIENTCERT = bool(tls.ca)
            _reset_ssl_context_cache()
            if tls is not None:
                _install_client_context(tls)
            _applied_tls = wanted


def _reset_ssl_context_cache() -> None:
    # Pyro5.socketutil keeps module globals '__ssl_server_context' / '__ssl_client_context' (not mangled).
    g = vars(Pyro5.socketutil)
    for name in ("__ssl_server_context", "__ssl_client_context"):
        if name in g:
            g[name] = None



def _install_client_context(tls: TLSSettings) -> None:
    """Build the TLS client context (only ``tls.ca`` trusted, hostname checked) and put it in Pyro5's cache."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)       # CERT_REQUIRED, check_hostname; no trust anchors yet
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca:
        if os.path.isdir(tls.ca):
            ctx.load_verify_locations(capath=tls.ca)
        else:
            ctx.load_verify_locations(cafile=tls.ca)
    if tls.cert:
        ctx.load_cert_chain(tls.cert, tls.key or None)
    vars(Pyro5.socketutil)["__ssl_client_context"] = ctx


@functools.lru_cache(maxsize=256)
def _resolve_cached(host: str, _bucket: int) -> frozenset:
    try:
        return frozenset(ipaddress.ip_address(str(ai[4][0]).split("%")[0]) for ai in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return frozenset()


def _resolve(host: str) -> frozenset:
    return _resolve_cached(host, int(time.monotonic() // 60))    # DNS answers reused for up to a minute


def _split_location(loc: str) -> tuple:
    host, _, port = loc.rpartition(":")
    return host.strip("[]").lower(), port



# ---------------------------------------------------------------------------------------------------------
# server side
# ---------------------------------------------------------------------------------------------------------

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

    def validateHandshake(self, conn, data):       # pragma: no cover - the gate replaces Pyro5's handshake
        raise Pyro5.errors.SecurityError("pydist nodes check hellos in the gate")

    # -- connections ---------------------------------------------------------------------------------------
    def on_disconnect(self, hook: Callable[[object], None]) -> None:
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




def _node_uri(uri_or_address: str) -> str:
    s = str(uri_or_address).strip()
    if s.upper().startswith(("PYRO:", "PYRONAME:", "PYROMETA:")):
        return s
    if s.startswith("tcp://"):
        s = s[len("tcp://"):]
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"cannot read node address {uri_or_address!r}: use host:port or a PYRO: URI")
    if ":" in host and not host.startswith("["):
        host = "[%s]" % host
    return f"PYRO:{NODE_OBJECT_ID}@{host}:{port}"


# ---------------------------------------------------------------------------------------------------------
# connecting
# ---------------------------------------------------------------------------------------------------------

def _is_final(err: Exception) -> bool:
    return isinstance(err, (AuthenticationError, VersionMismatch)) or getattr(err, "pydist_final", False)


def connect(uri_or_address: str, *, secret: Optional[bytes], timeout: float = 5.0, tls=None,
            call_timeout: Optional[float] = None, scope: str = "") -> SecureProxy:
    """Connect to a node now.  'host:port' means ``PYRO:pydist.node@host:port``; a PYRO/PYRONAME URI is used
    as is.  Refused, unreachable or busy: retried until ``timeout``, then ``ClusterUnavailable`` naming the
    address.  Handshake refusals raise ``AuthenticationError`` / ``VersionMismatch`` at once.  ``tls``: if
    given, ``configure_pyro(tls=tls)`` is called first (client role).  ``call_timeout`` becomes the proxy's
    Pyro5 call timeout (None: unlimited).  ``scope``: a scoped connection, ``secret`` being that scope's
    capability.  The proxy belongs to the calling thread (Pyro5 rule)."""
    if tls is not None:
        configure_pyro(tls=tls)
    uri = _node_uri(uri_or_address)
    address = uri_or_address if not str(uri_or_address).upper().startswith("PYRO") else uri
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        left = deadline - time.monotonic()
        proxy = SecureProxy(uri, secret=secret, timeout=call_timeout, scope=scope,
                            handshake_timeout=max(0.05, min(HANDSHAKE_TIMEOUT, left)))
        try:
            proxy._pyroBind()
            return proxy
        except Exception as exc:  # noqa: BLE001 - translated below
            proxy._pyroRelease()
            err = translate_connect_error(exc, address)
            if _is_final(err) or time.monotonic() + delay >= deadline:
                raise err from (None if err is exc else exc)
        time.sleep(delay)      # waiting for a node that is still starting, or busy
        delay = min(delay * 2, 0.5)


# ---------------------------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------------------------

def release(proxy) -> None:
    """Close a proxy's connection, if any, ignoring errors (the peer may be gone already)."""
    if proxy is None:
        return
    try:
        proxy._pyroRelease()
    except Exception:
        pass


__all__ = ["PROTOCOL_VERSION", "NODE_OBJECT_ID", "TLSSettings", "configure_pyro", "SecureDaemon", "SecureProxy",
           "connect", "translate_connect_error", "make_certs", "load_secret", "new_secret", "local_versions",
           "user_secret", "user_secret_path", "UserSecret", "capability", "refusal_frame"]
