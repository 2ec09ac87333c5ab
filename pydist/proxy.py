"""The client side of the hello: ``SecureProxy`` opens its connection itself and reads the node's reply with
pydist's bounded format (``pydist.auth``), never with a general deserializer.

A rogue server (say, one registered in the name server under a node's name) can therefore cost a client at
most ``auth.REPLY_MAX`` bytes and ``handshake_timeout`` seconds, and, without the secret, gets no call: the
reply's MAC over the client's fresh nonce is checked before the connection is used.  After the hello,
the common call goes through ``pydist.fastcall.invoke`` (same bytes as Pyro5's, fewer steps); anything
else through Pyro5's own ``_pyroInvoke``.
"""
from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Optional

import Pyro5.client
import Pyro5.core
import Pyro5.errors
import Pyro5.socketutil
from Pyro5 import config as pyro_config
from Pyro5 import protocol
from Pyro5.callcontext import current_context

from . import auth, fastcall
from .auth import TAG_AUTH, TAG_BUSY, TAG_REFUSED, TAG_VERSION, UserSecret
from .errors import AuthenticationError, ClusterUnavailable, ConfigError, VersionMismatch
from .gate import HEADER

log = logging.getLogger("pydist.security")

#: seconds a connect plus hello may take
HANDSHAKE_TIMEOUT = 5.0


def uri_location(uri: Pyro5.core.URI) -> str:
    """'host:port' (or './u:path') of a PYRO URI, as it goes into the hello's ``dst``."""
    if uri.sockname:
        return "./u:" + uri.sockname
    host = uri.host
    if ":" in host:
        host = "[%s]" % host
    return "%s:%d" % (host, uri.port)


def _recv_exact(sock, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("handshake deadline")
        sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 65536))
        if not chunk:
            raise ConnectionError("the peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _client_ssl_context() -> Optional[ssl.SSLContext]:
    if not pyro_config.SSL:
        return None
    ctx = vars(Pyro5.socketutil).get("__ssl_client_context")
    if ctx is None:
        raise ConfigError("TLS is on but no client settings were given: call security.configure_pyro(tls=...)")
    return ctx


def open_connection(uri: Pyro5.core.URI, secret: Optional[bytes], scope: str, timeout: float):
    """Connect to ``uri`` and run the hello.  Returns (SocketConnection, auth.Reply, exposed names).
    Raises ``AuthenticationError`` / ``VersionMismatch`` (final) or ``Pyro5.errors.CommunicationError``
    (unreachable, busy: worth retrying)."""
    where = uri_location(uri)
    deadline = time.monotonic() + timeout
    try:
        sock = Pyro5.socketutil.create_socket(connect=uri.sockname or (uri.host, uri.port),
                                              reuseaddr=pyro_config.SOCK_REUSE, timeout=timeout,
                                              nodelay=pyro_config.SOCK_NODELAY, sslContext=_client_ssl_context())
    except Pyro5.errors.CommunicationError:
        raise
    except (OSError, ValueError) as exc:
        raise Pyro5.errors.CommunicationError(f"cannot connect to {where}: {exc}") from exc
    conn = Pyro5.socketutil.SocketConnection(sock, uri.object)
    try:
        key = secret or None        # with a scope, the secret given is that scope's capability already
        body, nonce = auth.encode_hello(key, where, uri.object, scope=scope)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        send_error: Optional[OSError] = None
        try:
            sock.sendall(HEADER.pack(b"PYRO", protocol.PROTOCOL_VERSION, protocol.MSG_CONNECT, auth.HELLO_SERIALIZER,
                                     0, 0, len(body), 0, b"\0" * 16, 0, protocol._magic_number) + body)
        except OSError as exc:
            # the node may have refused us already (a TLS alert: no client certificate) and closed: the send
            # then fails (reset, EOF), but what it said is still in our receive buffer, and it is the answer
            send_error = exc
        try:
            head = _recv_exact(sock, HEADER.size, deadline)
        except OSError as exc:
            if send_error is not None and not isinstance(exc, ssl.SSLError):
                raise send_error from None
            raise
        tag, ver, msgtype, ser, flags, _seq, size, ann, _c, _r, magic = HEADER.unpack(head)
        if tag != b"PYRO" or ver != protocol.PROTOCOL_VERSION or magic != protocol._magic_number:
            raise AuthenticationError(f"{where} is not a pydist node "
                                      f"(it does not speak Pyro5 {protocol.PROTOCOL_VERSION})")
        plain = ann or flags & ~protocol.FLAGS_CORR_ID or ser != auth.HELLO_SERIALIZER
        if msgtype == protocol.MSG_CONNECTFAIL and not plain and size <= auth.REFUSAL_MAX:
            text = auth.parse_refusal(_recv_exact(sock, size, deadline))
            _raise_refusal(text, where, secret)
        if msgtype != protocol.MSG_CONNECTOK or plain or size > auth.REPLY_MAX:
            raise AuthenticationError(f"{where} is not a pydist node (its handshake reply is not pydist's)")
        try:
            reply = auth.parse_reply(_recv_exact(sock, size, deadline))
        except auth.HelloError:
            raise AuthenticationError(f"{where} is not a pydist node (malformed handshake reply)") from None
        _check_reply(reply, key, nonce, where, secret)
        try:
            names = auth.parse_meta(reply.meta)
        except auth.HelloError:
            raise AuthenticationError(f"malformed handshake reply from {where}") from None
    except (AuthenticationError, VersionMismatch, Pyro5.errors.CommunicationError):
        conn.close()
        raise
    except (OSError, ValueError) as exc:
        conn.close()
        raise Pyro5.errors.CommunicationError(f"cannot connect to {where}: {exc}") from exc
    return conn, reply, names


def _raise_refusal(text: str, where: str, secret: Optional[bytes]) -> None:
    if text.strip() == f"{TAG_AUTH} refused":
        if not secret:
            raise AuthenticationError(f"{where}: the node requires the cluster secret and this client gave none "
                                      "(set PYDIST_SECRET, --secret-file or secret=)")
        raise AuthenticationError(f"{where}: the node refused the connection: wrong cluster secret")
    raise Pyro5.errors.CommunicationError(f"connection to {where} rejected: {text}")


def _check_reply(reply: auth.Reply, key: Optional[bytes], nonce: bytes, where: str, secret) -> None:
    if key is not None:
        if reply.mac is None:
            hint = " (this client used your per-user secret file; set PYDIST_INSECURE=1 to talk to a node " \
                   "started with --insecure)" if isinstance(secret, UserSecret) else \
                   " (start the node with the secret, or connect without one to a node started with --insecure)"
            raise AuthenticationError(f"node {reply.name!r} at {where} has no cluster secret and so cannot prove "
                                      f"it belongs to the cluster; refusing it{hint}")
        if not auth.reply_mac_ok(reply, key, nonce):
            raise AuthenticationError(f"node at {where} failed to prove knowledge of the cluster secret "
                                      "(wrong secret, or an impostor registered under the node's name)")
    mine = auth.local_versions()
    problem = auth.version_problem(mine, reply.versions())
    if problem:
        raise VersionMismatch(f"{problem}: node {reply.name!r} at {where} runs {auth.describe(reply.versions())}; "
                              f"this process runs {auth.describe(mine)}")


class SecureProxy(Pyro5.client.Proxy):
    """A Pyro5 proxy (marshal serializer) that proves the cluster secret and checks the node's proof on
    every (re)connect, with a fresh nonce each time.  ``pydist_peer_name`` is the node's name once connected.

    ``timeout``: Pyro5's call timeout (None = calls may take as long as they take).  The connect plus hello
    always has a deadline (``handshake_timeout``).  ``scope``: open a scoped connection (``secret`` is then that
    scope's capability, see ``auth.capability``).  A connection idle for half the node's idle timeout is
    reopened before the next call, so the node's idle timeout never breaks a live proxy.
    """

    def __init__(self, uri, *, secret: Optional[bytes], timeout: Optional[float] = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, scope: str = ""):
        if isinstance(secret, str):
            secret = secret.encode()
        _set = object.__setattr__      # Proxy.__setattr__ would connect to look up remote attributes
        _set(self, "_pydist_secret", secret or None)
        _set(self, "_pydist_scope", str(scope))
        _set(self, "_pydist_handshake_timeout", float(handshake_timeout))
        _set(self, "_pydist_idle", 0.0)
        _set(self, "_pydist_used", 0.0)
        _set(self, "pydist_peer_name", None)
        _set(self, "pydist_peer_versions", None)
        super().__init__(uri)
        self._pyroSerializer = "marshal"
        self._pyroTimeout = timeout

    def _Proxy__pyroCreateConnection(self, replaceUri=False, connected_socket=None):
        if connected_socket is not None:
            raise ConfigError("SecureProxy opens its own connections")
        self._Proxy__check_owner()
        if self._pyroConnection is not None:
            return False
        uri = Pyro5.core.resolve(self._pyroUri)
        user_timeout = self._Proxy__pyroTimeout
        hs = self._pydist_handshake_timeout if not user_timeout else min(user_timeout, self._pydist_handshake_timeout)
        conn, reply, (methods, oneway, attrs) = open_connection(uri, self._pydist_secret, self._pydist_scope, hs)
        conn.timeout = user_timeout
        self._pyroConnection = conn
        self._pyroLocalSocket = conn.sock.getsockname()
        if replaceUri:
            self._pyroUri = uri
        self._pyroMethods, self._pyroOneway, self._pyroAttrs = methods, oneway, attrs
        _set = object.__setattr__
        _set(self, "_pydist_idle", float(reply.idle))
        _set(self, "_pydist_used", time.monotonic())
        _set(self, "pydist_peer_name", reply.name)
        _set(self, "pydist_peer_versions", reply.versions())
        return True

    def _pyroInvoke(self, methodname, vargs, kwargs, flags=0, objectId=None):
        idle = self._pydist_idle
        if idle and self._pyroConnection is not None and time.monotonic() - self._pydist_used > idle / 2:
            self._pyroRelease()            # the node may be about to drop it: open a fresh one
        try:
            conn = self._pyroConnection
            if conn is not None and not flags and self._pyroSerializer == "marshal" \
                    and methodname not in self._pyroOneway and not self._pyroRawWireResponse \
                    and not current_context.annotations and not current_context.correlation_id \
                    and not pyro_config.COMPRESSION and not pyro_config.LOGWIRE:
                self._Proxy__check_owner()   # type: ignore[attr-defined]
                result = fastcall.invoke(self, conn, methodname, vargs, kwargs, objectId or conn.objectId)
                if result is not fastcall.NOT_FAST:
                    return result
            return super()._pyroInvoke(methodname, vargs, kwargs, flags, objectId)
        finally:
            object.__setattr__(self, "_pydist_used", time.monotonic())

    def __getstate__(self):
        raise TypeError("a SecureProxy holds the cluster secret and cannot be pickled or copied; "
                        "pass the node's address and connect() on the other side")

    def __copy__(self):
        raise TypeError("a SecureProxy cannot be copied; connect() again")


assert hasattr(Pyro5.client.Proxy, "_Proxy__pyroCreateConnection"), "Pyro5 internals changed: check SecureProxy"
assert hasattr(Pyro5.client.Proxy, "_Proxy__check_owner"), "Pyro5 internals changed: check SecureProxy"
assert hasattr(Pyro5.server, "_get_attribute") and hasattr(Pyro5.server, "_unpack_weakref"), \
    "Pyro5 internals changed: check pydist.fastcall"


def translate_connect_error(exc: BaseException, address: str) -> Exception:
    """Turn what a Pyro5 connect raised into the pydist error to show (returns it; does not raise)."""
    if isinstance(exc, (AuthenticationError, VersionMismatch, ClusterUnavailable)):
        return exc
    text = str(exc)
    for tag, cls in ((TAG_AUTH, AuthenticationError), (TAG_VERSION, VersionMismatch)):
        i = text.find(tag)
        if i >= 0:
            return cls(f"{address}: {text[i + len(tag):].strip()}")
    i = text.find(TAG_BUSY)
    if i >= 0:
        return ClusterUnavailable(f"{address} is busy: {text[i + len(TAG_BUSY):].strip()}")
    i = text.find(TAG_REFUSED)
    if i >= 0:
        return AuthenticationError(f"{address} refused the connection: {text[i + len(TAG_REFUSED):].strip()}")
    chain: list = []
    c: Optional[BaseException] = exc
    while c is not None and len(chain) < 5:
        chain.append(c)
        c = c.__cause__ or c.__context__
    if any(isinstance(c, ssl.SSLError) for c in chain) or "CERTIFICATE" in text.upper() \
            or "SSL" in text.upper():
        return AuthenticationError(f"TLS with {address} failed ({text}): check that both sides use "
                                   "certificates signed by the cluster CA, that the node's certificate names "
                                   "the host you dial, and that both sides have TLS on")
    if "closed the connection" in text or isinstance(exc, Pyro5.errors.ConnectionClosedError):
        from .diagnose import is_name_server, name_server_hint   # the name server, given as a node?

        loc = address.rsplit("@", 1)[-1] if str(address).upper().startswith("PYRO") else address
        if is_name_server(loc):
            err = ClusterUnavailable(name_server_hint(loc))
            err.pydist_final = True   # type: ignore[attr-defined]  # (no use retrying)
            return err
    hint = "is pydist-node running there and reachable (host, port, firewall)?"
    if isinstance(exc, Pyro5.errors.ConnectionClosedError):
        hint = "something listens there but closed the connection: is it a pydist node, and does it use TLS?"
    return ClusterUnavailable(f"no pydist node answers at {address} ({text}): {hint}")


