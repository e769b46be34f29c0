"""The ablation-effect panel's numbers equal a brute-force computation on the tiny run: for each token t, one
forward of the prefix before it, clean and with the feature removed at the hook by full decodes
(x <- decode(f with the feature zeroed) + (x - decode(f)), the BOS row untouched)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from monoscope.features.db import FeatureDB
from monoscope.model.hooks import _first_tensor, _module_for
from monoscope.serve import create_app, views
from monoscope.steer.target import open_target


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> TestClient:
    return TestClient(create_app(tiny_run, device="cpu", compute_dtype="fp32"))


def _brute_force(tiny_run: Path, ids: list[int], feature: int) -> tuple[list[float], list[float]]:
    """(loss clean, loss ablated) of each token t >= 1, one prefix forward each."""
    t = open_target(tiny_run / "sae", device="cpu", compute_dtype="fp32")
    sae, bos = t.sae, t.lm.special_ids()[0]
    module, pre = _module_for(t.lm.layout, t.hook)
    assert not pre

    def ablate(_m: torch.nn.Module, _a: object, out: object) -> object:
        h = _first_tensor(out)
        x = h[0].float()
        f = sae.encode_raw(x)
        g = f.clone()
        g[:, feature] = 0
        new = sae.decode_raw(g) + (x - sae.decode_raw(f))
        keep = torch.tensor(cur) == bos
        new[keep] = x[keep]
        new = new[None].to(h.dtype)
        return new if isinstance(out, torch.Tensor) else (new, *out[1:])

    clean, abl = [], []
    for n in range(1, len(ids)):
        cur = ids[:n]
        x = torch.tensor([cur])
        with torch.no_grad():
            lp = torch.log_softmax(t.lm.model(input_ids=x, use_cache=False).logits[0, -1].float(), -1)
            h = module.register_forward_hook(ablate)
            try:
                lpa = torch.log_softmax(t.lm.model(input_ids=x, use_cache=False).logits[0, -1].float(), -1)
            finally:
                h.remove()
        clean.append(-float(lp[ids[n]]))
        abl.append(-float(lpa[ids[n]]))
    return clean, abl


def test_ablation_effect_equals_brute_force(client: TestClient, tiny_run: Path) -> None:
    with FeatureDB.open(tiny_run / "features" / "features.db") as db:
        fid = next(f for f in db.features_with_examples() if (db.feature(f) or {}).get("max_act", 0) > 0)
        top, _ = views.shown_records(db.packed_examples(fid))
    r = top[0]
    window = [int(i) for i in r["tokens"][: r["ntok"]]]
    doc = client.post(f"/api/sae/sae/feature/{fid}/ablation", json={"kind": "top", "index": 0}).json()
    assert doc["feature"] == fid and len(doc["tokens"]) == len(window) == len(doc["delta"]) == len(doc["acts"])
    bos = open_target(tiny_run / "sae", device="cpu", compute_dtype="fp32").lm.special_ids()[0]
    lead = [] if window[0] == bos else [bos]
    clean, abl = _brute_force(tiny_run, lead + window, fid)
    k = len(lead)  # the window's first token is predicted from the BOS put before it
    got_delta = [d for d in doc["delta"]]
    want_delta = (np.array(abl) - np.array(clean))[len(clean) - len(window) + (1 - k):]
    if k == 0:
        assert got_delta[0] is None
        got_delta = got_delta[1:]
    assert np.array(got_delta, dtype=float) == pytest.approx(want_delta, abs=2e-4)
    assert np.array([x for x in doc["loss"] if x is not None]) == pytest.approx(clean[len(clean) - len(got_delta):],
                                                                                abs=2e-4)
    # the feature fires on this window and removing it changes the loss somewhere: a test that can fail
    assert max(doc["acts"]) > 0 and max(abs(x) for x in got_delta) > 1e-3
    assert doc["rows_edited"] == len(window) + k - 1  # every row but the BOS


def test_ablation_errors(client: TestClient, tiny_run: Path) -> None:
    with FeatureDB.open(tiny_run / "features" / "features.db") as db:
        fid = db.features_with_examples()[0]
        n = len(views.shown_records(db.packed_examples(fid))[0])
    r = client.post(f"/api/sae/sae/feature/{fid}/ablation", json={"kind": "top", "index": n})
    assert r.status_code == 404 and r.json()["detail"] == (f"feature {fid} shows {n} top contexts: pass index 0 "
                                                           f"to {n - 1}")
    assert client.post(f"/api/sae/sae/feature/{fid}/ablation", json={"kind": "bottom"}).status_code == 422
    assert client.post("/api/sae/sae/feature/999999/ablation", json={}).status_code == 404
