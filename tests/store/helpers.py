"""Build small stores directly through the writer, without a model."""

from __future__ import annotations

from pathlib import Path

import torch

from monoscope.store import Manifest, RowPolicy
from monoscope.store.writer import StoreWriter

D, T = 8, 4


def make_store(folder: Path, n_shards: int = 5, contexts: int = 3, key: str = "k" * 64) -> Manifest:
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(folder, key)
    policy = RowPolicy(exclude_bos=True, outlier_factor=0.0, median_norm=1.0)
    w.set_row_policy(policy)
    base = 0
    for _ in range(n_shards):
        toks = torch.arange(base, base + contexts * T, dtype=torch.int32).view(contexts, T)
        acts = torch.randn(contexts, T, D, generator=g).to(torch.bfloat16)
        acts[..., 0] = toks.to(torch.bfloat16)  # row identity readable from the activation itself
        w.add_shard(toks, acts, policy.keep(acts))
        base += contexts * T
    m = Manifest(model={"id": "tiny", "weights_sha256": "w" * 64, "spec": "tiny"}, hook="resid_post.1",
                 d_model=D, dtype="bfloat16", ctx_len=T, tokenizer={"sha256": "t" * 64}, row_policy=policy,
                 corpus={"kind": "test"}, capture={}, requested_tokens=n_shards * contexts * T)
    return w.finish(m)
