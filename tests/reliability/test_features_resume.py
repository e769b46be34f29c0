"""A features pass killed at any point resumes to the same databases as an uninterrupted pass: at each
checkpoint, after the last batch, inside and between the finalisation stages, and while installing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from monoscope.cli import main
from monoscope.features import layout
from monoscope.features.build import KILL_ENV, build_features
from monoscope.features.db import FeatureDB
from tests.reliability.features_helpers import KW, cli, copy_saes, dump, shared_run

SMALL: dict[str, Any] = {**KW, "tokens": 256, "checkpoint_every": 2}
"""16 contexts in 8 batches of 2: checkpoints after batches 2, 4 and 6, then the streamed state after 8."""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_run(tmp_path_factory)


def _state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / ".pass" / "state.pt", weights_only=True)


def _stages(folder: Path) -> list[str]:
    return json.loads((folder / ".pass" / "stages.json").read_text())["done"]


def test_killed_at_every_point_resumes_to_the_same_databases(run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_saes(run, tmp_path, "sae", "sae-2x")
    # the feature map's UMAP costs ~20 s of JIT per process: a deterministic stand-in keeps the stage
    monkeypatch.setattr(layout, "feature_map", lambda w, **_: w.detach().float()[:, :2].numpy())
    kw = {**SMALL, "also": [root / "sae-2x"], "feature_map": True}
    ref = build_features(root / "sae", **kw)
    want = [dump(p) for p in ref.dbs]
    assert want[0]["splits"] and want[0]["examples"] and all(r[12] is not None for r in want[0]["features"])
    for p in ref.dbs:
        shutil.rmtree(p.parent)

    feats, small = root / "features", root / "sae-2x-features"
    monkeypatch.setenv("MONOSCOPE_FEATURES_KILL_HOW", "raise")

    def killed_at(point: str) -> None:
        monkeypatch.setenv(KILL_ENV, point)
        with pytest.raises(KeyboardInterrupt, match=point):
            build_features(root / "sae", **kw)
        monkeypatch.delenv(KILL_ENV)

    killed_at("checkpoint:1")  # the first checkpoint of the pass
    assert _state(feats)["done"] == 4 and not _state(feats)["streamed"]
    killed_at("checkpoint:2")  # this process resumed at 4 contexts: its 2nd checkpoint is the pass's last (12)
    assert _state(feats)["done"] == 12
    killed_at("streamed")  # after the last batch (a rerun crashed on an empty batch here)
    assert _state(feats)["done"] == 16 and _state(feats)["streamed"]
    real = FeatureDB.put_feature_rows

    def dying(self: FeatureDB, rows: Any) -> None:
        raise KeyboardInterrupt("inside finalisation")

    monkeypatch.setattr(FeatureDB, "put_feature_rows", dying)  # inside the first SAE's database transaction
    with pytest.raises(KeyboardInterrupt, match="inside finalisation"):
        build_features(root / "sae", **kw)
    monkeypatch.setattr(FeatureDB, "put_feature_rows", real)
    assert not (feats / "stages.json").exists() and not (feats / "features.db").exists()
    killed_at("finalised:0")
    assert _stages(feats) == ["finalised:0"]
    for point in ("finalised:1", "families", "maps", "complete"):
        killed_at(point)
        assert point in _stages(feats)
    assert not (feats / "features.db").exists() and (feats / ".new-features.db").is_file()
    killed_at("installed:0")
    assert (feats / "features.db").is_file() and not (small / "features.db").exists()
    res = build_features(root / "sae", **kw)
    assert res.new_tokens == 0 and res.dbs == ref.dbs and not (feats / ".pass").exists()
    assert [dump(p) for p in res.dbs] == want
    assert not (feats / ".new-features.db").exists() and not (small / ".new-features.db").exists()


def test_cli_killed_after_the_last_batch_resumes(run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The reported case: a pass killed after its last checkpoint crashed on every rerun (the kill is a real
    process exit; the rerun goes through the same CLI entry point in this process, to save a start-up)."""
    root = copy_saes(run, tmp_path, "sae")
    args = ["features", str(root / "sae"), "--tokens", "256", "--batch-contexts", "2", "--no-map", "--quiet"]
    p = cli(*args, env={KILL_ENV: "streamed"})  # exits at once, as kill -9 would
    assert p.returncode == 137, p.stderr
    assert _state(root / "features")["streamed"] and not (root / "features" / "features.db").exists()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "read " not in out and f"feature database: {root / 'features' / 'features.db'}" in out
    ref = build_features(copy_saes(run, tmp_path / "ref", "sae") / "sae", **{**SMALL, "checkpoint_every": 25})
    assert dump(root / "features" / "features.db") == dump(ref.dbs[0])
    assert main(args) == 0 and "already complete: nothing to do" in capsys.readouterr().out
