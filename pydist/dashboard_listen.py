"""The dashboard's socket and URL, ready before the dashboard itself is imported.

::

    node ready ──▶ listen(host, port) ──▶ socket bound and listening (requests wait in its backlog)
               ──▶ url(...)  ──▶ DASHBOARD line, then READY          (no http.server import yet)
    background thread ──▶ pydist.dashboard.start_for_node(node, port, sock=...) serves that socket

``http.server`` and the dashboard cost a node ~30 ms of imports, and the dashboard's set-up more, all
before READY while its workers start on the same cores: the embedded LocalCluster's first result came
~100 ms later (#15, start-up).  The URL only needs the port and the token.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
from typing import Optional

__all__ = ["LABEL", "dashboard_token", "token_for", "listen", "url"]

LABEL = b"pydist-dashboard-token-v1"
BACKLOG = 16


def dashboard_token(secret: Optional[bytes]) -> str:
    """The dashboard's access token for a cluster secret (the same on every node of the cluster)."""
    if isinstance(secret, str):
        secret = secret.encode()
    if not secret:
        raise ValueError("dashboard_token needs the cluster secret")
    return hmac.new(secret, LABEL, hashlib.sha256).hexdigest()[:40]


def token_for(secret: Optional[bytes]) -> str:
    """The token a node's dashboard takes: the cluster's (``dashboard_token``), or a random one when
    the node has no secret."""
    return dashboard_token(secret) if secret else secrets.token_hex(20)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: a free port) and listening (raises OSError)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def url(sock: socket.socket, advertise: str, token: str, tls: bool) -> str:
    """The URL to open for a dashboard served on ``sock``, its token included."""
    port = sock.getsockname()[1]
    host = advertise if ":" not in advertise else f"[{advertise}]"
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"{'https' if tls else 'http'}://{host}:{port}/?token={token}"
