"""The config file (issue #14, item 4): ``pydist.toml`` in the working directory or the user's config
folder, or ``--config FILE`` / ``PYDIST_CONFIG``; precedence CLI flag > env var > file > default; the
README's settings table is the one generated from the dataclasses."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pydist import security
from pydist.cluster import read_ready
from pydist.config import ClientConfig, NodeConfig, find_config_file, settings_table
from pydist.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


# ====================================================================================== precedence
def test_file_then_env_then_argument(tmp_path):
    f = write(tmp_path / "c.toml", "[node]\nworkers = 3\nheartbeat = 2\nname = 'filed'\n"
                                   "code_cache_max = '1G'\npeers = ['a:1']\n[client]\nconnect_timeout = 9\n")
    cfg = NodeConfig.from_env(environ={}, config_file=f)
    assert (cfg.workers, cfg.heartbeat, cfg.name, cfg.code_cache_max, cfg.peers) == (3, 2.0, "filed", 1 << 30, ["a:1"])
    cfg = NodeConfig.from_env(environ={"PYDIST_WORKERS": "2"}, config_file=f)
    assert (cfg.workers, cfg.heartbeat) == (2, 2.0)
    cfg = NodeConfig.from_env(environ={"PYDIST_WORKERS": "2"}, config_file=f, workers=1)
    assert cfg.workers == 1
    assert NodeConfig.from_env(environ={}, config_file=f, workers=None).workers == 3   # None: not given
    assert ClientConfig.from_env(environ={}, config_file=f).connect_timeout == 9.0
    assert ClientConfig.from_env(environ={"PYDIST_CONNECT_TIMEOUT": "4"}, config_file=f).connect_timeout == 4.0
    assert ClientConfig.from_env(environ={}, config_file=f, connect_timeout=1.5).connect_timeout == 1.5


def test_top_level_keys_apply_to_both_and_tables_win(tmp_path):
    f = write(tmp_path / "t.toml", "tls-ca = '/ca.pem'\nworkers = 4\nconnect_timeout = 3\n"
                                   "[client]\ntls_ca = '/client-ca.pem'\n")
    node = NodeConfig.from_env(environ={}, config_file=f)
    client = ClientConfig.from_env(environ={}, config_file=f)
    assert (node.tls_ca, node.workers) == ("/ca.pem", 4)
    assert (client.tls_ca, client.connect_timeout) == ("/client-ca.pem", 3.0)
    f = write(tmp_path / "u.toml", "colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        NodeConfig.from_env(environ={}, config_file=f)
    f = write(tmp_path / "s.toml", "secret = 'x'\n")
    with pytest.raises(ConfigError, match="do not put the secret"):
        ClientConfig.from_env(environ={}, config_file=f)


def test_where_the_file_is_found(tmp_path, monkeypatch):
    home_cfg = tmp_path / "xdg" / "pydist"
    home_cfg.mkdir(parents=True)
    user = write(home_cfg / "pydist.toml", "[node]\nworkers = 5\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert find_config_file(None, env) == user
    assert NodeConfig.from_env(environ=env).workers == 5
    local = write(work / "pydist.toml", "[node]\nworkers = 6\n")
    assert find_config_file(None, env) == local            # the working directory's comes first
    assert NodeConfig.from_env(environ=env).workers == 6
    other = write(tmp_path / "other.toml", "[node]\nworkers = 7\n")
    assert NodeConfig.from_env(environ=dict(env, PYDIST_CONFIG=other)).workers == 7
    assert NodeConfig.from_env(environ=dict(env, PYDIST_CONFIG=other), config_file=local).workers == 6
    assert find_config_file(None, {"XDG_CONFIG_HOME": str(tmp_path / "none")}) == local
    os.unlink(local)
    assert find_config_file(None, {"XDG_CONFIG_HOME": str(tmp_path / "none")}) is None


@pytest.mark.parametrize("text, message", [
    ("[node]\nworkers = 'four'\n", "[node] workers: expected int, got str 'four'"),
    ("[node]\ncolour = 1\n", "unknown setting 'colour'"),
    ("[nodes]\nworkers = 1\n", "unknown table(s) ['nodes']"),
    ("[node]\nsecret = 'abc'\n", "do not put the secret itself"),
    ("[client]\nsecret = 'abc'\n", "do not put the secret itself"),
    ("[node]\nworkers = \n", "not valid TOML"),
    ("[node]\ninsecure = 'yes'\n", "expected bool"),
    ("[node]\npeers = 'a:1'\n", "expected list of str"),
    ("[client]\npoll_interval = true\n", "expected float"),
    ("[node]\ncode_cache_max = 1.5\n", "expected a size"),
    ("node = 3\n", "[node] must be a table"),
])
def test_bad_files_name_the_file_table_and_key(tmp_path, text, message):
    f = write(tmp_path / "bad.toml", text)
    cls = ClientConfig if "[client]" in text else NodeConfig
    with pytest.raises(ConfigError) as ei:
        cls.from_env(environ={}, config_file=f)
    assert message in str(ei.value)
    assert "bad.toml" in str(ei.value)


def test_a_named_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        NodeConfig.from_env(environ={}, config_file=str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="PYDIST_CONFIG"):
        NodeConfig.from_env(environ={"PYDIST_CONFIG": str(tmp_path / "nope.toml")})


# ======================================================================================= processes
def _node(args, env, tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "pydist.cli", "node", "--watch-stdin", "--host", "127.0.0.1",
                          "--code-cache", str(tmp_path / "cache"), *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        addr = read_ready(p, 30)
        assert addr, p.stderr.read().decode() if p.poll() is not None else "no READY line"
        # a node without a secret uses this user's secret file (issue #11): read it as a client of that user would
        proxy = security.connect(addr, secret=security.user_secret(env=env), timeout=10)
        try:
            st = proxy.status()
        finally:
            proxy._pyroRelease()
        return st
    finally:
        p.stdin.close()
        p.terminate()
        p.wait(30)
        p.stdout.close()
        p.stderr.close()


def test_pydist_node_reads_config_file_env_and_flags_in_that_order(tmp_path):
    f = write(tmp_path / "n.toml", "[node]\nworkers = 2\nname = 'from-file'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDIST_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "no-user-config")
    st = _node(["--config", f], env, tmp_path)
    assert (st["name"], st["workers"]) == ("from-file", 2)
    st = _node(["--config", f], dict(env, PYDIST_WORKERS="1"), tmp_path)
    assert (st["name"], st["workers"]) == ("from-file", 1)
    st = _node(["--config", f, "--workers", "0", "--name", "flagged"], dict(env, PYDIST_WORKERS="1"), tmp_path)
    assert (st["name"], st["workers"]) == ("flagged", 0)


def test_pydist_node_bad_config_file_exits_with_the_reason(tmp_path):
    f = write(tmp_path / "n.toml", "[node]\nworkers = -3\nheartbeat = 'often'\n")
    r = subprocess.run([sys.executable, "-m", "pydist.cli", "node", "--config", f], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    assert "n.toml [node] heartbeat: expected float" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "pydist.cli", "--config", str(tmp_path / "missing.toml"), "status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing.toml" in r.stderr, r.stderr


# ========================================================================================== README
def test_readme_settings_table_is_the_generated_one():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    begin, end = "<!-- settings-table: python -m pydist.config -->", "<!-- /settings-table -->"
    assert begin in readme and end in readme, "the README lacks the settings table markers"
    table = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == settings_table(), ("the README's settings table is out of date: replace it with the "
                                       "output of `python -m pydist.config`")
