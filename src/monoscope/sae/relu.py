"""ReLU SAE with a decoder-norm-weighted L1 penalty: the *Scaling Monosemanticity* recipe.

    f = ReLU(W_enc x + b_enc)                     [B, d_sae]
    x̂ = f W_dec + b_dec                           [B, d_in]
    L = mean_b ‖x − x̂‖² + λ · mean_b Σ_i f_i ‖W_dec[i]‖₂

The decoder is left unconstrained: the L1 term sees its norms, so shrinking f while growing
W_dec does not pay. λ is passed to every `forward` call because the trainer warms it up linearly
over the first ~5% of steps. Nothing needs calling after the optimiser step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from monoscope.sae.base import SAE, ForwardOutput
from monoscope.sae.config import SAEConfig


class ReluL1SAE(SAE):
    arch = "relu-l1"

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        self._finish_init(generator)

    def _acts(self, x_c: Tensor, cd: torch.dtype) -> Tensor:
        pre = F.linear(x_c, self.W_enc.to(cd), self.b_enc.to(cd))  # [B, F] compute dtype
        return F.relu(pre, inplace=True)  # addmm's backward does not need its output

    def encode(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype(x.device)
        _, x_c = self._prepare_input(x, cd)
        return self._acts(x_c, cd).float()

    def forward(  # type: ignore[override]
        self, x: Tensor, sparsity_coef: float = 0.0, dead_mask: Tensor | None = None
    ) -> ForwardOutput:
        cd = self.compute_dtype(x.device)
        x32, x_c = self._prepare_input(x, cd)
        f = self._acts(x_c, cd)  # [B, F]
        x_hat = (f @ self.W_dec.to(cd)).float() + self.b_dec.float()  # [B, d]
        # Σ_b f[b, i] accumulated in float32 without materialising a float32 copy of f.
        f_sum = torch.sum(f, dim=0, dtype=torch.float32)  # [F]
        l1 = (f_sum * self.decoder_norms()).sum() / x.shape[0]
        with torch.no_grad():
            l0 = torch.count_nonzero(f).float() / x.shape[0]
            fired = f_sum > 0  # f >= 0, so a positive column sum means it fired
        return self._output(x32, x_hat, f, None, None, sparsity_coef * l1, None, l0, fired)
