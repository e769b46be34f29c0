"""The int8 encoder screen (`native.screen_topk`, `SAEConfig.encoder_screen`): the kernel against a reference built
from the same exact dot products (`native.entry_dots`), with the screen's VNNI product and with its plain C form;
a TopK SAE forward, backward and AuxK with the screen against the whole bf16 product; and when `auto` applies."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from monoscope import native
from monoscope.devices import cpu_flags
from monoscope.sae import SAEConfig
from monoscope.sae import topk as topk_mod
from monoscope.sae.config import SAEConfigError
from monoscope.sae.topk import _order_view
from tests.native_marks import needs_native
from tests.sae.sae_pairs import sae_pair

_WITHOUT = {"plain C": "-mno-avx512vnni -mno-avxvnni", "no AVX-512": "-mno-avx512f"}


@pytest.fixture(params=["native", *_WITHOUT])
def build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """The kernels as this machine builds them, built without AVX512-VNNI (the screen's product in plain C), or
    without any AVX-512 (plain C throughout)."""
    native._lib.cache_clear()
    if request.param in _WITHOUT:
        cc = os.environ.get("CC") or "cc"
        wrapper = tmp_path / "cc-without"
        wrapper.write_text(f'#!/bin/sh\nexec {cc} "$@" {_WITHOUT[request.param]}\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("CC", str(wrapper))
        monkeypatch.setenv("MONOSCOPE_CACHE", str(tmp_path / "cache"))
    yield request.param
    native._lib.cache_clear()


def _exact_topk(x: torch.Tensor, w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest bf16-rounded dot products <x_r, w_f>, summed as the kernel sums them (entry_dots), ties to
    the lowest features: (int16 order-view keys, features), in increasing feature order."""
    n_rows, n_feat = x.shape[0], w.shape[0]
    idx = torch.arange(n_feat).repeat(n_rows)
    dots = native.entry_dots(x, w, idx, torch.arange(n_rows) * n_feat)
    assert dots is not None
    keys = _order_view(dots.view(n_rows, n_feat).bfloat16()).long()
    # the k largest keys, ties to the lowest features: sort by (key desc, feature asc)
    order = (keys * (2 * n_feat) - torch.arange(n_feat)).topk(k, dim=1).indices.sort(1).values
    return keys.gather(1, order).to(torch.int16), order


def _inputs(n_rows: int, d: int, n_feat: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n_rows, d, generator=g), torch.ones(n_rows, 1)], 1).bfloat16()
    w = torch.cat([torch.randn(n_feat, d, generator=g) / d**0.5, torch.randn(n_feat, 1, generator=g) * 0.1],
                  1).bfloat16()
    return x, w


@needs_native
@pytest.mark.parametrize(("n_rows", "d", "n_feat", "k"), [(100, 64, 512, 8), (7, 37, 130, 5), (49, 576, 2048, 32)])
def test_all_candidates_give_the_exact_top_k(build: str, n_rows: int, d: int, n_feat: int, k: int) -> None:
    """With every feature a candidate (m = F) the screen only orders the work: the result is the exact top k, bit
    for bit, whatever the int8 product says. Shapes: whole blocks, a feature count and a d that are not (padding of
    the last block of 64 features and of d to a multiple of 4), more rows than one block of 48."""
    x, w = _inputs(n_rows, d, n_feat, seed=n_feat)
    assert native.screen_fast() == (build == "native" and "avx512_vnni" in cpu_flags())
    packed = native.screen_pack(w, d, with_bias=True)
    assert packed is not None
    got = native.screen_topk(x, w, packed, d, k, m=n_feat)
    assert got is not None
    want_v, want_i = _exact_topk(x, w, k)
    assert torch.equal(got[1], want_i)
    assert torch.equal(got[0], want_v)


@needs_native
def test_the_screen_finds_planted_features_among_2k_candidates(build: str) -> None:
    """m = 2k: rows whose top k stand out (as a trained SAE's do) get exactly the exact top k; the int8 product and
    its scales are what find them, so a wrong scale, offset or layout fails here."""
    n_rows, d, n_feat, k = 96, 576, 1024, 8
    x, w = _inputs(n_rows, d, n_feat, seed=5)
    g = torch.Generator().manual_seed(6)
    planted = torch.stack([torch.randperm(n_feat, generator=g)[:k] for _ in range(n_rows)])  # [B, k]
    xf = x.float()
    xf[:, :d] = 0.05 * xf[:, :d] + 3 * w.float()[planted, :d].sum(1)  # each row made of its k planted features
    x = xf.bfloat16()
    packed = native.screen_pack(w, d, with_bias=True)
    assert packed is not None
    got = native.screen_topk(x, w, packed, d, k, m=2 * k)
    assert got is not None
    want_v, want_i = _exact_topk(x, w, k)
    assert torch.equal(got[1], want_i)
    assert torch.equal(got[0], want_v)
    assert torch.equal(want_i, planted.sort(1).values)  # the planted features are the top k


@needs_native
def test_packed_scales_and_padding(build: str) -> None:
    """Per-feature scales are max |w| / 127 and the biases the bias column; the padded tail of the last block is 0."""
    _, w = _inputs(3, 10, 70, seed=1)
    packed, scale, bias = native.screen_pack(w, 10, with_bias=True)  # type: ignore[misc]
    assert packed.numel() == 128 * 12 and scale.numel() == bias.numel() == 128
    assert torch.equal(scale[:70], w[:, :10].float().abs().amax(1) / 127)
    assert torch.equal(bias[:70], w[:, 10].float())
    assert not scale[70:].any() and not bias[70:].any()
    # feature 0's first 4 weights, rounded to int8 and offset by 128, are the first 4 bytes of block 0
    q = (w[0, :4].float() / scale[0]).round().clamp(-127, 127).to(torch.int64) + 128
    assert packed[:4].tolist() == q.tolist()


def _sae_pair(arch: str = "topk") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(screened, whole product) of one architecture in bf16."""
    return sae_pair(arch, "encoder_screen", ("int8", "off"), 0.1, 0.3, d_in=64, d_sae=512, k=8, k_aux=16,
                    aux_coef=0.5, compute_dtype="bfloat16")


@needs_native
@pytest.mark.parametrize("arch", ["topk", "transcoder"])
@pytest.mark.parametrize("n_dead", [0, 500])  # no AuxK; most latents dead: AuxK's per-entry path needs the [B, F]
def test_screened_forward_and_backward_match_the_whole_product(arch: str, n_dead: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topk_mod, "BLOCK_AUXK_DEAD_PER_K_AUX", {})  # AuxK through the pre-activations
    screened, whole = _sae_pair(arch)
    width = 128 if arch == "transcoder" else 64
    x = torch.randn(200, width, generator=torch.Generator().manual_seed(0)) * 2
    dead = torch.zeros(512, dtype=torch.bool)
    dead[:n_dead] = True
    outs = []
    for sae in (screened, whole):
        sae.train()
        out = sae(x, dead_mask=dead if n_dead else None)
        (out.mse + (out.aux if out.aux is not None else 0)).backward()
        outs.append(out)
    assert screened._screen_w is not None and whole._screen_w is None  # the screen ran, and only where asked
    a, b = outs
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.acts, b.acts, rtol=0.01, atol=1e-2)  # dot products summed in another order
    assert a.mse.item() == pytest.approx(b.mse.item(), rel=1e-3)
    if n_dead:
        assert a.aux.item() == pytest.approx(b.aux.item(), rel=1e-3)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(screened, name).grad, getattr(whole, name).grad, rtol=0.02, atol=1e-3)


@needs_native
def test_packed_weights_follow_the_parameters() -> None:
    """The packed weights are rebuilt after every change of W_enc: a stale copy would choose from old weights."""
    screened, whole = _sae_pair()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    for sae in (screened, whole):
        sae.eval()
        with torch.no_grad():
            sae(x)
            sae.W_enc.mul_(-1)  # every choice changes
    with torch.no_grad():
        assert torch.equal(screened(x).indices, whole(x).indices)


def test_auto_applies_to_large_bf16_cpu_batches_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(256, 8, dtype=torch.bfloat16)
    monkeypatch.setattr(topk_mod, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    monkeypatch.setattr(native, "screen_fast", lambda: True)
    assert topk_mod._screen_applies("auto", x, torch.bfloat16, 2048, 32)
    assert not topk_mod._screen_applies("auto", x[:255], torch.bfloat16, 2048, 32)  # too few rows
    assert not topk_mod._screen_applies("auto", x, torch.bfloat16, 1024, 32)  # too few features
    assert not topk_mod._screen_applies("auto", x, torch.float32, 2048, 32)  # float32 keeps the whole product
    assert not topk_mod._screen_applies("off", x, torch.bfloat16, 2048, 32)
    assert topk_mod._screen_applies("int8", x[:1], torch.bfloat16, 64, 32)
    assert not topk_mod._screen_applies("int8", x[:1], torch.bfloat16, 63, 32)  # fewer than 2k features
    monkeypatch.setattr(topk_mod, "cpu_flags", lambda: frozenset({"avx512_vnni", "amx_bf16"}))
    assert not topk_mod._screen_applies("auto", x, torch.bfloat16, 2048, 32)  # AMX's bf16 product is faster
    monkeypatch.setattr(topk_mod, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    monkeypatch.setattr(native, "screen_fast", lambda: False)
    assert not topk_mod._screen_applies("auto", x, torch.bfloat16, 2048, 32)  # no VNNI build


def test_bad_encoder_screen_is_named() -> None:
    with pytest.raises(SAEConfigError, match=r"SAEConfig.encoder_screen='fast' is not one of \['auto', 'int8', "
                                             r"'off'\]"):
        SAEConfig(arch="topk", d_in=8, d_sae=32, k=2, encoder_screen="fast")  # type: ignore[arg-type]
