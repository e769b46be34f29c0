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

Speed: as for relu-l1, the pre-activations are computed once without autograd; batches whose
active-or-in-window entries are at most `cfg.sparse_max_density` of the codes take the sparse
kernels (the θ gradient then comes from the window entries alone, which is exact: outside the
window K = 0).

Precision: the pre-activations are computed in float32 even when `compute_dtype` is bf16:
bf16 rounds values near 0.5 to steps of ~0.002, coarser than ε, so the rectangle window would see a
grid instead of a density and θ would stall. The decoder matmul uses the compute dtype.

Training contract: λ (the L0 coefficient) is passed to every `forward`; decoder rows are usually
kept at unit norm as for topk (call `remove_parallel_grads_()` before and `normalize_decoder_()`
after the optimiser step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from monoscope.sae.base import SAE, ForwardOutput, fired_from_sparse
from monoscope.sae.config import SAEConfig
from monoscope.sae.relu import relu_linear
from monoscope.sae.sparse import SparsePattern, gather_linear


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


class _SparseJumpReLUL0(torch.autograd.Function):
    """`_JumpReLUL0` on a sparse set of entries: every active entry (pre > θ) and every entry in
    an STE window (|pre − θ| < ε/2); all other entries contribute nothing to either gradient."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, log_theta: Tensor, pattern: SparsePattern, eps: float) -> tuple[Tensor, Tensor]:
        theta = log_theta.exp().index_select(0, pattern.flat)  # [nnz] θ of each entry's feature
        active = pre > theta  # [nnz]
        f = torch.where(active, pre, 0)
        l0 = torch.zeros(pattern.n_rows, dtype=torch.float32, device=pre.device)
        l0.index_add_(0, pattern.rows, active.float())  # [B]
        ctx.save_for_backward(pre, log_theta)
        ctx.pattern, ctx.eps = pattern, eps
        return f, l0

    @staticmethod
    def backward(ctx: Any, g_f: Tensor | None, g_l0: Tensor | None) -> tuple[Tensor | None, Tensor | None, None, None]:
        pre, log_theta = ctx.saved_tensors
        p: SparsePattern = ctx.pattern
        eps: float = ctx.eps
        theta_all = log_theta.exp()  # [F]
        theta = theta_all.index_select(0, p.flat)  # [nnz]
        grad_pre = None
        if ctx.needs_input_grad[0] and g_f is not None:
            grad_pre = torch.where(pre > theta, g_f, 0)
        grad_log_theta = None
        if ctx.needs_input_grad[1]:
            contrib = torch.zeros_like(pre, dtype=torch.float32)  # [nnz] ∂L/∂θ per entry
            if g_f is not None:
                contrib -= theta / eps * g_f.float()
            if g_l0 is not None:
                contrib -= g_l0.float().index_select(0, p.rows) / eps
            window = (pre - theta).abs() < eps / 2
            grad_theta = torch.zeros_like(theta_all).index_add_(0, p.flat, torch.where(window, contrib, 0))
            grad_log_theta = grad_theta * theta_all
        return grad_pre, grad_log_theta, None, None


INIT_L0 = 100
"""Default L0 that `JumpReLUSAE.init_threshold_` aims at (capped at d_sae / 4)."""


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
            self.log_threshold.fill_(math.log(self.cfg.jumprelu_init_threshold))

    @torch.no_grad()
    def init_threshold_(self, sample: Tensor, target_l0: float | None = None) -> Tensor:
        """Set each feature's θ from a sample [N, d_in] of SCALED activations (the first batch) so
        that every feature fires on a fraction target_l0 / d_sae of the rows: θ_i lies between the
        m-th and (m+1)-th largest pre-activation of feature i, m = round(target_l0 / d_sae · N).
        The initial L0 is then ~target_l0 (default min(INIT_L0, d_sae / 4)) instead of the
        thousands that θ = 0.001 lets through with unit-norm encoder rows, which would keep
        training on the slow dense path for hundreds of steps. θ never drops below
        `cfg.jumprelu_init_threshold`. Call after b_dec is set. Returns θ [d_sae] (float32)."""
        if sample.dim() != 2 or sample.shape[1] != self.cfg.d_in:
            raise ValueError(f"init_threshold_ needs a sample [N, {self.cfg.d_in}], got {tuple(sample.shape)}")
        n = sample.shape[0]
        if n == 0:
            return self.threshold
        n_feat = self.cfg.d_sae
        target = min(INIT_L0, n_feat / 4) if target_l0 is None else float(target_l0)
        m = min(max(1, round(target / n_feat * n)), n)
        _, _, pre = self._pre_nograd(sample.to(self.W_enc.device))  # [N, F] float32, >= 0
        top = pre.topk(min(m + 1, n), dim=0).values  # [m(+1), F] descending
        theta = top[m - 1] if m == n else 0.5 * (top[m - 1] + top[m])  # [F]
        theta = theta.clamp_min(self.cfg.jumprelu_init_threshold)
        self.log_threshold.copy_(theta.log().float())
        return self.threshold

    @property
    def threshold(self) -> Tensor:
        """θ [d_sae] float32 (detached)."""
        return self.log_threshold.detach().exp()

    def _pre_nograd(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x float32, encoder input float32, ReLU(pre) [B, F] float32 without autograd)."""
        # Float32 on purpose (module docstring): the STE window needs fine pre-activations.
        x32, x_c = self._prepare_input(x, torch.float32)
        return x32, x_c, self._encode_nograd(x_c, torch.float32).relu_()

    def encode(self, x: Tensor) -> Tensor:
        _, x_c, pre = self._pre_nograd(x)
        pre = relu_linear(pre, x_c, self.W_enc, self.b_enc)
        return pre * (pre > self.log_threshold.exp())

    def forward(  # type: ignore[override]
        self, x: Tensor, sparsity_coef: float = 0.0, dead_mask: Tensor | None = None
    ) -> ForwardOutput:
        cd = self.compute_dtype(x.device)
        eps = self.cfg.jumprelu_bandwidth
        x32, x_c, pre = self._pre_nograd(x)  # [B, F] float32, >= 0
        pattern = None
        if self.cfg.sparse_kernels:
            with torch.no_grad():
                theta = self.log_threshold.exp()  # [F]
                # entries that are active or inside an STE window: pre > θ − ε/2
                pattern = self._active_pattern(pre > theta - eps / 2)
        if pattern is None:  # dense codes
            pre = relu_linear(pre, x_c, self.W_enc, self.b_enc)
            f, l0_rows = jumprelu_l0(pre, self.log_threshold, eps)  # [B, F], [B]
            x_hat = (f.to(cd) @ self.W_dec.to(cd)).float() + self.b_dec.float()  # [B, d]
            l0 = l0_rows.mean()
            with torch.no_grad():
                fired = (f > 0).any(0)
            return self._output(x32, x_hat, f, None, None, sparsity_coef * l0, None, l0, fired)
        xs, shift = self._sparse_encoder_input(x32, x_c)
        values = gather_linear(pre[pattern.rows, pattern.flat], xs, self.W_enc, self.b_enc, pattern, shift)
        f, l0_rows = _SparseJumpReLUL0.apply(values, self.log_threshold, pattern, eps)  # [nnz], [B]
        x_hat = self._sparse_decode(f, pattern, cd).float()
        x_hat = x_hat + self.b_dec.float()
        l0 = l0_rows.mean()
        with torch.no_grad():
            fired = fired_from_sparse(pattern.flat, f, self.cfg.d_sae)
        return self._output(x32, x_hat, f, pattern.flat, pattern.offsets, sparsity_coef * l0, None, l0, fired)
