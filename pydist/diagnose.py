"""Mistakes that speak up: why a connect or a join failed, in words a user can act on.

A node whose parent refuses it, a typo in ``--parent`` or ``--ns``, a name server's address given where a
node's is expected: each used to fail in silence (a READY line, then retries at DEBUG forever).  The
functions here turn the exception into one sentence naming the target, the cause and the flag to fix,
and ``RateLimited`` keeps a retry loop from repeating that sentence more than once in a while.

Pure helpers over Pyro5 (no pydist state): the node, the executor and the CLI call them.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Optional, Tuple

DEFAULT_NS_PORT = 9090   # Pyro5's name server port (pyro5-ns -p)
NS_PREFIX = "pydist.node."


def ns_proxy(ns: str):
    """A proxy of the name server at ``host:port`` (or ``host``: Pyro5's default port)."""
    import Pyro5.api

    host, _, port = ns.rpartition(":")
    return Pyro5.api.locate_ns(host or ns, int(port) if port else None)


def parse_ns(address: str) -> Tuple[str, int]:
    """``"host:port"``, ``"host"`` (port 9090) or ``"tcp://host:port"`` of a name server as (host, port).

    ``ConfigError`` names the problem for anything else (an empty host, a port that is not a number)."""
    from .errors import ConfigError

    a = str(address).strip()
    if a.startswith("tcp://"):
        a = a[len("tcp://"):]
    if a.upper().startswith("PYRO"):
        raise ConfigError(f"name server address {address!r}: give host:port, not a Pyro5 URI")
    if a.startswith("[") and "]" in a:           # [::1]:9090
        host, _, rest = a[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif a.count(":") == 1:
        host, _, port = a.partition(":")
    else:
        host, port = a, ""
    if not host:
        raise ConfigError(f"name server address {address!r} has no host: use HOST or HOST:PORT")
    if not port:
        return host, DEFAULT_NS_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"name server address {address!r}: port {port!r} is not a number from 1 to 65535")
    return host, int(port)


def is_name_server(address: str, timeout: float = 1.0) -> bool:
    """True if a Pyro5 name server answers at ``host:port``."""
    import Pyro5.api

    try:
        host, port = parse_ns(address)
        p = Pyro5.api.Proxy(f"PYRO:Pyro.NameServer@{host}:{port}")
    except Exception:
        return False
    try:
        p._pyroTimeout = timeout
        p.ping()
        return True
    except Exception:
        return False
    finally:
        try:
            p._pyroRelease()
        except Exception:
            pass


def name_server_hint(address: str) -> str:
    """The sentence that says a node address is really a name server's."""
    return (f"no pydist node at {address}: this is a name server; use ns={address!r} "
            f"(ClusterExecutor(ns=...), --ns {address} on the command line)")


def registered_nodes(ns: str, timeout: float = 2.0) -> Optional[list]:
    """Node names registered in name server ``ns`` (None if it cannot be asked)."""
    import Pyro5.api

    try:
        host, port = parse_ns(ns)
        with Pyro5.api.locate_ns(host, port) as nsp:
            nsp._pyroTimeout = timeout
            names = nsp.list(prefix=NS_PREFIX)
        return sorted(n[len(NS_PREFIX):] for n in names)
    except Exception:
        return None


def join_failure(exc: BaseException, role: str, target: Optional[str], ns: Optional[str],
                 secret: Any = None) -> str:
    """Why joining ``target`` (the value of ``--parent`` / ``--peer``) failed, and what to do.  ``secret``:
    this node's own (a per-user secret found in its file means none was given)."""
    import Pyro5.errors

    from .errors import AuthenticationError, VersionMismatch

    flag = f"--{role}"
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (AuthenticationError, VersionMismatch)):
        msg = str(exc)
        try:
            from .auth import UserSecret
            no_secret_given = isinstance(secret, UserSecret)
        except ImportError:
            no_secret_given = False
        if no_secret_given and ("wrong cluster secret" in msg or "failed to prove" in msg):
            return (f"cannot join {role} {target}: no secret was given to this node, so it uses this user's "
                    f"secret file, and {target} has another secret ({msg}): set PYDIST_SECRET or --secret-file "
                    "on this node (the same as the parent's)")
        if "gave none" in msg or "requires the cluster secret" in msg:
            return (f"cannot join {role} {target}: it requires the cluster secret and this node has none: set "
                    "PYDIST_SECRET or --secret-file on this node (the same as the parent's)")
        if "wrong cluster secret" in msg or "failed to prove" in msg:
            return (f"cannot join {role} {target}: the cluster secret differs ({msg}): give both nodes the same "
                    "PYDIST_SECRET / --secret-file")
        return f"cannot join {role} {target}: {msg}"
    if isinstance(exc, Pyro5.errors.NamingError):
        msg = str(exc)
        if "unknown name" in msg:
            names = registered_nodes(ns) if ns else None
            listed = ", ".join(names) if names else "none"
            return (f"cannot join {role} {target}: no node named {target!r} is registered in name server {ns} "
                    f"(registered: {listed}): check {flag} and --ns (a parent that is still starting will "
                    "be found once it registers)")
        return (f"cannot join {role} {target}: the name server {ns} does not answer ({msg}): check --ns "
                "(host:port of pyro5-ns)")
    if isinstance(exc, ValueError) and "without --ns" in str(exc):
        return f"cannot join {role} {target}: {exc}"
    return f"cannot join {role} {target}: {text}"


class RateLimited:
    """Log a repeated failure once, then at most once per ``every`` seconds (with the count meanwhile);
    a different message is logged at once.  ``ok()`` logs the recovery (at INFO) if there were failures."""

    def __init__(self, logger: logging.Logger, every: float = 30.0, level: int = logging.WARNING,
                 suffix: str = "; retrying"):
        self.log = logger
        self.suffix = suffix
        self.every = every
        self.level = level
        self._lock = threading.Lock()
        self._state: Dict[str, list] = {}   # key -> [last message, last logged at, failures since]
        self._hold: Dict[str, float] = {}   # key -> quiet until (monotonic)

    def fail(self, key: str, message: str) -> bool:
        """Record a failure; returns True if it was logged."""
        now = time.monotonic()
        with self._lock:
            if self._hold.get(key, 0.0) > now:
                return False
            self._hold.pop(key, None)
            st = self._state.get(key)
            if st is None or st[0] != message or now - st[1] >= self.every:
                repeats = 0 if st is None or st[0] != message else st[2]
                self._state[key] = [message, now, 0]
                log_it = True
            else:
                st[2] += 1
                log_it = False
        if log_it:
            more = f" ({repeats} more times since the last message)" if repeats else ""
            self.log.log(self.level, "%s%s%s", message, more, self.suffix)
        return log_it

    def hold(self, key: str, seconds: float) -> None:
        """Say nothing about ``key`` for ``seconds`` (e.g. the other side said it stops: expected)."""
        with self._lock:
            self._hold[key] = time.monotonic() + seconds
            self._state.setdefault(key, ["", time.monotonic(), 0])

    def ok(self, key: str, message: str) -> None:
        """The thing works again: log ``message`` at INFO if failures had been logged for ``key``."""
        with self._lock:
            st = self._state.pop(key, None)
        if st is not None:
            self.log.info("%s", message)


WILDCARDS = ("0.0.0.0", "::", "")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def machine_addresses() -> list:
    """This machine's addresses as its host name resolves them (loopback ones last)."""
    import socket

    found: list = []
    try:
        name = socket.gethostname()
        for info in socket.getaddrinfo(name, None, socket.AF_INET):
            a = info[4][0]
            if a not in found:
                found.append(a)
    except OSError:
        pass
    return sorted(found, key=_is_loopback)


def advertise_host(host: str, advertise: Optional[str], candidates: Optional[list] = None) -> Optional[str]:
    """The host to put in the node's URI and READY line when it differs from the bound ``host`` (None:
    advertise ``host`` itself).  ``--advertise`` wins; a wildcard bind (0.0.0.0) advertises this machine's
    first non-loopback address and refuses (``ConfigError`` naming ``--advertise``) when there is none, since
    other machines would be told a loopback address.  ``candidates``: the machine's addresses (default:
    ``machine_addresses()``)."""
    from .errors import ConfigError

    if advertise:
        a = advertise.strip()
        if not a or any(c.isspace() for c in a) or ":" in a and not a.count(":") > 1:
            raise ConfigError(f"--advertise {advertise!r}: give a host name or an IP address (no port)")
        return a
    if host not in WILDCARDS:
        return None
    addrs = machine_addresses() if candidates is None else list(candidates)
    usable = [a for a in addrs if not _is_loopback(a)]
    if not usable:
        raise ConfigError(f"bound to all interfaces (--host {host or '0.0.0.0'}) but this machine's name "
                          f"resolves only to {', '.join(addrs) or 'nothing'}, a loopback address other machines "
                          "cannot reach: pass --advertise HOST (the address other machines use for this one)")
    return usable[0]
