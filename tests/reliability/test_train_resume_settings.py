"""`train --resume` into a finished folder whose checkpoints are gone compares the settings with the
finished SAE's provenance instead of saying "already complete" and keeping an SAE of other settings;
a width written as a count or as a multiple of d_model is the same setting."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from monoscope.fileio import sha256_file
from tests.reliability.helpers import monoscope, one_line_error
from tests.train.helpers import make_store

BASE = ("--arch", "topk", "--k", "4", "--tokens", "2560", "--batch-size", "64", "--lr", "3e-3", "--quiet")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store (d_model 32) and a finished SAE of width 2x = 64 features whose checkpoints were deleted."""
    root = tmp_path_factory.mktemp("resume")
    make_store(root / "store")
    out = root / "sae"
    proc = monoscope("train", str(root / "store"), *BASE, "--width", "2x", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(out / "checkpoints")
    return root / "store", out


def test_same_width_as_a_count_is_already_complete(finished: tuple[Path, Path]) -> None:
    store, out = finished
    before = sha256_file(out / "sae.safetensors")
    proc = monoscope("train", str(store), *BASE, "--width", "64", "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "already complete: nothing to do" in proc.stdout
    assert sha256_file(out / "sae.safetensors") == before


def test_other_settings_are_refused_naming_each_difference(finished: tuple[Path, Path]) -> None:
    store, out = finished
    before = sha256_file(out / "sae.safetensors")
    args = [a if a != "4" else "8" for a in BASE]  # --k 8
    err = one_line_error(monoscope("train", str(store), *args, "--width", "3x", "--out", str(out), "--resume"))
    assert err == (f"error: cannot resume {out}: the finished SAE in it was trained with different settings "
                   f"(--k: 4 -> 8; --width: 64 -> 96): rerun with the original values, train into another --out, "
                   f"or delete {out} to train again with these")
    assert sha256_file(out / "sae.safetensors") == before  # the old SAE is untouched


def test_k_above_the_width_names_the_flags(finished: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from monoscope.cli import main

    store, _ = finished
    args = [a if a != "4" else "100" for a in BASE]
    assert main(["train", str(store), *args, "--width", "2x", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == ("error: --k 100 is more than the 64 features of --width 2x "
                                               "(d_model 32): lower --k or raise --width")
