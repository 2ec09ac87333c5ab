"""How a rank's messages travel: direct sockets between ranks, one control line to the group's home.

::

    rank i (worker process)                                         rank j
      Comm.send ─▶ Endpoint.post ─▶ Peer(j): FIFO, writer combining ─TCP/unix─▶ reader thread ─▶ Mailbox
                                                                                (match posted receives,
      Comm.recv ─▶ Mailbox.post_recv ◀── (same on i's side) ◀───────────────────  else unexpected queue)
      control line (TCP) to the home node's GroupServer: hello (my address), peer addresses, fail/done,
      abort ◀── any rank failed, died, its node was lost, the client went away: every wait wakes up

* **Shortest path.** Ranks connect to each other directly the first time they send: ranks on one node
  over a Unix socket (no network hop), ranks on different nodes over TCP between their machines.  The
  home node only introduces them (each rank's address arrives on the control line) and relays aborts.
* **Frames** (``pydist.commbox``, with the mailbox). ``header | lengths | pickle | out-of-band buffers``:
  pickle protocol 5 with numpy arrays
  and large ``bytes`` out of band, written with ``sendmsg`` straight from the object's memory (no copy at
  the sender) and read into place at the receiver.  Each connection is one-way (the connector writes), so
  messages between two ranks on one context arrive in the order they were sent.
* **Batching.** A sender that finds the connection busy queues its frame; whoever writes next writes
  every queued frame with one ``sendmsg``.  Readers read in 256 KiB blocks, many frames per system call.
* **Flow control.** A reader stops reading a peer whose unreceived messages exceed the group's queue cap
  (TCP then blocks that sender); one message is always let through, so any message within the size cap
  is delivered.  A message over the size cap fails at the sender with ``MessageTooLarge``.
* **Authentication.** The group's token (a capability for this group only, never the cluster secret):
  the accepting side sends a nonce, the connecting side answers ``HMAC(token, nonce | group | rank)``.
"""
from __future__ import annotations

import collections
import hmac
import itertools
import logging
import marshal
import os
import socket
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .commbox import (BUFLEN, F_RAW_BYTES, HDR, K_BYE, K_DATA, POLL, Aborted, Mailbox, Message,  # noqa: F401
                      _skip, dumps, mac)

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 18
SMALL = 8 << 10          # frames up to this size are buffered and written in batches
BATCH = 64 << 10         # bytes of buffered small frames that are written at once
FLUSH_EVERY = 0.001      # s: buffered frames nobody waits on are written at most this late
ABORT_GRACE = 10.0       # s a rank may keep running after its group was aborted before its worker ends


# ----------------------------------------------------------------------------------------- sending
class Peer:
    """The one-way connection to another rank: a FIFO of frames, written by whoever comes first.

    Small frames (up to ``SMALL`` bytes) are buffered (eager send: ``send`` returns at once) and written
    together: when ``BATCH`` bytes are buffered, when this rank is about to wait for anything (every
    blocking call flushes first), or by the endpoint's flusher thread soon after."""

    def __init__(self, ep: "Endpoint", rank: int):
        self.ep, self.rank = ep, rank
        self.sock: Optional[socket.socket] = None
        self.cond = threading.Condition(threading.Lock())
        self.queue: "collections.deque[list]" = collections.deque()   # [parts, done flag]
        self.buffered = 0            # bytes of small frames queued, not yet written
        self.writing = False
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None

    def enqueue(self, parts: list, size: int, wait: bool, deadline: Optional[float]) -> list:
        small = size <= SMALL
        item = [parts, small]        # a buffered small frame counts as sent (eager protocol)
        with self.cond:
            if self.error is not None:
                raise self.error
            self.queue.append(item)
            if small:
                self.buffered += size + 32
                if self.buffered < BATCH or self.writing:
                    self.ep.arm(self)
                    return item
            elif self.writing:
                if wait:
                    self._wait_done(item, deadline)
                else:
                    self._start_thread()
                return item
            elif not wait and size > (1 << 16):
                self._start_thread()     # big and non-blocking: the background writer takes it
                return item
            self.writing = True
        self._write_all()
        if wait and not item[1]:
            with self.cond:
                self._wait_done(item, deadline)
        return item

    def flush(self) -> None:
        """Write what is queued now, unless someone is writing already (then it will)."""
        with self.cond:
            if self.writing or not self.queue or self.error is not None:
                return
            self.writing = True
        self._write_all()

    def _start_thread(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._writer, daemon=True, name=f"pydist-rank-send{self.rank}")
            self.thread.start()
        self.cond.notify_all()

    def _wait_done(self, item: list, deadline: Optional[float]) -> None:
        while not item[1]:
            if self.error is not None:
                raise self.error
            if self.ep.mailbox.aborted is not None:
                raise Aborted()
            self.cond.wait(POLL)

    def _writer(self) -> None:
        while True:
            with self.cond:
                while (not self.queue or self.writing) and not self.ep.closed.is_set() and self.error is None:
                    self.cond.wait(POLL)
                if self.ep.closed.is_set() or self.error is not None:
                    return
                self.writing = True
            self._write_all()

    def _write_all(self) -> None:
        """Write every queued frame (caller set ``writing``): many small frames become one sendmsg."""
        try:
            if self.sock is None:
                self.sock = self.ep.connect(self.rank)
            while True:
                with self.cond:
                    items = list(self.queue)
                    self.queue.clear()
                    self.buffered = 0
                    if not items:
                        self.writing = False
                        self.cond.notify_all()
                        return
                parts = [p for it in items for p in it[0]]
                while parts:
                    if self.ep.mailbox.aborted is not None:
                        raise Aborted()
                    try:
                        n = self.sock.sendmsg(parts[:512])
                    except socket.timeout:
                        continue
                    parts = _skip(parts, n)
                with self.cond:
                    for it in items:
                        it[1] = True
                    self.cond.notify_all()
        except BaseException as exc:
            with self.cond:
                if not isinstance(exc, Aborted):
                    self.error = ConnectionError(f"sending to rank {self.rank} failed: {type(exc).__name__}: {exc}")
                else:
                    self.error = exc
                self.writing = False
                self.cond.notify_all()
            raise

    def close(self) -> None:
        with self.cond:
            self.cond.notify_all()
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------- endpoint
class Endpoint:
    """One rank's network side: listeners, peers, the mailbox and the control line (see above)."""

    def __init__(self, group: str, rank: int, size: int, token: bytes, home: Tuple[str, int], node: str):
        self.group, self.rank, self.size, self.token, self.home, self.node = group, rank, size, token, home, node
        self.closed = threading.Event()
        self.max_message = 256 << 20
        self.mailbox = Mailbox(64 << 20)
        self.mailbox.before_wait = self.flush
        self.peers: Dict[int, Peer] = {}
        self.addrs: Dict[int, tuple] = {}
        self.addr_cond = threading.Condition(threading.Lock())
        self.peer_lock = threading.Lock()
        self.ctl: Optional[socket.socket] = None
        self.ctl_lock = threading.Lock()
        self.abort_info: Optional[tuple] = None
        self.exit_after_abort: Optional[float] = ABORT_GRACE
        self.socks: List[socket.socket] = []
        self.threads: List[threading.Thread] = []
        self.armed: "collections.OrderedDict[int, Peer]" = collections.OrderedDict()
        self.flush_cond = threading.Condition(threading.Lock())
        self.flusher_idle = True

    # -- life ----------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Connect the control line, open listeners, say hello; returns once the home answered."""
        ctl = socket.create_connection(self.home, timeout=timeout)
        ctl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nonce = _read_exact(ctl, 16)
        g = self.group.encode()
        ctl.sendall(struct.pack("!H", len(g)) + g + struct.pack("!I", self.rank)
                    + mac(self.token, nonce, self.group, self.rank))
        host = ctl.getsockname()[0]
        tcp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind((host, 0))
        tcp.listen(128)
        self.socks.append(tcp)
        unix_name = None
        if hasattr(socket, "AF_UNIX"):
            try:
                u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                unix_name = f"\0pydist-{self.group}-{self.rank}-{os.getpid()}-{os.urandom(4).hex()}"
                u.bind(unix_name)
                u.listen(128)
                self.socks.append(u)
            except OSError:
                unix_name = None
        ctl.settimeout(None)
        self.ctl = ctl
        self._ctl_send(("hello", self.rank, list(tcp.getsockname()[:2]), unix_name, self.node, os.getpid()))
        first = _read_ctl(ctl)   # ("limits", max_message, queue_cap) or ("abort", ...)
        if first[0] == "limits":
            self.max_message, self.mailbox.cap = int(first[1]), int(first[2])
        else:
            self._on_ctl(first)
        for s in self.socks:
            self._thread(self._accept_loop, s, name="pydist-rank-accept")
        self._thread(self._ctl_loop, name="pydist-rank-ctl")
        self._thread(self._flusher, name="pydist-rank-flush")

    # -- batching -------------------------------------------------------------------------------------
    def arm(self, peer: "Peer") -> None:
        """``peer`` has buffered small frames: the flusher writes them unless this rank does first."""
        if peer.rank not in self.armed:
            with self.flush_cond:
                self.armed[peer.rank] = peer
                if self.flusher_idle:      # else it looks again within FLUSH_EVERY anyway
                    self.flusher_idle = False
                    self.flush_cond.notify()

    def flush(self) -> None:
        """Write every peer's buffered frames now (before this rank waits for anything)."""
        if self.armed:
            with self.flush_cond:
                peers = list(self.armed.values())
                self.armed.clear()
            for p in peers:
                p.flush()

    def _flusher(self) -> None:
        """Writes buffered frames the rank did not write itself: it looks every FLUSH_EVERY s while
        there is traffic (so a sender is not woken per message) and sleeps when there is none."""
        quiet = 0
        while not self.closed.is_set():
            with self.flush_cond:
                if self.flusher_idle:
                    while self.flusher_idle and not self.closed.is_set():
                        self.flush_cond.wait(1.0)
                else:
                    self.flush_cond.wait(FLUSH_EVERY)
                busy = bool(self.armed)
            try:
                self.flush()
            except BaseException:   # the sender sees the peer's error on its next call
                pass
            quiet = 0 if busy else quiet + 1
            if quiet > 100:
                with self.flush_cond:
                    if not self.armed:
                        self.flusher_idle = True
                quiet = 0

    def _thread(self, target, *args, name: str) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name=name)
        t.start()
        self.threads.append(t)

    def finish(self, how: tuple) -> None:
        """Tell the home how this rank ended (("done",) or ("fail", text, blob)), then close."""
        try:
            self._ctl_send(how)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.closed.is_set():
            return
        with self.peer_lock:
            peers = list(self.peers.values())
        deadline = time.monotonic() + 30
        for p in peers:   # graceful: every queued frame is written first (unless the group aborted)
            while self.mailbox.aborted is None and p.error is None and time.monotonic() < deadline:
                try:
                    p.flush()            # (returns at once if another thread is writing)
                except BaseException:
                    break
                with p.cond:
                    if not p.queue and not p.writing:
                        break
                    p.cond.wait(POLL)
        self.closed.set()
        with self.flush_cond:
            self.flusher_idle = False
            self.flush_cond.notify_all()
        for p in peers:
            p.close()
        for s in self.socks + ([self.ctl] if self.ctl else []):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self.mailbox.abort(Aborted("closed"))

    # -- control line ---------------------------------------------------------------------------------
    def _ctl_send(self, msg: tuple) -> None:
        data = marshal.dumps(msg)
        with self.ctl_lock:
            self.ctl.sendall(struct.pack("!I", len(data)) + data)   # type: ignore[union-attr]

    def _ctl_loop(self) -> None:
        try:
            while True:
                self._on_ctl(_read_ctl(self.ctl))  # type: ignore[arg-type]  # set before this thread starts
        except (OSError, EOFError, ValueError) as exc:
            if not self.closed.is_set():
                self._set_abort(-1, f"lost its connection to the group's home node ({type(exc).__name__})", None)

    def _on_ctl(self, msg: tuple) -> None:
        if msg[0] == "peer":
            with self.addr_cond:
                self.addrs[int(msg[1])] = tuple(msg[2:])
                self.addr_cond.notify_all()
        elif msg[0] == "abort":
            self._set_abort(int(msg[1]), str(msg[2]), msg[3])

    def _set_abort(self, rank: int, cause: str, blob: Optional[bytes]) -> None:
        if self.abort_info is None:
            self.abort_info = (rank, cause, blob)
            if rank != self.rank and self.exit_after_abort is not None:
                threading.Timer(self.exit_after_abort, self._stuck).start()
        self.mailbox.abort(Aborted(cause))
        with self.addr_cond:
            self.addr_cond.notify_all()

    def _stuck(self) -> None:
        """The group was aborted long ago and this rank still runs (busy, never calling its Comm):
        end the worker process, as MPI ends a job's processes, so that its worker is freed."""
        if not self.closed.is_set():
            log.warning("rank %d of aborted group %s still running %.0f s after the abort: ending its worker",
                        self.rank, self.group, self.exit_after_abort)
            os._exit(70)

    def send_abort(self, reason: str) -> None:
        """This rank asks the home to abort the whole group."""
        try:
            self._ctl_send(("abort", self.rank, reason))
        except OSError:
            pass

    # -- connections ----------------------------------------------------------------------------------
    def connect(self, rank: int) -> socket.socket:
        with self.addr_cond:
            while rank not in self.addrs:
                if self.mailbox.aborted is not None:
                    raise Aborted()
                self.addr_cond.wait(POLL)
            host, port, unix_name, node = self.addrs[rank][:4]
        if unix_name and node == self.node:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(unix_name)
        else:
            s = socket.create_connection((host, port), timeout=30)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(30)
        nonce = _read_exact(s, 16)
        s.sendall(struct.pack("!I", self.rank) + mac(self.token, nonce, self.group, self.rank))
        s.settimeout(POLL)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        except OSError:
            pass
        return s

    def _accept_loop(self, lsock: socket.socket) -> None:
        while not self.closed.is_set():
            try:
                s, _ = lsock.accept()
            except OSError:
                return
            self._thread(self._reader, s, name="pydist-rank-recv")

    def _reader(self, s: socket.socket) -> None:
        try:
            s.settimeout(30)
            nonce = os.urandom(16)
            s.sendall(nonce)
            src = struct.unpack("!I", _read_exact(s, 4))[0]
            proof = _read_exact(s, 32)
            if src >= self.size or not hmac.compare_digest(proof, mac(self.token, nonce, self.group, src)):
                log.warning("rank %d of group %s: refused a connection with a wrong group token", self.rank, self.group)
                s.close()
                return
            s.settimeout(None)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            except OSError:
                pass
            self.socks.append(s)
            f = s.makefile("rb", buffering=READ_BLOCK)
            box = self.mailbox
            while True:
                head = f.read(HDR.size)
                if len(head) < HDR.size:
                    return
                kind, ctx, tag, mlen, nbufs, flags = HDR.unpack(head)
                if kind == K_BYE:
                    return
                lens = [BUFLEN.unpack(f.read(8))[0] for _ in range(nbufs)]
                meta = f.read(mlen) if mlen else b""
                bufs = []
                for n in lens:
                    if flags & F_RAW_BYTES:
                        b = f.read(n)
                        if len(b) < n:
                            return
                    else:
                        b = bytearray(n)
                        if _readinto(f, b) < n:
                            return
                    bufs.append(b)
                box.deliver(Message(src, ctx, tag, flags, meta, bufs, mlen + sum(lens)))
                if box.queued[src] > box.cap:
                    box.wait_room(src, self.closed)
        except (OSError, ValueError, struct.error):
            return

    # -- messages -------------------------------------------------------------------------------------
    def peer(self, rank: int) -> Peer:
        p = self.peers.get(rank)
        if p is None:
            with self.peer_lock:
                p = self.peers.get(rank)
                if p is None:
                    p = self.peers[rank] = Peer(self, rank)
        return p

    def frame(self, ctx: int, tag: int, obj: Any) -> tuple:
        """``(parts, size, flags, meta, bufs)``: the frame of a message, checked against the size cap."""
        flags, meta, bufs = dumps(obj)
        size = len(meta) + sum(memoryview(b).nbytes for b in bufs)
        if size > self.max_message:
            from .errors import MessageTooLarge

            raise MessageTooLarge(f"a message of {size} bytes is over the group's limit of {self.max_message} "
                                  f"bytes (the home node's --max-message-size); split it into smaller ones")
        head = HDR.pack(K_DATA, ctx, tag, len(meta), len(bufs), flags)
        if bufs:
            head += b"".join(BUFLEN.pack(memoryview(b).nbytes) for b in bufs)
        parts = [head, meta] + bufs if meta else [head] + bufs
        return parts, size, flags, meta, bufs

    def post(self, dest: int, ctx: int, tag: int, obj: Any, wait: bool,
             deadline: Optional[float] = None) -> list:
        """Send ``obj``; with ``wait`` return once written, else at once.  Returns the queue item
        ``[parts, written]`` (a send request polls ``written``)."""
        if self.mailbox.aborted is not None:
            raise Aborted()
        parts, size, flags, meta, bufs = self.frame(ctx, tag, obj)
        if dest == self.rank:   # a self-send: a copy of the object, straight into our own mailbox
            bufs = [bytes(b) if flags & F_RAW_BYTES else bytearray(b) for b in bufs]
            self.mailbox.deliver(Message(self.rank, ctx, tag, flags, meta, bufs, size))
            return [parts, True]
        return self.peer(dest).enqueue(parts, size, wait, deadline)


def _readinto(f, buf: bytearray) -> int:
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _read_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError("connection closed")
        out += chunk
    return out


def _read_ctl(s: socket.socket) -> tuple:
    n = struct.unpack("!I", _read_exact(s, 4))[0]
    if n > (1 << 24):
        raise ValueError("control frame too large")
    msg = marshal.loads(_read_exact(s, n))
    if not isinstance(msg, tuple) or not msg:
        raise ValueError("malformed control frame")
    return msg


def write_ctl(s: socket.socket, msg: tuple) -> None:
    """Write one control frame (length + marshal of a tuple of plain values)."""
    data = marshal.dumps(msg)
    s.sendall(struct.pack("!I", len(data)) + data)


read_ctl = _read_ctl
read_exact = _read_exact
_counter = itertools.count()
