"""The reliability battery's table is read from pytest's own report: a failed case shows as FAILED."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.reliability.battery import cases, table


def test_battery_table_reports_each_case(tmp_path: Path) -> None:
    (tmp_path / "test_cases.py").write_text(
        "import pytest\n"
        "def test_holds():\n    assert True\n"
        "def test_breaks():\n    assert 1 == 2\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n")
    junit = tmp_path / "junit.xml"
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
                          f"--junitxml={junit}", "--rootdir", str(tmp_path)], cwd=tmp_path,
                         stdout=subprocess.DEVNULL)
    assert rc == 1
    rows = cases(junit)
    assert [(name.split("::")[-1], outcome) for name, outcome, _ in rows] == [
        ("test_holds", "passed"), ("test_breaks", "FAILED"), ("test_skipped", "skipped")]
    text = table(rows).splitlines()
    assert text[0].startswith("case") and text[-1] == "3 cases: 1 FAILED, 1 passed, 1 skipped"
