"""`monoscope sweep` end to end on a tiny synthetic store: grid, fits, pick, resume, errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from monoscope.errors import MonoscopeError
from monoscope.scaling import SweepConfig, sweep
from tests.train.helpers import make_store

SRC = str(Path(__file__).resolve().parents[2] / "src")
GRID: dict[str, Any] = {"widths": (32, 64, 128), "tokens": (256, 512, 1024), "seeds": (0, 1), "k": 4,
                        "batch_size": 64, "bootstrap": 10, "progress": False, "threads": 1}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep") / "acts"
    make_store(folder, n_shards=4, contexts=16, ctx_len=17)  # 3 shards train (768 rows), 1 held out (256)
    return folder


@pytest.fixture(scope="module")
def done(store: Path) -> tuple[Any, Path]:
    out = store.parent / "sweep"
    return sweep(store, "1e8", out, **GRID), out


def test_sweep_grid_fits_and_pick(done: tuple[Any, Path]) -> None:
    res, out = done
    assert res.trained == 30 and res.reused == 0  # 3x3x2 for L(n,T) + 3 widths x 2 more k x 2 seeds for L(n,k)
    data = json.loads((out / "sweep.json").read_text())
    assert data["format"] == "monoscope-sweep/1"
    assert len(data["points"]) == 30
    assert data["heldout"]["rows"] == 256 and data["heldout"]["shards"] == ["shard-00003.safetensors"]
    # the training view holds the other three shards only
    view = json.loads((out / "train-store" / "manifest.json").read_text())
    assert [s["file"] for s in view["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    h = data["holdout"]
    assert (h["width"], h["tokens"], h["seeds"]) == (128, 1024, 2)
    assert h["relative_error"] == pytest.approx((h["predicted"] - h["measured"]) / h["measured"])
    # golden values of this deterministic fp32 CPU run (one thread)
    first = next(p for p in data["points"] if p["name"] == "n32-t256-k4-s0")
    assert first["heldout"]["fvu"] == pytest.approx(GOLDEN_FVU, abs=1e-4)
    assert data["fit_L_n_T"]["params"]["alpha"] == pytest.approx(GOLDEN_ALPHA, abs=1e-3)
    assert data["fit_L_n_k"] is not None and data["fit_L_n_k"]["points"] == 18
    p = data["pick"]
    assert p["cost"] <= 1e8 and p["flops"] <= 1e8
    assert p["tokens"] == p["steps"] * 64
    assert p["interval_90"][0] < p["interval_90"][1]
    assert data["cost_model"]["measured"] and data["cost_model"]["slope_s"] > 0
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any((out / "runs").glob("*/checkpoints"))  # removed once a point is done


GOLDEN_FVU = 0.67323
GOLDEN_ALPHA = 0.69166


def test_rerun_is_a_noop(done: tuple[Any, Path]) -> None:
    res, out = done
    weights = sorted((out / "runs").glob("*/sae.safetensors"))
    before = {w: w.stat().st_mtime_ns for w in weights}
    again = sweep(out.parent / "acts", "1e8", out, **GRID)
    assert (again.trained, again.reused) == (0, 30)
    assert {w: w.stat().st_mtime_ns for w in weights} == before
    assert [p["heldout"] for p in again.points] == [p["heldout"] for p in res.points]
    assert again.pick.width == res.pick.width and again.pick.steps == res.pick.steps


def test_time_budget_and_lost_point(done: tuple[Any, Path]) -> None:
    _, out = done
    lost = out / "runs" / "n64-t512-k4-s1" / "point.json"
    fvu = json.loads(lost.read_text())["heldout"]["fvu"]
    lost.unlink()  # e.g. killed between the SAE and its point.json: evaluated again, not retrained
    again = sweep(out.parent / "acts", "3s", out, **GRID)
    assert again.trained == 1 and again.reused == 29
    assert json.loads(lost.read_text())["heldout"]["fvu"] == fvu
    assert again.budget.kind == "seconds"
    assert again.pick.cost <= 3.0
    assert again.cost.seconds(again.pick.width, again.pick.tokens) == pytest.approx(again.pick.cost)


@pytest.mark.parametrize(("settings", "msg"), [
    ({"widths": (32, 64)}, "--widths 32,64: give at least 3 distinct widths (e.g. 1x,2x,4x)"),
    ({"tokens": (32, 512, 1024)}, "--tokens 32 is less than one batch of 64: raise it or lower --batch-size"),
    ({"tokens": ("1k", "1k", "2k")}, "--tokens 1000,1000,2000: give at least 3 distinct token counts"),
    ({"seeds": (0, 0)}, "--seeds (0, 0): give distinct integers >= 0, e.g. 0,1"),
    ({"arch": "relu-l1", "ks": (1, 2, 3)}, None),  # ks dropped for a non-topk arch: no error
    ({"arch": "batchtopk", "ks": (2, 4, 8)}, "--ks applies to --arch topk (Gao et al.'s L(n, k)), not batchtopk"),
    ({"ks": (2, 4)}, "--ks 2,4: give at least 3 distinct positive k (or none)"),
    ({"heldout_shards": 0}, "--heldout-shards 0: at least 1 shard must be held out"),
    ({"metric": "ce"}, "--metric 'ce': use fvu or mse"),
])
def test_config_errors(settings: dict[str, Any], msg: str | None) -> None:
    kw = {**GRID, **settings}
    if msg is None:
        SweepConfig(**kw)
        return
    with pytest.raises(MonoscopeError) as e:
        SweepConfig(**kw)
    assert str(e.value).startswith(msg)


def test_store_and_budget_errors(store: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    make_store(one, n_shards=1, contexts=16, ctx_len=17)
    with pytest.raises(MonoscopeError, match=r"has 1 shard\(s\): holding out 1 leaves none to train on; capture more "
                                             r"tokens or lower --heldout-shards"):
        sweep(one, "1e8", tmp_path / "o1", **GRID)
    with pytest.raises(MonoscopeError, match=r"^--k 40 is more than the narrowest width's 32 features"):
        sweep(store, "1e8", tmp_path / "o2", **{**GRID, "k": 40})
    with pytest.raises(MonoscopeError, match=r"^--budget 'soon' is neither FLOPs nor a duration"):
        sweep(store, "soon", tmp_path / "o3", **GRID)
    assert not (tmp_path / "o3").exists()  # refused before any work


def test_cli_subprocess(done: tuple[Any, Path], tmp_path: Path) -> None:
    _, out = done
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy, symlinks=True)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "monoscope.cli", "sweep", str(out.parent / "acts"), "--out", str(copy),
            "--widths", "32,64,128", "--tokens", "256,512,1024", "--k", "4", "--batch-size", "64",
            "--bootstrap", "10", "--threads", "1", "--quiet"]
    r = subprocess.run([*base, "--budget", "5e7"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "grid: 30 runs (0 trained now, 30 reused)" in r.stdout
    assert "pick for 5e7: width " in r.stdout
    assert json.loads((copy / "sweep.json").read_text())["pick"]["cost"] <= 5e7
    r = subprocess.run([*base, "--budget", "tomorrow"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: --budget 'tomorrow' is neither FLOPs nor a duration: give FLOPs (3e15, "
                                "2.5PFLOP) or a wall time (90s, 20m, 1.5h, 1h30m)")
    r = subprocess.run([*base[:7], "--widths", "1x,2x", "--budget", "1e8"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2
    assert r.stderr.startswith("error: --widths 1x,2x: give at least 3 distinct widths")


def test_threads_setting_is_restored(done: tuple[Any, Path], tmp_path: Path) -> None:
    """`threads=` holds for the sweep's own work only: the caller's torch thread count comes back,
    after a finished sweep and after a failed one."""
    import torch

    _, out = done
    torch.set_num_threads(2)  # the one_thread fixture restores the original afterwards
    sweep(out.parent / "acts", "1e8", out, **GRID)  # threads=1 inside
    assert torch.get_num_threads() == 2
    with pytest.raises(MonoscopeError):
        sweep(tmp_path / "no-store", "1e8", tmp_path / "sw", **GRID)
    assert torch.get_num_threads() == 2


def test_interrupted_sweep_says_rerun_not_resume(done: tuple[Any, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal during a point stops the sweep with advice that works: `monoscope sweep` has no --resume,
    the same command continues it."""
    from monoscope.train.trainer import Trainer, TrainingInterrupted

    _, done_out = done
    out = tmp_path / "sweep"
    out.mkdir()
    shutil.copy(done_out / "cost.json", out / "cost.json")  # same cost key: no benchmark here
    real_step = Trainer.train_step

    def step_then_signal(self: Trainer) -> None:
        real_step(self)
        if self.step == 2:
            self.stop_signal = 15  # what the SIGTERM handler sets

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(TrainingInterrupted) as e:
        sweep(done_out.parent / "acts", "1e8", out, **GRID)
    assert str(e.value) == ("sweep stopped by signal 15 during point n32-t256-k4-s0 (step 2; its checkpoint and the "
                            "finished points are kept): run the same monoscope sweep command again to continue")
    assert "--resume" not in str(e.value)
    assert (e.value.step, e.value.signum) == (2, 15)
    assert any((out / "runs" / "n32-t256-k4-s0" / "checkpoints").iterdir())


def test_lnk_points_are_those_at_the_largest_trained_token_count() -> None:
    """80k tokens at batch 256 trains 79,872: the L(n,k) fit must still find those points (it found none
    when it compared with the requested 80,000)."""
    from monoscope.scaling.sweep import lnk_records

    recs = [{"name": f"n{n}-t{t}-k{k}", "tokens": t // 256 * 256} for n in (576, 1152) for k in (16, 32)
            for t in (20_000, 80_000)]
    assert [r["name"] for r in lnk_records(recs)] == ["n576-t80000-k16", "n576-t80000-k32", "n1152-t80000-k16",
                                                      "n1152-t80000-k32"]
