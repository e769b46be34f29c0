"""`torchrun --nproc-per-node 2 -m monoscope train ... --arch relu-l1 --shard-features 2`: real torchrun, real
workers. The run (L1 on decoder norms, resampling at 20/40/60% of the steps, each worker holding half the
features) ends with one process's weights (max abs diff <= 1e-5) and the SAE `monoscope train` would have written
in one process (same class, config and resample count). The refusal of transcoder and crosscoder is tested through the
Python API (test_train.py)."""

from __future__ import annotations

from pathlib import Path

from monoscope.sae import load_sae
from tests.distributed.helpers import COMMON, torchrun_sharded_matches_one_process

SETTINGS = {k: v for k, v in COMMON.items() if k != "k"} | {"arch": "relu-l1"}


def test_torchrun_relu_l1_feature_sharded_matches_one_process(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "sae"
    ref = torchrun_sharded_matches_one_process(store, tmp_path, SETTINGS, out)
    sa, sb = load_sae(ref), load_sae(out)
    assert type(sb).__name__ == "ReluL1SAE" and sb.cfg.to_dict() == sa.cfg.to_dict()
    assert sb.provenance["resampled_features"] == sa.provenance["resampled_features"] > 0
    assert sb.provenance["distributed"] == {"world_size": 2, "data_parallel": 1, "shard_features": 2}

