"""``pydist up cluster.toml`` / ``pydist down cluster.toml`` over ssh (issue #14, item 3).

A real OpenSSH server started by the test: its own host key, a user key and known_hosts in a temp
folder, ``sshd -D -f <its config>`` on a free port listening on 127.0.0.1-4, so that each 127.0.0.x is
a "host".  Skipped with the reason when sshd is missing or cannot run here.  No sleeps: ``wait_for``.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap

import psutil
import pytest

from pydist import ClusterExecutor
from conftest import _alive, wait_for, wait_gone

pytestmark = [pytest.mark.timeout(180), pytest.mark.one_python]

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def _sshd_path():
    for p in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if p and os.access(p, os.X_OK):
            return p
    return None


def _port_free_everywhere(port: int) -> bool:
    for h in ("127.0.0.1",) + HOSTS + ("127.0.0.5",):
        with socket.socket() as s:
            try:
                s.bind((h, port))
            except OSError:
                return False
    return True


def _free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if _port_free_everywhere(port):
            return port
    raise RuntimeError("no port free on every loopback address")


class Sshd:
    def __init__(self, tmp, port, key, known_hosts, proc):
        self.tmp, self.port, self.key, self.known_hosts, self.proc = tmp, port, key, known_hosts, proc
        self.user = getpass.getuser()

    def options(self) -> list:
        return ["-F", "/dev/null", "-i", self.key, "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "LogLevel=ERROR"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    sshd_bin, keygen, ssh = _sshd_path(), shutil.which("ssh-keygen"), shutil.which("ssh")
    if not (sshd_bin and keygen and ssh):
        pytest.skip("OpenSSH server/client not installed (Debian: apt-get install -y openssh-server)")
    if sys.platform != "linux":
        pytest.skip("needs several loopback addresses 127.0.0.x (Linux)")
    tmp = str(tmp_path_factory.mktemp("sshd"))
    host_key, user_key = os.path.join(tmp, "host_key"), os.path.join(tmp, "id_ed25519")
    for k in (host_key, user_key):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", k], check=True, timeout=30)
    shutil.copy(user_key + ".pub", os.path.join(tmp, "authorized_keys"))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege separation folder
    port = _free_port()
    cfg = os.path.join(tmp, "sshd_config")
    with open(cfg, "w") as f:
        f.write(textwrap.dedent(f"""\
            Port {port}
            ListenAddress 127.0.0.1
            {chr(10).join('ListenAddress ' + h for h in HOSTS)}
            HostKey {host_key}
            PidFile {tmp}/sshd.pid
            AuthorizedKeysFile {tmp}/authorized_keys
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            PermitRootLogin prohibit-password
            LogLevel ERROR
            """))
    t = subprocess.run([sshd_bin, "-t", "-f", cfg], capture_output=True, text=True, timeout=30)
    if t.returncode != 0:
        pytest.skip(f"sshd cannot run here: {t.stderr.strip()}")
    with open(host_key + ".pub") as f:
        pub = " ".join(f.read().split()[:2])
    kh = os.path.join(tmp, "known_hosts")
    with open(kh, "w") as f:
        for h in ("127.0.0.1",) + HOSTS:
            f.write(f"[{h}]:{port} {pub}\n")
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    s = Sshd(tmp, port, user_key, kh, proc)

    def works():
        if proc.poll() is not None:
            pytest.skip(f"sshd exited: {proc.stderr.read().decode(errors='replace').strip()}")
        r = subprocess.run(["ssh", "-p", str(port), *s.options(), "-o", "BatchMode=yes",
                            f"{s.user}@127.0.0.2", "true"], capture_output=True, timeout=30)
        return r.returncode == 0

    try:
        wait_for(works, 30, "sshd to accept a login")
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def write_cluster(sshd, tmp_path, hosts_toml: str, name="t", ns_port=None, extra="", ns_host="127.0.0.2") -> str:
    ns_port = ns_port or _free_port()
    py = sys.executable
    text = textwrap.dedent(f"""\
        [cluster]
        name = "{name}"
        ns = "{ns_host}:{ns_port}"
        python = "{py}"
        secret_file = "{tmp_path}/local/{name}.secret"
        remote_dir = "{tmp_path}/remote/{name}"
        ssh_options = {sshd.options()!r}
        start_timeout = 60
        """).replace("'", '"') + extra + "\n" + textwrap.dedent(hosts_toml)
    p = os.path.join(str(tmp_path), f"{name}.toml")
    with open(p, "w") as f:
        f.write(text)
    return p


def pydist_cli(*args, timeout=150) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYDIST_SECRET"}
    return subprocess.run([sys.executable, "-m", "pydist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def remote_pids(tmp_path, name) -> dict:
    d = os.path.join(str(tmp_path), "remote", name)
    out = {}
    for f in os.listdir(d) if os.path.isdir(d) else ():
        if f.endswith(".pid"):
            with open(os.path.join(d, f)) as fh:
                out[f[:-4]] = int(fh.read().strip())
    return out


def three_hosts(sshd) -> str:
    return "".join(f"""
        [[hosts]]
        address = "{h}"
        user = "{sshd.user}"
        ssh_port = {sshd.port}
        workers = 1
        name = "n{i}"
        {'parent = "n2"' if i == 3 else ''}
        """ for i, h in enumerate(HOSTS, 1))


# ============================================================================================== tests
def test_up_then_tasks_then_down(sshd, tmp_path):
    path = write_cluster(sshd, tmp_path, three_hosts(sshd))
    r = pydist_cli("up", path)
    pids = remote_pids(tmp_path, "t")
    procs = []
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        for n in ("n1", "n2", "n3"):
            assert f"READY {n} " in r.stdout, r.stdout
        assert set(pids) == {"nameserver", "n1", "n2", "n3"}
        # the status tree: every node, with its parent
        assert "n1  127.0.0.2:" in r.stdout and "└── n2  127.0.0.3:" in r.stdout, r.stdout
        assert "    └── n3  127.0.0.4:" in r.stdout, r.stdout
        table = r.stdout[r.stdout.index("node "):]
        assert all(n in table for n in ("n1", "n2", "n3")), table
        rows = {ln.split()[0]: ln.split() for ln in table.splitlines()[1:4]}
        assert (rows["n1"][2], rows["n2"][2], rows["n3"][2]) == ("-", "n1", "n2"), table
        # the secret: a 0600 file on the hosts, on no command line and in no environment
        secret_path = os.path.join(str(tmp_path), "remote", "t", "secret")
        assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
        with open(secret_path, "rb") as f:
            secret = f.read().strip()
        with open(os.path.join(str(tmp_path), "local", "t.secret"), "rb") as f:
            assert f.read().strip() == secret
        assert stat.S_IMODE(os.stat(os.path.join(str(tmp_path), "local", "t.secret")).st_mode) == 0o600
        for name, pid in pids.items():
            p = psutil.Process(pid)
            procs += [p] + p.children(recursive=True)
            for q in [p] + p.children(recursive=True):
                assert secret.decode() not in " ".join(q.cmdline()), f"secret on the command line of {name}"
            # (the node itself; what it hands its workers is the node's business, see issue #11/#12)
            assert secret.decode() not in "".join(p.environ().values()), f"secret in the env of {name}"
        with ClusterExecutor(ns=f"127.0.0.2:{_ns_port(path)}", secret=secret) as ex:
            def where(x):   # defined here: pickled by value (the hosts do not have the tests folder)
                from pydist import task_context

                return task_context().node

            seen = set(ex.map(where, range(40)))
            assert seen <= {"n1", "n2", "n3"} and seen
            st = ex.status()
            assert st["name"] == "n1"
        # up twice: the running cluster is reported, nothing is started twice
        r2 = pydist_cli("up", path)
        assert remote_pids(tmp_path, "t") == pids, r2.stdout + r2.stderr
    finally:
        d = pydist_cli("down", path)
    assert d.returncode == 0, d.stdout + d.stderr
    assert "n3: STOPPED" in d.stdout and "nameserver: STOPPED" in d.stdout, d.stdout
    wait_gone([p.pid for p in procs], 30, "the cluster's processes")
    assert not os.path.exists(os.path.join(str(tmp_path), "remote", "t", "secret"))
    d2 = pydist_cli("down", path)
    assert d2.returncode == 0 and "NOTRUNNING" in d2.stdout, d2.stdout + d2.stderr


def _ns_port(path) -> int:
    from pydist.up import load_spec

    return load_spec(path).ns_port


def test_version_mismatch_is_a_table_and_nothing_starts(sshd, tmp_path):
    fake = tmp_path / "oldpython"
    fake.write_text("#!/bin/sh\necho 'PYDIST-PROBE {\"python\": \"3.9.1\", \"pydist\": \"0.0.1\", "
                    "\"executable\": \"/old\"}'\n")
    fake.chmod(0o755)
    hosts = f"""
        [[hosts]]
        address = "127.0.0.2"
        user = "{sshd.user}"
        ssh_port = {sshd.port}
        name = "good"
        workers = 1

        [[hosts]]
        address = "127.0.0.3"
        user = "{sshd.user}"
        ssh_port = {sshd.port}
        name = "old"
        python = "{fake}"

        [[hosts]]
        address = "127.0.0.3"
        user = "{sshd.user}"
        ssh_port = {sshd.port}
        name = "nopython"
        python = "/no/such/python"
        """
    path = write_cluster(sshd, tmp_path, hosts, name="mm")
    r = pydist_cli("up", path)
    assert r.returncode != 0
    err = r.stderr
    assert "host" in err and "python" in err and "pydist" in err, err
    assert "Python 3.9.1 != %d.%d" % sys.version_info[:2] in err, err
    assert "pydist 0.0.1 !=" in err, err
    assert "nopython" in err and "/no/such/python" in err, err
    assert "good" not in err.split("problem", 1)[1], "a matching host is not listed as a mismatch"
    assert remote_pids(tmp_path, "mm") == {}, "nothing may start when versions do not match"


def test_unreachable_host_is_named(sshd, tmp_path):
    hosts = f"""
        [[hosts]]
        address = "127.0.0.5"
        user = "{sshd.user}"
        ssh_port = {sshd.port}
        """
    path = write_cluster(sshd, tmp_path, hosts, name="gone", ns_host="127.0.0.5")
    r = pydist_cli("up", path, timeout=120)
    assert r.returncode != 0
    assert "nothing was started" in r.stderr, r.stderr
    assert "127.0.0.5" in r.stderr and "refused" in r.stderr.lower(), r.stderr


def test_a_node_that_cannot_start_stops_the_rest(sshd, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.3", 0))
        busy.listen()
        port = busy.getsockname()[1]
        hosts = f"""
            [[hosts]]
            address = "127.0.0.2"
            user = "{sshd.user}"
            ssh_port = {sshd.port}
            name = "root"
            workers = 1

            [[hosts]]
            address = "127.0.0.3"
            user = "{sshd.user}"
            ssh_port = {sshd.port}
            name = "clash"
            port = {port}
            workers = 1
            """
        path = write_cluster(sshd, tmp_path, hosts, name="fail")
        r = pydist_cli("up", path)
    assert r.returncode != 0
    assert "clash" in r.stderr and "fail/clash.log" in r.stderr, r.stderr
    left = remote_pids(tmp_path, "fail")
    assert not [p for p in left.values() if _alive(p)], f"left running: {left}"


def test_a_name_server_port_in_use_is_reported(sshd, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.2", 0))
        busy.listen()
        port = busy.getsockname()[1]
        hosts = f"""
            [[hosts]]
            address = "127.0.0.2"
            user = "{sshd.user}"
            ssh_port = {sshd.port}
            workers = 1
            """
        path = write_cluster(sshd, tmp_path, hosts, name="nsbusy", ns_port=port)
        r = pydist_cli("up", path)
    assert r.returncode != 0
    assert "nameserver exited before it was ready" in r.stderr and "nsbusy/nameserver.log" in r.stderr, r.stderr
    left = remote_pids(tmp_path, "nsbusy")
    assert not [p for p in left.values() if _alive(p)], f"left running: {left}"


# ======================================================================================= the file
@pytest.mark.parametrize("text, message", [
    ("[cluster]\nname = 'x'\n", "no [[hosts]]"),
    ("[[hosts]]\nuser = 'a'\n", "address is missing"),
    ("[[hosts]]\naddress = 'a'\nworkers = 'many'\n", "workers must be int"),
    ("[[hosts]]\naddress = 'a'\ncolour = 1\n", "unknown key(s) ['colour']"),
    ("[[hosts]]\naddress = 'a'\n[[hosts]]\naddress = 'b'\nparent = 'zz'\n", "no host named 'zz'"),
    ("[[hosts]]\naddress = 'a'\n[[hosts]]\naddress = 'b'\nparent = 'c'\n[[hosts]]\naddress = 'c'\nparent = 'b'\n",
     "cycle"),
    ("[[hosts]]\naddress = 'a'\n[[hosts]]\naddress = 'a'\n", "unique"),
    ("[cluster]\nns = 'elsewhere:1'\n[[hosts]]\naddress = 'a'\n", "not one of the hosts"),
    ("[[hosts]\naddress = 'a'\n", "cannot read"),
    ("[[hosts]]\naddress = 'a'\nssh_port = 70000\n", "not a port"),
])
def test_bad_cluster_files_name_the_problem(tmp_path, text, message):
    from pydist.errors import ConfigError
    from pydist.up import load_spec

    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_spec(str(p))
    assert message in str(ei.value)
    assert "c.toml" in str(ei.value) or "cluster c" in str(ei.value)


def test_the_example_file_reads():
    from pydist.up import _levels, load_spec

    spec = load_spec(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                                  "cluster.toml"))
    assert spec.name == "lab" and spec.ns_address == "192.0.2.1:9090"
    assert [[h.name for h in w] for w in _levels(spec)] == [["head"], ["192.0.2.2"], ["192.0.2.3"]]


def test_host_names_are_resolved_and_loopback_names_refused_in_a_real_network(tmp_path):
    from pydist.errors import ConfigError
    from pydist.up import bind_addresses, load_spec

    p = tmp_path / "names.toml"
    p.write_text("[[hosts]]\naddress = 'localhost'\n[[hosts]]\naddress = '127.0.0.3'\n")
    assert bind_addresses(load_spec(str(p))) == {"localhost": "127.0.0.1", "127.0.0.3": "127.0.0.3"}
    p.write_text("[[hosts]]\naddress = '192.0.2.3'\n[[hosts]]\naddress = 'localhost'\n")
    with pytest.raises(ConfigError, match="localhost resolve.*loopback.*network IP"):
        bind_addresses(load_spec(str(p)))
    p.write_text("[[hosts]]\naddress = 'no-such-host.invalid'\n")
    with pytest.raises(ConfigError, match="cannot resolve no-such-host.invalid"):
        bind_addresses(load_spec(str(p)))


def test_aliases(tmp_path):
    from pydist.up import load_spec

    p = tmp_path / "al.toml"
    p.write_text("[cluster]\nssh_key = '/k0'\n[[host]]\naddress = 'me@h1'\n[[host]]\naddress = 'h2'\n"
                 "ssh_user = 'you'\nssh_key = '/k2'\nssh_options = ['-o', 'X=1']\n")
    spec = load_spec(str(p))
    assert [h.target for h in spec.hosts] == ["me@h1", "you@h2"]
    assert spec.ssh_options == ["-i", "/k0"] and spec.hosts[1].ssh_options == ["-i", "/k2", "-o", "X=1"]


def test_defaults_and_waves(tmp_path):
    from pydist.up import _levels, load_spec

    p = tmp_path / "lab.toml"
    p.write_text("[[hosts]]\naddress = 'h1'\n[[hosts]]\naddress = 'h2'\n[[hosts]]\naddress = 'h3'\nparent = 'h2'\n")
    spec = load_spec(str(p))
    assert spec.name == "lab" and spec.ns_address == "h1:9090"
    assert [h.parent for h in spec.hosts] == [None, "h1", "h2"]
    assert [[h.name for h in w] for w in _levels(spec)] == [["h1"], ["h2"], ["h3"]]
