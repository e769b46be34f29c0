"""`explain_features` / `monoscope explain`: explanations and scores land in the feature database with model,
prompt version and evidence hash; reruns ask nothing; failures are recorded, never raised; feature selection."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB
from monoscope.interp import prompts
from monoscope.interp.cli import add_explain_parser, print_explain_summary
from monoscope.interp.explain import explain_features, parse_features, parse_scorers
from monoscope.interp.prompts import PROMPT_VERSION, Evidence, evidence_sha256, format_explain_evidence
from monoscope.interp.scorers import ALL_SCORERS, SCORER_NAMES
from tests.interp.test_scorers import FakeLLM, build_db, competent, evidence

FRENCH = '; fires on tokens such as "boulangerie", "merci", "château", "bonjour"'  # feature 1's explanation suffix


@pytest.fixture()
def db_path(tmp_path: Path) -> Path:
    build_db(tmp_path / "run" / "features" / "features.db").close()
    return tmp_path / "run" / "features" / "features.db"


def _rows(path: Path) -> tuple[list[tuple], list[tuple]]:
    with FeatureDB.open(path) as db:
        return (db.conn.execute("SELECT * FROM explanations ORDER BY feature").fetchall(),
                db.conn.execute("SELECT * FROM scores ORDER BY feature, scorer").fetchall())


def test_explain_scores_and_idempotent_rerun(db_path: Path) -> None:
    t0 = time.perf_counter()
    llm = FakeLLM()
    res = explain_features(db_path.parent.parent / "sae", llm, features="0,1,2", progress=False)
    # the phrase, then the four most frequent marked tokens of the explainer's evidence
    animals = 'names of animals; fires on tokens such as "sheep", "tiger", "dog", "rabbit"'
    assert res.explanations == {0: 'digits and numbers; fires on tokens such as "1", "9", "2", "5"',
                                1: f"French words{FRENCH}", 2: animals}
    assert res.model == "fake-competent" and not res.explain_failures
    assert llm.batches == [None] * 5  # explain + four LLM scorers, one batch each (embedding needs no LLM)
    expl, scores = _rows(db_path)
    with FeatureDB.open(db_path) as db:
        for f, model, version, sha, text, created_by in expl:
            assert (model, version) == ("fake-competent", PROMPT_VERSION) and created_by.startswith("monoscope")
            assert sha == evidence_sha256(format_explain_evidence(evidence(db, f)))  # the evidence shown
            assert text == res.explanations[f]
        assert db.search_labels("animals") == [(2, animals)]
    assert len(scores) == 3 * 5 and {s[2] for s in scores} == set(SCORER_NAMES)
    for f, model, scorer, value, details in scores:
        d = json.loads(details)
        assert model == "fake-competent" and d["prompt_version"] == PROMPT_VERSION and "key" in d
        assert value is not None and value >= {"specificity": 2.5, "simulation": 0.8}.get(scorer, 0.85), (f, scorer)
    summary = res.summary()
    assert set(summary) == set(SCORER_NAMES)
    d = summary["detection"]
    assert d["n"] == 3 and d["failures"] == 0
    assert d["q25"] is not None and d["median"] is not None and d["q75"] is not None
    assert d["q25"] <= d["median"] <= d["q75"]

    again = FakeLLM()
    res2 = explain_features("unused", again, features=[0, 1, 2], db_path=db_path, progress=False)
    assert again.calls == 0 and res2.explanations_reused == 3
    assert res2.scores_reused == dict.fromkeys(SCORER_NAMES, 3)
    assert _rows(db_path) == (expl, scores)
    assert {n: {f: r.value for f, r in per.items()} for n, per in res2.scores.items()} == \
           {n: {f: r.value for f, r in per.items()} for n, per in res.scores.items()}
    assert time.perf_counter() - t0 < 30


def test_changed_evidence_is_explained_again(db_path: Path) -> None:
    explain_features("x", FakeLLM(), features="1,", scorers="detection", db_path=db_path, progress=False)
    (old,), _ = _rows(db_path)
    with FeatureDB.open(db_path) as db, db.transaction():  # a rebuilt pass: feature 1's strongest act changed
        top = db.examples(1, "top")[0]
        db.put_examples([(1, "top", top["rank"], top["bin"], top["act"] * 2, top["context"], top["position"],
                          top["tokens"], top["acts"])])
        db.update_features("max_act", [(1, 20.0)])
    llm = FakeLLM(lambda m: "Explanation: French food words" if m[0]["content"] == prompts.EXPLAIN_SYSTEM
                  else competent(m))
    res = explain_features("x", llm, features="1,", scorers="detection", db_path=db_path, progress=False)
    assert res.explanations_reused == 0 and res.scores_reused == {"detection": 0} and llm.calls > 1
    (new,), (score,) = _rows(db_path)
    assert new[3] != old[3] and new[4] == f"French food words{FRENCH}" and score[3] == 1.0
    with FeatureDB.open(db_path) as db:  # the search index holds the new explanation, not the old, and the label
        assert db.search_labels("food") == [(1, f"French food words{FRENCH}")]
        assert db.search_labels('"French words"') == []
        assert db.search_labels("fromage") == [(1, "' fromage'")]


def test_failures_are_recorded_and_retried(db_path: Path) -> None:
    def flaky(messages: Sequence[Any]) -> str | None:
        system, good = messages[0]["content"], competent(messages)
        if system == prompts.EXPLAIN_SYSTEM and "French" in good:
            return None  # a server error for feature 1's explanation
        if system == prompts.EXPLAIN_SYSTEM and "animals" in good:
            return "  \n ** ** \n"  # nothing usable for feature 2
        if system in (prompts.DETECTION_SYSTEM, prompts.DETECTION_ONE_SYSTEM):
            return "The first one, I think."
        return good

    llm = FakeLLM(flaky)
    res = explain_features("x", llm, features="0,1,2,3", scorers="detection,specificity", db_path=db_path,
                           progress=False)
    assert set(res.explanations) == {0}
    assert "HTTP 500" in res.explain_failures[1] and "unusable" in res.explain_failures[2]
    assert "no examples" in res.explain_failures[3]
    assert res.scores["detection"][0].value is None and res.scores["specificity"][0].value == 3.0
    expl, scores = _rows(db_path)
    assert [e[0] for e in expl] == [0]
    det = next(s for s in scores if s[2] == "detection")
    assert det[3] is None and "error" in json.loads(det[4])
    assert res.summary()["detection"] == {"n": 1, "failures": 1, "mean": None, "q25": None, "median": None,
                                          "q75": None}
    out = io.StringIO()
    print_explain_summary(res, sae_dir="x", console=Console(file=out, width=120))
    assert "failed #1" in out.getvalue() and "detection" in out.getvalue()

    fixed = FakeLLM()  # a rerun retries what failed and keeps what succeeded
    res2 = explain_features("x", fixed, features="0,1,2", scorers="detection,specificity", db_path=db_path,
                            progress=False)
    assert res2.explanations_reused == 1 and not res2.explain_failures
    assert res2.scores_reused == {"detection": 0, "specificity": 1}
    assert all(r.value is not None for per in res2.scores.values() for r in per.values())


def test_feature_selection_and_arguments(db_path: Path) -> None:
    res = explain_features("x", FakeLLM(), features=2, scorers="none", db_path=db_path, progress=False)
    assert res.features == [1, 0]  # interest 1.9; the tie at 1.5 goes to the higher max activation; 3 never fired
    assert parse_features("20") == 20 and parse_features("3, 17,42") == [3, 17, 42] and parse_features("4,") == [4]
    assert parse_features([5, 5, 2]) == [5, 2] and parse_features(None) == 20
    for bad in ("0", "-3", "x", "1,y", ",", "1,-2", True):
        with pytest.raises(MonoscopeError):
            parse_features(bad)  # type: ignore[arg-type]
    assert parse_scorers("Fuzzing,detection") == ["detection", "fuzzing"] and parse_scorers("none") == []
    assert parse_scorers("all") == list(ALL_SCORERS) and parse_scorers(None) == list(SCORER_NAMES)
    with pytest.raises(MonoscopeError, match="unknown scorer 'simulate'"):
        parse_scorers("simulate")
    with pytest.raises(MonoscopeError, match="feature 9 is not in"):
        explain_features("x", FakeLLM(), features="1,9", db_path=db_path, progress=False)
    with pytest.raises(MonoscopeError, match="no feature database"):
        explain_features(db_path.parent / "nowhere", FakeLLM(), progress=False)


OPENED: list[dict[str, object]] = []  # what each _fake_open_llm call was given


@contextlib.contextmanager
def _fake_open_llm(spec: str, **kw: object) -> Iterator[FakeLLM]:
    assert spec == "openai:fake" and kw["endpoint"] == "http://127.0.0.1:9/v1" and kw["max_concurrency"] == 2
    OPENED.append(kw)
    yield FakeLLM(model_name="fake")


def test_cli(db_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import monoscope.interp.llm as llm_mod

    monkeypatch.setattr(llm_mod, "open_llm", _fake_open_llm)
    parser = argparse.ArgumentParser()
    add_explain_parser(parser.add_subparsers())
    args = parser.parse_args(["explain", "runs/x/sae", "--llm", "openai:fake", "--endpoint", "http://127.0.0.1:9/v1",
                              "--features", "0,2", "--scorers", "detection,fuzzing", "--db", str(db_path),
                              "--concurrency", "2", "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "explained 2 of 2 features with fake" in out and "digits and numbers" in out and "fuzzing" in out
    assert f"monoscope show runs/x/sae 0 --db {db_path}" in out
    assert OPENED[-1]["n_threads"] is None  # llm.default_threads() decides
    with FeatureDB.open(db_path) as db:
        asked = [json.loads(d)["settings"] for (d,) in db.conn.execute("SELECT details FROM scores WHERE scorer IN "
                                                                       "('detection', 'fuzzing') ORDER BY scorer")]
    assert asked == [['{"method": "calibrated"}']] * 4  # (this fake has no log-probs: each fell back to text answers)
    args = parser.parse_args(["explain", "runs/x/sae", "--llm", "openai:fake", "--endpoint", "http://127.0.0.1:9/v1",
                              "--features", "0,2", "--scorers", "detection", "--db", str(db_path),
                              "--concurrency", "2", "--quiet", "--classify-method", "text"])
    assert args.func(args) == 0
    with FeatureDB.open(db_path) as db:
        asked = sorted(json.loads(d)["settings"][0] for (d,) in db.conn.execute("SELECT details FROM scores WHERE "
                                                                               "scorer = 'detection'"))
    assert asked == ['{"method": "text"}'] * 2  # scored again, not taken from the log-prob scores
    with pytest.raises(SystemExit):
        parser.parse_args(["explain", "runs/x/sae", "--classify-method", "vibes"])
    err = capsys.readouterr().err
    assert "argument --classify-method: invalid choice: 'vibes' (choose from 'calibrated', 'logprob', 'text')" in err
    assert OPENED[-1]["n_threads"] is None
    args = parser.parse_args(["explain", "runs/x/sae", "--llm", "openai:fake", "--endpoint", "http://127.0.0.1:9/v1",
                              "--features", "0,2", "--scorers", "detection", "--db", str(db_path),
                              "--concurrency", "2", "--quiet", "--threads", "3"])
    assert args.func(args) == 0 and OPENED[-1]["n_threads"] == 3
    args = parser.parse_args(["explain", "runs/x/sae", "--llm", "openai:fake", "--threads", "0"])
    with pytest.raises(MonoscopeError) as e:
        args.func(args)
    assert str(e.value) == ("--threads 0: use 1 or more CPU threads (or leave it out: the cores not busy now)")
    args = parser.parse_args(["explain", "runs/x/sae", "--llm", "openai:fake", "--scorers", "bogus"])
    with pytest.raises(MonoscopeError, match="unknown scorer"):
        args.func(args)


@pytest.mark.integration
def test_real_llm_end_to_end(db_path: Path, llm_server: Any) -> None:
    """SmolLM2-135M through the real client: whatever it answers is stored or recorded as a failure; a rerun is
    answered by the database and the client's cache."""
    kw: dict[str, Any] = {"endpoint": llm_server.url, "features": "0,", "scorers": "detection",
                          "db_path": db_path, "progress": False, "max_concurrency": 2}
    res = explain_features("x", "openai:smollm2", **kw)
    assert res.model == "smollm2" and set(res.explanations) | set(res.explain_failures) == {0}
    assert res.usage is not None and res.usage.requests >= 1
    expl, scores = _rows(db_path)
    if res.explanations:
        assert [(e[0], e[1], e[2]) for e in expl] == [(0, "smollm2", PROMPT_VERSION)]
        assert [s[2] for s in scores] == ["detection"]
        assert all(s[3] is not None or json.loads(s[4])["error"] for s in scores)
    again = explain_features("x", "openai:smollm2", **kw)
    assert again.usage.requests == again.usage.cached  # nothing new was asked of the model
    assert _rows(db_path) == (expl, scores)


def test_compact_prompt_style_is_stored_under_its_own_version(db_path: Path, tmp_path: Path) -> None:
    """The compact prompt (the default for local: models) is short, versioned apart from the full one, reused on
    a rerun, and kept by carry_over when the database is rebuilt with the same evidence."""
    import shutil

    from monoscope.interp.explain import carry_over, default_style
    from monoscope.interp.prompts import COMPACT_VERSION, compact_explain_messages, format_compact_evidence

    assert default_style("local:default") == "compact" and default_style("openai:gpt-4o-mini") == "full"

    class Local:  # an open local LLM: its server runs here, its name is the GGUF file's
        server = object()

        def __init__(self, model_name: str) -> None:
            self.model_name = model_name

    assert default_style("local:default", Local("qwen2.5-coder-1.5b-instruct.gguf")) == "full"
    assert default_style(Local("qwen2.5-coder-1.5b-instruct.gguf")) == "full"
    assert default_style("local:small", Local("qwen2.5-coder-0.5b-instruct.gguf")) == "compact"
    assert default_style("local:/m/other.gguf", Local("other.gguf")) == "compact"
    assert default_style(FakeLLM()) == "full"  # an open LLM behind an endpoint
    with FeatureDB.open(db_path) as db:
        ev = evidence(db, 1)
        full, compact = format_explain_evidence(ev), format_compact_evidence(ev)
    lines = compact.splitlines()
    assert [ln.split(".")[0] for ln in lines[:10]] == [str(i) for i in range(1, 11)]  # 6 top + 4 quantile windows
    assert lines[-1].startswith("Most frequent marked tokens: ") and lines[-1].count("(") == 6
    assert len(compact) < len(full) / 2
    assert compact_explain_messages(ev)[1]["content"].endswith("Answer with one short phrase of at most 12 words.")
    with pytest.raises(MonoscopeError, match=r"--prompt 'tiny': use one of full, compact"):
        explain_features("x", FakeLLM(), features="1,", db_path=db_path, style="tiny", progress=False)

    res = explain_features("x", FakeLLM(), features="0,1,2", scorers="detection", db_path=db_path, style="compact",
                           progress=False)
    assert res.prompt_version == COMPACT_VERSION  # the phrase, then the prompt's most frequent marked tokens
    assert res.explanations[1] == f"French words{FRENCH}"
    assert res.scores["detection"][1].value == 1.0
    expl, scores = _rows(db_path)
    assert {(e[1], e[2]) for e in expl} == {("fake-competent", COMPACT_VERSION)}
    with FeatureDB.open(db_path) as db:
        assert [e[3] for e in expl] == [evidence_sha256(format_compact_evidence(evidence(db, f))) for f in (0, 1, 2)]
    assert all(json.loads(s[4])["prompt_version"] == COMPACT_VERSION for s in scores)
    again = FakeLLM()
    res2 = explain_features("x", again, features="0,1,2", scorers="detection", db_path=db_path, style="compact",
                            progress=False)
    assert again.calls == 0 and res2.explanations_reused == 3
    copy = tmp_path / "rebuilt.db"
    shutil.copy(db_path, copy)
    with FeatureDB.open(copy) as dst, dst.transaction():
        dst.conn.execute("DELETE FROM scores")
        dst.conn.execute("DELETE FROM explanations")
    with FeatureDB.open(db_path) as src, FeatureDB.open(copy) as dst:
        assert carry_over(src, dst) == (3, 3, 0)
    assert _rows(copy) == (expl, scores)


def test_explanation_names_the_frequent_tokens_not_yet_quoted(db_path: Path) -> None:
    from monoscope.interp.prompts import MAX_EXPLANATION_CHARS, frequent_marked_tokens, with_frequent_tokens

    with FeatureDB.open(db_path) as db:
        ev = evidence(db, 1)
    assert [t for t, _ in frequent_marked_tokens(ev.explain, 6)] == ["boulangerie", "merci", "château", "bonjour",
                                                                     "fromage", "croissant"]
    assert with_frequent_tokens('the words "bonjour" and \'merci\'', ev) == (
        'the words "bonjour" and \'merci\'; fires on tokens such as "boulangerie", "château", "fromage", '
        '"croissant"')
    long = "x" * (MAX_EXPLANATION_CHARS - 40)
    assert with_frequent_tokens(long, ev) == long + '; fires on tokens such as "boulangerie"'
    assert with_frequent_tokens("y" * MAX_EXPLANATION_CHARS, ev) == "y" * MAX_EXPLANATION_CHARS
    assert with_frequent_tokens("nothing marked", Evidence(9, 1.0)) == "nothing marked"
