"""Tests of pydist/codesync.py: building, storing, safely extracting and activating code bundles."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import pytest

from pydist.codesync import (CHUNK_SIZE, DEFAULT_EXCLUDES, BundleInfo, CodeStore, activate, build_bundle,
                             safe_extract)
from pydist.errors import BundleNotFound, BundleTooLarge, CodeSyncError, UnsafeArchive

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(base, files: dict) -> None:
    for rel, content in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(textwrap.dedent(content))


def names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return t.getnames()


def run_py(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=30)


def mylib(tmp_path, version: int):
    pkg = tmp_path / f"v{version}" / "mylib"
    write(pkg, {
        "__init__.py": f"VALUE = {version}\nfrom .sub import helper\n",
        "sub/__init__.py": "from .impl import helper\n",
        "sub/impl.py": f"from .. import VALUE\ndef helper():\n    return VALUE * 10\n",
    })
    return pkg


# ------------------------------------------------------------------------------------------- build

def test_digest_is_deterministic_across_builds_and_mtimes(tmp_path):
    write(tmp_path / "proj", {"a.py": "A = 1\n", "pkg/__init__.py": "", "pkg/m.py": "M = 2\n", "data/x.txt": "x"})
    info1, data1 = build_bundle(tmp_path / "proj")
    later = time.time() + 1000
    for root, _dirs, files in os.walk(tmp_path / "proj"):
        for f in files:
            os.utime(os.path.join(root, f), (later, later))
    info2, data2 = build_bundle(str(tmp_path / "proj"))
    assert data1 == data2
    assert info1 == info2
    assert info1.digest == hashlib.sha256(data1).hexdigest()
    assert info1.size == len(data1) and info1.files == 4
    assert info1.roots == ("a", "pkg")
    assert names(data1) == sorted(names(data1))
    with tarfile.open(fileobj=io.BytesIO(data1)) as t:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in t.getmembers()} == {(0, 0, 0, "", 0o644)}
    # a content change changes the digest
    (tmp_path / "proj" / "a.py").write_text("A = 2\n")
    assert build_bundle(tmp_path / "proj")[0].digest != info1.digest


def test_bundleinfo_str():
    info = BundleInfo("3f2a9c1e" + "0" * 56, 4200, 12, ("mylib",))
    assert str(info) == "bundle 3f2a9c1e (12 files, 4.1 KiB)"


def test_default_and_custom_excludes(tmp_path):
    proj = tmp_path / "proj"
    write(proj, {
        "keep.py": "", "pkg/__init__.py": "", "pkg/mod.py": "", "pkg/data/keep.csv": "1",
        ".git/HEAD": "x", "pkg/__pycache__/mod.cpython-311.pyc": b"x", "stale.pyc": b"x", "x.pyo": b"x",
        ".venv/pyvenv.cfg": "", "venv/lib/a.py": "", "env/pyvenv.cfg": "", "env/lib/b.py": "",
        "node_modules/m/index.js": "", "mylib.egg-info/PKG-INFO": "", "build/lib/x.py": "", "dist/x.whl": b"",
        ".tox/x": "", ".mypy_cache/x": "", ".pytest_cache/x": "", ".DS_Store": b"",
        ".ipynb_checkpoints/x": "", ".ruff_cache/x": "", ".nox/x": "", ".hg/x": "", ".svn/x": "",
        "pkg/build/__init__.py": "",           # a subpackage named build is code, not an artefact
        "env2/lib.py": "",                     # env-like but no pyvenv.cfg: kept
        "secrets/key.pem": "k", "logs/a.log": "", "pkg/data/big.bin": b"0" * 10,
    })
    assert ".git" in DEFAULT_EXCLUDES and "__pycache__" in DEFAULT_EXCLUDES
    _info, data = build_bundle(proj)
    got = set(names(data))
    assert got == {"keep.py", "pkg/__init__.py", "pkg/mod.py", "pkg/data/keep.csv", "pkg/build/__init__.py",
                   "env2/lib.py", "secrets/key.pem", "logs/a.log", "pkg/data/big.bin"}
    _info, data = build_bundle(proj, exclude=["secrets", "*.log", "pkg/data/*.bin"])
    got = set(names(data))
    assert "secrets/key.pem" not in got and "logs/a.log" not in got and "pkg/data/big.bin" not in got
    assert "pkg/data/keep.csv" in got


def test_package_file_and_merge_roots(tmp_path):
    pkg = mylib(tmp_path, 1)
    write(tmp_path, {"helpers.py": "H = 1\n", "other/mylib/__init__.py": ""})
    info, data = build_bundle([pkg, tmp_path / "helpers.py"])
    assert info.roots == ("helpers", "mylib")
    assert "mylib/sub/impl.py" in names(data) and "helpers.py" in names(data)
    with pytest.raises(CodeSyncError) as exc:
        build_bundle([pkg, tmp_path / "other"])
    assert str(pkg) in str(exc.value) and str(tmp_path / "other") in str(exc.value) and "mylib" in str(exc.value)


def test_missing_path_and_too_large_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CodeSyncError) as exc:
        build_bundle(missing)
    assert str(exc.value) == f"code path not found: {missing}"
    write(tmp_path / "big", {"blob.bin": b"x" * (3 << 20), "a.py": ""})
    with pytest.raises(BundleTooLarge) as exc:
        build_bundle(tmp_path / "big", max_bytes=1 << 20)
    msg = str(exc.value)
    assert str(tmp_path / "big") in msg and "3.0 MiB" in msg and "1.0 MiB" in msg


def test_progress_is_reported(tmp_path):
    write(tmp_path / "p", {f"m{i}.py": "x" * 100 for i in range(5)})
    calls = []
    build_bundle(tmp_path / "p", progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == 5 and calls[-1] == (500, 500)


# --------------------------------------------------------------------------------------- store/import

def test_subpackage_relative_import_and_resources_in_subprocess(tmp_path):
    pkg = tmp_path / "src" / "mylib"
    write(pkg, {
        "__init__.py": "from .sub.impl import double\n",
        "sub/__init__.py": "",
        "sub/impl.py": "from ..util import base\ndef double(x):\n    return base() * 2 * x\n",
        "util.py": "def base():\n    return 1\n",
        "data/__init__.py": "",
        "data/table.txt": "hello resources\n",
    })
    info, data = build_bundle(pkg)
    store = CodeStore(tmp_path / "cache")
    path = store.install(info.digest, data)
    assert path == store.path(info.digest) and os.path.isdir(path)
    r = run_py(f"""
        from pydist.codesync import activate
        activate({path!r})
        import importlib.resources, mylib
        print(mylib.double(21))
        print(importlib.resources.files("mylib.data").joinpath("table.txt").read_text().strip())
        print(mylib.__file__.startswith({path!r}))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["42", "hello resources", "True"]


def test_version_switch_in_one_process(tmp_path):
    store = CodeStore(tmp_path / "cache")
    paths = []
    for v in (1, 2):
        info, data = build_bundle(mylib(tmp_path, v))
        paths.append(store.install(info.digest, data))
    assert paths[0] != paths[1]
    r = run_py(f"""
        import sys
        from pydist.codesync import activate
        activate({paths[0]!r})
        import mylib
        print(mylib.VALUE, mylib.helper())
        activate({paths[0]!r})                 # same bundle: nothing purged
        import mylib as again
        print(again is mylib)
        activate({paths[1]!r})
        import mylib
        print(mylib.VALUE, mylib.helper(), sys.path.count({paths[0]!r}))
        activate(None)
        print("mylib" in sys.modules, {paths[1]!r} in sys.path)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:4] == ["1 10", "True", "2 20 0", "False False"]


def test_activate_in_process_puts_path_first(tmp_path):
    info, data = build_bundle(mylib(tmp_path, 3))
    store = CodeStore(tmp_path / "cache")
    p = store.install(info.digest, data)
    try:
        activate(p)
        assert sys.path[0] == p
        sys.path.insert(0, "/somewhere/else")
        activate(p)
        assert sys.path[0] == p and sys.path.count(p) == 1
    finally:
        activate(None)
        sys.path[:] = [x for x in sys.path if x != "/somewhere/else"]
    assert p not in sys.path


def test_install_idempotent_read_list_and_digest_check(tmp_path):
    write(tmp_path / "p", {"a.py": "A = 1\n"})
    info, data = build_bundle(tmp_path / "p")
    store = CodeStore(tmp_path / "cache")
    assert not store.has(info.digest)
    with pytest.raises(BundleNotFound):
        store.path(info.digest)
    with pytest.raises(CodeSyncError, match="does not match"):
        store.install(info.digest, data + b"x")
    assert not store.has(info.digest)
    p1 = store.install(info.digest, data)
    p2 = store.install(info.digest, data)
    assert p1 == p2 and store.has(info.digest)
    assert store.read(info.digest) == data
    [entry] = store.list()
    assert entry["digest"] == info.digest and entry["size"] == len(data) and entry["files"] == 1
    assert entry["last_used"] > 0
    # a second store on the same folder (a restarted node) sees it
    assert CodeStore(tmp_path / "cache").has(info.digest)
    with pytest.raises(CodeSyncError, match="invalid bundle digest"):
        store.has("../../etc")


def test_concurrent_installs_of_same_digest(tmp_path):
    write(tmp_path / "p", {f"m{i}.py": f"X = {i}\n" for i in range(200)})
    info, data = build_bundle(tmp_path / "p")
    store = CodeStore(tmp_path / "cache")
    results, errors = [], []

    def go():
        try:
            results.append(store.install(info.digest, data))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert len(os.listdir(results[0])) == 200
    assert sorted(os.listdir(tmp_path / "cache")) == [info.digest]


# ----------------------------------------------------------------------------------------- hostile

def tar_with(*members) -> bytes:
    """members: (TarInfo, bytes-or-None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ok = tarfile.TarInfo("ok.py")
        ok.size = 2
        t.addfile(ok, io.BytesIO(b"#\n"))
        for info, content in members:
            if content is not None:
                info.size = len(content)
                t.addfile(info, io.BytesIO(content))
            else:
                t.addfile(info)
    return buf.getvalue()


def member(name, type=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = type
    info.linkname = linkname
    return info


def hostile_cases(tmp_path):
    cache = str(tmp_path / "cache")
    return {
        "absolute": tar_with((member("/tmp/evil.py"), b"x")),
        "dotdot": tar_with((member("pkg/../../evil.py"), b"x")),
        "symlink": tar_with((member("link", tarfile.SYMTYPE, "/etc/passwd"), None)),
        "hardlink": tar_with((member("hard", tarfile.LNKTYPE, "/etc/passwd"), None)),
        "device": tar_with((member("dev", tarfile.CHRTYPE), None)),
        "fifo": tar_with((member("fifo", tarfile.FIFOTYPE), None)),
        "sibling": tar_with((member(cache + "x/evil.py"), b"x")),
        "sibling-rel": tar_with((member("../" + os.path.basename(cache) + "x/evil.py"), b"x")),
        "duplicate": tar_with((member("ok.py"), b"y")),
        "file-then-dir": tar_with((member("ok.py/inner.py"), b"y")),
    }


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink", "hardlink", "device", "fifo", "sibling",
                                  "sibling-rel", "duplicate", "file-then-dir"])
def test_hostile_archive_refused_by_install(tmp_path, case):
    data = hostile_cases(tmp_path)[case]
    digest = hashlib.sha256(data).hexdigest()
    store = CodeStore(tmp_path / "cache")
    with pytest.raises(UnsafeArchive) as exc:
        store.install(digest, data)
    bad = [m for m in names(data) if m != "ok.py"] or ["ok.py"]
    assert repr(bad[-1]) in str(exc.value)
    assert not store.has(digest)
    assert os.listdir(tmp_path / "cache") == []           # no temp folder, no partial bundle
    assert not os.path.exists("/tmp/evil.py") or case != "absolute"
    assert not os.path.exists(str(tmp_path / "cache") + "x")
    assert not (tmp_path / "evil.py").exists()


def test_safe_extract_writes_nothing_for_hostile_archive(tmp_path):
    data = tar_with((member("a/b.py"), b"x"), (member("../evil.py"), b"x"))
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchive, match=r"'\.\./evil\.py'"):
        safe_extract(data, str(dest))
    assert not dest.exists() or list(dest.iterdir()) == []
    assert not (tmp_path / "evil.py").exists()
    good = tar_with((member("a/b.py"), b"x"))
    assert safe_extract(good, str(dest)) == 2
    assert (dest / "a" / "b.py").read_bytes() == b"x"


def test_gzip_or_garbage_refused(tmp_path):
    store = CodeStore(tmp_path / "cache")
    for data in (b"not a tar at all" * 100, _gzipped(tar_with())):
        with pytest.raises(CodeSyncError):
            store.install(hashlib.sha256(data).hexdigest(), data)
    assert os.listdir(tmp_path / "cache") == []


def _gzipped(data: bytes) -> bytes:
    import gzip
    return gzip.compress(data)


# ---------------------------------------------------------------------------------------- chunked

def chunks(data: bytes, size: int):
    return [(off, data[off:off + size]) for off in range(0, len(data), size)]


def test_chunked_upload_ok(tmp_path):
    write(tmp_path / "p", {"a.py": "A = 1\n", "blob.bin": os.urandom(100_000)})
    info, data = build_bundle(tmp_path / "p")
    store = CodeStore(tmp_path / "cache")
    store.begin(info.digest, len(data))
    for off, chunk in reversed(chunks(data, 30_000)):       # any order
        store.write_chunk(info.digest, off, chunk)
    path = store.finish(info.digest)
    assert store.has(info.digest) and os.path.isfile(os.path.join(path, "a.py"))
    assert store.read(info.digest) == data
    assert store.read_chunk(info.digest, 10, 20) == data[10:30]
    assert sorted(os.listdir(tmp_path / "cache")) == [info.digest]
    # begin/write/finish again for an installed digest are no-ops
    store.begin(info.digest, len(data))
    store.write_chunk(info.digest, 0, data[:10])
    assert store.finish(info.digest) == path
    assert CHUNK_SIZE == 4 << 20


def test_chunked_upload_wrong_digest(tmp_path):
    write(tmp_path / "p", {"a.py": "A = 1\n"})
    info, data = build_bundle(tmp_path / "p")
    wrong = hashlib.sha256(b"something else").hexdigest()
    store = CodeStore(tmp_path / "cache")
    store.begin(wrong, len(data))
    store.write_chunk(wrong, 0, data)
    with pytest.raises(CodeSyncError, match="does not match"):
        store.finish(wrong)
    assert not store.has(wrong) and os.listdir(tmp_path / "cache") == []


def test_chunked_upload_missing_chunk(tmp_path):
    write(tmp_path / "p", {"a.py": "A = 1\n", "b.bin": os.urandom(50_000)})
    info, data = build_bundle(tmp_path / "p")
    store = CodeStore(tmp_path / "cache")
    store.begin(info.digest, len(data))
    parts = chunks(data, 10_000)
    for off, chunk in parts[:2] + parts[3:]:
        store.write_chunk(info.digest, off, chunk)
    with pytest.raises(CodeSyncError, match="incomplete.*20000"):
        store.finish(info.digest)
    assert not store.has(info.digest) and os.listdir(tmp_path / "cache") == []
    with pytest.raises(CodeSyncError, match="no upload"):
        store.write_chunk(info.digest, 0, b"x")


def test_chunk_out_of_bounds_and_abort(tmp_path):
    store = CodeStore(tmp_path / "cache")
    d = hashlib.sha256(b"x").hexdigest()
    store.begin(d, 100)
    for off, n in ((90, 11), (-1, 1), (100, 1)):
        with pytest.raises(CodeSyncError, match="outside"):
            store.write_chunk(d, off, b"y" * n)
    store.write_chunk(d, 90, b"y" * 10)
    store.abort(d)
    assert os.listdir(tmp_path / "cache") == []
    with pytest.raises(CodeSyncError):
        store.finish(d)
    with pytest.raises(BundleTooLarge):
        CodeStore(tmp_path / "small", max_bytes=1000).begin(d, 5000)


# ---------------------------------------------------------------------------------------- eviction

def test_lru_eviction_respects_pins(tmp_path):
    bundles = []
    for i in range(4):
        write(tmp_path / f"p{i}", {"m.py": f"X = {i}\n", "blob.bin": os.urandom(20_000)})
        bundles.append(build_bundle(tmp_path / f"p{i}"))
    store = CodeStore(tmp_path / "cache", max_bytes=1 << 30)
    for info, data in bundles[:3]:
        store.install(info.digest, data)
        time.sleep(0.01)
    d0, d1, d2, d3 = (b[0].digest for b in bundles)
    store.path(d0)                                         # d0 most recently used now; d1 is the oldest
    store.pin(d1)
    disk = {e["digest"]: e["disk_bytes"] for e in store.list()}
    assert disk[d0] >= bundles[0][0].size                  # archive + extracted tree
    store.max_bytes = disk[d0] + disk[d1]                  # room for two of the three
    evicted = store.evict()
    assert evicted == [d2]                                 # d1 is older but pinned
    assert store.has(d0) and store.has(d1) and not store.has(d2)
    store.unpin(d1)
    store.install(d3, bundles[3][1])                       # over the limit again: d1 is LRU and unpinned
    assert not store.has(d1) and store.has(d3) and store.has(d0)
    assert {e["digest"] for e in store.list()} == {d0, d3}
    assert not [n for n in os.listdir(tmp_path / "cache") if n.startswith(".")]


# ------------------------------------------------------------------------------------------ timing

@pytest.mark.parametrize("shape", ["2000 small files", "50 MB"])
def test_build_and_install_timing(tmp_path, shape):
    src = tmp_path / "src"
    if shape == "2000 small files":
        for i in range(2000):
            d = src / f"pkg{i // 100}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"m{i}.py").write_text(f"X = {i}\n" * 20)
        expect_files = 2000
    else:
        src.mkdir()
        for i in range(10):
            (src / f"blob{i}.bin").write_bytes(os.urandom(5 << 20))
        expect_files = 10
    t0 = time.perf_counter()
    info, data = build_bundle(src)
    t1 = time.perf_counter()
    store = CodeStore(tmp_path / "cache")
    store.begin(info.digest, len(data))
    for off in range(0, len(data), CHUNK_SIZE):
        store.write_chunk(info.digest, off, data[off:off + CHUNK_SIZE])
    path = store.finish(info.digest)
    t2 = time.perf_counter()
    print(f"\n[codesync timing] {shape}: build {t1 - t0:.3f} s, chunked install {t2 - t1:.3f} s, "
          f"archive {len(data) / 1e6:.1f} MB")
    assert info.files == expect_files
    assert sum(len(fs) for _r, _d, fs in os.walk(path)) == expect_files
    with open(os.path.join(os.path.dirname(path), "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["files"] == expect_files


def test_two_uploaders_of_same_bundle_and_stale_upload(tmp_path):
    write(tmp_path / "p", {"a.py": "A = 1\n", "b.bin": os.urandom(300_000)})
    info, data = build_bundle(tmp_path / "p")
    store = CodeStore(tmp_path / "cache")
    errors, paths = [], []

    def upload():
        try:
            store.begin(info.digest, len(data))
            for off, chunk in chunks(data, 16_384):
                store.write_chunk(info.digest, off, chunk)
            paths.append(store.finish(info.digest))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(paths) == 4 and len(set(paths)) == 1
    assert store.read(info.digest) == data
    assert sorted(os.listdir(tmp_path / "cache")) == [info.digest]

    other = hashlib.sha256(b"never finished").hexdigest()
    store.begin(other, 1000)
    store.write_chunk(other, 0, b"x" * 10)
    assert store.abort_stale(older_than=3600) == []
    assert store.abort_stale(older_than=0) == [other]
    assert sorted(os.listdir(tmp_path / "cache")) == [info.digest]


def test_an_uploader_whose_check_raced_with_the_install_neither_starts_over_nor_fails_the_others(tmp_path):
    """CI, Python 3.11, four uploaders of one bundle: the first installed it while a second had just
    seen it not installed; the second then opened a fresh, empty upload, and a third uploader's
    finish() took that one: "bytes 0..307200 never arrived".  The interleaving, made certain: the
    second uploader's first look at the store is from before the install."""
    write(tmp_path / "p", {"a.py": "A = 1\n", "b.bin": os.urandom(300_000)})
    info, data = build_bundle(tmp_path / "p")

    class LateView(CodeStore):
        stale = 0

        def has(self, digest):
            if self.stale:
                self.stale -= 1
                return False     # what a look just before the install saw
            return super().has(digest)

    store = LateView(tmp_path / "cache")
    store.begin(info.digest, len(data))                       # uploader A
    store.begin(info.digest, len(data))                       # uploader E joins A's upload
    for off, chunk in chunks(data, 16_384):
        store.write_chunk(info.digest, off, chunk)
    installed = store.finish(info.digest)                     # A installs it
    store.stale = 1
    store.begin(info.digest, len(data))                       # D: looked before the install
    assert store.finish(info.digest) == installed             # E: its bytes are installed
    for off, chunk in chunks(data, 16_384):                   # D goes on with its chunks
        store.write_chunk(info.digest, off, chunk)
    assert store.finish(info.digest) == installed
    assert store.read(info.digest) == data
    assert sorted(os.listdir(tmp_path / "cache")) == [info.digest]   # no partial upload left


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_part = st.sampled_from(["a", "b.py", "..", ".", "", "/", "c:", "\\x", "d\\e", "ü"])


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_part, min_size=1, max_size=5))
def test_safe_extract_never_writes_outside(tmp_path, parts):
    name = "/".join(parts)
    base = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))    # a fresh folder per example (Hypothesis may replay one)
    dest = base / "dest"
    try:
        data = tar_with((member(name), b"payload"))
    except (ValueError, UnicodeError):
        return
    try:
        n = safe_extract(data, str(dest))
    except UnsafeArchive as exc:
        assert any(repr(n) in str(exc) for n in names(data))     # names the member as tar reads it
        assert not dest.exists() or list(dest.iterdir()) == []
    else:
        assert n == 2
    written = [os.path.join(r, f) for r, _d, fs in os.walk(base) for f in fs]
    assert all(w.startswith(str(dest) + os.sep) for w in written)
