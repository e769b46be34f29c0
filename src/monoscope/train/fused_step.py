"""The CPU optimiser step of an SAE in two passes over each parameter, through the C kernels of
`monoscope.native` (adam_rows.c).

Why: after the backward, a CPU step used to run ~12 memory-bound passes over each [F, d] tensor: the decoder
gradient's component along its row removed (`SAE.remove_parallel_grads_`, ~6 passes), the gradient norm for
clipping (1), Adam (7), the decoder rows renormalised (3). On a 2-core machine whose cores stream ~17 GB/s
together that was ~30 ms of a ~130 ms step at 9,216 x 576 (benchmarks/results/fused_step_amx.json). Here pass 1
reads each gradient once (the decoder's with its weight) for the norm; pass 2 applies the removal, the clipping
factor, Adam and the renormalisation row by row while the row is in cache.

The arithmetic: Adam is torch's fused CPU Adam operation for operation, on torch's own state tensors
(`exp_avg`, `exp_avg_sq`, `step`), so checkpoints are interchangeable with the PyTorch path, which stays as the
fallback (no compiler, `MONOSCOPE_NATIVE=0`, other optimisers or options) and as the reference the tests hold
this against: bit for bit where no removal, clipping or renormalisation is involved, to float rounding where the
removal coefficients, norms and row norms are summed in another order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from monoscope import native
from monoscope.sae.base import SAE


class FusedAdamStep:
    """Replaces, for one Trainer, remove_parallel_grads_ + the clipping norm (`grad_norm`) and optimizer.step +
    normalize_decoder_ (`step`)."""

    def __init__(self, sae: SAE, optimizer: torch.optim.Adam, unit_norm_decoder: bool) -> None:
        self.optimizer = optimizer
        self.sae = sae
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.w_dec = sae.W_dec if unit_norm_decoder else None
        self._coef: Tensor | None = None

    @staticmethod
    def make(sae: SAE, optimizer: torch.optim.Optimizer, unit_norm_decoder: bool) -> FusedAdamStep | None:
        """The fused step where it computes what the PyTorch path would: a CPU Adam without weight decay,
        amsgrad or maximize, over contiguous float32 parameters of at most 2 dimensions; None elsewhere."""
        if not isinstance(optimizer, torch.optim.Adam) or not native.enabled():  # read now: the library is cached
            return None
        for group in optimizer.param_groups:
            if (group["weight_decay"] or group["amsgrad"] or group["maximize"] or group["capturable"]
                    or group["differentiable"] or group.get("decoupled_weight_decay", False)
                    or isinstance(group["lr"], Tensor)):
                return None
            for p in group["params"]:
                if not (p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
                        and p.dim() in (1, 2) and p.requires_grad):
                    return None
        if not native.adam_available():
            return None
        return FusedAdamStep(sae, optimizer, unit_norm_decoder)

    def grad_norm(self) -> Tensor:
        """The total gradient norm (float32 scalar, as `get_total_norm` returns it) after the decoder rows'
        parallel components are taken out; pass 1."""
        total = 0.0
        self._coef = None
        for p in self.params:
            if p.grad is None:
                continue
            if p is self.w_dec:
                sq, self._coef = native.grad_sumsq(p.grad.contiguous(), p)
            else:
                sq, _ = native.grad_sumsq(p.grad.contiguous())
            total += sq
        return torch.tensor(math.sqrt(total), dtype=torch.float32)

    @torch.no_grad()
    def step(self, clip: float) -> None:
        """Adam on every parameter with a gradient, its gradient multiplied by `clip` (1: no clipping), the
        decoder's with its parallel component removed and its rows renormalised after; pass 2. Follows
        torch.optim.Adam's fused step: state created as its `_init_group` creates it, `step` counted first, the
        bias corrections in double, every per-element constant rounded to float.

        Where the SAE's matmuls run in bf16, the kernel also writes the updated W_enc and W_dec rows' bf16 copies
        that the next forward reads (`SAE.copy_buffers`), while each row is in cache: a separate conversion pass
        costs ~1-2.5 ms per weight at 9,216 x 576."""
        sae = self.sae
        cd = sae.compute_dtype(sae.W_enc.device)
        enc_c = dec_c = None
        if cd == torch.bfloat16:
            w_aug, dec_c = sae.copy_buffers(cd, sae.W_enc.device)
            enc_c = w_aug[:, : sae.cfg.d_in]
        wrote_enc = wrote_dec = False
        for group in self.optimizer.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.optimizer.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                bias1 = 1 - beta1**step
                bias2 = 1 - beta2**step
                out = enc_c if p is sae.W_enc else dec_c if p is sae.W_dec else None
                native.adam_rows(p, p.grad.contiguous(), state["exp_avg"], state["exp_avg_sq"],
                                 self._coef if p is self.w_dec else None, clip,
                                 w1=1 - beta1, b2=beta2, c2=1 - beta2, bc2s=math.sqrt(bias2), eps=group["eps"],
                                 neg_step=-(group["lr"] / bias1), renorm=p is self.w_dec, bf16_out=out)
                # written through raw pointers: count the in-place changes as torch's own ops would, so that
                # anything keyed on a tensor's version (autograd's saved-tensor check, the SAE's copies) sees them
                increment_version([p, state["exp_avg"], state["exp_avg_sq"], *([] if out is None else [out])])
                wrote_enc |= p is sae.W_enc and out is not None
                wrote_dec |= p is sae.W_dec and out is not None
        if wrote_enc or wrote_dec:
            sae.mark_copies_current(cd, encoder=wrote_enc, decoder=wrote_dec)
