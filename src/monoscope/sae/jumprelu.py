"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

    pre = ReLU(W_enc x + b_enc)                              [B, d_sae]
    f   = pre · H(pre − θ)        θ = exp(log_threshold)    per-feature, kept in float32
    x̂   = f W_dec + b_dec
    L   = mean_b ‖x − x̂‖² + λ · mean_b Σ_i H(pre_i − θ_i)   (plain L0, no tanh, no decoder norms)

H has no useful derivative, so θ learns through straight-through estimators with a rectangle
kernel K(u) = 1{|u| < 1/2} of bandwidth ε (`cfg.jumprelu_bandwidth`, default 0.001):
    ∂f/∂θ = −(θ/ε) K((pre − θ)/ε),     ∂H/∂θ = −(1/ε) K((pre − θ)/ε),
and the gradient to pre is H(pre − θ) (the pseudo-derivative of H w.r.t. pre is 0), exactly as
in the paper's pseudo-code. The gradient reaches log θ as θ·∂L/∂θ.

Precision: the pre-activations are computed in float32 even when `compute_dtype` is bf16:
bf16 rounds values near 0.5 to steps of ~0.002, coarser than ε, so the rectangle window would see a
grid instead of a density and θ would stall. The decoder matmul uses the compute dtype.

Training contract: λ (the L0 coefficient) is passed to every `forward`; decoder rows are usually
kept at unit norm as for topk (call `remove_parallel_grads_()` before and `normalize_decoder_()`
after the optimiser step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoscope.sae.base import SAE, ForwardOutput
from monoscope.sae.config import SAEConfig


class _JumpReLUL0(torch.autograd.Function):
    """(pre [B, F], log θ [F], ε) -> (f = pre·H(pre − θ) [B, F], L0 per row [B]) with the STEs."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, log_theta: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        theta = log_theta.exp()  # [F] float32
        active = pre > theta  # [B, F]
        f = pre * active
        l0 = active.sum(1, dtype=torch.float32)  # [B]
        ctx.save_for_backward(pre, log_theta)
        ctx.eps = eps
        return f, l0

    @staticmethod
    def backward(ctx: Any, g_f: Tensor | None, g_l0: Tensor | None) -> tuple[Tensor | None, Tensor | None, None]:
        pre, log_theta = ctx.saved_tensors
        eps: float = ctx.eps
        theta = log_theta.exp()  # [F]
        grad_pre = None
        if ctx.needs_input_grad[0] and g_f is not None:
            grad_pre = g_f * (pre > theta)  # straight through where active, zero elsewhere
        grad_log_theta = None
        if ctx.needs_input_grad[1]:
            window = ((pre - theta).abs() < eps / 2).to(torch.float32)  # [B, F] K((pre − θ)/ε)
            grad_theta = torch.zeros_like(theta)
            if g_f is not None:
                grad_theta -= theta / eps * (window * g_f.float()).sum(0)
            if g_l0 is not None:
                grad_theta -= (g_l0.float() @ window) / eps
            grad_log_theta = grad_theta * theta  # dθ/dlogθ = θ
        return grad_pre, grad_log_theta, None


def jumprelu_l0(pre: Tensor, log_threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """f = pre·H(pre − θ) [B, F] and L0 per row [B], with the paper's rectangle-kernel STEs."""
    return _JumpReLUL0.apply(pre, log_threshold, bandwidth)


class JumpReLUSAE(SAE):
    arch = "jumprelu"
    fp32_names = ("log_threshold",)

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.empty(cfg.d_sae, dtype=torch.float32))  # [F] log θ
        self._finish_init(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if hasattr(self, "log_threshold"):
            self.log_threshold.fill_(float(torch.tensor(self.cfg.jumprelu_init_threshold).log()))

    @property
    def threshold(self) -> Tensor:
        """θ [d_sae] float32 (detached)."""
        return self.log_threshold.detach().exp()

    def _pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Float32 on purpose (module docstring): the STE window needs fine pre-activations.
        x32, x_c = self._prepare_input(x, torch.float32)
        pre = F.linear(x_c, self.W_enc.float(), self.b_enc.float())  # [B, F] float32
        return x32, F.relu(pre, inplace=True)

    def encode(self, x: Tensor) -> Tensor:
        _, pre = self._pre(x)
        return pre * (pre > self.log_threshold.exp())

    def forward(  # type: ignore[override]
        self, x: Tensor, sparsity_coef: float = 0.0, dead_mask: Tensor | None = None
    ) -> ForwardOutput:
        cd = self.compute_dtype(x.device)
        x32, pre = self._pre(x)
        f, l0_rows = jumprelu_l0(pre, self.log_threshold, self.cfg.jumprelu_bandwidth)  # [B, F], [B]
        x_hat = (f.to(cd) @ self.W_dec.to(cd)).float() + self.b_dec.float()  # [B, d]
        l0 = l0_rows.mean()
        with torch.no_grad():
            fired = (f > 0).any(0)
        return self._output(x32, x_hat, f, None, None, sparsity_coef * l0, None, l0, fired)
