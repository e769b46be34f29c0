"""The training step captured as a CUDA graph (`monoscope.train.graph_step`).

On a CPU the capture itself cannot run, so a stand-in records the step function and replays it by calling it: that
holds everything around the graph (the learning rate and step number read from tensors, the batch copied into the
captured buffer, the optimiser's groups restored, warm-up and shape fallbacks) against the deferred step, bit for
bit. On a GPU the real capture is held against the deferred step to float rounding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from monoscope.sae import SAEConfig, build_sae
from monoscope.store.batches import Batch
from monoscope.train import MemorySink, TrainConfig, Trainer, graph_step
from monoscope.train.graph_step import WARMUP_STEPS, GraphedStep, why_not_graphed
from tests.train.helpers import D, RandomSource
from tests.train.test_trainer import BATCH, ListLog, assert_identical, snapshot
from tests.train.test_transcoder_init import PairSource


class Replayed:
    """Stands in for a CUDA graph: replay runs the recorded step again (a capture records without running). A
    graph's backward writes its gradients into the memory it captured, never into the parameters' `.grad`, which
    stays None between replays: the stand-in clears what its eager backward set."""

    def __init__(self, step: Any, params: list[torch.Tensor]) -> None:
        self.step, self.params = step, params

    def replay(self) -> None:
        self.step()
        for p in self.params:
            p.grad = None


TRAINING: list[Trainer] = []  # the trainer `trained` runs now (whose parameters a replay's backward writes)


def fake_record(step: Any, warm: Any, device: torch.device) -> Replayed:
    warm()
    return Replayed(step, list(TRAINING[-1].sae.parameters()))


class ShortLast(RandomSource):
    """Batches of BATCH rows, the last of them shorter (a store's remainder)."""

    def __init__(self, n_batches: int) -> None:
        super().__init__(BATCH)
        self.n_batches = n_batches

    def __next__(self) -> Batch:
        b = super().__next__()
        if self.pos == self.n_batches:  # RandomSource counts batches in pos
            return Batch(b.acts[: BATCH // 2], b.rows[: BATCH // 2])
        return b


def build(arch: str, steps: int, device: str = "cpu", source: Any = None, **settings: Any) -> Trainer:
    """A tiny TopK SAE or transcoder trainer on `device` (the transcoder on `PairSource`'s [x, y] rows)."""
    cfg = TrainConfig(arch=arch, tokens=steps * BATCH, batch_size=BATCH, width="4x", k=4, lr=3e-3, log_every=10,
                      checkpoint_every=0, progress=False, dead_window=4 * BATCH, **settings)  # type: ignore[arg-type]
    if arch == "transcoder":
        src = source or PairSource(BATCH)
        sae_cfg = SAEConfig(arch=arch, d_in=D, d_sae=cfg.d_sae(D), k=4, hook="mlp_in.1", target_hook="mlp_out.1",
                            normaliser=src.c_in, target_normaliser=src.c_out, compute_dtype=cfg.dtype)
    else:
        src = source or RandomSource(BATCH)
        sae_cfg = SAEConfig(arch=arch, d_in=D, d_sae=cfg.d_sae(D), k=4, normaliser=src.normaliser,
                            compute_dtype=cfg.dtype)
    return Trainer(build_sae(sae_cfg, seed=0, device=device), cfg, src, sink=MemorySink(), log=ListLog())


def trained(arch: str, graphed: bool, device: str = "cpu", source: Any = None, steps: int = 60,
            **settings: Any) -> Trainer:
    t = build(arch, steps, device, source, **settings)
    t.defer_checks = True
    t._fused = None  # the GPU's step: torch's fused Adam
    t._graph = GraphedStep(t) if graphed else None
    TRAINING[:] = [t]
    t.init_b_dec(t.source.data[:256].float() if hasattr(t.source, "data") else RandomSource(256).data.float())
    t.run()
    return t


@pytest.mark.parametrize("arch", ["topk", "transcoder"])
def test_a_replayed_step_trains_exactly_like_the_deferred_step(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_step, "record", fake_record)
    want = trained(arch, graphed=False)
    got = trained(arch, graphed=True)
    assert got._graph is not None and got._graph.failed is None
    assert got._graph.replays == 60 - WARMUP_STEPS  # every step after the warm-up replayed
    assert_identical(snapshot(got), snapshot(want))
    # the optimiser's groups hold a float lr again (checkpoints and the schedule's writes see what they always saw)
    assert all(isinstance(g["lr"], float) and g["capturable"] is False for g in got.optimizer.param_groups)


def test_a_batch_of_another_shape_takes_the_deferred_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_step, "record", fake_record)
    want = trained("topk", graphed=False, source=ShortLast(20), steps=20)
    got = trained("topk", graphed=True, source=ShortLast(20), steps=20)
    assert got._graph is not None and got._graph.replays == 20 - WARMUP_STEPS - 1
    assert_identical(snapshot(got), snapshot(want))


def test_a_failed_capture_warns_once_and_training_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(step: Any, warm: Any, device: torch.device) -> Replayed:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graph_step, "record", broken)
    want = trained("topk", graphed=False, steps=12)
    with pytest.warns(RuntimeWarning, match=r"CUDA graph capture of the training step failed, training goes on "
                      r"without it \(RuntimeError: operation not permitted when stream is capturing\); set "
                      r"MONOSCOPE_CUDA_GRAPH=0 to skip the attempt"):
        got = trained("topk", graphed=True, steps=12)
    assert got._graph is not None and got._graph.replays == 0
    assert_identical(snapshot(got), snapshot(want))


def test_which_trainers_are_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert why_not_graphed(build("topk", 10)) == "device cpu: CUDA graphs are for GPUs"

    def reason(arch: str, **settings: Any) -> str | None:  # the checks after the device's
        t = build(arch, 10, **settings)
        t.device = torch.device("cuda")
        t.defer_checks = True
        return why_not_graphed(t)

    assert reason("topk") is None
    assert reason("transcoder") is None
    assert reason("batchtopk") == ("arch batchtopk: its step sizes tensors from data (host syncs); captured: "
                                   "['topk', 'transcoder']")
    assert reason("topk", optimizer="signum-sf") == ("optimizer signum-sf with deferred checks True: needs adam, "
                                                     "deferred")
    monkeypatch.setenv("MONOSCOPE_CUDA_GRAPH", "0")
    assert reason("topk") == "MONOSCOPE_CUDA_GRAPH=0"


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU here: the real graph capture runs only on one (the tests above hold the same "
                           "step against the deferred one with a stand-in that replays it on the CPU)")
@pytest.mark.parametrize("arch", ["topk", "transcoder"])
def test_the_captured_step_trains_like_the_deferred_step_on_a_gpu(arch: str) -> None:
    want = trained(arch, graphed=False, device="cuda")
    got = trained(arch, graphed=True, device="cuda")
    assert got._graph is not None and got._graph.failed is None and got._graph.replays == 60 - WARMUP_STEPS
    a, b = snapshot(got), snapshot(want)
    assert a["step"] == b["step"]
    for k in a["sae"]:
        torch.testing.assert_close(a["sae"][k], b["sae"][k], rtol=2e-3, atol=2e-4, msg=k)
