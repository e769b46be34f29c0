"""Exact resume after SIGKILL for the transcoder and the crosscoder: the real `monoscope train` killed mid-run on
a synthetic multi-hook store (rows = hooks side by side), then `--resume`, ends bit-identical on CPU to an
uninterrupted run (weights, Adam state, dead counters, log), as `test_kill.py` checks for the other SAEs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from monoscope.store import Manifest, RowPolicy
from monoscope.store.writer import StoreWriter
from tests.train.helpers import D, synthetic_rows
from tests.train.test_kill import kill_then_resume, reference

RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    # TopK transcoder: input hook -> target hook, AuxK on dead latents, target normaliser; sparsify's start (the
    # default): zero decoder, centred encoder bias, decoder rows never renormalised
    "transcoder": ("mlp_in.1,mlp_out.1", {"arch": "transcoder", "k": 4, "dead_window": 256}),
    # the same with sparsify's optimiser (its whole recipe): its z and step counters in the checkpoint, the
    # averaged weights saved
    "transcoder-signum-sf": ("mlp_in.1,mlp_out.1", {"arch": "transcoder", "k": 4, "dead_window": 256,
                                                    "optimizer": "signum-sf", "revive": "none"}),
    # the TopK SAE start: unit-norm decoder rows, renormalised after every step
    "transcoder-sae-init": ("mlp_in.1,mlp_out.1", {"arch": "transcoder", "k": 4, "dead_window": 256,
                                                   "transcoder_init": "sae"}),
    # acausal crosscoder over three hooks, one scale per hook
    "crosscoder": ("resid_post.0,resid_post.1,resid_post.2", {"arch": "crosscoder", "k": 6, "dead_window": 256}),
}


def make_multi_store(folder: Path, hooks: str, *, n_shards: int = 4, contexts: int = 16, ctx_len: int = 17) -> Manifest:
    """A complete store whose rows hold len(hooks) blocks of width D: the first block synthetic rows, each later
    block a fixed nonlinear map of it at another scale (so a transcoder has something to learn)."""
    names = hooks.split(",")
    w = StoreWriter(folder, "m" * 64)
    policy = RowPolicy(exclude_bos=True, outlier_factor=0.0, median_norm=1.0)
    w.set_row_policy(policy)
    g = torch.Generator().manual_seed(7)
    maps = [torch.randn(D, D, generator=g) / D**0.5 for _ in names[1:]]
    per_shard = contexts * ctx_len
    for s in range(n_shards):
        x = synthetic_rows(per_shard, D, seed=s)
        blocks = [x] + [torch.relu(x @ a) * (3.0 + i) for i, a in enumerate(maps)]
        acts = torch.cat(blocks, 1).view(contexts, ctx_len, D * len(names)).to(torch.bfloat16)
        toks = torch.arange(per_shard, dtype=torch.int32).view(contexts, ctx_len) % 200
        w.add_shard(toks, acts, policy.keep(acts), n_hooks=len(names))
    m = Manifest(model={"id": "synthetic", "weights_sha256": "w" * 64, "spec": "synthetic"}, hook=hooks, d_model=D,
                 dtype="bfloat16", ctx_len=ctx_len, tokenizer={"sha256": "t" * 64}, row_policy=policy,
                 corpus={"kind": "synthetic"}, capture={}, requested_tokens=n_shards * per_shard)
    return w.finish(m)


@pytest.mark.parametrize("name", list(RUNS))
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path: Path, name: str) -> None:
    hooks, run = RUNS[name]
    store = tmp_path / "store"
    m = make_multi_store(store, hooks)
    assert m.hooks == hooks.split(",") and len(m.hook_normalisers) == len(m.hooks)
    ref = reference(store, tmp_path / "ref", run)
    out = tmp_path / "sae"
    kill_then_resume(store, out, run, ref)
