"""Architecture name -> class, and `build_sae`. The only place that maps names to code."""

from __future__ import annotations

import torch

from monoscope.sae.base import SAE
from monoscope.sae.config import ARCHITECTURES, SAEConfig, SAEConfigError
from monoscope.sae.gated import GatedSAE
from monoscope.sae.jumprelu import JumpReLUSAE
from monoscope.sae.matryoshka import MatryoshkaSAE
from monoscope.sae.multihook import CrosscoderSAE, TranscoderSAE
from monoscope.sae.relu import ReluL1SAE
from monoscope.sae.topk import BatchTopKSAE, TopKSAE

SAE_CLASSES: dict[str, type[SAE]] = {
    "relu-l1": ReluL1SAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "matryoshka": MatryoshkaSAE,
    "gated": GatedSAE,
    "transcoder": TranscoderSAE,
    "crosscoder": CrosscoderSAE,
}
assert tuple(SAE_CLASSES) == ARCHITECTURES


def build_sae(cfg: SAEConfig, *, seed: int | None = None, device: torch.device | str | None = None) -> SAE:
    """A freshly initialised SAE for `cfg` (see `SAE.reset_parameters`).

    seed: makes the initialisation reproducible (a CPU generator, so the same on every device);
    None draws from torch's global RNG. device: where to put it (default CPU)."""
    cls = SAE_CLASSES.get(cfg.arch)
    if cls is None:  # SAEConfig validates arch; this guards hand-built configs
        raise SAEConfigError(f"unknown SAE architecture {cfg.arch!r}: use one of {list(SAE_CLASSES)}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    sae = cls(cfg, generator=gen)  # type: ignore[call-arg]
    if device is not None:
        sae = sae.to(device)
    return sae
