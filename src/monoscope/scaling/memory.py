"""Memory and time model of one SAE training step on R GPUs (docs/scale.md; `benchmarks/scale_model.py`).

Per rank, with d = d_model, n features, B rows per step, R = dp x fs ranks (dp data-parallel replicas,
fs feature shards), fp32 master weights (4 bytes):
    parameters      P = 2·d·n + n + d                          (W_enc, W_dec, b_enc, b_dec)
    weights+grads   8·P / fs bytes;  Adam moments 8·P / fs bytes
    activations     b = B/dp rows: x [b, d] 4 bytes, pre-activations [b, n/fs] 4 bytes (the
                    dense encoder output, the largest), top-k values+ids [b, k] 8 bytes (x fs after the
                    all-gather of candidates)
Communication per step (ring all-reduce moves 2·(m-1)/m of the buffer per rank):
    data parallel   all-reduce of the gradients: 2·(dp-1)/dp · 4·P/fs bytes
    feature shards  all-gather of top-k candidates: (fs-1)·b·k·8 bytes; all-reduce of the partial
                    reconstructions [b, d] (forward) and of their gradient (backward): 2 x 2·(fs-1)/fs·b·d·4
Time: FLOPs per token (`cost.flops_per_token`) x B / (R · peak · mfu) + bytes / link bandwidth (mfu measured:
MEASURED_H100_MFU). Not modelled: CUDA context/workspace (~3.6 GB measured) and bf16 compute copies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from monoscope.scaling.cost import flops_per_token


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float
    peak_flops: float
    """Dense matmul peak in the training dtype (FLOP/s)."""
    mfu: float
    """Fraction of the peak the step reaches (an assumption; the CPU check below measures it here)."""
    link_bytes_s: float
    """Per-rank bandwidth of the collective (NVLink within a node, InfiniBand across)."""


MEASURED_H100_MFU = 0.022
"""The trainer's rate on an H100 (bf16 matmuls, d 4096, n 262,144, 4,096 rows): 21.3 TFLOP/s of 989
(benchmarks/results/gpu_step_check.json). Far below the peak: the plan's times use it, not a hoped-for 35%."""

H100_NVLINK = Hardware("H100 SXM 80GB, bf16 matmuls, NVLink", 80e9, 989e12, MEASURED_H100_MFU, 450e9)
H100_IB = Hardware("H100 SXM 80GB, bf16 matmuls, 400 Gb/s InfiniBand", 80e9, 989e12, MEASURED_H100_MFU, 50e9)


@dataclass(frozen=True)
class StepModel:
    d: int
    n: int
    k: int
    batch: int
    dp: int
    fs: int
    params: float
    state_bytes: float
    activation_bytes: float
    total_bytes: float
    comm_bytes: float
    compute_s: float
    comm_s: float
    step_s: float
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_model(d: int, n: int, k: int, batch: int, dp: int, fs: int, hw: Hardware, arch: str = "topk") -> StepModel:
    """Per-rank memory, communication and time of one step (module docstring)."""
    p = 2.0 * d * n + n + d
    state = 16.0 * p / fs
    b = batch / dp
    act = 4.0 * b * d + 4.0 * b * n / fs + 8.0 * b * k * fs
    comm = 0.0
    if dp > 1:
        comm += 2.0 * (dp - 1) / dp * 4.0 * p / fs
    if fs > 1:
        comm += (fs - 1) * b * k * 8.0 + 2 * 2.0 * (fs - 1) / fs * b * d * 4.0
    compute = float(flops_per_token(arch, d, n, k)) * batch / (dp * fs * hw.peak_flops * hw.mfu)
    comm_s = comm / hw.link_bytes_s
    total = state + act
    return StepModel(d, n, k, batch, dp, fs, p, state, act, total, comm, compute, comm_s, compute + comm_s,
                     total <= 0.9 * hw.memory_bytes)


def min_feature_shards(d: int, n: int, k: int, batch: int, dp: int, hw: Hardware) -> int:
    """The fewest feature shards (a power of two) whose per-rank memory fits."""
    fs = 1
    while not step_model(d, n, k, batch, dp, fs, hw).fits:
        fs *= 2
        if fs > 1 << 16:
            raise ValueError("no feature sharding up to 65536 ranks fits")
    return fs
