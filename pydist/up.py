"""``pydist up cluster.toml`` / ``pydist down cluster.toml``: a whole cluster from one command, over ssh.

::

    cluster.toml ──load_spec──▶ ClusterSpec (hosts, parents, name server)
        │
        ├─ 1. check_versions: on every host, in parallel:  ssh host PYTHON -c "<versions>"
        │       Python major.minor and pydist must match this machine's (cloudpickle and the wire
        │       format depend on them): one table of mismatches, nothing is started
        ├─ 2. secret: ssh host 'umask 077; cat > DIR/secret'  (the secret travels on ssh's stdin only)
        ├─ 3. name server: ssh NS-host 'nohup PYTHON -m Pyro5.nameserver ... &'
        ├─ 4. nodes, parents before children (one wave per tree level, a wave in parallel):
        │       ssh host 'nohup PYTHON -m pydist.cli node --secret-file DIR/secret ... &; wait for READY'
        └─ 5. wait until the root sees every node; the caller prints the status tree

    pydist down: ssh host 'kill -TERM $(cat DIR/NAME.pid)' children first, then the name server.

Why the system ``ssh`` and not a library (paramiko, asyncssh): no new dependency, and it does what
users already configured — ``~/.ssh/config`` host aliases, keys in the agent, ``ProxyJump``, known
hosts, ``ControlMaster``.  It runs with ``BatchMode=yes`` (never prompts) and ``ConnectTimeout``; more
options come from ``ssh_options`` in the file.

The secret is never on a command line or in an environment variable (both visible to other users
through ``ps`` or ``/proc``): it is written on the remote host by ``cat`` from ssh's stdin into a file
created under ``umask 077`` (0600), and nodes get only ``--secret-file PATH``.

The file's format and its parsing are in :mod:`pydist.clusterfile` (``load_spec``, ``ClusterSpec``,
``HostSpec``, re-exported here); this module is the ssh plumbing and the steps above.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .clusterfile import ClusterSpec, HostSpec, _levels, _str_list, _typed, load_spec  # noqa: F401
from .errors import ConfigError, PydistError, VersionMismatch

log = logging.getLogger(__name__)

__all__ = ["ClusterSpec", "HostSpec", "VersionRow", "load_spec", "check_versions", "up", "down",
           "format_versions", "format_tree"]

SECRET_FILE: Any = type("SecretFile", (), {"__repr__": lambda self: "<remote secret file>"})()
SSH_BASE = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15")


class UpError(PydistError):
    """A step of ``pydist up`` / ``pydist down`` failed on a host (the message names it)."""


# ============================================================================================ ssh
def _ssh(spec: ClusterSpec, h: HostSpec, script: str, stdin: Optional[bytes] = None,
         timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a POSIX sh ``script`` on host ``h`` (through ``sh -c``: the login shell may be any)."""
    cmd = ["ssh", *SSH_BASE, "-p", str(h.ssh_port), *spec.ssh_options, *h.ssh_options, h.target, "--",
           "sh -c " + shlex.quote(script)]
    try:
        return subprocess.run(cmd, input=stdin if stdin is not None else b"", capture_output=True,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise UpError("the ssh command was not found: install an OpenSSH client") from None
    except subprocess.TimeoutExpired:
        raise UpError(f"host {h.name} ({h.target}): ssh did not finish within {timeout:g} s") from None


def _remote_path(p: str) -> str:
    """A path for the remote shell: ``~/x`` becomes ``"$HOME"/x``, the rest is quoted."""
    if p == "~":
        return '"$HOME"'
    if p.startswith("~/"):
        return '"$HOME"/' + shlex.quote(p[2:])
    return shlex.quote(p)


def _parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
    """``[fn(x) for x in items]`` on one thread each; exceptions are returned in place of results."""
    out: list = [None] * len(items)

    def run(i: int, x: Any) -> None:
        try:
            out[i] = fn(x)
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, x), daemon=True) for i, x in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _err(r: subprocess.CompletedProcess) -> str:
    text = (r.stderr or b"").decode(errors="replace").strip() or (r.stdout or b"").decode(errors="replace").strip()
    return text.splitlines()[-1] if text else f"exit status {r.returncode}"


# ====================================================================================== 1. versions
_PROBE = ("import json, sys\n"
          "d = {'python': '%d.%d.%d' % sys.version_info[:3], 'executable': sys.executable}\n"
          "try:\n    import pydist\n    d['pydist'] = pydist.__version__\n"
          "except Exception as exc:\n    d['error'] = '%s: %s' % (type(exc).__name__, exc)\n"
          "print('PYDIST-PROBE ' + json.dumps(d))\n")


@dataclass
class VersionRow:
    """What one host runs, and whether it matches this machine."""

    host: str
    address: str
    python: str
    pydist: str
    problem: str = ""


def check_versions(spec: ClusterSpec) -> list:
    """Python (major.minor) and pydist versions on every host; ``VersionMismatch`` with a table when
    any differs from this machine's (or a host cannot be reached)."""
    from . import __version__

    want_py = "%d.%d" % sys.version_info[:2]

    def probe(h: HostSpec) -> VersionRow:
        r = _ssh(spec, h, f"exec {shlex.quote(h.python)} -c {shlex.quote(_PROBE)}", timeout=60)
        line = next((ln for ln in (r.stdout or b"").decode(errors="replace").splitlines()
                     if ln.startswith("PYDIST-PROBE ")), None)
        if line is None:
            return VersionRow(h.name, h.target, "?", "?", f"cannot run {h.python} over ssh: {_err(r)}")
        d = json.loads(line[len("PYDIST-PROBE "):])
        row = VersionRow(h.name, h.target, d["python"], d.get("pydist", "missing"))
        problems = []
        if ".".join(d["python"].split(".")[:2]) != want_py:
            problems.append(f"Python {d['python']} != {want_py} here")
        if "error" in d:
            problems.append(f"pydist cannot be imported ({d['error']})")
        elif d["pydist"] != __version__:
            problems.append(f"pydist {d['pydist']} != {__version__} here")
        row.problem = "; ".join(problems)
        return row

    rows = []
    for h, r in zip(spec.hosts, _parallel(probe, spec.hosts)):
        if isinstance(r, BaseException):
            r = VersionRow(h.name, h.target, "?", "?", str(r))
        rows.append(r)
    if any(r.problem for r in rows):
        raise VersionMismatch(f"cluster {spec.name}: hosts that do not match this machine (Python "
                              f"{'%d.%d.%d' % sys.version_info[:3]}, pydist {__version__}); nothing "
                              f"was started:\n" + format_versions([r for r in rows if r.problem]))
    return rows


def format_versions(rows: Sequence[VersionRow]) -> str:
    """The version table: host, ssh address, Python, pydist, problem."""
    cols = ("host", "address", "python", "pydist", "problem")
    vals = [(r.host, r.address, r.python, r.pydist, r.problem or "ok") for r in rows]
    widths = [max([len(c)] + [len(v[i]) for v in vals]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(v, widths)).rstrip() for v in vals]
    return "\n".join(ln.rstrip() for ln in lines)


# ====================================================================================== 2-5. up
def cluster_secret(spec: ClusterSpec, secret_file: Optional[str] = None) -> tuple:
    """``(secret, path)``: from ``secret_file`` (the ``--secret-file`` flag), else the file named in the
    spec, made (random, mode 0600) when it does not exist yet."""
    from . import security
    from .config import read_secret_file

    path = os.path.expanduser(secret_file or spec.secret_file)
    if secret_file or os.path.exists(path):
        return read_secret_file(path), path
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    secret = security.new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    log.info("wrote a new secret for cluster %s to %s", spec.name, path)
    return secret, path


def _put_secret(spec: ClusterSpec, h: HostSpec, secret: bytes) -> None:
    d = _remote_path(spec.remote_dir)
    script = (f"umask 077 && mkdir -p {d} && chmod 700 {d} && cat > {d}/secret.tmp && "
              f"mv -f {d}/secret.tmp {d}/secret")
    r = _ssh(spec, h, script, stdin=secret + b"\n")
    if r.returncode != 0:
        raise UpError(f"host {h.name}: cannot write the secret file in {spec.remote_dir}: {_err(r)}")


def _start_detached(spec: ClusterSpec, h: HostSpec, tag: str, argv: list, ready: str = "READY ") -> str:
    """Start ``argv`` on ``h`` in its own session (it outlives the ssh connection), its pid in
    ``DIR/TAG.pid`` and output in ``DIR/TAG.log``; wait for a line starting with ``ready``.  Returns
    the third word of a ``READY name host:port`` line (else "")."""
    d = _remote_path(spec.remote_dir)
    cmd = " ".join('"$D/secret"' if a is SECRET_FILE else shlex.quote(a) for a in argv)
    steps = int(spec.start_timeout * 10)
    script = f"""
umask 077; D={d}; mkdir -p "$D" || exit 9
pidf="$D"/{tag}.pid; logf="$D"/{tag}.log
if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
  echo "ALREADY $(cat "$pidf")"; grep -m1 {shlex.quote('^' + ready)} "$logf"; exit 0
fi
: > "$logf"
if command -v setsid >/dev/null 2>&1; then S=setsid; else S=; fi
nohup $S {cmd} > "$logf" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$pidf"
echo "PID $pid"
i=0
while [ $i -lt {steps} ]; do
  if grep -m1 {shlex.quote('^' + ready)} "$logf"; then exit 0; fi
  if ! kill -0 "$pid" 2>/dev/null; then echo "EXITED"; tail -n 20 "$logf" >&2; exit 3; fi
  sleep 0.1; i=$((i+1))
done
echo "TIMEOUT"; tail -n 20 "$logf" >&2; exit 4
"""
    r = _ssh(spec, h, script, timeout=spec.start_timeout + 30)
    out = (r.stdout or b"").decode(errors="replace")
    if r.returncode != 0:
        why = {3: "exited before it was ready", 4: f"was not ready within {spec.start_timeout:g} s"}.get(
            r.returncode, "could not be started")
        tail = (r.stderr or b"").decode(errors="replace").strip()
        raise UpError(f"host {h.name}: {tag} {why} (log: {spec.remote_dir}/{tag}.log)"
                      + (f":\n{tail}" if tail else ""))
    line = next((ln for ln in out.splitlines() if ln.startswith(ready)), "")
    return line.split()[2] if line.startswith("READY ") and len(line.split()) >= 3 else ""


def bind_addresses(spec: ClusterSpec) -> dict:
    """host name -> the IP its node binds and advertises.  A host given by name is resolved here: on
    Debian and Ubuntu a machine's own name resolves to 127.0.1.1 *on that machine*, which a node bound
    by name would advertise and nobody else could reach.  A name that resolves to loopback here while
    other hosts are not loopback is refused (ConfigError naming it)."""
    import ipaddress
    import socket

    out = {}
    for h in spec.hosts:
        try:
            out[h.name] = str(ipaddress.ip_address(h.address))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(h.address, None, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(f"cluster {spec.name}: host {h.name}: cannot resolve {h.address}: {exc.strerror}") \
                from None
        out[h.name] = str(infos[0][4][0])
    loop = {n for n, ip in out.items() if ipaddress.ip_address(ip).is_loopback}
    if loop and len(loop) < len(out):
        bad = sorted(n for n in loop if not _is_ip(spec.host(n).address))
        if bad:
            raise ConfigError(
                f"cluster {spec.name}: {', '.join(bad)} resolve(s) to a loopback address here "
                f"({', '.join(out[n] for n in bad)}; on Debian/Ubuntu a machine's own name maps to 127.0.1.1), "
                "which the other hosts cannot reach: give each host's network IP as its address")
    return out


def _is_ip(a: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(a)
        return True
    except ValueError:
        return False


def _node_argv(spec: ClusterSpec, h: HostSpec, parent_addr: Optional[str], bind: Optional[str] = None,
               ns: Optional[str] = None) -> list:
    argv = [h.python, "-m", "pydist.cli", "node", "--host", bind or h.address, "--port", str(h.port),
            "--name", h.name, "--ns", ns or spec.ns_address, "--secret-file", SECRET_FILE]
    if h.workers is not None:
        argv += ["--workers", str(h.workers)]
    if parent_addr:
        argv += ["--parent", parent_addr]
    return argv + list(spec.node_args) + list(h.args)


@dataclass
class UpResult:
    """What ``up`` started: node name -> address, the name server's address, the root's address."""

    nodes: dict
    ns: str
    root: str
    secret_file: str
    statuses: list


def up(spec: ClusterSpec, secret_file: Optional[str] = None, report: Callable[[str], None] = log.info,
       check: bool = True) -> UpResult:
    """Check versions, distribute the secret, start the name server and every node, wait for READY and
    for the root to see the whole tree.  On failure the processes started so far are stopped."""
    binds = bind_addresses(spec)
    if check:
        rows = check_versions(spec)
        report(format_versions(rows))
    secret, path = cluster_secret(spec, secret_file)
    errs = _parallel(lambda h: _put_secret(spec, h, secret), _unique_targets(spec))
    _raise_first(errs)
    report(f"secret {path} copied to {len(_unique_targets(spec))} host(s) (mode 0600)")
    started: list = []
    try:
        ns_host = next(h for h in spec.hosts if h.address == spec.ns_host)
        ns = f"{binds[ns_host.name]}:{spec.ns_port}"
        _start_detached(spec, ns_host, "nameserver", [ns_host.python, "-u", "-m", "Pyro5.nameserver",
                                                      "-n", binds[ns_host.name], "-p", str(spec.ns_port), "-x"],
                        ready="NS running on")
        started.append(("nameserver", ns_host))
        report(f"name server on {ns}")
        addrs: dict = {}
        for wave in _levels(spec):
            def start(h: HostSpec) -> str:
                parent = addrs[h.parent] if h.parent else None
                return _start_detached(spec, h, h.name, _node_argv(spec, h, parent, binds[h.name], ns))

            got = _parallel(start, wave)
            for h, a in zip(wave, got):
                if not isinstance(a, BaseException):
                    started.append((h.name, h))
            _raise_first(got)
            for h, a in zip(wave, got):
                addrs[h.name] = a
                report(f"READY {h.name} {a}")
        statuses = _wait_tree(addrs[spec.root.name], secret, len(spec.hosts), spec.start_timeout)
    except BaseException:
        _stop(spec, [h for tag, h in reversed(started) if tag != "nameserver"], with_ns=bool(started))
        raise
    return UpResult(addrs, ns, addrs[spec.root.name], path, statuses)


def _unique_targets(spec: ClusterSpec) -> list:
    seen, out = set(), []
    for h in spec.hosts:
        k = (h.target, h.ssh_port)
        if k not in seen:
            seen.add(k)
            out.append(h)
    return out


def _raise_first(results: list) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _wait_tree(root: str, secret: bytes, n: int, timeout: float) -> list:
    from .upload import _walk_nodes

    deadline = time.monotonic() + timeout
    while True:
        nodes = _walk_nodes(root, secret, None)
        if len(nodes) >= n or time.monotonic() > deadline:
            if len(nodes) < n:
                raise UpError(f"every node is READY but the root {root} sees only {len(nodes)} of {n} "
                              f"within {timeout:g} s: {sorted(s['name'] for s in nodes)}")
            return nodes
        threading.Event().wait(0.1)   # poll interval


def format_tree(nodes: Sequence[dict]) -> str:
    """Node statuses as a tree (by their ``parent``): name, address, workers."""
    by_name = {st["name"]: st for st in nodes}
    kids: dict = {}
    roots = []
    for st in nodes:
        p = st.get("parent")
        if p and p in by_name:
            kids.setdefault(p, []).append(st["name"])
        else:
            roots.append(st["name"])
    lines: list = []

    def walk(name: str, prefix: str, last: bool, top: bool) -> None:
        st = by_name[name]
        label = f"{name}  {st.get('address', '?')}  {st.get('workers', '?')} workers"
        lines.append(label if top else f"{prefix}{'└── ' if last else '├── '}{label}")
        children = sorted(kids.get(name, ()))
        for i, c in enumerate(children):
            walk(c, "" if top else prefix + ("    " if last else "│   "), i == len(children) - 1, False)

    for r in sorted(roots):
        walk(r, "", True, True)
    return "\n".join(lines)


# ============================================================================================ down
def _stop_script(spec: ClusterSpec, tag: str) -> str:
    d = _remote_path(spec.remote_dir)
    return f"""
pidf={d}/{tag}.pid
[ -f "$pidf" ] || {{ echo NOTRUNNING; exit 0; }}
pid=$(cat "$pidf")
if ! kill -0 "$pid" 2>/dev/null || ! ps -p "$pid" -o args= | grep -q -e pydist -e Pyro5; then
  rm -f "$pidf"; echo NOTRUNNING; exit 0
fi
kill -TERM "$pid"
i=0
while [ $i -lt 100 ]; do
  kill -0 "$pid" 2>/dev/null || {{ rm -f "$pidf"; echo STOPPED; exit 0; }}
  sleep 0.1; i=$((i+1))
done
kill -KILL "$pid" 2>/dev/null; rm -f "$pidf"; echo KILLED
"""


def _stop(spec: ClusterSpec, hosts: list, with_ns: bool = True) -> dict:
    out: dict = {}
    for wave in reversed(_levels(spec)):
        todo = [h for h in wave if h in hosts]
        res = _parallel(lambda h: _ssh(spec, h, _stop_script(spec, h.name), timeout=60), todo)
        for h, r in zip(todo, res):
            out[h.name] = (r if isinstance(r, BaseException) else
                           ((r.stdout or b"").decode(errors="replace").strip().splitlines() or ["?"])[-1])
    if with_ns:
        ns_host = next(h for h in spec.hosts if h.address == spec.ns_host)
        try:
            r = _ssh(spec, ns_host, _stop_script(spec, "nameserver"), timeout=60)
            out["nameserver"] = ((r.stdout or b"").decode(errors="replace").strip().splitlines() or ["?"])[-1]
        except UpError as exc:
            out["nameserver"] = exc
    return out


def down(spec: ClusterSpec, report: Callable[[str], None] = log.info) -> dict:
    """Stop every node of the cluster (children first) and its name server; remove the secret files.
    Returns name -> "STOPPED" | "KILLED" | "NOTRUNNING" | the error."""
    out = _stop(spec, list(spec.hosts))
    d = _remote_path(spec.remote_dir)
    _parallel(lambda h: _ssh(spec, h, f"rm -f {d}/secret", timeout=60), _unique_targets(spec))
    for k, v in out.items():
        report(f"{k}: {v}")
    return out
