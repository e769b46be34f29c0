"""Run `monoscope` the way a user does: a child process, its exit code and the last line of stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def monoscope(*args: str, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`monoscope ARGS` in a child process with this checkout's sources first on the path."""
    path = os.pathsep.join([str(SRC), str(SRC.parent), os.environ.get("PYTHONPATH", "")])
    child_env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                 "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "monoscope.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The error line of a failed command; fails the test on a traceback or a multi-line error."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]
