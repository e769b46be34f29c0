"""The live panels on the tiny run: activations, search by text and contrast, and streamed steering that
gives the same text as `monoscope steer` for the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from monoscope.search.text import Searcher
from monoscope.serve import create_app
from monoscope.steer.edits import Edit
from monoscope.steer.generate import side_by_side
from monoscope.steer.target import open_target


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> TestClient:
    return TestClient(create_app(tiny_run, device="cpu", compute_dtype="fp32"))


@pytest.fixture(scope="module")
def searcher(tiny_run: Path) -> Searcher:
    s = Searcher.open(tiny_run / "sae", device="cpu", compute_dtype="fp32")
    yield s
    s.close()


TEXT = "the quick brown fox jumps over the lazy dog"


def test_activations_match_the_searcher(client: TestClient, searcher: Searcher) -> None:
    want = searcher.search_text(TEXT, top=10, evidence=3)
    fid = want.hits[0].feature
    doc = client.post("/api/sae/sae/activations", json={"text": TEXT, "feature": fid, "top": 10}).json()
    assert doc["tokens"] == want.tokens
    assert [h["feature"] for h in doc["hits"]] == [h.feature for h in want.hits]
    ids = searcher.tokenize([TEXT])[0]
    _, codes = next(searcher.codes([ids]))
    assert doc["feature"]["acts"] == pytest.approx(codes[:, fid].tolist(), abs=1e-3)
    assert max(doc["feature"]["acts"]) == pytest.approx(want.hits[0].act, abs=1e-3)
    r = client.post("/api/sae/sae/activations", json={"text": "   ", "feature": fid})
    assert r.status_code == 422 and r.json()["detail"] == "the text is empty: give text for the model to read"


def test_search_by_text_and_contrast(client: TestClient, searcher: Searcher) -> None:
    doc = client.post("/api/sae/sae/text", json={"text": TEXT, "top": 5}).json()
    assert [h["feature"] for h in doc["hits"]] == [h.feature for h in searcher.search_text(TEXT, top=5).hits]
    page = client.get("/sae/sae/search", params={"text": TEXT}).text
    assert all(f'href="/sae/sae/feature/{h["feature"]}"' in page for h in doc["hits"])
    pos = ["def add(a, b):", "def f(x): return x", "def g(): pass"]
    neg = ["the lazy dog", "le chien paresseux", "der faule hund"]
    from monoscope.search.contrast import contrast

    want = contrast(searcher, pos, neg, top=5)
    got = client.post("/api/sae/sae/contrast", json={"pos": pos, "neg": neg, "top": 5}).json()
    assert [h["feature"] for h in got["hits"]] == [h.feature for h in want.hits]
    assert got["hits"][0]["auroc"] == pytest.approx(want.hits[0].auroc)
    page = client.post("/sae/sae/search", content="pos=" + "%0A".join(p.replace(" ", "+") for p in pos) + "&neg="
                       + "%0A".join(n.replace(" ", "+") for n in neg),
                       headers={"content-type": "application/x-www-form-urlencoded"}).text
    assert f'href="/sae/sae/feature/{want.hits[0].feature}"' in page and "features separating the sets" in page


def test_streamed_steering_equals_monoscope_steer(client: TestClient, tiny_run: Path, searcher: Searcher) -> None:
    fid = searcher.search_text(TEXT, top=1).hits[0].feature
    body = {"edits": [{"feature": fid, "strength": 8}], "prompt": "the quick", "max_new_tokens": 12,
            "temperature": 0.8, "seed": 3}
    with client.stream("POST", "/api/sae/sae/steer", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line]
    done = events[-1]["done"]
    streamed = {run: "".join(e["text"] for e in events if e.get("run") == run) for run in ("default", "steered")}
    assert sum(1 for e in events if e.get("run") == "steered") >= 2  # token by token, not one block
    assert streamed == {"default": done["default"], "steered": done["steered"]}
    t = open_target(tiny_run / "sae", device="cpu", compute_dtype="fp32")
    want = side_by_side(t, [Edit(fid, "clamp", "8x")], "the quick", max_new_tokens=12, temperature=0.8, seed=3)
    assert done["default"] == want["default"] and done["steered"] == want["steered"]
    # the edit moves the model's probabilities (on this random tiny model the sampled texts may still coincide:
    # its next-token distribution is near uniform, and both runs draw the same random numbers)
    assert max(abs(tok["delta"]) for tok in want["tokens"]["default"]) > 0.1
    assert done["edits"][0]["raw_value"] == pytest.approx(8 * float(t.max_acts[fid]))


def test_busy_and_timeout(tiny_run: Path) -> None:
    app = create_app(tiny_run, device="cpu", compute_dtype="fp32", max_waiting=0)
    c = TestClient(app)
    live = app.state.live
    live._pending = 1  # one request running, none may wait
    r = c.post("/api/sae/sae/text", json={"text": TEXT})
    assert r.status_code == 429 and "already running or waiting" in r.json()["detail"]
    r = c.post("/api/sae/sae/steer", json={"edits": [{"feature": 1, "strength": 2}], "prompt": "hi"})
    assert r.status_code == 429
    live._pending = 0
    live.timeout = 1e-4
    r = c.post("/api/sae/sae/text", json={"text": TEXT})
    assert r.status_code == 504 and "took more than" in r.json()["detail"]
