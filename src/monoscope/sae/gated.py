"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

One encoder matrix serves two paths (the paper's weight sharing, W_mag = exp(r_mag) ⊙ W_gate):

    z      = W_enc (x − b_dec)                          [B, d_sae] (b_dec subtracted by default)
    π_gate = z + b_enc                                  b_enc is the paper's b_gate
    π_mag  = exp(r_mag) ⊙ z + b_mag
    f      = 1[π_gate > 0] ⊙ ReLU(π_mag)                which features fire, and how strongly
    x̂      = f W_dec + b_dec

Loss (the paper's eq. 9, with SAELens's decoder-norm weighting of the L1 term):
    L = ‖x − x̂‖²  +  λ · Σ_i ReLU(π_gate)_i ‖W_dec[i]‖₂  +  ‖x − (ReLU(π_gate) W_decᵀ + b_dec)_frozen‖²
The Heaviside gate passes no gradient, so the gate path learns from the L1 term and the auxiliary
reconstruction (third term), in which the decoder is frozen (detached), as the paper specifies;
SAELens leaves the decoder unfrozen there. `sparsity` holds the L1 term, `aux` the auxiliary
reconstruction. The decoder is unconstrained (the L1 term sees its norms), as for relu-l1.

Speed: every term lives on the entries where π_gate > 0; once at most `cfg.sparse_max_density` of
them are, the batch takes the sparse kernels (as relu-l1 does), otherwise plain dense autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoscope.sae.base import SAE, ForwardOutput, fired_from_sparse
from monoscope.sae.config import SAEConfig
from monoscope.sae.sparse import gather_linear


class GatedSAE(SAE):
    arch = "gated"
    unit_norm_decoder = False
    per_feature_extras = ("r_mag", "b_mag")

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))  # [F] log-scale of the magnitude path
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))  # [F]
        self._finish_init(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if hasattr(self, "r_mag"):
            self.r_mag.zero_()
            self.b_mag.zero_()

    def _paths(self, z: Tensor, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(π_gate, π_mag) float32 from z (dense [B, F], or entries of features `idx`)."""
        b_gate, r_mag, b_mag = self.b_enc.float(), self.r_mag.float(), self.b_mag.float()
        if idx is not None:
            b_gate, r_mag, b_mag = b_gate[idx], r_mag[idx], b_mag[idx]
        z = z.float()
        return z + b_gate, z * r_mag.exp() + b_mag

    def encode(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype(x.device)
        _, x_c = self._prepare_input(x, cd)
        pi_gate, pi_mag = self._paths(F.linear(x_c, self.W_enc.to(cd)))
        return (pi_gate > 0) * torch.relu(pi_mag)

    def forward(  # type: ignore[override]
        self, x: Tensor, sparsity_coef: float = 0.0, dead_mask: Tensor | None = None
    ) -> ForwardOutput:
        cd = self.compute_dtype(x.device)
        x32, x_c = self._prepare_input(x, cd)
        n_rows = x.shape[0]
        norms = self.decoder_norms()  # [F]
        # one encoder matmul: with autograd (its graph holds only x_c and W_enc until the dense path uses it)
        z_all = F.linear(x_c, self.W_enc.to(cd))  # [B, F]
        z0 = z_all.detach()
        with torch.no_grad():
            pattern = self._active_pattern(z0.float() + self.b_enc.float() > 0)
        w_frozen, b_frozen = self.W_dec.detach(), self.b_dec.detach().float()
        if pattern is None:  # dense codes
            pi_gate, pi_mag = self._paths(z_all)
            gate = torch.relu(pi_gate)  # [B, F]
            f = (pi_gate.detach() > 0) * torch.relu(pi_mag)  # [B, F]
            x_hat = (f.to(cd) @ self.W_dec.to(cd)).float() + self.b_dec.float()
            via_gate = (gate.to(cd) @ w_frozen.to(cd)).float() + b_frozen
            l1 = (gate.sum(0) * norms).sum() / n_rows
            with torch.no_grad():
                l0 = (f > 0).sum(dtype=torch.float32) / n_rows
                fired = (f > 0).any(0)
            aux = (x32 - via_gate).pow(2).sum(-1).mean()
            return self._output(x32, x_hat, f, None, None, sparsity_coef * l1, aux, l0, fired)
        xs, shift = self._sparse_encoder_input(x32, x_c)
        no_bias = torch.zeros(self.cfg.d_sae, dtype=self.b_enc.dtype, device=x.device)
        z = gather_linear(z0[pattern.rows, pattern.flat], xs, self.W_enc, no_bias, pattern, shift)  # [nnz]
        pi_gate, pi_mag = self._paths(z, pattern.flat)  # [nnz] each; π_gate > 0 on every entry
        f = torch.relu(pi_mag)
        w_c = self.decoder_in(cd)
        x_hat = self._sparse_decode(f, pattern, cd, weight_c=w_c).float() + self.b_dec.float()
        gate = torch.relu(pi_gate)
        via_gate = self._sparse_decode(gate, pattern, cd, weight=w_frozen, weight_c=w_c).float() + b_frozen
        l1 = (gate * norms[pattern.flat]).sum() / n_rows
        with torch.no_grad():
            l0 = (f > 0).sum(dtype=torch.float32) / n_rows
            fired = fired_from_sparse(pattern.flat, f, self.cfg.d_sae)
        aux = (x32 - via_gate).pow(2).sum(-1).mean()
        return self._output(x32, x_hat, f, pattern.flat, pattern.offsets, sparsity_coef * l1, aux, l0, fired)
