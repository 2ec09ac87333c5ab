"""The settings table: defaults, PYDIST_* variables, explicit values; secrets and sizes."""
import pytest

from pydist.config import ClientConfig, ConfigError, NodeConfig, parse_size
from pydist.cli import _node_parser

pytestmark = pytest.mark.timeout(30)


def test_precedence_default_env_explicit():
    env = {"PYDIST_WORKERS": "3", "PYDIST_MAX_HOPS": "4", "PYDIST_PEERS": "a:1, b:2", "PYDIST_INSECURE": "yes"}
    cfg = NodeConfig.from_env(env)
    assert (cfg.workers, cfg.max_hops, cfg.peers, cfg.insecure) == (3, 4, ["a:1", "b:2"], True)
    assert NodeConfig.from_env(env, workers=5, max_hops=None).workers == 5      # None means "not given"
    assert NodeConfig.from_env({}).max_hops == 8


def test_bad_values_name_the_variable():
    with pytest.raises(ConfigError, match="PYDIST_WORKERS"):
        NodeConfig.from_env({"PYDIST_WORKERS": "many"})
    with pytest.raises(ConfigError, match="max_hops"):
        NodeConfig(max_hops=0)


def test_sizes():
    assert parse_size("512M") == 512 << 20 and parse_size("2G") == 2 << 30 and parse_size(1000) == 1000
    with pytest.raises(ConfigError, match="size"):
        parse_size("lots")


def test_secrets_are_stripped_the_same_way_everywhere(tmp_path):
    f = tmp_path / "secret"
    f.write_text("s3cret\n")
    assert NodeConfig(secret_file=str(f)).secret == b"s3cret"
    assert ClientConfig(secret=f.read_text()).secret == b"s3cret"         # open().read() keeps the newline
    with pytest.raises(ConfigError, match="empty"):
        ClientConfig(secret=" \n")


def test_every_flag_comes_from_the_table():
    flags = {a.option_strings[0] for a in _node_parser()._actions if a.option_strings}
    for f in ("--host", "--port", "--name", "--workers", "--ns", "--parent", "--peer", "--max-hops",
              "--heartbeat", "--heartbeat-timeout", "--secret-file", "--insecure", "--tls-cert", "--tls-key",
              "--tls-ca", "--max-message-size", "--code-cache", "--code-cache-max", "--client-lease"):
        assert f in flags
    a = _node_parser().parse_args(["--peer", "x:1", "--peer", "y:2", "--code-cache-max", "1G"])
    assert a.peers == ["x:1", "y:2"] and NodeConfig(code_cache_max=a.code_cache_max).code_cache_max == 1 << 30
