"""Checking and extracting a bundle's tar archive on the receiving side: trust nothing.

::

    archive bytes ──▶ tarfile (plain tar only) ──▶ every member checked first ──▶ files written under dest
                      name: no absolute path, no '..', no NUL/backslash      (nothing written if any
                      type: regular files and folders only (no links,         member fails; modes
                      devices, fifos, sparse members); no duplicates;         normalised; existing
                      count <= max_files, extracted bytes <= max_bytes        files never overwritten)

Used by :class:`pydist.codestore.CodeStore` before a bundle is published; :mod:`pydist.codesync`
re-exports :func:`safe_extract`.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
from typing import BinaryIO, Optional

from .bundle import human_size
from .errors import BundleTooLarge, CodeSyncError, UnsafeArchive

__all__ = ["MAX_FILES", "safe_extract"]

#: most files one bundle may extract to (--code-max-files)
MAX_FILES = 100_000


def _check_name(name: str) -> list[str]:
    """The path parts of a member name, or UnsafeArchive if it could land outside the target."""
    if not name or "\x00" in name:
        raise UnsafeArchive(f"unsafe archive member {name!r}: empty name or NUL byte")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchive(f"unsafe archive member {name!r}: absolute path")
    if "\\" in name:
        raise UnsafeArchive(f"unsafe archive member {name!r}: backslash in name")
    parts = name.split("/")
    if ".." in parts:
        raise UnsafeArchive(f"unsafe archive member {name!r}: '..' in path")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise UnsafeArchive(f"unsafe archive member {name!r}: names the target folder itself")
    return parts


def _extract(fileobj: BinaryIO, dest: str, max_bytes: Optional[int] = None,
             max_files: int = MAX_FILES) -> tuple[int, int]:
    """Check every member, then extract; returns (files, bytes). Nothing is written if any member fails.

    The *extracted* size is bounded, not just the archive's: sparse members (GNU 'S', PAX sparse), whose
    few archive bytes stand for any number of zeros, are refused, and the sum of the members' sizes must
    stay within ``max_bytes`` and their count within ``max_files``."""
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")  # plain tar only: no decompression bombs
    except tarfile.TarError as exc:
        raise CodeSyncError(f"bundle is not a valid tar archive: {exc}") from None
    with tar:
        try:
            members = tar.getmembers()
        except tarfile.TarError as exc:
            raise CodeSyncError(f"bundle archive is corrupt: {exc}") from None
        dest = os.path.realpath(dest)
        plan = []
        files_seen: set[str] = set()   # normalised names of file members
        dirs_seen: set[str] = set()    # folders, given as members or implied by a member's path
        total = 0
        if len(members) > max_files:
            raise BundleTooLarge(f"bundle has {len(members)} members, over the limit of {max_files} "
                                 "(--code-max-files)")
        for m in members:
            parts = _check_name(m.name)
            if m.issparse() or m.type == tarfile.GNUTYPE_SPARSE:
                raise UnsafeArchive(f"unsafe archive member {m.name!r}: sparse file (its size on disk is not "
                                    "its size in the archive)")
            if not (m.isreg() or m.isdir()) or m.type == tarfile.CONTTYPE:
                kind = ("symlink" if m.issym() else "hardlink" if m.islnk() else
                        "device" if (m.ischr() or m.isblk()) else "fifo" if m.isfifo() else
                        f"type {m.type!r}")
                raise UnsafeArchive(f"unsafe archive member {m.name!r}: {kind} (only files and folders "
                                    "are allowed)")
            target = os.path.join(dest, *parts)
            if os.path.commonpath([dest, target]) != dest:
                raise UnsafeArchive(f"unsafe archive member {m.name!r}: lands outside {dest}")
            key = "/".join(parts)
            parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
            if key in files_seen or (m.isreg() and key in dirs_seen) or any(p in files_seen for p in parents):
                raise UnsafeArchive(f"unsafe archive member {m.name!r}: clashes with another member of the "
                                    "same name")
            dirs_seen.update(parents)
            (dirs_seen if m.isdir() else files_seen).add(key)
            if m.isreg():
                total += max(0, m.size)
                if max_bytes is not None and total > max_bytes:
                    raise BundleTooLarge(f"bundle extracts to more than {human_size(max_bytes)} (member "
                                         f"{m.name!r}): over the code cache limit (--code-cache-max)")
            plan.append((m, target))
        os.makedirs(dest, exist_ok=True)
        files = nbytes = 0
        made: set[str] = set()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        for m, target in plan:
            try:
                if m.isdir():
                    os.makedirs(target, mode=0o755, exist_ok=True)
                    continue
                parent = os.path.dirname(target)
                if parent not in made:
                    os.makedirs(parent, mode=0o755, exist_ok=True)
                    made.add(parent)
                src = tar.extractfile(m)
                if src is None:   # a regular file always has data (checked above); keeps mypy informed
                    raise UnsafeArchive(f"archive member {m.name!r} has no data")
                fd = os.open(target, flags, 0o755 if m.mode & 0o111 else 0o644)
                with os.fdopen(fd, "wb") as out, src:
                    shutil.copyfileobj(src, out, 1 << 20)
                    if out.tell() != m.size:
                        raise CodeSyncError(f"bundle member {m.name!r} holds {out.tell()} bytes, not the "
                                            f"{m.size} its header says")
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                raise UnsafeArchive(f"unsafe archive member {m.name!r}: clashes with another member "
                                    f"({exc.strerror})") from None
            except (OSError, tarfile.TarError) as exc:
                raise CodeSyncError(f"cannot extract bundle member {m.name!r}: {exc}") from None
            files += 1
            nbytes += m.size
        return files, nbytes


def safe_extract(data: bytes, dest: str, max_bytes: Optional[int] = None, max_files: int = MAX_FILES) -> int:
    """Extract the tar archive ``data`` into ``dest`` (a new or empty folder) and return its file count.

    Every member is checked before anything is written: an absolute name, a ``..`` part, a symlink,
    hardlink, device or fifo, a duplicate name, or a path outside ``dest`` raises :class:`UnsafeArchive`
    naming the member; a sparse member too, and more than ``max_bytes`` extracted bytes or ``max_files``
    members raise :class:`BundleTooLarge`. Existing files are never overwritten. Modes are normalised.
    """
    return _extract(io.BytesIO(data), dest, max_bytes, max_files)[0]


