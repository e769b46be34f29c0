"""`monoscope explain` against endpoints that fail: a dead one exits non-zero with the reason, a hanging one
is reported attempt by attempt and stopped after a few timeouts in a row, a flaky one is retried and
reported. Real `monoscope explain` processes against a local fault server on 127.0.0.1."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interp.conftest import FaultServer
from tests.interp.test_scorers import build_db
from tests.reliability.helpers import monoscope, one_line_error


@pytest.fixture
def sae_dir(tmp_path: Path) -> Path:
    """A run folder whose feature database holds features 0-2 with examples (3 is dead)."""
    build_db(tmp_path / "run" / "features" / "features.db").close()
    return tmp_path / "run" / "sae"


@pytest.fixture
def server() -> Iterator[FaultServer]:
    fs = FaultServer()
    yield fs
    fs.close()


def _explain(sae_dir: Path, url: str, *args: str) -> list[str]:
    return ["explain", str(sae_dir), "--llm", "openai:m", "--endpoint", url, "--scorers", "none", "--no-cache",
            "--quiet", *args]


def test_unreachable_endpoint_exits_non_zero_with_the_reason(sae_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    proc = monoscope(*_explain(sae_dir, url, "--features", "0,1,2", "--retries", "0"))
    err = one_line_error(proc)
    assert "explained 0 of 3 features" in proc.stdout and "3 failed" in proc.stdout
    assert err.startswith(f"error: all 3 explanation requests to m at {url} failed (last: connection failed (")
    assert "Connection refused" in err and err.endswith("check --llm and --endpoint, and that the server is up")


def test_hanging_endpoint_reports_each_attempt_and_stops(sae_dir: Path, server: FaultServer) -> None:
    server.hang_s = 20.0
    server.script("hang", "hang", "hang", "hang")
    t0 = time.monotonic()
    proc = monoscope(*_explain(sae_dir, server.url, "--features", "0,1,2", "--timeout", "1", "--retries", "1",
                               "--concurrency", "1"))
    took = time.monotonic() - t0
    err = one_line_error(proc)
    assert err == (f"error: stopped during explanations: {server.url} did not answer 3 attempts in a row within 1 s "
                   "each; 0 of 3 features explained so far are stored: check that the server answers (or raise "
                   "--timeout), then run the same command again")
    assert f"waiting for {server.url}: attempt 1/2 timed out after 1 s; retrying in " in proc.stderr
    assert f"{server.url}: attempt 2/2 timed out after 1 s; giving up on this request" in proc.stderr
    assert server.requests == 3  # the third feature was never sent
    assert took < 60  # not 6 attempts x 120 s per feature


def test_a_retried_failure_is_reported_and_the_run_succeeds(sae_dir: Path, server: FaultServer) -> None:
    server.script("503")
    proc = monoscope(*_explain(sae_dir, server.url, "--features", "0,", "--retries", "2"))
    assert proc.returncode == 0, proc.stderr
    assert f"waiting for {server.url}: attempt 1/3 HTTP 503: scripted 503; retrying in " in proc.stderr
    assert "explained 1 of 1 features" in proc.stdout and server.requests == 2


def test_bad_timeout_and_retries_are_one_line_errors(sae_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from monoscope.cli import main

    for args, msg in ((["--timeout", "0"], "error: --timeout 0.0: use a positive number of seconds per attempt "
                                           "(e.g. 60)"),
                      (["--retries", "-1"], "error: --retries -1: use 0 or more retries of a failed request (e.g. 2)")):
        assert main(_explain(sae_dir, "http://127.0.0.1:9/v1", *args)) == 2
        assert capsys.readouterr().err.strip() == msg


def test_a_silent_endpoint_is_reported_while_waiting(server: FaultServer) -> None:
    """Before the timeout: a "still waiting" line every heartbeat, so a hang is visible at once."""
    from monoscope.interp.llm import ChatRequest, open_llm

    server.hang_s = 5.0
    server.script("hang")
    lines: list[str] = []
    with open_llm("openai:m", endpoint=server.url, timeout_s=1.0, retries=0, notify=lines.append) as llm:
        llm.heartbeat_s = 0.4
        r = llm.chat(ChatRequest.user("hi", max_tokens=4))
    assert r.error == "timed out after 1 s (after 1 attempt)"
    beats = [ln for ln in lines if ln.startswith("still waiting")]
    assert beats and all(re.fullmatch(rf"still waiting for {re.escape(server.url)}: attempt 1/1, [01] s of 1 s", b)
                         for b in beats)
    assert lines[-1] == f"{server.url}: attempt 1/1 timed out after 1 s; giving up on this request"
