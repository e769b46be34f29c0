"""The training loop: one SAE, one batch source, Adam, schedules, dead features, checkpoints.

The trainer depends only on small protocols, so tests drive it with random tensors:
  - a `BatchSource`: `__next__() -> Batch(acts [B, d] raw scale, rows [B])`, `state_dict()`,
    `load_state_dict()` (an `ActivationStore.batches(...)` or `stream_batches(...)` iterator);
  - a `CheckpointSink` (`checkpoint.py`): `save(Checkpoint)`, `latest()`;
  - a `MetricsSink`: `write(record)` for each log step (`log.py` writes train_log.jsonl).

One step (every architecture):
  1. x = c·acts (float32, c the store's normaliser, so E‖x‖² = d_model); a non-finite x stops the
     run (or is skipped with `skip_nonfinite`), naming the step and the offending rows;
  2. lr(step) and λ(step) from `schedules.py` (pure functions of the step: nothing to save);
  3. out = sae(x, sparsity_coef=λ, dead_mask=dead if AuxK) -> loss = mse + sparsity + aux (with
     --loss e2e-kl/e2e-ce, the e2e term replaces mse: `e2e.py`);
  4. backward; unit-norm decoders (topk-style and jumprelu; not a --transcoder-init sparsify transcoder) drop
     the gradient component parallel to each decoder row; global grad-norm clip (1.0); non-finite loss or
     gradient norm: stop/skip;
  5. Adam step (or --optimizer signum-sf, `optim.py`, whose averaged weights are what `train` saves and
     evaluates); unit-norm decoders are renormalised; dead counters advance with `out.fired`;
  6. relu-l1 (revive=resample): at the resample steps, dead features are resampled (`dead.py`).
On a CPU with Adam, the removal and clipping of 4 and the update and renormalisation of 5 run as one C step in two
passes per parameter (`fused_step.py`; the same Adam bit for bit, the rest to float rounding).
Before step 0, b_dec is set from the first batch (geometric median by default; --transcoder-init sparsify also
sets the encoder, its bias and a zero decoder there).
Per-step metrics are summed on the device and read (one host sync) every `log_every` steps. On a
CPU the two finiteness tests (a sum over x, then the loss and gradient norm) are host syncs that
cost nothing. On a GPU (`defer_checks`) a sync stalls the CPU until the queued kernels finish, so
the step always runs and the verdict stays on the device: fused Adam's `found_inf` turns a bad step
into a no-op (no update, no step count), and the dead counters, metrics, buffers (batchtopk's θ) and
decoder renormalisation are masked by it. `check_pending` reads the verdicts at each log, checkpoint
and the end, then counts skips or raises `NonFiniteError` naming the first bad step and row, as the
eager test does; nothing unchecked is ever checkpointed. Both paths train bit for bit alike. AuxK
takes no host sync on a GPU (`TopKSAE._auxk_masked`: a top-k over the masked
pre-activations instead of the list of dead features). The host syncs left: for
batchtopk in training, batch top-k's check for rows that need more candidates (one `any`, more when
it redoes rows); for relu-l1 and jumprelu with sparse kernels, the active pattern (a `nonzero`).
Each sizes a tensor or takes a branch, so it cannot be deferred. On a GPU, `train()` also reads the
store through `prefetch.DevicePrefetch` (reads and copies on a background thread), and a TopK or transcoder
step, having no host sync left, is captured once as a CUDA graph and replayed per batch (`graph_step.py`;
`device_step` is the device work both run).

Resume is exact because everything the next step reads is in `state()`: SAE, Adam, dead counters,
data cursor, step, RNG states, metric accumulators; schedules and resampling draws are functions
of (seed, step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from monoscope.devices import keep_freed_cpu_memory
from monoscope.errors import MonoscopeError
from monoscope.sae import SAE
from monoscope.sae.base import ForwardOutput
from monoscope.sae.config import THRESHOLD_STYLE
from monoscope.store.batches import Batch
from monoscope.train.checkpoint import Checkpoint, CheckpointSink, rng_state, set_rng_state
from monoscope.train.config import TrainConfig
from monoscope.train.dead import DeadFeatureTracker, resample_dead
from monoscope.train.fused_step import FusedAdamStep
from monoscope.train.graph_step import GraphedStep
from monoscope.train.optim import SignumScheduleFree, make_optimizer
from monoscope.train.schedules import Schedule, schedule_at

METRICS = ("loss", "mse", "sparsity", "aux", "fvu", "l0", "grad_norm")
"""Per-step values averaged over each log interval."""

CALIBRATION_BATCHES = 8
"""Batches read after the last step to set batchtopk's inference threshold."""


class BatchSource(Protocol):
    """Shuffled activation batches with an exact, saveable cursor."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class MetricsSink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...


class NonFiniteError(MonoscopeError):
    """A batch or the loss was NaN/inf; the run stopped before the update, checkpoints intact."""


class TrainingInterrupted(MonoscopeError):
    """SIGTERM/SIGINT: a checkpoint was saved and the run stopped; `--resume` continues it."""

    def __init__(self, message: str, step: int, signum: int) -> None:
        super().__init__(message)
        self.step = step
        self.signum = signum


@dataclass
class RunOutcome:
    """How `Trainer.run` ended."""

    finished: bool
    """All `config.steps` steps are done."""
    data_ended: bool
    """The batch source ran out first (streamed corpus too short)."""
    checkpoint: str | None
    """Where the last checkpoint went."""


class Trainer:
    """Trains `sae` in place on batches from `source` according to `config`."""

    graphable = True
    """Whether `graph_step` may capture this class's step on a GPU: False for subclasses that change the step."""

    def __init__(
        self,
        sae: SAE,
        config: TrainConfig,
        source: BatchSource,
        *,
        sink: CheckpointSink | None = None,
        log: MetricsSink | None = None,
        describe_row: Callable[[int], str] | None = None,
        meta: dict[str, Any] | None = None,
        dictionary_size: int | None = None,
    ) -> None:
        self.sae = sae.train()
        sae.joint_backward = True  # every step backpropagates mse + sparsity + aux as one loss
        self.cfg = config
        self.source = source
        self.sink = sink
        self.log = log
        self.describe_row = describe_row or (lambda row: f"row {row}")
        self.meta = dict(meta or {})
        """Extra JSON-able facts stored with each checkpoint (config, data identity)."""
        self.device = sae.W_enc.device
        if self.device.type == "cpu":
            keep_freed_cpu_memory()  # a step's large tensors reuse freed memory instead of page-faulting it in
        self.total_steps = config.steps
        self.base_lr = config.learning_rate(sae.cfg.d_in)
        self.unit_norm_decoder = sae.unit_norm_decoder and config.transcoder_init != "sparsify"
        """Renormalise decoder rows and remove the gradient parallel to them (not for relu-l1/gated, whose L1 term
        weighs decoder norms, nor for a transcoder trained with --transcoder-init sparsify, as sparsify trains it)."""
        self.use_auxk = config.revive_method == "auxk"
        self.resample_steps = set(config.resample_steps)
        self.optimizer = make_optimizer(config.optimizer, sae.parameters(), self.base_lr, self.device)
        self._fused = FusedAdamStep.make(sae, self.optimizer, self.unit_norm_decoder)
        # the fused step's bf16 copies of the weights are stale after any other update (torch's fused Adam leaves the
        # parameters' version counters alone)
        self.optimizer.register_step_post_hook(lambda *_: sae.invalidate_copies())
        """The CPU's two-pass optimiser step (`fused_step`), or None: the PyTorch path."""
        # the window from the whole dictionary's size (`dictionary_size`: a feature shard's trainer gives it), the
        # counters for this SAE's own features
        window = config.dead_window_tokens(dictionary_size or sae.cfg.d_sae)
        self.dead = DeadFeatureTracker(sae.cfg.d_sae, window, self.device)
        self.step = 0
        self.tokens = 0
        self.skipped = 0
        self.resampled = 0
        self.last_metrics: dict[str, Any] = {}
        self.stop_signal: int | None = None
        """Set (by a signal handler) to stop after the current step with a checkpoint."""
        self._acc = torch.zeros(len(METRICS), dtype=torch.float64, device=self.device)  # sums since last log
        self._acc_steps = 0
        self._t_log = time.perf_counter()
        self._tok_log = 0
        self._params = [p for p in sae.parameters() if p.requires_grad]
        self.defer_checks = self.device.type == "cuda"
        """Test finiteness on the device and read the verdict once per log interval (module docstring):
        on by default on a GPU, where each host sync stalls the queue of kernels; off on a CPU. Adam only:
        signum-sf has no `found_inf` no-op, so it always takes the eager step."""
        # deferred checks, on the device: [good steps, bad steps] since the last read; the first bad step,
        # whether its inputs were finite, its first non-finite row; the rows of the batches since the last read
        self._pending = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._first_bad = torch.full((3,), -1, dtype=torch.int64, device=self.device)
        self._pending_rows: dict[int, Tensor] = {}
        self._found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
        """Fused Adam's skip flag in the deferred step: one tensor, so a captured step reads the one it was given."""
        self._graph = GraphedStep.make(self)
        """On a GPU, the step captured as a CUDA graph (`graph_step`), or None."""

    # ---------------------------------------------------------------- one step
    def schedule(self, step: int | None = None) -> Schedule:
        s = self.step if step is None else step
        return schedule_at(s, self.total_steps, self.base_lr, float(self.cfg.lr_decay_frac or 0.0),
                           float(self.cfg.sparsity_coef or 0.0), self.cfg.sparsity_warmup_frac,
                           self.cfg.lr_warmup_frac)

    def scaled(self, acts: Tensor) -> Tensor:
        """Raw activations -> float32 c·x on the training device ([B, d])."""
        return self.sae.scale(acts.to(self.device, non_blocking=True))

    @torch.no_grad()
    def init_b_dec(self, sample_raw: Tensor) -> None:
        """Data-dependent init from a sample of raw activations (the first batch), before step 0:
        with --transcoder-init sparsify, sparsify's transcoder start (`TranscoderSAE.init_sparsify_`: zero decoder,
        encoder drawn from (seed), centred b_enc); b_dec as `config.init_b_dec` says; then, for jumprelu, the
        per-feature thresholds (`JumpReLUSAE.init_threshold_`: a moderate initial L0 instead of thousands)."""
        x = self.scaled(sample_raw)
        x = x[torch.isfinite(x).all(1)]
        if not x.shape[0]:
            return
        if self.cfg.transcoder_init == "sparsify":
            gen = torch.Generator().manual_seed(self.cfg.seed)
            self.sae.init_sparsify_(x, float(self.cfg.init_decoder_norm), gen)  # type: ignore[operator,arg-type]
        if self.cfg.init_b_dec != "zero":
            self.sae.init_b_dec_(x, method=self.cfg.init_b_dec)
        init_threshold = getattr(self.sae, "init_threshold_", None)
        if init_threshold is not None:
            init_threshold(x)

    @torch.no_grad()
    def calibrate_threshold(self, n_batches: int = CALIBRATION_BATCHES) -> float | None:
        """batchtopk, after the last step: set the inference threshold from the next `n_batches`
        batches of the source (`BatchTopKSAE.calibrate_threshold_`) so the eval L0 is k. Call it
        after the final checkpoint: the batches it reads come after the saved cursor, so a resumed
        run reads the same ones and ends with the same SAE. Fewer batches if the source runs out;
        returns the threshold (None for other architectures or when no batch was left)."""
        calibrate = getattr(self.sae, "calibrate_threshold_", None)
        if calibrate is None:
            return None
        xs: list[Tensor] = []
        for _ in range(n_batches):
            try:
                x = self.scaled(next(self.source).acts)
            except StopIteration:
                break
            x = x[torch.isfinite(x).all(1)]
            if x.shape[0]:
                xs.append(x)
        if not xs:
            return None
        was_training = self.sae.training
        theta = float(calibrate(xs))
        self.sae.train(was_training)
        self.last_metrics = {**self.last_metrics, "threshold": theta}
        return theta

    def train_step(self) -> None:
        """Take one batch and do one optimiser step (module docstring). Raises StopIteration when
        the source is exhausted, NonFiniteError on NaN/inf unless `skip_nonfinite`."""
        batch = next(self.source)
        if self.defer_checks and self.cfg.optimizer == "adam":
            return self._deferred_step(batch)
        n = batch.acts.shape[0]
        x = self.scaled(batch.acts)  # [B, d] float32, scaled
        # one reduction (a NaN/inf anywhere makes the sum non-finite); the exact test only then
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            self._nonfinite(batch, x, "the batch holds non-finite activations")
            return
        out, total, grad_norm = self._forward_backward(batch, x)
        if not bool(torch.isfinite(total.detach()) & torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(batch, x, f"the loss or its gradient is not finite (loss {float(total.detach()):g})")
            return
        if self._fused is not None:  # Adam, with the parallel-gradient removal, clipping and renormalisation
            self._fused.step(self._clip_coef(grad_norm))
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.unit_norm_decoder:
                self.sae.normalize_decoder_()
        self.dead.update(out.fired, n)
        self._acc += _metric_values(out, total, grad_norm).to(self._acc.dtype)
        self._acc_steps += 1
        self.step += 1
        self.tokens += n
        if self.step in self.resample_steps:
            self._resample(x, out)

    def _forward_backward(self, batch: Batch, x: Tensor) -> tuple[ForwardOutput, Tensor, Tensor]:
        """Steps 2-4 of a step (module docstring): schedules, forward, loss, backward, decoder-parallel
        gradient removal, clipping -> (forward output, loss, gradient norm)."""
        sched = self.schedule()
        for group in self.optimizer.param_groups:
            if not isinstance(group["lr"], Tensor):  # a tensor: a captured step's, set before each replay
                group["lr"] = sched.lr
        dead_mask = self.dead.dead() if self.use_auxk else None
        out = self.sae(x, sparsity_coef=sched.sparsity_coef, dead_mask=dead_mask)
        total = self._loss(batch, x, out)
        total.backward()
        if self._fused is not None and not self.defer_checks:  # removal and clipping happen inside its step
            return out, total, self._fused.grad_norm()
        if self.unit_norm_decoder:
            self.sae.remove_parallel_grads_()
        return out, total, self._clip_grads()

    def _resample(self, x: Tensor, out: ForwardOutput) -> None:
        """relu-l1 at a resample step: dead features toward this batch's badly reconstructed inputs."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        idx = resample_dead(self.sae, self.optimizer, self.dead.dead(), x, out.x_hat.detach(), gen)
        self.dead.reset(idx)
        self.resampled += idx.numel()

    def _deferred_step(self, batch: Batch) -> None:
        """`train_step` without host syncs: the step always runs, and a non-finite batch, loss or
        gradient norm turns it into a no-op on the device (fused Adam's `found_inf` skips the update
        and its step count; dead counters, metrics and the decoder renormalisation are masked).
        `check_pending` reads the verdict later and stops or counts the skip as the eager step would.
        Where `graph_step` applies, the same device work is replayed from a CUDA graph."""
        n = batch.acts.shape[0]
        eager = None
        if self._graph is None or not self._graph.run(batch.acts, self.schedule().lr, self.step):
            eager = self.device_step(batch, self.step)
            self.optimizer.zero_grad(set_to_none=True)
        self._pending_rows[self.step] = batch.rows
        self.step += 1
        self.tokens += n
        if self.step in self.resample_steps and eager is not None:  # rare: read the verdict now (never captured)
            self.check_pending()
            x, out, ok = eager
            if bool(ok):
                self._resample(x, out)

    def device_step(self, batch: Batch, step: int | Tensor) -> tuple[Tensor, ForwardOutput, Tensor]:
        """The device work of a deferred step (no host sync; what `graph_step` captures): forward, backward, the
        masked update and the bookkeeping on the device -> (x, forward output, ok). `step`: this step's number
        (a device scalar inside a captured step). The gradients are left in place."""
        acts = batch.acts
        x = self.scaled(acts)
        buffers = [(b, b.clone()) for b in self.sae.buffers()]  # state a forward updates (batchtopk's θ)
        out, total, grad_norm = self._forward_backward(batch, x)
        row_ok = torch.isfinite(x).all(1)  # [B]
        x_ok = row_ok.all()
        ok = x_ok & torch.isfinite(total.detach()) & torch.isfinite(grad_norm)
        self._found_inf.copy_(~ok)
        self.optimizer.found_inf = self._found_inf  # type: ignore[attr-defined]
        self.optimizer.step()
        if self.unit_norm_decoder:
            self.sae.normalize_decoder_(only_if=ok)
        self.dead.update(out.fired & ok, ok.long() * acts.shape[0])
        for b, before in buffers:
            b.copy_(torch.where(ok, b, before))
        with torch.no_grad():
            vals = _metric_values(out, total, grad_norm).to(self._acc.dtype)
            self._acc += torch.where(ok, vals, torch.zeros_like(vals))
            self._pending += torch.stack([ok.long(), (~ok).long()])
            step_t = step if isinstance(step, Tensor) else torch.full((), step, dtype=torch.int64, device=self.device)
            first = torch.stack([step_t, x_ok.long(), (~row_ok).long().argmax()])  # torch.full: no host-to-device copy
            self._first_bad.copy_(torch.where((self._first_bad[0] < 0) & ~ok, first, self._first_bad))
        return x, out, ok

    def check_pending(self) -> None:
        """Read the deferred finiteness verdicts (one host sync): fold the good steps into the metric
        count and the bad ones into `skipped`, or raise `NonFiniteError` for the first bad step unless
        `skip_nonfinite`. A no-op for eager checks."""
        if not self._pending_rows:
            return
        good, bad = (int(v) for v in self._pending.tolist())
        step, x_ok, bad_row = (int(v) for v in self._first_bad.tolist())
        rows, self._pending_rows = self._pending_rows, {}
        self._pending.zero_()
        self._first_bad.fill_(-1)
        self._acc_steps += good
        if bad and not self.cfg.skip_nonfinite:
            batch_rows = rows[step]
            if not x_ok:
                row = int(batch_rows[bad_row])
                what = "the batch holds non-finite activations"
                where = f"first bad row {row} = {self.describe_row(row)}"
                fix = "the activations are damaged there: recapture the store, or pass --skip-nonfinite to skip them"
            else:
                first = int(batch_rows[0])
                what = "the loss or its gradient is not finite"
                where = f"inputs finite; batch starts at row {first} = {self.describe_row(first)}"
                fix = "training diverged: start again with a lower --lr, or pass --skip-nonfinite"
            raise NonFiniteError(
                f"step {step + 1}: {what} ({where}); found at step {self.step} (on {self.device.type} the check is "
                f"read once per log interval), nothing after the last checkpoint was saved: {fix}")
        self.skipped += bad

    def _loss(self, batch: Batch, x: Tensor, out: ForwardOutput) -> Tensor:
        """The loss one step minimises: the SAE's own total (reconstruction + sparsity + aux); end-to-end
        training (`e2e.E2ETrainer`) measures the reconstruction through the model instead."""
        return out.total

    def _clip_coef(self, norm: Tensor) -> float:
        """The factor `clip_grads_with_norm_` would multiply the gradients by (in its float32), 1.0 below the
        limit or without clipping."""
        if self.cfg.grad_clip <= 0:
            return 1.0
        return float(torch.clamp(self.cfg.grad_clip / (norm + 1e-6), max=1.0))

    def _clip_grads(self) -> Tensor:
        if self.cfg.grad_clip > 0 and self.device.type != "cpu":  # no host sync: the scale is clamped on the device
            return torch.nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip, foreach=True)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None], foreach=True)
        # on a CPU reading the norm is free, and a step below the limit skips the multiply by exactly 1
        # (a read and write of every gradient) that clip_grad_norm_ would do: the same result, bit for bit (its own
        # test, in the same float32)
        if self._clip_coef(norm) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(self._params, self.cfg.grad_clip, norm, foreach=True)
        return norm

    def _nonfinite(self, batch: Batch, x: Tensor, what: str) -> None:
        """Skip (count) the batch, or stop with an error naming the step and rows."""
        if self.cfg.skip_nonfinite:
            self.skipped += 1
            self.step += 1
            self.tokens += batch.acts.shape[0]
            return
        bad = (~torch.isfinite(x).all(1)).nonzero().squeeze(1).cpu()
        if bad.numel():
            rows = batch.rows[bad].tolist()
            where = f"{len(rows)} bad row(s), first {rows[0]} = {self.describe_row(int(rows[0]))}"
            fix = "the activations are damaged there: recapture the store, or pass --skip-nonfinite to skip them"
        else:
            first = int(batch.rows[0])
            where = f"inputs finite; batch starts at row {first} = {self.describe_row(first)}"
            fix = "training diverged: start again with a lower --lr, or pass --skip-nonfinite"
        raise NonFiniteError(
            f"step {self.step + 1}: {what} ({where}); stopped before the update, the last checkpoint is "
            f"intact: {fix}"
        )

    # ---------------------------------------------------------------- metrics
    def flush_metrics(self, seconds: float | None = None) -> dict[str, Any]:
        """Average the metrics since the last call (one host sync) and reset the accumulators."""
        self.check_pending()
        now = time.perf_counter()
        steps = max(self._acc_steps, 1)
        avg = (self._acc / steps).tolist()
        sched = self.schedule(max(self.step - 1, 0))
        elapsed = now - self._t_log if seconds is None else seconds
        rec: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        # None when every step of the interval was skipped (and never NaN: the log and checkpoints are JSON)
        rec.update({k: float(v) if self._acc_steps and math.isfinite(v) else None
                    for k, v in zip(METRICS, avg, strict=True)})
        rec.update(dead_frac=self.dead.dead_fraction(), lr=sched.lr, sparsity_coef=sched.sparsity_coef,
                   skipped=self.skipped, resampled=self.resampled,
                   tokens_per_s=(self.tokens - self._tok_log) / max(elapsed, 1e-9))
        if self.sae.arch in THRESHOLD_STYLE:
            rec["threshold"] = float(self.sae.threshold)  # type: ignore[arg-type]
        self._acc.zero_()
        self._acc_steps = 0
        self._t_log, self._tok_log = now, self.tokens
        self.last_metrics = rec
        return rec

    # ---------------------------------------------------------------- state
    def state(self) -> Checkpoint:
        """Everything the next step depends on (module docstring)."""
        self.check_pending()  # a checkpoint never holds an unchecked step
        tensors = {
            "dead_since": self.dead.since.detach().cpu().clone(),
            "acc": self._acc.detach().cpu().clone(),
            "rng": rng_state(),
        }
        meta = {
            **self.meta,
            "step": self.step,
            "tokens": self.tokens,
            "skipped": self.skipped,
            "resampled": self.resampled,
            "acc_steps": self._acc_steps,
            "dead_window": self.dead.window,
            "data_cursor": self.source.state_dict(),
            "schedule": self.schedule()._asdict(),
            "last_metrics": self.last_metrics,
        }
        sae_state = {k: v.detach().cpu().clone() for k, v in self.sae.state_dict().items()}
        return Checkpoint(self.step, sae_state, self.optimizer.state_dict(), tensors, meta)

    def load(self, ckpt: Checkpoint) -> None:
        """Restore a `state()`; the next step is the one an uninterrupted run would take."""
        self.sae.load_state_dict(ckpt.sae)
        self.optimizer.load_state_dict(ckpt.optimizer)
        m = ckpt.meta
        self.dead.load_state_dict({"since": ckpt.tensors["dead_since"], "window": m["dead_window"]})
        self._acc.copy_(ckpt.tensors["acc"])
        self._acc_steps = int(m["acc_steps"])
        self.step, self.tokens = int(m["step"]), int(m["tokens"])
        self.skipped, self.resampled = int(m["skipped"]), int(m["resampled"])
        self.last_metrics = dict(m.get("last_metrics") or {})
        self.source.load_state_dict(m["data_cursor"])
        set_rng_state(ckpt.tensors["rng"])
        self._tok_log = self.tokens
        self._t_log = time.perf_counter()
        self._graph = GraphedStep.make(self)  # the optimiser's state tensors were replaced: capture again

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """With signum-sf, the SAE holds the averaged (evaluation) weights x inside the block and its training
        weights y again, bit for bit, after it (a held-out evaluation mid-run). A no-op with Adam."""
        if not isinstance(self.optimizer, SignumScheduleFree):
            yield
            return
        saved = [(p, p.detach().clone()) for p in self._params]
        self.use_averaged_weights()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, y in saved:
                    p.copy_(y)

    @torch.no_grad()
    def use_averaged_weights(self) -> None:
        """With signum-sf, put the averaged weights x into the SAE for good (after the last step and its
        checkpoint: what `train` saves, calibrates batchtopk's threshold on and reports, as sparsify saves x).
        Training must not continue after it. A no-op with Adam."""
        if isinstance(self.optimizer, SignumScheduleFree):
            for p, x in self.optimizer.averaged():
                p.copy_(x)

    def save_checkpoint(self) -> str | None:
        return None if self.sink is None else self.sink.save(self.state())

    # ---------------------------------------------------------------- loop
    def run(self, on_log: Callable[[dict[str, Any]], None] | None = None,
            on_step: Callable[[int], None] | None = None) -> RunOutcome:
        """Train to `config.steps`, logging, checkpointing every `checkpoint_every` steps and at the
        end. A set `stop_signal` saves a checkpoint and raises `TrainingInterrupted`."""
        last_ckpt: str | None = None
        saved_at = self.step
        data_ended = False
        self._t_log, self._tok_log = time.perf_counter(), self.tokens
        while self.step < self.total_steps:
            if self.stop_signal is not None:
                break
            try:
                self.train_step()
            except StopIteration:
                data_ended = True
                break
            if self._after_step(on_log, on_step):
                last_ckpt, saved_at = self.save_checkpoint(), self.step
        self.check_pending()
        self._raise_if_stopped(last_ckpt, saved_at)
        if data_ended and self._acc_steps:
            rec = self.flush_metrics()
            if self.log is not None:
                self.log.write(rec)
        return RunOutcome(self.step >= self.total_steps, data_ended, self._final_checkpoint(last_ckpt, saved_at))

    def _after_step(self, on_log: Callable[[dict[str, Any]], None] | None,
                    on_step: Callable[[int], None] | None) -> bool:
        """Progress and the log after a step; True when a periodic checkpoint is due now."""
        if on_step is not None:
            on_step(self.cfg.batch_size)
        if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
            rec = self.flush_metrics()
            if self.log is not None:
                self.log.write(rec)
            if on_log is not None:
                on_log(rec)
        every = self.cfg.checkpoint_every
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def _raise_if_stopped(self, last_ckpt: str | None, saved_at: int, scope: str = "") -> None:
        """After the loop: a stop signal before the last step saves a checkpoint (unless one was just
        saved) and raises `TrainingInterrupted`; `scope` qualifies where it stopped (" on every rank")."""
        if self.stop_signal is None or self.step >= self.total_steps:
            return
        if self.step == 0:  # nothing trained yet: a fresh start is the same as a resume
            saved = "nothing to save before the first step"
        else:
            if saved_at != self.step or last_ckpt is None:
                last_ckpt = self.save_checkpoint()
            saved = f"checkpoint {last_ckpt}"
        raise TrainingInterrupted(
            f"stopped by signal {self.stop_signal} after step {self.step} of {self.total_steps}{scope} ({saved}): "
            "run the same command with --resume to continue",
            self.step,
            self.stop_signal,
        )

    def _final_checkpoint(self, last_ckpt: str | None, saved_at: int) -> str | None:
        """The checkpoint of the last step (saved now unless the loop just saved it)."""
        if saved_at != self.step or last_ckpt is None:
            last_ckpt = self.save_checkpoint()
        return last_ckpt


class Peeked:
    """A `BatchSource` with its first batch already taken (to set b_dec or learn the normaliser)
    but not yet trained on: its cursor still points before that batch."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source
        self._state = source.state_dict()
        self.first: Batch | None = next(source)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.first is not None:
            batch, self.first = self.first, None
            return batch
        return next(self.source)

    def state_dict(self) -> dict[str, Any]:
        return self._state if self.first is not None else self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first = None
        self.source.load_state_dict(state)


@torch.no_grad()
def _metric_values(out: ForwardOutput, total: Tensor, grad_norm: Tensor) -> Tensor:
    """One step's METRICS, in order, as one device vector (summed into the accumulator, read per log)."""
    return torch.stack([total.detach(), out.mse.detach(), out.sparsity.detach(), out.aux.detach(), out.fvu, out.l0,
                        grad_norm.detach().float()])
