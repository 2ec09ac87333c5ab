"""Running a whole script file as a task (``ClusterExecutor.submit_script``).

The script's *content* travels with the task, so the node need not have the file; it is written to a
private temporary folder and run with the node's Python.  Kept apart from the executor so that a
worker unpickling ``run_script`` imports nothing heavy.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class ScriptResult:
    """What a script run returned: ``returncode``, ``stdout``, ``stderr`` (str) and the ``node`` name."""

    returncode: int
    stdout: str
    stderr: str
    node: str


class ScriptTimeout(TimeoutError):
    """A script ran past its ``timeout``; it was killed.  ``stdout``/``stderr`` hold what it wrote."""

    def __init__(self, msg: str, stdout: str = "", stderr: str = ""):
        super().__init__(msg)
        self.stdout = stdout
        self.stderr = stderr


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


def run_script(source: bytes, filename: str, args: Sequence[str], cwd: Optional[str],
               env: Optional[dict], timeout: Optional[float]) -> ScriptResult:
    """Run ``source`` as a Python script in a subprocess (inside a worker)."""
    from .workers import task_context

    try:
        node = task_context().node
    except RuntimeError:
        node = ""
    with tempfile.TemporaryDirectory(prefix="pydist-script-") as tmp:
        path = os.path.join(tmp, os.path.basename(filename) or "script.py")
        with open(path, "wb") as f:
            f.write(source)
        full_env = dict(os.environ)
        if env:
            full_env.update({str(k): str(v) for k, v in env.items()})
        # the script imports what the task could: the executor's bundle and the pinned ones
        from .codesync import active_paths

        code = active_paths()
        if code:
            full_env["PYTHONPATH"] = os.pathsep.join(code + [p for p in [full_env.get("PYTHONPATH")] if p])
        if cwd is not None and not os.path.isdir(cwd):
            raise FileNotFoundError(f"script working directory {cwd!r} does not exist on node {node}")
        try:
            p = subprocess.run([sys.executable, path, *map(str, args)], cwd=cwd or tmp, env=full_env,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ScriptTimeout(f"script {filename} ran longer than {timeout} s on node {node} and was killed",
                                _text(exc.stdout), _text(exc.stderr)) from None
    return ScriptResult(p.returncode, _text(p.stdout), _text(p.stderr), node)
