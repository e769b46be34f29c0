"""The feature map: deterministic, finite, near-duplicate features close; stored and drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB
from monoscope.features.layout import feature_map, plot_feature_map, store_map

N_BASE, D = 150, 32


def _twins(seed: int = 0) -> torch.Tensor:
    """N_BASE random directions followed by a near-duplicate of each (cosine ~0.999)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N_BASE, D, generator=g)
    base /= base.norm(dim=1, keepdim=True)
    twin = base + 0.03 * torch.randn(N_BASE, D, generator=g)
    return torch.cat([base, 3.0 * twin])  # norms differ: the cosine metric must not care


def _twin_vs_random(xy: np.ndarray) -> tuple[np.ndarray, float]:
    pair = np.linalg.norm(xy[:N_BASE] - xy[N_BASE:], axis=1)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(xy), (2, 2000))
    return pair, float(np.median(np.linalg.norm(xy[a] - xy[b], axis=1)))


@pytest.fixture(scope="module")
def twins_map() -> tuple[torch.Tensor, np.ndarray]:
    w = _twins()
    return w, feature_map(w, seed=0)


def test_map_is_finite_deterministic_and_keeps_twins_together(twins_map: tuple[torch.Tensor, np.ndarray]) -> None:
    w, xy = twins_map
    assert xy.shape == (2 * N_BASE, 2) and np.isfinite(xy).all()
    assert np.array_equal(xy, feature_map(w, seed=0))
    assert not np.allclose(xy, feature_map(w, seed=1))
    pair, typical = _twin_vs_random(xy)
    assert (pair < 0.25 * typical).mean() > 0.9


def test_subsampled_fit_places_the_rest_next_to_their_twins() -> None:
    w = _twins(seed=3)
    xy = feature_map(w, seed=0, max_fit=N_BASE)
    assert xy.shape == (2 * N_BASE, 2) and np.isfinite(xy).all()
    assert np.array_equal(xy, feature_map(w, seed=0, max_fit=N_BASE))
    pair, typical = _twin_vs_random(xy)
    assert (pair < 0.25 * typical).mean() > 0.8


def test_tiny_and_bad_inputs() -> None:
    for n in (1, 2, 3, 5):
        xy = feature_map(torch.randn(n, 8))
        assert xy.shape == (n, 2) and np.isfinite(xy).all()
    with pytest.raises(MonoscopeError, match="decoder rows"):
        feature_map(torch.randn(8))


def test_store_map_and_plot(tmp_path: Path, twins_map: tuple[torch.Tensor, np.ndarray]) -> None:
    _, xy = twins_map
    n = len(xy)
    density = np.geomspace(1e-5, 0.3, n)
    density[:10] = 0.0
    density[10:12] = np.nan
    db = FeatureDB.create(tmp_path / "features.db", {})
    with pytest.raises(MonoscopeError, match="0 feature rows"):
        store_map(db, xy)
    with db.transaction():
        db.put_features({"id": i, "density": float(d) if np.isfinite(d) else None} for i, d in enumerate(density))
    store_map(db, xy)
    np.testing.assert_allclose(db.column("map_x"), xy[:, 0], rtol=1e-6)
    np.testing.assert_allclose(db.column("map_y"), xy[:, 1], rtol=1e-6)
    assert db.feature(20)["density"] == pytest.approx(density[20])  # other columns untouched

    out = plot_feature_map(xy, db.column("density"), tmp_path / "plots" / "map.png", title="test ")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(out.parent.glob(".tmp-*"))
    with pytest.raises(MonoscopeError, match="density"):
        plot_feature_map(xy, density[:-1], tmp_path / "bad.png")
    db.close()
