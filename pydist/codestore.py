"""A node's bundles on disk: ``CodeStore`` (content-addressed, atomic installs, bounded uploads, LRU).

::

    begin(digest, size, owner) ──▶ root/.tmp-*/part   (an _Upload: byte ranges written so far)
    write_chunk(digest, off, b) ──▶ part file (no descriptor held between chunks)
    finish(digest) ── sha256 == digest? ── safe_extract ──▶ os.rename ──▶ root/<digest>/{bundle.tar,tree/,meta.json}
    install(digest, data)       ── the same in one call
    has / path / read / read_chunk / list          pin / unpin / evict (LRU, pinned never evicted)

Everything is written into a fresh ``root/.tmp-*`` folder and published by one ``os.rename``: a bundle
folder either exists complete or not at all.  Uploads in progress are bounded per node and per owner (a
client connection) and freed with their owner.  :mod:`pydist.codesync` re-exports :class:`CodeStore`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Callable, List, Optional, Union

from .bundle import CHUNK_SIZE, _roots_of_dir, human_size
from .errors import BundleNotFound, BundleTooLarge, CodeSyncError
from .safetar import MAX_FILES, _extract

log = logging.getLogger("pydist.codesync")

__all__ = ["CodeStore", "MAX_UPLOADS", "MAX_UPLOADS_PER_OWNER"]

#: most uploads in progress on one node, and per owner (a client connection)
MAX_UPLOADS = 16
MAX_UPLOADS_PER_OWNER = 4

_ARCHIVE = "bundle.tar"
_TREE = "tree"
_META = "meta.json"
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")   # always used with fullmatch
_PathLike = Union[str, "os.PathLike[str]"]


class _Upload:
    """One bundle being received.  It holds no file descriptor between chunks (each chunk opens, writes and
    closes the part file), so uploads in progress cannot use up the node's descriptors."""

    __slots__ = ("size", "part", "ranges", "users", "owners", "touched", "lock", "closed")

    def __init__(self, size: int, part: str, owner):
        self.size, self.part = size, part
        self.ranges: list[tuple[int, int]] = []   # merged, sorted [start, end) written so far
        self.users = 1
        self.owners = [owner]
        self.touched = time.monotonic()
        self.lock = threading.Lock()   # one writer at a time on this file; the store lock is not held
        self.closed = False

    def write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.part, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def close(self) -> None:
        with self.lock:
            self.closed = True

    def add(self, start: int, end: int) -> None:
        merged = []
        for s, e in self.ranges:
            if e < start or s > end:
                merged.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        merged.append((start, end))
        merged.sort()
        self.ranges = merged

    def missing(self) -> Optional[tuple[int, int]]:
        """The first byte range not written yet, or None."""
        pos = 0
        for s, e in self.ranges:
            if s > pos:
                return pos, s
            pos = max(pos, e)
        return (pos, self.size) if pos < self.size else None


class CodeStore:
    """Bundles on disk under ``root/<digest>/`` (``root/<digest>/tree`` is what goes on ``sys.path``).

    Thread-safe: any method may be called from several threads at once; installs of the same digest are
    serialised and the second is a no-op. Installs are atomic on disk (a bundle folder appears complete
    by one ``os.rename`` or not at all), so two processes installing into one folder do not corrupt it;
    pins and the LRU clock are per process, so give each node process its own ``root`` if they could
    evict each other's bundles.
    """

    def __init__(self, root: _PathLike, max_bytes: int = 2 << 30, *, max_files: int = MAX_FILES,
                 max_uploads: int = MAX_UPLOADS, max_uploads_per_owner: int = MAX_UPLOADS_PER_OWNER):
        self.root = os.path.abspath(os.fspath(root))
        self.max_bytes = int(max_bytes)
        self.max_files = int(max_files)
        self.max_uploads = int(max_uploads)
        self.max_uploads_per_owner = int(max_uploads_per_owner)
        os.makedirs(self.root, exist_ok=True)
        self._lock = threading.RLock()
        self._digest_locks: dict[str, threading.RLock] = {}
        self._index: dict[str, dict] = {}     # digest -> meta (size, files, roots, disk) + last_used
        self._pins: dict[str, int] = {}
        self._uploads: dict[str, _Upload] = {}
        self._cleanup_leftovers()
        self._scan()

    @classmethod
    def for_node(cls, cfg) -> "CodeStore":
        """The store of a node with ``NodeConfig`` ``cfg`` (its folder and every code limit)."""
        return cls(cfg.code_cache, cfg.code_cache_max, max_files=cfg.code_max_files, max_uploads=cfg.max_uploads,
                   max_uploads_per_owner=cfg.max_uploads_per_client)

    # -- helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _check_digest(digest: str) -> str:
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise CodeSyncError(f"invalid bundle digest {digest!r}: expected 64 lowercase hex characters")
        return digest

    def _dir(self, digest: str) -> str:
        return os.path.join(self.root, digest)

    def _cleanup_leftovers(self) -> None:
        for name in os.listdir(self.root):
            if name.startswith((".tmp-", ".upload-", ".trash-")):
                p = os.path.join(self.root, name)
                try:  # only our own leftovers older than a minute: another process may be mid-install
                    if time.time() - os.stat(p).st_mtime < 60:
                        continue
                except OSError:
                    continue
                log.debug("removing leftover %s", p)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else _unlink(p)

    def _scan(self) -> None:
        """Index bundles found on disk that we do not know yet; forget those that are gone."""
        on_disk = {n for n in os.listdir(self.root) if _DIGEST_RE.fullmatch(n)}
        with self._lock:
            for gone in set(self._index) - on_disk:
                del self._index[gone]
            unknown = on_disk - set(self._index)
        for name in sorted(unknown):
            self._load(name)

    def _load(self, digest: str) -> Optional[dict]:
        """Index a bundle found on disk (maybe installed by another process)."""
        d = self._dir(digest)
        try:
            with open(os.path.join(d, _META), encoding="utf-8") as f:
                meta = json.load(f)
            last = os.stat(os.path.join(d, _META)).st_mtime
        except (OSError, ValueError):
            if os.path.isdir(d):
                log.warning("ignoring %s: no readable %s", d, _META)
            return None
        with self._lock:
            known = self._index.get(digest)
            meta["last_used"] = max(last, known["last_used"] if known else 0)
            self._index[digest] = meta
        return meta

    def _lock_for(self, digest: str) -> "threading.RLock":
        with self._lock:
            lk = self._digest_locks.get(digest)
            if lk is None:
                lk = self._digest_locks[digest] = threading.RLock()
            return lk

    def _touch(self, digest: str) -> None:
        now = time.time()
        with self._lock:
            meta = self._index.get(digest)
            if meta is None:
                return
            stale = now - meta["last_used"] > 60
            meta["last_used"] = now
        if stale:  # persist the LRU clock now and then, not on every task
            try:
                os.utime(os.path.join(self._dir(digest), _META))
            except OSError:
                pass

    def _check_size(self, digest: str, size: int) -> None:
        if size > self.max_bytes:
            raise BundleTooLarge(f"bundle {digest[:8]} is {human_size(size)} ({size} bytes), over the code "
                                 f"cache limit of {human_size(self.max_bytes)}: raise code_cache_max")

    # -- queries -------------------------------------------------------------------------------------
    def has(self, digest: str) -> bool:
        """True if the bundle is installed here (complete: a partial one is never visible)."""
        self._check_digest(digest)
        if os.path.isdir(os.path.join(self._dir(digest), _TREE)):
            if digest not in self._index:
                self._load(digest)
            return True
        with self._lock:
            self._index.pop(digest, None)
        return False

    def path(self, digest: str) -> str:
        """The folder to put on ``sys.path`` for this bundle; marks it recently used.

        Raises :class:`BundleNotFound` if it is not installed here.
        """
        if not self.has(digest):
            raise BundleNotFound(f"bundle {digest[:8]} is not in the code cache {self.root}: upload it again "
                                 "(ex.upload_code) or fetch it from the parent node")
        self._touch(digest)
        return os.path.join(self._dir(digest), _TREE)

    def size(self, digest: str) -> int:
        """The archive size of an installed bundle (BundleNotFound if absent); reads no bundle bytes."""
        self.path(digest)
        return os.stat(os.path.join(self._dir(digest), _ARCHIVE)).st_size

    def read(self, digest: str) -> bytes:
        """The archive bytes of an installed bundle (to pass it on to another node)."""
        self.path(digest)
        with open(os.path.join(self._dir(digest), _ARCHIVE), "rb") as f:
            return f.read()

    def read_chunk(self, digest: str, offset: int, length: int = CHUNK_SIZE) -> bytes:
        """``length`` (at most 16 MiB) archive bytes from ``offset`` (to pass a large bundle on chunk by
        chunk); reads only those bytes."""
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise CodeSyncError(f"invalid chunk request: offset {offset!r}, length {length!r}")
        length = min(length, 16 << 20)
        self.path(digest)
        with open(os.path.join(self._dir(digest), _ARCHIVE), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def list(self) -> list[dict]:
        """Installed bundles: digest, size, files, last_used (epoch seconds), roots, pinned, disk_bytes."""
        self._scan()
        with self._lock:
            return [{"digest": d, "size": m["size"], "files": m["files"], "last_used": m["last_used"],
                     "roots": list(m.get("roots", ())), "pinned": self._pins.get(d, 0) > 0,
                     "disk_bytes": m.get("disk", m["size"])}
                    for d, m in sorted(self._index.items(), key=lambda kv: kv[1]["last_used"])]

    # -- install -------------------------------------------------------------------------------------
    def install(self, digest: str, data: bytes) -> str:
        """Verify ``sha256(data) == digest``, safe-extract, publish atomically; return :meth:`path`.

        Idempotent: installing a bundle that is already here does nothing. Raises :class:`CodeSyncError`
        on a digest mismatch, :class:`UnsafeArchive` on a hostile archive (nothing is left behind).
        """
        self._check_digest(digest)
        if self.has(digest):
            return self.path(digest)
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            raise CodeSyncError(f"bundle data does not match its digest: expected {digest[:12]}, got "
                                f"{got[:12]} ({len(data)} bytes); the transfer was corrupted, upload again")
        self._check_size(digest, len(data))

        def write_archive(tmp: str) -> None:
            with open(os.path.join(tmp, _ARCHIVE), "wb") as f:
                f.write(data)

        return self._publish(digest, len(data), write_archive)

    def _publish(self, digest: str, size: int, place_archive: Callable[[str], None]) -> str:
        """Build ``root/.tmp-*/{bundle.tar,tree,meta.json}`` and rename it to ``root/<digest>``."""
        with self._lock_for(digest):
            if self.has(digest):
                return self.path(digest)
            t0 = time.perf_counter()
            tmp = tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-", dir=self.root)
            try:
                place_archive(tmp)
                with open(os.path.join(tmp, _ARCHIVE), "rb") as f:
                    files, nbytes = _extract(f, os.path.join(tmp, _TREE), self.max_bytes, self.max_files)
                meta = {"digest": digest, "size": size, "files": files,
                        "roots": list(_roots_of_dir(os.path.join(tmp, _TREE))), "disk": size + nbytes,
                        "installed": time.time()}
                with open(os.path.join(tmp, _META), "w", encoding="utf-8") as f:
                    json.dump(meta, f)
                os.chmod(tmp, 0o755)
                try:
                    os.rename(tmp, self._dir(digest))
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and self.has(digest):
                        log.debug("bundle %s was installed by another process meanwhile", digest[:8])
                    else:
                        raise CodeSyncError(f"cannot install bundle {digest[:8]} in {self.root}: "
                                            f"{exc.strerror}") from None
            finally:
                if os.path.exists(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
            self._load(digest)
            self._touch(digest)
            log.info("installed bundle %s (%d files, %s) in %.2f s", digest[:8], files, human_size(size),
                     time.perf_counter() - t0)
        self._evict(keep=digest)
        return self.path(digest)

    # -- chunked upload ------------------------------------------------------------------------------
    def begin(self, digest: str, size: int, owner=None) -> None:
        """Start receiving a bundle of ``size`` bytes in chunks. A no-op if it is installed already;
        joins an upload of the same digest in progress (the bytes are the same).

        Bounded: at most ``max_uploads`` in progress, ``max_uploads_per_owner`` per ``owner`` (e.g. a
        client connection: ``abort_owner`` frees them when it ends), and their sizes together within
        ``max_bytes``; past a bound, :class:`CodeSyncError` says which."""
        self._check_digest(digest)
        if not isinstance(size, int) or size <= 0:
            raise CodeSyncError(f"invalid bundle size {size!r} for {digest[:8]}")
        self._check_size(digest, size)
        if self.has(digest):
            return
        with self._lock:
            up = self._uploads.get(digest)
            if up is None and self.has(digest):
                return   # installed by another uploader while we waited for the lock: nothing to start
            if up is not None:
                if up.size != size:
                    raise CodeSyncError(f"bundle {digest[:8]} is already being uploaded with size {up.size}, "
                                        f"not {size}")
                up.users += 1
                up.owners.append(owner)
                return
            if len(self._uploads) >= self.max_uploads:
                raise CodeSyncError(f"{len(self._uploads)} bundle uploads are already in progress on this node "
                                    f"(limit {self.max_uploads}): finish or abort one first")
            if owner is not None and sum(o == owner for u in self._uploads.values() for o in u.owners) \
                    >= self.max_uploads_per_owner:
                raise CodeSyncError(f"this connection already has {self.max_uploads_per_owner} bundle uploads "
                                    "in progress (the limit): finish or abort one first")
            reserved = sum(u.size for u in self._uploads.values())
            if reserved + size > self.max_bytes:
                raise BundleTooLarge(f"bundle uploads in progress would hold {human_size(reserved + size)}, "
                                     f"over the code cache limit of {human_size(self.max_bytes)}")
            fd, part = tempfile.mkstemp(prefix=f".upload-{digest[:12]}-", dir=self.root)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            self._uploads[digest] = _Upload(size, part, owner)

    def write_chunk(self, digest: str, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``; refuses chunks outside ``[0, size)``."""
        self._check_digest(digest)
        with self._lock:
            up = self._uploads.get(digest)
        if up is not None:
            if not isinstance(offset, int) or offset < 0 or offset + len(data) > up.size:
                raise CodeSyncError(f"chunk of {len(data)} bytes at offset {offset} is outside bundle "
                                    f"{digest[:8]} of {up.size} bytes")
            with up.lock:
                if not up.closed:
                    up.write(offset, data)
                    up.add(offset, offset + len(data))
                    up.touched = time.monotonic()
                return  # closed: another uploader of the same bytes is finishing it
        if self.has(digest):
            return  # finished by a concurrent uploader of the same bundle
        raise CodeSyncError(f"no upload of bundle {digest[:8]} in progress: call begin() first")

    def finish(self, digest: str) -> str:
        """Verify the uploaded bytes and install them; returns :meth:`path`.

        Missing bytes or a digest mismatch raise :class:`CodeSyncError` and the partial data is removed.
        """
        self._check_digest(digest)
        with self._lock_for(digest):   # several uploaders of one bundle: the first finishes, the rest wait
            with self._lock:
                up = self._uploads.get(digest)
            if self.has(digest):   # another uploader of the same bytes installed it
                if up is not None:   # (one that began after that: it was told so by write_chunk)
                    self._forget_upload(digest, up)
                return self.path(digest)
            if up is None:
                raise CodeSyncError(f"no upload of bundle {digest[:8]} in progress: call begin() first (or "
                                    "another uploader's finish failed: upload again)")
            try:
                up.close()
                gap = up.missing()
                if gap is not None:
                    raise CodeSyncError(f"upload of bundle {digest[:8]} is incomplete: bytes {gap[0]}..{gap[1]} "
                                        f"of {up.size} never arrived; upload again")
                h = hashlib.sha256()
                with open(up.part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                if h.hexdigest() != digest:
                    raise CodeSyncError(f"uploaded bundle does not match its digest: expected {digest[:12]}, "
                                        f"got {h.hexdigest()[:12]}; the transfer was corrupted, upload again")
                return self._publish(digest, up.size,
                                     lambda tmp: os.replace(up.part, os.path.join(tmp, _ARCHIVE)))
            finally:
                self._forget_upload(digest, up)

    def _forget_upload(self, digest: str, up: "_Upload") -> None:
        """Drop upload ``up`` of ``digest`` and its partial file (its writers find it closed or gone)."""
        with self._lock:
            if self._uploads.get(digest) is up:
                del self._uploads[digest]
        up.close()   # under its lock: a write in progress ends first, later ones see it closed
        _unlink(up.part)

    def abort(self, digest: str, owner=None) -> None:
        """Give up an upload (the last of its uploaders to abort removes the partial data)."""
        self._check_digest(digest)
        with self._lock:
            up = self._uploads.get(digest)
            if up is None:
                return
            up.users -= 1
            if owner in up.owners:
                up.owners.remove(owner)
            if up.users > 0:
                return
            del self._uploads[digest]
        up.close()
        _unlink(up.part)

    def abort_owner(self, owner) -> List[str]:
        """Give up every upload ``owner`` began (its connection ended); returns the digests dropped."""
        with self._lock:
            mine = [d for d, up in self._uploads.items() if owner in up.owners]
        for d in mine:
            with self._lock:
                n = sum(o == owner for o in self._uploads[d].owners) if d in self._uploads else 0
            for _ in range(n):
                self.abort(d, owner)
        return mine

    def uploads(self) -> int:
        """Uploads in progress."""
        with self._lock:
            return len(self._uploads)

    def abort_stale(self, older_than: float = 300.0) -> List[str]:
        """Drop uploads that received no chunk for ``older_than`` seconds (a client went away mid-upload);
        returns their digests. Call it now and then from the node."""
        now = time.monotonic()
        with self._lock:
            stale = [d for d, up in self._uploads.items() if now - up.touched > older_than]
            dropped = [self._uploads.pop(d) for d in stale]
        for d, up in zip(stale, dropped):
            log.info("dropping upload of bundle %s: no data for %.0f s", d[:8], now - up.touched)
            up.close()
            _unlink(up.part)
        return stale

    # -- pins and eviction ---------------------------------------------------------------------------
    def pin(self, digest: str) -> None:
        """Mark a bundle in use (tasks queued or running): it is never evicted. Pins are counted."""
        self._check_digest(digest)
        with self._lock:
            self._pins[digest] = self._pins.get(digest, 0) + 1

    def unpin(self, digest: str) -> None:
        """Undo one :meth:`pin`."""
        self._check_digest(digest)
        with self._lock:
            n = self._pins.get(digest, 0) - 1
            if n > 0:
                self._pins[digest] = n
            else:
                self._pins.pop(digest, None)

    def evict(self) -> List[str]:
        """Remove least-recently-used unpinned bundles until the cache fits ``max_bytes``."""
        return self._evict(keep=None)

    def _evict(self, keep: Optional[str]) -> List[str]:
        evicted: list[str] = []
        trashed: list[str] = []
        with self._lock:
            total = sum(m.get("disk", m["size"]) for m in self._index.values())
            if total <= self.max_bytes:
                return evicted
            for digest, meta in sorted(self._index.items(), key=lambda kv: kv[1]["last_used"]):
                if total <= self.max_bytes:
                    break
                if digest == keep or self._pins.get(digest, 0) > 0:
                    continue
                trash = os.path.join(self.root, f".trash-{digest[:12]}-{os.getpid()}-{time.monotonic_ns()}")
                try:
                    os.rename(self._dir(digest), trash)   # gone from has() at once, deleted after
                except OSError as exc:
                    log.warning("cannot evict bundle %s: %s", digest[:8], exc.strerror)
                    continue
                trashed.append(trash)
                del self._index[digest]
                total -= meta.get("disk", meta["size"])
                evicted.append(digest)
            if total > self.max_bytes:
                log.warning("code cache %s holds %s, over its %s limit, but every bundle left is in use",
                            self.root, human_size(total), human_size(self.max_bytes))
        for trash in trashed:  # outside the lock: deleting a big tree takes a while
            shutil.rmtree(trash, ignore_errors=True)
        if evicted:
            log.info("evicted %d bundle(s) from %s: %s", len(evicted), self.root,
                     ", ".join(d[:8] for d in evicted))
        return evicted


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


