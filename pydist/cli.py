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
from typing import Dict, List, Optional

from .config import ENV_PREFIX, SIZE_FIELDS, NodeConfig
from .errors import ConfigError, PydistError

log = logging.getLogger("pydist.cli")


def _node_parser(prog: str = "pydist-node") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run a pydist node: a Pyro5 object that runs tasks "
                                "on its worker processes and passes work to its children.  Every flag can "
                                f"also be set as an environment variable ({ENV_PREFIX}...); the cluster secret "
                                f"comes from {ENV_PREFIX}SECRET or --secret-file.")
    for f in dataclasses.fields(NodeConfig):
        flag = f.metadata.get("flag")
        if not flag:
            continue
        env = f.metadata.get("env")
        help_ = f.metadata["help"]
        if "default" not in help_:
            help_ += f" ({_default_text(f)})"
        help_ += f" [env {ENV_PREFIX}{env}]"
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


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:   # type: ignore[misc]
        d = f.default_factory()                          # type: ignore[misc]
        return f"default: {d}" if d else "default: none"
    d = f.default
    if d is None or d is False:
        return "default: off" if "bool" in str(f.type) else "default: none"
    if f.name in ("code_cache_max", "max_message_size") and isinstance(d, int):
        return f"default: {_size_text(d)}"
    return f"default: {d}"


def _size_text(n: int) -> str:
    for suffix, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % m == 0:
            return f"{n // m}{suffix}"
    return str(n)


def _is_name(target: str) -> bool:
    """A --parent/--peer value that must be looked up in the name server (not host:port, not a URI)."""
    t = target.strip()
    return not t.upper().startswith("PYRO") and ":" not in t


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_main(argv: Optional[List[str]] = None) -> None:
    """``pydist-node``: run one node until SIGTERM/SIGINT (or ``pydist stop``)."""
    args = _node_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("watch_stdin", "config")}
    try:
        from . import diagnose, security

        cfg = NodeConfig.from_env(config_file=args.config, **overrides)
        if cfg.secret is None:
            cfg.secret = security.load_secret(None, cfg.secret_file, user_default=False)
        explicit = cfg.secret is not None
        if not explicit and not cfg.insecure and _is_loopback(cfg.host):
            # no secret given: this user's secret (a 0600 file), found by this user's clients, nobody else's
            cfg.secret = security.user_secret(create=True)
        for flag, targets in (("--parent", [cfg.parent] if cfg.parent else []), ("--peer", cfg.peers)):
            for t in targets:
                if _is_name(t) and not cfg.ns:
                    raise ConfigError(f"{flag} {t} is a node name, which is looked up in a name server: give "
                                      f"--ns HOST:PORT too (or {flag} HOST:PORT of the node)")
        if cfg.ns:
            diagnose.parse_ns(cfg.ns)
        if cfg.dashboard is not None and not 0 <= cfg.dashboard < 65536:
            raise ConfigError(f"--dashboard {cfg.dashboard}: a port from 0 (any free one) to 65535")
    except ConfigError as exc:
        sys.exit(f"pydist-node: {exc}")
    os.environ.pop("PYDIST_SECRET", None)     # read once: nothing this node starts inherits it
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
    try:
        diagnose.advertise_host(cfg.host, cfg.advertise)
    except ConfigError as exc:
        sys.exit(f"pydist-node: {exc}")
    if args.watch_stdin:
        from .cluster import watch_stdin

        watch_stdin()

    from .node import serve

    state = {}

    def on_ready(node) -> None:
        state["node"] = node
        if cfg.dashboard is not None:
            from .dashboard import start_for_node

            try:
                state["dashboard"] = start_for_node(node, cfg.dashboard)
                sys.stdout.write(f"DASHBOARD {node.dashboard_url}\n")   # before READY: readers see both
            except OSError as exc:
                log.error("cannot serve the dashboard on %s:%s: %s", cfg.host, cfg.dashboard, exc.strerror or exc)
        sys.stdout.write(f"READY {node.name} {node.address}\n")
        sys.stdout.flush()
        log.info("node %s ready at %s with %d workers", node.name, node.address, cfg.workers)

    def stop(signum, frame) -> None:
        node = state.get("node")
        if node is not None:
            if state.get("signalled"):
                return   # already stopping
            state["signalled"] = True
            log.info("received %s", signal.Signals(signum).name)
            threading.Thread(target=stop_and_exit, args=(node,), daemon=True).start()
        else:
            os._exit(0)

    def stop_and_exit(node) -> None:
        # workers, links and the name-server entry; then exit at once: closing the Pyro5 daemon (its
        # thread pool) and the dashboard's server only sleeps (~0.3 s of a LocalCluster's stop, #15);
        # the OS closes their sockets
        if not node.stopping.is_set():
            log.info("stopping node %s", node.name)
        node.stop()
        log.info("node %s stopped", cfg.name)
        logging.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        serve(cfg, on_ready)
    except PydistError as exc:
        sys.exit(f"pydist-node: {exc}")
    except OSError as exc:
        sys.exit(f"pydist-node: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}")
    finally:
        if state.get("dashboard") is not None:
            state["dashboard"].stop()
    log.info("node %s stopped", cfg.name)


# ================================================================================================ pydist
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
    from .executor import _walk_nodes

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
    from .executor import _walk_nodes

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
    from .executor import _upload_bundle

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pydist", description="pydist cluster tools.  The cluster secret comes from --secret-file or "
        f"{ENV_PREFIX}SECRET; the cluster from --node HOST:PORT or --ns HOST:PORT ({ENV_PREFIX}NS).")
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"TOML config file (same as {ENV_PREFIX}CONFIG=FILE; default ./pydist.toml or "
                        "~/.config/pydist/pydist.toml)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("up", help="start a whole cluster over ssh from a cluster.toml",
                       description="Start the name server and every node of a cluster.toml over ssh.")
    s.add_argument("file", help="the cluster.toml")
    s.add_argument("--secret-file", default=None, metavar="FILE",
                   help="the cluster secret (default: the file's secret_file)")
    s.add_argument("--no-version-check", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(fn=_cmd_up)
    s = sub.add_parser("down", help="stop every node and the name server of a cluster.toml",
                       description="Stop every node and the name server a cluster.toml describes.")
    s.add_argument("file", help="the cluster.toml")
    s.set_defaults(fn=_cmd_down)
    s = sub.add_parser("status", help="the tree of nodes: workers, load, queues",
                       description="Print the tree of nodes: workers busy/total, queued, running, done, failed.")
    _connect_args(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table (default: table)")
    s.add_argument("--watch", action="store_true", help="refresh until Ctrl-C (default: print once)")
    s.add_argument("--tasks", action="store_true",
                   help="also list the running tasks and their last output lines (default: off)")
    s.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="seconds between refreshes with --watch (default: %(default)s)")
    s.set_defaults(fn=_cmd_status)
    s = sub.add_parser("run", help="run a Python script on the cluster and print its output",
                       description="Ship a script to the cluster, run it on one node, print its output and "
                       "exit with its exit code.  Without --ns/--node it runs on a private local cluster.")
    _connect_args(s)
    s.add_argument("script", help="the Python script file to run")
    s.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    s.add_argument("--script-timeout", type=float, default=None, metavar="S",
                   help="kill the script after this many seconds; its output so far is printed "
                        "(default: no limit)")
    s.add_argument("--code", action="append", metavar="PATH",
                   help="code path the script imports; repeatable (default: none)")
    s.set_defaults(fn=_cmd_run)
    s = sub.add_parser("stop", help="stop a node, or the whole tree",
                       description="Stop nodes cleanly.  With --ns (and no --node), or with --all, every node "
                       "of the tree is stopped, children before their parents; with --node only that node.")
    _connect_args(s)
    s.add_argument("--all", action="store_true",
                   help="stop every node reachable from the one given, children first (default with --ns)")
    s.set_defaults(fn=_cmd_stop)
    s = sub.add_parser("sync-code", help="upload a code directory to every node",
                       description="Upload code directories (or .py files) to every node of the cluster.")
    _connect_args(s)
    s.add_argument("paths", nargs="+", help="package folders, project folders or .py files")
    s.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="glob of files to leave out; repeatable (default: caches, VCS and virtualenv folders)")
    s.add_argument("--upload-timeout", type=float, default=300.0, metavar="S",
                   help="seconds an upload may take (default: %(default)s)")
    s.add_argument("--pin", action="store_true",
                   help="make the bundle importable by every task of the cluster until --unpin (default: off)")
    s.add_argument("--unpin", action="store_true",
                   help="undo --pin (give the same paths, or the bundle's digest) (default: off)")
    s.set_defaults(fn=_cmd_sync)
    s = sub.add_parser("make-certs", help="write a CA and node certificates for a test cluster",
                       description="Write a CA and certificates signed by it (for --tls-* flags).")
    s.add_argument("dir", help="folder to write into (the CA in it is reused if present)")
    s.add_argument("--host", action="append", help="host name or IP for the certificates; repeatable "
                   "(default: 127.0.0.1 and localhost)")
    s.add_argument("--name", action="append", help="certificate name; repeatable (default: node)")
    s.set_defaults(fn=_cmd_certs)
    s = sub.add_parser("node", help="run a node (same as pydist-node; see pydist node --help)", add_help=False)
    s.set_defaults(fn=None)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``pydist``: cluster tools."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "node":
        node_main(argv[1:])
        return 0
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if a.config:
        if not os.path.isfile(a.config):
            print(f"pydist: config file {a.config} (from --config) does not exist", file=sys.stderr)
            return 2
        os.environ[ENV_PREFIX + "CONFIG"] = a.config   # every ClientConfig of this process reads it
    try:
        return a.fn(a)
    except (PydistError, FileNotFoundError) as exc:
        print(f"pydist {a.cmd}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        node_main(sys.argv[2:])
    else:
        sys.exit(main())
