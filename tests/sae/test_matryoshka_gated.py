"""Matryoshka and gated SAEs against their formulas written out by hand, their sparse paths against
their dense ones, what the nested prefixes buy, and every bad prefix setting as a one-line error."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from monoscope.sae import SAEConfig, SAEConfigError, build_sae
from monoscope.sae.config import resolve_prefixes
from monoscope.train import TrainConfig, TrainConfigError, Trainer
from tests.train.helpers import D, RandomSource, child_env, cli, make_store

N_FEAT, B = 48, 24


def batch(seed: int = 0, n: int = B, d: int = 12) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 1.5


def make(arch: str, **kw: object):
    cfg = SAEConfig(arch=arch, d_in=12, d_sae=N_FEAT, compute_dtype="float32", **kw)  # type: ignore[arg-type]
    sae = build_sae(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial biases and magnitudes so that every term matters
        sae.b_enc.normal_(0, 0.3, generator=g)
        sae.b_dec.normal_(0, 0.5, generator=g)
        if arch == "gated":
            sae.r_mag.normal_(0, 0.3, generator=g)
            sae.b_mag.normal_(0, 0.3, generator=g)
            sae.W_dec.mul_(torch.rand(N_FEAT, 1, generator=g) + 0.5)  # norms != 1: the L1 weights show
    return sae


def grads(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- matryoshka


def test_matryoshka_loss_is_the_sum_over_prefixes() -> None:
    prefixes = [6, 20, N_FEAT]
    sae = make("matryoshka", k=4, prefixes=prefixes).train()
    x = batch()
    out = sae(x)
    f = out.dense_acts()  # the batch top-k codes of this very pass
    assert (f > 0).sum() == 4 * B
    want = []
    for p in prefixes:
        x_hat = f[:, :p] @ sae.W_dec[:p].detach() + sae.b_dec.detach()
        want.append((x - x_hat).pow(2).sum(1).mean())
    torch.testing.assert_close(out.mse.detach(), want[-1])
    torch.testing.assert_close(out.aux.detach(), want[0] + want[1])  # no dead mask: no AuxK
    torch.testing.assert_close(out.total.detach(), sum(want))
    torch.testing.assert_close(out.x_hat.detach(), f @ sae.W_dec.detach() + sae.b_dec.detach())


def test_matryoshka_sparse_and_dense_paths_agree() -> None:
    x = batch(3)
    dead = torch.zeros(N_FEAT, dtype=torch.bool)
    dead[30:] = True
    res = []
    for sparse in (True, False):
        sae = make("matryoshka", k=4, prefixes=[6, 20, N_FEAT], sparse_kernels=sparse).train()
        out = sae(x, dead_mask=dead)
        out.total.backward()
        res.append((out.total.detach(), out.aux.detach(), grads(sae), float(sae.threshold)))
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])
    assert res[0][2].keys() == res[1][2].keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in res[0][2]:
        torch.testing.assert_close(res[0][2][name], res[1][2][name], atol=1e-5, rtol=1e-5)
    assert res[0][3] == res[1][3]


def test_matryoshka_inference_is_batchtopk_with_its_threshold() -> None:
    sae = make("matryoshka", k=4)
    assert sae.cfg.prefixes == [3, 6, 12, 24, 48]  # the default: 1/16, 1/8, 1/4, 1/2, all
    sae.train()
    sae(batch(1))
    sae.eval()
    x = batch(2)
    z = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    want = torch.where(z > sae.threshold, z, torch.zeros(()))
    torch.testing.assert_close(sae.encode(x).detach(), want.detach())


def _train(arch: str, **kw: object) -> Trainer:
    cfg = TrainConfig(arch=arch, tokens=150 * 64, batch_size=64, width="4x", k=4, lr=3e-3, log_every=50,
                      checkpoint_every=0, progress=False, dead_window=256, **kw)  # type: ignore[arg-type]
    src = RandomSource(64)
    sae = build_sae(SAEConfig(arch=arch, d_in=D, d_sae=cfg.d_sae(D), k=4, normaliser=src.normaliser,
                              prefixes=cfg.prefix_widths(D)), seed=0)
    t = Trainer(sae, cfg, src)
    t.init_b_dec(RandomSource(256, seed=9).data.float())
    t.run()
    t.calibrate_threshold()
    return t


def test_matryoshka_first_prefix_reconstructs_on_its_own() -> None:
    """The point of the nesting: trained the same way, the first 16 features of a matryoshka SAE
    explain far more of held-out data on their own than the first 16 of a plain BatchTopK SAE
    (whose features have no order), while the whole dictionary stays comparably good."""
    x_raw = RandomSource(512, seed=5).data.float()
    fvu = {}
    for arch, kw in (("matryoshka", {"prefixes": (16, 64, 128)}), ("batchtopk", {})):
        sae = _train(arch, **kw).sae.eval()
        with torch.no_grad():
            x = sae.scale(x_raw)
            f = sae.encode(x)
            var = (x - x.mean(0)).pow(2).sum()
            first = f[:, :16] @ sae.W_dec[:16] + sae.b_dec
            fvu[arch] = (float((x - first).pow(2).sum() / var), float((x - sae.decode(f)).pow(2).sum() / var))
    assert fvu["matryoshka"][0] < fvu["batchtopk"][0] - 0.1, fvu  # measured 0.75 vs 0.90
    assert fvu["matryoshka"][1] < fvu["batchtopk"][1] + 0.1, fvu


# ----------------------------------------------------------------------------- gated


def test_gated_forward_matches_the_paper() -> None:
    sae = make("gated", sparse_kernels=False)
    x = batch()
    lam = 0.7
    out = sae(x, sparsity_coef=lam)
    W, Wd, bd = sae.W_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach()
    z = (x - bd) @ W.T
    pi_gate = z + sae.b_enc.detach()
    pi_mag = z * sae.r_mag.detach().exp() + sae.b_mag.detach()
    f = (pi_gate > 0).float() * pi_mag.relu()
    x_hat = f @ Wd + bd
    torch.testing.assert_close(out.x_hat.detach(), x_hat)
    torch.testing.assert_close(sae.encode(x).detach(), f)
    torch.testing.assert_close(out.mse.detach(), (x - x_hat).pow(2).sum(1).mean())
    l1 = (pi_gate.relu() * Wd.norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(out.sparsity.detach(), lam * l1)
    via_gate = pi_gate.relu() @ Wd + bd
    torch.testing.assert_close(out.aux.detach(), (x - via_gate).pow(2).sum(1).mean())
    assert out.l0.item() == pytest.approx(float((f > 0).sum()) / B)


def test_gated_aux_loss_leaves_the_decoder_frozen() -> None:
    sae = make("gated")
    sae(batch()).aux.backward()
    g = grads(sae)
    assert "W_dec" not in g and "b_dec" in g  # b_dec reaches it through the encoder input x − b_dec
    assert "r_mag" not in g and "b_mag" not in g  # the magnitude path is not in it
    assert g["W_enc"].abs().sum() > 0 and g["b_enc"].abs().sum() > 0


def test_gated_sparse_and_dense_paths_agree() -> None:
    x = batch(4)
    res = []
    for density in (1.0, 0.0):  # 1: every batch takes the sparse kernels; 0: always dense
        sae = make("gated", sparse_max_density=density)
        out = sae(x, sparsity_coef=0.3)
        out.total.backward()
        res.append((out, grads(sae)))
    (a, ga), (b, gb) = res
    assert a.indices is not None and b.indices is None
    torch.testing.assert_close(a.dense_acts(), b.dense_acts())
    for name in ("mse", "sparsity", "aux", "total"):
        torch.testing.assert_close(getattr(a, name).detach(), getattr(b, name).detach())
    assert ga.keys() == gb.keys() == {"W_enc", "b_enc", "W_dec", "b_dec", "r_mag", "b_mag"}
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-5)


def test_gated_trains_sparse_with_an_unconstrained_decoder() -> None:
    t = _train_gated()
    x = t.scaled(RandomSource(512, seed=5).data)
    out = t.sae.eval()(x)
    assert float(out.fvu) < 0.6 and float(out.l0) < 10, (float(out.fvu), float(out.l0))  # measured 0.54, 6.5
    norms = t.sae.W_dec.detach().norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))
    assert t.cfg.revive_method == "none"


def _train_gated() -> Trainer:
    cfg = TrainConfig(arch="gated", tokens=150 * 64, batch_size=64, width="4x", sparsity_coef=10.0, lr=3e-3,
                      log_every=50, checkpoint_every=0, progress=False)
    src = RandomSource(64)
    sae = build_sae(SAEConfig(arch="gated", d_in=D, d_sae=cfg.d_sae(D), normaliser=src.normaliser), seed=0)
    t = Trainer(sae, cfg, src)
    t.init_b_dec(RandomSource(256, seed=9).data.float())
    t.run()
    return t


# ----------------------------------------------------------------------------- bad prefixes


@pytest.mark.parametrize(("prefixes", "match"), [
    ([8, 4, 48], r"SAEConfig.prefixes 8,4,48 \(= \[8, 4, 48\]\) must be strictly increasing widths from 1 up"),
    ([8, 24], r"must end at the width d_sae=48 \(the last prefix is the whole dictionary; the groups between "
              r"prefixes sum to the width\): append 48, e.g. 3,6,12,24,48"),
    ([8, 60], r"must end at the width d_sae=48 .*: keep every prefix within the 48 features"),
    ([0, 48], "must be strictly increasing widths from 1 up"),
    ("8,48", "give a list of whole prefix widths ending at d_sae=48"),
])
def test_bad_prefixes_are_one_line_errors(prefixes: object, match: str) -> None:
    with pytest.raises(SAEConfigError, match=match) as e:
        SAEConfig(arch="matryoshka", d_in=12, d_sae=N_FEAT, k=4, prefixes=prefixes)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_prefixes_only_for_matryoshka() -> None:
    with pytest.raises(SAEConfigError, match=r"SAEConfig.prefixes=\[8, 48\] has no meaning for arch 'batchtopk'"):
        SAEConfig(arch="batchtopk", d_in=12, d_sae=N_FEAT, k=4, prefixes=[8, 48])
    with pytest.raises(TrainConfigError, match="--prefixes has no meaning for --arch topk: drop it"):
        TrainConfig(arch="topk", k=4, tokens=4096, prefixes=(0.5, 1))


def test_prefixes_from_counts_or_fractions() -> None:
    assert resolve_prefixes((1024.0, 2048.0, 9216.0), 9216) == [1024, 2048, 9216]
    assert resolve_prefixes((0.0625, 0.25, 1.0), 9216) == [576, 2304, 9216]
    with pytest.raises(SAEConfigError, match=r"--prefixes 1000.5,9216: 1000.5 is neither a whole count nor a "
                                             r"fraction"):
        resolve_prefixes((1000.5, 9216.0), 9216)
    with pytest.raises(SAEConfigError, match=r"--prefixes 0.5,0.75 \(= \[4608, 6912\]\) must end at the width"):
        resolve_prefixes((0.5, 0.75), 9216)


def test_train_config_prefixes_as_text() -> None:
    cfg = TrainConfig(arch="matryoshka", k=4, tokens=4096, prefixes="0.25, 0.5,1")  # type: ignore[arg-type]
    assert cfg.prefixes == (0.25, 0.5, 1.0) and cfg.prefix_widths(32) == [128, 256, 512]  # width 16x of 32
    assert cfg.to_dict()["prefixes"] == [0.25, 0.5, 1.0]
    with pytest.raises(TrainConfigError, match=r"--prefixes 'a,b': give widths such as"):
        TrainConfig(arch="matryoshka", k=4, tokens=4096, prefixes="a,b")  # type: ignore[arg-type]


def test_cli_bad_prefixes_exit_2_with_one_line(tmp_path: Path) -> None:
    make_store(tmp_path / "acts", n_shards=1)
    out = subprocess.run(cli(str(tmp_path / "acts"), "--out", str(tmp_path / "sae"), "--arch", "matryoshka",
                             "--k", "4", "--width", "64", "--tokens", "1024", "--batch-size", "64",
                             "--prefixes", "16,32", "--quiet"),
                         env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err == ("error: --prefixes 16,32 (= [16, 32]) must end at the width d_sae=64 (the last prefix is the "
                   "whole dictionary; the groups between prefixes sum to the width): append 64, e.g. 4,8,16,32,64")
