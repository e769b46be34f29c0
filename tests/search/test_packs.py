"""Concept packs: the shipped ones are complete and sourced; users' packs are validated line by line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.search.packs import FIELDS, MIN_PER_SIDE, PACK_DIR, contrast_pack, list_packs, load_pack, read_pack_file
from monoscope.search.text import Searcher
from tests.search.conftest import DOG, Planted

PAPER_CONCEPTS = {"vulnerabilities", "bias", "deception", "power_seeking", "sycophancy", "dangerous", "countries",
                  "cities", "people", "code_types"}


def test_shipped_packs_are_complete_and_sourced() -> None:
    packs = {p["name"]: p for p in list_packs()}
    assert set(packs) == PAPER_CONCEPTS
    for name, info in packs.items():
        pack = load_pack(name)  # checks the sha256 against the index
        assert pack.version == info["version"] == "1"
        assert pack.n_pos >= MIN_PER_SIDE and pack.n_neg >= MIN_PER_SIDE, name
        assert (pack.n_pos, pack.n_neg) == (info["n_pos"], info["n_neg"])
        for it in pack.items:
            assert it.source and it.license and it.concept
        texts = [i.text for i in pack.items]
        assert len(set(texts)) >= 0.9 * len(texts), name  # no pack is mostly repeats


def test_matched_negatives_share_their_source_template() -> None:
    pack = load_pack("countries")
    pos = [i.text for i in pack.items if i.label == 1]
    neg = [i.text for i in pack.items if i.label == 0]
    for p, n in zip(pos, neg, strict=True):  # each negative fills its positive's template with a non-place
        assert p.split()[:2] == n.split()[:2] and p[-1] == n[-1] == ".", (p, n)
        assert p != n
    assert all("Babel" in i.source and "CLDR" in i.license for i in pack.items if i.label == 1)


def _write(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def row(text: str, label: int) -> dict:
    return {"text": text, "label": label, "concept": "dogs", "source": "test", "license": "CC0-1.0"}


def test_bad_user_packs_are_one_line_errors(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    cases = [
        ([], f"{p} holds no items: add lines like"),
        ([row("a dog", 1), row("the dog", 1)], f"{p} is one-sided: all 2 items up to line 2 are positive (label 1); "
                                                "add negative (label 0) texts to contrast them with"),
        ([row("a cat", 0)], f"{p} is one-sided: all 1 items up to line 1 are negative (label 0); add positive"),
        ([row("a dog", 1), "{oops"], f"{p} line 2 is not JSON"),
        ([row("a dog", 1), {"text": "x", "label": 0}], f"{p} line 2 lacks concept, source, license: every item needs"),
        ([row("a dog", 1), row("  ", 0)], f"{p} line 2 has an empty text"),
        ([row("a dog", 1), row("x", 2)], f"{p} line 2 has label 2: use 1 (shows the concept) or 0"),
        ([row("a dog", 1), {**row("x", 0), "license": ""}], f"{p} line 2 has an empty license"),
    ]
    for rows, msg in cases:
        _write(p, rows)
        with pytest.raises(MonoscopeError) as e:
            read_pack_file(p)
        assert str(e.value).startswith(msg), (str(e.value), msg)
        assert "\n" not in str(e.value)
    with pytest.raises(MonoscopeError, match=r"--pack 'nosuch' is neither a shipped pack \(bias, cities"):
        load_pack("nosuch")


def test_tampered_shipped_pack_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import monoscope.search.packs as packs

    fake = tmp_path / "packs"
    fake.mkdir()
    (fake / "bias.jsonl").write_bytes((PACK_DIR / "bias.jsonl").read_bytes() + b"\n")
    idx = json.loads((PACK_DIR / "index.json").read_text())
    (fake / "index.json").write_text(json.dumps(idx))
    monkeypatch.setattr(packs, "PACK_DIR", fake)
    with pytest.raises(MonoscopeError, match=r"does not match its index .*rerun scripts/build_packs.py"):
        load_pack("bias")
    assert hashlib.sha256((PACK_DIR / "bias.jsonl").read_bytes()).hexdigest() == idx["packs"]["bias"]["sha256"]


def test_user_pack_contrast_and_cli(planted: Planted, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write(tmp_path / "dogs.jsonl", [row("the dog barks", 1), row("the cat barks", 0), row("a lazy dog", 1),
                                         row("a lazy cat", 0), row("my dog sleeps", 1), row("my cat sleeps", 0)])
    s = Searcher.open(planted.sae, device="cpu", compute_dtype="fp32")
    try:
        res = contrast_pack(s, load_pack(p), top=2)
    finally:
        s.close()
    assert res.hits[0].feature == DOG and res.hits[0].auroc == 1.0 and (res.n_pos, res.n_neg) == (3, 3)
    assert main(["search", str(planted.sae), "--pack", str(p), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["title"] == "pack dogs vuser (dogs)" and out["hits"][0]["feature"] == DOG
    assert main(["search", str(planted.sae), "--list-packs"]) == 0
    listing = capsys.readouterr().out
    assert "sycophancy" in listing and "v1" in listing
    _write(p, [row("a dog", 1)])
    assert main(["search", str(planted.sae), "--pack", str(p), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {p} is one-sided")


def test_fields_documented() -> None:
    assert FIELDS == ("text", "label", "concept", "source", "license")


def test_pack_the_tokenizer_mangles_gets_a_warning(planted: Planted, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import monoscope.search.multilingual as ml

    p = _write(tmp_path / "mixed.jsonl", [row("the dog barks", 1), row("the cat barks", 0), row("\u72d7 dog", 1)])
    monkeypatch.setattr(ml, "_mangled", lambda s, text: "\u72d7" in text)
    s = Searcher.open(planted.sae, device="cpu", compute_dtype="fp32")
    try:
        res = contrast_pack(s, load_pack(p), top=1)
    finally:
        s.close()
    assert res.notes == [f"{p} line 3: the tokenizer does not reproduce this text (1 of 3 items): activations on "
                         "text it cannot read may mean little"]
