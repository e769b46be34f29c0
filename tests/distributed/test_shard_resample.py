"""Resampling dead features under feature sharding (2 and 4 forked gloo ranks): every rank draws the inputs
for all shards' dead features in global order, as one process does, and keeps its own; the live features' mean
norms are summed over the shards. relu-l1 on a 2x2 mesh (the draws from the all-gathered global batch) and topk
with --revive resample on 2 shards end with one process's weights (max abs diff <= 1e-5) and resample count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from monoscope.sae import load_sae
from monoscope.train import TrainConfig, train
from tests.distributed.helpers import COMMON, fork_ranks, join_ranks, weights
from tests.train.helpers import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("acts") / "store"
    make_store(folder)
    return folder


def settings(arch: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"k": None} if arch == "relu-l1" else {"revive": "resample"}
    return {**COMMON, "arch": arch, **extra}


@pytest.mark.parametrize(("arch", "world"), [("relu-l1", 4), ("topk", 2)], ids=["relu-l1-dp2xfs2", "topk-fs2"])
def test_resampling_on_shards_like_one_process(store: Path, tmp_path: Path, arch: str, world: int) -> None:
    ref = tmp_path / "ref"
    train(ref, store=store, progress=False, **settings(arch))
    out = tmp_path / "sae"
    cfg = TrainConfig(**{**settings(arch), "progress": False})
    res = join_ranks(fork_ranks(world, tmp_path, store=store, out=out, config=cfg, shard_features=2, timeout_s=60),
                     tmp_path)
    assert [r["code"] for r in res] == [0] * world, res
    a, b = weights(ref), weights(out)
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(diff.values()) <= 1e-5, diff
    prov = load_sae(out).provenance
    assert prov["distributed"] == {"world_size": world, "data_parallel": world // 2, "shard_features": 2}
    assert prov["resampled_features"] == load_sae(ref).provenance["resampled_features"] > 0
