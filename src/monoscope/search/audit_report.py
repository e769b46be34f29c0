"""`report.html` of `monoscope audit`: one self-contained page (inline CSS, inline SVG, no script, no font, no
image or link that fetches anything), so it opens offline from a file and can be mailed as is.

Sections (each an element with a stable id, which the browser test checks): `caveat`, `summary`, `pack-NAME` per
pack (candidates table, top contexts, multilingual evidence, steering dose-response), `warnings`, `method`.
Everything comes from the report.json document; every string from the data is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:19px;margin:30px 0 6px;border-bottom:2px solid #ddd;padding-bottom:3px}
h3{font-size:15px;margin:16px 0 4px}
.meta{color:#555;font-size:13px}
.caveat{background:#fff4e0;border-left:5px solid #f39c12;padding:10px 14px;margin:14px 0}
table{border-collapse:collapse;margin:6px 0 10px;background:#fff;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f3}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.good{background:#dff5e1}.ok{background:#f3f9e6}
.route{display:inline-block;background:#e8eefc;border-radius:3px;padding:0 4px;margin:1px;font-size:11px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap}
.tok{background:#ffb36b;border-radius:2px}
.warn{color:#8a4b00}
.muted{color:#777}
nav a{margin-right:10px}
svg{background:#fff;border:1px solid #ddd}
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _f(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec)


def _ws(s: str) -> str:
    return _e(s.replace("\n", "⏎"))


def _summary(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    rows = []
    for p in doc["packs"]:
        b = s["best"].get(p["name"])
        if b is None:
            rows.append(f"<tr><td><a href='#pack-{_e(p['name'])}'>{_e(p['name'])}</a></td><td colspan=5>no candidate"
                        "</td></tr>")
            continue
        cls = "good" if b["auroc"] >= s["auroc_bar"] else ""
        rows.append(f"<tr class='{cls}'><td><a href='#pack-{_e(p['name'])}'>{_e(p['name'])}</a></td>"
                    f"<td>{_e(p['concept'])}</td><td class=n>#{b['feature']}</td><td class=n>{_f(b['auroc'])}</td>"
                    f"<td class=n>{_f(b['steering_effect'], '+.3g')}</td>"
                    f"<td>{_e(b['explanation'] or b['label'])}</td></tr>")
    return (f"<section id='summary'><h2>Summary</h2><p><b>{s['n_with_auroc']} of {s['n_packs']}</b> concepts have a "
            f"candidate feature with AUROC &ge; {s['auroc_bar']} on their pack.</p>"
            "<table><tr><th>pack</th><th>concept</th><th>best feature</th><th>AUROC</th><th>steering effect</th>"
            "<th>label / explanation</th></tr>" + "".join(rows) + "</table></section>")


def _routes(r: dict[str, int]) -> str:
    return "".join(f"<span class=route>{_e(k)} #{v}</span>" for k, v in r.items())


def _candidates(p: dict[str, Any], bar: float) -> str:
    rows = []
    for c in p["candidates"]:
        cls = "good" if c["auroc"] >= bar else ("ok" if c["auroc"] >= 0.7 else "")
        scores = ", ".join(f"{_e(k)} {_f(v, '.2f')}" for k, v in (c.get("scores") or {}).items())
        ml = c.get("multilingual")
        mls = "—" if not ml else f"{_f(ml['consistency'], '.2f')} ({ml['n_languages']} lang., {_e(ml['concept'])})"
        st = c.get("steering")
        sts = "—" if not st else f"{_f(st['effect'], '+.3g')} (controls {_f(st['control_effect'], '+.3g')})"
        expl = _e(c["explanation"]) + (f" <span class=muted>[{_e(c['explanation_model'])}]</span>"
                                       if c.get("explanation_model") else "")
        rows.append(
            f"<tr class='{cls}'><td class=n>{c['rank']}</td><td class=n>#{c['feature']}</td>"
            f"<td class=n>{_f(c['auroc'])}</td><td class=n>{_f(c['effect_size'], '.2f')}</td>"
            f"<td class=n>{_f(c['q'], '.2g')}</td>"
            f"<td class=n>{100 * c['frac_pos']:.0f}% / {100 * c['frac_neg']:.0f}%</td>"
            f"<td class=n>{_f(c['density'], '.1e')}</td><td>{_routes(c['routes'])}</td>"
            f"<td>{_ws(c['label'])}</td><td>{expl or '—'}</td><td>{scores or '—'}</td><td>{mls}</td>"
            f"<td>{sts}</td></tr>")
    return ("<table class=candidates><tr><th>#</th><th>feature</th><th>AUROC</th><th>d</th><th>q</th>"
            "<th>fires pos / neg</th><th>density</th><th>found by</th><th>label</th><th>explanation</th>"
            "<th>scores</th><th>multilingual</th><th>steering effect</th></tr>" + "".join(rows) + "</table>")


def _contexts(p: dict[str, Any], n: int = 5) -> str:
    out = ["<div class=contexts><h3>Top contexts (from the feature database)</h3>"]
    for c in p["candidates"][:n]:
        out.append(f"<p><b>#{c['feature']}</b> <span class=muted>{_ws(c['label'])}</span></p>")
        if not c["contexts"]:
            out.append("<p class=muted>no stored contexts</p>")
        for x in c["contexts"]:
            out.append(f"<div class=ctx>{_f(x['act'], '7.3g')}  {_ws(x['before'])}<span class=tok>{_ws(x['token'])}"
                       f"</span>{_ws(x['after'])}</div>")
    return "".join(out) + "</div>"


def _multilingual(p: dict[str, Any]) -> str:
    out = [f"<div class=multilingual><h3>Multilingual consistency</h3><p class=muted>{_e(p['multilingual'])}</p>"]
    rows = [c for c in p["candidates"] if c.get("multilingual")]
    if rows:
        langs = sorted({lang for c in rows for lang in c["multilingual"]["languages"]})
        out.append("<table><tr><th>feature</th><th>concept</th>" + "".join(f"<th>{_e(x)}</th>" for x in langs)
                   + "</tr>")
        for c in rows:
            m = c["multilingual"]
            cells = "".join(f"<td class='n{' good' if x in m['fires_in'] else ''}'>{_f(m['languages'].get(x), '.2f')}"
                            "</td>" for x in langs)
            out.append(f"<tr><td>#{c['feature']}</td><td>{_e(m['concept'])}</td>{cells}</tr>")
        out.append("</table><p class=muted>relative activation per language; green: fires selectively there</p>")
    return "".join(out) + "</div>"


def _svg(st: dict[str, Any]) -> str:
    """A small dose-response plot: activation of the feature vs factor, target and controls."""
    xs = st["factors"]
    series = [("target", st["target"], "#d35400"), ("random feature", st["random_feature"], "#2980b9"),
              ("random direction", st["random_direction"], "#7f8c8d")]
    vals = [v for _, s, _ in series for v in s if v is not None] + [st.get("unsteered") or 0.0]
    lo, hi = min([*vals, 0.0]), max([*vals, 1e-9])
    x0, x1 = min(xs), max(xs)
    W, H, M = 260, 120, 22

    def px(x: float) -> float:
        return M + (W - 2 * M) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def py(y: float) -> float:
        return H - M - (H - 2 * M) * ((y - lo) / (hi - lo) if hi > lo else 0.5)

    parts = [f"<svg width={W} height={H} viewBox='0 0 {W} {H}' role=img aria-label='dose-response'>"]
    parts.append(f"<line x1={M} y1={H - M} x2={W - M} y2={H - M} stroke='#999'/>")
    for name, s, col in series:
        pts = [(px(x), py(y)) for x, y in zip(xs, s, strict=False) if y is not None]
        if pts:
            parts.append(f"<polyline fill=none stroke='{col}' stroke-width=2 points='"
                         + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + f"'><title>{_e(name)}</title></polyline>")
    for x in xs:
        parts.append(f"<text x={px(x):.1f} y={H - 6} font-size=10 text-anchor=middle>{_f(x, 'g')}</text>")
    parts.append(f"<text x={M} y=12 font-size=10>max {_f(hi, '.3g')}</text></svg>")
    return "".join(parts)


def _steering(p: dict[str, Any]) -> str:
    out = [f"<div class=steering><h3>Steering effect</h3><p class=muted>{_e(p['steering'])}</p>"]
    for c in p["candidates"]:
        st = c.get("steering")
        if not st:
            continue
        rows = "".join(f"<tr><td class=n>{_f(x, 'g')}</td><td class=n>{_f(a, '.3g')}</td><td class=n>{_f(b, '.3g')}"
                       f"</td><td class=n>{_f(d, '.3g')}</td><td class=n>{_f(q, '.3g')}</td></tr>"
                       for x, a, b, d, q in zip(st["factors"], st["target"], st["random_feature"],
                                                st["random_direction"], st["ppl"], strict=False))
        out.append(f"<p><b>#{c['feature']}</b>: chosen factor {_f(st['chosen_factor'], 'g')}, effect "
                   f"{_f(st['effect'], '+.3g')} vs controls {_f(st['control_effect'], '+.3g')} (unsteered activation "
                   f"{_f(st['unsteered'], '.3g')}, perplexity {_f(st['unsteered_ppl'], '.3g')}; {st['n_prompts']} "
                   f"prompts; <code>{_e(st['path'])}</code>)</p>"
                   "<table><tr><th>factor</th><th>target</th><th>random feature</th><th>random direction</th>"
                   f"<th>ppl (target)</th></tr>{rows}</table>{_svg(st)}")
    return "".join(out) + "</div>"


def _pack(p: dict[str, Any], bar: float) -> str:
    routes = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in p["routes"].items())
    warns = "".join(f"<li class=warn>{_e(w)}</li>" for w in p["warnings"])
    return (f"<section id='pack-{_e(p['name'])}' class=pack><h2>{_e(p['name'])}: {_e(p['concept'])}</h2>"
            f"<p class=meta>pack v{_e(p['version'])} <code>{_e(p['path'])}</code> — {p['n_pos']} positive, "
            f"{p['n_neg']} negative texts; {p['n_significant']:,} of {p['n_features']:,} features separate them at "
            f"BH q &lt; 0.05</p><ul>{routes}</ul>" + (f"<ul>{warns}</ul>" if warns else "")
            + _candidates(p, bar) + _contexts(p) + _multilingual(p) + _steering(p) + "</section>")


def render_html(doc: dict[str, Any]) -> str:
    """The report page of a report.json document."""
    bar = doc["summary"]["auroc_bar"]
    nav = "".join(f"<a href='#pack-{_e(p['name'])}'>{_e(p['name'])}</a>" for p in doc["packs"])
    warns = "".join(f"<li class=warn>{_e(w)}</li>" for w in doc["warnings"]) or "<li class=muted>none</li>"
    st = doc["settings"]
    factors = ", ".join(_f(x, "g") for x in st["steer_factors"])
    steer = ("skipped (--steer-top 0): no steering effect was measured" if not st["steer_top"] else
             f"the top {st['steer_top']} candidate(s) per pack, factors {factors}"
             f" x max activation, {st['steer_prompts']} prompts, {st['steer_tokens']} new tokens")
    method = (
        "<section id='method'><h2>Method</h2><ul>"
        "<li><b>contrast</b>: each text is scored by each feature's largest activation; AUROC = P(positive &gt; "
        "negative), Mann-Whitney p, Benjamini-Hochberg q over all features; d = Cohen's d.</li>"
        "<li><b>text</b>: features firing on each positive, ranked by activation relative to their own maximum "
        "(density &le; 1e-2), voted over the positives.</li>"
        "<li><b>labels</b>: keyword (FTS5) and semantic (MiniLM) search of labels and explanations for the concept "
        "name, fused by reciprocal rank.</li>"
        "<li><b>neighbours</b>: decoder-cosine neighbours of the top contrast candidates.</li>"
        "<li><b>attribution</b>: not run by the audit (a pack defines no target token); use "
        "<code>monoscope attribute</code> on a prompt.</li>"
        "<li>Candidates are ranked by AUROC on the pack, then by the number of routes that found them.</li>"
        f"<li><b>steering</b>: {_e(steer)}; effect = mean activation of the feature over the steered continuation "
        "(read by the unsteered model) minus the unsteered one, at the factor chosen on the other half of the "
        "prompts; controls: a random feature of matched density and a random direction.</li></ul></section>")
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\"><meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>monoscope audit: {_e(doc['sae'])}</title><style>{CSS}</style></head><body><main>"
        f"<h1>Concept audit of {_e(doc['sae'])}</h1>"
        f"<p class=meta>model {_e(doc['model'])}, hook {_e(doc['hook'])}, {doc['n_features']:,} features; database "
        f"<code>{_e(doc['db'])}</code>; {len(doc['packs'])} packs in {_f(doc['seconds'], '.0f')} s; "
        f"format {_e(doc['format'])}</p>"
        f"<section id='caveat' class=caveat><b>Caveat.</b> {_e(doc['caveat'])}</section>"
        f"<nav>{nav}</nav>" + _summary(doc) + "".join(_pack(p, bar) for p in doc["packs"])
        + f"<section id='warnings'><h2>Warnings</h2><ul>{warns}</ul></section>" + method
        + "</main></body></html>\n")
