"""Feature sharding of relu-l1, jumprelu, gated and matryoshka, 2 forked gloo ranks (--shard-features 2): each
rank holds half the features (encoder and decoder rows, b_enc, jumprelu's thresholds, gated's r_mag and b_mag);
the partial reconstructions (matryoshka: every prefix level, with prefixes inside and across the shards) and the
partial per-feature penalties (L1, L0) are all-reduced; matryoshka's k·B entries are chosen over both shards.
After 60 steps the assembled SAE equals one process's on the same batches (max abs weight difference <= 1e-5,
matryoshka 2e-5: `TOLERANCE` says why), relu-l1 resamples dead features over both shards with the draws one
process makes (also on a 2x2 mesh, and topk with --revive resample: test_shard_resample.py), a resume from
a mid-run checkpoint ends bit-identical, and the assembled SAE loads and encodes like the single-process one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from monoscope.sae import load_sae
from tests.distributed.helpers import COMMON, fork_ranks, join_ranks, one_process_and_ranks, weights
from tests.train.helpers import synthetic_rows

ARCHS: dict[str, dict[str, Any]] = {
    "relu-l1": {"arch": "relu-l1", "k": None},  # revive auto = resample at steps 12, 24, 36
    "jumprelu": {"arch": "jumprelu", "k": None},
    "gated": {"arch": "gated", "k": None},
    "matryoshka": {"arch": "matryoshka", "prefixes": "8,32,96,128"},  # prefixes inside and across the shards
}
TOLERANCE = {"relu-l1": 1e-5, "jumprelu": 1e-5, "gated": 1e-5, "matryoshka": 2e-5}
"""Measured max abs differences after 60 steps: relu-l1 8e-8, jumprelu 1.5e-7, gated 7.6e-8, matryoshka 1.57e-5.
matryoshka, like batchtopk (tests/distributed/test_archs.py), differs by ~1.6e-5 already after 3 steps, on W_enc and
b_enc: in the first Adam steps an entry whose gradient is near zero (a feature barely selected) moves by
lr·g/(|g| + eps), which magnifies the other summation order of the shards' narrower matmuls; it then stays flat
(1.8e-5 at 3 steps, 1.7e-5 at 15, 1.6e-5 at 60). A prefix level summed wrongly would differ by ~1e-3."""


def settings(arch: str) -> dict[str, Any]:
    return {**COMMON, **ARCHS[arch], "keep_checkpoints": 10}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_feature_sharded_equals_one_process_and_resumes_exactly(store: Path, tmp_path: Path, arch: str) -> None:
    ref, out, cfg = one_process_and_ranks(store, tmp_path, settings(arch), 2, shard_features=2)
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(diff.values()) <= TOLERANCE[arch], diff
    prov_ref, prov = load_sae(ref).provenance, load_sae(out).provenance
    assert prov["distributed"] == {"world_size": 2, "data_parallel": 1, "shard_features": 2}
    assert prov["steps"] == 60
    assert prov["resampled_features"] == prov_ref["resampled_features"]
    if arch == "relu-l1":
        assert prov_ref["resampled_features"] > 0  # the sharded resampling path really ran
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert len(torch.load(ckpt / "optimizer.pt", weights_only=True)["ranks"]) == 2

    # the assembled SAE loads and encodes like the single-process one
    sae_a, sae_b = load_sae(ref), load_sae(out)
    assert type(sae_a) is type(sae_b) and sae_a.cfg.d_sae == sae_b.cfg.d_sae == 128
    x = synthetic_rows(256, seed=7) * sae_a.cfg.normaliser
    with torch.no_grad():
        fa, fb = sae_a.encode(x), sae_b.encode(x)
    assert float((fa - fb).abs().max()) <= 20 * TOLERANCE[arch]  # weight differences summed over d_in = 32 inputs
    assert torch.equal(fa > 0, fb > 0)

    # as if killed after the step-20 checkpoint: the resumed run ends bit-identical
    for ck in (out / "checkpoints").glob("step-*"):
        if int(ck.name[5:]) > 20:
            shutil.rmtree(ck)
    (out / "sae.safetensors").unlink()
    (out / "cfg.json").unlink()
    res = join_ranks(fork_ranks(2, tmp_path, store=store, out=out, config=cfg, shard_features=2, resume=True,
                                timeout_s=60), tmp_path)
    assert [r["code"] for r in res] == [0, 0], res
    again = weights(out)
    for k in b:
        assert torch.equal(b[k], again[k]), k
    assert load_sae(out).provenance["resampled_features"] == prov["resampled_features"]

