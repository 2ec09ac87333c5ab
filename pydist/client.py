"""The client's side of liveness: which entry nodes it knows, deadlines on every call, failover, and
reconciliation of the ids it waits for with those its entry node holds.

::

    ClusterExecutor ── Entries.connect() ──▶ proxy with a call deadline (node_timeout)
         │  a call fails or times out ──▶ Entries.fail_over(open): next node listed by the name server
         │                                 (or in the address list) ──▶ resubmit every unfinished task
         │                                 (same ids: a node holding a copy adopts it, never runs it twice
         │                                 for this client) ──▶ each future still resolves once
         └─ no other node ──▶ BrokenCluster naming the node and how long it was silent

``Reconciler`` keeps a count and XOR digest of the ids the client has sent and still waits for; the
collector sends them with its long poll, and on a mismatch asks the node which of them it holds
(``client_tasks``).  An id missing at the node twice in a row is sent again.  ``Liveness`` is the part
of ``ClientCore`` that acts on both: fail over and requeue, or break; resend what the node lacks.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union

from . import security
from .errors import BrokenCluster, ClusterUnavailable
from .ledger import id_hash
from .proxy import HANDSHAKE_TIMEOUT

log = logging.getLogger("pydist.executor")

NS_PREFIX = "pydist.node."


def parse_address(address: str) -> str:
    """``host:port`` (or a Pyro5 URI) from what a user may write (``tcp://host:port``)."""
    a = str(address).strip()
    if a.startswith("tcp://"):
        a = a[len("tcp://"):]
    return a


def _ns_entries(ns: str) -> List[str]:
    """URIs of the pydist nodes a name server lists: roots first."""
    import Pyro5.api

    from .diagnose import parse_ns

    host, port = parse_ns(ns)   # no port: Pyro5's 9090
    with Pyro5.api.locate_ns(host, port) as nsp:
        entries = nsp.list(prefix=NS_PREFIX, return_metadata=True)
    roots = [str(uri) for name, (uri, meta) in sorted(entries.items()) if "pydist.root" in meta]
    others = [str(uri) for name, (uri, meta) in sorted(entries.items()) if "pydist.root" not in meta]
    return roots + others


class _ProbeTimeouts:
    """How long to give one listed entry node to answer while looking for the first that does.

    A stale entry (nothing listening) is refused at once whatever its allowance; one that drops packets
    costs its allowance, so the first round stays short (``FIRST`` s each) to reach a live entry behind it
    soon.  A live node whose hello takes longer (a loaded machine, a slow path: a fixed 0.5 s made such a
    cluster look like no node at all) gets twice as long each round, up to the handshake timeout and never
    past the caller's deadline."""

    FIRST = 0.5

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.allowance = self.FIRST / 2

    def next_round(self) -> None:
        """A new walk over the entries: each gets twice the last allowance (up to the handshake timeout)."""
        self.allowance = min(self.allowance * 2, HANDSHAKE_TIMEOUT)

    def next(self) -> float:
        """The ``timeout`` for the next entry's ``security.connect``."""
        return max(0.05, min(self.allowance, self.deadline - time.monotonic()))


class Entries:
    """The entry nodes a client may use: the addresses it was given, or what a name server lists.

    ``failover`` (default: True with ``ns=`` or more than one address) lets the client move to another
    entry node when its own stays silent for ``node_timeout`` seconds or its connection breaks."""

    def __init__(self, cfg, tls, address: Union[None, str, Sequence[str]] = None, ns: Optional[str] = None,
                 failover: Optional[bool] = None):
        self.cfg = cfg
        self.tls = tls
        self.ns = ns
        if address is None:
            self.addresses: List[str] = []
        elif isinstance(address, (list, tuple)):
            if not address:
                raise ValueError("an empty list of node addresses")
            self.addresses = [parse_address(a) for a in address]
        else:
            self.addresses = [parse_address(str(address))]
        self.failover = bool(failover) if failover is not None else (ns is not None or len(self.addresses) > 1)
        self.uri = ""
        self.address = ""
        self.name = "?"
        self.gen = 0                      # changes with every failover
        self.last_heard = time.monotonic()
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------------ finding
    def candidates(self) -> List[str]:
        """Entry nodes to try, in order (asks the name server again each time)."""
        if self.ns is None:
            return list(self.addresses)
        try:
            return _ns_entries(self.ns)
        except Exception as exc:
            log.debug("name server %s: %s", self.ns, exc)
            return []

    def find_first(self) -> str:
        """The first entry node that answers (within ``connect_timeout``); ClusterUnavailable if none."""
        from .diagnose import parse_ns
        from .errors import AuthenticationError, VersionMismatch

        deadline = time.monotonic() + self.cfg.connect_timeout
        probe = _ProbeTimeouts(deadline)
        last: Optional[BaseException] = None
        refused: Dict[str, BaseException] = {}
        if self.ns is not None:
            host, port = parse_ns(self.ns)
            self.ns = f"{host}:{port}"
        while True:
            probe.next_round()
            if self.ns is not None:
                try:
                    uris = _ns_entries(self.ns)
                    last = last or ClusterUnavailable(f"name server {self.ns} lists no pydist node yet")
                except Exception as exc:
                    uris, last = [], exc
                for uri in uris:
                    try:
                        p = security.connect(uri, secret=self.cfg.secret, timeout=probe.next(), tls=self.tls)
                        p._pyroRelease()
                        return self._use(uri)
                    except ClusterUnavailable as exc:
                        last = exc   # a stale entry
                    except (AuthenticationError, VersionMismatch) as exc:
                        # anyone can register in a name server: skip an entry that cannot prove the secret
                        if uri not in refused:
                            log.warning("skipping %s listed in name server %s: %s", uri, self.ns, exc)
                        refused[uri] = exc
                if uris and len(refused) == len(uris):
                    raise next(iter(refused.values()))   # no listed node accepts us: our secret is wrong
                if time.monotonic() > deadline:
                    raise ClusterUnavailable(f"no pydist node found through name server {self.ns} within "
                                             f"{self.cfg.connect_timeout:g} s: {last}") from None
                time.sleep(0.1)
                continue
            if len(self.addresses) == 1:   # one address: connect() retries and names it
                return self._use(self.addresses[0])
            for a in self.addresses:
                try:
                    security.connect(a, secret=self.cfg.secret, timeout=probe.next(), tls=self.tls)._pyroRelease()
                    return self._use(a)
                except ClusterUnavailable as exc:
                    last = exc
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"none of the pydist nodes {', '.join(self.addresses)} answers: "
                                         f"{last}") from None
            time.sleep(0.1)

    def _use(self, uri: str) -> str:
        self.uri = uri
        self.address = uri
        self.last_heard = time.monotonic()
        return uri

    # ------------------------------------------------------------------------------------ calling
    def connect(self, timeout: Optional[float] = None, call_timeout: Optional[float] = None, uri=None):
        """A proxy to the entry node whose every call has a deadline (``node_timeout`` by default)."""
        return security.connect(uri or self.uri, secret=self.cfg.secret,
                                timeout=self.cfg.connect_timeout if timeout is None else timeout, tls=self.tls,
                                call_timeout=self.cfg.node_timeout if call_timeout is None else call_timeout)

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    def fail_over(self, gen: int, open_session: Callable[[object], dict]) -> bool:
        """The entry node of generation ``gen`` failed: move to another one (``open_session(proxy)``
        registers the client there and returns its description).  True if the client now has a live
        entry (possibly moved by another thread already), False if there is none to go to."""
        with self.lock:
            if self.gen != gen:
                return True
            if not self.failover:
                return False
            deadline = time.monotonic() + max(self.cfg.connect_timeout, self.cfg.node_timeout)
            while time.monotonic() < deadline:
                for uri in self.candidates():
                    if uri == self.uri:
                        continue
                    try:
                        p = self.connect(timeout=0.5, uri=uri)
                        try:
                            info = open_session(p)
                        finally:
                            p._pyroRelease()
                    except Exception as exc:
                        log.debug("failover to %s: %s", uri, exc)
                        continue
                    log.warning("entry node %s at %s failed; moved to node %s at %s", self.name, self.address,
                                info.get("name"), uri)
                    self._use(uri)
                    self.name = info.get("name", "?")
                    self.gen += 1
                    return True
                time.sleep(0.2)
            return False

    def broken(self, exc: BaseException) -> BrokenCluster:
        """The error pending futures fail with when no entry node is left."""
        silent = self.silent_for()
        why = f"{type(exc).__name__}: {exc}"
        return BrokenCluster(f"lost the connection to pydist node {self.name} at {self.address}: silent for "
                             f"{silent:.1f} s (node_timeout {self.cfg.node_timeout:g} s): {why}"
                             + ("" if not self.failover else "; no other node to fail over to"))


class Reconciler:
    """Ids a client has sent and still waits for, with their count and digest; ids missing at the node
    (seen twice in a row) are handed back for resending."""

    def __init__(self) -> None:
        # id -> its id_hash, 0 until a summary needs it: most tasks finish before the next summary, so
        # they are never hashed (hashing each id on its way in and out was on the submit path, #15)
        self.sent: Dict[str, int] = {}
        self.suspects: set = set()

    def add(self, tid: str) -> None:
        self.sent.setdefault(tid, 0)

    def discard(self, tid: str) -> None:
        self.sent.pop(tid, None)

    def clear(self) -> None:
        self.sent.clear()
        self.suspects.clear()

    def summary(self) -> dict:
        """Count and XOR digest of the ids sent and still waited for."""
        d = 0
        sent = self.sent
        for tid, h in sent.items():
            if not h:
                h = sent[tid] = id_hash(tid)   # (changing a value, not the keys, while iterating)
            d ^= h
        return {"n": len(sent), "d": d}

    def missing(self, asked: List[str], held: List[str]) -> List[str]:
        """Of the ids asked about, those the node did not hold this round and the last one."""
        have = set(held)
        now = {t for t in asked if t not in have and t in self.sent}
        act = sorted(now & self.suspects)
        self.suspects = now - set(act)
        return act


class Liveness:
    """The part of ``pydist.clientcore.ClientCore`` that moves a client between entry nodes and
    reconciles its ids with its node (mixed in; it uses the core's ``_entry``, ``_lock``, ``_outbox``,
    ``_pending``, ``_records``, ``_recon`` and ``_break``)."""

    _entry: Entries
    _recon: Reconciler
    _lock: Any
    _cond: Any
    _closed: Any
    _cid: str
    _init_blob: Optional[bytes]
    _node_name: str
    _limits: dict
    _requeue: bool
    _outbox: List[tuple]
    _pending: Dict[str, Any]
    _records: Dict[str, tuple]
    _sent_sizes: Dict[str, int]

    if TYPE_CHECKING:   # provided by ClientCore
        def _break(self, exc: BaseException, already: bool = False) -> None: ...

        def _untake(self, tids: Any) -> None: ...

        def _connect(self, timeout: Optional[float] = None, call_timeout: Optional[float] = None) -> Any: ...

    def _node_failed(self, exc: BaseException, gen: int) -> bool:
        """A call to the entry node of generation ``gen`` failed or timed out.  Fail over (True: carry
        on, unfinished tasks are queued again) or fail every pending future (False)."""
        if self._closed.is_set():
            return False
        if self._entry.fail_over(gen, self._open_here):
            self._requeue_unfinished()
            return True
        self._break(self._entry.broken(exc), already=True)
        return False

    def _open_here(self, proxy) -> dict:
        info = proxy.open_client(self._cid, self._init_blob)
        with self._lock:
            self._node_name = info["name"]
            self._limits = dict(info.get("limits") or {})
            self._requeue = True
        return info

    def _requeue_unfinished(self) -> None:
        """After a failover: every task sent and not finished goes to the new entry node again (same
        ids: a node that holds a copy adopts it)."""
        with self._lock:
            if not self._requeue:
                return
            self._requeue = False
            queued = {rec[0] for rec, _ in self._outbox}
            again = [self._records[t] for t in self._pending if t not in queued and t in self._records]
            self._untake(list(self._sent_sizes))
            self._outbox[:0] = again
            self._recon.clear()
            self._cond.notify_all()
        log.info("resubmitting %d unfinished tasks to node %s", len(again), self._node_name)

    def _reconcile(self, proxy) -> None:
        """The entry node's count of our tasks differs from ours: ask which it holds; what it lacks
        (twice in a row) is sent again."""
        with self._lock:
            asked = list(self._recon.sent)
        held = proxy.client_tasks(self._cid, asked)
        with self._lock:
            again = self._recon.missing(asked, held)
            again = [t for t in again if t in self._pending and t in self._records]
            for t in again:
                self._recon.discard(t)
            self._untake(again)
            self._outbox[:0] = [self._records[t] for t in again]
            if again:
                self._cond.notify_all()
        if again:
            log.warning("node %s lost %d of our tasks (%s...): sending them again", self._node_name,
                        len(again), again[0])
