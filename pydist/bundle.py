"""Building a code bundle on the client: walk the paths, drop the excludes, write a deterministic tar.

::

    build_bundle(paths, exclude) ── _collect ──▶ sorted (name, file) list ──▶ uncompressed PAX tar in memory
                                                                              (mtime 0, uid/gid 0, 0644/0755)
                                 ──▶ (BundleInfo(digest=sha256, size, files, roots), archive bytes)

The bytes depend only on the file names and contents, so the same tree gives the same digest on every
build and unchanged code is never sent twice.  Where the bundle goes next (a node's ``CodeStore``, a
worker's ``activate``) is drawn in :mod:`pydist.codesync`, which re-exports everything here.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import logging
import os
import posixpath
import stat
import tarfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

from .errors import BundleTooLarge, CodeSyncError

log = logging.getLogger("pydist.codesync")

__all__ = ["DEFAULT_EXCLUDES", "CHUNK_SIZE", "BundleInfo", "build_bundle", "human_size"]

#: Names never shipped.  ``build`` and ``dist`` are skipped only when they are not Python packages (no
#: ``__init__.py``), and any folder holding a ``pyvenv.cfg`` (a virtualenv such as ``env/``) is skipped too.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git", ".hg", ".svn", "__pycache__", "*.pyc", "*.pyo", ".venv", "venv", ".tox", ".nox", ".mypy_cache",
    ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", "node_modules", "*.egg-info", "build", "dist",
    ".DS_Store",
)
_UNLESS_PACKAGE = ("build", "dist")

CHUNK_SIZE = 4 << 20  # bytes per upload chunk over the wire
_EXT_SUFFIXES = (".so", ".pyd")
_PathLike = Union[str, "os.PathLike[str]"]


def human_size(n: float) -> str:
    """``4200`` -> ``"4.1 KiB"``."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle is: its content address and a summary of what it holds."""

    digest: str              # sha256 hex of the archive bytes
    size: int                # archive size in bytes
    files: int               # number of regular files in it
    roots: tuple[str, ...]   # top-level importable names it provides

    def __str__(self) -> str:
        return f"bundle {self.digest[:8]} ({self.files} files, {human_size(self.size)})"

    @property
    def sha256(self) -> str:
        """The content hash (same as ``digest``)."""
        return self.digest

    @property
    def file_count(self) -> int:
        """Number of files (same as ``files``)."""
        return self.files


# ---------------------------------------------------------------------------------------------- build

def _module_name(filename: str) -> Optional[str]:
    """The importable name a top-level file provides (``a.py`` -> ``a``, ``b.cpython-311-x.so`` -> ``b``)."""
    if filename.endswith(".py"):
        name = filename[:-3]
    elif filename.endswith(_EXT_SUFFIXES):
        name = filename.split(".", 1)[0]
    else:
        return None
    return name if name.isidentifier() else None


def _roots_of_dir(folder: str) -> tuple[str, ...]:
    """Top-level importable names in ``folder``: modules, packages, namespace packages holding ``.py``."""
    roots = set()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return ()
    for e in entries:
        if e.is_dir():
            if e.name.isidentifier() and _has_python(e.path):
                roots.add(e.name)
        else:
            name = _module_name(e.name)
            if name:
                roots.add(name)
    return tuple(sorted(roots))


def _has_python(folder: str) -> bool:
    try:
        return any(_module_name(n) or n == "__init__.py" for n in os.listdir(folder))
    except OSError:
        return False


class _Excluder:
    def __init__(self, extra: Iterable[str]):
        if isinstance(extra, str):
            extra = (extra,)
        self.defaults = [p for p in DEFAULT_EXCLUDES if p not in _UNLESS_PACKAGE]
        self.user = [p.rstrip("/") for p in extra if p]

    def __call__(self, rel: str, name: str, is_dir: bool, full: str) -> bool:
        """``rel``: path relative to the uploaded path; ``name``: basename."""
        for pat in self.defaults:
            if fnmatch.fnmatchcase(name, pat):
                return True
        if is_dir:
            if name in _UNLESS_PACKAGE and not os.path.exists(os.path.join(full, "__init__.py")):
                return True
            if os.path.exists(os.path.join(full, "pyvenv.cfg")):
                return True
        for pat in self.user:
            if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(rel, pat):
                return True
        return False


def _walk(top: str, prefix: str, excluded: "_Excluder | _ExcluderRel", out: list, seen_dirs: set) -> None:
    """Append (archive_name, full_path, size, executable) for every regular file under ``top``."""
    real = os.path.realpath(top)
    if real in seen_dirs:  # a symlinked folder pointing back up: do not loop
        log.warning("skipping %s: a symlink loop back to %s", top, real)
        return
    seen_dirs = seen_dirs | {real}
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError as exc:
        raise CodeSyncError(f"cannot list {top}: {exc.strerror}") from None
    for e in entries:
        rel = posixpath.join(prefix, e.name) if prefix else e.name
        try:
            st = os.stat(e.path)  # follows symlinks: a linked file is shipped as its content
        except OSError:
            log.warning("skipping %s: broken symlink or unreadable", e.path)
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if excluded(rel, e.name, is_dir, e.path):
            log.debug("excluded %s", e.path)
            continue
        if "\\" in e.name:
            raise CodeSyncError(f"cannot ship {e.path}: a backslash in a file name is not portable; rename it "
                                "or exclude it")
        if is_dir:
            _walk(e.path, rel, excluded, out, seen_dirs)
        elif stat.S_ISREG(st.st_mode):
            out.append((rel, e.path, st.st_size, bool(st.st_mode & 0o111)))
        else:
            log.debug("skipping %s: not a regular file", e.path)


def _collect(path: str, excluded: _Excluder) -> tuple[list, tuple[str, ...]]:
    """Files of one uploaded path as (archive_name, full, size, exe), and the roots it provides."""
    if not os.path.exists(path):
        raise CodeSyncError(f"code path not found: {path}")
    files: list = []
    if os.path.isfile(path):
        name = os.path.basename(path)
        mod = _module_name(name) if name.endswith(".py") else None
        if not mod:
            raise CodeSyncError(f"cannot upload {path}: give a folder, a package folder or a .py file whose "
                                "name is a valid module name")
        st = os.stat(path)
        files.append((name, path, st.st_size, bool(st.st_mode & 0o111)))
        return files, (mod,)
    if os.path.isfile(os.path.join(path, "__init__.py")):  # a package: importable by its own name
        pkg = os.path.basename(path)
        if not pkg.isidentifier():
            log.warning("package folder %s is not a valid module name: `import %s` will fail", path, pkg)
        _walk(path, pkg, _ExcluderRel(excluded, len(pkg) + 1), files, set())
        return files, (pkg,) if pkg.isidentifier() else ()
    _walk(path, "", excluded, files, set())                 # a project folder: its contents are top level
    roots = set()
    for rel, _full, _size, _exe in files:
        top, _, rest = rel.partition("/")
        if not rest:
            mod = _module_name(top)
            if mod:
                roots.add(mod)
        elif top.isidentifier() and (rest == "__init__.py" or (_module_name(rest) and "/" not in rest)):
            roots.add(top)
    return files, tuple(sorted(roots))


class _ExcluderRel:
    """For a package path, match user patterns against the path relative to the package folder too."""

    def __init__(self, inner: _Excluder, strip: int):
        self.inner, self.strip = inner, strip

    def __call__(self, rel: str, name: str, is_dir: bool, full: str) -> bool:
        return self.inner(rel[self.strip:], name, is_dir, full) or self.inner(rel, name, is_dir, full)


def build_bundle(paths: Union[_PathLike, Iterable[_PathLike]], exclude: Iterable[str] = (),
                 max_bytes: int = 512 << 20,
                 progress: Optional[Callable[[int, int], None]] = None) -> tuple[BundleInfo, bytes]:
    """Pack ``paths`` into one deterministic tar archive and return ``(BundleInfo, archive_bytes)``.

    Each path is a project folder (its contents become top-level modules/packages), a package folder
    (has ``__init__.py``: importable by its own name) or one ``.py`` file (importable by its stem).
    ``exclude`` adds fnmatch patterns to :data:`DEFAULT_EXCLUDES`, matched against each file's path
    relative to the uploaded path and against its basename. Raises :class:`CodeSyncError` for a missing
    path or two paths providing the same top-level name, :class:`BundleTooLarge` when the files add up
    to more than ``max_bytes``. ``progress(done_bytes, total_bytes)`` is called as files are packed.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    abspaths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not abspaths:
        raise CodeSyncError("no code path given: pass a folder, a package folder or a .py file")
    excluded = _Excluder(exclude)

    members: dict[str, tuple[str, int, bool, str]] = {}   # archive name -> (full, size, exe, from path)
    root_owner: dict[str, str] = {}
    for path in abspaths:
        files, roots = _collect(path, excluded)
        for r in roots:
            if r in root_owner and root_owner[r] != path:
                raise CodeSyncError(f"two code paths provide the top-level name {r!r}: {root_owner[r]} and "
                                    f"{path}; upload only one of them or rename one")
            root_owner[r] = path
        for rel, full, size, exe in files:
            if rel in members and members[rel][3] != path:
                other = members[rel][0]
                if _same_content(other, full):
                    continue
                raise CodeSyncError(f"two code paths provide {rel!r} with different contents: {other} and "
                                    f"{full}; exclude one of them")
            members[rel] = (full, size, exe, path)

    total = sum(m[1] for m in members.values())
    if total > max_bytes:
        where = ", ".join(abspaths)
        raise BundleTooLarge(f"code at {where} is {human_size(total)} ({total} bytes), over the limit of "
                             f"{human_size(max_bytes)}: exclude data folders with exclude=[...] or raise "
                             "max_bytes")
    if not members:
        raise CodeSyncError(f"nothing to upload in {', '.join(abspaths)}: no files left after the excludes")

    t0 = time.perf_counter()
    buf = io.BytesIO()
    done = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for rel in sorted(members):
            full, _size, exe, _src = members[rel]
            try:
                with open(full, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise CodeSyncError(f"cannot read {full}: {exc.strerror}") from None
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o755 if exe else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
            done += len(data)
            if progress is not None:
                progress(done, total)
    archive = buf.getvalue()
    bundle = BundleInfo(hashlib.sha256(archive).hexdigest(), len(archive), len(members),
                        tuple(sorted(root_owner)))
    log.debug("built %s from %s in %.3f s", bundle, ", ".join(abspaths), time.perf_counter() - t0)
    return bundle, archive


def _same_content(a: str, b: str) -> bool:
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False

