"""Log-probability detection and fuzzing (methods "logprob" and "calibrated"): P("1") read from the answer token,
AUROC and the median-threshold balanced accuracy as golden values, the calibration against a content-free
explanation, the recorded fallbacks (to the text answers when an endpoint returns no log-probabilities, to
uncalibrated scores when the content-free answers lack them), bad-input errors, and the method in the stored
score's key and details."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB
from monoscope.interp import prompts
from monoscope.interp.explain import _settings, explain_features
from monoscope.interp.llm import ChatRequest, ChatResponse
from monoscope.interp.prompts import Context, Evidence
from monoscope.interp.scorers import (
    CALIBRATION_EXPLANATION,
    LOGPROB_TOP,
    digit_probability,
    median_threshold_accuracy,
    score_detection,
    score_fuzzing,
)
from tests.interp.test_scorers import build_db, competent, evidence

# chosen P("1") per excerpt: AUROC 12/16 = 0.75; median 0.55 -> 3 of 4 right on each side = 0.75; at 0.5 the
# negatives 0.8 and 0.5 count as "yes" -> 0.5 * (3/4 + 2/4) = 0.625
P_POS = {"pos one": 0.9, "pos two": 0.7, "pos three": 0.6, "pos four": 0.4}
P_NEG = {"neg one": 0.8, "neg two": 0.5, "neg three": 0.3, "neg four": 0.2}


def _ctx(text: str, kind: str, i: int) -> Context:
    return Context((text,), (1.0 if kind != "negative" else 0.0,), i, kind, 0, 1.0 if kind != "negative" else 0.0, 0)


EV = Evidence(7, 1.0, held_out=[_ctx(t, "top", i) for i, t in enumerate(P_POS)],
              negatives=[_ctx(t, "negative", 100 + i) for i, t in enumerate(P_NEG)])


def _excerpt(messages: Sequence[Any]) -> str:
    return str(messages[-1]["content"]).split("Excerpt:\n", 1)[1].rsplit("\n\nAnswer", 1)[0]


def lp(p1: float, other: float = 0.1) -> list[dict[str, float]]:
    """Top log-probabilities at position 0 with P("1") : P("0") = p1 : 1 - p1 and some mass on another token."""
    return [{"1": math.log(p1 * (1 - other)), "0": math.log((1 - p1) * (1 - other)), " The": math.log(other)}]


class LogprobLLM:
    """A fake LLM answering each request with `answer(messages)` -> (text, top_logprobs or None)."""

    model_name = "fake-logprob"

    def __init__(self, answer: Callable[[Sequence[Any]], tuple[str, list[dict[str, float]] | None]]) -> None:
        self.answer = answer
        self.requests: list[ChatRequest] = []

    def chat_many(self, reqs: Sequence[ChatRequest], *, progress: str | None = None) -> list[ChatResponse]:
        self.requests += list(reqs)
        out = []
        for r in reqs:
            text, top = self.answer(list(r.messages))
            out.append(ChatResponse(text=text, top_logprobs=top))
        return out


def yes_biased(messages: Sequence[Any]) -> tuple[str, list[dict[str, float]] | None]:
    """Always answers "1" in text (the 0.5B model's habit) but ranks excerpts by the chosen probabilities."""
    x = _excerpt(messages)
    return "1", lp({**P_POS, **P_NEG}[x])


def with_logprobs(messages: Sequence[Any]) -> tuple[str, list[dict[str, float]] | None]:
    """The competent fake's text answer, with a confident P("1") that agrees with it."""
    text = competent(messages)
    return text, lp(0.9 if text == "1" else 0.2)


def test_digit_probability_and_median_threshold() -> None:
    assert digit_probability(lp(0.7)) == pytest.approx(0.7)
    assert digit_probability([{" 1": math.log(0.3), "1": math.log(0.3), "0": math.log(0.2)}]) == pytest.approx(0.75)
    assert digit_probability([{"yes": 0.0}]) is None and digit_probability(None) is None
    assert digit_probability([]) is None and digit_probability(lp(0.7), position=1) is None
    v, thr, counts = median_threshold_accuracy([1, 1, 0, 0], [0.9, 0.8, 0.85, 0.1])
    assert (v, thr, counts) == (0.5, pytest.approx(0.825), {"tp": 1, "fn": 1, "tn": 1, "fp": 1, "unanswered": 0})
    assert median_threshold_accuracy([1, 0, 1, 0], [0.99] * 4)[0] == 0.5  # constant scores: chance


def test_logprob_detection_golden_values() -> None:
    llm = LogprobLLM(yes_biased)
    (r,) = score_detection([(EV, "anything")], llm, n_examples=4, method="logprob", progress=False)
    assert all(q.max_tokens == 1 and q.logprobs == LOGPROB_TOP for q in llm.requests) and len(llm.requests) == 8
    assert all(q.messages[0]["content"] == prompts.DETECTION_ONE_SYSTEM for q in llm.requests)
    d = r.details
    assert r.value == pytest.approx(0.75) and d["method"] == "logprob"
    assert d["auroc"] == pytest.approx(0.75) and d["threshold"] == pytest.approx(0.55)
    assert d["balanced_accuracy_at_0.5"] == pytest.approx(0.625)
    assert d["text_balanced_accuracy"] == 0.5 and d["text_counts"]["tp"] == 4 and d["text_counts"]["fp"] == 4
    assert (d["tp"], d["fn"], d["tn"], d["fp"]) == (3, 1, 3, 1)
    assert sorted(zip(d["p_yes"], d["truth"], strict=True)) == sorted(
        [(p, 1) for p in P_POS.values()] + [(p, 0) for p in P_NEG.values()])


def test_logprob_fuzzing_and_detection_on_a_database(tmp_path: Path) -> None:
    db = build_db(tmp_path / "features.db")
    items = [(evidence(db, 0), "digits and numbers"), (evidence(db, 0), "French words")]
    det = score_detection(items, LogprobLLM(with_logprobs), method="logprob", progress=False)
    fuz = score_fuzzing(items, LogprobLLM(with_logprobs), method="logprob", progress=False)
    # the non-activating excerpts of this database are French windows: the wrong explanation picks exactly them
    assert [r.value for r in det] == [1.0, 0.0] and [r.details["auroc"] for r in det] == [1.0, 0.0]
    assert fuz[0].value == 1.0 and fuz[0].details["method"] == "logprob" and fuz[0].details["auroc"] == 1.0
    assert fuz[1].value == 0.5 and fuz[1].details["auroc"] == 0.5  # all "no": chance, whatever the threshold


def test_fallback_to_text_is_recorded() -> None:
    (r,) = score_detection([(EV, "anything")], LogprobLLM(lambda m: ("1", None)), n_examples=4, method="logprob",
                           progress=False)
    assert r.value == 0.5 and r.details["method"] == "text" and "auroc" not in r.details
    assert r.details["logprob_fallback"] == ("8 of 8 answers came without log-probabilities of '1' and '0' (the "
                                             "endpoint returned none, or other tokens): scored from the text answers")

    def some(messages: Sequence[Any]) -> tuple[str, list[dict[str, float]] | None]:
        x = _excerpt(messages)
        return ("1", None) if x == "neg one" else ("0" if x in P_NEG else "1", [{"1": -0.1, "2": -3.0}])

    (r,) = score_detection([(EV, "anything")], LogprobLLM(some), n_examples=4, progress=False)
    assert r.value == 0.875 and r.details["method"] == "text" and r.details["logprob_fallback"].startswith("1 of 8")


def test_bad_arguments() -> None:
    item = [(EV, "x")]
    llm = LogprobLLM(yes_biased)
    with pytest.raises(MonoscopeError) as e:
        score_detection(item, llm, method="probs", progress=False)
    assert str(e.value) == ("detection method 'probs' is unknown: use 'calibrated' (log-probabilities of the "
                            "answer less those under a content-free explanation, the default), 'logprob' (the "
                            "log-probabilities alone) or 'text' (the generated 0/1 answers)")
    with pytest.raises(MonoscopeError) as e:
        score_fuzzing(item, llm, batch_size=5, progress=False)
    assert str(e.value) == ("fuzzing batch_size=5 applies to method 'text' only: the 'calibrated' method asks one "
                            "excerpt per request; drop batch_size or pass method='text'")
    with pytest.raises(MonoscopeError) as e:
        score_fuzzing(item, llm, batch_size=2, method="logprob", progress=False)
    assert str(e.value) == ("fuzzing batch_size=2 applies to method 'text' only: the 'logprob' method asks one "
                            "excerpt per request; drop batch_size or pass method='text'")
    with pytest.raises(MonoscopeError) as e:
        score_detection(item, llm, method="text", batch_size=0, progress=False)
    assert str(e.value) == "detection batch_size=0: use 1 or more excerpts per request (e.g. 5)"
    with pytest.raises(MonoscopeError) as e:
        score_detection(item, llm, n_examples=0, progress=False)
    assert str(e.value) == "detection n_examples=0: use 1 or more excerpts of each kind (e.g. 10)"
    assert not llm.requests


def test_method_is_part_of_the_stored_score(tmp_path: Path) -> None:
    assert _settings("detection", {}) == ['{"method": "calibrated"}']
    assert _settings("fuzzing", {"method": "text"}) == ['{"method": "text"}']
    db_path = tmp_path / "run" / "features" / "features.db"
    build_db(db_path).close()

    class Both(LogprobLLM):
        def __init__(self) -> None:
            super().__init__(lambda m: (competent(m), None) if m[0]["content"] not in (
                prompts.DETECTION_ONE_SYSTEM, prompts.FUZZING_ONE_SYSTEM) else with_logprobs(m))

    res = explain_features("x", Both(), features="0,", scorers="detection", db_path=db_path, progress=False)
    d = res.scores["detection"][0].details
    assert res.scores["detection"][0].value == 1.0 and d["method"] == "calibrated"
    assert d["settings"] == ['{"method": "calibrated"}'] and d["requests"] == 40 and len(d["p_null"]) == 20
    text = explain_features("x", Both(), features="0,", scorers="detection", db_path=db_path, progress=False,
                            scorer_options={"detection": {"method": "text"}})
    assert text.scores_reused == {"detection": 0} and text.scores["detection"][0].details["method"] == "text"
    again = explain_features("x", Both(), features="0,", scorers="detection", db_path=db_path, progress=False)
    assert again.scores_reused == {"detection": 0}  # the stored text score is not taken for a log-prob one
    same = explain_features("x", Both(), features="0,", scorers="detection", db_path=db_path, progress=False)
    assert same.scores_reused == {"detection": 1}
    with FeatureDB.open(db_path) as db:
        stored = json.loads(db.conn.execute("SELECT details FROM scores WHERE scorer = 'detection'").fetchone()[0])
    assert stored["method"] == "calibrated" and stored["auroc"] == 1.0 and stored["uncalibrated"]["auroc"] == 1.0


# yes-proneness of each excerpt (P("1") under the content-free explanation) and the log-odds the explanation
# adds: +2 on the activating excerpts, 0 on the others. Raw P("1") ranks the yes-prone "neg one" and "neg three"
# above "pos two" and "pos four"; calibrated, every activating excerpt scores 2 and every other 0.
BIAS = {"pos one": 0.9, "pos two": 0.1, "pos three": 0.6, "pos four": 0.2,
        "neg one": 0.97, "neg two": 0.5, "neg three": 0.8, "neg four": 0.1}


def biased(messages: Sequence[Any]) -> tuple[str, list[dict[str, float]] | None]:
    x = _excerpt(messages)
    expl = str(messages[-1]["content"]).split("Explanation: ", 1)[1].split("\n", 1)[0]
    b = math.log(BIAS[x] / (1 - BIAS[x])) + (2.0 if expl != CALIBRATION_EXPLANATION and x in P_POS else 0.0)
    return "1", lp(1 / (1 + math.exp(-b)))


def test_calibrated_detection_golden_values() -> None:
    llm = LogprobLLM(biased)
    (r,) = score_detection([(EV, "anything")], llm, n_examples=4, progress=False)
    assert len(llm.requests) == 16 and all(q.max_tokens == 1 and q.logprobs == LOGPROB_TOP for q in llm.requests)
    null = [q for q in llm.requests if "Explanation: N/A\n" in q.messages[-1]["content"]]
    assert len(null) == 8 and {_excerpt(q.messages) for q in null} == set(BIAS)
    d = r.details
    assert r.value == 1.0 and d["method"] == "calibrated" and d["auroc"] == 1.0 and d["requests"] == 16
    assert d["threshold"] == pytest.approx(1.0)  # the median of four 2s and four 0s
    # uncalibrated: P("1") = 0.985, 0.451, 0.917, 0.649 on the activating excerpts and the bias on the others:
    # 10 of 16 pairs ordered right; the median 0.724 keeps 0.8, 0.917, 0.97, 0.985 (2 of each kind) -> 0.5
    assert d["uncalibrated"]["auroc"] == pytest.approx(0.625) and d["uncalibrated"]["value"] == pytest.approx(0.5)
    assert sorted(d["p_null"]) == sorted(BIAS.values())
    (raw,) = score_detection([(EV, "anything")], llm, n_examples=4, method="logprob", progress=False)
    assert raw.value == pytest.approx(0.5) and raw.details["auroc"] == pytest.approx(0.625)


def test_calibration_fallback_is_recorded() -> None:
    def no_null_logprobs(messages: Sequence[Any]) -> tuple[str, list[dict[str, float]] | None]:
        text, top = biased(messages)
        return (text, None) if "Explanation: N/A\n" in messages[-1]["content"] else (text, top)

    (r,) = score_detection([(EV, "anything")], LogprobLLM(no_null_logprobs), n_examples=4, progress=False)
    assert r.value == pytest.approx(0.5) and r.details["method"] == "logprob" and "p_null" not in r.details
    assert r.details["auroc"] == pytest.approx(0.625)
    assert r.details["calibration_fallback"] == ("8 of 8 content-free answers came without log-probabilities of "
                                                 "'1' and '0': scored uncalibrated")
