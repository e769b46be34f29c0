"""`audit`: for every concept pack, the features an SAE has for the concept, found by several routes, ranked,
each with the evidence an auditor needs; written as `report.json` and a self-contained `report.html`.

    from monoscope.search.audit import audit
    res = audit("runs/default/sae", packs="all", out="runs/default/audit", steer_top=1)
    res.summary["n_with_auroc"], [(p.name, p.candidates[0].feature, p.candidates[0].auroc) for p in res.packs]

Routes per pack (each candidate records which found it and at what rank):
- contrast:   the features whose per-text maximum best separates the pack's positives from its negatives (AUROC,
              Mann-Whitney p, Benjamini-Hochberg q over all features; `monoscope search --pack`);
- text:       the features that fire on each positive text, ranked by activation relative to their own maximum
              (`monoscope search TEXT`, density <= 1e-2), voted over the positives;
- labels:     the features whose label or explanation fits the concept's name (FTS5 + MiniLM, fused);
- neighbours: the decoder-cosine neighbours of the top contrast candidates (stored by the features pass);
- attribution: the features that most help the model *predict* the positive texts rather than their negatives:
              gradient x activation of each text's log-likelihood (`steer.attribute.text_attribution`), mean over
              the first `attribution_texts` positives minus the mean over as many negatives. A pack defines no
              target token, so the text itself is the target; this finds features that act on the output, where
              the other routes find features that fire (`monoscope search --attribution` does one prompt and token).

Candidates are ranked by their AUROC on the pack (measured, whatever route found them), then by how many routes
found them; the best of every route is kept so a reader sees what each route offers. For the top `steer_top`
candidates of each pack the steering effect is measured with `steer_eval` (dose-response with a random feature of
matched density and a random direction as controls) on a few neutral prompts: CPU-expensive, hence bounded, and
`steer_top=0` skips it (the report says so). Multilingual consistency is measured where parallel text exists for
the concept (CLDR names of countries for the countries pack, of cities for the cities pack).

Texts longer than the database's contexts are read in full with a warning naming the file and line (a pack's matched
texts often differ only at their end); texts longer than the model's context are cut to it, with a warning; texts
the tokenizer does not reproduce are warned about.
Each pack's result is saved in `OUT/packs/NAME.json` as soon as it is done (keyed by the SAE, the database, the
pack and the settings), so a killed audit resumes and a rerun with nothing changed recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monoscope.errors import MonoscopeError
from monoscope.fileio import write_bytes_atomic
from monoscope.search.text import Searcher, SearchError

FORMAT = "monoscope-audit/1"
CAVEAT = ("A feature's existence shows that the model represents a concept, not that it acts on it. A high AUROC "
          "says the feature separates these texts; only the measured steering effect (and its controls) says "
          "whether pushing the feature changes what the model writes, and even that is evidence on a few prompts.")
ROUTES = ("contrast", "text", "labels", "neighbours", "attribution")
AUROC_BAR = 0.8
"""The summary counts packs with a candidate at or above this AUROC."""
MULTILINGUAL_GROUPS = {"countries": "country", "cities": "city"}
"""Packs whose concept has parallel text in `multilingual.parallel_concepts` (its group name)."""
TEXT_MAX_DENSITY = 1e-2


class AuditError(SearchError):
    """An audit a user can fix: no packs, bad settings, an output folder that belongs to another audit."""


@dataclass
class Context:
    """One top-activating context of a feature from the database, as text around the peak token."""

    act: float
    before: str
    token: str
    after: str


@dataclass
class Multilingual:
    concept: str
    """The parallel concept the feature fires for best (e.g. "country France")."""
    n_languages: int
    consistency: float
    """n_languages / languages read."""
    languages: dict[str, float]
    """language -> relative activation on the concept's text in that language."""
    fires_in: list[str]


@dataclass
class Steering:
    """The dose-response of clamping the feature (steer_eval), on the report half of the prompts."""

    factors: list[float]
    chosen_factor: float | None
    target: list[float | None]
    """Mean activation of the feature over the steered continuation (read unsteered), per factor."""
    random_feature: list[float | None]
    random_direction: list[float | None]
    unsteered: float | None
    ppl: list[float | None]
    """Perplexity of the target's steered continuation, per factor."""
    unsteered_ppl: float | None
    effect: float | None
    """target − unsteered at the chosen factor (in activation units)."""
    control_effect: float | None
    """The larger control − unsteered at the chosen factor."""
    n_prompts: int
    path: str
    """steer_eval.json, relative to the audit folder."""


@dataclass
class Candidate:
    feature: int
    rank: int
    auroc: float
    effect_size: float | None
    q: float
    frac_pos: float
    frac_neg: float
    density: float | None
    max_act: float | None
    routes: dict[str, int]
    """route -> rank of the feature in that route."""
    label: str
    explanation: str | None
    explanation_model: str | None
    scores: dict[str, float | None]
    """scorer (and model) -> score of the explanation, as stored in the database."""
    contexts: list[Context]
    multilingual: Multilingual | None = None
    steering: Steering | None = None
    attribution: float | None = None
    """Mean log-likelihood attribution over the positives minus over the negatives (None: not measured)."""


@dataclass
class PackAudit:
    name: str
    version: str
    concept: str
    path: str
    sha256: str
    n_pos: int
    n_neg: int
    n_features: int
    n_significant: int
    """Features with BH q < 0.05 firing more on the positives."""
    candidates: list[Candidate]
    routes: dict[str, str]
    """route -> what it did ("12 candidates", "not applicable: ...")."""
    multilingual: str
    """"measured: ..." or why not."""
    steering: str
    """"measured for the top N" or why not."""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


@dataclass
class AuditResult:
    format: str
    sae: str
    db: str
    model: str
    hook: str
    n_features: int
    settings: dict[str, Any]
    packs: list[PackAudit]
    warnings: list[str]
    summary: dict[str, Any]
    caveat: str
    out: str
    seconds: float
    key: str = ""
    """sha256 of everything the report depends on (SAE, database, packs, settings)."""
    n_reused: int = 0
    """Packs whose saved result was reused."""
    reused: bool = False
    """The finished report was up to date: nothing was computed or written (not in report.json)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("reused")
        return _clean(d)


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------------------------------------- reading texts
def _read_pack_texts(s: Searcher, pack: Any) -> tuple[np.ndarray, np.ndarray, list[str], list[list[int]], np.ndarray]:
    """(max acts of positives [P, F], of negatives [N, F], warnings naming file and line, the token ids as read, their
    labels): texts longer than the
    database's contexts are read in full with a warning, texts longer than the model's context are cut to it, texts
    the tokenizer does not reproduce are warned about."""
    from monoscope.search.multilingual import _mangled

    warnings: list[str] = []
    ctx = s.meta.get("ctx_len")
    ctx = int(ctx) if isinstance(ctx, int) and ctx > 1 else None
    items = list(pack.items)
    texts = [i.text for i in items]
    names = [f"{pack.path} line {i.line}" for i in items]
    ids = _tokenize_unbounded(s, texts, names)

    def more(n: int) -> str:
        return f" ({n - 1} more texts of this pack too)" if n > 1 else ""

    cut = [(k, len(x)) for k, x in enumerate(ids) if len(x) > s.max_len]
    if cut:
        k, n = cut[0]
        warnings.append(f"{names[k]}: the text is {n:,} tokens (BOS included) but {s.lm.model_id} reads at most "
                        f"{s.max_len:,}: only its first {s.max_len:,} tokens are read{more(len(cut))}")
        ids = [x[: s.max_len] for x in ids]
    past = [(k, len(x)) for k, x in enumerate(ids) if ctx is not None and len(x) > ctx]
    if past:  # read in full: a pack's matched texts often differ only at the end (the answer)
        k, n = past[0]
        warnings.append(f"{names[k]}: the text is {n:,} tokens (BOS included), longer than the {ctx}-token contexts "
                        f"the feature database was built on: read in full, but activations after position {ctx} "
                        f"come from positions the SAE's statistics never saw{more(len(past))}")
    bad = [k for k, t in enumerate(texts) if _mangled(s, t)]
    if bad:
        warnings.append(f"{names[bad[0]]}: the tokenizer does not reproduce this text ({len(bad)} of {len(texts)} "
                        "items): activations on text it cannot read may mean little; use a model whose tokenizer "
                        "knows this script")
    acts = np.zeros((len(ids), s.n_features), dtype=np.float32)
    for k, f in s.codes(ids):
        acts[k] = f.max(0).values.numpy()
    lab = np.array([i.label for i in items])
    return acts[lab == 1], acts[lab == 0], warnings, ids, lab


def _tokenize_unbounded(s: Searcher, texts: Sequence[str], names: Sequence[str]) -> list[list[int]]:
    """Searcher.tokenize without its length limit (the audit cuts long texts itself, with a warning)."""
    real, s.max_len = s.max_len, 1 << 40
    try:
        return s.tokenize(texts, names)
    finally:
        s.max_len = real


# ---------------------------------------------------------------------------------------------- routes
def _text_route(s: Searcher, pos: np.ndarray, top: int, per_text: int = 5) -> list[int]:
    """Features ranked by how many positives put them in their top `per_text` by relative activation (density
    <= 1e-2, as `monoscope search TEXT --max-density 1e-2`), then by mean relative activation."""
    rel = np.nan_to_num(s.relative(pos), nan=0.0)
    rel[:, ~s.density_mask(None, TEXT_MAX_DENSITY)] = 0.0
    votes = np.zeros(s.n_features)
    for row in rel:
        best = np.argsort(-row, kind="stable")[:per_text]
        votes[best[row[best] > 0]] += 1
    cand = np.flatnonzero(votes > 0)
    order = cand[np.lexsort((cand, -rel.mean(0)[cand], -votes[cand]))]
    return [int(f) for f in order[:top]]


def _label_route(s: Searcher, concept: str, top: int, mode: str, embedder: Any,
                 warnings: list[str]) -> list[int]:
    from monoscope.search.labels import search_labels

    try:
        hits = search_labels(s.db, concept, top=top, mode=mode, embedder=embedder)
    except (OSError, ImportError) as e:  # MiniLM not installed or not cached: keyword search still works
        warnings.append(f"semantic label search unavailable ({type(e).__name__}: {str(e)[:80]}): keyword only")
        hits = search_labels(s.db, concept, top=top, mode="keyword")
    return [h.feature for h in hits]


def _attribution_route(target: Any, ids: Sequence[Sequence[int]], lab: np.ndarray, n_texts: int,
                       top: int) -> tuple[list[int], np.ndarray | None]:
    """Features ranked by mean text attribution over the first `n_texts` positives minus as many negatives (only
    those with a positive difference), and that difference per feature."""
    import torch

    from monoscope.steer.attribute import text_attribution

    if n_texts == 0:
        return [], None
    pick = [k for k in np.flatnonzero(lab == 1)[:n_texts]] + [k for k in np.flatnonzero(lab == 0)[:n_texts]]
    dev = target.lm.device
    rows = {int(k): text_attribution(target, torch.tensor([list(ids[k])], device=dev)).double().numpy()
            for k in pick if len(ids[k]) >= 2}
    pos = [v for k, v in rows.items() if lab[k] == 1]
    neg = [v for k, v in rows.items() if lab[k] == 0]
    if not pos or not neg:
        return [], None
    diff = np.mean(pos, axis=0) - np.mean(neg, axis=0)
    order = np.lexsort((np.arange(diff.size), -diff))
    return [int(f) for f in order[:top] if diff[f] > 0], diff


def _neighbour_route(s: Searcher, seeds: Sequence[int], per_seed: int = 5) -> list[int]:
    from monoscope.search.contrast import neighbours

    out: list[int] = []
    for f in seeds:
        for nb in neighbours(s.db, int(f), top=per_seed):
            if nb.feature not in out and nb.feature not in seeds:
                out.append(nb.feature)
    return out


# ---------------------------------------------------------------------------------------------- per feature
def _contexts(db: Any, vocab: Any, fid: int, n: int, width: int = 12) -> list[Context]:
    out = []
    for ex in db.examples(fid, "top")[:n]:
        toks = [(i, int(t)) for i, t in enumerate(ex["tokens"]) if t >= 0]
        keep = [i for i, _ in toks]
        pos = keep.index(ex["position"]) if ex["position"] in keep else 0
        acts = [float(ex["acts"][i]) if i < len(ex["acts"]) else 0.0 for i in keep]
        texts, _, p = vocab.window([t for _, t in toks], acts, pos)
        out.append(Context(round(float(ex["act"]), 4), "".join(texts[max(0, p - width): p]), texts[p] if texts else "",
                           "".join(texts[p + 1: p + 1 + width // 2])))
    return out


def _explanation(db: Any, fid: int) -> tuple[str | None, str | None, dict[str, float | None]]:
    row = db.latest_explanation(fid)
    scores: dict[str, float | None] = {}
    for model, scorer, value in db.scores(fid):
        if row is None or model == row["model"]:
            scores[scorer if row is not None else f"{scorer} ({model})"] = _num(value)
    if row is None:
        return None, None, scores
    return str(row["text"]), str(row["model"]), scores


def _multilingual_table(s: Searcher) -> tuple[dict[int, Multilingual], str]:
    """Each feature's best parallel concept (multilingual_search with min_languages 1), and a note."""
    from monoscope.search.multilingual import multilingual_search

    res = multilingual_search(s, min_languages=1, top=s.n_features, n_null=0)
    table = {}
    for h in res.hits:
        table[h.feature] = Multilingual(h.concept, h.n_languages, h.consistency,
                                        {e.language: round(e.rel, 4) for e in h.evidence},
                                        [e.language for e in h.evidence if e.fires])
    note = (f"measured on {len(res.concepts)} parallel concepts in {len(res.languages)} languages "
            f"({', '.join(res.languages)})")
    return table, note + "".join(f"; {n}" for n in res.notes if "by chance" not in n)


def _steer_summary(doc: dict[str, Any], path: str) -> Steering:
    def series(cond: str, metric: str) -> list[float | None]:
        rows = {r["factor"]: r for r in doc["table"] if r["condition"] == cond}
        return [_num(rows[f][metric]["mean"]) if f in rows else None for f in doc["factors"]]

    factors = [float(f) for f in doc["factors"]]
    tgt, rf, rd = series("target", "concept_act"), series("random_feature", "concept_act"), \
        series("random_direction", "concept_act")
    base = _num(doc["unsteered"]["concept_act"]["mean"])
    chosen = doc.get("chosen_factor")
    effect = control = None
    if chosen is not None and base is not None and float(chosen) in factors:
        i = factors.index(float(chosen))
        effect = None if tgt[i] is None else tgt[i] - base  # type: ignore[operator]
        ctl = [v for v in (rf[i], rd[i]) if v is not None]
        control = max(ctl) - base if ctl else None
    return Steering(factors, _num(chosen), tgt, rf, rd, base, series("target", "ppl"),
                    _num(doc["unsteered"]["ppl"]["mean"]), effect, control, len(doc["key"]["prompts"]), path)


# ---------------------------------------------------------------------------------------------- one pack
def _audit_pack(s: Searcher, pack: Any, *, top: int, pool: int, label_mode: str, embedder: Any,
                multilingual: dict[int, Multilingual] | None, ml_note: str, vocab: Any, target: Any = None,
                attribution_texts: int = 0) -> PackAudit:
    from monoscope.search.contrast import benjamini_hochberg, cohens_d, mann_whitney

    t0 = time.perf_counter()
    pos, neg, warnings, ids, lab = _read_pack_texts(s, pack)
    auc, p = mann_whitney(pos, neg)
    q = benjamini_hochberg(p)
    d = cohens_d(pos.astype(np.float64), neg.astype(np.float64))
    dkey = np.nan_to_num(np.abs(d), nan=0.0)
    F = s.n_features
    by_auc = np.lexsort((np.arange(F), -dkey, -auc))
    ranked: dict[str, list[int]] = {"contrast": [int(f) for f in by_auc[:pool]],
                                    "text": _text_route(s, pos, pool)}
    ranked["labels"] = _label_route(s, pack.concept, pool, label_mode, embedder, warnings)
    ranked["neighbours"] = _neighbour_route(s, ranked["contrast"][:3])
    ranked["attribution"], attr = _attribution_route(target, ids, lab, attribution_texts, pool)
    routes = {r: f"{len(ranked[r])} candidates" for r in ROUTES}
    routes["neighbours"] += " (decoder cosine, of the top 3 contrast candidates)"
    n_att = min(attribution_texts, int((lab == 1).sum()), int((lab == 0).sum()))
    routes["attribution"] = (f"{len(ranked['attribution'])} candidates (gradient x activation of the log-likelihood "
                             f"of the first {n_att} positive minus {n_att} negative texts)" if attribution_texts
                             else "skipped (--attribution-texts 0)")
    if not ranked["labels"]:
        routes["labels"] = f"no label or explanation matches {pack.concept!r}"
    found: dict[int, dict[str, int]] = {}
    for r in ROUTES:
        for k, f in enumerate(ranked[r], 1):
            found.setdefault(f, {})[r] = k
    feats = list(found)
    order = sorted(feats, key=lambda f: (-auc[f], -len(found[f]), -dkey[f], f))
    keep = order[:top]
    for r in ROUTES:  # the best of every route stays visible
        if ranked[r] and ranked[r][0] not in keep:
            keep.append(ranked[r][0])
    keep = sorted(keep, key=order.index)
    wanted = auc > 0.5
    cands = []
    for rank, f in enumerate(keep, 1):
        expl, model, scores = _explanation(s.db, f)
        row = s.db.feature(f) or {}
        ml = multilingual.get(f) if multilingual is not None else None
        cands.append(Candidate(f, rank, round(float(auc[f]), 6), None if math.isnan(d[f]) else round(float(d[f]), 6),
                               float(q[f]), round(float((pos[:, f] > 0).mean()), 6),
                               round(float((neg[:, f] > 0).mean()), 6), _num(s.density[f]), _num(s.max_act[f]),
                               found[f], str(row.get("label") or ""), expl, model, scores,
                               _contexts(s.db, vocab, f, 3), ml,
                               attribution=None if attr is None else round(float(attr[f]), 6)))
    return PackAudit(pack.name, pack.version, pack.concept, str(pack.path),
                     hashlib.sha256(Path(pack.path).read_bytes()).hexdigest(), int(pos.shape[0]), int(neg.shape[0]),
                     F, int(((q < 0.05) & wanted).sum()), cands, routes,
                     ml_note if multilingual is not None else "not applicable: no parallel text in several languages "
                     "for this concept (the countries pack has CLDR names)", "", warnings,
                     round(time.perf_counter() - t0, 3))


def _pack_from_dict(d: dict[str, Any]) -> PackAudit:
    cands = []
    for c in d["candidates"]:
        c = dict(c)
        c["contexts"] = [Context(**x) for x in c["contexts"]]
        c["multilingual"] = Multilingual(**c["multilingual"]) if c.get("multilingual") else None
        c["steering"] = Steering(**c["steering"]) if c.get("steering") else None
        cands.append(Candidate(**c))
    return PackAudit(**{**d, "candidates": cands})


# ---------------------------------------------------------------------------------------------- the audit
def _select_packs(packs: str | Sequence[str]) -> list[Any]:
    from monoscope.search.packs import list_packs, load_pack

    names = [p.strip() for p in (packs.split(",") if isinstance(packs, str) else packs) if str(p).strip()]
    if not names:
        raise AuditError("--packs is empty: pass all, or pack names / .jsonl files separated by commas")
    if names == ["all"]:
        names = [p["name"] for p in list_packs()]
        if not names:
            raise AuditError("no shipped concept packs found: reinstall monoscope")
    out = [load_pack(n) for n in names]
    seen = set()
    for p in out:
        if p.name in seen:
            raise AuditError(f"--packs names the pack {p.name!r} twice: give each pack once")
        seen.add(p.name)
    return out


def _db_fingerprint(db: Any) -> str:
    """Changes when the database's content does (a new explanation or score included), not when it is opened."""
    n_expl, n_scores = db.n_explanations()
    last = [db.conn.execute(f"SELECT MAX(rowid) FROM {t}").fetchone()[0] for t in ("explanations", "scores")]
    meta = {k: v for k, v in db.meta().items()
            if k not in ("seconds", "created", "stream_seconds") and not k.startswith("sae_dir:")}
    if isinstance(meta.get("sae"), dict):  # where the run folder lives is not content: a moved run is not redone
        meta["sae"] = {k: v for k, v in meta["sae"].items() if k != "path"}
    blob = json.dumps([meta, db.n_features(), db.n_examples(), n_expl, n_scores, last], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def summarise(packs: Sequence[PackAudit], bar: float = AUROC_BAR) -> dict[str, Any]:
    """How many packs have a candidate with AUROC >= bar, and the best feature per pack."""
    best = {}
    for p in packs:
        b = p.best
        best[p.name] = None if b is None else {"feature": b.feature, "auroc": b.auroc, "label": b.label,
                                               "explanation": b.explanation, "density": b.density,
                                               "steering_effect": b.steering.effect if b.steering else None}
    n = sum(1 for p in packs if p.best is not None and p.best.auroc >= bar)
    return {"auroc_bar": bar, "n_packs": len(packs), "n_with_auroc": n, "best": best}


def findings_lines(res: AuditResult) -> list[str]:
    """The short findings summary `monoscope run` and `monoscope audit` end with."""
    s = res.summary
    lines = [f"audit: {s['n_with_auroc']} of {s['n_packs']} concepts have a candidate feature with AUROC >= "
             f"{s['auroc_bar']} on their pack"]
    for p in res.packs:
        b = p.best
        if b is None:
            lines.append(f"  {p.name:<16} no candidate")
            continue
        what = _short(b.explanation or b.label, 50)
        steer = "" if b.steering is None or b.steering.effect is None else f", steering effect {b.steering.effect:+.3g}"
        lines.append(f"  {p.name:<16} #{b.feature:<6} AUROC {b.auroc:.3f}{steer}  {what}")
    lines.append("  (a feature that separates a concept's texts shows the model represents it, not that it acts on it)")
    return lines


def _short(s: str | None, n: int) -> str:
    s = (s or "").replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def audit(sae_dir: str | Path, *, packs: str | Sequence[str] = "all", out: str | Path, db: str | Path | None = None,
          model: str | None = None, device: str = "auto", compute_dtype: str = "auto", top: int = 10,
          steer_top: int = 1, steer_prompts: int = 4, steer_factors: Sequence[float] = (0.0, 4.0, 10.0),
          steer_tokens: int = 8, attribution_texts: int = 8, label_mode: str = "both", embedder: Any = None,
          searcher: Searcher | None = None,
          progress: bool = True, log: Callable[[str], None] | None = None) -> AuditResult:
    """Audit `sae_dir` with `packs` (module docstring); writes OUT/report.json and OUT/report.html.

    steer_top: candidates per pack whose steering effect is measured (0 skips; CPU-expensive: each costs
    3 conditions x len(steer_factors) x steer_prompts greedy generations of steer_tokens tokens).
    attribution_texts: positives (and as many negatives) per pack whose log-likelihood is attributed (0 skips the
    attribution route; each text costs one forward and backward pass of the model).
    searcher: an open Searcher to reuse (its model stays loaded); else one is opened and closed here."""
    from monoscope.features.db import sae_digest
    from monoscope.features.tokens import Vocab
    from monoscope.fileio import check_output_dir
    from monoscope.search.audit_report import render_html

    t_start = time.perf_counter()
    say = log if log is not None else ((lambda m: print(m, file=sys.stderr, flush=True)) if progress
                                       else (lambda _m: None))
    for name, v, lo in (("--top", top, 1), ("--steer-top", steer_top, 0), ("--steer-prompts", steer_prompts, 4),
                        ("--steer-tokens", steer_tokens, 1), ("--attribution-texts", attribution_texts, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise AuditError(f"{name} {v!r}: pass a whole number >= {lo}")
    factors = [float(f) for f in steer_factors]
    if steer_top and (not factors or not all(math.isfinite(f) for f in factors)):
        raise AuditError(f"--steer-factors {steer_factors!r}: pass finite numbers, e.g. 0,4,10")
    selected = _select_packs(packs)  # pack errors (empty, one-sided, bad line) before any model loads
    out = check_output_dir(out)
    if not Path(sae_dir).exists():
        raise AuditError(f"SAE folder {sae_dir} does not exist: pass the folder monoscope train wrote")
    settings = {"top": top, "pool": max(20, 2 * top), "label_mode": label_mode, "steer_top": steer_top,
                "steer_prompts": steer_prompts, "steer_factors": factors, "steer_tokens": steer_tokens,
                "attribution_texts": attribution_texts,
                "embedder": getattr(embedder, "name", None), "long_texts": "read in full up to the model's context"}
    digest = sae_digest(sae_dir) or ""
    if searcher is not None:
        fingerprint = _db_fingerprint(searcher.db)
    else:  # the database alone (refused when built for another SAE) says whether anything needs the model
        from monoscope.features.db import FeatureDB, existing_db_path

        with FeatureDB.open(existing_db_path(sae_dir, db), expect_sae_sha256=digest or None, sae_dir=sae_dir) as fdb:
            fingerprint = _db_fingerprint(fdb)
    base_key = {"format": FORMAT, "sae": digest, "db": fingerprint, "settings": settings}
    keys = [{**base_key, "pack": hashlib.sha256(Path(p.path).read_bytes()).hexdigest(), "name": p.name}
            for p in selected]
    full_key = hashlib.sha256(json.dumps([base_key, keys], sort_keys=True).encode()).hexdigest()
    (out / "packs").mkdir(parents=True, exist_ok=True)
    if all(_load_cached(out / "packs" / f"{p.name}.json", k) is not None for p, k in zip(selected, keys, strict=True)):
        old = _load_report_if(out, full_key)
        if old is not None:
            say(f"audit: {out / 'report.json'} is up to date ({len(selected)} packs): nothing to do")
            return old
    own = searcher is None
    if own:
        say(f"audit: loading {sae_dir}, its feature database and model")
        searcher = Searcher.open(sae_dir, db=db, model=model, device=device, compute_dtype=compute_dtype)
    s = searcher
    assert s is not None
    try:
        vocab = Vocab(s.db.vocab(), s.db.vocab_bytes())
        ml_table: dict[int, Multilingual] | None = None
        ml_note = ""
        results: list[PackAudit] = []
        n_reused = 0
        target = None
        for i, pack in enumerate(selected, 1):
            key = keys[i - 1]
            cache = out / "packs" / f"{pack.name}.json"
            saved = _load_cached(cache, key)
            if saved is not None:
                n_reused += 1
                say(f"audit [{i}/{len(selected)}] {pack.name}: reused {cache}")
                results.append(saved)
                continue
            say(f"audit [{i}/{len(selected)}] {pack.name}: {pack.n_pos} positive and {pack.n_neg} negative texts "
                f"({pack.concept})")
            use_ml = MULTILINGUAL_GROUPS.get(pack.name) is not None
            if use_ml and ml_table is None:
                say("audit: multilingual consistency on CLDR parallel names")
                ml_table, ml_note = _multilingual_table(s)
            if target is None and (steer_top or attribution_texts):
                target = _target(s, sae_dir)
            pa = _audit_pack(s, pack, top=top, pool=settings["pool"], label_mode=label_mode, embedder=embedder,
                             multilingual=ml_table if use_ml else None, ml_note=ml_note, vocab=vocab, target=target,
                             attribution_texts=attribution_texts)
            for w in pa.warnings:
                say(f"warning: {w}")
            if steer_top == 0:
                pa.steering = "skipped (--steer-top 0): no steering effect was measured"
            else:
                n = min(steer_top, len(pa.candidates))
                for c in pa.candidates[:n]:
                    say(f"audit [{i}/{len(selected)}] {pack.name}: steering feature {c.feature} "
                        f"({len(factors)} factors x 3 conditions x {steer_prompts} prompts)")
                    c.steering = _steer(target, c.feature, pack, factors, steer_prompts, steer_tokens, out, progress)
                pa.steering = (f"measured for the top {n} candidate(s): clamp at factor x max activation, "
                               f"{steer_prompts} neutral prompts, {steer_tokens} new tokens, half the prompts pick "
                               "the factor, the other half report")
            write_bytes_atomic(cache, json.dumps({"key": key, "pack": _clean(asdict(pa))}, indent=1).encode())
            results.append(pa)
        res = AuditResult(FORMAT, str(sae_dir), str(s.db.path), str(s.lm.model_id), str(s.meta.get("hook") or ""),
                          s.n_features, settings, results, [w for p in results for w in p.warnings],
                          summarise(results), CAVEAT, str(out), 0.0, full_key, n_reused)
        res.seconds = round(time.perf_counter() - t_start, 2)
        doc = res.to_dict()
        write_bytes_atomic(out / "report.html", render_html(doc).encode())
        write_bytes_atomic(out / "report.json", (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode())
        return res
    finally:
        if own:
            s.close()


def _load_cached(path: Path, key: dict[str, Any]) -> PackAudit | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") != json.loads(json.dumps(key)):
            return None
        return _pack_from_dict(saved["pack"])
    except (ValueError, KeyError, TypeError):  # a damaged cache is recomputed
        return None


def _load_report_if(out: Path, key: str) -> AuditResult | None:
    """The finished report in `out` when it was made from exactly this input (a rerun then writes nothing)."""
    try:
        doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT or doc.get("key") != key or not (out / "report.html").is_file():
            return None
        fields = {k: doc[k] for k in ("format", "sae", "db", "model", "hook", "n_features", "settings", "warnings",
                                      "summary", "caveat", "out", "seconds", "key")}
        return AuditResult(**fields, packs=[_pack_from_dict(p) for p in doc["packs"]], n_reused=len(doc["packs"]),
                           reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _target(s: Searcher, sae_dir: str | Path) -> Any:
    from monoscope.steer.intervene import check_pair
    from monoscope.steer.target import Target

    t = Target(s.lm, s.sae, check_pair(s.lm, s.sae), Path(sae_dir))
    t.max_acts, t.densities, t.db_path = s.db.column("max_act"), s.db.column("density"), s.db.path
    return t


def _steer(t: Any, feature: int, pack: Any, factors: list[float], n_prompts: int, n_tokens: int, out: Path,
           progress: bool) -> Steering | None:
    from monoscope.steer.effect import neutral_prompts, steer_eval

    folder = out / "steer" / f"{pack.name}-{feature}"
    prompts = neutral_prompts()[:n_prompts]
    if len(prompts) < n_prompts:
        raise AuditError(f"--steer-prompts {n_prompts}: only {len(prompts)} neutral prompts ship; pass at most that")
    path = folder / "steer_eval.json"
    doc = None
    if path.is_file():  # a finished evaluation of the same request is reused
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            k = old.get("key", {})
            if (k.get("feature"), k.get("factors"), k.get("prompts"), k.get("n"), k.get("concepts")) == (
                    feature, factors, prompts, n_tokens, [pack.concept]):
                doc = old
        except ValueError:
            doc = None
    if doc is None:
        import contextlib

        import torch

        # the Searcher encodes under inference_mode, so the SAE's cached tensors are inference tensors: steer in it
        # too; steer_eval's progress goes to stderr with the audit's own (stdout carries the findings)
        with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
            doc = steer_eval(t, feature, [pack.concept], factors, max_new_tokens=n_tokens, out_dir=folder, n_boot=200,
                             prompts=prompts, progress=progress)
    return _steer_summary(doc, str(path.relative_to(out)))


def load_report(path: str | Path) -> dict[str, Any]:
    """A report.json, checked to be one (for readers such as a browser)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MonoscopeError(f"no audit report at {p}: run monoscope audit SAE_DIR --out DIR") from None
    except ValueError as e:
        raise MonoscopeError(f"{p} is not JSON ({e}): rerun monoscope audit") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise MonoscopeError(f"{p} is not a monoscope audit report (format {fmt!r}, expected {FORMAT!r})")
    return doc
