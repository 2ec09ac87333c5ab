"""Progress bars: ``ClusterExecutor.map(..., progress=True)`` and ``pydist.progress(futures)``."""
import re
import sys

import pytest

import pydist
from pydist.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


def _final(err: str) -> str:
    return err.replace("\r", "\n").strip().splitlines()[-1]


def test_map_progress_counts_every_call_with_rate(executor, capsys):
    assert list(executor.map(abs, range(-50, 0), progress=True)) == list(range(50, 0, -1))
    line = _final(capsys.readouterr().err)
    assert "50/50" in line and re.search(r"call/s|s/call", line), line
    assert "abs" in line


def test_map_progress_with_chunks_counts_calls_not_chunks(executor, capsys):
    assert sum(executor.map(abs, range(-40, 0), chunksize=7, progress=True)) == sum(range(1, 41))
    assert "40/40" in _final(capsys.readouterr().err)


def test_progress_of_futures_waits_and_shows_eta(executor, capsys):
    futs = [executor.submit(pow, 2, k) for k in range(20)]
    out = pydist.progress(futs)
    assert out == futs and all(f.done() for f in futs)
    line = _final(capsys.readouterr().err)
    assert "20/20" in line and "<" in line, line   # elapsed<remaining


def test_progress_of_nothing(capsys):
    assert pydist.progress([]) == []


def test_without_tqdm_the_error_says_what_to_install(executor, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ConfigError, match=r"pydist\[progress\]"):
        executor.map(abs, [1], progress=True)
    with pytest.raises(ConfigError, match="tqdm"):
        pydist.progress([executor.submit(abs, 1)])
