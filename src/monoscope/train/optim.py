"""`--optimizer signum-sf`: sparsify's default optimiser, schedule-free sign descent with momentum 0.95.

sparsify (EleutherAI) trains with `ScheduleFreeWrapper(SignSGD, momentum=0.95)` (Defazio et al. 2024,
"The Road Less Scheduled", as the `schedulefree` package wraps any base optimiser) at lr 5e-3/sqrt(F/2^14)
and no schedule. It keeps three copies of each weight:
  z: the base optimiser's iterate, z <- z - lr·sign(grad), the gradient taken at y;
  x: the average of the z's, weighted by lr_max^2 (c = w_t / Σw: x <- (1-c)·x + c·z);
  y = (1-β)·z + β·x: the point the model trains at (the parameters hold y between steps).
The evaluation weights are x (`averaged`): sparsify saves x, and so does `monoscope train`. As in the
wrapper, only z is stored; x is recovered from y and z (x = y + (1 - 1/β)(z - y), a lerp), so the op order
here is the wrapper's and training is bit-identical to sparsify's optimiser (tests/train/test_optim.py).

Decoder constraints act on y only, as sparsify's trainer does (it renormalises the parameters, which hold y,
and removes the gradient parallel to them); x, recovered from the renormalised y, then follows, and z is left
alone. So the saved (x) decoder rows are close to unit norm but not exactly (an average of unit vectors).

The state (z per parameter; the step count, lr_max and weight sum per group) is in `state_dict()`, so a
checkpoint resumes exactly; y is the SAE's own state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

SIGNUM_MOMENTUM = 0.95
"""sparsify's `ScheduleFreeWrapper(..., momentum=0.95)`."""


class SignumScheduleFree(torch.optim.Optimizer):
    """Schedule-free sign descent (the math of schedulefree's `ScheduleFreeWrapper` around sparsify's `SignSGD`,
    r=0, weight_lr_power=2, no weight decay). The parameters always hold y (train mode); `averaged` gives x."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float,
                 momentum: float = SIGNUM_MOMENTUM, weight_lr_power: float = 2.0) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum {momentum}: use a value in (0, 1)")
        defaults = {"lr": lr, "momentum": momentum, "weight_lr_power": weight_lr_power,
                    "k": 0, "lr_max": 0.0, "weight_sum": 0.0}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """One step from the gradients at y: z moves by -lr·sign(g), x toward z, y between them."""
        if closure is not None:
            raise ValueError("SignumScheduleFree.step takes no closure")
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            # the wrapper's weighting with r = 0: (k+1)^0 · lr_max^power
            lr_max = group["lr_max"] = max(lr * 1.0, group["lr_max"])
            weight = lr_max ** group["weight_lr_power"]
            weight_sum = group["weight_sum"] = group["weight_sum"] + weight
            ckp1 = weight / weight_sum
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = torch.clone(p, memory_format=torch.preserve_format)
                z = state["z"]
                p.lerp_(end=z, weight=1 - 1 / beta)  # y -> x
                z.add_(p.grad.sign(), alpha=-lr)  # SignSGD on z
                p.lerp_(end=z, weight=ckp1)  # x: the weighted average takes in the new z
                p.lerp_(end=z, weight=1 - beta)  # x -> y
            group["k"] += 1

    @torch.no_grad()
    def averaged(self) -> list[tuple[Tensor, Tensor]]:
        """(parameter, x) for every parameter that has taken a step: the evaluation weights (the wrapper's
        `eval()`), computed out of place so y is untouched."""
        out = []
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                z = self.state[p].get("z") if p in self.state else None
                if z is not None:
                    out.append((p, torch.lerp(p, z, 1 - 1 / beta)))
        return out


def make_optimizer(name: str, params: Iterable[Tensor], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser `TrainConfig.optimizer` names: Adam(0.9, 0.999) (fused where torch has it) or signum-sf."""
    if name == "signum-sf":
        return SignumScheduleFree(params, lr=lr)
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}  # one pass per parameter; deterministic
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), **fused)
