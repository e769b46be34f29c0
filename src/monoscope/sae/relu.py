"""ReLU SAE with a decoder-norm-weighted L1 penalty: the *Scaling Monosemanticity* recipe.

    f = ReLU(W_enc x + b_enc)                     [B, d_sae]
    x̂ = f W_dec + b_dec                           [B, d_in]
    L = mean_b ‖x − x̂‖² + λ · mean_b Σ_i f_i ‖W_dec[i]‖₂

The decoder is left unconstrained: the L1 term sees its norms, so shrinking f while growing
W_dec does not pay. λ is passed to every `forward` call because the trainer warms it up linearly
over the first ~5% of steps. Nothing needs calling after the optimiser step.

Speed: the pre-activations are computed once without autograd. While the codes are dense (early
training) a custom backward (`relu_linear`) differentiates them with two matmuls; once at most
`cfg.sparse_max_density` of them are non-zero, the batch takes the sparse kernels instead
(`sparse.gather_linear`, `sparse.sparse_decode`) and `ForwardOutput.acts` comes back sparse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from monoscope.sae.base import SAE, ForwardOutput, fired_from_sparse
from monoscope.sae.config import SAEConfig
from monoscope.sae.sparse import gather_linear


class _ReluLinear(torch.autograd.Function):
    """f = ReLU(pre) where pre = x_c Wᵀ + b was computed without autograd; dense backward."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, x_c: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        pre.relu_()  # the caller's no-grad buffer becomes f
        ctx.mark_dirty(pre)
        ctx.save_for_backward(pre, x_c, weight)
        ctx.bias_dtype = bias.dtype
        return pre

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None, Tensor | None]:
        f, x_c, weight = ctx.saved_tensors
        g = torch.where(f > 0, grad.to(f.dtype), 0)  # [B, F] gradient of the pre-activations
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = g @ weight.to(f.dtype)  # [B, d]
        if ctx.needs_input_grad[2]:
            grad_w = (g.t() @ x_c.to(f.dtype)).to(weight.dtype)  # [F, d]
        if ctx.needs_input_grad[3]:
            grad_b = torch.sum(g, 0, dtype=torch.float32).to(ctx.bias_dtype)  # [F]
        return None, grad_x, grad_w, grad_b


def relu_linear(pre: Tensor, x_c: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """ReLU(pre) in place, differentiable as ReLU(x_c weightᵀ + bias): pre [B, F] must be that
    product computed without autograd (and owned by the caller: it is overwritten)."""
    return _ReluLinear.apply(pre, x_c, weight, bias)


def positive_mask(pre: Tensor) -> Tensor:
    """pre > 0 as a bool [B, F]; for bf16 via its int16 bit pattern (sign-magnitude: the same
    answer, and ~1.5x faster than a bf16 comparison on CPU)."""
    if pre.dtype == torch.bfloat16:
        return pre.view(torch.int16) > 0
    return pre > 0


class ReluL1SAE(SAE):
    arch = "relu-l1"
    unit_norm_decoder = False

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        self._finish_init(generator)

    def encode(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype(x.device)
        _, x_c = self._prepare_input(x, cd)
        pre = self._encode_nograd(x_c, cd)
        return relu_linear(pre, x_c, self.W_enc, self.b_enc).float()

    def forward(  # type: ignore[override]
        self, x: Tensor, sparsity_coef: float = 0.0, dead_mask: Tensor | None = None
    ) -> ForwardOutput:
        cd = self.compute_dtype(x.device)
        x32, x_c = self._prepare_input(x, cd)
        n_rows = x.shape[0]
        pre = self._encode_nograd(x_c, cd)  # [B, F]
        with torch.no_grad():
            pattern = self._active_pattern(positive_mask(pre))
        norms = self.decoder_norms()  # [F]
        if pattern is None:  # dense codes
            f = relu_linear(pre, x_c, self.W_enc, self.b_enc)  # [B, F]
            x_hat = (f @ self.W_dec.to(cd)).float() + self.b_dec.float()  # [B, d]
            # Σ_b f[b, i] accumulated in float32 without materialising a float32 copy of f.
            f_sum = torch.sum(f, dim=0, dtype=torch.float32)  # [F]
            l1 = (f_sum * norms).sum() / n_rows
            with torch.no_grad():
                l0 = torch.count_nonzero(f).float() / n_rows
                fired = f_sum > 0  # f >= 0, so a positive column sum means it fired
            return self._output(x32, x_hat, f, None, None, sparsity_coef * l1, None, l0, fired)
        values = pre[pattern.rows, pattern.flat]  # [nnz], all > 0
        xs, shift = self._sparse_encoder_input(x32, x_c)
        vals = gather_linear(values, xs, self.W_enc, self.b_enc, pattern, shift).float()
        x_hat = self._sparse_decode(vals, pattern, cd).float()
        x_hat = x_hat + self.b_dec.float()
        l1 = (vals * norms[pattern.flat]).sum() / n_rows
        with torch.no_grad():
            l0 = x32.new_tensor(pattern.nnz / n_rows)
            fired = fired_from_sparse(pattern.flat, vals, self.cfg.d_sae)
        return self._output(x32, x_hat, vals, pattern.flat, pattern.offsets, sparsity_coef * l1, None, l0, fired)
