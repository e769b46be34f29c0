"""On a GPU: the training step captured once as a CUDA graph and replayed for every later batch of that shape.

Why: a TopK step on a GPU is bound by the host, not the arithmetic. On an H100 and an H200 the deferred step
(`Trainer.device_step`) issued ~200 kernel launches, and a profile found the GPU busy for 0.86 s of a 5.1 s run;
at 16x the matmuls need ~1% of the card's bf16 rate. A replay issues the whole step as one launch.

What capturing needs, and how the step provides it:
  - no host sync anywhere in the step: TopK selection, AuxK over masked pre-activations (`TopKSAE._auxk_masked`),
    pattern counts and fired features by `index_add` (`sparse.SparsePattern`, `fired_from_sparse`), finiteness
    verdicts kept on the device (`Trainer.defer_checks`, fused Adam's `found_inf`);
  - everything that changes between steps read from a device tensor the graph owns: the batch (copied into
    `acts`), the learning rate (the optimiser's `lr` is that tensor during capture: fused Adam takes it), the step
    number (the first bad step's record). Batch size, k and the loss coefficients are fixed for a run;
  - the optimiser's state made before capture: the first `WARMUP_STEPS` steps run eagerly, then a forward and
    backward on a side stream (no update) warm the libraries' per-stream state, then the step is captured and
    replayed for the batch at hand. Capturing records without running, so no batch is trained twice or skipped.

Scope: TopK SAEs and transcoders trained with Adam by the plain `Trainer` (`Trainer.graphable`), without
resampling. Other architectures size tensors from data (batch top-k, the active patterns of relu-l1 and jumprelu)
and keep the deferred step. A batch of another shape (the last one of a store) takes the deferred step too. A
failed capture is reported once and the run goes on with the deferred step. `MONOSCOPE_CUDA_GRAPH=0` turns capture
off. A checkpoint load drops the graph (the optimiser's state tensors are replaced), and the next steps capture
again.

The graph replays the deferred step's kernels: weights agree with the deferred step's to float rounding (CUDA's
index_add and sort order float sums differently from run to run), `tests/train/test_graph_step.py` on a GPU.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from monoscope.store.batches import Batch

if TYPE_CHECKING:
    from monoscope.train.trainer import Trainer

GRAPH_ARCHS = frozenset({"topk", "transcoder"})
"""Architectures whose training step makes no host sync on a GPU (see the module docstring)."""
WARMUP_STEPS = 3
"""Eager steps before the capture: the optimiser's state, the workspaces and the autotuned kernels exist by then."""
ENV_SWITCH = "MONOSCOPE_CUDA_GRAPH"


def why_not_graphed(trainer: Trainer) -> str | None:
    """None when `trainer`'s steps can be captured, else the reason (for logs and tests)."""
    if trainer.device.type != "cuda":
        return f"device {trainer.device.type}: CUDA graphs are for GPUs"
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if not type(trainer).graphable:
        return f"{type(trainer).__name__} changes the step (only the plain Trainer's step is captured)"
    if trainer.sae.arch not in GRAPH_ARCHS:
        return (f"arch {trainer.sae.arch}: its step sizes tensors from data (host syncs); captured: "
                f"{sorted(GRAPH_ARCHS)}")
    if not trainer.sae.cfg.sparse_kernels:
        return "sparse kernels off (the dense reference path)"
    if trainer.cfg.optimizer != "adam" or not trainer.defer_checks:
        return f"optimizer {trainer.cfg.optimizer} with deferred checks {trainer.defer_checks}: needs adam, deferred"
    if trainer.resample_steps:
        return "resampling steps (they read the batch on the host)"
    if not all(g.get("fused") for g in trainer.optimizer.param_groups):
        return "the optimiser is not torch's fused Adam"
    return None


class GraphedStep:
    """The captured step of one `Trainer` (module docstring). `run` replays it, or says it could not."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None
        self.acts: Tensor | None = None  # [B, width] the captured step's batch
        self.lr: Tensor | None = None  # [] float32
        self.step: Tensor | None = None  # [] int64
        self.replays = 0

    @classmethod
    def make(cls, trainer: Trainer) -> GraphedStep | None:
        return None if why_not_graphed(trainer) is not None else cls(trainer)

    def run(self, acts: Tensor, lr: float, step: int) -> bool:
        """Train on `acts` by replaying the graph (capturing it first when due); False: the caller takes the
        deferred step (warming up, another batch shape, or capture failed)."""
        if self.failed is not None:
            return False
        if self.graph is None:
            if self.eager_steps < WARMUP_STEPS:
                self.eager_steps += 1
                return False
            try:
                self._capture(acts)
            except Exception as e:
                self.failed = f"{type(e).__name__}: {e}"
                self.trainer.optimizer.zero_grad(set_to_none=True)
                warnings.warn(f"CUDA graph capture of the training step failed, training goes on without it "
                              f"({self.failed.splitlines()[0][:300]}); set {ENV_SWITCH}=0 to skip the attempt",
                              RuntimeWarning, stacklevel=2)
                return False
        assert self.acts is not None and self.lr is not None and self.step is not None and self.graph is not None
        if acts.shape != self.acts.shape or acts.dtype != self.acts.dtype:
            return False
        self.acts.copy_(acts, non_blocking=True)
        self.lr.fill_(lr)
        self.step.fill_(step)
        self.graph.replay()
        self.replays += 1
        return True

    def _capture(self, acts: Tensor) -> None:
        t = self.trainer
        dev = t.device
        self.acts = torch.empty(acts.shape, dtype=acts.dtype, device=dev)  # batches may come from host memory
        self.acts.copy_(acts)
        self.lr = torch.zeros((), dtype=torch.float32, device=dev)
        self.step = torch.zeros((), dtype=torch.int64, device=dev)
        batch = Batch(self.acts, torch.empty(0, dtype=torch.int64))

        def warm() -> None:  # a forward and backward, no update
            out = t.sae(t.scaled(self.acts), dead_mask=t.dead.dead() if t.use_auxk else None)
            out.total.backward()
            t.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients it writes

        groups = t.optimizer.param_groups
        saved = [(g["lr"], g["capturable"]) for g in groups]
        try:
            for g in groups:
                g["lr"], g["capturable"] = self.lr, True
            self.graph = record(lambda: t.device_step(batch, self.step), warm, dev)
            # the graph keeps its gradients' memory and replays write there, not to `.grad`: a later eager step
            # (another batch shape) starts from no gradients, as every deferred step does
            t.optimizer.zero_grad(set_to_none=True)
        finally:
            for g, (lr, capturable) in zip(groups, saved, strict=True):
                g["lr"], g["capturable"] = lr, capturable


def record(step: Callable[[], object], warm: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph:
    """`step` captured as a CUDA graph (recorded, not run), after `warm` ran on the capture's side stream so that
    per-stream library state (cuBLAS workspaces) is made outside the capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        warm()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):  # the prefetch thread copies on
        step()
    return graph
