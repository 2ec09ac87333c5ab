"""The hello: a small, bounded, typed handshake format, its MACs, the replay cache (pure: no sockets, no threads).

Both hellos travel inside a Pyro5 CONNECT / CONNECTOK frame whose serializer id is ``HELLO_SERIALIZER``
(no Pyro5 serializer has it), so no general deserializer (marshal, serpent, ...) ever reads bytes from a peer
that has not proved the cluster secret.  Every field has a fixed size or a one-byte length with a hard cap, so
parsing costs O(frame size) and allocates at most the frame's size::

    client hello (<= HELLO_MAX bytes)                 node reply (<= REPLY_MAX bytes)
    ──────────────────────────────────                ───────────────────────────────
    "PDH1"   magic                                    "PDR1"   magic
    H        pydist protocol version                  H, B, B, H   protocol, Python major.minor, cloudpickle
    B, B     Python major, minor                      B        flags (1: has mac)
    H        cloudpickle major                        B        len(ver)
    B        flags (1: has mac)                       16s      node nonce
    B        len(ver)       <= 32                     B        len(name)  <= 255
    16s      client nonce   (exactly 16 bytes)        H        len(meta)  <= 8 KiB
    d        timestamp (unix s)                       ver, name, meta (method names, see encode_meta)
    B        len(dst)       <= 255                    32s      mac = HMAC(key, "pydist-reply|" + client
    B        len(object)    <= 64                                   nonce + every byte above)
    B        len(scope)     <= 64
    ver, dst, object, scope  (ASCII)
    32s      mac = HMAC(key, "pydist-hello|" + every byte above)

``key`` is the cluster secret, or for a scoped hello (a task group's ranks) ``capability(secret, scope)``:
a key that proves only that scope.  A refusal (CONNECTFAIL) carries at most ``REFUSAL_MAX`` bytes of UTF-8
text starting with one of the ``TAG_*`` strings.  Before the MAC is checked a refusal says nothing about the
node (not its name, not its versions): just ``TAG_AUTH`` + "refused".
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import hmac
import logging
import math
import os
import secrets
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Dict, Mapping, Optional, Sequence, Tuple

from .config import read_secret_file
from .errors import ConfigError

log = logging.getLogger("pydist.security")

PROTOCOL_VERSION = 1
#: Pyro5 serializer id carried by pydist's hello frames (Pyro5's own are 1..4)
HELLO_SERIALIZER = 0x70
HELLO_MAGIC = b"PDH1"
REPLY_MAGIC = b"PDR1"
NONCE_SIZE = 16
MAC_SIZE = 32
#: the largest client hello a node reads (announced bigger: closed without reading)
HELLO_MAX = 512
#: the largest reply a client reads
REPLY_MAX = 12 * 1024
#: the largest refusal text either side reads
REFUSAL_MAX = 1024
META_MAX = 8 * 1024

TAG_AUTH = "pydist-auth:"
TAG_VERSION = "pydist-version:"
TAG_REFUSED = "pydist-refused:"
TAG_BUSY = "pydist-busy:"

_HELLO_HEAD = struct.Struct("!4sHBBHBB16sdBBB")      # then ver, dst, object, scope, mac
_REPLY_HEAD = struct.Struct("!4sHBBHBB16sBHI")       # then ver, name, meta, mac
_FLAG_MAC = 1
_LIMITS = {"ver": 32, "dst": 255, "object": 64, "scope": 64, "name": 255}


class HelloError(ValueError):
    """A hello or reply that does not follow the format (the text is for logs, never sent to a peer)."""


# ---------------------------------------------------------------------------------------------- versions
def _pydist_version() -> str:
    """The release of the running code (``pydist.__version__``; importlib.metadata cost every process's
    first hello ~30 ms of imports, on both sides: #15, start-up)."""
    try:
        from . import __version__
        return str(__version__)[:_LIMITS["ver"]]
    except Exception:       # pragma: no cover - a broken package
        return "0+unknown"


def _cloudpickle_major() -> int:
    try:
        import cloudpickle
        return int(cloudpickle.__version__.split(".")[0])
    except Exception:       # pragma: no cover - cloudpickle is a dependency
        return 0


@functools.lru_cache(maxsize=1)
def local_versions() -> dict:
    """This process's version facts, as sent in every hello: pydist protocol and release, Python
    major.minor, cloudpickle major."""
    return {"pydist": PROTOCOL_VERSION, "ver": _pydist_version(), "py": "%d.%d" % sys.version_info[:2],
            "cp": str(_cloudpickle_major())}


def describe(v: dict) -> str:
    return (f"pydist {v.get('ver')} (protocol {v.get('pydist')}), Python {v.get('py')}, "
            f"cloudpickle {v.get('cp')}")


def version_problem(mine: dict, theirs: dict) -> Optional[str]:
    """None if compatible, else which fact differs."""
    if theirs.get("pydist") != mine["pydist"]:
        return "pydist protocol versions differ"
    if theirs.get("py") != mine["py"]:
        return "Python major.minor versions differ (pickles of functions are not portable across them)"
    if str(theirs.get("cp", "")).split(".")[0] != str(mine["cp"]).split(".")[0]:
        return "cloudpickle major versions differ"
    return None


def _py_pair(v: dict) -> Tuple[int, int]:
    major, _, minor = str(v["py"]).partition(".")
    return int(major) & 0xFF, int(minor or 0) & 0xFF


# ---------------------------------------------------------------------------------------------- keys
def capability(secret: bytes, scope: str) -> bytes:
    """The key that proves ``scope`` only (e.g. one task group), derived from the cluster secret.  Whoever
    holds it can open scoped connections for that scope and nothing else; it reveals nothing of the secret."""
    if not scope:
        raise ValueError("a capability needs a scope")
    return hmac.new(secret, b"pydist-scope|" + scope.encode("ascii"), hashlib.sha256).hexdigest().encode()


def _key(secret: bytes, scope: str) -> bytes:
    return capability(secret, scope) if scope else secret


def _ascii(b: bytes, what: str) -> str:
    try:
        s = b.decode("ascii")
    except UnicodeDecodeError:
        raise HelloError(f"{what} is not ASCII") from None
    if not s.isprintable():
        raise HelloError(f"{what} has control characters")
    return s


def _field(name: str, value: str) -> bytes:
    b = value.encode("ascii")
    if len(b) > _LIMITS[name]:
        raise ValueError(f"hello field {name} is longer than {_LIMITS[name]} bytes: {value[:40]!r}...")
    return b


# ---------------------------------------------------------------------------------------------- client hello
@dataclass
class Hello:
    """A parsed client hello (``mac`` None: the client has no secret)."""

    pydist: int
    ver: str
    py: str
    cp: str
    nonce: bytes
    ts: float
    dst: str
    object: str
    scope: str
    mac: Optional[bytes]
    signed: bytes          # the bytes the mac covers

    def versions(self) -> dict:
        return {"pydist": self.pydist, "ver": self.ver, "py": self.py, "cp": self.cp}


def encode_hello(key: Optional[bytes], dst: str, obj: str, *, scope: str = "", ts: Optional[float] = None,
                 nonce: Optional[bytes] = None, versions: Optional[dict] = None) -> Tuple[bytes, bytes]:
    """A client hello (``key``: the secret or a capability; None: no MAC).  Returns (bytes, nonce)."""
    v = versions or local_versions()
    nonce = secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"the nonce must be {NONCE_SIZE} bytes")
    ver, d, o, s = (_field("ver", str(v["ver"])), _field("dst", dst), _field("object", obj),
                    _field("scope", scope))
    major, minor = _py_pair(v)
    head = _HELLO_HEAD.pack(HELLO_MAGIC, int(v["pydist"]) & 0xFFFF, major, minor,
                            int(str(v["cp"]).split(".")[0]) & 0xFFFF, _FLAG_MAC if key else 0, len(ver), nonce,
                            float(time.time() if ts is None else ts), len(d), len(o), len(s))
    body = head + ver + d + o + s
    mac = hmac.new(key, b"pydist-hello|" + body, hashlib.sha256).digest() if key else b"\0" * MAC_SIZE
    return body + mac, nonce


def parse_hello(data: bytes) -> Hello:
    """Read a client hello; ``HelloError`` if it is not exactly one well-formed hello.  O(len(data))."""
    if len(data) > HELLO_MAX or len(data) < _HELLO_HEAD.size + MAC_SIZE:
        raise HelloError(f"hello of {len(data)} bytes")
    magic, proto, major, minor, cp, flags, lver, nonce, ts, ld, lo, ls = _HELLO_HEAD.unpack_from(data)
    if magic != HELLO_MAGIC:
        raise HelloError("not a pydist hello")
    if flags & ~_FLAG_MAC:
        raise HelloError("unknown hello flags")
    if lver > _LIMITS["ver"] or ld > _LIMITS["dst"] or lo > _LIMITS["object"] or ls > _LIMITS["scope"]:
        raise HelloError("hello field too long")
    end = _HELLO_HEAD.size + lver + ld + lo + ls
    if len(data) != end + MAC_SIZE:
        raise HelloError("hello length does not match its fields")
    if not math.isfinite(ts):
        raise HelloError("hello timestamp is not a number")
    i = _HELLO_HEAD.size
    parts = []
    for n, what in ((lver, "ver"), (ld, "dst"), (lo, "object"), (ls, "scope")):
        parts.append(_ascii(data[i:i + n], what))
        i += n
    return Hello(proto, parts[0], f"{major}.{minor}", str(cp), nonce, ts, parts[1], parts[2], parts[3],
                 data[end:] if flags & _FLAG_MAC else None, data[:end])


def hello_mac_ok(hello: Hello, secret: bytes) -> bool:
    """Does the hello's MAC prove the secret (or, for a scoped hello, that scope's capability)?"""
    if hello.mac is None:
        return False
    want = hmac.new(_key(secret, hello.scope), b"pydist-hello|" + hello.signed, hashlib.sha256).digest()
    return hmac.compare_digest(hello.mac, want)


# ---------------------------------------------------------------------------------------------- node reply
def encode_meta(methods: Sequence[str], oneway: Sequence[str], attrs: Sequence[str]) -> bytes:
    """Pyro5 metadata (exposed methods, oneway methods, attributes) as three counted lists of short names."""
    out = bytearray()
    for names in (methods, oneway, attrs):
        names = sorted(names)
        out += struct.pack("!H", len(names))
        for n in names:
            b = n.encode("ascii")
            if not 0 < len(b) < 256:
                raise ValueError(f"exposed name {n!r} is empty or too long")
            out += bytes([len(b)]) + b
    if len(out) > META_MAX:
        raise ValueError(f"{len(out)} bytes of exposed names: over {META_MAX}")
    return bytes(out)


def parse_meta(data: bytes) -> Tuple[set, set, set]:
    out = []
    i = 0
    for _ in range(3):
        if i + 2 > len(data):
            raise HelloError("metadata truncated")
        (count,) = struct.unpack_from("!H", data, i)
        i += 2
        names = set()
        for _ in range(count):
            if i >= len(data):
                raise HelloError("metadata truncated")
            n = data[i]
            names.add(_ascii(data[i + 1:i + 1 + n], "exposed name"))
            i += 1 + n
        out.append(names)
    if i != len(data):
        raise HelloError("metadata length does not match")
    return out[0], out[1], out[2]


@dataclass
class Reply:
    """A parsed node reply."""

    pydist: int
    ver: str
    py: str
    cp: str
    nonce: bytes
    name: str
    meta: bytes
    idle: int
    mac: Optional[bytes]
    signed: bytes

    def versions(self) -> dict:
        return {"pydist": self.pydist, "ver": self.ver, "py": self.py, "cp": self.cp}


def encode_reply(key: Optional[bytes], client_nonce: bytes, name: str, meta: bytes, *, idle: float = 0,
                 versions: Optional[dict] = None) -> bytes:
    """The node's reply to a hello whose nonce was ``client_nonce`` (``key`` None: no MAC)."""
    v = versions or local_versions()
    ver, nm = _field("ver", str(v["ver"])), _field("name", name)
    if len(meta) > META_MAX:
        raise ValueError("metadata too large")
    major, minor = _py_pair(v)
    head = _REPLY_HEAD.pack(REPLY_MAGIC, int(v["pydist"]) & 0xFFFF, major, minor,
                            int(str(v["cp"]).split(".")[0]) & 0xFFFF, _FLAG_MAC if key else 0, len(ver),
                            secrets.token_bytes(NONCE_SIZE), len(nm), len(meta),
                            min(int(math.ceil(idle or 0)), 0xFFFFFFFF))
    body = head + ver + nm + meta
    mac = hmac.new(key, b"pydist-reply|" + client_nonce + body, hashlib.sha256).digest() if key \
        else b"\0" * MAC_SIZE
    return body + mac


def parse_reply(data: bytes) -> Reply:
    """Read a node reply; ``HelloError`` if malformed.  O(len(data))."""
    if len(data) > REPLY_MAX or len(data) < _REPLY_HEAD.size + MAC_SIZE:
        raise HelloError(f"reply of {len(data)} bytes")
    magic, proto, major, minor, cp, flags, lver, nonce, lname, lmeta, idle = _REPLY_HEAD.unpack_from(data)
    if magic != REPLY_MAGIC or flags & ~_FLAG_MAC:
        raise HelloError("not a pydist reply")
    if lver > _LIMITS["ver"] or lmeta > META_MAX:
        raise HelloError("reply field too long")
    end = _REPLY_HEAD.size + lver + lname + lmeta
    if len(data) != end + MAC_SIZE:
        raise HelloError("reply length does not match its fields")
    i = _REPLY_HEAD.size
    ver = _ascii(data[i:i + lver], "ver")
    name = _ascii(data[i + lver:i + lver + lname], "name")
    meta = data[i + lver + lname:end]
    return Reply(proto, ver, f"{major}.{minor}", str(cp), nonce, name, meta, idle,
                 data[end:] if flags & _FLAG_MAC else None, data[:end])


def reply_mac_ok(reply: Reply, key: bytes, client_nonce: bytes) -> bool:
    if reply.mac is None:
        return False
    want = hmac.new(key, b"pydist-reply|" + client_nonce + reply.signed, hashlib.sha256).digest()
    return hmac.compare_digest(reply.mac, want)


def key_for(secret: bytes, scope: str) -> bytes:
    """The MAC key of a hello with this scope."""
    return _key(secret, scope)


def encode_refusal(text: str) -> bytes:
    return text.encode("utf-8", "replace")[:REFUSAL_MAX]


def parse_refusal(data: bytes) -> str:
    if len(data) > REFUSAL_MAX:
        raise HelloError("refusal too long")
    return data.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------- replay cache
class ReplayCache:
    """Nonces seen within the clock window.  Bounded: when full, the entry with the oldest timestamp is
    evicted and its timestamp becomes a floor: hellos at or before the floor are refused, so an evicted
    nonce can never be replayed (the cost of overflow is refusing very old hellos, not accepting replays)."""

    def __init__(self, window: float, maxsize: int):
        self.window, self.maxsize = window, maxsize
        self._seen: dict = {}
        self._heap: list = []
        self._floor = float("-inf")
        self._lock = threading.Lock()

    def check_and_add(self, nonce: bytes, ts: float, now: float) -> Optional[str]:
        with self._lock:
            while self._heap and self._heap[0][0] + self.window < now:     # expired: cannot be replayed anyway
                _, old = heapq.heappop(self._heap)
                self._seen.pop(old, None)
            if nonce in self._seen:
                return "replayed handshake (this nonce was already used)"
            if ts <= self._floor:
                return "handshake too old for the replay cache; retry"
            if len(self._seen) >= self.maxsize:
                old_ts, old = heapq.heappop(self._heap)
                self._seen.pop(old, None)
                self._floor = max(self._floor, old_ts)
                if ts <= self._floor:
                    return "handshake too old for the replay cache; retry"
            self._seen[nonce] = ts
            heapq.heappush(self._heap, (ts, nonce))
            return None

    def __len__(self) -> int:
        return len(self._seen)


# ---------------------------------------------------------------------------------------------- refusal log
class RefusalLog:
    """Refusals logged rate-limited: the first of an interval at once (reason and peer), then one line per
    ``interval`` seconds with the count per reason.  A flood costs the log one line per interval."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, level: int = logging.WARNING):
        self.log, self.interval, self.level = logger, float(interval), level
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = {}
        self._window_start: Optional[float] = None
        self.total = 0

    def refused(self, reason: str, peer: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += 1
            if self._window_start is None:
                self._window_start = now
                self.log.log(self.level, "refused connection from %s: %s", peer, reason)
                return
            self._counts[reason] = self._counts.get(reason, 0) + 1
        self.flush(now)

    def flush(self, now: Optional[float] = None) -> None:
        """Emit the summary line if the interval is over (called on every refusal and by the gate's loop)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._window_start is None or now - self._window_start < self.interval:
                return
            counts, self._counts = self._counts, {}
            self._window_start = now if counts else None
        if counts:
            what = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            self.log.log(self.level, "refused %d more connections in the last %.0f s (%s)",
                         sum(counts.values()), self.interval, what)


# ---------------------------------------------------------------------------------------------- secrets
class UserSecret(bytes):
    """The per-user secret, found in its file rather than given (see ``user_secret``): a client holding
    one still refuses a node that cannot prove it, and says how to reach a node started with --insecure."""


def _truthy(v) -> bool:
    return str(v or "").strip().lower() in ("1", "true", "yes", "on")


def user_secret_path(env: Mapping = os.environ) -> Path:
    """Where this user's secret lives: ``$XDG_CONFIG_HOME/pydist/secret``, else ``~/.config/pydist/secret``."""
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "pydist" / "secret"


def user_secret(create: bool = False, env: Mapping = os.environ) -> Optional[UserSecret]:
    """This user's secret (see the module docstring), or None if there is none and ``create`` is false.

    The file must belong to this user and be readable by nobody else (else ``ConfigError`` saying how to fix
    it); it is created with mode 0600 in a 0700 folder.  Two nodes starting at once agree on one secret."""
    path = user_secret_path(env)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(3):
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            if not create:
                return None
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            except FileExistsError:
                continue          # another node made it first: read theirs
            with os.fdopen(fd, "wb") as f:
                f.write(new_secret() + b"\n")
            log.info("made this user's cluster secret in %s (mode 0600)", path)
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read this user's secret file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if hasattr(os, "getuid") and st.st_uid != os.getuid():
                raise ConfigError(f"{path} belongs to another user (uid {st.st_uid}): remove it")
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"{path} is readable by other users: chmod 600 {path} (or remove it: the next "
                                  "node makes a new one)")
            data = f.read(4096).strip()
        if data:
            return UserSecret(data)
        if not create:
            raise ConfigError(f"{path} is empty: remove it (the next node makes a new one)")
        return None if not create else _raise_empty(path)
    raise ConfigError(f"cannot create {path}")


def _raise_empty(path) -> "NoReturn":
    raise ConfigError(f"{path} is empty: remove it (the next node makes a new one)")


def load_secret(value: str | bytes | None = None, secret_file: Optional[str] = None,
                env: Mapping = os.environ, user_default: bool = True) -> Optional[bytes]:
    """The cluster secret: explicit value > secret_file > env PYDIST_SECRET > (``user_default``, unless
    ``PYDIST_INSECURE`` is set) this user's secret file if it exists > None.  Empty is an error."""
    if value is not None:
        b = (value.encode() if isinstance(value, str) else bytes(value)).strip()
        if not b:
            raise ConfigError("the cluster secret given is empty")
        return b
    if secret_file:
        return read_secret_file(secret_file)
    v = env.get("PYDIST_SECRET")
    if v is not None:
        if not v.strip():
            raise ConfigError("PYDIST_SECRET is set but empty: unset it or put a long random string in it")
        return v.strip().encode()
    if user_default and not _truthy(env.get("PYDIST_INSECURE")):
        return user_secret(create=False, env=env)
    return None


def new_secret() -> bytes:
    """A random secret (64 hex characters, so it can travel in an environment variable)."""
    return secrets.token_hex(32).encode()
