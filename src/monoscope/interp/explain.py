"""`explain_features`: an LLM writes an explanation of each feature, and scorers measure how well it predicts it.

    res = explain_features("runs/x/sae", "openai:gpt-4o-mini", features=20)         # 20 most interesting
    res = explain_features("runs/x/sae", "local:/models/qwen", features=[3, 17, 42], scorers=["detection"])

Everything comes from the feature database (`monoscope features` built it; no model or SAE weights needed)
and goes back into it: `explanations(feature, model, prompt_version, evidence_sha256, text)` and
`scores(feature, model, scorer, value, details JSON)`, where model is the explaining LLM's name. Explanations
are also indexed in `labels_fts` so they can be searched. When SAE_DIR exists, the database must have been
built for its weights (`features.db.open_for_sae`). A rebuilt database (`monoscope features --overwrite`)
keeps the explanations and scores whose evidence is unchanged (`carry_over`).

Stages, each one `chat_many` batch over all features (the client bounds concurrency, caches and retries):
1. evidence: top and quantile-sampled examples, half shown to the explainer, half held out for scoring
   (prompts.py), plus non-activating contexts (below);
2. explain: one request per feature; the answer is parsed tolerantly, an unusable one is a failure
   (reported, not stored);
3. one stage per scorer (scorers.py); a failed score is stored with value NULL and details["error"].

Reruns are idempotent: an explanation is reused while the evidence it was written from is unchanged
(same evidence_sha256 for this model and PROMPT_VERSION), and a score is reused while its key (prompt
version, scorer settings, explanation, evidence) is unchanged and it did not fail. A second identical run
asks the LLM nothing.

Non-activating contexts. The database holds example windows, not the corpus, so "contexts where the feature
does not fire" are other features' example windows (quantile samples first: typical text, not the extremes)
from a fixed pseudo-random sample of up to 256 features (1024 windows), minus any window whose context id is among this
feature's own examples, and minus windows of features that co-occur with it (its `cooccur` list, P >= 5 %),
which would often contain it. These are presumed non-activating: the examples are a sample, so a window can
still hold a firing that was not kept; the error is small for sparse features and biases scores down, not up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monoscope import __version__
from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB, open_for_sae
from monoscope.features.tokens import Vocab
from monoscope.interp.prompts import (
    EXPLAIN_STYLES,
    PROMPT_VERSION,
    Context,
    Evidence,
    contexts_sha256,
    evidence_sha256,
    parse_explanation,
    style_evidence,
    style_max_tokens,
    style_messages,
    style_version,
    with_frequent_tokens,
)
from monoscope.interp.scorers import (
    ALL_SCORERS,
    DEFAULT_CLASSIFY_METHOD,
    INTERVENTION_STRENGTH,
    SCORER_NAMES,
    SCORERS,
    LLMLike,
    ScoreResult,
)
from monoscope.locking import locks_folders

DEFAULT_FEATURES = 20
EXPLAIN_TOP = 10  # top examples shown to the explainer (the even ranks)
EXPLAIN_QUANTILE = 10  # quantile samples shown (one per decile, strongest first)
N_NEGATIVES = 20  # non-activating contexts kept per feature
POOL_FEATURES = 256  # features whose windows make the non-activating pool
POOL_WINDOWS = 1024  # windows in that pool (at least POOL_PER_FEATURE from each feature)
POOL_PER_FEATURE = 4
COOCCUR_EXCLUDE = 0.05  # co-occurring features at or above this P(j|i) give no non-activating windows
LLM_CACHE_NAME = "llm_cache.sqlite"  # beside the database: answers survive a killed run, a rerun costs nothing


@dataclass
class ExplainResult:
    db_path: Path
    model: str
    prompt_version: str
    features: list[int]
    explanations: dict[int, str] = field(default_factory=dict)
    explain_failures: dict[int, str] = field(default_factory=dict)
    explanations_reused: int = 0
    scores: dict[str, dict[int, ScoreResult]] = field(default_factory=dict)
    scores_reused: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    usage: Any = None
    endpoint: str | None = None
    """Where the requests went (the LLM's `where`), for messages."""

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per scorer: features scored, failures, and mean / quartiles of the values that exist."""
        out: dict[str, dict[str, float | int | None]] = {}
        for name, per in self.scores.items():
            vals = np.array([r.value for r in per.values() if r.value is not None], dtype=np.float64)
            q = np.quantile(vals, [0.25, 0.5, 0.75]) if len(vals) else [None] * 3
            out[name] = {"n": len(per), "failures": len(per) - len(vals),
                         "mean": float(vals.mean()) if len(vals) else None,
                         "q25": _f(q[0]), "median": _f(q[1]), "q75": _f(q[2])}
        return out


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


# ---------------------------------------------------------------------------------------------- arguments
def parse_features(value: int | str | Sequence[int] | None) -> int | list[int]:
    """`20` (or "20") = the 20 most interesting; "3,17,42" or [3, 17, 42] = those ids ("20," = feature 20)."""
    if value is None:
        return DEFAULT_FEATURES
    if isinstance(value, bool):
        raise MonoscopeError(f"--features {value!r}: pass a count (20) or feature ids (3,17,42)")
    if isinstance(value, int | np.integer):
        n = int(value)
        if n <= 0:
            raise MonoscopeError(f"--features {n}: pass a positive count, or ids like 3,17,42 (one id: {n},)")
        return n
    if isinstance(value, str):
        s = value.strip()
        if "," not in s:
            try:
                return parse_features(int(s))
            except ValueError:
                raise MonoscopeError(f"--features {value!r} is neither a count (20) nor feature ids "
                                     "(3,17,42)") from None
        parts: list[Any] = [p.strip() for p in s.split(",") if p.strip()]
    else:
        parts = list(value)
    ids: list[int] = []
    for p in parts:
        try:
            if isinstance(p, bool | float):
                raise ValueError
            i = int(p)
        except (TypeError, ValueError):
            raise MonoscopeError(f"--features: {p!r} is not a feature id; pass ids like 3,17,42") from None
        if i < 0:
            raise MonoscopeError(f"--features: feature id {i} is negative; ids start at 0")
        if i not in ids:
            ids.append(i)
    if not ids:
        raise MonoscopeError(f"--features {value!r} names no feature: pass a count (20) or ids (3,17,42)")
    return ids


def parse_scorers(value: str | Sequence[str] | None) -> list[str]:
    """"detection,fuzzing" or a list; None = the default five (SCORER_NAMES); "all" = those and the optional
    intruder and intervention; "none" or "" = explanations only."""
    if value is None:
        return list(SCORER_NAMES)
    names = [s.strip().lower() for s in (value.split(",") if isinstance(value, str) else value) if s.strip()]
    if names == ["all"]:
        return list(ALL_SCORERS)
    if names in ([], ["none"]):
        return []
    bad = [n for n in names if n not in SCORERS]
    if bad:
        raise MonoscopeError(f"unknown scorer {bad[0]!r}: choose from {','.join(ALL_SCORERS)} (or all, none)")
    return [n for n in ALL_SCORERS if n in names]


def _select(db: FeatureDB, features: int | list[int], where: Path) -> list[int]:
    if isinstance(features, int):
        rows = db.most_interesting(features, with_examples=True)
        if not rows:
            raise MonoscopeError(f"{where} has no feature with examples: run monoscope features on more tokens")
        return [r["id"] for r in rows]
    n = db.n_features()
    have = db.feature_ids(features)
    for i in features:
        if i not in have:
            rng = f"0 to {n - 1}" if n else "none"
            raise MonoscopeError(f"feature {i} is not in {where} (features {rng}): pass ids that exist")
    return features


# ---------------------------------------------------------------------------------------------- evidence
def _context(ex: dict[str, Any], kind: str, vocab: Vocab) -> Context:
    n = min(len(ex["tokens"]), len(ex["acts"]))
    keep = ex["tokens"][:n] >= 0  # negative ids are padding (only ever at the end of a window)
    toks, acts = ex["tokens"][:n][keep], ex["acts"][:n][keep]
    texts, folded, pos = vocab.window(toks, acts, int(min(max(ex["position"], 0), max(len(toks) - 1, 0))))
    return Context(tuple(texts), tuple(folded), int(ex["context"]), kind, int(ex["bin"]), float(ex["act"]), pos)


def _negative_pool(db: FeatureDB, vocab: Vocab | Sequence[str]) -> list[tuple[int, Context]]:
    """(source feature, window) pairs from a fixed sample of features: the candidates for non-activating."""
    vocab = vocab if isinstance(vocab, Vocab) else Vocab(vocab)
    fids = db.features_with_examples()
    if len(fids) > POOL_FEATURES:
        fids = sorted(np.random.default_rng(0).choice(fids, POOL_FEATURES, replace=False).tolist())
    pool: list[tuple[int, Context]] = []
    seen: set[int] = set()
    per = max(POOL_PER_FEATURE, -(-POOL_WINDOWS // max(len(fids), 1)))
    for f in fids:
        exs = db.examples(f, "quantile") + db.examples(f, "top")
        step = max(1, len(exs) // per)
        for ex in exs[::step][:per]:
            if int(ex["context"]) in seen:
                continue
            seen.add(int(ex["context"]))
            c = _context(ex, "negative", vocab)
            pool.append((f, Context(c.tokens, (0.0,) * len(c.tokens), c.context, "negative")))
    return pool


def load_evidence(db: FeatureDB, fid: int, vocab: Vocab | Sequence[str],
                  pool: Sequence[tuple[int, Context]]) -> Evidence:
    """The explainer's contexts (top examples of even rank + one quantile sample per decile from the even
    half of each decile), the rest as held out (a context shown is never held out), and non-activating ones."""
    vocab = vocab if isinstance(vocab, Vocab) else Vocab(vocab)
    feat = db.feature(fid) or {}
    tops = db.examples(fid, "top")
    quants = db.examples(fid, "quantile")
    max_act = feat.get("max_act")
    if max_act is None or not math.isfinite(max_act) or max_act <= 0:
        max_act = max([float(e["act"]) for e in tops + quants] + [0.0])
    shown = [_context(e, "top", vocab) for e in tops[::2][:EXPLAIN_TOP]]
    by_bin: dict[int, list[dict[str, Any]]] = {}
    for e in quants:  # ordered bin DESC, rank
        by_bin.setdefault(int(e["bin"]), []).append(e)
    q_shown: list[Context] = []
    for depth in range(0, max((len(v) for v in by_bin.values()), default=0), 2):
        q_shown += [_context(v[depth], "quantile", vocab) for v in by_bin.values() if depth < len(v)]
    shown += q_shown[:EXPLAIN_QUANTILE]
    used = {c.context for c in shown}
    held: list[Context] = []
    for e, kind in [(e, "top") for e in tops] + [(e, "quantile") for e in quants]:
        if int(e["context"]) not in used:
            used.add(int(e["context"]))
            held.append(_context(e, kind, vocab))
    own = {int(e["context"]) for e in tops + quants}
    cooc = {int(j) for j, p in (feat.get("cooccur") or []) if p >= COOCCUR_EXCLUDE}
    cands = [c for f, c in pool if f != fid and f not in cooc and c.context not in own]
    order = np.random.default_rng([3, fid]).permutation(len(cands))[:N_NEGATIVES]
    return Evidence(fid, float(max_act), shown, held, [cands[i] for i in sorted(order.tolist())])


# ---------------------------------------------------------------------------------------------- the run
def _score_key(scorer: str, explanation: str, ev: Evidence, *settings: Any, version: str = PROMPT_VERSION) -> str:
    """Identity of a score: the evidence, prompts, explanation and (intervention) the steering settings."""
    return contexts_sha256(ev.explain + ev.held_out + ev.negatives, version, scorer, explanation,
                           ev.max_act, *settings)


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _db_folder(sae_dir: str | Path, db_path: str | Path | None) -> Path:
    """The folder explain writes into (its database's), locked against a features pass or another explain."""
    from monoscope.features.show import default_db_path

    if db_path is None:
        return default_db_path(sae_dir).parent
    return Path(db_path) if Path(db_path).is_dir() else Path(db_path).parent


@locks_folders(lambda a: [_db_folder(a["sae_dir"], a["db_path"])], "explain")
def explain_features(sae_dir: str | Path, llm_spec: str | LLMLike, *, endpoint: str | None = None,
                     features: int | str | Sequence[int] | None = DEFAULT_FEATURES,
                     scorers: str | Sequence[str] | None = SCORER_NAMES, db_path: str | Path | None = None,
                     progress: bool = True, max_concurrency: int = 4, cache: Path | bool = True,
                     timeout_s: float | None = None, retries: int | None = None, target: Any = None,
                     model: str | None = None, device: str = "auto",
                     steer_strength: str | float = INTERVENTION_STRENGTH,
                     scorer_options: dict[str, dict[str, Any]] | None = None,
                     style: str | None = None, n_threads: int | None = None) -> ExplainResult:
    """Explain and score `features` of the SAE whose database is at `db_path` (default: beside `sae_dir`).

    `llm_spec` is "openai:MODEL" or "local:PATH" (opened with monoscope.interp.llm.open_llm; answers cached in
    llm_cache.sqlite beside the database, or in `cache`, or nowhere with cache=False), or an already open LLM
    (used, not closed). timeout_s, retries: per attempt and per request (default: open_llm's). An endpoint that
    stops answering (the LLM's `stalled`) ends the call with a MonoscopeError once what was answered is stored.
    The intervention scorer steers the SAE's model: `target` (a monoscope.steer Target) or one opened from
    `sae_dir` (`model`, `device`), before any LLM request; `steer_strength` is its clamp ("4x" = 4 x max_act).
    `scorer_options` passes keyword arguments to a scorer by name (e.g. {"intruder": {"n_trials": 10}}).
    `style`: the explainer prompt, "full" or "compact" (prompts.format_compact_evidence: ~400 tokens instead of
    ~1,400, written for small local models); None = `default_style` (full for endpoints and Qwen2.5-Coder-1.5B,
    compact for smaller local models). Explanations and
    scores are stored under the style's prompt version, so both styles can live in one database.
    `n_threads`: CPU threads of a `local:` model (default `llm.default_threads()`).
    """
    names = parse_scorers(scorers)
    if style is not None and style not in EXPLAIN_STYLES:
        raise MonoscopeError(f"--prompt {style!r}: use one of {', '.join(EXPLAIN_STYLES)}")
    want = parse_features(features)
    t0 = time.perf_counter()
    with open_for_sae(sae_dir, db_path) as db, contextlib.ExitStack() as stack:
        path = db.path
        options: dict[str, dict[str, Any]] = {}
        if "intervention" in names:
            if target is None:
                from monoscope.steer.target import open_target

                target = open_target(sae_dir, model=model, device=device, db=path)
            options["intervention"] = {"target": target, "strength": steer_strength}
        for name, kw in (scorer_options or {}).items():
            if name not in names:
                raise MonoscopeError(f"scorer_options names {name!r}, which is not among the scorers run: "
                                     f"{','.join(names) or 'none'}")
            options[name] = {**options.get(name, {}), **kw}
        fids = _select(db, want, path)
        vocab = Vocab(db.vocab(), db.vocab_bytes())
        pool = _negative_pool(db, vocab)
        evidence = {f: load_evidence(db, f, vocab, pool) for f in fids}
        if isinstance(llm_spec, str):
            from monoscope.interp.llm import open_llm

            cache_path = cache if isinstance(cache, Path) else (path.parent / LLM_CACHE_NAME if cache else None)
            limits: dict[str, Any] = {}
            if timeout_s is not None:
                limits["timeout_s"] = timeout_s
            if retries is not None:
                limits["retries"] = retries
            llm: LLMLike = stack.enter_context(open_llm(llm_spec, endpoint=endpoint, cache=cache_path,
                                                        max_concurrency=max_concurrency, n_threads=n_threads,
                                                        **limits))
        else:
            llm = llm_spec
        style = default_style(llm_spec, llm) if style is None else style
        model = str(llm.model_name)
        res = ExplainResult(path, model, style_version(style), fids, endpoint=getattr(llm, "where", None))
        res.seconds["evidence"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _explain_stage(db, llm, res, evidence, progress, style)
        res.explanations = {f: res.explanations[f] for f in fids if f in res.explanations}
        res.seconds["explain"] = time.perf_counter() - t0
        _stop_if_stalled(llm, res, "explanations")
        items = [(evidence[f], res.explanations[f]) for f in fids if f in res.explanations]
        for name in names:
            t0 = time.perf_counter()
            _score_stage(db, llm, res, name, items, progress, options.get(name, {}))
            res.seconds[name] = time.perf_counter() - t0
            _stop_if_stalled(llm, res, f"{name} scores")
        res.usage = getattr(llm, "usage", None)
    return res


def _stop_if_stalled(llm: LLMLike, res: ExplainResult, stage: str) -> None:
    """After a stage has stored its answers: a stalled endpoint (see monoscope.interp.llm.LLM) ends the run."""
    stalled = getattr(llm, "stalled", None)
    if stalled:
        raise MonoscopeError(
            f"stopped during {stage}: {stalled}; {len(res.explanations)} of {len(res.features)} features explained "
            "so far are stored: check that the server answers (or raise --timeout), then run the same command again"
        )


def check_explained(res: ExplainResult) -> None:
    """A run in which every explanation request failed is an error naming the last failure (the caller exits
    non-zero); features that were skipped for lack of examples or reused from earlier runs do not count."""
    sent = {f: e for f, e in res.explain_failures.items() if not e.startswith("no examples")}
    if res.explanations or not sent:
        return
    last = list(sent.values())[-1]
    at = f" at {res.endpoint}" if res.endpoint else ""
    raise MonoscopeError(f"all {len(sent)} explanation requests to {res.model}{at} failed (last: {last}): check "
                         "--llm and --endpoint, and that the server is up")


def default_style(llm_spec: str | LLMLike, llm: LLMLike | None = None) -> str:
    """Full prompts for endpoints, and for a local model that reads them well (`models.LocalModel.prompt`:
    Qwen2.5-Coder-1.5B's explanations scored 0.705 in detection with the full prompt against 0.65 with the
    compact one; README, local explainers); compact ones for the other local models (a CPU reads ~1,400 prompt
    tokens slowly, and small models echo them). `llm`, once open, names the local file (`llm_spec` "local:default"
    does not); without it a local spec gets the compact prompt."""
    from monoscope.interp.models import prompt_style

    if isinstance(llm_spec, str):
        if not llm_spec.startswith("local:"):
            return "full"
    elif llm is None:
        llm = llm_spec
    if llm is None:
        return "compact"
    # an open LLM: a local one (its server runs here) by its file, one behind an endpoint gets the full prompt
    return "full" if getattr(llm, "server", None) is None else prompt_style(str(llm.model_name))


def _explain_stage(db: FeatureDB, llm: LLMLike, res: ExplainResult, evidence: dict[int, Evidence],
                   progress: bool, style: str = "full") -> None:
    from monoscope.interp.llm import ChatRequest

    todo: list[tuple[int, str, str]] = []
    for f, ev in evidence.items():
        if not ev.explain:
            res.explain_failures[f] = "no examples in the database (the feature did not fire in the pass)"
            continue
        text = style_evidence(ev, style)
        sha = evidence_sha256(text)
        row = db.explanation(f, res.model, res.prompt_version)
        if row is not None and row[0] == sha:
            res.explanations[f] = row[1]
            res.explanations_reused += 1
        else:
            todo.append((f, text, sha))
    if not todo:
        return
    reqs = [ChatRequest(messages=style_messages(evidence[f], style, text), max_tokens=style_max_tokens(style))
            for f, text, _ in todo]
    resps = llm.chat_many(reqs, progress="explain" if progress else None)
    rows: list[tuple[int, str, str]] = []
    for (f, _, sha), r in zip(todo, resps, strict=True):
        expl = parse_explanation(r.text) if r.text else None
        if expl is None:
            res.explain_failures[f] = str(r.error) if r.error else f"unusable answer: {str(r.text)[:120]!r}"
        else:
            expl = res.explanations[f] = with_frequent_tokens(expl, evidence[f])
            rows.append((f, sha, expl))
    with db.transaction():
        db.put_explanations(res.model, res.prompt_version, rows, f"monoscope {__version__}")


def _settings(name: str, options: dict[str, Any]) -> list[Any]:
    """What besides the evidence shapes a score (part of its key): the scorer's options (intervention: also the
    model it steers)."""
    if name in ("detection", "fuzzing"):  # the method always counts: log-prob and text scores are not comparable
        return [json.dumps({"method": DEFAULT_CLASSIFY_METHOD, **options}, sort_keys=True, default=str)]
    if name != "intervention":
        return [json.dumps(options, sort_keys=True, default=str)] if options else []
    t = options.get("target")
    rest = {k: v for k, v in options.items() if k != "target"}
    return [getattr(getattr(t, "lm", None), "model_id", None), str(getattr(t, "sae_dir", "")),
            json.dumps(rest, sort_keys=True, default=str)]


def _score_stage(db: FeatureDB, llm: LLMLike, res: ExplainResult, name: str,
                 items: Sequence[tuple[Evidence, str]], progress: bool, options: dict[str, Any] | None = None) -> None:
    options = options or {}
    settings = _settings(name, options)
    per: dict[int, ScoreResult] = {}
    todo: list[tuple[Evidence, str]] = []
    keys: dict[int, str] = {}
    for ev, expl in items:
        key = keys[ev.feature] = _score_key(name, expl, ev, *settings, version=res.prompt_version)
        row = db.score(ev.feature, res.model, name)
        details = _load_json(row[1]) if row is not None else None
        if row is not None and row[0] is not None and isinstance(details, dict) and details.get("key") == key:
            per[ev.feature] = ScoreResult(float(row[0]), details)
        else:
            todo.append((ev, expl))
    res.scores_reused[name] = len(per)
    fresh = SCORERS[name](todo, llm, progress=progress, **options) if todo else []
    stored = []
    for (ev, expl), r in zip(todo, fresh, strict=True):
        value = r.value if r.value is None or math.isfinite(r.value) else None
        details = {**r.details, "key": keys[ev.feature], "settings": settings, "prompt_version": res.prompt_version,
                   "explanation_sha256": _sha(expl)}
        if value is None and "error" not in details:
            details["error"] = "score is not a number"
        stored.append((ev.feature, res.model, name, value, json.dumps(details, ensure_ascii=False)))
        per[ev.feature] = ScoreResult(value, details)
    with db.transaction():
        db.put_scores(stored)
    res.scores[name] = {f: per[f] for f in res.features if f in per}


def _load_json(s: str | None) -> Any:
    try:
        return json.loads(s) if s else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- a rebuilt database
def carry_over(src: FeatureDB, dst: FeatureDB, archive: Path | None = None) -> tuple[int, int, int]:
    """Copy into `dst` (a rebuilt database of the same SAE) the explanations of `src` whose evidence, loaded
    from `dst` exactly as `explain` loads it, has the same hash, and those explanations' scores whose key
    (evidence, held-out and non-activating contexts, prompt version, the scorer's recorded settings) is also
    unchanged: paid LLM work that is still valid survives a rebuild. What cannot be carried (evidence changed,
    an unknown prompt version, a score whose key no longer matches) is paid work too: it is appended to `archive`
    (JSON lines, one per explanation or score, with the reason) rather than lost. Returns (explanations kept,
    scores kept, explanations dropped)."""
    styles = {style_version(s): s for s in EXPLAIN_STYLES}
    rows = src.all_explanations()
    if not rows:
        return 0, 0, 0
    vocab = Vocab(dst.vocab(), dst.vocab_bytes())
    pool = _negative_pool(dst, vocab)
    evidence: dict[int, Evidence] = {}
    kept: dict[tuple[int, str], tuple[str, str]] = {}  # (feature, model) -> (explanation text, version)
    keep_rows: list[tuple[int, str, str, str, str, str | None]] = []
    lost: list[dict[str, Any]] = []
    dropped = 0
    have = dst.feature_ids(sorted({int(r[0]) for r in rows}))
    for f, model, version, sha, text, created_by in rows:
        why = None
        if version not in styles:
            why = f"prompt version {version} (this monoscope reads {', '.join(sorted(styles))})"
        elif f not in have:
            why = "the feature is not in the rebuilt database"
        else:
            ev = evidence.get(f) or evidence.setdefault(f, load_evidence(dst, f, vocab, pool))
            if not ev.explain or evidence_sha256(style_evidence(ev, styles[version])) != sha:
                why = "its evidence (top contexts) changed"
        if why is not None:
            dropped += 1
            lost.append({"kind": "explanation", "feature": int(f), "model": model, "prompt_version": version,
                         "evidence_sha256": sha, "text": text, "created_by": created_by, "reason": why})
            continue
        kept[(f, model)] = (text, version)
        keep_rows.append((f, model, version, sha, text, created_by))
    scores = []
    for f, model, scorer, value, details in src.all_scores():
        got = kept.get((int(f), model))
        d = _load_json(details)
        settings = d.get("settings", []) if isinstance(d, dict) else []
        if (got is not None and isinstance(d, dict) and isinstance(settings, list)
                and d.get("key") == _score_key(scorer, got[0], evidence[int(f)], *settings, version=got[1])):
            scores.append((int(f), model, scorer, value, details))
        else:
            lost.append({"kind": "score", "feature": int(f), "model": model, "scorer": scorer, "value": value,
                         "details": d if d is not None else details,
                         "reason": "its explanation was not carried over" if got is None else
                         "its evidence or settings changed"})
    if lost and archive is not None:
        _append_archive(archive, lost)
    with dst.transaction():
        for f, model, version, sha, text, created_by in keep_rows:
            dst.put_explanations(model, version, [(f, sha, text)], created_by or f"monoscope {__version__}")
        dst.put_scores(scores)
    return len(keep_rows), len(scores), dropped


def _append_archive(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append to a JSON-lines archive atomically (old lines + new ones written to a temp file and renamed), so a
    kill leaves either the old archive or the new one, never half a line."""
    from monoscope.fileio import write_bytes_atomic

    old = path.read_bytes() if path.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    new = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows).encode("utf-8")
    write_bytes_atomic(path, old + new)
