"""The task-group examples of the README run as written (each checks its own answer)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", ["comm_ring.py", "comm_jacobi.py", "comm_train.py"])
def test_comm_example_runs(name, proc_guard):
    p = subprocess.run([sys.executable, os.path.join(REPO, "examples", name), "3"], capture_output=True,
                       text=True, timeout=180, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ranks" in p.stdout
