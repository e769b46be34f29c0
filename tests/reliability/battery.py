"""The reliability battery: every failure case a user can cause (kills, damaged files, concurrent runs,
dead endpoints, bad arguments) as a test under tests/reliability/, run together with a table of cases.

    python tests/reliability/battery.py            # = make test-reliability
    python tests/reliability/battery.py -k lock    # extra arguments go to pytest

`make test` (CI) runs these tests with the rest of the suite; this script runs only them and says which
case held. Its exit status is pytest's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def cases(junit: Path) -> list[tuple[str, str, float]]:
    """(case, outcome, seconds) for every test case in a JUnit XML report."""
    rows = []
    for tc in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome = "FAILED" if child.tag == "failure" else "ERROR"
            elif child.tag == "skipped":
                outcome = "skipped"
        module = tc.get("classname", "").removeprefix("tests.reliability.")
        rows.append((f"{module}::{tc.get('name', '')}", outcome, float(tc.get("time", 0) or 0)))
    return rows


def table(rows: list[tuple[str, str, float]]) -> str:
    width = max([len("case"), *(len(r[0]) for r in rows)])
    lines = [f"{'case':<{width}}  {'result':<7}  seconds", f"{'-' * width}  {'-' * 7}  -------"]
    lines += [f"{name:<{width}}  {outcome:<7}  {secs:7.1f}" for name, outcome, secs in rows]
    counts: dict[str, int] = {}
    for _, outcome, _ in rows:
        counts[outcome] = counts.get(outcome, 0) + 1
    lines.append(f"{len(rows)} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="monoscope-battery-") as tmp:
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", str(HERE), f"--junitxml={junit}", *argv],
                             cwd=ROOT, env=env)
        rows = cases(junit) if junit.is_file() else []
    print()
    print(table(rows) if rows else "no reliability cases ran")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
