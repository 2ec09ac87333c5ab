"""The cluster secret, proven in both directions before a node serves anything; TLS; the per-user secret.

Every Pyro5 connection (client -> node, node -> node, rank -> its home node) opens with one CONNECT
frame and one CONNECTOK / CONNECTFAIL frame.  pydist fills both with its own bounded, typed hello
(``pydist.auth``), read on the node by one non-blocking thread (``pydist.gate``)::

    SecureProxy (pydist.proxy)                          SecureDaemon (pydist.daemon)
    ──────────────────────────                          ────────────────────────────
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

One module per role, every name re-exported here (import from ``pydist.security``): :mod:`pydist.auth`
(the hello format, MAC, replay cache), :mod:`pydist.proxy` (``SecureProxy``), :mod:`pydist.gate` (the
node's non-blocking hello reader), :mod:`pydist.daemon` (``SecureDaemon``, ``daemon_options``),
:mod:`pydist.transport` (``configure_pyro``, TLS, ``connect``, ``release``).
"""
from __future__ import annotations

from .auth import (PROTOCOL_VERSION, TAG_AUTH, TAG_BUSY, TAG_REFUSED, TAG_VERSION, UserSecret,  # noqa: F401
                   capability, load_secret, local_versions, new_secret, user_secret, user_secret_path)
from .certs import make_certs  # noqa: F401  (re-exported: pydist.security.make_certs)
from .daemon import (CLOCK_WINDOW, HANDSHAKE_MAX_BYTES, IDLE_TIMEOUT, MAX_PENDING_HANDSHAKES,  # noqa: F401
                     REFUSAL_LOG_INTERVAL, REPLAY_CACHE_SIZE, SecureDaemon, connection_id, daemon_options,
                     refusal_frame)
from .proxy import HANDSHAKE_TIMEOUT, SecureProxy, translate_connect_error  # noqa: F401
from .transport import NODE_OBJECT_ID, TLSSettings, configure_pyro, connect, release  # noqa: F401

__all__ = ["PROTOCOL_VERSION", "NODE_OBJECT_ID", "TLSSettings", "configure_pyro", "SecureDaemon", "SecureProxy",
           "connect", "translate_connect_error", "make_certs", "load_secret", "new_secret", "local_versions",
           "user_secret", "user_secret_path", "UserSecret", "capability", "refusal_frame"]
