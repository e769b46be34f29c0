"""Shared pieces of the interop tests: monoscope SAEs with non-trivial weights, hand-written peer
folders, and the comparison used everywhere."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from monoscope.sae import SAE, SAEConfig, build_sae

D_IN, D_SAE, K = 16, 64, 5
NORMALISER = 0.37  # not a power of two, so folding it really changes the bits
# float32 end to end; folds are computed in float64 and rounded once, so differences are a few ulps
# of values of order 1-10.
ATOL, RTOL = 1e-5, 1e-5

ARCHS: list[tuple[str, dict[str, Any]]] = [
    ("relu-l1", {}),
    ("topk", {"k": K}),
    ("jumprelu", {}),
    ("batchtopk", {"k": K}),
    ("matryoshka", {"k": K, "prefixes": [8, 24, D_SAE]}),
    ("gated", {}),
]


def inputs(n: int = 48, seed: int = 0) -> torch.Tensor:
    """Raw activations with an offset and a scale far from 1, as a model's residual stream has."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * 3.0 + 1.0


def make_sae(arch: str, kw: dict[str, Any], *, b_dec_to_input: bool, normaliser: float = NORMALISER,
             seed: int = 1, hook: str | None = "resid_post.3") -> SAE:
    """A monoscope SAE in eval mode with random weights of every tensor (b_dec and b_enc included), so
    that a conversion that drops or mis-folds any of them shows."""
    cfg = SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, normaliser=normaliser, b_dec_to_input=b_dec_to_input,
                    compute_dtype="float32", hook=hook, **kw)  # type: ignore[arg-type]
    sae = build_sae(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_SAE, D_IN, generator=g) * 0.3)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.2)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.5)
        if arch == "jumprelu":
            sae.log_threshold.copy_((torch.rand(D_SAE, generator=g) * 0.8 + 0.05).log())
        if arch == "gated":  # magnitudes on their own scale and bias, so a dropped r_mag or b_mag shows
            sae.r_mag.copy_(torch.randn(D_SAE, generator=g) * 0.3)
            sae.b_mag.copy_(torch.randn(D_SAE, generator=g) * 0.2)
    if arch in ("batchtopk", "matryoshka"):
        sae.train()
        sae(sae.scale(inputs(64, seed=seed + 7)))  # learns its inference threshold
    return sae.eval()


def float32(sae: SAE) -> SAE:
    """Compare in float32: 'auto' would use bf16 matmuls on CPUs with AMX, ~0.4% off."""
    sae.cfg.compute_dtype = "float32"
    return sae


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=ATOL, rtol=RTOL)


def write_folder(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], weights_name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / weights_name))
    return folder


def saelens_tensors(seed: int = 3, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3,
        "b_enc": torch.randn(d_sae, generator=g) * 0.2,
        "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3,
        "b_dec": torch.randn(d_in, generator=g) * 0.5,
    }


def saelens_cfg(arch: str, **extra: Any) -> dict[str, Any]:
    """A cfg.json as SAELens 6 writes it (keys checked against sae-lens 6.54)."""
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                     "hook_name": "blocks.3.hook_resid_post", "model_name": "gpt2-small"},
    }
    cfg.update(extra)
    return cfg


def sparsify_tensors(seed: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.2,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
        "b_dec": torch.randn(D_IN, generator=g) * 0.5,
    }


def sparsify_cfg(**extra: Any) -> dict[str, Any]:
    """A cfg.json as sparsify 1.3 writes it."""
    cfg: dict[str, Any] = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": D_SAE,
                           "k": K, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    cfg.update(extra)
    return cfg


def topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Reference TopK: the k largest pre-activations of each row, ReLU'd, others zero."""
    v, i = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter_(1, i, v.relu())


@dataclass
class Result:
    """One CLI invocation's exit code and output, as the tests' subprocess drivers report it."""

    rc: int
    out: str
    err: str


# Runs CLI invocations in one interpreter (each interpreter start costs seconds): [[argv, Hub endpoint or null]] on
# stdin -> [{rc, out, err}] as JSON on stdout. An endpoint sets what HF_ENDPOINT sets at huggingface_hub's import;
# an exception escaping main is a traceback in err with rc -1, so the other invocations still report.
CLI_DRIVER = """
import contextlib, io, json, sys, traceback
from monoscope.cli import main
res = []
for argv, endpoint in json.load(sys.stdin):
    if endpoint:
        import huggingface_hub.constants
        huggingface_hub.constants.ENDPOINT = endpoint
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except Exception:
            traceback.print_exc()
            rc = -1
    res.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue()})
sys.__stdout__.write(json.dumps(res))
"""


def run_parallel(procs: dict[str, tuple[list[str], dict[str, str] | None, str | None]],
                 timeout: float) -> dict[str, Result]:
    """Start every (argv, env, stdin) at once and collect each one's Result by name."""
    running = {name: subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
               for name, (argv, env, stdin) in procs.items()}
    results: dict[str, Result] = {}
    for name, p in running.items():
        out, err = p.communicate(procs[name][2], timeout=timeout)
        results[name] = Result(p.returncode, out, err)
    return results
