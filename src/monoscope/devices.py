"""Where tensors live and when they compute in bf16: one rule for every stage (model and SAE alike)."""

from __future__ import annotations

import functools
import os

import torch

from monoscope.errors import MonoscopeError


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` picks CUDA when present and the CPU otherwise; an explicit name is checked."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise MonoscopeError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MonoscopeError(f"--device {name} asked for CUDA but no CUDA GPU is visible: use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise MonoscopeError(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


CPU_BF16_ENV = "MONOSCOPE_CPU_BF16"
"""`0`: `auto` computes in float32 on every CPU; `1`: in bf16 on every CPU; unset: bf16 where the CPU has it natively.
The test suite sets 0, so that its golden values hold on CPUs with and without AMX (explicit dtypes still apply)."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (`avx512_vnni`, `amx_bf16`, ...); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: the CPUs where bf16 matmuls run natively (elsewhere they are emulated and slower)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise MonoscopeError(f"{CPU_BF16_ENV}={forced!r}: use 0 (float32 on the CPU), 1 (bf16) or leave it unset "
                             "(bf16 where the CPU has AMX or AVX512-BF16)")
    flags = cpu_flags()
    if flags:
        return bool({"amx_bf16", "avx512_bf16"} & flags)
    try:  # not Linux: ask oneDNN instead
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_is_fast(device: torch.device | str) -> bool:
    """True where bf16 matmuls beat float32: CUDA GPUs with bf16, CPUs with AMX or AVX512-BF16.

    The one rule behind `compute_dtype="auto"` for the model forward (bf16 autocast) and the SAE's large
    matmuls, so both stages of one run decide alike on one machine.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        return _cpu_has_native_bf16()
    return False


CPU_MALLOC_ENV = "MONOSCOPE_CPU_MALLOC"
"""`0` leaves glibc's allocator as it is (see `keep_freed_cpu_memory`)."""

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameter ids (glibc malloc.h)


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel (mallopt: no mmap'd
    chunks, no heap trimming). Returns whether it applied (glibc only; `MONOSCOPE_CPU_MALLOC=0` opts out).

    Why: by default every tensor over ~32 MB, and any freed heap top over the trim threshold, goes back to the
    kernel, so the next step's tensor of the same size page-faults its memory in again. A CPU training step
    allocates dozens of such tensors ([F, d] gradients and weight copies, [B, n_dead] AuxK blocks): measured on a
    2-core AMX CPU (4096 rows, 576 -> 9,216, bf16), a step took 132 -> 121 ms with no dead latents and
    545 -> 400 ms with 6,000 (`benchmarks/train_step_profile.py`). The cost is a process that keeps its peak heap
    until it exits, which a training process reaches in its first steps anyway."""
    if os.environ.get(CPU_MALLOC_ENV, "").strip() == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
