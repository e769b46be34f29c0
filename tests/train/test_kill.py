"""The real `monoscope train` in a child process: SIGKILL mid-run and SIGTERM, then --resume, end
bit-identical (weights, Adam state, dead counters, log) to an uninterrupted run on CPU."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from monoscope.train import train
from tests.train.helpers import assert_same_state, child_env, cli, make_store, wait_for_checkpoint

STEPS = 300
RUNS: dict[str, dict[str, Any]] = {
    # topk: AuxK on dead latents (dead window of 4 batches), unit-norm decoder
    "topk": {"arch": "topk", "k": 4, "dead_window": 256},
    # relu-l1: λ warm-up, resampling at 20/40/60% with a one-batch dead window
    "relu-l1": {"arch": "relu-l1", "sparsity_coef": 5.0, "dead_window": 64},
    # matryoshka: batch top-k with its running threshold, nested prefix losses, AuxK, and the threshold
    # calibration after the last step (from batches after the saved cursor)
    "matryoshka": {"arch": "matryoshka", "k": 4, "dead_window": 256, "prefixes": "8,32,128"},
    # gated: unconstrained decoder, λ warm-up, r_mag/b_mag in the Adam state
    "gated": {"arch": "gated", "sparsity_coef": 5.0},
}
COMMON: dict[str, Any] = {"width": "4x", "tokens": STEPS * 64, "batch_size": 64, "lr": 3e-3, "checkpoint_every": 25,
                          "log_every": 10, "progress": False}


def args(store: Path, out: Path, run: dict[str, Any], *extra: str) -> list[str]:
    opts = {**COMMON, **run}
    del opts["progress"]
    flat = [str(store), "--out", str(out), "--quiet", *extra]
    for k, v in opts.items():
        flat += ["--l1" if k == "sparsity_coef" else "--" + k.replace("_", "-"), str(v)]
    return cli(*flat)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("acts") / "store"
    make_store(folder)
    return folder


def reference(store: Path, out: Path, run: dict[str, Any]) -> Path:
    """The uninterrupted run, in process (one thread, like the children); prefixes as the CLI's text."""
    train(out, store=store, **COMMON, **run)
    return out


def kill_then_resume(store: Path, out: Path, run: dict[str, Any], ref: Path) -> None:
    """The real `monoscope train` SIGKILLed past its first checkpoint, then `--resume`: ends as `ref`."""
    proc = subprocess.Popen(args(store, out, run), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, out / "checkpoints")
    time.sleep(0.3)  # let it run past the checkpoint: those steps are lost and must be redone identically
    assert proc.poll() is None, "the run finished before it could be killed: give it more steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "sae.safetensors").exists()
    done = subprocess.run(args(store, out, run, "--resume"), env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed at step" in done.stdout
    assert_same_state(out, ref)


@pytest.mark.parametrize("name", ["topk", "relu-l1", "matryoshka", "gated"])
def test_sigkill_mid_run_then_resume_is_bit_identical(store: Path, tmp_path: Path, name: str) -> None:
    run = RUNS[name]
    ref = reference(store, tmp_path / "ref", run)
    out = tmp_path / "sae"
    kill_then_resume(store, out, run, ref)


def test_sigterm_saves_exits_cleanly_and_resumes_identically(store: Path, tmp_path: Path) -> None:
    run = RUNS["topk"]
    ref = reference(store, tmp_path / "ref", run)
    out = tmp_path / "sae"
    proc = subprocess.Popen(args(store, out, run), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, out / "checkpoints")
    time.sleep(0.1)
    assert proc.poll() is None, "the run finished before SIGTERM: give it more steps"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by signal 15 after step ")
    assert "--resume" in lines[0]
    step = int(lines[0].split("after step ")[1].split()[0])
    assert (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file()  # saved at the very step it stopped
    done = subprocess.run(args(store, out, run, "--resume"), env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resumed at step {step:,}" in done.stdout
    assert_same_state(out, ref)
