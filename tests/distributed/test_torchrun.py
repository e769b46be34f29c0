"""`torchrun --nproc-per-node 2 -m monoscope train ...`: real torchrun, real worker processes.

A feature-sharded run matches one process (max abs diff <= 1e-5); a worker SIGKILLed mid-run makes
torchrun and every worker exit within 60 s with no process left behind; the rerun with --resume
ends bit-identical to the uninterrupted torchrun run; the flags are refused without torchrun."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from tests.distributed.helpers import (
    COMMON,
    alive,
    env,
    torchrun,
    torchrun_sharded_matches_one_process,
    train_args,
    weights,
)

STEPS = 240
SETTINGS = {**COMMON, "tokens": STEPS * 64, "checkpoint_every": 20}


def test_torchrun_sharded_matches_one_process_and_resumes_after_a_killed_worker(store: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    torchrun_sharded_matches_one_process(store, tmp_path, SETTINGS, full)

    out = tmp_path / "sae"
    argv = ["train", *train_args(store, out, SETTINGS, "--shard-features", "2", "--dist-timeout", "30")]
    proc = subprocess.Popen(torchrun(2, argv), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not any((p / "COMPLETE").is_file() for p in (out / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.005)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "monoscope" in " ".join(c.cmdline())]
    assert len(workers) == 2
    pids = [proc.pid, *(w.pid for w in workers)]
    assert proc.poll() is None, "the run finished before it could be killed: give it more steps"
    workers[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 60
    assert proc.returncode != 0
    assert "error: rank 0 of 2: a collective failed during step " in err, err[-3000:]  # the survivor, one line
    assert "ChildFailedError" in err  # torchrun's own summary names the killed worker
    time.sleep(0.5)
    assert alive(pids) == []

    res = subprocess.run(torchrun(2, [*argv, "--resume"]), env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = weights(full), weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_distributed_flags_without_torchrun(store: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "monoscope", "train",
                          *train_args(store, tmp_path / "x", COMMON, "--shard-features", "2")],
                         env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: --shard-features/--dist-timeout need several processes: launch with "
                                  "`torchrun --nproc-per-node N -m monoscope train ...` (N a multiple of "
                                  "--shard-features 2)")


def test_single_process_commands_refuse_torchrun(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "monoscope", "eval", str(tmp_path / "sae"), "--acts", str(tmp_path)],
                         env=env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: monoscope eval runs in one process: launch it without torchrun (torchrun "
                                  "runs train, capture, features)")
