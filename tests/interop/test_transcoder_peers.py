"""Transcoders against the real eai-sparsify (its `transcode=True` SparseCoder), both ways: a sparsify transcoder
loads in monoscope with the same latents and output on the same raw MLP inputs, and monoscope's exported
transcoder (both scales folded in) loads in sparsify's own loader and computes what monoscope computes.
SAELens 6 has ReLU/JumpReLU/skip transcoders but no TopK one and no crosscoder: those exports are refused
(tests/sae/test_multihook.py checks the message)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from monoscope.interop import convert, load_any
from monoscope.sae import SAEConfig, build_sae, save_sae
from tests.interop.helpers import D_IN, D_SAE, K, assert_close, float32, inputs
from tests.interop.test_peers import _randomise, _sparsify_dense

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def sparsify() -> ModuleType:
    return pytest.importorskip("sparsify", reason="make test installs eai-sparsify")


@torch.no_grad()
def test_sparsify_transcoder_loads_with_the_same_latents(tmp_path: Path, sparsify: ModuleType) -> None:
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(k=K, num_latents=D_SAE, transcode=True))
    _randomise(coder, seed=3)
    run = tmp_path / "run"
    coder.save_to_disk(run / "layers.3.mlp")  # its trainer's layout for a transcoder of block 3's MLP
    sparsify.TrainConfig(sparsify.SparseCoderConfig(k=K, transcode=True),
                         hookpoints=["layers.3.mlp"]).save_json(str(run / "config.json"))
    coder = sparsify.SparseCoder.load_from_disk(run / "layers.3.mlp")
    ours = float32(load_any(run))
    assert ours.cfg.arch == "transcoder" and ours.cfg.k == K
    assert (ours.cfg.hook, ours.cfg.target_hook, ours.cfg.b_dec_to_input) == ("mlp_in.3", "mlp_out.3", False)
    x = inputs()
    f, y_hat = _sparsify_dense(coder, x)
    assert_close(ours.encode_raw(x), f)
    assert_close(ours.reconstruct_raw(x), y_hat)
    assert_close(ours.reconstruct_raw(x), coder(x).sae_out)


@torch.no_grad()
def test_transcoder_exports_load_in_sparsify(tmp_path: Path, sparsify: ModuleType) -> None:
    cfg = SAEConfig(arch="transcoder", d_in=D_IN, d_sae=D_SAE, k=K, normaliser=0.37, target_normaliser=2.9,
                    hook="mlp_in.3", target_hook="mlp_out.3", compute_dtype="float32")
    sae = build_sae(cfg, seed=1)
    _randomise(sae, seed=4)
    sae.eval()
    out = convert(save_sae(sae, tmp_path / "mono"), "sparsify", tmp_path / "run" / "layers.3.mlp")
    coder = sparsify.SparseCoder.load_from_disk(out)
    assert coder.cfg.transcode and not coder.cfg.normalize_decoder and coder.cfg.k == K
    x = inputs()
    f, y_hat = _sparsify_dense(coder, x)
    assert_close(f, sae.encode_raw(x))
    assert_close(y_hat, sae.reconstruct_raw(x))
    back = float32(load_any(out))  # and back: the same transcoder, scales folded
    assert back.cfg.arch == "transcoder" and back.cfg.target_normaliser == 1.0
    assert_close(back.reconstruct_raw(x), sae.reconstruct_raw(x))


@torch.no_grad()
def test_a_sparsify_init_transcoder_exports_with_free_zero_rows(tmp_path: Path, sparsify: ModuleType) -> None:
    """`--transcoder-init sparsify` leaves never-active latents with zero decoder rows and the others at their own
    norms: the export says normalize_decoder=false and sparsify computes the same latents and output."""
    cfg = SAEConfig(arch="transcoder", d_in=D_IN, d_sae=D_SAE, k=K, normaliser=0.37, target_normaliser=2.9,
                    hook="mlp_in.3", target_hook="mlp_out.3", compute_dtype="float32")
    sae = build_sae(cfg, seed=1)
    rows = torch.randn(64, 2 * D_IN, generator=torch.Generator().manual_seed(5))
    sae.init_sparsify_(rows, 0.577, torch.Generator().manual_seed(0))
    trained = torch.arange(D_SAE) % 3 == 0  # a third of the rows "trained" (grown to various norms), the rest zero
    sae.W_dec[trained] = torch.randn(int(trained.sum()), D_IN, generator=torch.Generator().manual_seed(6)) * 0.3
    sae.eval()
    out = convert(save_sae(sae, tmp_path / "mono"), "sparsify", tmp_path / "run" / "layers.3.mlp")
    coder = sparsify.SparseCoder.load_from_disk(out)
    assert coder.cfg.transcode and not coder.cfg.normalize_decoder
    assert int((coder.W_dec.norm(dim=1) == 0).sum()) == int((~trained).sum())
    x = inputs()
    f, y_hat = _sparsify_dense(coder, x)
    assert_close(f, sae.encode_raw(x))
    assert_close(y_hat, sae.reconstruct_raw(x))
