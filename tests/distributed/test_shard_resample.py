"""Resampling dead features under feature sharding (2 and 4 forked gloo ranks): every rank draws the inputs
for all shards' dead features in global order, as one process does, and keeps its own; the live features' mean
norms are summed over the shards. relu-l1 on a 2x2 mesh (the draws from the all-gathered global batch) and topk
with --revive resample on 2 shards end with one process's weights (max abs diff <= 1e-5) and resample count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from monoscope.sae import load_sae
from tests.distributed.helpers import COMMON, one_process_and_ranks, weights


def settings(arch: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"k": None} if arch == "relu-l1" else {"revive": "resample"}
    return {**COMMON, "arch": arch, **extra}


@pytest.mark.parametrize(("arch", "world"), [("relu-l1", 4), ("topk", 2)], ids=["relu-l1-dp2xfs2", "topk-fs2"])
def test_resampling_on_shards_like_one_process(store: Path, tmp_path: Path, arch: str, world: int) -> None:
    ref, out, _ = one_process_and_ranks(store, tmp_path, settings(arch), world, shard_features=2)
    a, b = weights(ref), weights(out)
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(diff.values()) <= 1e-5, diff
    prov = load_sae(out).provenance
    assert prov["distributed"] == {"world_size": world, "data_parallel": world // 2, "shard_features": 2}
    assert prov["resampled_features"] == load_sae(ref).provenance["resampled_features"] > 0
