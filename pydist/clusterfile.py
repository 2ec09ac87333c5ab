"""The cluster file of ``pydist up`` / ``pydist down``: ``load_spec(path)`` -> ``ClusterSpec``.

::

    cluster.toml ──config.load_toml──▶ dict ──load_spec (every key typed and checked)──▶ ClusterSpec
                                                                                         hosts: [HostSpec]
                                                  _levels(spec) ──▶ waves: root, its children, theirs...

The file (``ConfigError`` naming the key for anything wrong)::

    [cluster]
    name = "lab"                      # default: the file's stem
    ns = "192.0.2.1:9090"              # name server; its host must be one of the hosts (default: first)
    python = "python3"                # default Python on the hosts
    secret_file = "~/.config/pydist/lab.secret"   # made (random, 0600) if missing
    remote_dir = "~/.cache/pydist/up/lab"         # pid, log and secret files on the hosts
    ssh_options = ["-o", "IdentitiesOnly=yes"]
    node_args = ["--heartbeat", "1"]  # extra pydist-node flags for every node
    start_timeout = 60

    [[hosts]]
    address = "192.0.2.1"              # what the node binds and advertises, and where ssh connects
    user = "me"                       # ssh user (or ssh_user, or address = "me@192.0.2.1"; default: ssh's)
    ssh_port = 22
    ssh_key = "~/.ssh/id_lab"         # ssh -i (also in [cluster]); ssh_options = [...] per host too
    workers = 8                       # default: the host's CPU count
    python = "/opt/py311/bin/python"
    name = "head"                     # default: the address
    port = 0                          # node port; 0 picks a free one
    parent = "head"                   # a host's name or address; default: the first host (the root)
    args = []                         # extra pydist-node flags for this node
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError

__all__ = ["ClusterSpec", "HostSpec", "load_spec"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


@dataclass
class HostSpec:
    """One ``[[hosts]]`` entry: a node to start over ssh."""

    address: str
    name: str
    user: Optional[str] = None
    ssh_port: int = 22
    workers: Optional[int] = None
    python: str = "python3"
    port: int = 0
    parent: Optional[str] = None
    args: list = field(default_factory=list)
    ssh_options: list = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"{self.user}@{self.address}" if self.user else self.address


@dataclass
class ClusterSpec:
    """A parsed ``cluster.toml``."""

    name: str
    hosts: list
    ns_host: str
    ns_port: int = 9090
    python: str = "python3"
    secret_file: str = ""
    remote_dir: str = ""
    ssh_options: list = field(default_factory=list)
    node_args: list = field(default_factory=list)
    start_timeout: float = 60.0

    def host(self, key: str) -> HostSpec:
        for h in self.hosts:
            if key in (h.name, h.address):
                return h
        raise ConfigError(f"cluster {self.name}: no host named {key!r}")

    @property
    def root(self) -> HostSpec:
        return self.hosts[0]

    @property
    def ns_address(self) -> str:
        return f"{self.ns_host}:{self.ns_port}"


def _typed(table: dict, key: str, typ: Any, where: str, default: Any = None) -> Any:
    if key not in table:
        return default
    v = table[key]
    ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if not ok:
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{where}: {key} must be {name}, got {type(v).__name__} {v!r}")
    return v


def _str_list(table: dict, key: str, where: str) -> list:
    v = _typed(table, key, list, where, [])
    if not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{where}: {key} must be a list of strings")
    return list(v)


def load_spec(path: str) -> ClusterSpec:
    """Read and check a cluster file (``ConfigError`` naming the file, the entry and the key)."""
    from .config import load_toml

    data = load_toml(path)
    where = os.fspath(path)
    known = {"cluster", "hosts", "host"}
    extra = set(data) - known
    if extra:
        raise ConfigError(f"{where}: unknown table(s) {sorted(extra)}; expected [cluster] and [[hosts]]")
    c = data.get("cluster", {})
    if not isinstance(c, dict):
        raise ConfigError(f"{where}: [cluster] must be a table")
    ckeys = {"name", "ns", "python", "secret_file", "remote_dir", "ssh_options", "ssh_key", "node_args",
             "start_timeout"}
    if set(c) - ckeys:
        raise ConfigError(f"{where} [cluster]: unknown key(s) {sorted(set(c) - ckeys)}")
    name = _typed(c, "name", str, f"{where} [cluster]", os.path.splitext(os.path.basename(where))[0])
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where} [cluster]: name {name!r} may hold only letters, digits and _.:-")
    python = _typed(c, "python", str, f"{where} [cluster]", "python3")
    if "host" in data and "hosts" not in data:   # [[host]] reads as well as [[hosts]]
        data["hosts"] = data.pop("host")
    hosts_raw = data.get("hosts")
    if not isinstance(hosts_raw, list) or not hosts_raw:
        raise ConfigError(f"{where}: no [[hosts]] entries: list at least one host")
    hkeys = {"address", "user", "ssh_user", "ssh_port", "ssh_key", "ssh_options", "workers", "python", "name",
             "port", "parent", "args"}
    hosts = []
    for i, h in enumerate(hosts_raw):
        hw = f"{where} [[hosts]] #{i + 1}"
        if not isinstance(h, dict):
            raise ConfigError(f"{hw}: must be a table")
        if set(h) - hkeys:
            raise ConfigError(f"{hw}: unknown key(s) {sorted(set(h) - hkeys)}")
        addr = _typed(h, "address", str, hw)
        if not addr:
            raise ConfigError(f"{hw}: address is missing (the host's IP or name)")
        user = _typed(h, "user", str, hw) or _typed(h, "ssh_user", str, hw)
        if "@" in addr:   # "me@192.0.2.1"
            user, addr = addr.rsplit("@", 1)
        hw = f"{where} host {addr}"
        workers = _typed(h, "workers", int, hw)
        if workers is not None and workers < 0:
            raise ConfigError(f"{hw}: workers must be >= 0, got {workers}")
        ssh_port = _typed(h, "ssh_port", int, hw, 22)
        port = _typed(h, "port", int, hw, 0)
        for k, v in (("ssh_port", ssh_port), ("port", port)):
            if not 0 <= v <= 65535:
                raise ConfigError(f"{hw}: {k} {v} is not a port number")
        hname = _typed(h, "name", str, hw, addr)
        if not _NAME_RE.match(hname):
            raise ConfigError(f"{hw}: name {hname!r} may hold only letters, digits and _.:-")
        opts = _str_list(h, "ssh_options", hw)
        key = _typed(h, "ssh_key", str, hw)
        if key:
            opts = ["-i", os.path.expanduser(key)] + opts
        hosts.append(HostSpec(address=addr, name=hname, user=user, ssh_options=opts,
                              ssh_port=ssh_port, workers=workers, python=_typed(h, "python", str, hw, python),
                              port=port, parent=_typed(h, "parent", str, hw), args=_str_list(h, "args", hw)))
    names = [h.name for h in hosts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: host names must be unique; repeated: {dup} (give each a name = ...)")
    ns = _typed(c, "ns", str, f"{where} [cluster]", f"{hosts[0].address}:9090")
    ns_host, _, ns_port = ns.rpartition(":")
    if not ns_host or not ns_port.isdigit():
        raise ConfigError(f"{where} [cluster]: ns must be HOST:PORT, got {ns!r}")
    spec = ClusterSpec(
        name=name, hosts=hosts, ns_host=ns_host, ns_port=int(ns_port), python=python,
        secret_file=os.path.expanduser(_typed(c, "secret_file", str, f"{where} [cluster]",
                                              f"~/.config/pydist/clusters/{name}.secret")),
        remote_dir=_typed(c, "remote_dir", str, f"{where} [cluster]", f"~/.cache/pydist/up/{name}"),
        ssh_options=(["-i", os.path.expanduser(_typed(c, "ssh_key", str, f"{where} [cluster]"))]
                     if c.get("ssh_key") else []) + _str_list(c, "ssh_options", f"{where} [cluster]"),
        node_args=_str_list(c, "node_args", f"{where} [cluster]"),
        start_timeout=_typed(c, "start_timeout", float, f"{where} [cluster]", 60.0))
    if not any(h.address == ns_host for h in hosts):
        raise ConfigError(f"{where} [cluster]: the name server host {ns_host} is not one of the hosts "
                          f"({', '.join(h.address for h in hosts)}): it is started over ssh on one of them")
    for h in hosts[1:]:
        if h.parent is None:
            h.parent = hosts[0].name
    if hosts[0].parent is not None:
        raise ConfigError(f"{where} host {hosts[0].address}: the first host is the root: it has no parent")
    for h in hosts[1:]:
        p = spec.host(h.parent or hosts[0].name)   # ConfigError if unknown
        if p is h:
            raise ConfigError(f"{where} host {h.name}: a node cannot be its own parent")
        h.parent = p.name
    _levels(spec)   # refuses cycles
    return spec


def _levels(spec: ClusterSpec) -> list:
    """Hosts in waves: the root, then its children, then theirs (ConfigError on a cycle)."""
    depth: dict = {spec.root.name: 0}

    def depth_of(h: HostSpec, path: tuple) -> int:
        if h.name in depth:
            return depth[h.name]
        if h.name in path:
            raise ConfigError(f"cluster {spec.name}: parents form a cycle: {' -> '.join(path + (h.name,))}")
        d = depth_of(spec.host(h.parent or spec.root.name), path + (h.name,)) + 1
        depth[h.name] = d
        return d

    for h in spec.hosts:
        depth_of(h, ())
    waves: list = []
    for h in spec.hosts:
        while len(waves) <= depth[h.name]:
            waves.append([])
        waves[depth[h.name]].append(h)
    return waves
