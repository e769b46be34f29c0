"""Scorers: a competent fake LLM separates a right explanation ("digits") from a wrong one ("French words") in
every scorer; the real MiniLM does so for the embedding scorer; malformed answers are failures, not crashes.

The database and the fake LLM here are shared with test_explain.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monoscope.features.db import FeatureDB
from monoscope.interp import prompts
from monoscope.interp.explain import _negative_pool, load_evidence
from monoscope.interp.llm import ChatRequest, ChatResponse
from monoscope.interp.prompts import (
    Context,
    Evidence,
    evidence_sha256,
    format_explain_evidence,
    mark,
    parse_explanation,
    parse_number_list,
)
from monoscope.interp.scorers import (
    ScoreResult,
    auroc,
    score_detection,
    score_embedding,
    score_fuzzing,
    score_simulation,
    score_specificity,
)

# ---------------------------------------------------------------------------------------------- a database
FRENCH = ["croissant", "fromage", "baguette", "bonjour", "merci", "château", "boulangerie", "chocolat"]
ANIMALS = ["cat", "dog", "horse", "rabbit", "sheep", "goat", "mouse", "tiger"]
ENGLISH = ["the", "a", "shop", "sold", "people", "came", "in", "and", "we", "saw", "near", "river", "old", "town",
           "on", "morning", "friends", "bought", "some", "at", "bakery", "said", "to", "us", "after", "lunch"]
CONCEPTS: dict[str, Callable[[str], bool]] = {
    "digit": lambda w: w.strip().isdigit(),
    "french": lambda w: w.strip().lower() in FRENCH,
    "animal": lambda w: w.strip().lower() in ANIMALS,
}
META = {"sae": {"path": "runs/x/sae", "arch": "topk", "d_sae": 4, "weights_sha256": "ab" * 32},
        "model": {"id": "tiny"}, "hook": "resid_post.1", "tokens": 10000, "bins": 10, "complete": True}


def _sentence(rng: np.random.Generator, concept: str) -> list[str]:
    """Words with leading spaces; numbers are split into digit tokens like a BPE tokenizer would."""
    words = [str(w) for w in rng.choice(ENGLISH, size=9)]
    out: list[str] = []
    for i, w in enumerate(words):
        out.append(" " + w)
        if i in (2, 6):
            if concept == "digit":
                num = str(int(rng.integers(1, 2000)))
                out += [" " + num[0], *num[1:]]
            elif concept == "french":
                out.append(" " + str(rng.choice(FRENCH)))
            else:
                out.append(" " + str(rng.choice(ANIMALS)))
    return out


def build_db(path: Path) -> FeatureDB:
    """Features 0 digits, 1 French words, 2 animal names (each: 20 top examples + 2 per decile, acts on the
    concept's tokens only), 3 dead. Context ids are distinct across features except context 7 of feature 0,
    which also appears among feature 2's windows (so it must not be a non-activating context of feature 0)."""
    rng = np.random.default_rng(0)
    sentences = {c: [_sentence(rng, c) for _ in range(40)] for c in CONCEPTS}
    vocab = sorted({t for ss in sentences.values() for s in ss for t in s})
    index = {t: i for i, t in enumerate(vocab)}
    db = FeatureDB.create(path, META)
    rows = []
    for fid, concept in enumerate(CONCEPTS):
        is_c = CONCEPTS[concept]
        for k, toks in enumerate(sentences[concept]):
            kind, rank, b = ("top", k, 0) if k < 20 else ("quantile", k - 20, 9 - (k - 20) // 2)
            peak = 10.0 - 0.2 * k if kind == "top" else 0.5 + 0.5 * b
            acts = np.array([peak * (0.6 if j % 2 else 1.0) if is_c(t) else 0.0 for j, t in enumerate(toks)],
                            dtype=np.float32)
            ctx = 1000 * fid + k
            rows.append((fid, kind, rank, b, float(acts.max()), ctx, int(acts.argmax()),
                         np.array([index[t] for t in toks], dtype=np.int32), acts))
    # feature 2's window in context 7, which feature 0's examples also use (a different window of it)
    rows.append((2, "quantile", 99, 0, 0.4, 7, 0, np.array([index[" cat"], index[" the"]], dtype=np.int32),
                 np.array([0.4, 0.0], dtype=np.float32)))
    with db.transaction():
        db.put_vocab(vocab)
        db.put_features([
            {"id": 0, "density": 2e-3, "max_act": 10.0, "interest": 1.5, "label": "' 1'", "cooccur": []},
            {"id": 1, "density": 1e-3, "max_act": 10.0, "interest": 1.9, "label": "' fromage'", "cooccur": []},
            {"id": 2, "density": 5e-3, "max_act": 10.0, "interest": 1.5, "label": "' cat'", "cooccur": []},
            {"id": 3, "density": 0.0, "max_act": 0.0, "interest": 0.0, "label": ""},
        ])
        db.put_examples(rows)
        db.index_labels([(0, "' 1'"), (1, "' fromage'"), (2, "' cat'")])
    return db


@pytest.fixture()
def db(tmp_path: Path) -> FeatureDB:
    return build_db(tmp_path / "features" / "features.db")


def evidence(db: FeatureDB, fid: int) -> Evidence:
    vocab = db.vocab()
    return load_evidence(db, fid, vocab, _negative_pool(db, vocab))


# ---------------------------------------------------------------------------------------------- a fake LLM
def concept_of(explanation: str) -> str | None:
    e = explanation.lower()
    if "digit" in e or "number" in e:
        return "digit"
    if "french" in e:
        return "french"
    if "animal" in e:
        return "animal"
    return None


def _spans(text: str) -> list[str]:
    return re.findall(re.escape(prompts.MARK_OPEN) + r"(.*?)" + re.escape(prompts.MARK_CLOSE), text)


def _words(text: str) -> list[str]:
    return re.findall(r"[\wé]+", text.replace(prompts.MARK_OPEN, " ").replace(prompts.MARK_CLOSE, " "))


def competent(messages: Sequence[Any]) -> str:
    """Answers every prompt of prompts.py the way a good model would, from the text it is given."""
    system, user = messages[0]["content"], messages[-1]["content"]
    if system in (prompts.EXPLAIN_SYSTEM, prompts.COMPACT_SYSTEM):
        spans = _spans(user)
        votes = {c: sum(all(f(w) for w in _words(s)) for s in spans) for c, f in CONCEPTS.items()}
        best = max(votes, key=lambda c: votes[c])
        name = {"digit": "digits and numbers", "french": "French words", "animal": "names of animals"}[best]
        return f"The marked tokens share a theme.\n**Explanation:** {name}."
    m = re.search(r"^Explanation: (.*)$", user, re.M)
    pred = CONCEPTS.get((concept_of(m.group(1)) if m else None) or "", lambda w: False)
    if system in (prompts.DETECTION_SYSTEM, prompts.FUZZING_SYSTEM):
        excerpts = re.findall(r"^\d+\. (.*)$", user, re.M)
        if system == prompts.DETECTION_SYSTEM:
            answers = [int(any(pred(w) for w in _words(x))) for x in excerpts]
        else:
            answers = [int(all(pred(w) for s in _spans(x) for w in _words(s))) for x in excerpts]
        return json.dumps(answers)
    if system in (prompts.DETECTION_ONE_SYSTEM, prompts.FUZZING_ONE_SYSTEM):
        x = user.split("Excerpt:\n", 1)[1].rsplit("\n\nAnswer", 1)[0]
        if system == prompts.DETECTION_ONE_SYSTEM:
            return str(int(any(pred(w) for w in _words(x))))
        return str(int(all(pred(w) for s in _spans(x) for w in _words(s))))
    if system == prompts.SIMULATION_SYSTEM:
        toks = [json.loads(t) for t in re.findall(r"^\d+\t(.*)$", user, re.M)]
        return "Here you go:\n" + json.dumps([10 if pred(t) else 0 for t in toks])
    if system == prompts.SPECIFICITY_SYSTEM:
        text = user.split("Text:\n", 1)[1]
        if all(pred(w) for s in _spans(text) for w in _words(s)):
            return "3"
        return "Rating: 1" if any(pred(w) for w in _words(text)) else "0"
    raise AssertionError(f"unexpected prompt: {system[:80]}")


class FakeLLM:
    """The members of monoscope.interp.llm.LLM the pipeline uses, answering from a Python function."""

    def __init__(self, answer: Callable[[Sequence[Any]], str | None] = competent,
                 model_name: str = "fake-competent") -> None:
        self.answer = answer
        self.model_name = model_name
        self.calls = 0
        self.batches: list[str | None] = []
        self.usage = {"requests": 0}

    def chat_many(self, reqs: Sequence[ChatRequest], *, progress: str | None = None) -> list[ChatResponse]:
        self.batches.append(progress)
        out = []
        for r in reqs:
            assert isinstance(r, ChatRequest) and r.max_tokens > 0
            self.calls += 1
            try:
                text = self.answer(list(r.messages))
            except Exception as e:  # a failing fake is a failed request, like the real client
                out.append(ChatResponse(text=None, error=f"fake: {e}"))
                continue
            out.append(ChatResponse(text=None, error="HTTP 500: fake server error") if text is None
                       else ChatResponse(text=text))
        self.usage["requests"] = self.calls
        return out


# ---------------------------------------------------------------------------------------------- tests
def test_marks_hash_and_parsers() -> None:
    assert mark([" In", " 1", "9", "8", "4", " we", "\n"], [1, 2, 3, 4]) == " In <<1984>> we⏎"
    ev = Evidence(0, 10.0, explain=[Context((" a", " 7"), (0.0, 5.0), 1, "top", 0, 5.0, 1)])
    text = format_explain_evidence(ev)
    assert "<<7>>" in text and '" 7" 5' in text and "max 5" in text
    assert evidence_sha256(text) == evidence_sha256(format_explain_evidence(ev))
    ev2 = Evidence(0, 10.0, explain=[Context((" a", " 7"), (0.0, 9.0), 1, "top", 0, 9.0, 1)])
    assert evidence_sha256(format_explain_evidence(ev2)) != evidence_sha256(text)

    assert parse_explanation("blah\nExplanation: digits in dates.") == "digits in dates"
    assert parse_explanation("<think>hmm\nExplanation: no</think>\n\"numbers\"") == "numbers"
    assert parse_explanation("**Explanation:**\nFrench words") == "French words"
    assert parse_explanation('The feature detects the word "IO" in the excerpts. Explanation: The feature is detecting '
                             'the word "IO" in the text excerpts, which is a common abbreviation') == \
        'the word "IO" in the excerpts'
    assert parse_explanation("Sure. Explanation: opening brackets of Markdown links.") == \
        "opening brackets of Markdown links"
    assert parse_explanation("The feature detects Python imports") == "Python imports"
    assert parse_explanation("The feature detects commas") == "The feature detects commas"  # nothing left
    assert parse_explanation('The feature detects "IO" (6), "TY" (1)') == 'The feature detects "IO" (6), "TY" (1)'
    assert parse_explanation("") is None and parse_explanation("...\n  \n") is None and parse_explanation(None) is None
    assert len(parse_explanation("word " * 200) or "") <= prompts.MAX_EXPLANATION_CHARS

    assert parse_number_list("Sure! [1, 0, 1]", 3, 0, 1) == [1, 0, 1]
    assert parse_number_list("```json\n[true, false,]\n```", 2, 0, 1) == [1, 0]
    assert parse_number_list("1 0 0", 3, 0, 1) == [1, 0, 0]
    assert parse_number_list("[3, 12, -1]", 3, 0, 10) == [3, 10, 0]
    assert parse_number_list("[1, 0]", 3, 0, 1) is None and parse_number_list("no idea", 2, 0, 1) is None
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auroc([0.1], [0.9]) == 0.0 and auroc([0.5], [0.5]) == 0.5


def test_evidence_split_and_non_activating(db: FeatureDB) -> None:
    ev = evidence(db, 0)
    assert len(ev.explain) == 20 and sum(c.kind == "top" for c in ev.explain) == 10
    assert {c.bin for c in ev.explain if c.kind == "quantile"} == set(range(10))
    assert not {c.context for c in ev.explain} & {c.context for c in ev.held_out}  # held out = never shown
    assert len(ev.held_out) == 20 and all(c.active() for c in ev.held_out)
    assert ev.negatives and all(not any(c.acts) and c.kind == "negative" for c in ev.negatives)
    own = {c.context for c in ev.explain + ev.held_out}
    assert not own & {c.context for c in ev.negatives}  # context 7 is feature 0's own: never non-activating
    assert all(c.context >= 1000 for c in ev.negatives)
    db.update_features("cooccur", [(0, [[1, 0.5]])])  # feature 1 co-occurs: its windows are excluded too
    ev = evidence(db, 0)
    assert ev.negatives and all(c.context >= 2000 for c in ev.negatives)


def test_llm_scorers_separate_right_from_wrong(db: FeatureDB) -> None:
    ev = evidence(db, 0)
    items = [(ev, "digits and numbers"), (ev, "French words")]
    llm = FakeLLM()
    det = score_detection(items, llm, progress=False)
    fuz = score_fuzzing(items, llm, progress=False)
    sim = score_simulation(items, llm, progress=False)
    spec = score_specificity(items, llm, progress=False)
    assert llm.batches == [None] * 4  # one batch per scorer
    for name, (right, wrong), gap in [("detection", det, 0.4), ("fuzzing", fuz, 0.4), ("simulation", sim, 0.5),
                                      ("specificity", spec, 2.0)]:
        assert right.value is not None and wrong.value is not None, (name, right, wrong)
        assert right.value - wrong.value >= gap, (name, right.value, wrong.value)
    assert det[0].value == 1.0 and det[0].details["activating"] == 10 and det[0].details["non_activating"] == 10
    assert fuz[0].value == 1.0 and fuz[0].details["mismarked"] == 5
    assert sim[0].value is not None and sim[0].value > 0.8 and spec[0].value == 3.0 and spec[1].value == 0.0
    assert spec[0].details["share_2_or_3"] == 1.0 and len(spec[0].details["ratings"]) == 10
    assert det[0].details["held_out"] is True


def test_embedding_scorer_with_minilm(db: FeatureDB) -> None:
    ev = evidence(db, 0)
    right, wrong = score_embedding([(ev, "numbers and digits"), (ev, "French words")])
    assert right.value is not None and wrong.value is not None
    assert right.value > 0.8 and wrong.value < 0.5 and right.value - wrong.value > 0.4
    assert right.details["mean_cos_activating"] > right.details["mean_cos_non_activating"]
    assert right.details["embedder"] == "all-MiniLM-L6-v2"


def test_malformed_answers_are_failures(db: FeatureDB) -> None:
    ev = evidence(db, 0)
    items = [(ev, "digits and numbers")]
    every = (score_detection, score_fuzzing, score_simulation, score_specificity)
    cases: list[tuple[str | None, Sequence[Callable[..., list[ScoreResult]]]]] = [
        ("I am not sure what you mean.", every), (None, every), ("", every), ("yes, definitely", every),
        ("[1, 0", every[:3]), ("[[1, 0, 1]", every[:3])]
    for answer, scorers in cases:
        llm = FakeLLM(lambda m, a=answer: a)  # type: ignore[misc]
        for scorer in scorers:
            (r,) = scorer(items, llm, progress=False)
            assert isinstance(r, ScoreResult) and r.value is None and r.details["error"], (answer, scorer, r)
            assert ("HTTP 500" in r.details["error"]) if answer is None else \
                (r.details["error"].startswith("no usable answer") and (not answer or r.details["unusable_answers"]))
    # one unusable batch costs only its excerpts
    seen = {"n": 0}

    def flaky(messages: Sequence[Any]) -> str | None:
        seen["n"] += 1
        return "garbage" if seen["n"] == 1 else competent(messages)

    (r,) = score_detection(items, FakeLLM(flaky), progress=False, method="text")
    assert r.value == 1.0 and r.details["failed_requests"] == 1 and r.details["unanswered"] == 5
    seen["n"] = 0  # one excerpt per request (method logprob, here without log-probabilities): one excerpt lost
    (r,) = score_detection(items, FakeLLM(flaky), progress=False)
    assert r.value == 1.0 and r.details["failed_requests"] == 1 and r.details["unanswered"] == 1
    # nothing to compare against: a failure, not a crash
    bare = Evidence(5, 1.0)
    assert all(s([(bare, "x")], FakeLLM(), progress=False)[0].value is None
               for s in (score_detection, score_fuzzing, score_simulation, score_specificity))
