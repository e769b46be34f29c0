"""`--transcoder-init sparsify`: sparsify's transcoder start (encoder entries U(±a), centred b_enc, zero W_dec, b_dec
from the targets) and free decoder rows (never renormalised, no gradient removed). Golden values of tiny
deterministic runs, the eager and deferred steps alike, and the refusals (in Python and from the CLI)."""

from __future__ import annotations

import math
import subprocess
from typing import Any

import pytest
import torch

from monoscope.sae import SAEConfig, build_sae
from monoscope.train import MemorySink, TrainConfig, TrainConfigError, Trainer
from tests.train.helpers import D, RandomSource, child_env, cli
from tests.train.test_trainer import ListLog, assert_identical, snapshot

BATCH = 64


class PairSource(RandomSource):
    """Rows [x, y] of width 2·D: y a fixed nonlinear map of x at another scale (a transcoder's store rows)."""

    def __init__(self, batch_size: int, n_rows: int = 2048, seed: int = 0) -> None:
        super().__init__(batch_size, D, n_rows, seed)
        x = self.data.float()
        a = torch.randn(D, D, generator=torch.Generator().manual_seed(7)) / D**0.5
        self.data = torch.cat([x, torch.relu(x @ a) * 3.0], 1).to(torch.bfloat16)
        self.c_in = float((D / x.pow(2).sum(1).mean()).sqrt())
        y = self.data[:, D:].float()
        self.c_out = float((D / y.pow(2).sum(1).mean()).sqrt())


def make(init: str, steps: int = 40, **settings: Any) -> Trainer:
    cfg = TrainConfig(arch="transcoder", tokens=steps * BATCH, batch_size=BATCH, width="4x", k=4, lr=3e-3,
                      log_every=10, checkpoint_every=0, progress=False, dtype="float32", dead_window=4 * BATCH,
                      transcoder_init=init, **settings)  # type: ignore[arg-type]
    src = PairSource(BATCH)
    sae_cfg = SAEConfig(arch="transcoder", d_in=D, d_sae=cfg.d_sae(D), k=4, hook="mlp_in.1", target_hook="mlp_out.1",
                        normaliser=src.c_in, target_normaliser=src.c_out, compute_dtype="float32",
                        init_decoder_norm=cfg.init_decoder_norm)
    return Trainer(build_sae(sae_cfg, seed=0), cfg, src, sink=MemorySink(), log=ListLog())


def first_rows() -> torch.Tensor:
    return PairSource(BATCH).data[:256].float()


def test_the_start_is_sparsifys() -> None:
    t = make("sparsify", init_b_dec="mean")
    assert t.cfg.init_decoder_norm == 0.577 and not t.unit_norm_decoder
    raw = first_rows()
    t.init_b_dec(raw)
    sae = t.sae
    x = sae.scale(raw)  # [256, 2D] scaled [input, target]
    assert torch.equal(sae.W_dec, torch.zeros_like(sae.W_dec))
    assert torch.allclose(sae.b_enc, -(x[:, :D].mean(0) @ sae.W_enc.T), atol=1e-6)  # sparsify's -mean @ W_encᵀ
    assert torch.allclose(sae.b_dec, x[:, D:].mean(0), atol=1e-6)  # the target's mean
    a = 0.577 * math.sqrt(3 / D)
    assert float(sae.W_enc.detach().abs().max()) <= a
    # golden: the first entries drawn from seed 0, and the mean row norm (expected 0.577)
    assert sae.W_enc[0, :3].tolist() == pytest.approx([-0.0013227, 0.0947732, -0.1454069], abs=1e-6)
    assert float(sae.W_enc.detach().norm(dim=1).mean()) == pytest.approx(0.572189, abs=1e-5)


def test_the_sae_start_is_unchanged() -> None:
    t = make("sae")
    before = t.sae.W_dec.detach().clone()
    t.init_b_dec(first_rows())
    assert t.unit_norm_decoder and torch.equal(t.sae.W_dec, before)
    assert torch.allclose(t.sae.W_dec.norm(dim=1), torch.ones(4 * D))


GOLDEN_FVU = {"sae": 1.3728971362113953, "sparsify": 0.6820240080356598}
"""Final logged FVU (steps 31-40) of the 40-step float32 runs below: the random unit-norm decoder starts by adding
noise to the target (FVU 2.4 over steps 1-10), the zero decoder at the mean (FVU 0.99), and stays ahead."""


@pytest.mark.parametrize("init", ["sae", "sparsify"])
def test_decoder_rows_stay_free_and_the_run_is_golden(init: str) -> None:
    t = make(init)
    t.init_b_dec(first_rows())
    t.run()
    norms = t.sae.W_dec.detach().norm(dim=1)
    if init == "sae":
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    else:  # never renormalised: rows grew from zero, each to its own length; never-active rows stay zero
        assert not torch.allclose(norms, torch.ones_like(norms), atol=0.05)
        assert float(norms.max()) > 0
    assert t.log.records[-1]["fvu"] == pytest.approx(GOLDEN_FVU[init], rel=1e-4)  # type: ignore[attr-defined]


@pytest.mark.parametrize("optimizer", ["adam", "signum-sf"])
def test_the_parallel_gradient_is_kept(optimizer: str) -> None:
    """One step by hand: the gradient the optimiser sees along each decoder row is the raw one (not removed)."""
    t = make("sparsify", optimizer=optimizer)
    t.init_b_dec(first_rows())
    t.train_step()  # W_dec leaves zero
    batch = next(t.source)
    t._forward_backward(batch, t.scaled(batch.acts))
    g, w = t.sae.W_dec.grad, t.sae.W_dec.detach()
    assert g is not None and float(torch.linalg.vecdot(g, w, dim=1).abs().max()) > 1e-6


def test_deferred_steps_train_exactly_like_eager_ones() -> None:
    runs = []
    for defer in (False, True):
        t = make("sparsify", init_b_dec="mean")
        t.defer_checks = defer
        t._fused = None  # the deferred step is the GPU's, with torch's Adam: the eager loop it is held against too
        t.init_b_dec(first_rows())
        t.run()
        runs.append(snapshot(t))
    assert_identical(runs[1], runs[0])


@pytest.mark.parametrize("arch", ["topk", "crosscoder"])
def test_other_architectures_are_refused(arch: str) -> None:
    with pytest.raises(TrainConfigError) as e:
        TrainConfig(arch=arch, k=4, tokens=4096, transcoder_init="sparsify")  # type: ignore[arg-type]
    assert str(e.value) == (f"--transcoder-init sparsify only applies to --arch transcoder, not {arch}: drop it, or "
                            "train --arch transcoder")
    with pytest.raises(TrainConfigError, match=r"^--transcoder-init 'zero': use one of sae, sparsify$"):
        TrainConfig(arch="transcoder", k=4, tokens=4096, transcoder_init="zero")  # type: ignore[arg-type]


def test_resampling_is_refused_for_transcoders() -> None:
    """Resampling points dead rows at inputs [B, 2·D] against a decoder of the target's width: refused up front."""
    with pytest.raises(TrainConfigError) as e:
        TrainConfig(arch="transcoder", k=4, tokens=4096, revive="resample")
    assert str(e.value) == ("--revive resample is not supported for --arch transcoder (resampling points a dead "
                            "feature's decoder row at an input, and a transcoder's decoder writes the target hook): "
                            "use --revive auxk or none")


def test_the_cli_refuses_with_one_line(tmp_path: Any) -> None:
    p = subprocess.run(cli(str(tmp_path / "store"), "--out", str(tmp_path / "a"), "--arch", "topk", "--k", "4",
                           "--tokens", "640", "--batch-size", "64", "--quiet", "--transcoder-init", "sparsify"),
                       env=child_env(), capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: --transcoder-init sparsify only applies to --arch transcoder, not topk: drop "
                                "it, or train --arch transcoder")
