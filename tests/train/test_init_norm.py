"""`--init-decoder-norm`: the initial decoder (and so encoder) row norm, a convergence lever of the
sweep in benchmarks/convergence_vs_sparsify.py. Golden values of a deterministic tiny run, and the refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from monoscope.sae import SAEConfig, build_sae, load_sae
from monoscope.train import TrainConfig, TrainConfigError, train
from tests.train.helpers import make_store

SRC = str(Path(__file__).resolve().parents[2] / "src")
SMALL: dict[str, Any] = {"arch": "topk", "k": 4, "width": "4x", "tokens": 20 * 64, "batch_size": 64, "lr": 3e-3,
                         "dtype": "float32", "checkpoint_every": 0, "log_every": 5, "progress": False}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("acts") / "store"
    make_store(folder, n_shards=2)
    return folder


def test_encoder_starts_at_the_given_norm() -> None:
    cfg = SAEConfig(arch="topk", d_in=8, d_sae=32, k=2, init_decoder_norm=0.5)
    sae = build_sae(cfg, seed=0)
    assert torch.allclose(sae.W_enc.norm(dim=1), torch.full((32,), 0.5))
    assert torch.equal(sae.W_enc, sae.W_dec)


GOLDEN = {None: 0.5806899189949035, 0.5: 0.5109180033206939}
"""Final FVU of the deterministic float32 runs below (default norm 0.25 for topk, and 0.5)."""


def test_the_norm_changes_the_run_and_is_recorded(store: Path, tmp_path: Path) -> None:
    finals = {}
    for norm in (None, 0.5):
        out = tmp_path / f"sae-{norm}"
        train(out, store=store, init_decoder_norm=norm, **SMALL)
        sae = load_sae(out)
        assert sae.cfg.init_decoder_norm == (0.25 if norm is None else 0.5)
        assert sae.provenance["train_config"]["init_decoder_norm"] == norm
        finals[norm] = sae.provenance["final_metrics"]["fvu"]
    # golden values of these deterministic float32 runs
    assert finals[None] == pytest.approx(GOLDEN[None], rel=1e-4)
    assert finals[0.5] == pytest.approx(GOLDEN[0.5], rel=1e-4)



@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_norm_is_refused(bad: float) -> None:
    with pytest.raises(TrainConfigError) as e:
        TrainConfig(arch="topk", k=8, tokens=10_000, init_decoder_norm=bad)
    assert str(e.value) == f"--init-decoder-norm {bad!r}: use a positive norm such as 1 or 0.5"


def test_cli_flag(store: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, "-m", "monoscope.cli", "train", str(store), "--arch", "topk", "--k", "4", "--width",
            "4x", "--tokens", "256", "--batch-size", "64", "--dtype", "fp32", "--quiet"]
    bad = subprocess.run([*base, "--out", str(tmp_path / "bad"), "--init-decoder-norm", "0"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: --init-decoder-norm 0.0: use a positive norm such as 1 or 0.5"
    ok = subprocess.run([*base, "--out", str(tmp_path / "ok"), "--init-decoder-norm", "0.25"], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert load_sae(tmp_path / "ok").cfg.init_decoder_norm == 0.25
