"""The peers of `train_vs_peers.py`: sparsify and SAELens, each trained by its own code on batches
of stored activations, plus the pieces every trainer in that benchmark shares (the batch file, the
held-out evaluation, the clock that leaves evaluations out).

What runs (the defaults of each library, read from its source; deviations are listed in `SETTINGS`):

- sparsify 1.3.3 (`eai-sparsify`): its `SparseCoder` and the step of its `Trainer.fit`, without the
  model-hooking loop (sparsify only trains from a live model): b_dec = mean of the first batch; the
  decoder is set to unit norm before every forward; loss = FVU against the batch's variance
  (+ auxk_alpha·AuxK with auxk_alpha = 0, its default, + multi-TopK off); the gradient parallel to
  the decoder rows is removed; its default optimizer, `ScheduleFreeWrapper(SignSGD, momentum=0.95)`
  with lr = 5e-3 / sqrt(num_latents / 2^14); `torch.set_float32_matmul_precision("high")` as `fit`
  sets it. Its forward autocasts to bf16 only on CUDA, so on this CPU it runs in float32. It is
  evaluated as it saves itself: with the schedule-free optimizer in eval mode (averaged weights).
- SAELens 6.54: `TopKTrainingSAE` / `StandardTrainingSAE` trained by its `SAETrainer.fit()` from a
  data-provider iterator, with `normalize_activations="expected_average_only_in"` (its
  `ActivationScaler`, estimated by its own `estimate_scaling_factor`), Adam and the runner's defaults
  (lr 3e-4 constant for TopK; the tutorial's lr 5e-5, 20% linear decay and 5% L1 warm-up for ReLU-L1).
- llamascopium 2.0.0b34 (OpenMOSS's lm_saes; `--crosscoder` only, run by the python of its own venv): its acausal
  `Crosscoder` with act_fn=topk, its `Initializer` and `Trainer.fit` defaults (Adam lr 4e-4, W_enc = W_dec^T,
  dataset-wise activation norms, no AuxK), deviations in `LMSAES_DEVIATIONS`. It differs from monoscope's crosscoder
  in the model, not only the recipe: the TopK runs per head (layer) on the shared pre-activation times that head's
  decoder-row norm, so a token's latents are the union of L TopK sets (between k and L·k latents); the decoder is
  never normalised (the norm enters the selection instead); b_dec is not subtracted from the input; its loss is the
  mean over tokens and heads of the per-head squared error.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

EVAL_CHUNK = 4096


# ----------------------------------------------------------------------------- data


class BatchFile:
    """The training stream: `steps` batches of `batch` rows [batch, d] (bf16, raw scale) stored back
    to back in one file, so every trainer reads the same rows in the same order, one batch at a
    time (nothing else of the stream is resident)."""

    def __init__(self, path: str | Path, d: int, batch: int, steps: int) -> None:
        self.path, self.d, self.batch, self.steps = Path(path), d, batch, steps
        need = steps * batch * d * 2
        if self.path.stat().st_size < need:
            raise ValueError(f"{self.path} holds {self.path.stat().st_size} bytes, {need} needed for {steps} batches")
        self._fh = open(self.path, "rb")  # noqa: SIM115 (closed with the process)

    def read(self, i: int) -> Tensor:
        """Batch i as bf16 [batch, d]."""
        n = self.batch * self.d
        a = np.fromfile(self._fh, dtype=np.int16, count=n, offset=i * n * 2 - self._fh.tell())
        return torch.from_numpy(a).view(torch.bfloat16).reshape(self.batch, self.d)

    def __iter__(self) -> Iterator[Tensor]:
        self._fh.seek(0)
        for i in range(self.steps):
            yield self.read(i)


# ----------------------------------------------------------------------------- evaluation


@dataclass
class HeldOut:
    """Held-out raw activations (bf16 [n, d]) and the FVU denominator Σ‖x − x̄‖² (float64). `blocks` > 1: the rows
    hold that many hooks side by side (a crosscoder's store), and each hook's own FVU is reported as well."""

    rows: Tensor
    denom: float = 0.0
    blocks: int = 1
    block_denoms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        c = self.rows.double()
        c -= c.mean(0)
        self.denom = float(c.pow(2).sum())
        if self.blocks > 1:
            self.block_denoms = [float(b.pow(2).sum()) for b in c.chunk(self.blocks, 1)]


Recon = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
"""raw float32 [n, d] -> (raw reconstruction float32 [n, d], number of non-zero codes (scalar),
features with a non-zero code [F] bool)."""


@torch.no_grad()
def evaluate(recon: Recon, held: HeldOut, n_features: int) -> dict[str, float]:
    """FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² on RAW held-out rows, L0, and the share of features never active."""
    sse, nnz, n = 0.0, 0.0, held.rows.shape[0]
    block_sse = torch.zeros(max(held.blocks, 1), dtype=torch.float64)
    fired = torch.zeros(n_features, dtype=torch.bool)
    for s in range(0, n, EVAL_CHUNK):
        x = held.rows[s: s + EVAL_CHUNK].float()
        x_hat, active, f = recon(x)
        err = (x.double() - x_hat.double()).pow(2)
        sse += float(err.sum())
        if held.blocks > 1:
            block_sse += err.view(err.shape[0], held.blocks, -1).sum((0, 2))
        nnz += float(active)
        fired |= f.cpu()
    out = {"fvu": sse / held.denom, "mse_per_row": sse / n, "l0": nnz / n,
           "dead_heldout_frac": 1.0 - float(fired.float().mean())}
    if held.blocks > 1:
        out["fvu_per_hook"] = [float(e) / dn for e, dn in zip(block_sse, held.block_denoms, strict=True)]
    return out


class Clock:
    """Training time with evaluations and waits left out (`pause()`/`resume()` around them)."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.excluded = 0.0
        self._paused_at: float | None = None

    def now(self) -> float:
        t = self._paused_at if self._paused_at is not None else time.perf_counter()
        return t - self.t0 - self.excluded

    def pause(self) -> None:
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        assert self._paused_at is not None
        self.excluded += time.perf_counter() - self._paused_at
        self._paused_at = None


@dataclass
class Marks:
    """When to evaluate during training: after given step counts, and at the first step boundary
    at which the training clock has passed given times (seconds)."""

    steps: set[int] = field(default_factory=set)
    seconds: list[float] = field(default_factory=list)
    _next_s: int = 0

    def due(self, step: int, t: float, steps_too: bool = True) -> str | None:
        """Why an evaluation is due after `step` steps at training time t (None: not due)."""
        why = None
        while self._next_s < len(self.seconds) and t >= self.seconds[self._next_s]:
            why = f"t>={self.seconds[self._next_s]:.1f}s"
            self._next_s += 1
        if why is None and steps_too and step in self.steps:
            why = f"step {step}"
        return why


RECON_FACTORY = Callable[[], tuple[Recon, Callable[[], None]]]
"""Prepares the SAE for evaluation; returns its `Recon` and what restores training mode."""


class Recorder:
    """Collects the evaluation curve of one trainer: (step, tokens, training seconds, metrics)."""

    def __init__(self, name: str, held: HeldOut, n_features: int, batch: int, marks: Marks, clock: Clock) -> None:
        self.name, self.held, self.n_features, self.batch = name, held, n_features, batch
        self.marks, self.clock = marks, clock
        self.curve: list[dict[str, Any]] = []

    def maybe(self, step: int, recon_factory: RECON_FACTORY, steps_too: bool = True) -> None:
        t = self.clock.now()
        why = self.marks.due(step, t, steps_too)
        if why is not None:
            self.record(step, t, why, recon_factory)

    def record(self, step: int, t: float, why: str, recon_factory: RECON_FACTORY) -> dict[str, Any]:
        self.clock.pause()
        recon, done = recon_factory()
        m = evaluate(recon, self.held, self.n_features)
        done()
        self.clock.resume()
        rec = {"step": step, "tokens": step * self.batch, "train_s": t, "why": why, **m}
        self.curve.append(rec)
        log(f"[{self.name}] step {step} ({step * self.batch:,} tok, {t:.1f}s, {why}): fvu {m['fvu']:.4f} "
            f"l0 {m['l0']:.1f} dead(held-out) {m['dead_heldout_frac']:.1%}")
        return rec


class Gate:
    """The trainer's side of the benchmark's turn-taking, plus its clock and evaluations.

    Interleaved (`ctl` given: a pair of pipe ends to the parent), a trainer runs until its training
    clock reaches the `until` the parent sent, then pauses its clock, reports `{t, step}` and waits
    for the next command: `{"until": seconds, "marks": [seconds, ...]}` (marks: times at which to
    evaluate). So every trainer trains in short turns spread over the whole run and meets the same
    background load. Without `ctl` it just trains. Evaluations and waits are off the clock."""

    def __init__(self, name: str, held: HeldOut, n_features: int, batch: int, total_steps: int, marks: Marks,
                 ctl: tuple[Any, Any] | None = None) -> None:
        self.clock = Clock()
        self.rec = Recorder(name, held, n_features, batch, marks, self.clock)
        self.total = total_steps
        self.ctl = ctl
        self.until = math.inf
        self.turns = 0
        self.turn_log: list[tuple[float, int]] = [(0.0, 0)]
        """(training seconds, steps) at each hand-over: per-turn speeds show the load each turn met."""

    def _recv(self) -> None:
        assert self.ctl is not None
        line = self.ctl[0].readline()
        if not line:
            raise SystemExit("the benchmark's parent went away")
        cmd = json.loads(line)
        self.until = float(cmd.get("until", math.inf))
        if cmd.get("marks") is not None and list(cmd["marks"]) != self.rec.marks.seconds:
            self.rec.marks.seconds = sorted(float(v) for v in cmd["marks"])
            self.rec.marks._next_s = 0
        self.turns += 1

    def start(self) -> None:
        """Say we are set up, wait for the first turn (interleaved), then start the clock."""
        if self.ctl is not None:
            self.ctl[1].write(json.dumps({"ready": True}) + "\n")
            self.ctl[1].flush()
            self._recv()
        self.clock.start()

    def after_step(self, step: int, recon_factory: RECON_FACTORY) -> None:
        self.rec.maybe(step, recon_factory)
        if self.ctl is None or step >= self.total:
            return
        t = self.clock.now()
        if t < self.until:
            return
        self.clock.pause()
        self.turn_log.append((t, step))
        self.ctl[1].write(json.dumps({"t": t, "step": step}) + "\n")
        self.ctl[1].flush()
        self._recv()
        self.clock.resume()
        self.rec.maybe(step, recon_factory, steps_too=False)  # a time mark already passed is due now

    def finish(self, step: int, recon_factory: RECON_FACTORY) -> tuple[float, dict[str, Any]]:
        """Stop the clock; the final evaluation."""
        t = self.clock.now()
        self.turn_log.append((t, step))
        return t, self.rec.record(step, t, "final", recon_factory)


def log(msg: str) -> None:
    print(msg, file=__import__("sys").stderr, flush=True)


def load_now() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ----------------------------------------------------------------------------- sparsify


class SparsifyStep:
    """sparsify's SparseCoder and a copy of its `Trainer.fit` step (module docstring) on `device`: its
    optimiser, its first-batch centring, decoder normalisation, dead-latent counters and the per-step FVU it
    reads back to the host (`float(...)`, as its Trainer logs). `transcode`: its transcoder
    (`SparseCoderConfig(transcode=True)`) on rows holding input and target side by side ([B, 2d]): x = the input
    half, y = the target half, its transcoder initialisation (W_dec zero, encoder bias centring the input's mean,
    b_dec = the target's mean) and no decoder normalisation, as its Trainer does."""

    def __init__(self, d_in: int, n_features: int, k: int, seed: int, device: str = "cpu",
                 transcode: bool = False) -> None:
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD

        torch.set_float32_matmul_precision("high")  # as sparsify's Trainer.fit does
        cfg = SparseCoderConfig(activation="topk", num_latents=n_features, k=k, transcode=transcode)  # its defaults
        torch.manual_seed(seed)
        self.d_in, self.transcode, self.device, self.steps = d_in, transcode, device, 0
        self.sae = SparseCoder(d_in, cfg, device, dtype=torch.float32)
        self.normalize = self.sae.cfg.normalize_decoder and not transcode  # its Trainer never normalises a transcoder
        self.lr = 5e-3 / (self.sae.num_latents / (2**14)) ** 0.5  # its rule for the default optimizer "signum"
        self.opt = ScheduleFreeWrapper(SignSGD([{"params": self.sae.parameters(), "lr": self.lr}]), momentum=0.95)
        self.opt.train()
        self.auxk_alpha = 0.0  # TrainConfig.auxk_alpha default
        self.since = torch.zeros(self.sae.num_latents, dtype=torch.long, device=device)  # num_tokens_since_fired
        self.did_fire = torch.zeros(self.sae.num_latents, dtype=torch.bool, device=device)
        self.last_fvu = float("nan")

    def __call__(self, raw: Tensor) -> None:
        sae = self.sae
        x = raw.to(self.device).float()
        y = x
        if self.transcode:
            x, y = x[:, :self.d_in], x[:, self.d_in:]
        if self.steps == 0:  # "Ensure the preactivations are centered at initialization"
            if self.transcode:
                sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
            sae.b_dec.data = y.mean(0).to(sae.dtype)
        if self.normalize:
            sae.set_decoder_norm_to_unit_norm()
        total_variance = (y - y.mean(0)).pow(2).sum()
        out = sae(x=x, y=y, dead_mask=None, total_variance=total_variance)
        self.did_fire[out.latent_indices.flatten()] = True
        self.last_fvu = float(out.fvu.detach())
        loss = out.fvu + self.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        if self.normalize:
            sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            self.since += x.shape[0]
            self.since[self.did_fire] = 0
            self.did_fire.zero_()
        self.steps += 1


def train_sparsify(data: BatchFile, held: HeldOut, n_features: int, k: int, seed: int, marks: Marks,
                   dead_window_tokens: int, ctl: tuple[Any, Any] | None = None, transcode: bool = False
                   ) -> dict[str, Any]:
    """`SparsifyStep` over the shared stream on the CPU, evaluated at `marks` (schedule-free eval mode)."""
    d_in = data.d // 2 if transcode else data.d
    step = SparsifyStep(d_in, n_features, k, seed, "cpu", transcode)
    sae, opt, lr, since = step.sae, step.opt, step.lr, step.since

    def recon_factory() -> tuple[Recon, Callable[[], None]]:
        opt.eval()  # the weights sparsify saves (its _checkpoint switches to eval mode)

        def recon(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            out = sae(x[:, :d_in]) if transcode else sae(x)
            on = out.latent_acts > 0
            fired = torch.zeros(sae.num_latents, dtype=torch.bool)
            fired[out.latent_indices[on]] = True
            y_hat = out.sae_out.float()
            # transcoder rows: the input half is given back as is, so the error is the target's alone
            return (torch.cat([x[:, :d_in], y_hat], 1) if transcode else y_hat), on.sum(), fired

        return recon, opt.train

    gate = Gate("sparsify", held, sae.num_latents, data.batch, data.steps, marks, ctl)
    gate.start()
    for i, raw in enumerate(data):
        step(raw)
        gate.after_step(i + 1, recon_factory)
    train_s, final = gate.finish(data.steps, recon_factory)
    return {
        "train_s": train_s, "curve": gate.rec.curve, "final": final, "last_batch_fvu": step.last_fvu,
        "turn_log": gate.turn_log,
        "dead_train_frac": float((since >= dead_window_tokens).float().mean()),
        "settings": {
            "library": f"eai-sparsify {_version('eai-sparsify')}, schedulefree {_version('schedulefree')}",
            "model": f"SparseCoder(activation=topk, num_latents={n_features}, k={k}, "
                     + ("transcode=True: W_dec zero-init, decoder not normalised)" if transcode
                        else "normalize_decoder=True)"),
            "optimizer": f"ScheduleFreeWrapper(SignSGD, momentum=0.95), lr={lr:.3e} (5e-3/sqrt(F/2^14))",
            "loss": "FVU vs batch variance; auxk_alpha=0 (default); multi_topk off",
            "dtype": "float32 (its forward autocasts to bf16 on CUDA only)",
            "b_dec_init": ("target mean of the first batch; encoder bias = -W_enc mean(input)" if transcode
                           else "mean of the first batch"),
            "batch_tokens": data.batch,
            "deviation": "batch of 4096 rows instead of its default 32 sequences x 2048 tokens (65,536 tokens, "
                         "only 15 steps in 1M tokens); activations from the store instead of its model hook",
            "evaluated_with": "schedule-free eval mode (averaged weights, as sparsify saves them)",
        },
    }


# ----------------------------------------------------------------------------- SAELens


class _Provider:
    """SAELens's DataProvider (an iterator of raw activation batches), evaluating the SAE before
    handing out batch `i` when `marks` say so (i = steps already taken)."""

    def __init__(self, data: BatchFile, on_batch: Callable[[int], None]) -> None:
        self.it = iter(data)
        self.i = 0
        self.on_batch = on_batch

    def __iter__(self) -> _Provider:
        return self

    def __next__(self) -> Tensor:
        self.on_batch(self.i)
        self.i += 1
        return next(self.it).float()


def saelens_settings(kind: str, steps: int, l1: float | None) -> dict[str, Any]:
    """SAETrainerConfig fields (the LanguageModelSAERunnerConfig defaults, or its tutorial's for ReLU-L1)."""
    if kind in ("topk", "matryoshka"):
        lr, decay, warm_l1 = 3e-4, 0, 0
    else:
        lr, decay, warm_l1 = 5e-5, steps // 5, steps // 20
    return {"lr": lr, "lr_end": lr / 10, "lr_scheduler_name": "constant", "lr_warm_up_steps": 0,
            "lr_decay_steps": decay, "adam_beta1": 0.9, "adam_beta2": 0.999, "dead_feature_window": 1000,
            "feature_sampling_window": 2000, "autocast": False, "l1_warm_up_steps": warm_l1, "l1_coefficient": l1}


def train_saelens(kind: str, data: BatchFile, held: HeldOut, n_features: int, k: int, seed: int, marks: Marks,
                  dead_window_tokens: int, l1: float | None = None, norm_batches: int = 25,
                  ctl: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """SAELens's TopK (kind="topk"), ReLU-L1 (kind="relu"), Matryoshka BatchTopK (kind="matryoshka",
    monoscope's default prefixes as matryoshka_widths) or gated (kind="gated", coefficient `l1`) SAE
    through its SAETrainer.fit()."""
    from sae_lens import (
        GatedTrainingSAE,
        GatedTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    s = saelens_settings(kind, data.steps, l1)
    norm_batches = min(norm_batches, data.steps)
    torch.manual_seed(seed)
    sae: Any
    widths: list[int] = []
    if kind == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=data.d, d_sae=n_features, k=k,
                                                    normalize_activations="expected_average_only_in"))
    elif kind == "matryoshka":
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )

        from monoscope.sae.config import default_prefixes

        widths = default_prefixes(n_features)
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=data.d, d_sae=n_features, k=k, matryoshka_widths=list(widths),
            normalize_activations="expected_average_only_in"))
    elif kind == "gated":
        assert l1 is not None
        sae = GatedTrainingSAE(GatedTrainingSAEConfig(
            d_in=data.d, d_sae=n_features, l1_coefficient=l1, l1_warm_up_steps=s["l1_warm_up_steps"],
            normalize_activations="expected_average_only_in"))
    else:
        assert l1 is not None
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=data.d, d_sae=n_features, l1_coefficient=l1, l1_warm_up_steps=s["l1_warm_up_steps"],
            apply_b_dec_to_input=False, normalize_activations="expected_average_only_in"))
    tcfg = SAETrainerConfig(
        total_training_samples=data.steps * data.batch, train_batch_size_samples=data.batch,
        lr=s["lr"], lr_end=s["lr_end"], lr_scheduler_name=s["lr_scheduler_name"],
        lr_warm_up_steps=s["lr_warm_up_steps"], lr_decay_steps=s["lr_decay_steps"],
        adam_beta1=s["adam_beta1"], adam_beta2=s["adam_beta2"], device="cpu", autocast=s["autocast"],
        dead_feature_window=s["dead_feature_window"], feature_sampling_window=s["feature_sampling_window"],
        n_batches_for_norm_estimate=norm_batches,
    )
    gate = Gate(f"saelens-{kind}", held, n_features, data.batch, data.steps, marks, ctl)

    def on_batch(i: int) -> None:  # called by fit() before each step; i = steps already taken
        if i == 0:  # fit() has set up; the clock starts with the first batch
            gate.start()
        else:
            gate.after_step(i, recon_factory)

    provider = _Provider(data, on_batch)
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider)
    # its own normalisation estimate, on the first batches of the same stream (its own iterator, so
    # the training stream is not consumed; fit() then skips the estimate because the factor is set)
    trainer.activation_scaler.estimate_scaling_factor(
        d_in=data.d, data_provider=(b.float() for b in data), n_batches_for_norm_estimate=norm_batches)
    scaling = trainer.activation_scaler.scaling_factor

    def recon_factory() -> tuple[Recon, Callable[[], None]]:
        sf = trainer.activation_scaler.scaling_factor  # None once fit() folded it into the weights
        was_training = sae.training
        sae.eval()

        def recon(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            xs = x * sf if sf is not None else x
            feats = sae.encode(xs)
            x_hat = sae.decode(feats)
            if sf is not None:
                x_hat = x_hat / sf
            on = feats != 0
            return x_hat.float(), on.sum(), on.any(0)

        return recon, (lambda: sae.train(was_training))

    trainer.fit()
    # the clock includes fit()'s end: folding the scaling factor into the weights
    train_s, final = gate.finish(data.steps, recon_factory)
    since_steps = trainer.n_forward_passes_since_fired
    dead_window_steps = max(1, dead_window_tokens // data.batch)
    return {
        "train_s": train_s, "curve": gate.rec.curve, "final": final, "turn_log": gate.turn_log,
        "dead_train_frac": float((since_steps >= dead_window_steps).float().mean()),
        "dead_saelens_own_count": int(trainer.dead_neurons.sum()),
        "settings": {
            "library": f"sae-lens {_version('sae-lens')}",
            "model": {
                "topk": f"TopKTrainingSAE(k={k}, d_sae={n_features}, apply_b_dec_to_input=True, "
                        "rescale_acts_by_decoder_norm=True, aux_loss_coefficient=1.0, decoder_init_norm=0.1)",
                "matryoshka": f"MatryoshkaBatchTopKTrainingSAE(k={k}, d_sae={n_features}, matryoshka_widths={widths}, "
                              "use_matryoshka_aux_loss=False, rescale_acts_by_decoder_norm=True)",
                "gated": f"GatedTrainingSAE(d_sae={n_features}, l1_coefficient={l1}, "
                         f"l1_warm_up_steps={s['l1_warm_up_steps']}, apply_b_dec_to_input=True)",
            }.get(kind, f"StandardTrainingSAE(d_sae={n_features}, l1_coefficient={l1}, lp_norm=1, "
                        f"l1_warm_up_steps={s['l1_warm_up_steps']}, apply_b_dec_to_input=False, "
                        "decoder_init_norm=0.1)"),
            "normalize_activations": "expected_average_only_in",
            "scaling_factor": scaling,
            "norm_estimate_batches": norm_batches,
            "trainer": {k_: v for k_, v in s.items() if k_ not in ("l1_warm_up_steps", "l1_coefficient")},
            "optimizer": "torch.optim.Adam (its SAETrainer), grad-norm clip 1.0",
            "dtype": "float32 (autocast off: its default)",
            "batch_tokens": data.batch,
            "note": ("AuxK only acts on features dead for dead_feature_window=1000 steps: never within this run"
                     if kind in ("topk", "matryoshka") else
                     "ReLU-L1 settings of its training tutorial (lr, warm-ups), the same coefficient as monoscope's"
                     if kind == "gated" else "ReLU-L1 settings of its training tutorial; l1 tuned for L0 ~ k"),
        },
    }


# ----------------------------------------------------------------------------- llamascopium (OpenMOSS lm_saes)


LMSAES_DEVIATIONS = [
    "its Crosscoder and Trainer.fit without a device mesh (its train_crosscoder runner always builds a "
    "torch.distributed mesh, one head per process group); activations from the store instead of its model hook",
    "mask given as ones of shape [batch, heads]: its crosscoder loss reduces l_rec [batch, heads] against the mask "
    "while its step metrics reduce feature_acts against a [batch] mask, so one mask shape fails either way; "
    "skip_metrics_calculation=True (those metrics only feed its logs) and the [batch, heads] mask (all ones: the "
    "loss is exactly its unmasked mean)",
    "k_warmup_steps=0: its default 0.1 anneals k from initial_k, which has no default (it asserts)",
    "lr_warm_up_steps = 5% of the steps: its 5000-step default is longer than this whole run",
    "amp_dtype = the compute dtype monoscope's auto picks on this machine (its bf16 autocast default is emulated on "
    "a CPU without AVX512-BF16/AMX, where monoscope runs float32 too)",
    "no checkpoints (n_checkpoints=0)",
]


def train_lmsaes_crosscoder(data: BatchFile, held: HeldOut, hooks: list[str], n_features: int, k: int, seed: int,
                            marks: Marks, dead_window_tokens: int, amp_dtype: str = "float32",
                            grid_init: bool = False, lr: float | None = None, work: str | None = None,
                            name: str = "lmsaes_crosscoder", ctl: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """llamascopium's (OpenMOSS lm_saes) acausal `Crosscoder` with TopK, initialised by its `Initializer` and trained
    by its `Trainer.fit` on rows holding `hooks` side by side ([B, L·d]); deviations in `LMSAES_DEVIATIONS`.
    `grid_init`: its initialisation search over the decoder norm (`grid_search_init_norm=True`; off by default).
    `lr`: Adam's learning rate instead of its default 4e-4."""
    import tempfile

    from llamascopium import Crosscoder, CrosscoderConfig
    from llamascopium.initializer import Initializer, InitializerConfig
    from llamascopium.trainer import Trainer, TrainerConfig

    n_hooks = len(hooks)
    d = data.d // n_hooks
    amp = getattr(torch, amp_dtype)
    cfg = CrosscoderConfig(hook_points=list(hooks), d_model=d, expansion_factor=n_features / d, act_fn="topk",
                           top_k=k, device="cpu", dtype=torch.float32)  # others: its defaults
    if cfg.d_sae != n_features:
        raise ValueError(f"{n_features} features is not a whole expansion of d_model {d}")

    def as_batch(raw: Tensor) -> dict[str, Tensor]:
        x = raw.float()
        return {**{h: x[:, i * d:(i + 1) * d] for i, h in enumerate(hooks)},
                "tokens": torch.zeros(x.shape[0], dtype=torch.long), "mask": torch.ones(x.shape[0], n_hooks)}

    class Stream:  # re-iterable: its initializer and trainer each peek at the first batch with iter()
        def __iter__(self) -> Iterator[dict[str, Tensor]]:
            return (as_batch(raw) for raw in data)

    torch.manual_seed(seed)
    init_cfg = InitializerConfig(grid_search_init_norm=grid_init)  # others: its defaults
    tc = TrainerConfig(total_training_tokens=data.steps * data.batch, amp_dtype=amp, k_warmup_steps=0,
                       lr_warm_up_steps=max(1, data.steps // 20), n_checkpoints=0, skip_metrics_calculation=True,
                       eval_frequency=1, exp_result_path=work or tempfile.mkdtemp(prefix="lmsaes-"),
                       **({"lr": lr} if lr is not None else {}))
    since = torch.zeros(n_features, dtype=torch.long)
    pairs = {"nnz": 0.0, "rows": 0}
    gate = Gate(name, held, n_features, data.batch, data.steps, marks, ctl)

    def recon_factory() -> tuple[Recon, Callable[[], None]]:
        was = sae.training
        sae.eval()
        pairs.update(nnz=0.0, rows=0)

        def recon(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            b = as_batch(x)
            nb, scale = sae.normalize_activations(b, return_scale_factor=True)
            f = sae.encode(sae.prepare_input(nb)[0])  # [n, heads, F]: each head its own TopK
            r = sae.decode(f)  # [n, heads, d]
            on = f > 0
            pairs["nnz"] += float(on.sum())
            pairs["rows"] += x.shape[0]
            latent_on = on.any(1)  # a latent counts once however many heads it fires in
            x_hat = torch.cat([r[:, i].float() / scale[h] for i, h in enumerate(hooks)], 1)
            return x_hat, latent_on.sum(), latent_on.any(0)

        return recon, lambda: sae.train(was)

    gate.start()  # its initialisation (dataset norms from 8 batches, the optional grid search) is on the clock
    t_init = time.perf_counter()
    sae = Initializer(init_cfg).initialize_sae_from_config(cfg, activation_stream=Stream())
    init_s = time.perf_counter() - t_init
    assert isinstance(sae, Crosscoder)
    compute_loss = sae.compute_loss

    def watched_loss(*a: Any, **kw: Any) -> Any:  # what fired this step: the dead-latent statistic
        ctx = compute_loss(*a, **kw)
        with torch.no_grad():
            since.add_(data.batch)
            since[ctx["feature_acts"].detach().amax(dim=(0, 1)) > 0] = 0
        return ctx

    sae.compute_loss = watched_loss  # type: ignore[method-assign]
    trainer = Trainer(tc)
    trainer.fit(sae, Stream(), eval_fn=lambda _: gate.after_step(trainer.cur_step + 1, recon_factory))
    train_s, final = gate.finish(trainer.cur_step, recon_factory)
    final["l0_latent_layer_pairs_per_hook"] = pairs["nnz"] / max(pairs["rows"], 1) / n_hooks
    return {
        "train_s": train_s, "init_s": init_s, "curve": gate.rec.curve, "final": final, "turn_log": gate.turn_log,
        "steps": trainer.cur_step, "dead_train_frac": float((since >= dead_window_tokens).float().mean()),
        "dataset_average_activation_norm": sae.dataset_average_activation_norm,
        "settings": {
            "library": f"llamascopium {_version('llamascopium')} (OpenMOSS lm_saes), "
                       f"transformer-lens {_version('transformer-lens')}",
            "model": f"Crosscoder(hook_points={list(hooks)}, d_model={d}, d_sae={n_features}, act_fn=topk, "
                     f"top_k={k}, sparsity_include_decoder_norm=True, norm_activation=dataset-wise)",
            "initializer": init_cfg.model_dump(),
            "trainer": {k_: v for k_, v in tc.model_dump().items() if k_ not in ("exp_result_path",)}
            | {"amp_dtype": amp_dtype},
            "l0": "l0: distinct latents active in any head per token; final.l0_latent_layer_pairs_per_hook: "
                  "(latent, head) activations per token / heads (its TopK runs per head, k per head)",
            "deviations": LMSAES_DEVIATIONS,
        },
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def at_time(curve: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The evaluation taken at the first step boundary at or after `seconds` of training (the final
    one when the whole run took less)."""
    for r in curve:
        if r["train_s"] >= seconds - 1e-9:
            return r
    return curve[-1]


def finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
