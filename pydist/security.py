"""The cluster secret, checked in Pyro5's connection handshake in both directions; TLS settings.

Every Pyro5 connection (client -> node, node -> node) opens with one CONNECT message from the proxy and one
CONNECTOK / CONNECTFAIL reply from the daemon.  pydist puts a mutual HMAC proof and the version facts into
that exchange::

    SecureProxy                                             SecureDaemon
    ───────────                                             ────────────
    hello = {pydist, ver, py, cp, nonce_c, ts, dst,
             mac = HMAC(secret, "pydist-client|"+fields)} ──▶  1. frame <= 64 KiB, read within a deadline
                                                            2. protocol version, then the mac
                                                               (compare_digest), then |now - ts| <= window,
                                                               then nonce_c never seen (bounded cache),
                                                               then dst is one of this node's addresses,
                                                               then Python / cloudpickle versions
                         ◀── reply = {pydist, ver, py, cp, name, nonce_s,
                                      mac = HMAC(secret, "pydist-server|"+nonce_c+nonce_s+fields)}
    3. checks the reply mac (so a rogue node that
       does not know the secret gets no work), the
       versions, and learns the node's name.

Refusals travel back as Pyro5's CONNECTFAIL text, which always starts with one of the tags below;
``translate_connect_error`` turns the client's ``CommunicationError`` into ``AuthenticationError``,
``VersionMismatch`` or ``ClusterUnavailable`` naming the address.

What the handshake does NOT give (see SECURITY.md): without TLS the session after the handshake is plaintext
and has no per-message integrity, so an active man-in-the-middle can hijack an authenticated connection.
Use TLS (``TLSSettings``) on any network you do not fully trust.

Hostile input on the daemon: the CONNECT frame is read by our own code with a total deadline (the TLS
handshake included), a size cap and bounded decompression, so a silent or slow peer holds a server thread
for at most ``handshake_timeout`` seconds and a peer sending garbage only loses its own connection.  After a
successful handshake the socket goes back to Pyro5's normal (blocking) mode: idle authenticated connections
are never dropped by pydist.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import heapq
import hmac
import ipaddress
import logging
import marshal
import math
import os
import secrets
import socket
import ssl
import struct
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import Pyro5.client
import Pyro5.core
import Pyro5.errors
import Pyro5.server
import Pyro5.socketutil
from Pyro5 import config as pyro_config
from Pyro5 import protocol, serializers
from Pyro5.callcontext import current_context

from .config import read_secret_file
from .errors import AuthenticationError, ClusterUnavailable, ConfigError, VersionMismatch

log = logging.getLogger("pydist.security")

PROTOCOL_VERSION = 1
NODE_OBJECT_ID = "pydist.node"

#: seconds a peer may take from TCP accept to a complete CONNECT message (TLS handshake included)
HANDSHAKE_TIMEOUT = 5.0
#: accepted difference between the client's and the node's clocks, seconds
CLOCK_WINDOW = 300.0
#: the CONNECT message of a pydist client is ~250 bytes; anything over this is refused before parsing
HANDSHAKE_MAX_BYTES = 64 * 1024
#: nonces remembered for replay detection (memory ~ 150 bytes each)
REPLAY_CACHE_SIZE = 65536

# Tags that start every refusal text the daemon sends back (the client sees them inside CommunicationError).
TAG_AUTH = "pydist-auth:"
TAG_VERSION = "pydist-version:"
TAG_REFUSED = "pydist-refused:"

_MARSHAL_ID = serializers.MarshalSerializer.serializer_id
_now = time.time        # one indirection so tests can move the clock of one side


# ---------------------------------------------------------------------------------------------------------
# versions
# ---------------------------------------------------------------------------------------------------------

def _pydist_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("pydist")
        except PackageNotFoundError:
            return "0+unknown"
    except Exception:       # pragma: no cover - broken metadata
        return "0+unknown"


def _cloudpickle_version() -> str:
    try:
        import cloudpickle
        major, minor = (cloudpickle.__version__.split(".") + ["0"])[:2]
        return f"{major}.{minor}"
    except Exception:       # pragma: no cover - cloudpickle is a dependency
        return "0.0"


@functools.lru_cache(maxsize=1)
def local_versions() -> dict:
    """This process's version facts, as sent in every handshake."""
    return {"pydist": PROTOCOL_VERSION, "ver": _pydist_version(),
            "py": "%d.%d" % sys.version_info[:2], "cp": _cloudpickle_version()}


def _describe(v: Mapping) -> str:
    return (f"pydist {v.get('ver')} (protocol {v.get('pydist')}), Python {v.get('py')}, "
            f"cloudpickle {v.get('cp')}")


def _version_problem(mine: Mapping, theirs: Mapping) -> Optional[str]:
    """None if compatible, else which fact differs."""
    if theirs.get("pydist") != mine["pydist"]:
        return "pydist protocol versions differ"
    if theirs.get("py") != mine["py"]:
        return "Python major.minor versions differ (pickles of functions are not portable across them)"
    if str(theirs.get("cp", "")).split(".")[0] != str(mine["cp"]).split(".")[0]:
        return "cloudpickle major versions differ"
    return None


# ---------------------------------------------------------------------------------------------------------
# MAC
# ---------------------------------------------------------------------------------------------------------

def _mac(secret: bytes, label: bytes, *parts) -> bytes:
    """HMAC-SHA256 over the label and length-prefixed parts (unambiguous)."""
    h = hmac.new(secret, label, hashlib.sha256)
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        h.update(struct.pack("!I", len(b)))
        h.update(b)
    return h.digest()


def _client_fields(h: Mapping) -> tuple:
    return (h["pydist"], h["ver"], h["py"], h["cp"], h["nonce"], repr(float(h["ts"])), h["dst"])


def _server_fields(r: Mapping, nonce_c: bytes) -> tuple:
    return (r["pydist"], r["ver"], r["py"], r["cp"], nonce_c, r["nonce"], r["name"])


class _Me:
    """This process's node name, sent (unauthenticated, for log messages only) in its hellos."""

    name: Optional[str] = None


def set_local_name(name: Optional[str]) -> None:
    """Name this process's hellos carry (a node sets its own), so a refusing node's log names it."""
    _Me.name = None if name is None else str(name)[:200]


def client_hello(secret: Optional[bytes], dst: str, *, ts: Optional[float] = None,
                 nonce: Optional[bytes] = None, versions: Optional[Mapping] = None) -> dict:
    """The handshake dict a client sends (fresh nonce each call).  Exposed for tests and tools."""
    h = dict(versions or local_versions())
    h.update(nonce=nonce or secrets.token_bytes(16), ts=float(_now() if ts is None else ts), dst=str(dst))
    if _Me.name:
        h["src"] = _Me.name   # not covered by the MAC: only ever shown in log lines, as a claim
    h["mac"] = _mac(secret, b"pydist-client|", *_client_fields(h)) if secret else None
    return h


# ---------------------------------------------------------------------------------------------------------
# replay cache
# ---------------------------------------------------------------------------------------------------------

class _ReplayCache:
    """Nonces seen within the clock window.  Bounded: when full, the entry with the oldest timestamp is
    evicted and its timestamp becomes a floor: hellos at or before the floor are refused, so an evicted
    nonce can never be replayed (the cost of overflow is refusing very old hellos, not accepting replays)."""

    def __init__(self, window: float, maxsize: int):
        self.window, self.maxsize = window, maxsize
        self._seen: dict = {}
        self._heap: list = []
        self._floor = float("-inf")
        self._lock = threading.Lock()

    def check_and_add(self, nonce: bytes, ts: float, now: float) -> Optional[str]:
        with self._lock:
            while self._heap and self._heap[0][0] + self.window < now:     # expired: cannot be replayed anyway
                _, old = heapq.heappop(self._heap)
                self._seen.pop(old, None)
            if nonce in self._seen:
                return "replayed handshake (this nonce was already used)"
            if ts <= self._floor:
                return "handshake too old for the replay cache; retry"
            if len(self._seen) >= self.maxsize:
                old_ts, old = heapq.heappop(self._heap)
                self._seen.pop(old, None)
                self._floor = max(self._floor, old_ts)
                if ts <= self._floor:
                    return "handshake too old for the replay cache; retry"
            self._seen[nonce] = ts
            heapq.heappush(self._heap, (ts, nonce))
            return None

    def __len__(self) -> int:
        return len(self._seen)


# ---------------------------------------------------------------------------------------------------------
# Pyro5 configuration
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TLSSettings:
    """Certificate files (PEM).  Server: cert+key required; with ca, client certificates are required
    (2-way TLS).  Client: ca required (the node's certificate must chain to it and name the host you dial);
    cert+key for 2-way TLS.  A node is both: it uses cert/key as client certificate towards other nodes."""

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
            if max_message_size < HANDSHAKE_MAX_BYTES:
                raise ConfigError(f"max_message_size must be >= {HANDSHAKE_MAX_BYTES}, got {max_message_size}")
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
            _applied_tls = wanted


def _reset_ssl_context_cache() -> None:
    # Pyro5.socketutil keeps module globals '__ssl_server_context' / '__ssl_client_context' (not mangled).
    g = vars(Pyro5.socketutil)
    for name in ("__ssl_server_context", "__ssl_client_context"):
        if name in g:
            g[name] = None


# ---------------------------------------------------------------------------------------------------------
# server side
# ---------------------------------------------------------------------------------------------------------

class _HandshakeRefused(Exception):
    """Carries a tagged refusal text back to the client (str(exc) is what it sees)."""


def _peer_of(conn) -> str:
    try:
        addr = conn.sock.getpeername()
        if isinstance(addr, tuple):
            return "%s:%s" % addr[:2]
        return str(addr) or "unix-socket"
    except OSError:
        return "?"


def _recv_exact(sock, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("handshake deadline")
        sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 65536))
        if not chunk:
            raise ConnectionError("peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


@functools.lru_cache(maxsize=256)
def _resolve_cached(host: str, _bucket: int) -> frozenset:
    try:
        return frozenset(ipaddress.ip_address(ai[4][0].split("%")[0]) for ai in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return frozenset()


def _resolve(host: str) -> frozenset:
    return _resolve_cached(host, int(time.monotonic() // 60))    # DNS answers reused for up to a minute


def _split_location(loc: str) -> tuple:
    host, _, port = loc.rpartition(":")
    return host.strip("[]").lower(), port


class SecureDaemon(Pyro5.server.Daemon):
    """A Pyro5 daemon whose connections must pass the pydist handshake.

    Extra keywords: ``handshake_timeout`` (s, default 5), ``clock_window`` (s, default 300),
    ``replay_cache_size``, ``aliases`` (extra "host:port" strings clients may dial to reach this node,
    e.g. a port mapped by Docker or a load balancer); everything else goes to ``Pyro5.server.Daemon``.
    """

    def __init__(self, host=None, port=0, *, secret: Optional[bytes], name: str,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, clock_window: float = CLOCK_WINDOW,
                 replay_cache_size: int = REPLAY_CACHE_SIZE, aliases: Iterable[str] = (), **kw):
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and not secret:
            raise ConfigError("the cluster secret is empty; give a long random one or none at all")
        self._pydist_secret = secret
        self._pydist_name = str(name)
        self._pydist_handshake_timeout = float(handshake_timeout)
        self._pydist_window = float(clock_window)
        self._pydist_replays = _ReplayCache(self._pydist_window, replay_cache_size)
        self._pydist_aliases = {a.lower() for a in aliases}
        from .diagnose import RateLimited

        self._pydist_refusals = RateLimited(log, every=30.0, suffix="")   # a retrying peer: one line, not one per try
        super().__init__(host, port, **kw)
        sock = self.transportServer.sock
        if isinstance(sock, ssl.SSLSocket):
            # Otherwise accept() runs the TLS handshake in the daemon's single accept thread, where one silent
            # peer blocks every other connection.  We run it in the connection's worker, under the deadline.
            sock.do_handshake_on_connect = False

    # -- the frame ---------------------------------------------------------------------------------------

    def _handshake(self, conn, denied_reason=None):
        """Pyro5's handshake, with a total deadline and a size cap (replaces Daemon._handshake)."""
        previous_timeout = conn.gettimeout()
        budget = self._pydist_handshake_timeout if not denied_reason else min(1.0, self._pydist_handshake_timeout)
        deadline = time.monotonic() + budget
        sock = conn.sock
        peer = _peer_of(conn)
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.do_handshake()
            header = _recv_exact(sock, protocol._header_size, deadline)
            msg = protocol.ReceivingMessage(header)      # checks tag, Pyro5 protocol version, magic, size limit
            size = msg.data_size + msg.annotations_size
            if msg.type != protocol.MSG_CONNECT or size > HANDSHAKE_MAX_BYTES:
                log.info("closed connection from %s: not a valid connect message", peer)
                return False
            payload = _recv_exact(sock, size, deadline) if size else b""
        except (OSError, EOFError, ValueError, Pyro5.errors.PyroError) as exc:
            # silent (deadline), closed early, TLS failure, garbage: drop just this connection
            level = logging.WARNING if isinstance(exc, ssl.SSLError) else logging.DEBUG
            log.log(level, "closed connection from %s during handshake: %s", peer, exc)
            return False
        compressed = bool(msg.flags & protocol.FLAGS_COMPRESSED)
        msg.flags &= ~protocol.FLAGS_COMPRESSED
        serializer_id = msg.serializer_id if msg.serializer_id in serializers.serializers_by_id else _MARSHAL_ID
        ok = False
        try:
            if msg.flags & protocol.FLAGS_CORR_ID:
                current_context.correlation_id = uuid.UUID(bytes=msg.corr_id)
            else:
                current_context.correlation_id = uuid.uuid4()
            if denied_reason:
                raise _HandshakeRefused(f"{TAG_REFUSED} {denied_reason}")
            msg.add_payload(payload)
            data = bytes(msg.data)
            if compressed:
                dec = zlib.decompressobj()
                data = dec.decompress(data, HANDSHAKE_MAX_BYTES)
                if dec.unconsumed_tail or not dec.eof:
                    raise _HandshakeRefused(f"{TAG_REFUSED} connect message too large or corrupt")
            if msg.serializer_id != _MARSHAL_ID:
                raise _HandshakeRefused(f"{TAG_REFUSED} this is a pydist node: connect with pydist "
                                        "(SecureProxy, marshal serializer)")
            try:
                request = marshal.loads(data)
            except (ValueError, EOFError, TypeError) as exc:
                raise _HandshakeRefused(f"{TAG_REFUSED} unreadable connect message ({exc})") from None
            if not isinstance(request, dict) or "handshake" not in request or "object" not in request:
                raise _HandshakeRefused(f"{TAG_REFUSED} not a pydist connect message")
            reply = self.validateHandshake(conn, request["handshake"])
            meta = self.objectsById[Pyro5.core.DAEMON_NAME].get_metadata(request["object"])
            out = {"handshake": reply, "meta": meta}
            msgtype, ok = protocol.MSG_CONNECTOK, True
        except Exception as exc:  # noqa: BLE001 - every refusal goes back to the peer as text
            if not isinstance(exc, (_HandshakeRefused, AuthenticationError, VersionMismatch)):
                log.debug("handshake from %s failed", peer, exc_info=True)
            out, msgtype = str(exc), protocol.MSG_CONNECTFAIL
        try:
            serializer = serializers.serializers_by_id[serializer_id]
            annotations = getattr(self, "_Daemon__annotations", dict)()
            reply_msg = protocol.SendingMessage(msgtype, 0, msg.seq, serializer_id, serializer.dumps(out),
                                                annotations=annotations)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            conn.send(reply_msg.data)
        except Exception as exc:  # noqa: BLE001
            log.debug("could not answer the handshake of %s: %s", peer, exc)
            return False
        if ok:
            conn.settimeout(previous_timeout)   # back to Pyro5's mode: idle connections are never dropped
        return ok

    # -- the content ---------------------------------------------------------------------------------------

    def validateHandshake(self, conn, data):
        """Check a client hello (see the module docstring); return the reply dict or raise (tagged text)."""
        peer = _peer_of(conn) if conn is not None else "?"
        if not isinstance(data, dict):
            raise _HandshakeRefused(f"{TAG_REFUSED} not a pydist client (plain Pyro5 proxy?)")
        try:
            hello = {"pydist": int(data["pydist"]), "ver": str(data["ver"]), "py": str(data["py"]),
                     "cp": str(data["cp"]), "nonce": bytes(data["nonce"]), "ts": float(data["ts"]),
                     "dst": str(data["dst"]), "mac": data.get("mac")}
        except (KeyError, TypeError, ValueError):
            raise _HandshakeRefused(f"{TAG_REFUSED} malformed pydist handshake") from None
        if not math.isfinite(hello["ts"]):
            raise _HandshakeRefused(f"{TAG_REFUSED} malformed pydist handshake")
        src = data.get("src")
        src = src[:64] if isinstance(src, str) and src.isprintable() else None
        key = f"{peer.rsplit(':', 1)[0]}|{src}"
        if src:
            peer = f"{peer} (node {src!r})"

        def refused(reason: str) -> None:
            self._pydist_refusals.fail(f"{key}|{reason}", f"refused connection from {peer}: {reason}")

        mine = local_versions()
        if hello["pydist"] != mine["pydist"]:
            raise self._version_error(hello, "pydist protocol versions differ")
        secret = self._pydist_secret
        if secret is not None:
            mac = hello["mac"]
            if not isinstance(mac, bytes):
                refused("the client has no cluster secret")
                raise AuthenticationError(f"{TAG_AUTH} node {self._pydist_name} requires the cluster secret and "
                                          "the client gave none (set PYDIST_SECRET or --secret-file)")
            if len(hello["nonce"]) < 16 or not hmac.compare_digest(
                    mac, _mac(secret, b"pydist-client|", *_client_fields(hello))):
                refused("wrong cluster secret")
                raise AuthenticationError(f"{TAG_AUTH} node {self._pydist_name} refused the connection: "
                                          "wrong cluster secret")
            now = _now()
            skew = hello["ts"] - now
            if abs(skew) > self._pydist_window:
                refused(f"clocks differ by {skew:.0f} s")
                raise AuthenticationError(
                    f"{TAG_AUTH} handshake timestamp is {skew:+.0f} s off the clock of node {self._pydist_name} "
                    f"(allowed ±{self._pydist_window:.0f} s): check the clocks of both machines (NTP)")
            problem = self._pydist_replays.check_and_add(hello["nonce"], hello["ts"], now)
            if problem:
                refused(problem)
                raise AuthenticationError(f"{TAG_AUTH} {problem}")
            if conn is not None and not self._destination_ok(conn, hello["dst"]):
                refused(f"handshake made for {hello['dst']}")
                raise AuthenticationError(
                    f"{TAG_AUTH} the handshake was made for {hello['dst']}, which is not an address of node "
                    f"{self._pydist_name} ({self.locationStr}); behind NAT or port mapping, start the node "
                    "with that address as an alias")
        problem = _version_problem(mine, hello)
        if problem:
            raise self._version_error(hello, problem)
        reply = dict(mine)
        reply.update(name=self._pydist_name, nonce=secrets.token_bytes(16))
        reply["mac"] = _mac(secret, b"pydist-server|", *_server_fields(reply, hello["nonce"])) if secret else None
        return reply

    def _version_error(self, hello, problem) -> VersionMismatch:
        log.warning("refused connection: %s", problem)
        return VersionMismatch(f"{TAG_VERSION} {problem}: node {self._pydist_name} runs "
                               f"{_describe(local_versions())}; the client runs {_describe(hello)}")

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


# ---------------------------------------------------------------------------------------------------------
# client side
# ---------------------------------------------------------------------------------------------------------

def _uri_location(uri: Pyro5.core.URI) -> str:
    if uri.sockname:
        return "./u:" + uri.sockname
    host = uri.host
    if ":" in host:
        host = "[%s]" % host
    return "%s:%d" % (host, uri.port)


class SecureProxy(Pyro5.client.Proxy):
    """A Pyro5 proxy (marshal serializer) that proves the cluster secret and checks the node's proof on
    every (re)connect, with a fresh nonce each time.  ``pydist_peer_name`` is the node's name once connected.

    ``timeout``: Pyro5's call timeout (None = calls may take as long as they take).  The connect plus
    handshake always has a deadline (``handshake_timeout``), even when ``timeout`` is None, so a frozen
    or silent node cannot hang a (re)connect forever.
    """

    def __init__(self, uri, *, secret: Optional[bytes], timeout: Optional[float] = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT):
        if isinstance(secret, str):
            secret = secret.encode()
        _set = object.__setattr__      # Proxy.__setattr__ would connect to look up remote attributes
        _set(self, "_pydist_secret", secret or None)
        _set(self, "_pydist_handshake_timeout", float(handshake_timeout))
        _set(self, "_pydist_pending", None)
        _set(self, "pydist_peer_name", None)
        _set(self, "pydist_peer_versions", None)
        super().__init__(uri)
        self._pyroSerializer = "marshal"
        self._pyroTimeout = timeout

    # A property shadows the instance attribute Pyro5 reads once per connection attempt, right before it
    # sends CONNECT: every (re)connect gets a fresh nonce and timestamp.
    @property
    def _pyroHandshake(self):
        uri = self._pyroUri
        if uri.protocol != "PYRO":
            uri = Pyro5.core.resolve(uri)          # the same lookup the connect itself is about to do
        hello = client_hello(self._pydist_secret, _uri_location(uri))
        object.__setattr__(self, "_pydist_pending", hello)
        return hello

    @_pyroHandshake.setter
    def _pyroHandshake(self, value):
        pass    # Proxy.__init__ / __setstate__ assign a default; ours is computed per connection

    def _Proxy__pyroCreateConnection(self, replaceUri=False, connected_socket=None):
        # Wraps Pyro5's private connect so the TCP/TLS connect and the handshake always have a deadline;
        # the call timeout chosen by the user is restored for the calls that follow.
        if self._pyroConnection is not None:
            return False
        user_timeout = self._Proxy__pyroTimeout
        hs = self._pydist_handshake_timeout
        object.__setattr__(self, "_Proxy__pyroTimeout", hs if not user_timeout else min(user_timeout, hs))
        try:
            return Pyro5.client.Proxy._Proxy__pyroCreateConnection(self, replaceUri, connected_socket)
        finally:
            self._pyroTimeout = user_timeout     # property: also applies to the new connection's socket

    def _pyroValidateHandshake(self, response):
        hello = self._pydist_pending
        where = _uri_location(self._pyroUri) if self._pyroUri.protocol == "PYRO" else str(self._pyroUri)
        try:
            check_server_reply(response, hello, self._pydist_secret, where)
        except BaseException:
            # Pyro5 has already stored the connection on the proxy: drop it, or the next call would use it.
            self._pyroRelease()
            raise
        object.__setattr__(self, "pydist_peer_name", response["name"])
        object.__setattr__(self, "pydist_peer_versions",
                           {k: response[k] for k in ("pydist", "ver", "py", "cp")})

    def __getstate__(self):
        raise TypeError("a SecureProxy holds the cluster secret and cannot be pickled or copied; "
                        "pass the node's address and connect() on the other side")

    def __copy__(self):
        raise TypeError("a SecureProxy cannot be copied; connect() again")


assert hasattr(Pyro5.client.Proxy, "_Proxy__pyroCreateConnection"), "Pyro5 internals changed: check SecureProxy"


def check_server_reply(response, hello: Mapping, secret: Optional[bytes], where: str) -> None:
    """Client side: verify the node's handshake reply for the ``hello`` we sent; raise or return."""
    if not isinstance(response, dict) or not isinstance(response.get("nonce"), bytes) \
            or "name" not in response or "pydist" not in response:
        raise AuthenticationError(f"{where} is not a pydist node (its handshake reply is not pydist's)")
    mine = local_versions()
    if secret is not None:
        mac = response.get("mac")
        if not isinstance(mac, bytes):
            raise AuthenticationError(f"node {response.get('name')!r} at {where} has no cluster secret and so "
                                      "cannot prove it belongs to the cluster; refusing it (start the node "
                                      "with the secret, or connect without one on a loopback-only setup)")
        try:
            fields = _server_fields(response, hello["nonce"])
        except (KeyError, TypeError):
            raise AuthenticationError(f"malformed handshake reply from {where}") from None
        if not hmac.compare_digest(mac, _mac(secret, b"pydist-server|", *fields)):
            raise AuthenticationError(f"node at {where} failed to prove knowledge of the cluster secret "
                                      "(wrong secret, or an impostor registered under the node's name)")
    problem = _version_problem(mine, response)
    if problem:
        raise VersionMismatch(f"{problem}: node {response.get('name')!r} at {where} runs {_describe(response)}; "
                              f"this process runs {_describe(mine)}")


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


def translate_connect_error(exc: BaseException, address: str) -> Exception:
    """Turn what a Pyro5 connect raised into the pydist error to show (returns it; does not raise)."""
    if isinstance(exc, (AuthenticationError, VersionMismatch, ClusterUnavailable)):
        return exc
    text = str(exc)
    for tag, cls in ((TAG_AUTH, AuthenticationError), (TAG_VERSION, VersionMismatch)):
        i = text.find(tag)
        if i >= 0:
            return cls(f"{address}: {text[i + len(tag):].strip()}")
    i = text.find(TAG_REFUSED)
    if i >= 0:
        return AuthenticationError(f"{address} refused the connection: {text[i + len(TAG_REFUSED):].strip()}")
    chain, c = [], exc
    while c is not None and len(chain) < 5:
        chain.append(c)
        c = c.__cause__ or c.__context__
    if any(isinstance(c, ssl.SSLError) for c in chain) or "CERTIFICATE" in text.upper() \
            or "SSL" in text.upper():
        return AuthenticationError(f"TLS with {address} failed ({text}): check that both sides use "
                                   "certificates signed by the cluster CA, that the node's certificate names "
                                   "the host you dial, and that both sides have TLS on")
    if "unknown object" in text:   # a Pyro5 daemon without a pydist node: the name server, given as a node?
        from .diagnose import is_name_server, name_server_hint

        loc = address.rsplit("@", 1)[-1] if str(address).upper().startswith("PYRO") else address
        if is_name_server(loc):
            err = ClusterUnavailable(name_server_hint(loc))
            err.pydist_final = True   # type: ignore[attr-defined]  (no use retrying)
            return err
    hint = "is pydist-node running there and reachable (host, port, firewall)?"
    if isinstance(exc, Pyro5.errors.ConnectionClosedError):
        hint = "something listens there but closed the connection: is it a pydist node, and does it use TLS?"
    return ClusterUnavailable(f"no pydist node answers at {address} ({text}): {hint}")


def _is_final(err: Exception) -> bool:
    return isinstance(err, (AuthenticationError, VersionMismatch)) or getattr(err, "pydist_final", False)


def connect(uri_or_address: str, *, secret: Optional[bytes], timeout: float = 5.0, tls=None,
            call_timeout: Optional[float] = None) -> SecureProxy:
    """Connect to a node now.  'host:port' means ``PYRO:pydist.node@host:port``; a PYRO/PYRONAME URI is used
    as is.  Refused or unreachable: retried until ``timeout``, then ``ClusterUnavailable`` naming the address.
    Handshake refusals raise ``AuthenticationError`` / ``VersionMismatch`` at once.  ``tls``: if given,
    ``configure_pyro(tls=tls)`` is called first (client role).  ``call_timeout`` becomes the proxy's Pyro5
    call timeout (None: unlimited).  The proxy belongs to the calling thread (Pyro5 rule)."""
    if tls is not None:
        configure_pyro(tls=tls)
    uri = _node_uri(uri_or_address)
    address = uri_or_address if not str(uri_or_address).upper().startswith("PYRO") else uri
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        left = deadline - time.monotonic()
        proxy = SecureProxy(uri, secret=secret, timeout=call_timeout,
                            handshake_timeout=max(0.05, min(HANDSHAKE_TIMEOUT, left)))
        try:
            proxy._pyroBind()
            return proxy
        except Exception as exc:  # noqa: BLE001 - translated below
            proxy._pyroRelease()
            err = translate_connect_error(exc, address)
            if _is_final(err) or time.monotonic() + delay >= deadline:
                raise err from (None if err is exc else exc)
        time.sleep(delay)      # waiting for a node that is still starting
        delay = min(delay * 2, 0.5)


# ---------------------------------------------------------------------------------------------------------
# secrets and certificates
# ---------------------------------------------------------------------------------------------------------

def release(proxy) -> None:
    """Close a proxy's connection, if any, ignoring errors (the peer may be gone already)."""
    if proxy is None:
        return
    try:
        proxy._pyroRelease()
    except Exception:
        pass


def load_secret(value: str | bytes | None = None, secret_file: Optional[str] = None,
                env: Mapping = os.environ) -> Optional[bytes]:
    """The cluster secret: explicit value > secret_file > env PYDIST_SECRET > None.  Empty is an error."""
    if value is not None:
        b = (value.encode() if isinstance(value, str) else bytes(value)).strip()
        if not b:
            raise ConfigError("the cluster secret given is empty")
        return b
    if secret_file:
        return read_secret_file(secret_file)
    v = env.get("PYDIST_SECRET")
    if v is not None:
        if not v.strip():
            raise ConfigError("PYDIST_SECRET is set but empty: unset it or put a long random string in it")
        return v.strip().encode()
    return None


def new_secret() -> bytes:
    """A random secret (64 hex characters, so it can travel in an environment variable)."""
    return secrets.token_hex(32).encode()


def make_certs(directory, hosts: Iterable[str] = ("127.0.0.1", "localhost"),
               names: Iterable[str] = ("node",)) -> dict:
    """Write a CA (ca.pem, ca.key; reused if already there) and, per name, NAME.pem/NAME.key signed by it,
    valid for every host in ``hosts`` (IP SANs for addresses) and usable as server and client certificate.
    Returns {"ca": ..., "ca_key": ..., NAME: cert path, NAME + "_key": key path}."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:     # pragma: no cover
        raise ConfigError("make-certs needs the 'cryptography' package: pip install 'pydist[tls]'") from None
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=3650)

    def write_key(path: Path, key) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    ca_pem, ca_keyfile = d / "ca.pem", d / "ca.key"
    if ca_pem.exists() and ca_keyfile.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_keyfile.read_bytes(), None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pydist cluster CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
        write_key(ca_keyfile, ca_key)
        ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    paths = {"ca": str(ca_pem), "ca_key": str(ca_keyfile)}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = d / f"{name}.pem", d / f"{name}.key"
        write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[name], paths[f"{name}_key"] = str(cert_path), str(key_path)
    return paths


__all__ = ["PROTOCOL_VERSION", "NODE_OBJECT_ID", "TLSSettings", "configure_pyro", "SecureDaemon", "SecureProxy",
           "connect", "translate_connect_error", "make_certs", "load_secret", "new_secret", "local_versions",
           "client_hello", "check_server_reply"]
