"""A tiny finished run for the web app: a tiny Llama, a store whose corpus holds HTML (`<script>`, attributes),
two SAEs (4x, 2x) with their feature databases (families included), an eval, and a map.

The map is the SAE decoder's first two principal components written through `layout.store_map` (the
UMAP of the real pass costs ~15 s of numba JIT per process, too slow for a test); everything else is the
real features pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import TRAIN_TEXT, make_llama, make_tokenizer

HOOK = "resid_post.1"
EVIL = ['<script>alert("x")</script> the fox', 'a <img src=x onerror="alert(1)"> dog & "quotes"']


def build_run(root: Path) -> Path:
    from monoscope.capture import capture
    from monoscope.eval.run import evaluate
    from monoscope.features.build import build_features
    from monoscope.features.db import FeatureDB
    from monoscope.features.layout import store_map
    from monoscope.sae.io import load_sae
    from monoscope.train import train

    tok = make_tokenizer()
    model = root / "model"
    make_llama(len(tok), seed=5).save_pretrained(model)
    tok.save_pretrained(model)
    corpus = root / "corpus.jsonl"
    docs = []
    for i, t in enumerate(TRAIN_TEXT * 4):  # HTML every few documents, so the features pass reads it
        docs += [f"{t} number {i}"] + ([EVIL[(i // 3) % 2]] if i % 3 == 0 else [])
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run = root / "run"
    capture(run / "acts", model=str(model), corpus=str(corpus), hook=HOOK, tokens=1024, ctx_len=16,
            batch_contexts=8, contexts_per_shard=16, compute_dtype="fp32", progress=False)
    for name, width in (("sae", "4x"), ("sae-2x", "2x")):
        train(run / name, store=run / "acts", arch="topk", k=4, width=width, tokens=4096, batch_size=256,
              progress=False)
    build_features(run / "sae", also=[run / "sae-2x"], tokens=512, batch_contexts=4, feature_map=False,
                   progress=False, compute_dtype="fp32")
    for name, fdir in (("sae", "features"), ("sae-2x", "sae-2x-features")):
        w = load_sae(run / name).W_dec.detach().float()
        w = w - w.mean(0)
        xy = (w @ torch.linalg.svd(w, full_matrices=False).Vh[:2].T).numpy()
        with FeatureDB.open(run / fdir / "features.db") as db:
            store_map(db, xy)
    evaluate(run / "sae", acts=run / "acts", tokens=256, progress=False, compute_dtype="fp32")
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture()
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy a test may change (databases and eval only: the store is not needed by the app)."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("acts", "checkpoints"))
    return dst


ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
"""Screenshots of the browser tests (gitignored)."""
