"""`monoscope show SAE_DIR FEATURE_ID`: one feature's dashboard in the terminal, read from the feature database.

    monoscope show runs/x/sae 1234                  # database at runs/x/features/features.db
    monoscope show my-sae 7 --db elsewhere.db --examples 20

Everything comes from the database that `monoscope features SAE_DIR` builds (no model, no SAE weights),
so a page opens in well under a second; when SAE_DIR exists, the database must have been built for its
weights (a one-line error otherwise). Token text comes from `monoscope.features.tokens` (windows decoded
from token bytes). Anything the database lacks (a NULL column, no examples, no
explanation, no family) shows as "—": a partial database is still worth looking at.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.color import Color
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.constrain import Constrain
from rich.panel import Panel
from rich.rule import Rule
from rich.style import Style
from rich.table import Table
from rich.text import Text

from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB, default_db_path, existing_db_path, open_for_sae
from monoscope.features.tokens import Vocab, token_text, visible

__all__ = ["ContextLine", "add_show_parser", "default_db_path", "existing_db_path", "render_feature", "show",
           "visible"]

DASH = "—"
HIST_ROWS = 12  # the histogram is merged to at most this many rows: a glance, not a plot
LIST_ROWS = 10  # logit effects, neighbours, co-occurring features shown per list
_LOW = (255, 236, 204)  # background of the weakest activation: pale, readable on dark and light terminals
_HIGH = (255, 110, 0)  # ... of the strongest (act == max_act): the feature-page orange


# ---------------------------------------------------------------------------------------------- formatting
def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _num(v: Any, fmt: str = ".3g") -> str:
    return DASH if _missing(v) else format(v, fmt)


def _highlight(frac: float, *, bold: bool) -> Style:
    """Background intensity ∝ act / max_act (black text, so it reads on any terminal background)."""
    t = min(max(frac, 0.0), 1.0)
    rgb = tuple(round(lo + (hi - lo) * t) for lo, hi in zip(_LOW, _HIGH, strict=True))
    return Style(color="black", bgcolor=Color.from_rgb(*rgb), bold=bold)


class ContextLine:
    """One example as one line: tokens with their activations, cut to the width around the max token.

    A renderable (not a Text) because the window it can show depends on the width it is given.
    """

    def __init__(self, prefix: Text, tokens: Sequence[str], acts: Sequence[float], position: int, scale: float,
                 width: int | None = None) -> None:
        self.prefix = prefix
        self.tokens = list(tokens)
        self.acts = [float(a) for a in acts]
        self.position = min(max(int(position), 0), max(len(self.tokens) - 1, 0))
        self.scale = scale if scale > 0 else max([*self.acts, 0.0]) or 1.0
        self.width = width

    def window(self, avail: int) -> tuple[int, int]:
        """[lo, hi) token range that fits `avail` cells (ellipses reserved), grown from the max outwards."""
        lens = [cell_len(t) for t in self.tokens]
        lo, hi = self.position, self.position + 1
        used = lens[self.position] if self.tokens else 0
        budget = avail - 2  # "…" on either side when cut
        grew = True
        while grew:
            grew = False
            if lo > 0 and used + lens[lo - 1] <= budget:
                lo, used, grew = lo - 1, used + lens[lo - 1], True
            if hi < len(lens) and used + lens[hi] <= budget:
                hi, used, grew = hi + 1, used + lens[hi], True
        return lo, hi

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width if self.width is None else min(self.width, options.max_width)
        line = self.prefix.copy()
        avail = max(width - line.cell_len, 4)
        if not self.tokens:
            line.append(DASH)
            yield line
            return
        lo, hi = self.window(avail)
        if lo > 0:
            line.append("…", style="dim")
        for i in range(lo, hi):
            text, act = self.tokens[i], self.acts[i] if i < len(self.acts) else 0.0
            if act > 0 or i == self.position:
                line.append(text, style=_highlight(act / self.scale, bold=i == self.position))
            else:
                line.append(text)
        if hi < len(self.tokens):
            line.append("…", style="dim")
        line.no_wrap = True
        line.overflow = "ellipsis"
        line.truncate(width, overflow="ellipsis")
        yield line


# ---------------------------------------------------------------------------------------------- sections
def _explanation(db: FeatureDB, fid: int) -> tuple[dict[str, Any] | None, list[tuple[str, str, float | None]]]:
    """The newest explanation of `fid` and its scores (all scores when there is no explanation)."""
    expl = db.latest_explanation(fid)
    scores = db.scores(fid)
    if expl is not None and any(m == expl["model"] for m, _, _ in scores):
        scores = [s for s in scores if s[0] == expl["model"]]
    return expl, scores


def _describe(v: Any) -> str:
    """A meta value (string or record) in a few words."""
    if _missing(v):
        return DASH
    if isinstance(v, dict):
        for k in ("id", "name", "path", "spec"):
            if v.get(k):
                return str(v[k])
        return DASH
    return str(v)


def _label_evidence(info: Any, vocab: Sequence[str]) -> str:
    """What the cheap label rests on, in one line: the pass stores {"peak_tokens": [[token, count]], "purity"}
    (a plain list of tokens is accepted too)."""
    def tok(t: Any) -> str:
        return visible(token_text(vocab, t), standalone=True)

    if isinstance(info, list):
        return ", ".join(tok(t[0] if isinstance(t, list) and t else t) for t in info[:LIST_ROWS])
    if not isinstance(info, dict):
        return ""
    peaks = [f"{tok(p[0])} ×{p[1]}" if isinstance(p, list) and len(p) >= 2 else tok(p)
             for p in info.get("peak_tokens") or []]
    out = ("peak tokens " + ", ".join(peaks)) if peaks else ""
    if isinstance(info.get("purity"), int | float):
        out += f"{' · ' if out else ''}purity {info['purity']:.0%}"
    return out


def _header(db: FeatureDB, fid: int, feat: dict[str, Any] | None, meta: dict[str, Any], vocab: Sequence[str]) -> Panel:
    sae = meta.get("sae") if isinstance(meta.get("sae"), dict) else {}
    where = _describe(sae.get("path")) if sae else _describe(meta.get("sae"))
    bits = [b for b in (sae.get("arch"), f"{sae['d_sae']:,} features" if isinstance(sae.get("d_sae"), int) else None)
            if b]
    sae_line = where + (f" ({', '.join(bits)})" if bits else "")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    label = (feat or {}).get("label")
    grid.add_row("label", Text(visible(label) if label else DASH, style="bold cyan" if label else "dim"))
    evidence = _label_evidence((feat or {}).get("label_tokens"), vocab)
    if evidence:
        grid.add_row("label from", Text(evidence, style="dim"))
    expl, scores = _explanation(db, fid)
    if expl is not None:
        grid.add_row("explanation", Text.assemble(expl["text"], (f"  ({expl['model']}, {expl['prompt_version']})",
                                                                 "dim")))
    else:
        grid.add_row("explanation", Text(DASH, style="dim"))
    models = {m for m, _, _ in scores}
    score_txt = "  ".join(f"{s}{f' [{m}]' if len(models) > 1 else ''} {_num(v, '.2f')}" for m, s, v in scores)
    grid.add_row("scores", Text(score_txt or DASH, style="" if score_txt else "dim"))
    grid.add_row("SAE", sae_line)
    grid.add_row("model · hook", f"{_describe(meta.get('model'))} · {_describe(meta.get('hook'))}")
    notes = []
    if not meta.get("complete", True):
        notes.append("database incomplete: monoscope features has not finished (run it again to resume)")
    if feat is None:
        notes.append("no statistics for this feature in the database")
    for n in notes:
        grid.add_row("note", Text(n, style="yellow"))
    return Panel(grid, title=f"[bold]feature {fid}[/]", title_align="left")


def _stats(feat: dict[str, Any], meta: dict[str, Any]) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(justify="right", no_wrap=True)
    d = feat.get("density")
    if _missing(d):
        dens = DASH
    elif d <= 0:
        dens = "0 % (never fired)"
    else:
        dens = f"{d:.3%}".replace("%", " %") + f"  (1 in {1 / d:,.0f} tokens)"
    t.add_row("density", dens)
    t.add_row("fires", _num(feat.get("fires"), ","))
    t.add_row("tokens seen", _num(meta.get("tokens") if isinstance(meta.get("tokens"), int) else None, ","))
    t.add_row("max act", _num(feat.get("max_act"), ".4g"))
    t.add_row("mean act (active)", _num(feat.get("mean_act"), ".4g"))
    t.add_row("interest", _num(feat.get("interest"), ".3g"))
    mx, my = feat.get("map_x"), feat.get("map_y")
    t.add_row("map position", DASH if _missing(mx) or _missing(my) else f"({mx:.2f}, {my:.2f})")
    return t


def _bar(frac: float, width: int) -> str:
    """A horizontal bar of `frac` × `width` cells, in eighths of a cell."""
    eighths = round(min(max(frac, 0.0), 1.0) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + ("" if part == 0 else " ▏▎▍▌▋▊▉"[part])


def _histogram(hist: Any, bar_width: int = 24) -> RenderableType:
    """Counts per log-spaced activation bin, bars ∝ log(1 + count) so the rare strong tail stays visible."""
    if not isinstance(hist, dict):
        return Text(DASH, style="dim")
    edges, counts = hist.get("edges"), hist.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or not counts or len(edges) != len(counts) + 1:
        return Text(DASH, style="dim")
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return Text("no activations", style="dim")
    lo, hi = nz[0], nz[-1] + 1  # drop empty bins at either end
    step = -(-(hi - lo) // HIST_ROWS)
    rows = [(edges[i], edges[min(i + step, hi)], sum(counts[i:min(i + step, hi)])) for i in range(lo, hi, step)]
    top = math.log1p(max(c for _, _, c in rows))
    t = Table.grid(padding=(0, 1))
    t.add_column(justify="right", style="dim", no_wrap=True)
    t.add_column(no_wrap=True, style="dark_orange")
    t.add_column(justify="right", no_wrap=True)
    for a, b, c in rows:
        t.add_row(f"{a:.3g}–{b:.3g}", _bar(math.log1p(c) / top if top else 0.0, bar_width), f"{c:,}")
    return t


def _contexts(db: FeatureDB, fid: int, vocab: Vocab, scale: float, n_top: int, n_per_bin: int,
              width: int | None) -> list[RenderableType]:
    def line(ex: dict[str, Any]) -> ContextLine:
        toks = [(i, int(t)) for i, t in enumerate(ex["tokens"]) if t >= 0]  # negative ids: padding
        keep = [i for i, _ in toks]
        pos = keep.index(ex["position"]) if ex["position"] in keep else 0
        prefix = Text.assemble((f"{ex['act']:>8.3g}", "bold"), " ")
        texts, acts, pos = vocab.window([t for _, t in toks], [float(ex["acts"][i]) if i < len(ex["acts"]) else 0.0
                                                               for i in keep], pos)
        return ContextLine(prefix, [visible(t) for t in texts], acts, pos, scale, width)

    out: list[RenderableType] = [Rule(Text("top activations", style="bold"), align="left", style="dim")]
    top = db.examples(fid, "top")[:n_top]
    out += [line(ex) for ex in top] or [Text(DASH, style="dim")]
    out.append(Rule(Text.assemble(("quantiles", "bold"), " (strongest first)"), align="left", style="dim"))
    by_bin: dict[int, list[dict[str, Any]]] = {}
    for ex in db.examples(fid, "quantile"):  # ordered bin DESC, rank
        by_bin.setdefault(int(ex["bin"]), []).append(ex)
    if not by_bin or n_per_bin <= 0:
        out.append(Text(DASH, style="dim"))
    bins = db.meta().get("bins")  # the pass's bin count when recorded, else deciles (its default)
    n_bins = max(bins if isinstance(bins, int) else 10, max(by_bin, default=-1) + 1)
    for b, exs in by_bin.items() if n_per_bin > 0 else ():
        acts = [e["act"] for e in exs]
        span = f"{min(acts):.3g}" if min(acts) == max(acts) else f"{min(acts):.3g}–{max(acts):.3g}"
        out.append(Text(f"decile {b + 1}/{n_bins}  act {span}", style="dim italic"))
        out += [line(ex) for ex in exs[:n_per_bin]]
    return out


def _logits(feat: dict[str, Any], vocab: Sequence[str]) -> Table:
    t = Table(box=None, padding=(0, 1), show_edge=False)
    t.add_column("promoted", style="green", no_wrap=True, overflow="ellipsis", max_width=22)
    t.add_column("", justify="right", style="green", no_wrap=True)
    t.add_column("suppressed", style="red", no_wrap=True, overflow="ellipsis", max_width=22)
    t.add_column("", justify="right", style="red", no_wrap=True)

    def entries(v: Any) -> list[tuple[str, str]]:
        rows = []
        for e in v if isinstance(v, list) else []:
            if isinstance(e, list | tuple) and len(e) >= 2:
                rows.append((visible(token_text(vocab, e[0]), standalone=True), _num(e[1], "+.3g")))
        return rows[:LIST_ROWS]

    pos, neg = entries(feat.get("logit_pos")), entries(feat.get("logit_neg"))
    for i in range(max(len(pos), len(neg), 1)):
        p = pos[i] if i < len(pos) else ((DASH, "") if i == 0 else ("", ""))
        n = neg[i] if i < len(neg) else ((DASH, "") if i == 0 else ("", ""))
        t.add_row(*p, *n)
    return t


def _labels(db: FeatureDB, ids: Iterable[int]) -> dict[int, str | None]:
    out: dict[int, str | None] = {}
    for i in ids:
        f = db.feature(i)
        out[i] = None if f is None else f.get("label")
    return out


def _related(db: FeatureDB, value: Any, fmt: str) -> Table:
    """Neighbours or co-occurring features: [[id, number], ...] with each one's cheap label."""
    t = Table(box=None, padding=(0, 1), show_header=False, show_edge=False)
    t.add_column(justify="right", no_wrap=True, style="cyan")
    t.add_column(justify="right", no_wrap=True)
    t.add_column(no_wrap=True, overflow="ellipsis", max_width=28)
    pairs = [(int(e[0]), e[1]) for e in (value if isinstance(value, list) else [])
             if isinstance(e, list | tuple) and len(e) >= 2 and isinstance(e[0], int | float)][:LIST_ROWS]
    labels = _labels(db, (i for i, _ in pairs))
    for i, v in pairs:
        lab = labels.get(i)
        t.add_row(f"#{i}", _num(v, fmt), Text(lab or DASH, style="" if lab else "dim"))
    if not pairs:
        t.add_row(DASH, "", "")
    return t


def _family(db: FeatureDB, fid: int, meta: dict[str, Any]) -> Table:
    t = Table(box=None, padding=(0, 1), show_header=False, show_edge=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    key = meta.get("sae_key")
    if not isinstance(key, str) or not key:
        t.add_row("parent", Text(DASH, style="dim"))
        t.add_row("children", Text(DASH + " (no sae_key in the database)", style="dim"))
        return t

    def rel(sae: str, i: int, cos: float, corr: float | None) -> str:
        return f"{sae}#{i} (cos {cos:.2f}" + ("" if _missing(corr) else f", corr {corr:.2f}") + ")"

    parents = [rel(p["parent_sae"], p["parent"], p["cosine"], p["corr"]) for p in db.parent(key, fid)]
    children = [rel(c["child_sae"], c["child"], c["cosine"], c["corr"]) for c in db.children(key, fid)]
    t.add_row("this", f"{key}#{fid}")
    t.add_row("parent", ", ".join(parents) or DASH)
    t.add_row("children", ", ".join(children[:LIST_ROWS]) or DASH)
    return t


class SideBySide:
    """Two titled sections in two columns when the width allows, else one under the other (narrow terminals)."""

    MIN_WIDTH = 90

    def __init__(self, left: tuple[str, RenderableType], right: tuple[str, RenderableType]) -> None:
        self.left, self.right = left, right

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if options.max_width >= self.MIN_WIDTH:
            grid = Table.grid(padding=(0, 4))
            grid.add_column()
            grid.add_column()
            grid.add_row(Text(self.left[0], style="bold"), Text(self.right[0], style="bold"))
            grid.add_row(self.left[1], self.right[1])
            yield grid
            return
        yield Text(self.left[0], style="bold")
        yield self.left[1]
        yield Text(self.right[0], style="bold")
        yield self.right[1]


def render_feature(db: FeatureDB, fid: int, *, width: int | None = None, n_top: int = 10,
                   n_per_bin: int = 2) -> Group:
    """The dashboard of feature `fid` as one rich renderable.

    `width` caps the page (None: the console's width); context lines are cut to it around their max
    token. Highlight intensity is act / the feature's max_act, so contexts compare across the page.
    """
    fid = int(fid)
    meta = db.meta()
    feat = db.feature(fid)
    f = feat or {}
    vocab = Vocab(db.vocab(), db.vocab_bytes())
    max_act = f.get("max_act")
    scale = float(max_act) if not _missing(max_act) and max_act > 0 else 0.0  # 0: each example's own max
    sections = [
        (("statistics", _stats(f, meta)), ("activation histogram (bars ∝ log count)", _histogram(f.get("hist")))),
        (("logit effects", _logits(f, vocab.texts)), ("family (splits across SAE widths)", _family(db, fid, meta))),
        (("nearest by decoder cosine", _related(db, f.get("neighbours"), ".3f")),
         ("co-occurring: P(j fires | this fires)", _related(db, f.get("cooccur"), ".1%"))),
    ]
    parts: list[RenderableType] = [
        _header(db, fid, feat, meta, vocab.texts), SideBySide(*sections[0]),
        *_contexts(db, fid, vocab, scale, n_top, n_per_bin, width),
        Rule(style="dim"), SideBySide(*sections[1]), Text(""), SideBySide(*sections[2]),
    ]
    inner = Group(*parts)
    return Group(Constrain(inner, width)) if width is not None else inner


# ---------------------------------------------------------------------------------------------- command
def _feature_count(db: FeatureDB) -> int:
    """Features of the SAE: meta sae.d_sae when the pass recorded it, else the rows present."""
    sae = db.meta().get("sae")
    d = sae.get("d_sae") if isinstance(sae, dict) else None
    return int(d) if isinstance(d, int) and not isinstance(d, bool) else db.n_features()


def parse_feature_id(value: Any, n: int, where: Path) -> int:
    """A feature id from the command line, or a one-line error naming the valid range."""
    rng = f"0 to {n - 1}" if n > 0 else "none yet"
    try:
        if isinstance(value, bool | float):
            raise ValueError
        fid = int(str(value).strip())
    except ValueError:
        raise MonoscopeError(f"feature id {value!r} is not an integer: pass a feature number ({rng} in "
                             f"{where})") from None
    if n <= 0:
        raise MonoscopeError(f"{where} has no features yet: run monoscope features SAE_DIR to build it")
    if not 0 <= fid < n:
        raise MonoscopeError(f"feature {fid} is out of range: {where} has features {rng}")
    return fid


def show(sae_dir: str | Path, feature_id: int | str, db_path: str | Path | None = None, *, n_examples: int = 10,
         console: Console | None = None) -> None:
    """Print the dashboard of one feature; every problem a user can fix is a one-line MonoscopeError. When the
    SAE folder exists, the database must have been built for its weights."""
    if n_examples < 0:
        raise MonoscopeError(f"--examples {n_examples} is negative: pass 0 or more contexts to show")
    with open_for_sae(sae_dir, db_path) as db:
        path = db.path
        fid = parse_feature_id(feature_id, _feature_count(db), path)
        page = render_feature(db, fid, n_top=n_examples, n_per_bin=-(-n_examples // 5))
        console = console or Console()
        console.print(page)
        console.print(Text(f"from {path}", style="dim"))


def add_show_parser(subparsers: Any) -> None:
    """Register `monoscope show` (called by monoscope.cli.build_parser)."""
    p = subparsers.add_parser(
        "show", help="one feature's dashboard in the terminal (from the database of monoscope features)",
        description="Print a feature page: label and explanation, density and activation histogram, top and "
        "quantile contexts with active tokens highlighted, logit effects, neighbours, co-occurring features and "
        "family, read from the feature database (no model needed).")
    p.add_argument("sae", metavar="SAE_DIR", help="SAE folder the database was built for")
    p.add_argument("feature_id", metavar="FEATURE_ID", help="feature number, 0-based")
    p.add_argument("--db", default=None,
                   help="feature database (default: runs/x/features/features.db for runs/x/sae, else "
                        "SAE_DIR-features/features.db)")
    p.add_argument("--examples", type=int, default=10,
                   help="top contexts to show (default 10); each quantile bin shows a fifth as many")
    p.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    show(args.sae, args.feature_id, db_path=args.db, n_examples=args.examples)
    return 0
