"""The data of each page as plain JSON-able dicts: the HTML templates render them and the `.json` routes
return them unchanged, so what a person sees and what a script reads are the same numbers."""

from __future__ import annotations

import html
import math
from functools import lru_cache
from typing import Any

import numpy as np
from markupsafe import Markup

from monoscope.features.db import EXAMPLE_KINDS
from monoscope.serve.site import Entry, Site, _visible

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


SHADES = 10
"""Token shading levels: a token with activation a > 0 gets class `sN`, N = ceil(SHADES * a / scale) (1..SHADES),
one colour each in style.css, instead of an inline colour per token (a page shows ~2,000 tokens)."""


def context(entry: Entry, tokens: np.ndarray, acts: np.ndarray, position: int, act: float,
            scale: float) -> dict[str, Any]:
    """One example window as token texts (decoded jointly from the token bytes) and their activations:
    {act, position, tokens [text], acts [value]}; `scale` (the feature's max activation) shades them."""
    tokens = np.asarray(tokens)
    keep = np.flatnonzero(tokens >= 0)  # negative ids: padding
    pos = int(np.searchsorted(keep, position)) if position in keep else 0
    a = np.zeros(len(keep), np.float64)
    n = min(len(acts), len(tokens))
    inside = keep < n
    a[inside] = np.asarray(acts, np.float64)[keep[inside]]
    texts, vals, pos = entry.vocab.window(tokens[keep], a, pos)
    return {"act": _f(act), "position": pos, "tokens": [_visible(t) for t in texts],
            "acts": np.round(np.asarray(vals, np.float64), 4).tolist()}


@lru_cache(maxsize=1 << 17)
def _esc(text: str) -> str:
    return html.escape(text, quote=True)


@lru_cache(maxsize=1 << 17)
def _plain_span(text: str) -> str:
    """An inactive token's span (most tokens of a page), escaped, made once per token text."""
    return f'<span class="tok">{html.escape(text, quote=True)}</span>'


def context_html(c: dict[str, Any], scale: float) -> Markup:
    """The HTML of one `context`: one span per token, class `tok` plus its shade `sN` (and `peak` at the
    window's maximum), the value in `title` for active tokens. Every text is escaped here."""
    pos, toks, acts = c["position"], c["tokens"], c["acts"]
    if not scale > 0:
        scale = max([*acts, 0.0]) or 1.0
    k = SHADES / scale
    esc, plain, ceil = _esc, _plain_span, math.ceil
    parts = [f'<div class="ctx"><span class="act">{_num(c["act"], ".3g")}</span><span class="toks">']
    for t, a in zip(toks, acts, strict=True):
        if a > 0:
            lv = ceil(a * k)
            parts.append(f'<span class="tok s{SHADES if lv > SHADES else lv or 1}" title="{a}">{esc(t)}</span>')
        else:
            parts.append(plain(t))
    if 0 <= pos < len(toks):  # the window's maximum: outlined, its value on hover even when 0
        a = acts[pos]
        lv = min(SHADES, max(1, ceil(a * k))) if a > 0 else 0
        parts[pos + 1] = f'<span class="tok{f" s{lv}" if lv else ""} peak" title="{a}">{esc(toks[pos])}</span>'
    parts.append("</span></div>")
    return Markup("".join(parts))


def _num(v: Any, fmt: str) -> str:
    """A number as the pages' `num` filter formats it ("—" for none)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return _esc(str(v))


def shown_records(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top, quantile) records of one feature in the order its page shows them: top by rank (N_TOP), then
    N_PER_BIN per quantile bin, strongest bin first."""
    top_rec = rec[rec["kind"] == EXAMPLE_KINDS["top"]]
    top_rec = top_rec[np.argsort(top_rec["rank"], kind="stable")][:N_TOP]
    q = rec[rec["kind"] == EXAMPLE_KINDS["quantile"]]
    q = q[np.lexsort((q["rank"], -q["bin"].astype(np.int64)))]
    q = np.concatenate([q[q["bin"] == b][:N_PER_BIN] for b in dict.fromkeys(q["bin"].tolist())] or [q[:0]])
    return top_rec, q


def _examples(entry: Entry, fid: int, scale: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(top contexts, quantile bins) of `fid` from its packed examples row, read and unpacked once."""
    rec = entry.db().packed_examples(fid)
    if rec is None or not len(rec):
        return [], []
    top_rec, q = shown_records(rec)
    shown = np.concatenate([top_rec, q])
    fast = _contexts(entry, shown, scale)
    top = fast[: len(top_rec)]
    n_bins = entry.meta.get("bins") if isinstance(entry.meta.get("bins"), int) else 10
    quantiles = []
    all_q = rec[rec["kind"] == EXAMPLE_KINDS["quantile"]]
    start = len(top_rec)
    for b in dict.fromkeys(q["bin"].tolist()):
        exs = all_q[all_q["bin"] == b]
        k = int((q["bin"] == b).sum())
        quantiles.append({"bin": int(b), "of": max(n_bins, int(b) + 1), "lo": _f(float(exs["act"].min())),
                          "hi": _f(float(exs["act"].max())), "examples": fast[start: start + k]})
        start += k
    return top, quantiles


def _contexts(entry: Entry, rec: np.ndarray, scale: float) -> list[dict[str, Any]]:
    """`context` of every record, batched: a window with no padding whose tokens are all whole UTF-8 with text
    on their own (most) is looked up in `Entry.shown_tokens` (joint decoding and folding change nothing
    there); any other takes the general path."""
    shown = entry.shown_tokens
    n_vocab = len(shown)
    acts = np.round(rec["acts"].astype(np.float64), 4).tolist()
    ids = rec["tokens"].tolist()
    out = []
    for r, (n, na, a, p) in enumerate(zip(rec["ntok"].tolist(), rec["nact"].tolist(), rec["act"].tolist(),
                                          rec["position"].tolist(), strict=True)):
        t = ids[r][:n]
        texts = [shown[i] if 0 <= i < n_vocab else None for i in t] if na == n and p < n else [None]
        if None in texts:
            out.append(context(entry, rec["tokens"][r][:n].astype(np.int64), rec["acts"][r][:na], p, a, scale))
        else:
            out.append({"act": _f(a), "position": p, "tokens": texts, "acts": acts[r][:n]})
    return out


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
    top, quantiles = _examples(entry, fid, scale)
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
        "family": site.family(entry, fid), "best_match": site.best_matches(entry, fid),
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
