"""The data of each page as plain JSON-able dicts: the HTML templates render them and the `.json` routes
return them unchanged, so what a person sees and what a script reads are the same numbers."""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from monoscope.features.tokens import visible
from monoscope.serve.site import Entry, Site

LIST_ROWS = 10
N_TOP = 20
N_PER_BIN = 3


def _f(v: Any) -> float | None:
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


_SPECIAL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""What `visible` rewrites (categories Cc, Zl, Zp); text without any, and not all spaces, is returned as is."""


@lru_cache(maxsize=1 << 17)
def _visible(text: str) -> str:
    """`visible`, with a fast path and remembered: a page shows ~2,000 tokens of one vocabulary."""
    if _SPECIAL.search(text) is None and (len(text) < 2 or text.strip(" ")):
        return text
    return visible(text)


def context(entry: Entry, ex: dict[str, Any], scale: float) -> dict[str, Any]:
    """One example window as tokens with their activations (decoded jointly from the token bytes) and the
    shading of each: alpha = act / scale (the feature's max activation), "" where the token is inactive."""
    toks = [(i, int(t)) for i, t in enumerate(ex["tokens"]) if t >= 0]  # negative ids: padding
    keep = [i for i, _ in toks]
    pos = keep.index(ex["position"]) if ex["position"] in keep else 0
    acts = [float(ex["acts"][i]) if i < len(ex["acts"]) else 0.0 for i in keep]
    texts, acts, pos = entry.vocab.window([t for _, t in toks], acts, pos)
    if not scale > 0:
        scale = max([*acts, 0.0]) or 1.0
    return {"act": _f(ex["act"]), "position": pos,
            "tokens": [{"text": _visible(t), "act": round(a, 4), "alpha": f"{min(a / scale, 1.0):.3f}" if a > 0 else ""}
                       for t, a in zip(texts, acts, strict=True)]}


def histogram(hist: Any) -> list[dict[str, Any]]:
    """[{lo, hi, count}] over the non-empty range of the log-spaced bins."""
    if not isinstance(hist, dict):
        return []
    edges, counts = hist.get("edges"), hist.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or len(edges) != len(counts) + 1:
        return []
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return []
    return [{"lo": edges[i], "hi": edges[i + 1], "count": int(counts[i])} for i in range(nz[0], nz[-1] + 1)]


def _related(entry: Entry, value: Any) -> list[dict[str, Any]]:
    pairs = [(int(e[0]), _f(e[1])) for e in (value if isinstance(value, list) else [])
             if isinstance(e, list | tuple) and len(e) >= 2 and isinstance(e[0], int | float)][:LIST_ROWS]
    briefs = entry.db().briefs([i for i, _ in pairs])
    return [{"id": i, "value": v, "label": (briefs.get(i) or {}).get("label") or ""} for i, v in pairs]


def _logits(entry: Entry, value: Any) -> list[dict[str, Any]]:
    return [{"token": entry.token(e[0]), "value": _f(e[1])} for e in (value if isinstance(value, list) else [])
            if isinstance(e, list | tuple) and len(e) >= 2][:LIST_ROWS]


def _label_from(entry: Entry, info: Any) -> str:
    if not isinstance(info, dict):
        return ""
    peaks = [f"{entry.token(p[0])} ×{p[1]}" for p in info.get("peak_tokens") or []
             if isinstance(p, list) and len(p) >= 2]
    out = ("peak tokens " + ", ".join(peaks)) if peaks else ""
    if isinstance(info.get("purity"), int | float):
        out += f"{' · ' if out else ''}purity {info['purity']:.0%}"
    return out


def feature_doc(site: Site, entry: Entry, fid: int) -> dict[str, Any]:
    """Everything the feature page shows. `fid` must be in range (the route checks)."""
    db = entry.db()
    row = db.feature(fid) or {}
    expl = db.latest_explanation(fid)
    scores = db.scores(fid)
    if expl is not None and any(m == expl["model"] for m, _, _ in scores):
        scores = [s for s in scores if s[0] == expl["model"]]
    m = _f(row.get("max_act"))
    scale = m if m is not None and m > 0 else 0.0
    top = [context(entry, ex, scale) for ex in db.examples(fid, "top")[:N_TOP]]
    bins: dict[int, list[dict[str, Any]]] = {}
    for ex in db.examples(fid, "quantile"):  # bin DESC, rank
        bins.setdefault(int(ex["bin"]), []).append(ex)
    n_bins = entry.meta.get("bins") if isinstance(entry.meta.get("bins"), int) else 10
    quantiles = [{"bin": b, "of": max(n_bins, b + 1), "lo": _f(min(e["act"] for e in exs)),
                  "hi": _f(max(e["act"] for e in exs)), "examples": [context(entry, e, scale) for e in exs[:N_PER_BIN]]}
                 for b, exs in bins.items()]
    base = f"/sae/{entry.name}/feature"
    return {
        "sae": entry.name, "id": fid, "n_features": entry.n_features, "in_database": bool(row),
        "label": row.get("label") or "", "label_from": _label_from(entry, row.get("label_tokens")),
        "explanation": expl, "scores": [{"model": m, "scorer": s, "value": _f(v)} for m, s, v in scores],
        "density": _f(row.get("density")), "fires": row.get("fires"), "max_act": _f(row.get("max_act")),
        "mean_act": _f(row.get("mean_act")), "interest": _f(row.get("interest")),
        "map": [_f(row.get("map_x")), _f(row.get("map_y"))] if row.get("map_x") is not None else None,
        "histogram": histogram(row.get("hist")),
        "top": top, "quantiles": quantiles,
        "promoted": _logits(entry, row.get("logit_pos")), "suppressed": _logits(entry, row.get("logit_neg")),
        "neighbours": _related(entry, row.get("neighbours")), "cooccur": _related(entry, row.get("cooccur")),
        "family": site.family(entry, fid),
        "prev": fid - 1 if fid > 0 else None, "next": fid + 1 if fid + 1 < entry.n_features else None,
        "permalink": f"{base}/{fid}",
        "tokens_seen": entry.meta.get("tokens") if isinstance(entry.meta.get("tokens"), int) else None,
    }


def metrics_summary(metrics: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The eval numbers a reader looks at first, as (name, formatted value) rows."""
    if not metrics:
        return []
    out: list[tuple[str, str]] = []
    held = isinstance(metrics.get("heldout"), dict)
    h = metrics["heldout"] if held else metrics.get("store_rows") if isinstance(metrics.get("store_rows"), dict) else {}
    lm = metrics.get("lm") if isinstance(metrics.get("lm"), dict) else {}

    def add(name: str, v: Any, fmt: str) -> None:
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out.append((name, format(v, fmt)))

    add("FVU (held-out)" if held else "FVU (store rows)", h.get("fvu"), ".4f")
    add("explained variance", h.get("explained_variance"), ".4f")
    add("L0", h.get("l0_mean"), ".2f")
    add("dead features", h.get("dead_frac"), ".1%")
    add("dense features", h.get("dense_frac"), ".2%")
    add("CE clean", lm.get("ce_clean"), ".4f")
    add("CE with SAE", lm.get("ce_spliced"), ".4f")
    add("CE loss increase", lm.get("ce_delta"), ".4f")
    add("CE recovered", lm.get("ce_recovered"), ".2%")
    add("KL with SAE", lm.get("kl_spliced"), ".4f")
    return out
