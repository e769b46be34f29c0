from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import monoscope.train.checkpoint as ckpt_mod
from monoscope.train.checkpoint import Checkpoint, CheckpointDir, rng_state, set_rng_state


def make(step: int) -> Checkpoint:
    return Checkpoint(step, {"w": torch.full((3, 2), float(step))}, {"state": {0: {"m": torch.ones(2) * step}}},
                      {"since": torch.arange(4) + step}, {"step": step, "cursor": {"chunk": step, "offset": 1}})


def test_save_keeps_the_newest_two_and_latest_reads_back(tmp_path: Path) -> None:
    d = CheckpointDir(tmp_path / "ck", keep=2)
    for step in (10, 20, 30):
        d.save(make(step))
    assert d.complete_steps() == [20, 30]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000020", "step-00000030"]
    assert sorted(p.name for p in (tmp_path / "ck" / "step-00000030").iterdir()) == sorted(
        ["COMPLETE", "sae.safetensors", "optimizer.pt", "state.pt", "state.json"])
    got = d.latest()
    assert got is not None and got.step == 30
    assert torch.equal(got.sae["w"], make(30).sae["w"])
    assert torch.equal(got.optimizer["state"][0]["m"], torch.ones(2) * 30)
    assert torch.equal(got.tensors["since"], torch.arange(4) + 30) and got.meta["cursor"] == {"chunk": 30, "offset": 1}
    marker = json.loads((tmp_path / "ck" / "step-00000030" / "COMPLETE").read_text())
    assert marker["step"] == 30
    assert set(marker["files"]) == {"sae.safetensors", "optimizer.pt", "state.pt", "state.json"}


def test_a_crash_inside_a_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = CheckpointDir(tmp_path / "ck")
    d.save(make(10))
    real = ckpt_mod._write_part

    def dying(path: Path, name: str, ckpt: object) -> None:
        real(path, name, ckpt)  # type: ignore[arg-type]
        if name == "optimizer.pt":  # sae.safetensors and optimizer.pt are on disk, the rest is not
            raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt_mod, "_write_part", dying)
    with pytest.raises(KeyboardInterrupt):
        d.save(make(20))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step-00000010"]
    got = CheckpointDir(tmp_path / "ck").latest()
    assert got is not None and got.step == 10


def test_leftovers_of_a_killed_save_are_ignored_and_removed(tmp_path: Path) -> None:
    d = CheckpointDir(tmp_path / "ck")
    d.save(make(10))
    tmp = tmp_path / "ck" / ".tmp-step-00000020-abcd"
    tmp.mkdir()
    (tmp / "sae.safetensors").write_bytes(b"half")
    no_marker = tmp_path / "ck" / "step-00000030"
    no_marker.mkdir()
    assert d.latest().step == 10  # type: ignore[union-attr]
    CheckpointDir(tmp_path / "ck")  # opening cleans temp folders
    assert not tmp.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    d = CheckpointDir(tmp_path / "ck")
    d.save(make(10))
    d.save(make(20))
    f = tmp_path / "ck" / "step-00000020" / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    got = d.latest()
    assert got is not None and got.step == 10
    assert len(d.skipped) == 1 and "optimizer.pt does not match its sha256" in d.skipped[0]


def test_rng_states_round_trip() -> None:
    import random

    import numpy as np

    state = rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
