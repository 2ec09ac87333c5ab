"""Mistakes that speak up (issue #13, Found 3-10): each one a user can make, reproduced with real
processes on loopback, and the sentence that must now name it.

Nodes started by hand (``python -m pydist.cli node``) log to a file per node, read by the test; every
process is stopped by pid in the fixture's teardown (workers included).  Waits poll with a deadline.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from pydist import ClusterExecutor, LocalCluster, security
from pydist.cluster import read_ready
from pydist.diagnose import advertise_host, parse_ns
from pydist.errors import ClusterUnavailable, ConfigError
from conftest import descendants, wait_for as _wait_for, wait_gone

pytestmark = [pytest.mark.timeout(120), pytest.mark.one_python]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def wait_for(cond, timeout=20.0, what="condition"):
    return _wait_for(cond, timeout, what, 0.02, retry_on=(Exception,))


def free_port(host="127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cli(*args, env=None, timeout=60, secret=None):
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, e.get("PYTHONPATH")]))
    if secret is not None:
        e["PYDIST_SECRET"] = secret.decode()
    return subprocess.run([sys.executable, "-m", "pydist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, stdin=subprocess.DEVNULL)


class Nodes:
    """A name server and nodes started by hand, each node logging to its own file."""

    def __init__(self, tmp):
        self.tmp = str(tmp)
        self.procs = []
        self.logs = {}
        self.pids = []

    def env(self, secret):
        e = dict(os.environ)
        e.pop("PYDIST_SECRET", None)
        e["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, HERE, e.get("PYTHONPATH")]))
        if secret is not None:
            e["PYDIST_SECRET"] = secret.decode()
        return e

    def ns(self) -> str:
        port = free_port()
        p = subprocess.Popen([sys.executable, "-m", "pydist.cluster", "ns", "127.0.0.1", str(port)],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=self.env(None))
        self.procs.append(p)
        import Pyro5.api

        def up():
            with Pyro5.api.locate_ns("127.0.0.1", port) as ns:
                ns.ping()
            return True
        wait_for(up, 15, "the name server")
        return f"127.0.0.1:{port}"

    def node(self, name, *args, secret=None, host="127.0.0.1", workers=0, ready=True, level="INFO"):
        log = os.path.join(self.tmp, f"{name}.log")
        f = open(log, "wb")
        cmd = [sys.executable, "-m", "pydist.cli", "node", "--host", host, "--port", "0", "--name", name,
               "--workers", str(workers), "--watch-stdin", "--code-cache", os.path.join(self.tmp, name),
               "--log-level", level, "--heartbeat", "0.2", *args]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f, env=self.env(secret))
        f.close()
        self.procs.append(p)
        self.logs[name] = log
        p.address = read_ready(p, 20) if ready else None
        if ready:
            assert p.address, f"{name} did not start: {self.log(name)}"
        return p

    def log(self, name) -> str:
        with open(self.logs[name], encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self):
        for p in self.procs:
            self.pids += descendants(p.pid)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                if p.stdin:
                    p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        wait_gone(self.pids, 15, "workers of stopped nodes")


@pytest.fixture
def nodes(tmp_path):
    n = Nodes(tmp_path)
    try:
        yield n
    finally:
        n.stop()


# ================================================================ Found 3: a child that cannot join
def _warnings(text, pattern):
    return [ln for ln in text.splitlines() if " WARNING: " in ln and re.search(pattern, ln)]


@pytest.mark.parametrize("case", ["wrong secret", "no secret", "typo in --parent", "typo in --ns"])
def test_child_that_cannot_join_says_why(nodes, case):
    """Each time the child logs the cause at WARNING (once, not once per retry), naming the flag."""
    ns = nodes.ns()
    good = security.new_secret()
    nodes.node("head", "--ns", ns, secret=good)
    parent, child_ns, child_secret, expect = "head", ns, good, None
    if case == "wrong secret":
        child_secret, expect = security.new_secret(), r"secret differs"
    elif case == "no secret":
        # (no secret given: the node uses this user's secret file, which is not the cluster's)
        child_secret, expect = None, r"no secret was given.*PYDIST_SECRET"
    elif case == "typo in --parent":
        parent, expect = "haed", r"no node named 'haed'.*registered: head.*--parent"
    else:
        child_ns, expect = f"127.0.0.1:{free_port()}", r"name server .* does not answer.*--ns"
    nodes.node("kid", "--ns", child_ns, "--parent", parent, secret=child_secret)
    wait_for(lambda: _warnings(nodes.log("kid"), expect), 20, f"the child to say why ({case})")
    # it keeps retrying, but does not repeat the sentence on each try (rate-limited)
    first = time.monotonic()
    threading.Event().wait(2.0)   # a measuring window, not synchronisation: count the repeats in it
    lines = _warnings(nodes.log("kid"), r"cannot join parent")
    assert len(lines) <= 2, f"{len(lines)} warnings in {time.monotonic() - first:.1f} s:\n" + "\n".join(lines)
    if case in ("wrong secret", "no secret"):
        # the parent's refusals are not one line per retry either
        refusals = [ln for ln in nodes.log("head").splitlines() if "refused" in ln]
        assert len(refusals) <= 6, "\n".join(refusals)


def test_parent_name_without_ns_is_a_startup_error(nodes):
    r = cli("node", "--name", "kid", "--parent", "head", "--workers", "0", timeout=30)
    assert r.returncode != 0
    assert "--ns" in r.stderr and "head" in r.stderr and "READY" not in r.stdout


def test_a_child_that_joins_late_says_so(nodes):
    """The warning is followed by an INFO line once it works (the parent came up later)."""
    ns = nodes.ns()
    secret = security.new_secret()
    nodes.node("kid", "--ns", ns, "--parent", "head", secret=secret)
    wait_for(lambda: _warnings(nodes.log("kid"), r"no node named 'head'"), 20, "the child's warning")
    nodes.node("head", "--ns", ns, secret=secret)
    wait_for(lambda: "joined parent head" in nodes.log("kid"), 20, "the child to say it joined")


# ================================================================ Found 4: sync-code, status
def test_sync_code_to_nothing_fails_and_says_why(tmp_path):
    (tmp_path / "m.py").write_text("X = 1\n")
    r = cli("sync-code", str(tmp_path / "m.py"), "--node", "127.0.0.2:1", "--timeout", "0.5")
    assert r.returncode != 0
    assert "127.0.0.2:1" in r.stderr and "no pydist node answers" in r.stderr, r.stderr
    assert "on 0 nodes" not in r.stdout


def test_wrong_secret_is_named_by_sync_code_and_status(proc_guard, tmp_path):
    (tmp_path / "m.py").write_text("X = 1\n")
    with LocalCluster(nodes=1, workers_per_node=0) as c:
        wrong = security.new_secret()
        r = cli("sync-code", str(tmp_path / "m.py"), "--node", c.address, secret=wrong)
        assert r.returncode != 0 and "secret" in r.stderr, r.stderr
        r = cli("status", "--node", c.address, secret=wrong)
        assert r.returncode != 0 and "wrong cluster secret" in r.stderr, r.stderr
        assert "no node answers" not in r.stderr


# ================================================================ Found 5: advertise
def test_wildcard_bind_never_advertises_loopback():
    assert advertise_host("127.0.0.5", None) is None          # advertises what it binds
    assert advertise_host("0.0.0.0", "192.0.2.3") == "192.0.2.3"
    assert advertise_host("0.0.0.0", None, ["127.0.1.1", "192.0.2.7"]) == "192.0.2.7"
    with pytest.raises(ConfigError, match="--advertise"):
        advertise_host("0.0.0.0", None, ["127.0.1.1"])
    with pytest.raises(ConfigError, match="--advertise"):
        advertise_host("0.0.0.0", "192.0.2.7:9000")


def test_advertise_flag_is_on_the_ready_line_and_in_the_uri(nodes):
    secret = security.new_secret()
    p = nodes.node("adv", "--advertise", "localhost", secret=secret)
    assert p.address.startswith("localhost:"), p.address
    prox = security.connect(p.address, secret=secret, timeout=10)
    try:
        assert "localhost:" in str(prox._pyroUri) and prox.status()["address"] == p.address
    finally:
        security.release(prox)


# ================================================================ Found 6 + 7: stop the tree, clean stops
def test_stop_ns_stops_the_whole_tree_children_first(nodes):
    ns = nodes.ns()
    secret = security.new_secret()
    head = nodes.node("head", "--ns", ns, secret=secret, workers=1)
    a = nodes.node("a", "--ns", ns, "--parent", "head", secret=secret, workers=1)
    b = nodes.node("b", "--ns", ns, "--parent", "a", secret=secret)

    def reach():
        p = security.connect(head.address, secret=secret, timeout=2)
        try:
            return set(p.status()["reachable"]) == {"head", "a", "b"}
        finally:
            security.release(p)
    wait_for(reach, 20, "the tree to form")
    exited = {}
    done = threading.Event()

    def watch():
        while not done.is_set() and len(exited) < 3:
            for name, p in (("head", head), ("a", a), ("b", b)):
                if name not in exited and p.poll() is not None:
                    exited[name] = (time.monotonic(), p.returncode)
            done.wait(0.005)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        r = cli("stop", "--ns", ns, secret=secret, timeout=90)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(exited) == 3, 20, "every node to exit")
    finally:
        done.set()
        t.join(5)
    assert all(rc == 0 for _, rc in exited.values()), exited
    assert exited["b"][0] <= exited["a"][0] <= exited["head"][0], exited
    for name in ("head", "a", "b"):
        text = nodes.log(name)
        assert "died with exit code" not in text, text
        assert f"node {name} stopped" in text, text
        assert not [ln for ln in text.splitlines() if " WARNING: " in ln and "lost" in ln], text
    assert "child a stopped" in nodes.log("head")


def test_ctrl_c_is_a_clean_stop(nodes):
    """SIGINT to the node's whole process group (a terminal's Ctrl-C): no worker 'died'."""
    secret = security.new_secret()
    e = nodes.env(secret)
    log = os.path.join(nodes.tmp, "cc.log")
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "pydist.cli", "node", "--name", "cc", "--workers", "2",
                              "--code-cache", os.path.join(nodes.tmp, "cc"), "--log-level", "INFO"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=f, env=e,
                             start_new_session=True)
    nodes.procs.append(p)
    p.stdin = None
    assert read_ready(p, 20)
    wait_for(lambda: len(descendants(p.pid)) >= 2, 20, "the workers")
    nodes.pids += descendants(p.pid)
    os.killpg(p.pid, signal.SIGINT)
    assert p.wait(20) == 0
    text = open(log).read()
    assert "died with exit code" not in text and "stopping node cc" in text and "node cc stopped" in text, text


# ================================================================ Found 8: pydist run
def test_run_without_address_says_it_runs_locally(tmp_path):
    s = tmp_path / "hi.py"
    s.write_text("print('hi')\n")
    e = dict(os.environ)
    e.pop("PYDIST_NS", None)
    r = cli("run", "--timeout", "30", str(s), env=e, timeout=90)
    assert r.returncode == 0 and r.stdout.strip() == "hi", r.stderr
    assert "private local cluster" in r.stderr and "ran on node" in r.stderr


def test_run_missing_script_is_a_clear_error(tmp_path):
    r = cli("run", "--node", "127.0.0.2:1", str(tmp_path / "nope.py"))
    assert r.returncode == 2 and "nope.py" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_run_script_timeout_keeps_partial_output(proc_guard, tmp_path):
    s = tmp_path / "slow.py"
    s.write_text("import sys, time\nprint('before', flush=True)\nprint('err-before', file=sys.stderr, "
                 "flush=True)\ntime.sleep(60)\n")
    with LocalCluster(nodes=1, workers_per_node=1) as c:
        r = cli("run", "--node", c.address, "--script-timeout", "1.5", str(s), secret=c.secret)
    assert r.returncode == 124, r.stderr
    assert "before" in r.stdout and "err-before" in r.stderr
    assert "Traceback" not in r.stderr and "node0" in r.stderr and "1.5" in r.stderr, r.stderr


# ================================================================ Found 9: addresses, help
def test_ns_without_port_means_9090():
    assert parse_ns("127.0.0.2") == ("127.0.0.2", 9090)
    assert parse_ns("tcp://h:9100") == ("h", 9100)
    with pytest.raises(ConfigError, match="port"):
        parse_ns("h:x")
    with pytest.raises(ClusterUnavailable, match=r"127\.0\.13\.13:9090"):
        ClusterExecutor(ns="127.0.13.13", connect_timeout=0.3)


def test_name_server_address_given_as_node_address(proc_guard):
    with LocalCluster(nodes=1, workers_per_node=0) as c:
        t0 = time.monotonic()
        with pytest.raises(ClusterUnavailable, match=r"this is a name server; use ns="):
            ClusterExecutor(c.ns_address, secret=c.secret)
        assert time.monotonic() - t0 < 3.0
        r = cli("status", "--node", c.ns_address, secret=c.secret)
        assert r.returncode != 0 and "name server" in r.stderr, r.stderr


@pytest.mark.parametrize("cmd", ["status", "run", "stop", "sync-code"])
def test_help_texts_have_defaults_and_env(cmd):
    r = cli(cmd, "--help")
    assert r.returncode == 0
    text = r.stdout
    assert "PYDIST_NS" in text and "PYDIST_SECRET" in text and "default" in text
    # every option has a help text (argparse prints an option without one on a line of its own)
    opts = re.findall(r"^  (-[-\w]+(?: [A-Z_:\[\]]+)?)(.*)$", text, re.M)
    bare = [o for o, rest in opts if not rest.strip()]
    lines = text.splitlines()
    for o in bare:   # long option names wrap: the help must follow on the next line
        i = next(k for k, ln in enumerate(lines) if ln.startswith("  " + o))
        assert lines[i + 1].startswith(" " * 10), f"{cmd}: option {o} has no help"


def test_node_help_shows_defaults_and_env():
    r = cli("node", "--help")
    assert r.returncode == 0
    assert "PYDIST_WORKERS" in r.stdout and "(default: 8)" in r.stdout and "PYDIST_SECRET" in r.stdout


# ================================================================ Found 10: the README's group example
def test_readme_spawn_group_example_runs_on_this_machine(tmp_path, proc_guard):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "spawn_group(step" in b)
    script = tmp_path / "group.py"
    script.write_text("from pydist import ClusterExecutor\n" + block)
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, e.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, env=e)
    assert r.returncode == 0, r.stderr
    assert "(3, 6)" in r.stdout, r.stdout


def test_stop_node_all_stops_its_tree_and_node_alone_stops_one(proc_guard):
    with LocalCluster(nodes=3, workers_per_node=0) as c:
        r = cli("stop", "--node", c.addresses[2], secret=c.secret)
        assert r.returncode == 0 and "stopping node node2" in r.stdout, r.stderr
        assert c.procs[2].wait(20) == 0
        assert c.procs[0].poll() is None and c.procs[1].poll() is None
        r = cli("stop", "--node", c.address, "--all", secret=c.secret, timeout=90)
        assert r.returncode == 0 and "stopped 2 nodes" in r.stdout, r.stdout + r.stderr
        assert c.procs[1].wait(20) == 0 and c.procs[0].wait(20) == 0


def test_a_node_that_cannot_listen_says_so_and_leaves_no_worker_behind(tmp_path):
    """A node that cannot listen must say why in the process the user started, and no worker of it
    may outlive it (tried in #15: starting the workers before the node imports, which did not pay)."""
    import psutil

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    cache = str(tmp_path / "busy-port-cache")
    env = dict(os.environ, PYDIST_SECRET=security.new_secret().decode())
    try:
        r = subprocess.run([sys.executable, "-m", "pydist.cli", "node", "--host", "127.0.0.1", "--port", str(port),
                            "--workers", "2", "--code-cache", cache, "--log-level", "WARNING"],
                           capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    finally:
        taken.close()
    assert r.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, (r.returncode, r.stderr[-800:])

    def workers_left():
        left = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if cache in " ".join(p.info["cmdline"] or []):
                    left.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return left
    wait_for(lambda: not workers_left(), 10, "the early workers of the node that could not listen to exit")
