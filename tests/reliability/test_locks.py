"""One writer per folder: capture, train, features and explain refuse a second process naming the holder, and a
lock left by a killed process is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from monoscope.features.build import build_features, default_features_dir
from monoscope.interp.explain import explain_features
from monoscope.locking import LOCK_NAME, FolderLock, LockError
from monoscope.train import train
from tests.reliability import store_helpers
from tests.reliability.store_helpers import ENV, SMALL, cli, one_line_error, run_cli, write_corpus

model_dir = store_helpers.model_dir  # fixture


def _wait_for_lock(folder: Path, pid: int, proc: subprocess.Popen[str], timeout: float = 120) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            info = json.loads((folder / LOCK_NAME).read_text())
            if info.get("pid") == pid:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{folder} was never locked by pid {pid}")


def test_second_capture_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path: Path, model_dir: Path) -> None:
    corpus = write_corpus(tmp_path / "big.jsonl", n_docs=2000)
    out = tmp_path / "store"
    first = subprocess.Popen(cli("capture", "--out", out, "--model", model_dir, "--corpus", corpus,
                                 "--tokens", "1M", *SMALL),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = _wait_for_lock(out, first.pid, first)
        first.send_signal(signal.SIGSTOP)  # busy, as far as anyone else can tell: it still holds the lock
        assert info["command"].startswith("monoscope capture --out") and info["host"]
        before = sorted(p.name for p in out.iterdir())

        second = run_cli("capture", "--out", out, "--overwrite", "--hook", "resid_post.2", "--model", model_dir,
                         "--corpus", corpus, "--tokens", "64", *SMALL)
        one_line_error(second, f"{out} is in use by another monoscope process (pid {first.pid} on {info['host']}, "
                               f"started {info['started']}: monoscope capture --out {out}",
                       "wait for it to finish or stop it")
        assert sorted(p.name for p in out.iterdir()) == before  # --overwrite deleted nothing of the holder's
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # a stale lock file stays behind

    third = run_cli("capture", "--out", out, "--overwrite", "--hook", "resid_post.2", "--model", model_dir,
                    "--corpus", corpus, "--tokens", "64", *SMALL)
    assert third.returncode == 0, third.stderr
    assert (f"note: {out} was locked by a process that is no longer running (pid {first.pid} on "
            in third.stderr and "taking over" in third.stderr), third.stderr
    assert not (out / LOCK_NAME).exists()  # released at exit
    verify = run_cli("verify", out)
    assert verify.returncode == 0, verify.stderr
    assert json.loads((out / "manifest.json").read_text())["hook"] == "resid_post.2"


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A folder locked by another process (which sleeps until killed)."""
    folder = tmp_path / "held"
    code = ("import sys, time; from monoscope.locking import FolderLock; "
            "FolderLock(sys.argv[1], 'test').acquire(); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield folder, proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_train_features_and_explain_take_the_lock(held: tuple[Path, int], tmp_path: Path) -> None:
    folder, pid = held
    holder = rf"is in use by another monoscope process \(pid {pid} on .*: wait for it to finish"
    with pytest.raises(LockError, match=holder):
        train(folder, store=tmp_path / "no-store", arch="topk", k=4, width=16, tokens=1000)
    sae = tmp_path / "sae"
    features_dir = default_features_dir(sae)
    features_dir.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(folder, features_dir)  # the SAE's database folder is the held one
    with pytest.raises(LockError, match=holder):
        build_features(sae, tokens=1000)
    with pytest.raises(LockError, match=holder):
        explain_features(sae, "openai:none", endpoint="http://127.0.0.1:9")
    proc = run_cli("train", tmp_path / "no-store", "--out", folder, "--arch", "topk", "--k", "4", "--tokens", "100k")
    one_line_error(proc, f"is in use by another monoscope process (pid {pid} on ", "-c")


def test_lock_is_reentrant_released_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    with FolderLock(folder, "a"):
        with FolderLock(folder, "b"):  # the same process again (monoscope run, nested API calls)
            assert (folder / LOCK_NAME).is_file()
        assert (folder / LOCK_NAME).is_file()  # still held by the outer one
    assert not folder.exists()  # created for the lock and left empty: removed again
    (tmp_path / "kept").mkdir()
    with FolderLock(tmp_path / "kept"):
        (tmp_path / "kept" / "out.txt").write_text("work")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["out.txt"]


def test_stale_lock_file_from_dead_pid_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                "command": "monoscope train --out f",
                                                "started": "2026-01-01T00:00:00Z"}))
    with FolderLock(folder, "capture") as lock:
        assert lock.took_over is not None and lock.took_over["pid"] == dead.pid
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"was locked by a process that is no longer running (pid {dead.pid} on " in err
    assert "monoscope train --out f); taking over" in err
