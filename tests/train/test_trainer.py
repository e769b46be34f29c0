"""The training loop on random tensors: each architecture learns, resumes bit-identically, and
stops (or skips) on non-finite data without touching the weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.base import geometric_median
from monoscope.store.batches import Batch
from monoscope.train import MemorySink, NonFiniteError, TrainConfig, Trainer, TrainingInterrupted
from tests.train.helpers import D, RandomSource

ARCHS = ["relu-l1", "topk", "batchtopk", "jumprelu", "matryoshka", "gated"]
BATCH = 64


class ListLog:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)


def make_trainer(arch: str, steps: int = 60, source: Any = None, seed: int = 0, **settings: Any) -> Trainer:
    topk = arch in ("topk", "batchtopk", "matryoshka")
    defaults: dict[str, Any] = {
        "arch": arch, "tokens": steps * BATCH, "batch_size": BATCH, "width": "4x", "k": 4 if topk else None,
        "lr": 3e-3, "log_every": 10, "checkpoint_every": 0, "progress": False, "dead_window": 4 * BATCH,
    }
    if arch == "relu-l1":
        defaults["sparsity_coef"] = 0.5  # the paper's 5 is for wide models: d=32 needs less
    if arch == "jumprelu":
        defaults["sparsity_coef"] = 0.05
    if arch == "gated":
        defaults["sparsity_coef"] = 0.5
    cfg = TrainConfig(**{**defaults, **settings})
    src = source if source is not None else RandomSource(BATCH)
    sae_cfg = SAEConfig(arch=arch, d_in=D, d_sae=cfg.d_sae(D), k=cfg.k, normaliser=src.normaliser,
                        prefixes=cfg.prefix_widths(D))
    sae = build_sae(sae_cfg, seed=seed)
    trainer = Trainer(sae, cfg, src, sink=MemorySink(), log=ListLog())
    return trainer


def snapshot(t: Trainer) -> dict[str, Any]:
    """Everything that must be bit-identical after a resume."""
    opt = {f"{i}.{k}": v.clone() for i, st in enumerate(t.optimizer.state.values()) for k, v in st.items()}
    logs = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in t.log.records]  # type: ignore[attr-defined]
    return {"sae": {k: v.clone() for k, v in t.sae.state_dict().items()}, "opt": opt,
            "dead": t.dead.since.clone(), "step": t.step, "logs": logs, "cursor": t.source.state_dict()}


def assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["step"] == b["step"] and a["cursor"] == b["cursor"]
    assert a["sae"].keys() == b["sae"].keys() and a["opt"].keys() == b["opt"].keys()
    for k in a["sae"]:
        assert torch.equal(a["sae"][k], b["sae"][k]), k
    for k in a["opt"]:
        assert torch.equal(a["opt"][k], b["opt"][k]), k
    assert torch.equal(a["dead"], b["dead"])
    assert a["logs"] == b["logs"]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_learns_and_keeps_its_constraints(arch: str) -> None:
    t = make_trainer(arch, steps=150)
    t.init_b_dec(RandomSource(256, seed=9).data.float())
    out = t.run()
    assert out.finished and not out.data_ended and t.step == 150
    recs = t.log.records  # type: ignore[attr-defined]
    assert [r["step"] for r in recs] == list(range(10, 151, 10))
    assert recs[-1]["fvu"] < 0.6 * recs[0]["fvu"] and recs[-1]["fvu"] < 0.5, [r["fvu"] for r in recs]
    assert recs[-1]["lr"] < 0.1 * recs[0]["lr"]  # decayed to ~0 over the last 20%
    norms = t.sae.W_dec.detach().norm(dim=1)
    if arch in ("relu-l1", "gated"):
        assert recs[-1]["sparsity"] > 0 and not torch.allclose(norms, torch.ones_like(norms))
    else:
        torch.testing.assert_close(norms, torch.ones_like(norms))
    if arch in ("topk", "batchtopk", "matryoshka"):
        assert abs(recs[-1]["l0"] - 4) < 0.5
    if arch in ("batchtopk", "matryoshka"):  # the inference threshold is learned during training and used in eval
        thr = float(t.sae.threshold)  # type: ignore[arg-type]
        assert 0 < thr < float("inf")
        x = t.scaled(RandomSource(512, seed=5).data)
        l0 = float(t.sae.eval()(x).l0)
        assert 1 < l0 < 12
        # calibrated from the next batches after training: the eval L0 matches k
        cursor = t.source.state_dict()
        t.sae.train()
        theta = t.calibrate_threshold(n_batches=8)
        assert theta is not None and theta == float(t.sae.threshold)  # type: ignore[arg-type]
        assert t.sae.training and t.source.state_dict() != cursor
        l0 = float(t.sae.eval()(x).l0)
        assert abs(l0 - 4) <= 0.4, l0
    if arch not in ("batchtopk", "matryoshka"):
        assert t.calibrate_threshold() is None
    if arch == "jumprelu":
        assert t.sae.log_threshold.dtype == torch.float32  # type: ignore[union-attr]
        assert not torch.allclose(t.sae.log_threshold, torch.full_like(t.sae.log_threshold, -6.9078))  # type: ignore[arg-type]
        assert recs[-1]["sparsity"] > 0


def test_jumprelu_thresholds_start_from_the_first_batch() -> None:
    """init_b_dec also sets jumprelu's per-feature thresholds: a moderate initial L0 (not most
    features), θ in float32 and never below the configured initial threshold."""
    t = make_trainer("jumprelu", width="16x")
    raw = RandomSource(256, seed=3).data
    x = t.scaled(RandomSource(256, seed=4).data)
    l0_before = float(t.sae.eval()(x).l0)
    t.init_b_dec(raw)
    l0_after = float(t.sae(x).l0)
    n_feat = t.sae.cfg.d_sae
    assert l0_before > 0.3 * n_feat and l0_after < 0.25 * n_feat * 1.5, (l0_before, l0_after)
    assert t.sae.log_threshold.dtype == torch.float32  # type: ignore[union-attr]
    assert (t.sae.log_threshold.exp() >= t.sae.cfg.jumprelu_init_threshold * 0.999).all()  # type: ignore[union-attr]
    t.sae.train()
    t.run()
    recs = t.log.records  # type: ignore[attr-defined]
    assert recs[-1]["fvu"] < 0.6 * recs[0]["fvu"], [r["fvu"] for r in recs]


def test_b_dec_starts_at_the_geometric_median_of_a_sample() -> None:
    t = make_trainer("topk")
    raw = RandomSource(256, seed=3).data
    t.init_b_dec(raw)
    want = geometric_median(raw.float() * t.sae.cfg.normaliser)
    torch.testing.assert_close(t.sae.b_dec.detach(), want)


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_from_a_checkpoint_is_bit_identical(arch: str) -> None:
    """Stop at step 23 (not a log step, between resamplings), resume in a new trainer whose SAE was
    initialised differently: the end state equals an uninterrupted run's, bit for bit."""
    settings: dict[str, Any] = {}
    if arch == "relu-l1":  # strong λ and a one-batch window: features die and get resampled
        settings = {"resample_at": (0.25, 0.6), "dead_window": BATCH, "sparsity_coef": 5.0}
    ref = make_trainer(arch, **settings)
    ref.init_b_dec(RandomSource(256, seed=9).data.float())
    ref.run()
    want = snapshot(ref)

    first = make_trainer(arch, **settings)
    first.init_b_dec(RandomSource(256, seed=9).data.float())

    def stop(n: int) -> None:
        if first.step == 23:
            first.stop_signal = 15

    with pytest.raises(TrainingInterrupted, match=r"after step 23 of 60.*--resume") as e:
        first.run(on_step=stop)
    assert e.value.step == 23 and e.value.signum == 15
    ckpt = first.sink.latest()  # type: ignore[union-attr]
    assert ckpt is not None and ckpt.step == 23

    second = make_trainer(arch, seed=1, **settings)
    second.log.records = [r for r in first.log.records if r["step"] <= 23]  # type: ignore[attr-defined]
    second.load(ckpt)
    second.run()
    assert_identical(snapshot(second), want)
    if arch == "relu-l1":
        assert second.resampled > first.resampled  # a resampling (step 36) happened after the resume
    if arch == "topk":
        assert any(r["aux"] > 0 for r in ref.log.records)  # type: ignore[attr-defined]


class PoisonSource(RandomSource):
    def __init__(self, at_step: int, row: int, value: float) -> None:
        super().__init__(BATCH)
        self.at_step, self.row, self.value = at_step, row, value

    def __next__(self) -> Batch:
        b = super().__next__()
        if self.pos == self.at_step:
            acts = b.acts.clone()
            acts[self.row, 3] = self.value
            b = Batch(acts, b.rows)
        return b


def test_non_finite_batch_stops_before_the_update_naming_step_and_row() -> None:
    t = make_trainer("topk", source=PoisonSource(at_step=5, row=7, value=float("nan")))
    t.describe_row = lambda row: f"shard-x.safetensors context {row // 10} position {row % 10}"
    with pytest.raises(NonFiniteError) as e:
        t.run()
    msg = str(e.value)
    assert "step 5:" in msg and "non-finite activations" in msg and "\n" not in msg
    assert "first 263 = shard-x.safetensors context 26 position 3" in msg and "--skip-nonfinite" in msg
    assert t.step == 4  # the bad step was not taken


def test_non_finite_loss_with_finite_inputs_is_reported_as_divergence() -> None:
    t = make_trainer("relu-l1", source=PoisonSource(at_step=3, row=0, value=1e30))
    for _ in range(2):
        t.train_step()
    before = {k: v.clone() for k, v in t.sae.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"step 3: the loss or its gradient is not finite.*inputs finite"):
        t.train_step()
    assert all(torch.equal(v, t.sae.state_dict()[k]) for k, v in before.items())


def test_skip_nonfinite_counts_and_continues() -> None:
    t = make_trainer("topk", source=PoisonSource(at_step=5, row=7, value=float("inf")), skip_nonfinite=True,
                     grad_clip=0.0)  # and the unclipped path
    out = t.run()
    assert out.finished and t.skipped == 1 and t.step == 60
    assert t.log.records[-1]["skipped"] == 1  # type: ignore[attr-defined]
    assert all(torch.isfinite(p).all() for p in t.sae.parameters())


def test_a_stop_before_the_first_step_saves_nothing() -> None:
    t = make_trainer("topk")
    t.stop_signal = 2
    with pytest.raises(TrainingInterrupted, match="nothing to save"):
        t.run()
    assert t.sink.latest() is None  # type: ignore[union-attr]


@pytest.mark.parametrize("clip", [1e-3, 1e3])
def test_cpu_clip_is_clip_grad_norm_bit_for_bit(clip: float) -> None:
    """The CPU path reads the norm and skips the multiply below the limit: both regimes must match torch's."""
    tr = make_trainer("topk", grad_clip=clip)
    x = tr.scaled(next(tr.source).acts)
    out = tr.sae(x, sparsity_coef=0.0)
    out.total.backward()
    ref = [p.grad.clone() for p in tr._params if p.grad is not None]
    params = [torch.nn.Parameter(torch.empty_like(r)) for r in ref]
    for p, r in zip(params, ref, strict=True):
        p.grad = r.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    norm = tr._clip_grads()
    assert torch.equal(norm, ref_norm)
    got = [p.grad for p in tr._params if p.grad is not None]
    assert all(torch.equal(g, p.grad) for g, p in zip(got, params, strict=True))
    clipped = float(norm) > clip
    assert clipped == (clip == 1e-3)  # one case clips, the other does not
    assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True)) == (not clipped)
