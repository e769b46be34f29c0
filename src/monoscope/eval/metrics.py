"""Reconstruction metrics, accumulated batch by batch in float64 so a million tokens sum exactly enough.

Every number compares raw activations x with the SAE's raw reconstruction x̂ = decode(encode(c·x)) / c:
the input-scaling constant c is applied and removed inside the SAE (`SAE.reconstruct_raw`), never here.

    FVU                = Σ‖x − x̂‖² / Σ‖x − x̄‖²       (x̄: mean over the evaluated rows)
    explained variance = 1 − FVU
    L0                 = active features per row; its mean and its histogram
    density_i          = fraction of rows on which feature i is active
    dead               = density 0 over the evaluated rows; dense = density > 0.1 (the paper's 10%)
    shrinkage          = mean over rows of ‖x̂‖ / ‖x‖ (< 1: the sparsity penalty shrinks activations);
                         also Σ⟨x̂, x⟩ / Σ‖x‖², the least-squares scale of x̂ onto x
    FVU by position    = Σ_p ‖x − x̂‖² / Σ_p ‖x − x̄‖² over the rows at token position p (same x̄)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

DENSE_THRESHOLD = 0.1
"""A feature active on more than this fraction of tokens counts as dense (Scaling Monosemanticity)."""


@dataclass(frozen=True)
class ReconMetrics:
    """Faithfulness of the reconstruction on the evaluated rows (module docstring for definitions)."""

    rows: int
    fvu: float
    explained_variance: float
    mse: float
    """Mean over rows of ‖x − x̂‖² (raw scale)."""
    l0_mean: float
    l0_hist: list[int]
    """l0_hist[n] = rows with exactly n active features (up to the largest L0 seen)."""
    dead_frac: float
    dense_frac: float
    shrinkage_norm_ratio: float
    shrinkage_projection: float
    fvu_by_position: list[float | None]
    """Per token position (None where no row was evaluated, e.g. the BOS when the row policy drops it)."""
    rows_by_position: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReconAccumulator:
    """Sums over batches of (x, x̂, active mask, positions); `result()` turns them into ReconMetrics."""

    def __init__(self, d_sae: int, ctx_len: int) -> None:
        self.d_sae = d_sae
        self.ctx_len = ctx_len
        f64 = torch.float64
        self.n = 0
        self.sum_x: Tensor | None = None  # [d]
        self.sum_sq = torch.zeros((), dtype=f64)  # Σ‖x‖²
        self.sse = torch.zeros((), dtype=f64)  # Σ‖x − x̂‖²
        self.dot = torch.zeros((), dtype=f64)  # Σ⟨x̂, x⟩
        self.ratio = torch.zeros((), dtype=f64)  # Σ ‖x̂‖/‖x‖
        self.fires = torch.zeros(d_sae, dtype=torch.int64)
        self.l0_counts = torch.zeros(d_sae + 1, dtype=torch.int64)
        self.pos_n = torch.zeros(ctx_len, dtype=torch.int64)
        self.pos_sse = torch.zeros(ctx_len, dtype=f64)
        self.pos_sum_x: Tensor | None = None  # [ctx_len, d]
        self.pos_sum_sq = torch.zeros(ctx_len, dtype=f64)

    def add(self, x: Tensor, x_hat: Tensor, active: Tensor, positions: Tensor) -> None:
        """x, x̂ [N, d] raw scale; active [N, d_sae] bool (or the features, nonzero = active);
        positions [N] int token position of each row in its context."""
        x64, xh64 = x.double(), x_hat.double()
        err = (x64 - xh64).square().sum(1)  # [N]
        sq = x64.square().sum(1)  # [N]
        pos = positions.long().cpu()
        if self.sum_x is None:
            self.sum_x = torch.zeros(x.shape[1], dtype=torch.float64)
            self.pos_sum_x = torch.zeros(self.ctx_len, x.shape[1], dtype=torch.float64)
        assert self.pos_sum_x is not None
        self.n += x.shape[0]
        self.sum_x += x64.sum(0).cpu()
        self.sum_sq += sq.sum().cpu()
        self.sse += err.sum().cpu()
        self.dot += (x64 * xh64).sum().cpu()
        self.ratio += (xh64.norm(dim=1) / x64.norm(dim=1).clamp_min(1e-12)).sum().cpu()
        on = active if active.dtype == torch.bool else active != 0
        self.fires += on.sum(0).cpu()
        self.l0_counts += torch.bincount(on.sum(1).cpu(), minlength=self.d_sae + 1)
        self.pos_n += torch.bincount(pos, minlength=self.ctx_len)
        self.pos_sse.index_add_(0, pos, err.cpu())
        self.pos_sum_sq.index_add_(0, pos, sq.cpu())
        self.pos_sum_x.index_add_(0, pos, x64.cpu())

    def result(self) -> ReconMetrics:
        if self.n == 0 or self.sum_x is None or self.pos_sum_x is None:
            raise ValueError("no rows were evaluated")
        n = self.n
        mean = self.sum_x / n
        sst = float(self.sum_sq - n * mean.square().sum())
        fvu = float(self.sse) / sst if sst > 0 else float("nan")
        # Σ_p ‖x − x̄‖² = Σ_p ‖x‖² − 2⟨Σ_p x, x̄⟩ + n_p ‖x̄‖²
        pos_sst = self.pos_sum_sq - 2 * self.pos_sum_x @ mean + self.pos_n.double() * mean.square().sum()
        by_pos: list[float | None] = [
            float(e / t) if c > 0 and t > 0 else None
            for e, t, c in zip(self.pos_sse.tolist(), pos_sst.tolist(), self.pos_n.tolist(), strict=True)
        ]
        counts = self.l0_counts
        top = int(torch.nonzero(counts).max()) if bool(counts.any()) else 0
        l0_mean = float((counts.double() * torch.arange(len(counts), dtype=torch.float64)).sum() / n)
        density = self.fires.double() / n
        return ReconMetrics(
            rows=n, fvu=fvu, explained_variance=1.0 - fvu, mse=float(self.sse) / n, l0_mean=l0_mean,
            l0_hist=counts[: top + 1].tolist(), dead_frac=float((self.fires == 0).double().mean()),
            dense_frac=float((density > DENSE_THRESHOLD).double().mean()),
            shrinkage_norm_ratio=float(self.ratio) / n, shrinkage_projection=float(self.dot / self.sum_sq),
            fvu_by_position=by_pos, rows_by_position=self.pos_n.tolist(),
        )

    def density(self) -> Tensor:
        """[d_sae] float64 fraction of evaluated rows on which each feature was active."""
        return self.fires.double() / max(self.n, 1)
