"""`monoscope show`: the dashboard renders every section from a small database, and gaps show as "—"."""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB
from monoscope.features.show import ContextLine, add_show_parser, default_db_path, render_feature, show, visible

# odd tokens on purpose: newline, tab, leading spaces, only spaces, accents, CJK (2 cells each), emoji
VOCAB = ["<bos>", "Hello", " world", "\n", "\t", "   indented", "café", "日本語", "🙂", "!", "    ", " the", " cat"]
META = {"sae": {"path": "runs/x/sae", "arch": "topk", "d_sae": 8, "weights_sha256": "ab" * 32},
        "model": {"id": "tiny-llama"}, "hook": "resid_post.1", "tokens": 20000, "sae_key": "w8", "complete": True}


def _render(db: FeatureDB, fid: int, width: int = 100, **kw: int) -> tuple[str, str]:
    con = Console(record=True, width=width, file=io.StringIO(), color_system="truecolor")
    con.print(render_feature(db, fid, width=width, **kw))
    html = con.export_html(inline_styles=True, clear=False)
    return con.export_text(), html


@pytest.fixture()
def db(tmp_path: Path) -> FeatureDB:
    db = FeatureDB.create(tmp_path / "runs" / "x" / "features" / "features.db", META)
    toks = np.array([0, 1, 2, 3, 5, 4, 6, 7, 8, 9], dtype=np.int32)
    acts = np.array([0, 0, 0.5, 0, 0, 1.0, 2.0, 4.0, 0, 0], dtype=np.float32)
    with db.transaction():
        db.put_vocab(VOCAB)
        db.put_features([
            {"id": 3, "density": 0.005, "fires": 100, "max_act": 4.0, "mean_act": 1.25,
             "hist": {"edges": [0.01, 0.1, 1.0, 10.0, 100.0], "counts": [50, 30, 20, 0]}, "label": "Japanese text",
             "label_tokens": {"peak_tokens": [["日本語", 5], [" the", 2]], "purity": 0.7, "promoted": []},
             "logit_pos": [[7, 1.5], [" the", 0.75]], "logit_neg": [[12, -0.5]],
             "neighbours": [[1, 0.91], [5, 0.42]], "cooccur": [[1, 0.25]], "map_x": 0.5, "map_y": -1.25,
             "interest": 2.0},
            {"id": 1, "label": "greetings"},
            {"id": 5},  # everything NULL
        ])
        db.put_examples([(3, "top", 0, 0, 4.0, 11, 7, toks, acts),
                         (3, "top", 1, 0, 2.0, 12, 6, toks, acts / 2),
                         (3, "quantile", 0, 9, 3.0, 13, 7, toks, acts * 0.75),
                         (3, "quantile", 1, 0, 0.5, 14, 2, toks, acts / 8)])  # rank is unique per kind
        db.put_splits([("w4", 1, "w8", 3, 0.9, 0.8), ("w8", 3, "w16", 7, 0.85, None)])
        db.conn.execute("INSERT INTO explanations VALUES (3, 'llm-a', 'v1', 'sha', 'Japanese words and kanji', NULL)")
        db.conn.execute("INSERT INTO scores VALUES (3, 'llm-a', 'detection', 0.81, NULL)")
    return db


def test_dashboard_sections(db: FeatureDB) -> None:
    text, html = _render(db, 3)
    assert "feature 3" in text and "Japanese text" in text
    assert "peak tokens 日本語 ×5, ·the ×2 · purity 70%" in text
    assert "Japanese words and kanji" in text and "detection 0.81" in text
    assert "0.500 %" in text and "1 in 200 tokens" in text and "100" in text and "1.25" in text
    assert "20,000" in text and "(0.50, -1.25)" in text
    assert "0.01–0.1" in text and "█" in text  # histogram; the empty last bin is dropped
    assert "10–100" not in text
    assert "Hello world⏎   indented⇥café日本語🙂!" in text  # one line, whitespace visible, unicode kept
    assert text.count("⏎") >= 4 and "decile 10/10" in text and "decile 1/10" in text
    assert text.index("decile 10/10") < text.index("decile 1/10")  # strongest bin first
    assert "日本語" in text and "+1.5" in text and "·the" in text and "·cat" in text and "-0.5" in text
    assert re.search(r"#1\s+0\.910\s+greetings", text) and re.search(r"#5\s+0\.420\s+—", text)
    assert re.search(r"#1\s+25\.0%\s+greetings", text)
    assert "w4#1 (cos 0.90, corr 0.80)" in text and "w16#7 (cos 0.85)" in text
    assert all(len(line) <= 100 for line in text.splitlines())
    # the max token is bold on the strongest background; weaker active tokens are paler and not bold
    assert re.search(r"background-color: #ff6e00; font-weight: bold\">日本語</span>", html)
    assert 'background-color: #ffad66">café</span>' in html  # act 2 of 4: half-way from pale to orange
    assert 'font-weight: bold">⏎' not in html  # inactive tokens keep the plain style


def test_missing_pieces_show_dash(db: FeatureDB) -> None:
    text, _ = _render(db, 5)
    assert "feature 5" in text and "—" in text and "explanation  —" in text
    assert "density" in text and re.search(r"density\s+—", text)
    text, _ = _render(db, 6)  # in range, no row at all
    assert "no statistics for this feature" in text
    db.set_meta({"sae_key": None, "complete": False})
    text, _ = _render(db, 3)
    assert "no sae_key" in text and "database incomplete" in text


def test_context_cut_around_max_token() -> None:
    toks = [f" w{i}" for i in range(200)]
    acts = np.zeros(200)
    acts[150] = 3.0
    con = Console(record=True, width=60, file=io.StringIO())
    from rich.text import Text

    con.print(ContextLine(Text("3.0 "), toks, acts, 150, 3.0))
    line = con.export_text().rstrip("\n")
    assert "\n" not in line and len(line) <= 60 and " w150" in line
    assert line.startswith("3.0 …") and line.endswith("…")


def test_visible() -> None:
    assert visible("a\nb\tc\r") == "a⏎b⇥c↵"
    assert visible("    ") == "····" and visible(" ") == " " and visible(" the") == " the"
    assert visible(" the", standalone=True) == "·the"
    assert visible("\x01") == "␁"


def test_default_db_path(tmp_path: Path) -> None:
    assert default_db_path(Path("runs/x/sae")) == Path("runs/x/features/features.db")
    assert default_db_path(Path("my/thing")) == Path("my/thing-features/features.db")
    assert default_db_path(Path("my/thing/")) == Path("my/thing-features/features.db")


def test_errors(db: FeatureDB, tmp_path: Path) -> None:
    with pytest.raises(MonoscopeError, match="build it with monoscope features"):
        show(tmp_path / "nothing" / "sae", 0)
    sae = tmp_path / "runs" / "x" / "sae"
    with pytest.raises(MonoscopeError, match=r"out of range.*0 to 7"):
        show(sae, 8)
    with pytest.raises(MonoscopeError, match="out of range"):
        show(sae, -1)
    with pytest.raises(MonoscopeError, match=r"'abc' is not an integer.*0 to 7"):
        show(sae, "abc")


def test_cli(db: FeatureDB, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_show_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["show", str(tmp_path / "elsewhere"), "3", "--db", str(db.path), "--examples", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Japanese text" in out and "greetings" in out and str(db.path) in out.replace("\n", "")


def test_narrow_terminal_stacks_sections(db: FeatureDB) -> None:
    text, _ = _render(db, 3, width=60)
    lines = text.splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert "statistics" in lines and "1 in 200 tokens" in text and "greetings" in text  # stacked, not squeezed
