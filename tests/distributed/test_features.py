"""Distributed features pass: forked gloo ranks split the batches, rank 0 merges their codes in corpus
order; the databases (every table) equal those of one process, families and all."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from monoscope.features.build import build_features, build_features_distributed
from tests.distributed.helpers import fork_ranks, join_ranks

HOOK = "resid_post.1"
KW = {"tokens": 512, "batch_contexts": 4, "checkpoint_every": 3, "feature_map": False, "progress": False}


@pytest.fixture(scope="module")
def run(features_run: Path) -> Path:
    """The tiny run of `features_run` (tests/conftest.py)."""
    return features_run


def dump(db_path: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(str(db_path))
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    out = {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in tables}
    conn.close()
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_features_pass_equals_one_process(run: Path, tmp_path: Path, world: int) -> None:
    ref = build_features(run / "sae", also=[run / "sae-2x"], overwrite=True, **KW)  # type: ignore[arg-type]
    want = [dump(p) for p in ref.dbs]
    assert want[0]["features"] and want[0]["examples"]
    res = join_ranks(fork_ranks(world, tmp_path, build_features_distributed, sae=run / "sae", also=[run / "sae-2x"],
                                overwrite=True, **KW), tmp_path)
    assert [r["code"] for r in res] == [0] * world, res
    got = [dump(p) for p in ref.dbs]
    assert got == want
    assert not (run / "features" / ".pass").exists()


def test_killed_rank_0_then_the_distributed_pass_resumes(run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ref = build_features(run / "sae", overwrite=True, **KW)  # type: ignore[arg-type]
    want = dump(ref.dbs[0])
    monkeypatch.setenv("MONOSCOPE_FEATURES_KILL_AT", "checkpoint:1")  # rank 0 dies right after its first checkpoint
    res = join_ranks(fork_ranks(2, tmp_path, build_features_distributed, sae=run / "sae", overwrite=True, **KW),
                     tmp_path, timeout=60)
    assert res[0]["code"] is None  # killed
    assert res[1]["code"] == 2
    assert str(res[1]["msg"]).startswith("MonoscopeError: rank 1 of 2: a collective failed during the features pass")
    assert (run / "features" / ".pass" / "state.pt").is_file()
    monkeypatch.delenv("MONOSCOPE_FEATURES_KILL_AT")
    res = join_ranks(fork_ranks(2, tmp_path, build_features_distributed, sae=run / "sae", overwrite=True, **KW),
                     tmp_path)
    assert [r["code"] for r in res] == [0, 0], res
    assert dump(ref.dbs[0]) == want
