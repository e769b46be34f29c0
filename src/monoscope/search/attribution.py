"""Search by attribution: the features that drive the model towards a target token on a prompt.

    s = Searcher.open("runs/default/sae")
    res = search_attribution(s, "The Eiffel Tower is in the city of", target=" Paris", top=10)
    for h in res.hits: print(h.feature, h.attribution, h.exact, h.label)

Built on `monoscope.steer.attribute`: the log-prob of the target token (or a logit difference between
two tokens) at the prompt's last position is attributed to every feature at every position by
gradient x activation (or integrated gradients), summed over positions per feature; the top features
are then checked by exact ablation (the feature's code set to 0 everywhere, the SAE error term kept),
so each hit carries its attributed and its measured effect. Positive attribution = the feature
raises the metric (its ablation lowers it). Unlike a text search this needs a backward pass, and it
finds the features that *act on* the output, not only those that fire.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from monoscope.search.text import Searcher, SearchError, _finite

DIRECTIONS = ("pos", "neg", "both")
ABLATION_BATCH = 8


@dataclass
class AttributionHit:
    feature: int
    attribution: float
    """Attribution summed over positions (estimate of metric(clean) − metric(feature ablated))."""
    exact: float | None
    """Measured metric(clean) − metric(feature ablated at every position), for the checked top features."""
    position: int
    """Position where the feature's attribution is largest in magnitude."""
    token: str
    activation: float
    """The feature's code at that position."""
    rel: float | None
    """That activation over the feature's max_act in the database."""
    density: float | None
    label: str
    explanation: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AttributionResult:
    prompt: str
    metric: str
    method: str
    tokens: list[str]
    metric_clean: float
    metric_all_nodes_zero: float
    error_attribution: float
    """Attribution of the SAE error term (all positions): what the SAE's features do not account for."""
    correlation: float | None
    """Pearson correlation of attributed and exact effects over the checked features."""
    hits: list[AttributionHit]
    n_features: int
    n_attributed: int
    """Features with a non-zero attribution."""
    n_filtered: int
    """Of those, the ones the density filter removed."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hits"] = [h.to_dict() for h in self.hits]
        return d


def search_attribution(s: Searcher, prompt: str, *, target: str | None = None, metric: str | None = None,
                       top: int = 20, direction: str = "pos", ig_steps: int = 0, verify: int = 10,
                       min_density: float | None = None, max_density: float | None = None) -> AttributionResult:
    """The `top` features by attribution to `target` (one token, e.g. " Paris") or `metric`
    ('logit-diff:" a"," b"') at the prompt's last position; `direction` pos = features that raise the
    metric first, neg = those that lower it, both = by magnitude. The first `verify` hits are checked by
    exact ablation."""
    from monoscope.steer.attribute import attribute, parse_metric
    from monoscope.steer.target import Target

    if top <= 0:
        raise SearchError(f"--top {top}: pass a positive number of features to list")
    if verify < 0:
        raise SearchError(f"--verify {verify}: pass 0 (no check) or the number of top features to ablate")
    if direction not in DIRECTIONS:
        raise SearchError(f"--direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    if not prompt.strip():
        raise SearchError("--attribution got an empty prompt: pass the text the model continues")
    mask = s.density_mask(min_density, max_density)
    t = Target(s.lm, s.sae, s.hp, s.sae_dir, max_acts=s.max_act, densities=s.density, db_path=s.db.path)
    m = parse_metric(s.lm.tokenizer, target, metric)
    res = attribute(t, prompt, m, ig_steps=ig_steps, verify=0)
    per = res.attr.sum(0).double().numpy()  # [F]
    nonzero = per != 0
    chosen = nonzero & mask
    cand = np.flatnonzero(chosen)
    key = {"pos": -per[cand], "neg": per[cand], "both": -np.abs(per[cand])}[direction]
    order = cand[np.argsort(key, kind="stable")]
    if direction != "both":  # only features pushing the chosen way
        order = order[(per[order] > 0) if direction == "pos" else (per[order] < 0)]
    order = order[:top]
    exact = _exact_ablation(t, prompt, m, res, order[:verify].tolist()) if verify else {}
    corr = _correlation([per[f] for f in exact], list(exact.values()))
    labels = s.labels(order.tolist())
    expl = s.explanations()
    hits = []
    for fid in order.tolist():
        col = res.attr[:, fid]
        pos = int(col.abs().argmax())
        act = float(res.codes[pos, fid])
        mx = s.max_act[fid]
        hits.append(AttributionHit(fid, float(per[fid]), exact.get(fid), pos, res.tokens[pos], act,
                                   _finite(act / mx) if mx > 0 else None, _finite(s.density[fid]), labels[fid],
                                   expl.get(fid)))
    notes = []
    if corr is not None and corr < 0.5:
        notes.append(f"attributed and exact ablation effects correlate at only {corr:.2f}: the model is "
                     "far from linear around this prompt; trust the exact column (or pass --ig-steps 16)")
    err = float(res.error_attr.sum())
    gap = res.m_clean - res.m_zero
    if math.isfinite(gap) and abs(gap) > 0 and abs(err) > 0.5 * abs(gap):
        notes.append(f"the SAE error term carries {err:+.3f} of the {gap:+.3f} the nodes account for: much of the "
                     "effect is outside the SAE's features")
    return AttributionResult(prompt, m.describe(), res.method, res.tokens, res.m_clean, res.m_zero, err,
                             corr, hits, s.n_features, int(nonzero.sum()),
                             int((nonzero & ~mask).sum()), notes)


def _exact_ablation(t: Any, prompt: str, metric: Any, res: Any, feats: list[int]) -> dict[int, float]:
    """metric(clean) − metric(feature's code 0 at every non-BOS position, the SAE error term kept), per feature."""
    import torch

    from monoscope.steer.attribute import _Runner

    if not feats:
        return {}
    runner = _Runner(t, t.encode(prompt))
    out: dict[int, float] = {}
    with torch.no_grad():
        x = runner.clean_acts()
        codes = res.codes.to(x.device)
        W = t.sae.W_dec.detach().float() / t.sae.cfg.normaliser
        for i in range(0, len(feats), ABLATION_BATCH):
            fs = feats[i:i + ABLATION_BATCH]
            xs = torch.stack([x - codes[:, f:f + 1] * W[f] for f in fs])
            for f, v in zip(fs, metric(runner.last_logits(xs)), strict=True):
                out[f] = res.m_clean - float(v)
    return out


def _correlation(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])
