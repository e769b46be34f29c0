"""Feature sharding of the architectures whose features decide alone (relu-l1), 2 forked gloo ranks
(--shard-features 2): each rank holds half the features; the partial reconstructions and the partial
per-feature penalties are all-reduced. After 60 steps the assembled SAE equals one process's on the same
batches (max abs weight difference <= 1e-5 unless a test says why more), relu-l1 resamples dead features
over both shards with the draws one process makes, a resume from a mid-run checkpoint ends bit-identical,
and the assembled SAE loads and encodes like the single-process one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from monoscope.sae import load_sae
from monoscope.train import TrainConfig, train
from tests.distributed.helpers import COMMON, fork_ranks, join_ranks, weights
from tests.train.helpers import make_store, synthetic_rows

ARCHS: dict[str, dict[str, Any]] = {
    "relu-l1": {"arch": "relu-l1", "k": None},  # revive auto = resample at steps 12, 24, 36
    "jumprelu": {"arch": "jumprelu", "k": None},
    "gated": {"arch": "gated", "k": None},
}
TOLERANCE = {"relu-l1": 1e-5, "jumprelu": 1e-5, "gated": 1e-5}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("acts") / "store"
    make_store(folder)
    return folder


def settings(arch: str) -> dict[str, Any]:
    return {**COMMON, **ARCHS[arch], "keep_checkpoints": 10}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_feature_sharded_equals_one_process_and_resumes_exactly(store: Path, tmp_path: Path, arch: str) -> None:
    ref = tmp_path / "ref"
    train(ref, store=store, progress=False, **settings(arch))
    out = tmp_path / "sae"
    cfg = TrainConfig(**{**settings(arch), "progress": False})
    res = join_ranks(fork_ranks(2, tmp_path, store=store, out=out, config=cfg, shard_features=2, timeout_s=60),
                     tmp_path)
    assert [r["code"] for r in res] == [0, 0], res
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
    assert float((fa - fb).abs().max()) <= 1e-4
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
