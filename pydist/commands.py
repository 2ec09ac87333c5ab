"""The ``pydist`` subcommands (status, run, stop, sync-code, make-certs, up, down): one ``_cmd_*(args)``
each, returning the exit code; ``pydist.cli`` parses the arguments and calls them.

::

    pydist COMMAND ... ──▶ cli._parser() ──▶ args.fn(args) here ──▶ security.connect / ClusterExecutor / up
                                                               ◀── exit code; output printed on stdout/stderr
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List

from .config import ENV_PREFIX
from .errors import ConfigError, PydistError

log = logging.getLogger("pydist.cli")

__all__ = ["format_status", "format_tasks"]


def _connect_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    env_ns = os.environ.get(ENV_PREFIX + "NS")
    g.add_argument("--ns", default=env_ns, metavar="HOST[:PORT]",
                   help=f"name server to find the cluster's root node in (port 9090 if left out) "
                        f"[env {ENV_PREFIX}NS; now: {env_ns or 'unset'}]")
    g.add_argument("--node", metavar="HOST:PORT", help="a node's host:port or Pyro5 URI (instead of --ns)")
    p.add_argument("--secret-file", default=os.environ.get(ENV_PREFIX + "SECRET_FILE"), metavar="FILE",
                   help=f"file holding the cluster secret (default: {ENV_PREFIX}SECRET, else none) "
                        f"[env {ENV_PREFIX}SECRET_FILE]")
    p.add_argument("--tls-cert", metavar="PEM", help="client TLS certificate (default: no TLS)")
    p.add_argument("--tls-key", metavar="PEM", help="client TLS private key (default: none)")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate(s) to trust (default: none)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for the cluster to answer (default: %(default)s)")


def _secret_tls(a):
    from . import security

    secret = security.load_secret(None, a.secret_file)
    tls = None
    if a.tls_ca or a.tls_cert:
        tls = security.TLSSettings(cert=a.tls_cert, key=a.tls_key, ca=a.tls_ca)
    security.configure_pyro(tls=tls)
    return secret, tls


def _root_uri(a, secret, tls) -> str:
    if a.node:
        return a.node
    if not a.ns:
        raise ConfigError(f"say where the cluster is: --ns HOST:PORT or --node HOST:PORT (or set {ENV_PREFIX}NS)")
    from .client import Entries
    from .config import ClientConfig

    return Entries(ClientConfig(secret=secret, connect_timeout=a.timeout), tls, ns=a.ns).find_first()


def _probe(uri: str, secret, tls, timeout: float) -> str:
    """Connect to ``uri`` once, so that a wrong secret or a dead address is reported as such (raises the
    pydist error naming the cause); returns the node's name."""
    from . import security

    p = security.connect(uri, secret=secret, timeout=timeout, tls=tls, call_timeout=max(timeout, 5.0))
    try:
        return p.pydist_peer_name
    finally:
        security.release(p)


def format_status(nodes: List[dict]) -> str:
    """The tree as a table: node, address, parent, workers busy/total, queued, running, done, failed, CPU, mem.
    A parent the node has lost its link to is shown as ``NAME(lost)``."""
    cols = ("node", "address", "parent", "workers", "queued", "running", "done", "failed", "cpu%", "mem%")
    rows = []
    for st in nodes:
        parent = st.get("parent") or "-"
        if parent != "-" and any(l.get("role") == "parent" and l.get("name") == parent and not l.get("alive")
                                 for l in st.get("links", ())):
            parent += "(lost)"
        rows.append((st["name"], st["address"], parent, f"{st['busy']}/{st['workers']}",
                     str(st["queued"]), str(st["running"]), str(st["done"]),
                     str(st["failed"]), f"{st['cpu_percent']:.0f}", f"{st['mem_percent']:.0f}"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def format_tasks(nodes: List[dict], lines: int = 3) -> str:
    """Running tasks of every node (function, node, worker, age) and their last output lines."""
    out = []
    for st in nodes:
        for t in st.get("tasks", ()):
            out.append(f"{st['name']}  worker {t.get('worker')}  {t.get('id')}  {t.get('function') or '?'}  "
                       f"{t.get('age', 0.0):.1f} s")
            for ln in (t.get("output") or [])[-lines:]:
                out.append(f"    | {ln}")
    return "\n".join(out) if out else "(no task running)"


def _cmd_status(a) -> int:
    from .upload import _walk_nodes

    secret, tls = _secret_tls(a)
    uri = _root_uri(a, secret, tls)
    _probe(uri, secret, tls, a.timeout)
    while True:
        nodes = _walk_nodes(uri, secret, tls)
        if not nodes:
            _probe(uri, secret, tls, a.timeout)   # say why (it answered a moment ago)
            print(f"pydist status: no node answers at {uri}", file=sys.stderr)
            return 1
        if a.json:
            print(json.dumps({"nodes": nodes}, indent=2, default=str))
        else:
            if a.watch:
                print("\033[2J\033[H", end="")
            print(format_status(nodes))
            if a.tasks:
                print()
                print(format_tasks(nodes))
        if not a.watch:
            return 0
        sys.stdout.flush()
        time.sleep(a.interval)


def _cmd_run(a) -> int:
    from .executor import ClusterExecutor
    from .scripts import ScriptTimeout

    if not os.path.isfile(a.script):
        why = "no such file" if not os.path.exists(a.script) else "not a file"
        raise ConfigError(f"cannot read script {a.script}: {why}")
    secret, tls = _secret_tls(a)
    kw = {"ns": a.ns} if a.ns and not a.node else {}
    if not a.ns and not a.node:
        print(f"pydist run: no --ns or --node given (nor {ENV_PREFIX}NS): running {a.script} on a private "
              "local cluster on this machine", file=sys.stderr)
    with ClusterExecutor(address=a.node if a.node else None, secret=secret, connect_timeout=a.timeout, **kw) as ex:
        try:
            r = ex.submit_script(a.script, a.args, timeout=a.script_timeout, code=a.code).result()
        except ScriptTimeout as exc:
            sys.stdout.write(exc.stdout)
            sys.stderr.write(exc.stderr)
            sys.stdout.flush()
            print(f"pydist run: {exc} (its output so far is above)", file=sys.stderr)
            return 124
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    sys.stdout.flush()
    print(f"pydist run: {os.path.basename(a.script)} ran on node {r.node}, exit code {r.returncode}",
          file=sys.stderr)
    return r.returncode


def _tree_order(nodes: List[dict], root: str) -> List[List[dict]]:
    """Nodes by depth below ``root`` (through child and peer links), deepest level first; nodes not reached
    from the root (orphans listed only in the name server) come first of all."""
    by_name = {st["name"]: st for st in nodes}
    depth = {root: 0}
    todo = [root]
    while todo:
        n = todo.pop(0)
        for l in by_name.get(n, {}).get("links", ()):
            if l.get("role") in ("child", "peer") and l["name"] in by_name and l["name"] not in depth:
                depth[l["name"]] = depth[n] + 1
                todo.append(l["name"])
    top = max(depth.values(), default=0) + 1
    levels: Dict[int, List[dict]] = {}
    for st in nodes:
        levels.setdefault(depth.get(st["name"], top), []).append(st)
    return [levels[d] for d in sorted(levels, reverse=True)]


def _ns_nodes(ns: str, secret, tls) -> List[dict]:
    """Statuses of the nodes registered in a name server (those that answer)."""
    import Pyro5.api

    from . import diagnose, security

    host, port = diagnose.parse_ns(ns)
    try:
        with Pyro5.api.locate_ns(host, port) as nsp:
            uris = [str(u) for u in nsp.list(prefix=diagnose.NS_PREFIX).values()]
    except Exception as exc:
        log.debug("listing %s failed: %s", ns, exc)
        return []
    out = []
    for u in uris:
        try:
            p = security.connect(u, secret=secret, timeout=1.0, tls=tls, call_timeout=5.0)
            try:
                out.append(p.status())
            finally:
                security.release(p)
        except Exception as exc:
            log.debug("status of %s failed: %s", u, exc)
    return out


def _gone(uri: str, secret, tls) -> bool:
    from . import security

    try:
        security.release(security.connect(uri, secret=secret, timeout=0.2, tls=tls))
        return False
    except Exception:
        return True


def _cmd_stop(a) -> int:
    from . import security
    from .upload import _walk_nodes

    secret, tls = _secret_tls(a)
    uri = _root_uri(a, secret, tls)
    root = _probe(uri, secret, tls, a.timeout)
    whole = a.all or (a.ns and not a.node)
    if whole:
        nodes = {st["name"]: st for st in _walk_nodes(uri, secret, tls)}
        if a.ns:
            for st in _ns_nodes(a.ns, secret, tls):
                nodes.setdefault(st["name"], st)
        levels = _tree_order(list(nodes.values()), root)
    else:
        p = security.connect(uri, secret=secret, timeout=a.timeout, tls=tls)
        try:
            levels = [[p.status()]]
        finally:
            security.release(p)
    stopped = []
    for level in levels:   # children first: a parent never sees a child's link break as a fault
        for st in level:
            try:
                p = security.connect(st["uri"], secret=secret, timeout=a.timeout, tls=tls, call_timeout=5.0)
                try:
                    p.shutdown()
                finally:
                    security.release(p)
            except PydistError as exc:
                print(f"pydist stop: could not stop node {st['name']}: {exc}", file=sys.stderr)
                continue
            print(f"stopping node {st['name']}")
            stopped.append(st)
        deadline = time.monotonic() + max(a.timeout, 10.0)
        for st in level:
            while not _gone(st["uri"], secret, tls) and time.monotonic() < deadline:
                time.sleep(0.05)
    if whole:
        print(f"stopped {len(stopped)} nodes")
    return 0 if stopped else 1


def _cmd_sync(a) -> int:
    from . import codesync
    from .upload import _upload_bundle

    secret, tls = _secret_tls(a)
    uri = _root_uri(a, secret, tls)
    _probe(uri, secret, tls, a.timeout)
    if a.pin and a.unpin:
        raise ConfigError("--pin and --unpin exclude each other")
    if a.unpin:
        return _unpin(a, uri, secret, tls)
    info, data = codesync.build_bundle(a.paths, exclude=a.exclude or ())
    t0 = time.monotonic()
    names = _upload_bundle(uri, secret, tls, info, data, a.upload_timeout)
    if not names:
        _probe(uri, secret, tls, a.timeout)
        print(f"pydist sync-code: no node took the bundle: none answered at {uri}", file=sys.stderr)
        return 1
    print(f"{info} on {len(names)} nodes ({', '.join(names)}) in {time.monotonic() - t0:.2f} s")
    print(f"digest {info.digest}")
    if a.pin:
        names = _pin_everywhere(uri, secret, tls, info.digest, True)
        print(f"pinned {info.digest} on {len(names)} nodes: every task imports it until "
              f"'pydist sync-code --unpin {info.digest[:12]}...'")
    return 0


def _pin_everywhere(uri: str, secret, tls, digest: str, pinned: bool) -> List[str]:
    from . import security
    from .upload import _walk_nodes

    names = []
    for st in _walk_nodes(uri, secret, tls):
        p = security.connect(st["uri"], secret=secret, timeout=5.0, tls=tls)
        try:
            p.code_pin(digest, pinned)
        finally:
            p._pyroRelease()
        names.append(st["name"])
    return names


def _unpin(a, uri: str, secret, tls) -> int:
    import re

    from . import codesync

    if len(a.paths) == 1 and re.fullmatch(r"[0-9a-f]{64}", a.paths[0]) and not os.path.exists(a.paths[0]):
        digest = a.paths[0]
    else:
        digest = codesync.build_bundle(a.paths, exclude=a.exclude or ())[0].digest
    names = _pin_everywhere(uri, secret, tls, digest, False)
    print(f"unpinned {digest} on {len(names)} nodes ({', '.join(names)})")
    return 0


def _cmd_certs(a) -> int:
    from . import security

    paths = security.make_certs(a.dir, hosts=a.host or ("127.0.0.1", "localhost"), names=a.name or ("node",))
    for k, v in sorted(paths.items()):
        print(f"{k}: {v}")
    return 0


def _cmd_up(a) -> int:
    from . import up

    spec = up.load_spec(a.file)
    res = up.up(spec, secret_file=a.secret_file, report=print, check=not a.no_version_check)
    print(f"cluster {spec.name} is up: {len(res.nodes)} nodes, name server {res.ns}, root {res.root}")
    print(up.format_tree(res.statuses))
    print(format_status(res.statuses))
    print(f"connect with: ClusterExecutor(ns=\"{res.ns}\", secret=open(\"{res.secret_file}\").read()) "
          f"or: pydist status --ns {res.ns} --secret-file {res.secret_file}")
    return 0


def _cmd_down(a) -> int:
    from . import up

    spec = up.load_spec(a.file)
    out = up.down(spec, report=print)
    return 1 if any(isinstance(v, BaseException) for v in out.values()) else 0
