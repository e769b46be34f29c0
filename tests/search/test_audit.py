"""`monoscope audit` on planted features (tests/search/conftest.py): candidates, report.json, resume, bad input,
the CLI in a subprocess, and the HTML report in real headless Chromium with no network request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monoscope.errors import MonoscopeError
from monoscope.sae.io import save_sae
from monoscope.search.audit import CAVEAT, FORMAT, audit, findings_lines, load_report
from monoscope.search.text import Searcher
from tests.search.conftest import DOG, FOX, Planted, _planted_sae

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")


def _row(text: str, label: int, concept: str = "dog") -> dict:
    return {"text": text, "label": label, "concept": concept, "source": "test", "license": "CC0-1.0"}


def dog_pack(path: Path, extra: list[dict] | None = None) -> Path:
    rows = [_row("the dog barks", 1), _row("the cat barks", 0), _row("a lazy dog", 1), _row("a lazy cat", 0),
            _row("my dog sleeps", 1), _row("my cat sleeps", 0), _row("one dog runs", 1), _row("one cat runs", 0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + (extra or [])))
    return path


@pytest.fixture(scope="module")
def searcher(planted: Planted) -> Searcher:
    s = Searcher.open(planted.sae, device="cpu", compute_dtype="fp32")
    yield s
    s.close()


@pytest.fixture(scope="module")
def report(planted: Planted, searcher: Searcher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An audit of a dog pack and a fox pack, with the steering of each top candidate (tiny: 2 factors, 4 prompts,
    2 tokens)."""
    root = tmp_path_factory.mktemp("audit")
    dogs = dog_pack(root / "dogs.jsonl")
    fox = root / "fox.jsonl"
    fox.write_text("".join(json.dumps(_row(t, lab, "fox")) + "\n" for t, lab in [
        ("the fox jumps", 1), ("the dog jumps", 0), ("a quick fox", 1), ("a quick cat", 0), ("that fox ran", 1),
        ("that cat ran", 0)]))
    out = root / "out"
    audit(planted.sae, packs=f"{dogs},{fox}", out=out, searcher=searcher, steer_top=1, steer_prompts=4,
          steer_factors=[0.0, 2.0], steer_tokens=2, label_mode="keyword", progress=False)
    return out


def test_planted_features_are_found_by_every_route(report: Path) -> None:
    doc = load_report(report)
    assert doc["format"] == FORMAT and doc["caveat"] == CAVEAT
    dogs, fox = doc["packs"]
    assert (dogs["name"], dogs["n_pos"], dogs["n_neg"]) == ("dogs", 4, 4)
    best = dogs["candidates"][0]
    assert best["feature"] == DOG and best["auroc"] == 1.0 and best["frac_pos"] == 1.0 and best["frac_neg"] == 0.0
    assert best["routes"]["contrast"] == 1 and best["routes"]["text"] == 1 and best["routes"]["labels"] == 1
    assert best["label"] == "' dog'" and best["density"] == 2e-3
    assert fox["candidates"][0]["feature"] == FOX and fox["candidates"][0]["explanation"] == "the animal fox"
    assert fox["candidates"][0]["explanation_model"] == "test"
    others = [c["auroc"] for c in dogs["candidates"][1:]]
    assert others == sorted(others, reverse=True) and max(others) == 0.5  # nothing else separates the sets
    assert doc["summary"]["n_with_auroc"] == 2 and doc["summary"]["best"]["fox"]["feature"] == FOX
    assert dogs["multilingual"].startswith("not applicable")


def test_steering_of_the_top_candidate_is_summarised_from_steer_eval(report: Path) -> None:
    doc = load_report(report)
    for p in doc["packs"]:
        st = p["candidates"][0]["steering"]
        raw = json.loads((report / st["path"]).read_text())
        assert raw["feature"] == p["candidates"][0]["feature"] and raw["factors"] == [0.0, 2.0]
        assert st["factors"] == [0.0, 2.0] and st["n_prompts"] == 4
        tgt = {r["factor"]: r["concept_act"]["mean"] for r in raw["table"] if r["condition"] == "target"}
        assert st["target"] == [tgt[0.0], tgt[2.0]]
        assert st["chosen_factor"] == raw["chosen_factor"]
        assert st["effect"] == pytest.approx(tgt[raw["chosen_factor"]] - raw["unsteered"]["concept_act"]["mean"])
        assert p["candidates"][1]["steering"] is None  # only the top 1
        assert p["steering"].startswith("measured for the top 1 candidate(s)")


def test_rerun_reuses_every_pack_and_steering(planted: Planted, searcher: Searcher, report: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import monoscope.search.audit as A
    import monoscope.steer.effect as E

    before = {p.name: p.stat().st_mtime_ns for p in (report / "packs").iterdir()}

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("recomputed")

    monkeypatch.setattr(A, "_audit_pack", boom)
    monkeypatch.setattr(E, "steer_eval", boom)
    report_before = (report / "report.json").stat().st_mtime_ns
    lines: list[str] = []
    kw = dict(packs=f"{report.parent / 'dogs.jsonl'},{report.parent / 'fox.jsonl'}", out=report, steer_top=1,
              steer_prompts=4, steer_factors=[0.0, 2.0], steer_tokens=2, label_mode="keyword", log=lines.append)
    res = audit(planted.sae, **kw)  # type: ignore[arg-type]
    assert lines == [f"audit: {report / 'report.json'} is up to date (2 packs): nothing to do"]  # no model loaded
    assert (report / "report.json").stat().st_mtime_ns == report_before
    assert res.packs[0].candidates[0].steering is not None and res.n_reused == 2
    assert findings_lines(res)[0] == "audit: 2 of 2 concepts have a candidate feature with AUROC >= 0.8 on their pack"
    # killed before the report was written: every finished pack is reused
    doc = (report / "report.json").read_text()
    (report / "report.json").unlink()
    try:
        lines.clear()
        res = audit(planted.sae, searcher=searcher, **kw)  # type: ignore[arg-type]
        assert [ln.split(":")[0] for ln in lines] == ["audit [1/2] dogs", "audit [2/2] fox"]
        assert all("reused" in ln for ln in lines)
        assert json.loads((report / "report.json").read_text())["packs"] == json.loads(doc)["packs"]
    finally:
        (report / "report.json").write_text(doc)
    assert {p.name: p.stat().st_mtime_ns for p in (report / "packs").iterdir()} == before


def test_a_changed_pack_is_recomputed(planted: Planted, searcher: Searcher, tmp_path: Path) -> None:
    p = dog_pack(tmp_path / "dogs.jsonl")
    lines: list[str] = []
    kw = dict(packs=str(p), out=tmp_path / "o", searcher=searcher, steer_top=0, label_mode="keyword", log=lines.append)
    audit(planted.sae, **kw)  # type: ignore[arg-type]
    dog_pack(p, [_row("two dogs", 1)])
    res = audit(planted.sae, **kw)  # type: ignore[arg-type]
    assert "reused" not in lines[-1] and res.packs[0].n_pos == 5
    assert res.packs[0].steering == "skipped (--steer-top 0): no steering effect was measured"
    assert "skipped (--steer-top 0)" in (tmp_path / "o" / "report.html").read_text()


@pytest.mark.parametrize("pack_name", ["countries", "cities"])
def test_country_and_city_packs_get_multilingual_consistency(planted: Planted, searcher: Searcher, tmp_path: Path,
                                                            pack_name: str) -> None:
    res = audit(planted.sae, packs=pack_name, out=tmp_path / "o", searcher=searcher, steer_top=0, top=3,
                label_mode="keyword", progress=False)
    pack = res.packs[0]
    assert pack.n_pos == 60 and pack.multilingual.startswith("measured on 57 parallel concepts in ")
    assert "14 languages" in pack.multilingual or "languages (" in pack.multilingual
    ml = [c.multilingual for c in pack.candidates if c.multilingual is not None]
    for m in ml:
        assert m.consistency == pytest.approx(m.n_languages / len(pack.multilingual.split("(")[1].split(",")), abs=1e-3)


# ---------------------------------------------------------------------------------------------- bad input
def test_long_and_mangled_texts_are_warned_about_naming_file_and_line(planted: Planted, searcher: Searcher,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import monoscope.search.multilingual as ml

    long, longer = " ".join(["the dog runs"] * 40), " ".join(["the dog runs"] * 100)
    p = dog_pack(tmp_path / "dogs.jsonl", [_row(long, 1), _row("\u72d7 dog", 1), _row(longer, 0)])
    monkeypatch.setattr(ml, "_mangled", lambda s, text: "\u72d7" in text)
    res = audit(planted.sae, packs=str(p), out=tmp_path / "o", searcher=searcher, steer_top=0, label_mode="keyword",
                progress=False)
    n = len(searcher.tokenize([long])[0])
    assert 64 < n <= 256 == searcher.max_len
    assert res.warnings[1:] == [
        f"{p} line 9: the text is {n} tokens (BOS included), longer than the 64-token contexts the feature database "
        "was built on: read in full, but activations after position 64 come from positions the SAE's statistics "
        "never saw (1 more texts of this pack too)",
        f"{p} line 10: the tokenizer does not reproduce this text (1 of 11 items): activations on text it cannot read "
        "may mean little; use a model whose tokenizer knows this script"]
    assert res.warnings[0].startswith(f"{p} line 11: the text is ")
    assert res.warnings[0].endswith(f" tokens (BOS included) but {searcher.lm.model_id} reads at most 256: only its "
                                    "first 256 tokens are read")
    assert res.packs[0].candidates[0].feature == DOG
    html = (tmp_path / "o" / "report.html").read_text()
    assert f"{p} line 9: the text is {n} tokens" in html and f"{p} line 11: the text is " in html


@pytest.mark.parametrize(("rows", "message"), [
    ([], "{p} holds no items: add lines like"),
    ([_row("a dog", 1), _row("the dog", 1)], "{p} is one-sided: all 2 items up to line 2 are positive (label 1); add "
                                             "negative (label 0) texts to contrast them with"),
    ([_row("a dog", 1), {"text": "", "label": 0, "concept": "x", "source": "s", "license": "l"}],
     "{p} line 2 has an empty text"),
])
def test_bad_packs_are_one_line_errors_before_any_model_loads(planted: Planted, tmp_path: Path, rows: list[dict],
                                                              message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MonoscopeError) as e:
        audit(planted.sae, packs=str(p), out=tmp_path / "o", steer_top=0, progress=False)
    assert str(e.value).startswith(message.format(p=p))
    assert not (tmp_path / "o").exists()


def test_bad_settings(planted: Planted, tmp_path: Path) -> None:
    with pytest.raises(MonoscopeError, match=r"^--steer-prompts 2: pass a whole number >= 4$"):
        audit(planted.sae, out=tmp_path / "o", steer_prompts=2)
    with pytest.raises(MonoscopeError, match=r"^--packs is empty: pass all, or pack names"):
        audit(planted.sae, packs=" , ", out=tmp_path / "o")
    with pytest.raises(MonoscopeError, match=r"^--pack 'nosuch' is neither a shipped pack"):
        audit(planted.sae, packs="nosuch", out=tmp_path / "o")


def test_cli_bad_factors_before_any_model_loads(planted: Planted, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from monoscope.cli import main

    assert main(["audit", str(planted.sae), "--out", str(tmp_path / "o"), "--steer-factors", "0,x"]) == 2
    assert capsys.readouterr().err == "error: --steer-factors '0,x': 'x' is not a number; pass e.g. 0,4,10\n"
    assert main(["audit", str(tmp_path / "nosae"), "--packs", "countries", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"error: SAE folder {tmp_path / 'nosae'} does not exist: pass the folder "
                                       "monoscope train wrote\n")


def test_database_of_another_sae_is_refused(planted: Planted, tmp_path: Path) -> None:
    import torch

    other = tmp_path / "other-sae"
    save_sae(_planted_sae(torch.randn(300, 64), 1, 2, seed=9), other)
    p = dog_pack(tmp_path / "dogs.jsonl")
    with pytest.raises(MonoscopeError) as e:
        audit(other, packs=str(p), out=tmp_path / "o", db=planted.db, device="cpu", steer_top=0, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{planted.db} was built for other SAE weights") and "\n" not in msg
    assert msg.endswith(f"rebuild it with monoscope features {other} --overwrite") or msg.endswith("--overwrite")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def test_cli_subprocess(planted: Planted, tmp_path: Path) -> None:
    p = dog_pack(tmp_path / "dogs.jsonl")
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "monoscope.cli", "audit", str(planted.sae), "--packs", str(p), "--out", str(out),
           "--steer-top", "0", "--label-mode", "keyword", "--device", "cpu", "--compute-dtype", "fp32"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "audit: 1 of 1 concepts have a candidate feature with AUROC >= 0.8 on their pack"
    assert lines[1].split() == ["dogs", f"#{DOG}", "AUROC", "1.000", "'", "dog'"]
    assert "steering: skipped (--steer-top 0)" in lines
    assert "audit [1/1] dogs: 4 positive and 4 negative texts (dog)" in r.stderr
    assert json.loads((out / "report.json").read_text())["packs"][0]["candidates"][0]["feature"] == DOG
    p.write_text(json.dumps(_row("a dog", 1)) + "\n")
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {p} is one-sided: all 1 items up to line 1 are positive (label 1); add "
                                "negative (label 0) texts to contrast them with")


# ---------------------------------------------------------------------------------------------- the page in a browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (apt-get install chromium)")
def test_html_report_in_headless_chromium_without_network(report: Path) -> None:
    pw = pytest.importorskip("playwright.sync_api")
    doc = load_report(report)
    requests: list[str] = []
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("request", lambda req: requests.append(req.url))
            page.goto((report / "report.html").resolve().as_uri(), wait_until="load")
            assert page.title() == f"monoscope audit: {doc['sae']}"
            for sid in ("caveat", "summary", "pack-dogs", "pack-fox", "warnings", "method"):
                assert page.locator(f"section#{sid}").count() == 1, sid
                assert page.locator(f"section#{sid}").is_visible(), sid
            assert CAVEAT in page.inner_text("#caveat")
            assert "2 of 2 concepts have a candidate feature with AUROC" in page.inner_text("#summary")
            for name in ("dogs", "fox"):
                sec = page.locator(f"#pack-{name}")
                for part in ("table.candidates", "div.contexts", "div.multilingual", "div.steering", "svg"):
                    assert sec.locator(part).count() >= 1, (name, part)
            first = page.locator("#pack-dogs table.candidates tr").nth(1).inner_text()
            assert first.split("\t")[:3] == ["1", f"#{DOG}", "1.000"]
        finally:
            browser.close()
    assert requests and all(u.startswith(("file://", "data:")) for u in requests), requests


def test_text_attribution_is_the_directional_derivative_of_the_log_likelihood(planted: Planted,
                                                                              searcher: Searcher) -> None:
    """grad x activation summed over positions = d/de log-likelihood with feature f's codes scaled by (1 + e),
    measured here by central differences of two exact forwards (no autograd)."""
    import torch

    from monoscope.search.audit import _target
    from monoscope.steer.attribute import _Runner, text_attribution

    t = _target(searcher, planted.sae)
    ids = t.encode("the quick fox and the lazy dog")
    attr = text_attribution(t, ids)
    r = _Runner(t, ids)
    W = t.sae.W_dec.detach().float() / t.sae.cfg.normaliser
    with torch.no_grad():
        x = r.clean_acts()
        codes = t.sae.encode_raw(x)
        codes[0] = 0

        def loglik(eps: float, f: int) -> float:
            lp = torch.log_softmax(r.logits((x + eps * codes[:, f:f + 1] * W[f])[None])[0, :-1].double(), -1)
            return float(lp.gather(1, ids[0, 1:, None]).sum())

    fired = [int(f) for f in codes.sum(0).nonzero()[:, 0][:4]]
    assert fired and max(abs(float(attr[f])) for f in fired) > 1e-3
    for f in fired:
        fd = (loglik(1e-3, f) - loglik(-1e-3, f)) / 2e-3
        assert float(attr[f]) == pytest.approx(fd, rel=2e-2, abs=1e-4)
    assert float(attr[[f for f in range(attr.numel()) if f not in set(codes.sum(0).nonzero()[:, 0].tolist())]]
                 .abs().max()) == 0.0  # a feature that never fires has no attribution


def test_attribution_route_ranks_by_positive_minus_negative_attribution(planted: Planted, searcher: Searcher,
                                                                         tmp_path: Path) -> None:
    import numpy as np

    from monoscope.search.audit import _target
    from monoscope.steer.attribute import text_attribution

    rows = [_row("the cat barks", 1), _row("the dog barks", 0), _row("a lazy cat", 1), _row("a lazy dog", 0),
            _row("my cat sleeps", 1), _row("my dog sleeps", 0)]
    p = tmp_path / "cats.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = audit(planted.sae, packs=str(p), out=tmp_path / "o", searcher=searcher, steer_top=0, top=3,
                attribution_texts=2, label_mode="keyword", progress=False)
    pa = res.packs[0]
    t = _target(searcher, planted.sae)
    att = [text_attribution(t, t.encode(s)).double().numpy() for s in
           ("the cat barks", "a lazy cat", "the dog barks", "a lazy dog")]
    diff = (att[0] + att[1]) / 2 - (att[2] + att[3]) / 2
    expected = [int(f) for f in np.argsort(-diff, kind="stable") if diff[f] > 0]
    assert len(expected) >= 2  # the planted model gives the route something to rank
    assert pa.routes["attribution"] == (f"{len(expected)} candidates (gradient x activation of the log-likelihood of "
                                        "the first 2 positive minus 2 negative texts)")
    by_feature = {c.feature: c for c in pa.candidates}
    assert by_feature[expected[0]].routes["attribution"] == 1  # the best of every route stays in the report
    for c in pa.candidates:
        assert c.attribution == pytest.approx(float(diff[c.feature]), abs=1e-5)
        assert c.routes.get("attribution") == (expected.index(c.feature) + 1 if c.feature in expected else None)
    res0 = audit(planted.sae, packs=str(p), out=tmp_path / "o0", searcher=searcher, steer_top=0, top=3,
                 attribution_texts=0, label_mode="keyword", progress=False)
    assert res0.packs[0].routes["attribution"] == "skipped (--attribution-texts 0)"
    assert all("attribution" not in c.routes and c.attribution is None for c in res0.packs[0].candidates)
    with pytest.raises(MonoscopeError, match=r"^--attribution-texts -1: pass a whole number >= 0$"):
        audit(planted.sae, packs=str(p), out=tmp_path / "o1", searcher=searcher, attribution_texts=-1,
              progress=False)
