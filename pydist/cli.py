"""Command line: ``pydist-node`` (run a node) and ``pydist`` (status, run a script, stop, sync code, certs).

Every ``pydist-node`` flag comes from the one settings table in ``config.NodeConfig`` and can also be
set with the ``PYDIST_*`` environment variable named there.

The subcommands themselves are in :mod:`pydist.commands` (their names are re-exported here); this module
holds ``pydist-node`` and the argument parsing of ``pydist``.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from typing import List, Optional

from .config import ENV_PREFIX, SIZE_FIELDS, NodeConfig
from .commands import (_cmd_certs, _cmd_down, _cmd_run, _cmd_status, _cmd_stop, _cmd_sync, _cmd_up,  # noqa: F401
                       _connect_args, _gone, _ns_nodes, _pin_everywhere, _probe, _root_uri, _secret_tls,
                       _tree_order, _unpin, format_status, format_tasks)
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
            from . import dashboard_listen

            try:   # listening now, served once pydist.dashboard is imported (not before READY: #15)
                sock = dashboard_listen.listen(cfg.host, cfg.dashboard)
            except OSError as exc:
                log.error("cannot serve the dashboard on %s:%s: %s", cfg.host, cfg.dashboard, exc.strerror or exc)
            else:
                token = dashboard_listen.token_for(cfg.secret)
                node.dashboard_url = dashboard_listen.url(sock, node.address.rsplit(":", 1)[0], token,
                                                          bool(cfg.tls_cert and cfg.tls_key))
                sys.stdout.write(f"DASHBOARD {node.dashboard_url}\n")   # before READY: readers see both
                threading.Thread(target=serve_dashboard, args=(node, sock, token), daemon=True,
                                 name="pydist-dashboard-start").start()
        sys.stdout.write(f"READY {node.name} {node.address}\n")
        sys.stdout.flush()
        log.info("node %s ready at %s with %d workers", node.name, node.address, cfg.workers)

    def serve_dashboard(node, sock, token: str) -> None:
        # once the workers are up (at most 2 s): their start-up and the first client's come first; a
        # browser that is quicker waits in the socket's backlog
        deadline = time.monotonic() + 2.0
        for h in node.pool.handles:
            h.ready.wait(max(0.0, deadline - time.monotonic()))
        from .dashboard import start_for_node

        try:
            state["dashboard"] = start_for_node(node, cfg.dashboard or 0, sock=sock, token=token)
        except Exception:   # noqa: BLE001 - the node serves on without its dashboard
            log.exception("cannot serve the dashboard on %s", node.dashboard_url)
            sock.close()

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
