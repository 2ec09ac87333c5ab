"""The chaos soak itself (``python -m pydist.chaos``): a short run passes and prints every figure."""
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.timeout(300), pytest.mark.one_python]


def test_short_chaos_soak_passes_and_reports():
    out = subprocess.run([sys.executable, "-m", "pydist.chaos", "--minutes", "0.25", "--seed", "3",
                          "--fault-every", "1"], capture_output=True, text=True, timeout=280)
    text = out.stdout
    assert out.returncode == 0, text + out.stderr[-3000:]
    for name in ("tasks", "faults", "ok", "WorkerLost", "wrong", "resolved twice", "hung", "final batch"):
        assert re.search(rf"^{name}: ", text, re.M), (name, text)
    assert re.search(r"^wrong: 0$", text, re.M) and re.search(r"^resolved twice: 0$", text, re.M)
    assert re.search(r"^hung: 0$", text, re.M)
    assert int(re.search(r"^tasks: (\d+)", text, re.M).group(1)) > 100
    assert "chaos: OK" in text


def test_chaos_refuses_nonsense_arguments():
    out = subprocess.run([sys.executable, "-m", "pydist.chaos", "--minutes", "0"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "--minutes" in out.stderr
