"""Pyro5's process-global settings and TLS, and connecting to a node (client side of the transport).

::

    configure_pyro(max_message_size, threadpool, tls, server) ──▶ Pyro5.config (NODELAY, pool, size, SSL)
                                                                  + a TLS client context trusting only tls.ca
    connect("host:port" | PYRO: URI, secret, timeout) ──▶ SecureProxy._pyroBind()  (the hello: pydist.proxy)
        refused / unreachable / busy: retried with backoff until timeout, then ClusterUnavailable
        AuthenticationError / VersionMismatch: raised at once
    release(proxy) ──▶ closes its connection, ignoring errors

Importing this module also teaches Pyro5 pydist's exception types and installs the flat marshal
serializer.  The handshake itself is drawn in :mod:`pydist.security`, which re-exports every public name.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Optional

import Pyro5.errors
import Pyro5.socketutil
from Pyro5 import config as pyro_config
from Pyro5 import serializers

from .errors import AuthenticationError, ConfigError, VersionMismatch
from .proxy import HANDSHAKE_TIMEOUT, SecureProxy, translate_connect_error

log = logging.getLogger("pydist.security")

__all__ = ["NODE_OBJECT_ID", "TLSSettings", "configure_pyro", "connect", "release"]

NODE_OBJECT_ID = "pydist.node"


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


def release(proxy) -> None:
    """Close a proxy's connection, if any, ignoring errors (the peer may be gone already)."""
    if proxy is None:
        return
    try:
        proxy._pyroRelease()
    except Exception:
        pass
