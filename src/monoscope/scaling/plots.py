"""The sweep's PNG: held-out loss against training compute, the fitted law, the frontier and the pick."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from monoscope.eval.plots import _save

if TYPE_CHECKING:
    from monoscope.scaling.sweep import SweepResult


def frontier_plot(res: SweepResult, path: Path) -> Path:
    """Left: measured loss vs FLOPs per width (points), the fitted L(n, T) along each width (lines),
    the compute-optimal frontier of the law (dashed), the held-out largest run and the pick (star, 90%
    interval). Right (topk): loss vs width per k with Gao et al.'s L(n, k)."""
    cost = res.cost
    ncols = 2 if res.lnk is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7.5 * ncols, 4.6), squeeze=False)
    ax = axes[0, 0]
    k0 = res.points[0]["k"]
    nt = [r for r in res.points if r["k"] == k0]
    widths = sorted({r["width"] for r in nt})
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(widths)))
    t_all = np.array([r["tokens"] for r in nt], float)
    for w, c in zip(widths, colours, strict=True):
        rs = [r for r in nt if r["width"] == w]
        f = np.array([cost.flops(w, r["tokens"]) for r in rs])
        ax.scatter(f, [r["heldout"]["fvu" if res.holdout["metric"] == "fvu" else "mse"] for r in rs], color=c, s=18,
                   label=f"n = {w:,}")
        ts = np.geomspace(t_all.min() / 2, t_all.max() * 4, 50)
        ax.plot(cost.flops_per_token(w) * ts, res.lnt.predict(w, ts), color=c, lw=1)
    h = res.holdout
    ax.scatter([cost.flops(h["width"], h["tokens"])], [h["predicted"]], marker="x", color="#c0392b", s=50,
               label=f"largest run predicted without it ({h['relative_error']:+.1%})")
    fr = _frontier_points(res)
    if fr:
        ax.plot([p[0] for p in fr], [p[1] for p in fr], "k--", lw=1, label="compute-optimal frontier (fit)")
    p = res.pick
    pf = cost.flops(p.width, p.tokens)
    err = [[max(p.predicted - p.interval[0], 0.0)], [max(p.interval[1] - p.predicted, 0.0)]]
    ax.errorbar([pf], [p.predicted], yerr=err,
                fmt="*", color="#e67e22", ms=12, capsize=3,
                label=f"pick: n = {p.width:,}, {p.steps:,} steps ({res.budget.text})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(f"held-out {res.holdout['metric'].upper()}")
    ax.set_title(f"L(n,T) = E + A n^-{res.lnt.params['alpha']:.2f} + B T^-{res.lnt.params['beta']:.2f}")
    ax.legend(fontsize=7)
    if res.lnk is not None:
        ax2 = axes[0, 1]
        t_max = max(r["tokens"] for r in res.points)
        kr = [r for r in res.points if r["tokens"] == t_max]
        ks = sorted({r["k"] for r in kr})
        ns = np.geomspace(min(r["width"] for r in kr) / 1.5, max(r["width"] for r in kr) * 4, 50)
        for kk, c in zip(ks, plt.cm.plasma(np.linspace(0, 0.8, len(ks))), strict=True):
            rs = [r for r in kr if r["k"] == kk]
            ax2.scatter([r["width"] for r in rs], [r["heldout"][res.holdout["metric"]] for r in rs], color=c, s=18,
                        label=f"k = {kk}")
            ax2.plot(ns, res.lnk.predict(ns, kk), color=c, lw=1)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("features n")
        ax2.set_ylabel(f"held-out {res.holdout['metric'].upper()}")
        ax2.set_title(f"Gao et al. L(n,k) at {t_max:,} tokens")
        ax2.legend(fontsize=7)
    return _save(fig, path)


def _frontier_points(res: SweepResult) -> list[tuple[float, float]]:
    from monoscope.errors import MonoscopeError
    from monoscope.scaling.fit import pick_for_budget

    c = [res.cost.flops(r["width"], r["tokens"]) for r in res.points]
    batch = res.cost.batch_size
    out = []
    for b in np.geomspace(min(c) / 2, max(c) * 8, 30):
        try:
            pk = pick_for_budget(res.lnt, res.cost.flops_per_token, float(b), batch_size=batch,
                                 n_min=max(res.cost.k or 1, 1), n_max=max(r["width"] for r in res.points) * 256,
                                 points=121)
        except MonoscopeError:
            continue
        out.append((res.cost.flops(pk.width, pk.tokens), pk.predicted))
    return out
