"""Pairs of small SAEs that differ in one setting and start from the same weights, for tests that hold one path
of the forward and backward against another."""

from __future__ import annotations

import torch

from monoscope.sae import SAEConfig, build_sae

MULTIHOOK_FIELDS: dict[str, dict[str, object]] = {
    "transcoder": {"target_hook": "mlp_out.1", "target_normaliser": 0.7, "hook": "mlp_in.1", "b_dec_to_input": False},
    "matryoshka": {"prefixes": [16, 48]},
}
"""The fields an architecture needs beyond the common ones (matryoshka's prefixes suit 48 features)."""


def sae_pair(arch: str, field: str, values: tuple[object, object], b_enc_std: float, b_dec_std: float,
             **kw: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two SAEs built with seed 0 whose configs differ only in `field` (`values`), their biases drawn from
    N(0, b_enc_std) and N(0, b_dec_std) with fixed seeds; `kw`: the other SAEConfig fields."""
    saes = []
    for value in values:
        cfg = SAEConfig(arch=arch, **{**MULTIHOOK_FIELDS.get(arch, {}), **kw, field: value})  # type: ignore[arg-type]
        sae = build_sae(cfg, seed=0)
        with torch.no_grad():
            sae.b_enc.normal_(0, b_enc_std, generator=torch.Generator().manual_seed(1))
            sae.b_dec.normal_(0, b_dec_std, generator=torch.Generator().manual_seed(2))
        saes.append(sae)
    return saes[0], saes[1]
