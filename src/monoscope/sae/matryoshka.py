"""Matryoshka SAE: a BatchTopK SAE whose nested prefixes are each trained to reconstruct the input
(Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with Matryoshka SAEs";
Nabeshima 2024, "Matryoshka Sparse Autoencoders").

Selection is BatchTopK's (k·B entries per training batch, one global threshold θ at inference,
recalibrated from data after training); see `topk.py`. With prefix widths P_1 < ... < P_M = d_sae
(`cfg.prefixes`), the reconstruction from the first P_m features alone is

    x̂_m = Σ_{active i < P_m} f_i W_dec[i] + b_dec            (x̂_M = x̂, the SAE's output)

and the loss is Σ_m ‖x − x̂_m‖² (mean over the batch), as SAELens's `matryoshka_batchtopk` computes
it: `mse` holds the outer level ‖x − x̂‖², `aux` the inner levels m < M plus AuxK (on the full
residual, SAELens's default). Early features must reconstruct on their own, so general features
stay in the small prefixes instead of being absorbed into specific ones.

The groups between prefixes are decoded in one sparse decode over (row, group) bags (each active
entry once) and summed cumulatively, so the M levels cost one sparse decode plus a [B, M, d_in] cumsum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from monoscope.sae.base import ForwardOutput, fired_from_sparse
from monoscope.sae.config import SAEConfig
from monoscope.sae.sparse import SparsePattern
from monoscope.sae.topk import BatchTopKSAE


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK selection; every prefix `cfg.prefixes[m]` of the dictionary reconstructs x."""

    arch = "matryoshka"

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)

    def _level_decodes(self, vals: Tensor, pattern: SparsePattern, cd: torch.dtype, dense: bool) -> list[Tensor]:
        """[Σ_{active i < P_m} vals_i W_dec[i] for each prefix m] ([B, d_in] float32 each, no bias)."""
        prefixes = list(self.cfg.prefixes or [self.cfg.d_sae])
        n_rows = pattern.n_rows
        if dense:
            f = torch.zeros(n_rows, self.cfg.d_sae, dtype=cd, device=vals.device)
            f = f.index_put((pattern.rows, pattern.flat), vals.reshape(-1).to(cd))  # [B, F]
            w = self.W_dec.to(cd)
            parts = [(f[:, a:b] @ w[a:b]).float() for a, b in zip([0, *prefixes[:-1]], prefixes, strict=True)]
            out, acc = [], None
            for p in parts:
                acc = p if acc is None else acc + p
                out.append(acc)
            return out
        # Entries are row-major and, within a row, in feature order (batch top-k and the eval threshold
        # both give them so), so the entries of (row b, group g) are contiguous: one embedding-bag over
        # B·M bags decodes every group of every row at once, and a cumulative sum gives the levels.
        m = len(prefixes)
        group = torch.bucketize(pattern.flat, pattern.flat.new_tensor(prefixes), right=True)  # [nnz] in 0..M-1
        counts = torch.bincount(pattern.rows * m + group, minlength=n_rows * m)  # [B·M]
        bags = SparsePattern(pattern.flat, self.cfg.d_sae, counts.cumsum(0) - counts)
        parts = self._sparse_decode(vals.reshape(-1), bags, cd).float()
        levels = parts.view(n_rows, m, -1).cumsum(1)  # [B, M, d]
        return list(levels.unbind(1))

    def forward(  # type: ignore[override]
        self, x: Tensor, sparsity_coef: float = 0.0, dead_mask: Tensor | None = None
    ) -> ForwardOutput:
        sel = self._encode_selected(x)
        cd, x32, x_c, dense, vals, pattern, indices, offsets = sel[:8]  # vals [nnz]
        levels = self._level_decodes(vals, pattern, cd, dense)
        b_dec = self.b_dec.float()
        x_hat = levels[-1] + b_dec  # [B, d]
        inner = sum(((x32 - (lv + b_dec)).pow(2).sum(-1).mean() for lv in levels[:-1]), x_hat.new_zeros(()))
        auxk = self._auxk(x_c, x32 - x_hat, dead_mask, cd, sel)
        aux = inner if auxk is None else inner + auxk
        with torch.no_grad():
            l0 = (vals > 0).sum(dtype=torch.float32) / x.shape[0]
            fired = fired_from_sparse(pattern.flat, vals.reshape(-1), self.cfg.d_sae)
        return self._output(x32, x_hat, vals, indices, offsets, None, aux, l0, fired)
