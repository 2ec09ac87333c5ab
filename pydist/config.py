"""Every setting of a node and of a client, once: its default, its environment variable, its CLI flag.

``NodeConfig`` is shared by ``pydist-node`` (cli.py builds its argparse flags from the field table) and
by ``LocalCluster``; ``ClientConfig`` by ``ClusterExecutor``.  Precedence: explicit argument / CLI flag >
``PYDIST_*`` environment variable > config file > default.

The config file is TOML, with a ``[node]`` and a ``[client]`` table whose keys are the field names below
(``workers = 4``, ``heartbeat_timeout = 10.0``, ...); keys at the top of the file apply to both (where
the setting exists), a table's keys win.  It is the first of: ``--config FILE`` (or
``PYDIST_CONFIG=FILE``), ``./pydist.toml``, ``$XDG_CONFIG_HOME/pydist/pydist.toml`` (default
``~/.config/pydist/pydist.toml``).  ``python -m pydist.config`` prints the table of every setting (the
one in the README, checked by a test).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from .errors import ConfigError

ENV_PREFIX = "PYDIST_"
#: fields given as sizes ("512M", "2G" or bytes)
SIZE_FIELDS = ("code_cache_max", "max_message_size", "max_client_bytes", "max_queued_bytes", "memory_limit")


def _meta(env: Optional[str], flag: Optional[str], help: str, default_doc: Optional[str] = None) -> dict:
    return {"env": env, "flag": flag, "help": help, "default_doc": default_doc}


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pydist", "code")


def _cpu_count() -> int:
    import psutil

    return psutil.cpu_count(logical=True) or 1


def parse_size(text: str | int) -> int:
    """Parse ``"512M"``, ``"2G"``, ``"1000"`` into bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().rstrip("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if s.endswith(suffix):
            s, mult = s[:-1], m
            break
    try:
        return int(float(s) * mult)
    except ValueError:
        raise ConfigError(f"cannot read size {text!r}: use a number of bytes or e.g. 512M, 2G") from None


@dataclass
class NodeConfig:
    """Settings of one ``pydist-node``."""

    host: str = field(default="127.0.0.1", metadata=_meta("HOST", "--host", "address to bind (and advertise)"))
    port: int = field(default=0, metadata=_meta("PORT", "--port", "port to bind; 0 picks a free one"))
    advertise: Optional[str] = field(default=None, metadata=_meta(
        "ADVERTISE", "--advertise", "address other machines use to reach this node (default: --host; with "
        "--host 0.0.0.0 this machine's non-loopback address)"))
    dashboard: Optional[int] = field(default=None, metadata=_meta(
        "DASHBOARD", "--dashboard", "serve the web dashboard on this port (0: a free one; default: off)"))
    name: Optional[str] = field(default=None, metadata=_meta("NAME", "--name", "node name (default: host-port)"))
    workers: Optional[int] = field(default=None, metadata=_meta("WORKERS", "--workers",
                                                                 "worker processes (default: CPU count)"))
    ns: Optional[str] = field(default=None, metadata=_meta("NS", "--ns", "name server host:port to register in"))
    parent: Optional[str] = field(default=None, metadata=_meta("PARENT", "--parent",
                                                               "parent node: a name, host:port or Pyro5 URI"))
    peers: list = field(default_factory=list, metadata=_meta("PEERS", "--peer",
                                                             "peer link (tasks flow both ways); repeatable"))
    max_hops: int = field(default=8, metadata=_meta("MAX_HOPS", "--max-hops", "max hops a task may travel"))
    heartbeat: float = field(default=1.0, metadata=_meta("HEARTBEAT", "--heartbeat", "seconds between heartbeats"))
    heartbeat_timeout: float = field(default=5.0, metadata=_meta("HEARTBEAT_TIMEOUT", "--heartbeat-timeout",
                                                                  "seconds of silence before a link is lost"))
    secret_file: Optional[str] = field(default=None, metadata=_meta("SECRET_FILE", "--secret-file",
                                                                    "file holding the cluster secret"))
    insecure: bool = field(default=False, metadata=_meta("INSECURE", "--insecure",
                                                         "no cluster secret at all (default: a per-user secret "
                                                         "file): any local user can run code; off loopback anyone"))
    tls_cert: Optional[str] = field(default=None, metadata=_meta("TLS_CERT", "--tls-cert", "TLS certificate (PEM)"))
    tls_key: Optional[str] = field(default=None, metadata=_meta("TLS_KEY", "--tls-key", "TLS private key (PEM)"))
    tls_ca: Optional[str] = field(default=None, metadata=_meta("TLS_CA", "--tls-ca", "CA certificate(s) to trust"))
    max_message_size: int = field(default=256 << 20, metadata=_meta("MAX_MESSAGE_SIZE", "--max-message-size",
                                                                    "largest accepted message, bytes"))
    code_cache: str = field(default_factory=_default_cache_dir, metadata=_meta("CODE_CACHE", "--code-cache",
                                                                               "folder for code bundles",
                                                                               "~/.cache/pydist/code"))
    code_cache_max: int = field(default=2 << 30, metadata=_meta("CODE_CACHE_MAX", "--code-cache-max",
                                                                "bundle cache size limit, bytes (e.g. 2G)"))
    client_lease: float = field(default=60.0, metadata=_meta("CLIENT_LEASE", "--client-lease",
                                                             "drop a silent client's tasks after this many s"))
    memory_limit: int = field(default=0, metadata=_meta("MEMORY_LIMIT", "--memory-limit",
                                                        "restart a worker whose resident memory exceeds this "
                                                        "(e.g. 2G; its task fails with MemoryLimitExceeded); "
                                                        "0: no limit"))
    threadpool: int = field(default=256, metadata=_meta("THREADPOOL", "--threadpool",
                                                        "Pyro5 server threads (one per open connection)"))
    log_level: str = field(default="INFO", metadata=_meta("LOG_LEVEL", "--log-level", "logging level"))

    # -- limits on what a peer can make the node hold (SECURITY.md lists them all) --------------------
    handshake_timeout: float = field(default=5.0, metadata=_meta(
        "HANDSHAKE_TIMEOUT", "--handshake-timeout", "seconds a new connection has to complete its hello"))
    max_pending_handshakes: int = field(default=256, metadata=_meta(
        "MAX_PENDING_HANDSHAKES", "--max-pending-handshakes",
        "connections waiting for their hello at once (when full, the oldest is dropped)"))
    idle_timeout: float = field(default=600.0, metadata=_meta(
        "IDLE_TIMEOUT", "--idle-timeout", "close an authenticated connection idle this many s (0: never)"))
    refusal_log_interval: float = field(default=10.0, metadata=_meta(
        "REFUSAL_LOG_INTERVAL", "--refusal-log-interval", "seconds between two refusal summary lines"))
    code_max_files: int = field(default=100_000, metadata=_meta(
        "CODE_MAX_FILES", "--code-max-files", "most files one code bundle may hold"))
    max_uploads: int = field(default=16, metadata=_meta(
        "MAX_UPLOADS", "--max-uploads", "code bundle uploads in progress on the node at once"))
    max_uploads_per_client: int = field(default=4, metadata=_meta(
        "MAX_UPLOADS_PER_CLIENT", "--max-uploads-per-client", "uploads in progress per connection"))
    max_client_tasks: int = field(default=200_000, metadata=_meta(
        "MAX_CLIENT_TASKS", "--max-client-tasks", "tasks one client may have queued or running here"))
    max_client_bytes: int = field(default=1 << 30, metadata=_meta(
        "MAX_CLIENT_BYTES", "--max-client-bytes", "bytes of task payloads and functions one client may "
                                                  "have held here (e.g. 1G)"))
    max_queued_tasks: int = field(default=1_000_000, metadata=_meta(
        "MAX_QUEUED_TASKS", "--max-queued-tasks", "tasks the node holds at once, all clients and links"))
    max_queued_bytes: int = field(default=4 << 30, metadata=_meta(
        "MAX_QUEUED_BYTES", "--max-queued-bytes", "bytes of task payloads the node holds at once (e.g. 4G)"))

    # -- secret (never a CLI flag value, never logged) ------------------------------------------------
    secret: Optional[bytes] = field(default=None, repr=False, metadata=_meta("SECRET", None,
                                                                             "cluster secret (env only)"))

    def __post_init__(self) -> None:
        if self.workers is None:
            self.workers = _cpu_count()
        _check_bound(self, ("workers",), 0)
        _check_bound(self, ("max_hops",), 1)
        self.secret = normalize_secret(self.secret)
        if self.secret is None and self.secret_file:
            self.secret = read_secret_file(self.secret_file)
        for name in SIZE_FIELDS:
            setattr(self, name, parse_size(getattr(self, name)))
        _check_bound(self, ("handshake_timeout",), 0, strict=True)
        _check_bound(self, ("idle_timeout", "refusal_log_interval"), 0)
        _check_bound(self, ("max_pending_handshakes", "code_max_files", "max_uploads", "max_uploads_per_client",
                            "max_client_tasks", "max_client_bytes", "max_queued_tasks", "max_queued_bytes"), 1)
        _check_bound(self, ("memory_limit",), 0, unit=" bytes")
        _check_seconds(self, ("heartbeat", "heartbeat_timeout", "client_lease"))
        if not self.name:
            self.name = f"{self.host}-{self.port}" if self.port else f"{self.host}-{os.getpid()}"

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, config_file: Optional[str] = None,
                 **overrides: Any) -> "NodeConfig":
        """Defaults, then the config file's ``[node]`` table, then ``PYDIST_*`` variables, then
        ``overrides`` (those not None)."""
        return cls(**_values_from_env(cls, environ, overrides, config_file))


@dataclass
class ClientConfig:
    """Settings of a ``ClusterExecutor``."""

    connect_timeout: float = field(default=5.0, metadata=_meta("CONNECT_TIMEOUT", None,
                                                               "seconds to find a node before ClusterUnavailable"))
    secret: Optional[bytes] = field(default=None, repr=False, metadata=_meta("SECRET", None, "cluster secret"))
    tls_cert: Optional[str] = field(default=None, metadata=_meta("TLS_CERT", None, "client TLS certificate"))
    tls_key: Optional[str] = field(default=None, metadata=_meta("TLS_KEY", None, "client TLS key"))
    tls_ca: Optional[str] = field(default=None, metadata=_meta("TLS_CA", None, "CA certificate(s) to trust"))
    max_batch: int = field(default=2000, metadata=_meta("MAX_BATCH", None, "most tasks in one submit call"))
    poll_interval: float = field(default=1.0, metadata=_meta("POLL_INTERVAL", None,
                                                             "seconds a result long-poll waits at most"))
    node_timeout: float = field(default=8.0, metadata=_meta("NODE_TIMEOUT", None,
                                                            "seconds the entry node may stay silent before its "
                                                            "futures fail with BrokenCluster (or the client "
                                                            "fails over); a few s over the nodes' heartbeat "
                                                            "timeout (5 s)"))
    shared_memory: bool = field(default=True, metadata=_meta("SHARED_MEMORY", None,
                                                             "large task arguments travel in memfds when "
                                                             "the entry node runs on this machine as this "
                                                             "user (and no failover)"))

    def __post_init__(self) -> None:
        self.secret = normalize_secret(self.secret)
        _check_seconds(self, ("node_timeout",))

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, config_file: Optional[str] = None,
                 **overrides: Any) -> "ClientConfig":
        """Defaults, then the config file's ``[client]`` table, then ``PYDIST_*`` variables, then
        ``overrides`` (those not None)."""
        return cls(**_values_from_env(cls, environ, overrides, config_file))


def normalize_secret(secret) -> Optional[bytes]:
    """A secret as bytes without surrounding white space (a file read with ``open().read()`` keeps
    its newline; ``--secret-file`` strips it: both must give the same secret)."""
    if secret is None:
        return None
    b = secret.encode() if isinstance(secret, str) else bytes(secret)
    b = b.strip()
    if not b:
        raise ConfigError("the cluster secret is empty: use a long random string")
    return b


def _check_bound(cfg: Any, names: Iterable[str], low: float, strict: bool = False, unit: str = "") -> None:
    """ConfigError naming the first of ``names`` whose value is below ``low`` (``strict``: not above it)."""
    for name in names:
        v = getattr(cfg, name)
        if v <= low if strict else v < low:
            raise ConfigError(f"{name} must be {'>' if strict else '>='} {low}{unit}, got {v}")


def _check_seconds(cfg: Any, names: Iterable[str]) -> None:
    """ConfigError naming the first of ``names`` that is not a finite number of seconds > 0."""
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise ConfigError(f"{name} must be a finite number of seconds > 0, got {v!r}")


def read_secret_file(path: str) -> bytes:
    """Read a secret file, refusing an empty one."""
    p = Path(path)
    try:
        data = p.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
    if not data:
        raise ConfigError(f"secret file {path} is empty: put a long random string in it "
                          "(e.g. python -c 'import secrets;print(secrets.token_hex(32))' > FILE)")
    return data


def _convert(value: str, f: dataclasses.Field) -> Any:
    typ = str(f.type)
    if "bool" in typ:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if typ.startswith("list"):
        return [v for v in (s.strip() for s in value.split(",")) if v]
    if "int" in typ and f.name not in SIZE_FIELDS:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{f.metadata['env']}={value!r} is not a whole number") from None
    if "float" in typ:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{f.metadata['env']}={value!r} is not a number") from None
    if "bytes" in typ:
        return value.encode()
    return value


def _values_from_env(cls, environ: Optional[Mapping[str, str]], overrides: dict,
                     config_file: Optional[str] = None) -> dict:
    env_map: Mapping[str, str] = os.environ if environ is None else environ
    values: dict = dict(file_values(cls, find_config_file(config_file, env_map)))
    for f in fields(cls):
        env = f.metadata.get("env")
        if env and ENV_PREFIX + env in env_map:
            values[f.name] = _convert(env_map[ENV_PREFIX + env], f)
    for k, v in overrides.items():
        if v is not None:
            values[k] = v
    return values


# ================================================================================== the config file
CONFIG_NAME = "pydist.toml"
_TABLES = {"NodeConfig": "node", "ClientConfig": "client"}


def load_toml(path: str) -> dict:
    """Parse a TOML file (``tomllib``, or ``tomli`` before Python 3.11); ConfigError naming the file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:   # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot read {path}: not valid TOML: {exc}") from None


def user_config_dir(environ: Optional[Mapping[str, str]] = None) -> str:
    """``$XDG_CONFIG_HOME/pydist`` (default ``~/.config/pydist``)."""
    env_map: Mapping[str, str] = os.environ if environ is None else environ
    base = env_map.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "pydist")


def find_config_file(explicit: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The config file in force: ``explicit`` (``--config``), ``$PYDIST_CONFIG``, ``./pydist.toml``,
    the user's ``pydist.toml``; None when there is none.  A file named explicitly must exist."""
    env_map: Mapping[str, str] = os.environ if environ is None else environ
    named = explicit or env_map.get(ENV_PREFIX + "CONFIG")
    if named:
        if not os.path.isfile(named):
            how = "--config" if explicit else f"{ENV_PREFIX}CONFIG"
            raise ConfigError(f"config file {named} (from {how}) does not exist")
        return named
    for p in (os.path.join(os.getcwd(), CONFIG_NAME), os.path.join(user_config_dir(env_map), CONFIG_NAME)):
        if os.path.isfile(p):
            return p
    return None


def _check_file_value(path: str, table: str, f: dataclasses.Field, v: Any) -> Any:
    typ = str(f.type)
    where = f"{path} [{table}] {f.name}"
    if f.name in SIZE_FIELDS:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ConfigError(f"{where}: expected a size (bytes or e.g. \"2G\"), got {v!r}")
        return v
    if "bool" in typ:
        ok = isinstance(v, bool)
    elif typ.startswith("list"):
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
    elif "int" in typ:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif "float" in typ:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        v = float(v) if ok else v
    else:
        ok = isinstance(v, str)
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(f)}, got {type(v).__name__} {v!r}")
    return v


def file_values(cls, path: Optional[str]) -> dict:
    """The values ``path`` sets for ``cls``, checked: keys at the top of the file apply to every class
    that has such a setting, keys in its table (``[node]`` or ``[client]``) to it alone and win.
    Keys may be written with ``-`` for ``_`` (``heartbeat-timeout``)."""
    if not path:
        return {}
    data = load_toml(path)
    table = _TABLES[cls.__name__]
    all_fields = {f.name for c in (NodeConfig, ClientConfig) for f in fields(c)}
    top: dict = {}
    for k, v in data.items():
        if k in _TABLES.values():
            if not isinstance(v, dict):
                raise ConfigError(f"{path}: [{k}] must be a table")
            continue
        if isinstance(v, dict):
            raise ConfigError(f"{path}: unknown table(s) {[k]}: use [node] and [client]")
        name = k.replace("-", "_")
        if name not in all_fields:
            raise ConfigError(f"{path}: unknown setting {k!r}; known: {', '.join(sorted(all_fields))}")
        top[name] = (k, v)
    by_name = {f.name: f for f in fields(cls)}
    out = {}
    section = {k.replace("-", "_"): (k, v) for k, v in data.get(table, {}).items()}
    for where, items in (("top level", {n: kv for n, kv in top.items() if n in by_name}), (f"[{table}]", section)):
        for name, (k, v) in items.items():
            f = by_name.get(name)
            if f is None:
                raise ConfigError(f"{path} [{table}]: unknown setting {k!r}; known: {', '.join(sorted(by_name))}")
            if name == "secret":
                raise ConfigError(f"{path} {where}: do not put the secret itself in a config file: put it in a "
                                  "file readable only by you and name that file with secret_file")
            out[name] = _check_file_value(path, table if where != "top level" else "top level", f, v)
    return out


def _type_name(f: dataclasses.Field) -> str:
    typ = str(f.type)
    if f.name in ("code_cache_max", "max_message_size"):
        return "size"
    for word, name in (("bool", "bool"), ("list", "list of str"), ("int", "int"), ("float", "float"),
                       ("bytes", "str"), ("str", "str")):
        if word in typ:
            return name
    return typ


def _default_doc(f: dataclasses.Field) -> str:
    if f.metadata.get("default_doc"):
        return str(f.metadata["default_doc"])
    if f.default is not dataclasses.MISSING:
        d = f.default
        if d is None:
            return "-"
        if f.name in ("code_cache_max", "max_message_size") and isinstance(d, int):
            for unit, m in (("G", 1 << 30), ("M", 1 << 20)):
                if d % m == 0:
                    return f"{d // m}{unit}"
        return str(d)
    if f.default_factory is list:   # type: ignore[comparison-overlap]
        return "[]"
    return "computed"


def settings_table() -> str:
    """Every setting as a Markdown table: config file key, CLI flag, environment variable, default."""
    rows = ["| file table | key | CLI flag | environment | default | meaning |",
            "|---|---|---|---|---|---|"]
    for cls in (NodeConfig, ClientConfig):
        table = _TABLES[cls.__name__]
        for f in fields(cls):
            m = f.metadata
            file_key = "-" if f.name == "secret" else f"`{f.name}`"
            flag = f"`{m['flag']}`" if m.get("flag") else "-"
            env = f"`{ENV_PREFIX}{m['env']}`" if m.get("env") else "-"
            rows.append(f"| `[{table}]` | {file_key} | {flag} | {env} | `{_default_doc(f)}` | {m['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
