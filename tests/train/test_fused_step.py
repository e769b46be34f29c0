"""The CPU's two-pass optimiser step (`monoscope.train.fused_step`) against the PyTorch path it replaces: torch's
fused Adam bit for bit where nothing else is involved, and remove_parallel_grads_ + clipping + Adam +
normalize_decoder_ to float rounding; where the Trainer uses it and where not."""

from __future__ import annotations

import pytest
import torch

from monoscope import native
from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.base import SAE
from monoscope.train.fused_step import FusedAdamStep
from monoscope.train.optim import make_optimizer
from tests.native_marks import needs_native
from tests.train.test_trainer import make_trainer

pytestmark = needs_native
D, F = 48, 320  # 320 rows: split across threads when torch has several


def _pair() -> tuple[tuple[SAE, torch.optim.Optimizer], tuple[SAE, torch.optim.Optimizer]]:
    out = []
    for _ in range(2):
        sae = build_sae(SAEConfig(arch="topk", d_in=D, d_sae=F, k=4, normaliser=1.0), seed=0)
        out.append((sae, make_optimizer("adam", sae.parameters(), 3e-3, torch.device("cpu"))))
    return out[0], out[1]


def _set_grads(saes: list[SAE], step: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(step)
    for ps in zip(*(s.parameters() for s in saes), strict=True):
        g = torch.randn(ps[0].shape, generator=gen) * scale
        for p in ps:
            p.grad = g.clone()


def test_adam_is_torchs_fused_adam_bit_for_bit() -> None:
    (ref, opt_ref), (sae, opt) = _pair()
    fused = FusedAdamStep.make(sae, opt, unit_norm_decoder=False)
    assert fused is not None
    versions = [p._version for p in sae.parameters()]
    for step in range(4):
        _set_grads([ref, sae], step, 1e-2)
        opt_ref.step()
        fused.grad_norm()
        fused.step(1.0)
    for (name, p), q, v in zip(ref.named_parameters(), sae.parameters(), versions, strict=True):
        assert torch.equal(p, q), name
        assert q._version == v + 4, name  # its in-place changes are counted, as torch's Adam's are
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_ref.state[p][key], opt.state[q][key]), (name, key)
    assert opt.state_dict()["state"][0]["step"].dtype == torch.float32  # torch's own layout: checkpoints mix


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # below the clipping limit, and far above it
def test_the_whole_step_is_the_pytorch_path_to_float_rounding(scale: float) -> None:
    (ref, opt_ref), (sae, opt) = _pair()
    fused = FusedAdamStep.make(sae, opt, unit_norm_decoder=True)
    assert fused is not None
    for step in range(4):
        _set_grads([ref, sae], step, scale)
        ref.remove_parallel_grads_()
        norm_ref = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
        coef_ref = torch.clamp(1.0 / (norm_ref + 1e-6), max=1.0)
        torch.nn.utils.clip_grads_with_norm_(list(ref.parameters()), 1.0, norm_ref)
        opt_ref.step()
        ref.normalize_decoder_()
        norm = fused.grad_norm()
        assert norm.dtype == torch.float32 and float(norm) == pytest.approx(float(norm_ref), rel=1e-6)
        coef = float(torch.clamp(1.0 / (norm + 1e-6), max=1.0))
        assert (coef < 1.0) == (scale > 1.0) and coef == pytest.approx(float(coef_ref), rel=1e-6)
        fused.step(coef)
    with torch.no_grad():
        for (name, p), q in zip(ref.named_parameters(), sae.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-5, atol=2e-6), name
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(F), atol=1e-6)


def test_where_the_trainer_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_trainer("topk")._fused is not None
    assert make_trainer("relu-l1")._fused is not None  # no renormalisation there: Adam and clipping only
    assert make_trainer("topk", optimizer="signum-sf")._fused is None
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert make_trainer("topk")._fused is None


def test_a_run_follows_the_pytorch_path() -> None:
    """60 steps of a TopK SAE through the Trainer: the same training as with the PyTorch step, to the rounding
    that the summation order of norms and dot products moves."""
    runs = []
    for fused in (True, False):
        t = make_trainer("topk")
        if not fused:
            t._fused = None
        t.run()
        runs.append(t)
    for (name, p), q in zip(runs[0].sae.named_parameters(), runs[1].sae.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-4), name
    assert runs[0].last_metrics["fvu"] == pytest.approx(runs[1].last_metrics["fvu"], rel=1e-3)


def test_the_step_writes_the_bf16_copies_the_next_forward_reads() -> None:
    """Where the matmuls run in bf16, the step writes W_enc's (with b_enc's column) and W_dec's bf16 copies as
    `.to(torch.bfloat16)` rounds them, and the next forward reads them instead of converting: the same loss as an
    SAE that converts. Any later in-place change to a weight makes its copy stale."""
    bf16 = torch.bfloat16
    sae = build_sae(SAEConfig(arch="topk", d_in=D, d_sae=F, k=4, normaliser=1.0, compute_dtype="bfloat16"), seed=0)
    opt = make_optimizer("adam", sae.parameters(), 3e-3, torch.device("cpu"))
    fused = FusedAdamStep.make(sae, opt, unit_norm_decoder=True)
    assert fused is not None
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        sae(x).total.backward()
        fused.step(float(torch.clamp(1.0 / (fused.grad_norm() + 1e-6), max=1.0)))
        opt.zero_grad(set_to_none=True)
        w_aug, dec = sae.copy_buffers(bf16, torch.device("cpu"))
        assert torch.equal(w_aug[:, :D], sae.W_enc.to(bf16)) and torch.equal(w_aug[:, D], sae.b_enc.to(bf16))
        assert torch.equal(dec, sae.W_dec.to(bf16))
        assert sae.decoder_in(bf16) is dec and sae._copy_current("enc", bf16, sae.W_enc, sae.b_enc)
    converting = build_sae(sae.cfg, seed=0)
    converting.load_state_dict(sae.state_dict())
    assert torch.equal(sae(x).total, converting(x).total)
    with torch.no_grad():
        sae.W_dec.mul_(1.0)
        sae.b_enc.add_(0.0)
    assert sae.decoder_in(bf16) is not dec and not sae._copy_current("enc", bf16, sae.W_enc, sae.b_enc)


def test_a_torch_optimizer_step_forgets_the_copies() -> None:
    """torch's fused Adam updates the weights without bumping their version counters, so the Trainer forgets the
    fused step's copies after every `optimizer.step()`."""
    t = make_trainer("topk")
    t._fused = None
    t.train_step()
    bf16 = torch.bfloat16
    t.sae.copy_buffers(bf16, torch.device("cpu"))
    t.sae.mark_copies_current(bf16, encoder=True, decoder=True)
    assert t.sae._copy_current("dec", bf16, t.sae.W_dec)
    t.train_step()
    assert not t.sae._copy_keys
