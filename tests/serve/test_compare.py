"""Cross-SAE best match: two tiny SAEs whose decoders are the same directions in another order (one scaled, one
turned a little), served as one run folder and with --compare; each feature page names the planted match."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from monoscope.features.db import FeatureDB
from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.io import save_sae
from monoscope.serve import create_app

D, F = 16, 12
PERM = [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6]
"""Feature i of `b` is feature PERM[i] of `a` (so a's feature PERM[i] best matches b's i)."""
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _sae(folder: Path, w_dec: torch.Tensor) -> None:
    sae = build_sae(SAEConfig(arch="relu-l1", d_in=D, d_sae=F, hook="resid_post.0", compute_dtype="float32"), seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
    save_sae(sae, folder)
    fdir = folder.parent / "features" if folder.name == "sae" else folder.with_name(folder.name + "-features")
    db = FeatureDB.create(fdir / "features.db", {"sae": {"path": str(folder), "d_sae": F}, "sae_key": folder.name,
                                                 "model": "none", "hook": "resid_post.0"})
    with db.transaction():
        db.put_features([{"id": i, "label": f"{folder.name} feature {i}", "density": 0.01, "max_act": 1.0}
                         for i in range(F)])
        db.set_meta({"complete": True})
    db.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(F, D, generator=g)
    b = a[PERM] * 3.0 + 0.05 * torch.randn(F, D, generator=g)  # scale does not matter to a cosine
    _sae(root / "run" / "sae", a)
    _sae(root / "run" / "sae-4x", b)
    _sae(root / "other" / "sae", b)
    return root / "run", root / "other" / "sae"


def _want(i: int) -> int:
    return PERM.index(i)


def test_best_match_in_a_run_folder_with_two_saes(pair: tuple[Path, Path]) -> None:
    run, _ = pair
    client = TestClient(create_app(run))
    for i in range(F):
        doc = client.get(f"/sae/sae/feature/{i}.json").json()
        (m,) = doc["best_match"]
        assert (m["sae"], m["id"], m["label"]) == ("sae-4x", _want(i), f"sae-4x feature {_want(i)}")
        assert 0.99 < m["cosine"] <= 1.0
        back = client.get(f"/sae/sae-4x/feature/{_want(i)}.json").json()["best_match"]
        assert [(x["sae"], x["id"]) for x in back] == [("sae", i)]
    page = client.get("/sae/sae/feature/3").text
    assert f'<a class="match" href="/sae/sae-4x/feature/{_want(3)}">sae-4x #{_want(3)}</a>' in page


def test_compare_another_run(pair: tuple[Path, Path]) -> None:
    run, other = pair
    client = TestClient(create_app(run / "sae", compare=[other]))  # one SAE folder, and one from elsewhere
    names = [s["name"] for s in client.get("/api/site").json()["saes"]]
    assert names == ["sae", "other-sae"]  # the other run's SAE is also named sae: named after its run
    doc = client.get("/sae/sae/feature/7.json").json()
    (m,) = doc["best_match"]
    assert (m["sae"], m["id"]) == ("other-sae", _want(7))
    assert client.get(f"/sae/{m['sae']}/feature/{m['id']}.json").json()["best_match"][0]["id"] == 7


def test_compare_errors(pair: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = pair
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "monoscope.cli", "serve", str(run), "--compare", str(tmp_path),
                        "--port", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: --compare {tmp_path} is not an SAE folder (no cfg.json): "
                                                 "pass the folder monoscope train wrote")
    bare = tmp_path / "bare"
    sae = build_sae(SAEConfig(arch="relu-l1", d_in=D, d_sae=F, hook="resid_post.0", compute_dtype="float32"), seed=0)
    save_sae(sae, bare)
    r = subprocess.run([sys.executable, "-m", "monoscope.cli", "serve", str(run), "--compare", str(bare),
                        "--port", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: --compare {bare} has no features database ({tmp_path / 'bare-features' / 'features.db'}): build "
        f"one with monoscope features {bare}, then serve again")
