"""A tiny SAE on the tiny Llama of tests/conftest.py, with a normaliser != 1 so a fold-in mistake shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from monoscope.model import LoadedModel
from monoscope.sae import SAE, SAEConfig, build_sae

HOOK = "resid_post.1"
SRC = Path(__file__).resolve().parents[2] / "src"


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


def make_run(root: Path, tokenizer: Any, *, seed: int = 5, with_db: bool = True) -> Path:
    """A tiny model folder + tiny SAE folder (its provenance names the model) + a features database with
    max activations and densities measured on TRAIN_TEXT. Returns the SAE folder."""
    from monoscope.features.db import FeatureDB
    from monoscope.features.show import default_db_path
    from monoscope.model import from_module
    from monoscope.sae import save_sae
    from tests.conftest import TRAIN_TEXT, make_llama

    model_dir = root / "model"
    llama = make_llama(len(tokenizer), seed=seed)
    llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lm = from_module(llama, tokenizer)
    sae = tiny_sae(lm)
    sae_dir = root / "sae"
    save_sae(sae, sae_dir, provenance={"data": {"kind": "test", "model_spec": str(model_dir)}})
    if with_db:
        bos = lm.special_ids()[0]
        codes = []
        with torch.no_grad():
            for text in sorted(set(TRAIN_TEXT)):
                ids = torch.tensor([[bos, *tokenizer(text).input_ids]])
                codes.append(sae.encode_raw(lm.acts(lm.hook(HOOK), ids)[0, 1:]))
        c = torch.cat(codes)
        db = FeatureDB.create(default_db_path(sae_dir), {"sae": {"d_sae": sae.cfg.d_sae}})
        with db.transaction():
            db.put_features({"id": i, "max_act": float(c[:, i].max()), "density": float((c[:, i] > 0).float().mean()),
                             "label": f"f{i}"} for i in range(sae.cfg.d_sae))
        db.close()
    return sae_dir


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "monoscope.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
