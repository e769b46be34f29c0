"""The GPU data path, run on the CPU: deferred finiteness checks and the prefetching batch source give
bit-for-bit the training an eager, unprefetched loop gives, skip and stop as it does, and resume exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from monoscope.store.batches import Batch
from monoscope.train import NonFiniteError, TrainingInterrupted
from monoscope.train.prefetch import DevicePrefetch
from monoscope.train.trainer import Trainer
from tests.train.helpers import RandomSource
from tests.train.test_trainer import ARCHS, BATCH, PoisonSource, assert_identical, make_trainer, snapshot

RESAMPLE = {"resample_at": (0.25, 0.6), "dead_window": BATCH, "sparsity_coef": 5.0}


def settings_for(arch: str) -> dict[str, Any]:
    return RESAMPLE if arch == "relu-l1" else {}


def trained(arch: str, defer: bool, prefetch: bool = False, source: Any = None, **settings: Any) -> Trainer:
    t = make_trainer(arch, source=source, **{**settings_for(arch), **settings})
    t.defer_checks = defer
    t._fused = None  # the deferred step is the GPU's, with torch's Adam: the eager loop it is held against too
    if prefetch:
        t.source = DevicePrefetch(t.source, "cpu")
    t.init_b_dec(RandomSource(256, seed=9).data.float())
    t.run()
    return t


@pytest.mark.parametrize("arch", ARCHS)
def test_deferred_checks_and_prefetch_train_exactly_like_the_eager_loop(arch: str) -> None:
    want = snapshot(trained(arch, defer=False))
    assert_identical(snapshot(trained(arch, defer=True, prefetch=True)), want)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu-l1", "jumprelu"])
def test_a_skipped_non_finite_batch_is_a_no_op_on_the_device(arch: str) -> None:
    """NaN rows at step 5 with --skip-nonfinite: the forward runs, but Adam (its moments and step
    count), the dead counters, batchtopk's θ, the decoder norms and the metrics are as if the step
    had been skipped on the host."""
    def run(defer: bool) -> Trainer:
        return trained(arch, defer, source=PoisonSource(at_step=5, row=7, value=float("nan")), skip_nonfinite=True)

    eager, deferred = run(False), run(True)
    assert eager.skipped == deferred.skipped == 1
    assert deferred.log.records[0]["skipped"] == 1  # type: ignore[attr-defined]
    assert_identical(snapshot(deferred), snapshot(eager))


def test_a_diverged_step_is_skipped_the_same_way() -> None:
    def run(defer: bool) -> Trainer:
        return trained("relu-l1", defer, source=PoisonSource(at_step=3, row=0, value=1e30), skip_nonfinite=True)

    eager, deferred = run(False), run(True)
    assert eager.skipped == deferred.skipped == 1
    assert_identical(snapshot(deferred), snapshot(eager))


def test_deferred_stop_names_the_bad_step_and_row_when_the_verdict_is_read() -> None:
    t = make_trainer("topk", source=PoisonSource(at_step=5, row=7, value=float("nan")))
    t.defer_checks = True
    t.describe_row = lambda row: f"shard-x.safetensors context {row // 10} position {row % 10}"
    with pytest.raises(NonFiniteError) as e:
        t.run()
    assert str(e.value) == (
        "step 5: the batch holds non-finite activations (first bad row 263 = shard-x.safetensors context 26 "
        "position 3); found at step 10 (on cpu the check is read once per log interval), nothing after the last "
        "checkpoint was saved: the activations are damaged there: recapture the store, or pass --skip-nonfinite to "
        "skip them")
    assert t.sink.saved == []  # type: ignore[union-attr]


def test_deferred_divergence_is_named_as_such() -> None:
    t = make_trainer("relu-l1", source=PoisonSource(at_step=3, row=0, value=1e30))
    t.defer_checks = True
    with pytest.raises(NonFiniteError, match=r"^step 3: the loss or its gradient is not finite \(inputs finite; "
                                             r"batch starts at row 128 = row 128\); found at step 10 .*lower --lr"):
        t.run()


@pytest.mark.parametrize("arch", ["topk", "relu-l1"])
def test_deferred_prefetched_resume_is_bit_identical(arch: str) -> None:
    want = snapshot(trained(arch, defer=False))
    first = make_trainer(arch, **settings_for(arch))
    first.defer_checks = True
    first.source = DevicePrefetch(first.source, "cpu")
    first.init_b_dec(RandomSource(256, seed=9).data.float())

    def stop(n: int) -> None:
        if first.step == 23:
            first.stop_signal = 15

    with pytest.raises(TrainingInterrupted):
        first.run(on_step=stop)
    ckpt = first.sink.latest()  # type: ignore[union-attr]
    # the cursor of the last step taken, not of the read-ahead
    assert ckpt is not None and ckpt.meta["data_cursor"] == {"pos": 23}
    second = make_trainer(arch, seed=1, **settings_for(arch))
    second.defer_checks = True
    second.source = DevicePrefetch(second.source, "cpu")
    second.log.records = [r for r in first.log.records if r["step"] <= 23]  # type: ignore[attr-defined]
    second.load(ckpt)
    second.run()
    assert_identical(snapshot(second), want)


class EndingSource(RandomSource):
    """Ends, or fails, after `n` batches."""

    def __init__(self, n: int, error: Exception | None = None) -> None:
        super().__init__(8)
        self.n, self.error = n, error

    def __next__(self) -> Batch:
        if self.pos == self.n:
            if self.error is not None:
                raise self.error
            raise StopIteration
        return super().__next__()


def test_prefetch_hands_out_the_source_s_batches_and_cursor_in_order() -> None:
    plain, ahead = RandomSource(8), DevicePrefetch(RandomSource(8), "cpu", depth=3)
    for i in range(7):
        a, b = next(plain), next(ahead)
        assert torch.equal(a.acts, b.acts) and torch.equal(a.rows, b.rows)
        assert ahead.state_dict() == {"pos": i + 1}
    ahead.load_state_dict({"pos": 2})
    plain.load_state_dict({"pos": 2})
    assert ahead.state_dict() == {"pos": 2}
    assert torch.equal(next(ahead).acts, next(plain).acts)
    ahead.close()


def test_prefetch_ends_and_fails_where_the_source_does() -> None:
    ahead = DevicePrefetch(EndingSource(3), "cpu")
    assert [int(next(ahead).rows[0]) for _ in range(3)] == [0, 8, 16]
    for _ in range(2):
        with pytest.raises(StopIteration):
            next(ahead)
    failing = DevicePrefetch(EndingSource(2, error=OSError("shard-00001 is truncated")), "cpu")
    next(failing), next(failing)
    with pytest.raises(OSError, match="shard-00001 is truncated"):
        next(failing)
    assert failing.state_dict() == {"pos": 2}
