"""`torchrun --nproc-per-node 2 -m monoscope train ... --arch relu-l1 --shard-features 2`: real torchrun, real
workers. The run (L1 on decoder norms, resampling at 20/40/60% of the steps, each worker holding half the
features) ends with one process's weights (max abs diff <= 1e-5) and the SAE `monoscope train` would have written
in one process (same class, config and resample count). The refusal of transcoder and crosscoder is tested through the
Python API (test_train.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from monoscope.sae import load_sae
from monoscope.train import train
from tests.distributed.helpers import COMMON, env, torchrun, train_args, weights
from tests.train.helpers import make_store

SETTINGS = {k: v for k, v in COMMON.items() if k != "k"} | {"arch": "relu-l1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("acts") / "store"
    make_store(folder)
    return folder


def test_torchrun_relu_l1_feature_sharded_matches_one_process(store: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    train(ref, store=store, progress=False, **SETTINGS)
    out = tmp_path / "sae"
    done = subprocess.run(torchrun(2, ["train", *train_args(store, out, SETTINGS, "--shard-features", "2")]),
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    sa, sb = load_sae(ref), load_sae(out)
    assert type(sb).__name__ == "ReluL1SAE" and sb.cfg.to_dict() == sa.cfg.to_dict()
    assert sb.provenance["resampled_features"] == sa.provenance["resampled_features"] > 0
    assert sb.provenance["distributed"] == {"world_size": 2, "data_parallel": 1, "shard_features": 2}

