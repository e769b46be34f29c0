"""The feature database under misuse: a damaged file is a one-line error from `features`, `show` and
`explain`; a rerun with other options refuses instead of deleting paid LLM work, and `--overwrite` keeps
the old database until the new one is complete and carries over explanations whose evidence is unchanged;
`show` and `explain` refuse a database built for other SAE weights; token bytes reach the database."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from monoscope.cli import main
from monoscope.features.build import KILL_ENV, build_features
from monoscope.features.db import FeatureDB, FeatureDBError
from monoscope.features.show import render_feature
from monoscope.features.tokens import Vocab, vocab_bytes
from monoscope.interp.explain import _negative_pool, _score_key, explain_features, load_evidence
from monoscope.interp.prompts import PROMPT_VERSION
from tests.conftest import make_tokenizer
from tests.interp.test_scorers import FakeLLM
from tests.reliability.features_helpers import KW, cli, copy_saes, dump, shared_run

SMALL = {**KW, "tokens": 256}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run's SAE with its database (SMALL options), built once for the module."""
    root = copy_saes(shared_run(tmp_path_factory), tmp_path_factory.mktemp("built"), "sae")
    build_features(root / "sae", **SMALL)
    return root


def _copy(built: Path, dest: Path) -> tuple[Path, Path]:
    """(SAE folder, database) of a private copy of `built`."""
    import shutil

    shutil.copytree(built / "sae", dest / "sae")
    shutil.copytree(built / "features", dest / "features")
    return dest / "sae", dest / "features" / "features.db"


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _damage_table(path: Path, table: str) -> None:
    """Garbage over the root page of `table` (meta stays readable, so the file still opens)."""
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA journal_mode=DELETE")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


def test_damaged_database_is_one_line_error_and_overwrite_replaces_it(built: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, db_path = _copy(built, tmp_path)
    root = tmp_path
    _damage_table(db_path, "features")
    args = ["features", str(root / "sae"), "--tokens", "256", "--batch-contexts", "2", "--no-map", "--quiet"]
    p = cli(*args)
    assert p.returncode == 2
    assert _one_line(p.stderr) == (f"error: feature database {db_path} is damaged (integrity check: "
                                   + _one_line(p.stderr).split("(integrity check: ")[1])
    assert f"rebuild it with monoscope features {root / 'sae'} --overwrite" in p.stderr
    # show and explain: the same one line, from the first read that meets the damage
    assert main(["show", str(root / "sae"), "3"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"error: feature database {db_path} is damaged (database disk image is malformed)")
    assert main(["explain", str(root / "sae"), "--llm", "openai:x", "--endpoint", "http://127.0.0.1:9/v1"]) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"error: feature database {db_path} is damaged")
    # --overwrite rebuilds it
    assert main([*args, "--overwrite"]) == 0
    assert f"replaced the damaged {db_path}" in capsys.readouterr().out
    with FeatureDB.open(db_path) as db:
        db.check()
        assert db.meta()["complete"] is True and db.n_features() == 256
    # not SQLite at all
    db_path.write_bytes(b"garbage " * 4096)
    p_err = main(args)
    assert p_err == 2
    assert _one_line(capsys.readouterr().err) == (
        f"error: {db_path} is not a readable feature database (file is not a database): rebuild it with monoscope "
        f"features {root / 'sae'} --overwrite, or move it away")


def _explained(db_path: Path, sae: Path) -> dict[int, str]:
    """Two real explanations (a fake LLM) and one score each with a valid key; returns {feature: text}."""
    answers = iter(["Explanation: the first pattern", "Explanation: the second pattern"])
    res = explain_features(sae, FakeLLM(lambda _: next(answers)), features=2, scorers="none", db_path=db_path,
                           progress=False)
    with FeatureDB.open(db_path) as db, db.transaction():
        vocab = Vocab(db.vocab(), db.vocab_bytes())
        pool = _negative_pool(db, vocab)
        rows = []
        for f, text in res.explanations.items():
            key = _score_key("detection", text, load_evidence(db, f, vocab, pool))
            rows.append((f, res.model, "detection", 0.75, json.dumps({"key": key})))
            rows.append((f, res.model, "fuzzing", 0.5, json.dumps({"key": "another key: stale"})))
        db.put_scores(rows)
    assert len(res.explanations) == 2
    return res.explanations


def test_other_options_refuse_and_overwrite_carries_explanations(built: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, db_path = _copy(built, tmp_path)
    root = tmp_path
    expl = _explained(db_path, root / "sae")
    kept, stale = sorted(expl)
    with FeatureDB.open(db_path) as db, db.transaction():  # as if the second's evidence had changed
        db.put_explanations("fake-competent", PROMPT_VERSION, [(stale, "0" * 64, expl[stale])], "monoscope test")
    before = dump(db_path)
    p = cli("features", str(root / "sae"), "--tokens", "128", "--batch-contexts", "2", "--no-map", "--quiet")
    assert p.returncode == 2
    assert _one_line(p.stderr) == (
        f"error: {db_path} was built with other options (--tokens (contexts) 16 -> 8): rerun with --overwrite to "
        "rebuild it (the old database stays until the new one is complete; explanations and scores whose evidence "
        "is unchanged are kept), or pass the options it was built with")
    assert dump(db_path) == before
    with pytest.raises(FeatureDBError, match=r"other options \(--compute-dtype auto -> fp32\)"):
        build_features(root / "sae", **SMALL, compute_dtype="fp32")
    # --overwrite killed before it completes: the old database, explanations included, is untouched
    monkeypatch.setenv("MONOSCOPE_FEATURES_KILL_HOW", "raise")
    monkeypatch.setenv(KILL_ENV, "finalised:0")
    with pytest.raises(KeyboardInterrupt):
        build_features(root / "sae", **SMALL, compute_dtype="fp32", overwrite=True)
    monkeypatch.delenv(KILL_ENV)
    assert dump(db_path) == before
    res = build_features(root / "sae", **SMALL, compute_dtype="fp32", overwrite=True)  # fp32 = auto on a CPU
    archive = db_path.parent / "dropped-explanations.jsonl"
    assert f"{db_path}: kept 1 explanations (1 scores) whose evidence is unchanged, dropped 1 whose evidence " \
           f"changed (saved in {archive})" in res.notes
    lost = [json.loads(line) for line in archive.read_text().splitlines()]
    assert [(r["kind"], r["feature"], r.get("text"), r.get("scorer"), r["reason"]) for r in lost] == [
        ("explanation", stale, expl[stale], None, "its evidence (top contexts) changed"),
        ("score", kept, None, "fuzzing", "its evidence or settings changed"),
        ("score", stale, None, "detection", "its explanation was not carried over"),
        ("score", stale, None, "fuzzing", "its explanation was not carried over")]
    after = dump(db_path)
    assert json.loads(dict(after["meta"])["config"])["compute_dtype"] == "fp32"
    assert [(r[0], r[4]) for r in after["explanations"]] == [(kept, expl[kept])]
    assert [(r[0], r[2], r[3]) for r in after["scores"]] == [(kept, "detection", 0.75)]
    assert (kept, expl[kept]) in [tuple(r) for r in after["labels_fts"]]
    assert expl[stale] not in [r[1] for r in after["labels_fts"]]
    for t in ("features", "examples", "vocab"):
        assert after[t] == before[t]  # the same statistics: fp32 is what auto chose on a CPU
    # a rerun of explain reuses the carried-over explanation and asks only for the dropped one
    llm = FakeLLM(lambda _: "Explanation: tokens of a test")
    again = explain_features(root / "sae", llm, features=f"{kept},{stale}", scorers="none", progress=False)
    assert again.explanations_reused == 1 and llm.calls == 1


def test_show_and_explain_refuse_a_database_of_other_weights(built: Path, tmp_path: Path) -> None:
    from monoscope.sae import load_sae
    from monoscope.sae.io import save_sae

    _, db_path = _copy(built, tmp_path)
    root = tmp_path
    assert main(["show", str(root / "sae"), "3"]) == 0
    sae = load_sae(root / "sae")
    with torch.no_grad():
        sae.W_dec.mul_(1.5)
    save_sae(sae, tmp_path / "retrained")
    p = cli("show", str(tmp_path / "retrained"), "3", "--db", str(db_path))
    assert p.returncode == 2
    line = _one_line(p.stderr)
    assert line.startswith(f"error: {db_path} was built for other SAE weights ({(built / 'sae').resolve()}, weights ")
    assert line.endswith(f": rebuild it with monoscope features {tmp_path / 'retrained'} --overwrite")
    with pytest.raises(FeatureDBError, match="was built for other SAE weights"):
        explain_features(tmp_path / "retrained", FakeLLM(), db_path=db_path, progress=False)


def test_pass_stores_token_bytes_and_pages_show_whole_characters(built: Path, tmp_path: Path) -> None:
    import io

    from rich.console import Console

    _, db_path = _copy(built, tmp_path)
    tok = make_tokenizer()
    with FeatureDB.open(db_path) as db:
        assert db.vocab_bytes() == vocab_bytes(tok)
        vocab = Vocab(db.vocab(), db.vocab_bytes())
        # a feature whose top window holds a character the tokenizer splits (token by token: <0xNN> pieces)
        fid, ex = next((f, e) for f in db.features_with_examples() for e in db.examples(f, "top")
                       if "<0x" in "".join(vocab.texts[t] for t in e["tokens"][1:] if t >= 0)
                       and "\ufffd" not in "".join(vocab.decode(e["tokens"][1:])))
        assert "\ufffd" not in "".join(vocab.texts)
        con = Console(record=True, width=400, file=io.StringIO())
        con.print(render_feature(db, fid, n_top=20))
        page = con.export_text()
    joint = "".join(vocab.decode(ex["tokens"]))
    assert joint.lstrip("\ufffd")[:6] in page.replace("⏎", "\n")


def test_killed_overwrite_then_rerun_without_it_finishes_the_rebuild(built: Path, tmp_path: Path) -> None:
    """A rebuild asked for with --overwrite and killed is carried on by a plain rerun, not reported complete
    on the strength of the old database (which stays in place, untouched, until the new one is installed)."""
    _, db_path = _copy(built, tmp_path)
    before = dump(db_path)
    args = ["features", str(tmp_path / "sae"), "--tokens", "256", "--batch-contexts", "2", "--no-map", "--quiet"]
    p = cli(*args, "--overwrite", env={KILL_ENV: "finalised:0"})
    assert p.returncode == 137, p.stderr
    assert dump(db_path) == before and (tmp_path / "features" / ".pass").is_dir()
    p = cli(*args)
    assert p.returncode == 0, p.stderr
    assert "already complete" not in p.stdout
    assert (f"carried on the unfinished --overwrite rebuild in {tmp_path / 'features' / '.pass'} (the old database "
            "stayed in place until the new one was complete)") in p.stdout
    assert not (tmp_path / "features" / ".pass").exists()
    assert dump(db_path) == before  # the same options: the same database, rebuilt
    p = cli(*args)
    assert p.returncode == 0 and "already complete: nothing to do" in p.stdout


def test_feature_map_is_replaced_together_with_its_database(built: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    sae, db_path = _copy(built, tmp_path)
    png = tmp_path / "features" / "feature_map.png"
    build_features(sae, **{**SMALL, "feature_map": True}, overwrite=True)
    old_png, old_db = png.read_bytes(), dump(db_path)
    # a rebuild with other options, killed after it drew its map: the old map still matches the old database
    monkeypatch.setenv("MONOSCOPE_FEATURES_KILL_HOW", "raise")
    monkeypatch.setenv(KILL_ENV, "maps")
    with pytest.raises(KeyboardInterrupt):
        build_features(sae, **{**SMALL, "tokens": 128, "feature_map": True}, overwrite=True)
    monkeypatch.delenv(KILL_ENV)
    assert png.read_bytes() == old_png and dump(db_path) == old_db
    assert (tmp_path / "features" / ".new-feature_map.png").is_file()
    res = build_features(sae, **{**SMALL, "tokens": 128, "feature_map": True})  # carries the rebuild on
    assert png.read_bytes() != old_png and not (tmp_path / "features" / ".new-feature_map.png").exists()
    with FeatureDB.open(db_path) as db:
        assert db.meta()["tokens"] == 128
    assert res.notes[0].startswith("carried on the unfinished --overwrite rebuild")
    # a rebuild without a map removes the map of the database it replaces
    res = build_features(sae, **SMALL, overwrite=True)
    assert not png.exists()
    assert f"removed {png}: it showed the replaced database (rebuild the map without --no-map)" in res.notes


def test_database_of_the_older_format_says_rebuild_and_overwrite_keeps_explanations(built: Path,
                                                                                    tmp_path: Path) -> None:
    sae, db_path = _copy(built, tmp_path)
    expl = _explained(db_path, sae)
    with FeatureDB.open(db_path) as db, db.transaction():  # as a pass of the previous format left it
        config = {**db.meta()["config"], "format": 2}
        db.set_meta({"format": "monoscope-features/1", "config": config, "config_key": "0" * 64})
    p = cli("show", str(sae), "3")
    assert p.returncode == 2
    assert _one_line(p.stderr) == (
        f"error: {db_path} is a feature database of an older format (monoscope-features/1; this monoscope reads "
        f"monoscope-features/2): rebuild it with monoscope features {sae} --overwrite (explanations and scores "
        "whose evidence is unchanged are kept)")
    with pytest.raises(FeatureDBError, match=r"other options \(pass format 2 -> 3\): rerun with --overwrite"):
        build_features(sae, **SMALL)
    res = build_features(sae, **SMALL, overwrite=True)
    assert f"{db_path}: kept 2 explanations (2 scores) whose evidence is unchanged, dropped 0 whose evidence " \
           "changed" in res.notes
    with FeatureDB.open(db_path) as db:
        assert db.meta()["format"] == "monoscope-features/2"
        assert sorted(f for f, *_ in db.all_explanations()) == sorted(expl)
