"""Sparse autoencoders: six architectures behind one interface, plus the transcoder and the crosscoder
(`multihook.py`, trained on stores of several hooks), and monoscope's file format.

    cfg = SAEConfig(arch="topk", d_in=576, d_sae=parse_width("16x", 576), k=32, normaliser=c)
    sae = build_sae(cfg, seed=0)
    out = sae(c * x_raw, dead_mask=dead)      # ForwardOutput: x_hat, acts, mse, aux, total, l0, ...
    save_sae(sae, "runs/x/sae", provenance={...}); sae = load_sae("runs/x/sae")
    x_hat_raw = sae.reconstruct_raw(x_raw)    # raw in, raw out

A trainer's step, for every architecture (x = c·x_raw, scaled):
    out = sae(x, sparsity_coef=lam, dead_mask=dead)  # lam: relu-l1 L1 / jumprelu L0 coefficient
    out.total.backward()                             # dead: [d_sae] bool, topk-style AuxK only
    if unit_norm: sae.remove_parallel_grads_()       # topk, batchtopk, jumprelu (not relu-l1)
    clip; optimizer.step()
    if unit_norm: sae.normalize_decoder_()
    dead_counter.update(out.fired)                   # [d_sae] bool: fired in this batch
`sae.eval()` before inference (batchtopk then uses its learned threshold).

Never imports transformers.
"""

from monoscope.sae.base import SAE, ForwardOutput
from monoscope.sae.config import ARCHITECTURES, SAEConfig, SAEConfigError, parse_width
from monoscope.sae.gated import GatedSAE
from monoscope.sae.io import SAEFileError, check_compatible, load_sae, read_sae_metadata, save_sae
from monoscope.sae.jumprelu import JumpReLUSAE
from monoscope.sae.matryoshka import MatryoshkaSAE
from monoscope.sae.multihook import CrosscoderSAE, TranscoderSAE
from monoscope.sae.registry import build_sae
from monoscope.sae.relu import ReluL1SAE
from monoscope.sae.sparse import gather_linear, sparse_decode
from monoscope.sae.topk import BatchTopKSAE, TopKSAE

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "BatchTopKSAE",
    "CrosscoderSAE",
    "ForwardOutput",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReluL1SAE",
    "SAEConfig",
    "SAEConfigError",
    "SAEFileError",
    "TopKSAE",
    "TranscoderSAE",
    "build_sae",
    "check_compatible",
    "gather_linear",
    "load_sae",
    "parse_width",
    "read_sae_metadata",
    "save_sae",
    "sparse_decode",
]
