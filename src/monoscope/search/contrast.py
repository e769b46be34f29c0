"""Features that separate two sets of texts, so a concept can be found without reading explanations.

    res = contrast(searcher, pos_texts, neg_texts)       # or contrast_pack(searcher, load_pack("sycophancy"))
    res.hits[0].feature, res.hits[0].auroc, res.hits[0].q

Each text is scored by each feature's largest activation on it (any token). Per feature:
- AUROC = P(score of a random positive > score of a random negative), ties half (Mann-Whitney U / P·N);
- effect size: Cohen's d, (mean_pos − mean_neg) / pooled standard deviation (None when both sets are constant);
- p: two-sided Mann-Whitney rank test, normal approximation with the tie correction (no continuity correction;
  the same as scipy.stats.mannwhitneyu(method="asymptotic", use_continuity=False)). A feature that is 0 on
  every text has p = 1;
- q: Benjamini-Hochberg false-discovery-rate adjusted p over all features of the SAE (every feature is a test).
Features are ranked by AUROC (direction "pos": fires more on the positives; "neg": on the negatives; "both":
by |AUROC − 0.5|), ties broken by effect size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from monoscope.search.text import Searcher, SearchError

DIRECTIONS = ("pos", "neg", "both")


@dataclass
class ContrastHit:
    feature: int
    auroc: float
    effect: float | None
    p: float
    q: float
    mean_pos: float
    mean_neg: float
    frac_pos: float
    """Share of positive texts it fires on."""
    frac_neg: float
    density: float | None
    label: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ContrastResult:
    n_pos: int
    n_neg: int
    n_features: int
    n_significant: int
    """Features with q < alpha in the chosen direction."""
    alpha: float
    hits: list[ContrastHit]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"n_pos": self.n_pos, "n_neg": self.n_neg, "n_features": self.n_features,
                "n_significant": self.n_significant, "alpha": self.alpha, "notes": self.notes,
                "hits": [h.to_dict() for h in self.hits]}


def mann_whitney(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUROC [F], two-sided p [F]) for scores pos [P, F] and neg [N, F], column by column."""
    from scipy.special import ndtr
    from scipy.stats import rankdata

    P, N = pos.shape[0], neg.shape[0]
    if P == 0 or N == 0:
        raise SearchError(f"a contrast needs texts on both sides: got {P} positive and {N} negative")
    x = np.concatenate([pos, neg]).astype(np.float64)
    n = P + N
    mid = rankdata(x, axis=0, method="average")
    lo = rankdata(x, axis=0, method="min")
    hi = rankdata(x, axis=0, method="max")
    u = mid[:P].sum(0) - P * (P + 1) / 2.0
    auc = u / (P * N)
    t = hi - lo + 1  # size of each element's tie group; sum over elements of (t²-1) = sum over groups of (t³-t)
    ties = (t * t - 1).sum(0)
    var = P * N / 12.0 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else np.zeros(x.shape[1])
    z = np.divide(u - P * N / 2.0, np.sqrt(np.maximum(var, 0.0)), out=np.zeros_like(u), where=var > 0)
    p = np.where(var > 0, 2.0 * ndtr(-np.abs(z)), 1.0)
    return auc, np.minimum(p, 1.0)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values: q_(i) = min over j >= i of m·p_(j)/j (sorted ascending), capped at 1."""
    p = np.asarray(p, dtype=np.float64)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def cohens_d(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """(mean_pos − mean_neg) / pooled sd per column; NaN where both sets are constant."""
    P, N = pos.shape[0], neg.shape[0]
    vp = pos.var(0, ddof=1) if P > 1 else np.zeros(pos.shape[1])
    vn = neg.var(0, ddof=1) if N > 1 else np.zeros(neg.shape[1])
    dof = max(P + N - 2, 1)
    sd = np.sqrt(((P - 1) * vp + (N - 1) * vn) / dof)
    diff = pos.mean(0) - neg.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, diff / np.where(sd > 0, sd, 1.0), np.nan)


def contrast_scores(pos: np.ndarray, neg: np.ndarray, *, labels: dict[int, str] | None = None,
                    density: np.ndarray | None = None, top: int = 20, direction: str = "pos",
                    alpha: float = 0.05) -> ContrastResult:
    """Rank the features (columns) of per-text scores pos [P, F], neg [N, F] by how well they separate them."""
    if direction not in DIRECTIONS:
        raise SearchError(f"--direction {direction!r} is unknown: use one of {', '.join(DIRECTIONS)}")
    if top <= 0:
        raise SearchError(f"--top {top}: pass a positive number of features to list")
    auc, p = mann_whitney(pos, neg)
    q = benjamini_hochberg(p)
    d = cohens_d(pos.astype(np.float64), neg.astype(np.float64))
    if direction == "pos":
        key, wanted = auc, auc > 0.5
    elif direction == "neg":
        key, wanted = 1.0 - auc, auc < 0.5
    else:
        key, wanted = np.abs(auc - 0.5), auc != 0.5
    dkey = np.nan_to_num(np.abs(d), nan=0.0)
    order = np.lexsort((np.arange(len(auc)), -dkey, -key))[:top]
    F = pos.shape[1]
    mp, mn = pos.mean(0), neg.mean(0)
    fp, fn = (pos > 0).mean(0), (neg > 0).mean(0)
    labels = labels or {}
    hits = [ContrastHit(int(f), float(auc[f]), None if math.isnan(d[f]) else float(d[f]), float(p[f]), float(q[f]),
                        float(mp[f]), float(mn[f]), float(fp[f]), float(fn[f]),
                        None if density is None or not math.isfinite(density[f]) else float(density[f]),
                        labels.get(int(f), "")) for f in order.tolist()]
    return ContrastResult(pos.shape[0], neg.shape[0], F, int(((q < alpha) & wanted).sum()), alpha, hits)


def contrast(searcher: Searcher, pos: Sequence[str], neg: Sequence[str], *, pos_names: Sequence[str] | None = None,
             neg_names: Sequence[str] | None = None, top: int = 20, direction: str = "pos",
             alpha: float = 0.05) -> ContrastResult:
    """Features that separate the texts `pos` from the texts `neg` (see the module docstring)."""
    if not pos or not neg:
        raise SearchError(f"a contrast needs texts on both sides: got {len(pos)} positive and {len(neg)} negative")
    a = searcher.max_acts(pos, pos_names)
    b = searcher.max_acts(neg, neg_names)
    res = contrast_scores(a, b, density=searcher.density, top=top, direction=direction, alpha=alpha)
    names = searcher.labels([h.feature for h in res.hits])
    for h in res.hits:
        h.label = names.get(h.feature, "")
    return res


@dataclass
class Neighbour:
    feature: int
    cosine: float
    label: str
    density: float | None


def neighbours(db: Any, fid: int, top: int = 10) -> list[Neighbour]:
    """The features nearest to `fid` by decoder cosine, as the features pass stored them."""
    n = db.n_features()
    if not 0 <= fid < n:
        raise SearchError(f"--neighbours {fid} is out of range: {db.path} has features 0..{n - 1}")
    row = db.feature(fid) or {}
    out = []
    for j, c in (row.get("neighbours") or [])[:top]:
        r = db.feature(int(j)) or {}
        dens = r.get("density")
        out.append(Neighbour(int(j), float(c), str(r.get("label") or ""),
                             None if dens is None else float(dens)))
    return out
