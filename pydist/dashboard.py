"""The web dashboard a node serves (``pydist-node --dashboard PORT``; a LocalCluster's root by default).

::

    browser ──GET /?token=T──▶ ThreadingHTTPServer (≤ MAX_CONNECTIONS threads, SOCKET_TIMEOUT each)
            ◀── page + /static/ assets (files of pydist/dashboard_static, no CDN)
            ──GET /api/events──▶ SSE: one snapshot per POLL_INTERVAL ◀─┐
            ──GET /api/status──▶ the same snapshot as JSON ◀──────────┤
                                                         poller thread (only while someone watches):
                                                         node.status() here, status() of every node
                                                         reached through child/peer links (Pyro5),
                                                         tasks/s per node from the "done" counters

Everything answers 403 without the token.  The token is an HMAC of a fixed label under the cluster
secret (``dashboard_token``), so whoever has the secret can compute the URL and nobody else can; the
page's URL carries it (as Jupyter's does) and the page sets it as a SameSite cookie for its own requests.
A node without a secret (loopback only) uses a random token, shown in its URL.

Why the standard library's ``http.server``: the dashboard serves a handful of GET routes to a few
viewers; a threading server bounded by a semaphore, with socket timeouts and a cap on event streams,
is enough and adds no dependency to every node.  Reads the node only through ``Node.status()``.
"""
from __future__ import annotations

import collections
import hmac
import http.server
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional

from .dashboard_listen import LABEL, dashboard_token, listen, token_for, url as _url   # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0          # s between snapshots while someone watches
IDLE_AFTER = 30.0            # s without a request after which the poller sleeps
HISTORY = 300                # samples of the task stream kept (5 minutes at 1 s)
RATE_WINDOW = 3              # samples a task-stream rate is averaged over (tasks finish in bursts)
MAX_CONNECTIONS = 16         # concurrent HTTP connections (more: closed at once)
MAX_STREAMS = 8              # concurrent event streams
STREAM_SECONDS = 300.0       # an event stream ends after this long (EventSource reconnects)
SOCKET_TIMEOUT = 10.0
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_static")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
COOKIE = "pydist_token"


class Snapshots:
    """The tree's status, gathered by one poller thread (which owns every Pyro5 proxy it opens) while
    someone watches; plus the task stream (tasks/s per node) over the last ``HISTORY`` samples."""

    def __init__(self, local_status: Callable[[], dict], connect: Callable[[str], Any]):
        self.local_status = local_status
        self.connect = connect
        self.cond = threading.Condition()
        self.latest: Optional[dict] = None
        self.seq = 0
        self.history: "collections.deque[tuple]" = collections.deque(maxlen=HISTORY)
        self.last_wanted = 0.0
        self.stopping = False
        self._proxies: Dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, daemon=True, name="pydist-dashboard-poll")
        self._thread.start()

    def want(self, timeout: float = 3.0) -> Optional[dict]:
        """Wake the poller; return the latest snapshot (waiting for a first one up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.last_wanted = time.monotonic()
            self.cond.notify_all()
            while self.latest is None and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return self.latest

    def wait_newer(self, seq: int, timeout: float) -> Optional[dict]:
        """The next snapshot after number ``seq`` (or the latest after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.last_wanted = time.monotonic()
            while self.seq <= seq and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return self.latest

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.stopping and time.monotonic() - self.last_wanted > IDLE_AFTER:
                        self.cond.wait(5.0)
                    if self.stopping:
                        return
                t0 = time.monotonic()
                try:
                    snap = self._gather()
                except Exception as exc:   # never let the poller die
                    log.warning("dashboard: gathering the status failed: %s", exc)
                    snap = None
                if snap is not None:
                    with self.cond:
                        self.seq += 1
                        snap["seq"] = self.seq
                        self.latest = snap
                        self.cond.notify_all()
                with self.cond:
                    left = POLL_INTERVAL - (time.monotonic() - t0)
                    if left > 0 and not self.stopping:
                        self.cond.wait(left)
        finally:
            for p in self._proxies.values():
                _release(p)
            self._proxies.clear()

    def _remote_status(self, uri: str) -> Optional[dict]:
        p = self._proxies.get(uri)
        for _attempt in (0, 1):
            try:
                if p is None:
                    p = self._proxies[uri] = self.connect(uri)
                return p.status()
            except Exception as exc:
                log.debug("dashboard: status of %s failed: %s", uri, exc)
                _release(self._proxies.pop(uri, None))
                p = None
        return None

    def _gather(self) -> dict:
        here = self.local_status()
        nodes = {here["name"]: here}
        todo = [l for l in here.get("links", ()) if l.get("alive") and l.get("role") in ("child", "peer")]
        seen_uris = set()
        while todo:
            l = todo.pop(0)
            if l["name"] in nodes or l["uri"] in seen_uris:
                continue
            seen_uris.add(l["uri"])
            st = self._remote_status(l["uri"])
            if st is None or st["name"] in nodes:
                continue
            nodes[st["name"]] = st
            todo += [x for x in st.get("links", ()) if x.get("alive") and x.get("role") in ("child", "peer")]
        for uri in [u for u in self._proxies if u not in seen_uris]:   # nodes that left the tree
            _release(self._proxies.pop(uri))
        now = time.time()
        self.history.append((now, {n: st.get("done", 0) + st.get("failed", 0) for n, st in nodes.items()}))
        return {"time": now, "root": here["name"], "nodes": [_slim(st) for st in nodes.values()],
                "tree": _tree(here["name"], nodes), "stream": self._stream(), "failures": _failures(nodes),
                "tasks": _tasks(nodes), "code": _code(nodes), "groups": _groups(nodes)}

    def _stream(self) -> dict:
        """Tasks finished per second by each node, over a sliding window of ``RATE_WINDOW`` samples."""
        h = list(self.history)
        names = sorted({n for _, d in h for n in d})
        t: list = []
        series: Dict[str, list] = {n: [] for n in names}
        for i in range(1, len(h)):
            (t0, d0), (t1, d1) = h[max(0, i - RATE_WINDOW)], h[i]
            dt = max(1e-3, t1 - t0)
            t.append(round(t1, 3))
            for n in names:
                series[n].append(round(max(0, d1.get(n, 0) - d0.get(n, d1.get(n, 0))) / dt, 2))
        return {"t": t, "series": series}


def _release(p) -> None:
    if p is not None:
        try:
            p._pyroRelease()
        except Exception:
            pass


_NODE_KEYS = ("name", "address", "parent", "workers", "workers_up", "busy", "queued", "running", "forwarded",
              "done", "failed", "submitted", "worker_restarts", "clients", "uptime", "cpu_percent", "mem_percent",
              "rss", "bundles", "avg_task_s")


def _slim(st: dict) -> dict:
    out = {k: st.get(k) for k in _NODE_KEYS}
    out["links"] = [{k: l.get(k) for k in ("name", "role", "alive", "inflight", "workers")}
                    for l in st.get("links", ())]
    return out


def _tree(root: str, nodes: Dict[str, dict]) -> dict:
    """{"name", "children": [...]} from each node's child links (peers hang below whoever reached them)."""
    placed = {root}

    def build(name: str) -> dict:
        kids = []
        for l in nodes.get(name, {}).get("links", ()):
            if l.get("role") in ("child", "peer") and l.get("alive") and l["name"] in nodes \
                    and l["name"] not in placed:
                placed.add(l["name"])
                kids.append(l["name"])
        return {"name": name, "role": None, "children": [dict(build(k), role=_role(nodes, name, k))
                                                            for k in sorted(kids)]}
    return build(root)


def _role(nodes: Dict[str, dict], parent: str, kid: str) -> str:
    for l in nodes.get(parent, {}).get("links", ()):
        if l["name"] == kid:
            return l.get("role") or "child"
    return "child"


def _failures(nodes: Dict[str, dict], keep: int = 20) -> List[dict]:
    fs = [f for st in nodes.values() for f in st.get("failures", ())]
    return sorted(fs, key=lambda f: f.get("time", 0), reverse=True)[:keep]


def _tasks(nodes: Dict[str, dict], keep: int = 200) -> List[dict]:
    ts = [dict(t, node=st["name"]) for st in nodes.values() for t in st.get("tasks", ())]
    return sorted(ts, key=lambda t: -t.get("age", 0))[:keep]


def _code(nodes: Dict[str, dict]) -> List[dict]:
    by: Dict[str, dict] = {}
    for st in nodes.values():
        for b in st.get("code", ()):
            e = by.setdefault(b["digest"], dict(b, nodes=[]))
            e["nodes"].append(st["name"])
            e["pinned"] = e.get("pinned") or b.get("pinned")
    return sorted(by.values(), key=lambda b: b["digest"])


def _groups(nodes: Dict[str, dict]) -> List[dict]:
    """Task groups by home node, with their state (waiting, running, aborted: why) where the node says it."""
    out = []
    for st in nodes.values():
        tg = st.get("task_groups") or {}
        states = tg.get("groups") or {}
        reserved = len(tg.get("reserved_workers") or ())
        for g in dict.fromkeys(list(states) + [str(x) for x in st.get("groups", ())]):
            out.append({"group": g, "node": st["name"], "state": states.get(g, ""), "reserved": reserved})
    return out


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, dashboard: "Dashboard", bind_and_activate: bool = True):
        self.dashboard = dashboard
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        super().__init__(addr, handler, bind_and_activate)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):   # bounded: never a thread per connection beyond the cap
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def handle_error(self, request, client_address) -> None:   # not a traceback on stderr per bad client
        import sys

        log.debug("dashboard: request from %s failed: %s", client_address, sys.exc_info()[1])

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    timeout = SOCKET_TIMEOUT
    protocol_version = "HTTP/1.1"
    server_version = "pydist-dashboard"
    sys_version = ""

    def setup(self) -> None:
        import ssl

        if isinstance(self.request, ssl.SSLSocket):   # the TLS handshake runs here, not in the accept thread
            self.request.settimeout(SOCKET_TIMEOUT)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:   # noqa: A002 - http.server's signature
        log.debug("dashboard %s: " + format, self.address_string(), *args)

    # -- auth ---------------------------------------------------------------------------------------
    def _token(self, query: dict) -> Optional[str]:
        t = query.get("token", [None])[0]
        if t:
            return t
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("token "):
            return auth[6:].strip()
        for part in self.headers.get("Cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == COOKIE:
                return v
        return None

    def _send(self, code: int, body: bytes, ctype: str, extra: Optional[dict] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                         "frame-ancestors 'none'")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_POST(self) -> None:
        self._send(405, b"405: the dashboard only reads\n", "text/plain; charset=utf-8", {"Allow": "GET"})

    do_PUT = do_DELETE = do_PATCH = do_POST

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        dash = self.server.dashboard
        token = self._token(query)
        if token is None or not hmac.compare_digest(token.encode(), dash.token.encode()):
            self._send(403, b"403 Forbidden: this pydist dashboard needs its token. Open the URL the cluster "
                       b"gives (LocalCluster.dashboard_url, ClusterExecutor.dashboard_url, or the node's "
                       b"log), which carries ?token=...\n", "text/plain; charset=utf-8")
            return
        cookie = {"Set-Cookie": f"{COOKIE}={dash.token}; HttpOnly; SameSite=Strict; Path=/"} \
            if query.get("token") else None
        path = url.path
        if path in ("/", "/index.html"):
            self._static("index.html", cookie)
        elif path.startswith("/static/"):
            self._static(path[len("/static/"):], cookie)
        elif path == "/api/status":
            snap = dash.snapshots.want() or {"nodes": [], "error": "no status yet"}
            self._send(200, json.dumps(snap, default=str).encode(), "application/json", cookie)
        elif path == "/api/events":
            self._events()
        else:
            self._send(404, b"404: not a dashboard page\n", "text/plain; charset=utf-8")

    def _static(self, name: str, extra: Optional[dict]) -> None:
        if "/" in name or "\\" in name or name.startswith(".") or os.path.splitext(name)[1] not in STATIC_TYPES:
            self._send(404, b"404\n", "text/plain; charset=utf-8")
            return
        try:
            with open(os.path.join(STATIC_DIR, name), "rb") as f:
                body = f.read()
        except OSError:
            self._send(404, b"404\n", "text/plain; charset=utf-8")
            return
        self._send(200, body, STATIC_TYPES[os.path.splitext(name)[1]], extra)

    def _events(self) -> None:
        srv = self.server
        if not srv.streams.acquire(blocking=False):
            self._send(503, b"503: too many dashboards open on this node\n", "text/plain; charset=utf-8",
                       {"Retry-After": "5"})
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            snaps = srv.dashboard.snapshots
            end = time.monotonic() + STREAM_SECONDS
            snap = snaps.want()
            seq = -1
            self.wfile.write(b"retry: 2000\n\n")
            while time.monotonic() < end and not snaps.stopping:
                if snap is not None and snap.get("seq", 0) != seq:
                    seq = snap.get("seq", 0)
                    self.wfile.write(b"data: " + json.dumps(snap, default=str).encode() + b"\n\n")
                else:
                    self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
                snap = snaps.wait_newer(seq, POLL_INTERVAL * 5)
        except (OSError, ValueError):
            pass   # the browser went away
        finally:
            srv.streams.release()


class Dashboard:
    """The dashboard of one node: ``start()`` returns its URL (token included); ``stop()`` ends it.

    ``local_status``: a function returning this node's ``status()`` dict; ``connect(uri)``: a Pyro5 proxy
    to another node (called from the poller thread only)."""

    def __init__(self, local_status: Callable[[], dict], connect: Callable[[str], Any], *, host: str = "127.0.0.1",
                 port: int = 0, secret: Optional[bytes] = None, advertise: Optional[str] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None, token: Optional[str] = None):
        self.token = token or token_for(secret)
        self.host, self.port = host, port
        self.advertise = advertise or host
        self.snapshots = Snapshots(local_status, connect)
        self._server: Optional[_Server] = None
        self.url = ""
        self.tls_cert, self.tls_key = tls_cert, tls_key

    def start(self, sock: Optional[socket.socket] = None) -> str:
        """Serve in a background thread, on ``sock`` (bound and listening: ``dashboard_listen.listen``)
        or on a socket of its own; returns the URL to open."""
        if sock is None:
            sock = listen(self.host, self.port)
        _Server.address_family = sock.family
        self._server = _Server(sock.getsockname()[:2], _Handler, self, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = sock
        self._server.server_address = sock.getsockname()
        self._server.server_name, self._server.server_port = sock.getsockname()[:2]   # (no getfqdn lookup)
        self.url = _url(sock, self.advertise, self.token, bool(self.tls_cert))
        if self.tls_cert:   # a node with TLS serves its dashboard over HTTPS with the same certificate
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True,
                         name="pydist-dashboard").start()
        return self.url

    def stop(self) -> None:
        """Stop serving (open event streams end within a poll interval)."""
        self.snapshots.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start_for_node(node, port: int, advertise: Optional[str] = None,
                   sock: Optional[socket.socket] = None, token: Optional[str] = None) -> Dashboard:
    """Start the dashboard of a running ``Node`` on ``port`` (its host, 0 = a free port) or on ``sock``
    (already listening); sets ``node.dashboard_url``.  ``pydist-node --dashboard`` calls it."""
    from . import security

    cfg = node.cfg

    def connect(uri: str):
        return security.connect(uri, secret=cfg.secret, timeout=2.0, call_timeout=5.0)

    d = Dashboard(node.status, connect, host=cfg.host, port=port, secret=cfg.secret,
                  advertise=advertise or node.address.rsplit(":", 1)[0],
                  tls_cert=cfg.tls_cert if cfg.tls_key else None, tls_key=cfg.tls_key, token=token)
    node.dashboard_url = d.start(sock)
    log.info("dashboard of node %s at %s", node.name, node.dashboard_url)
    return d
