"""A tiny SAE on the tiny Llama of tests/conftest.py, with a normaliser != 1 so a fold-in mistake shows."""

from __future__ import annotations

import torch

from monoscope.model import LoadedModel
from monoscope.sae import SAE, SAEConfig, build_sae

HOOK = "resid_post.1"


def tiny_sae(lm: LoadedModel, d_sae: int = 256, k: int = 8, seed: int = 0) -> SAE:
    """A random TopK SAE (encoder = decoderᵀ, unit rows) whose normaliser makes E‖c·x‖² = d at the hook."""
    ids = lm.tokenizer("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    x = lm.acts(lm.hook(HOOK), ids)[0, 1:]
    c = float((x.shape[1] / x.pow(2).sum(-1).mean()).sqrt())
    cfg = SAEConfig(arch="topk", d_in=lm.d_model, d_sae=d_sae, k=k, normaliser=c, hook=HOOK, compute_dtype="float32",
                    init_decoder_norm=1.0)
    sae = build_sae(cfg, seed=seed).eval()
    with torch.no_grad():  # centre on the activations, as a trained SAE would
        sae.b_dec.copy_(sae.scale(x).mean(0))
    return sae
