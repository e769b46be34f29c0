"""What a training run costs: FLOPs per token by architecture, and seconds per token measured here.

FLOPs per training token (multiply-adds count 2; d = d_model, n = features, k = active per token):

    topk, batchtopk  2·d·n + 8·d·k      dense encoder forward (2dn); the sparse path's encoder weight
                                        gradient on the active rows only (2dk), sparse decode (2dk), its
                                        two gradients (4dk). The [B, n] top-k selection and AuxK are
                                        not counted (AuxK acts only while features are dead).
    relu-l1, jumprelu 10·d·n            dense encoder and decoder forward (4dn), decoder weight and input
                                        gradients (4dn), encoder weight gradient (2dn).

Adam touches every parameter once per step (~2·d·n·10 FLOPs per batch): per token it is 20·d·n/B,
small beside the matmuls at B >= 1024, and left to the measured time. The time model is measured, not
derived: `calibrate` times a few real optimiser steps at each width of the grid on this machine and
fits seconds/token = c0 + c1·n (least squares), which carries memory traffic, Adam and Python
overhead that FLOP counts miss. A TIME budget is met through this model; it is also converted to FLOPs
at the measured rate for the record.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from monoscope.sae.config import TOPK_STYLE


def flops_per_token(arch: str, d_model: int, n: Any, k: int | None = None) -> Any:
    """Training FLOPs per token (module docstring); `n` a number or a numpy array."""
    if arch in TOPK_STYLE:
        if k is None:
            raise ValueError(f"{arch} needs k to count FLOPs")
        return 2.0 * d_model * n + 8.0 * d_model * k
    return 10.0 * d_model * n


@dataclass
class CostModel:
    """Seconds per token of training, linear in the width, measured on this machine."""

    arch: str
    d_model: int
    k: int | None
    batch_size: int
    device: str
    intercept_s: float
    """Seconds per token that do not grow with the width (data, Python, small ops)."""
    slope_s: float
    """Seconds per token per feature."""
    measured: list[dict[str, float]] = field(default_factory=list)
    """Per benchmarked width: width, steps timed, tokens_per_s, flops_per_s."""
    threads: int = 1

    def seconds_per_token(self, n: Any) -> Any:
        return self.intercept_s + self.slope_s * np.asarray(n, dtype=float)

    def flops_per_token(self, n: Any) -> Any:
        return flops_per_token(self.arch, self.d_model, np.asarray(n, dtype=float), self.k)

    def seconds(self, n: int, tokens: int) -> float:
        return float(self.seconds_per_token(n)) * tokens

    def flops(self, n: int, tokens: int) -> float:
        return float(self.flops_per_token(n)) * tokens

    def flops_per_s(self, n: int) -> float:
        """The FLOP rate the model predicts at width n."""
        return float(self.flops_per_token(n) / self.seconds_per_token(n))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        return cls(**d)


def calibrate(rows: torch.Tensor, *, arch: str, k: int | None, widths: list[int], batch_size: int,
              normaliser: float, device: str = "auto", steps: int = 4, warmup: int = 2) -> CostModel:
    """Time `steps` real optimiser steps (after `warmup` untimed ones) at each width on `rows`
    ([>= batch_size, d] raw activations), through the project's Trainer, and fit the linear model."""
    from monoscope.devices import resolve_device
    from monoscope.sae import SAEConfig, build_sae
    from monoscope.store.batches import Batch
    from monoscope.train.config import TrainConfig
    from monoscope.train.trainer import Trainer

    dev = resolve_device(device)
    d = int(rows.shape[1])
    data = rows[:batch_size].float()
    if data.shape[0] < batch_size:
        data = data.repeat(-(-batch_size // data.shape[0]), 1)[:batch_size]

    class _Rows:
        def __next__(self) -> Batch:
            return Batch(data, torch.arange(batch_size, dtype=torch.int64))

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    measured = []
    for n in sorted(set(widths)):
        cfg = TrainConfig(arch=arch, tokens=(warmup + steps) * batch_size, width=n, k=k, batch_size=batch_size,  # type: ignore[arg-type]
                          device=str(dev), checkpoint_every=0, progress=False, log_every=10**9)
        sae = build_sae(SAEConfig(arch=arch, d_in=d, d_sae=n, k=k, normaliser=normaliser, dtype="float32",  # type: ignore[arg-type]
                                  compute_dtype=cfg.dtype), seed=0, device=dev)
        tr = Trainer(sae, cfg, _Rows())
        for _ in range(warmup):
            tr.train_step()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        _sync(dev)
        sec = (time.perf_counter() - t0) / (steps * batch_size)
        measured.append({"width": n, "steps": steps, "tokens_per_s": 1 / sec,
                         "flops_per_s": float(flops_per_token(arch, d, n, k)) / sec})
    ws = np.array([m["width"] for m in measured], dtype=float)
    secs = np.array([1 / m["tokens_per_s"] for m in measured])
    if len(ws) >= 2:
        slope, intercept = np.polyfit(ws, secs, 1)
        if slope <= 0:  # timing noise on a busy machine: fall back to proportional time
            slope, intercept = float(np.mean(secs / ws)), 0.0
        intercept = max(float(intercept), 0.0)
    else:
        slope, intercept = float(secs[0] / ws[0]), 0.0
    return CostModel(arch, d, k, batch_size, str(dev), float(intercept), float(slope), measured,
                     torch.get_num_threads())


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
