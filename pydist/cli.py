"""Command line: ``pydist-node`` (run a node) and ``pydist`` (status, run a script, stop, sync code, certs).

Every ``pydist-node`` flag comes from the one settings table in ``config.NodeConfig`` and can also be
set with the ``PYDIST_*`` environment variable named there.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import List, Optional

from .config import ENV_PREFIX, SIZE_FIELDS, NodeConfig
from .errors import ConfigError, PydistError

log = logging.getLogger("pydist.cli")


def _node_parser(prog: str = "pydist-node") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run a pydist node: a Pyro5 object that runs tasks "
                                "on its worker processes and passes work to its children.")
    for f in dataclasses.fields(NodeConfig):
        flag = f.metadata.get("flag")
        if not flag:
            continue
        env = f.metadata.get("env")
        help_ = f"{f.metadata['help']} (env {ENV_PREFIX}{env})"
        typ = str(f.type)
        if "bool" in typ:
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_)
        elif typ.startswith("list"):
            p.add_argument(flag, dest=f.name, action="append", default=None, help=help_)
        elif f.name in SIZE_FIELDS:
            p.add_argument(flag, dest=f.name, default=None, help=help_)
        elif "int" in typ:
            p.add_argument(flag, dest=f.name, type=int, default=None, help=help_)
        elif "float" in typ:
            p.add_argument(flag, dest=f.name, type=float, default=None, help=help_)
        else:
            p.add_argument(flag, dest=f.name, default=None, help=help_)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML config file ([node] table; default ./pydist.toml or ~/.config/pydist/pydist.toml)")
    p.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)
    return p


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_main(argv: Optional[List[str]] = None) -> None:
    """``pydist-node``: run one node until SIGTERM/SIGINT."""
    args = _node_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("watch_stdin", "config")}
    try:
        from . import security

        cfg = NodeConfig.from_env(config_file=args.config, **overrides)
        if cfg.secret is None:
            cfg.secret = security.load_secret(None, cfg.secret_file, user_default=False)
        explicit = cfg.secret is not None
        if not explicit and not cfg.insecure and _is_loopback(cfg.host):
            # no secret given: this user's secret (a 0600 file), found by this user's clients, nobody else's
            cfg.secret = security.user_secret(create=True)
    except ConfigError as exc:
        sys.exit(f"pydist-node: {exc}")
    logging.basicConfig(level=getattr(logging, str(cfg.log_level).upper(), logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s {cfg.name} %(name)s %(levelname)s: %(message)s")
    if not explicit:
        if not _is_loopback(cfg.host) and not cfg.insecure:
            sys.exit(f"pydist-node: refusing to listen on {cfg.host} without a cluster secret: anyone who can "
                     "reach the port could run code. Set PYDIST_SECRET or --secret-file FILE on every node "
                     "and client (or pass --insecure on a network you fully trust).")
        if cfg.insecure:
            log.warning("INSECURE: no cluster secret (--insecure): every user of this machine%s can run any "
                        "code as this user through %s", "" if _is_loopback(cfg.host) else
                        " and anyone who reaches the port", cfg.host)
        else:
            log.info("no cluster secret given: using this user's secret %s (clients of this user find it; "
                     "other users are refused)", security.user_secret_path())
    if args.watch_stdin:
        from .cluster import watch_stdin

        watch_stdin()

    from .node import serve

    state = {}

    def on_ready(node) -> None:
        state["node"] = node
        sys.stdout.write(f"READY {node.name} {node.address}\n")
        sys.stdout.flush()
        log.info("node %s ready at %s with %d workers", node.name, node.address, cfg.workers)

    def stop(signum, frame) -> None:
        node = state.get("node")
        if node is not None:
            threading.Thread(target=node.shutdown, daemon=True).start()
        else:
            os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        serve(cfg, on_ready)
    except PydistError as exc:
        sys.exit(f"pydist-node: {exc}")
    except OSError as exc:
        sys.exit(f"pydist-node: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}")


# ================================================================================================ pydist
def _connect_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ns", default=os.environ.get(ENV_PREFIX + "NS"), help="name server host:port")
    g.add_argument("--node", help="a node's host:port or Pyro5 URI")
    p.add_argument("--secret-file", default=os.environ.get(ENV_PREFIX + "SECRET_FILE"))
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca")
    p.add_argument("--timeout", type=float, default=5.0)


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
        raise ConfigError("say where the cluster is: --ns HOST:PORT or --node HOST:PORT")
    from .executor import ClusterExecutor

    finder = ClusterExecutor.__new__(ClusterExecutor)
    from .config import ClientConfig

    finder._cfg = ClientConfig(secret=secret, connect_timeout=a.timeout)
    finder._tls = tls
    return finder._find_root(a.ns)


def format_status(nodes: List[dict]) -> str:
    """The tree as a table: node, address, parent, workers busy/total, queued, running, done, failed, CPU, mem."""
    cols = ("node", "address", "parent", "workers", "queued", "running", "done", "failed", "cpu%", "mem%")
    rows = []
    for st in nodes:
        rows.append((st["name"], st["address"], st.get("parent") or "-", f"{st['busy']}/{st['workers']}",
                     str(st["queued"]), str(st["running"]), str(st["done"]),
                     str(st["failed"]), f"{st['cpu_percent']:.0f}", f"{st['mem_percent']:.0f}"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _cmd_status(a) -> int:
    from .executor import _walk_nodes

    secret, tls = _secret_tls(a)
    uri = _root_uri(a, secret, tls)
    while True:
        nodes = _walk_nodes(uri, secret, tls)
        if not nodes:
            print(f"pydist status: no node answers at {uri}", file=sys.stderr)
            return 1
        if a.json:
            print(json.dumps({"nodes": nodes}, indent=2, default=str))
        else:
            if a.watch:
                print("\033[2J\033[H", end="")
            print(format_status(nodes))
        if not a.watch:
            return 0
        sys.stdout.flush()
        time.sleep(a.interval)


def _cmd_run(a) -> int:
    from .executor import ClusterExecutor

    secret, tls = _secret_tls(a)
    kw = {"ns": a.ns} if a.ns else {}
    with ClusterExecutor(address=a.node if a.node else None, secret=secret, connect_timeout=a.timeout, **kw) as ex:
        r = ex.submit_script(a.script, a.args, timeout=a.script_timeout, code=a.code).result()
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.returncode


def _cmd_stop(a) -> int:
    from . import security

    secret, tls = _secret_tls(a)
    uri = _root_uri(a, secret, tls)
    p = security.connect(uri, secret=secret, timeout=a.timeout, tls=tls)
    name = p.status()["name"]
    p.shutdown()
    p._pyroRelease()
    print(f"stopping node {name}")
    return 0


def _cmd_sync(a) -> int:
    from . import codesync
    from .executor import _upload_bundle

    secret, tls = _secret_tls(a)
    uri = _root_uri(a, secret, tls)
    if a.pin and a.unpin:
        raise ConfigError("--pin and --unpin exclude each other")
    if a.unpin:
        return _unpin(a, uri, secret, tls)
    info, data = codesync.build_bundle(a.paths, exclude=a.exclude or ())
    t0 = time.monotonic()
    names = _upload_bundle(uri, secret, tls, info, data, a.upload_timeout)
    print(f"{info} on {len(names)} nodes ({', '.join(names)}) in {time.monotonic() - t0:.2f} s")
    print(f"digest {info.digest}")
    if a.pin:
        names = _pin_everywhere(uri, secret, tls, info.digest, True)
        print(f"pinned {info.digest} on {len(names)} nodes: every task imports it until "
              f"'pydist sync-code --unpin {info.digest[:12]}...'")
    return 0


def _pin_everywhere(uri: str, secret, tls, digest: str, pinned: bool) -> List[str]:
    from . import security
    from .executor import _walk_nodes

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
    print(format_status(res.statuses))
    print(f"connect with: ClusterExecutor(ns=\"{res.ns}\", secret=open(\"{res.secret_file}\").read()) "
          f"or: pydist status --ns {res.ns} --secret-file {res.secret_file}")
    return 0


def _cmd_down(a) -> int:
    from . import up

    spec = up.load_spec(a.file)
    out = up.down(spec, report=print)
    return 1 if any(isinstance(v, BaseException) for v in out.values()) else 0


def main(argv: Optional[List[str]] = None) -> int:
    """``pydist``: cluster tools."""
    p = argparse.ArgumentParser(prog="pydist", description="pydist cluster tools")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML config file (same as PYDIST_CONFIG=FILE; default ./pydist.toml or "
                        "~/.config/pydist/pydist.toml)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("up", help="start a whole cluster over ssh from a cluster.toml")
    s.add_argument("file")
    s.add_argument("--secret-file", default=None, help="the cluster secret (default: the file's secret_file)")
    s.add_argument("--no-version-check", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(fn=_cmd_up)
    s = sub.add_parser("down", help="stop every node and the name server of a cluster.toml")
    s.add_argument("file")
    s.set_defaults(fn=_cmd_down)
    s = sub.add_parser("status", help="the tree of nodes: workers, load, queues")
    _connect_args(s)
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true")
    s.add_argument("--interval", type=float, default=2.0)
    s.set_defaults(fn=_cmd_status)
    s = sub.add_parser("run", help="run a Python script on the cluster and print its output")
    _connect_args(s)
    s.add_argument("script")
    s.add_argument("args", nargs=argparse.REMAINDER)
    s.add_argument("--script-timeout", type=float, default=None)
    s.add_argument("--code", action="append", help="code path the script imports (repeatable)")
    s.set_defaults(fn=_cmd_run)
    s = sub.add_parser("stop", help="stop a node")
    _connect_args(s)
    s.set_defaults(fn=_cmd_stop)
    s = sub.add_parser("sync-code", help="upload a code directory to every node")
    _connect_args(s)
    s.add_argument("paths", nargs="+")
    s.add_argument("--exclude", action="append")
    s.add_argument("--upload-timeout", type=float, default=300.0)
    s.add_argument("--pin", action="store_true",
                   help="make the bundle importable by every task of the cluster until --unpin")
    s.add_argument("--unpin", action="store_true",
                   help="undo --pin (give the same paths, or the bundle's digest)")
    s.set_defaults(fn=_cmd_sync)
    s = sub.add_parser("make-certs", help="write a CA and node certificates for a test cluster")
    s.add_argument("dir")
    s.add_argument("--host", action="append", help="host name or IP for the certificates (repeatable)")
    s.add_argument("--name", action="append", help="certificate name (repeatable; default: node)")
    s.set_defaults(fn=_cmd_certs)
    s = sub.add_parser("node", help="run a node (same as pydist-node)", add_help=False)
    s.set_defaults(fn=None)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "node":
        node_main(argv[1:])
        return 0
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if a.config:
        if not os.path.isfile(a.config):
            print(f"pydist: config file {a.config} (from --config) does not exist", file=sys.stderr)
            return 2
        os.environ[ENV_PREFIX + "CONFIG"] = a.config   # every ClientConfig of this process reads it
    try:
        return a.fn(a)
    except PydistError as exc:
        print(f"pydist {a.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        node_main(sys.argv[2:])
    else:
        sys.exit(main())
