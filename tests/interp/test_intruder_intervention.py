"""The intruder and intervention scorers: golden values with a deterministic fake LLM (tests/interp), strict
answer parsing with failures counted, the real OpenAI-compatible client against the fault server, and the
intervention scorer steering a tiny Llama through `explain_features`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB
from monoscope.interp import prompts
from monoscope.interp.explain import carry_over, explain_features, parse_scorers
from monoscope.interp.llm import open_llm
from monoscope.interp.prompts import Evidence, parse_ab, parse_intruder
from monoscope.interp.scorers import ALL_SCORERS, SCORER_NAMES, score_intervention, score_intruder
from monoscope.steer.target import Target
from tests.interp.conftest import FaultServer
from tests.interp.test_scorers import CONCEPTS, FakeLLM, build_db, competent, evidence
from tests.steer.helpers import tiny_sae

# golden: where the seeded draw puts the intruder in feature 0's five trials (1-based)
INTRUDER_AT_F0 = [4, 5, 5, 3, 5]


def _excerpts(user: str) -> list[str]:
    return re.findall(r"^\d+\. (.*)$", user, re.M)


def _words(text: str) -> list[str]:
    return re.findall(r"[\wé]+", text)


def oracle(messages: Sequence[Any]) -> str:
    """`competent` (test_scorers) plus the two new prompts: the intruder is the excerpt without the concept the
    others share; the steered continuation is the one with more of the character the explanation names."""
    system, user = messages[0]["content"], messages[-1]["content"]
    if system == prompts.INTRUDER_SYSTEM:
        ex = _excerpts(user)
        has = [{c for c, f in CONCEPTS.items() if any(f(w) for w in _words(x))} for x in ex]
        common = max(CONCEPTS, key=lambda c: sum(c in h for h in has))
        return f"The intruder is excerpt {next(i for i, h in enumerate(has, 1) if common not in h)}."
    if system == prompts.INTERVENTION_SYSTEM:
        named = re.search(r"^Explanation: .*'(.)'", user, re.M)
        want = named.group(1) if named else "\0"  # nothing named: no preference
        a = re.search(r"^A: (.*)$", user, re.M).group(1)  # type: ignore[union-attr]
        b = re.search(r"^B: (.*)$", user, re.M).group(1)  # type: ignore[union-attr]
        return "B" if b.count(want) > a.count(want) else "A"  # no preference: always A
    return competent(messages)


@pytest.fixture()
def db(tmp_path: Path) -> FeatureDB:
    return build_db(tmp_path / "features" / "features.db")


# ---------------------------------------------------------------------------------------------- parsing
def test_strict_answer_parsing() -> None:
    for text, want in [("3", 3), ("**3**.", 3), ("[3]", 3), ("The intruder is excerpt 3.", 3), ("Answer: 2", 2),
                       ("[RESPONSE]: 5", 5), ("<think>1 or 2?</think>\n4", 4), ("intruder: #1", 1)]:
        assert parse_intruder(text, 5) == want, text
    for text in ["6", "0", "I think 2 or 3", "echo: Excerpts:\n1. a\n2. b", "", None, "Excerpt three"]:
        assert parse_intruder(text, 5) is None, text
    for text, want in [("A", "A"), ("b", "B"), ("**B**", "B"), ("Answer: A", "A"), ("The answer is B.", "B"),
                       ("Continuation B", "B")]:
        assert parse_ab(text) == want, text
    for text in ["A or B", "echo: A: x\nB: y", "C", "", None, "Both"]:
        assert parse_ab(text) is None, text


def test_scorer_selection() -> None:
    assert parse_scorers(None) == list(SCORER_NAMES)  # the default set is unchanged
    assert parse_scorers("all") == list(ALL_SCORERS) and ALL_SCORERS[-2:] == ("intruder", "intervention")
    assert parse_scorers("intervention,intruder,detection") == ["detection", "intruder", "intervention"]
    with pytest.raises(MonoscopeError, match=r"^unknown scorer 'intruders': choose from detection,fuzzing,simulation,"
                                             r"embedding,specificity,intruder,intervention \(or all, none\)$"):
        parse_scorers("intruders")


# ---------------------------------------------------------------------------------------------- intruder
def test_intruder_golden(db: FeatureDB) -> None:
    ev = evidence(db, 0)
    llm = FakeLLM(oracle)
    (r,) = score_intruder([(ev, "digits")], llm, progress=False)
    assert r.value == 1.0 and r.details["trials"] == 5 and r.details["answered"] == 5 and r.details["k"] == 4
    assert r.details["intruder_positions"] == INTRUDER_AT_F0 and r.details["picks"] == INTRUDER_AT_F0
    assert r.details["chance"] == 0.2 and r.details["held_out"] is True and llm.batches == [None]
    # a model that always says 5 is right exactly where the intruder sits last
    (r,) = score_intruder([(ev, "digits")], FakeLLM(lambda m: "5"), progress=False)
    assert r.value == INTRUDER_AT_F0.count(5) / 5 == 0.6
    # every trial: k activating excerpts with a digit and the intruder without one
    trials = []
    score_intruder([(ev, "x")], FakeLLM(lambda m: trials.append(_excerpts(m[-1]["content"])) or "1"), progress=False)
    for ex, at in zip(trials, INTRUDER_AT_F0, strict=True):
        assert len(ex) == 5 and [any(w.isdigit() for w in _words(x)) for x in ex].count(False) == 1
        assert not any(w.isdigit() for w in _words(ex[at - 1]))


def test_intruder_failures_are_counted(db: FeatureDB) -> None:
    ev = evidence(db, 0)
    for answer in ["I think 2 or 3", "", "7", None]:
        (r,) = score_intruder([(ev, "x")], FakeLLM(lambda m, a=answer: a), progress=False)  # type: ignore[misc]
        assert r.value is None and r.details["unanswered"] == 5 and r.details["answered"] == 0
        assert ("HTTP 500" in r.details["error"]) if answer is None else r.details["error"].startswith("no usable")
    seen = {"n": 0}

    def flaky(m: Sequence[Any]) -> str:
        seen["n"] += 1
        return "maybe 1, maybe 2" if seen["n"] == 2 else oracle(m)

    (r,) = score_intruder([(ev, "x")], FakeLLM(flaky), progress=False)
    assert r.value == 1.0 and r.details["answered"] == 4 and r.details["unanswered"] == 1
    assert r.details["picks"][1] is None and r.details["unusable_answers"] == ["maybe 1, maybe 2"]
    (r,) = score_intruder([(Evidence(9, 1.0), "x")], FakeLLM(oracle), progress=False)
    assert r.value is None and r.details["error"].startswith("too few contexts") and r.details["trials"] == 0
    with pytest.raises(MonoscopeError, match="intruder k=1: pass at least 2"):
        score_intruder([(ev, "x")], FakeLLM(oracle), k=1)


def test_intruder_through_the_openai_client(db: FeatureDB, fault_server: FaultServer) -> None:
    """The real client: the fault server's echo (which lists numbered excerpts) is no answer; a 500 is an error."""
    ev = evidence(db, 0)
    fault_server.script("500")
    with open_llm("openai:fake", endpoint=fault_server.url, retries=0, timeout_s=5.0, backoff_s=0.01) as llm:
        (r,) = score_intruder([(ev, "x")], llm, n_trials=3, progress=False)
    assert fault_server.requests == 3 and r.value is None and r.details["unanswered"] == 3
    assert any("500" in e for e in r.details["errors"]) and r.details["unusable_answers"][0].startswith("echo: ")


# ---------------------------------------------------------------------------------------------- intervention
@pytest.fixture(scope="module")
def target(tiny_lm: Any) -> Target:
    sae = tiny_sae(tiny_lm)
    max_acts = np.full(sae.cfg.d_sae, 4.0)
    return Target(tiny_lm, sae, tiny_lm.hook(sae.cfg.hook), max_acts=max_acts)


PROMPTS = ["The weather this morning was", "She opened the letter and read the first line:"]


def test_intervention_golden(target: Target) -> None:
    """Feature 3 clamped at 5x max (20) makes the tiny model write 'A's (measured below, not assumed): an
    explanation naming 'A' finds the steered continuation every time; one naming '3' has no preference (the
    fake then says A), so it is right exactly where the seeded order put the steered text first."""
    seen: list[str] = []

    def record(m: Sequence[Any]) -> str:
        seen.append(m[-1]["content"])
        return oracle(m)

    items = [(Evidence(3, 4.0), "the character 'A'"), (Evidence(3, 4.0), "the character '3'")]
    right, wrong = score_intervention(items, FakeLLM(record), target=target, prompts=PROMPTS, strength="5x",
                                      max_new_tokens=4, progress=False)
    assert right.details["clamp"] == 20.0 and right.details["changed"] == 2 and right.details["prompts"] == 2
    steered = [s["steered"] for s in right.details["samples"]]
    assert all(s.count("A") >= 2 for s in steered), steered  # the steering really happened
    assert all("A" not in s["default"] for s in right.details["samples"])
    assert right.value == 1.0 and right.details["answered"] == 2
    assert wrong.details["picks"] == ["A", "A"]
    # the same seeded order for the same feature: steered first where the right explanation answered A
    assert wrong.value == right.details["picks"].count("A") / 2
    assert len(seen) == 4 and all(p in s for p, s in zip(PROMPTS * 2, seen, strict=True))


def test_intervention_failures(target: Target) -> None:
    items = [(Evidence(3, 4.0), "the character 'A'")]
    (r,) = score_intervention(items, FakeLLM(lambda m: "A or B, hard to say"), target=target, prompts=PROMPTS[:1],
                              strength=20.0, max_new_tokens=3, progress=False)
    assert r.value is None and r.details["unanswered"] == 1 and r.details["error"].startswith("no usable answer")
    (r,) = score_intervention(items, FakeLLM(oracle), target=None, progress=False)
    assert r.value is None and r.details["error"] == ("the intervention scorer needs the model and SAE (a steering "
                                                      "target)")
    bare = Target(target.lm, target.sae, target.hook)  # no database: "Nx" cannot be resolved
    (r,) = score_intervention(items, FakeLLM(oracle), target=bare, prompts=PROMPTS[:1], strength="4x",
                              max_new_tokens=3, progress=False)
    assert r.value is None and r.details["error"].startswith("strength 4x needs feature 3's max activation")
    (r,) = score_intervention(items, FakeLLM(oracle), target=target, prompts=PROMPTS[:1], strength=0.0,
                              max_new_tokens=3, progress=False)  # clamping an inactive feature to 0 changes nothing
    assert r.value is None and r.details["changed"] == 0 and r.details["error"].startswith("steering at 0.0 changed")


def test_explain_runs_both_and_reuses(tmp_path: Path, target: Target) -> None:
    db_path = tmp_path / "features" / "features.db"
    build_db(db_path).close()
    llm = FakeLLM(oracle)
    opts = {"intervention": {"prompts": PROMPTS[:1], "max_new_tokens": 3}}
    res = explain_features("x", llm, features="0,1", scorers="intruder,intervention", db_path=db_path,
                           progress=False, target=target, steer_strength=20.0, scorer_options=opts)
    assert res.scores["intruder"][0].value == 1.0 and res.scores["intruder"][1].value == 1.0
    for f in (0, 1):  # stored, with the steering settings in the details
        iv = res.scores["intervention"][f]
        assert iv.details["clamp"] == 20.0 and iv.details["prompts"] == 1 and iv.details["answered"] == 1
        assert iv.value in (0.0, 1.0)
    with FeatureDB.open(db_path) as db:
        assert db.score(0, "fake-competent", "intruder")[0] == 1.0  # type: ignore[index]
    calls = llm.calls
    again = explain_features("x", llm, features="0,1", scorers="intruder,intervention", db_path=db_path,
                             progress=False, target=target, steer_strength=20.0, scorer_options=opts)
    assert llm.calls == calls and again.scores_reused == {"intruder": 2, "intervention": 2}
    explain_features("x", llm, features="0,1", scorers="intervention", db_path=db_path, progress=False,
                     target=target, steer_strength=10.0, scorer_options=opts)
    assert llm.calls > calls  # another strength is another score
    # a rebuild of the same database keeps every score, also those made with non-default settings
    rebuilt = tmp_path / "rebuilt" / "features.db"
    build_db(rebuilt).close()
    with FeatureDB.open(db_path) as src, FeatureDB.open(rebuilt) as dst:
        assert carry_over(src, dst, archive=tmp_path / "lost.jsonl") == (2, 4, 0)
        assert dst.score(1, "fake-competent", "intervention") == src.score(1, "fake-competent", "intervention")
    assert not (tmp_path / "lost.jsonl").exists()
    with pytest.raises(MonoscopeError, match=r"^scorer_options names 'intruder', which is not among the scorers run"):
        explain_features("x", llm, features="0,", scorers="detection", db_path=db_path, progress=False,
                         scorer_options={"intruder": {"k": 3}})


# ---------------------------------------------------------------------------------------------- command line
def test_cli_subprocess_openai_endpoint(tmp_path: Path, fault_server: FaultServer) -> None:
    """`monoscope explain --scorers intruder` against an OpenAI-compatible server: the echo server's answers are
    unusable, so every trial is counted unanswered and the score is stored as a failure; the run still ends 0."""
    import json
    import os
    import subprocess
    import sys

    db_path = tmp_path / "features" / "features.db"
    build_db(db_path).close()
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OPENAI_API_KEY": "x"}
    r = subprocess.run([sys.executable, "-m", "monoscope.cli", "explain", "runs/x/sae", "--db", str(db_path), "--llm",
                        "openai:fake", "--endpoint", fault_server.url, "--features", "0,", "--scorers", "intruder",
                        "--no-cache", "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "intruder" in r.stdout and "explained 1 of 1 features with fake" in r.stdout
    assert fault_server.requests == 1 + 5  # one explanation, five intruder trials
    with FeatureDB.open(db_path) as db:
        value, details = db.score(0, "fake", "intruder")  # type: ignore[misc]
    d = json.loads(details)
    assert value is None and d["unanswered"] == 5 and d["error"].startswith("no usable answer")


def test_cli_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from monoscope.cli import main

    db_path = tmp_path / "features" / "features.db"
    build_db(db_path).close()
    assert main(["explain", "runs/x/sae", "--db", str(db_path), "--llm", "openai:fake", "--scorers", "intervention",
                 "--steer-strength", "lots"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --steer-strength 'lots' is not a number: pass e.g. 4.5, -2 or "
                                               "10x (a multiple of the feature's max activation)")


@pytest.mark.integration
def test_local_llamacpp_backend(db: FeatureDB, target: Target, tmp_path: Path) -> None:
    """Both scorers through the in-process llama.cpp backend (SmolLM2-135M): whatever the small model answers is
    either read as a choice or counted as unanswered; nothing raises."""
    ev = evidence(db, 0)
    with open_llm("local:smollm2", max_concurrency=1, n_threads=1, cache=tmp_path / "c.sqlite") as llm:
        (ri,) = score_intruder([(ev, "digits")], llm, n_trials=2, progress=False)
        (rv,) = score_intervention([(Evidence(3, 4.0), "the character 'A'")], llm, target=target,
                                   prompts=PROMPTS[:1], strength="5x", max_new_tokens=4, progress=False)
    assert ri.details["answered"] + ri.details["unanswered"] == ri.details["trials"] == 2
    assert ri.value is None or 0.0 <= ri.value <= 1.0
    assert ri.details["picks"] == [p if p is None else int(p) for p in ri.details["picks"]]
    assert rv.details["changed"] == 1 and rv.details["answered"] + rv.details["unanswered"] == 1
    assert (rv.value is None) == (rv.details["answered"] == 0)
