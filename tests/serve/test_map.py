"""The co-activation map: features that fire together are laid out together, the layout is cached, and the
run page offers it beside the decoder map."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from monoscope.features.db import FeatureDB
from monoscope.serve import create_app


@pytest.mark.integration  # UMAP's numba JIT: ~20 s on an idle 2-core CPU, minutes on a loaded one
def test_coactivation_map_puts_cofiring_features_together(tiny_run: Path) -> None:
    t0 = time.perf_counter()
    app = create_app(tiny_run, coactivation_map=True)
    first = time.perf_counter() - t0
    c = TestClient(app)
    doc = c.get("/sae/sae/map.json", params={"kind": "coactivation"}).json()
    with FeatureDB.open(tiny_run / "features" / "features.db") as db:
        co = dict(db.cooccurrence())
    assert doc["n"] == len(co) and {p[0] for p in doc["points"]} == set(co)
    xy = {p[0]: np.array(p[1:3]) for p in doc["points"]}
    partner = [np.linalg.norm(xy[i] - xy[int(c[0][0])]) for i, c in co.items() if int(c[0][0]) in xy]
    rng = np.random.default_rng(0)
    ids = list(xy)
    rand = [np.linalg.norm(xy[a] - xy[b]) for a, b in rng.choice(ids, size=(2000, 2))]
    # a feature's strongest co-firing partner sits far closer than a random feature
    assert np.median(partner) < 0.5 * np.median(rand), (np.median(partner), np.median(rand))
    page = c.get("/?map=coactivation").text
    assert 'data-src="/sae/sae/map.json?kind=coactivation"' in page and "<b>co-activation</b>" in page
    assert 'href="?map=decoder#map"' in c.get("/").text  # shown first once computed
    assert 'href="?map=coactivation#map"' in c.get("/?map=decoder").text
    # the second start reads the cached layout
    t0 = time.perf_counter()
    again = TestClient(create_app(tiny_run, coactivation_map=True))
    assert time.perf_counter() - t0 < first
    assert again.get("/sae/sae/map.json", params={"kind": "coactivation"}).json()["points"] == doc["points"]


def test_coactivation_map_is_404_unless_asked_for(tiny_run: Path) -> None:
    c = TestClient(create_app(tiny_run))
    r = c.get("/sae/sae/map.json", params={"kind": "coactivation"})
    assert r.status_code == 404 and "--coactivation-map" in r.json()["detail"]
    assert c.get("/?map=coactivation").status_code == 404
    assert 'href="?map=coactivation#map"' not in c.get("/").text


def test_auto_lays_out_in_the_background_and_shows_it_first(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`monoscope serve`'s default ("auto"): the server answers at once with the decoder map and a note, lays
    the co-activation map out in a thread (here a stand-in layout: the UMAP itself is the integration test
    above), then shows it first; SAEs above AUTO_MAX_FEATURES are left to --coactivation-map."""
    import threading

    from monoscope.serve import coact

    release = threading.Event()

    def slow_layout(db_path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        release.wait(30)
        ids = np.arange(8)
        return ids, np.stack([ids, ids[::-1]], 1).astype(np.float32)

    monkeypatch.setattr(coact, "cached_only", lambda db_path, seed=0: None)
    monkeypatch.setattr(coact, "cached_layout", slow_layout)
    monkeypatch.setattr(coact, "AUTO_MAX_FEATURES", 300)  # sae (4x: 256 features) yes, sae-2x (128) yes
    app = create_app(tiny_run, coactivation_map="auto")
    c = TestClient(app)
    first = c.get("/").text
    assert 'data-src="/sae/sae/map.json?kind=decoder"' in first and 'id="coact-pending"' in first
    release.set()
    site = app.state.site
    deadline = time.time() + 30
    while any(e.coact_pending for e in site.entries.values()):
        assert time.time() < deadline
        time.sleep(0.05)
    page = c.get("/").text
    assert 'data-src="/sae/sae/map.json?kind=coactivation"' in page and 'href="?map=decoder#map"' in page
    assert c.get("/sae/sae/map.json", params={"kind": "coactivation"}).json()["n"] == 8
    monkeypatch.setattr(coact, "AUTO_MAX_FEATURES", 100)  # both SAEs too wide: decoder map only, no thread
    c = TestClient(create_app(tiny_run, coactivation_map="auto"))
    assert all(e.coact is None and not e.coact_pending for e in c.app.state.site.entries.values())
    assert 'id="coact-pending"' not in c.get("/").text
