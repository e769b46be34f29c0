"""PNG plots of an evaluation (matplotlib, headless Agg backend). Each returns the file it wrote."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from monoscope.eval.metrics import DENSE_THRESHOLD, ReconMetrics
from monoscope.eval.splice import LMMetrics
from monoscope.fileio import write_bytes_atomic


def _save(fig: plt.Figure, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


def density_histogram(density: np.ndarray, rows: int, path: Path, title: str = "") -> Path:
    """Feature density on a log10 scale, as in Scaling Monosemanticity; dead features counted aside."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    live = density[density > 0]
    dead = int((density == 0).sum())
    lo = math.floor(math.log10(1 / max(rows, 1)))
    if live.size:
        ax.hist(np.log10(live), bins=np.linspace(lo, 0, 61), color="#3b6ea8")
    ax.axvline(math.log10(DENSE_THRESHOLD), color="#c0392b", ls="--", lw=1, label="dense (10%)")
    ax.set_xlabel("log10 feature density (fraction of tokens active)")
    ax.set_ylabel("features")
    ax.set_title(f"{title}feature density over {rows:,} tokens; {dead:,} of {density.size:,} never active")
    ax.legend(loc="upper left", frameon=False)
    return _save(fig, path)


def l0_histogram(m: ReconMetrics, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.4))
    counts = np.asarray(m.l0_hist)
    ax.bar(np.arange(counts.size), counts, width=1.0, color="#3b6ea8")
    ax.axvline(m.l0_mean, color="#c0392b", lw=1, label=f"mean {m.l0_mean:.1f}")
    ax.set_xlabel("active features per token (L0)")
    ax.set_ylabel("tokens")
    ax.set_title(f"L0 over {m.rows:,} tokens")
    ax.legend(frameon=False)
    return _save(fig, path)


def fvu_by_position(series: dict[str, ReconMetrics], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for name, m in series.items():
        ys = np.array([np.nan if v is None else v for v in m.fvu_by_position], dtype=float)
        ax.plot(np.arange(ys.size), ys, lw=1.2, label=f"{name} (FVU {m.fvu:.3f})")
    ax.set_xlabel("token position in context")
    ax.set_ylabel("FVU")
    ax.set_ylim(bottom=0)
    ax.set_title("fraction of variance unexplained by token position")
    ax.legend(frameon=False)
    return _save(fig, path)


def loss_bars(lmm: LMMetrics, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = ["clean", "SAE spliced", "zero-ablated"]
    vals = [lmm.ce_clean, lmm.ce_spliced, lmm.ce_zero]
    if lmm.ce_error is not None:
        names.insert(2, "spliced + error")
        vals.insert(2, lmm.ce_error)
    bars = ax.bar(names, vals, color=["#7f8c8d", "#3b6ea8", "#95a5a6", "#c0392b"][: len(vals)])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"CE recovered {lmm.ce_recovered:.1%}, KL(clean‖spliced) {lmm.kl_spliced:.3f} "
                 f"over {lmm.predictions:,} predictions")
    return _save(fig, path)
