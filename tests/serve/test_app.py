"""The web app through its HTTP interface (FastAPI's TestClient): pages, JSON, escaping, limits, token, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB
from monoscope.serve import create_app
from monoscope.serve.app import MAX_BODY, MAX_NEW_TOKENS

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> TestClient:
    return TestClient(create_app(tiny_run, device="cpu", compute_dtype="fp32"))


def _db(run: Path, name: str = "features") -> FeatureDB:
    return FeatureDB.open(run / name / "features.db")


def test_run_page_shows_eval_interesting_features_and_map(client: TestClient, tiny_run: Path) -> None:
    r = client.get("/")
    assert r.status_code == 200
    metrics = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    rows = metrics["heldout"] or metrics["store_rows"]
    assert f"{rows['fvu']:.4f}" in r.text and "FVU (" in r.text
    with _db(tiny_run) as db:
        first = db.most_interesting(30) or db.most_interesting(30, with_examples=True)
    assert f'href="/sae/sae/feature/{first[0]["id"]}"' in r.text
    for png in metrics["plots"]:
        assert f'src="/sae/sae/png/eval-{png}"' in r.text
        img = client.get(f"/sae/sae/png/eval-{png}")
        assert img.status_code == 200 and img.content[:4] == b"\x89PNG"
    m = client.get("/sae/sae/map.json").json()
    assert m["n"] == m["shown"] == 256 and len(m["points"]) == 256 and m["regions"]
    assert r.headers["content-security-policy"].startswith("default-src 'self'; script-src 'self'")


def test_feature_json_is_the_database(client: TestClient, tiny_run: Path) -> None:
    with _db(tiny_run) as db:
        fid = db.most_interesting(1, with_examples=True)[0]["id"]
        row = db.feature(fid)
        top = db.examples(fid, "top")
        n_bins = len({e["bin"] for e in db.examples(fid, "quantile")})
    with _db(tiny_run, "sae-2x-features") as small:
        parents = small.parent(_key(tiny_run), fid)
    doc = client.get(f"/sae/sae/feature/{fid}.json").json()
    assert doc["id"] == fid and doc["label"] == row["label"] and doc["max_act"] == pytest.approx(row["max_act"])
    assert doc["density"] == pytest.approx(row["density"]) and doc["fires"] == row["fires"]
    assert [n["id"] for n in doc["neighbours"]] == [int(i) for i, _ in row["neighbours"]]
    assert [n["id"] for n in doc["cooccur"]] == [int(i) for i, _ in row["cooccur"]]
    assert [c["act"] for c in doc["top"]] == pytest.approx([e["act"] for e in top])
    best = doc["top"][0]
    assert best["acts"][best["position"]] == pytest.approx(row["max_act"], rel=1e-2)
    assert len(doc["quantiles"]) == n_bins
    assert sum(b["count"] for b in doc["histogram"]) == row["fires"]
    assert [(p["sae"], p["id"]) for p in doc["family"]["parents"]] == [("sae-2x", p["parent"]) for p in parents]
    assert doc["prev"] == fid - 1 and doc["next"] == fid + 1 and doc["permalink"] == f"/sae/sae/feature/{fid}"
    page = client.get(f"/sae/sae/feature/{fid}")
    assert page.status_code == 200
    for n in doc["neighbours"]:
        assert f'href="/sae/sae/feature/{n["id"]}"' in page.text
    for p in doc["family"]["parents"]:
        assert f'href="/sae/sae-2x/feature/{p["id"]}"' in page.text
    # shading: the peak token carries the full colour and its value on hover
    assert 'class="tok s10 peak" title="' in page.text
    assert client.get(f"/sae/sae/feature/{fid}.json").headers["content-type"] == "application/json"


def _key(run: Path) -> str:
    with _db(run) as db:
        return str(db.meta()["sae_key"])


def test_corpus_html_is_shown_as_text(client: TestClient, tiny_run: Path) -> None:
    """The corpus holds <script> and <img onerror=...>; pages must show them as text, never as markup."""
    seen = 0
    for fid in range(256):
        doc = client.get(f"/sae/sae/feature/{fid}.json").json()
        texts = ["".join(c["tokens"]) for c in doc["top"]]
        if not any(w in t for t in texts for w in ("<script", "<img", "</s", "onerror")):
            continue
        seen += 1
        page = client.get(f"/sae/sae/feature/{fid}").text
        assert "<script>alert" not in page and "<img src=x" not in page and 'onerror="' not in page
        assert "</script> " not in page and '<img' not in page
        assert "&lt;" in page
        if seen >= 5:
            break
    assert seen, "no feature's examples hold the corpus's HTML: the test corpus lost it"


def test_hostile_label_and_explanation_are_escaped(run_copy: Path) -> None:
    evil_label = '<script>alert(1)</script>'
    evil_expl = '" onmouseover="alert(2)" x="<b>bold</b>'
    with _db(run_copy) as db, db.transaction():
        db.put_features([{**db.feature(7), "label": evil_label}])  # type: ignore[dict-item]
        db.put_explanations("test-model", "1", [(7, "sha", evil_expl)], created_by="test")
    c = TestClient(create_app(run_copy))
    for url in ("/sae/sae/feature/7", "/sae/sae/feature/6", "/sae/sae/search?q=alert"):
        page = c.get(url).text
        assert evil_label not in page and evil_expl not in page and "<b>bold" not in page, url
    page = c.get("/sae/sae/feature/7").text
    assert str(escape(evil_label)) in page and str(escape(evil_expl)) in page


def test_unknown_things_are_404_and_bad_parameters_422(client: TestClient) -> None:
    assert client.get("/sae/nope").status_code == 404
    r = client.get("/sae/nope/feature/1.json")
    assert r.status_code == 404 and r.json()["detail"] == "no SAE named 'nope' here: this site serves sae, sae-2x"
    r = client.get("/sae/sae/feature/256.json")
    assert r.status_code == 404 and r.json()["detail"] == "feature 256 is out of range: SAE sae has features 0 to 255"
    page = client.get("/sae/sae/feature/256")
    assert page.status_code == 404 and "feature 256 is out of range" in page.text and "<nav>" in page.text
    assert client.get("/sae/sae/feature/-1.json").status_code == 404
    assert client.get("/sae/sae/feature/abc").status_code == 422
    assert client.get("/api/sae/sae/labels?q=fox&top=0").status_code == 422
    assert client.get("/api/sae/sae/labels?q=fox&mode=regex").status_code == 422
    r = client.get("/api/sae/sae/labels", params={"q": "%%%"})
    assert r.status_code == 422 and "has no words to search for" in r.json()["detail"]
    for body in ({"edits": [{"feature": 1, "strength": 1000}], "prompt": "hi"},
                 {"edits": [{"feature": 1, "strength": 2}], "prompt": "hi", "max_new_tokens": MAX_NEW_TOKENS + 1},
                 {"edits": [{"feature": 1, "strength": 2}], "prompt": "hi", "temperature": -1},
                 {"edits": [], "prompt": "hi"}, {"edits": [{"feature": 1, "strength": 2}] * 9, "prompt": "hi"}):
        assert client.post("/api/sae/sae/steer", json=body).status_code == 422, body
    r = client.post("/api/sae/sae/steer", json={"edits": [{"feature": 999, "strength": 2}], "prompt": "hi"})
    assert r.status_code == 404
    assert client.get("/sae/sae/goto?id=3", follow_redirects=False).headers["location"] == "/sae/sae/feature/3"


def test_no_path_traversal(client: TestClient) -> None:
    for url in ("/sae/sae/png/..%2Fcfg.json", "/sae/sae/png/../cfg.json", "/sae/..%2Fsae/feature/1",
                "/sae/sae/png/eval-metrics.json", "/static/..%2Fapp.py", "/static/../app.py", "/audit"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert "from monoscope" not in r.text and '"format"' not in r.text


def test_oversized_bodies_are_413(client: TestClient) -> None:
    big = {"text": "a" * (MAX_BODY + 10)}
    r = client.post("/api/sae/sae/text", json=big)
    assert r.status_code == 413 and r.json()["detail"] == f"request body over {MAX_BODY} bytes"

    def chunks():  # no content-length: counted as it arrives
        for _ in range(40):
            yield b"x" * 8192

    r = client.post("/api/sae/sae/text", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_token_is_required_when_set(tiny_run: Path) -> None:
    c = TestClient(create_app(tiny_run, token="correct-horse-battery"))
    r = c.get("/")
    assert r.status_code == 401 and "a token is required" in r.json()["detail"]
    assert c.get("/?token=wrong-horse").status_code == 401
    r = c.get("/?token=correct-horse-battery")
    assert r.status_code == 200 and "monoscope_token=correct-horse-battery" in r.headers["set-cookie"]
    assert c.get("/sae/sae/feature/1.json").status_code == 200  # the cookie now
    bare = TestClient(create_app(tiny_run, token="correct-horse-battery"))
    assert bare.get("/api/site", headers={"Authorization": "Bearer correct-horse-battery"}).status_code == 200
    assert bare.get("/api/site", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_label_search_page(client: TestClient, tiny_run: Path) -> None:
    with _db(tiny_run) as db:
        word = next(m.group(0) for i in range(256)
                    if (g := db.feature(i)) and (m := re.search(r"[a-z]{3,}", g["label"])))
        hits = db.search_labels(json.dumps(word) + "*", limit=1000)
    want = {f for f, _ in hits}
    doc = client.get("/api/sae/sae/labels", params={"q": word, "top": 100}).json()
    assert want and {h["feature"] for h in doc["hits"]} == want
    assert all(word in h["text"].lower() for h in doc["hits"])
    page = client.get("/sae/sae/search", params={"q": word}).text
    assert all(f'href="/sae/sae/feature/{f}"' in page for f in want)


def test_folder_without_database_is_one_line_error(tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(MonoscopeError, match=r"has no SAE with a features database: build one with monoscope "
                                             r"features .*sae, then serve again"):
        create_app(tmp_path)
    with pytest.raises(MonoscopeError, match="is not a folder"):
        create_app(tmp_path / "missing")
    # an SAE folder alone, its database beside it
    c = TestClient(create_app(tiny_run / "sae-2x"))
    assert c.get("/sae/sae-2x/feature/3.json").json()["id"] == 3


def _serve(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", "monoscope.cli", "serve", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()  # type: ignore[union-attr]
    m = re.search(r"http://\S+", line)
    if m is None:
        p.kill()
        raise AssertionError(f"no URL printed: {line!r} {p.communicate()[1]}")
    return p, m.group(0)


def test_cli_prints_url_and_serves(tiny_run: Path) -> None:
    import urllib.error
    import urllib.request

    p, url = _serve([str(tiny_run), "--port", "0"])
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
        deadline = time.time() + 20
        while True:
            try:
                body = urllib.request.urlopen(url + "sae/sae/feature/3.json", timeout=5).read()
                break
            except urllib.error.URLError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        assert json.loads(body)["id"] == 3
    finally:
        p.terminate()
        p.wait(10)
    p, url = _serve([str(tiny_run), "--port", "0", "--host", "0.0.0.0"])
    try:
        assert re.fullmatch(r"http://0\.0\.0\.0:\d+/\?token=[\w-]{20,}", url)
        base = url.split("?")[0].replace("0.0.0.0", "127.0.0.1")
        time.sleep(1.0)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "api/site", timeout=5)
        assert e.value.code == 401
        token = url.split("token=")[1]
        req = urllib.request.Request(base + "api/site", headers={"Authorization": f"Bearer {token}"})
        assert json.loads(urllib.request.urlopen(req, timeout=5).read())["saes"][0]["name"] == "sae"
    finally:
        p.terminate()
        p.wait(10)
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "monoscope.cli", "serve", str(tiny_run / "acts")], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "has no SAE with a features database" in r.stderr
