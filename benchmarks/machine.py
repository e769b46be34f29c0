"""Describe the machine and measure its matmul peak, for every benchmark's JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def describe() -> dict[str, Any]:
    cpu, flags = platform.processor(), []
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu)
        fl = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
        flags = sorted(f for f in fl if f.startswith(("avx512", "amx", "avx2", "fma")))
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("transformers", "numpy", "safetensors"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu_flags": flags,
            "memory_gb": round(mem_gb, 1), "gpu": gpu, "platform": platform.platform(), "versions": versions,
            # other work on the machine skews absolute figures; ratios measured in one run hold better
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, device: str = "cpu", seconds: float = 1.5) -> float:
    """Sustained TFLOP/s of an [m,k] @ [k,n] matmul (the machine's peak for that shape).

    The right operand is a transposed [n, k] weight, as nn.Linear's and the SAE encoder's (oneDNN runs a
    contiguous [k, n] several times slower on AMX), and the product goes into one preallocated output: a fresh
    [m, n] output page-faults in longer than the matmul takes on a CPU (measured: 0.78 TFLOP/s bf16 that way for
    4096x576 @ 576x9216 on the 2-core AMX machine, 1.75 like this)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype).t()
    out = torch.empty(m, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    n_iter, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=out)
        n_iter += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * m * k * n * n_iter / (time.perf_counter() - t0) / 1e12


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "commit": git_commit(), "machine": describe(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
