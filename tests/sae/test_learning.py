"""Every architecture, trained briefly on synthetic sparse data, reconstructs it and finds its
features: a guard on the training dynamics that the formula tests cannot see."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from monoscope.sae import SAEConfig, build_sae

D, N_TRUE, D_SAE, B = 16, 24, 48, 128


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead
    yield
    torch.set_num_threads(before)


def _data(n: int, directions: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    idx = torch.rand(n, N_TRUE, generator=g).argsort(1)[:, :2]  # 2 true features per token
    mags = torch.rand(n, 2, generator=g) * 2 + 0.5
    return torch.zeros(n, N_TRUE).scatter(1, idx, mags) @ directions * 7.0  # raw scale != 1


@pytest.mark.parametrize(
    ("arch", "kw", "lam"),
    [
        ("topk", {"k": 3}, 0.0),
        ("batchtopk", {"k": 3}, 0.0),
        ("relu-l1", {}, 0.3),
        ("jumprelu", {"jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.1}, 0.03),
    ],
)
def test_short_training_recovers_synthetic_features(arch: str, kw: dict, lam: float) -> None:
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(N_TRUE, D, generator=g), dim=1)
    sample = _data(2048, directions, g)
    c = (D / sample.pow(2).sum(1).mean()).sqrt().item()  # E‖c·x‖² = d_in
    sae = build_sae(SAEConfig(arch=arch, d_in=D, d_sae=D_SAE, normaliser=c, **kw), seed=0)  # type: ignore[arg-type]
    sae.init_b_dec_(sae.scale(sample[:512]))
    opt = torch.optim.Adam(sae.parameters(), lr=4e-3)
    unit_norm = arch != "relu-l1"
    for step in range(300):
        out = sae(sae.scale(_data(B, directions, g)), lam * min(1.0, step / 50))
        opt.zero_grad()
        out.total.backward()
        if unit_norm:
            sae.remove_parallel_grads_()
        opt.step()
        if unit_norm:
            sae.normalize_decoder_()
    sae.eval()
    x = _data(1024, directions, g)
    with torch.no_grad():
        rec = sae.reconstruct_raw(x)
        fvu = ((x - rec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        cos = directions @ torch.nn.functional.normalize(sae.W_dec.float(), dim=1).T  # [true, F]
    assert fvu < 0.2, f"{arch}: FVU {fvu:.3f}"
    assert (cos.max(1).values > 0.9).float().mean() >= 0.75, arch
