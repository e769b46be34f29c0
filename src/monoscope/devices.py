"""Where tensors live: one rule for every stage."""

from __future__ import annotations

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
