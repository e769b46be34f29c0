"""Feature families: a child SAE made by splitting a parent's features must map back to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.features import families as families_mod
from monoscope.features.db import FeatureDB
from monoscope.features.families import (
    Match,
    build_families,
    families,
    match_features,
    sae_key,
    split_children,
    split_parent,
    store_families,
)
from monoscope.sae import SAE, SAEConfig, build_sae, read_sae_metadata, save_sae

D_IN, F_PARENT = 16, 64


def _split_child(parent: SAE, eps: float = 0.3, seed: int = 1) -> tuple[SAE, np.ndarray]:
    """A 2x child: parent row i becomes rows 2i and 2i+1 = row ± eps·(unit noise orthogonal to it),
    renormalised (cosine to the parent 1/sqrt(1+eps²) = 0.958). Returns (child, true parent per child)."""
    g = torch.Generator().manual_seed(seed)
    w = parent.W_dec.detach()
    noise = torch.randn(w.shape, generator=g)
    noise -= (noise * w).sum(1, keepdim=True) * w
    noise /= noise.norm(dim=1, keepdim=True)
    rows = torch.stack([w + eps * noise, w - eps * noise], dim=1).reshape(-1, w.shape[1])
    rows /= rows.norm(dim=1, keepdim=True)
    child = build_sae(SAEConfig(arch="topk", d_in=D_IN, d_sae=2 * F_PARENT, k=4), seed=0)
    with torch.no_grad():
        child.W_dec.copy_(rows)
        child.W_enc.copy_(rows)
    return child.eval(), np.repeat(np.arange(F_PARENT), 2)


def _acts(child: SAE, n: int = 2000, seed: int = 2) -> torch.Tensor:
    """Rows made of one or two child features with positive coefficients plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    w = child.W_dec.detach()
    idx = torch.randint(0, w.shape[0], (n, 2), generator=g)
    coef = torch.rand(n, 2, generator=g) * 3 + 1
    coef[:, 1] *= (torch.rand(n, generator=g) < 0.5).float()
    return (coef[:, :, None] * w[idx]).sum(1) + 0.05 * torch.randn(n, D_IN, generator=g)


@pytest.fixture()
def pair() -> tuple[SAE, SAE, np.ndarray]:
    # unit-norm rows, as a trained SAE's decoder (the split below assumes them)
    parent = build_sae(SAEConfig(arch="topk", d_in=D_IN, d_sae=F_PARENT, k=4, init_decoder_norm=1.0), seed=0).eval()
    child, truth = _split_child(parent)
    return parent, child, truth


def test_children_map_to_their_true_parent(pair: tuple[SAE, SAE, np.ndarray]) -> None:
    parent, child, truth = pair
    matches = match_features(parent, child, _acts(child))
    assert [m.child for m in matches] == list(range(2 * F_PARENT))
    assert np.array_equal([m.parent for m in matches], truth)
    assert min(m.cosine for m in matches) > 0.9
    corr = np.array([m.corr for m in matches], dtype=float)
    assert np.isfinite(corr).all()
    assert np.median(corr) > 0.7 and (corr > 0.4).mean() > 0.9


def test_correlation_matches_numpy_and_blocks_do_not_matter(
    pair: tuple[SAE, SAE, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    parent, child, _ = pair
    acts = _acts(child, n=500)
    ref = match_features(parent, child, acts)
    monkeypatch.setattr(families_mod, "_CODE_ELEMS", 1000)  # 5 rows per encoding block
    small = match_features(parent, child, acts, chunk=7)
    assert [(m.child, m.parent) for m in small] == [(m.child, m.parent) for m in ref]
    np.testing.assert_allclose([m.cosine for m in small], [m.cosine for m in ref], atol=1e-6)
    np.testing.assert_allclose([m.corr for m in small], [m.corr for m in ref], atol=1e-9)
    with torch.no_grad():
        fc, fp = child.encode_raw(acts).numpy(), parent.encode_raw(acts).numpy()
    for m in ref[::17]:
        want = np.corrcoef(fc[:, m.child], fp[:, m.parent])[0, 1]
        assert m.corr == pytest.approx(want, abs=1e-6)


def test_min_cosine_drops_children_and_no_acts_means_no_corr(pair: tuple[SAE, SAE, np.ndarray]) -> None:
    parent, child, _ = pair
    assert match_features(parent, child, min_cosine=0.99) == []
    matches = match_features(parent, child)
    assert len(matches) == 2 * F_PARENT and all(m.corr is None for m in matches)
    # a feature that never fires on the rows has no correlation, not a NaN or a crash
    with torch.no_grad():
        child.b_enc[0] = -1e6
    m0 = match_features(parent, child, _acts(child, n=300))[0]
    assert m0.child == 0 and m0.corr is None


def test_mismatched_saes_are_refused(pair: tuple[SAE, SAE, np.ndarray]) -> None:
    parent, child, _ = pair
    other = build_sae(SAEConfig(arch="topk", d_in=2 * D_IN, d_sae=128, k=4), seed=0)
    with pytest.raises(MonoscopeError, match=rf"parent d_in={D_IN}.*child d_in={2 * D_IN}"):
        match_features(parent, other)
    hooked = build_sae(SAEConfig(arch="topk", d_in=D_IN, d_sae=128, k=4, hook="resid_post.3"), seed=0)
    parent.cfg.hook = "resid_post.5"
    with pytest.raises(MonoscopeError, match=r"resid_post\.5.*resid_post\.3"):
        match_features(parent, hooked)
    with pytest.raises(MonoscopeError, match="wider SAE as child"):
        match_features(child, build_sae(SAEConfig(arch="topk", d_in=D_IN, d_sae=32, k=4), seed=0))
    with pytest.raises(MonoscopeError, match=r"\[N >= 2, 16\]"):
        match_features(parent, child, torch.zeros(10, 8))


def test_sae_key_is_stable_and_names_the_weights(tmp_path: Path, pair: tuple[SAE, SAE, np.ndarray]) -> None:
    parent, child, _ = pair
    folder = save_sae(parent, tmp_path / "p")
    sha = read_sae_metadata(folder)["weights"]["sha256"]
    assert sae_key(folder) == sae_key(str(folder)) == f"{F_PARENT}:{sha[:12]}"
    assert sae_key(parent) == sae_key(parent) != sae_key(child)
    assert sae_key(parent).startswith(f"{F_PARENT}:tensors-")


def test_splits_round_trip_through_the_database(tmp_path: Path, pair: tuple[SAE, SAE, np.ndarray]) -> None:
    parent, child, truth = pair
    pdir, cdir = save_sae(parent, tmp_path / "sae-4x"), save_sae(child, tmp_path / "sae-16x")
    pkey, ckey = sae_key(pdir), sae_key(cdir)
    db = FeatureDB.create(tmp_path / "features.db", {"sae": {"d_sae": 2 * F_PARENT}})
    matches = build_families(db, pdir, cdir, _acts(child))
    db.close()

    db = FeatureDB.open(tmp_path / "features.db")
    fam = families(db, pkey, ckey)
    assert sorted(fam) == list(range(F_PARENT))
    assert all(sorted(fam[p]) == [2 * p, 2 * p + 1] for p in fam)
    # the one-liner, by folder or by key, and its inverse
    assert sorted(split_children(db, pdir, 5, cdir)) == [10, 11]
    assert split_children(db, pkey, 5, ckey) == split_children(db, str(pdir), 5, str(cdir))
    assert split_parent(db, cdir, 11, pdir) == 5
    rows = db.children(pkey, 5, ckey)
    assert rows[0]["cosine"] >= rows[1]["cosine"] > 0.9 and rows[0]["corr"] is not None
    assert {r["child"] for r in rows} == {10, 11}
    # a rerun replaces the pair's families instead of leaving stale children
    assert store_families(db, pkey, ckey, [Match(0, 3, 0.8, None)]) == 1
    assert families(db, pkey, ckey) == {3: [0]}
    assert split_parent(db, cdir, 11, pdir) is None
    assert len(matches) == len(truth)
    with pytest.raises(MonoscopeError, match="neither an SAE folder nor a key"):
        split_children(db, tmp_path / "missing", 5, cdir)
    db.close()
