"""Task output at the client (issue #13): print/logging/warnings of a task, forwarded with node, worker and
task; in order per task; remote tracebacks and warnings name the client's file and show its lines;
``pydist status --tasks`` shows running tasks with their last output lines."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import pytest

from pydist import ClusterExecutor
from pydist.output import MAX_BYTES
from conftest import gated, wait_for

pytestmark = pytest.mark.timeout(90)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chatty(x):
    for i in range(50):
        print(f"line {i} of task {x}")
    print(f"err of {x}", file=sys.stderr)
    logging.getLogger("chatty.task").warning("careful with %s", x)
    return x


def quiet(x):
    return x


def test_output_reaches_the_client_with_node_worker_task(cluster, capsys, caplog):
    with ClusterExecutor(cluster.address, forward_output=True) as ex:
        with caplog.at_level(logging.WARNING, logger="chatty.task"):
            futs = [ex.submit(chatty, k) for k in range(4)]
            assert [f.result(timeout=30) for f in futs] == [0, 1, 2, 3]
            tids = [f._pydist_tid for f in futs]
    out, err = capsys.readouterr()
    for k, tid in enumerate(tids):
        mine = [ln for ln in out.splitlines() if f" {tid}]" in ln]
        assert len(mine) == 50, out[:2000]
        assert re.match(r"\[node0/w\d [^\]]+\] line 0 of task", mine[0]), mine[0]
        assert [int(ln.split("line ")[1].split()[0]) for ln in mine] == list(range(50))   # in order
        assert f"[node0/w" in err and f"{tid}] err of {k}" in err
    recs = [r for r in caplog.records if r.name == "chatty.task"]
    assert len(recs) == 4 and all(r.levelno == logging.WARNING for r in recs)
    assert any("careful with 2" in r.getMessage() and "node0/w" in r.getMessage() for r in recs)


def test_off_by_default_for_a_running_cluster(executor, capsys):
    assert executor.submit(chatty, 9).result(timeout=30) == 9
    out, err = capsys.readouterr()
    assert "line 0 of task 9" not in out + err


def test_embedded_cluster_forwards_by_default(tmp_path):
    script = tmp_path / "emb.py"
    script.write_text("import sys\nfrom pydist import ClusterExecutor\n"
                      "def hi(x):\n    print('hi from', x)\n    print('oops', x, file=sys.stderr)\n    return x\n"
                      "with ClusterExecutor(max_workers=1) as ex:\n    print(ex.submit(hi, 5).result())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=80, env=env)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\[node0/w0 \S+\] hi from 5$", r.stdout, re.M), r.stdout
    assert r.stdout.strip().endswith("5")
    assert re.search(r"^\[node0/w0 \S+\] oops 5$", r.stderr, re.M), r.stderr


def test_huge_output_is_bounded(cluster, capsys):
    def flood():
        sys.stdout.write("x" * (MAX_BYTES + 1000) + "\n")
        print("after")
        return 1
    with ClusterExecutor(cluster.address, forward_output=True) as ex:
        assert ex.submit(flood).result(timeout=30) == 1
    out, err = capsys.readouterr()
    assert "bytes of output dropped" in err and "x" * 1000 in out


def test_silent_tasks_are_not_slowed(cluster):
    """Forwarding costs a task that prints nothing nothing measurable (the result is sent unchanged)."""
    def run(forward):
        with ClusterExecutor(cluster.address, forward_output=forward) as ex:
            list(ex.map(quiet, range(200)))
            t0 = time.perf_counter()
            list(ex.map(quiet, range(2000)))
            return time.perf_counter() - t0
    off = min(run(False) for _ in range(2))
    on = min(run(True) for _ in range(2))
    print(f"\n2000 silent tasks: forward_output off {off:.3f} s, on {on:.3f} s")
    assert on < off * 1.5 + 0.2


def test_tracebacks_and_warnings_name_the_clients_file_and_lines(tmp_path):
    """A task defined in a script that is gone from disk (as on another machine) still shows its lines."""
    script = tmp_path / "gone.py"
    script.write_text(
        "import linecache, os, sys, warnings\n"
        "from pydist import ClusterExecutor\n"
        "def task(x):\n"
        "    warnings.warn('deprecated thing')\n"
        "    raise KeyError('the line that failed')\n"
        "linecache.getlines(__file__)\n"
        "os.rename(__file__, __file__ + '.moved')   # the workers cannot read it\n"
        "with ClusterExecutor(max_workers=1) as ex:\n"
        "    try:\n"
        "        ex.submit(task, 1).result()\n"
        "    except KeyError as e:\n"
        "        print(e.__cause__)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=80, env=env)
    assert r.returncode == 0, r.stderr
    assert "<dynamic-code>" not in r.stdout + r.stderr
    assert f'File "{script}", line 5, in task' in r.stdout, r.stdout
    assert "raise KeyError('the line that failed')" in r.stdout
    assert f"{script}:4: UserWarning: deprecated thing" in r.stderr, r.stderr


def test_status_tasks_lists_running_tasks_and_their_last_lines(cluster, gate, tmp_path):
    def talk_then_wait(gate_path, started):
        print("warming up")
        print("step 7 of 9", flush=True)
        return gated(gate_path, "ok", started)
    with ClusterExecutor(cluster.address) as ex:
        fut = ex.submit(talk_then_wait, gate.path, gate.started("t"))
        wait_for(lambda: os.path.exists(gate.started("t")), 30, "the task to start")
        env = dict(os.environ, PYDIST_SECRET=cluster.secret.decode())
        r = subprocess.run([sys.executable, "-m", "pydist.cli", "status", "--node", cluster.address, "--tasks"],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        assert "talk_then_wait" in r.stdout and fut._pydist_tid in r.stdout, r.stdout
        assert "| step 7 of 9" in r.stdout and "| warming up" in r.stdout, r.stdout
        gate.open()
        assert fut.result(timeout=30) == "ok"


def test_bytes_written_to_stdout_buffer_are_captured(cluster, capsys):
    def raw():
        sys.stdout.buffer.write("bytes \u00e9\n".encode())
        sys.stdout.buffer.flush()
        return sys.stdout.isatty()
    with ClusterExecutor(cluster.address, forward_output=True) as ex:
        assert ex.submit(raw).result(timeout=30) is False
    assert "] bytes \u00e9" in capsys.readouterr().out
