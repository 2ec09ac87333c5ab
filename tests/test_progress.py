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


# ===================================================== tqdm's own process_map machinery (issue #9, item 9)
def _tqdm_run(pool_cls, fn, items, **kw):
    """What ``tqdm.contrib.concurrent.process_map`` does, with ``pool_cls`` for ProcessPoolExecutor:
    ``_executor_map`` passes ``initializer=tqdm_class.set_lock, initargs=(a multiprocessing lock,)``,
    patches ``ex.submit`` to count each future and calls ``ex.map``.  Returns (results, final bar line)."""
    import io

    from tqdm import tqdm
    from tqdm.contrib.concurrent import _executor_map

    buf = io.StringIO()
    kw.setdefault("lock_name", "mp_lock")
    out = _executor_map(pool_cls, fn, items, tqdm_class=tqdm, file=buf, mininterval=0, miniters=1, **kw)
    return out, _final(buf.getvalue())


def _cluster_executor(cluster):
    def make(**kw):
        return pydist.ClusterExecutor(address=cluster.address, secret=cluster.secret, **kw)
    return make


def test_tqdm_executor_map_counts_every_call_with_a_cluster_executor(cluster):
    out, line = _tqdm_run(_cluster_executor(cluster), abs, range(-30, 0), max_workers=2)
    assert out == list(range(30, 0, -1))
    assert "30/30" in line, line


def test_tqdm_default_write_lock_as_initarg(cluster):
    """lock_name="" (thread_map's default) passes tqdm's whole TqdmDefaultWriteLock: it holds a
    multiprocessing RLock too, and works the same way."""
    out, line = _tqdm_run(_cluster_executor(cluster), abs, range(-12, 0), lock_name="", max_workers=2)
    assert out == list(range(12, 0, -1)) and "12/12" in line, line


def test_tqdm_counts_like_it_does_with_a_process_pool(cluster):
    """With chunksize, tqdm counts what it sees: one submit per chunk.  pydist counts the same as
    ProcessPoolExecutor does (tqdm's own behaviour, not ours to change), and the results agree."""
    from concurrent.futures import ProcessPoolExecutor

    ppe_out, ppe_line = _tqdm_run(ProcessPoolExecutor, abs, range(-20, 0), max_workers=2, chunksize=6)
    ours, line = _tqdm_run(_cluster_executor(cluster), abs, range(-20, 0), max_workers=2, chunksize=6)
    assert ours == ppe_out
    assert re.search(r"\d+/20", line).group(0) == re.search(r"\d+/20", ppe_line).group(0), (line, ppe_line)


def test_tqdm_process_map_with_cluster_executor_in_place_of_the_pool(cluster, monkeypatch):
    """process_map imports ProcessPoolExecutor when called: code that swaps in ClusterExecutor (a
    partial with the cluster's address) gets a counted bar."""
    import concurrent.futures
    import functools
    import io

    from tqdm import tqdm
    from tqdm.contrib.concurrent import process_map

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", functools.partial(
        pydist.ClusterExecutor, address=cluster.address, secret=cluster.secret))
    buf = io.StringIO()
    assert process_map(abs, range(-9, 0), max_workers=2, tqdm_class=tqdm, file=buf) == list(range(9, 0, -1))
    assert "9/9" in _final(buf.getvalue())


def _bar_in_a_task(n):
    from tqdm import tqdm

    return sum(tqdm(range(n), desc="inner", leave=False))


def test_tasks_that_draw_their_own_bars_after_tqdms_initializer(cluster):
    out, line = _tqdm_run(_cluster_executor(cluster), _bar_in_a_task, [3, 4, 5], max_workers=2)
    assert out == [3, 6, 10] and "3/3" in line, line


class _CountingExecutor(pydist.ClusterExecutor):
    submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        type(self).submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_map_goes_through_an_overridden_submit(cluster):
    """As concurrent.futures.Executor.map does: a subclass (or an instance attribute) replacing
    submit sees every call map makes (chunks: one per chunk)."""
    with _CountingExecutor(address=cluster.address, secret=cluster.secret) as ex:
        assert list(ex.map(abs, range(-7, 0))) == list(range(7, 0, -1))
        assert _CountingExecutor.submitted == 7
        assert list(ex.map(abs, range(-7, 0), chunksize=3)) == list(range(7, 0, -1))
        assert _CountingExecutor.submitted == 10


def test_a_multiprocessing_lock_for_another_initializer_is_still_refused_clearly(cluster):
    import multiprocessing

    with pytest.raises(pydist.errors.SerializationError, match="Manager"):
        pydist.ClusterExecutor(address=cluster.address, secret=cluster.secret, initializer=print,
                               initargs=(multiprocessing.Lock(),))
