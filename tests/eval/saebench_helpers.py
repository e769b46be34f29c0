"""Shared by the cross-checks against SAEBench's own code (tests/eval/test_saebench_tpp.py, test_saebench_scr.py):
its scr_and_tpp functions compiled from the installed source, and an SAE in the shape those functions ask for."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch


def saebench_scr_and_tpp_functions(wanted: set[str]) -> dict[str, Any]:
    """The functions named in `wanted`, compiled from SAEBench's installed `evals/scr_and_tpp/main.py`: importing
    that module pulls in transformer-lens, sae-lens and tabulate (slow, and not all installed), which these
    functions do not use. Skips the test where sae_bench is not importable."""
    pt = pytest.importorskip("sae_bench.evals.sparse_probing.probe_training",
                             reason="sae_bench is not installed, so the cross-check against SAEBench's own code "
                                    "cannot run: `make test` installs it (pip install --no-deps sae-bench; "
                                    "docs/saebench.md)")
    einops = pytest.importorskip("einops", reason="einops (a dependency of sae-bench, installed by `make test`) is "
                                                     "missing, so SAEBench's code cannot run for the cross-check")
    import sae_bench.sae_bench_utils.dataset_info as dataset_info

    spec = importlib.util.find_spec("sae_bench")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "evals" / "scr_and_tpp" / "main.py"
    tree = ast.parse(path.read_text())
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in tree.body} == wanted
    ns: dict[str, Any] = {"torch": torch, "einops": einops, "probe_training": pt, "dataset_info": dataset_info,
                          "SAE": Any}
    exec(compile(tree, str(path), "exec"), ns)
    return ns


class RawSAE:
    """What SAEBench's functions ask of an SAE (`encode`, `decode`, `W_dec`), in raw space, per token."""

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self.W_dec = (sae.W_dec.detach() / sae.cfg.normaliser).clone()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode_raw(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.sae.decode_raw(f.reshape(-1, f.shape[-1])).reshape(*f.shape[:-1], -1)
